package main

import (
	"bufio"
	"bytes"
	"context"
	"crypto/tls"
	"crypto/x509"
	"encoding/json"
	"encoding/pem"
	"errors"
	"fmt"
	"io"
	"log/slog"
	"net/http"
	"os"
	"path/filepath"
	"regexp"
	"slices"
	"strings"
	"syscall"
	"testing"
	"time"

	mqtt "github.com/eclipse/paho.mqtt.golang"

	"github.com/fota-dev/fota/api"
	"github.com/fota-dev/fota/certs"
	"github.com/fota-dev/fota/firmware"
	"github.com/fota-dev/fota/protocol"
)

// runCLI runs fota with args and returns the exit code, stdout and stderr.
func runCLI(t *testing.T, args ...string) (int, string, string) {
	t.Helper()
	var out, errOut bytes.Buffer
	code := run(args, &out, &errOut)
	return code, out.String(), errOut.String()
}

func TestCertsCLI(t *testing.T) {
	t.Setenv(certsDirEnv, "")
	dir := filepath.Join(t.TempDir(), "certs")

	code, out, errOut := runCLI(t, "certs", "init", "--dir", dir, "--host", "fota.example.com", "--host", "10.0.0.5")
	if code != 0 {
		t.Fatalf("certs init: exit %d, stderr %q", code, errOut)
	}
	if n := strings.Count(out, "\n"); n != 1 || !strings.Contains(out, dir) {
		t.Errorf("certs init output: got %q, want one line naming %s", out, dir)
	}
	data, err := os.ReadFile(filepath.Join(dir, certs.ServerCertFile))
	if err != nil {
		t.Fatal(err)
	}
	b, _ := pem.Decode(data)
	srv, err := x509.ParseCertificate(b.Bytes)
	if err != nil {
		t.Fatal(err)
	}
	var ips []string
	for _, ip := range srv.IPAddresses {
		ips = append(ips, ip.String())
	}
	if !slices.Contains(srv.DNSNames, "fota.example.com") || !slices.Contains(ips, "10.0.0.5") {
		t.Errorf("server names: got %q %q, want fota.example.com and 10.0.0.5 among them", srv.DNSNames, ips)
	}

	code, _, errOut = runCLI(t, "certs", "init", "--dir", dir)
	if code != 1 || !strings.Contains(errOut, "--force") {
		t.Errorf("second certs init: got exit %d, stderr %q; want exit 1 mentioning --force", code, errOut)
	}
	if code, _, errOut = runCLI(t, "certs", "init", "--dir", dir, "--force"); code != 0 {
		t.Errorf("certs init --force: exit %d, stderr %q", code, errOut)
	}

	code, out, errOut = runCLI(t, "certs", "issue", "--dir", dir, "--device", "dev-1", "--model", "primehub")
	if code != 0 {
		t.Fatalf("certs issue: exit %d, stderr %q", code, errOut)
	}
	if n := strings.Count(out, "\n"); n != 1 || !strings.Contains(out, "dev-1.crt") {
		t.Errorf("certs issue output: got %q, want one line naming dev-1.crt", out)
	}
	cert, err := certs.LoadDeviceTLS(dir, "dev-1")
	if err != nil {
		t.Fatal(err)
	}
	if id, model, err := certs.DeviceIdentity(cert.Leaf); err != nil || id != "dev-1" || model != "primehub" {
		t.Errorf("issued identity: got (%q, %q, %v), want (dev-1, primehub, nil)", id, model, err)
	}
	code, _, errOut = runCLI(t, "certs", "issue", "--dir", dir, "--device", "dev-1")
	if code != 1 || !strings.Contains(errOut, "already has") {
		t.Errorf("certs issue twice: got exit %d, stderr %q; want exit 1 saying it already has one", code, errOut)
	}

	code, out, errOut = runCLI(t, "certs", "revoke", "--dir", dir, "--device", "dev-1")
	if code != 0 || !strings.Contains(out, "permanent") {
		t.Errorf("certs revoke: got exit %d, stdout %q, stderr %q; want exit 0 saying it is permanent", code, out, errOut)
	}
	if code, _, errOut = runCLI(t, "certs", "revoke", "--dir", dir, "--device", "dev-1"); code != 0 {
		t.Errorf("certs revoke again: got exit %d, stderr %q; want 0", code, errOut)
	}
	if err := os.Remove(filepath.Join(dir, certs.DevicesDir, "dev-1.crt")); err != nil {
		t.Fatal(err)
	}
	if err := os.Remove(filepath.Join(dir, certs.DevicesDir, "dev-1.key")); err != nil {
		t.Fatal(err)
	}
	code, _, errOut = runCLI(t, "certs", "issue", "--dir", dir, "--device", "dev-1")
	if code != 1 || !strings.Contains(errOut, "revoked") || !strings.Contains(errOut, "permanent") {
		t.Errorf("certs issue of a revoked id: got exit %d, stderr %q; want exit 1 saying revocation is permanent", code, errOut)
	}

	// $FOTA_CERTS stands in for --dir.
	t.Setenv(certsDirEnv, dir)
	if code, _, errOut = runCLI(t, "certs", "issue", "--device", "dev-2"); code != 0 {
		t.Errorf("certs issue with $%s: exit %d, stderr %q", certsDirEnv, code, errOut)
	}
	if _, err := os.Stat(filepath.Join(dir, certs.DevicesDir, "dev-2.key")); err != nil {
		t.Errorf("certs issue with $%s: %v", certsDirEnv, err)
	}
}

