package firmware_test

import (
	"bufio"
	"bytes"
	"context"
	"crypto/ed25519"
	"crypto/rand"
	"crypto/sha256"
	"encoding/hex"
	"errors"
	"fmt"
	"io"
	"io/fs"
	"os"
	"path/filepath"
	"slices"
	"strings"
	"sync"
	"sync/atomic"
	"testing"
	"time"

	"go.etcd.io/bbolt"

	"github.com/fota-dev/fota/firmware"
	"github.com/fota-dev/fota/protocol"
)

var imageDir = filepath.Join("..", "..", "shared", "firmware")

// image returns the bytes of a real firmware image from the shared directory.
func image(t *testing.T, name string) []byte {
	t.Helper()
	b, err := os.ReadFile(filepath.Join(imageDir, name))
	if errors.Is(err, fs.ErrNotExist) {
		t.Skipf("real firmware image %s not found in %s; these tests need /work/shared/firmware", name, imageDir)
	}
	if err != nil {
		t.Fatal(err)
	}
	return b
}

func openDB(t *testing.T) *bbolt.DB {
	t.Helper()
	db, err := bbolt.Open(filepath.Join(t.TempDir(), "fota.db"), 0o600, &bbolt.Options{Timeout: time.Second})
	if err != nil {
		t.Fatal(err)
	}
	t.Cleanup(func() { db.Close() })
	return db
}

// testKey is the release key of every online test store.
var testKey = func() ed25519.PrivateKey {
	_, k, err := ed25519.GenerateKey(rand.Reader)
	if err != nil {
		panic(err)
	}
	return k
}()

func testPub() ed25519.PublicKey { return testKey.Public().(ed25519.PublicKey) }

type env struct {
	db  *bbolt.DB
	dir string
	s   *firmware.Store
}

func newEnv(t *testing.T, maxSize int64) *env {
	t.Helper()
	e := &env{db: openDB(t), dir: filepath.Join(t.TempDir(), "artifacts")}
	e.s = e.open(t, maxSize)
	return e
}

func (e *env) open(t *testing.T, maxSize int64) *firmware.Store {
	t.Helper()
	s, err := firmware.Open(firmware.Options{Dir: e.dir, DB: e.db, MaxSize: maxSize, SigningKey: testKey})
	if err != nil {
		t.Fatalf("Open: %v", err)
	}
	t.Cleanup(func() { s.Close() })
	return s
}

// files lists the regular files under dir/sub, relative to dir.
func (e *env) files(t *testing.T, sub string) []string {
	t.Helper()
	var out []string
	err := filepath.WalkDir(filepath.Join(e.dir, sub), func(p string, d fs.DirEntry, err error) error {
		if err != nil {
			return err
		}
		if d.Type().IsRegular() {
			rel, _ := filepath.Rel(e.dir, p)
			out = append(out, filepath.ToSlash(rel))
		}
		return nil
	})
	if err != nil {
		t.Fatal(err)
	}
	return out
}

func (e *env) artifacts(t *testing.T) []string { return e.files(t, "sha256") }
func (e *env) temps(t *testing.T) []string     { return e.files(t, "tmp") }

func (e *env) add(t *testing.T, model, version string, counter uint64, body []byte) firmware.Firmware {
	t.Helper()
	f, created, err := e.s.Add(t.Context(), firmware.AddRequest{Model: model, Version: version, Counter: counter, Body: bytes.NewReader(body)})
	if err != nil {
		t.Fatalf("Add(%s, %s): %v", model, version, err)
	}
	if !created {
		t.Fatalf("Add(%s, %s): created = false, want true", model, version)
	}
	return f
}

func shaOf(b []byte) string {
	h := sha256.Sum256(b)
	return hex.EncodeToString(h[:])
}

