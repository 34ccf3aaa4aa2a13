package controller

import (
	"context"
	"crypto/ed25519"
	"os"
	"path/filepath"
	"testing"
	"time"

	bolt "go.etcd.io/bbolt"

	"github.com/fota-dev/fota/firmware"
	"github.com/fota-dev/fota/protocol"
)

// storeFirmware gives the controller the manifests of a real store, as fota serve does.
type storeFirmware struct{ *firmware.Store }

func (f storeFirmware) Manifest(model, version string) (protocol.Manifest, error) {
	fw, err := f.Get(model, version)
	if err != nil {
		return protocol.Manifest{}, err
	}
	return fw.Manifest(), nil
}

// releaseHarness is a harness whose controller offers the releases of a real firmware store,
// with deltas made and signed by a real Patcher.
type releaseHarness struct {
	*harness
	store   *firmware.Store
	patcher *firmware.Patcher
	pub     ed25519.PublicKey
	ready   chan struct{}
}

func newReleaseHarness(t *testing.T) *releaseHarness {
	t.Helper()
	pub, key, err := ed25519.GenerateKey(nil)
	if err != nil {
		t.Fatal(err)
	}
	dir := t.TempDir()
	db, err := bolt.Open(filepath.Join(dir, "firmware.db"), 0o600, &bolt.Options{Timeout: time.Second})
	if err != nil {
		t.Fatal(err)
	}
	t.Cleanup(func() { db.Close() })
	store, err := firmware.Open(firmware.Options{Dir: filepath.Join(dir, "artifacts"), DB: db, SigningKey: key})
	if err != nil {
		t.Fatal(err)
	}
	t.Cleanup(func() { store.Close() })
	r := &releaseHarness{store: store, pub: pub, ready: make(chan struct{}, 16)}
	r.patcher, err = firmware.NewPatcher(firmware.PatcherOptions{
		Store: store, DB: db,
		OnReady: func(base, target string) {
			r.c.DeltaReady(base, target)
			r.ready <- struct{}{}
		},
	})
	if err != nil {
		t.Fatal(err)
	}
	r.harness = newHarness(t, func(o *Options) { o.Firmware, o.Deltas = storeFirmware{store}, r.patcher })
	r.patcher.Start()
	t.Cleanup(func() { r.patcher.Close(context.Background()) })
	return r
}

// waitVerdict waits for the Patcher's next verdict, after the controller has been told.
func (r *releaseHarness) waitVerdict() {
	r.t.Helper()
	select {
	case <-r.ready:
	case <-time.After(60 * time.Second):
		r.t.Fatal("no delta verdict after 60s")
	}
}

func (r *releaseHarness) add(model, version string, counter uint64, expires time.Time, image string) firmware.Firmware {
	r.t.Helper()
	f, err := os.Open(filepath.Join("..", "demofirmware", image))
	if err != nil {
		r.t.Fatal(err)
	}
	defer f.Close()
	fw, _, err := r.store.Add(context.Background(), firmware.AddRequest{Model: model, Version: version, Counter: counter, Expires: expires, Body: f})
	if err != nil {
		r.t.Fatalf("add %s %s: %v", model, version, err)
	}
	return fw
}

// online connects device with its certificate's model and reports it runs base.
func (r *releaseHarness) online(device string, base firmware.Firmware) {
	r.c.DeviceConnected(device, base.Model)
	r.send(device, protocol.SuffixStatus, protocol.Status{V: 1, Model: base.Model, Version: base.Version, SHA256: base.SHA256, State: protocol.StateIdle})
}

