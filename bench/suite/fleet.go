package main

import (
	"context"
	"errors"
	"fmt"
	"io"
	"net"
	"os"
	"path/filepath"
	"strings"
	"sync"
	"sync/atomic"
	"time"

	"github.com/fota-dev/fota/controller"
)

// The release pair of the fleet figures.
const (
	fleetModel    = "primehub"
	baseVersion   = "7.27.0"
	targetVersion = "7.28.0"
)

func baseImage(cfg *config) string {
	return filepath.Join(cfg.firmware, "pybricks-primehub-"+baseVersion+".bin")
}

func targetImage(cfg *config) string {
	return filepath.Join(cfg.firmware, "pybricks-primehub-"+targetVersion+".bin")
}

// fleetSpec is one fleet update to measure.
type fleetSpec struct {
	devices  int
	delta    bool     // add the base version too, so that devices are offered a patch
	sims     int      // simulator processes the fleet is split over
	simArgs  []string // extra `fota sim` flags: faults
	stateDir bool     // give the simulators a --state-dir
	proxy    bool     // count bytes and connections between devices and server
	// maxConcurrent is the rollout's --max-concurrent; 0 means the suite's -max-concurrent,
	// capped at the fleet size.
	maxConcurrent int
	// probe, when set, bounds the rollout: if it has not finished by then, what it reached
	// is the result, not an error.
	probe time.Duration
}

// fleetResult is what one fleet update measured.
type fleetResult struct {
	devices           int
	maxConcurrent     int
	connect           time.Duration // simulators started -> every device online
	total             time.Duration // rollout created -> last device installed (server's records)
	fromOffer         time.Duration // first offer -> last device installed
	installed, failed int
	deltaJobs         int
	artifact          int64 // bytes one device downloads: the patch or the image
	delivered         int64 // artifact bytes over the installed jobs
	serverCPU, simCPU time.Duration
	window            time.Duration // wall time over which serverCPU and simCPU were taken
	rss0, rssN, hwm   int64         // server: no device, N idle devices, peak
	simRSSN, simHWM   int64         // simulators together
	down, up, conns   int64         // through the proxy
	simErr            string        // a simulator's complaint, if one exited with an error
	machineCPU        time.Duration // every process's CPU over the window: others share the machine
	timedOut          bool          // a probe's rollout did not finish
	counts            map[string]int
	deferred          int // "offer queue full" warnings in the server's log
}

