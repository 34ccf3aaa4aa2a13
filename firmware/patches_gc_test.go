package firmware_test

import (
	"bytes"
	"encoding/json"
	"errors"
	"io/fs"
	"log/slog"
	"os"
	"path/filepath"
	"slices"
	"strings"
	"sync"
	"testing"
	"time"

	"go.etcd.io/bbolt"

	"github.com/fota-dev/fota/firmware"
	"github.com/fota-dev/fota/protocol"
)

// logBuf collects what a store or a patcher logs, for tests that check the counts logged.
type logBuf struct {
	mu sync.Mutex
	b  bytes.Buffer
}

func (l *logBuf) Write(p []byte) (int, error) {
	l.mu.Lock()
	defer l.mu.Unlock()
	return l.b.Write(p)
}

func (l *logBuf) String() string {
	l.mu.Lock()
	defer l.mu.Unlock()
	return l.b.String()
}

func (l *logBuf) logger() *slog.Logger {
	if l == nil {
		return nil
	}
	return slog.New(slog.NewTextHandler(l, nil))
}

// line returns the first line logged with message msg, or "".
func (l *logBuf) line(msg string) string {
	for line := range strings.Lines(l.String()) {
		if strings.Contains(line, `msg="`+msg+`"`) {
			return line
		}
	}
	return ""
}

// newLoggedEnv is newEnv with a store that logs to the returned buffer.
func newLoggedEnv(t *testing.T) (*env, *logBuf) {
	t.Helper()
	lb := &logBuf{}
	e := &env{db: openDB(t), dir: filepath.Join(t.TempDir(), "artifacts")}
	e.s = e.openLogged(t, lb)
	return e, lb
}

func (e *env) openLogged(t *testing.T, lb *logBuf) *firmware.Store {
	t.Helper()
	s, err := firmware.Open(firmware.Options{Dir: e.dir, DB: e.db, SigningKey: testKey, Logger: lb.logger()})
	if err != nil {
		t.Fatalf("Open: %v", err)
	}
	t.Cleanup(func() { s.Close() })
	return s
}

// newGCPatcher starts a Patcher over e.s that offers any patch smaller than the image and
// calls hook, if not nil, between making a patch and storing its verdict.
func newGCPatcher(t *testing.T, e *env, lb *logBuf, hook func(base, target string)) (*firmware.Patcher, chan string) {
	t.Helper()
	ready := make(chan string, 8)
	p, err := firmware.NewPatcher(firmware.PatcherOptions{
		Store: e.s, DB: e.db, MaxRatio: 1, Logger: lb.logger(),
		OnReady: func(base, target string) { ready <- base + ":" + target },
	})
	if err != nil {
		t.Fatalf("NewPatcher: %v", err)
	}
	if hook != nil {
		firmware.SetBeforeVerdict(p, hook)
	}
	p.Start()
	t.Cleanup(func() { p.Close(t.Context()) })
	return p, ready
}

// makeDelta asks p for the delta from base to target, waits for it and returns its manifest.
func makeDelta(t *testing.T, p *firmware.Patcher, ready chan string, base, target firmware.Firmware) protocol.Manifest {
	t.Helper()
	if _, ok, err := p.Delta(base.SHA256, target.Manifest()); ok || err != nil {
		t.Fatalf("first ask for %s -> %s: got ready=%v err=%v, want pending", base.Version, target.Version, ok, err)
	}
	waitVerdict(t, ready)
	m, ok, err := p.Delta(base.SHA256, target.Manifest())
	if !ok || err != nil {
		t.Fatalf("delta %s -> %s after its verdict: got ready=%v err=%v, want a delta", base.Version, target.Version, ok, err)
	}
	return m
}

// sameDelta reports whether a and b are the same signed delta manifest.
func sameDelta(a, b protocol.Manifest) bool {
	if a.Delta == nil || b.Delta == nil || *a.Delta != *b.Delta {
		return false
	}
	a.Delta, b.Delta = nil, nil
	return a == b
}

