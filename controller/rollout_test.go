package controller

import (
	"context"
	"errors"
	"fmt"
	"slices"
	"strings"
	"testing"
	"time"

	"github.com/fota-dev/fota/protocol"
)

func (h *harness) create(spec RolloutSpec) Rollout {
	h.t.Helper()
	if spec.Model == "" {
		spec.Model = "primehub"
	}
	if spec.Version == "" {
		spec.Version = "7.28.0"
	}
	r, err := h.c.CreateRollout(context.Background(), spec)
	if err != nil {
		h.t.Fatalf("create rollout: %v", err)
	}
	return r
}

func (h *harness) rollout(id string) Rollout {
	h.t.Helper()
	r, err := h.c.Rollout(id)
	if err != nil {
		h.t.Fatal(err)
	}
	return r
}

// tick moves the fake clock to at and runs the scheduler.
func (h *harness) tick(at time.Time) {
	h.clock.Set(at)
	h.c.Tick()
}

// fleet brings n devices online on 7.27.0 and returns their ids.
func (h *harness) fleet(prefix string, n int) []string {
	h.t.Helper()
	ids := make([]string, n)
	for i := range ids {
		ids[i] = fmt.Sprintf("%s-%03d", prefix, i)
		h.status(ids[i], "7.27.0")
	}
	return ids
}

// jobOf returns the device's job in rollout id, and whether it has one: a member never
// offered anything is listed pending, but has none.
func (h *harness) jobOf(id, device string) (Job, bool) {
	h.t.Helper()
	jobs, err := h.c.Jobs(id, JobQuery{})
	if err != nil {
		h.t.Fatal(err)
	}
	for _, j := range jobs {
		if j.Device == device && (j.Offers > 0 || j.State != JobPending) {
			return j, true
		}
	}
	return Job{}, false
}

func (h *harness) event(device, job string, seq uint64, state string, opt ...func(*protocol.Event)) {
	h.t.Helper()
	ev := protocol.Event{V: 1, Job: job, Seq: seq, State: state}
	for _, f := range opt {
		f(&ev)
	}
	h.send(device, protocol.SuffixEvent, ev)
}

// install walks a device's current job through to installed.
func (h *harness) install(id, device string) {
	h.t.Helper()
	j, ok := h.jobOf(id, device)
	if !ok {
		h.t.Fatalf("device %s has no job in %s", device, id)
	}
	for i, st := range []string{protocol.StateDownloading, protocol.StateVerifying, protocol.StateInstalling} {
		h.event(device, j.ID, j.Seq+uint64(i)+1, st, withBytes(j.Size))
	}
	// After the reboot: the status with the new image, then the installed event.
	h.statusSHA(device, j.To, h.rollout(id).SHA256)
	h.event(device, j.ID, j.Seq+4, protocol.StateInstalled, func(e *protocol.Event) { e.Version = j.To })
}

// withBytes sets an event's byte count.
func withBytes(n int64) func(*protocol.Event) {
	return func(e *protocol.Event) { e.Bytes = n }
}

func (h *harness) fail(id, device, reason string) {
	h.t.Helper()
	j, ok := h.jobOf(id, device)
	if !ok {
		h.t.Fatalf("device %s has no job in %s", device, id)
	}
	h.event(device, j.ID, j.Seq+1, protocol.StateFailed, func(e *protocol.Event) { e.Reason = reason })
}

// devicesIn returns the devices whose job is in state, sorted.
func (h *harness) devicesIn(id, state string) []string {
	h.t.Helper()
	jobs, err := h.c.Jobs(id, JobQuery{State: state})
	if err != nil {
		h.t.Fatal(err)
	}
	var out []string
	for _, j := range jobs {
		out = append(out, j.Device)
	}
	return out
}

func inFlight(r Rollout) int {
	return r.Counts[JobOffered] + r.Counts[JobDownloading] + r.Counts[JobVerifying] + r.Counts[JobInstalling]
}

