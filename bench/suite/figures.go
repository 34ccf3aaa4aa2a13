package main

import (
	"context"
	"encoding/json"
	"fmt"
	"path/filepath"
	"runtime"
	"slices"
	"strings"
	"time"

	"github.com/fota-dev/fota/protocol"
)

// runJSON runs a bench command with -json and decodes its output into v.
func runJSON(ctx context.Context, timeout time.Duration, v any, argv ...string) error {
	out, err := run(ctx, timeout, nil, append(argv, "-json")...)
	if err != nil {
		return err
	}
	if err := json.Unmarshal(out, v); err != nil {
		return fmt.Errorf("%s: decode output: %w", filepath.Base(argv[0]), err)
	}
	return nil
}

// Figure 1.

type xferResult struct {
	Method string  `json:"method"`
	Chunk  int     `json:"chunk"`
	Window int     `json:"window"`
	MBps   float64 `json:"mbps"`
	Min    float64 `json:"mbps_min"`
	Max    float64 `json:"mbps_max"`
	CPU    float64 `json:"cpu_cores"`
}

type xferOutput struct {
	ImageBytes int64        `json:"image_bytes"`
	Images     int          `json:"images"`
	Rounds     int          `json:"rounds"`
	DeviceRate int64        `json:"device_rate"`
	Results    []xferResult `json:"results"`
	Busy       int          `json:"busy"`
	Reasks     int          `json:"reasks"`
}

func (o xferOutput) get(method string) (xferResult, error) {
	for _, r := range o.Results {
		if r.Method == method {
			return r, nil
		}
	}
	return xferResult{}, fmt.Errorf("bench/transfer printed no %s result", method)
}

func figTransfer(ctx context.Context, s *suite) (string, error) {
	cfg := s.cfg
	args := []string{cfg.transferBin, "-firmware", targetImage(cfg),
		"-chunks", fmt.Sprint(protocol.DefaultChunkSize >> 10), "-windows", fmt.Sprint(protocol.DefaultWindow),
		"-rounds", fmt.Sprint(cfg.xferRounds), "-images", fmt.Sprint(cfg.xferImages)}
	var out xferOutput
	if err := runJSON(ctx, 20*time.Minute, &out, args...); err != nil {
		return "", err
	}
	var rows [3]xferResult
	for i, method := range []string{"MQTT", "HTTPS", "raw TLS"} {
		var err error
		if rows[i], err = out.get(method); err != nil {
			return "", err
		}
	}
	var b strings.Builder
	fmt.Fprintf(&b, "One device downloads the %s-byte image of pybricks primehub 7.28.0 %d times per measurement on a connection already open; "+
		"median of %d round(s), the methods interleaved in each round (bench/transfer). "+
		"fota's path is the embedded broker and the transfer server as `fota serve` wires them (no per-device rate cap), mutual TLS, the protocol's default chunk size (%d KiB) and window (%d), "+
		"the device checking the CRC of every frame. HTTPS is Go's net/http (HTTP/1.1, mutual TLS, same certificates); raw TLS writes the image on a TLS socket. "+
		"Client and server share one process, so CPU is both together, in cores.\n\n",
		thousands(out.ImageBytes), out.Images, out.Rounds, protocol.DefaultChunkSize>>10, protocol.DefaultWindow)
	b.WriteString("| method | MB/s | min..max | vs HTTPS | vs raw TLS | CPU cores |\n|---|---:|---:|---:|---:|---:|\n")
	labels := []string{"fota MQTT/TLS", "**baseline:** HTTPS, net/http", "raw TLS (upper bound)"}
	for i, r := range rows {
		fmt.Fprintf(&b, "| %s | %.1f | %.1f..%.1f | %s | %s | %.2f |\n", labels[i], r.MBps, r.Min, r.Max, ratio(r.MBps, rows[1].MBps), ratio(r.MBps, rows[2].MBps), r.CPU)
	}
	fmt.Fprintf(&b, "\nThe device saw %d busy answers and re-asked %d times.\n", out.Busy, out.Reasks)
	r := rows[0].MBps / rows[1].MBps
	s.targets.transfer = &target{
		what:     "one device reaches half the HTTPS throughput",
		measured: fmt.Sprintf("%.2fx HTTPS (%.0f vs %.0f MB/s)", r, rows[0].MBps, rows[1].MBps),
		met:      yesNo(r >= 0.5),
	}
	return b.String(), nil
}