func TestAddGetList(t *testing.T) {
	v27, v28 := image(t, "pybricks-primehub-7.27.0.bin"), image(t, "pybricks-primehub-7.28.0.bin")
	e := newEnv(t, 0)
	before := time.Now()

	f27, created, err := e.s.Add(t.Context(), firmware.AddRequest{Model: "primehub", Version: "7.27.0", Notes: "first", Body: bytes.NewReader(v27)})
	if err != nil || !created {
		t.Fatalf("Add 7.27.0: created %v, err %v; want true, nil", created, err)
	}
	f28 := e.add(t, "primehub", "v7.28", 0, v28)

	wantSHA, wantSize, err := firmware.HashFile(filepath.Join(imageDir, "pybricks-primehub-7.27.0.bin"))
	if err != nil {
		t.Fatal(err)
	}
	want27 := firmware.Firmware{Model: "primehub", Version: "7.27.0", Size: wantSize, SHA256: wantSHA, Counter: 1, Notes: "first", Created: f27.Created, Signature: f27.Signature}
	if f27 != want27 {
		t.Errorf("Add 7.27.0: got %+v, want %+v", f27, want27)
	}
	if f27.Created.Before(before.Add(-time.Second)) || f27.Created.After(time.Now().Add(time.Second)) {
		t.Errorf("Created = %v, want about %v", f27.Created, before)
	}
	if f28.Version != "7.28.0" || f28.SHA256 != shaOf(v28) || f28.Size != int64(len(v28)) || f28.Counter != 2 {
		t.Errorf("Add v7.28: got %+v, want version 7.28.0, sha %s, size %d, counter 2", f28, shaOf(v28), len(v28))
	}

	for _, v := range []string{"7.27.0", "v7.27.0", "7.27", "v7.27"} {
		got, err := e.s.Get("primehub", v)
		if err != nil {
			t.Fatalf("Get(primehub, %q): %v", v, err)
		}
		if !got.Created.Equal(f27.Created) || got.Created.Location() != time.UTC {
			t.Errorf("Get(primehub, %q).Created = %v, want %v in UTC", v, got.Created, f27.Created)
		}
		if got != f27 {
			t.Errorf("Get(primehub, %q) = %+v, want %+v", v, got, f27)
		}
	}

	list, err := e.s.List()
	if err != nil {
		t.Fatal(err)
	}
	if want := []firmware.Firmware{f27, f28}; !slices.Equal(list, want) {
		t.Errorf("List = %+v, want %+v", list, want)
	}

	for _, tc := range []struct {
		f    firmware.Firmware
		body []byte
	}{{f27, v27}, {f28, v28}} {
		p, err := e.s.Path(tc.f.SHA256)
		if err != nil {
			t.Fatal(err)
		}
		if want := filepath.Join(e.dir, "sha256", tc.f.SHA256[:2], tc.f.SHA256); p != want {
			t.Errorf("Path = %s, want %s", p, want)
		}
		sha, size, err := firmware.HashFile(p)
		if err != nil {
			t.Fatal(err)
		}
		if sha != tc.f.SHA256 || size != tc.f.Size {
			t.Errorf("stored file hashes to %s, %d bytes; want %s, %d", sha, size, tc.f.SHA256, tc.f.Size)
		}
		if n, err := e.s.Size(tc.f.SHA256); n != int64(len(tc.body)) || err != nil {
			t.Errorf("Size = %d, %v; want %d, nil", n, err, len(tc.body))
		}
	}

	wantManifest := protocol.Manifest{V: protocol.ProtocolVersion, Model: "primehub", Version: "7.28.0", Counter: 2, Size: int64(len(v28)), SHA256: shaOf(v28), Signature: f28.Signature}
	if m := f28.Manifest(); m != wantManifest {
		t.Errorf("Manifest = %+v, want %+v", m, wantManifest)
	}
	for _, f := range []firmware.Firmware{f27, f28} {
		if err := firmware.VerifySignature(f.Manifest(), testPub()); err != nil {
			t.Errorf("VerifySignature(manifest of %s) = %v, want nil", f.Version, err)
		}
	}
	if got := e.temps(t); len(got) != 0 {
		t.Errorf("temp files left: %v", got)
	}
}

func TestAddSameBytesTwice(t *testing.T) {
	img := image(t, "pybricks-primehub-7.27.0.bin")
	e := newEnv(t, 0)
	first := e.add(t, "primehub", "7.27.0", 0, img)

	// Notes and a zero counter differ from nothing stored: still the same upload.
	again, created, err := e.s.Add(t.Context(), firmware.AddRequest{Model: "primehub", Version: "v7.27", Notes: "retry", Body: bytes.NewReader(img)})
	if err != nil {
		t.Fatalf("second Add: %v", err)
	}
	if created {
		t.Errorf("second Add: created = true, want false")
	}
	if again != first {
		t.Errorf("second Add = %+v, want the existing %+v", again, first)
	}
	// The explicit counter equal to the stored one is the same request too.
	if _, created, err := e.s.Add(t.Context(), firmware.AddRequest{Model: "primehub", Version: "7.27.0", Counter: first.Counter, Body: bytes.NewReader(img)}); err != nil || created {
		t.Errorf("Add with the stored counter: created %v, err %v; want false, nil", created, err)
	}
	if got, want := e.artifacts(t), []string{"sha256/" + first.SHA256[:2] + "/" + first.SHA256}; !slices.Equal(got, want) {
		t.Errorf("artifacts = %v, want %v", got, want)
	}
	if got := e.temps(t); len(got) != 0 {
		t.Errorf("temp files left: %v", got)
	}
}

func TestAddConflict(t *testing.T) {
	v27, v28 := image(t, "pybricks-primehub-7.27.0.bin"), image(t, "pybricks-primehub-7.28.0.bin")
	e := newEnv(t, 0)
	orig := e.add(t, "primehub", "7.27.0", 0, v27)
	wantArtifacts := e.artifacts(t)

	tests := []struct {
		name string
		req  firmware.AddRequest
	}{
		{"other bytes", firmware.AddRequest{Model: "primehub", Version: "7.27.0", Body: bytes.NewReader(v28)}},
		{"other bytes, non-canonical version", firmware.AddRequest{Model: "primehub", Version: "v7.27", Body: bytes.NewReader(v28)}},
		{"same bytes, other counter", firmware.AddRequest{Model: "primehub", Version: "7.27.0", Counter: 7, Body: bytes.NewReader(v27)}},
	}
	for _, tc := range tests {
		t.Run(tc.name, func(t *testing.T) {
			_, created, err := e.s.Add(t.Context(), tc.req)
			if !errors.Is(err, firmware.ErrConflict) {
				t.Fatalf("Add: got err %v, want ErrConflict", err)
			}
			if created {
				t.Errorf("created = true, want false")
			}
			got, err := e.s.Get("primehub", "7.27.0")
			if err != nil || got != orig {
				t.Errorf("Get after conflict = %+v, %v; want %+v", got, err, orig)
			}
			if got := e.artifacts(t); !slices.Equal(got, wantArtifacts) {
				t.Errorf("artifacts = %v, want %v", got, wantArtifacts)
			}
			if got := e.temps(t); len(got) != 0 {
				t.Errorf("temp files left: %v", got)
			}
		})
	}
}

