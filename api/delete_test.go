package api

import (
	"bytes"
	"context"
	"crypto/ed25519"
	"crypto/rand"
	"encoding/json"
	"errors"
	"io"
	"io/fs"
	"log/slog"
	"net/http"
	"os"
	"path/filepath"
	"reflect"
	"strings"
	"testing"
	"time"

	"go.etcd.io/bbolt"

	"github.com/fota-dev/fota/controller"
	"github.com/fota-dev/fota/firmware"
	"github.com/fota-dev/fota/fotatest"
	"github.com/fota-dev/fota/protocol"
)

func TestDeleteFirmware(t *testing.T) {
	e := start(t)
	c := e.admin(t)
	ctx := context.Background()
	for _, v := range []string{"1.2.0", "1.3.0"} {
		if _, _, err := c.AddFirmware(ctx, "primehub", v, "", strings.NewReader("image "+v)); err != nil {
			t.Fatal(err)
		}
	}
	if _, err := c.CreateRollout(ctx, controller.RolloutSpec{Model: "primehub", Version: "1.3.0"}); err != nil {
		t.Fatal(err)
	}
	before, err := c.ListFirmware(ctx)
	if err != nil {
		t.Fatal(err)
	}

	refusals := []struct {
		name, model, version string
		wantStatus           int
		wantMsg              string
	}{
		{"in use", "primehub", "1.3.0", 409, "firmware primehub 1.3.0 is used by an unfinished rollout: rollout r1 is active; cancel it first"},
		{"in use, version spelled otherwise", "primehub", "v1.3", 409, "firmware primehub 1.3.0 is used by an unfinished rollout: rollout r1 is active; cancel it first"},
		{"unknown version", "primehub", "9.9.9", 404, "firmware primehub 9.9.9 not found"},
		{"unknown model", "otherhub", "1.2.0", 404, "firmware otherhub 1.2.0 not found"},
		{"bad version", "primehub", "1.x", 400, `invalid version "1.x": bad number "x"`},
		{"bad model", "prime hub", "1.2.0", 400, `invalid model name: model "prime hub": only letters, digits, '.', '_' and '-' are allowed`},
	}
	for _, tt := range refusals {
		t.Run(tt.name, func(t *testing.T) {
			err := c.DeleteFirmware(ctx, tt.model, tt.version)
			status, msg := statusOf(t, err)
			if status != tt.wantStatus || msg != tt.wantMsg {
				t.Errorf("got %d %q, want %d %q", status, msg, tt.wantStatus, tt.wantMsg)
			}
			if got, err := c.ListFirmware(ctx); err != nil || !reflect.DeepEqual(got, before) {
				t.Errorf("got firmware %+v (%v) after a refused delete, want it unchanged: %+v", got, err, before)
			}
		})
	}

	t.Run("not in use", func(t *testing.T) {
		if err := c.DeleteFirmware(ctx, "primehub", "1.2.0"); err != nil {
			t.Fatalf("got %v, want nil", err)
		}
		got, err := c.ListFirmware(ctx)
		if err != nil || len(got) != 1 || got[0].Version != "1.3.0" {
			t.Errorf("got %+v (%v), want only 1.3.0 left", got, err)
		}
		e.store.mu.Lock()
		_, kept := e.store.bodies["primehub 1.2.0"]
		e.store.mu.Unlock()
		if kept {
			t.Error("store still holds the image of 1.2.0, want it gone")
		}
		if n := e.rollouts.inUseUnguarded.Load(); n != 0 {
			t.Errorf("got %d InUse checks outside WithoutNewRollouts, want 0: a rollout created meanwhile would be missed", n)
		}
	})
	t.Run("deleted twice", func(t *testing.T) {
		err := c.DeleteFirmware(ctx, "primehub", "1.2.0")
		if status, _ := statusOf(t, err); status != http.StatusNotFound {
			t.Errorf("got %d, want 404", status)
		}
	})
	t.Run("rollout canceling", func(t *testing.T) {
		e.rollouts.mu.Lock()
		e.rollouts.rollouts[0].State = controller.RolloutCanceling
		d := e.rollouts.details["r1"]
		d.State = controller.RolloutCanceling
		e.rollouts.details["r1"] = d
		e.rollouts.mu.Unlock()
		err := c.DeleteFirmware(ctx, "primehub", "1.3.0")
		want := "firmware primehub 1.3.0 is used by an unfinished rollout: rollout r1 is canceling; retry once it is canceled"
		if status, msg := statusOf(t, err); status != http.StatusConflict || msg != want {
			t.Errorf("got %d %q, want 409 %q", status, msg, want)
		}
	})
	t.Run("rollout canceled", func(t *testing.T) {
		if _, err := c.CancelRollout(ctx, "r1"); err != nil {
			t.Fatal(err)
		}
		if err := c.DeleteFirmware(ctx, "primehub", "1.3.0"); err != nil {
			t.Fatalf("got %v, want nil", err)
		}
		if got, err := c.ListFirmware(ctx); err != nil || len(got) != 0 {
			t.Errorf("got %+v (%v), want no firmware left", got, err)
		}
	})
	t.Run("store fails", func(t *testing.T) {
		e.store.mu.Lock()
		e.store.err = errors.New("remove /srv/fota/artifacts/ab/cd: EIO")
		e.store.mu.Unlock()
		defer func() {
			e.store.mu.Lock()
			e.store.err = nil
			e.store.mu.Unlock()
		}()
		err := c.DeleteFirmware(ctx, "primehub", "1.3.0")
		if status, msg := statusOf(t, err); status != 500 || strings.Contains(msg, "/srv") {
			t.Errorf("got %d %q, want 500 without the path", status, msg)
		}
	})
}