func TestSpecValidation(t *testing.T) {
	tests := []struct {
		name string
		spec RolloutSpec
	}{
		{"waves not growing", RolloutSpec{Waves: []int{10, 5, 100}}},
		{"last wave not 100", RolloutSpec{Waves: []int{10, 50}}},
		{"percent over 100", RolloutSpec{Percent: 101}},
		{"gate over 100", RolloutSpec{Gate: 101}},
		{"window without duration", RolloutSpec{Window: "0 2 * * *"}},
		{"duration without window", RolloutSpec{WindowDuration: Duration(time.Hour)}},
		{"bad cron", RolloutSpec{Window: "0 25 * * *", WindowDuration: Duration(time.Hour)}},
		{"zone in cron", RolloutSpec{Window: "TZ=UTC", WindowDuration: Duration(time.Hour)}},
		{"every", RolloutSpec{Window: "@every 1h", WindowDuration: Duration(time.Hour)}},
		{"bad zone", RolloutSpec{Window: "0 2 * * *", WindowDuration: Duration(time.Hour), TZ: "Mars/Olympus"}},
		{"bad window end", RolloutSpec{WindowEnd: "stop"}},
		{"bad tag", RolloutSpec{Tags: map[string]string{"a b": "c"}}},
		{"bad device id", RolloutSpec{Devices: []string{"a/b"}}},
		{"negative soak", RolloutSpec{Soak: Duration(-time.Second)}},
		{"negative concurrency", RolloutSpec{MaxConcurrent: -1}},
		{"abort rate over 100", RolloutSpec{AbortFailureRate: 150}},
	}
	for _, tc := range tests {
		t.Run(tc.name, func(t *testing.T) {
			s := tc.spec
			s.Model, s.Version = "primehub", "7.28.0"
			if err := s.normalize(); !errors.Is(err, ErrInvalid) {
				t.Fatalf("got %v, want ErrInvalid", err)
			}
		})
	}
	s := RolloutSpec{Model: "primehub", Version: "v7.28"}
	if err := s.normalize(); err != nil {
		t.Fatal(err)
	}
	want := RolloutSpec{Model: "primehub", Version: "7.28.0", Percent: 100, Waves: []int{100}, Gate: DefaultGate,
		TZ: DefaultTZ, WindowEnd: WindowEndContinue, MaxConcurrent: DefaultMaxConcurrent,
		TimeoutOffered: Duration(DefaultTimeoutOffered), TimeoutDownloading: Duration(DefaultTimeoutDownloading),
		TimeoutInstalling: Duration(DefaultTimeoutInstalling), MaxAttempts: DefaultMaxAttempts,
		AbortFailureRate: DefaultAbortFailureRate, AbortMinFinished: DefaultAbortMinFinished}
	if fmt.Sprint(s) != fmt.Sprint(want) {
		t.Fatalf("got defaults %+v, want %+v", s, want)
	}
}

// TestGate: the next wave starts only once the share of installed devices in the wave
// before reaches the gate.
func TestGate(t *testing.T) {
	h := newHarness(t)
	h.fleet("d", 20)
	r := h.create(RolloutSpec{Waves: []int{25, 100}, Gate: 80, AbortFailureRate: 100})
	if r.Waves[0].Devices != 5 || r.Waves[1].Devices != 15 || r.WavesStarted != 1 {
		t.Fatalf("got waves %+v started %d, want 5 and 15 devices, first started", r.Waves, r.WavesStarted)
	}
	first := h.devicesIn(r.ID, JobOffered)
	if len(first) != 5 {
		t.Fatalf("got %d devices offered, want the 5 of wave 1", len(first))
	}
	// ceil(80% of 5) = 4 installed opens wave 2; a failure does not count.
	h.fail(r.ID, first[0], "hash-mismatch")
	for i, d := range first[1:] {
		if got := h.rollout(r.ID).WavesStarted; got != 1 {
			t.Fatalf("after %d installs: got %d waves started, want 1", i, got)
		}
		h.install(r.ID, d)
	}
	got := h.rollout(r.ID)
	if got.WavesStarted != 2 || got.Waves[0].State != WaveDone || got.Waves[1].State != WaveRunning {
		t.Fatalf("got %d waves started, states %s/%s; want 2, done/running", got.WavesStarted, got.Waves[0].State, got.Waves[1].State)
	}
	if n := len(h.devicesIn(r.ID, JobOffered)); n != 15 {
		t.Fatalf("got %d offered in wave 2, want 15", n)
	}
}

// TestSoak: after the gate is met the next wave waits out the soak time, on the fake clock.
func TestSoak(t *testing.T) {
	h := newHarness(t)
	h.fleet("d", 4)
	r := h.create(RolloutSpec{Waves: []int{50, 100}, Soak: Duration(time.Hour)})
	for _, d := range h.devicesIn(r.ID, JobOffered) {
		h.install(r.ID, d)
	}
	if got := h.rollout(r.ID); got.WavesStarted != 1 || got.Waves[0].State != WaveSoaking {
		t.Fatalf("got %d waves started, wave 1 %s; want 1, soaking", got.WavesStarted, got.Waves[0].State)
	}
	h.tick(t0.Add(59 * time.Minute))
	if got := h.rollout(r.ID).WavesStarted; got != 1 {
		t.Fatalf("59m into the soak: got %d waves started, want 1", got)
	}
	h.tick(t0.Add(time.Hour))
	if got := h.rollout(r.ID); got.WavesStarted != 2 || !got.Waves[1].Started.Equal(t0.Add(time.Hour)) {
		t.Fatalf("after the soak: got %d waves started, wave 2 at %v; want 2 at %v", got.WavesStarted, got.Waves[1].Started, t0.Add(time.Hour))
	}
}

