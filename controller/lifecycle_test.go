package controller

import (
	"context"
	"errors"
	"maps"
	"slices"
	"strings"
	"sync"
	"syscall"
	"testing"
	"time"

	"github.com/fota-dev/fota/fotatest"
	"github.com/fota-dev/fota/protocol"
)

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
	fotatest.WaitFor(h.t, 20*time.Second, "the reload", func() bool { return h.c.Stats().Reloads.Load() == 1 })
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
	fotatest.WaitFor(h.t, 20*time.Second, "the second reload", func() bool { return h.c.Stats().Reloads.Load() == 2 })
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
	fotatest.WaitFor(h.t, 20*time.Second, "two offers", func() bool { return h.offersTo(ids) == 2 })

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
	fotatest.WaitFor(h.t, 20*time.Second, "the third offer", func() bool { return h.offersTo(ids) == 3 })
}

// revocations is a revocation list a test changes as it goes.
type revocations struct {
	mu  sync.Mutex
	ids map[string]bool
}

func (r *revocations) revoked(id string) bool {
	r.mu.Lock()
	defer r.mu.Unlock()
	return r.ids[id]
}

func (r *revocations) revoke(id string) {
	r.mu.Lock()
	defer r.mu.Unlock()
	if r.ids == nil {
		r.ids = make(map[string]bool)
	}
	r.ids[id] = true
}

// TestRolloutEndsWithoutVanishedDevices: revoked devices' jobs end skipped at once, devices
// offline longer than UnreachableAfter end unreachable, and the rollout completes with those
// counts; every ended job carries a reason, and the job list holds every member. A device
// that comes back after it was found unreachable gets its job again.
func TestRolloutEndsWithoutVanishedDevices(t *testing.T) {
	var rev revocations
	h := newHarness(t, func(o *Options) { o.UnreachableAfter = 2 * time.Hour; o.Revoked = rev.revoked })
	ids := h.fleet("d", 10)
	r := h.create(RolloutSpec{MaxConcurrent: 2})
	if jobs := mustJobs(t, h, r.ID); len(jobs) != len(ids) {
		t.Fatalf("got %d jobs listed, want every one of the %d members", len(jobs), len(ids))
	}
	offered, pending := h.devicesIn(r.ID, JobOffered), h.devicesIn(r.ID, JobPending)
	if len(offered) != 2 || len(pending) != 8 {
		t.Fatalf("got %d offered and %d pending, want 2 and 8", len(offered), len(pending))
	}
	// Revoked: one at work, two never offered. Gone silent: one at work, one never offered.
	for _, id := range []string{offered[0], pending[0], pending[1]} {
		rev.revoke(id)
		h.c.DeviceRevoked(id)
	}
	silent := []string{offered[1], pending[2]}
	for _, id := range silent {
		h.c.DeviceDisconnected(id)
	}
	if got := h.rollout(r.ID); got.Counts[JobSkipped] != 3 {
		t.Fatalf("got counts %v, want 3 skipped at once", got.Counts)
	}
	for installed := 0; ; installed++ {
		var next []string
		for _, id := range h.devicesIn(r.ID, JobOffered) {
			if id != offered[1] {
				next = append(next, id)
			}
		}
		if len(next) == 0 {
			if installed != 5 {
				t.Fatalf("installed %d devices, want 5", installed)
			}
			break
		}
		h.install(r.ID, next[0])
	}
	if got := h.rollout(r.ID); got.State != RolloutActive {
		t.Fatalf("got %s, want active while two devices may still come back", got.State)
	}

	h.tick(t0.Add(2*time.Hour + time.Minute))
	got := h.rollout(r.ID)
	want := map[string]int{JobInstalled: 5, JobSkipped: 3, JobUnreachable: 2}
	if got.State != RolloutCompleted || !maps.Equal(got.Counts, want) {
		t.Fatalf("got %s %v, want completed %v", got.State, got.Counts, want)
	}
	if want := "5 installed, 0 failed, 3 skipped, 2 unreachable"; got.Reason != want {
		t.Errorf("got reason %q, want %q", got.Reason, want)
	}
	jobs := mustJobs(t, h, r.ID)
	if len(jobs) != got.Devices {
		t.Errorf("got %d jobs listed, want %d, the rollout's devices", len(jobs), got.Devices)
	}
	for _, j := range jobs {
		switch {
		case !Terminal(j.State):
			t.Errorf("device %s: got %s, want a finished job", j.Device, j.State)
		case j.State != JobInstalled && j.Reason == "":
			t.Errorf("device %s: %s without a reason", j.Device, j.State)
		case j.State == JobSkipped && j.Reason != "revoked":
			t.Errorf("device %s: got reason %q, want revoked", j.Device, j.Reason)
		case j.State == JobUnreachable && !strings.HasPrefix(j.Reason, "unreachable: offline since "):
			t.Errorf("device %s: got reason %q, want unreachable: offline since ...", j.Device, j.Reason)
		}
	}

	h.status(silent[1], "7.27.0") // back
	if got := h.rollout(r.ID); got.State != RolloutActive {
		t.Fatalf("got %s after an unreachable device came back, want active", got.State)
	}
	h.waitOffer(silent[1], 1)
}