type failingReader struct {
	r   io.Reader
	err error
}

func (f *failingReader) Read(p []byte) (int, error) {
	n, err := f.r.Read(p)
	if err == io.EOF {
		return n, f.err
	}
	return n, err
}

func TestAddRefused(t *testing.T) {
	img := image(t, "pybricks-primehub-7.27.0.bin")
	const maxSize = 64 << 10
	errRead := errors.New("connection reset")
	cancelled, cancel := context.WithCancel(context.Background())
	cancel()

	tests := []struct {
		name    string
		ctx     context.Context
		req     firmware.AddRequest
		wantErr error
	}{
		{"version without minor", nil, firmware.AddRequest{Model: "primehub", Version: "7", Body: bytes.NewReader(img[:100])}, protocol.ErrBadVersion},
		{"version with build metadata", nil, firmware.AddRequest{Model: "primehub", Version: "7.27.0+abc", Body: bytes.NewReader(img[:100])}, protocol.ErrBadVersion},
		{"empty version", nil, firmware.AddRequest{Model: "primehub", Version: "", Body: bytes.NewReader(img[:100])}, protocol.ErrBadVersion},
		{"empty model", nil, firmware.AddRequest{Model: "", Version: "1.0.0", Body: bytes.NewReader(img[:100])}, firmware.ErrBadModel},
		{"model with slash", nil, firmware.AddRequest{Model: "../etc", Version: "1.0.0", Body: bytes.NewReader(img[:100])}, firmware.ErrBadModel},
		{"model with NUL", nil, firmware.AddRequest{Model: "a\x00b", Version: "1.0.0", Body: bytes.NewReader(img[:100])}, firmware.ErrBadModel},
		{"model too long", nil, firmware.AddRequest{Model: strings.Repeat("m", 65), Version: "1.0.0", Body: bytes.NewReader(img[:100])}, firmware.ErrBadModel},
		{"empty body", nil, firmware.AddRequest{Model: "primehub", Version: "1.0.0", Body: bytes.NewReader(nil)}, firmware.ErrEmpty},
		{"nil body", nil, firmware.AddRequest{Model: "primehub", Version: "1.0.0"}, firmware.ErrEmpty},
		{"too large", nil, firmware.AddRequest{Model: "primehub", Version: "7.27.0", Body: bytes.NewReader(img)}, firmware.ErrTooLarge},
		{"one byte too large", nil, firmware.AddRequest{Model: "primehub", Version: "7.27.0", Body: bytes.NewReader(img[:maxSize+1])}, firmware.ErrTooLarge},
		{"body fails", nil, firmware.AddRequest{Model: "primehub", Version: "7.27.0", Body: &failingReader{bytes.NewReader(img[:1000]), errRead}}, errRead},
		{"cancelled", cancelled, firmware.AddRequest{Model: "primehub", Version: "7.27.0", Body: bytes.NewReader(img[:1000])}, context.Canceled},
	}
	for _, tc := range tests {
		t.Run(tc.name, func(t *testing.T) {
			e := newEnv(t, maxSize)
			ctx := tc.ctx
			if ctx == nil {
				ctx = t.Context()
			}
			f, created, err := e.s.Add(ctx, tc.req)
			if !errors.Is(err, tc.wantErr) {
				t.Fatalf("Add: got %+v, %v; want error %v", f, err, tc.wantErr)
			}
			if created || f != (firmware.Firmware{}) {
				t.Errorf("Add: got %+v, created %v; want zero, false", f, created)
			}
			if got := e.artifacts(t); len(got) != 0 {
				t.Errorf("artifacts left: %v", got)
			}
			if got := e.temps(t); len(got) != 0 {
				t.Errorf("temp files left: %v", got)
			}
			if list, err := e.s.List(); err != nil || len(list) != 0 {
				t.Errorf("List = %+v, %v; want empty", list, err)
			}
		})
	}
}

// endless yields bytes forever and counts them.
type endless struct{ n int64 }

func (r *endless) Read(p []byte) (int, error) {
	r.n += int64(len(p))
	return len(p), nil
}

func TestAddStopsReadingAtMaxSize(t *testing.T) {
	const maxSize = 100_000
	e := newEnv(t, maxSize)
	body := &endless{}
	_, _, err := e.s.Add(t.Context(), firmware.AddRequest{Model: "primehub", Version: "1.0.0", Body: body})
	if !errors.Is(err, firmware.ErrTooLarge) {
		t.Fatalf("Add: got %v, want ErrTooLarge", err)
	}
	if body.n != maxSize+1 {
		t.Errorf("read %d bytes, want %d", body.n, maxSize+1)
	}
}