// TestWindowContinue: no offer outside the window; a transfer under way when it closes goes
// on; a device that connects after it closed waits for the next window.
func TestWindowContinue(t *testing.T) {
	h := newHarness(t)
	h.fleet("d", 1)
	r := h.create(RolloutSpec{Window: "0 2 * * *", WindowDuration: Duration(4 * time.Hour), TZ: "Europe/Paris"})
	if r.WavesStarted != 0 || r.Window == nil || r.Window.Open {
		t.Fatalf("got %d waves, window %+v; want none started, window closed", r.WavesStarted, r.Window)
	}
	if want := time.Date(2025, 3, 3, 1, 0, 0, 0, time.UTC); !r.Window.Next.Equal(want) {
		t.Fatalf("got next window %v, want 02:00 Paris = %v", r.Window.Next.UTC(), want)
	}
	h.tick(t0.Add(59 * time.Minute))
	if _, ok := h.jobOf(r.ID, "d-000"); ok {
		t.Fatal("offered before the window opened")
	}
	h.tick(t0.Add(time.Hour)) // 02:00 in Paris
	j, ok := h.jobOf(r.ID, "d-000")
	if !ok || j.State != JobOffered {
		t.Fatalf("got job %+v, want offered when the window opens", j)
	}
	h.event("d-000", j.ID, 1, protocol.StateDownloading)
	h.tick(t0.Add(5 * time.Hour)) // 06:00 Paris: closed
	h.status("d-late", "7.27.0")
	if _, ok := h.jobOf(r.ID, "d-late"); ok {
		t.Fatal("a device that connected outside the window was offered")
	}
	// The transfer continues.
	h.send("d-000", protocol.SuffixRequest, protocol.ChunkRequest{Job: j.ID, Offset: 0, Length: 1024})
	if f := h.lastFrame("d-000"); f.Kind != protocol.FrameData {
		t.Fatalf("got frame kind %d after the window closed, want data (window end continue)", f.Kind)
	}
	h.tick(t0.Add(25 * time.Hour)) // next day, 02:00 Paris
	if j, ok := h.jobOf(r.ID, "d-late"); !ok || j.State != JobOffered {
		t.Fatalf("got %+v, want d-late offered in the next window", j)
	}
}

func (h *harness) lastFrame(device string) protocol.Frame {
	h.t.Helper()
	frames := h.pub.on(protocol.Topic(device, protocol.SuffixChunk))
	if len(frames) == 0 {
		h.t.Fatalf("no chunk frame for %s", device)
	}
	f, err := protocol.ParseFrame(frames[len(frames)-1])
	if err != nil {
		h.t.Fatal(err)
	}
	return f
}

// TestWindowPause: with window end "pause", transfers get "busy" while the window is closed,
// phase timeouts wait, and a transfer the device gave up on meanwhile costs no attempt.
func TestWindowPause(t *testing.T) {
	h := newHarness(t)
	h.fleet("d", 2)
	r := h.create(RolloutSpec{Window: "0 2 * * *", WindowDuration: Duration(4 * time.Hour), WindowEnd: WindowEndPause,
		TimeoutDownloading: Duration(time.Hour), MaxAttempts: 1})
	h.tick(t0.Add(2 * time.Hour))
	a, _ := h.jobOf(r.ID, "d-000")
	b, _ := h.jobOf(r.ID, "d-001")
	h.event("d-000", a.ID, 1, protocol.StateDownloading)
	h.event("d-001", b.ID, 1, protocol.StateDownloading)
	h.tick(t0.Add(6 * time.Hour)) // closed
	h.send("d-000", protocol.SuffixRequest, protocol.ChunkRequest{Job: a.ID, Offset: 0, Length: 1024})
	if f := h.lastFrame("d-000"); f.Kind != protocol.FrameError || string(f.Payload) != protocol.ErrCodeBusy {
		t.Fatalf("got frame %d %q while paused, want busy", f.Kind, f.Payload)
	}
	h.tick(t0.Add(20 * time.Hour)) // far past the downloading timeout, but paused
	if j, _ := h.jobOf(r.ID, "d-001"); j.State != JobDownloading {
		t.Fatalf("got %s while the window is closed, want downloading (timeouts wait)", j.State)
	}
	// d-000 gives up on the busy answers: no attempt used.
	h.event("d-000", a.ID, 2, protocol.StateFailed, func(e *protocol.Event) { e.Reason = "transfer: server busy 21 times" })
	if j, _ := h.jobOf(r.ID, "d-000"); j.State != JobPending || j.Attempt != 0 {
		t.Fatalf("got %s attempt %d, want pending with no attempt used", j.State, j.Attempt)
	}
	h.tick(t0.Add(26 * time.Hour)) // next window
	j, _ := h.jobOf(r.ID, "d-000")
	if j.State != JobOffered || j.ID == a.ID || j.Attempt != 1 {
		t.Fatalf("got job %s %s attempt %d, want a fresh offer (new id) as attempt 1", j.ID, j.State, j.Attempt)
	}
	h.send("d-001", protocol.SuffixRequest, protocol.ChunkRequest{Job: b.ID, Offset: 0, Length: 1024})
	if f := h.lastFrame("d-001"); f.Kind != protocol.FrameData {
		t.Fatalf("got frame kind %d in the next window, want data", f.Kind)
	}
	// The downloading deadline counts from the reopening.
	h.tick(t0.Add(26*time.Hour + 59*time.Minute))
	if j, _ := h.jobOf(r.ID, "d-001"); j.State != JobDownloading {
		t.Fatalf("got %s 59m after the reopening, want downloading", j.State)
	}
	h.tick(t0.Add(27 * time.Hour))
	if j, _ := h.jobOf(r.ID, "d-001"); j.State != JobFailed {
		t.Fatalf("got %s an hour after the reopening, want failed (timed out, 1 attempt)", j.State)
	}
}

