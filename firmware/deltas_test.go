package firmware_test

import (
	"bytes"
	"crypto/ed25519"
	"errors"
	"strings"
	"testing"

	"github.com/fota-dev/fota/firmware"
	"github.com/fota-dev/fota/firmware/delta"
	"github.com/fota-dev/fota/protocol"
)

// offlineRelease is a target and a base image stored by a server that holds only the release
// public key, with their manifests signed on the signing machine (testKey).
type offlineRelease struct {
	e              *env
	s              *firmware.Store // offline
	oldImg, newImg []byte
	base, target   firmware.Firmware
}

func newOfflineRelease(t *testing.T, withBase bool) *offlineRelease {
	t.Helper()
	e := newEnv(t, 0)
	r := &offlineRelease{e: e, s: e.openOffline(t),
		oldImg: image(t, "pybricks-primehub-7.27.0.bin"), newImg: image(t, "pybricks-primehub-7.28.0.bin")}
	add := func(version string, counter uint64, img []byte) firmware.Firmware {
		m, err := firmware.Sign(protocol.Manifest{V: protocol.ProtocolVersion, Model: "primehub", Version: version,
			Counter: counter, Size: int64(len(img)), SHA256: shaOf(img)}, testKey)
		if err != nil {
			t.Fatal(err)
		}
		f, _, err := r.s.Add(t.Context(), firmware.AddRequest{Manifest: &m, Body: bytes.NewReader(img)})
		if err != nil {
			t.Fatal(err)
		}
		return f
	}
	if withBase {
		r.base = add("7.27.0", 1, r.oldImg)
	}
	r.target = add("7.28.0", 2, r.newImg)
	return r
}

// signedDelta makes the patch from old to new and the delta manifest of r's target naming it
// (from base sha), signed by key: what 'fota delta sign' writes.
func (r *offlineRelease) signedDelta(t *testing.T, key ed25519.PrivateKey, old []byte, base string) (protocol.Manifest, []byte) {
	t.Helper()
	patch, err := delta.Make(old, r.newImg)
	if err != nil {
		t.Fatal(err)
	}
	m := r.target.Manifest()
	m.Signature = ""
	m.Delta = &protocol.Delta{Base: base, PatchSHA256: shaOf(patch), PatchSize: int64(len(patch)), Format: delta.Format}
	signed, err := firmware.Sign(m, key)
	if err != nil {
		t.Fatal(err)
	}
	return signed, patch
}

func TestAddDeltaOffline(t *testing.T) {
	r := newOfflineRelease(t, true)
	m, patch := r.signedDelta(t, testKey, r.oldImg, shaOf(r.oldImg))
	p, _ := startPatcher(t, r.e, r.s, 0)
	if _, ok, err := p.Delta(r.base.SHA256, r.target.Manifest()); ok || err == nil {
		t.Fatalf("before the upload: got ready=%v err=%v, want no delta", ok, err)
	}

	d, created, err := r.s.AddDelta(t.Context(), m, bytes.NewReader(patch))
	if err != nil || !created {
		t.Fatalf("AddDelta: got created=%v err=%v, want created", created, err)
	}
	want := firmware.Delta{Base: r.base.SHA256, BaseVersion: "7.27.0", Model: "primehub", Version: "7.28.0",
		Target: r.target.SHA256, Size: r.target.Size, PatchSHA256: shaOf(patch), PatchSize: int64(len(patch)),
		Uploaded: true, Verified: true}
	if d != want {
		t.Fatalf("AddDelta: got %+v, want %+v", d, want)
	}
	// The Patcher of the offline server now offers exactly the signed manifest, and the store
	// serves the patch it names.
	got, ok, err := p.Delta(r.base.SHA256, r.target.Manifest())
	if !ok || err != nil || !sameDelta(got, m) || got.Signature != m.Signature {
		t.Fatalf("after the upload: got ready=%v err=%v manifest %+v, want the uploaded one", ok, err, got)
	}
	served := make([]byte, len(patch))
	if _, err := r.s.ReadAt(m.Delta.PatchSHA256, served, 0); err != nil || !bytes.Equal(served, patch) {
		t.Fatalf("stored patch: err %v, equal %v", err, bytes.Equal(served, patch))
	}
	if list, err := r.s.Deltas(); err != nil || len(list) != 1 || list[0] != want {
		t.Fatalf("Deltas: got %+v, %v; want [%+v]", list, err, want)
	}

	// The same upload again changes nothing.
	if _, created, err := r.s.AddDelta(t.Context(), m, bytes.NewReader(patch)); err != nil || created {
		t.Fatalf("same delta again: got created=%v err=%v, want not created", created, err)
	}
	checkDeltaKeys(t, r.e.db, pair(r.base, r.target))

	// An uploaded patch lives as long as its target, like one the server made.
	if err := r.s.Delete("primehub", "7.28.0", nil); err != nil {
		t.Fatal(err)
	}
	checkDeltaKeys(t, r.e.db)
	checkArtifacts(t, r.e, r.base.SHA256)
}

