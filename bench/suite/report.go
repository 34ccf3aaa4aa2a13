package main

import (
	"bufio"
	"context"
	"fmt"
	"os"
	"os/exec"
	"path/filepath"
	"runtime"
	"slices"
	"strconv"
	"strings"
	"time"
)

// section is one figure's text.
type section struct {
	n     int
	title string
	body  string
	err   error
	took  time.Duration
}

// target is one of the targets and what this run measured against it.
type target struct {
	what     string
	measured string
	met      string // "yes", "no", or why it cannot be said
}

// targets holds the four targets, filled in by the figures that measure them.
type targets struct {
	fleet, memory, storm, transfer *target
}

type report struct {
	cfg      *config
	started  time.Time
	machine  string
	sections []section
	targets  targets
}

func newReport(cfg *config, started time.Time, nofile uint64) *report {
	return &report{cfg: cfg, started: started, machine: machine(nofile)}
}

func (r *report) add(s section) {
	r.sections = append(r.sections, s)
	slices.SortFunc(r.sections, func(a, b section) int { return a.n - b.n })
}

// write replaces the report at path with what has been measured so far.
func (r *report) write(path string, took time.Duration) error {
	var b strings.Builder
	fmt.Fprintf(&b, "# fota benchmarks\n\n")
	mode := "full suite"
	if r.cfg.quick {
		mode = "quick smoke run: small sizes, one repetition; not the figures to quote"
	}
	fmt.Fprintf(&b, "Written by bench/suite (%s), started %s, took %v.\n\n", mode, r.started.UTC().Format("2006-01-02 15:04 MST"), took.Round(time.Second))
	if r.cfg.command != "" {
		fmt.Fprintf(&b, "Command: `%s`, which runs `%s`\n\n", r.cfg.command, r.cfg.invocation)
	} else {
		fmt.Fprintf(&b, "Command: `%s`\n\n", r.cfg.invocation)
	}
	b.WriteString(r.machine)
	fmt.Fprintf(&b, "Load average at the end: %s.\n\n", loadavg())
	b.WriteString("Everything runs on this one machine over loopback (127.0.0.1): servers, simulated devices and baselines share its cores, " +
		"so every figure has its baseline measured in the same run, and the ratio is the number to compare across machines.\n\n")

	b.WriteString("## Targets\n\n| target | measured | met |\n|---|---|---|\n")
	for _, t := range []*target{r.targets.fleet, r.targets.memory, r.targets.storm, r.targets.transfer} {
		if t != nil {
			fmt.Fprintf(&b, "| %s | %s | %s |\n", t.what, t.measured, t.met)
		}
	}
	b.WriteString("\n")
	for _, s := range r.sections {
		fmt.Fprintf(&b, "## %d. %s\n\n", s.n, s.title)
		if s.body != "" {
			b.WriteString(strings.TrimRight(s.body, "\n") + "\n\n")
		}
		if s.err != nil {
			fmt.Fprintf(&b, "**Failed:** %s\n\n", oneLine(s.err.Error()))
		}
		fmt.Fprintf(&b, "_Figure %d took %s._\n\n", s.n, secs(s.took))
	}
	if dir := filepath.Dir(path); dir != "" {
		if err := os.MkdirAll(dir, 0o755); err != nil {
			return err
		}
	}
	tmp := path + ".tmp"
	if err := os.WriteFile(tmp, []byte(b.String()), 0o644); err != nil {
		return err
	}
	return os.Rename(tmp, path)
}

func oneLine(s string) string {
	s = strings.Join(strings.Fields(s), " ")
	if len(s) > 1500 {
		s = s[:1500] + "..."
	}
	return strings.ReplaceAll(s, "|", "/")
}