func TestCertsCLIUsage(t *testing.T) {
	t.Setenv(certsDirEnv, "")
	dir := t.TempDir()
	if code, _, errOut := runCLI(t, "certs", "init", "--dir", dir); code != 0 {
		t.Fatalf("certs init: exit %d, stderr %q", code, errOut)
	}
	file := filepath.Join(t.TempDir(), "file")
	if err := os.WriteFile(file, nil, 0o600); err != nil {
		t.Fatal(err)
	}
	for _, tc := range []struct {
		name     string
		args     []string
		wantCode int
		wantErr  string
	}{
		{"no sub-command", []string{"certs"}, 2, "missing sub-command"},
		{"init a file", []string{"certs", "init", "--dir", file}, 1, "not a directory"},
		{"unknown sub-command", []string{"certs", "sign"}, 2, "unknown sub-command"},
		{"no dir", []string{"certs", "init"}, 2, "--dir"},
		{"unknown flag", []string{"certs", "issue", "--dir", dir, "--device", "d", "--color"}, 2, "color"},
		{"positional", []string{"certs", "revoke", "--dir", dir, "--device", "d", "extra"}, 2, "extra"},
		{"bad host", []string{"certs", "init", "--dir", t.TempDir(), "--host", "example.com:8883"}, 1, "bad host"},
		{"revoke without device", []string{"certs", "revoke", "--dir", dir}, 2, "--device"},
		{"revoke bad id", []string{"certs", "revoke", "--dir", dir, "--device", "a/b"}, 2, "invalid device id"},
		{"issue without device", []string{"certs", "issue", "--dir", dir}, 2, "--device"},
		{"issue empty id", []string{"certs", "issue", "--dir", dir, "--device", ""}, 2, "--device"},
		{"issue 65 bytes", []string{"certs", "issue", "--dir", dir, "--device", strings.Repeat("a", 65)}, 2, "at most 64"},
		{"issue slash", []string{"certs", "issue", "--dir", dir, "--device", "a/b"}, 2, "invalid device id"},
		{"issue plus", []string{"certs", "issue", "--dir", dir, "--device", "a+b"}, 2, "invalid device id"},
		{"issue hash", []string{"certs", "issue", "--dir", dir, "--device", "a#b"}, 2, "invalid device id"},
		{"issue dollar", []string{"certs", "issue", "--dir", dir, "--device", "$a"}, 2, "invalid device id"},
		{"issue space", []string{"certs", "issue", "--dir", dir, "--device", "a b"}, 2, "white space"},
		{"issue nul", []string{"certs", "issue", "--dir", dir, "--device", "a\x00b"}, 2, "invalid device id"},
		{"issue tab", []string{"certs", "issue", "--dir", dir, "--device", "a\tb"}, 2, "white space"},
		{"issue bad model", []string{"certs", "issue", "--dir", dir, "--device", "d", "--model", "a b"}, 2, "--model"},
	} {
		t.Run(tc.name, func(t *testing.T) {
			code, _, errOut := runCLI(t, tc.args...)
			if code != tc.wantCode || !strings.Contains(errOut, tc.wantErr) {
				t.Errorf("got exit %d, stderr %q; want exit %d mentioning %q", code, errOut, tc.wantCode, tc.wantErr)
			}
			if n := strings.Count(errOut, "\n"); n != 1 {
				t.Errorf("stderr: got %d lines, want 1", n)
			}
		})
	}
	entries, err := os.ReadDir(filepath.Join(dir, certs.DevicesDir))
	if err != nil {
		t.Fatal(err)
	}
	if len(entries) != 0 {
		t.Errorf("refused commands wrote %d files in devices/, want none", len(entries))
	}
}

