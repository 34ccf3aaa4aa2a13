package firmware_test

import (
	"bytes"
	"crypto/ed25519"
	"crypto/rand"
	"encoding/base64"
	"encoding/json"
	"errors"
	"io"
	"slices"
	"strings"
	"testing"
	"time"

	"go.etcd.io/bbolt"

	"github.com/fota-dev/fota/firmware"
	"github.com/fota-dev/fota/protocol"
)

// openOffline opens a store over e's directory and DB that holds only the public key.
func (e *env) openOffline(t *testing.T) *firmware.Store {
	t.Helper()
	s, err := firmware.Open(firmware.Options{Dir: e.dir, DB: e.db, PublicKey: testPub()})
	if err != nil {
		t.Fatalf("Open offline: %v", err)
	}
	t.Cleanup(func() { s.Close() })
	return s
}

// countingReader counts the bytes read from it.
type countingReader struct {
	r io.Reader
	n int
}

func (c *countingReader) Read(p []byte) (int, error) {
	n, err := c.r.Read(p)
	c.n += n
	return n, err
}

func TestOnlineAddSigns(t *testing.T) {
	img := image(t, "pybricks-primehub-7.28.0.bin")
	e := newEnv(t, 0)
	if !e.s.CanSign() {
		t.Fatal("CanSign = false for a store with the signing key, want true")
	}
	expires := time.Now().Add(90 * 24 * time.Hour)
	f, created, err := e.s.Add(t.Context(), firmware.AddRequest{Model: "primehub", Version: "7.28", Expires: expires, Body: bytes.NewReader(img)})
	if err != nil || !created {
		t.Fatalf("Add = %v, created %v; want nil, true", err, created)
	}
	wantExp := expires.UTC().Truncate(time.Second)
	if !f.Expires.Equal(wantExp) || f.Expires.Location() != time.UTC {
		t.Errorf("Expires = %v, want %v in UTC", f.Expires, wantExp)
	}
	m := f.Manifest()
	if err := firmware.VerifySignature(m, testPub()); err != nil {
		t.Fatalf("VerifySignature(stored manifest) = %v, want nil", err)
	}
	if want := wantExp.Format(time.RFC3339); m.Expires != want {
		t.Errorf("manifest Expires = %q, want %q", m.Expires, want)
	}
	dev := firmware.DeviceState{Model: "primehub", Counter: 0}
	if err := firmware.VerifyManifest(m, testPub(), dev, time.Now()); err != nil {
		t.Errorf("VerifyManifest on a fresh device = %v, want nil", err)
	}
	if err := firmware.VerifyManifest(m, testPub(), dev, wantExp); !errors.Is(err, firmware.ErrExpired) {
		t.Errorf("VerifyManifest at the expiry = %v, want ErrExpired", err)
	}
	got, err := e.s.Get("primehub", "7.28.0")
	if err != nil || got != f {
		t.Errorf("Get = %+v, %v; want %+v", got, err, f)
	}

	// Adding it again changes nothing; adding it with a new expiry re-signs it.
	if again, created, err := e.s.Add(t.Context(), firmware.AddRequest{Model: "primehub", Version: "7.28.0", Body: bytes.NewReader(img)}); err != nil || created || again != f {
		t.Errorf("Add again = %+v, %v, %v; want the same record, false, nil", again, created, err)
	}
	later := wantExp.Add(30 * 24 * time.Hour)
	re, created, err := e.s.Add(t.Context(), firmware.AddRequest{Model: "primehub", Version: "7.28.0", Expires: later, Body: bytes.NewReader(img)})
	if err != nil || created {
		t.Fatalf("Add with a new expiry = %v, created %v; want nil, false", err, created)
	}
	if !re.Expires.Equal(later) || re.Signature == f.Signature || re.Counter != f.Counter || !re.Created.Equal(f.Created) {
		t.Errorf("re-signed record = %+v, want expiry %v, a new signature, the same counter and creation time", re, later)
	}
	if err := firmware.VerifySignature(re.Manifest(), testPub()); err != nil {
		t.Errorf("VerifySignature(re-signed) = %v, want nil", err)
	}
	if got, _ := e.s.Get("primehub", "7.28.0"); got != re {
		t.Errorf("Get after re-signing = %+v, want %+v", got, re)
	}

	// An expiry in the past is refused before the body is read.
	body := &countingReader{r: bytes.NewReader(img)}
	_, _, err = e.s.Add(t.Context(), firmware.AddRequest{Model: "primehub", Version: "7.29.0", Expires: time.Now().Add(-time.Minute), Body: body})
	if !errors.Is(err, firmware.ErrExpired) || body.n != 0 {
		t.Errorf("Add with a past expiry = %v after reading %d bytes, want ErrExpired after 0", err, body.n)
	}

	// Records are comparable and survive JSON, as the API sends them.
	b, err := json.Marshal(re)
	if err != nil {
		t.Fatal(err)
	}
	var decoded firmware.Firmware
	if err := json.Unmarshal(b, &decoded); err != nil || decoded != re {
		t.Errorf("JSON round trip = %+v, %v; want %+v", decoded, err, re)
	}
	if noExp, _ := json.Marshal(firmware.Firmware{}); strings.Contains(string(noExp), "expires") {
		t.Errorf("JSON of a record without expiry = %s, want no expires field", noExp)
	}
}

