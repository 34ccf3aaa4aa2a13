package main

import (
	"bytes"
	"context"
	"crypto/ed25519"
	"crypto/sha256"
	"encoding/hex"
	"encoding/json"
	"errors"
	"log/slog"
	"os"
	"path/filepath"
	"strings"
	"testing"
	"time"

	"go.etcd.io/bbolt"

	"github.com/fota-dev/fota/api"
	"github.com/fota-dev/fota/certs"
	"github.com/fota-dev/fota/certs/certstest"
	"github.com/fota-dev/fota/firmware"
	"github.com/fota-dev/fota/protocol"
)

// generateKeys runs 'fota keys generate' into a new directory and returns it.
func generateKeys(t *testing.T) string {
	t.Helper()
	dir := filepath.Join(t.TempDir(), "keys")
	var out bytes.Buffer
	if err := runKeys([]string{"generate", "--out", dir}, &out); err != nil {
		t.Fatalf("keys generate: %v", err)
	}
	return dir
}

func loadPub(t *testing.T, path string) ed25519.PublicKey {
	t.Helper()
	pub, err := firmware.LoadPublicKey(path)
	if err != nil {
		t.Fatal(err)
	}
	return pub
}

func TestKeysGenerate(t *testing.T) {
	dir := filepath.Join(t.TempDir(), "new", "keys")
	var out bytes.Buffer
	if err := runKeys([]string{"generate", "--out", dir}, &out); err != nil {
		t.Fatalf("keys generate: %v", err)
	}
	keyPath, pubPath := filepath.Join(dir, "release.key"), filepath.Join(dir, "release.pub")
	if got := out.String(); !strings.HasPrefix(got, "wrote "+keyPath+": the private release key") ||
		!strings.Contains(got, "\nwrote "+pubPath+": the public key") {
		t.Errorf("got %q, want it to name %s and %s", got, keyPath, pubPath)
	}
	priv, err := firmware.LoadPrivateKey(keyPath)
	if err != nil {
		t.Fatal(err)
	}
	if !loadPub(t, pubPath).Equal(priv.Public()) {
		t.Error("release.pub is not the public half of release.key")
	}
	keyBefore, _ := os.ReadFile(keyPath)

	tests := []struct {
		name      string
		args      []string
		wantUsage bool
		wantErr   string
	}{
		{"again into the same dir", []string{"generate", "--out", dir}, false,
			"keys generate: release key already exists: " + keyPath + "; devices pin the release key, so it is never replaced"},
		{"no --out", []string{"generate"}, true, "keys generate: --out is required"},
		{"no sub-command", nil, true, "keys: missing sub-command, one of: generate"},
		{"unknown sub-command", []string{"rotate"}, true, `keys: unknown sub-command "rotate", want one of: generate`},
		{"stray argument", []string{"generate", "--out", dir, "extra"}, true, `keys generate: unexpected argument "extra"`},
	}
	for _, tc := range tests {
		t.Run(tc.name, func(t *testing.T) {
			var out bytes.Buffer
			err := runKeys(tc.args, &out)
			if err == nil || err.Error() != tc.wantErr {
				t.Fatalf("got %v, want %q", err, tc.wantErr)
			}
			var u usageError
			if got := errors.As(err, &u); got != tc.wantUsage {
				t.Errorf("usage error: got %v, want %v", got, tc.wantUsage)
			}
			if out.Len() != 0 {
				t.Errorf("got stdout %q, want nothing", out.String())
			}
		})
	}
	if keyAfter, _ := os.ReadFile(keyPath); !bytes.Equal(keyAfter, keyBefore) {
		t.Error("release.key changed after the refusals")
	}
}

// storeAPI runs a real api.Server over a real firmware.Store on 127.0.0.1:0. pub alone means
// an offline store.
func storeAPI(t *testing.T, priv ed25519.PrivateKey, pub ed25519.PublicKey) (*adminAPI, *firmware.Store) {
	t.Helper()
	t.Setenv(serverEnv, "")
	t.Setenv(certsDirEnv, "")
	db, err := bbolt.Open(filepath.Join(t.TempDir(), "fota.db"), 0o600, &bbolt.Options{Timeout: time.Second})
	if err != nil {
		t.Fatal(err)
	}
	t.Cleanup(func() { db.Close() })
	store, err := firmware.Open(firmware.Options{Dir: t.TempDir(), DB: db, SigningKey: priv, PublicKey: pub})
	if err != nil {
		t.Fatal(err)
	}
	t.Cleanup(func() { store.Close() })
	ca := certstest.New(t)
	srv, err := api.New(api.Options{
		Addr: "127.0.0.1:0", TLS: ca.ServerTLS(t), Rollouts: &cliFakeRollouts{}, Firmware: store,
		Logger: slog.New(slog.DiscardHandler),
	})
	if err != nil {
		t.Fatal(err)
	}
	if err := srv.Start(); err != nil {
		t.Fatal(err)
	}
	t.Cleanup(func() {
		ctx, cancel := context.WithTimeout(context.Background(), 5*time.Second)
		defer cancel()
		if err := srv.Close(ctx); err != nil {
			t.Errorf("close api server: %v", err)
		}
	})
	return &adminAPI{url: "https://" + srv.Addr().String(), certs: ca.Dir}, store
}

