package main

import (
	"bytes"
	"context"
	"encoding/json"
	"log/slog"
	"os"
	"path/filepath"
	"strings"
	"testing"
	"time"

	"github.com/fota-dev/fota/certs"
	"github.com/fota-dev/fota/firmware"
	"github.com/fota-dev/fota/protocol"
)

// TestOfflineDeltaEndToEnd runs the whole offline release with deltas: the release key stays
// on a "signing machine" that signs both images and the delta between them; a real server
// holding only release.pub takes them through the CLI, and devices update by the uploaded
// delta, checking it against the key they pin.
func TestOfflineDeltaEndToEnd(t *testing.T) {
	keys := generateKeys(t)
	keyFile := filepath.Join(keys, "release.key")
	pubPEM, err := os.ReadFile(filepath.Join(keys, "release.pub"))
	if err != nil {
		t.Fatal(err)
	}
	dir := t.TempDir()
	dataDir, certsDir := filepath.Join(dir, "data"), filepath.Join(dir, "certs")
	if err := os.MkdirAll(dataDir, 0o700); err != nil {
		t.Fatal(err)
	}
	if err := os.WriteFile(filepath.Join(dataDir, "release.pub"), pubPEM, 0o644); err != nil {
		t.Fatal(err)
	}
	if err := certs.Init(certsDir, certs.InitOptions{}); err != nil {
		t.Fatal(err)
	}
	srv, err := startServer(serverConfig{
		DataDir: dataDir, CertsDir: certsDir,
		MQTTAddr: "127.0.0.1:0", APIAddr: "127.0.0.1:0", Logger: slog.New(slog.DiscardHandler),
	})
	if err != nil {
		t.Fatal(err)
	}
	t.Cleanup(func() { srv.Close(context.Background()) })
	if srv.store.CanSign() {
		t.Fatal("server with only release.pub can sign: want offline")
	}
	a := &adminAPI{url: "https://" + srv.api.Addr().String(), certs: certsDir}

	// The signing machine.
	oldFile := writeTestFile(t, "primehub-7.27.0.bin", demoImage(demoFrom))
	newFile := writeTestFile(t, "primehub-7.28.0.bin", demoImage(demoTo))
	oldManifest, newManifest := filepath.Join(dir, "old.manifest"), filepath.Join(dir, "new.manifest")
	sign(t, "--key", keyFile, "--model", demoModel, "--version", demoFrom, "--counter", "1", "--file", oldFile, "--out", oldManifest)
	sign(t, "--key", keyFile, "--model", demoModel, "--version", demoTo, "--counter", "2", "--file", newFile, "--out", newManifest)
	patchFile := filepath.Join(dir, "7.27.0-7.28.0.patch")
	var out, errOut bytes.Buffer
	if code := run([]string{"delta", "sign", "--key", keyFile, "--manifest", newManifest, oldFile, newFile, patchFile}, &out, &errOut); code != 0 {
		t.Fatalf("delta sign: exit %d, stderr %q", code, errOut.String())
	}
	if !strings.HasPrefix(out.String(), "signed a delta to primehub 7.28.0: ") || !strings.Contains(out.String(), "wrote "+patchFile+" and "+patchFile+".manifest") {
		t.Errorf("delta sign printed %q", out.String())
	}
	dm := readManifestFile(t, patchFile+".manifest")
	if err := firmware.VerifySignature(dm, loadPub(t, filepath.Join(keys, "release.pub"))); err != nil || dm.Delta == nil {
		t.Fatalf("delta manifest %+v: signature %v, want a signed delta", dm, err)
	}

	// A delta before its target is on the server is refused, and leaves nothing.
	code, _, stderr := a.fota(t, "delta", "add", "--file", patchFile)
	if code != 1 || !strings.Contains(stderr, "add its image first (404)") {
		t.Errorf("delta before its target: exit %d, stderr %q; want 1 and a 404 saying to add the image first", code, stderr)
	}
	for _, m := range []string{oldManifest, newManifest} {
		f := map[string]string{oldManifest: oldFile, newManifest: newFile}[m]
		if code, _, stderr := a.fota(t, "firmware", "add", "--file", f, "--manifest", m); code != 0 {
			t.Fatalf("firmware add %s: exit %d, stderr %q", f, code, stderr)
		}
	}
	code, stdout, stderr := a.fota(t, "delta", "add", "--file", patchFile)
	if code != 0 || !strings.HasPrefix(stdout, "added delta primehub 7.27.0 -> 7.28.0: ") || !strings.Contains(stdout, "it rebuilds the target from the stored base") {
		t.Fatalf("delta add: exit %d, stdout %q, stderr %q", code, stdout, stderr)
	}
	code, stdout, _ = a.fota(t, "delta", "list")
	lines := strings.Split(strings.TrimSpace(stdout), "\n")
	if code != 0 || len(lines) != 2 || !strings.Contains(lines[1], "uploaded") || !strings.HasPrefix(lines[1], "primehub  7.27.0  7.28.0") {
		t.Errorf("delta list: exit %d, stdout\n%s\nwant one uploaded delta 7.27.0 -> 7.28.0", code, stdout)
	}

	// Devices running 7.27.0 get the delta, and check it against the key they pin.
	ctx, cancel := context.WithTimeout(context.Background(), time.Minute)
	defer cancel()
	client := adminClient(t, srv, certsDir)
	_, rs := updateFleet(ctx, t, srv, client, certsDir, 3, 1, loadPub(t, filepath.Join(keys, "release.pub")))
	for _, r := range rs {
		if r.State != protocol.StateInstalled || r.To != demoTo || !r.Delta || r.Bytes != dm.Delta.PatchSize {
			t.Errorf("device %s: got %s to %s, delta=%v, %d bytes; want installed %s by the %d-byte delta",
				r.ID, r.State, r.To, r.Delta, r.Bytes, demoTo, dm.Delta.PatchSize)
		}
	}
}