// TestModelRuleShared: certs issue and firmware add refuse the same models with the same
// words, and so does the server behind firmware add: a device certificate can only carry a
// model that a release can have.
func TestModelRuleShared(t *testing.T) {
	srv, certsDir := testServer(t)
	client := adminClient(t, srv, certsDir)
	defer client.Close()
	t.Setenv(certsDirEnv, "")
	t.Setenv(serverEnv, "")
	apiURL := "https://" + srv.api.Addr().String()
	image := writeTestFile(t, "fw.bin", []byte("firmware image"))
	for _, tc := range []struct{ name, model string }{
		{"dot", "."},
		{"dot dot", ".."},
		{"slash", "a/b"},
		{"backslash", `a\b`},
		{"too long", strings.Repeat("m", 65)},
		{"space", "prime hub"},
		{"tab", "a\tb"},
		{"newline", "a\nb"},
		{"nul", "a\x00b"},
		{"escape", "a\x1b[2Jb"},
		{"non-ascii", "café"},
		{"plus", "a+b"},
	} {
		t.Run(tc.name, func(t *testing.T) {
			want := "--model: "
			if err := firmware.ValidModel(tc.model); err != nil {
				want += err.Error()
			} else {
				t.Errorf("firmware.ValidModel(%q) = nil, want an error", tc.model)
			}
			code, _, issueErr := runCLI(t, "certs", "issue", "--dir", certsDir, "--device", "dev-m", "--model", tc.model)
			if code != 2 || !strings.Contains(issueErr, want) || strings.Count(issueErr, "\n") != 1 {
				t.Errorf("certs issue --model %q: got exit %d, stderr %q; want exit 2, one line with %q", tc.model, code, issueErr, want)
			}
			code, _, addErr := runCLI(t, "firmware", "add", "--server", apiURL, "--certs", certsDir, "--model", tc.model, "--version", "1.0.0", "--file", image)
			if code != 2 || !strings.Contains(addErr, want) || strings.Count(addErr, "\n") != 1 {
				t.Errorf("firmware add --model %q: got exit %d, stderr %q; want exit 2, one line with %q", tc.model, code, addErr, want)
			}
			// The server applies the rule on its own, to clients other than this CLI.
			_, _, err := client.AddFirmware(context.Background(), tc.model, "1.0.0", "", strings.NewReader("firmware image"))
			var apiErr *api.Error
			if !errors.As(err, &apiErr) || apiErr.StatusCode != http.StatusBadRequest || !strings.Contains(apiErr.Message, "invalid model") {
				t.Errorf("server add of model %q: got %v, want 400 invalid model", tc.model, err)
			}
			if err := certs.IssueDeviceFiles(certsDir, "dev-m", tc.model); !errors.Is(err, protocol.ErrBadModel) {
				t.Errorf("IssueDeviceFiles with model %q: got %v, want protocol.ErrBadModel", tc.model, err)
			}
		})
	}
	if _, err := os.Stat(filepath.Join(certsDir, certs.DevicesDir, "dev-m.key")); !errors.Is(err, os.ErrNotExist) {
		t.Errorf("refused issues left dev-m.key behind: stat err %v", err)
	}
	if list, err := client.ListFirmware(context.Background()); err != nil || len(list) != 0 {
		t.Errorf("firmware after refused adds: got %d records, err %v; want none", len(list), err)
	}
	// A good model passes both.
	if code, _, errOut := runCLI(t, "certs", "issue", "--dir", certsDir, "--device", "dev-m", "--model", "ESP8266_v2.rev-b"); code != 0 {
		t.Errorf("certs issue with a good model: exit %d, stderr %q", code, errOut)
	}
}

