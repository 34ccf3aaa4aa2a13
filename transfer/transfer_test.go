package transfer

import (
	"bytes"
	"context"
	"crypto/sha256"
	"encoding/hex"
	"encoding/json"
	"errors"
	"fmt"
	"io"
	"log/slog"
	"math"
	"os"
	"path/filepath"
	"sync"
	"testing"
	"time"

	"github.com/fota-dev/fota/protocol"
)

// image is a real firmware image, read through an *os.File as the artifact store does.
type image struct {
	sha  string
	data []byte
	f    *os.File
}

func loadImage(t testing.TB, name string) *image {
	t.Helper()
	path := filepath.Join("..", "..", "shared", "firmware", name)
	data, err := os.ReadFile(path)
	if err != nil {
		t.Fatalf("read firmware: %v", err)
	}
	f, err := os.Open(path)
	if err != nil {
		t.Fatal(err)
	}
	t.Cleanup(func() { _ = f.Close() })
	sum := sha256.Sum256(data)
	return &image{sha: hex.EncodeToString(sum[:]), data: data, f: f}
}

// artifacts serves images by sha256; fail, when set, makes every read return it.
type artifacts struct {
	images map[string]*image
	fail   error
	short  bool // return one byte less than asked, without an error
}

func (a *artifacts) ReadAt(sha string, p []byte, off int64) (int, error) {
	if a.fail != nil {
		return 0, a.fail
	}
	im := a.images[sha]
	if im == nil {
		return 0, errors.New("no such artifact")
	}
	if a.short && len(p) > 0 {
		p = p[:len(p)-1]
	}
	return im.f.ReadAt(p, off)
}

type published struct {
	topic   string
	payload []byte
	qos     byte
}

// recorder is a Publisher that copies what it is given, as the broker does.
type recorder struct {
	mu   sync.Mutex
	msgs []published
	fail error
	hold chan struct{} // when set, Publish waits for it to be closed
	in   chan struct{} // when set, Publish signals it is in progress
}

func (r *recorder) Publish(topic string, payload []byte, qos byte) error {
	if r.in != nil {
		r.in <- struct{}{}
	}
	if r.hold != nil {
		<-r.hold
	}
	if r.fail != nil {
		return r.fail
	}
	r.mu.Lock()
	defer r.mu.Unlock()
	r.msgs = append(r.msgs, published{topic, bytes.Clone(payload), qos})
	return nil
}

func (r *recorder) take() []published {
	r.mu.Lock()
	defer r.mu.Unlock()
	m := r.msgs
	r.msgs = nil
	return m
}

type fixture struct {
	srv  *Server
	pub  *recorder
	arts *artifacts
	im   *image
	xfer map[string]Transfer
}

func newFixture(t *testing.T, edit func(*Options)) *fixture {
	t.Helper()
	im := loadImage(t, "pybricks-primehub-7.28.0.bin")
	f := &fixture{
		pub:  &recorder{},
		arts: &artifacts{images: map[string]*image{im.sha: im}},
		im:   im,
		xfer: map[string]Transfer{
			"dev-1": {Job: "r1-1", ID: 0xdeadbeef, SHA256: im.sha, Size: int64(len(im.data)), ChunkMax: 16 << 10},
		},
	}
	opts := Options{
		Lookup:    func(d string) (Transfer, bool) { x, ok := f.xfer[d]; return x, ok },
		Artifacts: f.arts,
		Publisher: f.pub,
		Logger:    slog.New(slog.NewTextHandler(t.Output(), &slog.HandlerOptions{Level: slog.LevelInfo})),
	}
	if edit != nil {
		edit(&opts)
	}
	srv, err := New(opts)
	if err != nil {
		t.Fatalf("New: %v", err)
	}
	f.srv = srv
	return f
}

func request(job string, off int64, n int) []byte {
	b, _ := json.Marshal(protocol.ChunkRequest{Job: job, Offset: off, Length: n})
	return b
}