// TestWindowAdvancesOneWave: each window starts at most one wave, whether it fires twice,
// overlaps itself, or the server restarts inside it.
func TestWindowAdvancesOneWave(t *testing.T) {
	tests := []struct {
		name, window string
		dur          time.Duration
		ticks        []time.Duration // from t0
		want         int
	}{
		{"daily", "0 2 * * *", 4 * time.Hour, []time.Duration{2 * time.Hour, 3 * time.Hour, 5*time.Hour + 59*time.Minute}, 1},
		{"next day", "0 2 * * *", 4 * time.Hour, []time.Duration{2 * time.Hour, 26 * time.Hour}, 2},
		{"fires twice", "0,30 2 * * *", 4 * time.Hour, []time.Duration{2 * time.Hour, 2*time.Hour + 30*time.Minute, 3 * time.Hour}, 1},
		{"overlaps itself", "0 * * * *", 90 * time.Minute, []time.Duration{0, time.Hour, 2 * time.Hour, 10 * time.Hour, 30 * time.Hour}, 1},
		{"gap between", "0 */2 * * *", time.Hour, []time.Duration{0, 30 * time.Minute, 2 * time.Hour, 4 * time.Hour}, 3},
	}
	for _, tc := range tests {
		t.Run(tc.name, func(t *testing.T) {
			h := newHarness(t)
			// No devices: every wave's gate is met at once, so only the window holds them back.
			r := h.create(RolloutSpec{Waves: []int{10, 20, 30, 40, 100}, Window: tc.window, WindowDuration: Duration(tc.dur)})
			for i, d := range tc.ticks {
				h.tick(t0.Add(d))
				if i == 1 {
					// A restart inside the window must not start another wave.
					if err := h.c.Close(context.Background()); err != nil {
						t.Fatal(err)
					}
					h.start()
					h.c.Tick()
				}
			}
			if got := h.rollout(r.ID).WavesStarted; got != tc.want {
				t.Fatalf("got %d waves started, want %d", got, tc.want)
			}
		})
	}
}

// TestMaxConcurrent: never more devices in flight than the limit; a finished one frees a slot.
func TestMaxConcurrent(t *testing.T) {
	h := newHarness(t)
	h.fleet("d", 10)
	r := h.create(RolloutSpec{MaxConcurrent: 3})
	got := h.rollout(r.ID)
	if inFlight(got) != 3 || got.Counts[JobPending] != 7 {
		t.Fatalf("got counts %v, want 3 in flight and 7 pending", got.Counts)
	}
	for round := 0; round < 4; round++ {
		offered := h.devicesIn(r.ID, JobOffered)
		if len(offered) == 0 {
			t.Fatalf("round %d: nothing offered", round)
		}
		h.install(r.ID, offered[0])
		if n := inFlight(h.rollout(r.ID)); n > 3 {
			t.Fatalf("round %d: %d in flight, want at most 3", round, n)
		}
	}
	if got := h.rollout(r.ID); got.Counts[JobInstalled] != 4 || inFlight(got) != 3 {
		t.Fatalf("got counts %v, want 4 installed and 3 in flight", got.Counts)
	}
}

// TestOfferJitter: offers are spread over the jitter interval, never later.
func TestOfferJitter(t *testing.T) {
	h := newHarness(t)
	ids := h.fleet("d", 30)
	jitter := 10 * time.Minute
	r := h.create(RolloutSpec{OfferJitter: Duration(jitter)})
	if got := h.rollout(r.ID); inFlight(got) != 0 {
		t.Fatalf("got %d offered at once, want none before their jitter", inFlight(got))
	}
	for at := time.Duration(0); at <= jitter; at += 30 * time.Second {
		h.tick(t0.Add(at))
	}
	times := map[time.Time]bool{}
	for _, id := range ids {
		j, ok := h.jobOf(r.ID, id)
		if !ok || j.State != JobOffered {
			t.Fatalf("device %s: got %+v, want offered within the jitter", id, j)
		}
		if j.Offered.Before(t0) || j.Offered.After(t0.Add(jitter)) {
			t.Fatalf("device %s offered at %v, want within [%v, %v]", id, j.Offered, t0, t0.Add(jitter))
		}
		times[j.Offered] = true
	}
	if len(times) < 5 {
		t.Fatalf("got offers at %d distinct times, want them spread", len(times))
	}
}