func TestAddExactlyMaxSize(t *testing.T) {
	img := image(t, "pybricks-primehub-7.27.0.bin")
	e := newEnv(t, int64(len(img)))
	f := e.add(t, "primehub", "7.27.0", 0, img)
	if f.Size != int64(len(img)) {
		t.Errorf("Size = %d, want %d", f.Size, len(img))
	}
}

func TestReadAt(t *testing.T) {
	name := "pybricks-primehub-7.28.0.bin"
	img := image(t, name)
	e := newEnv(t, 0)
	f := e.add(t, "primehub", "7.28.0", 0, img)
	ref, err := os.Open(filepath.Join(imageDir, name))
	if err != nil {
		t.Fatal(err)
	}
	defer ref.Close()
	size := int64(len(img))

	tests := []struct {
		name string
		off  int64
		n    int
	}{
		{"start", 0, 16},
		{"middle", 123_457, 4096},
		{"whole", 0, len(img)},
		{"last byte", size - 1, 1},
		{"across the end", size - 10, 16},
		{"at the end", size, 1},
		{"beyond the end", size + 100, 8},
		{"empty buffer", 0, 0},
		{"empty buffer beyond the end", size + 1, 0},
		{"negative offset", -1, 8},
	}
	for _, tc := range tests {
		t.Run(tc.name, func(t *testing.T) {
			want := make([]byte, tc.n)
			wantN, wantErr := ref.ReadAt(want, tc.off)
			got := make([]byte, tc.n)
			gotN, gotErr := e.s.ReadAt(f.SHA256, got, tc.off)
			if gotN != wantN || !bytes.Equal(got[:gotN], want[:wantN]) {
				t.Errorf("ReadAt(%d, %d) = %d bytes, want %d bytes like os.File", tc.off, tc.n, gotN, wantN)
			}
			switch {
			case wantErr == nil && gotErr != nil, wantErr != nil && gotErr == nil:
				t.Errorf("ReadAt(%d, %d) err = %v, want %v", tc.off, tc.n, gotErr, wantErr)
			case wantErr == io.EOF && gotErr != io.EOF:
				t.Errorf("ReadAt(%d, %d) err = %v, want io.EOF itself", tc.off, tc.n, gotErr)
			}
		})
	}

	// Reassemble the image chunk by chunk, as the chunk server does.
	var buf bytes.Buffer
	chunk := make([]byte, protocol.DefaultChunkSize)
	for off := int64(0); ; {
		n, err := e.s.ReadAt(f.SHA256, chunk, off)
		buf.Write(chunk[:n])
		off += int64(n)
		if err == io.EOF {
			break
		}
		if err != nil {
			t.Fatalf("ReadAt(%d): %v", off, err)
		}
	}
	if got := shaOf(buf.Bytes()); got != f.SHA256 {
		t.Errorf("reassembled image hashes to %s, want %s", got, f.SHA256)
	}

	upper := strings.ToUpper(f.SHA256)
	if n, err := e.s.ReadAt(upper, chunk[:4], 0); n != 4 || err != nil || !bytes.Equal(chunk[:4], img[:4]) {
		t.Errorf("ReadAt(upper-case sha) = %d, %v; want 4, nil", n, err)
	}
}

func TestUnknownSHA(t *testing.T) {
	img := image(t, "pybricks-primehub-7.27.0.bin")
	e := newEnv(t, 0)
	e.add(t, "primehub", "7.27.0", 0, img)
	for _, sha := range []string{
		shaOf([]byte("not stored")),
		"",
		"abc",
		"../../../../etc/passwd",
		strings.Repeat("g", 64),
		"../" + shaOf(img)[3:],
	} {
		t.Run(fmt.Sprintf("%q", sha), func(t *testing.T) {
			if _, err := e.s.ReadAt(sha, make([]byte, 8), 0); !errors.Is(err, firmware.ErrNotFound) {
				t.Errorf("ReadAt: got %v, want ErrNotFound", err)
			}
			if _, err := e.s.Size(sha); !errors.Is(err, firmware.ErrNotFound) {
				t.Errorf("Size: got %v, want ErrNotFound", err)
			}
			if _, err := e.s.Path(sha); !errors.Is(err, firmware.ErrNotFound) {
				t.Errorf("Path: got %v, want ErrNotFound", err)
			}
		})
	}
	for _, tc := range []struct{ model, version string }{{"primehub", "7.28.0"}, {"other", "7.27.0"}} {
		if _, err := e.s.Get(tc.model, tc.version); !errors.Is(err, firmware.ErrNotFound) {
			t.Errorf("Get(%s, %s): got %v, want ErrNotFound", tc.model, tc.version, err)
		}
	}
	if _, err := e.s.Get("a/b", "1.0.0"); !errors.Is(err, firmware.ErrBadModel) {
		t.Errorf("Get(bad model): got %v, want ErrBadModel", err)
	}
	if _, err := e.s.Get("primehub", "x"); !errors.Is(err, protocol.ErrBadVersion) {
		t.Errorf("Get(bad version): got %v, want protocol.ErrBadVersion", err)
	}
}