// Figure 4.

type deltaOutput struct {
	Runs        int   `json:"runs"`
	BaselineRSS int64 `json:"fota_idle_rss"`
	Pairs       []struct {
		Pair     string `json:"pair"`
		OldBytes int64  `json:"old_bytes"`
		NewBytes int64  `json:"new_bytes"`
		Tools    []struct {
			Tool       string  `json:"tool"`
			PatchBytes int64   `json:"patch_bytes"`
			MakeMS     float64 `json:"make_ms"`
			ApplyMS    float64 `json:"apply_ms"`
			MakeRSS    int64   `json:"make_peak_rss"`
			ApplyRSS   int64   `json:"apply_peak_rss"`
		} `json:"tools"`
	} `json:"pairs"`
}

func figDelta(ctx context.Context, s *suite) (string, error) {
	var o deltaOutput
	if err := runJSON(ctx, 30*time.Minute, &o, s.cfg.deltaBin, "-firmware", s.cfg.firmware, "-runs", fmt.Sprint(s.cfg.deltaRuns)); err != nil {
		return "", err
	}
	var b strings.Builder
	fmt.Fprintf(&b, "Every consecutive pair of versions of each product in %s, and oldest to newest (bench/delta). "+
		"Each tool runs in its own process; time is wall time from start to exit, the best of %d run(s); "+
		"memory is the process's peak RSS (the fota binary idle: %s). Baselines: Debian's bsdiff/bspatch and xdelta3 -9, "+
		"installed by the make target when missing. Every output is checked against the new image.\n\n", s.cfg.firmware, o.Runs, size(o.BaselineRSS))
	b.WriteString("| pair | new image | fota delta | Debian bsdiff | xdelta3 -9 | fota / bsdiff | fota / xdelta3 |\n|---|---:|---:|---:|---:|---:|---:|\n")
	for _, p := range o.Pairs {
		if len(p.Tools) != 3 {
			return b.String(), fmt.Errorf("bench/delta: %d tools for %s, want 3", len(p.Tools), p.Pair)
		}
		f, d, x := p.Tools[0], p.Tools[1], p.Tools[2]
		fmt.Fprintf(&b, "| %s | %s | %s (%.1f%%) | %s | %s | %s | %s |\n", p.Pair, thousands(p.NewBytes),
			thousands(f.PatchBytes), 100*float64(f.PatchBytes)/float64(p.NewBytes), thousands(d.PatchBytes), thousands(x.PatchBytes),
			ratio(float64(f.PatchBytes), float64(d.PatchBytes)), ratio(float64(f.PatchBytes), float64(x.PatchBytes)))
	}
	b.WriteString("\nTime and peak memory to make a patch and to apply it:\n\n")
	b.WriteString("| pair | make: fota | bsdiff | xdelta3 | fota / bsdiff | apply: fota | bspatch | xdelta3 | fota / bspatch | make RSS: fota | bsdiff | xdelta3 | apply RSS: fota | bspatch | xdelta3 |\n")
	b.WriteString("|---|---:|---:|---:|---:|---:|---:|---:|---:|---:|---:|---:|---:|---:|---:|\n")
	for _, p := range o.Pairs {
		f, d, x := p.Tools[0], p.Tools[1], p.Tools[2]
		fmt.Fprintf(&b, "| %s | %.0f ms | %.0f ms | %.0f ms | %s | %.0f ms | %.0f ms | %.0f ms | %s | %s | %s | %s | %s | %s | %s |\n", p.Pair,
			f.MakeMS, d.MakeMS, x.MakeMS, ratio(f.MakeMS, d.MakeMS), f.ApplyMS, d.ApplyMS, x.ApplyMS, ratio(f.ApplyMS, d.ApplyMS),
			size(f.MakeRSS), size(d.MakeRSS), size(x.MakeRSS), size(f.ApplyRSS), size(d.ApplyRSS), size(x.ApplyRSS))
	}
	return b.String(), nil
}

