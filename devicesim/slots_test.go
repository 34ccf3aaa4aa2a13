package devicesim

import (
	"bytes"
	"encoding/json"
	"errors"
	"os"
	"path/filepath"
	"strings"
	"testing"

	"github.com/fota-dev/fota/atomicfile"
	"github.com/fota-dev/fota/protocol"
)

func manifestOf(img []byte, version string, counter uint64) protocol.Manifest {
	return protocol.Manifest{V: 1, Model: "m", Version: version, Counter: counter, Size: int64(len(img)), SHA256: sha256Hex(img)}
}

func readState(t *testing.T, dir string) State {
	t.Helper()
	b, err := os.ReadFile(filepath.Join(dir, stateFile))
	if err != nil {
		t.Fatal(err)
	}
	var st State
	if err := json.Unmarshal(b, &st); err != nil {
		t.Fatal(err)
	}
	return st
}

func TestSlotsInstallAndResume(t *testing.T) {
	dir := filepath.Join(t.TempDir(), "dev")
	v1, v2, v3 := []byte("image one"), []byte("image two, longer"), []byte("three")
	s, err := openSlots(dir, State{Model: "m", Version: "1.0.0", Counter: 3}, v1, nil)
	if err != nil {
		t.Fatal(err)
	}
	want := State{Model: "m", Active: 0, Version: "1.0.0", Counter: 3, SHA256: sha256Hex(v1)}
	if got := readState(t, dir); got != want || s.state != want {
		t.Fatalf("fresh state: got %+v on disk, %+v in memory; want %+v", got, s.state, want)
	}

	for i, step := range []struct {
		img     []byte
		version string
		counter uint64
		slot    string
	}{{v2, "1.1.0", 4, "b"}, {v3, "1.2.0", 9, "a"}} {
		if err := s.install(manifestOf(step.img, step.version, step.counter), step.img); err != nil {
			t.Fatalf("install %d: %v", i, err)
		}
		want := State{Model: "m", Active: 1 - i, Version: step.version, Counter: step.counter, SHA256: sha256Hex(step.img)}
		if got := readState(t, dir); got != want || s.state != want {
			t.Fatalf("after install %d: got %+v on disk, %+v in memory; want %+v", i, got, s.state, want)
		}
		if b, _ := os.ReadFile(filepath.Join(dir, "slot-"+step.slot+".bin")); !bytes.Equal(b, step.img) {
			t.Errorf("slot %s: got %q, want %q", step.slot, b, step.img)
		}
		// The configuration's image and version lose to the state on disk.
		r, err := openSlots(dir, State{Model: "m", Version: "1.0.0", Counter: 3}, v1, nil)
		if err != nil {
			t.Fatalf("resume %d: %v", i, err)
		}
		if r.state != want || !bytes.Equal(r.installed(), step.img) {
			t.Errorf("resumed %d: got %+v with %q, want %+v with %q", i, r.state, r.installed(), want, step.img)
		}
	}
}

func TestSlotsInstallFailureChangesNothing(t *testing.T) {
	dir := filepath.Join(t.TempDir(), "dev")
	v1 := []byte("image one")
	s, err := openSlots(dir, State{Model: "m", Version: "1.0.0", Counter: 3}, v1, nil)
	if err != nil {
		t.Fatal(err)
	}
	// A directory where slot B should go: the rename into it fails, as a full flash would.
	if err := os.Mkdir(filepath.Join(dir, "slot-b.bin"), 0o700); err != nil {
		t.Fatal(err)
	}
	before := s.state
	if err := s.install(manifestOf([]byte("two"), "1.1.0", 4), []byte("two")); err == nil {
		t.Fatal("install: got nil error, want one")
	}
	if got := readState(t, dir); got != before || s.state != before || !bytes.Equal(s.installed(), v1) {
		t.Errorf("after a failed install: got %+v on disk, %+v in memory; want %+v", got, s.state, before)
	}
	if left, _ := filepath.Glob(filepath.Join(dir, atomicfile.TempGlob)); len(left) != 0 {
		t.Errorf("temp files left: %v", left)
	}
}

func TestSlotsInMemory(t *testing.T) {
	v1 := []byte("shared image")
	s, err := openSlots("", State{Model: "m", Version: "1.0.0"}, v1, nil)
	if err != nil {
		t.Fatal(err)
	}
	if err := s.install(manifestOf([]byte("new"), "1.1.0", 1), []byte("new")); err != nil {
		t.Fatal(err)
	}
	if s.state.Active != 1 || string(s.installed()) != "new" || string(v1) != "shared image" {
		t.Errorf("got slot %d with %q and the shared image %q, want slot 1 with %q and the shared image untouched", s.state.Active, s.installed(), v1, "new")
	}
}

