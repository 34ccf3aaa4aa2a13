package main

import (
	"bufio"
	"bytes"
	"context"
	"crypto/sha256"
	"io"
	"io/fs"
	"net"
	"os"
	"os/exec"
	"path/filepath"
	"strings"
	"testing"
	"time"

	"github.com/fota-dev/fota/api"
	"github.com/fota-dev/fota/certs"
	"github.com/fota-dev/fota/controller"
	"github.com/fota-dev/fota/devicesim"
)

// fotaBinary builds the fota binary into a temp dir.
func fotaBinary(t *testing.T) string {
	t.Helper()
	if testing.Short() {
		t.Skip("builds and runs the binary")
	}
	bin := filepath.Join(t.TempDir(), "fota")
	if out, err := exec.Command("go", "build", "-o", bin, ".").CombinedOutput(); err != nil {
		t.Fatalf("build: %v\n%s", err, out)
	}
	return bin
}

// freeAddr returns a loopback address that was free a moment ago. The server is restarted on
// the same addresses, so devices find it again.
func freeAddr(t *testing.T) string {
	t.Helper()
	ln, err := net.Listen("tcp", "127.0.0.1:0")
	if err != nil {
		t.Fatal(err)
	}
	defer ln.Close()
	return ln.Addr().String()
}

// serveProc is a `fota serve` process.
type serveProc struct {
	cmd    *exec.Cmd
	stderr *bytes.Buffer
}

// startServe runs `fota serve` and waits for its serving line.
func startServe(t *testing.T, bin string, args ...string) *serveProc {
	t.Helper()
	cmd := exec.Command(bin, append([]string{"serve", "--log-level", "warn"}, args...)...)
	stdout, err := cmd.StdoutPipe()
	if err != nil {
		t.Fatal(err)
	}
	p := &serveProc{cmd: cmd, stderr: &bytes.Buffer{}}
	cmd.Stderr = p.stderr
	if err := cmd.Start(); err != nil {
		t.Fatal(err)
	}
	t.Cleanup(func() {
		if cmd.ProcessState == nil {
			cmd.Process.Kill()
			cmd.Wait()
		}
	})
	line := make(chan string, 1)
	go func() {
		s, _ := bufio.NewReader(stdout).ReadString('\n')
		line <- s
		io.Copy(io.Discard, stdout)
	}()
	select {
	case s := <-line:
		if !strings.Contains(s, "fota serving") {
			cmd.Process.Kill()
			cmd.Wait()
			t.Fatalf("got %q, want the serving line; stderr: %s", s, p.stderr)
		}
	case <-time.After(20 * time.Second):
		cmd.Process.Kill()
		t.Fatalf("serve did not start in 20s; stderr: %s", p.stderr)
	}
	return p
}

