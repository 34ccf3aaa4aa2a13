package api

import (
	"bytes"
	"context"
	"crypto/tls"
	"encoding/json"
	"errors"
	"fmt"
	"io"
	"log/slog"
	"net"
	"net/http"
	"reflect"
	"strings"
	"syscall"
	"testing"
	"time"

	"github.com/fota-dev/fota/certs/certstest"
	"github.com/fota-dev/fota/controller"
	"github.com/fota-dev/fota/firmware"
)

type env struct {
	ca       *certstest.CA
	srv      *Server
	rollouts *fakeRollouts
	store    *fakeStore
	url      string
}

// start runs a server on 127.0.0.1:0 with fresh fakes and a fresh CA; opts may adjust Options.
func start(t *testing.T, opts ...func(*Options)) *env {
	t.Helper()
	e := &env{ca: certstest.New(t), rollouts: &fakeRollouts{}, store: &fakeStore{}}
	o := Options{
		Addr:     "127.0.0.1:0",
		TLS:      e.ca.ServerTLS(t),
		Rollouts: e.rollouts,
		Firmware: e.store,
		Logger:   slog.New(slog.DiscardHandler),
	}
	for _, f := range opts {
		f(&o)
	}
	srv, err := New(o)
	if err != nil {
		t.Fatalf("New: %v", err)
	}
	if err := srv.Start(); err != nil {
		t.Fatalf("Start: %v", err)
	}
	t.Cleanup(func() {
		ctx, cancel := context.WithTimeout(context.Background(), 5*time.Second)
		defer cancel()
		if err := srv.Close(ctx); err != nil {
			t.Errorf("Close: %v", err)
		}
	})
	e.srv = srv
	e.url = "https://" + srv.Addr().String()
	return e
}

func (e *env) client(t *testing.T, tc *tls.Config) *Client {
	t.Helper()
	c := NewClient(e.url, tc)
	t.Cleanup(c.Close)
	return c
}

func (e *env) admin(t *testing.T) *Client {
	t.Helper()
	return e.client(t, e.ca.AdminTLS(t))
}

// statusOf returns the status of an *Error, or 0 with a test failure for any other error.
func statusOf(t *testing.T, err error) (int, string) {
	t.Helper()
	var ae *Error
	if !errors.As(err, &ae) {
		t.Fatalf("got error %v (%T), want *api.Error", err, err)
	}
	return ae.StatusCode, ae.Message
}

func TestNewValidatesOptions(t *testing.T) {
	ca := certstest.New(t)
	good := Options{TLS: ca.ServerTLS(t), Rollouts: &fakeRollouts{}, Firmware: &fakeStore{}}
	noVerify := ca.ServerTLS(t)
	noVerify.ClientAuth = tls.RequestClientCert
	tests := []struct {
		name string
		edit func(*Options)
	}{
		{"no TLS", func(o *Options) { o.TLS = nil }},
		{"client certs not verified", func(o *Options) { o.TLS = noVerify }},
		{"no rollouts", func(o *Options) { o.Rollouts = nil }},
		{"no firmware", func(o *Options) { o.Firmware = nil }},
	}
	for _, tt := range tests {
		t.Run(tt.name, func(t *testing.T) {
			o := good
			tt.edit(&o)
			if _, err := New(o); err == nil {
				t.Fatal("got nil error, want one")
			}
		})
	}
	s, err := New(good)
	if err != nil {
		t.Fatalf("New with good options: %v", err)
	}
	if s.opts.Addr != DefaultAddr || s.opts.MaxUpload != DefaultMaxUpload {
		t.Errorf("got addr %q, max upload %d; want defaults %q, %d", s.opts.Addr, s.opts.MaxUpload, DefaultAddr, DefaultMaxUpload)
	}
	if s.Addr() != nil {
		t.Errorf("got Addr %v before Start, want nil", s.Addr())
	}
}