// one handles a request and returns the single frame it published.
func (f *fixture) one(t *testing.T, device string, payload []byte) protocol.Frame {
	t.Helper()
	f.srv.Handle(device, payload)
	msgs := f.pub.take()
	if len(msgs) != 1 {
		t.Fatalf("got %d messages, want 1", len(msgs))
	}
	m := msgs[0]
	if want := protocol.Topic(device, protocol.SuffixChunk); m.topic != want || m.qos != 0 {
		t.Fatalf("published on %q qos %d, want %q qos 0", m.topic, m.qos, want)
	}
	fr, err := protocol.ParseFrame(m.payload)
	if err != nil {
		t.Fatalf("ParseFrame: %v", err)
	}
	return fr
}

func TestDownloadMatchesImage(t *testing.T) {
	for _, chunk := range []int{protocol.MinChunkSize, 4 << 10, protocol.DefaultChunkSize, protocol.MaxChunkSize} {
		t.Run(fmt.Sprintf("%dKiB", chunk>>10), func(t *testing.T) {
			f := newFixture(t, func(o *Options) { o.MaxInflightPerDevice = math.MaxInt64 / 2; o.MaxInflightTotal = math.MaxInt64 / 2 })
			x := f.xfer["dev-1"]
			x.ChunkMax = chunk
			f.xfer["dev-1"] = x
			var got []byte
			for off := int64(0); off < x.Size; off += int64(chunk) {
				fr := f.one(t, "dev-1", request(x.Job, off, chunk))
				if fr.Kind != protocol.FrameData || fr.Transfer != x.ID || int64(fr.Offset) != off {
					t.Fatalf("got kind %d transfer %#x offset %d, want data %#x %d", fr.Kind, fr.Transfer, fr.Offset, x.ID, off)
				}
				got = append(got, fr.Payload...)
			}
			if !bytes.Equal(got, f.im.data) {
				t.Fatalf("got %d bytes, want the %d bytes of the image", len(got), len(f.im.data))
			}
			st := f.srv.Stats()
			wantChunks := (x.Size + int64(chunk) - 1) / int64(chunk)
			if st.Chunks != uint64(wantChunks) || st.Bytes != uint64(x.Size) || st.Requests != uint64(wantChunks) {
				t.Fatalf("got stats %+v, want %d chunks of %d bytes", st, wantChunks, x.Size)
			}
		})
	}
}

func TestTailIsClamped(t *testing.T) {
	f := newFixture(t, nil)
	x := f.xfer["dev-1"]
	for _, back := range []int64{1, 100, 16<<10 - 1} {
		off := x.Size - back
		fr := f.one(t, "dev-1", request(x.Job, off, x.ChunkMax))
		if fr.Kind != protocol.FrameData || int64(len(fr.Payload)) != back || !bytes.Equal(fr.Payload, f.im.data[off:]) {
			t.Errorf("at %d: got kind %d, %d bytes; want data, the last %d bytes", off, fr.Kind, len(fr.Payload), back)
		}
	}
}

