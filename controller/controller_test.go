package controller

import (
	"bytes"
	"context"
	"crypto/sha256"
	"encoding/hex"
	"encoding/json"
	"errors"
	"fmt"
	"os"
	"path/filepath"
	"strings"
	"sync"
	"testing"
	"time"

	"github.com/fota-dev/fota/fotatest"
	"github.com/fota-dev/fota/protocol"
	"github.com/fota-dev/fota/transfer"
	bolt "go.etcd.io/bbolt"
)

// fakeFirmware serves one release from memory.
type fakeFirmware struct {
	model, version string
	image          []byte
	blobs          map[string][]byte // other artifacts by sha, e.g. patches
	expires        string            // the manifest's expiry; empty: never
}

func (f *fakeFirmware) Manifest(model, version string) (protocol.Manifest, error) {
	if model != f.model || version != f.version {
		return protocol.Manifest{}, ErrNotFound
	}
	sum := sha256.Sum256(f.image)
	return protocol.Manifest{V: 1, Model: model, Version: version, Counter: 2, Size: int64(len(f.image)), SHA256: hex.EncodeToString(sum[:]), Expires: f.expires}, nil
}

func (f *fakeFirmware) ReadAt(sha string, p []byte, off int64) (int, error) {
	if b, ok := f.blobs[sha]; ok {
		return bytes.NewReader(b).ReadAt(p, off)
	}
	return bytes.NewReader(f.image).ReadAt(p, off)
}

// recorder is a Publisher that keeps what was published.
type recorder struct {
	mu   sync.Mutex
	msgs []published
}

type published struct {
	topic   string
	payload []byte
}

func (r *recorder) Publish(topic string, payload []byte, qos byte) error {
	r.mu.Lock()
	defer r.mu.Unlock()
	r.msgs = append(r.msgs, published{topic, bytes.Clone(payload)})
	return nil
}

// Send records a chunk frame, as the transfer server's sender.
func (r *recorder) Send(topic string, payload []byte) error { return r.Publish(topic, payload, 0) }

func (r *recorder) on(topic string) [][]byte {
	r.mu.Lock()
	defer r.mu.Unlock()
	var out [][]byte
	for _, m := range r.msgs {
		if m.topic == topic {
			out = append(out, m.payload)
		}
	}
	return out
}

type harness struct {
	t      *testing.T
	db     *bolt.DB
	fw     *fakeFirmware
	pub    *recorder
	c      *Controller
	ts     *transfer.Server
	deltas *fakeDeltas
	clock  *fakeClock
	opts   []func(*Options)
}

// fakeClock is a Clock moved by hand.
type fakeClock struct {
	mu sync.Mutex
	t  time.Time
}

func (f *fakeClock) Now() time.Time {
	f.mu.Lock()
	defer f.mu.Unlock()
	return f.t
}

func (f *fakeClock) Set(t time.Time) {
	f.mu.Lock()
	defer f.mu.Unlock()
	f.t = t
}

func (f *fakeClock) Add(d time.Duration) time.Time {
	f.mu.Lock()
	defer f.mu.Unlock()
	f.t = f.t.Add(d)
	return f.t
}

// t0 is a Monday, 00:00 UTC.
var t0 = time.Date(2025, 3, 3, 0, 0, 0, 0, time.UTC)

func realImage(t *testing.T) []byte {
	t.Helper()
	b, err := os.ReadFile(filepath.Join("..", "demofirmware", "pybricks-primehub-7.28.0.bin"))
	if err != nil {
		t.Fatalf("read firmware: %v", err)
	}
	return b
}

// newHarness runs a controller on a fresh state file, with a fake clock at t0 and no
// background ticks: tests call Tick.
func newHarness(t *testing.T, opts ...func(*Options)) *harness {
	t.Helper()
	db, err := bolt.Open(filepath.Join(t.TempDir(), "fota.db"), 0o600, &bolt.Options{Timeout: time.Second})
	if err != nil {
		t.Fatal(err)
	}
	t.Cleanup(func() { db.Close() })
	h := &harness{t: t, db: db, fw: &fakeFirmware{model: "primehub", version: "7.28.0", image: realImage(t)}, pub: &recorder{},
		clock: &fakeClock{t: t0}, opts: opts}
	h.start()
	return h
}