func TestOnlineAddAcceptsOfflineManifest(t *testing.T) {
	img := image(t, "pybricks-primehub-7.28.0.bin")
	e := newEnv(t, 0)
	m := mustSign(t, protocol.Manifest{V: 1, Model: "primehub", Version: "7.28.0", Counter: 40, Size: int64(len(img)), SHA256: shaOf(img)}, testKey)
	f, created, err := e.s.Add(t.Context(), firmware.AddRequest{Manifest: &m, Body: bytes.NewReader(img)})
	if err != nil || !created {
		t.Fatalf("Add = %v, created %v; want nil, true", err, created)
	}
	if f.Manifest() != m || f.Counter != 40 {
		t.Errorf("stored manifest = %+v, want the one given %+v", f.Manifest(), m)
	}
	// A manifest by another key is refused even though this store could sign.
	_, other, _ := ed25519.GenerateKey(rand.Reader)
	bad := mustSign(t, protocol.Manifest{V: 1, Model: "primehub", Version: "7.29.0", Counter: 41, Size: int64(len(img)), SHA256: shaOf(img)}, other)
	if _, _, err := e.s.Add(t.Context(), firmware.AddRequest{Manifest: &bad, Body: bytes.NewReader(img)}); !errors.Is(err, firmware.ErrBadSignature) {
		t.Errorf("Add with a foreign manifest = %v, want ErrBadSignature", err)
	}
}