func TestErrorFrames(t *testing.T) {
	f := newFixture(t, nil)
	x := f.xfer["dev-1"]
	f.xfer["paused"] = Transfer{Job: "r1-2", ID: 7, SHA256: x.SHA256, Size: x.Size, ChunkMax: x.ChunkMax, Paused: true}
	f.xfer["huge"] = Transfer{Job: "r1-3", ID: 8, SHA256: x.SHA256, Size: 1 << 40, ChunkMax: x.ChunkMax}
	f.xfer["nojob"] = Transfer{ID: 9, SHA256: x.SHA256, Size: x.Size}
	f.xfer["missing"] = Transfer{Job: "r1-4", ID: 10, SHA256: "00", Size: x.Size}
	f.xfer["nochunk"] = Transfer{Job: "r1-5", ID: 11, SHA256: x.SHA256, Size: x.Size}
	f.xfer["bigchunk"] = Transfer{Job: "r1-6", ID: 12, SHA256: x.SHA256, Size: x.Size, ChunkMax: 1 << 20}
	tests := []struct {
		name     string
		device   string
		req      []byte
		transfer uint32
		offset   uint32
		code     string
	}{
		{"unknown device", "dev-2", request("r1-1", 0, 1024), 0, 0, protocol.ErrCodeNoJob},
		{"other job", "dev-1", request("r0-1", 4096, 1024), x.ID, 4096, protocol.ErrCodeNoJob},
		{"empty job", "dev-1", request("", 0, 1024), x.ID, 0, protocol.ErrCodeNoJob},
		{"transfer without job", "nojob", request("", 0, 1024), 9, 0, protocol.ErrCodeNoJob},
		{"negative offset", "dev-1", request("r1-1", -1, 1024), x.ID, 0, protocol.ErrCodeRange},
		{"offset at size", "dev-1", request("r1-1", x.Size, 1024), x.ID, uint32(x.Size), protocol.ErrCodeRange},
		{"offset past size", "dev-1", request("r1-1", x.Size+5, 1024), x.ID, uint32(x.Size + 5), protocol.ErrCodeRange},
		{"zero length", "dev-1", request("r1-1", 0, 0), x.ID, 0, protocol.ErrCodeRange},
		{"negative length", "dev-1", request("r1-1", 0, -5), x.ID, 0, protocol.ErrCodeRange},
		{"above chunk max", "dev-1", request("r1-1", 0, x.ChunkMax+1), x.ID, 0, protocol.ErrCodeRange},
		{"offset beyond 32 bits", "huge", request("r1-3", 1<<33, 1024), 8, 0, protocol.ErrCodeRange},
		{"default chunk max", "nochunk", request("r1-5", 0, protocol.DefaultChunkSize+1), 11, 0, protocol.ErrCodeRange},
		{"chunk max capped", "bigchunk", request("r1-6", 0, protocol.MaxChunkSize+1), 12, 0, protocol.ErrCodeRange},
		{"paused", "paused", request("r1-2", 2048, 1024), 7, 2048, protocol.ErrCodeBusy},
		{"missing artifact", "missing", request("r1-4", 0, 1024), 10, 0, protocol.ErrCodeInternal},
	}
	for _, tt := range tests {
		t.Run(tt.name, func(t *testing.T) {
			before := f.srv.Stats().ErrorFrames[tt.code]
			fr := f.one(t, tt.device, tt.req)
			if fr.Kind != protocol.FrameError || string(fr.Payload) != tt.code || fr.Transfer != tt.transfer || fr.Offset != tt.offset {
				t.Fatalf("got kind %d %q transfer %d offset %d, want error %q transfer %d offset %d",
					fr.Kind, fr.Payload, fr.Transfer, fr.Offset, tt.code, tt.transfer, tt.offset)
			}
			if got := f.srv.Stats().ErrorFrames[tt.code]; got != before+1 {
				t.Fatalf("got %d %q frames counted, want %d", got, tt.code, before+1)
			}
		})
	}
	if st := f.srv.Stats(); st.Chunks != 0 || st.Inflight != 0 {
		t.Fatalf("got %d chunks served and %d bytes in flight, want none", st.Chunks, st.Inflight)
	}
}

func TestReadFailures(t *testing.T) {
	for _, tt := range []struct {
		name string
		set  func(*artifacts)
	}{
		{"error", func(a *artifacts) { a.fail = errors.New("disk on fire") }},
		{"short read", func(a *artifacts) { a.short = true }},
	} {
		t.Run(tt.name, func(t *testing.T) {
			f := newFixture(t, nil)
			tt.set(f.arts)
			fr := f.one(t, "dev-1", request("r1-1", 0, 4096))
			if fr.Kind != protocol.FrameError || string(fr.Payload) != protocol.ErrCodeInternal {
				t.Fatalf("got kind %d %q, want error %q", fr.Kind, fr.Payload, protocol.ErrCodeInternal)
			}
			if got := f.srv.Stats().Inflight; got != 0 {
				t.Fatalf("got %d bytes in flight after a failed read, want 0", got)
			}
		})
	}
}