func (h *harness) start() {
	h.t.Helper()
	opts := Options{DB: h.db, Publisher: h.pub, Firmware: h.fw, Clock: h.clock, TickInterval: -1}
	if h.deltas != nil {
		opts.Deltas = h.deltas
	}
	for _, f := range h.opts {
		f(&opts)
	}
	c, err := New(opts)
	if err != nil {
		h.t.Fatal(err)
	}
	if err := c.Start(); err != nil {
		h.t.Fatal(err)
	}
	h.c = c
	h.t.Cleanup(func() { c.Close(context.Background()) })
	ts, err := transfer.New(transfer.Options{Lookup: c.Transfer, Artifacts: h.fw, Sender: h.pub})
	if err != nil {
		h.t.Fatal(err)
	}
	h.ts = ts
	h.t.Cleanup(func() { ts.Close(context.Background()) })
}

func (h *harness) send(device, suffix string, v any) {
	h.t.Helper()
	b, err := json.Marshal(v)
	if err != nil {
		h.t.Fatal(err)
	}
	if suffix == protocol.SuffixRequest {
		// Chunk requests go to the chunk server, as in fota serve.
		h.ts.Handle(device, b)
		return
	}
	h.c.HandleMessage(device, suffix, b)
}

func (h *harness) status(device, version string) {
	h.statusSHA(device, version, "")
}

func (h *harness) statusSHA(device, version, sha string) {
	h.send(device, protocol.SuffixStatus, protocol.Status{V: 1, Model: "primehub", Version: version, SHA256: sha, State: protocol.StateIdle})
}

// waitOffer polls until the device has been sent n offers and returns the last.
func (h *harness) waitOffer(device string, n int) protocol.Offer {
	h.t.Helper()
	topic := protocol.Topic(device, protocol.SuffixJob)
	fotatest.WaitForValue(h.t, 20*time.Second, fmt.Sprintf("device %s to be sent %d offers", device, n), func() (int, bool) {
		got := len(h.pub.on(topic))
		return got, got >= n
	})
	var o protocol.Offer
	if err := json.Unmarshal(h.pub.on(topic)[n-1], &o); err != nil {
		h.t.Fatal(err)
	}
	return o
}

func (h *harness) job(rollout, device string) Job {
	h.t.Helper()
	d, err := h.c.GetRollout(rollout)
	if err != nil {
		h.t.Fatal(err)
	}
	for _, j := range d.Jobs {
		if j.Device == device {
			return j
		}
	}
	h.t.Fatalf("rollout %s has no job for %s", rollout, device)
	return Job{}
}

func TestRolloutOffersAndCompletes(t *testing.T) {
	h := newHarness(t)
	h.status("d1", "7.27.0") // online before the rollout
	r, err := h.c.CreateRollout(context.Background(), RolloutSpec{Model: "primehub", Version: "v7.28"})
	if err != nil {
		t.Fatal(err)
	}
	if r.Version != "7.28.0" || r.State != RolloutActive {
		t.Fatalf("got rollout %+v, want version 7.28.0 active", r)
	}
	o := h.waitOffer("d1", 1)
	if o.Manifest.Version != "7.28.0" || o.Size != int64(len(h.fw.image)) || o.Job == "" {
		t.Fatalf("got offer %+v, want 7.28.0 of %d bytes", o, len(h.fw.image))
	}
	h.status("d2", "7.27.0") // joins late
	o2 := h.waitOffer("d2", 1)
	h.status("d3", "7.28.0") // already there: not part of the rollout
	h.status("d4", "7.28.0")

	for i, st := range []string{protocol.StateDownloading, protocol.StateVerifying, protocol.StateInstalling} {
		h.send("d1", protocol.SuffixEvent, protocol.Event{V: 1, Job: o.Job, Seq: uint64(i + 1), State: st, Bytes: o.Size})
	}
	if got := h.job(r.ID, "d1").State; got != JobInstalling {
		t.Fatalf("got d1 state %s, want %s", got, JobInstalling)
	}
	h.statusSHA("d1", "7.28.0", o.Manifest.SHA256) // rebooted on the new version
	h.send("d2", protocol.SuffixEvent, protocol.Event{V: 1, Job: o2.Job, Seq: 1, State: protocol.StateFailed, Reason: "hash-mismatch"})

	d, err := h.c.GetRollout(r.ID)
	if err != nil {
		t.Fatal(err)
	}
	if d.Counts[JobInstalled] != 1 || d.Counts[JobFailed] != 1 || len(d.Jobs) != 2 {
		t.Fatalf("got counts %v over %d jobs, want 1 installed, 1 failed, 2 jobs", d.Counts, len(d.Jobs))
	}
	if d.State != RolloutCompleted {
		t.Fatalf("got rollout state %s, want %s", d.State, RolloutCompleted)
	}
	if j := h.job(r.ID, "d2"); j.Reason != "hash-mismatch" {
		t.Fatalf("got reason %q, want hash-mismatch", j.Reason)
	}
	dev, err := h.c.GetDevice("d1")
	if err != nil || dev.Version != "7.28.0" || dev.Job != "" {
		t.Fatalf("got device %+v (%v), want version 7.28.0 and no job", dev, err)
	}
	// A completed rollout still holds its firmware for late devices, until it is closed.
	if !h.c.InUse("primehub", "7.28.0") {
		t.Fatal("InUse = false for the firmware of a completed rollout, want true")
	}
	if _, err := h.c.CancelRollout(r.ID); err != nil {
		t.Fatal(err)
	}
	if h.c.InUse("primehub", "7.28.0") {
		t.Fatal("InUse = true after the rollout was canceled, want false")
	}
}

