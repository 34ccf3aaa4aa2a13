package controller

import (
	"context"
	"errors"
	"strings"
	"syscall"
	"testing"
	"time"

	"github.com/fota-dev/fota/protocol"
)

// waitFor polls cond until it holds, for at most 20 s.
func (h *harness) waitFor(what string, cond func() bool) {
	h.t.Helper()
	deadline := time.Now().Add(20 * time.Second)
	for !cond() {
		if time.Now().After(deadline) {
			h.t.Fatalf("timed out waiting for %s", what)
		}
		time.Sleep(5 * time.Millisecond)
	}
}

// failCommits makes every state file commit fail with ENOSPC until the returned func is
// called.
func (h *harness) failCommits() (restore func()) {
	fail := func() error { return syscall.ENOSPC }
	h.c.beforeCommit.Store(&fail)
	return func() { h.c.beforeCommit.Store(nil) }
}

// TestFailedCommitKeepsDevicesOnline: a commit that fails (a full disk) reloads the state
// from the file, and the devices whose connections stayed up are still online after it, so a
// rollout reaches them once writes succeed again, without any device reconnecting. The
// caller of the failed change gets ErrStateWrite naming the cause.
func TestFailedCommitKeepsDevicesOnline(t *testing.T) {
	h := newHarness(t)
	ids := h.fleet("d", 2)
	restore := h.failCommits()
	_, err := h.c.CreateRollout(context.Background(), RolloutSpec{Model: "primehub", Version: "7.28.0"})
	if !errors.Is(err, ErrStateWrite) || !strings.Contains(err.Error(), "no space left on device") {
		t.Fatalf("got %v, want ErrStateWrite with the cause", err)
	}
	h.waitFor("the reload", func() bool { return h.c.Stats().Reloads.Load() == 1 })
	if _, err := h.c.Rollout("r1"); !errors.Is(err, ErrNotFound) {
		t.Fatalf("got %v, want the failed rollout not kept", err)
	}
	for _, id := range ids {
		d, err := h.c.GetDevice(id)
		if err != nil || !d.Online {
			t.Fatalf("device %s after the reload: online %v (%v), want online", id, d.Online, err)
		}
	}

	// Writes fail again when the scheduled rollout starts: its offers are not sent, and are
	// sent by the next tick once the disk has room.
	restore()
	r := h.create(RolloutSpec{Start: t0.Add(time.Hour)})
	restore = h.failCommits()
	h.tick(t0.Add(time.Hour))
	h.waitFor("the second reload", func() bool { return h.c.Stats().Reloads.Load() == 2 })
	for _, id := range ids {
		if n := len(h.pub.on(protocol.Topic(id, protocol.SuffixJob))); n != 0 {
			t.Fatalf("device %s got %d offers from a failed commit, want 0", id, n)
		}
	}
	restore()
	h.tick(t0.Add(time.Hour + time.Second))
	for _, id := range ids {
		h.waitOffer(id, 1)
	}
	if got := h.rollout(r.ID); got.State != RolloutActive || inFlight(got) != 2 {
		t.Errorf("got %s with %d in flight, want active with 2", got.State, inFlight(got))
	}
	if got := h.c.Stats().FailedCommits.Load(); got != 2 {
		t.Errorf("got %d failed commits, want 2", got)
	}
}
