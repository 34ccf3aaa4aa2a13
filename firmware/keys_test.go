package firmware_test

import (
	"bytes"
	"crypto/ecdsa"
	"crypto/ed25519"
	"crypto/elliptic"
	"crypto/rand"
	"crypto/rsa"
	"crypto/x509"
	"encoding/pem"
	"errors"
	"io/fs"
	"os"
	"path/filepath"
	"slices"
	"strings"
	"testing"

	"github.com/fota-dev/fota/firmware"
)

func otherPub(t *testing.T) ed25519.PublicKey {
	t.Helper()
	pub, _, err := ed25519.GenerateKey(rand.Reader)
	if err != nil {
		t.Fatal(err)
	}
	return pub
}

func writePEM(t *testing.T, dir, name, typ string, der []byte) string {
	t.Helper()
	p := filepath.Join(dir, name)
	if err := os.WriteFile(p, pem.EncodeToMemory(&pem.Block{Type: typ, Bytes: der}), 0o600); err != nil {
		t.Fatal(err)
	}
	return p
}

func dirNames(t *testing.T, dir string) []string {
	t.Helper()
	entries, err := os.ReadDir(dir)
	if err != nil {
		t.Fatal(err)
	}
	var names []string
	for _, e := range entries {
		names = append(names, e.Name())
	}
	return names
}

func TestGenerateKeyRoundTrip(t *testing.T) {
	dir := filepath.Join(t.TempDir(), "keys") // GenerateKey creates it
	if err := firmware.GenerateKey(dir); err != nil {
		t.Fatalf("GenerateKey: %v", err)
	}
	if got, want := dirNames(t, dir), []string{"release.key", "release.pub"}; !slices.Equal(got, want) {
		t.Errorf("files in key dir = %v, want %v (no temp files)", got, want)
	}
	for _, tc := range []struct {
		path string
		mode fs.FileMode
	}{
		{dir, fs.ModeDir | 0o700},
		{filepath.Join(dir, firmware.PrivateKeyFile), 0o600},
		{filepath.Join(dir, firmware.PublicKeyFile), 0o644},
	} {
		fi, err := os.Stat(tc.path)
		if err != nil {
			t.Fatal(err)
		}
		if fi.Mode() != tc.mode {
			t.Errorf("mode of %s = %v, want %v", filepath.Base(tc.path), fi.Mode(), tc.mode)
		}
	}
	raw, err := os.ReadFile(filepath.Join(dir, firmware.PrivateKeyFile))
	if err != nil {
		t.Fatal(err)
	}
	if !bytes.HasPrefix(raw, []byte("-----BEGIN PRIVATE KEY-----\n")) {
		t.Errorf("release.key starts %q, want a PEM PRIVATE KEY block", raw[:min(len(raw), 30)])
	}
	priv, err := firmware.LoadPrivateKey(filepath.Join(dir, firmware.PrivateKeyFile))
	if err != nil {
		t.Fatalf("LoadPrivateKey: %v", err)
	}
	pub, err := firmware.LoadPublicKey(filepath.Join(dir, firmware.PublicKeyFile))
	if err != nil {
		t.Fatalf("LoadPublicKey: %v", err)
	}
	if !pub.Equal(priv.Public()) {
		t.Errorf("release.pub is not the public half of release.key")
	}
	m, err := firmware.Sign(testManifest(), priv)
	if err != nil {
		t.Fatalf("Sign: %v", err)
	}
	if err := firmware.VerifySignature(m, pub); err != nil {
		t.Errorf("VerifySignature with the loaded public key = %v, want nil", err)
	}

	// A second key pair is a different key.
	dir2 := t.TempDir()
	if err := firmware.GenerateKey(dir2); err != nil {
		t.Fatal(err)
	}
	pub2, err := firmware.LoadPublicKey(filepath.Join(dir2, firmware.PublicKeyFile))
	if err != nil {
		t.Fatal(err)
	}
	if pub2.Equal(pub) {
		t.Error("two GenerateKey calls made the same key")
	}
}