// TestTimeouts: each phase has its own deadline; a timed-out job is retried after a
// backoff, with a new job id, until max attempts, then failed for good with the reason.
func TestTimeouts(t *testing.T) {
	tests := []struct {
		name   string
		events []string
		limit  time.Duration
	}{
		{"offered", nil, 10 * time.Minute},
		{"downloading", []string{protocol.StateDownloading}, 20 * time.Minute},
		{"installing", []string{protocol.StateDownloading, protocol.StateVerifying, protocol.StateInstalling}, 30 * time.Minute},
	}
	for _, tc := range tests {
		t.Run(tc.name, func(t *testing.T) {
			h := newHarness(t, func(o *Options) { o.RetryBackoff, o.RetryBackoffMax = time.Minute, time.Hour })
			h.fleet("d", 1)
			r := h.create(RolloutSpec{TimeoutOffered: Duration(10 * time.Minute), TimeoutDownloading: Duration(20 * time.Minute),
				TimeoutInstalling: Duration(30 * time.Minute), MaxAttempts: 3})
			now := t0
			seen := map[string]bool{}
			for attempt := 1; attempt <= 3; attempt++ {
				j, _ := h.jobOf(r.ID, "d-000")
				if j.State != JobOffered || j.Attempt != attempt || seen[j.ID] {
					t.Fatalf("attempt %d: got job %s %s attempt %d, want a new offered job", attempt, j.ID, j.State, j.Attempt)
				}
				seen[j.ID] = true
				for i, st := range tc.events {
					h.event("d-000", j.ID, uint64(i+1), st, withBytes(j.Size))
				}
				h.tick(now.Add(tc.limit - time.Second))
				if j, _ := h.jobOf(r.ID, "d-000"); j.State == JobTimedOut {
					t.Fatalf("attempt %d: timed out before the limit", attempt)
				}
				now = now.Add(tc.limit)
				h.tick(now)
				j, _ = h.jobOf(r.ID, "d-000")
				if attempt == 3 {
					if j.State != JobFailed || !strings.Contains(j.Reason, "timed out") || !strings.Contains(j.Reason, "attempt 3 of 3") || len(j.History) != 2 {
						t.Fatalf("got %s %q history %q, want failed for good after 3 attempts", j.State, j.Reason, j.History)
					}
					break
				}
				if j.State != JobTimedOut {
					t.Fatalf("attempt %d: got %s at the limit, want %s", attempt, j.State, JobTimedOut)
				}
				// Backoff: 1m, then 2m, half of it random.
				base := time.Minute << (attempt - 1)
				if wait := j.RetryAt.Sub(now); wait < base/2 || wait > base {
					t.Fatalf("attempt %d: retry in %v, want within [%v, %v]", attempt, wait, base/2, base)
				}
				h.tick(j.RetryAt.Add(-time.Second))
				if j2, _ := h.jobOf(r.ID, "d-000"); j2.State != JobTimedOut {
					t.Fatalf("attempt %d: got %s before the backoff ended, want still timed out", attempt, j2.State)
				}
				now = j.RetryAt
				h.tick(now)
			}
			if got := h.devicesIn(r.ID, JobFailed); !slices.Equal(got, []string{"d-000"}) {
				t.Fatalf("got failure list %v, want [d-000]", got)
			}
			if got := h.rollout(r.ID); got.State != RolloutCompleted {
				t.Fatalf("got rollout %s, want completed", got.State)
			}
		})
	}
}

func TestBackoffGrowsWithJitter(t *testing.T) {
	h := newHarness(t, func(o *Options) { o.RetryBackoff, o.RetryBackoffMax = time.Second, 10*time.Second })
	for n, want := range map[int]time.Duration{1: time.Second, 2: 2 * time.Second, 3: 4 * time.Second, 4: 8 * time.Second, 5: 10 * time.Second, 9: 10 * time.Second} {
		distinct := map[time.Duration]bool{}
		for range 50 {
			d := h.c.backoff(n)
			if d < want/2 || d > want {
				t.Fatalf("attempt %d: got %v, want within [%v, %v]", n, d, want/2, want)
			}
			distinct[d] = true
		}
		if len(distinct) < 10 {
			t.Fatalf("attempt %d: got %d distinct waits in 50, want jitter", n, len(distinct))
		}
	}
}

// TestTransferFailureRetried: a device that gives up on its transfer is retried; any other
// failure is final.
func TestTransferFailureRetried(t *testing.T) {
	h := newHarness(t, func(o *Options) { o.RetryBackoff = time.Minute })
	h.fleet("d", 2)
	r := h.create(RolloutSpec{})
	h.fail(r.ID, "d-000", "transfer: no answer at offset 0")
	h.fail(r.ID, "d-001", "bad-manifest: signature")
	if j, _ := h.jobOf(r.ID, "d-000"); j.State != JobTimedOut {
		t.Fatalf("transfer failure: got %s, want %s (retried)", j.State, JobTimedOut)
	}
	if j, _ := h.jobOf(r.ID, "d-001"); j.State != JobFailed || j.Reason != "bad-manifest: signature" {
		t.Fatalf("manifest failure: got %s %q, want failed for good", j.State, j.Reason)
	}
	h.tick(t0.Add(time.Minute))
	if j, _ := h.jobOf(r.ID, "d-000"); j.State != JobOffered || j.Attempt != 2 {
		t.Fatalf("got %s attempt %d after the backoff, want offered again as attempt 2", j.State, j.Attempt)
	}
}

