package main

import (
	"bytes"
	"context"
	"crypto/sha256"
	"encoding/hex"
	"encoding/json"
	"errors"
	"fmt"
	"io"
	"log/slog"
	"net"
	"os"
	"path/filepath"
	"reflect"
	"slices"
	"strings"
	"sync"
	"testing"
	"time"

	"github.com/fota-dev/fota/api"
	"github.com/fota-dev/fota/certs/certstest"
	"github.com/fota-dev/fota/controller"
	"github.com/fota-dev/fota/firmware"
	"github.com/fota-dev/fota/protocol"
)

var cliTestTime = time.Date(2025, 3, 4, 5, 6, 7, 0, time.UTC)

// cliFakeStore keeps uploads in memory, like firmware.Store does on disk.
type cliFakeStore struct {
	mu     sync.Mutex
	list   []firmware.Firmware
	bodies map[string][]byte
}

func (s *cliFakeStore) Add(ctx context.Context, req firmware.AddRequest) (firmware.Firmware, bool, error) {
	body, err := io.ReadAll(req.Body)
	if err != nil {
		return firmware.Firmware{}, false, fmt.Errorf("add firmware: read body: %w", err)
	}
	s.mu.Lock()
	defer s.mu.Unlock()
	for _, f := range s.list {
		if f.Model == req.Model && f.Version == req.Version {
			return f, false, nil
		}
	}
	sum := sha256.Sum256(body)
	f := firmware.Firmware{
		Model: req.Model, Version: req.Version, Size: int64(len(body)), SHA256: hex.EncodeToString(sum[:]),
		Counter: uint64(len(s.list) + 1), Notes: req.Notes, Created: cliTestTime,
	}
	s.list = append(s.list, f)
	if s.bodies == nil {
		s.bodies = map[string][]byte{}
	}
	s.bodies[req.Model+" "+req.Version] = body
	return f, true, nil
}

// AddDelta and Deltas: the delta commands are tested against a real store (storeAPI).
func (s *cliFakeStore) AddDelta(context.Context, protocol.Manifest, io.Reader) (firmware.Delta, bool, error) {
	return firmware.Delta{}, false, errors.New("cliFakeStore holds no deltas")
}

func (s *cliFakeStore) Deltas() ([]firmware.Delta, error) { return nil, nil }

func (s *cliFakeStore) List() ([]firmware.Firmware, error) {
	s.mu.Lock()
	defer s.mu.Unlock()
	return slices.Clone(s.list), nil
}

func (s *cliFakeStore) Delete(model, version string, inUse func(firmware.Firmware) bool) error {
	s.mu.Lock()
	defer s.mu.Unlock()
	for i, f := range s.list {
		if f.Model != model || f.Version != version {
			continue
		}
		if inUse(f) {
			return fmt.Errorf("delete firmware %s %s: %w", model, version, firmware.ErrInUse)
		}
		s.list = slices.Delete(s.list, i, i+1)
		delete(s.bodies, model+" "+version)
		return nil
	}
	return fmt.Errorf("delete firmware %s %s: %w", model, version, firmware.ErrNotFound)
}

// cliFakeRollouts creates rollouts with two jobs, on devices dev-1 and dev-2.
type cliFakeRollouts struct {
	specs   []controller.RolloutSpec
	mu      sync.Mutex
	details []controller.RolloutDetail
	devices []controller.Device
}

func (f *cliFakeRollouts) CreateRollout(ctx context.Context, spec controller.RolloutSpec) (controller.Rollout, error) {
	f.mu.Lock()
	defer f.mu.Unlock()
	if spec.Version == "9.9.9" {
		return controller.Rollout{}, fmt.Errorf("firmware %s %s %w", spec.Model, spec.Version, controller.ErrNotFound)
	}
	id := fmt.Sprintf("r%d", len(f.details)+1)
	r := controller.Rollout{
		ID: id, Model: spec.Model, Version: spec.Version, SHA256: strings.Repeat("ab", 32), Size: 3 << 20,
		State: controller.RolloutActive, Created: cliTestTime, Updated: cliTestTime,
		Counts: map[string]int{controller.JobDownloading: 1, controller.JobFailed: 1},
		Spec:   spec, Devices: 2, WavesStarted: 1,
		Waves: []controller.WaveStatus{{Percent: 100, State: controller.WaveRunning, Devices: 2,
			Counts: map[string]int{controller.JobDownloading: 1, controller.JobFailed: 1}}},
	}
	f.specs = append(f.specs, spec)
	jobs := []controller.Job{
		{ID: "j1", Rollout: id, Device: "dev-1", From: "1.0.0", To: spec.Version, State: controller.JobDownloading, Bytes: 1 << 20, Created: cliTestTime, Updated: cliTestTime},
		{ID: "j2", Rollout: id, Device: "dev-2", From: "1.0.0", To: spec.Version, State: controller.JobFailed, Reason: "hash-mismatch\x1b[2J", Created: cliTestTime, Updated: cliTestTime},
	}
	f.details = append(f.details, controller.RolloutDetail{Rollout: r, Jobs: jobs})
	return r, nil
}

