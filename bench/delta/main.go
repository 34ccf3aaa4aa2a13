//go:build unix

// Command delta compares fota's delta patches with Debian's bsdiff and xdelta3 on real firmware:
// patch size, time and peak memory to make a patch and to apply it, for every consecutive pair
// of versions of each product in a directory and for its oldest and newest versions.
//
//	go run ./bench/delta -firmware ../shared/firmware
//
// Every measurement runs in its own process, ours included (this program re-executes itself),
// and peak memory is that process's maximum resident set size from the kernel. That counts
// what bsdiff's C code allocates through cgo, which the Go runtime's heap metrics never see,
// and it treats the three tools alike; it also counts each binary's baseline, printed first.
// Times are wall-clock from start to exit, the best of -runs.
package main

import (
	"bytes"
	"encoding/json"
	"errors"
	"flag"
	"fmt"
	"io"
	"maps"
	"os"
	"os/exec"
	"path/filepath"
	"runtime"
	"slices"
	"strconv"
	"strings"
	"syscall"
	"time"

	"github.com/fota-dev/fota/firmware/delta"
)

const childArg = "-bench-delta-child"

func main() {
	if len(os.Args) > 1 && os.Args[1] == childArg {
		if err := child(os.Args[2:]); err != nil {
			fmt.Fprintln(os.Stderr, "bench child:", err)
			os.Exit(1)
		}
		return
	}
	dir := flag.String("firmware", "../shared/firmware", "directory of firmware images named PRODUCT-VERSION.bin")
	runs := flag.Int("runs", 3, "runs per measurement; the best time and the largest peak are kept")
	asJSON := flag.Bool("json", false, "print the results as one JSON object instead of tables (for bench/suite)")
	flag.Parse()
	if err := bench(*dir, *runs, *asJSON, os.Stdout); err != nil {
		fmt.Fprintln(os.Stderr, "bench-delta:", err)
		os.Exit(1)
	}
}

// child is one measured operation of ours, in its own process.
func child(args []string) error {
	if len(args) == 0 {
		return errors.New("missing operation")
	}
	switch op := args[0]; {
	case op == "idle" && len(args) == 1:
		return nil
	case op == "make" && len(args) == 4:
		old, err := os.ReadFile(args[1])
		if err != nil {
			return err
		}
		new, err := os.ReadFile(args[2])
		if err != nil {
			return err
		}
		patch, err := delta.Make(old, new)
		if err != nil {
			return err
		}
		return os.WriteFile(args[3], patch, 0o644)
	case op == "apply" && len(args) == 4:
		old, err := os.ReadFile(args[1])
		if err != nil {
			return err
		}
		f, err := os.Open(args[2])
		if err != nil {
			return err
		}
		defer f.Close()
		out, err := delta.Apply(old, f, 1<<30)
		if err != nil {
			return err
		}
		return os.WriteFile(args[3], out, 0o644)
	default:
		return fmt.Errorf("bad arguments %q", args)
	}
}

type pair struct{ product, old, new string }

// result is one tool on one pair.
type result struct {
	patch           int64
	makeT, applyT   time.Duration
	makeRSS, appRSS int64 // bytes
}

type tool struct {
	name        string
	make, apply func(old, new, patch, out string) []string // argv
}