// EOF with a full read is what io.ReaderAt may return at the end of the input.
type eofReader struct{ data []byte }

func (r eofReader) ReadAt(_ string, p []byte, off int64) (int, error) {
	n := copy(p, r.data[off:])
	return n, io.EOF
}

func TestReadAtEOFIsServed(t *testing.T) {
	f := newFixture(t, nil)
	f.srv.opts.Artifacts = eofReader{f.im.data}
	fr := f.one(t, "dev-1", request("r1-1", 0, 1024))
	if fr.Kind != protocol.FrameData || !bytes.Equal(fr.Payload, f.im.data[:1024]) {
		t.Fatalf("got kind %d %q, want the first KiB", fr.Kind, fr.Payload[:min(len(fr.Payload), 16)])
	}
}

func TestBadRequestsAreDropped(t *testing.T) {
	f := newFixture(t, nil)
	bad := [][]byte{
		nil, {}, []byte("{"), []byte("[]"), []byte(`"job"`), []byte("12"),
		[]byte(`{"job":1}`), []byte(`{"off":"0"}`), []byte(`{"len":1e99}`), []byte(`{"off":9223372036854775808}`),
		[]byte(`{"job":"r1-1","off":0,"len":1024`), []byte("\xff\xfe\x00"),
		append([]byte(`{"job":"r1-1","off":0,"len":1024,"pad":"`), append(bytes.Repeat([]byte("x"), maxRequestSize), '"', '}')...),
	}
	for i, p := range bad {
		t.Run(fmt.Sprint(i), func(t *testing.T) {
			before := f.srv.Stats().BadRequests
			f.srv.Handle("dev-1", p)
			if msgs := f.pub.take(); len(msgs) != 0 {
				t.Fatalf("%q: got %d messages, want none", p, len(msgs))
			}
			if got := f.srv.Stats().BadRequests; got != before+1 {
				t.Fatalf("%q: got %d bad requests, want %d", p, got, before+1)
			}
		})
	}
	// Valid JSON that decodes to an empty request is a request for no job.
	fr := f.one(t, "dev-1", []byte("null"))
	if fr.Kind != protocol.FrameError || string(fr.Payload) != protocol.ErrCodeNoJob {
		t.Fatalf("null: got kind %d %q, want no-job", fr.Kind, fr.Payload)
	}
}

func FuzzHandle(f *testing.F) {
	for _, s := range []string{`{"job":"r1-1","off":0,"len":1024}`, `{"job":"r1-1","off":296755,"len":65536}`, `{"off":-1}`, `null`, `{`} {
		f.Add(s)
	}
	im := loadImage(f, "pybricks-primehub-7.28.0.bin")
	srv, err := New(Options{
		Lookup: func(string) (Transfer, bool) {
			return Transfer{Job: "r1-1", ID: 1, SHA256: im.sha, Size: int64(len(im.data)), ChunkMax: 64 << 10}, true
		},
		Artifacts: &artifacts{images: map[string]*image{im.sha: im}},
		Publisher: &recorder{},
		Logger:    slog.New(slog.DiscardHandler),
	})
	if err != nil {
		f.Fatal(err)
	}
	f.Fuzz(func(t *testing.T, s string) {
		srv.Handle("dev-1", []byte(s))
	})
}