func TestAuthentication(t *testing.T) {
	e := start(t)
	ctx := context.Background()

	t.Run("admin", func(t *testing.T) {
		if err := e.admin(t).Health(ctx); err != nil {
			t.Fatalf("got %v, want nil", err)
		}
	})
	t.Run("device cert", func(t *testing.T) {
		err := e.client(t, e.ca.DeviceTLS(t, "dev-1", "primehub")).Health(ctx)
		status, msg := statusOf(t, err)
		if status != http.StatusForbidden || !strings.Contains(msg, "admin") {
			t.Errorf("got %d %q, want 403 about the admin certificate", status, msg)
		}
	})
	t.Run("device cert named admin", func(t *testing.T) {
		_, err := e.client(t, e.ca.DeviceTLS(t, "admin", "primehub")).ListDevices(ctx)
		if status, _ := statusOf(t, err); status != http.StatusForbidden {
			t.Errorf("got %d, want 403", status)
		}
	})
	t.Run("no cert", func(t *testing.T) {
		tc := e.ca.AdminTLS(t)
		tc.Certificates = nil
		err := e.client(t, tc).Health(ctx)
		var ae *Error
		if err == nil || errors.As(err, &ae) {
			t.Fatalf("got %v, want a TLS failure", err)
		}
		if !strings.Contains(err.Error(), "tls") {
			t.Errorf("got %q, want it to mention tls", err)
		}
	})
	t.Run("foreign admin cert", func(t *testing.T) {
		tc := certstest.Foreign(t).AdminTLS(t)
		tc.RootCAs = e.ca.AdminTLS(t).RootCAs // trust the server, present a stranger's cert
		err := e.client(t, tc).Health(ctx)
		var ae *Error
		if err == nil || errors.As(err, &ae) {
			t.Fatalf("got %v, want a TLS failure", err)
		}
	})
	if got := e.store.calls.Load(); got != 0 {
		t.Errorf("got %d store calls, want 0", got)
	}
}

func TestRoutes(t *testing.T) {
	e := start(t)
	c := e.admin(t)
	ctx := context.Background()
	e.rollouts.devices = []controller.Device{
		{ID: "dev-1", Model: "primehub", Version: "1.0.0", Online: true, LastSeen: testTime},
		{ID: "dev-2", Model: "primehub", Version: "1.1.0", LastSeen: testTime},
	}

	t.Run("empty lists are empty", func(t *testing.T) {
		fw, err := c.ListFirmware(ctx)
		if err != nil || fw == nil || len(fw) != 0 {
			t.Errorf("ListFirmware: got %#v, %v; want empty non-nil list", fw, err)
		}
		ro, err := c.ListRollouts(ctx)
		if err != nil || ro == nil || len(ro) != 0 {
			t.Errorf("ListRollouts: got %#v, %v; want empty non-nil list", ro, err)
		}
	})

	var added firmware.Firmware
	t.Run("add firmware", func(t *testing.T) {
		f, created, err := c.AddFirmware(ctx, "primehub", "1.2.0", "fixes wifi", strings.NewReader("image-bytes"))
		if err != nil {
			t.Fatalf("AddFirmware: %v", err)
		}
		want := firmware.Firmware{Model: "primehub", Version: "1.2.0", Size: 11, SHA256: fmt.Sprintf("%064x", 11), Counter: 1, Notes: "fixes wifi", Created: testTime}
		if !created || !reflect.DeepEqual(f, want) {
			t.Errorf("got %+v created=%v, want %+v created=true", f, created, want)
		}
		added = f
	})
	t.Run("add same firmware again", func(t *testing.T) {
		f, created, err := c.AddFirmware(ctx, "primehub", "1.2.0", "fixes wifi", strings.NewReader("image-bytes"))
		if err != nil || created || !reflect.DeepEqual(f, added) {
			t.Errorf("got %+v created=%v err=%v, want %+v created=false", f, created, err, added)
		}
	})
	t.Run("list firmware", func(t *testing.T) {
		list, err := c.ListFirmware(ctx)
		if err != nil || !reflect.DeepEqual(list, []firmware.Firmware{added}) {
			t.Errorf("got %+v, %v; want [%+v]", list, err, added)
		}
	})

	var created controller.Rollout
	t.Run("create rollout", func(t *testing.T) {
		r, err := c.CreateRollout(ctx, controller.RolloutSpec{Model: "primehub", Version: "1.2.0"})
		if err != nil {
			t.Fatalf("CreateRollout: %v", err)
		}
		if r.ID != "r1" || r.Model != "primehub" || r.Version != "1.2.0" || r.Counts[controller.JobPending] != 2 {
			t.Errorf("got %+v, want rollout r1 of primehub 1.2.0 with 2 pending", r)
		}
		created = r
	})
	t.Run("list rollouts", func(t *testing.T) {
		list, err := c.ListRollouts(ctx)
		if err != nil || !reflect.DeepEqual(list, []controller.Rollout{created}) {
			t.Errorf("got %+v, %v; want [%+v]", list, err, created)
		}
	})
	t.Run("get rollout", func(t *testing.T) {
		d, err := c.GetRollout(ctx, created.ID)
		want := controller.RolloutDetail{Rollout: created, Jobs: []controller.Job{}}
		if err != nil || !reflect.DeepEqual(d, want) {
			t.Errorf("got %+v, %v; want %+v", d, err, want)
		}
	})
	t.Run("list devices", func(t *testing.T) {
		list, err := c.ListDevices(ctx)
		want := make([]Device, len(e.rollouts.devices))
		for i, d := range e.rollouts.devices {
			want[i] = Device{Device: d}
		}
		if err != nil || !reflect.DeepEqual(list, want) {
			t.Errorf("got %+v, %v; want %+v", list, err, e.rollouts.devices)
		}
	})
	t.Run("get device", func(t *testing.T) {
		d, err := c.GetDevice(ctx, "dev-2")
		if err != nil || !reflect.DeepEqual(d, Device{Device: e.rollouts.devices[1]}) {
			t.Errorf("got %+v, %v; want %+v", d, err, e.rollouts.devices[1])
		}
	})
}