// TestServeBadCertsCreatesNothing: serve with a certs dir it cannot use fails with one line
// and leaves the data dir as it found it: no state file, no release key.
func TestServeBadCertsCreatesNothing(t *testing.T) {
	t.Setenv(certsDirEnv, "")
	good := filepath.Join(t.TempDir(), "certs")
	if code, _, errOut := runCLI(t, "certs", "init", "--dir", good); code != 0 {
		t.Fatalf("certs init: exit %d, stderr %q", code, errOut)
	}
	noServerKey := filepath.Join(t.TempDir(), "certs")
	if code, _, errOut := runCLI(t, "certs", "init", "--dir", noServerKey); code != 0 {
		t.Fatalf("certs init: exit %d, stderr %q", code, errOut)
	}
	if err := os.Remove(filepath.Join(noServerKey, certs.ServerKeyFile)); err != nil {
		t.Fatal(err)
	}
	corrupt := filepath.Join(t.TempDir(), "certs")
	if code, _, errOut := runCLI(t, "certs", "init", "--dir", corrupt); code != 0 {
		t.Fatalf("certs init: exit %d, stderr %q", code, errOut)
	}
	if err := os.WriteFile(filepath.Join(corrupt, certs.RevokedFile), []byte("{not json"), 0o644); err != nil {
		t.Fatal(err)
	}
	for _, tc := range []struct {
		name, certsDir, want string
	}{
		{"missing", filepath.Join(t.TempDir(), "nowhere"), "certs init"},
		{"empty", t.TempDir(), "certs init"},
		{"no server key", noServerKey, certs.ServerKeyFile},
		{"corrupt revoked.json", corrupt, certs.RevokedFile},
	} {
		t.Run(tc.name, func(t *testing.T) {
			for _, existing := range []bool{false, true} {
				data := filepath.Join(t.TempDir(), "data")
				if existing {
					if err := os.Mkdir(data, 0o700); err != nil {
						t.Fatal(err)
					}
				}
				code, _, errOut := runCLI(t, "serve", "--data", data, "--certs", tc.certsDir, "--mqtt", "127.0.0.1:0", "--api", "127.0.0.1:0")
				if code != 1 || !strings.Contains(errOut, tc.want) || strings.Count(errOut, "\n") != 1 {
					t.Errorf("serve: got exit %d, stderr %q; want exit 1, one line mentioning %q", code, errOut, tc.want)
				}
				entries, err := os.ReadDir(data)
				switch {
				case !existing && !errors.Is(err, os.ErrNotExist):
					t.Errorf("serve created the data dir %s (err %v), want it absent", data, err)
				case existing && (err != nil || len(entries) != 0):
					t.Errorf("serve left %d entries in the data dir (err %v), want none", len(entries), err)
				}
			}
		})
	}
	// The good dir serves, so the cases above fail for their certs alone.
	srv, err := startServer(serverConfig{DataDir: filepath.Join(t.TempDir(), "data"), CertsDir: good,
		MQTTAddr: "127.0.0.1:0", APIAddr: "127.0.0.1:0", Logger: slog.New(slog.DiscardHandler)})
	if err != nil {
		t.Fatalf("serve with a good certs dir: %v", err)
	}
	srv.Close(context.Background())
}