// pair is the key of the verdict on the delta from base to the release target.
func pair(base, target firmware.Firmware) string {
	return target.Model + "\x00" + target.Version + "\x00" + base.SHA256
}

// deltaKeys returns the keys of the Patcher's verdicts, sorted.
func deltaKeys(t *testing.T, db *bbolt.DB) []string {
	t.Helper()
	var keys []string
	err := db.View(func(tx *bbolt.Tx) error {
		b := tx.Bucket([]byte("deltas"))
		if b == nil {
			return nil
		}
		return b.ForEach(func(k, _ []byte) error {
			keys = append(keys, string(k))
			return nil
		})
	})
	if err != nil {
		t.Fatal(err)
	}
	slices.Sort(keys)
	return keys
}

func checkDeltaKeys(t *testing.T, db *bbolt.DB, want ...string) {
	t.Helper()
	slices.Sort(want)
	if got := deltaKeys(t, db); !slices.Equal(got, want) {
		t.Errorf("delta verdicts: got %q, want %q", got, want)
	}
}

// checkArtifacts checks that exactly the artifacts shas are on disk, and no temp file.
func checkArtifacts(t *testing.T, e *env, shas ...string) {
	t.Helper()
	want := make([]string, 0, len(shas))
	for _, sha := range shas {
		want = append(want, "sha256/"+sha[:2]+"/"+sha)
	}
	slices.Sort(want)
	got := e.artifacts(t)
	slices.Sort(got)
	if !slices.Equal(got, want) {
		t.Errorf("artifact files: got %q, want %q", got, want)
	}
	if tmp := e.temps(t); len(tmp) != 0 {
		t.Errorf("temp files: got %q, want none", tmp)
	}
}

func checkLogged(t *testing.T, lb *logBuf, msg string, attrs ...string) {
	t.Helper()
	line := lb.line(msg)
	if line == "" {
		t.Errorf("log: no %q line in\n%s", msg, lb.String())
		return
	}
	for _, a := range attrs {
		if !strings.Contains(line, " "+a) {
			t.Errorf("log line %q: got no %s", strings.TrimSpace(line), a)
		}
	}
}

func TestDeleteTargetRemovesItsPatches(t *testing.T) {
	e, lb := newLoggedEnv(t)
	a := e.add(t, "primehub", "7.27.0", 0, image(t, "pybricks-primehub-7.27.0.bin"))
	b := e.add(t, "primehub", "7.28.0", 0, image(t, "pybricks-primehub-7.28.0.bin"))
	c := e.add(t, "primehub", "7.22.0", 0, image(t, "pybricks-primehub-7.22.0.bin"))
	p, ready := newGCPatcher(t, e, nil, nil)
	ab := makeDelta(t, p, ready, a, b)
	ac := makeDelta(t, p, ready, a, c)
	checkArtifacts(t, e, a.SHA256, b.SHA256, c.SHA256, ab.Delta.PatchSHA256, ac.Delta.PatchSHA256)

	if err := e.s.Delete("primehub", "7.28.0", nil); err != nil {
		t.Fatalf("Delete target: %v", err)
	}
	checkDeltaKeys(t, e.db, pair(a, c))
	checkArtifacts(t, e, a.SHA256, c.SHA256, ac.Delta.PatchSHA256)
	checkLogged(t, lb, "firmware deleted", "version=7.28.0", "patches_removed=1")
	buf := make([]byte, 16)
	if _, err := e.s.ReadAt(ab.Delta.PatchSHA256, buf, 0); err == nil {
		t.Error("ReadAt of the deleted target's patch: got nil error, want ErrNotFound")
	}
	// The other target's patch is still offered, and readable.
	if m, ok, err := p.Delta(a.SHA256, c.Manifest()); !ok || err != nil || !sameDelta(m, ac) {
		t.Errorf("delta to the other target: got ready=%v err=%v, want the same manifest", ok, err)
	}
	if _, err := e.s.ReadAt(ac.Delta.PatchSHA256, buf, 0); err != nil {
		t.Errorf("ReadAt of the other target's patch: %v", err)
	}
}

