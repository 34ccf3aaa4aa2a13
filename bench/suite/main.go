// Command suite runs fota's whole benchmark suite and writes BENCHMARKS.md: each figure next
// to the alternative a user would pick instead, measured in the same run on the same machine,
// with the ratio, so that the numbers mean something on a noisy machine.
//
//	go run ./bench/suite              # make bench: the full suite
//	go run ./bench/suite -quick       # make bench-quick: the same code, small sizes, one repetition
//
// Figures:
//  1. one device's transfer throughput over MQTT/TLS next to HTTPS (net/http) and raw TLS
//     (bench/transfer);
//  2. fleet updates of simulated devices, delta and full image, through the real `fota serve`
//     and `fota sim` binaries in separate processes, driven with the fota CLI like an operator;
//  3. a connect storm of mTLS devices against fota serve and against a plain crypto/tls server;
//  4. delta patches next to Debian's bsdiff and xdelta3 (bench/delta);
//  5. the controller's durable events per second and its planning time (bench/controller);
//  6. resume: bytes sent again per interruption under the simulator's disconnect and
//     power-loss faults, counted by a TCP proxy between the devices and the server.
//
// Every child process is killed if the suite dies, and every wait has a deadline. The report
// is rewritten after each figure, so an interrupted run keeps what it measured.
package main

import (
	"context"
	"flag"
	"fmt"
	"os"
	"os/signal"
	"path/filepath"
	"slices"
	"strconv"
	"strings"
	"syscall"
	"time"
)

// config is the suite's flags, with the quick or full defaults filled in.
type config struct {
	quick      bool
	out        string
	command    string
	invocation string // how this program was run
	firmware   string
	figures    []int
	keep       bool
	timeout    time.Duration

	fleet         []int
	fleetReps     int
	simProcs      int // simulator processes of the control run
	maxConcurrent int
	probe         time.Duration
	storm         int
	stormConc     int
	stormReps     int
	resumeDevices int
	xferRounds    int
	xferImages    int
	deltaRuns     int
	ctrlDevices   int
	ctrlEvents    int
	ctrlSenders   int

	// Built by the suite.
	fotaBin, transferBin, deltaBin, controllerBin string
}

func main() {
	if len(os.Args) == 3 && os.Args[1] == rawServerArg {
		if err := rawServer(os.Args[2]); err != nil {
			fmt.Fprintln(os.Stderr, "raw tls server:", err)
			os.Exit(1)
		}
		return
	}
	cfg, err := parseConfig(os.Args[1:])
	if err != nil {
		fmt.Fprintln(os.Stderr, "bench-suite:", err)
		os.Exit(2)
	}
	ctx, stop := signal.NotifyContext(context.Background(), os.Interrupt, syscall.SIGTERM)
	defer stop()
	ctx, cancel := context.WithTimeout(ctx, cfg.timeout)
	defer cancel()
	if err := runSuite(ctx, cfg); err != nil {
		fmt.Fprintln(os.Stderr, "bench-suite:", err)
		os.Exit(1)
	}
}