func TestPublishFailureIsCountedAndRefunded(t *testing.T) {
	f := newFixture(t, nil)
	f.pub.fail = errors.New("broker closed")
	f.srv.Handle("dev-1", request("r1-1", 0, 4096))
	f.srv.Handle("dev-2", request("r1-1", 0, 4096)) // an error frame that cannot go out either
	st := f.srv.Stats()
	if st.Dropped != 2 || st.Chunks != 0 || st.Inflight != 0 {
		t.Fatalf("got dropped %d, chunks %d, in flight %d; want 2, 0, 0", st.Dropped, st.Chunks, st.Inflight)
	}
}

// clock is a fake time source for the ledger.
type clock struct {
	mu sync.Mutex
	t  time.Time
}

func (c *clock) now() time.Time { c.mu.Lock(); defer c.mu.Unlock(); return c.t }
func (c *clock) add(d time.Duration) {
	c.mu.Lock()
	defer c.mu.Unlock()
	c.t = c.t.Add(d)
}

func TestLimitsAnswerBusy(t *testing.T) {
	const chunk = 16 << 10
	const frame = chunk + protocol.FrameHeaderSize
	const rate = 32 << 10 // bytes per second: a frame takes 0.5 s, too long to pace
	f := newFixture(t, func(o *Options) {
		o.MaxInflightPerDevice = 2 * frame
		o.MaxInflightTotal = 3 * frame
		o.DeviceRate = rate
	})
	clk := &clock{t: time.Unix(1e9, 0)}
	f.srv.led = newLedger(f.srv.opts.MaxInflightPerDevice, f.srv.opts.MaxInflightTotal, rate, clk.now)
	x := f.xfer["dev-1"]
	f.xfer["dev-2"] = x
	f.xfer["dev-3"] = x

	type step struct {
		device string
		after  time.Duration // clock advance before the request
		want   string        // "" for data
	}
	frameTime := time.Duration(frame)*time.Second/rate + time.Microsecond
	steps := []step{
		{"dev-1", 0, ""},
		{"dev-1", 0, ""},
		{"dev-1", 0, protocol.ErrCodeBusy}, // per device: two frames
		{"dev-2", 0, ""},
		{"dev-2", 0, protocol.ErrCodeBusy}, // total: three frames
		{"dev-3", 0, protocol.ErrCodeBusy},
		{"dev-1", frameTime, ""}, // one frame drained from each device, so the total has room for one
		{"dev-3", 0, ""},
		{"dev-3", 0, protocol.ErrCodeBusy},
		{"dev-3", time.Hour, ""}, // everything drained
		{"dev-1", 0, ""},
		{"dev-2", 0, ""},
	}
	for i, s := range steps {
		clk.add(s.after)
		fr := f.one(t, s.device, request(x.Job, int64(i)*chunk, chunk))
		got := ""
		if fr.Kind == protocol.FrameError {
			got = string(fr.Payload)
		}
		if got != s.want {
			t.Fatalf("step %d (%s): got %q, want %q", i, s.device, got, s.want)
		}
	}
	st := f.srv.Stats()
	if st.BusyDevice != 1 || st.BusyTotal != 3 || st.ErrorFrames[protocol.ErrCodeBusy] != 4 {
		t.Fatalf("got busy device %d, total %d, frames %d; want 1, 3, 4", st.BusyDevice, st.BusyTotal, st.ErrorFrames[protocol.ErrCodeBusy])
	}
	if want := int64(3 * frame); st.Inflight != want {
		t.Fatalf("got %d bytes in flight, want %d", st.Inflight, want)
	}
	clk.add(time.Hour)
	if st := f.srv.Stats(); st.Inflight != 0 || len(f.srv.led.devices) != 0 {
		t.Fatalf("after an hour: got %d bytes in flight and %d accounts, want none", st.Inflight, len(f.srv.led.devices))
	}
}