func (f *cliFakeRollouts) ListRollouts() ([]controller.Rollout, error) {
	f.mu.Lock()
	defer f.mu.Unlock()
	var list []controller.Rollout
	for _, d := range f.details {
		list = append(list, d.Rollout)
	}
	return list, nil
}

func (f *cliFakeRollouts) GetRollout(id string) (controller.RolloutDetail, error) {
	f.mu.Lock()
	defer f.mu.Unlock()
	for _, d := range f.details {
		if d.ID == id {
			return d, nil
		}
	}
	return controller.RolloutDetail{}, fmt.Errorf("rollout %s %w", id, controller.ErrNotFound)
}

func (f *cliFakeRollouts) Rollout(id string) (controller.Rollout, error) {
	d, err := f.GetRollout(id)
	return d.Rollout, err
}

func (f *cliFakeRollouts) Jobs(id string, q controller.JobQuery) ([]controller.Job, error) {
	d, err := f.GetRollout(id)
	if err != nil {
		return nil, err
	}
	var out []controller.Job
	for _, j := range d.Jobs {
		if (q.State == "" || j.State == q.State) && j.Device > q.After && (q.Limit == 0 || len(out) < q.Limit) {
			out = append(out, j)
		}
	}
	return out, nil
}

func (f *cliFakeRollouts) setState(id, state, reason string) (controller.Rollout, error) {
	f.mu.Lock()
	defer f.mu.Unlock()
	for i, d := range f.details {
		if d.ID == id {
			f.details[i].State, f.details[i].Reason = state, reason
			return f.details[i].Rollout, nil
		}
	}
	return controller.Rollout{}, fmt.Errorf("rollout %s %w", id, controller.ErrNotFound)
}

func (f *cliFakeRollouts) PauseRollout(id, reason string) (controller.Rollout, error) {
	return f.setState(id, controller.RolloutPaused, reason)
}

func (f *cliFakeRollouts) ResumeRollout(id string) (controller.Rollout, error) {
	return f.setState(id, controller.RolloutActive, "")
}

func (f *cliFakeRollouts) CancelRollout(id string) (controller.Rollout, error) {
	return f.setState(id, controller.RolloutCanceling, "canceled by the operator")
}

func (f *cliFakeRollouts) Events(id string, after uint64, limit int) (controller.EventLog, error) {
	if _, err := f.GetRollout(id); err != nil {
		return controller.EventLog{}, err
	}
	log := controller.EventLog{Total: 3}
	for seq := after + 1; seq <= 3 && (limit == 0 || len(log.Events) < limit); seq++ {
		log.Events = append(log.Events, controller.Event{Seq: seq, Time: cliTestTime, Device: "dev-1", Job: "j1", From: "offered", To: "downloading"})
	}
	return log, nil
}

func (f *cliFakeRollouts) TagDevice(id string, tags map[string]string) (controller.Device, error) {
	f.mu.Lock()
	defer f.mu.Unlock()
	for i, d := range f.devices {
		if d.ID == id {
			next := map[string]string{}
			for k, v := range d.Tags {
				next[k] = v
			}
			for k, v := range tags {
				if v == "" {
					delete(next, k)
				} else {
					next[k] = v
				}
			}
			f.devices[i].Tags = next
			return f.devices[i], nil
		}
	}
	return controller.Device{}, fmt.Errorf("device %s %w", id, controller.ErrNotFound)
}

func (f *cliFakeRollouts) WithoutNewRollouts(fn func() error) error { return fn() }

func (f *cliFakeRollouts) InUse(model, version string) bool {
	f.mu.Lock()
	defer f.mu.Unlock()
	for _, d := range f.details {
		switch d.State {
		case controller.RolloutCompleted, controller.RolloutCanceled, controller.RolloutSuperseded:
			continue
		}
		if d.Model == model && d.Version == version {
			return true
		}
	}
	return false
}