func TestErrorMapping(t *testing.T) {
	e := start(t)
	c := e.admin(t)
	ctx := context.Background()
	createRollout := func() error {
		_, err := c.CreateRollout(ctx, controller.RolloutSpec{Model: "primehub", Version: "9.9.9"})
		return err
	}
	addFirmware := func(model, version, body string) func() error {
		return func() error {
			_, _, err := c.AddFirmware(ctx, model, version, "", strings.NewReader(body))
			return err
		}
	}
	tests := []struct {
		name        string
		rolloutsErr error
		storeErr    error
		call        func() error
		wantStatus  int
		wantMsg     string
	}{
		{"rollout not found", nil, nil, func() error { _, err := c.GetRollout(ctx, "nope"); return err }, 404, `rollout "nope": not found`},
		{"device not found", nil, nil, func() error { _, err := c.GetDevice(ctx, "dev-9"); return err }, 404, `device "dev-9": not found`},
		{"rollout of missing firmware", fmt.Errorf("firmware primehub 9.9.9: %w", firmware.ErrNotFound), nil, createRollout, 404, "firmware primehub 9.9.9: firmware not found"},
		{"invalid rollout", fmt.Errorf("rollout: %w: model missing", controller.ErrInvalid), nil, createRollout, 400, "rollout: invalid request: model missing"},
		{"rollout conflict", fmt.Errorf("rollout: %w: one is active", controller.ErrConflict), nil, createRollout, 409, "rollout: conflict: one is active"},
		{"release expired", fmt.Errorf("%w: primehub 9.9.9 expired at 2025-01-01T00:00:00Z", controller.ErrExpired), nil, createRollout, 409, "release expired: primehub 9.9.9 expired at 2025-01-01T00:00:00Z"},
		{"state write failed", fmt.Errorf("%w: no space left on device", controller.ErrStateWrite), nil, createRollout, 503, "state write failed: no space left on device"},
		{"internal error hides detail", errors.New("bbolt: /var/lib/fota/state.db: corrupt"), nil, createRollout, 500, "internal server error; see the server log"},
		{"list internal error", errors.New("bbolt: /var/lib/fota/state.db: corrupt"), nil, func() error { _, err := c.ListDevices(ctx); return err }, 500, "internal server error; see the server log"},
		{"bad version", nil, nil, addFirmware("primehub", "1.x", "img"), 400, `invalid version "1.x": bad number "x"`},
		{"missing version", nil, nil, addFirmware("primehub", "", "img"), 400, `invalid version "": want MAJOR.MINOR.PATCH, e.g. 1.2.3`},
		{"bad model", nil, nil, addFirmware("prime hub", "1.0.0", "img"), 400, `invalid model name: model "prime hub": only letters, digits, '.', '_' and '-' are allowed`},
		{"empty image", nil, nil, addFirmware("primehub", "1.0.0", ""), 400, "firmware image is empty"},
		{"empty streamed image", nil, nil, func() error {
			_, _, err := c.AddFirmware(ctx, "primehub", "1.0.0", "", unsized{strings.NewReader("")})
			return err
		}, 400, "add firmware: firmware image is empty"},
		{"firmware conflict", nil, fmt.Errorf("add firmware primehub 1.0.0: %w", firmware.ErrConflict), addFirmware("primehub", "1.0.0", "img"), 409, "add firmware primehub 1.0.0: firmware version already exists with other content"},
		{"firmware in use", nil, fmt.Errorf("firmware primehub 1.0.0: %w", firmware.ErrInUse), addFirmware("primehub", "1.0.0", "img"), 409, "firmware primehub 1.0.0: firmware in use"},
		{"store says too large", nil, fmt.Errorf("add firmware: %w", firmware.ErrTooLarge), addFirmware("primehub", "1.0.0", "img"), 413, fmt.Sprintf("firmware image too large: the limit is %d bytes", DefaultMaxUpload)},
		{"firmware list fails", nil, errors.New("read /srv/x: EIO"), func() error { _, err := c.ListFirmware(ctx); return err }, 500, "internal server error; see the server log"},
		{"unsigned", nil, fmt.Errorf("add firmware primehub 1.0.0: %w: offline", firmware.ErrUnsigned), addFirmware("primehub", "1.0.0", "img"), 400, "add firmware primehub 1.0.0: firmware manifest not signed: offline"},
		{"bad signature", nil, fmt.Errorf("add firmware: %w: not by the release key", firmware.ErrBadSignature), addFirmware("primehub", "1.0.0", "img"), 400, "add firmware: bad manifest signature: not by the release key"},
		{"manifest mismatch", nil, fmt.Errorf("add firmware: %w: sha256", firmware.ErrManifestMismatch), addFirmware("primehub", "1.0.0", "img"), 400, "add firmware: manifest does not match the firmware: sha256"},
		{"malformed manifest", nil, fmt.Errorf("add firmware: %w: expiry", firmware.ErrBadManifest), addFirmware("primehub", "1.0.0", "img"), 400, "add firmware: malformed manifest: expiry"},
		{"expired manifest", nil, fmt.Errorf("add firmware: %w: yesterday", firmware.ErrExpired), addFirmware("primehub", "1.0.0", "img"), 400, "add firmware: manifest expired: yesterday"},
	}
	for _, tt := range tests {
		t.Run(tt.name, func(t *testing.T) {
			e.rollouts.mu.Lock()
			e.rollouts.err = tt.rolloutsErr
			e.rollouts.mu.Unlock()
			e.store.err = tt.storeErr
			err := tt.call()
			status, msg := statusOf(t, err)
			if status != tt.wantStatus || msg != tt.wantMsg {
				t.Errorf("got %d %q, want %d %q", status, msg, tt.wantStatus, tt.wantMsg)
			}
			wantText := fmt.Sprintf("fota server: %s (%d)", tt.wantMsg, tt.wantStatus)
			if err.Error() != wantText {
				t.Errorf("got error text %q, want %q", err.Error(), wantText)
			}
		})
	}
}