func TestOfflineStore(t *testing.T) {
	v27, v28 := image(t, "pybricks-primehub-7.27.0.bin"), image(t, "pybricks-primehub-7.28.0.bin")
	e := &env{db: openDB(t), dir: t.TempDir()}
	e.s = e.openOffline(t)
	if e.s.CanSign() {
		t.Fatal("CanSign = true for an offline store, want false")
	}
	// What is already there must stay exactly as it is through every refusal.
	seed := mustSign(t, protocol.Manifest{V: 1, Model: "primehub", Version: "7.27.0", Counter: 2, Size: int64(len(v27)), SHA256: shaOf(v27)}, testKey)
	f27, created, err := e.s.Add(t.Context(), firmware.AddRequest{Manifest: &seed, Body: bytes.NewReader(v27)})
	if err != nil || !created {
		t.Fatalf("Add of a validly signed manifest = %v, created %v; want nil, true", err, created)
	}
	wantList := []firmware.Firmware{f27}
	wantArtifacts := e.artifacts(t)

	expires := time.Now().Add(24 * time.Hour).UTC().Truncate(time.Second).Format(time.RFC3339)
	base := protocol.Manifest{V: 1, Model: "primehub", Version: "7.28.0", Counter: 3, Size: int64(len(v28)), SHA256: shaOf(v28), Expires: expires}
	signed := func(edit func(*protocol.Manifest)) *protocol.Manifest {
		m := base
		edit(&m)
		m = mustSign(t, m, testKey)
		return &m
	}
	_, otherKey, _ := ed25519.GenerateKey(rand.Reader)

	tests := []struct {
		name     string
		req      firmware.AddRequest
		body     []byte
		wantErr  error
		wantRead bool // whether the body may be read before the refusal
	}{
		{"no manifest", firmware.AddRequest{Model: "primehub", Version: "7.28.0"}, v28, firmware.ErrUnsigned, false},
		{"manifest without signature", firmware.AddRequest{Manifest: &base}, v28, firmware.ErrUnsigned, false},
		{"signed by another key", firmware.AddRequest{Manifest: func() *protocol.Manifest {
			m := mustSign(t, base, otherKey)
			return &m
		}()}, v28, firmware.ErrBadSignature, false},
		{"counter raised after signing", firmware.AddRequest{Manifest: func() *protocol.Manifest {
			m := *signed(func(*protocol.Manifest) {})
			m.Counter = 30
			return &m
		}()}, v28, firmware.ErrBadSignature, false},
		{"expiry removed after signing", firmware.AddRequest{Manifest: func() *protocol.Manifest {
			m := *signed(func(*protocol.Manifest) {})
			m.Expires = ""
			return &m
		}()}, v28, firmware.ErrBadSignature, false},
		{"manifest of 7.28.0 with the bytes of 7.27.0", firmware.AddRequest{Manifest: signed(func(*protocol.Manifest) {})}, v27, firmware.ErrManifestMismatch, true},
		{"manifest with one byte changed in the image", firmware.AddRequest{Manifest: signed(func(*protocol.Manifest) {})}, func() []byte {
			b := append([]byte(nil), v28...)
			b[5000] ^= 1
			return b
		}(), firmware.ErrManifestMismatch, true},
		{"longer upload than signed", firmware.AddRequest{Manifest: signed(func(*protocol.Manifest) {})}, append(append([]byte(nil), v28...), 0), firmware.ErrManifestMismatch, true},
		{"upload under another model", firmware.AddRequest{Model: "primehub-b", Manifest: signed(func(*protocol.Manifest) {})}, v28, firmware.ErrManifestMismatch, false},
		{"upload under another version", firmware.AddRequest{Version: "7.28.1", Manifest: signed(func(*protocol.Manifest) {})}, v28, firmware.ErrManifestMismatch, false},
		{"another counter requested", firmware.AddRequest{Counter: 9, Manifest: signed(func(*protocol.Manifest) {})}, v28, firmware.ErrManifestMismatch, false},
		{"non-canonical version signed", firmware.AddRequest{Manifest: func() *protocol.Manifest {
			// Sign can no longer make one; another tool could.
			m := base
			m.Version = "v7.28"
			m.Signature = base64.StdEncoding.EncodeToString(ed25519.Sign(testKey, m.SigningBytes()))
			return &m
		}()}, v28, firmware.ErrBadManifest, false},
		{"expired manifest", firmware.AddRequest{Manifest: signed(func(m *protocol.Manifest) {
			m.Expires = time.Now().Add(-time.Minute).UTC().Format(time.RFC3339)
		})}, v28, firmware.ErrExpired, false},
		{"expiry with a zone offset", firmware.AddRequest{Manifest: signed(func(m *protocol.Manifest) {
			m.Expires = time.Now().Add(48 * time.Hour).In(time.FixedZone("CEST", 2*3600)).Format(time.RFC3339)
		})}, v28, firmware.ErrBadManifest, false},
		{"other expiry requested", firmware.AddRequest{Expires: time.Now().Add(time.Hour), Manifest: signed(func(*protocol.Manifest) {})}, v28, firmware.ErrManifestMismatch, false},
		{"delta manifest", firmware.AddRequest{Manifest: signed(func(m *protocol.Manifest) {
			m.Delta = &protocol.Delta{Base: shaOf(v27), PatchSHA256: shaOf(v28[:100]), PatchSize: 100, Format: "bsdiff"}
		})}, v28, firmware.ErrManifestMismatch, false},
		{"replacing a stored release's counter", firmware.AddRequest{Manifest: func() *protocol.Manifest {
			m := seed
			m.Counter, m.Signature = 5, ""
			m = mustSign(t, m, testKey)
			return &m
		}()}, v27, firmware.ErrConflict, true},
	}
	for _, tc := range tests {
		t.Run(tc.name, func(t *testing.T) {
			body := &countingReader{r: bytes.NewReader(tc.body)}
			tc.req.Body = body
			f, created, err := e.s.Add(t.Context(), tc.req)
			if !errors.Is(err, tc.wantErr) {
				t.Fatalf("Add = %v, want %v", err, tc.wantErr)
			}
			if created || f != (firmware.Firmware{}) {
				t.Errorf("Add = %+v, created %v; want zero, false", f, created)
			}
			if !tc.wantRead && body.n != 0 {
				t.Errorf("read %d bytes of the body before refusing, want 0", body.n)
			}
			if list, err := e.s.List(); err != nil || !slices.Equal(list, wantList) {
				t.Errorf("List = %+v, %v; want %+v", list, err, wantList)
			}
			if got := e.artifacts(t); !slices.Equal(got, wantArtifacts) {
				t.Errorf("artifacts = %v, want %v", got, wantArtifacts)
			}
			if got := e.temps(t); len(got) != 0 {
				t.Errorf("temp files left: %v", got)
			}
		})
	}

	// The valid offline-signed manifest is accepted, with the record rebuilding it exactly.
	good := signed(func(*protocol.Manifest) {})
	f28, created, err := e.s.Add(t.Context(), firmware.AddRequest{Model: "primehub", Version: "7.28", Notes: "signed offline", Manifest: good, Body: bytes.NewReader(v28)})
	if err != nil || !created {
		t.Fatalf("Add of a valid manifest = %v, created %v; want nil, true", err, created)
	}
	if f28.Manifest() != *good || f28.Counter != 3 || f28.Notes != "signed offline" {
		t.Errorf("stored %+v with manifest %+v, want manifest %+v", f28, f28.Manifest(), *good)
	}
	if err := firmware.VerifyManifest(f28.Manifest(), testPub(), firmware.DeviceState{Model: "primehub", Counter: 2, ImageSHA256: shaOf(v27)}, time.Now()); err != nil {
		t.Errorf("VerifyManifest(stored offline manifest) = %v, want nil", err)
	}
	if got, err := e.s.Get("primehub", "7.28.0"); err != nil || got != f28 {
		t.Errorf("Get = %+v, %v; want %+v", got, err, f28)
	}
	// The same again is a no-op; a re-signed manifest with a later expiry replaces the old one.
	if again, created, err := e.s.Add(t.Context(), firmware.AddRequest{Manifest: good, Body: bytes.NewReader(v28)}); err != nil || created || again != f28 {
		t.Errorf("Add again = %+v, %v, %v; want %+v, false, nil", again, created, err, f28)
	}
	extended := signed(func(m *protocol.Manifest) { m.Expires = time.Now().Add(1000 * time.Hour).UTC().Format(time.RFC3339) })
	re, created, err := e.s.Add(t.Context(), firmware.AddRequest{Manifest: extended, Body: bytes.NewReader(v28)})
	if err != nil || created || re.Manifest() != *extended || !re.Created.Equal(f28.Created) {
		t.Errorf("Add with a re-signed manifest = %+v, %v, %v; want manifest %+v, false, nil", re, created, err, *extended)
	}

	if _, err := e.s.SignManifest(base); !errors.Is(err, firmware.ErrUnsigned) {
		t.Errorf("SignManifest offline = %v, want ErrUnsigned", err)
	}
}