// machine describes the machine: cores, memory, CPU model, kernel, Go, the repository's
// commit, and the load when the run started.
func machine(nofile uint64) string {
	model := "unknown CPU"
	if f, err := os.Open("/proc/cpuinfo"); err == nil {
		sc := bufio.NewScanner(f)
		for sc.Scan() {
			if k, v, ok := strings.Cut(sc.Text(), ":"); ok && strings.TrimSpace(k) == "model name" {
				model = strings.TrimSpace(v)
				break
			}
		}
		f.Close()
	}
	mem := "unknown"
	if b, err := os.ReadFile("/proc/meminfo"); err == nil {
		for _, l := range strings.Split(string(b), "\n") {
			if v, ok := strings.CutPrefix(l, "MemTotal:"); ok {
				if kb, err := strconv.ParseInt(strings.TrimSuffix(strings.TrimSpace(v), " kB"), 10, 64); err == nil {
					mem = fmt.Sprintf("%.1f GiB", float64(kb)/(1<<20))
				}
			}
		}
	}
	kernel, _ := os.ReadFile("/proc/sys/kernel/osrelease")
	goVersion := runtime.Version() + " " + runtime.GOOS + "/" + runtime.GOARCH
	if out, err := exec.Command("go", "version").Output(); err == nil {
		goVersion = strings.TrimPrefix(strings.TrimSpace(string(out)), "go version ")
	}
	commit := "unknown"
	if out, err := run(context.Background(), 10*time.Second, nil, "git", "rev-parse", "--short", "HEAD"); err == nil {
		commit = strings.TrimSpace(string(out))
		// GIT_OPTIONAL_LOCKS=0: status must not refresh the index of a tree others work in.
		if st, err := run(context.Background(), 10*time.Second, []string{"GIT_OPTIONAL_LOCKS=0"}, "git", "status", "--porcelain", "--untracked-files=no"); err == nil && len(strings.TrimSpace(string(st))) > 0 {
			commit += " with uncommitted changes"
		}
	}
	return fmt.Sprintf("Machine: %d cores (%s), %s memory, Linux %s, %s; open files limit %d; load average at the start %s. Repository at %s.\n\n",
		runtime.NumCPU(), model, mem, strings.TrimSpace(string(kernel)), goVersion, nofile, loadavg(), commit)
}

func loadavg() string {
	b, err := os.ReadFile("/proc/loadavg")
	if err != nil {
		return "unknown"
	}
	f := strings.Fields(string(b))
	if len(f) < 3 {
		return "unknown"
	}
	return strings.Join(f[:3], " ")
}

// Formatting helpers.

func thousands(n int64) string {
	s := strconv.FormatInt(n, 10)
	neg := strings.HasPrefix(s, "-")
	s = strings.TrimPrefix(s, "-")
	for i := len(s) - 3; i > 0; i -= 3 {
		s = s[:i] + "," + s[i:]
	}
	if neg {
		return "-" + s
	}
	return s
}

func size(n int64) string {
	switch {
	case n < 0:
		return "-" + size(-n)
	case n < 10<<10:
		return fmt.Sprintf("%d B", n)
	case n < 1<<20:
		return fmt.Sprintf("%.1f KiB", float64(n)/(1<<10))
	default:
		return fmt.Sprintf("%.1f MiB", float64(n)/(1<<20))
	}
}

func secs(d time.Duration) string {
	if d < time.Second {
		return fmt.Sprintf("%.0f ms", float64(d)/float64(time.Millisecond))
	}
	if d < 10*time.Second {
		return fmt.Sprintf("%.2f s", d.Seconds())
	}
	if d >= 100*time.Second {
		return d.Round(time.Second).String()
	}
	return fmt.Sprintf("%.1f s", d.Seconds())
}

func ratio(a, b float64) string {
	if b == 0 {
		return "-"
	}
	return fmt.Sprintf("%.2f", a/b)
}

func yesNo(ok bool) string {
	if ok {
		return "yes"
	}
	return "**no**"
}

// medianOf returns the median of the values f takes over xs (the upper one of an even count).
func medianOf[T any](xs []T, f func(T) float64) float64 {
	if len(xs) == 0 {
		return 0
	}
	v := make([]float64, len(xs))
	for i, x := range xs {
		v[i] = f(x)
	}
	slices.Sort(v)
	return v[len(v)/2]
}