func TestLedgerDrainsAtDeviceRate(t *testing.T) {
	clk := &clock{t: time.Unix(1e9, 0)}
	l := newLedger(1000, 1500, 1000, clk.now) // 1000 bytes per second: 1 ms per byte
	for i, tt := range []struct {
		device string
		after  time.Duration
		n      int64
		want   verdict
		delay  time.Duration
	}{
		{"a", 0, 1000, admitted, 0},
		{"a", 0, 1, admitted, time.Millisecond},                        // paced: fits once a byte drained
		{"a", 0, 300, overDevice, 0},                                   // would wait 301 ms, above paceMax
		{"a", 100 * time.Millisecond, 100, admitted, time.Millisecond}, // 100 bytes drained
		{"a", 2 * time.Second, 1000, admitted, 0},                      // empty again
		{"b", 0, 600, overTotal, 0},
		{"b", 0, 500, admitted, 0},
	} {
		clk.add(tt.after)
		v, d := l.reserve(tt.device, tt.n)
		if v != tt.want || d != tt.delay {
			t.Fatalf("step %d: after %v, reserve %d: got %v, %v; want %v, %v", i, tt.after, tt.n, v, d, tt.want, tt.delay)
		}
	}
	if got := l.devices["a"].queued; got != 2 {
		t.Fatalf("got %d frames held, want 2", got)
	}
	l.sent("a")
	l.sent("a")
	l.refund("a", 1000)
	l.refund("b", 500)
	if got := l.inflight(); got != 0 {
		t.Fatalf("after refund: got %d in flight, want 0", got)
	}
	if len(l.devices) != 0 {
		t.Fatalf("got %d accounts, want the empty ones forgotten", len(l.devices))
	}
}

// fakeTimers replaces time.AfterFunc: the test fires what was scheduled.
type fakeTimers struct {
	mu      sync.Mutex
	pending []*fakeTimer
}

type fakeTimer struct {
	d       time.Duration
	f       func()
	stopped bool
}

func (ft *fakeTimer) Stop() bool {
	if ft.stopped {
		return false
	}
	ft.stopped = true
	return true
}

func (ts *fakeTimers) after(d time.Duration, f func()) timer {
	ts.mu.Lock()
	defer ts.mu.Unlock()
	ft := &fakeTimer{d: d, f: f}
	ts.pending = append(ts.pending, ft)
	return ft
}

// fire runs every scheduled function, stopped ones too (a timer that fired as it was stopped).
func (ts *fakeTimers) fire() int {
	ts.mu.Lock()
	p := ts.pending
	ts.pending = nil
	ts.mu.Unlock()
	for _, ft := range p {
		ft.f()
	}
	return len(p)
}