// Figure 5.

type controllerOutput struct {
	Senders         int     `json:"senders"`
	Events          int     `json:"events"`
	BaselineEvents  int     `json:"baseline_events"`
	BaselineRate    float64 `json:"baseline_events_per_s"`
	GroupRate       float64 `json:"events_per_s"`
	WritesPerCommit float64 `json:"writes_per_commit"`
	Devices         int     `json:"devices"`
	RegisterS       float64 `json:"register_s"`
	LoadS           float64 `json:"load_s"`
	PlanS           float64 `json:"plan_s"`
}

func figController(ctx context.Context, s *suite) (string, error) {
	cfg := s.cfg
	var o controllerOutput
	if err := runJSON(ctx, 30*time.Minute, &o, cfg.controllerBin, "-devices", fmt.Sprint(cfg.ctrlDevices),
		"-events", fmt.Sprint(cfg.ctrlEvents), "-senders", fmt.Sprint(cfg.ctrlSenders)); err != nil {
		return "", err
	}
	var b strings.Builder
	fmt.Fprintf(&b, "The rollout controller on a real bbolt file with fsync (bench/controller), in one process. "+
		"Events: %s device progress events from %s devices at once, each waiting until its event is durable; "+
		"the baseline stores each event in a bbolt transaction of its own (%s events), the obvious way. "+
		"Planning: %s devices registered by status messages, the controller restarted (registry loaded from the file), then a rollout created over all of them in waves 1,10,50,100%%.\n\n",
		thousands(int64(o.Events)), thousands(int64(o.Senders)), thousands(int64(o.BaselineEvents)), thousands(int64(o.Devices)))
	b.WriteString("| measurement | fota | baseline | fota / baseline |\n|---|---:|---:|---:|\n")
	fmt.Fprintf(&b, "| durable device events per second | %s (%.0f events per commit) | %s (one transaction each) | %s |\n",
		thousands(int64(o.GroupRate)), o.WritesPerCommit, thousands(int64(o.BaselineRate)), ratio(o.GroupRate, o.BaselineRate))
	fmt.Fprintf(&b, "| plan a rollout over %s registered devices | %s | - | - |\n", thousands(int64(o.Devices)), secs(time.Duration(o.PlanS*float64(time.Second))))
	fmt.Fprintf(&b, "| load the registry of %s devices at start | %s | - | - |\n", thousands(int64(o.Devices)), secs(time.Duration(o.LoadS*float64(time.Second))))
	fmt.Fprintf(&b, "| register %s devices from status messages | %s (%s/s) | - | - |\n", thousands(int64(o.Devices)),
		secs(time.Duration(o.RegisterS*float64(time.Second))), thousands(int64(float64(o.Devices)/o.RegisterS)))
	return b.String(), nil
}

// Figure 3.