func readManifestFile(t *testing.T, path string) protocol.Manifest {
	t.Helper()
	m, err := readManifest(path)
	if err != nil {
		t.Fatal(err)
	}
	return m
}

// sign runs 'fota firmware sign' and fails the test unless it succeeds.
func sign(t *testing.T, args ...string) string {
	t.Helper()
	var out, errOut bytes.Buffer
	if code := run(append([]string{"firmware", "sign"}, args...), &out, &errOut); code != 0 {
		t.Fatalf("firmware sign %v: exit %d, stderr %q", args, code, errOut.String())
	}
	return out.String()
}

// TestFirmwareSignAddOffline signs a release on a "signing machine" with no server, and adds
// it to a server that holds only the public key; the same server refuses whatever is not
// signed by that key, and keeps nothing of it.
func TestFirmwareSignAddOffline(t *testing.T) {
	keys := generateKeys(t)
	keyFile, pubFile := filepath.Join(keys, "release.key"), filepath.Join(keys, "release.pub")
	pub := loadPub(t, pubFile)
	a, store := storeAPI(t, nil, pub)
	img := demoImage(demoTo)
	imgFile := writeTestFile(t, "primehub-7.28.0.bin", img)
	sum := sha256.Sum256(img)
	sha := hex.EncodeToString(sum[:])
	dir := t.TempDir()

	manifest := filepath.Join(dir, "manifest.json")
	before := time.Now()
	out := sign(t, "--key", keyFile, "--model", "primehub", "--version", "v7.28", "--counter", "5", "--file", imgFile, "--expires", "90d", "--out", manifest)
	m := readManifestFile(t, manifest)
	wantOut := "signed primehub 7.28.0: 289.8 KiB, counter 5, sha256 " + sha + ", expires " + m.Expires + "; wrote " + manifest + "\n"
	if out != wantOut {
		t.Errorf("firmware sign printed %q, want %q", out, wantOut)
	}
	if err := firmware.VerifySignature(m, pub); err != nil {
		t.Fatalf("VerifySignature(signed manifest) = %v, want nil", err)
	}
	if m.Model != "primehub" || m.Version != "7.28.0" || m.Counter != 5 || m.Size != int64(len(img)) || m.SHA256 != sha || m.Delta != nil {
		t.Errorf("manifest = %+v, want primehub 7.28.0 counter 5 of the image", m)
	}
	exp, err := m.ExpiresAt()
	if want := before.Add(90 * 24 * time.Hour); err != nil || exp.Before(want.Add(-time.Second)) || exp.After(want.Add(time.Minute)) {
		t.Errorf("manifest expires %q, want about %v", m.Expires, want.UTC())
	}

	// What the offline server refuses; none of it may leave a record.
	otherKeys := generateKeys(t)
	forged := filepath.Join(dir, "forged.json")
	sign(t, "--key", filepath.Join(otherKeys, "release.key"), "--model", "primehub", "--version", "7.28.0", "--counter", "5", "--file", imgFile, "--out", forged)
	unsigned := filepath.Join(dir, "unsigned.json")
	um := m
	um.Signature = ""
	if b, err := json.Marshal(um); err != nil || os.WriteFile(unsigned, b, 0o600) != nil {
		t.Fatal(err)
	}
	tampered := append([]byte(nil), img...)
	tampered[len(tampered)/2] ^= 0x40
	tamperedFile := writeTestFile(t, "tampered.bin", tampered)
	otherImage := writeTestFile(t, "7.27.0.bin", demoImage(demoFrom))
	refusals := []struct {
		name     string
		args     []string
		wantCode int
		wantErr  string
	}{
		{"unsigned upload", []string{"--model", "primehub", "--version", "7.28.0", "--file", imgFile}, 1,
			"fota server: add firmware primehub 7.28.0: firmware manifest not signed: this server holds only the release public key (offline mode); sign a manifest with 'fota firmware sign' and add it with the image (400)"},
		{"manifest by an unknown key", []string{"--file", imgFile, "--manifest", forged}, 1, "bad manifest signature"},
		{"manifest without signature", []string{"--file", imgFile, "--manifest", unsigned}, 1, "is not signed; sign it with 'fota firmware sign'"},
		{"image changed after signing", []string{"--file", tamperedFile, "--manifest", manifest}, 1, "manifest does not match the firmware"},
		{"manifest of another image", []string{"--file", otherImage, "--manifest", manifest}, 1, "signs an image of 296756 bytes"},
		{"under another model", []string{"--model", "primehub-b", "--file", imgFile, "--manifest", manifest}, 1, `manifest model "primehub", upload "primehub-b"`},
		{"under another counter", []string{"--counter", "6", "--file", imgFile, "--manifest", manifest}, 1, "manifest counter 5, requested 6"},
		{"new expiry for a signed manifest", []string{"--expires", "1h", "--file", imgFile, "--manifest", manifest}, 2, "--expires cannot change a signed manifest"},
		{"missing manifest file", []string{"--file", imgFile, "--manifest", filepath.Join(dir, "nope.json")}, 1, "no such file or directory"},
	}
	for _, tc := range refusals {
		t.Run(tc.name, func(t *testing.T) {
			code, out, errOut := a.fota(t, append([]string{"firmware", "add"}, tc.args...)...)
			if code != tc.wantCode || !strings.Contains(errOut, tc.wantErr) || strings.Count(errOut, "\n") != 1 {
				t.Errorf("got exit %d, stderr %q; want %d with one line containing %q", code, errOut, tc.wantCode, tc.wantErr)
			}
			if out != "" {
				t.Errorf("got stdout %q, want nothing", out)
			}
			if list, err := store.List(); err != nil || len(list) != 0 {
				t.Errorf("store holds %+v, %v; want nothing", list, err)
			}
		})
	}

	code, out, errOut := a.fota(t, "firmware", "add", "--file", imgFile, "--manifest", manifest, "--notes", "signed offline")
	if code != 0 {
		t.Fatalf("firmware add --manifest: exit %d, stderr %q", code, errOut)
	}
	if want := "added firmware primehub 7.28.0: 289.8 KiB, counter 5, sha256 " + sha + ", expires " + m.Expires + "\n"; out != want {
		t.Errorf("firmware add printed %q, want %q", out, want)
	}
	f, err := store.Get("primehub", "7.28.0")
	if err != nil {
		t.Fatal(err)
	}
	if f.Manifest() != m || f.Notes != "signed offline" {
		t.Errorf("stored %+v with manifest %+v, want the signed manifest %+v", f, f.Manifest(), m)
	}
	code, out, errOut = a.fota(t, "firmware", "list")
	lines := strings.Split(strings.TrimSuffix(out, "\n"), "\n")
	if code != 0 || len(lines) != 2 || !strings.HasPrefix(lines[1], "primehub  7.28.0   5        yes     289.8 KiB  "+sha[:12]+"  ") {
		t.Errorf("firmware list: exit %d, stderr %q, stdout\n%s\nwant one row with counter 5, signed", code, errOut, out)
	}
}

