package firmware_test

import (
	"bytes"
	"strings"
	"testing"
	"time"

	"github.com/fota-dev/fota/firmware"
	"github.com/fota-dev/fota/firmware/delta"
	"github.com/fota-dev/fota/protocol"
)

// startPatcher runs a Patcher over e's store and returns it with a channel of its verdicts.
func startPatcher(t *testing.T, e *env, s *firmware.Store, maxRatio float64) (*firmware.Patcher, chan string) {
	t.Helper()
	ready := make(chan string, 8)
	p, err := firmware.NewPatcher(firmware.PatcherOptions{
		Store: s, DB: e.db, MaxRatio: maxRatio,
		OnReady: func(base, target string) { ready <- base + ":" + target },
	})
	if err != nil {
		t.Fatal(err)
	}
	p.Start()
	t.Cleanup(func() { p.Close(t.Context()) })
	return p, ready
}

func waitVerdict(t *testing.T, ready chan string) {
	t.Helper()
	select {
	case <-ready:
	case <-time.After(60 * time.Second):
		t.Fatal("no verdict on the patch after 60s")
	}
}

func TestPatcherMakesVerifiedSignedDeltas(t *testing.T) {
	e := newEnv(t, 0)
	oldImg, newImg := image(t, "pybricks-primehub-7.27.0.bin"), image(t, "pybricks-primehub-7.28.0.bin")
	base := e.add(t, "primehub", "7.27.0", 0, oldImg)
	target := e.add(t, "primehub", "7.28.0", 0, newImg)
	p, ready := startPatcher(t, e, e.s, 0)

	if _, ok, err := p.Delta(base.SHA256, target.Manifest()); ok || err != nil {
		t.Fatalf("first ask: got ready=%v err=%v, want pending", ok, err)
	}
	waitVerdict(t, ready)
	m, ok, err := p.Delta(base.SHA256, target.Manifest())
	if !ok || err != nil {
		t.Fatalf("after the verdict: got ready=%v err=%v, want a delta", ok, err)
	}
	// The delta manifest is signed by the release key and names the patch a device will get.
	if err := firmware.VerifySignature(m, testPub()); err != nil {
		t.Fatalf("delta manifest signature: %v", err)
	}
	if m.Delta == nil || m.Delta.Base != base.SHA256 || m.Delta.Format != delta.Format || m.SHA256 != target.SHA256 || m.Counter != target.Counter {
		t.Fatalf("got manifest %+v, want a delta from %s to %s", m, base.SHA256, target.SHA256)
	}
	patch := make([]byte, m.Delta.PatchSize)
	if _, err := e.s.ReadAt(m.Delta.PatchSHA256, patch, 0); err != nil {
		t.Fatalf("read stored patch: %v", err)
	}
	if err := firmware.VerifyPatch(m, patch); err != nil {
		t.Fatal(err)
	}
	rebuilt, err := delta.Apply(oldImg, bytes.NewReader(patch), m.Size)
	if err != nil || !bytes.Equal(rebuilt, newImg) {
		t.Fatalf("apply stored patch: %v (equal %v)", err, bytes.Equal(rebuilt, newImg))
	}
	if m.Delta.PatchSize > int64(len(newImg))/2 {
		t.Fatalf("patch of %d bytes offered, above half the %d-byte image", m.Delta.PatchSize, len(newImg))
	}

	// The verdict is cached in the state file: a new Patcher answers at once.
	p2, _ := startPatcher(t, e, e.s, 0)
	if m2, ok, err := p2.Delta(base.SHA256, target.Manifest()); !ok || err != nil || m2.Delta.PatchSHA256 != m.Delta.PatchSHA256 {
		t.Fatalf("cached: got ready=%v err=%v, want the same patch", ok, err)
	}
}

func TestPatcherRefusals(t *testing.T) {
	e := newEnv(t, 0)
	oldImg, newImg := image(t, "pybricks-primehub-7.22.0.bin"), image(t, "pybricks-primehub-7.28.0.bin")
	base := e.add(t, "primehub", "7.22.0", 0, oldImg)
	target := e.add(t, "primehub", "7.28.0", 0, newImg)

	t.Run("unknown base", func(t *testing.T) {
		p, _ := startPatcher(t, e, e.s, 0)
		_, ok, err := p.Delta(strings.Repeat("0", 64), target.Manifest())
		if ok || err == nil {
			t.Fatalf("got ready=%v err=%v, want no delta", ok, err)
		}
	})
	t.Run("base is target", func(t *testing.T) {
		p, _ := startPatcher(t, e, e.s, 0)
		if _, ok, err := p.Delta(target.SHA256, target.Manifest()); ok || err == nil {
			t.Fatalf("got ready=%v err=%v, want no delta", ok, err)
		}
	})
	t.Run("above the size threshold", func(t *testing.T) {
		// 7.22.0 -> 7.28.0 is about half the image: a 10% threshold refuses it.
		p, ready := startPatcher(t, e, e.s, 0.1)
		if _, _, err := p.Delta(base.SHA256, target.Manifest()); err != nil {
			t.Fatal(err)
		}
		waitVerdict(t, ready)
		_, ok, err := p.Delta(base.SHA256, target.Manifest())
		if ok || err == nil || !strings.Contains(err.Error(), "above 10%") {
			t.Fatalf("got ready=%v err=%v, want refused above 10%%", ok, err)
		}
	})
	t.Run("offline signing", func(t *testing.T) {
		e2 := newEnv(t, 0)
		b := e2.add(t, "primehub", "7.22.0", 0, oldImg)
		m, err := firmware.Sign(protocol.Manifest{V: 1, Model: "primehub", Version: "7.28.0", Counter: 5, Size: int64(len(newImg)), SHA256: shaOf(newImg)}, testKey)
		if err != nil {
			t.Fatal(err)
		}
		offline := e2.openOffline(t)
		if _, _, err := offline.Add(t.Context(), firmware.AddRequest{Manifest: &m, Body: bytes.NewReader(newImg)}); err != nil {
			t.Fatal(err)
		}
		p, _ := startPatcher(t, e2, offline, 0)
		// Nothing is queued: without the key no patch could be signed.
		if _, ok, err := p.Delta(b.SHA256, m); ok || err == nil || !strings.Contains(err.Error(), "fota delta add") {
			t.Fatalf("got ready=%v err=%v, want no delta without the signing key, and how to add one", ok, err)
		}
		checkDeltaKeys(t, e2.db)
	})
}