func TestFastDeviceIsPacedNotRefused(t *testing.T) {
	const chunk = 16 << 10
	const frame = chunk + protocol.FrameHeaderSize
	const rate = 4 << 20
	f := newFixture(t, func(o *Options) {
		o.MaxInflightPerDevice = 2 * frame
		o.DeviceRate = rate
	})
	clk := &clock{t: time.Unix(1e9, 0)}
	f.srv.led = newLedger(f.srv.opts.MaxInflightPerDevice, f.srv.opts.MaxInflightTotal, rate, clk.now)
	timers := &fakeTimers{}
	f.srv.after = timers.after
	x := f.xfer["dev-1"]

	// Two frames fit at once; the next maxQueued wait their turn; one more is refused.
	for i := range 2 + maxQueued + 1 {
		f.srv.Handle("dev-1", request(x.Job, int64(i)*chunk, chunk))
	}
	msgs := f.pub.take()
	if len(msgs) != 3 {
		t.Fatalf("got %d frames at once, want 2 data and 1 busy", len(msgs))
	}
	if fr, _ := protocol.ParseFrame(msgs[2].payload); fr.Kind != protocol.FrameError || string(fr.Payload) != protocol.ErrCodeBusy || fr.Offset != (2+maxQueued)*chunk {
		t.Fatalf("got kind %d %q at %d, want busy at %d", fr.Kind, fr.Payload, fr.Offset, (2+maxQueued)*chunk)
	}
	frameTime := time.Duration(frame) * time.Second / rate
	for i, ft := range timers.pending {
		if want := time.Duration(i+1) * frameTime; ft.d < want-time.Microsecond || ft.d > want+time.Microsecond {
			t.Fatalf("paced frame %d: got delay %v, want %v", i, ft.d, want)
		}
	}
	if st := f.srv.Stats(); st.Paced != maxQueued || st.BusyDevice != 1 {
		t.Fatalf("got paced %d, busy %d; want %d, 1", st.Paced, st.BusyDevice, maxQueued)
	}
	if n := timers.fire(); n != maxQueued {
		t.Fatalf("fired %d timers, want %d", n, maxQueued)
	}
	for i, m := range f.pub.take() {
		fr, err := protocol.ParseFrame(m.payload)
		off := (2 + i) * chunk
		if err != nil || fr.Kind != protocol.FrameData || int(fr.Offset) != off || !bytes.Equal(fr.Payload, f.im.data[off:off+chunk]) {
			t.Fatalf("paced frame %d: got kind %d offset %d (%v), want data at %d", i, fr.Kind, fr.Offset, err, off)
		}
	}
	if got := f.srv.led.devices["dev-1"].queued; got != 0 {
		t.Fatalf("got %d frames held after they were sent, want 0", got)
	}

	// Close drops what is still held, and a timer that fires anyway sends nothing.
	clk.add(time.Hour)
	for i := range 3 {
		f.srv.Handle("dev-1", request(x.Job, int64(i)*chunk, chunk))
	}
	f.pub.take()
	held := timers.pending
	if err := f.srv.Close(context.Background()); err != nil {
		t.Fatal(err)
	}
	if len(held) != 1 || !held[0].stopped {
		t.Fatalf("got %d held frames, stopped %v; want 1 stopped", len(held), len(held) == 1 && held[0].stopped)
	}
	timers.fire()
	if msgs := f.pub.take(); len(msgs) != 0 {
		t.Fatalf("after Close: got %d frames, want none", len(msgs))
	}
}

func TestCloseWaitsForHandle(t *testing.T) {
	f := newFixture(t, nil)
	f.pub.hold = make(chan struct{})
	f.pub.in = make(chan struct{}, 1)
	done := make(chan struct{})
	go func() {
		defer close(done)
		f.srv.Handle("dev-1", request("r1-1", 0, 1024))
	}()
	<-f.pub.in // Handle is inside Publish

	ctx, cancel := context.WithTimeout(context.Background(), 20*time.Millisecond)
	defer cancel()
	if err := f.srv.Close(ctx); !errors.Is(err, context.DeadlineExceeded) {
		t.Fatalf("Close with a Handle in progress: got %v, want DeadlineExceeded", err)
	}
	close(f.pub.hold)
	<-done
	if err := f.srv.Close(context.Background()); err != nil {
		t.Fatalf("Close: %v", err)
	}
	f.pub.take()
	f.pub.in = nil
	f.srv.Handle("dev-1", request("r1-1", 0, 1024))
	if msgs := f.pub.take(); len(msgs) != 0 {
		t.Fatalf("after Close: got %d messages, want none", len(msgs))
	}
	if err := f.srv.Close(context.Background()); err != nil {
		t.Fatalf("second Close: %v", err)
	}
}