func TestGenerateKeyRefusesOverwrite(t *testing.T) {
	for _, existing := range [][]string{{"release.key"}, {"release.pub"}, {"release.key", "release.pub"}} {
		t.Run(strings.Join(existing, "+"), func(t *testing.T) {
			dir := t.TempDir()
			for _, name := range existing {
				if err := os.WriteFile(filepath.Join(dir, name), []byte("precious "+name), 0o600); err != nil {
					t.Fatal(err)
				}
			}
			err := firmware.GenerateKey(dir)
			if !errors.Is(err, firmware.ErrKeyExists) {
				t.Fatalf("GenerateKey = %v, want ErrKeyExists", err)
			}
			if !strings.Contains(err.Error(), existing[0]) {
				t.Errorf("error %q does not name %s", err, existing[0])
			}
			if got := dirNames(t, dir); !slices.Equal(got, existing) {
				t.Errorf("files after refusal = %v, want %v", got, existing)
			}
			for _, name := range existing {
				if b, _ := os.ReadFile(filepath.Join(dir, name)); string(b) != "precious "+name {
					t.Errorf("%s = %q after refusal, want it unchanged", name, b)
				}
			}
		})
	}
}

func TestLoadKeyErrors(t *testing.T) {
	dir := t.TempDir()
	if err := firmware.GenerateKey(dir); err != nil {
		t.Fatal(err)
	}
	privPath, pubPath := filepath.Join(dir, firmware.PrivateKeyFile), filepath.Join(dir, firmware.PublicKeyFile)
	rsaKey, err := rsa.GenerateKey(rand.Reader, 2048)
	if err != nil {
		t.Fatal(err)
	}
	rsaDER, err := x509.MarshalPKCS8PrivateKey(rsaKey)
	if err != nil {
		t.Fatal(err)
	}
	ecKey, err := ecdsa.GenerateKey(elliptic.P256(), rand.Reader)
	if err != nil {
		t.Fatal(err)
	}
	ecPubDER, err := x509.MarshalPKIXPublicKey(&ecKey.PublicKey)
	if err != nil {
		t.Fatal(err)
	}
	notPEM := filepath.Join(dir, "notpem")
	if err := os.WriteFile(notPEM, []byte("ed25519 key, honest"), 0o600); err != nil {
		t.Fatal(err)
	}
	huge := filepath.Join(dir, "huge")
	if err := os.WriteFile(huge, bytes.Repeat([]byte("A"), 1<<20), 0o600); err != nil {
		t.Fatal(err)
	}

	tests := []struct {
		name    string
		private bool // LoadPrivateKey, else LoadPublicKey
		path    string
		wantErr error
		wantMsg string
	}{
		{"private: missing", true, filepath.Join(dir, "nope.key"), fs.ErrNotExist, "no such file"},
		{"public: missing", false, filepath.Join(dir, "nope.pub"), fs.ErrNotExist, "no such file"},
		{"private: not PEM", true, notPEM, firmware.ErrBadKey, "no PEM block"},
		{"private: given the public key", true, pubPath, firmware.ErrBadKey, `PEM block "PUBLIC KEY", want "PRIVATE KEY"`},
		{"public: given the private key", false, privPath, firmware.ErrBadKey, `PEM block "PRIVATE KEY", want "PUBLIC KEY"`},
		{"private: RSA", true, writePEM(t, dir, "rsa.key", "PRIVATE KEY", rsaDER), firmware.ErrBadKey, "RSA private key"},
		{"public: ECDSA", false, writePEM(t, dir, "ec.pub", "PUBLIC KEY", ecPubDER), firmware.ErrBadKey, "ECDSA public key"},
		{"private: garbage DER", true, writePEM(t, dir, "junk.key", "PRIVATE KEY", []byte("junk")), firmware.ErrBadKey, "junk.key"},
		{"public: garbage DER", false, writePEM(t, dir, "junk.pub", "PUBLIC KEY", []byte("junk")), firmware.ErrBadKey, "junk.pub"},
		{"private: OpenSSH-style type", true, writePEM(t, dir, "ssh.key", "OPENSSH PRIVATE KEY", []byte("x")), firmware.ErrBadKey, `"OPENSSH PRIVATE KEY"`},
		{"public: huge file", false, huge, firmware.ErrBadKey, "larger than"},
	}
	for _, tc := range tests {
		t.Run(tc.name, func(t *testing.T) {
			var err error
			if tc.private {
				var k ed25519.PrivateKey
				k, err = firmware.LoadPrivateKey(tc.path)
				if k != nil {
					t.Errorf("got a key, want nil")
				}
			} else {
				var k ed25519.PublicKey
				k, err = firmware.LoadPublicKey(tc.path)
				if k != nil {
					t.Errorf("got a key, want nil")
				}
			}
			if !errors.Is(err, tc.wantErr) || !strings.Contains(err.Error(), tc.wantMsg) {
				t.Errorf("got %v, want %v containing %q", err, tc.wantErr, tc.wantMsg)
			}
		})
	}
}

