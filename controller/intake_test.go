package controller

import (
	"context"
	"crypto/sha256"
	"encoding/hex"
	"fmt"
	"log/slog"
	"runtime"
	"strings"
	"sync/atomic"
	"testing"
	"time"

	"github.com/fota-dev/fota/protocol"
)

// heapInUse returns the live heap after a full collection.
func heapInUse() uint64 {
	var m runtime.MemStats
	runtime.GC()
	runtime.GC()
	runtime.ReadMemStats(&m)
	return m.HeapAlloc
}

func shaOf(s string) string {
	sum := sha256.Sum256([]byte(s))
	return hex.EncodeToString(sum[:])
}

// TestStatusFloodBounded: a device that sends a status with a fresh version and sha256 each
// time does not grow the controller's memory with them, and a status that changes nothing is
// not written.
func TestStatusFloodBounded(t *testing.T) {
	if testing.Short() {
		t.Skip("100,000 statuses: slow")
	}
	h := newHarness(t, func(o *Options) { o.Publisher = discard{} })
	// The commit count is what is measured here, not the disk: skip the fsyncs.
	h.db.NoSync = true
	h.create(RolloutSpec{}) // an open rollout for the model: its version cache is in play too
	h.status("flood", "7.27.0")
	status := func(version, sha string) {
		h.send("flood", protocol.SuffixStatus, protocol.Status{V: 1, Model: "primehub", Version: version, SHA256: sha, State: protocol.StateIdle})
	}

	// Identical statuses: nothing to write.
	commits := h.c.Stats().Commits.Load()
	for range 1000 {
		status("7.27.0", "")
	}
	if got := h.c.Stats().Commits.Load() - commits; got != 0 {
		t.Fatalf("got %d commits for 1000 identical statuses, want 0", got)
	}

	const n = 100_000
	base := heapInUse()
	commits = h.c.Stats().Commits.Load()
	for i := range n {
		status(fmt.Sprintf("7.27.0-flood.%d", i), shaOf(fmt.Sprint(i)))
	}
	grown := int64(heapInUse()) - int64(base)
	got := h.c.Stats().Commits.Load() - commits
	t.Logf("%d statuses with fresh strings: heap %+d KiB, %d commits", n, grown/1024, got)
	if grown > 8<<20 {
		t.Errorf("heap grew by %d KiB over %d statuses with fresh strings, want at most 8 MiB", grown/1024, n)
	}
	if got > n {
		t.Errorf("got %d commits for %d statuses, want at most one each", got, n)
	}
	if bad := h.c.Stats().BadMessages.Load(); bad != 0 {
		t.Errorf("got %d bad messages, want 0: every status was valid", bad)
	}
	d, err := h.c.GetDevice("flood")
	if err != nil {
		t.Fatal(err)
	}
	if want := fmt.Sprintf("7.27.0-flood.%d", n-1); d.Version != want || d.SHA256 != shaOf(fmt.Sprint(n-1)) {
		t.Fatalf("got device on %s %.12s, want the last status's %s", d.Version, d.SHA256, want)
	}
}

// countingHandler counts the records logged at Warn and above.
type countingHandler struct{ n atomic.Int64 }

func (h *countingHandler) Enabled(_ context.Context, l slog.Level) bool { return l >= slog.LevelWarn }
func (h *countingHandler) Handle(context.Context, slog.Record) error    { h.n.Add(1); return nil }
func (h *countingHandler) WithAttrs([]slog.Attr) slog.Handler           { return h }
func (h *countingHandler) WithGroup(string) slog.Handler                { return h }

