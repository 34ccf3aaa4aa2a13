package main

import (
	"bytes"
	"crypto/sha256"
	"errors"
	"fmt"
	"os"
	"path/filepath"
	"strings"
	"testing"

	"github.com/fota-dev/fota/firmware/delta"
)

// deltaPair returns the small real firmware pair kept in the delta package's testdata.
func deltaPair(t *testing.T) (oldPath, newPath string) {
	t.Helper()
	dir := filepath.Join("firmware", "delta", "testdata")
	return filepath.Join(dir, "base.bin"), filepath.Join(dir, "target.bin")
}

func TestDeltaCLIRoundTrip(t *testing.T) {
	oldPath, newPath := deltaPair(t)
	want, err := os.ReadFile(newPath)
	if err != nil {
		t.Fatal(err)
	}
	dir := t.TempDir()
	patchPath, outPath := filepath.Join(dir, "p.fdelta"), filepath.Join(dir, "out.bin")

	var out bytes.Buffer
	if err := runDelta([]string{"make", oldPath, newPath, patchPath}, &out); err != nil {
		t.Fatalf("delta make: %v", err)
	}
	patch, err := os.ReadFile(patchPath)
	if err != nil {
		t.Fatal(err)
	}
	wantLine := fmt.Sprintf("wrote %s: %d-byte patch, ", patchPath, len(patch))
	if !strings.HasPrefix(out.String(), wantLine) || strings.Count(out.String(), "\n") != 1 {
		t.Errorf("delta make printed %q, want one line starting %q", out.String(), wantLine)
	}
	if h, err := delta.ReadHeader(bytes.NewReader(patch)); err != nil || h.NewSize != int64(len(want)) {
		t.Errorf("patch header = %+v, %v; want a target of %d bytes", h, err, len(want))
	}

	for _, tc := range []struct {
		name string
		args []string
	}{
		{"default limit", []string{"apply", oldPath, patchPath, outPath}},
		{"limit equal to target, flag last", []string{"apply", oldPath, patchPath, outPath, "--max-size", fmt.Sprint(len(want))}},
		{"flag first", []string{"apply", "--max-size=1048576", oldPath, patchPath, outPath}},
	} {
		t.Run(tc.name, func(t *testing.T) {
			out.Reset()
			os.Remove(outPath)
			if err := runDelta(tc.args, &out); err != nil {
				t.Fatalf("delta apply: %v", err)
			}
			got, err := os.ReadFile(outPath)
			if err != nil {
				t.Fatal(err)
			}
			if !bytes.Equal(got, want) {
				t.Fatalf("applied output differs from %s", newPath)
			}
			sum := fmt.Sprintf("sha256 %x", sha256.Sum256(want))
			if !strings.Contains(out.String(), sum) {
				t.Errorf("delta apply printed %q, want it to contain %q", out.String(), sum)
			}
		})
	}
	assertNoTempFiles(t, dir, "out.bin", "p.fdelta")
}

// assertNoTempFiles checks that dir holds exactly the files named, in sorted order.
func assertNoTempFiles(t *testing.T, dir string, want ...string) {
	t.Helper()
	entries, err := os.ReadDir(dir)
	if err != nil {
		t.Fatal(err)
	}
	var got []string
	for _, e := range entries {
		got = append(got, e.Name())
	}
	if strings.Join(got, ",") != strings.Join(want, ",") {
		t.Errorf("files in %s: got %v, want %v", dir, got, want)
	}
}

func TestDeltaCLIErrors(t *testing.T) {
	oldPath, newPath := deltaPair(t)
	dir := t.TempDir()
	patchPath := filepath.Join(dir, "p.fdelta")
	if err := runDelta([]string{"make", oldPath, newPath, patchPath}, new(bytes.Buffer)); err != nil {
		t.Fatal(err)
	}
	garbage := filepath.Join(dir, "garbage")
	if err := os.WriteFile(garbage, []byte("not a patch at all"), 0o600); err != nil {
		t.Fatal(err)
	}
	outPath := filepath.Join(dir, "out.bin")
	if err := os.WriteFile(outPath, []byte("keep"), 0o600); err != nil {
		t.Fatal(err)
	}
	missing := filepath.Join(dir, "missing.bin")

	for _, tc := range []struct {
		name  string
		args  []string
		usage bool   // exit 2 rather than 1
		want  string // in the one-line message
	}{
		{"no sub-command", nil, true, "missing sub-command"},
		{"unknown sub-command", []string{"diff"}, true, `unknown sub-command "diff"`},
		{"make, two arguments", []string{"make", oldPath, newPath}, true, "got 2 arguments, want 3"},
		{"apply, four arguments", []string{"apply", oldPath, patchPath, outPath, "extra"}, true, "got 4 arguments, want 3"},
		{"apply, unknown flag", []string{"apply", "--fast", oldPath, patchPath, outPath}, true, "flag provided but not defined"},
		{"apply, zero max size", []string{"apply", "--max-size", "0", oldPath, patchPath, outPath}, true, "--max-size must be positive"},
		{"apply, bad max size", []string{"apply", "--max-size", "big", oldPath, patchPath, outPath}, true, "invalid value"},
		{"make, missing old", []string{"make", missing, newPath, patchPath}, false, "missing.bin: no such file"},
		{"make, missing new", []string{"make", oldPath, missing, patchPath}, false, "missing.bin: no such file"},
		{"apply, missing patch", []string{"apply", oldPath, missing, outPath}, false, "missing.bin: no such file"},
		{"apply, garbage patch", []string{"apply", oldPath, garbage, outPath}, false, "not a fota delta patch"},
		{"apply, missing old", []string{"apply", missing, patchPath, outPath}, false, "missing.bin: no such file"},
		{"apply, base of another size", []string{"apply", garbage, patchPath, outPath}, false, "was not made from"},
		{"apply, target over max size", []string{"apply", "--max-size", "100", oldPath, patchPath, outPath}, false, "raise --max-size"},
	} {
		t.Run(tc.name, func(t *testing.T) {
			err := runDelta(tc.args, new(bytes.Buffer))
			if err == nil {
				t.Fatal("runDelta succeeded, want an error")
			}
			var u usageError
			if got := errors.As(err, &u); got != tc.usage {
				t.Errorf("usage error = %v, want %v (error %q)", got, tc.usage, err)
			}
			if msg := err.Error(); !strings.Contains(msg, tc.want) || strings.Contains(msg, "\n") {
				t.Errorf("error = %q, want one line containing %q", msg, tc.want)
			}
			if b, _ := os.ReadFile(outPath); string(b) != "keep" {
				t.Errorf("%s holds %q after a failed run, want it untouched", outPath, b)
			}
		})
	}
	assertNoTempFiles(t, dir, "garbage", "out.bin", "p.fdelta")
}
