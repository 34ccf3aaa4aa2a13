package certs_test

import (
	"crypto/tls"
	"crypto/x509"
	"crypto/x509/pkix"
	"encoding/json"
	"errors"
	"os"
	"path/filepath"
	"slices"
	"strings"
	"testing"

	"github.com/fota-dev/fota/certs"
	"github.com/fota-dev/fota/certs/certstest"
)

// adminTLS returns the client configuration of admin name from the certs dir.
func adminTLS(t *testing.T, dir, name string) *tls.Config {
	t.Helper()
	certPath, keyPath, err := certs.AdminPaths(dir, name)
	if err != nil {
		t.Fatal(err)
	}
	cfg, err := certs.ClientTLS(dir, certPath, keyPath)
	if err != nil {
		t.Fatal(err)
	}
	cfg.ServerName = "localhost"
	return cfg
}

func TestAdminName(t *testing.T) {
	ca := certstest.New(t)
	if err := certs.IssueAdminFiles(ca.Dir, "ops-2"); err != nil {
		t.Fatal(err)
	}
	device, err := ca.Authority.DeviceTLS("admin", certs.IssueOptions{})
	if err != nil {
		t.Fatal(err)
	}
	for _, tc := range []struct {
		name     string
		cert     *x509.Certificate
		wantName string
		wantErr  error
	}{
		{"made by init", parseCertFile(t, filepath.Join(ca.Dir, certs.AdminCertFile)), "admin", nil},
		{"issued", parseCertFile(t, filepath.Join(ca.Dir, certs.AdminsDir, "ops-2.crt")), "ops-2", nil},
		{"device named admin", device.Leaf, "", certs.ErrNotAdmin},
		{"server", parseCertFile(t, filepath.Join(ca.Dir, certs.ServerCertFile)), "", certs.ErrNotAdmin},
		{"CA", ca.Authority.Cert, "", certs.ErrNotAdmin},
		{"nil", nil, "", certs.ErrNotAdmin},
		{"two roles", signRaw(t, ca, pkix.Name{CommonName: "admin", OrganizationalUnit: []string{"device", "admin"}}), "", certs.ErrNotAdmin},
		{"bad name", signRaw(t, ca, pkix.Name{CommonName: "a/b", OrganizationalUnit: []string{"admin"}}), "", certs.ErrBadAdminName},
	} {
		t.Run(tc.name, func(t *testing.T) {
			name, err := certs.AdminName(tc.cert)
			if name != tc.wantName || !errors.Is(err, tc.wantErr) {
				t.Errorf("AdminName: got (%q, %v), want (%q, %v)", name, err, tc.wantName, tc.wantErr)
			}
			if got := certs.IsAdmin(tc.cert); got != (tc.wantErr == nil) {
				t.Errorf("IsAdmin: got %v, want %v", got, tc.wantErr == nil)
			}
		})
	}
}