// TestRevokedWhileDown: a device revoked while the server was down is skipped at the first
// tick after the start, and a new rollout does not select it.
func TestRevokedWhileDown(t *testing.T) {
	var rev revocations
	h := newHarness(t, func(o *Options) { o.Revoked = rev.revoked })
	h.fleet("d", 2)
	r := h.create(RolloutSpec{MaxConcurrent: 1})
	if err := h.c.Close(context.Background()); err != nil {
		t.Fatal(err)
	}
	rev.revoke("d-000")
	rev.revoke("d-001")
	h.start()
	h.tick(t0.Add(time.Second))
	if got := h.rollout(r.ID); got.State != RolloutCompleted || got.Counts[JobSkipped] != 2 {
		t.Fatalf("got %s %v, want completed with 2 skipped", got.State, got.Counts)
	}
	if _, err := h.c.CancelRollout(r.ID); err != nil {
		t.Fatal(err)
	}
	if got := h.create(RolloutSpec{}); got.Devices != 0 {
		t.Errorf("got %d devices in a new rollout, want 0: both are revoked", got.Devices)
	}
}

// TestLostFailedEventReason: a device that failed its install and whose failed event was lost
// says so in its next status; the server's reason says that, not that the install did not
// take after a reboot.
func TestLostFailedEventReason(t *testing.T) {
	h := newHarness(t)
	h.fleet("d", 1)
	r := h.create(RolloutSpec{})
	j := h.job(r.ID, "d-000")
	for i, st := range []string{protocol.StateDownloading, protocol.StateVerifying, protocol.StateInstalling} {
		h.event("d-000", j.ID, uint64(i)+1, st, withBytes(j.Size))
	}
	h.send("d-000", protocol.SuffixStatus, protocol.Status{V: 1, Model: "primehub", Version: "7.27.0", State: protocol.StateFailed, Job: j.ID})
	got := h.job(r.ID, "d-000")
	want := "install: device reports the job failed; its reason was lost with its failed event"
	if got.State != JobFailed || got.Reason != want {
		t.Errorf("got %s %q, want failed %q", got.State, got.Reason, want)
	}
}

// TestTagBeforeFirstConnect: a device can be tagged before it ever connected; a rollout by
// that tag picks it up once it reports. An invalid id is refused, not registered.
func TestTagBeforeFirstConnect(t *testing.T) {
	h := newHarness(t)
	d, err := h.c.TagDevice("dev-0001", map[string]string{"site": "lab"})
	if err != nil || d.Tags["site"] != "lab" {
		t.Fatalf("got %+v (%v), want dev-0001 tagged site=lab", d, err)
	}
	if _, err := h.c.TagDevice("bad/id", map[string]string{"site": "lab"}); !errors.Is(err, ErrInvalid) {
		t.Errorf("bad id: got %v, want ErrInvalid", err)
	}
	if list, _ := h.c.ListDevices(); len(list) != 1 {
		t.Errorf("got %d devices registered, want 1", len(list))
	}
	r := h.create(RolloutSpec{Tags: map[string]string{"site": "lab"}})
	if r.Devices != 0 {
		t.Fatalf("got %d devices, want 0 before the device reports", r.Devices)
	}
	h.c.DeviceConnected("dev-0001", "primehub")
	h.status("dev-0001", "7.27.0")
	h.waitOffer("dev-0001", 1)
	if got, _ := h.c.GetDevice("dev-0001"); got.Model != "primehub" || got.Tags["site"] != "lab" {
		t.Errorf("got %+v, want model primehub and the tag kept", got)
	}
}