func TestDelete(t *testing.T) {
	v27, v28 := image(t, "pybricks-primehub-7.27.0.bin"), image(t, "pybricks-primehub-7.28.0.bin")
	e := newEnv(t, 0)
	f27 := e.add(t, "primehub", "7.27.0", 0, v27)
	f28 := e.add(t, "primehub", "7.28.0", 0, v28)
	// The same bytes under another model share one artifact file.
	twin := e.add(t, "primehub-b", "7.28.0", 0, v28)
	buf := make([]byte, 16)

	// Refused while in use: nothing changes.
	var asked firmware.Firmware
	err := e.s.Delete("primehub", "v7.27", func(f firmware.Firmware) bool { asked = f; return true })
	if !errors.Is(err, firmware.ErrInUse) {
		t.Fatalf("Delete in use: got %v, want ErrInUse", err)
	}
	if asked != f27 {
		t.Errorf("inUse called with %+v, want %+v", asked, f27)
	}
	if _, err := e.s.Get("primehub", "7.27.0"); err != nil {
		t.Errorf("Get after refused Delete: %v", err)
	}
	if _, err := e.s.ReadAt(f27.SHA256, buf, 0); err != nil {
		t.Errorf("ReadAt after refused Delete: %v", err)
	}

	// Allowed: record and file go, even with a cached handle open.
	if err := e.s.Delete("primehub", "7.27.0", func(firmware.Firmware) bool { return false }); err != nil {
		t.Fatalf("Delete: %v", err)
	}
	if _, err := e.s.Get("primehub", "7.27.0"); !errors.Is(err, firmware.ErrNotFound) {
		t.Errorf("Get after Delete: got %v, want ErrNotFound", err)
	}
	if _, err := e.s.ReadAt(f27.SHA256, buf, 0); !errors.Is(err, firmware.ErrNotFound) {
		t.Errorf("ReadAt after Delete: got %v, want ErrNotFound", err)
	}
	if _, err := os.Stat(filepath.Join(e.dir, "sha256", f27.SHA256[:2], f27.SHA256)); !errors.Is(err, fs.ErrNotExist) {
		t.Errorf("artifact file after Delete: stat err %v, want not exist", err)
	}

	// A shared artifact stays until its last record goes.
	if err := e.s.Delete("primehub", "7.28.0", nil); err != nil {
		t.Fatalf("Delete shared: %v", err)
	}
	if _, err := e.s.ReadAt(f28.SHA256, buf, 0); err != nil {
		t.Errorf("ReadAt of an artifact still referenced by %s: %v", twin.Model, err)
	}
	if err := e.s.Delete("primehub-b", "7.28.0", nil); err != nil {
		t.Fatalf("Delete last reference: %v", err)
	}
	if got := e.artifacts(t); len(got) != 0 {
		t.Errorf("artifacts after deleting everything: %v", got)
	}
	if err := e.s.Delete("primehub", "7.28.0", nil); !errors.Is(err, firmware.ErrNotFound) {
		t.Errorf("Delete twice: got %v, want ErrNotFound", err)
	}
}

func TestConcurrentReadAt(t *testing.T) {
	names := []string{
		"pybricks-primehub-7.22.0.bin", "pybricks-primehub-7.27.0.bin", "pybricks-primehub-7.28.0.bin",
		"upy-esp8266-v1.9.4.bin", "upy-esp8266-v1.10.bin",
	}
	e := newEnv(t, 0)
	// Fewer handles than images, so readers keep evicting each other's files.
	firmware.SetMaxOpen(e.s, 2)
	imgs := make(map[string][]byte)
	for i, n := range names {
		b := image(t, n)
		f := e.add(t, "m", fmt.Sprintf("1.%d.0", i), 0, b)
		imgs[f.SHA256] = b
	}
	shas := make([]string, 0, len(imgs))
	for sha := range imgs {
		shas = append(shas, sha)
	}
	slices.Sort(shas)

	const workers, reads = 8, 200
	var wg sync.WaitGroup
	errs := make(chan error, workers)
	for w := range workers {
		wg.Go(func() {
			buf := make([]byte, 4096)
			for i := range reads {
				sha := shas[(w+i)%len(shas)]
				img := imgs[sha]
				off := int64((w*7919 + i*104729) % len(img))
				n, err := e.s.ReadAt(sha, buf, off)
				if err != nil && err != io.EOF {
					errs <- fmt.Errorf("ReadAt(%s, %d): %w", sha[:8], off, err)
					return
				}
				if want := img[off:min(off+int64(len(buf)), int64(len(img)))]; !bytes.Equal(buf[:n], want) {
					errs <- fmt.Errorf("ReadAt(%s, %d): got %d bytes differing from the image, want %d", sha[:8], off, n, len(want))
					return
				}
			}
		})
	}
	wg.Wait()
	close(errs)
	for err := range errs {
		t.Error(err)
	}
	if n := firmware.OpenHandles(e.s); n > 2 {
		t.Errorf("open handles = %d, want at most 2", n)
	}
}