// TestDeleteFirmwareRaw checks the bytes on the wire: 204 has no body, and the other methods
// on a firmware's path are refused with the allowed one named.
func TestDeleteFirmwareRaw(t *testing.T) {
	e := start(t)
	if _, _, err := e.admin(t).AddFirmware(context.Background(), "primehub", "1.2.0", "", strings.NewReader("img")); err != nil {
		t.Fatal(err)
	}
	hc := &http.Client{Transport: &http.Transport{TLSClientConfig: e.ca.AdminTLS(t)}}
	defer hc.CloseIdleConnections()
	req, err := http.NewRequest(http.MethodDelete, e.url+"/api/v1/firmware/primehub/1.2.0", nil)
	if err != nil {
		t.Fatal(err)
	}
	resp, err := hc.Do(req)
	if err != nil {
		t.Fatal(err)
	}
	body, _ := io.ReadAll(resp.Body)
	resp.Body.Close()
	if resp.StatusCode != http.StatusNoContent || len(body) != 0 {
		t.Errorf("got %d with body %q, want 204 with none", resp.StatusCode, body)
	}

	resp, eb := rawDo(t, e, http.MethodGet, "/api/v1/firmware/primehub/1.2.0", "")
	if resp.StatusCode != http.StatusMethodNotAllowed || resp.Header.Get("Allow") != "DELETE" {
		t.Errorf("GET: got %d, Allow %q (%q), want 405, Allow DELETE", resp.StatusCode, resp.Header.Get("Allow"), eb.Error)
	}
	if resp, _ := rawDo(t, e, http.MethodDelete, "/api/v1/firmware/primehub", ""); resp.StatusCode != http.StatusNotFound {
		t.Errorf("DELETE without a version: got %d, want 404", resp.StatusCode)
	}
}

func TestClientDeleteFirmwareArguments(t *testing.T) {
	e := start(t)
	c := e.admin(t)
	for _, tt := range []struct{ model, version string }{{"", "1.0.0"}, {"primehub", ""}, {"..", "1.0.0"}, {".", "1.0.0"}} {
		err := c.DeleteFirmware(context.Background(), tt.model, tt.version)
		var ae *Error
		if err == nil || errors.As(err, &ae) {
			t.Errorf("DeleteFirmware(%q, %q): got %v, want a client-side error", tt.model, tt.version, err)
		}
	}
}

