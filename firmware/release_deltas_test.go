package firmware_test

import (
	"bytes"
	"encoding/json"
	"strings"
	"testing"
	"time"

	"go.etcd.io/bbolt"

	"github.com/fota-dev/fota/firmware"
	"github.com/fota-dev/fota/protocol"
)

// addExpiring adds body as (model, version) with the given counter and expiry.
func (e *env) addExpiring(t *testing.T, model, version string, counter uint64, expires time.Time, body []byte) firmware.Firmware {
	t.Helper()
	f, _, err := e.s.Add(t.Context(), firmware.AddRequest{Model: model, Version: version, Counter: counter, Expires: expires, Body: bytes.NewReader(body)})
	if err != nil {
		t.Fatalf("Add(%s, %s): %v", model, version, err)
	}
	return f
}

// checkForRelease fails unless m is a delta manifest from base signed for exactly the release
// target: its model, version, counter and expiry.
func checkForRelease(t *testing.T, m protocol.Manifest, base string, target firmware.Firmware) {
	t.Helper()
	if err := firmware.VerifySignature(m, testPub()); err != nil {
		t.Errorf("delta manifest for %s %s: %v", target.Model, target.Version, err)
	}
	want := target.Manifest()
	if m.Delta == nil || m.Delta.Base != base || m.Model != want.Model || m.Version != want.Version ||
		m.Counter != want.Counter || m.Expires != want.Expires || m.SHA256 != want.SHA256 {
		t.Errorf("delta manifest: got %s %s counter %d expires %q delta %+v, want %s %s counter %d expires %q from base %s",
			m.Model, m.Version, m.Counter, m.Expires, m.Delta, want.Model, want.Version, want.Counter, want.Expires, base[:8])
	}
}

// TestDeltaManifestPerRelease: releases sharing an image each get a delta manifest of their
// own, while the patch bytes are stored once and kept while a release still names them.
func TestDeltaManifestPerRelease(t *testing.T) {
	v27, v28 := image(t, "pybricks-primehub-7.27.0.bin"), image(t, "pybricks-primehub-7.28.0.bin")
	tests := []struct {
		name string
		// add stores the base and two releases of its image, the first of which gets its
		// delta first.
		add func(t *testing.T, e *env) (base, first, second firmware.Firmware)
	}{
		{"same images under two models", func(t *testing.T, e *env) (firmware.Firmware, firmware.Firmware, firmware.Firmware) {
			base := e.add(t, "primehub", "7.27.0", 0, v27)
			e.add(t, "hubx", "7.27.0", 0, v27)
			first := e.addExpiring(t, "primehub", "7.28.0", 0, time.Now().Add(48*time.Hour), v28)
			second := e.addExpiring(t, "hubx", "7.28.0", 9, time.Now().Add(24*time.Hour), v28)
			return base, first, second
		}},
		{"same bytes re-released under a new version", func(t *testing.T, e *env) (firmware.Firmware, firmware.Firmware, firmware.Firmware) {
			first := e.add(t, "primehub", "8.0.2", 4, v28)
			base := e.add(t, "primehub", "8.0.3", 5, v27)
			second := e.addExpiring(t, "primehub", "8.0.4", 6, time.Now().Add(24*time.Hour), v28)
			return base, first, second
		}},
	}
	for _, tt := range tests {
		t.Run(tt.name, func(t *testing.T) {
			e := newEnv(t, 0)
			base, first, second := tt.add(t, e)
			p, ready := newGCPatcher(t, e, nil, nil)
			m1 := makeDelta(t, p, ready, base, first)
			checkForRelease(t, m1, base.SHA256, first)

			m2 := makeDelta(t, p, ready, base, second)
			checkForRelease(t, m2, base.SHA256, second)
			if m2.Delta.PatchSHA256 != m1.Delta.PatchSHA256 {
				t.Errorf("patch of the second release: got sha256 %s, want the first's %s (same bytes)", m2.Delta.PatchSHA256, m1.Delta.PatchSHA256)
			}
			// The first release's verdict is untouched.
			if m, ok, err := p.Delta(base.SHA256, first.Manifest()); !ok || err != nil || !sameDelta(m, m1) {
				t.Errorf("first release after the second's delta: got %+v ready=%v err=%v, want its own manifest", m, ok, err)
			}
			list, err := e.s.Deltas()
			if err != nil || len(list) != 2 {
				t.Fatalf("Deltas: got %+v (%v), want 2", list, err)
			}
			for _, d := range list {
				if d.Model+" "+d.Version != first.Model+" "+first.Version && d.Model+" "+d.Version != second.Model+" "+second.Version {
					t.Errorf("Deltas: got a delta to %s %s, want one to each release", d.Model, d.Version)
				}
			}

			// Deleting the first release keeps the patch bytes the second still names.
			if err := e.s.Delete(first.Model, first.Version, nil); err != nil {
				t.Fatal(err)
			}
			checkDeltaKeys(t, e.db, pair(base, second))
			if m, ok, err := p.Delta(base.SHA256, second.Manifest()); !ok || err != nil || !sameDelta(m, m2) {
				t.Errorf("second release after the first was deleted: got ready=%v err=%v, want its manifest", ok, err)
			}
			buf := make([]byte, 16)
			if _, err := e.s.ReadAt(m2.Delta.PatchSHA256, buf, 0); err != nil {
				t.Errorf("ReadAt of the patch the second release names: %v", err)
			}
		})
	}
}