func TestReadAtDuringDelete(t *testing.T) {
	img := image(t, "pybricks-primehub-7.28.0.bin")
	e := newEnv(t, 0)
	f := e.add(t, "primehub", "7.28.0", 0, img)
	// Prime the cache so Delete has to evict a live handle.
	if _, err := e.s.ReadAt(f.SHA256, make([]byte, 1), 0); err != nil {
		t.Fatal(err)
	}

	const workers = 4
	var wg sync.WaitGroup
	var deleted atomic.Bool
	started := make(chan struct{}, workers)
	errs := make(chan error, workers)
	for w := range workers {
		wg.Go(func() {
			buf := make([]byte, 1024)
			for i := 0; ; i++ {
				if i == 1 {
					started <- struct{}{}
				}
				off := int64((w*1000 + i*4099) % len(img))
				afterDelete := deleted.Load()
				n, err := e.s.ReadAt(f.SHA256, buf, off)
				switch {
				case errors.Is(err, firmware.ErrNotFound):
					return
				case afterDelete:
					errs <- fmt.Errorf("ReadAt after Delete returned: got %d bytes, %v; want ErrNotFound", n, err)
					return
				case err != nil && err != io.EOF:
					errs <- fmt.Errorf("ReadAt during Delete: got %w, want data or ErrNotFound", err)
					return
				case !bytes.Equal(buf[:n], img[off:off+int64(n)]):
					errs <- fmt.Errorf("ReadAt(%d) during Delete returned wrong bytes", off)
					return
				}
			}
		})
	}
	for range workers {
		<-started
	}
	if err := e.s.Delete("primehub", "7.28.0", nil); err != nil {
		t.Fatalf("Delete: %v", err)
	}
	deleted.Store(true)
	wg.Wait()
	close(errs)
	for err := range errs {
		t.Error(err)
	}
	if n := firmware.OpenHandles(e.s); n != 0 {
		t.Errorf("open handles after Delete = %d, want 0", n)
	}
}

func TestReopen(t *testing.T) {
	v27, v28 := image(t, "pybricks-primehub-7.27.0.bin"), image(t, "pybricks-primehub-7.28.0.bin")
	e := newEnv(t, 0)
	e.add(t, "primehub", "7.27.0", 0, v27)
	e.add(t, "primehub", "7.28.0", 0, v28)
	before, err := e.s.List()
	if err != nil {
		t.Fatal(err)
	}
	if err := e.s.Close(); err != nil {
		t.Fatalf("Close: %v", err)
	}
	// What a crash in the middle of an upload leaves behind.
	stale := filepath.Join(e.dir, "tmp", "upload-123")
	if err := os.WriteFile(stale, v28[:1000], 0o600); err != nil {
		t.Fatal(err)
	}

	s := e.open(t, 0)
	after, err := s.List()
	if err != nil {
		t.Fatal(err)
	}
	if !slices.Equal(after, before) {
		t.Errorf("List after reopen = %+v, want %+v", after, before)
	}
	for _, f := range after {
		buf := make([]byte, 64)
		if n, err := s.ReadAt(f.SHA256, buf, f.Size-64); n != 64 || err != nil {
			t.Errorf("ReadAt(%s) after reopen = %d, %v; want 64, nil", f.Version, n, err)
		}
	}
	if _, err := os.Stat(stale); !errors.Is(err, fs.ErrNotExist) {
		t.Errorf("stale temp file after reopen: stat err %v, want not exist", err)
	}
	// The next default counter continues from the stored ones.
	f, _, err := s.Add(t.Context(), firmware.AddRequest{Model: "primehub", Version: "7.29.0-rc.1", Body: bytes.NewReader(v28[:5000])})
	if err != nil || f.Counter != 3 {
		t.Errorf("Add after reopen: counter %d, err %v; want 3, nil", f.Counter, err)
	}
}

func TestCounter(t *testing.T) {
	p22, p27, p28 := image(t, "pybricks-primehub-7.22.0.bin"), image(t, "pybricks-primehub-7.27.0.bin"), image(t, "pybricks-primehub-7.28.0.bin")
	e94, e10 := image(t, "upy-esp8266-v1.9.4.bin"), image(t, "upy-esp8266-v1.10.bin")
	e := newEnv(t, 0)
	steps := []struct {
		model, version string
		counter        uint64
		body           []byte
		want           uint64
	}{
		{"primehub", "7.22.0", 0, p22, 1},
		{"primehub", "7.27.0", 0, p27, 2},
		{"esp8266", "1.9.4", 0, e94, 1},
		{"primehub", "7.28.0", 10, p28, 10},
		{"esp8266", "1.10", 0, e10, 2},
		{"primehub", "7.29.0-rc.1", 0, p28[:4096], 11},
	}
	for _, st := range steps {
		t.Run(st.model+"@"+st.version, func(t *testing.T) {
			if f := e.add(t, st.model, st.version, st.counter, st.body); f.Counter != st.want {
				t.Errorf("Counter = %d, want %d", f.Counter, st.want)
			}
		})
	}
}