// TestAddDeltaUnknownBase: a device can run an image the server never held. The patch cannot
// be checked here, and is stored as not verified; devices check what it builds.
func TestAddDeltaUnknownBase(t *testing.T) {
	r := newOfflineRelease(t, false)
	baseSHA := shaOf(r.oldImg)
	m, patch := r.signedDelta(t, testKey, r.oldImg, baseSHA)
	d, created, err := r.s.AddDelta(t.Context(), m, bytes.NewReader(patch))
	if err != nil || !created || d.Verified || d.BaseVersion != "" || !d.Uploaded {
		t.Fatalf("AddDelta: got %+v created=%v err=%v, want created, uploaded, not verified, no base version", d, created, err)
	}
	p, _ := startPatcher(t, r.e, r.s, 0)
	if got, ok, err := p.Delta(baseSHA, r.target.Manifest()); !ok || err != nil || !sameDelta(got, m) {
		t.Fatalf("Delta: got ready=%v err=%v, want the uploaded delta", ok, err)
	}

	// Another patch for the same pair replaces it, and the replaced patch file goes. (This
	// one is built from another image: the server, without the base, cannot tell.)
	other := image(t, "pybricks-primehub-7.26.0.bin")
	m2, patch2 := r.signedDelta(t, testKey, other, baseSHA)
	if m2.Delta.PatchSHA256 == m.Delta.PatchSHA256 {
		t.Fatal("test needs two different patches")
	}
	if _, created, err := r.s.AddDelta(t.Context(), m2, bytes.NewReader(patch2)); err != nil || !created {
		t.Fatalf("replacing upload: got created=%v err=%v, want created", created, err)
	}
	if got, ok, err := p.Delta(baseSHA, r.target.Manifest()); !ok || err != nil || !sameDelta(got, m2) {
		t.Fatalf("Delta after the replacement: got ready=%v err=%v, want the second upload", ok, err)
	}
	checkArtifacts(t, r.e, r.target.SHA256, m2.Delta.PatchSHA256)
}

// TestAddDeltaReplacesMadeOne: on a server with the key, an upload for a pair the Patcher
// already made is taken as the operator's choice, and marked as uploaded.
func TestAddDeltaReplacesMadeOne(t *testing.T) {
	e := newEnv(t, 0)
	oldImg, newImg := image(t, "pybricks-primehub-7.27.0.bin"), image(t, "pybricks-primehub-7.28.0.bin")
	base := e.add(t, "primehub", "7.27.0", 0, oldImg)
	target := e.add(t, "primehub", "7.28.0", 0, newImg)
	p, ready := startPatcher(t, e, e.s, 0)
	made := makeDelta(t, p, ready, base, target)
	if list, err := e.s.Deltas(); err != nil || len(list) != 1 || list[0].Uploaded || !list[0].Verified {
		t.Fatalf("Deltas: got %+v, %v; want one made and verified here", list, err)
	}
	r := &offlineRelease{e: e, s: e.s, oldImg: oldImg, newImg: newImg, base: base, target: target}
	m, patch := r.signedDelta(t, testKey, oldImg, base.SHA256)
	if m.Delta.PatchSHA256 != made.Delta.PatchSHA256 {
		t.Fatalf("the same pair made twice gave two patches: %s and %s", made.Delta.PatchSHA256, m.Delta.PatchSHA256)
	}
	d, created, err := e.s.AddDelta(t.Context(), m, bytes.NewReader(patch))
	if err != nil || !created || !d.Uploaded || !d.Verified {
		t.Fatalf("AddDelta: got %+v created=%v err=%v, want created, uploaded and verified", d, created, err)
	}
	// The patch file is the one both verdicts name: it stays.
	checkArtifacts(t, e, base.SHA256, target.SHA256, m.Delta.PatchSHA256)
}