func parseConfig(args []string) (*config, error) {
	fs := flag.NewFlagSet("suite", flag.ContinueOnError)
	cfg := &config{}
	fs.BoolVar(&cfg.quick, "quick", false, "smoke run: small sizes, one repetition, the same code")
	fs.StringVar(&cfg.out, "out", "BENCHMARKS.md", "report to write")
	fs.StringVar(&cfg.command, "command", "", "the command that ran the suite, e.g. 'make bench', named in the report with this program's arguments")
	fs.StringVar(&cfg.firmware, "firmware", "../shared/firmware", "directory of firmware images named PRODUCT-VERSION.bin")
	figures := fs.String("figures", "1,2,3,4,5,6", "figures to run")
	fs.BoolVar(&cfg.keep, "keep", false, "keep the work directory (server and simulator logs)")
	fs.DurationVar(&cfg.timeout, "timeout", 0, "stop everything after this long (default 2h; -quick 5m)")
	fleet := fs.String("fleet", "", "fleet sizes of figure 2 (default 1000,5000,10000; -quick 200)")
	fs.IntVar(&cfg.fleetReps, "fleet-reps", 0, "repetitions of each fleet update; the median is reported (default 3; -quick 1)")
	fs.IntVar(&cfg.maxConcurrent, "max-concurrent", 0, "fleet rollouts' --max-concurrent, capped at the fleet size (default 1000; -quick 100)")
	fs.DurationVar(&cfg.probe, "probe", 0, "how long the largest delta fleet may take with --max-concurrent equal to its size, when that is above -max-concurrent (default 2m; -quick 30s)")
	fs.IntVar(&cfg.simProcs, "control-sims", 2, "simulator processes of the control run, the largest delta fleet split among them")
	fs.IntVar(&cfg.storm, "storm", 0, "devices in the connect storm (default 10000; -quick 1000)")
	fs.IntVar(&cfg.stormConc, "storm-concurrency", 0, "devices in flight at once in the measured storms (default 1000; -quick 250); one more storm per server sends all devices at once")
	fs.IntVar(&cfg.stormReps, "storm-reps", 0, "connect storms per server, alternated; the median is reported (default 3; -quick 1)")
	fs.IntVar(&cfg.resumeDevices, "resume-devices", 0, "devices of figure 6 (default 500; -quick 100)")
	fs.IntVar(&cfg.xferRounds, "transfer-rounds", 0, "bench/transfer -rounds (default 5; -quick 1)")
	fs.IntVar(&cfg.xferImages, "transfer-images", 0, "bench/transfer -images: downloads per measurement (default 100; -quick 10)")
	fs.IntVar(&cfg.deltaRuns, "delta-runs", 0, "bench/delta -runs (default 3; -quick 1)")
	fs.IntVar(&cfg.ctrlDevices, "controller-devices", 0, "bench/controller -devices (default 1000000; -quick 20000)")
	fs.IntVar(&cfg.ctrlEvents, "controller-events", 0, "bench/controller -events (default 200000; -quick 10000)")
	fs.IntVar(&cfg.ctrlSenders, "controller-senders", 0, "bench/controller -senders (default 1000; -quick 200)")
	if err := fs.Parse(args); err != nil {
		return nil, err
	}
	if fs.NArg() > 0 {
		return nil, fmt.Errorf("unexpected argument %q", fs.Arg(0))
	}
	pick := func(v *int, full, quick int) {
		if *v == 0 {
			*v = full
			if cfg.quick {
				*v = quick
			}
		}
	}
	pick(&cfg.fleetReps, 3, 1)
	pick(&cfg.maxConcurrent, 1000, 100)
	if cfg.probe == 0 {
		cfg.probe = 2 * time.Minute
		if cfg.quick {
			cfg.probe = 30 * time.Second
		}
	}
	pick(&cfg.storm, 10000, 1000)
	pick(&cfg.stormReps, 3, 1)
	pick(&cfg.resumeDevices, 500, 100)
	pick(&cfg.xferRounds, 5, 1)
	pick(&cfg.xferImages, 100, 10)
	pick(&cfg.deltaRuns, 3, 1)
	pick(&cfg.ctrlDevices, 1_000_000, 20_000)
	pick(&cfg.ctrlEvents, 200_000, 10_000)
	pick(&cfg.ctrlSenders, 1000, 200)
	pick(&cfg.stormConc, 1000, 250)
	cfg.stormConc = min(cfg.stormConc, cfg.storm)
	if cfg.timeout == 0 {
		cfg.timeout = 2 * time.Hour
		if cfg.quick {
			cfg.timeout = 5 * time.Minute
		}
	}
	if *fleet == "" {
		*fleet = "1000,5000,10000"
		if cfg.quick {
			*fleet = "200"
		}
	}
	var err error
	if cfg.fleet, err = intList(*fleet); err != nil {
		return nil, fmt.Errorf("-fleet: %w", err)
	}
	if cfg.figures, err = intList(*figures); err != nil {
		return nil, fmt.Errorf("-figures: %w", err)
	}
	for _, n := range cfg.fleet {
		// rollout show lists at most 10,000 jobs, and each device is a file descriptor in
		// the server and in the simulator.
		if n > 10000 {
			return nil, fmt.Errorf("-fleet %d: at most 10000 devices", n)
		}
	}
	for _, f := range cfg.figures {
		if f < 1 || f > 6 {
			return nil, fmt.Errorf("-figures: no figure %d", f)
		}
	}
	switch {
	case cfg.simProcs < 1:
		return nil, fmt.Errorf("-control-sims %d: want at least 1", cfg.simProcs)
	case cfg.stormConc < 1 || cfg.storm < 1 || cfg.stormReps < 1 || cfg.fleetReps < 1:
		return nil, fmt.Errorf("sizes and repetitions must be at least 1")
	}
	quoted := []string{"go", "run", "./bench/suite"}
	for _, a := range args {
		if strings.ContainsAny(a, " \t'\"") {
			a = "'" + strings.ReplaceAll(a, "'", `'\''`) + "'"
		}
		quoted = append(quoted, a)
	}
	cfg.invocation = strings.Join(quoted, " ")
	return cfg, nil
}