func TestListOrderAndLatest(t *testing.T) {
	img := image(t, "pybricks-primehub-7.27.0.bin")
	e := newEnv(t, 0)
	adds := []struct{ model, version string }{
		{"b", "1.9.0"}, {"a", "1.10.0"}, {"a", "1.9.0"}, {"a", "1.10.0-rc.1"}, {"a", "1.2.3"}, {"a.b", "0.1.0"}, {"a-b", "2.0.0"},
	}
	for i, a := range adds {
		// Distinct prefixes of a real image, so each version has its own bytes.
		e.add(t, a.model, a.version, 0, img[:1000+i])
	}
	list, err := e.s.List()
	if err != nil {
		t.Fatal(err)
	}
	var got []string
	for _, f := range list {
		got = append(got, f.Model+"@"+f.Version)
	}
	want := []string{"a@1.2.3", "a@1.9.0", "a@1.10.0-rc.1", "a@1.10.0", "a-b@2.0.0", "a.b@0.1.0", "b@1.9.0"}
	if !slices.Equal(got, want) {
		t.Errorf("List order = %v, want %v", got, want)
	}

	tests := []struct {
		model   string
		want    string
		wantErr error
	}{
		{"a", "1.10.0", nil},
		{"b", "1.9.0", nil},
		{"c", "", firmware.ErrNotFound},
		{"a b", "", firmware.ErrBadModel},
	}
	for _, tc := range tests {
		t.Run(tc.model, func(t *testing.T) {
			f, err := e.s.Latest(tc.model)
			if !errors.Is(err, tc.wantErr) || f.Version != tc.want {
				t.Errorf("Latest(%q) = %q, %v; want %q, %v", tc.model, f.Version, err, tc.want, tc.wantErr)
			}
		})
	}
}

func TestConcurrentAdd(t *testing.T) {
	img := image(t, "pybricks-primehub-7.28.0.bin")
	e := newEnv(t, 0)
	const n = 4
	var wg sync.WaitGroup
	var mu sync.Mutex
	var counters []uint64
	createdSame := 0
	errs := make(chan error, 2*n)
	for i := range n {
		wg.Go(func() {
			f, _, err := e.s.Add(context.Background(), firmware.AddRequest{Model: "m", Version: fmt.Sprintf("1.%d.0", i), Body: bytes.NewReader(img[:10000+i])})
			if err != nil {
				errs <- err
				return
			}
			mu.Lock()
			counters = append(counters, f.Counter)
			mu.Unlock()
		})
		wg.Go(func() {
			_, created, err := e.s.Add(context.Background(), firmware.AddRequest{Model: "same", Version: "1.0.0", Body: bytes.NewReader(img)})
			if err != nil {
				errs <- err
				return
			}
			if created {
				mu.Lock()
				createdSame++
				mu.Unlock()
			}
		})
	}
	wg.Wait()
	close(errs)
	for err := range errs {
		t.Errorf("concurrent Add: %v", err)
	}
	slices.Sort(counters)
	if want := []uint64{1, 2, 3, 4}; !slices.Equal(counters, want) {
		t.Errorf("default counters of concurrent Adds = %v, want %v", counters, want)
	}
	if createdSame != 1 {
		t.Errorf("concurrent Adds of the same image created %d records, want 1", createdSame)
	}
	if got := len(e.artifacts(t)); got != n+1 {
		t.Errorf("artifact files = %d, want %d", got, n+1)
	}
	if got := e.temps(t); len(got) != 0 {
		t.Errorf("temp files left: %v", got)
	}
}

func TestOpenOptions(t *testing.T) {
	db := openDB(t)
	tests := []struct {
		name string
		opts firmware.Options
	}{
		{"no dir", firmware.Options{DB: db, SigningKey: testKey}},
		{"no db", firmware.Options{Dir: t.TempDir(), SigningKey: testKey}},
		{"negative max size", firmware.Options{Dir: t.TempDir(), DB: db, MaxSize: -1, SigningKey: testKey}},
		{"no key", firmware.Options{Dir: t.TempDir(), DB: db}},
		{"short signing key", firmware.Options{Dir: t.TempDir(), DB: db, SigningKey: testKey[:32]}},
		{"short public key", firmware.Options{Dir: t.TempDir(), DB: db, PublicKey: testPub()[:31]}},
		{"public key of another key", firmware.Options{Dir: t.TempDir(), DB: db, SigningKey: testKey, PublicKey: otherPub(t)}},
	}
	for _, tc := range tests {
		t.Run(tc.name, func(t *testing.T) {
			if s, err := firmware.Open(tc.opts); err == nil {
				s.Close()
				t.Errorf("Open succeeded, want an error")
			}
		})
	}
}

func TestClosed(t *testing.T) {
	img := image(t, "pybricks-primehub-7.27.0.bin")
	e := newEnv(t, 0)
	f := e.add(t, "primehub", "7.27.0", 0, img)
	if _, err := e.s.ReadAt(f.SHA256, make([]byte, 8), 0); err != nil {
		t.Fatal(err)
	}
	if err := e.s.Close(); err != nil {
		t.Fatalf("Close: %v", err)
	}
	if n := firmware.OpenHandles(e.s); n != 0 {
		t.Errorf("open handles after Close = %d, want 0", n)
	}
	checks := map[string]error{}
	_, checks["ReadAt"] = e.s.ReadAt(f.SHA256, make([]byte, 8), 0)
	_, checks["Size"] = e.s.Size(f.SHA256)
	_, checks["Path"] = e.s.Path(f.SHA256)
	_, _, checks["Add"] = e.s.Add(t.Context(), firmware.AddRequest{Model: "primehub", Version: "7.28.0", Body: bytes.NewReader(img)})
	checks["Delete"] = e.s.Delete("primehub", "7.27.0", nil)
	for name, err := range checks {
		if !errors.Is(err, firmware.ErrClosed) {
			t.Errorf("%s after Close: got %v, want ErrClosed", name, err)
		}
	}
}