// runFleet drives one fleet update like an operator: a fresh `fota serve`, `fota firmware
// add`, `fota sim` processes, `fota device list` until every device is online, `fota rollout
// create`, `fota rollout show` until every device installed or failed.
func runFleet(ctx context.Context, cfg *config, dir string, spec fleetSpec) (r fleetResult, err error) {
	r.devices = spec.devices
	if err := os.MkdirAll(dir, 0o700); err != nil {
		return r, err
	}
	s, err := startFota(ctx, cfg.fotaBin, dir)
	if err != nil {
		return r, err
	}
	defer s.close()
	if spec.delta {
		if err := s.addFirmware(ctx, fleetModel, baseVersion, baseImage(cfg), 1); err != nil {
			return r, err
		}
	}
	if err := s.addFirmware(ctx, fleetModel, targetVersion, targetImage(cfg), 2); err != nil {
		return r, err
	}
	settle(ctx, s.p, 5*time.Second)
	u0, err := s.p.usage()
	if err != nil {
		return r, err
	}
	r.rss0 = u0.rss

	broker := s.mqtt
	if spec.proxy {
		px, err := startProxy(s.mqtt)
		if err != nil {
			return r, err
		}
		defer px.close()
		broker = px.ln.Addr().String()
		defer func() { r.down, r.up, r.conns = px.down.Load(), px.up.Load(), px.conns.Load() }()
	}

	n := spec.devices
	sims := make([]*proc, max(spec.sims, 1))
	defer func() {
		for _, p := range sims {
			if p != nil {
				p.stop(5 * time.Second)
			}
		}
	}()
	start := time.Now()
	for i := range sims {
		count := n / len(sims)
		if i < n%len(sims) {
			count++
		}
		argv := []string{cfg.fotaBin, "sim", "--certs", s.certs, "--broker", broker,
			"--devices", fmt.Sprint(count), "--model", fleetModel, "--version", baseVersion, "--counter", "1",
			"--image", baseImage(cfg), "--pubkey", s.releasePub(), "--until-updated", "--prefix", fmt.Sprintf("sim%d", i)}
		if spec.stateDir {
			argv = append(argv, "--state-dir", filepath.Join(dir, fmt.Sprintf("state%d", i)))
		}
		argv = append(argv, spec.simArgs...)
		if sims[i], err = startProc(fmt.Sprintf("sim%d", i), dir, nil, argv...); err != nil {
			return r, err
		}
	}
	simFailed := func() error {
		for _, p := range sims {
			if p.exited() && p.err != nil {
				return fmt.Errorf("fota sim exited: %v: %s", p.err, p.tail(1000))
			}
		}
		return nil
	}

	deadline := start.Add(time.Minute + time.Duration(n)*10*time.Millisecond)
	for {
		online, err := s.online(ctx)
		if err != nil {
			return r, err
		}
		if online >= n {
			break
		}
		if err := simFailed(); err != nil {
			return r, err
		}
		if time.Now().After(deadline) {
			return r, fmt.Errorf("%d of %d devices online after %v", online, n, time.Since(start).Round(time.Second))
		}
		if err := sleep(ctx, 250*time.Millisecond); err != nil {
			return r, err
		}
	}
	r.connect = time.Since(start)
	settle(ctx, s.p, 10*time.Second)
	uN, err := s.p.usage()
	if err != nil {
		return r, err
	}
	r.rssN = uN.rss
	simUsage := func() (u usage) {
		for _, p := range sims {
			v, _ := p.usage()
			u.cpu += v.cpu
			u.rss += v.rss
			u.hwm += v.hwm
		}
		return u
	}
	sim0 := simUsage()
	r.simRSSN = sim0.rss

	t0, m0 := time.Now(), machineCPU()
	conc := spec.maxConcurrent
	if conc == 0 {
		conc = min(cfg.maxConcurrent, n)
	}
	r.maxConcurrent = conc
	var created rolloutView
	if err := s.cliJSON(ctx, &created, "rollout", "create", "--model", fleetModel, "--version", targetVersion,
		"--max-concurrent", fmt.Sprint(conc), "--json"); err != nil {
		return r, err
	}
	deadline = t0.Add(2*time.Minute + time.Duration(n)*30*time.Millisecond)
	if spec.probe > 0 {
		deadline = t0.Add(spec.probe)
	}
	for {
		var v rolloutView
		if err := s.cliJSON(ctx, &v, "rollout", "show", created.ID, "--json", "--jobs", "0"); err != nil {
			return r, err
		}
		r.counts = v.Counts
		if v.Counts[controller.JobInstalled]+v.Counts[controller.JobFailed] >= n {
			break
		}
		if time.Now().After(deadline) {
			if spec.probe > 0 {
				r.timedOut = true
				break
			}
			return r, fmt.Errorf("rollout not finished after %v: %v", time.Since(t0).Round(time.Second), v.Counts)
		}
		if err := simFailed(); err != nil {
			return r, fmt.Errorf("%w (rollout: %v)", err, v.Counts)
		}
		if err := sleep(ctx, 250*time.Millisecond); err != nil {
			return r, err
		}
	}
	r.window = time.Since(t0)
	r.machineCPU = machineCPU() - m0
	u1, err := s.p.usage()
	if err != nil {
		return r, err
	}
	r.serverCPU, r.hwm = u1.cpu-uN.cpu, u1.hwm
	r.deferred = countLines(s.p.errf, "offer queue full")

	if r.timedOut {
		// What the simulators used until now; then they are stopped.
		sim1 := simUsage()
		r.simCPU, r.simHWM = sim1.cpu-sim0.cpu, sim1.hwm
		for _, p := range sims {
			p.stop(5 * time.Second)
		}
	} else {
		// The simulators exit once all their devices run the new version.
		for _, p := range sims {
			if err := p.wait(ctx, time.Minute); err != nil && r.simErr == "" {
				r.simErr = fmt.Sprintf("%s: %v: %s", p.name, err, lastLine(p.out))
			}
		}
		sim1 := simUsage()
		r.simCPU, r.simHWM = sim1.cpu-sim0.cpu, sim1.hwm
	}

	var full rolloutView
	if err := s.cliJSON(ctx, &full, "rollout", "show", created.ID, "--json", "--jobs", fmt.Sprint(min(n, 10000))); err != nil {
		return r, err
	}
	var first, last time.Time
	for _, j := range full.Jobs {
		switch j.State {
		case controller.JobInstalled:
			r.installed++
			r.delivered += j.Size
			r.artifact = max(r.artifact, j.Size)
			if j.Delta {
				r.deltaJobs++
			}
		case controller.JobFailed:
			r.failed++
		}
		if !j.Offered.IsZero() && (first.IsZero() || j.Offered.Before(first)) {
			first = j.Offered
		}
		if j.Finished.After(last) {
			last = j.Finished
		}
	}
	if r.timedOut {
		r.total = r.window
		return r, nil
	}
	if last.IsZero() {
		return r, errors.New("no job finished")
	}
	r.total = last.Sub(full.Created)
	r.fromOffer = last.Sub(first)
	return r, nil
}