// TestAbortRule: the rollout pauses once the failure rate of a wave reaches the threshold
// after enough devices finished, and no later wave starts; a resume judges what follows.
func TestAbortRule(t *testing.T) {
	h := newHarness(t)
	h.fleet("d", 40)
	r := h.create(RolloutSpec{Waves: []int{25, 100}, Gate: 50, AbortFailureRate: 20, AbortMinFinished: 5})
	wave1 := h.devicesIn(r.ID, JobOffered)
	if len(wave1) != 10 {
		t.Fatalf("got %d in wave 1, want 10", len(wave1))
	}
	h.fail(r.ID, wave1[0], "install: flash")
	h.fail(r.ID, wave1[1], "install: flash") // 2 of 2 failed, but fewer than 5 finished
	if got := h.rollout(r.ID).State; got != RolloutActive {
		t.Fatalf("got %s below the minimum finished, want active", got)
	}
	for _, d := range wave1[2:5] {
		h.install(r.ID, d) // 2 of 5 failed: 40%
	}
	got := h.rollout(r.ID)
	if got.State != RolloutPaused || !strings.Contains(got.Reason, "abort rule: wave 1: 2 of 5") {
		t.Fatalf("got %s %q, want paused by the abort rule", got.State, got.Reason)
	}
	// The devices at work finish; enough installs for the gate, yet wave 2 does not start.
	for _, d := range wave1[5:] {
		h.install(r.ID, d)
	}
	h.tick(t0.Add(time.Hour))
	if got := h.rollout(r.ID); got.WavesStarted != 1 || got.State != RolloutPaused {
		t.Fatalf("got %s with %d waves started, want paused with 1", got.State, got.WavesStarted)
	}
	log, err := h.c.Events(r.ID, 0, 0)
	if err != nil {
		t.Fatal(err)
	}
	if !slices.ContainsFunc(log.Events, func(e Event) bool { return e.To == RolloutPaused && strings.Contains(e.Reason, "abort rule") }) {
		t.Fatalf("event log %+v has no pause by the abort rule", log.Events)
	}
	if _, err := h.c.ResumeRollout(r.ID); err != nil {
		t.Fatal(err)
	}
	if got := h.rollout(r.ID); got.State != RolloutActive || got.WavesStarted != 2 {
		t.Fatalf("after resume: got %s with %d waves, want active with 2", got.State, got.WavesStarted)
	}
}

// TestPauseResume: a paused rollout offers nothing new; devices at work go on.
func TestPauseResume(t *testing.T) {
	h := newHarness(t)
	h.fleet("d", 2)
	r := h.create(RolloutSpec{})
	if _, err := h.c.PauseRollout(r.ID, ""); err != nil {
		t.Fatal(err)
	}
	h.status("d-new", "7.27.0")
	if _, ok := h.jobOf(r.ID, "d-new"); ok {
		t.Fatal("paused rollout offered a new device")
	}
	h.install(r.ID, "d-000") // a device at work finishes
	if j, _ := h.jobOf(r.ID, "d-000"); j.State != JobInstalled {
		t.Fatalf("got %s, want installed while paused", j.State)
	}
	if _, err := h.c.PauseRollout(r.ID, ""); err != nil {
		t.Fatalf("pausing twice: %v, want no error", err)
	}
	got, err := h.c.ResumeRollout(r.ID)
	if err != nil || got.State != RolloutActive {
		t.Fatalf("got %s (%v), want active", got.State, err)
	}
	if j, ok := h.jobOf(r.ID, "d-new"); !ok || j.State != JobOffered {
		t.Fatalf("got %+v after resume, want d-new offered", j)
	}
	if _, err := h.c.PauseRollout("r99", ""); !errors.Is(err, ErrNotFound) {
		t.Fatalf("pause of an unknown rollout: got %v, want ErrNotFound", err)
	}
}

// TestCancelWaitsForInstalls: a cancel ends the jobs not yet installing at once, and waits
// for the devices mid-install to report.
func TestCancelWaitsForInstalls(t *testing.T) {
	h := newHarness(t)
	h.fleet("d", 4)
	r := h.create(RolloutSpec{MaxConcurrent: 3})
	a, _ := h.jobOf(r.ID, "d-000")
	h.event("d-000", a.ID, 1, protocol.StateDownloading, withBytes(a.Size))
	h.event("d-000", a.ID, 2, protocol.StateVerifying, withBytes(a.Size))
	h.event("d-000", a.ID, 3, protocol.StateInstalling, withBytes(a.Size))
	b, _ := h.jobOf(r.ID, "d-001")
	h.event("d-001", b.ID, 1, protocol.StateDownloading)

	got, err := h.c.CancelRollout(r.ID)
	if err != nil {
		t.Fatal(err)
	}
	if got.State != RolloutCanceling || got.Counts[JobInstalling] != 1 || got.Counts[JobCanceled] != 3 {
		t.Fatalf("got %s %v, want canceling with 1 installing and 3 canceled", got.State, got.Counts)
	}
	// The canceled transfer ends.
	h.send("d-001", protocol.SuffixRequest, protocol.ChunkRequest{Job: b.ID, Offset: 0, Length: 1024})
	if f := h.lastFrame("d-001"); f.Kind != protocol.FrameError || string(f.Payload) != protocol.ErrCodeNoJob {
		t.Fatalf("got frame %d %q, want no-job", f.Kind, f.Payload)
	}
	if _, err := h.c.CreateRollout(context.Background(), RolloutSpec{Model: "primehub", Version: "7.28.0"}); !errors.Is(err, ErrConflict) {
		t.Fatalf("create while canceling: got %v, want ErrConflict", err)
	}
	h.statusSHA("d-000", "7.28.0", r.SHA256)
	h.event("d-000", a.ID, 4, protocol.StateInstalled, func(e *protocol.Event) { e.Version = "7.28.0" })
	got = h.rollout(r.ID)
	if got.State != RolloutCanceled || got.Counts[JobInstalled] != 1 || got.Counts[JobCanceled] != 3 || got.Devices != 4 {
		t.Fatalf("got %s %v over %d, want canceled: 1 installed, 3 canceled, 4 devices", got.State, got.Counts, got.Devices)
	}
	// The model is free for a new rollout.
	if _, err := h.c.CreateRollout(context.Background(), RolloutSpec{Model: "primehub", Version: "7.28.0"}); err != nil {
		t.Fatalf("create after cancel: %v", err)
	}
}