func intList(s string) ([]int, error) {
	var out []int
	for _, f := range strings.Split(s, ",") {
		n, err := strconv.Atoi(strings.TrimSpace(f))
		if err != nil || n < 1 {
			return nil, fmt.Errorf("bad list %q", s)
		}
		out = append(out, n)
	}
	return out, nil
}

// figure is one figure of the report.
type figure struct {
	n     int
	title string
	run   func(ctx context.Context, s *suite) (string, error)
}

// figures in the order they run: the storm before the fleets, whose memory figure uses the
// storm's baseline.
var figures = []figure{
	{1, "One device: transfer throughput", figTransfer},
	{3, "Connect storm", figStorm},
	{2, "Fleet updates", figFleet},
	{4, "Delta patches", figDelta},
	{5, "Controller", figController},
	{6, "Resume after interruptions", figResume},
}

// suite is one run of the suite.
type suite struct {
	cfg     *config
	work    string
	rep     *report
	targets targets
	// stormIdle is the raw TLS server's memory per idle connection at the storm's size, for
	// the fleet figure's memory baseline.
	stormIdle map[int]float64
}

func runSuite(ctx context.Context, cfg *config) error {
	started := time.Now()
	if _, err := os.Stat(filepath.Join(cfg.firmware, "pybricks-primehub-7.28.0.bin")); err != nil {
		return fmt.Errorf("firmware: %w", err)
	}
	nofile, err := raiseFileLimit()
	if err != nil {
		return fmt.Errorf("open file limit: %w", err)
	}
	work, err := os.MkdirTemp("", "fota-bench-suite-")
	if err != nil {
		return err
	}
	if cfg.keep {
		fmt.Fprintln(os.Stderr, "work dir:", work)
	} else {
		defer os.RemoveAll(work)
	}
	s := &suite{cfg: cfg, work: work, stormIdle: map[int]float64{}}
	s.rep = newReport(cfg, started, nofile)
	if err := build(ctx, cfg, work); err != nil {
		return err
	}
	failed := 0
	for _, f := range figures {
		if !slices.Contains(cfg.figures, f.n) {
			continue
		}
		logf("figure %d: %s", f.n, f.title)
		t := time.Now()
		body, err := f.run(ctx, s)
		if err != nil {
			failed++
			logf("figure %d failed: %v", f.n, err)
		}
		s.rep.add(section{n: f.n, title: f.title, body: body, err: err, took: time.Since(t)})
		s.rep.targets = s.targets
		if werr := s.rep.write(cfg.out, time.Since(started)); werr != nil {
			return werr
		}
		if ctx.Err() != nil {
			return ctx.Err()
		}
	}
	logf("wrote %s in %v", cfg.out, time.Since(started).Round(time.Second))
	if failed > 0 {
		return fmt.Errorf("%d figures failed; see %s", failed, cfg.out)
	}
	return nil
}

// build compiles fota and the bench commands once. Other people edit the tree while the suite
// runs, so a failed build is tried again a few times.
func build(ctx context.Context, cfg *config, work string) error {
	cfg.fotaBin = filepath.Join(work, "fota")
	cfg.transferBin = filepath.Join(work, "bench-transfer")
	cfg.deltaBin = filepath.Join(work, "bench-delta")
	cfg.controllerBin = filepath.Join(work, "bench-controller")
	targets := [][2]string{{cfg.fotaBin, "."}, {cfg.transferBin, "./bench/transfer"}, {cfg.deltaBin, "./bench/delta"}, {cfg.controllerBin, "./bench/controller"}}
	for _, t := range targets {
		var err error
		for attempt := range 5 {
			if _, err = run(ctx, 5*time.Minute, nil, "go", "build", "-o", t[0], t[1]); err == nil {
				break
			}
			logf("build %s (attempt %d): %v", t[1], attempt+1, err)
			if sleep(ctx, 20*time.Second) != nil {
				break
			}
		}
		if err != nil {
			return err
		}
	}
	return nil
}

func logf(format string, args ...any) {
	fmt.Fprintf(os.Stderr, "%s "+format+"\n", append([]any{time.Now().Format("15:04:05")}, args...)...)
}