func bench(dir string, runs int, asJSON bool, w io.Writer) error {
	var missing []string
	for _, p := range []string{"bsdiff", "bspatch", "xdelta3"} {
		if _, err := exec.LookPath(p); err != nil {
			missing = append(missing, p)
		}
	}
	if len(missing) > 0 {
		return fmt.Errorf("%s not found on PATH; install Debian's with: apt-get install -y bsdiff xdelta3",
			strings.Join(missing, ", "))
	}
	self, err := os.Executable()
	if err != nil {
		return err
	}
	pairs, err := findPairs(dir)
	if err != nil {
		return err
	}
	tmp, err := os.MkdirTemp("", "bench-delta-")
	if err != nil {
		return err
	}
	defer os.RemoveAll(tmp)

	tools := []tool{
		{"fota delta",
			func(o, n, p, _ string) []string { return []string{self, childArg, "make", o, n, p} },
			func(o, _, p, out string) []string { return []string{self, childArg, "apply", o, p, out} }},
		{"Debian bsdiff",
			func(o, n, p, _ string) []string { return []string{"bsdiff", o, n, p} },
			func(o, _, p, out string) []string { return []string{"bspatch", o, out, p} }},
		{"xdelta3 -9",
			func(o, n, p, _ string) []string { return []string{"xdelta3", "-f", "-9", "-e", "-s", o, n, p} },
			func(o, _, p, out string) []string { return []string{"xdelta3", "-f", "-d", "-s", o, p, out} }},
	}

	_, base, err := measure([]string{self, childArg, "idle"}, 1)
	if err != nil {
		return err
	}
	if !asJSON {
		fmt.Fprintf(w, "Delta patches on %d pairs from %s, %s/%s, best of %d runs. Peak memory is max RSS; "+
			"the fota binary's own baseline, doing nothing, is %s.\n\n", len(pairs), dir, runtime.GOOS, runtime.GOARCH, runs, mib(base))
	}

	results := make([][]result, len(pairs))
	for i, p := range pairs {
		target, err := os.ReadFile(p.new)
		if err != nil {
			return err
		}
		for j, t := range tools {
			patch := filepath.Join(tmp, fmt.Sprintf("%d-%d.patch", i, j))
			out := filepath.Join(tmp, fmt.Sprintf("%d-%d.out", i, j))
			var r result
			if r.makeT, r.makeRSS, err = measure(t.make(p.old, p.new, patch, out), runs); err != nil {
				return fmt.Errorf("%s make %s: %w", t.name, label(p), err)
			}
			if r.applyT, r.appRSS, err = measure(t.apply(p.old, p.new, patch, out), runs); err != nil {
				return fmt.Errorf("%s apply %s: %w", t.name, label(p), err)
			}
			fi, err := os.Stat(patch)
			if err != nil {
				return err
			}
			r.patch = fi.Size()
			got, err := os.ReadFile(out)
			if err != nil {
				return err
			}
			if !bytes.Equal(got, target) {
				return fmt.Errorf("%s on %s: applied output differs from %s", t.name, label(p), p.new)
			}
			results[i] = append(results[i], r)
		}
	}
	if asJSON {
		return printJSON(w, runs, base, pairs, tools, results)
	}
	printTables(w, pairs, tools, results)
	return nil
}

// printJSON writes the results as one JSON object that bench/suite reads.
func printJSON(w io.Writer, runs int, base int64, pairs []pair, tools []tool, res [][]result) error {
	type toolJSON struct {
		Tool       string  `json:"tool"`
		PatchBytes int64   `json:"patch_bytes"`
		MakeMS     float64 `json:"make_ms"`
		ApplyMS    float64 `json:"apply_ms"`
		MakeRSS    int64   `json:"make_peak_rss"`
		ApplyRSS   int64   `json:"apply_peak_rss"`
	}
	type pairJSON struct {
		Pair     string     `json:"pair"`
		OldBytes int64      `json:"old_bytes"`
		NewBytes int64      `json:"new_bytes"`
		Tools    []toolJSON `json:"tools"`
	}
	out := struct {
		Runs        int        `json:"runs"`
		BaselineRSS int64      `json:"fota_idle_rss"`
		Pairs       []pairJSON `json:"pairs"`
	}{Runs: runs, BaselineRSS: base}
	for i, p := range pairs {
		pj := pairJSON{Pair: label(p)}
		if fi, err := os.Stat(p.old); err == nil {
			pj.OldBytes = fi.Size()
		}
		if fi, err := os.Stat(p.new); err == nil {
			pj.NewBytes = fi.Size()
		}
		for j, r := range res[i] {
			pj.Tools = append(pj.Tools, toolJSON{
				Tool: tools[j].name, PatchBytes: r.patch,
				MakeMS:  float64(r.makeT) / float64(time.Millisecond),
				ApplyMS: float64(r.applyT) / float64(time.Millisecond),
				MakeRSS: r.makeRSS, ApplyRSS: r.appRSS,
			})
		}
		out.Pairs = append(out.Pairs, pj)
	}
	enc := json.NewEncoder(w)
	enc.SetIndent("", "  ")
	enc.SetEscapeHTML(false) // "->" in pair names
	return enc.Encode(out)
}

// measure runs argv runs times and returns the best wall time and the largest max RSS.
func measure(argv []string, runs int) (time.Duration, int64, error) {
	best, peak := time.Duration(1<<62), int64(0)
	for range max(runs, 1) {
		cmd := exec.Command(argv[0], argv[1:]...)
		var stderr bytes.Buffer
		cmd.Stdout, cmd.Stderr = io.Discard, &stderr
		start := time.Now()
		err := cmd.Run()
		d := time.Since(start)
		if err != nil {
			return 0, 0, fmt.Errorf("%v: %s", err, strings.TrimSpace(stderr.String()))
		}
		best = min(best, d)
		if ru, ok := cmd.ProcessState.SysUsage().(*syscall.Rusage); ok {
			rss := int64(ru.Maxrss)
			if runtime.GOOS != "darwin" { // Linux reports KiB, macOS bytes
				rss *= 1024
			}
			peak = max(peak, rss)
		}
	}
	return best, peak, nil
}

