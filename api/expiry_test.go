package api

import (
	"bytes"
	"context"
	"crypto/ed25519"
	"crypto/rand"
	"log/slog"
	"net/http"
	"os"
	"path/filepath"
	"testing"
	"time"

	"github.com/fota-dev/fota/controller"
	"github.com/fota-dev/fota/firmware"
	"go.etcd.io/bbolt"
)

// TestRolloutOfExpiringReleaseRefused runs the real controller and store: a release whose
// signed manifest expires before a job could finish is refused a rollout with 409 and a
// message saying why.
func TestRolloutOfExpiringReleaseRefused(t *testing.T) {
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
		Logger: slog.New(slog.DiscardHandler), TickInterval: -1,
	})
	if err != nil {
		t.Fatal(err)
	}
	if err := ctrl.Start(); err != nil {
		t.Fatal(err)
	}
	t.Cleanup(func() { ctrl.Close(context.Background()) })
	e := start(t, func(o *Options) { o.Rollouts = ctrl; o.Firmware = store })
	c := e.admin(t)
	ctx := context.Background()
	img, err := os.ReadFile(filepath.Join("..", "demofirmware", "pybricks-primehub-7.28.0.bin"))
	if err != nil {
		t.Fatal(err)
	}
	f, _, err := c.UploadFirmware(ctx, FirmwareUpload{Model: "primehub", Version: "7.28.0", Expires: time.Now().Add(30 * time.Minute), Body: bytes.NewReader(img)})
	if err != nil {
		t.Fatal(err)
	}
	_, err = c.CreateRollout(ctx, controller.RolloutSpec{Model: "primehub", Version: "7.28.0"})
	status, msg := statusOf(t, err)
	want := "release expired: primehub 7.28.0 expires at " + f.Expires.UTC().Format(time.RFC3339) +
		", before a job offered now could finish (its phase timeouts add up to 50m0s); add it again with a later --expires"
	if status != http.StatusConflict || msg != want {
		t.Errorf("got %d %q, want 409 %q", status, msg, want)
	}
}