// TestInvalidStatusRefused: every status field is checked; a refused status is counted,
// changes nothing, writes nothing, and refusals are logged in aggregate.
func TestInvalidStatusRefused(t *testing.T) {
	logs := &countingHandler{}
	h := newHarness(t, func(o *Options) { o.Logger = slog.New(logs) })
	h.statusSHA("d1", "7.27.0", shaOf("a"))
	before, err := h.c.GetDevice("d1")
	if err != nil {
		t.Fatal(err)
	}
	good := protocol.Status{V: 1, Model: "primehub", Version: "7.27.0", SHA256: shaOf("a"), State: protocol.StateIdle}
	for _, tc := range []struct {
		name string
		edit func(*protocol.Status)
	}{
		{"short sha256", func(s *protocol.Status) { s.SHA256 = "abcd" }},
		{"upper-case sha256", func(s *protocol.Status) { s.SHA256 = strings.ToUpper(shaOf("a")) }},
		{"sha256 not hex", func(s *protocol.Status) { s.SHA256 = strings.Repeat("g", 64) }},
		{"long sha256", func(s *protocol.Status) { s.SHA256 = strings.Repeat("a", 128) }},
		{"version with v", func(s *protocol.Status) { s.Version = "v7.27.0" }},
		{"short version", func(s *protocol.Status) { s.Version = "7.27" }},
		{"long version", func(s *protocol.Status) { s.Version = "7.27.0-" + strings.Repeat("x", 100) }},
		{"bad model", func(s *protocol.Status) { s.Model = ".." }},
		{"long model", func(s *protocol.Status) { s.Model = strings.Repeat("m", 65) }},
		{"unknown state", func(s *protocol.Status) { s.State = "exploded" }},
		{"no state", func(s *protocol.Status) { s.State = "" }},
		{"long job", func(s *protocol.Status) { s.State, s.Job = protocol.StateDownloading, strings.Repeat("j", 129) }},
	} {
		t.Run(tc.name, func(t *testing.T) {
			st := good
			tc.edit(&st)
			bad, commits := h.c.Stats().BadMessages.Load(), h.c.Stats().Commits.Load()
			h.send("d1", protocol.SuffixStatus, st)
			if got := h.c.Stats().BadMessages.Load() - bad; got != 1 {
				t.Fatalf("got %d bad messages, want 1", got)
			}
			if got := h.c.Stats().Commits.Load() - commits; got != 0 {
				t.Fatalf("got %d commits, want 0", got)
			}
			after, err := h.c.GetDevice("d1")
			if err != nil {
				t.Fatal(err)
			}
			if !sameRecord(after, before) {
				t.Fatalf("got device %+v, want %+v", after, before)
			}
		})
	}
	for i := range 1000 {
		st := good
		st.SHA256 = fmt.Sprint(i)
		h.send("d1", protocol.SuffixStatus, st)
		h.c.HandleMessage("d1", protocol.SuffixStatus, []byte("{"))
	}
	if got := logs.n.Load(); got > 2 {
		t.Fatalf("got %d log lines for 2012 refused statuses, want them logged in aggregate (at most 2)", got)
	}
}

// walk sends the events of a job's phases with the given byte counts, from seq 1.
func (h *harness) walk(device, job string, steps ...protocol.Event) {
	h.t.Helper()
	for i, ev := range steps {
		ev.V, ev.Job, ev.Seq = 1, job, uint64(i+1)
		h.send(device, protocol.SuffixEvent, ev)
	}
}

