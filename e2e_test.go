package main

import (
	"bytes"
	"context"
	"crypto/ed25519"
	"crypto/tls"
	"encoding/json"
	"io"
	"log/slog"
	"os"
	"os/exec"
	"path/filepath"
	"regexp"
	"strings"
	"syscall"
	"testing"
	"time"

	mqtt "github.com/eclipse/paho.mqtt.golang"

	"github.com/fota-dev/fota/api"
	"github.com/fota-dev/fota/certs"
	"github.com/fota-dev/fota/controller"
	"github.com/fota-dev/fota/devicesim"
	"github.com/fota-dev/fota/firmware"
	"github.com/fota-dev/fota/protocol"
)

// testServer starts the real server on loopback with fresh certificates and state.
func testServer(t *testing.T) (*server, string) {
	t.Helper()
	dir := t.TempDir()
	certsDir := filepath.Join(dir, "certs")
	if err := certs.Init(certsDir, certs.InitOptions{}); err != nil {
		t.Fatal(err)
	}
	srv, err := startServer(serverConfig{
		DataDir: filepath.Join(dir, "data"), CertsDir: certsDir,
		MQTTAddr: "127.0.0.1:0", APIAddr: "127.0.0.1:0", Logger: slog.New(slog.DiscardHandler),
	})
	if err != nil {
		t.Fatal(err)
	}
	t.Cleanup(func() { srv.Close(context.Background()) })
	return srv, certsDir
}

func adminClient(t *testing.T, srv *server, certsDir string) *api.Client {
	t.Helper()
	tlsConf, err := certs.ClientTLS(certsDir, certs.AdminCertFile, certs.AdminKeyFile)
	if err != nil {
		t.Fatal(err)
	}
	return api.NewClient("https://"+srv.api.Addr().String(), tlsConf)
}

// addDemoReleases adds the demo firmware versions through the admin API and returns the
// security counter of the devices' starting image (0 when it is not added) and the release
// key they pin, read from the server's data dir.
func addDemoReleases(ctx context.Context, t *testing.T, client *api.Client, releasePub string, versions ...string) (uint64, ed25519.PublicKey) {
	t.Helper()
	var counter uint64
	for _, v := range versions {
		f, _, err := client.AddFirmware(ctx, demoModel, v, "", bytes.NewReader(demoImage(v)))
		if err != nil {
			t.Fatal(err)
		}
		if v == demoFrom {
			counter = f.Counter
		}
	}
	pub, err := firmware.LoadPublicKey(releasePub)
	if err != nil {
		t.Fatal(err)
	}
	return counter, pub
}

// updateFleet runs n simulated devices on demoFrom (security counter counter, pinning pub)
// against srv, creates a rollout to demoTo once they are all online, and returns it with the
// devices' results once each has updated.
func updateFleet(ctx context.Context, t *testing.T, srv *server, client *api.Client, certsDir string, n int, counter uint64, pub ed25519.PublicKey) (controller.Rollout, []devicesim.Result) {
	t.Helper()
	tlsFor, err := deviceTLSFor(certsDir, srv.broker.Addr().String())
	if err != nil {
		t.Fatal(err)
	}
	results := make(chan []devicesim.Result, 1)
	errs := make(chan error, 1)
	go func() {
		rs, err := devicesim.RunFleet(ctx, devicesim.FleetConfig{
			N: n, Model: demoModel, Version: demoFrom, Image: demoImage(demoFrom), Counter: counter,
			PublicKey: pub, Broker: srv.broker.Addr().String(), TLSFor: tlsFor, UntilVersion: demoTo,
		})
		results <- rs
		errs <- err
	}()
	if err := waitOnline(ctx, client, n); err != nil {
		t.Fatal(err)
	}
	r, err := client.CreateRollout(ctx, controller.RolloutSpec{Model: demoModel, Version: demoTo})
	if err != nil {
		t.Fatal(err)
	}
	rs := <-results
	if err := <-errs; err != nil {
		t.Fatalf("fleet: %v", err)
	}
	if len(rs) != n {
		t.Fatalf("got %d results, want %d", len(rs), n)
	}
	return r, rs
}