// TestSIGKILLMidRollout kills the real server with SIGKILL in the middle of a rollout and
// starts it again on the same data dir: the rollout finishes, every device counted once.
func TestSIGKILLMidRollout(t *testing.T) {
	bin := fotaBinary(t)
	dir := t.TempDir()
	certsDir, data := filepath.Join(dir, "certs"), filepath.Join(dir, "data")
	if err := certs.Init(certsDir, certs.InitOptions{}); err != nil {
		t.Fatal(err)
	}
	mqttAddr, apiAddr := freeAddr(t), freeAddr(t)
	args := []string{"--data", data, "--certs", certsDir, "--mqtt", mqttAddr, "--api", apiAddr}
	srv := startServe(t, bin, args...)

	tlsConf, err := certs.ClientTLS(certsDir, certs.AdminCertFile, certs.AdminKeyFile)
	if err != nil {
		t.Fatal(err)
	}
	client := api.NewClient("https://"+apiAddr, tlsConf)
	defer client.Close()
	ctx, cancel := context.WithTimeout(context.Background(), 90*time.Second)
	defer cancel()
	counter, pub := addDemoReleases(ctx, t, client, filepath.Join(data, "release.pub"), demoFrom, demoTo)
	const n = 24
	tlsFor, err := deviceTLSFor(certsDir, mqttAddr)
	if err != nil {
		t.Fatal(err)
	}
	fleet := make(chan error, 1)
	go func() {
		_, err := devicesim.RunFleet(ctx, devicesim.FleetConfig{
			N: n, Model: demoModel, Version: demoFrom, Image: demoImage(demoFrom), Counter: counter,
			PublicKey: pub, Broker: mqttAddr, TLSFor: tlsFor, UntilVersion: demoTo, IDPrefix: "crash",
			StateDir: filepath.Join(dir, "devices"),
		})
		fleet <- err
	}()
	if err := waitOnline(ctx, client, n); err != nil {
		t.Fatal(err)
	}
	// Few at a time, so the kill lands with devices at every stage.
	r, err := client.CreateRollout(ctx, controller.RolloutSpec{Model: demoModel, Version: demoTo, Waves: []int{25, 100}, MaxConcurrent: 4})
	if err != nil {
		t.Fatal(err)
	}
	for {
		ro, err := client.GetRolloutJobs(ctx, r.ID, 0)
		if err != nil {
			t.Fatal(err)
		}
		if ro.Counts[controller.JobInstalled] >= n/3 {
			break
		}
		select {
		case <-ctx.Done():
			t.Fatalf("waiting for a third installed: %v", ro.Counts)
		case <-time.After(20 * time.Millisecond):
		}
	}
	if err := srv.cmd.Process.Kill(); err != nil { // SIGKILL
		t.Fatal(err)
	}
	srv.cmd.Wait()

	startServe(t, bin, args...)
	if err := <-fleet; err != nil {
		t.Fatalf("fleet: %v", err)
	}
	d, err := waitFinished(ctx, client, r.ID, n)
	if err != nil {
		t.Fatal(err)
	}
	if d.State != controller.RolloutCompleted || d.Devices != n || d.Counts[controller.JobInstalled] != n || total(d.Counts) != n {
		t.Fatalf("got %s over %d devices, counts %v; want completed with %d installed and nothing else", d.State, d.Devices, d.Counts, n)
	}
	jobs, err := client.RolloutJobs(ctx, r.ID, controller.JobQuery{})
	if err != nil {
		t.Fatal(err)
	}
	seen := map[string]bool{}
	for _, j := range jobs {
		if seen[j.Device] {
			t.Errorf("device %s has two jobs", j.Device)
		}
		seen[j.Device] = true
		if j.State != controller.JobInstalled {
			t.Errorf("job of %s: got %s, want installed", j.Device, j.State)
		}
	}
	if len(seen) != n {
		t.Fatalf("got jobs for %d devices, want %d", len(seen), n)
	}
}

// TestSecondProcessChangesNothing: a second server on a data dir in use fails at once with a
// clear error, and leaves every file of the data dir as it was.
func TestSecondProcessChangesNothing(t *testing.T) {
	bin := fotaBinary(t)
	dir := t.TempDir()
	certsDir, data := filepath.Join(dir, "certs"), filepath.Join(dir, "data")
	if err := certs.Init(certsDir, certs.InitOptions{}); err != nil {
		t.Fatal(err)
	}
	startServe(t, bin, "--data", data, "--certs", certsDir, "--mqtt", "127.0.0.1:0", "--api", "127.0.0.1:0")
	before := snapshotDir(t, data)

	cmd := exec.Command(bin, "serve", "--data", data, "--certs", certsDir, "--mqtt", "127.0.0.1:0", "--api", "127.0.0.1:0")
	var stderr bytes.Buffer
	cmd.Stderr = &stderr
	start := time.Now()
	err := cmd.Run()
	if err == nil {
		t.Fatal("second serve: exit 0, want failure")
	}
	if took := time.Since(start); took > 10*time.Second {
		t.Errorf("second serve took %v to fail, want about a second", took)
	}
	msg := stderr.String()
	if !strings.Contains(msg, "data dir is in use by another fota process") || !strings.Contains(msg, "fota.db is locked") || strings.Count(msg, "\n") != 1 {
		t.Errorf("got stderr %q, want one line saying the data dir is in use", msg)
	}
	after := snapshotDir(t, data)
	for path, b := range before {
		if a, ok := after[path]; !ok || a != b {
			t.Errorf("%s: before %+v, after %+v (present %v)", path, b, a, ok)
		}
	}
	for path := range after {
		if _, ok := before[path]; !ok {
			t.Errorf("%s: created by the second process", path)
		}
	}
}

type fileState struct {
	sum   [32]byte
	mtime time.Time
	size  int64
	mode  fs.FileMode
}

// snapshotDir records the content and modification time of every file under dir.
func snapshotDir(t *testing.T, dir string) map[string]fileState {
	t.Helper()
	out := map[string]fileState{}
	err := filepath.WalkDir(dir, func(path string, d fs.DirEntry, err error) error {
		if err != nil {
			return err
		}
		fi, err := d.Info()
		if err != nil {
			return err
		}
		st := fileState{mtime: fi.ModTime(), size: fi.Size(), mode: fi.Mode()}
		if d.Type().IsRegular() {
			b, err := os.ReadFile(path)
			if err != nil {
				return err
			}
			st.sum = sha256.Sum256(b)
		}
		out[path] = st
		return nil
	})
	if err != nil {
		t.Fatal(err)
	}
	return out
}