func TestHashFile(t *testing.T) {
	sums, err := os.Open(filepath.Join(imageDir, "SHA256SUMS"))
	if errors.Is(err, fs.ErrNotExist) {
		t.Skipf("%s/SHA256SUMS not found; these tests need /work/shared/firmware", imageDir)
	}
	if err != nil {
		t.Fatal(err)
	}
	defer sums.Close()
	sc := bufio.NewScanner(sums)
	lines := 0
	for sc.Scan() {
		want, name, ok := strings.Cut(sc.Text(), "  ")
		if !ok {
			continue
		}
		lines++
		t.Run(name, func(t *testing.T) {
			got, size, err := firmware.HashFile(filepath.Join(imageDir, name))
			if err != nil {
				t.Fatal(err)
			}
			fi, err := os.Stat(filepath.Join(imageDir, name))
			if err != nil {
				t.Fatal(err)
			}
			if got != want || size != fi.Size() {
				t.Errorf("HashFile = %s, %d; want %s, %d", got, size, want, fi.Size())
			}
		})
	}
	if lines == 0 {
		t.Error("SHA256SUMS lists no files")
	}
	if _, _, err := firmware.HashFile(filepath.Join(t.TempDir(), "missing")); !errors.Is(err, fs.ErrNotExist) {
		t.Errorf("HashFile(missing) err = %v, want fs.ErrNotExist", err)
	}
}

func TestValidModel(t *testing.T) {
	tests := []struct {
		model string
		ok    bool
	}{
		{"primehub", true},
		{"ESP8266_v2.rev-b", true},
		{strings.Repeat("x", 64), true},
		{"", false},
		{strings.Repeat("x", 65), false},
		{"a/b", false},
		{"a b", false},
		{"café", false},
		{"a+b", false},
	}
	for _, tc := range tests {
		t.Run(fmt.Sprintf("%q", tc.model), func(t *testing.T) {
			err := firmware.ValidModel(tc.model)
			if got := err == nil; got != tc.ok {
				t.Errorf("ValidModel(%q) = %v, want ok %v", tc.model, err, tc.ok)
			}
			if err != nil && !errors.Is(err, firmware.ErrBadModel) {
				t.Errorf("ValidModel(%q) = %v, want ErrBadModel", tc.model, err)
			}
		})
	}
}

func TestAddRepairsMissingFile(t *testing.T) {
	img := image(t, "pybricks-primehub-7.27.0.bin")
	e := newEnv(t, 0)
	f := e.add(t, "primehub", "7.27.0", 0, img)
	p, err := e.s.Path(f.SHA256)
	if err != nil {
		t.Fatal(err)
	}
	if err := os.Remove(p); err != nil {
		t.Fatal(err)
	}
	got, created, err := e.s.Add(t.Context(), firmware.AddRequest{Model: "primehub", Version: "7.27.0", Body: bytes.NewReader(img)})
	if err != nil || created || got != f {
		t.Fatalf("Add again = %+v, %v, %v; want %+v, false, nil", got, created, err, f)
	}
	if sha, _, err := firmware.HashFile(p); err != nil || sha != f.SHA256 {
		t.Errorf("restored file hashes to %s, %v; want %s", sha, err, f.SHA256)
	}
}

func TestCorruptRecord(t *testing.T) {
	img := image(t, "pybricks-primehub-7.27.0.bin")
	e := newEnv(t, 0)
	e.add(t, "primehub", "7.27.0", 0, img)
	err := e.db.Update(func(tx *bbolt.Tx) error {
		return tx.Bucket([]byte("firmware")).Put([]byte("primehub\x001.0.0"), []byte("{not json"))
	})
	if err != nil {
		t.Fatal(err)
	}
	if _, err := e.s.List(); err == nil {
		t.Error("List with a corrupt record: got nil error, want one")
	}
	if _, err := e.s.Get("primehub", "1.0.0"); err == nil || errors.Is(err, firmware.ErrNotFound) {
		t.Errorf("Get of a corrupt record: got %v, want a decode error", err)
	}
	if _, err := e.s.Latest("primehub"); err == nil {
		t.Error("Latest with a corrupt record: got nil error, want one")
	}
	if _, _, err := e.s.Add(t.Context(), firmware.AddRequest{Model: "primehub", Version: "7.28.0", Body: bytes.NewReader(img[:100])}); err == nil {
		t.Error("Add with a default counter over a corrupt record: got nil error, want one")
	}
	if got := e.temps(t); len(got) != 0 {
		t.Errorf("temp files left: %v", got)
	}
	if got := len(e.artifacts(t)); got != 1 {
		t.Errorf("artifact files = %d, want 1", got)
	}
}