func TestNewRefusesBadOptions(t *testing.T) {
	ok := Options{
		Lookup:    func(string) (Transfer, bool) { return Transfer{}, false },
		Artifacts: &artifacts{},
		Publisher: &recorder{},
	}
	for _, tt := range []struct {
		name string
		edit func(*Options)
	}{
		{"no lookup", func(o *Options) { o.Lookup = nil }},
		{"no artifacts", func(o *Options) { o.Artifacts = nil }},
		{"no publisher", func(o *Options) { o.Publisher = nil }},
		{"negative rate", func(o *Options) { o.DeviceRate = -1 }},
		{"per device below a frame", func(o *Options) { o.MaxInflightPerDevice = 100 }},
		{"total below per device", func(o *Options) { o.MaxInflightPerDevice = 1 << 20; o.MaxInflightTotal = 1 << 19 }},
	} {
		t.Run(tt.name, func(t *testing.T) {
			o := ok
			tt.edit(&o)
			if _, err := New(o); !errors.Is(err, ErrBadOptions) {
				t.Fatalf("got %v, want ErrBadOptions", err)
			}
		})
	}
	if _, err := New(ok); err != nil {
		t.Fatalf("defaults: got %v, want nil", err)
	}
}

func TestConcurrentDevices(t *testing.T) {
	f := newFixture(t, nil)
	x := f.xfer["dev-1"]
	devices := make([]string, 8)
	for i := range devices {
		devices[i] = fmt.Sprintf("dev-c%d", i)
		f.xfer[devices[i]] = x
	}
	var wg sync.WaitGroup
	for _, d := range devices {
		wg.Go(func() {
			for off := int64(0); off < x.Size; off += int64(x.ChunkMax) {
				f.srv.Handle(d, request(x.Job, off, x.ChunkMax))
			}
		})
	}
	wg.Wait()
	got := make(map[string][]byte)
	for _, m := range f.pub.take() {
		fr, err := protocol.ParseFrame(m.payload)
		if err != nil {
			t.Fatal(err)
		}
		if fr.Kind != protocol.FrameData {
			continue // busy: eight devices asking at once may exceed the estimate
		}
		d, _, _ := protocol.ParseTopic(m.topic)
		if !bytes.Equal(fr.Payload, f.im.data[fr.Offset:int(fr.Offset)+len(fr.Payload)]) {
			t.Fatalf("%s at %d: payload differs from the image", d, fr.Offset)
		}
		got[d] = append(got[d], 1)
	}
	if len(got) != len(devices) {
		t.Fatalf("got frames for %d devices, want %d", len(got), len(devices))
	}
}

// discard is a Publisher that drops everything, to measure the server alone.
type discard struct{}

func (discard) Publish(string, []byte, byte) error { return nil }

// BenchmarkHandle measures one request from JSON to a published frame, the artifact read from
// the page cache: the server's own share of a chunk's cost, without broker or network.
func BenchmarkHandle(b *testing.B) {
	im := loadImage(b, "pybricks-primehub-7.28.0.bin")
	for _, chunk := range []int{protocol.MinChunkSize, protocol.DefaultChunkSize, protocol.MaxChunkSize} {
		b.Run(fmt.Sprintf("%dKiB", chunk>>10), func(b *testing.B) {
			x := Transfer{Job: "r1-1", ID: 1, SHA256: im.sha, Size: int64(len(im.data)), ChunkMax: chunk}
			srv, err := New(Options{
				Lookup:     func(string) (Transfer, bool) { return x, true },
				Artifacts:  &artifacts{images: map[string]*image{im.sha: im}},
				Publisher:  discard{},
				Logger:     slog.New(slog.DiscardHandler),
				DeviceRate: 1 << 40,
			})
			if err != nil {
				b.Fatal(err)
			}
			reqs := make([][]byte, 0, x.Size/int64(chunk)+1)
			for off := int64(0); off+int64(chunk) <= x.Size; off += int64(chunk) {
				reqs = append(reqs, request(x.Job, off, chunk))
			}
			b.SetBytes(int64(chunk))
			b.ReportAllocs()
			for i := 0; b.Loop(); i++ {
				srv.Handle("dev-1", reqs[i%len(reqs)])
			}
			if st := srv.Stats(); st.Chunks == 0 || st.BusyDevice+st.BusyTotal != 0 {
				b.Fatalf("got %+v, want chunks and no busy answers", st)
			}
		})
	}
}