func TestSlotsRefuseBadState(t *testing.T) {
	v1 := []byte("image one")
	tests := []struct {
		name   string
		damage func(t *testing.T, dir string)
		want   string
	}{
		{"active slot altered", func(t *testing.T, dir string) {
			os.WriteFile(filepath.Join(dir, "slot-a.bin"), []byte("image onE"), 0o600)
		}, "sha256"},
		{"active slot missing", func(t *testing.T, dir string) { os.Remove(filepath.Join(dir, "slot-a.bin")) }, "slot A"},
		{"state not JSON", func(t *testing.T, dir string) {
			os.WriteFile(filepath.Join(dir, stateFile), []byte("{"), 0o600)
		}, "read state"},
		{"state too big", func(t *testing.T, dir string) {
			os.WriteFile(filepath.Join(dir, stateFile), bytes.Repeat([]byte(" "), maxState+1), 0o600)
		}, "larger than"},
		{"active slot 2", func(t *testing.T, dir string) { rewriteState(t, dir, func(st *State) { st.Active = 2 }) }, "active slot 2"},
		{"bad version", func(t *testing.T, dir string) { rewriteState(t, dir, func(st *State) { st.Version = "x" }) }, "invalid version"},
		{"bad sha256", func(t *testing.T, dir string) { rewriteState(t, dir, func(st *State) { st.SHA256 = "../x" }) }, "sha256"},
		{"another model", func(t *testing.T, dir string) { rewriteState(t, dir, func(st *State) { st.Model = "n" }) }, "model"},
	}
	for _, tt := range tests {
		t.Run(tt.name, func(t *testing.T) {
			dir := filepath.Join(t.TempDir(), "dev")
			if _, err := openSlots(dir, State{Model: "m", Version: "1.0.0"}, v1, nil); err != nil {
				t.Fatal(err)
			}
			tt.damage(t, dir)
			_, err := openSlots(dir, State{Model: "m", Version: "1.0.0"}, v1, nil)
			if err == nil || !strings.Contains(err.Error(), tt.want) {
				t.Errorf("got %v, want an error containing %q", err, tt.want)
			}
		})
	}
}

func rewriteState(t *testing.T, dir string, change func(st *State)) {
	t.Helper()
	st := readState(t, dir)
	change(&st)
	b, _ := json.Marshal(st)
	if err := os.WriteFile(filepath.Join(dir, stateFile), b, 0o600); err != nil {
		t.Fatal(err)
	}
}

func TestSlotsRemoveStaleTempFiles(t *testing.T) {
	dir := filepath.Join(t.TempDir(), "dev")
	if _, err := openSlots(dir, State{Model: "m", Version: "1.0.0"}, []byte("x"), nil); err != nil {
		t.Fatal(err)
	}
	stale := filepath.Join(dir, ".slot-b.bin.tmp-123")
	if err := os.WriteFile(stale, []byte("half"), 0o600); err != nil {
		t.Fatal(err)
	}
	if _, err := openSlots(dir, State{Model: "m", Version: "1.0.0"}, []byte("x"), nil); err != nil {
		t.Fatal(err)
	}
	if _, err := os.Stat(stale); !os.IsNotExist(err) {
		t.Errorf("stale temp file: got %v, want it removed", err)
	}
}

func TestStateDirFor(t *testing.T) {
	for _, id := range []string{".", "..", `a\b`} {
		if _, err := stateDirFor("/s", id); err == nil {
			t.Errorf("stateDirFor(%q): got nil error, want one", id)
		}
	}
	if got, err := stateDirFor("/s", "dev-1"); err != nil || got != filepath.Join("/s", "dev-1") {
		t.Errorf("stateDirFor(dev-1): got %q, %v; want /s/dev-1", got, err)
	}
}

// TestImageCacheApply: a fleet builds each (base, patch) pair once and shares the image; a
// failure is each device's own; a lone device (nil cache) always builds.
func TestImageCacheApply(t *testing.T) {
	builds := 0
	build := func(img []byte, err error) func() ([]byte, error) {
		return func() ([]byte, error) { builds++; return img, err }
	}
	var c imageCache
	first, err := c.apply("b1", "p1", build([]byte("one"), nil))
	if err != nil || string(first) != "one" {
		t.Fatalf("first apply: got %q, %v; want one, nil", first, err)
	}
	again, err := c.apply("b1", "p1", build([]byte("other"), nil))
	if err != nil || string(again) != "one" || builds != 1 {
		t.Fatalf("same pair again: got %q, %v after %d builds; want one, nil after 1", again, err, builds)
	}
	for _, k := range [][2]string{{"b2", "p1"}, {"b1", "p2"}} {
		if img, _ := c.apply(k[0], k[1], build([]byte(k[0]+k[1]), nil)); string(img) != k[0]+k[1] {
			t.Fatalf("pair %v: got %q, want %q", k, img, k[0]+k[1])
		}
	}
	if builds != 3 {
		t.Fatalf("got %d builds for 3 pairs, want 3", builds)
	}
	failed := errors.New("wrong base")
	for range 2 {
		if _, err := c.apply("b3", "p3", build(nil, failed)); !errors.Is(err, failed) {
			t.Fatalf("failing build: got %v, want %v", err, failed)
		}
	}
	if builds != 5 {
		t.Fatalf("got %d builds after two failures of one pair, want 5: a failure must not be kept", builds)
	}
	var lone *imageCache
	for range 2 {
		if _, err := lone.apply("b1", "p1", build([]byte("x"), nil)); err != nil {
			t.Fatal(err)
		}
	}
	if builds != 7 {
		t.Fatalf("got %d builds, want 7: a device without a fleet cache builds every time", builds)
	}
}
