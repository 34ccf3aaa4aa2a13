package controller

import (
	"context"
	"sync"
	"testing"
	"time"

	"github.com/fota-dev/fota/protocol"
)

// gatedFirmware holds every Manifest lookup until release is closed, so a test can stop a
// rollout's creation between its firmware lookup and its registration.
type gatedFirmware struct {
	*fakeFirmware
	entered     chan struct{}
	enteredOnce sync.Once
	release     chan struct{}
}

func (g *gatedFirmware) Manifest(model, version string) (protocol.Manifest, error) {
	g.enteredOnce.Do(func() { close(g.entered) })
	<-g.release
	return g.fakeFirmware.Manifest(model, version)
}

// TestDeleteWaitsForCreation: a firmware delete that checks InUse while a creation has found
// the firmware but not yet registered its rollout would remove firmware the new rollout needs.
// WithoutNewRollouts must wait for that creation and then see the rollout.
func TestDeleteWaitsForCreation(t *testing.T) {
	var g *gatedFirmware
	h := newHarness(t, func(o *Options) {
		g = &gatedFirmware{fakeFirmware: o.Firmware.(*fakeFirmware), entered: make(chan struct{}), release: make(chan struct{})}
		o.Firmware = g
	})
	created := make(chan error, 1)
	go func() {
		_, err := h.c.CreateRollout(context.Background(), RolloutSpec{Model: "primehub", Version: "7.28.0"})
		created <- err
	}()
	<-g.entered

	var sawInUse bool
	guarded := make(chan error, 1)
	go func() {
		guarded <- h.c.WithoutNewRollouts(func() error {
			sawInUse = h.c.InUse("primehub", "7.28.0")
			return nil
		})
	}()
	// The guard must not run while the creation is in flight. Waiting a moment for something
	// that must not happen can only miss a failure, never invent one.
	select {
	case <-guarded:
		t.Fatal("WithoutNewRollouts ran while a rollout's creation had found its firmware, want it to wait")
	case <-time.After(100 * time.Millisecond):
	}
	close(g.release)
	if err := <-created; err != nil {
		t.Fatalf("CreateRollout: got %v, want nil", err)
	}
	if err := <-guarded; err != nil {
		t.Fatalf("WithoutNewRollouts: got %v, want nil", err)
	}
	if !sawInUse {
		t.Fatal("InUse inside WithoutNewRollouts = false after a creation in flight, want true")
	}
}

// TestCreationWaitsForDelete: a creation that starts during a delete looks its firmware up
// after the delete, and fails when the firmware is gone.
func TestCreationWaitsForDelete(t *testing.T) {
	h := newHarness(t)
	created := make(chan error, 1)
	var early bool
	err := h.c.WithoutNewRollouts(func() error {
		go func() {
			_, err := h.c.CreateRollout(context.Background(), RolloutSpec{Model: "primehub", Version: "7.28.0"})
			created <- err
		}()
		select {
		case <-created:
			early = true
		case <-time.After(100 * time.Millisecond):
		}
		h.fw.version = "7.29.0" // the delete: 7.28.0 is gone
		return nil
	})
	if err != nil {
		t.Fatal(err)
	}
	if early {
		t.Fatal("CreateRollout returned during a delete, want it to wait for the delete")
	}
	if err := <-created; err == nil {
		t.Fatal("CreateRollout after its firmware was deleted: got nil, want an error")
	}
	if rs, err := h.c.ListRollouts(); err != nil || len(rs) != 0 {
		t.Fatalf("got rollouts %+v (%v), want none", rs, err)
	}
}