// findPairs groups PRODUCT-VERSION.bin files by product and returns each product's
// consecutive versions, then its oldest and newest if they are not consecutive.
func findPairs(dir string) ([]pair, error) {
	files, err := filepath.Glob(filepath.Join(dir, "*.bin"))
	if err != nil {
		return nil, err
	}
	byProduct := map[string][]string{}
	for _, f := range files {
		name := strings.TrimSuffix(filepath.Base(f), ".bin")
		i := strings.LastIndexByte(name, '-')
		if i <= 0 {
			continue
		}
		byProduct[name[:i]] = append(byProduct[name[:i]], f)
	}
	var pairs []pair
	for _, product := range slices.Sorted(maps.Keys(byProduct)) {
		vs := byProduct[product]
		slices.SortFunc(vs, func(a, b string) int { return compareVersions(version(a), version(b)) })
		for i := 1; i < len(vs); i++ {
			pairs = append(pairs, pair{product, vs[i-1], vs[i]})
		}
		if len(vs) > 2 {
			pairs = append(pairs, pair{product, vs[0], vs[len(vs)-1]})
		}
	}
	if len(pairs) == 0 {
		return nil, fmt.Errorf("no two versions of one product in %s (want PRODUCT-VERSION.bin files)", dir)
	}
	return pairs, nil
}

func version(path string) string {
	name := strings.TrimSuffix(filepath.Base(path), ".bin")
	return strings.TrimPrefix(name[strings.LastIndexByte(name, '-')+1:], "v")
}

// compareVersions orders dotted numeric versions; non-numeric parts compare as text.
func compareVersions(a, b string) int {
	as, bs := strings.Split(a, "."), strings.Split(b, ".")
	for i := range min(len(as), len(bs)) {
		x, errx := strconv.Atoi(as[i])
		y, erry := strconv.Atoi(bs[i])
		if errx != nil || erry != nil {
			if c := strings.Compare(as[i], bs[i]); c != 0 {
				return c
			}
			continue
		}
		if x != y {
			return x - y
		}
	}
	return len(as) - len(bs)
}

func label(p pair) string {
	return fmt.Sprintf("%s %s -> %s", p.product, version(p.old), version(p.new))
}

func printTables(w io.Writer, pairs []pair, tools []tool, res [][]result) {
	header := func(title string) {
		fmt.Fprintf(w, "| %s |", title)
		for _, t := range tools {
			fmt.Fprintf(w, " %s |", t.name)
		}
		for _, t := range tools {
			if t.name != "Debian bsdiff" {
				fmt.Fprintf(w, " %s / bsdiff |", t.name)
			}
		}
		fmt.Fprintln(w)
		fmt.Fprint(w, "|---|")
		for range 2*len(tools) - 1 {
			fmt.Fprint(w, "---:|")
		}
		fmt.Fprintln(w)
	}
	table := func(title string, val func(result) float64, format func(float64) string) {
		header(title)
		for i, p := range pairs {
			fmt.Fprintf(w, "| %s |", label(p))
			for _, r := range res[i] {
				fmt.Fprintf(w, " %s |", format(val(r)))
			}
			ref := val(res[i][1])
			for j, r := range res[i] {
				if j != 1 {
					fmt.Fprintf(w, " %.2f |", val(r)/ref)
				}
			}
			fmt.Fprintln(w)
		}
		fmt.Fprintln(w)
	}
	table("patch bytes", func(r result) float64 { return float64(r.patch) },
		func(v float64) string { return thousands(int64(v)) })
	table("make time", func(r result) float64 { return r.makeT.Seconds() },
		func(v float64) string { return fmt.Sprintf("%.0f ms", v*1000) })
	table("make peak RSS", func(r result) float64 { return float64(r.makeRSS) },
		func(v float64) string { return mib(int64(v)) })
	table("apply time", func(r result) float64 { return r.applyT.Seconds() },
		func(v float64) string { return fmt.Sprintf("%.0f ms", v*1000) })
	table("apply peak RSS", func(r result) float64 { return float64(r.appRSS) },
		func(v float64) string { return mib(int64(v)) })
}

func mib(n int64) string { return fmt.Sprintf("%.1f MiB", float64(n)/(1<<20)) }

func thousands(n int64) string {
	s := strconv.FormatInt(n, 10)
	for i := len(s) - 3; i > 0; i -= 3 {
		s = s[:i] + "," + s[i:]
	}
	return s
}