func TestDeleteBaseKeepsPatches(t *testing.T) {
	e, lb := newLoggedEnv(t)
	a := e.add(t, "primehub", "7.27.0", 0, image(t, "pybricks-primehub-7.27.0.bin"))
	b := e.add(t, "primehub", "7.28.0", 0, image(t, "pybricks-primehub-7.28.0.bin"))
	p, ready := newGCPatcher(t, e, nil, nil)
	ab := makeDelta(t, p, ready, a, b)

	if err := e.s.Delete("primehub", "7.27.0", nil); err != nil {
		t.Fatalf("Delete base: %v", err)
	}
	checkDeltaKeys(t, e.db, pair(a, b))
	checkArtifacts(t, e, b.SHA256, ab.Delta.PatchSHA256)
	checkLogged(t, lb, "firmware deleted", "version=7.27.0", "patches_removed=0")
	// Devices still running the base get the patch, from this Patcher and from one made
	// after a restart (whose sweep must keep it: its target is there).
	p2, _ := newGCPatcher(t, e, nil, nil)
	for i, p := range []*firmware.Patcher{p, p2} {
		if m, ok, err := p.Delta(a.SHA256, b.Manifest()); !ok || err != nil || !sameDelta(m, ab) {
			t.Errorf("patcher %d: delta from the deleted base: got ready=%v err=%v, want the same manifest", i+1, ok, err)
		}
	}
	patch := make([]byte, ab.Delta.PatchSize)
	if _, err := e.s.ReadAt(ab.Delta.PatchSHA256, patch, 0); err != nil {
		t.Fatalf("ReadAt of the patch: %v", err)
	}
	if err := firmware.VerifyPatch(ab, patch); err != nil {
		t.Errorf("patch after deleting its base: %v", err)
	}

	// The patch goes with its target.
	if err := e.s.Delete("primehub", "7.28.0", nil); err != nil {
		t.Fatalf("Delete target: %v", err)
	}
	checkDeltaKeys(t, e.db)
	checkArtifacts(t, e)
}

func TestPatchNamedElsewhereIsKept(t *testing.T) {
	v22, v27, v28 := image(t, "pybricks-primehub-7.22.0.bin"), image(t, "pybricks-primehub-7.27.0.bin"), image(t, "pybricks-primehub-7.28.0.bin")
	tests := []struct {
		name string
		// alsoName makes a record other than the verdict on a -> b name the patch ab, and
		// returns the keys of the verdicts that stay when b is deleted and a function that
		// deletes that other record.
		alsoName func(t *testing.T, e *env, a, b firmware.Firmware, ab protocol.Manifest) (keep []string, release func())
	}{
		{"another verdict", func(t *testing.T, e *env, a, _ firmware.Firmware, ab protocol.Manifest) ([]string, func()) {
			c := e.add(t, "primehub", "7.22.0", 0, v22)
			// No real pair of images has the same patch: write the verdict directly.
			v, err := json.Marshal(map[string]any{"target": c.SHA256, "manifest": ab})
			if err != nil {
				t.Fatal(err)
			}
			if err := e.db.Update(func(tx *bbolt.Tx) error {
				return tx.Bucket([]byte("deltas")).Put([]byte(pair(a, c)), v)
			}); err != nil {
				t.Fatal(err)
			}
			return []string{pair(a, c)}, func() {
				if err := e.s.Delete("primehub", "7.22.0", nil); err != nil {
					t.Fatalf("Delete the other target: %v", err)
				}
			}
		}},
		{"a firmware record", func(t *testing.T, e *env, _, _ firmware.Firmware, ab protocol.Manifest) ([]string, func()) {
			patch := make([]byte, ab.Delta.PatchSize)
			if _, err := e.s.ReadAt(ab.Delta.PatchSHA256, patch, 0); err != nil {
				t.Fatal(err)
			}
			if f := e.add(t, "blob", "1.0.0", 0, patch); f.SHA256 != ab.Delta.PatchSHA256 {
				t.Fatalf("image of the patch bytes: got sha256 %s, want %s", f.SHA256, ab.Delta.PatchSHA256)
			}
			return nil, func() {
				if err := e.s.Delete("blob", "1.0.0", nil); err != nil {
					t.Fatalf("Delete the other record: %v", err)
				}
			}
		}},
	}
	for _, tt := range tests {
		t.Run(tt.name, func(t *testing.T) {
			e := newEnv(t, 0)
			a := e.add(t, "primehub", "7.27.0", 0, v27)
			b := e.add(t, "primehub", "7.28.0", 0, v28)
			p, ready := newGCPatcher(t, e, nil, nil)
			ab := makeDelta(t, p, ready, a, b)
			keep, release := tt.alsoName(t, e, a, b, ab)

			if err := e.s.Delete("primehub", "7.28.0", nil); err != nil {
				t.Fatalf("Delete target: %v", err)
			}
			checkDeltaKeys(t, e.db, keep...)
			buf := make([]byte, 16)
			if _, err := e.s.ReadAt(ab.Delta.PatchSHA256, buf, 0); err != nil {
				t.Errorf("ReadAt of a patch still named elsewhere: %v", err)
			}

			// Once nothing names it, it goes.
			release()
			checkDeltaKeys(t, e.db)
			checkArtifacts(t, e, a.SHA256)
		})
	}
}

