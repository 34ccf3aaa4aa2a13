package api

import (
	"bytes"
	"context"
	"crypto/ed25519"
	"crypto/rand"
	"encoding/json"
	"net/http"
	"os"
	"path/filepath"
	"strings"
	"testing"

	"github.com/fota-dev/fota/firmware"
	"github.com/fota-dev/fota/firmware/delta"
	"github.com/fota-dev/fota/protocol"
)

func demoImage(t *testing.T, version string) []byte {
	t.Helper()
	img, err := os.ReadFile(filepath.Join("..", "demofirmware", "pybricks-primehub-"+version+".bin"))
	if err != nil {
		t.Fatal(err)
	}
	return img
}

// TestDeltasOverAPI adds a delta signed offline to a server that holds only the public key,
// and lists it; the refusals are the store's, carried to the client with their status.
func TestDeltasOverAPI(t *testing.T) {
	pub, priv, err := ed25519.GenerateKey(rand.Reader)
	if err != nil {
		t.Fatal(err)
	}
	e := start(t, func(o *Options) { o.Firmware = realStore(t, nil, pub) })
	c := e.admin(t)
	ctx := context.Background()
	oldImg, newImg := demoImage(t, "7.27.0"), demoImage(t, "7.28.0")
	var target firmware.Firmware
	for i, img := range [][]byte{oldImg, newImg} {
		v := []string{"7.27.0", "7.28.0"}[i]
		m, err := firmware.Sign(protocol.Manifest{V: 1, Model: "primehub", Version: v, Counter: uint64(i + 1), Size: int64(len(img)), SHA256: hexSHA(img)}, priv)
		if err != nil {
			t.Fatal(err)
		}
		if target, _, err = c.UploadFirmware(ctx, FirmwareUpload{Manifest: &m, Body: bytes.NewReader(img)}); err != nil {
			t.Fatal(err)
		}
	}
	patch, err := delta.Make(oldImg, newImg)
	if err != nil {
		t.Fatal(err)
	}
	m := target.Manifest()
	m.Signature = ""
	m.Delta = &protocol.Delta{Base: hexSHA(oldImg), PatchSHA256: hexSHA(patch), PatchSize: int64(len(patch)), Format: delta.Format}
	signed, err := firmware.Sign(m, priv)
	if err != nil {
		t.Fatal(err)
	}

	// No manifest: refused before the patch is read.
	hc := &http.Client{Transport: &http.Transport{TLSClientConfig: e.ca.AdminTLS(t)}}
	defer hc.CloseIdleConnections()
	resp, err := hc.Post(e.url+pathDeltas, "application/octet-stream", bytes.NewReader(patch))
	if err != nil {
		t.Fatal(err)
	}
	err = responseError(resp)
	resp.Body.Close()
	if status, msg := statusOf(t, err); status != http.StatusBadRequest || !strings.Contains(msg, "fota delta sign") {
		t.Errorf("no manifest: got %d %q, want 400 naming 'fota delta sign'", status, msg)
	}
	// A patch that is not the one the manifest signs.
	_, _, err = c.UploadDelta(ctx, signed, bytes.NewReader(patch[:len(patch)-1]))
	if status, msg := statusOf(t, err); status != http.StatusBadRequest || !strings.Contains(msg, "manifest does not match") {
		t.Errorf("truncated patch: got %d %q, want 400 manifest does not match", status, msg)
	}
	// A malformed patch, signed: the store's delta.ErrBadPatch is a 400 too.
	junk := bytes.Repeat([]byte("junk"), 1000)
	jm := m
	jd := *m.Delta
	jd.PatchSHA256, jd.PatchSize = hexSHA(junk), int64(len(junk))
	jm.Delta = &jd
	jsigned, err := firmware.Sign(jm, priv)
	if err != nil {
		t.Fatal(err)
	}
	_, _, err = c.UploadDelta(ctx, jsigned, bytes.NewReader(junk))
	if status, msg := statusOf(t, err); status != http.StatusBadRequest || !strings.Contains(msg, "bad delta patch") {
		t.Errorf("malformed patch: got %d %q, want 400 bad delta patch", status, msg)
	}
	if list, err := c.ListDeltas(ctx); err != nil || len(list) != 0 {
		t.Fatalf("deltas after the refusals: got %+v, %v; want none", list, err)
	}

	d, created, err := c.UploadDelta(ctx, signed, bytes.NewReader(patch))
	if err != nil || !created || !d.Uploaded || !d.Verified || d.BaseVersion != "7.27.0" || d.PatchSize != int64(len(patch)) {
		t.Fatalf("UploadDelta: got %+v created=%v err=%v, want a verified upload from 7.27.0", d, created, err)
	}
	if _, created, err := c.UploadDelta(ctx, signed, bytes.NewReader(patch)); err != nil || created {
		t.Errorf("same delta again: got created=%v err=%v, want 200 and not created", created, err)
	}
	list, err := c.ListDeltas(ctx)
	if err != nil || len(list) != 1 || list[0] != d {
		t.Fatalf("ListDeltas: got %+v, %v; want [%+v]", list, err, d)
	}
	// The JSON field names are the documented ones.
	raw, _ := json.Marshal(list[0])
	for _, field := range []string{`"base":`, `"base_version":"7.27.0"`, `"patch_sha256":`, `"uploaded":true`, `"verified":true`} {
		if !strings.Contains(string(raw), field) {
			t.Errorf("delta JSON %s: no %s", raw, field)
		}
	}
}
