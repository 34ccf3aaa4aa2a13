package main

import (
	"context"
	"errors"
	"fmt"
	"os"
	"path/filepath"
	"runtime"
	"slices"
	"strings"
	"time"

	"github.com/fota-dev/fota/controller"
	"github.com/fota-dev/fota/protocol"
)

func fileSize(path string) int64 {
	fi, err := os.Stat(path)
	if err != nil {
		return 0
	}
	return fi.Size()
}

// fleetRun is one fleet configuration and its repetitions.
type fleetRun struct {
	label   string
	spec    fleetSpec
	results []fleetResult
	errs    []error
}

func (r *fleetRun) med(f func(fleetResult) float64) float64 { return medianOf(r.results, f) }

func (r *fleetRun) medDur(f func(fleetResult) time.Duration) time.Duration {
	return time.Duration(r.med(func(x fleetResult) float64 { return float64(f(x)) }))
}

// measure runs every configuration reps times, interleaved so that drift in the machine's
// load hits all of them alike. A configuration that fails is reported, and the others go on.
func measure(ctx context.Context, s *suite, name string, runs []*fleetRun, reps int) error {
	for rep := range reps {
		for i, r := range runs {
			dir := filepath.Join(s.work, fmt.Sprintf("%s-%d-%d", name, i, rep))
			t := time.Now()
			res, err := runFleet(ctx, s.cfg, dir, r.spec)
			if err != nil {
				if ctx.Err() != nil {
					return ctx.Err()
				}
				logf("%s: %s: %v", name, r.label, err)
				r.errs = append(r.errs, err)
				continue
			}
			what := "all installed in"
			if res.timedOut {
				what = "not finished after"
			}
			logf("%s: %s: %s %v (%d installed, %d failed), run took %v",
				name, r.label, what, res.total.Round(time.Millisecond), res.installed, res.failed, time.Since(t).Round(time.Second))
			r.results = append(r.results, res)
		}
	}
	return nil
}

// Figure 2.