func TestPatcherSweepsDeletedTargets(t *testing.T) {
	v27, v28 := image(t, "pybricks-primehub-7.27.0.bin"), image(t, "pybricks-primehub-7.28.0.bin")
	tests := []struct {
		name string
		// crash removes records directly, as a crash or an older fota would leave them.
		crash func(tx *bbolt.Tx, a, b firmware.Firmware) error
		// What Open and the Patcher log as they sweep; nil: no line.
		wantOpen, wantPatcher []string
	}{
		{"verdict outlived its target", func(tx *bbolt.Tx, _, _ firmware.Firmware) error {
			return tx.Bucket([]byte("firmware")).Delete([]byte("primehub\x007.28.0"))
		}, []string{"count=1"}, []string{"records=1", "patches=1"}},
		{"patch outlived its verdict", func(tx *bbolt.Tx, a, b firmware.Firmware) error {
			// Delete committed, and the process died before removing the files.
			if err := tx.Bucket([]byte("firmware")).Delete([]byte("primehub\x007.28.0")); err != nil {
				return err
			}
			return tx.Bucket([]byte("deltas")).Delete([]byte(pair(a, b)))
		}, []string{"count=2"}, nil},
	}
	for _, tt := range tests {
		t.Run(tt.name, func(t *testing.T) {
			e := newEnv(t, 0)
			a := e.add(t, "primehub", "7.27.0", 0, v27)
			b := e.add(t, "primehub", "7.28.0", 0, v28)
			p, ready := newGCPatcher(t, e, nil, nil)
			ab := makeDelta(t, p, ready, a, b)
			if err := p.Close(t.Context()); err != nil {
				t.Fatal(err)
			}
			if err := e.db.Update(func(tx *bbolt.Tx) error { return tt.crash(tx, a, b) }); err != nil {
				t.Fatal(err)
			}
			checkArtifacts(t, e, a.SHA256, b.SHA256, ab.Delta.PatchSHA256)

			// Reopen.
			lb := &logBuf{}
			e.s.Close()
			e.s = e.openLogged(t, lb)
			newGCPatcher(t, e, lb, nil)
			checkDeltaKeys(t, e.db)
			// The image left without a record goes too, at Open.
			checkArtifacts(t, e, a.SHA256)
			checkLogged(t, lb, "removed artifacts no record names", tt.wantOpen...)
			if tt.wantPatcher == nil {
				if line := lb.line("swept deltas of deleted firmware"); line != "" {
					t.Errorf("log: got %q, want no sweep by the Patcher: Open left it nothing", line)
				}
			} else {
				checkLogged(t, lb, "swept deltas of deleted firmware", tt.wantPatcher...)
			}
		})
	}
}