func TestEventsAreIdempotent(t *testing.T) {
	h := newHarness(t)
	r, err := h.c.CreateRollout(context.Background(), RolloutSpec{Model: "primehub", Version: "7.28.0"})
	if err != nil {
		t.Fatal(err)
	}
	h.status("d1", "7.27.0")
	o := h.waitOffer("d1", 1)
	h.send("d1", protocol.SuffixEvent, protocol.Event{V: 1, Job: o.Job, Seq: 1, State: protocol.StateDownloading, Bytes: o.Size})
	h.send("d1", protocol.SuffixEvent, protocol.Event{V: 1, Job: o.Job, Seq: 2, State: protocol.StateInstalling, Bytes: o.Size})
	// Late and duplicate events must not move the job back.
	h.send("d1", protocol.SuffixEvent, protocol.Event{V: 1, Job: o.Job, Seq: 1, State: protocol.StateDownloading})
	h.send("d1", protocol.SuffixEvent, protocol.Event{V: 1, Job: o.Job, Seq: 2, State: protocol.StateDownloading})
	h.send("d1", protocol.SuffixEvent, protocol.Event{V: 1, Job: "r99-1", Seq: 3, State: protocol.StateFailed})
	if got := h.job(r.ID, "d1").State; got != JobInstalling {
		t.Fatalf("got state %s, want %s", got, JobInstalling)
	}
	if got := h.c.Stats().StaleEvents.Load(); got != 3 {
		t.Fatalf("got %d stale events, want 3", got)
	}
	h.send("d1", protocol.SuffixEvent, protocol.Event{V: 1, Job: o.Job, Seq: 3, State: protocol.StateInstalled, Version: "7.28.0"})
	h.statusSHA("d1", "7.28.0", o.Manifest.SHA256)
	h.send("d1", protocol.SuffixEvent, protocol.Event{V: 1, Job: o.Job, Seq: 4, State: protocol.StateFailed})
	if got := h.job(r.ID, "d1").State; got != JobInstalled {
		t.Fatalf("got state %s after a late failure, want %s", got, JobInstalled)
	}
}

func TestBadDeviceMessagesLeaveStateIntact(t *testing.T) {
	h := newHarness(t)
	h.status("d1", "7.27.0")
	before, _ := h.c.GetDevice("d1")
	for _, tc := range []struct{ suffix, payload string }{
		{protocol.SuffixStatus, "{"},
		{protocol.SuffixStatus, `{"model":"primehub","version":"not-a-version"}`},
		{protocol.SuffixStatus, `{"version":"1.0.0"}`},
		{protocol.SuffixEvent, `{"job":"r1-1","seq":1,"state":"exploded"}`},
		{protocol.SuffixEvent, `[1,2,3]`},
		{protocol.SuffixRequest, `{"job":1}`},
		{"whatever", `{}`},
		{protocol.SuffixStatus, "\x00\xff"},
	} {
		h.c.HandleMessage("d1", tc.suffix, []byte(tc.payload))
	}
	after, err := h.c.GetDevice("d1")
	if err != nil {
		t.Fatal(err)
	}
	if after.Version != before.Version || after.Model != before.Model {
		t.Fatalf("got device %+v after bad input, want %+v", after, before)
	}
	if got := h.c.Stats().BadMessages.Load(); got != 8 {
		t.Fatalf("got %d bad messages counted, want 8", got)
	}
}