func TestSignManifest(t *testing.T) {
	e := newEnv(t, 0)
	m := protocol.Manifest{
		V: 1, Model: "primehub", Version: "7.28.0", Counter: 3, Size: 296756, SHA256: strings.Repeat("a1", 32),
		Delta: &protocol.Delta{Base: strings.Repeat("b2", 32), PatchSHA256: strings.Repeat("c3", 32), PatchSize: 22851, Format: "bsdiff"},
	}
	s, err := e.s.SignManifest(m)
	if err != nil {
		t.Fatalf("SignManifest: %v", err)
	}
	if err := firmware.VerifySignature(s, testPub()); err != nil {
		t.Errorf("VerifySignature(SignManifest) = %v, want nil", err)
	}
	m.Size = 0
	if _, err := e.s.SignManifest(m); !errors.Is(err, firmware.ErrBadManifest) {
		t.Errorf("SignManifest(malformed) = %v, want ErrBadManifest", err)
	}
}

// TestOpenSignsOldRecords covers records written before signing: a store with the key signs
// them at Open, one without leaves them alone.
func TestOpenSignsOldRecords(t *testing.T) {
	img := image(t, "pybricks-primehub-7.27.0.bin")
	e := newEnv(t, 0)
	f := e.add(t, "primehub", "7.27.0", 0, img)
	old := f
	old.Signature = ""
	err := e.db.Update(func(tx *bbolt.Tx) error {
		b, err := json.Marshal(old)
		if err != nil {
			return err
		}
		return tx.Bucket([]byte("firmware")).Put([]byte("primehub\x007.27.0"), b)
	})
	if err != nil {
		t.Fatal(err)
	}

	offline := e.openOffline(t)
	if got, err := offline.Get("primehub", "7.27.0"); err != nil || got != old {
		t.Errorf("Get via an offline store = %+v, %v; want the unsigned %+v", got, err, old)
	}
	online := e.open(t, 0)
	got, err := online.Get("primehub", "7.27.0")
	if err != nil {
		t.Fatal(err)
	}
	if got.Signature == "" || firmware.VerifySignature(got.Manifest(), testPub()) != nil {
		t.Errorf("record after opening with the key = %+v, want it signed by the release key", got)
	}
}