// checkDeltaOffer fails unless o offers a patch from base to exactly the release want:
// its model, version, counter and expiry, signed.
func (r *releaseHarness) checkDeltaOffer(o protocol.Offer, base, want firmware.Firmware) {
	r.t.Helper()
	m, w := o.Manifest, want.Manifest()
	if m.Delta == nil || m.Delta.Base != base.SHA256 || o.Size != m.Delta.PatchSize {
		r.t.Errorf("offer of %s %s: got %d bytes, delta %+v; want a patch from %s", want.Model, want.Version, o.Size, m.Delta, base.Version)
		return
	}
	if m.Model != w.Model || m.Version != w.Version || m.Counter != w.Counter || m.Expires != w.Expires || m.SHA256 != w.SHA256 {
		r.t.Errorf("offered manifest: got %s %s counter %d expires %q, want %s %s counter %d expires %q",
			m.Model, m.Version, m.Counter, m.Expires, w.Model, w.Version, w.Counter, w.Expires)
	}
	if err := firmware.VerifySignature(m, r.pub); err != nil {
		r.t.Errorf("offered manifest: %v", err)
	}
}

// TestDeltaOfferNamesItsRelease: releases that share their images each offer a delta manifest
// of their own, whichever release's delta was made first.
func TestDeltaOfferNamesItsRelease(t *testing.T) {
	exp := func(d time.Duration) time.Time { return time.Now().Add(d).UTC().Truncate(time.Second) }
	tests := []struct {
		name string
		// first adds a release and makes its delta from base; second adds a release of the
		// same target image, whose rollout the device on base must be offered.
		run func(r *releaseHarness) (base, second firmware.Firmware)
	}{
		{"same images under two models", func(r *releaseHarness) (firmware.Firmware, firmware.Firmware) {
			base := r.add("primehub", "7.27.0", 0, time.Time{}, "pybricks-primehub-7.27.0.bin")
			r.add("primehub", "7.28.0", 0, exp(48*time.Hour), "pybricks-primehub-7.28.0.bin")
			hubBase := r.add("hubx", "7.27.0", 0, time.Time{}, "pybricks-primehub-7.27.0.bin")
			hubx := r.add("hubx", "7.28.0", 7, exp(24*time.Hour), "pybricks-primehub-7.28.0.bin")

			// A primehub device is offered its model's delta first.
			if _, err := r.c.CreateRollout(context.Background(), RolloutSpec{Model: "primehub", Version: "7.28.0"}); err != nil {
				r.t.Fatal(err)
			}
			r.online("p1", base)
			r.waitVerdict()
			prime, _ := r.store.Get("primehub", "7.28.0")
			r.checkDeltaOffer(r.waitOffer("p1", 1), base, prime)
			if _, err := r.c.CreateRollout(context.Background(), RolloutSpec{Model: "hubx", Version: "7.28.0"}); err != nil {
				r.t.Fatal(err)
			}
			return hubBase, hubx
		}},
		{"same bytes re-released under a new version", func(r *releaseHarness) (firmware.Firmware, firmware.Firmware) {
			base := r.add("primehub", "8.0.1", 3, time.Time{}, "pybricks-primehub-7.27.0.bin")
			v802 := r.add("primehub", "8.0.2", 4, time.Time{}, "pybricks-primehub-7.28.0.bin")
			// 8.0.2's delta is made first: a device on 8.0.1 asked for it.
			if _, ready, err := r.patcher.Delta(base.SHA256, v802.Manifest()); ready || err != nil {
				r.t.Fatalf("delta to 8.0.2: got ready=%v err=%v, want it queued", ready, err)
			}
			r.waitVerdict()
			// Rolled back to the 8.0.1 bytes as 8.0.3, then forward to the 8.0.2 bytes as 8.0.4.
			v803 := r.add("primehub", "8.0.3", 5, time.Time{}, "pybricks-primehub-7.27.0.bin")
			v804 := r.add("primehub", "8.0.4", 6, exp(24*time.Hour), "pybricks-primehub-7.28.0.bin")
			if _, err := r.c.CreateRollout(context.Background(), RolloutSpec{Model: "primehub", Version: "8.0.4"}); err != nil {
				r.t.Fatal(err)
			}
			return v803, v804
		}},
	}
	for _, tt := range tests {
		t.Run(tt.name, func(t *testing.T) {
			r := newReleaseHarness(t)
			base, want := tt.run(r)
			r.online("d1", base)
			r.checkDeltaOffer(r.waitOffer("d1", 1), base, want)
		})
	}
}