// rawDo sends a request with the admin certificate without going through Client, for what
// Client never sends.
func rawDo(t *testing.T, e *env, method, path, body string) (*http.Response, errorBody) {
	t.Helper()
	hc := &http.Client{Transport: &http.Transport{TLSClientConfig: e.ca.AdminTLS(t)}}
	defer hc.CloseIdleConnections()
	req, err := http.NewRequest(method, e.url+path, strings.NewReader(body))
	if err != nil {
		t.Fatal(err)
	}
	resp, err := hc.Do(req)
	if err != nil {
		t.Fatalf("%s %s: %v", method, path, err)
	}
	defer resp.Body.Close()
	var eb errorBody
	b, _ := io.ReadAll(resp.Body)
	if ct := resp.Header.Get("Content-Type"); ct != "application/json" {
		t.Errorf("got Content-Type %q, want application/json", ct)
	}
	if resp.StatusCode >= 400 {
		if err := json.Unmarshal(b, &eb); err != nil || eb.Error == "" {
			t.Errorf("got body %q, want a JSON error", b)
		}
	}
	return resp, eb
}

func TestRawRequests(t *testing.T) {
	e := start(t)
	tests := []struct {
		name, method, path, body string
		wantStatus               int
		wantAllow                string
	}{
		{"unknown path", "GET", "/api/v1/nothing", "", 404, ""},
		{"empty rollout id", "GET", "/api/v1/rollouts/", "", 404, ""},
		{"method not allowed", "DELETE", "/api/v1/firmware", "", 405, "POST, GET"},
		{"method not allowed with id", "POST", "/api/v1/devices/dev-1", "", 405, "GET"},
		{"rollout body not JSON", "POST", "/api/v1/rollouts", "model=x", 400, ""},
		{"rollout body unknown field", "POST", "/api/v1/rollouts", `{"model":"m","version":"1.0.0","force":true}`, 400, ""},
		{"rollout body two objects", "POST", "/api/v1/rollouts", `{"model":"m","version":"1.0.0"}{}`, 400, ""},
		{"rollout created", "POST", "/api/v1/rollouts", `{"model":"m","version":"1.0.0"}`, 201, ""},
	}
	for _, tt := range tests {
		t.Run(tt.name, func(t *testing.T) {
			resp, _ := rawDo(t, e, tt.method, tt.path, tt.body)
			if resp.StatusCode != tt.wantStatus {
				t.Errorf("got status %d, want %d", resp.StatusCode, tt.wantStatus)
			}
			if got := resp.Header.Get("Allow"); got != tt.wantAllow {
				t.Errorf("got Allow %q, want %q", got, tt.wantAllow)
			}
			if tt.wantStatus == 201 {
				if got := resp.Header.Get("Location"); got != "/api/v1/rollouts/r1" {
					t.Errorf("got Location %q, want /api/v1/rollouts/r1", got)
				}
			}
		})
	}
}