// TestCertsRevokeUnissued: revoking an id or admin name this certs dir never issued is refused,
// burning nothing, unless --unissued asks for it, which warns.
func TestCertsRevokeUnissued(t *testing.T) {
	t.Setenv(certsDirEnv, "")
	dir := filepath.Join(t.TempDir(), "certs")
	if code, _, errOut := runCLI(t, "certs", "init", "--dir", dir); code != 0 {
		t.Fatalf("certs init: exit %d, stderr %q", code, errOut)
	}
	for _, tc := range []struct{ what, flag string }{{"device", "--device"}, {"admin", "--admin"}} {
		t.Run(tc.what, func(t *testing.T) {
			code, out, errOut := runCLI(t, "certs", "revoke", "--dir", dir, tc.flag, "typo-1")
			if code != 1 || !strings.Contains(errOut, "never issued") || !strings.Contains(errOut, "--unissued") || strings.Count(errOut, "\n") != 1 || out != "" {
				t.Errorf("revoke of an unissued %s: got exit %d, stdout %q, stderr %q; want exit 1, one line naming --unissued", tc.what, code, out, errOut)
			}
			// A wrong --dir is the same mistake, and creates nothing there.
			elsewhere := filepath.Join(t.TempDir(), "certs")
			if code, _, _ := runCLI(t, "certs", "revoke", "--dir", elsewhere, tc.flag, "typo-1"); code != 1 {
				t.Errorf("revoke in a dir that is no CA: got exit %d, want 1", code)
			}
			if _, err := os.Stat(elsewhere); !errors.Is(err, os.ErrNotExist) {
				t.Errorf("revoke in a dir that is no CA created it (stat err %v)", err)
			}
			// Nothing was burnt: the name can still be issued.
			if code, _, errOut := runCLI(t, "certs", "issue", "--dir", dir, tc.flag, "typo-1"); code != 0 {
				t.Errorf("issue after a refused revoke: exit %d, stderr %q; want 0", code, errOut)
			}

			code, out, errOut = runCLI(t, "certs", "revoke", "--dir", dir, tc.flag, "ghost-1", "--unissued")
			if code != 0 || !strings.HasPrefix(out, "warning: ") || !strings.Contains(out, "never issued") || strings.Count(out, "\n") != 2 {
				t.Errorf("revoke --unissued: got exit %d, stdout %q, stderr %q; want exit 0, a warning line and the result", code, out, errOut)
			}
			code, _, errOut = runCLI(t, "certs", "issue", "--dir", dir, tc.flag, "ghost-1")
			if code != 1 || !strings.Contains(errOut, "revoked") {
				t.Errorf("issue of a name revoked with --unissued: got exit %d, stderr %q; want exit 1, revoked", code, errOut)
			}
			// Revoking again needs no flag: it is known now, and nothing changes.
			code, out, _ = runCLI(t, "certs", "revoke", "--dir", dir, tc.flag, "ghost-1")
			if code != 0 || strings.Contains(out, "warning") {
				t.Errorf("second revoke: got exit %d, stdout %q; want 0 without a warning", code, out)
			}
		})
	}
}

