package api

import (
	"bytes"
	"context"
	"crypto/ed25519"
	"crypto/rand"
	"crypto/sha256"
	"encoding/base64"
	"encoding/hex"
	"net/http"
	"net/url"
	"path/filepath"
	"reflect"
	"strings"
	"testing"
	"time"

	"go.etcd.io/bbolt"

	"github.com/fota-dev/fota/firmware"
	"github.com/fota-dev/fota/protocol"
)

func hexSHA(b []byte) string {
	s := sha256.Sum256(b)
	return hex.EncodeToString(s[:])
}

func TestUploadPassesManifest(t *testing.T) {
	e := start(t)
	c := e.admin(t)
	body := []byte("signed image bytes")
	m := protocol.Manifest{
		V: 1, Model: "primehub", Version: "1.2.0", Counter: 7, Size: int64(len(body)), SHA256: hexSHA(body),
		Expires: "2031-01-02T03:04:05Z", Signature: strings.Repeat("A", 86) + "==",
	}
	exp := time.Date(2031, 1, 2, 3, 4, 5, 0, time.FixedZone("CET", 3600))
	_, _, err := c.UploadFirmware(context.Background(), FirmwareUpload{Notes: "n", Counter: 7, Expires: exp, Manifest: &m, Body: bytes.NewReader(body)})
	if err != nil {
		t.Fatalf("UploadFirmware: %v", err)
	}
	e.store.mu.Lock()
	got := e.store.last
	e.store.mu.Unlock()
	if got.Model != "primehub" || got.Version != "1.2.0" || got.Notes != "n" || got.Counter != 7 || !got.Expires.Equal(exp) {
		t.Errorf("store got %+v, want model and version from the manifest, notes n, counter 7, expires %v", got, exp)
	}
	if got.Manifest == nil || !reflect.DeepEqual(*got.Manifest, m) {
		t.Errorf("store got manifest %+v, want %+v", got.Manifest, m)
	}

	// A plain add carries no manifest, counter or expiry.
	if _, _, err := c.AddFirmware(context.Background(), "primehub", "1.3.0", "", strings.NewReader("x")); err != nil {
		t.Fatal(err)
	}
	e.store.mu.Lock()
	got = e.store.last
	e.store.mu.Unlock()
	if got.Manifest != nil || got.Counter != 0 || !got.Expires.IsZero() {
		t.Errorf("store got %+v for a plain add, want no manifest, counter or expiry", got)
	}
}

func TestUploadBadParameters(t *testing.T) {
	e := start(t)
	hc := &http.Client{Transport: &http.Transport{TLSClientConfig: e.ca.AdminTLS(t)}}
	defer hc.CloseIdleConnections()
	b64 := func(s string) string { return base64.StdEncoding.EncodeToString([]byte(s)) }
	good := `{"v":1,"model":"primehub","version":"1.0.0","counter":1,"size":3,"sha256":"` + hexSHA([]byte("img")) + `","sig":"x"}`
	tests := []struct {
		name    string
		query   string
		headers []string
		wantMsg string
	}{
		{"zero counter", "model=m&version=1.0.0&counter=0", nil, `bad counter "0": want a positive integer`},
		{"negative counter", "model=m&version=1.0.0&counter=-1", nil, `bad counter "-1": want a positive integer`},
		{"counter not a number", "model=m&version=1.0.0&counter=two", nil, `bad counter "two": want a positive integer`},
		{"expires not RFC 3339", "model=m&version=1.0.0&expires=" + url.QueryEscape("next week"), nil, `bad expires "next week"`},
		{"manifest not base64", "", []string{"{not base64}"}, "bad Fota-Manifest header: want the base64 of a manifest's JSON"},
		{"manifest not JSON", "", []string{b64("model=primehub")}, "bad Fota-Manifest header: manifest JSON"},
		{"manifest with an unknown field", "", []string{b64(`{"v":1,"model":"m","trusted":true}`)}, `unknown field "trusted"`},
		{"two manifests in one header", "", []string{b64(good + good)}, "want one JSON manifest"},
		{"two manifest headers", "", []string{b64(good), b64(good)}, "2 Fota-Manifest headers, want one"},
		{"huge manifest header", "", []string{strings.Repeat("A", 12<<10)}, "larger than"},
		{"manifest naming a bad model", "", []string{b64(`{"v":1,"model":"a/b","version":"1.0.0"}`)}, "invalid model name"},
	}
	for _, tt := range tests {
		t.Run(tt.name, func(t *testing.T) {
			req, err := http.NewRequest(http.MethodPost, e.url+pathFirmware+"?"+tt.query, strings.NewReader("img"))
			if err != nil {
				t.Fatal(err)
			}
			for _, h := range tt.headers {
				req.Header.Add(headerManifest, h)
			}
			resp, err := hc.Do(req)
			if err != nil {
				t.Fatal(err)
			}
			err = responseError(resp)
			resp.Body.Close()
			status, msg := statusOf(t, err)
			if status != http.StatusBadRequest || !strings.Contains(msg, tt.wantMsg) {
				t.Errorf("got %d %q, want 400 containing %q", status, msg, tt.wantMsg)
			}
		})
	}
	if n := e.store.calls.Load(); n != 0 {
		t.Errorf("store called %d times, want 0", n)
	}
}

// sizedCounter is a body with a known length that counts what is read from it.
type sizedCounter struct {
	r *bytes.Reader
	n int
}

func (s *sizedCounter) Read(p []byte) (int, error) {
	n, err := s.r.Read(p)
	s.n += n
	return n, err
}