func TestIssueAdminFiles(t *testing.T) {
	ca := certstest.New(t)
	if err := certs.IssueAdminFiles(ca.Dir, "ops"); err != nil {
		t.Fatal(err)
	}
	certPath := filepath.Join(ca.Dir, certs.AdminsDir, "ops.crt")
	keyPath := filepath.Join(ca.Dir, certs.AdminsDir, "ops.key")
	if got := mode(t, keyPath); got != 0o600 {
		t.Errorf("ops.key mode: got %v, want 0600", got)
	}
	if got := mode(t, filepath.Join(ca.Dir, certs.AdminsDir)); got != 0o700 {
		t.Errorf("admins/ mode: got %v, want drwx------", got)
	}
	if name, err := certs.AdminName(parseCertFile(t, certPath)); err != nil || name != "ops" {
		t.Errorf("issued admin: got (%q, %v), want (ops, nil)", name, err)
	}
	if _, err := tls.LoadX509KeyPair(certPath, keyPath); err != nil {
		t.Errorf("key pair: %v", err)
	}
	for _, name := range []string{"ops", certs.DefaultAdmin} {
		if err := certs.IssueAdminFiles(ca.Dir, name); !errors.Is(err, certs.ErrExists) {
			t.Errorf("issue %s again: got %v, want ErrExists", name, err)
		}
	}
	for _, name := range []string{"", ".", "..", "a/b", `a\b`, "a b", "café", strings.Repeat("a", 65)} {
		if err := certs.IssueAdminFiles(ca.Dir, name); !errors.Is(err, certs.ErrBadAdminName) {
			t.Errorf("issue admin %q: got %v, want ErrBadAdminName", name, err)
		}
	}
	if issued, err := certs.AdminIssued(ca.Dir, "ops"); err != nil || !issued {
		t.Errorf("AdminIssued(ops): got (%v, %v), want (true, nil)", issued, err)
	}
	if issued, err := certs.AdminIssued(ca.Dir, "nobody"); err != nil || issued {
		t.Errorf("AdminIssued(nobody): got (%v, %v), want (false, nil)", issued, err)
	}

	// Revocation is permanent: the name cannot come back, even once its files are gone.
	if err := certs.RevokeAdmin(ca.Dir, "ops"); err != nil {
		t.Fatal(err)
	}
	os.Remove(certPath)
	os.Remove(keyPath)
	if err := certs.IssueAdminFiles(ca.Dir, "ops"); !errors.Is(err, certs.ErrRevoked) {
		t.Errorf("issue a revoked admin: got %v, want ErrRevoked", err)
	}
	if _, err := os.Stat(keyPath); !errors.Is(err, os.ErrNotExist) {
		t.Errorf("refused issue wrote %s", keyPath)
	}
	// A device may share the name of a revoked admin: the two are separate.
	if err := certs.IssueDeviceFiles(ca.Dir, "ops", ""); err != nil {
		t.Errorf("issue device ops after admin ops was revoked: %v", err)
	}
}

// TestServerTLSRevokedAdmin: a revoked admin is refused at the handshake, resumed or not, and
// with the list the server watches or the one ServerTLS reloads itself; the other admins are
// let in.
func TestServerTLSRevokedAdmin(t *testing.T) {
	for _, v := range []struct {
		name    string
		max     uint16
		ownList bool
	}{{"TLS 1.2", tls.VersionTLS12, false}, {"TLS 1.3", tls.VersionTLS13, false}, {"list of ServerTLS", tls.VersionTLS13, true}} {
		t.Run(v.name, func(t *testing.T) {
			ca := certstest.New(t)
			if err := certs.IssueAdminFiles(ca.Dir, "ops"); err != nil {
				t.Fatal(err)
			}
			srvCfg := ca.ServerTLS(t)
			if v.ownList {
				var err error
				if srvCfg, err = certs.ServerTLS(ca.Dir, nil); err != nil {
					t.Fatal(err)
				}
			}
			addr, results := startServer(t, srvCfg)
			cache := &countingCache{ClientSessionCache: tls.NewLRUClientSessionCache(4)}
			ops := adminTLS(t, ca.Dir, "ops")
			ops.MaxVersion = v.max
			ops.ClientSessionCache = cache
			for i := range 2 { // the second resumes
				if _, err := dial(t, addr, ops); err != nil {
					t.Fatalf("dial %d before revoke: %v", i, err)
				}
				if r := receive(t, results); r.err != nil || r.id != "(admin)" {
					t.Fatalf("handshake %d before revoke: got %+v, want the admin in", i, r)
				}
			}
			if cache.hits != 1 {
				t.Fatalf("session cache hits before revoke: got %d, want 1", cache.hits)
			}

			if err := certs.RevokeAdmin(ca.Dir, "ops"); err != nil {
				t.Fatal(err)
			}
			if !v.ownList {
				if _, err := ca.Revoked.Reload(); err != nil {
					t.Fatal(err)
				}
				if !ca.Revoked.AdminRevoked("ops") || ca.Revoked.AdminRevoked("admin") || ca.Revoked.Revoked("ops") {
					t.Errorf("list after RevokeAdmin(ops): got ops %v, admin %v, device ops %v; want true false false",
						ca.Revoked.AdminRevoked("ops"), ca.Revoked.AdminRevoked("admin"), ca.Revoked.Revoked("ops"))
				}
			}
			if _, err := dial(t, addr, ops); err == nil {
				t.Errorf("revoked admin: got nil error, want the connection refused")
			}
			if r := receive(t, results); !errors.Is(r.err, certs.ErrRevoked) || !strings.Contains(r.err.Error(), `admin "ops"`) {
				t.Errorf("server after revoke: got %v, want admin \"ops\" ErrRevoked", r.err)
			}
			if _, err := dial(t, addr, adminTLS(t, ca.Dir, certs.DefaultAdmin)); err != nil {
				t.Errorf("admin after ops was revoked: %v", err)
			}
			receive(t, results)
		})
	}
}