// TestCertsAdminCLI: certs issue --admin makes further admins, certs revoke --admin revokes
// them, and both refuse what they cannot do with one line.
func TestCertsAdminCLI(t *testing.T) {
	t.Setenv(certsDirEnv, "")
	dir := filepath.Join(t.TempDir(), "certs")
	if code, _, errOut := runCLI(t, "certs", "init", "--dir", dir); code != 0 {
		t.Fatalf("certs init: exit %d, stderr %q", code, errOut)
	}
	code, out, errOut := runCLI(t, "certs", "issue", "--dir", dir, "--admin", "ops")
	if code != 0 || !strings.Contains(out, filepath.Join(dir, certs.AdminsDir, "ops.crt")) || strings.Count(out, "\n") != 1 {
		t.Fatalf("certs issue --admin: got exit %d, stdout %q, stderr %q; want exit 0, one line naming admins/ops.crt", code, out, errOut)
	}
	cert, err := tls.LoadX509KeyPair(filepath.Join(dir, certs.AdminsDir, "ops.crt"), filepath.Join(dir, certs.AdminsDir, "ops.key"))
	if err != nil {
		t.Fatal(err)
	}
	if name, err := certs.AdminName(cert.Leaf); err != nil || name != "ops" {
		t.Errorf("issued admin: got (%q, %v), want (ops, nil)", name, err)
	}
	for _, tc := range []struct {
		name     string
		args     []string
		wantCode int
		wantErr  string
	}{
		{"issue twice", []string{"certs", "issue", "--dir", dir, "--admin", "ops"}, 1, "already has"},
		{"issue the default", []string{"certs", "issue", "--dir", dir, "--admin", "admin"}, 1, "already has"},
		{"issue with a model", []string{"certs", "issue", "--dir", dir, "--admin", "ops2", "--model", "primehub"}, 2, "--model"},
		{"issue with a device", []string{"certs", "issue", "--dir", dir, "--admin", "ops2", "--device", "d"}, 2, "--device"},
		{"issue bad name", []string{"certs", "issue", "--dir", dir, "--admin", "a/b"}, 2, "invalid admin name"},
		{"issue empty name", []string{"certs", "issue", "--dir", dir, "--admin", ""}, 2, "invalid admin name"},
		{"issue dot dot", []string{"certs", "issue", "--dir", dir, "--admin", ".."}, 2, "invalid admin name"},
		{"revoke both", []string{"certs", "revoke", "--dir", dir, "--admin", "ops", "--device", "d"}, 2, "not both"},
		{"revoke bad name", []string{"certs", "revoke", "--dir", dir, "--admin", "a b"}, 2, "invalid admin name"},
		{"revoke unknown", []string{"certs", "revoke", "--dir", dir, "--admin", "nobody"}, 1, "never issued"},
	} {
		t.Run(tc.name, func(t *testing.T) {
			code, _, errOut := runCLI(t, tc.args...)
			if code != tc.wantCode || !strings.Contains(errOut, tc.wantErr) || strings.Count(errOut, "\n") != 1 {
				t.Errorf("got exit %d, stderr %q; want exit %d, one line mentioning %q", code, errOut, tc.wantCode, tc.wantErr)
			}
		})
	}
	list, err := certs.OpenRevocationList(dir)
	if err != nil {
		t.Fatal(err)
	}
	if list.AdminRevoked("nobody") || list.AdminRevoked("ops") {
		t.Fatal("refused commands revoked an admin")
	}
	for _, name := range []string{"ops", certs.DefaultAdmin} {
		code, out, errOut := runCLI(t, "certs", "revoke", "--dir", dir, "--admin", name)
		if code != 0 || !strings.Contains(out, "permanent") {
			t.Errorf("certs revoke --admin %s: got exit %d, stdout %q, stderr %q; want exit 0 saying it is permanent", name, code, out, errOut)
		}
	}
	if _, err := list.Reload(); err != nil {
		t.Fatal(err)
	}
	if !list.AdminRevoked("ops") || !list.AdminRevoked(certs.DefaultAdmin) || list.Revoked("ops") {
		t.Errorf("after revoking ops and admin: got admins revoked %v %v, device ops revoked %v; want true true false",
			list.AdminRevoked("ops"), list.AdminRevoked(certs.DefaultAdmin), list.Revoked("ops"))
	}
	if code, _, errOut := runCLI(t, "certs", "issue", "--dir", dir, "--admin", "ops"); code != 1 || !strings.Contains(errOut, "revoked") {
		t.Errorf("issue of a revoked admin: got exit %d, stderr %q; want exit 1, revoked", code, errOut)
	}
}