func (s *sizedCounter) Len() int { return s.r.Len() }

// realStore opens a firmware.Store in a temp dir; priv nil means offline mode.
func realStore(t *testing.T, priv ed25519.PrivateKey, pub ed25519.PublicKey) *firmware.Store {
	t.Helper()
	db, err := bbolt.Open(filepath.Join(t.TempDir(), "fota.db"), 0o600, &bbolt.Options{Timeout: time.Second})
	if err != nil {
		t.Fatal(err)
	}
	t.Cleanup(func() { db.Close() })
	s, err := firmware.Open(firmware.Options{Dir: t.TempDir(), DB: db, SigningKey: priv, PublicKey: pub})
	if err != nil {
		t.Fatal(err)
	}
	t.Cleanup(func() { s.Close() })
	return s
}

func TestOfflineStoreOverAPI(t *testing.T) {
	pub, priv, err := ed25519.GenerateKey(rand.Reader)
	if err != nil {
		t.Fatal(err)
	}
	store := realStore(t, nil, pub)
	e := start(t, func(o *Options) { o.Firmware = store })
	c := e.admin(t)
	ctx := context.Background()
	img := bytes.Repeat([]byte("firmware "), 50_000)

	// Refused from the query and the header alone: the image is never sent.
	body := &sizedCounter{r: bytes.NewReader(img)}
	_, _, err = c.AddFirmware(ctx, "primehub", "1.0.0", "", body)
	status, msg := statusOf(t, err)
	if status != http.StatusBadRequest || !strings.Contains(msg, "not signed") || !strings.Contains(msg, "fota firmware sign") {
		t.Errorf("unsigned upload: got %d %q, want 400 saying to sign it with 'fota firmware sign'", status, msg)
	}
	if body.n != 0 {
		t.Errorf("client sent %d bytes of a refused image, want 0", body.n)
	}

	m := protocol.Manifest{V: 1, Model: "primehub", Version: "1.0.0", Counter: 4, Size: int64(len(img)), SHA256: hexSHA(img)}
	_, otherKey, _ := ed25519.GenerateKey(rand.Reader)
	forged, err := firmware.Sign(m, otherKey)
	if err != nil {
		t.Fatal(err)
	}
	body = &sizedCounter{r: bytes.NewReader(img)}
	_, _, err = c.UploadFirmware(ctx, FirmwareUpload{Manifest: &forged, Body: body})
	if status, msg := statusOf(t, err); status != http.StatusBadRequest || !strings.Contains(msg, "bad manifest signature") || body.n != 0 {
		t.Errorf("forged manifest: got %d %q after sending %d bytes, want 400 bad signature after 0", status, msg, body.n)
	}

	signed, err := firmware.Sign(m, priv)
	if err != nil {
		t.Fatal(err)
	}
	other := append(bytes.Clone(img[:len(img)-1]), '!')
	_, _, err = c.UploadFirmware(ctx, FirmwareUpload{Manifest: &signed, Body: bytes.NewReader(other)})
	if status, msg := statusOf(t, err); status != http.StatusBadRequest || !strings.Contains(msg, "manifest does not match") {
		t.Errorf("manifest of other bytes: got %d %q, want 400 manifest does not match", status, msg)
	}
	if list, err := c.ListFirmware(ctx); err != nil || len(list) != 0 {
		t.Fatalf("list after refusals = %+v, %v; want empty", list, err)
	}

	f, created, err := c.UploadFirmware(ctx, FirmwareUpload{Manifest: &signed, Body: bytes.NewReader(img)})
	if err != nil || !created {
		t.Fatalf("signed upload: %v, created %v; want nil, true", err, created)
	}
	if f.Manifest() != signed {
		t.Errorf("stored manifest %+v, want %+v", f.Manifest(), signed)
	}
	list, err := c.ListFirmware(ctx)
	if err != nil || len(list) != 1 || list[0] != f {
		t.Errorf("list = %+v, %v; want [%+v]", list, err, f)
	}
}

func TestOnlineStoreOverAPI(t *testing.T) {
	pub, priv, err := ed25519.GenerateKey(rand.Reader)
	if err != nil {
		t.Fatal(err)
	}
	e := start(t, func(o *Options) { o.Firmware = realStore(t, priv, nil) })
	exp := time.Now().Add(time.Hour).UTC().Truncate(time.Second)
	f, created, err := e.admin(t).UploadFirmware(context.Background(), FirmwareUpload{
		Model: "primehub", Version: "1.0.0", Counter: 9, Expires: exp, Body: strings.NewReader("image"),
	})
	if err != nil || !created {
		t.Fatalf("UploadFirmware = %v, created %v", err, created)
	}
	if f.Counter != 9 || !f.Expires.Equal(exp) {
		t.Errorf("got counter %d, expires %v; want 9, %v", f.Counter, f.Expires, exp)
	}
	if err := firmware.VerifySignature(f.Manifest(), pub); err != nil {
		t.Errorf("VerifySignature(manifest from the API) = %v, want nil", err)
	}
	_, _, err = e.admin(t).UploadFirmware(context.Background(), FirmwareUpload{
		Model: "primehub", Version: "1.1.0", Expires: time.Now().Add(-time.Hour), Body: strings.NewReader("image 2"),
	})
	if status, msg := statusOf(t, err); status != http.StatusBadRequest || !strings.Contains(msg, "manifest expired") {
		t.Errorf("upload with a past expiry: got %d %q, want 400 manifest expired", status, msg)
	}
}
