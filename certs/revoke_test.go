package certs_test

import (
	"context"
	"encoding/json"
	"errors"
	"os"
	"path/filepath"
	"slices"
	"sync"
	"testing"
	"time"

	"github.com/fota-dev/fota/certs"
	"github.com/fota-dev/fota/protocol"
)

func TestRevocationList(t *testing.T) {
	dir := t.TempDir()
	path := filepath.Join(dir, certs.RevokedFile)
	r, err := certs.OpenRevocationList(dir)
	if err != nil {
		t.Fatalf("open without revoked.json: %v", err)
	}
	if r.Revoked("dev-1") {
		t.Errorf("empty list: dev-1 revoked")
	}

	if err := certs.Revoke(dir, "dev-1"); err != nil {
		t.Fatal(err)
	}
	if r.Revoked("dev-1") {
		t.Errorf("dev-1 revoked before Reload: the list must change only on Reload")
	}
	added, err := r.Reload()
	if err != nil || !slices.Equal(added, []string{"dev-1"}) {
		t.Fatalf("Reload: got (%q, %v), want ([dev-1], nil)", added, err)
	}
	if !r.Revoked("dev-1") || r.Revoked("dev-2") {
		t.Errorf("after Reload: got dev-1 %v dev-2 %v, want true false", r.Revoked("dev-1"), r.Revoked("dev-2"))
	}
	if got := mode(t, path); got != 0o644 {
		t.Errorf("revoked.json mode: got %v, want 0644", got)
	}

	// Idempotent: revoking again changes nothing.
	before, _ := os.ReadFile(path)
	if err := certs.Revoke(dir, "dev-1"); err != nil {
		t.Fatal(err)
	}
	after, _ := os.ReadFile(path)
	if string(before) != string(after) {
		t.Errorf("second Revoke rewrote the file:\n%s\nwant\n%s", after, before)
	}
	if added, err := r.Reload(); err != nil || added != nil {
		t.Errorf("Reload without a change: got (%q, %v), want (nil, nil)", added, err)
	}

	for _, id := range []string{"dev-3", "dev-2"} {
		if err := certs.Revoke(dir, id); err != nil {
			t.Fatal(err)
		}
	}
	if added, err := r.Reload(); err != nil || !slices.Equal(added, []string{"dev-2", "dev-3"}) {
		t.Errorf("Reload: got (%q, %v), want ([dev-2 dev-3], nil)", added, err)
	}
	var doc struct {
		Revoked []struct {
			ID string    `json:"id"`
			At time.Time `json:"at"`
		} `json:"revoked"`
	}
	if err := json.Unmarshal(after, &doc); err != nil || len(doc.Revoked) != 1 || doc.Revoked[0].ID != "dev-1" || doc.Revoked[0].At.IsZero() {
		t.Errorf("revoked.json: got %s (%v), want one entry for dev-1 with a time", after, err)
	}

	if err := certs.Revoke(dir, "a/b"); !errors.Is(err, protocol.ErrBadDeviceID) {
		t.Errorf("Revoke(a/b): got %v, want ErrBadDeviceID", err)
	}

	// A corrupt file keeps the old list, reports the error, and is refused by Open and Revoke.
	if err := os.WriteFile(path, []byte(`{"revoked": [`), 0o644); err != nil {
		t.Fatal(err)
	}
	if _, err := r.Reload(); err == nil {
		t.Errorf("Reload of a corrupt file: got nil error, want one")
	}
	if r.Err() == nil {
		t.Errorf("Err after a failed Reload: got nil, want the error")
	}
	if !r.Revoked("dev-2") {
		t.Errorf("after a failed Reload: dev-2 no longer revoked")
	}
	if _, err := certs.OpenRevocationList(dir); err == nil {
		t.Errorf("Open of a corrupt file: got nil error, want one")
	}
	if err := certs.Revoke(dir, "dev-4"); err == nil {
		t.Errorf("Revoke into a corrupt file: got nil error, want one")
	}
	if err := os.WriteFile(path, []byte(`{"revoked": [{"id": "a b"}]}`), 0o644); err != nil {
		t.Fatal(err)
	}
	if _, err := r.Reload(); !errors.Is(err, protocol.ErrBadDeviceID) {
		t.Errorf("Reload with a bad id: got %v, want ErrBadDeviceID", err)
	}

	// A hand-edited file with the same size is still noticed (the rename gives a new inode).
	if err := os.WriteFile(path+".new", []byte(`{"revoked": [{"id": "dev-5"}]}`), 0o644); err != nil {
		t.Fatal(err)
	}
	if err := os.Rename(path+".new", path); err != nil {
		t.Fatal(err)
	}
	if added, err := r.Reload(); err != nil || !slices.Equal(added, []string{"dev-5"}) {
		t.Errorf("Reload after a repair: got (%q, %v), want ([dev-5], nil)", added, err)
	}
	if r.Err() != nil || r.Revoked("dev-1") || !r.Revoked("dev-5") {
		t.Errorf("after a repair: got Err %v, dev-1 %v, dev-5 %v; want nil, false, true", r.Err(), r.Revoked("dev-1"), r.Revoked("dev-5"))
	}
}