// TestRevokeAdminLiveServer revokes an admin with the CLI while it has connections open to the
// running server: the server closes them, refuses the admin's new connections, and the other
// admins carry on.
func TestRevokeAdminLiveServer(t *testing.T) {
	srv, certsDir := testServer(t)
	t.Setenv(certsDirEnv, "")
	t.Setenv(serverEnv, "")
	t.Setenv(adminEnv, "")
	apiURL := "https://" + srv.api.Addr().String()
	for _, name := range []string{"ops", "oncall"} {
		if code, _, errOut := runCLI(t, "certs", "issue", "--dir", certsDir, "--admin", name); code != 0 {
			t.Fatalf("certs issue --admin %s: exit %d, stderr %q", name, code, errOut)
		}
	}
	tlsOf := func(name string) *tls.Config {
		certPath, keyPath, err := certs.AdminPaths(certsDir, name)
		if err != nil {
			t.Fatal(err)
		}
		tc, err := certs.ClientTLS(certsDir, certPath, keyPath)
		if err != nil {
			t.Fatal(err)
		}
		tc.ServerName = "127.0.0.1"
		return tc
	}
	// An idle keep-alive connection of ops, after one request.
	idle, err := tls.Dial("tcp", srv.api.Addr().String(), tlsOf("ops"))
	if err != nil {
		t.Fatal(err)
	}
	defer idle.Close()
	idleR := bufio.NewReader(idle)
	fmt.Fprintf(idle, "GET /api/v1/health HTTP/1.1\r\nHost: fota\r\n\r\n")
	resp, err := http.ReadResponse(idleR, nil)
	if err != nil || resp.StatusCode != http.StatusOK {
		t.Fatalf("ops's first request: got %v, %v; want 200", resp, err)
	}
	io.Copy(io.Discard, resp.Body)
	resp.Body.Close()

	ops := api.NewClient(apiURL, tlsOf("ops"))
	defer ops.Close()
	oncall := api.NewClient(apiURL, tlsOf("oncall"))
	defer oncall.Close()
	ctx := context.Background()
	for _, c := range []*api.Client{ops, oncall} {
		if err := c.Health(ctx); err != nil {
			t.Fatalf("before revocation: %v", err)
		}
	}
	for _, args := range [][]string{
		{"device", "list", "--server", apiURL, "--certs", certsDir},
		{"device", "list", "--server", apiURL, "--certs", certsDir, "--admin", "ops"},
	} {
		if code, _, errOut := runCLI(t, args...); code != 0 {
			t.Fatalf("%q before revocation: exit %d, stderr %q", args, code, errOut)
		}
	}

	if code, _, errOut := runCLI(t, "certs", "revoke", "--dir", certsDir, "--admin", "ops"); code != 0 {
		t.Fatalf("certs revoke --admin ops: exit %d, stderr %q", code, errOut)
	}
	// The server notices within its watch interval and closes the idle connection.
	idle.SetReadDeadline(time.Now().Add(10 * time.Second))
	if n, err := idleR.Read(make([]byte, 1)); n != 0 || (err != io.EOF && !errors.Is(err, syscall.ECONNRESET)) {
		t.Errorf("ops's idle connection after revocation: got %d bytes, %v; want it closed", n, err)
	}
	// From then on, every request of ops is refused: a connection made before the server
	// noticed is refused on its next request, new ones at the handshake.
	for i := range 2 {
		if err := ops.Health(ctx); err == nil {
			t.Errorf("ops request %d after revocation: got nil, want refused", i)
		}
	}
	code, out, errOut := runCLI(t, "device", "list", "--server", apiURL, "--certs", certsDir, "--admin", "ops")
	if code != 1 || out != "" || strings.Count(errOut, "\n") != 1 {
		t.Errorf("device list --admin ops: got exit %d, stdout %q, stderr %q; want exit 1 and one line", code, out, errOut)
	}
	t.Setenv(adminEnv, "ops")
	if code, _, _ := runCLI(t, "device", "list", "--server", apiURL, "--certs", certsDir); code != 1 {
		t.Errorf("device list with $%s=ops: got exit %d, want 1", adminEnv, code)
	}

	// The other admins are not affected, on open connections or new ones.
	if err := oncall.Health(ctx); err != nil {
		t.Errorf("oncall after ops's revocation: %v", err)
	}
	t.Setenv(adminEnv, "oncall")
	if code, _, errOut := runCLI(t, "device", "list", "--server", apiURL, "--certs", certsDir); code != 0 {
		t.Errorf("device list with $%s=oncall: exit %d, stderr %q", adminEnv, code, errOut)
	}
	t.Setenv(adminEnv, "")
	if code, _, errOut := runCLI(t, "device", "list", "--server", apiURL, "--certs", certsDir); code != 0 {
		t.Errorf("device list as the default admin: exit %d, stderr %q", code, errOut)
	}
	code, _, errOut = runCLI(t, "device", "list", "--server", apiURL, "--certs", certsDir, "--admin", "nobody")
	if code != 1 || !strings.Contains(errOut, `admin "nobody"`) || strings.Count(errOut, "\n") != 1 {
		t.Errorf("device list --admin nobody: got exit %d, stderr %q; want exit 1, one line naming the admin", code, errOut)
	}
	if code, _, errOut := runCLI(t, "device", "list", "--server", apiURL, "--certs", certsDir, "--admin", "../x"); code != 2 || !strings.Contains(errOut, "--admin") {
		t.Errorf("device list --admin ../x: got exit %d, stderr %q; want exit 2 naming --admin", code, errOut)
	}
}