// TestEndToEnd updates three simulated devices through the real server: firmware uploaded
// over the admin API and signed, offered by the controller, streamed in chunks by the broker,
// verified against the pinned release key and installed by each device, every transition
// recorded. When the server holds the devices' current image it sends a verified delta patch;
// when it does not, the full image.
func TestEndToEnd(t *testing.T) {
	tests := []struct {
		name      string
		versions  []string // added to the server, in order
		wantDelta bool
	}{
		{"delta", []string{demoFrom, demoTo}, true},
		{"full image", []string{demoTo}, false},
	}
	for _, tc := range tests {
		t.Run(tc.name, func(t *testing.T) {
			srv, certsDir := testServer(t)
			client := adminClient(t, srv, certsDir)
			ctx, cancel := context.WithTimeout(context.Background(), time.Minute)
			defer cancel()
			counter, pub := addDemoReleases(ctx, t, client, srv.releasePub, tc.versions...)
			const n = 3
			r, rs := updateFleet(ctx, t, srv, client, certsDir, n, counter, pub)
			size := int64(len(demoImage(demoTo)))
			for _, x := range rs {
				if x.State != protocol.StateInstalled || x.From != demoFrom || x.To != demoTo || x.Delta != tc.wantDelta {
					t.Errorf("device %s: got %s %s->%s delta=%v, want installed %s->%s delta=%v", x.ID, x.State, x.From, x.To, x.Delta, demoFrom, demoTo, tc.wantDelta)
				}
				if tc.wantDelta && x.Bytes >= size/4 {
					t.Errorf("device %s: downloaded %d bytes of a delta, want under a quarter of the %d-byte image", x.ID, x.Bytes, size)
				}
				if !tc.wantDelta && x.Bytes != size {
					t.Errorf("device %s: downloaded %d bytes, want the %d-byte image", x.ID, x.Bytes, size)
				}
			}
			// The server's record agrees, once the last installed reports are in.
			d, err := waitFinished(ctx, client, r.ID, n)
			if err != nil {
				t.Fatal(err)
			}
			if d.Counts[controller.JobInstalled] != n || d.State != controller.RolloutCompleted {
				t.Fatalf("got rollout %s with counts %v, want %s with %d installed", d.State, d.Counts, controller.RolloutCompleted, n)
			}
			for _, j := range d.Jobs {
				if j.From != demoFrom || j.To != demoTo || j.Started.IsZero() || j.Finished.IsZero() || j.Delta != tc.wantDelta {
					t.Errorf("job %+v: want from, to, started, finished and delta=%v recorded", j, tc.wantDelta)
				}
			}
			ds, err := client.ListDevices(ctx)
			if err != nil {
				t.Fatal(err)
			}
			for _, d := range ds {
				if d.Version != demoTo {
					t.Errorf("device %s: got version %s, want %s", d.ID, d.Version, demoTo)
				}
			}
			// The live counters, through the CLI: every device had a session before and after
			// its reboot, and was sent at least one chunk.
			var out, errOut bytes.Buffer
			if code := run([]string{"stats", "--json", "--server", "https://" + srv.api.Addr().String(), "--certs", certsDir}, &out, &errOut); code != 0 {
				t.Fatalf("fota stats: exit %d: %s", code, errOut.String())
			}
			var st map[string]map[string]float64
			if err := json.Unmarshal(out.Bytes(), &st); err != nil {
				t.Fatalf("fota stats --json: %v in %q", err, out.String())
			}
			if st["broker"]["Sessions"] < 2*n || st["transfer"]["Chunks"] < n || st["controller"]["Commits"] < 1 || st["broker"]["Panics"] != 0 {
				t.Fatalf("got stats %v, want broker.Sessions >= %d, transfer.Chunks >= %d, controller.Commits >= 1, no panics", st, 2*n, n)
			}
			out.Reset()
			if code := run([]string{"stats", "--server", "https://" + srv.api.Addr().String(), "--certs", certsDir}, &out, &errOut); code != 0 || !statsRow.MatchString(out.String()) {
				t.Fatalf("fota stats: exit %d, output %q, want a table with a row: transfer Chunks N", code, out.String())
			}
		})
	}
}

// statsRow is a row of `fota stats`: part, counter, value.
var statsRow = regexp.MustCompile(`(?m)^transfer +Chunks +[1-9][0-9]*$`)