// TestLateEvents: events of an earlier attempt, and events after a job ended, change
// nothing.
func TestLateEvents(t *testing.T) {
	h := newHarness(t, func(o *Options) { o.RetryBackoff = time.Minute })
	h.fleet("d", 1)
	r := h.create(RolloutSpec{TimeoutOffered: Duration(time.Minute)})
	first, _ := h.jobOf(r.ID, "d-000")
	h.tick(t0.Add(time.Minute))
	h.tick(t0.Add(2 * time.Minute))
	second, _ := h.jobOf(r.ID, "d-000")
	if second.ID == first.ID || second.State != JobOffered {
		t.Fatalf("got %s %s, want a second offer with a new id", second.ID, second.State)
	}
	stale := h.c.Stats().StaleEvents.Load()
	h.event("d-000", first.ID, 1, protocol.StateFailed, func(e *protocol.Event) { e.Reason = "install" })
	if j, _ := h.jobOf(r.ID, "d-000"); j.State != JobOffered {
		t.Fatalf("got %s after an event of the first attempt, want offered", j.State)
	}
	h.install(r.ID, "d-000")
	h.event("d-000", second.ID, 9, protocol.StateFailed)
	h.install(r.ID, "d-000") // duplicates of the whole sequence
	if j, _ := h.jobOf(r.ID, "d-000"); j.State != JobInstalled {
		t.Fatalf("got %s, want installed", j.State)
	}
	if got := h.c.Stats().StaleEvents.Load() - stale; got < 2 {
		t.Fatalf("got %d stale events counted, want at least 2", got)
	}
	if got := h.rollout(r.ID); got.Counts[JobInstalled] != 1 || got.Devices != 1 {
		t.Fatalf("got counts %v over %d, want 1 installed", got.Counts, got.Devices)
	}
}

// TestSelectionStableAcrossRestarts: tags, ids and percent pick the same devices, in the same
// waves, after a restart; a device tagged later joins.
func TestSelectionStableAcrossRestarts(t *testing.T) {
	h := newHarness(t)
	ids := h.fleet("d", 200)
	for i, id := range ids {
		if i%2 == 0 {
			if _, err := h.c.TagDevice(id, map[string]string{"ring": "beta"}); err != nil {
				t.Fatal(err)
			}
		}
	}
	h.status("other", "7.27.0")
	r := h.create(RolloutSpec{Tags: map[string]string{"ring": "beta"}, Percent: 50, Waves: []int{10, 100}, MaxConcurrent: 1000})
	before := h.rollout(r.ID)
	if before.Devices < 30 || before.Devices > 70 {
		t.Fatalf("got %d devices for 50%% of 100 tagged, want about 50", before.Devices)
	}
	members := map[string]int{}
	for _, j := range mustJobs(t, h, r.ID) {
		members[j.Device] = j.Wave
		if j.Device == "other" || !strings.HasPrefix(j.Device, "d-") {
			t.Fatalf("untagged device %s selected", j.Device)
		}
	}
	if err := h.c.Close(context.Background()); err != nil {
		t.Fatal(err)
	}
	h.start()
	after := h.rollout(r.ID)
	if after.Devices != before.Devices || fmt.Sprint(after.Counts) != fmt.Sprint(before.Counts) {
		t.Fatalf("after restart got %d devices %v, want %d %v", after.Devices, after.Counts, before.Devices, before.Counts)
	}
	for i := range after.Waves {
		if after.Waves[i].Devices != before.Waves[i].Devices {
			t.Fatalf("wave %d: got %d devices after restart, want %d", i, after.Waves[i].Devices, before.Waves[i].Devices)
		}
	}
	// Devices reconnect: the same ones are offered, in the same waves.
	h.fleet("d", 200)
	for _, j := range mustJobs(t, h, r.ID) {
		if w, ok := members[j.Device]; !ok || w != j.Wave {
			t.Fatalf("device %s in wave %d after restart; before: member %v wave %d", j.Device, j.Wave, ok, w)
		}
	}
	// A percent is the same devices in every rollout: the selection is a stable hash.
	var chosen []string
	for _, id := range ids {
		if percentLimit(50) > position(id) {
			chosen = append(chosen, id)
		}
	}
	if len(chosen) < 70 || len(chosen) > 130 {
		t.Fatalf("got %d of 200 under 50%%, want about 100", len(chosen))
	}
	// Tagging a device that the percent selects makes it join.
	for _, id := range chosen {
		if d, _ := h.c.GetDevice(id); d.Tags["ring"] != "beta" {
			if _, err := h.c.TagDevice(id, map[string]string{"ring": "beta"}); err != nil {
				t.Fatal(err)
			}
			if got := h.rollout(r.ID).Devices; got != after.Devices+1 {
				t.Fatalf("got %d devices after tagging %s, want %d", got, id, after.Devices+1)
			}
			break
		}
	}
}