// TestDeltaOfResignedRelease: a release signed again with a new expiry gets a new delta
// manifest with it, not the one signed before.
func TestDeltaOfResignedRelease(t *testing.T) {
	v27, v28 := image(t, "pybricks-primehub-7.27.0.bin"), image(t, "pybricks-primehub-7.28.0.bin")
	e := newEnv(t, 0)
	base := e.add(t, "primehub", "7.27.0", 0, v27)
	target := e.addExpiring(t, "primehub", "7.28.0", 0, time.Now().Add(time.Hour), v28)
	p, ready := newGCPatcher(t, e, nil, nil)
	checkForRelease(t, makeDelta(t, p, ready, base, target), base.SHA256, target)

	target = e.addExpiring(t, "primehub", "7.28.0", 0, time.Now().Add(48*time.Hour), v28)
	checkForRelease(t, makeDelta(t, p, ready, base, target), base.SHA256, target)
	checkDeltaKeys(t, e.db, pair(base, target))
}

// TestOpenMigratesDeltaVerdicts: verdicts an older fota stored by (base, target) sha256 are
// moved to the release their manifest was signed for, or dropped with the patches only they
// named; a release that shared the image gets a manifest of its own.
func TestOpenMigratesDeltaVerdicts(t *testing.T) {
	v27, v28 := image(t, "pybricks-primehub-7.27.0.bin"), image(t, "pybricks-primehub-7.28.0.bin")
	e := newEnv(t, 0)
	a := e.add(t, "primehub", "7.27.0", 0, v27)
	b := e.add(t, "primehub", "7.28.0", 0, v28)
	e.add(t, "hubx", "7.27.0", 0, v27)
	hb := e.addExpiring(t, "hubx", "7.28.0", 0, time.Now().Add(24*time.Hour), v28)
	p, ready := newGCPatcher(t, e, nil, nil)
	ab := makeDelta(t, p, ready, a, b)
	ba := makeDelta(t, p, ready, b, a)
	if err := p.Close(t.Context()); err != nil {
		t.Fatal(err)
	}

	// The state an older fota left: verdicts keyed base ":" target, without their target;
	// primehub 7.27.0 deleted, its verdict kept since hubx 7.27.0 holds the same image; and
	// a refusal.
	old := func(m protocol.Manifest) []byte {
		v, err := json.Marshal(map[string]any{"manifest": m})
		if err != nil {
			t.Fatal(err)
		}
		return v
	}
	other := strings.Repeat("ab", 32)
	if err := e.db.Update(func(tx *bbolt.Tx) error {
		if err := tx.DeleteBucket([]byte("deltas")); err != nil {
			return err
		}
		d, err := tx.CreateBucket([]byte("deltas"))
		if err != nil {
			return err
		}
		for k, v := range map[string][]byte{
			a.SHA256 + ":" + b.SHA256:    old(ab),
			b.SHA256 + ":" + a.SHA256:    old(ba),
			other + ":" + b.SHA256:       []byte(`{"refused":"base image is not in the store"}`),
			"not a key of either layout": []byte(`{}`),
		} {
			if err := d.Put([]byte(k), v); err != nil {
				return err
			}
		}
		return tx.Bucket([]byte("firmware")).Delete([]byte("primehub\x007.27.0"))
	}); err != nil {
		t.Fatal(err)
	}

	lb := &logBuf{}
	e.s.Close()
	e.s = e.openLogged(t, lb)
	checkLogged(t, lb, "delta verdicts now kept per release", "moved=1", "dropped=3")
	checkDeltaKeys(t, e.db, pair(a, b))
	checkArtifacts(t, e, a.SHA256, b.SHA256, ab.Delta.PatchSHA256)

	p, ready = newGCPatcher(t, e, nil, nil)
	if m, ok, err := p.Delta(a.SHA256, b.Manifest()); !ok || err != nil || !sameDelta(m, ab) {
		t.Errorf("primehub 7.28.0 after the migration: got ready=%v err=%v, want its manifest", ok, err)
	}
	checkForRelease(t, makeDelta(t, p, ready, a, hb), a.SHA256, hb)
	list, err := e.s.Deltas()
	if err != nil || len(list) != 2 || list[0].Model != "hubx" || list[1].Model != "primehub" || list[0].BaseVersion != "7.27.0" {
		t.Errorf("Deltas after the migration: got %+v (%v), want hubx and primehub 7.27.0 -> 7.28.0", list, err)
	}
}