func TestPatchForDeletedTargetLeavesNothing(t *testing.T) {
	e := newEnv(t, 0)
	a := e.add(t, "primehub", "7.27.0", 0, image(t, "pybricks-primehub-7.27.0.bin"))
	b := e.add(t, "primehub", "7.28.0", 0, image(t, "pybricks-primehub-7.28.0.bin"))
	deleted := make(chan error, 1)
	p, ready := newGCPatcher(t, e, nil, func(base, target string) {
		// The patch is made and verified; the operator deletes the target now.
		deleted <- e.s.Delete("primehub", "7.28.0", nil)
	})
	if _, ok, err := p.Delta(a.SHA256, b.Manifest()); ok || err != nil {
		t.Fatalf("first ask: got ready=%v err=%v, want pending", ok, err)
	}
	select {
	case err := <-deleted:
		if err != nil {
			t.Fatalf("Delete target: %v", err)
		}
	case <-time.After(60 * time.Second):
		t.Fatal("patch not made after 60s")
	}
	// Close waits for the worker to finish storing, or not storing, the verdict.
	if err := p.Close(t.Context()); err != nil {
		t.Fatal(err)
	}
	checkDeltaKeys(t, e.db)
	checkArtifacts(t, e, a.SHA256)
	select {
	case pr := <-ready:
		t.Errorf("OnReady called for %s, want no call: nothing was stored", pr)
	default:
	}
}

func TestNewPatcherNeedsTheStoreDB(t *testing.T) {
	e := newEnv(t, 0)
	if _, err := firmware.NewPatcher(firmware.PatcherOptions{Store: e.s, DB: openDB(t)}); err == nil {
		t.Error("NewPatcher with another DB than the Store's: got nil error, want one")
	}
}

// TestOpenSweepsUnnamedArtifacts: a crash inside Add (file installed, record not committed)
// or Delete (record gone, file not yet removed) leaves an image no record names; the next
// Open removes it, and nothing else.
func TestOpenSweepsUnnamedArtifacts(t *testing.T) {
	e, _ := newLoggedEnv(t)
	a := e.add(t, "primehub", "7.27.0", 0, image(t, "pybricks-primehub-7.27.0.bin"))
	b := e.add(t, "primehub", "7.28.0", 0, image(t, "pybricks-primehub-7.28.0.bin"))
	if err := e.db.Update(func(tx *bbolt.Tx) error {
		return tx.Bucket([]byte("firmware")).Delete([]byte("primehub\x007.28.0"))
	}); err != nil {
		t.Fatal(err)
	}
	checkArtifacts(t, e, a.SHA256, b.SHA256)
	// Files whose names the store never writes are not its to judge.
	foreign := []string{
		filepath.Join(e.dir, "sha256", "notes.txt"),
		filepath.Join(e.dir, "sha256", b.SHA256[:2], strings.ToUpper(b.SHA256)),
		filepath.Join(e.dir, "sha256", "00", b.SHA256),
	}
	for _, f := range foreign {
		if err := os.MkdirAll(filepath.Dir(f), 0o750); err != nil {
			t.Fatal(err)
		}
		if err := os.WriteFile(f, []byte("x"), 0o600); err != nil {
			t.Fatal(err)
		}
	}

	lb := &logBuf{}
	e.s.Close()
	e.s = e.openLogged(t, lb)
	if _, err := os.Stat(filepath.Join(e.dir, "sha256", b.SHA256[:2], b.SHA256)); !errors.Is(err, fs.ErrNotExist) {
		t.Errorf("image without a record: stat err %v, want it removed", err)
	}
	if _, err := e.s.Path(a.SHA256); err != nil {
		t.Errorf("image with a record: %v, want it kept", err)
	}
	for _, f := range foreign {
		if _, err := os.Stat(f); err != nil {
			t.Errorf("foreign file %s: %v, want it kept", f, err)
		}
	}
	checkLogged(t, lb, "removed artifacts no record names", "count=1")
	// The next Open finds nothing to do.
	lb2 := &logBuf{}
	e.s.Close()
	e.s = e.openLogged(t, lb2)
	if line := lb2.line("removed artifacts no record names"); line != "" {
		t.Errorf("second Open logged %q, want nothing removed", line)
	}
}