// unsized hides the length of a reader, so the client has to send it chunked.
type unsized struct{ r io.Reader }

func (u unsized) Read(p []byte) (int, error) { return u.r.Read(p) }

func TestUploadLimit(t *testing.T) {
	const limit = 1024
	e := start(t, func(o *Options) { o.MaxUpload = limit })
	c := e.admin(t)
	ctx := context.Background()
	tests := []struct {
		name         string
		body         io.Reader
		wantStatus   int // 0: success
		wantNoUpload bool
	}{
		{"declared size over the limit", bytes.NewReader(make([]byte, 1<<20)), 413, true},
		{"streamed over the limit", unsized{bytes.NewReader(make([]byte, 4*limit))}, 413, false},
		{"one byte over", unsized{bytes.NewReader(make([]byte, limit+1))}, 413, false},
		{"exactly the limit", unsized{bytes.NewReader(make([]byte, limit))}, 0, false},
	}
	for i, tt := range tests {
		t.Run(tt.name, func(t *testing.T) {
			before := e.store.calls.Load()
			f, _, err := c.AddFirmware(ctx, "primehub", fmt.Sprintf("1.0.%d", i), "", tt.body)
			if tt.wantStatus == 0 {
				if err != nil || f.Size != limit {
					t.Fatalf("got %+v, %v; want size %d", f, err, limit)
				}
				return
			}
			status, msg := statusOf(t, err)
			if status != tt.wantStatus || !strings.Contains(msg, "too large") {
				t.Errorf("got %d %q, want %d too large", status, msg, tt.wantStatus)
			}
			calls := e.store.calls.Load() - before
			if tt.wantNoUpload && calls != 0 {
				t.Errorf("got %d store calls, want 0: a declared oversize body must be refused before reading", calls)
			}
			if got := e.store.received.Load(); !tt.wantNoUpload && got > limit {
				t.Errorf("store received %d bytes, want at most %d", got, limit)
			}
		})
	}
}

// TestUploadStreams checks that the store gets the first bytes of an upload while the client is
// still sending it, i.e. the server does not buffer the body.
func TestUploadStreams(t *testing.T) {
	e := start(t)
	c := e.admin(t)
	pr, pw := io.Pipe()
	first := bytes.Repeat([]byte("a"), 64<<10)
	rest := bytes.Repeat([]byte("b"), 16<<10)
	release := make(chan struct{})
	writeErr := make(chan error, 1)
	go func() {
		if _, err := pw.Write(first); err != nil {
			writeErr <- err
			return
		}
		<-release
		_, err := pw.Write(rest)
		pw.CloseWithError(err)
		writeErr <- err
	}()
	type result struct {
		f   firmware.Firmware
		err error
	}
	done := make(chan result, 1)
	go func() {
		f, _, err := c.AddFirmware(context.Background(), "primehub", "2.0.0", "", pr)
		done <- result{f, err}
	}()

	deadline := time.Now().Add(20 * time.Second)
	for e.store.received.Load() < int64(len(first)) {
		if time.Now().After(deadline) {
			close(release)
			t.Fatalf("store received %d bytes before the body ended, want %d", e.store.received.Load(), len(first))
		}
		select {
		case r := <-done:
			close(release)
			t.Fatalf("upload finished early: %+v, %v", r.f, r.err)
		case <-time.After(time.Millisecond):
		}
	}
	close(release)
	r := <-done
	if err := <-writeErr; err != nil {
		t.Fatalf("writing body: %v", err)
	}
	if want := int64(len(first) + len(rest)); r.err != nil || r.f.Size != want {
		t.Fatalf("got %+v, %v; want size %d", r.f, r.err, want)
	}
}