func figFleet(ctx context.Context, s *suite) (string, error) {
	cfg := s.cfg
	var runs []*fleetRun
	byKey := map[string]*fleetRun{}
	for _, n := range cfg.fleet {
		for _, delta := range []bool{true, false} {
			kind := "full"
			if delta {
				kind = "delta"
			}
			r := &fleetRun{label: fmt.Sprintf("%d %s", n, kind), spec: fleetSpec{devices: n, delta: delta, sims: 1}}
			runs = append(runs, r)
			byKey[r.label] = r
		}
	}
	largest := slices.Max(cfg.fleet)
	var control *fleetRun
	if cfg.simProcs > 1 {
		control = &fleetRun{label: fmt.Sprintf("%d delta, %d simulators", largest, cfg.simProcs),
			spec: fleetSpec{devices: largest, delta: true, sims: cfg.simProcs}}
		runs = append(runs, control)
	}
	if err := measure(ctx, s, "fleet", runs, cfg.fleetReps); err != nil {
		return "", err
	}
	// The probe: the largest delta fleet with every device in flight at once, bounded, once.
	var probe *fleetRun
	if largest > cfg.maxConcurrent {
		probe = &fleetRun{label: fmt.Sprintf("%d delta, --max-concurrent %d", largest, largest),
			spec: fleetSpec{devices: largest, delta: true, sims: 1, maxConcurrent: largest, probe: cfg.probe}}
		if err := measure(ctx, s, "fleet-probe", []*fleetRun{probe}, 1); err != nil {
			return "", err
		}
		runs = append(runs, probe)
	}

	var b strings.Builder
	fmt.Fprintf(&b, "Each row is a fresh `fota serve` (its own process) and `fota sim` processes holding the simulated devices, driven as an operator would: "+
		"`fota certs init`, `fota firmware add` of primehub %s (counter 1, only for delta rows: with no base stored, devices get the full image) and %s (counter 2), "+
		"`fota sim --devices N --model primehub --version %s --counter 1 --image ... --pubkey DATA/release.pub --until-updated`, "+
		"`fota device list --json` until all N are online, `fota rollout create --max-concurrent C` (C = the smaller of N and %d, unless the row says otherwise), `fota rollout show --json` until all N installed. "+
		"Median of %d repetition(s), the configurations interleaved. "+
		"A simulator process applies each distinct patch to each distinct base once and shares the image among its devices, as a real fleet applies patches on its devices' own processors, not on the server's; "+
		"every device still checks the patch and the image it installs against the signed manifest.\n\n", baseVersion, targetVersion, baseVersion, cfg.maxConcurrent, cfg.fleetReps)
	b.WriteString("- **all installed**: from `rollout create` to the last job's finish in the server's records (its clock); it includes making the delta patch, which the server starts when the rollout is created. **first offer → all installed** leaves that out.\n")
	b.WriteString("- **server CPU per GB**: the server's user+system CPU (/proc/PID/stat) from `rollout create` to the end, per 10^9 bytes of artifacts (patch or image) the installed devices downloaded; cores busy is that CPU over the same wall time, for the server and for the simulators.\n")
	b.WriteString("- **other cores**: CPU of every other process on the machine (/proc/stat) over the same time: the fota CLI polling, and whatever else runs on a shared machine.\n")
	b.WriteString("- **RSS per idle device**: (server VmRSS with N devices connected, registered and idle - VmRSS before the first device) / N; peak is VmHWM. Simulator RSS is per simulated device.\n\n")
	b.WriteString("| devices | transfer | sims | online after | all installed | first offer → all installed | installed / failed | server CPU per GB | server cores | sim cores | other cores | peak server RSS | server RSS per idle device | sim RSS per device |\n")
	b.WriteString("|---:|---|---:|---:|---:|---:|---:|---:|---:|---:|---:|---:|---:|---:|\n")
	for _, r := range runs {
		n := r.spec.devices
		kind := "full image"
		if r.spec.delta {
			kind = "delta"
		}
		if len(r.results) == 0 {
			fmt.Fprintf(&b, "| %s | %s | %d | failed: %s | | | | | | | | | | |\n", thousands(int64(n)), kind, r.spec.sims, oneLine(errors.Join(r.errs...).Error()))
			continue
		}
		art := int64(r.med(func(x fleetResult) float64 { return float64(x.artifact) }))
		if r.spec.delta && r.results[0].deltaJobs < r.results[0].installed {
			kind = fmt.Sprintf("delta (%d of %d jobs)", r.results[0].deltaJobs, r.results[0].installed)
		}
		kind += " " + size(art)
		if r.spec.maxConcurrent > 0 {
			kind += fmt.Sprintf(", --max-concurrent %d", r.spec.maxConcurrent)
		}
		total := secs(r.medDur(func(x fleetResult) time.Duration { return x.total }))
		fromOffer := secs(r.medDur(func(x fleetResult) time.Duration { return x.fromOffer }))
		if x := r.results[0]; x.timedOut {
			total = fmt.Sprintf("not finished after %s: %s", secs(x.total), countsText(x.counts))
			fromOffer = "-"
		}
		fmt.Fprintf(&b, "| %s | %s | %d | %s | %s | %s | %s / %s | %.1f s | %.2f | %.2f | %.2f | %s | %s | %s |\n",
			thousands(int64(n)), kind, r.spec.sims,
			secs(r.medDur(func(x fleetResult) time.Duration { return x.connect })),
			total, fromOffer,
			thousands(int64(r.med(func(x fleetResult) float64 { return float64(x.installed) }))),
			thousands(int64(r.med(func(x fleetResult) float64 { return float64(x.failed) }))),
			r.med(cpuPerGB), r.med(serverCores), r.med(simCores), r.med(otherCores),
			size(int64(r.med(func(x fleetResult) float64 { return float64(x.hwm) }))),
			size(int64(r.med(idlePerDevice))),
			size(int64(r.med(func(x fleetResult) float64 { return float64(x.simRSSN) / float64(n) }))))
		if len(r.errs) > 0 {
			fmt.Fprintf(&b, "| | ↳ %d of %d repetitions failed: %s | | | | | | | | | | | | |\n", len(r.errs), len(r.errs)+len(r.results), oneLine(r.errs[0].Error()))
		}
		for _, x := range r.results {
			if x.simErr != "" {
				fmt.Fprintf(&b, "| | ↳ simulator: %s | | | | | | | | | | | | |\n", oneLine(x.simErr))
				break
			}
		}
		if d := int(r.med(func(x fleetResult) float64 { return float64(x.deferred) })); d > 0 {
			fmt.Fprintf(&b, "| | ↳ the server logged \"offer queue full, offer deferred\" %s times | | | | | | | | | | | | |\n", thousands(int64(d)))
		}
	}

	b.WriteString("\nBaseline: the same fleet with the full image (what an updater without deltas sends), measured in the same run.\n\n")
	b.WriteString("| devices | all installed: delta | full image | delta / full | server CPU: delta | full image | delta / full | bytes delivered: delta | full image | delta / full |\n|---:|---:|---:|---:|---:|---:|---:|---:|---:|---:|\n")
	for _, n := range cfg.fleet {
		d, f := byKey[fmt.Sprintf("%d delta", n)], byKey[fmt.Sprintf("%d full", n)]
		if len(d.results) == 0 || len(f.results) == 0 {
			fmt.Fprintf(&b, "| %s | failed | | | | | | | | |\n", thousands(int64(n)))
			continue
		}
		dt, ft := d.medDur(func(x fleetResult) time.Duration { return x.total }), f.medDur(func(x fleetResult) time.Duration { return x.total })
		dc, fc := d.medDur(func(x fleetResult) time.Duration { return x.serverCPU }), f.medDur(func(x fleetResult) time.Duration { return x.serverCPU })
		db, fb := d.med(func(x fleetResult) float64 { return float64(x.delivered) }), f.med(func(x fleetResult) float64 { return float64(x.delivered) })
		fmt.Fprintf(&b, "| %s | %s | %s | %s | %s | %s | %s | %s | %s | %s |\n", thousands(int64(n)), secs(dt), secs(ft), ratio(dt.Seconds(), ft.Seconds()),
			secs(dc), secs(fc), ratio(dc.Seconds(), fc.Seconds()), size(int64(db)), size(int64(fb)), ratio(db, fb))
	}

	// The memory baseline: a plain crypto/tls server's idle connection, from figure 3.
	var atLargest []fleetResult
	for _, r := range runs {
		if r.spec.devices == largest {
			atLargest = append(atLargest, r.results...)
		}
	}
	idle := medianOf(atLargest, idlePerDevice)
	if raw, ok := s.stormIdle[largest]; ok && len(atLargest) > 0 {
		fmt.Fprintf(&b, "\nMemory baseline: a plain crypto/tls server holds an idle mTLS connection in %s (figure 3, %s connections); "+
			"fota serve holds an idle connected device (session, subscriptions, registry entry) in %s at %s devices: %s times as much.\n",
			size(int64(raw)), thousands(int64(largest)), size(int64(idle)), thousands(int64(largest)), ratio(idle, raw))
	}

	// Is the simulator the bottleneck?
	head := byKey[fmt.Sprintf("%d delta", largest)]
	if len(head.results) > 0 {
		simC, srvC := head.med(simCores), head.med(serverCores)
		fmt.Fprintf(&b, "\nIs the simulator the bottleneck? Checked two ways. CPU: at %s delta updates the simulator used %.2f cores and the server %.2f, of the machine's %d",
			thousands(int64(largest)), simC, srvC, runtime.NumCPU())
		switch {
		case simC+srvC > 0.8*float64(runtime.NumCPU()):
			b.WriteString(": together they fill the machine, so the two compete for its cores and the times above are upper bounds of what the server alone would need. ")
		default:
			b.WriteString(": together they leave cores idle, so neither is starved of CPU. ")
		}
		cpu := head.medDur(func(x fleetResult) time.Duration { return x.serverCPU })
		fmt.Fprintf(&b, "The server's own CPU for the rollout was %s, so even with the simulator on other machines it would need at least %s on these %d cores. ",
			secs(cpu), secs(cpu/time.Duration(runtime.NumCPU())), runtime.NumCPU())
		if control != nil && len(control.results) > 0 {
			c1 := head.medDur(func(x fleetResult) time.Duration { return x.connect })
			c2 := control.medDur(func(x fleetResult) time.Duration { return x.connect })
			if c2 < c1*85/100 {
				fmt.Fprintf(&b, "Connecting is another matter: split over %d processes the fleet was online after %s against %s with one (%s), "+
					"so one simulator process does limit how fast its devices connect; that phase is outside the rollout times. ",
					cfg.simProcs, secs(c2), secs(c1), ratio(c2.Seconds(), c1.Seconds()))
			}
			t1 := head.medDur(func(x fleetResult) time.Duration { return x.fromOffer })
			t2 := control.medDur(func(x fleetResult) time.Duration { return x.fromOffer })
			verdict := "no faster, so one simulator process is not what limits the fleet"
			if t2 < t1*85/100 {
				verdict = "faster, so one simulator process does hold the figure back"
			}
			fmt.Fprintf(&b, "Control: the same fleet split over %d simulator processes took %s from first offer to all installed, against %s with one (%s): %s.\n",
				cfg.simProcs, secs(t2), secs(t1), ratio(t2.Seconds(), t1.Seconds()), verdict)
		} else {
			b.WriteString("The control run, the fleet split over several simulator processes, did not run.\n")
		}
	}

	// Targets.
	if len(head.results) > 0 {
		t := head.medDur(func(x fleetResult) time.Duration { return x.total })
		from := head.medDur(func(x fleetResult) time.Duration { return x.fromOffer })
		met := yesNo(t < 30*time.Second)
		if largest != 10000 {
			met = fmt.Sprintf("not measured at 10,000 (this run: %s devices)", thousands(int64(largest)))
		}
		s.targets.fleet = &target{
			what:     "10,000 delta updates complete in under 30 s",
			measured: fmt.Sprintf("%s from rollout create (%s from the first offer), %s devices", secs(t), secs(from), thousands(int64(largest))),
			met:      met,
		}
	}
	if len(atLargest) > 0 {
		met := yesNo(idle < 40<<10)
		if largest != 10000 {
			met = fmt.Sprintf("not measured at 10,000 (this run: %s devices)", thousands(int64(largest)))
		}
		s.targets.memory = &target{
			what:     "under 40 KiB of server memory per idle connected device at 10,000 devices",
			measured: fmt.Sprintf("%s per device at %s devices", size(int64(idle)), thousands(int64(largest))),
			met:      met,
		}
	}
	var errs []error
	for _, r := range runs {
		errs = append(errs, r.errs...)
	}
	return b.String(), errors.Join(errs...)
}