func figStorm(ctx context.Context, s *suite) (string, error) {
	cfg := s.cfg
	dir := filepath.Join(s.work, "storm")
	srv, err := startFota(ctx, cfg.fotaBin, dir)
	if err != nil {
		return "", err
	}
	defer srv.close()
	raw, rawAddr, err := startRawServer(ctx, dir, srv.certs)
	if err != nil {
		return "", err
	}
	defer raw.stop(5 * time.Second)
	t := time.Now()
	ids, cfgs, err := deviceConfigs(srv.certs, cfg.storm)
	if err != nil {
		return "", err
	}
	logf("issued %d device certificates in %v", len(ids), time.Since(t).Round(time.Millisecond))
	var raws, fotas, rawsAll, fotasAll []stormResult
	// pair runs one storm against each server, the first server of the pair alternating, so
	// that neither always meets a machine warmed up (or worn out) by the other.
	pair := func(rep, conc int) (r, f stormResult, err error) {
		order := []bool{false, true}
		if rep%2 == 1 {
			order = []bool{true, false}
		}
		for _, isFota := range order {
			if isFota {
				f, err = storm(ctx, srv.mqtt, srv.p, ids, cfgs, conc)
			} else {
				r, err = storm(ctx, rawAddr, raw, ids, cfgs, conc)
			}
			if err != nil {
				return r, f, err
			}
		}
		return r, f, nil
	}
	for rep := range cfg.stormReps {
		r, f, err := pair(rep, cfg.stormConc)
		if err != nil {
			return "", err
		}
		raws, fotas = append(raws, r), append(fotas, f)
		logf("storm %d: raw %.0f/s (%d failed), fota %.0f/s (%d failed)", rep+1, r.rate(), r.failed, f.rate(), f.failed)
	}
	if cfg.stormConc < cfg.storm {
		r, f, err := pair(0, cfg.storm)
		if err != nil {
			return "", err
		}
		rawsAll, fotasAll = append(rawsAll, r), append(fotasAll, f)
		logf("storm all at once: raw %.0f/s (%d failed), fota %.0f/s (%d failed)", r.rate(), r.failed, f.rate(), f.failed)
	}
	var b strings.Builder
	fmt.Fprintf(&b, "%s devices, each with its own certificate, connect from one client process: "+
		"TCP, a full TLS 1.3 handshake with client certificate (no session resumption), an MQTT CONNECT, and CONNACK; "+
		"the connections stay open until every device is done. "+
		"fota is `fota serve` in its own process (the broker checks the certificate, its revocation and the client id, and registers the device). "+
		"The baseline is a plain crypto/tls server in its own process with the same certificates and client-certificate verification, "+
		"which reads the CONNECT and answers CONNACK. Same client code for both. "+
		"The measured storms keep %s devices in flight (a new one starts as one finishes): storms per server: %d, alternated (which server goes first alternates too), medians shown. "+
		"Then one storm per server sends all %s at once. "+
		"Either server drops a connection whose handshake and CONNECT take more than %v (the broker's connect timeout), and the client gives up after %v. "+
		"Handshakes/s = connected devices / time from the first dial to the last CONNACK.\n\n",
		thousands(int64(cfg.storm)), thousands(int64(cfg.stormConc)), cfg.stormReps, thousands(int64(cfg.storm)), connectTimeout, stormTimeout)
	b.WriteString("| server | in flight | handshakes/s | failed | latency p50 | p99 | server CPU per handshake | client CPU per handshake | server RSS per idle connection |\n|---|---:|---:|---:|---:|---:|---:|---:|---:|\n")
	// Memory is read from each server's first storm only: the Go runtime keeps memory it freed
	// for a while, so later storms start from a higher RSS and their difference means little.
	row := func(label string, conc int, rs []stormResult, mem string) {
		failed, total := 0, 0
		errs := map[string]int{}
		for _, r := range rs {
			failed += r.failed
			total += r.ok + r.failed
			for k, v := range r.errs {
				errs[k] += v
			}
		}
		perHS := func(d func(stormResult) time.Duration) string {
			return fmt.Sprintf("%.0f µs", medianOf(rs, func(r stormResult) float64 {
				return float64(d(r).Microseconds()) / float64(max(r.ok, 1))
			}))
		}
		fmt.Fprintf(&b, "| %s | %s | %s | %d of %s | %.0f ms | %.0f ms | %s | %s | %s |\n", label, thousands(int64(conc)),
			thousands(int64(medianOf(rs, stormResult.rate))), failed, thousands(int64(total)),
			medianOf(rs, func(r stormResult) float64 { return float64(r.p50.Milliseconds()) }),
			medianOf(rs, func(r stormResult) float64 { return float64(r.p99.Milliseconds()) }),
			perHS(func(r stormResult) time.Duration { return r.serverCPU }),
			perHS(func(r stormResult) time.Duration { return r.clientCPU }), mem)
		if len(errs) > 0 {
			var kinds []string
			for k, v := range errs {
				kinds = append(kinds, fmt.Sprintf("%s: %d", k, v))
			}
			slices.Sort(kinds)
			fmt.Fprintf(&b, "| ↳ failures | | %s | | | | | | |\n", strings.Join(kinds, "; "))
		}
	}
	ratios := func(fotas, raws []stormResult, mem string) {
		perHS := func(r stormResult) float64 { return r.serverCPU.Seconds() / float64(max(r.ok, 1)) }
		fmt.Fprintf(&b, "| fota / baseline | | %s | | | | %s | | %s |\n", ratio(medianOf(fotas, stormResult.rate), medianOf(raws, stormResult.rate)),
			ratio(medianOf(fotas, perHS), medianOf(raws, perHS)), mem)
	}
	rawIdle, fotaIdle := idlePerConn(raws[0]), idlePerConn(fotas[0])
	row("**baseline:** crypto/tls", cfg.stormConc, raws, size(int64(rawIdle)))
	row("fota serve", cfg.stormConc, fotas, size(int64(fotaIdle)))
	ratios(fotas, raws, ratio(fotaIdle, rawIdle))
	if len(rawsAll) > 0 {
		row("**baseline:** crypto/tls", cfg.storm, rawsAll, "-")
		row("fota serve", cfg.storm, fotasAll, "-")
		ratios(fotasAll, rawsAll, "")
	}
	fmt.Fprintf(&b, "\nThe client shares the machine's %d cores with the server it measures, alike for both servers. "+
		"Server RSS per idle connection is (RSS with every connection open - RSS before the storm) / connected devices, from each server's first storm, "+
		"in a fresh process.\n", runtime.NumCPU())
	s.stormIdle[cfg.storm] = rawIdle

	count := func(rs []stormResult) (failed int) {
		for _, r := range rs {
			failed += r.failed
		}
		return failed
	}
	rawRate, fotaRate := medianOf(raws, stormResult.rate), medianOf(fotas, stormResult.rate)
	fotaFailed := count(fotas)
	met := yesNo(fotaRate >= 0.7*rawRate && fotaFailed == 0)
	if cfg.storm != 10000 {
		met = fmt.Sprintf("not measured at 10,000 (this run: %s devices)", thousands(int64(cfg.storm)))
	}
	measured := fmt.Sprintf("%.0f%% of raw (%.0f vs %.0f handshakes/s), %d of %s failed, %s in flight",
		100*fotaRate/rawRate, fotaRate, rawRate, fotaFailed, thousands(int64(cfg.storm*cfg.stormReps)), thousands(int64(cfg.stormConc)))
	if len(rawsAll) > 0 {
		measured += fmt.Sprintf("; all %s at once: %.0f%% of raw, %d failed (raw: %d failed)", thousands(int64(cfg.storm)),
			100*medianOf(fotasAll, stormResult.rate)/medianOf(rawsAll, stormResult.rate), count(fotasAll), count(rawsAll))
	}
	s.targets.storm = &target{
		what:     "a connect storm of 10,000 mTLS devices reaches 70% of the raw TLS handshake rate with no failures",
		measured: measured,
		met:      met,
	}
	return b.String(), nil
}

func idlePerConn(r stormResult) float64 {
	if r.ok == 0 {
		return 0
	}
	return float64(r.rssN-r.rss0) / float64(r.ok)
}