// TestUploadedDeltaOfResignedRelease: offline, a delta uploaded for a release that has since
// been signed again (a new expiry) is not offered with the old expiry; the server says to
// sign the delta again, and takes the one signed for the new manifest.
func TestUploadedDeltaOfResignedRelease(t *testing.T) {
	r := newOfflineRelease(t, true)
	m, patch := r.signedDelta(t, testKey, r.oldImg, shaOf(r.oldImg))
	p, _ := startPatcher(t, r.e, r.s, 0)
	if _, _, err := r.s.AddDelta(t.Context(), m, bytes.NewReader(patch)); err != nil {
		t.Fatal(err)
	}

	resigned := r.target.Manifest()
	resigned.Signature = ""
	resigned.Expires = time.Now().Add(24 * time.Hour).UTC().Truncate(time.Second).Format(time.RFC3339)
	resigned, err := firmware.Sign(resigned, testKey)
	if err != nil {
		t.Fatal(err)
	}
	if r.target, _, err = r.s.Add(t.Context(), firmware.AddRequest{Manifest: &resigned, Body: bytes.NewReader(r.newImg)}); err != nil {
		t.Fatal(err)
	}
	if _, ok, err := p.Delta(r.base.SHA256, r.target.Manifest()); ok || err == nil || !strings.Contains(err.Error(), "sign it again") {
		t.Fatalf("delta signed before the release was re-signed: got ready=%v err=%v, want no delta and to sign it again", ok, err)
	}

	m, patch = r.signedDelta(t, testKey, r.oldImg, shaOf(r.oldImg))
	if _, created, err := r.s.AddDelta(t.Context(), m, bytes.NewReader(patch)); err != nil || !created {
		t.Fatalf("AddDelta of the delta signed again: got created=%v err=%v", created, err)
	}
	got, ok, err := p.Delta(r.base.SHA256, r.target.Manifest())
	if !ok || err != nil {
		t.Fatalf("after the new upload: got ready=%v err=%v, want the delta", ok, err)
	}
	checkForRelease(t, got, r.base.SHA256, r.target)
}