// TestDeltaSignAddErrors: every mistake is one line and a non-zero exit, and nothing is
// written or stored.
func TestDeltaSignAddErrors(t *testing.T) {
	keys := generateKeys(t)
	keyFile := filepath.Join(keys, "release.key")
	otherKeys := generateKeys(t)
	a, store := storeAPI(t, nil, loadPub(t, filepath.Join(keys, "release.pub")))
	dir := t.TempDir()
	oldFile := writeTestFile(t, "old.bin", demoImage(demoFrom))
	newFile := writeTestFile(t, "new.bin", demoImage(demoTo))
	newManifest := filepath.Join(dir, "new.manifest")
	sign(t, "--key", keyFile, "--model", demoModel, "--version", demoTo, "--counter", "2", "--file", newFile, "--out", newManifest)
	foreign := filepath.Join(dir, "foreign.manifest")
	sign(t, "--key", filepath.Join(otherKeys, "release.key"), "--model", demoModel, "--version", demoTo, "--counter", "2", "--file", newFile, "--out", foreign)
	patch := filepath.Join(dir, "p.patch")

	signErrs := []struct {
		name     string
		args     []string
		wantCode int
		wantErr  string
	}{
		{"no key", []string{"--manifest", newManifest, oldFile, newFile, patch}, 2, "--key is required"},
		{"no manifest", []string{"--key", keyFile, oldFile, newFile, patch}, 2, "--manifest is required"},
		{"two files", []string{"--key", keyFile, "--manifest", newManifest, oldFile, newFile}, 2, "got 2 arguments, want 3"},
		{"target signed by another key", []string{"--key", keyFile, "--manifest", foreign, oldFile, newFile, patch}, 1, "bad manifest signature"},
		{"NEW is not the signed image", []string{"--key", keyFile, "--manifest", newManifest, newFile, oldFile, patch}, 1, "is not the image"},
		{"missing OLD", []string{"--key", keyFile, "--manifest", newManifest, filepath.Join(dir, "nope"), newFile, patch}, 1, "no such file"},
	}
	for _, tc := range signErrs {
		t.Run("sign/"+tc.name, func(t *testing.T) {
			var out, errOut bytes.Buffer
			code := run(append([]string{"delta", "sign"}, tc.args...), &out, &errOut)
			if code != tc.wantCode || !strings.Contains(errOut.String(), tc.wantErr) || strings.Count(errOut.String(), "\n") != 1 {
				t.Errorf("got exit %d, stderr %q; want %d with one line containing %q", code, errOut.String(), tc.wantCode, tc.wantErr)
			}
			if _, err := os.Stat(patch); !os.IsNotExist(err) {
				t.Errorf("patch file written after a refusal (stat err %v)", err)
			}
		})
	}

	var out, errOut bytes.Buffer
	if code := run([]string{"delta", "sign", "--key", keyFile, "--manifest", newManifest, oldFile, newFile, patch}, &out, &errOut); code != 0 {
		t.Fatalf("delta sign: exit %d, stderr %q", code, errOut.String())
	}
	if code, _, stderr := a.fota(t, "firmware", "add", "--file", newFile, "--manifest", newManifest); code != 0 {
		t.Fatalf("firmware add: exit %d, stderr %q", code, stderr)
	}
	short := writeTestFile(t, "short.patch", []byte("too short"))
	tampered, err := os.ReadFile(patch)
	if err != nil {
		t.Fatal(err)
	}
	tampered[len(tampered)-1] ^= 1
	tamperedFile := writeTestFile(t, "tampered.patch", tampered)
	var dm protocol.Manifest
	if b, err := os.ReadFile(patch + ".manifest"); err != nil || json.Unmarshal(b, &dm) != nil {
		t.Fatal("read delta manifest")
	}
	addErrs := []struct {
		name    string
		args    []string
		wantErr string
	}{
		{"a full image's manifest", []string{"--file", patch, "--manifest", newManifest}, "is not a delta's manifest"},
		{"patch of another size", []string{"--file", short, "--manifest", patch + ".manifest"}, "signs a patch of"},
		{"patch changed after signing", []string{"--file", tamperedFile, "--manifest", patch + ".manifest"}, "manifest does not match the firmware"},
		{"no manifest beside the patch", []string{"--file", short}, "cannot read manifest"},
	}
	for _, tc := range addErrs {
		t.Run("add/"+tc.name, func(t *testing.T) {
			code, stdout, stderr := a.fota(t, append([]string{"delta", "add"}, tc.args...)...)
			if code != 1 || !strings.Contains(stderr, tc.wantErr) || strings.Count(stderr, "\n") != 1 || stdout != "" {
				t.Errorf("got exit %d, stdout %q, stderr %q; want 1 with one line containing %q", code, stdout, stderr, tc.wantErr)
			}
			if ds, err := store.Deltas(); err != nil || len(ds) != 0 {
				t.Errorf("store deltas %+v, %v; want none", ds, err)
			}
		})
	}
	// Without the base on the server the patch cannot be checked there: it is taken, and
	// said so.
	code, stdout, stderr := a.fota(t, "delta", "add", "--file", patch)
	if code != 0 || !strings.Contains(stdout, "from sha256:") && !strings.Contains(stdout, "primehub sha256:") || !strings.Contains(stdout, "devices alone check") {
		t.Errorf("delta add without the base: exit %d, stdout %q, stderr %q", code, stdout, stderr)
	}
}