func TestCertificateModelWins(t *testing.T) {
	h := newHarness(t)
	h.c.DeviceConnected("d1", "esp8266") // registers the device with its certificate's model
	h.status("d1", "7.27.0")             // claims primehub
	d, err := h.c.GetDevice("d1")
	if err != nil {
		t.Fatal(err)
	}
	if d.Model != "esp8266" || d.Version != "" || !d.Online {
		t.Fatalf("got device %+v, want esp8266 online without a version (status refused)", d)
	}
	if got := h.c.Stats().BadMessages.Load(); got != 1 {
		t.Fatalf("got %d bad messages, want 1", got)
	}
}

func TestChunks(t *testing.T) {
	h := newHarness(t)
	if _, err := h.c.CreateRollout(context.Background(), RolloutSpec{Model: "primehub", Version: "7.28.0"}); err != nil {
		t.Fatal(err)
	}
	h.status("d1", "7.27.0")
	o := h.waitOffer("d1", 1)
	size := int64(len(h.fw.image))
	chunkTopic := protocol.Topic("d1", protocol.SuffixChunk)
	tests := []struct {
		name       string
		req        protocol.ChunkRequest
		kind       byte
		wantOffset int64
		wantLen    int
		wantCode   string
	}{
		{"first", protocol.ChunkRequest{Job: o.Job, Offset: 0, Length: 4096}, protocol.FrameData, 0, 4096, ""},
		{"tail is clamped", protocol.ChunkRequest{Job: o.Job, Offset: size - 10, Length: 4096}, protocol.FrameData, size - 10, 10, ""},
		{"past the end", protocol.ChunkRequest{Job: o.Job, Offset: size, Length: 10}, protocol.FrameError, size, 0, protocol.ErrCodeRange},
		{"negative", protocol.ChunkRequest{Job: o.Job, Offset: -1, Length: 10}, protocol.FrameError, 0, 0, protocol.ErrCodeRange},
		{"too long", protocol.ChunkRequest{Job: o.Job, Offset: 0, Length: o.ChunkSize + 1}, protocol.FrameError, 0, 0, protocol.ErrCodeRange},
		{"other job", protocol.ChunkRequest{Job: "r7-1", Offset: 0, Length: 10}, protocol.FrameError, 0, 0, protocol.ErrCodeNoJob},
	}
	for i, tc := range tests {
		t.Run(tc.name, func(t *testing.T) {
			h.send("d1", protocol.SuffixRequest, tc.req)
			frames := h.pub.on(chunkTopic)
			if len(frames) != i+1 {
				t.Fatalf("got %d frames, want %d", len(frames), i+1)
			}
			f, err := protocol.ParseFrame(frames[i])
			if err != nil {
				t.Fatal(err)
			}
			if f.Kind != tc.kind || int64(f.Offset) != tc.wantOffset {
				t.Fatalf("got kind %d offset %d, want kind %d offset %d", f.Kind, f.Offset, tc.kind, tc.wantOffset)
			}
			if tc.kind == protocol.FrameError {
				if string(f.Payload) != tc.wantCode {
					t.Fatalf("got error %q, want %q", f.Payload, tc.wantCode)
				}
				return
			}
			if f.Transfer != o.Transfer {
				t.Fatalf("got transfer %d, want %d", f.Transfer, o.Transfer)
			}
			want := h.fw.image[tc.wantOffset : tc.wantOffset+int64(tc.wantLen)]
			if !bytes.Equal(f.Payload, want) {
				t.Fatalf("got %d payload bytes not matching the image at %d", len(f.Payload), tc.wantOffset)
			}
		})
	}
	// A device with no job gets no-job.
	h.send("d9", protocol.SuffixRequest, protocol.ChunkRequest{Job: o.Job, Offset: 0, Length: 10})
	frames := h.pub.on(protocol.Topic("d9", protocol.SuffixChunk))
	if len(frames) != 1 {
		t.Fatalf("got %d frames for a device without job, want 1", len(frames))
	}
	if f, err := protocol.ParseFrame(frames[0]); err != nil || f.Kind != protocol.FrameError {
		t.Fatalf("got frame %+v (%v), want an error frame", f, err)
	}
}