func cpuPerGB(x fleetResult) float64 {
	if x.delivered == 0 {
		return 0
	}
	return x.serverCPU.Seconds() / (float64(x.delivered) / 1e9)
}

func serverCores(x fleetResult) float64 { return x.serverCPU.Seconds() / x.window.Seconds() }
func otherCores(x fleetResult) float64 {
	return max(0, (x.machineCPU-x.serverCPU-x.simCPU).Seconds()/x.window.Seconds())
}

// countsText writes job counts by state in the order a job moves through them.
func countsText(c map[string]int) string {
	var parts []string
	for _, st := range controller.JobStates {
		if c[st] > 0 {
			parts = append(parts, fmt.Sprintf("%s %s", st, thousands(int64(c[st]))))
		}
	}
	return strings.Join(parts, ", ")
}
func simCores(x fleetResult) float64 { return x.simCPU.Seconds() / x.window.Seconds() }

func idlePerDevice(x fleetResult) float64 {
	return float64(x.rssN-x.rss0) / float64(x.devices)
}

// Figure 6.

// simHasFaults reports whether the fota binary's sim has the fault flags figure 6 uses.
func simHasFaults(ctx context.Context, bin string) bool {
	out, _ := run(ctx, time.Minute, nil, bin, "sim", "-h")
	return strings.Contains(string(out), "-disconnect-every") && strings.Contains(string(out), "-power-loss-rate")
}