func TestFirmwareSignErrors(t *testing.T) {
	t.Setenv(serverEnv, "")
	t.Setenv(certsDirEnv, "")
	keys := generateKeys(t)
	keyFile, pubFile := filepath.Join(keys, "release.key"), filepath.Join(keys, "release.pub")
	imgFile := writeTestFile(t, "fw.bin", demoImage(demoFrom))
	out := filepath.Join(t.TempDir(), "m.json")
	base := []string{"--key", keyFile, "--model", "primehub", "--version", "7.27.0", "--counter", "2", "--file", imgFile, "--out", out}
	with := func(flag, value string) []string {
		args := append([]string(nil), base...)
		for i := 0; i < len(args); i += 2 {
			if args[i] == flag {
				if value == "" {
					return append(args[:i], args[i+2:]...)
				}
				args[i+1] = value
				return args
			}
		}
		return append(args, flag, value)
	}
	tests := []struct {
		name     string
		args     []string
		wantCode int
		wantErr  string
	}{
		{"no key", with("--key", ""), 2, "firmware sign: --key is required"},
		{"no counter", with("--counter", ""), 2, "firmware sign: --counter is required and must be above 0"},
		{"zero counter", with("--counter", "0"), 2, "firmware sign: --counter is required and must be above 0"},
		{"no out", with("--out", ""), 2, "firmware sign: --out is required"},
		{"bad model", with("--model", "prime hub"), 2, "firmware sign: --model: invalid model name"},
		{"bad version", with("--version", "7.x"), 2, `firmware sign: bad version "7.x"`},
		{"bad expiry", with("--expires", "next week"), 2, `firmware sign: --expires: bad "next week"`},
		{"past expiry", with("--expires", "2001-01-01T00:00:00Z"), 2, "firmware sign: --expires: 2001-01-01T00:00:00Z has passed"},
		{"negative duration", with("--expires", "-5h"), 2, "want a duration of at least a second"},
		{"public key given as the key", with("--key", pubFile), 1, `PEM block "PUBLIC KEY", want "PRIVATE KEY"`},
		{"missing image", with("--file", filepath.Join(t.TempDir(), "nope.bin")), 1, "cannot read firmware file"},
		{"output dir missing", with("--out", filepath.Join(t.TempDir(), "no", "m.json")), 1, "no such file or directory"},
	}
	for _, tc := range tests {
		t.Run(tc.name, func(t *testing.T) {
			var stdout, stderr bytes.Buffer
			code := run(append([]string{"firmware", "sign"}, tc.args...), &stdout, &stderr)
			if code != tc.wantCode || !strings.Contains(stderr.String(), tc.wantErr) || strings.Count(stderr.String(), "\n") != 1 {
				t.Errorf("got exit %d, stderr %q; want %d with one line containing %q", code, stderr.String(), tc.wantCode, tc.wantErr)
			}
			if stdout.Len() != 0 {
				t.Errorf("got stdout %q, want nothing", stdout.String())
			}
			if _, err := os.Stat(out); err == nil {
				t.Errorf("%s written by a failed sign", out)
			}
		})
	}

	// --out - prints the manifest itself, and nothing else.
	var stdout, stderr bytes.Buffer
	if code := run(append([]string{"firmware", "sign"}, with("--out", "-")...), &stdout, &stderr); code != 0 {
		t.Fatalf("sign --out -: exit %d, stderr %q", code, stderr.String())
	}
	var m protocol.Manifest
	if err := json.Unmarshal(stdout.Bytes(), &m); err != nil {
		t.Fatalf("sign --out - printed %q, want a manifest: %v", stdout.String(), err)
	}
	if err := firmware.VerifySignature(m, loadPub(t, pubFile)); err != nil || m.Expires != "" {
		t.Errorf("manifest %+v: signature %v, want valid and no expiry", m, err)
	}
}