func TestRevokeConcurrent(t *testing.T) {
	dir := t.TempDir()
	ids := []string{"d0", "d1", "d2", "d3", "d4", "d5", "d6", "d7"}
	var wg sync.WaitGroup
	for _, id := range ids {
		wg.Go(func() {
			if err := certs.Revoke(dir, id); err != nil {
				t.Error(err)
			}
		})
	}
	wg.Wait()
	r, err := certs.OpenRevocationList(dir)
	if err != nil {
		t.Fatal(err)
	}
	for _, id := range ids {
		if !r.Revoked(id) {
			t.Errorf("%s: got not revoked, want revoked (a concurrent Revoke lost it)", id)
		}
	}
}

func TestWatch(t *testing.T) {
	dir := t.TempDir()
	r, err := certs.OpenRevocationList(dir)
	if err != nil {
		t.Fatal(err)
	}
	got := make(chan string, 4)
	ctx, cancel := context.WithCancel(context.Background())
	done := make(chan struct{})
	go func() {
		defer close(done)
		r.Watch(ctx, 5*time.Millisecond, func(id string) { got <- id })
	}()
	defer func() {
		cancel()
		select {
		case <-done:
		case <-time.After(5 * time.Second):
			t.Errorf("Watch did not return after cancel")
		}
	}()

	for _, id := range []string{"dev-1", "dev-2"} {
		if err := certs.Revoke(dir, id); err != nil {
			t.Fatal(err)
		}
		select {
		case g := <-got:
			if g != id {
				t.Errorf("onRevoke: got %q, want %q", g, id)
			}
		case <-time.After(5 * time.Second):
			t.Fatalf("onRevoke not called for %s", id)
		}
		if !r.Revoked(id) {
			t.Errorf("%s: got not revoked after onRevoke, want revoked", id)
		}
	}
}

// TestWatchAdmins: Watch tells the OnAdminRevoke function of each newly revoked admin, once,
// after the list holds it, and keeps admins and devices apart.
func TestWatchAdmins(t *testing.T) {
	dir := t.TempDir()
	r, err := certs.OpenRevocationList(dir)
	if err != nil {
		t.Fatal(err)
	}
	devices, admins := make(chan string, 4), make(chan string, 4)
	r.OnAdminRevoke(func(name string) {
		if !r.AdminRevoked(name) {
			t.Errorf("OnAdminRevoke(%s) before the list holds it", name)
		}
		admins <- name
	})
	ctx, cancel := context.WithCancel(context.Background())
	done := make(chan struct{})
	go func() {
		defer close(done)
		r.Watch(ctx, 5*time.Millisecond, func(id string) { devices <- id })
	}()
	defer func() {
		cancel()
		<-done
	}()
	next := func(ch chan string, what string) string {
		t.Helper()
		select {
		case g := <-ch:
			return g
		case <-time.After(5 * time.Second):
			t.Fatalf("no %s reported within 5s", what)
			return ""
		}
	}
	if err := certs.RevokeAdmin(dir, "ops"); err != nil {
		t.Fatal(err)
	}
	if g := next(admins, "admin"); g != "ops" {
		t.Errorf("OnAdminRevoke: got %q, want ops", g)
	}
	// A device revoked next is reported as a device only, and ops is not reported again.
	if err := certs.Revoke(dir, "ops"); err != nil {
		t.Fatal(err)
	}
	if g := next(devices, "device"); g != "ops" {
		t.Errorf("onRevoke: got %q, want ops", g)
	}
	if err := certs.RevokeAdmin(dir, "oncall"); err != nil {
		t.Fatal(err)
	}
	if g := next(admins, "admin"); g != "oncall" {
		t.Errorf("OnAdminRevoke: got %q, want oncall (and ops only once)", g)
	}
	select {
	case g := <-devices:
		t.Errorf("onRevoke(%q) for an admin", g)
	default:
	}
}
