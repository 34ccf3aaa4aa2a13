package main

import (
	"bytes"
	"context"
	"crypto/x509"
	"encoding/pem"
	"errors"
	"log/slog"
	"net/http"
	"os"
	"path/filepath"
	"slices"
	"strings"
	"testing"

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