// TestInstallNeedsProof: a job counts as installed only when the device reports the
// release's sha256 after it reported verifying or installing with every byte; any other
// claim fails the job as a protocol violation.
func TestInstallNeedsProof(t *testing.T) {
	ev := func(state string, bytes int64) protocol.Event { return protocol.Event{State: state, Bytes: bytes} }
	for _, tc := range []struct {
		name string
		// run plays the device after its offer; size is the transfer's, target the release's
		// sha256.
		run    func(h *harness, job string, size int64, target string)
		want   string // job state
		reason string // prefix of its reason
	}{
		{"installed event at once", func(h *harness, job string, size int64, target string) {
			h.walk("d1", job, protocol.Event{State: protocol.StateInstalled, Version: "7.28.0"})
		}, JobFailed, "protocol-violation: installed before the download was verified"},
		{"status naming the target at once", func(h *harness, job string, size int64, target string) {
			h.statusSHA("d1", "7.28.0", target)
		}, JobFailed, "protocol-violation: status reports 7.28.0 before the download was verified"},
		{"phases without bytes", func(h *harness, job string, size int64, target string) {
			h.walk("d1", job, ev(protocol.StateDownloading, 0), ev(protocol.StateVerifying, 0))
		}, JobFailed, "protocol-violation: verifying with 0 of"},
		{"short download", func(h *harness, job string, size int64, target string) {
			h.walk("d1", job, ev(protocol.StateDownloading, size/2), ev(protocol.StateInstalling, size/2))
		}, JobFailed, "protocol-violation: installing with"},
		{"bytes past the transfer", func(h *harness, job string, size int64, target string) {
			h.walk("d1", job, ev(protocol.StateDownloading, size+1))
		}, JobFailed, "protocol-violation: downloading with"},
		{"target version without sha256", func(h *harness, job string, size int64, target string) {
			h.walk("d1", job, ev(protocol.StateDownloading, size), ev(protocol.StateVerifying, size), ev(protocol.StateInstalling, size))
			h.status("d1", "7.28.0")
		}, JobFailed, "protocol-violation: status reports 7.28.0 without"},
		{"target version with another image", func(h *harness, job string, size int64, target string) {
			h.walk("d1", job, ev(protocol.StateDownloading, size), ev(protocol.StateVerifying, size), ev(protocol.StateInstalling, size))
			h.statusSHA("d1", "7.28.0", shaOf("other"))
		}, JobFailed, "protocol-violation: status reports 7.28.0 with sha256"},
		{"installed event alone", func(h *harness, job string, size int64, target string) {
			h.walk("d1", job, ev(protocol.StateDownloading, size), ev(protocol.StateVerifying, size), ev(protocol.StateInstalling, size),
				protocol.Event{State: protocol.StateInstalled, Version: "7.28.0"})
		}, JobInstalling, ""},
		{"every phase, then the status", func(h *harness, job string, size int64, target string) {
			h.walk("d1", job, ev(protocol.StateDownloading, 0), ev(protocol.StateDownloading, size/2),
				ev(protocol.StateVerifying, size), ev(protocol.StateInstalling, size))
			h.statusSHA("d1", "7.28.0", target)
		}, JobInstalled, ""},
		{"installed event, then the status", func(h *harness, job string, size int64, target string) {
			h.walk("d1", job, ev(protocol.StateDownloading, size), ev(protocol.StateVerifying, size),
				protocol.Event{State: protocol.StateInstalled, Version: "7.28.0"})
			h.statusSHA("d1", "7.28.0", target)
		}, JobInstalled, ""},
	} {
		t.Run(tc.name, func(t *testing.T) {
			h := newHarness(t)
			h.status("d1", "7.27.0")
			r := h.create(RolloutSpec{})
			o := h.waitOffer("d1", 1)
			tc.run(h, o.Job, o.Size, o.Manifest.SHA256)
			j := h.job(r.ID, "d1")
			if j.State != tc.want || !strings.HasPrefix(j.Reason, tc.reason) {
				t.Fatalf("got job %s %q, want %s %q...", j.State, j.Reason, tc.want, tc.reason)
			}
			violations := uint64(0)
			if tc.reason != "" {
				violations = 1
			}
			if got := h.c.Stats().ProtocolViolations.Load(); got != violations {
				t.Fatalf("got %d protocol violations counted, want %d", got, violations)
			}
		})
	}
}

// TestLyingDevicesDoNotPassTheGate: devices that claim the target at once fail, so the wave's
// gate is not met and the abort rule pauses the rollout.
func TestLyingDevicesDoNotPassTheGate(t *testing.T) {
	h := newHarness(t)
	ids := h.fleet("d", 20)
	r := h.create(RolloutSpec{Waves: []int{50, 100}, AbortMinFinished: 5})
	target := r.SHA256
	for _, id := range ids {
		if _, ok := h.jobOf(r.ID, id); ok {
			h.statusSHA(id, "7.28.0", target)
		}
	}
	got := h.rollout(r.ID)
	if got.Counts[JobInstalled] != 0 || got.WavesStarted != 1 || got.State != RolloutPaused {
		t.Fatalf("got %s, %d waves started, counts %v; want paused in wave 1 with none installed", got.State, got.WavesStarted, got.Counts)
	}
}

// TestEventLogShareBounded: a device flapping between states cannot evict the other
// devices' entries from the rollout's event log.
func TestEventLogShareBounded(t *testing.T) {
	h := newHarness(t, func(o *Options) { o.EventLogSize = 64 })
	ids := h.fleet("d", 5)
	r := h.create(RolloutSpec{})
	j, _ := h.jobOf(r.ID, "d-000")
	seq := uint64(0)
	for i := range 1000 {
		st := protocol.StateDownloading
		if i%2 == 1 {
			st = protocol.StateVerifying
		}
		seq++
		h.event("d-000", j.ID, seq, st, withBytes(j.Size))
	}
	log, err := h.c.Events(r.ID, 0, 0)
	if err != nil {
		t.Fatal(err)
	}
	per := map[string]int{}
	for _, e := range log.Events {
		per[e.Device]++
	}
	for _, id := range ids[1:] {
		if per[id] != 1 {
			t.Errorf("device %s: got %d log entries, want its offer's 1 kept", id, per[id])
		}
	}
	if per["d-000"] > maxLogPerJob {
		t.Errorf("flooding device: got %d log entries, want at most %d", per["d-000"], maxLogPerJob)
	}
	if got := h.c.Stats().DroppedLogEntries.Load(); got < 900 {
		t.Errorf("got %d dropped log entries, want the flood's (at least 900)", got)
	}
	// Its final entry still goes in.
	h.fail(r.ID, "d-000", "hash-mismatch")
	log, _ = h.c.Events(r.ID, 0, 0)
	found := false
	for _, e := range log.Events {
		found = found || e.Device == "d-000" && e.To == JobFailed
	}
	if !found {
		t.Fatal("the flooding device's failure is not in the log, want it kept")
	}
}