// TestDeviceListMarksRevoked: once a device is revoked, device list and device show mark it,
// in the table and in the JSON, and leave the others unmarked.
func TestDeviceListMarksRevoked(t *testing.T) {
	srv, certsDir := testServer(t)
	t.Setenv(certsDirEnv, "")
	t.Setenv(serverEnv, "")
	t.Setenv(adminEnv, "")
	apiURL := "https://" + srv.api.Addr().String()
	for _, id := range []string{"dev-a", "dev-b"} {
		if code, _, errOut := runCLI(t, "certs", "issue", "--dir", certsDir, "--device", id, "--model", "primehub"); code != 0 {
			t.Fatalf("certs issue %s: exit %d, stderr %q", id, code, errOut)
		}
		tc, err := certs.ClientTLS(certsDir, filepath.Join(certs.DevicesDir, id+".crt"), filepath.Join(certs.DevicesDir, id+".key"))
		if err != nil {
			t.Fatal(err)
		}
		tc.ServerName = "127.0.0.1"
		c := mqtt.NewClient(mqtt.NewClientOptions().AddBroker("tls://" + srv.broker.Addr().String()).SetClientID(id).
			SetTLSConfig(tc).SetProtocolVersion(4).SetAutoReconnect(false).SetConnectTimeout(5 * time.Second))
		if tok := c.Connect(); !tok.WaitTimeout(10*time.Second) || tok.Error() != nil {
			t.Fatalf("connect %s: %v", id, tok.Error())
		}
		t.Cleanup(func() { c.Disconnect(0) })
	}
	// list runs device list --json until cond holds of what it prints, or 10 seconds pass.
	list := func(what string, cond func(map[string]bool) bool) {
		t.Helper()
		var got map[string]bool
		for deadline := time.Now().Add(10 * time.Second); time.Now().Before(deadline); {
			code, out, errOut := runCLI(t, "device", "list", "--json", "--server", apiURL, "--certs", certsDir)
			if code != 0 {
				t.Fatalf("device list --json: exit %d, stderr %q", code, errOut)
			}
			var ds []struct {
				ID      string `json:"id"`
				Revoked *bool  `json:"revoked"`
			}
			if err := json.Unmarshal([]byte(out), &ds); err != nil {
				t.Fatalf("device list --json: %v in %q", err, out)
			}
			got = map[string]bool{}
			for _, d := range ds {
				if d.Revoked == nil {
					t.Fatalf("device list --json: device %s has no revoked field in %q", d.ID, out)
				}
				got[d.ID] = *d.Revoked
			}
			if cond(got) {
				return
			}
		}
		t.Fatalf("device list --json: got revoked %v, want %s", got, what)
	}
	list("both devices, neither revoked", func(m map[string]bool) bool {
		return len(m) == 2 && !m["dev-a"] && !m["dev-b"]
	})
	if code, _, errOut := runCLI(t, "certs", "revoke", "--dir", certsDir, "--device", "dev-a"); code != 0 {
		t.Fatalf("certs revoke: exit %d, stderr %q", code, errOut)
	}
	list("dev-a revoked, dev-b not", func(m map[string]bool) bool {
		return len(m) == 2 && m["dev-a"] && !m["dev-b"]
	})
	code, out, errOut := runCLI(t, "device", "list", "--server", apiURL, "--certs", certsDir)
	if code != 0 || !regexp.MustCompile(`(?m)^dev-a \(revoked\) `).MatchString(out) || !regexp.MustCompile(`(?m)^dev-b  `).MatchString(out) || strings.Count(out, "(revoked)") != 1 {
		t.Errorf("device list: got exit %d, stdout %q, stderr %q; want dev-a marked (revoked) and dev-b not", code, out, errOut)
	}
	code, out, errOut = runCLI(t, "device", "show", "dev-a", "--server", apiURL, "--certs", certsDir)
	if code != 0 || !regexp.MustCompile(`(?m)^device +dev-a \(revoked\)$`).MatchString(out) {
		t.Errorf("device show dev-a: got exit %d, stdout %q, stderr %q; want it marked (revoked)", code, out, errOut)
	}
}