func TestParseExpiry(t *testing.T) {
	now := time.Date(2030, 1, 2, 3, 4, 5, 0, time.UTC)
	tests := []struct {
		in   string
		want time.Time
		err  bool
	}{
		{"2030-06-01T00:00:00Z", time.Date(2030, 6, 1, 0, 0, 0, 0, time.UTC), false},
		{"2030-06-01T02:00:00+02:00", time.Date(2030, 6, 1, 0, 0, 0, 0, time.UTC), false},
		{"720h", now.Add(720 * time.Hour), false},
		{"90d", now.AddDate(0, 0, 90), false},
		{"1s", now.Add(time.Second), false},
		{"2030-01-02T03:04:05Z", time.Time{}, true}, // now is not in the future
		{"0d", time.Time{}, true},
		{"500ms", time.Time{}, true},
		{"-1h", time.Time{}, true},
		{"1.5d", time.Time{}, true},
		{"99999999d", time.Time{}, true},
		{"", time.Time{}, true},
		{"tomorrow", time.Time{}, true},
	}
	for _, tc := range tests {
		t.Run(tc.in, func(t *testing.T) {
			got, err := parseExpiry(tc.in, now)
			if (err != nil) != tc.err || !got.Equal(tc.want) {
				t.Errorf("parseExpiry(%q) = %v, %v; want %v, error %v", tc.in, got, err, tc.want, tc.err)
			}
		})
	}
}