func (f *cliFakeRollouts) ListDevices() ([]controller.Device, error) {
	f.mu.Lock()
	defer f.mu.Unlock()
	return slices.Clone(f.devices), nil
}

func (f *cliFakeRollouts) GetDevice(id string) (controller.Device, error) {
	f.mu.Lock()
	defer f.mu.Unlock()
	for _, d := range f.devices {
		if d.ID == id {
			return d, nil
		}
	}
	return controller.Device{}, fmt.Errorf("device %s %w", id, controller.ErrNotFound)
}

type adminAPI struct {
	url, certs string
	store      *cliFakeStore
	rollouts   *cliFakeRollouts
}

// startAdminAPI runs a real api.Server with fakes behind it, on 127.0.0.1:0, and clears the
// environment the CLI reads so that only flags count.
func startAdminAPI(t *testing.T) *adminAPI {
	t.Helper()
	t.Setenv(serverEnv, "")
	t.Setenv(certsDirEnv, "")
	ca := certstest.New(t)
	a := &adminAPI{certs: ca.Dir, store: &cliFakeStore{}, rollouts: &cliFakeRollouts{
		devices: []controller.Device{
			{ID: "dev-1", Model: "primehub", Version: "1.0.0", Online: true, LastSeen: cliTestTime, Job: "r1/j1"},
			{ID: "dev-2", Model: "primehub", Version: "1.0.0", LastSeen: cliTestTime},
		},
	}}
	srv, err := api.New(api.Options{
		Addr: "127.0.0.1:0", TLS: ca.ServerTLS(t), Rollouts: a.rollouts, Firmware: a.store,
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
	a.url = "https://" + srv.Addr().String()
	return a
}

// fota runs the CLI against a with args and returns the exit code, stdout and stderr.
func (a *adminAPI) fota(t *testing.T, args ...string) (int, string, string) {
	t.Helper()
	args = append(args, "--server", a.url, "--certs", a.certs)
	var out, errOut bytes.Buffer
	code := run(args, &out, &errOut)
	return code, out.String(), errOut.String()
}

func writeTestFile(t *testing.T, name string, data []byte) string {
	t.Helper()
	path := filepath.Join(t.TempDir(), name)
	if err := os.WriteFile(path, data, 0o600); err != nil {
		t.Fatal(err)
	}
	return path
}

// closedPort returns a loopback address nothing listens on.
func closedPort(t *testing.T) string {
	t.Helper()
	ln, err := net.Listen("tcp", "127.0.0.1:0")
	if err != nil {
		t.Fatal(err)
	}
	addr := ln.Addr().String()
	ln.Close()
	return addr
}

func TestAdminCLIErrors(t *testing.T) {
	a := startAdminAPI(t)
	image := writeTestFile(t, "fw.bin", []byte("firmware image"))
	empty := writeTestFile(t, "empty.bin", nil)
	dead := "https://" + closedPort(t)
	missing := filepath.Join(t.TempDir(), "nope.bin")
	tests := []struct {
		name     string
		args     []string
		wantCode int
		wantErr  string // the whole stderr line, without "fota: " and the newline
	}{
		{"unknown flag", []string{"firmware", "list", "--bogus", "--certs", a.certs}, 2,
			"firmware list: flag provided but not defined: -bogus"},
		{"missing sub-command", []string{"rollout"}, 2, "rollout: missing sub-command, one of: cancel, create, events, list, pause, resume, show, watch"},
		{"unknown sub-command", []string{"device", "remove"}, 2, `device: unknown sub-command "remove", want one of: list, show, tag`},
		{"missing certs", []string{"device", "list"}, 2, "device list: --certs is required (or set $FOTA_CERTS)"},
		{"plain http server", []string{"device", "list", "--certs", a.certs, "--server", "http://127.0.0.1:8080"}, 2,
			`device list: bad --server "http://127.0.0.1:8080": want https://HOST:PORT`},
		{"missing file", []string{"firmware", "add", "--model", "primehub", "--version", "1.2.3", "--file", missing, "--certs", a.certs, "--server", a.url}, 1,
			"firmware add: cannot read firmware file " + missing + ": no such file or directory"},
		{"empty file", []string{"firmware", "add", "--model", "primehub", "--version", "1.2.3", "--file", empty, "--certs", a.certs, "--server", a.url}, 1,
			"firmware add: firmware file " + empty + " is empty"},
		{"bad version", []string{"firmware", "add", "--model", "primehub", "--version", "1.2.x", "--file", image, "--certs", a.certs}, 2,
			`firmware add: bad version "1.2.x": want MAJOR.MINOR.PATCH with an optional -PRERELEASE, e.g. 1.2.3`},
		{"missing model", []string{"firmware", "add", "--version", "1.2.3", "--file", image, "--certs", a.certs}, 2,
			"firmware add: --model is required"},
		{"missing rollout id", []string{"rollout", "show", "--json", "--certs", a.certs}, 2, "rollout show: missing rollout ID"},
		{"two rollout ids", []string{"rollout", "show", "r1", "r2", "--certs", a.certs}, 2, `rollout show: unexpected argument "r2"`},
		{"unreachable server", []string{"firmware", "add", "--model", "primehub", "--version", "1.2.3", "--file", image, "--certs", a.certs, "--server", dead}, 1,
			"cannot reach fota server at " + dead + ": connection refused"},
		{"unreachable server on list", []string{"rollout", "list", "--certs", a.certs, "--server", dead}, 1,
			"cannot reach fota server at " + dead + ": connection refused"},
		{"certs dir without admin cert", []string{"device", "list", "--certs", t.TempDir(), "--server", a.url}, 1, ""},
		{"server error", []string{"rollout", "show", "nope", "--certs", a.certs, "--server", a.url}, 1,
			"fota server: rollout nope not found (404)"},
		{"firmware missing on server", []string{"rollout", "create", "--model", "primehub", "--version", "9.9.9", "--certs", a.certs, "--server", a.url}, 1,
			"fota server: firmware primehub 9.9.9 not found (404)"},
	}
	for _, tt := range tests {
		t.Run(tt.name, func(t *testing.T) {
			var out, errOut bytes.Buffer
			code := run(tt.args, &out, &errOut)
			stderr := errOut.String()
			if code != tt.wantCode {
				t.Errorf("got exit %d, want %d (stderr %q)", code, tt.wantCode, stderr)
			}
			if !strings.HasPrefix(stderr, "fota: ") || !strings.HasSuffix(stderr, "\n") || strings.Count(stderr, "\n") != 1 {
				t.Errorf("got stderr %q, want one line starting with \"fota: \"", stderr)
			}
			if strings.Contains(stderr, "goroutine") || strings.Contains(stderr, "panic") {
				t.Errorf("got stderr %q, want no panic", stderr)
			}
			if want := "fota: " + tt.wantErr + "\n"; tt.wantErr != "" && stderr != want {
				t.Errorf("got stderr %q, want %q", stderr, want)
			}
			// Nothing may write to stdout on failure, not even the flag usage.
			if out.Len() != 0 {
				t.Errorf("got stdout %q, want nothing", out.String())
			}
		})
	}
	if n := len(a.store.list); n != 0 {
		t.Errorf("got %d firmware stored, want 0", n)
	}
}

func TestAdminCLIEnvDefaults(t *testing.T) {
	a := startAdminAPI(t)
	t.Setenv(serverEnv, a.url)
	t.Setenv(certsDirEnv, a.certs)
	var out, errOut bytes.Buffer
	if code := run([]string{"device", "list", "--json"}, &out, &errOut); code != 0 {
		t.Fatalf("got exit %d, stderr %q; want 0", code, errOut.String())
	}
	var got []controller.Device
	if err := json.Unmarshal(out.Bytes(), &got); err != nil || !reflect.DeepEqual(got, a.rollouts.devices) {
		t.Errorf("got %+v (%v), want %+v", got, err, a.rollouts.devices)
	}
}

func TestAdminCLIHappyPath(t *testing.T) {
	a := startAdminAPI(t)
	image := []byte(strings.Repeat("primehub firmware 1.2.3\n", 1000))
	file := writeTestFile(t, "primehub-1.2.3.bin", image)

	t.Run("firmware add", func(t *testing.T) {
		code, out, errOut := a.fota(t, "firmware", "add", "--model", "primehub", "--version", "1.2.3", "--file", file, "--notes", "fixes wifi")
		if code != 0 {
			t.Fatalf("got exit %d, stderr %q; want 0", code, errOut)
		}
		sum := sha256.Sum256(image)
		want := fmt.Sprintf("added firmware primehub 1.2.3: 23.4 KiB, counter 1, sha256 %x\n", sum)
		if out != want {
			t.Errorf("got %q, want %q", out, want)
		}
		if got := a.store.bodies["primehub 1.2.3"]; !bytes.Equal(got, image) {
			t.Errorf("server got %d bytes, want the %d of the file", len(got), len(image))
		}
	})
	t.Run("firmware add again", func(t *testing.T) {
		code, out, errOut := a.fota(t, "firmware", "add", "--model", "primehub", "--version", "1.2.3", "--file", file)
		if code != 0 || !strings.HasPrefix(out, "firmware primehub 1.2.3 was already stored with this image: 23.4 KiB, counter 1, ") {
			t.Errorf("got exit %d, stdout %q, stderr %q; want 0 and already stored", code, out, errOut)
		}
	})
	t.Run("firmware list", func(t *testing.T) {
		code, out, errOut := a.fota(t, "firmware", "list")
		if code != 0 {
			t.Fatalf("got exit %d, stderr %q; want 0", code, errOut)
		}
		lines := strings.Split(strings.TrimSuffix(out, "\n"), "\n")
		if len(lines) != 2 || !strings.HasPrefix(lines[0], "MODEL     VERSION  COUNTER  SIGNED  SIZE      SHA256        EXPIRES  CREATED") ||
			!strings.HasPrefix(lines[1], "primehub  1.2.3    1        no      23.4 KiB  ") || !strings.HasSuffix(lines[1], "  fixes wifi") {
			t.Errorf("got\n%s\nwant a header and one aligned row for primehub 1.2.3", out)
		}
	})
	t.Run("firmware list --json", func(t *testing.T) {
		code, out, errOut := a.fota(t, "firmware", "list", "--json")
		if code != 0 {
			t.Fatalf("got exit %d, stderr %q; want 0", code, errOut)
		}
		var got []firmware.Firmware
		if err := json.Unmarshal([]byte(out), &got); err != nil || !reflect.DeepEqual(got, a.store.list) {
			t.Errorf("got %+v (%v), want %+v", got, err, a.store.list)
		}
	})

	var created controller.Rollout
	t.Run("rollout create --json", func(t *testing.T) {
		code, out, errOut := a.fota(t, "rollout", "create", "--model", "primehub", "--version", "1.2.3", "--json")
		if code != 0 {
			t.Fatalf("got exit %d, stderr %q; want 0", code, errOut)
		}
		if err := json.Unmarshal([]byte(out), &created); err != nil {
			t.Fatalf("got %q, want a JSON rollout: %v", out, err)
		}
		if created.ID != "r1" || created.Model != "primehub" || created.Version != "1.2.3" {
			t.Errorf("got %+v, want rollout r1 of primehub 1.2.3", created)
		}
	})
	t.Run("rollout create", func(t *testing.T) {
		code, out, errOut := a.fota(t, "rollout", "create", "--model", "primehub", "--version", "1.2.3")
		want := "rollout r2 created: primehub 1.2.3, active, 2 devices: downloading 1, failed 1\n"
		if code != 0 || out != want {
			t.Errorf("got exit %d, stdout %q, stderr %q; want 0 and %q", code, out, errOut, want)
		}
	})
	t.Run("rollout show --json", func(t *testing.T) {
		// The ID before the flags, as people type it.
		var out, errOut bytes.Buffer
		code := run([]string{"rollout", "show", "r1", "--json", "--server", a.url, "--certs", a.certs}, &out, &errOut)
		if code != 0 {
			t.Fatalf("got exit %d, stderr %q; want 0", code, errOut.String())
		}
		var got controller.RolloutDetail
		want, _ := a.rollouts.GetRollout("r1")
		if err := json.Unmarshal(out.Bytes(), &got); err != nil || !reflect.DeepEqual(got, want) {
			t.Errorf("got %+v (%v), want %+v", got, err, want)
		}
	})
	t.Run("rollout show", func(t *testing.T) {
		code, out, errOut := a.fota(t, "rollout", "show", "r1")
		if code != 0 {
			t.Fatalf("got exit %d, stderr %q; want 0", code, errOut)
		}
		for _, want := range []string{
			"rollout  r1\n",
			"state    active\n",
			"devices  2 devices: downloading 1, failed 1\n",
			"\nDEVICE  FROM   TO     STATE        BYTES    REASON\n",
			"dev-1   1.0.0  1.2.3  downloading  1.0 MiB  -\n",
			"dev-2   1.0.0  1.2.3  failed       0 B      hash-mismatch?[2J\n",
		} {
			if !strings.Contains(out, want) {
				t.Errorf("got\n%s\nwant it to contain %q", out, want)
			}
		}
		if strings.Contains(out, "\x1b") {
			t.Errorf("got an escape character in %q, want it replaced", out)
		}
	})
	t.Run("rollout list", func(t *testing.T) {
		code, out, errOut := a.fota(t, "rollout", "list")
		lines := strings.Split(strings.TrimSuffix(out, "\n"), "\n")
		if code != 0 || len(lines) != 3 || !strings.HasPrefix(lines[1], "r1  primehub  1.2.3    active  2        0          1       1/1    ") {
			t.Errorf("got exit %d, stderr %q, stdout\n%s\nwant a header and rows for r1 and r2", code, errOut, out)
		}
	})
	t.Run("device list", func(t *testing.T) {
		code, out, errOut := a.fota(t, "device", "list")
		lines := strings.Split(strings.TrimSuffix(out, "\n"), "\n")
		if code != 0 || len(lines) != 3 || !strings.HasPrefix(lines[1], "dev-1  primehub  1.0.0    yes     ") || !strings.HasSuffix(lines[1], "  r1/j1") {
			t.Errorf("got exit %d, stderr %q, stdout\n%s\nwant a header and rows for dev-1 and dev-2", code, errOut, out)
		}
	})
	t.Run("device show --json", func(t *testing.T) {
		code, out, errOut := a.fota(t, "device", "show", "dev-2", "--json")
		var got controller.Device
		if err := json.Unmarshal([]byte(out), &got); code != 0 || err != nil || !reflect.DeepEqual(got, a.rollouts.devices[1]) {
			t.Errorf("got exit %d, stderr %q, device %+v (%v); want %+v", code, errOut, got, err, a.rollouts.devices[1])
		}
	})
	t.Run("device show", func(t *testing.T) {
		code, out, errOut := a.fota(t, "device", "show", "dev-1")
		if code != 0 || !strings.Contains(out, "device     dev-1\n") || !strings.Contains(out, "online     yes\n") {
			t.Errorf("got exit %d, stderr %q, stdout\n%s\nwant dev-1 online", code, errOut, out)
		}
	})
}

func TestRolloutCLI(t *testing.T) {
	a := startAdminAPI(t)
	if code, _, errOut := a.fota(t, "rollout", "create", "--model", "primehub", "--version", "1.2.3"); code != 0 {
		t.Fatalf("create: exit %d, %s", code, errOut)
	}
	t.Run("create with every control", func(t *testing.T) {
		code, out, errOut := a.fota(t, "rollout", "create", "--model", "primehub", "--version", "1.2.3", "--json",
			"--tags", "ring=beta", "--tags", "site=lyon", "--devices", "dev-1,dev-2", "--percent", "50", "--waves", "1,10,50,100",
			"--gate", "90", "--soak", "1h", "--start", "2030-01-02T03:04:05Z", "--window", "0 2 * * *", "--window-duration", "4h",
			"--tz", "Europe/Paris", "--window-end", "pause", "--max-concurrent", "7", "--offer-jitter", "30s",
			"--timeout-offered", "1m", "--timeout-downloading", "2m", "--timeout-installing", "3m", "--max-attempts", "5",
			"--abort-failure-rate", "5", "--abort-min-finished", "20")
		if code != 0 {
			t.Fatalf("got exit %d, stderr %q", code, errOut)
		}
		var r controller.Rollout
		if err := json.Unmarshal([]byte(out), &r); err != nil || r.ID != "r2" {
			t.Fatalf("got %q (%v), want the new rollout as JSON with its id", out, err)
		}
		got := a.rollouts.specs[len(a.rollouts.specs)-1]
		want := controller.RolloutSpec{Model: "primehub", Version: "1.2.3", Tags: map[string]string{"ring": "beta", "site": "lyon"},
			Devices: []string{"dev-1", "dev-2"}, Percent: 50, Waves: []int{1, 10, 50, 100}, Gate: 90, Soak: controller.Duration(time.Hour),
			Start: time.Date(2030, 1, 2, 3, 4, 5, 0, time.UTC), Window: "0 2 * * *", WindowDuration: controller.Duration(4 * time.Hour),
			TZ: "Europe/Paris", WindowEnd: "pause", MaxConcurrent: 7, OfferJitter: controller.Duration(30 * time.Second),
			TimeoutOffered: controller.Duration(time.Minute), TimeoutDownloading: controller.Duration(2 * time.Minute),
			TimeoutInstalling: controller.Duration(3 * time.Minute), MaxAttempts: 5, AbortFailureRate: 5, AbortMinFinished: 20}
		if !reflect.DeepEqual(got, want) {
			t.Fatalf("got spec %+v, want %+v", got, want)
		}
	})
	usage := []struct {
		name string
		args []string
		want string
	}{
		{"bad waves", []string{"--waves", "1,x"}, `rollout create: --waves "1,x": want percentages like 1,10,50,100`},
		{"bad tag", []string{"--tags", "ring"}, `rollout create: invalid value "ring" for flag -tags: want key=value, got "ring"`},
		{"bad window end", []string{"--window-end", "stop"}, `rollout create: --window-end "stop": want continue or pause`},
		{"window alone", []string{"--window", "0 2 * * *"}, "rollout create: --window and --window-duration go together"},
		{"bad start", []string{"--start", "tomorrow"}, `rollout create: --start: bad time "tomorrow": want RFC 3339, e.g. 2025-03-04T02:00:00Z, or +2h`},
		{"bad device", []string{"--devices", "a/b"}, `rollout create: --devices: invalid device id: "a/b" may not contain '/'`},
	}
	for _, tc := range usage {
		t.Run(tc.name, func(t *testing.T) {
			args := append([]string{"rollout", "create", "--model", "primehub", "--version", "1.2.3"}, tc.args...)
			code, out, errOut := a.fota(t, args...)
			if code != 2 || errOut != "fota: "+tc.want+"\n" || out != "" {
				t.Fatalf("got exit %d, stderr %q, stdout %q; want 2 and %q", code, errOut, out, tc.want)
			}
		})
	}
	lines := []struct {
		name string
		args []string
		want []string
	}{
		{"pause", []string{"rollout", "pause", "r1", "--reason", "checking logs"}, []string{"rollout r1 paused (checking logs)\n"}},
		{"resume", []string{"rollout", "resume", "r1"}, []string{"rollout r1 active\n"}},
		{"events", []string{"rollout", "events", "r1"}, []string{"SEQ  TIME", "3    ", "offered  downloading"}},
		{"watch once", []string{"rollout", "watch", "r1", "--once"}, []string{"rollout r1  primehub 1.2.3  active  1/2 finished  ETA unknown\n",
			"wave 1  100% [xxxxxxxxxxxxxxx>>>>>>>>>>>>>>>] running  2 devices, downloading 1, failed 1\n"}},
		{"show failed", []string{"rollout", "show", "r1", "--failed"}, []string{"DEVICE  FROM   TO     ATTEMPTS", "dev-2   1.0.0  1.2.3  0", "hash-mismatch?[2J"}},
		{"show waves", []string{"rollout", "show", "r1"}, []string{"WAVE  PERCENT  STATE    DEVICES  INSTALLED  FAILED  IN FLIGHT  WAITING", "1     100%     running  2        0          1       1"}},
		{"cancel", []string{"rollout", "cancel", "r1"}, []string{"rollout r1 canceling: waiting for 0 devices verifying or installing to report\n"}},
		{"device tag", []string{"device", "tag", "dev-1", "ring=beta", "site=lyon"}, []string{"device dev-1 tags: ring=beta,site=lyon\n"}},
		{"device untag", []string{"device", "tag", "dev-1", "site="}, []string{"device dev-1 tags: ring=beta\n"}},
		{"device show tags", []string{"device", "show", "dev-1"}, []string{"tags       ring=beta\n"}},
	}
	for _, tc := range lines {
		t.Run(tc.name, func(t *testing.T) {
			code, out, errOut := a.fota(t, tc.args...)
			if code != 0 {
				t.Fatalf("got exit %d, stderr %q", code, errOut)
			}
			for _, w := range tc.want {
				if !strings.Contains(out, w) {
					t.Errorf("got\n%s\nwant it to contain %q", out, w)
				}
			}
			if strings.Contains(out, "\x1b") {
				t.Errorf("got an escape character in %q", out)
			}
		})
	}
	if code, _, errOut := a.fota(t, "device", "tag", "dev-1", "bad key=x"); code != 2 || !strings.Contains(errOut, "tag key") {
		t.Fatalf("got exit %d, stderr %q; want a usage error about the key", code, errOut)
	}
}

func TestFirmwareDeleteCLI(t *testing.T) {
	a := startAdminAPI(t)
	for _, v := range []string{"1.2.3", "1.2.4"} {
		file := writeTestFile(t, "fw-"+v+".bin", []byte("primehub firmware "+v))
		if code, _, errOut := a.fota(t, "firmware", "add", "--model", "primehub", "--version", v, "--file", file); code != 0 {
			t.Fatalf("add %s: exit %d, %s", v, code, errOut)
		}
	}
	if code, _, errOut := a.fota(t, "rollout", "create", "--model", "primehub", "--version", "1.2.4"); code != 0 {
		t.Fatalf("create: exit %d, %s", code, errOut)
	}
	stored := func() []string {
		a.store.mu.Lock()
		defer a.store.mu.Unlock()
		var vs []string
		for _, f := range a.store.list {
			vs = append(vs, f.Version)
		}
		return vs
	}
	tests := []struct {
		name       string
		args       []string
		wantCode   int
		wantOut    string
		wantErr    string // the whole stderr line, without "fota: " and the newline
		wantStored []string
	}{
		{"in use", []string{"--model", "primehub", "--version", "1.2.4"}, 1, "",
			"fota server: firmware primehub 1.2.4 is used by an unfinished rollout: rollout r1 is active; cancel it first (409)", []string{"1.2.3", "1.2.4"}},
		{"unknown", []string{"--model", "primehub", "--version", "9.9.9"}, 1, "",
			"fota server: firmware primehub 9.9.9 not found (404)", []string{"1.2.3", "1.2.4"}},
		{"missing version", []string{"--model", "primehub"}, 2, "", "firmware delete: --version is required", []string{"1.2.3", "1.2.4"}},
		{"missing model", []string{"--version", "1.2.3"}, 2, "", "firmware delete: --model is required", []string{"1.2.3", "1.2.4"}},
		{"bad version", []string{"--model", "primehub", "--version", "1.2.x"}, 2, "",
			`firmware delete: bad version "1.2.x": want MAJOR.MINOR.PATCH with an optional -PRERELEASE, e.g. 1.2.3`, []string{"1.2.3", "1.2.4"}},
		{"bad model", []string{"--model", "prime/hub", "--version", "1.2.3"}, 2, "",
			`firmware delete: --model: invalid model name: model "prime/hub": only letters, digits, '.', '_' and '-' are allowed`, []string{"1.2.3", "1.2.4"}},
		{"extra argument", []string{"--model", "primehub", "--version", "1.2.3", "now"}, 2, "", `firmware delete: unexpected argument "now"`, []string{"1.2.3", "1.2.4"}},
		{"deleted", []string{"--model", "primehub", "--version", "v1.2.3"}, 0, "deleted firmware primehub 1.2.3\n", "", []string{"1.2.4"}},
		{"deleted twice", []string{"--model", "primehub", "--version", "1.2.3"}, 1, "",
			"fota server: firmware primehub 1.2.3 not found (404)", []string{"1.2.4"}},
	}
	for _, tt := range tests {
		t.Run(tt.name, func(t *testing.T) {
			code, out, errOut := a.fota(t, append([]string{"firmware", "delete"}, tt.args...)...)
			wantErr := ""
			if tt.wantErr != "" {
				wantErr = "fota: " + tt.wantErr + "\n"
			}
			if code != tt.wantCode || out != tt.wantOut || errOut != wantErr {
				t.Errorf("got exit %d, stdout %q, stderr %q; want %d, %q, %q", code, out, errOut, tt.wantCode, tt.wantOut, wantErr)
			}
			if got := stored(); !slices.Equal(got, tt.wantStored) {
				t.Errorf("got stored versions %v, want %v", got, tt.wantStored)
			}
		})
	}
}

func TestParseStart(t *testing.T) {
	now := time.Date(2025, 3, 4, 5, 6, 7, 0, time.UTC)
	tests := []struct {
		in   string
		want time.Time
		ok   bool
	}{
		{"+2h", now.Add(2 * time.Hour), true},
		{"2030-01-02T03:04:05+01:00", time.Date(2030, 1, 2, 2, 4, 5, 0, time.UTC), true},
		{"+-1h", time.Time{}, false},
		{"tomorrow", time.Time{}, false},
	}
	for _, tc := range tests {
		t.Run(tc.in, func(t *testing.T) {
			got, err := parseStart(tc.in, now)
			if (err == nil) != tc.ok || !got.Equal(tc.want) {
				t.Fatalf("got %v (%v), want %v ok=%v", got, err, tc.want, tc.ok)
			}
		})
	}
}