// TestEmptyRolloutDoesNotBlock: a rollout no device is part of does not hold its model: the
// next rollout supersedes it. One with devices still conflicts.
func TestEmptyRolloutDoesNotBlock(t *testing.T) {
	h := newHarness(t)
	r1 := h.create(RolloutSpec{})
	r2 := h.create(RolloutSpec{Tags: map[string]string{"site": "lab"}})
	if got := h.rollout(r1.ID); got.State != RolloutSuperseded {
		t.Errorf("got %s, want %s by %s", got.State, RolloutSuperseded, r2.ID)
	}
	h.fleet("d", 1)
	h.create(RolloutSpec{})
	if _, err := h.c.CreateRollout(context.Background(), RolloutSpec{Model: "primehub", Version: "7.28.0"}); !errors.Is(err, ErrConflict) {
		t.Errorf("got %v, want ErrConflict while a device is at work", err)
	}
}

// TestJobsPagesEveryMember: pages of the job list hold stored jobs and never-offered members
// alike, in device order, each once.
func TestJobsPagesEveryMember(t *testing.T) {
	h := newHarness(t)
	ids := h.fleet("d", 7)
	r := h.create(RolloutSpec{MaxConcurrent: 3})
	var got []string
	after := ""
	for {
		page, err := h.c.Jobs(r.ID, JobQuery{After: after, Limit: 2})
		if err != nil {
			t.Fatal(err)
		}
		if len(page) == 0 {
			break
		}
		for _, j := range page {
			got = append(got, j.Device)
		}
		after = page[len(page)-1].Device
	}
	if !slices.Equal(got, ids) {
		t.Errorf("got %v, want %v", got, ids)
	}
	pending, err := h.c.Jobs(r.ID, JobQuery{State: JobPending})
	if err != nil || len(pending) != 4 {
		t.Errorf("got %d pending (%v), want 4", len(pending), err)
	}
}

// TestUnreachableCountsFromStart: after the server was down longer than UnreachableAfter, the
// devices are not found unreachable before they had that long to reconnect.
func TestUnreachableCountsFromStart(t *testing.T) {
	h := newHarness(t, func(o *Options) { o.UnreachableAfter = time.Hour })
	h.fleet("d", 2)
	r := h.create(RolloutSpec{MaxConcurrent: 1})
	if err := h.c.Close(context.Background()); err != nil {
		t.Fatal(err)
	}
	h.clock.Set(t0.Add(48 * time.Hour))
	h.start()
	h.tick(t0.Add(48*time.Hour + time.Second))
	if got := h.rollout(r.ID); got.Counts[JobUnreachable] != 0 {
		t.Fatalf("got %v right after the start, want nobody unreachable yet", got.Counts)
	}
	h.tick(t0.Add(49*time.Hour + time.Second))
	if got := h.rollout(r.ID); got.State != RolloutCompleted || got.Counts[JobUnreachable] != 2 {
		t.Errorf("got %s %v an hour after the start, want completed with 2 unreachable", got.State, got.Counts)
	}
}

// TestGateExcusesVanishedDevices: a wave's gate judges the devices that can still install; a
// revoked one does not hold the next wave back.
func TestGateExcusesVanishedDevices(t *testing.T) {
	var rev revocations
	h := newHarness(t, func(o *Options) { o.Revoked = rev.revoked })
	h.fleet("d", 4)
	r := h.create(RolloutSpec{Waves: []int{50, 100}, Gate: 100})
	wave1 := h.devicesIn(r.ID, JobOffered)
	if len(wave1) != 2 {
		t.Fatalf("got %v offered, want the 2 devices of wave 1", wave1)
	}
	rev.revoke(wave1[0])
	h.c.DeviceRevoked(wave1[0])
	h.install(r.ID, wave1[1])
	if got := h.rollout(r.ID); got.WavesStarted != 2 {
		t.Errorf("got %d waves started, want 2: the only device of wave 1 that could install did", got.WavesStarted)
	}
}