func TestAddDeltaRefusals(t *testing.T) {
	r := newOfflineRelease(t, true)
	good, patch := r.signedDelta(t, testKey, r.oldImg, r.base.SHA256)
	_, otherKey, err := ed25519.GenerateKey(nil)
	if err != nil {
		t.Fatal(err)
	}
	// resign returns good changed by edit, signed again by the release key.
	resign := func(edit func(m *protocol.Manifest)) protocol.Manifest {
		m := good
		d := *good.Delta
		m.Delta, m.Signature = &d, ""
		edit(&m)
		signed, err := firmware.Sign(m, testKey)
		if err != nil {
			t.Fatal(err)
		}
		return signed
	}
	flipped := bytes.Clone(r.newImg)
	flipped[len(flipped)/2] ^= 0xff
	wrongPatch, err := delta.Make(r.oldImg, flipped)
	if err != nil {
		t.Fatal(err)
	}
	garbage := bytes.Repeat([]byte("not a patch "), 100)
	forPatch := func(p []byte) protocol.Manifest {
		return resign(func(m *protocol.Manifest) { m.Delta.PatchSHA256, m.Delta.PatchSize = shaOf(p), int64(len(p)) })
	}
	unsigned := good
	unsigned.Signature = ""
	otherSigned, _ := r.signedDelta(t, otherKey, r.oldImg, r.base.SHA256)

	tests := []struct {
		name    string
		m       protocol.Manifest
		body    []byte
		wantErr error
		wantMsg string
	}{
		{"unsigned", unsigned, patch, firmware.ErrBadSignature, "not signed"},
		{"signed by another key", otherSigned, patch, firmware.ErrBadSignature, "not signed by the release key"},
		{"altered after signing", func() protocol.Manifest { m := good; m.Counter++; return m }(), patch, firmware.ErrBadSignature, ""},
		{"a full image's manifest", r.target.Manifest(), patch, firmware.ErrManifestMismatch, "no delta"},
		{"another format", resign(func(m *protocol.Manifest) { m.Delta.Format = "bsdiff-4.3" }), patch, firmware.ErrBadManifest, "format"},
		{"another counter than the target's", resign(func(m *protocol.Manifest) { m.Counter = 7 }), patch, firmware.ErrManifestMismatch, "counter 2"},
		{"an expiry the target does not have", resign(func(m *protocol.Manifest) { m.Expires = "2099-01-01T00:00:00Z" }), patch, firmware.ErrManifestMismatch, "expires never"},
		{"expired", resign(func(m *protocol.Manifest) { m.Expires = "2020-01-01T00:00:00Z" }), patch, firmware.ErrExpired, ""},
		{"unknown target", resign(func(m *protocol.Manifest) { m.Version = "7.29.0" }), patch, firmware.ErrNotFound, "add its image first"},
		{"base is the target", resign(func(m *protocol.Manifest) { m.Delta.Base = m.SHA256 }), patch, firmware.ErrBadManifest, "its own target"},
		{"patch no smaller than the image", resign(func(m *protocol.Manifest) { m.Delta.PatchSize = m.Size }), patch, firmware.ErrBadManifest, "no smaller"},
		{"other bytes than the manifest signs", good, append(bytes.Clone(patch), 0), firmware.ErrManifestMismatch, "upload is"},
		{"empty body", good, nil, firmware.ErrEmpty, ""},
		{"not a patch", forPatch(garbage), garbage, delta.ErrBadPatch, ""},
		{"does not rebuild the target", forPatch(wrongPatch), wrongPatch, delta.ErrBadPatch, "does not rebuild"},
	}
	for _, tt := range tests {
		t.Run(tt.name, func(t *testing.T) {
			_, created, err := r.s.AddDelta(t.Context(), tt.m, bytes.NewReader(tt.body))
			if !errors.Is(err, tt.wantErr) || created || !strings.Contains(err.Error(), tt.wantMsg) {
				t.Fatalf("got created=%v err=%v; want %v mentioning %q", created, err, tt.wantErr, tt.wantMsg)
			}
			// Nothing stored, nothing left on disk.
			checkDeltaKeys(t, r.e.db)
			checkArtifacts(t, r.e, r.base.SHA256, r.target.SHA256)
		})
	}
	// The refusals did not spoil the good upload.
	if _, created, err := r.s.AddDelta(t.Context(), good, bytes.NewReader(patch)); err != nil || !created {
		t.Fatalf("good upload after the refusals: got created=%v err=%v", created, err)
	}
}

// TestAddDeltaTargetReplacedDuringUpload: the target record is checked again in the
// transaction that stores the verdict. A target deleted and added again with another counter
// while the patch was uploading must not get the old delta manifest.
func TestAddDeltaTargetReplacedDuringUpload(t *testing.T) {
	r := newOfflineRelease(t, true)
	m, patch := r.signedDelta(t, testKey, r.oldImg, r.base.SHA256)
	body := &hookReader{r: bytes.NewReader(patch), before: func() {
		if err := r.s.Delete("primehub", "7.28.0", nil); err != nil {
			t.Error(err)
		}
		re, err := firmware.Sign(protocol.Manifest{V: protocol.ProtocolVersion, Model: "primehub", Version: "7.28.0",
			Counter: 3, Size: int64(len(r.newImg)), SHA256: shaOf(r.newImg)}, testKey)
		if err != nil {
			t.Error(err)
			return
		}
		if _, _, err := r.s.Add(t.Context(), firmware.AddRequest{Manifest: &re, Body: bytes.NewReader(r.newImg)}); err != nil {
			t.Error(err)
		}
	}}
	_, created, err := r.s.AddDelta(t.Context(), m, body)
	if !errors.Is(err, firmware.ErrNotFound) || created {
		t.Fatalf("got created=%v err=%v, want ErrNotFound (target replaced)", created, err)
	}
	checkDeltaKeys(t, r.e.db)
	checkArtifacts(t, r.e, r.base.SHA256, r.target.SHA256)
}

// hookReader runs before once, at the first Read.
type hookReader struct {
	r      *bytes.Reader
	before func()
	done   bool
}

func (h *hookReader) Read(p []byte) (int, error) {
	if !h.done {
		h.done = true
		h.before()
	}
	return h.r.Read(p)
}