func TestRestartKeepsJobsAndTransfers(t *testing.T) {
	h := newHarness(t)
	r, err := h.c.CreateRollout(context.Background(), RolloutSpec{Model: "primehub", Version: "7.28.0"})
	if err != nil {
		t.Fatal(err)
	}
	h.status("d1", "7.27.0")
	o := h.waitOffer("d1", 1)
	h.send("d1", protocol.SuffixEvent, protocol.Event{V: 1, Job: o.Job, Seq: 1, State: protocol.StateDownloading})
	if err := h.c.Close(context.Background()); err != nil {
		t.Fatal(err)
	}
	h.start()
	// The restarted controller serves the transfer it offered before.
	h.send("d1", protocol.SuffixRequest, protocol.ChunkRequest{Job: o.Job, Offset: 0, Length: 1024})
	frames := h.pub.on(protocol.Topic("d1", protocol.SuffixChunk))
	if len(frames) != 1 {
		t.Fatalf("got %d frames, want 1", len(frames))
	}
	if f, err := protocol.ParseFrame(frames[0]); err != nil || f.Kind != protocol.FrameData || f.Transfer != o.Transfer {
		t.Fatalf("got frame %+v (%v), want data of transfer %d", f, err, o.Transfer)
	}
	// The device reconnects mid-download: same job offered again, not a new one.
	h.status("d1", "7.27.0")
	if o2 := h.waitOffer("d1", 2); o2.Job != o.Job || o2.Transfer != o.Transfer {
		t.Fatalf("got re-offer %s/%d, want %s/%d", o2.Job, o2.Transfer, o.Job, o.Transfer)
	}
	if got := h.job(r.ID, "d1").State; got != JobDownloading {
		t.Fatalf("got state %s, want %s", got, JobDownloading)
	}
}

func TestCreateRolloutErrors(t *testing.T) {
	h := newHarness(t)
	tests := []struct {
		name string
		spec RolloutSpec
		want error
	}{
		{"bad version", RolloutSpec{Model: "primehub", Version: "seven"}, ErrInvalid},
		{"unknown firmware", RolloutSpec{Model: "primehub", Version: "9.9.9"}, ErrNotFound},
	}
	for _, tc := range tests {
		t.Run(tc.name, func(t *testing.T) {
			if _, err := h.c.CreateRollout(context.Background(), tc.spec); !errors.Is(err, tc.want) {
				t.Fatalf("got %v, want %v", err, tc.want)
			}
		})
	}
	if _, err := h.c.CreateRollout(context.Background(), RolloutSpec{Model: "primehub", Version: "7.28.0"}); err != nil {
		t.Fatal(err)
	}
	h.status("d1", "7.27.0")
	if _, err := h.c.CreateRollout(context.Background(), RolloutSpec{Model: "primehub", Version: "7.28.0"}); !errors.Is(err, ErrConflict) {
		t.Fatalf("got %v, want ErrConflict for a second active rollout", err)
	}
	rs, err := h.c.ListRollouts()
	if err != nil || len(rs) != 1 {
		t.Fatalf("got %d rollouts (%v), want 1", len(rs), err)
	}
}

// unknownBase is an image the fake deltas cannot make a patch from.
var unknownBase = strings.Repeat("cafe", 16)

// fakeDeltas answers from a table: a pair is pending until made ready.
type fakeDeltas struct {
	mu    sync.Mutex
	ready map[string]protocol.Manifest
	asked int
}

func (f *fakeDeltas) Delta(base string, target protocol.Manifest) (protocol.Manifest, bool, error) {
	f.mu.Lock()
	defer f.mu.Unlock()
	f.asked++
	if base == unknownBase {
		return protocol.Manifest{}, false, errors.New("no delta: base unknown")
	}
	m, ok := f.ready[base]
	return m, ok, nil
}

// deltaHarness is a harness whose controller makes deltas: full is the target's manifest,
// and patch (patchSHA) the patch from base, which the fake firmware serves once dm, its
// manifest, is made ready.
type deltaHarness struct {
	*harness
	full, dm       protocol.Manifest
	base, patchSHA string
	patch          []byte
}

func newDeltaHarness(t *testing.T) *deltaHarness {
	h := newHarness(t)
	h.deltas = &fakeDeltas{ready: map[string]protocol.Manifest{}}
	if err := h.c.Close(context.Background()); err != nil {
		t.Fatal(err)
	}
	h.start()
	d := &deltaHarness{harness: h, base: strings.Repeat("ab", 32), patch: bytes.Repeat([]byte("patch"), 4000)}
	d.full, _ = h.fw.Manifest("primehub", "7.28.0")
	sum := sha256.Sum256(d.patch)
	d.patchSHA = hex.EncodeToString(sum[:])
	h.fw.blobs = map[string][]byte{d.patchSHA: d.patch}
	d.dm = d.full
	d.dm.Delta = &protocol.Delta{Base: d.base, PatchSHA256: d.patchSHA, PatchSize: int64(len(d.patch)), Format: "test"}
	return d
}