func mustJobs(t *testing.T, h *harness, id string) []Job {
	t.Helper()
	jobs, err := h.c.Jobs(id, JobQuery{})
	if err != nil {
		t.Fatal(err)
	}
	return jobs
}

// TestExplicitDevices: a rollout of listed devices touches no other, and a listed device that
// registers later joins.
func TestExplicitDevices(t *testing.T) {
	h := newHarness(t)
	h.fleet("d", 5)
	r := h.create(RolloutSpec{Devices: []string{"d-001", "d-003", "late"}})
	if got := h.rollout(r.ID).Devices; got != 2 {
		t.Fatalf("got %d devices, want 2", got)
	}
	h.status("late", "7.27.0")
	got := mustJobs(t, h, r.ID)
	var devs []string
	for _, j := range got {
		devs = append(devs, j.Device)
	}
	if want := []string{"d-001", "d-003", "late"}; !slices.Equal(devs, want) {
		t.Fatalf("got jobs for %v, want %v", devs, want)
	}
}

// TestScheduledStart: nothing is offered before the start time.
func TestScheduledStart(t *testing.T) {
	h := newHarness(t)
	h.fleet("d", 1)
	r := h.create(RolloutSpec{Start: t0.Add(time.Hour)})
	if r.State != RolloutScheduled {
		t.Fatalf("got %s, want %s", r.State, RolloutScheduled)
	}
	h.tick(t0.Add(59 * time.Minute))
	if _, ok := h.jobOf(r.ID, "d-000"); ok {
		t.Fatal("offered before the start time")
	}
	h.tick(t0.Add(time.Hour))
	if got := h.rollout(r.ID); got.State != RolloutActive || got.Counts[JobOffered] != 1 {
		t.Fatalf("got %s %v at the start time, want active with 1 offered", got.State, got.Counts)
	}
}

// TestEventLogBounded: the log keeps the latest entries and counts them all.
func TestEventLogBounded(t *testing.T) {
	h := newHarness(t, func(o *Options) { o.EventLogSize = 5 })
	h.fleet("d", 3)
	r := h.create(RolloutSpec{})
	for _, d := range []string{"d-000", "d-001", "d-002"} {
		h.install(r.ID, d)
	}
	log, err := h.c.Events(r.ID, 0, 0)
	if err != nil {
		t.Fatal(err)
	}
	if len(log.Events) != 5 || log.Total < 15 {
		t.Fatalf("got %d events of %d, want the last 5 of at least 15", len(log.Events), log.Total)
	}
	if last := log.Events[4]; last.Seq != log.Total || last.To != RolloutCompleted {
		t.Fatalf("got last event %+v, want seq %d: completed", last, log.Total)
	}
	page, _ := h.c.Events(r.ID, log.Total-2, 1)
	if len(page.Events) != 1 || page.Events[0].Seq != log.Total-1 {
		t.Fatalf("got page %+v, want the one event after %d", page.Events, log.Total-2)
	}
	if _, err := h.c.Events("r99", 0, 0); !errors.Is(err, ErrNotFound) {
		t.Fatalf("got %v, want ErrNotFound", err)
	}
}

// TestRestartMidRollout: counts, waves and in-flight jobs survive a restart, and the rollout
// finishes with every device counted once.
func TestRestartMidRollout(t *testing.T) {
	h := newHarness(t)
	ids := h.fleet("d", 12)
	r := h.create(RolloutSpec{Waves: []int{50, 100}, MaxConcurrent: 4})
	for _, d := range h.devicesIn(r.ID, JobOffered)[:2] {
		h.install(r.ID, d)
	}
	before := h.rollout(r.ID)
	if err := h.c.Close(context.Background()); err != nil {
		t.Fatal(err)
	}
	h.start()
	after := h.rollout(r.ID)
	if fmt.Sprint(after.Counts) != fmt.Sprint(before.Counts) || after.WavesStarted != before.WavesStarted {
		t.Fatalf("after restart got %v (%d waves), want %v (%d)", after.Counts, after.WavesStarted, before.Counts, before.WavesStarted)
	}
	h.fleet("d", 12) // everyone reconnects
	for range 20 {
		offered := h.devicesIn(r.ID, JobOffered)
		if len(offered) == 0 {
			break
		}
		for _, d := range offered {
			h.install(r.ID, d)
		}
	}
	got := h.rollout(r.ID)
	if got.State != RolloutCompleted || got.Counts[JobInstalled] != len(ids) || got.Devices != len(ids) {
		t.Fatalf("got %s %v over %d, want completed with %d installed", got.State, got.Counts, got.Devices, len(ids))
	}
}

// TestCommitFailureActsOnNothing: when the state file cannot be written, the transition is
// not acted on.
func TestCommitFailureActsOnNothing(t *testing.T) {
	h := newHarness(t)
	h.create(RolloutSpec{})
	if err := h.db.Close(); err != nil {
		t.Fatal(err)
	}
	h.status("d1", "7.27.0")
	if n := len(h.pub.on(protocol.Topic("d1", protocol.SuffixJob))); n != 0 {
		t.Fatalf("got %d offers after a failed commit, want 0", n)
	}
	if got := h.c.Stats().FailedWrites.Load(); got == 0 {
		t.Fatal("got no failed write counted")
	}
}