// TestRevokeLiveServer revokes a connected device with the CLI: the running server closes its
// connection and refuses it from then on, without a restart.
func TestRevokeLiveServer(t *testing.T) {
	srv, certsDir := testServer(t)
	addr := srv.broker.Addr().String()
	if code := run([]string{"certs", "issue", "--dir", certsDir, "--device", "dev-7"}, io.Discard, io.Discard); code != 0 {
		t.Fatalf("certs issue: exit %d", code)
	}
	lost := make(chan struct{}, 1)
	connect := func() (mqtt.Client, error) {
		cert, err := certs.LoadDeviceTLS(certsDir, "dev-7")
		if err != nil {
			return nil, err
		}
		tlsConf, err := certs.ClientTLS(certsDir, filepath.Join(certs.DevicesDir, "dev-7.crt"), filepath.Join(certs.DevicesDir, "dev-7.key"))
		if err != nil {
			return nil, err
		}
		tlsConf.Certificates = []tls.Certificate{cert}
		tlsConf.ServerName = "127.0.0.1"
		opts := mqtt.NewClientOptions().AddBroker("tls://" + addr).SetClientID("dev-7").
			SetTLSConfig(tlsConf).SetProtocolVersion(4).SetAutoReconnect(false).
			SetConnectRetry(false).SetConnectTimeout(5 * time.Second).
			SetConnectionLostHandler(func(mqtt.Client, error) { lost <- struct{}{} })
		c := mqtt.NewClient(opts)
		tok := c.Connect()
		tok.WaitTimeout(10 * time.Second)
		return c, tok.Error()
	}
	c, err := connect()
	if err != nil {
		t.Fatalf("connect before revocation: %v", err)
	}
	defer c.Disconnect(0)
	var stderr bytes.Buffer
	if code := run([]string{"certs", "revoke", "--dir", certsDir, "--device", "dev-7"}, io.Discard, &stderr); code != 0 {
		t.Fatalf("certs revoke: exit %d: %s", code, stderr.String())
	}
	select {
	case <-lost:
	case <-time.After(10 * time.Second):
		t.Fatal("revoked device still connected after 10s")
	}
	if c2, err := connect(); err == nil {
		c2.Disconnect(0)
		t.Fatal("revoked device connected again")
	}
}

// TestSecondServeFailsFast: a second server on the same data dir stops at once with a clear
// error instead of waiting for the state file.
func TestSecondServeFailsFast(t *testing.T) {
	dir := t.TempDir()
	certsDir := filepath.Join(dir, "certs")
	if err := certs.Init(certsDir, certs.InitOptions{}); err != nil {
		t.Fatal(err)
	}
	data := filepath.Join(dir, "data")
	srv, err := startServer(serverConfig{DataDir: data, CertsDir: certsDir, MQTTAddr: "127.0.0.1:0", APIAddr: "127.0.0.1:0", Logger: slog.New(slog.DiscardHandler)})
	if err != nil {
		t.Fatal(err)
	}
	defer srv.Close(context.Background())
	var stderr bytes.Buffer
	start := time.Now()
	code := run([]string{"serve", "--data", data, "--certs", certsDir, "--mqtt", "127.0.0.1:0", "--api", "127.0.0.1:0"}, io.Discard, &stderr)
	if code == 0 {
		t.Fatal("second serve on the same data dir: exit 0, want failure")
	}
	if took := time.Since(start); took > 5*time.Second {
		t.Errorf("second serve took %v to fail, want fast", took)
	}
	if msg := stderr.String(); !strings.Contains(msg, "in use") || strings.Count(msg, "\n") != 1 {
		t.Errorf("got stderr %q, want one line saying the data dir is in use", msg)
	}
}

// TestServeSignals runs the real binary and stops it with SIGTERM: it must exit 0.
func TestServeSignals(t *testing.T) {
	if testing.Short() {
		t.Skip("builds the binary")
	}
	dir := t.TempDir()
	bin := filepath.Join(dir, "fota")
	build := exec.Command("go", "build", "-o", bin, ".")
	if out, err := build.CombinedOutput(); err != nil {
		t.Fatalf("build: %v\n%s", err, out)
	}
	certsDir := filepath.Join(dir, "certs")
	if out, err := exec.Command(bin, "certs", "init", "--dir", certsDir).CombinedOutput(); err != nil {
		t.Fatalf("certs init: %v\n%s", err, out)
	}
	for _, sig := range []syscall.Signal{syscall.SIGTERM, syscall.SIGINT} {
		t.Run(sig.String(), func(t *testing.T) {
			cmd := exec.Command(bin, "serve", "--data", filepath.Join(dir, "data"), "--certs", certsDir, "--mqtt", "127.0.0.1:0", "--api", "127.0.0.1:0")
			stdout, err := cmd.StdoutPipe()
			if err != nil {
				t.Fatal(err)
			}
			cmd.Stderr = io.Discard
			if err := cmd.Start(); err != nil {
				t.Fatal(err)
			}
			// The first line on stdout says it is serving.
			line := make([]byte, 256)
			n, err := stdout.Read(line)
			if err != nil || !strings.Contains(string(line[:n]), "fota serving") {
				cmd.Process.Kill()
				t.Fatalf("got %q (%v), want the serving line", line[:n], err)
			}
			if err := cmd.Process.Signal(sig); err != nil {
				t.Fatal(err)
			}
			done := make(chan error, 1)
			go func() { done <- cmd.Wait() }()
			select {
			case err := <-done:
				if err != nil {
					t.Fatalf("serve after %v: %v, want exit 0", sig, err)
				}
			case <-time.After(15 * time.Second):
				cmd.Process.Kill()
				t.Fatalf("serve still running 15s after %v", sig)
			}
		})
	}
	_ = os.Remove(bin)
}