func TestClientConnectionErrors(t *testing.T) {
	ln, err := net.Listen("tcp", "127.0.0.1:0")
	if err != nil {
		t.Fatal(err)
	}
	addr := ln.Addr().String()
	ln.Close()
	ca := certstest.New(t)

	c := NewClient("https://"+addr, ca.AdminTLS(t))
	defer c.Close()
	_, err = c.ListRollouts(context.Background())
	want := fmt.Sprintf("cannot reach fota server at https://%s: connection refused", addr)
	if err == nil || err.Error() != want {
		t.Errorf("got %v, want %q", err, want)
	}
	if !errors.Is(err, syscall.ECONNREFUSED) {
		t.Errorf("got %v, want it to wrap ECONNREFUSED", err)
	}

	bad := NewClient("http://"+addr, ca.AdminTLS(t))
	defer bad.Close()
	if err := bad.Health(context.Background()); err == nil || !strings.Contains(err.Error(), "want https://") {
		t.Errorf("got %v, want a bad URL error", err)
	}

	ctx, cancel := context.WithCancel(context.Background())
	cancel()
	if err := c.Health(ctx); !errors.Is(err, context.Canceled) {
		t.Errorf("got %v, want context.Canceled", err)
	}
}

func TestCloseStopsServing(t *testing.T) {
	ca := certstest.New(t)
	srv, err := New(Options{Addr: "127.0.0.1:0", TLS: ca.ServerTLS(t), Rollouts: &fakeRollouts{}, Firmware: &fakeStore{}, Logger: slog.New(slog.DiscardHandler)})
	if err != nil {
		t.Fatal(err)
	}
	if err := srv.Start(); err != nil {
		t.Fatal(err)
	}
	if err := srv.Start(); err == nil {
		t.Error("second Start: got nil, want an error")
	}
	addr := srv.Addr().String()
	c := NewClient("https://"+addr, ca.AdminTLS(t))
	defer c.Close()
	if err := c.Health(context.Background()); err != nil {
		t.Fatalf("Health: %v", err)
	}
	ctx, cancel := context.WithTimeout(context.Background(), 5*time.Second)
	defer cancel()
	if err := srv.Close(ctx); err != nil {
		t.Fatalf("Close: %v", err)
	}
	if err := srv.Close(ctx); err != nil {
		t.Errorf("second Close: got %v, want nil", err)
	}
	if err := srv.Start(); err == nil {
		t.Error("Start after Close: got nil, want an error")
	}
	c.Close() // drop the kept-alive connection so the next call dials
	if err := c.Health(context.Background()); err == nil || !strings.Contains(err.Error(), "cannot reach") {
		t.Errorf("Health after Close: got %v, want cannot reach", err)
	}
}

func TestStats(t *testing.T) {
	ctx := context.Background()
	t.Run("counters", func(t *testing.T) {
		calls := 0
		e := start(t, func(o *Options) {
			o.Stats = func() map[string]any {
				calls++
				return map[string]any{
					"broker":   map[string]float64{"Connected": float64(calls), "Dropped": 0},
					"transfer": map[string]uint64{"ErrorFrames.busy": 7},
				}
			}
		})
		c := e.admin(t)
		for want := 1; want <= 2; want++ { // live, not cached
			got, err := c.Stats(ctx)
			if err != nil {
				t.Fatal(err)
			}
			if got["broker"]["Connected"] != float64(want) || got["transfer"]["ErrorFrames.busy"] != 7 || len(got) != 2 {
				t.Fatalf("call %d: got %v, want broker.Connected %d and transfer.ErrorFrames.busy 7", want, got, want)
			}
		}
	})
	t.Run("none kept", func(t *testing.T) {
		_, err := start(t).admin(t).Stats(ctx)
		if status, msg := statusOf(t, err); status != http.StatusNotFound || msg != "this server keeps no counters" {
			t.Fatalf("got %d %q, want 404 \"this server keeps no counters\"", status, msg)
		}
	})
}