// TestRevokedFileCompat: revoked.json from before admins loads as it did, and one with admins
// keeps its device entries where a binary from before looks for them.
func TestRevokedFileCompat(t *testing.T) {
	dir := t.TempDir()
	path := filepath.Join(dir, certs.RevokedFile)
	old := `{"revoked":[{"id":"dev-1","at":"2025-01-02T03:04:05Z"}]}` + "\n"
	if err := os.WriteFile(path, []byte(old), 0o644); err != nil {
		t.Fatal(err)
	}
	r, err := certs.OpenRevocationList(dir)
	if err != nil {
		t.Fatalf("open a file from before admins: %v", err)
	}
	if !r.Revoked("dev-1") || r.AdminRevoked("dev-1") {
		t.Errorf("old file: got device %v admin %v, want true false", r.Revoked("dev-1"), r.AdminRevoked("dev-1"))
	}
	if err := certs.RevokeAdmin(dir, "ops"); err != nil {
		t.Fatal(err)
	}
	if err := certs.Revoke(dir, "dev-2"); err != nil {
		t.Fatal(err)
	}
	added, err := r.Reload()
	if err != nil || !slices.Equal(added, []string{"dev-2"}) {
		t.Errorf("Reload: got (%q, %v), want ([dev-2], nil): admins are not devices", added, err)
	}
	if !r.AdminRevoked("ops") || r.Revoked("ops") {
		t.Errorf("after RevokeAdmin: got admin %v device %v, want true false", r.AdminRevoked("ops"), r.Revoked("ops"))
	}
	data, err := os.ReadFile(path)
	if err != nil {
		t.Fatal(err)
	}
	// What a binary from before decodes.
	var before struct {
		Revoked []struct {
			ID string `json:"id"`
		} `json:"revoked"`
	}
	if err := json.Unmarshal(data, &before); err != nil || len(before.Revoked) != 2 || before.Revoked[0].ID != "dev-1" || before.Revoked[1].ID != "dev-2" {
		t.Errorf("device entries as read by an older binary: got %+v (%v), want dev-1, dev-2", before.Revoked, err)
	}

	// A bad admin entry is a corrupt file, like a bad device id.
	if err := os.WriteFile(path, []byte(`{"revoked":[],"admins":[{"name":"a/b","at":"2025-01-02T03:04:05Z"}]}`), 0o644); err != nil {
		t.Fatal(err)
	}
	if _, err := certs.OpenRevocationList(dir); !errors.Is(err, certs.ErrBadAdminName) {
		t.Errorf("open with a bad admin name: got %v, want ErrBadAdminName", err)
	}
}

func TestInitRefuses(t *testing.T) {
	file := filepath.Join(t.TempDir(), "file")
	if err := os.WriteFile(file, []byte("x"), 0o600); err != nil {
		t.Fatal(err)
	}
	for _, force := range []bool{false, true} {
		err := certs.Init(file, certs.InitOptions{Force: force})
		if err == nil || errors.Is(err, certs.ErrExists) || !strings.Contains(err.Error(), "not a directory") {
			t.Errorf("Init of a regular file (force %v): got %v, want not a directory", force, err)
		}
	}
	if data, err := os.ReadFile(file); err != nil || string(data) != "x" {
		t.Errorf("file after refused Init: got %q (%v), want it untouched", data, err)
	}

	// With the admin "admin" revoked, a new admin.crt would be refused by every server.
	ca := certstest.New(t)
	if err := certs.RevokeAdmin(ca.Dir, certs.DefaultAdmin); err != nil {
		t.Fatal(err)
	}
	before, err := os.ReadFile(filepath.Join(ca.Dir, certs.CAFile))
	if err != nil {
		t.Fatal(err)
	}
	if err := certs.Init(ca.Dir, certs.InitOptions{Force: true}); !errors.Is(err, certs.ErrRevoked) {
		t.Errorf("Init --force with admin revoked: got %v, want ErrRevoked", err)
	}
	if after, _ := os.ReadFile(filepath.Join(ca.Dir, certs.CAFile)); string(after) != string(before) {
		t.Errorf("refused Init replaced the CA")
	}
}