// TestServeReleaseKeys checks how 'fota serve' finds its release key in the data dir: it
// generates one in an empty dir, and with only release.pub runs offline, refusing a plain
// 'firmware add' and accepting an offline-signed one.
func TestServeReleaseKeys(t *testing.T) {
	t.Setenv(serverEnv, "")
	t.Setenv(certsDirEnv, "")
	certsDir := filepath.Join(t.TempDir(), "certs")
	if err := certs.Init(certsDir, certs.InitOptions{}); err != nil {
		t.Fatal(err)
	}
	serve := func(t *testing.T, data string) (*server, *adminAPI) {
		t.Helper()
		srv, err := startServer(serverConfig{
			DataDir: data, CertsDir: certsDir, MQTTAddr: "127.0.0.1:0", APIAddr: "127.0.0.1:0",
			Logger: slog.New(slog.DiscardHandler),
		})
		if err != nil {
			t.Fatalf("startServer: %v", err)
		}
		t.Cleanup(func() { srv.Close(context.Background()) })
		return srv, &adminAPI{url: "https://" + srv.api.Addr().String(), certs: certsDir}
	}
	img := writeTestFile(t, "fw.bin", demoImage(demoTo))

	t.Run("empty data dir: generates the key and signs", func(t *testing.T) {
		data := filepath.Join(t.TempDir(), "data")
		srv, a := serve(t, data)
		if want := filepath.Join(data, "release.pub"); srv.releasePub != want {
			t.Errorf("releasePub = %q, want %q", srv.releasePub, want)
		}
		priv, err := firmware.LoadPrivateKey(filepath.Join(data, "release.key"))
		if err != nil {
			t.Fatalf("release.key after start: %v", err)
		}
		pub := loadPub(t, srv.releasePub)
		if !pub.Equal(priv.Public()) {
			t.Error("release.pub is not release.key's")
		}
		code, _, errOut := a.fota(t, "firmware", "add", "--model", "primehub", "--version", "7.28.0", "--file", img, "--counter", "7", "--expires", "30d")
		if code != 0 {
			t.Fatalf("firmware add: exit %d, stderr %q", code, errOut)
		}
		f, err := srv.store.Get("primehub", "7.28.0")
		if err != nil {
			t.Fatal(err)
		}
		dev := firmware.DeviceState{Model: "primehub", Counter: 6}
		if err := firmware.VerifyManifest(f.Manifest(), pub, dev, time.Now()); err != nil || f.Counter != 7 || f.Expires.IsZero() {
			t.Errorf("stored manifest %+v: VerifyManifest = %v; want a valid manifest with counter 7 and an expiry", f.Manifest(), err)
		}
	})

	t.Run("only release.pub: offline", func(t *testing.T) {
		keys := generateKeys(t)
		data := filepath.Join(t.TempDir(), "data")
		if err := os.MkdirAll(data, 0o700); err != nil {
			t.Fatal(err)
		}
		pubPEM, err := os.ReadFile(filepath.Join(keys, "release.pub"))
		if err != nil {
			t.Fatal(err)
		}
		if err := os.WriteFile(filepath.Join(data, "release.pub"), pubPEM, 0o644); err != nil {
			t.Fatal(err)
		}
		srv, a := serve(t, data)
		if _, err := os.Stat(filepath.Join(data, "release.key")); !errors.Is(err, os.ErrNotExist) {
			t.Errorf("release.key in an offline data dir: stat err %v, want not exist", err)
		}
		if srv.store.CanSign() {
			t.Error("store can sign with only release.pub, want offline")
		}
		code, _, errOut := a.fota(t, "firmware", "add", "--model", "primehub", "--version", "7.28.0", "--file", img)
		if code != 1 || !strings.Contains(errOut, "firmware manifest not signed") {
			t.Errorf("plain firmware add: exit %d, stderr %q; want 1, not signed", code, errOut)
		}
		if list, err := srv.store.List(); err != nil || len(list) != 0 {
			t.Errorf("store holds %+v, %v; want nothing", list, err)
		}
		manifest := filepath.Join(t.TempDir(), "m.json")
		sign(t, "--key", filepath.Join(keys, "release.key"), "--model", "primehub", "--version", "7.28.0", "--counter", "3", "--file", img, "--out", manifest)
		if code, _, errOut := a.fota(t, "firmware", "add", "--file", img, "--manifest", manifest); code != 0 {
			t.Fatalf("firmware add --manifest: exit %d, stderr %q", code, errOut)
		}
		f, err := srv.store.Get("primehub", "7.28.0")
		if err != nil || f.Manifest() != readManifestFile(t, manifest) {
			t.Errorf("stored %+v, %v; want the offline-signed manifest", f, err)
		}
	})

	t.Run("release.pub of another key", func(t *testing.T) {
		data := generateKeys(t)
		other := generateKeys(t)
		pubPEM, err := os.ReadFile(filepath.Join(other, "release.pub"))
		if err != nil {
			t.Fatal(err)
		}
		if err := os.WriteFile(filepath.Join(data, "release.pub"), pubPEM, 0o644); err != nil {
			t.Fatal(err)
		}
		_, err = startServer(serverConfig{DataDir: data, CertsDir: certsDir, MQTTAddr: "127.0.0.1:0", APIAddr: "127.0.0.1:0", Logger: slog.New(slog.DiscardHandler)})
		if err == nil || !strings.Contains(err.Error(), "does not belong to") {
			t.Errorf("startServer = %v, want an error saying release.pub does not belong to release.key", err)
		}
	})
}