// countLines counts the lines of a file that hold s.
func countLines(path, s string) int {
	b, _ := os.ReadFile(path)
	return strings.Count(string(b), s)
}

// lastLine is the last non-empty line of a file: a simulator's summary total.
func lastLine(path string) string {
	b, _ := os.ReadFile(path)
	lines := strings.Split(strings.TrimSpace(string(b)), "\n")
	return lines[len(lines)-1]
}

// proxy forwards loopback TCP connections to a target and counts the bytes each way and the
// connections: the TLS records exactly as they cross the wire, without decrypting them.
type proxy struct {
	ln              net.Listener
	target          string
	down, up, conns atomic.Int64
	wg              sync.WaitGroup
	mu              sync.Mutex
	open            map[net.Conn]struct{}
}

func startProxy(target string) (*proxy, error) {
	ln, err := net.Listen("tcp", "127.0.0.1:0")
	if err != nil {
		return nil, err
	}
	p := &proxy{ln: ln, target: target, open: map[net.Conn]struct{}{}}
	p.wg.Go(func() {
		for {
			c, err := ln.Accept()
			if err != nil {
				return
			}
			p.conns.Add(1)
			p.wg.Go(func() { p.forward(c) })
		}
	})
	return p, nil
}

func (p *proxy) track(c net.Conn, add bool) {
	p.mu.Lock()
	defer p.mu.Unlock()
	if add {
		p.open[c] = struct{}{}
	} else {
		delete(p.open, c)
	}
}

func (p *proxy) forward(c net.Conn) {
	defer c.Close()
	s, err := net.Dial("tcp", p.target)
	if err != nil {
		return
	}
	defer s.Close()
	p.track(c, true)
	defer p.track(c, false)
	done := make(chan struct{}, 2)
	pipe := func(dst, src net.Conn, n *atomic.Int64) {
		_, _ = io.Copy(countWriter{dst, n}, src)
		// A device that cuts its connection cuts it on the server's side too.
		_ = dst.Close()
		_ = src.Close()
		done <- struct{}{}
	}
	go pipe(s, c, &p.up)
	go pipe(c, s, &p.down)
	<-done
	<-done
}

func (p *proxy) close() {
	_ = p.ln.Close()
	p.mu.Lock()
	for c := range p.open {
		_ = c.Close()
	}
	p.mu.Unlock()
	p.wg.Wait()
}

type countWriter struct {
	w io.Writer
	n *atomic.Int64
}

func (c countWriter) Write(b []byte) (int, error) {
	n, err := c.w.Write(b)
	c.n.Add(int64(n))
	return n, err
}