func figResume(ctx context.Context, s *suite) (string, error) {
	cfg := s.cfg
	// The flags come from another change; wait for them a while, rebuilding fota.
	for attempt := 0; !simHasFaults(ctx, cfg.fotaBin); attempt++ {
		if attempt == 10 {
			return "", errors.New("fota sim has no --disconnect-every and --power-loss-rate flags yet")
		}
		logf("fota sim has no fault flags yet; rebuilding in 30 s")
		if err := sleep(ctx, 30*time.Second); err != nil {
			return "", err
		}
		if _, err := run(ctx, 5*time.Minute, nil, "go", "build", "-o", cfg.fotaBin, "."); err != nil {
			logf("rebuild fota: %v", err)
		}
	}
	n := cfg.resumeDevices
	// Two groups, each with its own baseline: the default chunk size, where the whole image
	// fits in one window, and 4 KiB chunks (--max-chunk), where only a window's worth is in
	// flight when the connection breaks. Fault rates are per chunk frame, so the small
	// chunks get smaller rates for about as many interruptions per device.
	type group struct {
		name            string
		args            []string
		every, lossRate string
	}
	groups := []group{
		{fmt.Sprintf("%s chunks (default)", size(protocol.DefaultChunkSize)), nil, "2", "0.2"},
		{"4 KiB chunks", []string{"--max-chunk", "4096"}, "32", "0.02"},
	}
	var runs []*fleetRun
	for _, g := range groups {
		with := func(extra ...string) []string {
			return append(append([]string{"--seed", "1"}, g.args...), extra...)
		}
		runs = append(runs,
			&fleetRun{label: g.name + ", no faults (baseline)", spec: fleetSpec{devices: n, sims: 1, proxy: true, simArgs: with()}},
			&fleetRun{label: fmt.Sprintf("%s, `--disconnect-every %s`", g.name, g.every), spec: fleetSpec{devices: n, sims: 1, proxy: true,
				simArgs: with("--disconnect-every", g.every)}},
			&fleetRun{label: fmt.Sprintf("%s, `--power-loss-rate %s --state-dir D`: resumes from its checkpoint", g.name, g.lossRate), spec: fleetSpec{devices: n, sims: 1, proxy: true, stateDir: true,
				simArgs: with("--power-loss-rate", g.lossRate)}},
			&fleetRun{label: fmt.Sprintf("%s, `--power-loss-rate %s`, no state dir: starts over (no resume)", g.name, g.lossRate), spec: fleetSpec{devices: n, sims: 1, proxy: true,
				simArgs: with("--power-loss-rate", g.lossRate)}},
		)
	}
	if err := measure(ctx, s, "resume", runs, 1); err != nil {
		return "", err
	}
	img := float64(fileSize(targetImage(cfg)))
	var b strings.Builder
	fmt.Fprintf(&b, "%s devices update from the full image (only %s is stored, so there is no delta: %s to resume), through `fota serve` and `fota sim` as in figure 2, "+
		"with the simulator's faults on (`--seed 1`). A TCP proxy between the devices and the server counts every byte the server sends (TLS records as on the wire) and every connection. "+
		"Each group's baseline is the same fleet without faults in the same run: each device connects twice (it reconnects after its reboot). "+
		"Interruptions per device = its connections - the baseline's; bytes sent again per interruption = (server bytes per device - the baseline's) / interruptions, "+
		"so it counts the chunks sent again and the reconnection (TLS handshake, status, offer) together. "+
		"The device without a state dir loses its download with its power and starts over: that is what an updater without resume pays, and the last column compares with it. "+
		"Window %d requests; with --state-dir a device checkpoints every %s (the default).\n\n",
		thousands(int64(n)), targetVersion, size(int64(img)), protocol.DefaultWindow, size(64<<10))
	b.WriteString("| faults | installed / failed | all installed | connections per device | interruptions per device | server bytes per device | bytes sent again per interruption | vs image size | vs starting over |\n|---|---:|---:|---:|---:|---:|---:|---:|---:|\n")
	for gi := range groups {
		rs := runs[4*gi : 4*gi+4]
		base := rs[0]
		if len(base.results) == 0 {
			fmt.Fprintf(&b, "| %s | failed: %s | | | | | | | |\n", base.label, oneLine(errors.Join(base.errs...).Error()))
			continue
		}
		baseConns := float64(base.results[0].conns) / float64(n)
		baseDown := float64(base.results[0].down) / float64(n)
		perInterruption := func(r *fleetRun) (inter, per float64, ok bool) {
			if len(r.results) == 0 {
				return 0, 0, false
			}
			x := r.results[0]
			inter = float64(x.conns)/float64(n) - baseConns
			if inter <= 0 {
				return inter, 0, false
			}
			return inter, (float64(x.down)/float64(n) - baseDown) / inter, true
		}
		_, over, overOK := perInterruption(rs[3])
		for i, r := range rs {
			if len(r.results) == 0 {
				fmt.Fprintf(&b, "| %s | failed: %s | | | | | | | |\n", r.label, oneLine(errors.Join(r.errs...).Error()))
				continue
			}
			x := r.results[0]
			inter, per, ok := perInterruption(r)
			again, vsImg, vsOver := "-", "-", "-"
			if i > 0 && ok {
				again, vsImg = size(int64(per)), ratio(per, img)
				if overOK {
					vsOver = ratio(per, over)
				}
			}
			fmt.Fprintf(&b, "| %s | %d / %d | %s | %.2f | %.2f | %s | %s | %s | %s |\n", r.label, x.installed, x.failed, secs(x.total),
				float64(x.conns)/float64(n), max(inter, 0), size(x.down/int64(n)), again, vsImg, vsOver)
			if x.simErr != "" {
				fmt.Fprintf(&b, "| ↳ simulator | %s | | | | | | | |\n", oneLine(x.simErr))
			}
		}
	}
	var errs []error
	for _, r := range runs {
		errs = append(errs, r.errs...)
	}
	return b.String(), errors.Join(errs...)
}