// storeSource gives the controller the store's manifests, as fota serve does.
type storeSource struct{ *firmware.Store }

func (s storeSource) Manifest(model, version string) (protocol.Manifest, error) {
	f, err := s.Get(model, version)
	if err != nil {
		return protocol.Manifest{}, err
	}
	return f.Manifest(), nil
}

// discardPublisher drops what the controller publishes; the test plays the device by calling
// HandleMessage.
type discardPublisher struct{}

func (discardPublisher) Publish(topic string, payload []byte, qos byte) error { return nil }

// TestDeleteFirmwareRealController runs the real controller and the real store, on one bbolt
// file as fota serve does, behind a real server: firmware a rollout still needs stays, and goes
// once the rollout is canceled and the device mid-install has reported.
func TestDeleteFirmwareRealController(t *testing.T) {
	_, priv, err := ed25519.GenerateKey(rand.Reader)
	if err != nil {
		t.Fatal(err)
	}
	db, err := bbolt.Open(filepath.Join(t.TempDir(), "fota.db"), 0o600, &bbolt.Options{Timeout: time.Second})
	if err != nil {
		t.Fatal(err)
	}
	t.Cleanup(func() { db.Close() })
	store, err := firmware.Open(firmware.Options{Dir: t.TempDir(), DB: db, SigningKey: priv})
	if err != nil {
		t.Fatal(err)
	}
	t.Cleanup(func() { store.Close() })
	ctrl, err := controller.New(controller.Options{
		DB: db, Publisher: discardPublisher{}, Firmware: storeSource{store},
		Logger: slog.New(slog.DiscardHandler), TickInterval: 20 * time.Millisecond,
	})
	if err != nil {
		t.Fatal(err)
	}
	if err := ctrl.Start(); err != nil {
		t.Fatal(err)
	}
	t.Cleanup(func() {
		ctx, cancel := context.WithTimeout(context.Background(), 5*time.Second)
		defer cancel()
		if err := ctrl.Close(ctx); err != nil {
			t.Errorf("close controller: %v", err)
		}
	})
	e := start(t, func(o *Options) { o.Rollouts = ctrl; o.Firmware = store })
	c := e.admin(t)
	ctx := context.Background()

	images := map[string][]byte{}
	shas := map[string]string{}
	for _, v := range []string{"7.27.0", "7.28.0"} {
		img, err := os.ReadFile(filepath.Join("..", "demofirmware", "pybricks-primehub-"+v+".bin"))
		if err != nil {
			t.Fatal(err)
		}
		f, _, err := c.AddFirmware(ctx, "primehub", v, "", bytes.NewReader(img))
		if err != nil {
			t.Fatalf("add %s: %v", v, err)
		}
		images[v], shas[v] = img, f.SHA256
	}
	path28, err := store.Path(shas["7.28.0"])
	if err != nil {
		t.Fatal(err)
	}

	device := func(suffix string, v any) {
		t.Helper()
		b, err := json.Marshal(v)
		if err != nil {
			t.Fatal(err)
		}
		ctrl.HandleMessage("dev-1", suffix, b)
	}
	device(protocol.SuffixStatus, protocol.Status{V: 1, Model: "primehub", Version: "7.27.0", State: protocol.StateIdle})
	r, err := c.CreateRollout(ctx, controller.RolloutSpec{Model: "primehub", Version: "7.28.0"})
	if err != nil {
		t.Fatal(err)
	}
	if r.Devices != 1 {
		t.Fatalf("got a rollout of %d devices, want 1", r.Devices)
	}
	job := fotatest.WaitForValue(t, 20*time.Second, "dev-1 offered 7.28.0", func() (controller.Job, bool) {
		d, err := c.GetRollout(ctx, r.ID)
		if err != nil || len(d.Jobs) != 1 {
			return controller.Job{}, false
		}
		return d.Jobs[0], d.Jobs[0].State == controller.JobOffered
	})
	for i, st := range []string{protocol.StateDownloading, protocol.StateVerifying, protocol.StateInstalling} {
		device(protocol.SuffixEvent, protocol.Event{V: 1, Job: job.ID, Seq: uint64(i + 1), State: st, Bytes: job.Size})
	}

	// stillThere fails the test unless 7.28.0 is listed and its artifact reads back whole.
	stillThere := func(t *testing.T) {
		t.Helper()
		list, err := c.ListFirmware(ctx)
		if err != nil || len(list) == 0 || list[len(list)-1].Version != "7.28.0" {
			t.Errorf("got firmware %+v (%v), want 7.28.0 still listed", list, err)
		}
		buf := make([]byte, len(images["7.28.0"]))
		if n, err := store.ReadAt(shas["7.28.0"], buf, 0); n != len(buf) || !bytes.Equal(buf, images["7.28.0"]) {
			t.Errorf("read artifact: got %d bytes (%v), want the %d of the image", n, err, len(buf))
		}
	}
	refused := func(t *testing.T, wantMsg string) {
		t.Helper()
		err := c.DeleteFirmware(ctx, "primehub", "7.28.0")
		if status, msg := statusOf(t, err); status != http.StatusConflict || msg != wantMsg {
			t.Errorf("got %d %q, want 409 %q", status, msg, wantMsg)
		}
		stillThere(t)
	}

	t.Run("target of an active rollout", func(t *testing.T) {
		refused(t, "firmware primehub 7.28.0 is used by an unfinished rollout: rollout "+r.ID+" is active; cancel it first")
	})
	t.Run("other version of the model", func(t *testing.T) {
		if err := c.DeleteFirmware(ctx, "primehub", "7.27.0"); err != nil {
			t.Fatalf("got %v, want nil: no rollout targets 7.27.0", err)
		}
		if _, err := store.Get("primehub", "7.27.0"); !errors.Is(err, firmware.ErrNotFound) {
			t.Errorf("got %v, want 7.27.0 gone", err)
		}
		stillThere(t)
	})
	t.Run("canceling while the device installs", func(t *testing.T) {
		got, err := c.CancelRollout(ctx, r.ID)
		if err != nil || got.State != controller.RolloutCanceling {
			t.Fatalf("got %s (%v), want canceling: the device is installing", got.State, err)
		}
		refused(t, "firmware primehub 7.28.0 is used by an unfinished rollout: rollout "+r.ID+" is canceling; retry once it is canceled")
	})
	t.Run("canceled", func(t *testing.T) {
		device(protocol.SuffixEvent, protocol.Event{V: 1, Job: job.ID, Seq: 4, State: protocol.StateFailed, Reason: "install: flash write"})
		fotatest.WaitForValue(t, 20*time.Second, "rollout canceled", func() (string, bool) {
			d, err := c.GetRollout(ctx, r.ID)
			return d.State, err == nil && d.State == controller.RolloutCanceled
		})
		if err := c.DeleteFirmware(ctx, "primehub", "7.28.0"); err != nil {
			t.Fatalf("got %v, want nil", err)
		}
		if list, err := c.ListFirmware(ctx); err != nil || len(list) != 0 {
			t.Errorf("got firmware %+v (%v), want none", list, err)
		}
		if _, err := store.ReadAt(shas["7.28.0"], make([]byte, 16), 0); !errors.Is(err, firmware.ErrNotFound) {
			t.Errorf("read artifact: got %v, want ErrNotFound", err)
		}
		if _, err := os.Stat(path28); !errors.Is(err, fs.ErrNotExist) {
			t.Errorf("stat %s: got %v, want the file gone", path28, err)
		}
	})
}