// patchReady makes the patch from base ready and tells the controller.
func (d *deltaHarness) patchReady() {
	d.deltas.mu.Lock()
	d.deltas.ready[d.base] = d.dm
	d.deltas.mu.Unlock()
	d.c.DeltaReady(d.base, d.full.SHA256)
}

func TestDeltaOffers(t *testing.T) {
	d := newDeltaHarness(t)
	h, full, base, patch, patchSHA := d.harness, d.full, d.base, d.patch, d.patchSHA

	r, err := h.c.CreateRollout(context.Background(), RolloutSpec{Model: "primehub", Version: "7.28.0"})
	if err != nil {
		t.Fatal(err)
	}
	// The patch is being made: no offer yet, the job waits.
	h.statusSHA("d1", "7.27.0", base)
	if got := h.job(r.ID, "d1").State; got != JobPending {
		t.Fatalf("got state %s while the patch is made, want %s", got, JobPending)
	}
	if n := len(h.pub.on(protocol.Topic("d1", protocol.SuffixJob))); n != 0 {
		t.Fatalf("got %d offers before the patch is ready, want 0", n)
	}
	// A device whose base is unknown gets the full image at once.
	h.statusSHA("d2", "7.27.0", unknownBase)
	if o := h.waitOffer("d2", 1); o.Manifest.Delta != nil || o.Size != full.Size {
		t.Fatalf("got offer %+v, want the full image", o)
	}

	d.patchReady()
	o := h.waitOffer("d1", 1)
	if o.Manifest.Delta == nil || o.Size != int64(len(patch)) {
		t.Fatalf("got offer of %d bytes, delta %v; want the %d-byte patch", o.Size, o.Manifest.Delta, len(patch))
	}
	j := h.job(r.ID, "d1")
	if !j.Delta || j.Artifact != patchSHA || j.State != JobOffered {
		t.Fatalf("got job %+v, want an offered delta of %s", j, patchSHA)
	}
	// Chunks come from the patch, bounded by its size.
	h.send("d1", protocol.SuffixRequest, protocol.ChunkRequest{Job: o.Job, Offset: int64(len(patch)) - 100, Length: 1024})
	frames := h.pub.on(protocol.Topic("d1", protocol.SuffixChunk))
	f, err := protocol.ParseFrame(frames[len(frames)-1])
	if err != nil || !bytes.Equal(f.Payload, patch[len(patch)-100:]) {
		t.Fatalf("got frame %+v (%v), want the last 100 bytes of the patch", f, err)
	}
	// A reconnect re-offers the same patch.
	h.statusSHA("d1", "7.27.0", base)
	if o2 := h.waitOffer("d1", 2); o2.Manifest.Delta == nil || o2.Job != o.Job {
		t.Fatalf("got re-offer %+v, want the same delta job", o2)
	}
}

// TestPendingJobOfferedOnReconnect: a patch that becomes ready while its device is offline
// leaves the job pending. Connection events can arrive after the device's status on its new
// connection, so the connect itself must put the job back in line for an offer.
func TestPendingJobOfferedOnReconnect(t *testing.T) {
	d := newDeltaHarness(t)
	h := d.harness
	r, err := h.c.CreateRollout(context.Background(), RolloutSpec{Model: "primehub", Version: "7.28.0"})
	if err != nil {
		t.Fatal(err)
	}
	h.c.DeviceConnected("d1", "primehub")
	h.statusSHA("d1", "7.27.0", d.base) // the patch is being made: the job waits
	h.c.DeviceDisconnected("d1")        // a stale disconnect, or a real drop
	d.patchReady()
	if got := h.job(r.ID, "d1").State; got != JobPending {
		t.Fatalf("got state %s after the patch was ready for an offline device, want %s", got, JobPending)
	}
	if n := len(h.pub.on(protocol.Topic("d1", protocol.SuffixJob))); n != 0 {
		t.Fatalf("got %d offers to an offline device, want 0", n)
	}

	h.c.DeviceConnected("d1", "primehub") // no status follows: it was handled already
	if o := h.waitOffer("d1", 1); o.Manifest.Delta == nil || o.Size != int64(len(d.patch)) {
		t.Fatalf("got offer of %d bytes, delta %v; want the %d-byte patch", o.Size, o.Manifest.Delta, len(d.patch))
	}
	if got := h.job(r.ID, "d1").State; got != JobOffered {
		t.Fatalf("got state %s after the device came back, want %s", got, JobOffered)
	}
}