// TestCounterNotAboveNotOffered: a device reporting a security counter the release's does
// not exceed is not offered it (it would refuse it); its job ends with the reason.
func TestCounterNotAboveNotOffered(t *testing.T) {
	h := newHarness(t)
	m, _ := h.fw.Manifest("primehub", "7.28.0") // counter 2
	for id, counter := range map[string]uint64{"same": m.Counter, "above": m.Counter + 1, "below": m.Counter - 1, "unknown": 0} {
		h.send(id, protocol.SuffixStatus, protocol.Status{V: 1, Model: "primehub", Version: "7.27.0", State: protocol.StateIdle, Counter: counter})
	}
	r := h.create(RolloutSpec{})
	for _, id := range []string{"below", "unknown"} {
		if o := h.waitOffer(id, 1); o.Manifest.Counter != m.Counter {
			t.Fatalf("device %s: got offer %+v, want the release", id, o)
		}
	}
	for _, id := range []string{"same", "above"} {
		if n := len(h.pub.on(protocol.Topic(id, protocol.SuffixJob))); n != 0 {
			t.Errorf("device %s: got %d offers, want 0", id, n)
		}
		j := h.job(r.ID, id)
		if j.State != JobFailed || !strings.HasPrefix(j.Reason, "counter: release 7.28.0 has security counter 2, not above the device's") {
			t.Errorf("device %s: got job %s %q, want failed for its counter", id, j.State, j.Reason)
		}
	}
	// The counter is kept in the device record, across a restart.
	if err := h.c.Close(context.Background()); err != nil {
		t.Fatal(err)
	}
	h.start()
	d, err := h.c.GetDevice("above")
	if err != nil {
		t.Fatal(err)
	}
	if d.Counter != m.Counter+1 {
		t.Fatalf("got counter %d after a restart, want %d", d.Counter, m.Counter+1)
	}
}

// TestInstallAcrossRestart: a device that started its download before the server went down
// may install while the server is away, its later events lost; its status with the
// release's sha256 then completes the job. Without a restart the same reports are a
// violation (see TestInstallNeedsProof).
func TestInstallAcrossRestart(t *testing.T) {
	for _, tc := range []struct {
		name    string
		started bool // the device reported downloading before the restart
		want    string
	}{
		{"download started", true, JobInstalled},
		{"never started", false, JobFailed},
	} {
		t.Run(tc.name, func(t *testing.T) {
			h := newHarness(t)
			h.status("d1", "7.27.0")
			r := h.create(RolloutSpec{})
			o := h.waitOffer("d1", 1)
			if tc.started {
				h.walk("d1", o.Job, protocol.Event{State: protocol.StateDownloading})
			}
			if err := h.c.Close(context.Background()); err != nil {
				t.Fatal(err)
			}
			h.clock.Add(time.Minute)
			h.start()
			h.statusSHA("d1", "7.28.0", o.Manifest.SHA256)
			if j := h.job(r.ID, "d1"); j.State != tc.want {
				t.Fatalf("got job %s %q, want %s", j.State, j.Reason, tc.want)
			}
		})
	}
}

// TestPrescribedInstalledEventNotStale: the installed event a device sends after the Status
// that completed its job, as the protocol prescribes, is expected, not counted stale; one for
// another version still is.
func TestPrescribedInstalledEventNotStale(t *testing.T) {
	h := newHarness(t)
	h.fleet("d", 1)
	r := h.create(RolloutSpec{})
	j := h.job(r.ID, "d-000")
	h.install(r.ID, "d-000")
	if got := h.job(r.ID, "d-000").State; got != JobInstalled {
		t.Fatalf("got %s, want installed", got)
	}
	if got := h.c.Stats().StaleEvents.Load(); got != 0 {
		t.Errorf("got %d stale events after a clean install, want 0", got)
	}
	h.event("d-000", j.ID, 99, protocol.StateInstalled, func(e *protocol.Event) { e.Version = "7.26.0" })
	if got := h.c.Stats().StaleEvents.Load(); got != 1 {
		t.Errorf("got %d stale events after an installed event for another version, want 1", got)
	}
}