func TestOpenKeys(t *testing.T) {
	pair := func(t *testing.T) (dir string, priv, pub []byte) {
		t.Helper()
		dir = t.TempDir()
		if err := firmware.GenerateKey(dir); err != nil {
			t.Fatal(err)
		}
		priv, _ = os.ReadFile(filepath.Join(dir, firmware.PrivateKeyFile))
		pub, _ = os.ReadFile(filepath.Join(dir, firmware.PublicKeyFile))
		return dir, priv, pub
	}
	_, otherPriv, otherPubPEM := pair(t)

	tests := []struct {
		name       string
		files      map[string][]byte // nil: an empty dir
		wantOnline bool
		wantGen    bool
		wantErr    string
	}{
		{name: "empty dir: generate", wantOnline: true, wantGen: true},
		{name: "both files: online", files: map[string][]byte{"release.key": otherPriv, "release.pub": otherPubPEM}, wantOnline: true},
		{name: "public key only: offline", files: map[string][]byte{"release.pub": otherPubPEM}},
		{name: "private key only: public key rewritten", files: map[string][]byte{"release.key": otherPriv}, wantOnline: true},
		{name: "public key of another pair", files: map[string][]byte{"release.key": otherPriv, "release.pub": mustPair(t)}, wantErr: "does not belong to"},
		{name: "bad private key", files: map[string][]byte{"release.key": otherPubPEM}, wantErr: "want \"PRIVATE KEY\""},
		{name: "bad public key", files: map[string][]byte{"release.pub": []byte("nope")}, wantErr: "no PEM block"},
	}
	for _, tc := range tests {
		t.Run(tc.name, func(t *testing.T) {
			dir := t.TempDir()
			for name, b := range tc.files {
				if err := os.WriteFile(filepath.Join(dir, name), b, 0o600); err != nil {
					t.Fatal(err)
				}
			}
			k, err := firmware.OpenKeys(dir)
			if tc.wantErr != "" {
				if err == nil || !strings.Contains(err.Error(), tc.wantErr) {
					t.Fatalf("OpenKeys = %v, want an error containing %q", err, tc.wantErr)
				}
				return
			}
			if err != nil {
				t.Fatalf("OpenKeys: %v", err)
			}
			if got := k.Private != nil; got != tc.wantOnline {
				t.Errorf("holds the private key: %v, want %v", got, tc.wantOnline)
			}
			if k.Generated != tc.wantGen {
				t.Errorf("Generated = %v, want %v", k.Generated, tc.wantGen)
			}
			if want := filepath.Join(dir, firmware.PublicKeyFile); k.PublicPath != want {
				t.Errorf("PublicPath = %s, want %s", k.PublicPath, want)
			}
			pub, err := firmware.LoadPublicKey(k.PublicPath)
			if err != nil {
				t.Fatalf("LoadPublicKey(%s): %v", k.PublicPath, err)
			}
			if !pub.Equal(k.Public) {
				t.Error("Public is not the key in release.pub")
			}
			if k.Private != nil && !k.Public.Equal(k.Private.Public()) {
				t.Error("Public is not the public half of Private")
			}
			if pemPub, ok := tc.files["release.pub"]; ok {
				if b, _ := os.ReadFile(k.PublicPath); !bytes.Equal(b, pemPub) {
					t.Error("release.pub was rewritten, want it left alone")
				}
			}
			// Opening again finds the same keys and generates nothing.
			again, err := firmware.OpenKeys(dir)
			if err != nil || again.Generated || !again.Public.Equal(k.Public) {
				t.Errorf("second OpenKeys = generated %v, same key %v, %v; want false, true, nil", again.Generated, again.Public.Equal(k.Public), err)
			}
		})
	}
}

// mustPair returns the PEM public key of a fresh pair.
func mustPair(t *testing.T) []byte {
	t.Helper()
	dir := t.TempDir()
	if err := firmware.GenerateKey(dir); err != nil {
		t.Fatal(err)
	}
	b, err := os.ReadFile(filepath.Join(dir, firmware.PublicKeyFile))
	if err != nil {
		t.Fatal(err)
	}
	return b
}
