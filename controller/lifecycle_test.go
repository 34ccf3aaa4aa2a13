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

// TestExpiredReleaseRefused: a rollout of a release that expired, or that expires before a
// job offered now could finish its phases, is refused with ErrExpired.
func TestExpiredReleaseRefused(t *testing.T) {
	tests := []struct {
		name, expires, want string
	}{
		{"expired", t0.Add(-time.Second).Format(time.RFC3339), "expired at"},
		{"expires within the job span", t0.Add(30 * time.Minute).Format(time.RFC3339), "before a job offered now could finish"},
		{"fresh", t0.Add(2 * time.Hour).Format(time.RFC3339), ""},
		{"never", "", ""},
	}
	for _, tt := range tests {
		t.Run(tt.name, func(t *testing.T) {
			h := newHarness(t)
			h.fw.expires = tt.expires
			h.fleet("d", 1)
			_, err := h.c.CreateRollout(context.Background(), RolloutSpec{Model: "primehub", Version: "7.28.0"})
			if tt.want == "" {
				if err != nil {
					t.Fatalf("got %v, want the rollout created", err)
				}
				h.waitOffer("d-000", 1)
				return
			}
			if !errors.Is(err, ErrExpired) || !strings.Contains(err.Error(), tt.want) {
				t.Fatalf("got %v, want ErrExpired saying %q", err, tt.want)
			}
			if list, _ := h.c.ListRollouts(); len(list) != 0 {
				t.Errorf("got %d rollouts, want none kept", len(list))
			}
		})
	}
}

// offersTo counts the offers sent to the devices.
func (h *harness) offersTo(ids []string) int {
	n := 0
	for _, id := range ids {
		n += len(h.pub.on(protocol.Topic(id, protocol.SuffixJob)))
	}
	return n
}

// TestReleaseExpiringMidRollout: once the release would expire before a new job could
// finish, the rollout pauses with the reason and offers nothing more, not even the same job
// again to a device that reconnects after the expiry. It resumes only once the release has
// been added again with a later expiry.
func TestReleaseExpiringMidRollout(t *testing.T) {
	h := newHarness(t)
	h.fw.expires = t0.Add(2 * time.Hour).Format(time.RFC3339)
	ids := h.fleet("d", 3)
	r := h.create(RolloutSpec{MaxConcurrent: 1})
	first := h.devicesIn(r.ID, JobOffered)
	if len(first) != 1 {
		t.Fatalf("got %v offered, want 1 device", first)
	}
	h.install(r.ID, first[0])
	second := h.devicesIn(r.ID, JobOffered)
	if len(second) != 1 {
		t.Fatalf("got %v offered after an install, want 1 device", second)
	}
	h.waitFor("two offers", func() bool { return h.offersTo(ids) == 2 })

	// 2h minus the 50m job span: no job offered from here could finish in time.
	h.tick(t0.Add(70*time.Minute + time.Second))
	got := h.rollout(r.ID)
	if got.State != RolloutPaused || !strings.Contains(got.Reason, "before a job offered now could finish") {
		t.Fatalf("got %s (%q), want paused because the release expires", got.State, got.Reason)
	}
	h.install(r.ID, second[0]) // a device at work finishes
	h.clock.Set(t0.Add(2*time.Hour + time.Second))
	for _, id := range ids {
		h.status(id, "7.27.0") // reconnects
	}
	h.tick(t0.Add(3 * time.Hour))
	if n := h.offersTo(ids); n != 2 {
		t.Errorf("got %d offers, want still 2: the release expired", n)
	}
	if _, err := h.c.ResumeRollout(r.ID); !errors.Is(err, ErrExpired) {
		t.Errorf("resume: got %v, want ErrExpired", err)
	}

	h.fw.expires = t0.Add(24 * time.Hour).Format(time.RFC3339)
	if got, err := h.c.ResumeRollout(r.ID); err != nil || got.State != RolloutActive {
		t.Fatalf("resume after the release was extended: got %s (%v), want active", got.State, err)
	}
	h.waitFor("the third offer", func() bool { return h.offersTo(ids) == 3 })
}
