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
	"os"
	"path/filepath"
	"sync"
	"sync/atomic"
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

type sent struct {
	topic   string
	payload []byte
}

// recorder is a Sender that copies what it is given, as a write to a connection does, so a
// server that reused a frame's buffer before Send returned would show.
type recorder struct {
	mu   sync.Mutex
	msgs []sent
	fail error
	hold chan struct{} // when set, Send of a data frame waits for it to be closed
	in   chan string   // when set, Send of a data frame first reports its topic on it
}

func (r *recorder) Send(topic string, payload []byte) error {
	if isData(payload) {
		if r.in != nil {
			r.in <- topic
		}
		if r.hold != nil {
			<-r.hold
		}
	}
	if r.fail != nil {
		return r.fail
	}
	r.mu.Lock()
	defer r.mu.Unlock()
	r.msgs = append(r.msgs, sent{topic, bytes.Clone(payload)})
	return nil
}

func (r *recorder) take() []sent {
	r.mu.Lock()
	defer r.mu.Unlock()
	m := r.msgs
	r.msgs = nil
	return m
}

func isData(frame []byte) bool { return len(frame) > 1 && frame[1] == protocol.FrameData }

type fixture struct {
	srv  *Server
	pub  *recorder
	arts *artifacts
	im   *image
	xfer map[string]Transfer // read by Lookup: set up before Handle runs on other goroutines
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
		Sender:    f.pub,
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

// one handles a request and returns the single frame it sent.
func (f *fixture) one(t *testing.T, device string, payload []byte) protocol.Frame {
	t.Helper()
	f.srv.Handle(device, payload)
	msgs := f.pub.take()
	if len(msgs) != 1 {
		t.Fatalf("got %d messages, want 1", len(msgs))
	}
	return parse(t, device, msgs[0])
}

func parse(t *testing.T, device string, m sent) protocol.Frame {
	t.Helper()
	if want := protocol.Topic(device, protocol.SuffixChunk); m.topic != want {
		t.Fatalf("sent on %q, want %q", m.topic, want)
	}
	fr, err := protocol.ParseFrame(m.payload)
	if err != nil {
		t.Fatalf("ParseFrame: %v", err)
	}
	return fr
}

// code is a frame's error code, "" for data.
func code(fr protocol.Frame) string {
	if fr.Kind == protocol.FrameError {
		return string(fr.Payload)
	}
	return ""
}

// within waits for ch to be closed or to deliver, failing the test after a deadline instead
// of hanging it.
func within[T any](t *testing.T, ch <-chan T, what string) T {
	t.Helper()
	select {
	case v := <-ch:
		return v
	case <-time.After(10 * time.Second):
		t.Fatalf("%s: not within 10 s", what)
	}
	var zero T
	return zero
}

func TestDownloadMatchesImage(t *testing.T) {
	for _, chunk := range []int{protocol.MinChunkSize, 4 << 10, 16 << 10, protocol.MaxChunkSize} {
		t.Run(fmt.Sprintf("%dKiB", chunk>>10), func(t *testing.T) {
			f := newFixture(t, nil)
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
			if st.Chunks != uint64(wantChunks) || st.Bytes != uint64(x.Size) || st.Requests != uint64(wantChunks) || st.Inflight != 0 {
				t.Fatalf("got stats %+v, want %d chunks of %d bytes and none in flight", st, wantChunks, x.Size)
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
	if st := f.srv.Stats(); st.Chunks != 0 || st.Inflight != 0 || st.BusyTotal != 0 || st.BusyRate != 0 {
		t.Fatalf("got %d chunks served, %d bytes in flight, busy %d (total) %d (rate); want none", st.Chunks, st.Inflight, st.BusyTotal, st.BusyRate)
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
			fr := f.one(t, "dev-1", request("r1-1", 4096, 4096))
			if fr.Kind != protocol.FrameError || string(fr.Payload) != protocol.ErrCodeInternal || fr.Offset != 4096 {
				t.Fatalf("got kind %d %q at %d, want error %q at 4096", fr.Kind, fr.Payload, fr.Offset, protocol.ErrCodeInternal)
			}
			if st := f.srv.Stats(); st.Inflight != 0 || st.Chunks != 0 || st.ErrorFrames[protocol.ErrCodeInternal] != 1 {
				t.Fatalf("got %d bytes in flight, %d chunks, %d internal errors after a failed read; want 0, 0, 1",
					st.Inflight, st.Chunks, st.ErrorFrames[protocol.ErrCodeInternal])
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

// counter is a Sender that keeps nothing: it counts messages.
type counter struct {
	mu sync.Mutex
	n  int
}

func (c *counter) Send(string, []byte) error {
	c.mu.Lock()
	defer c.mu.Unlock()
	c.n++
	return nil
}

func (c *counter) count() int {
	c.mu.Lock()
	defer c.mu.Unlock()
	return c.n
}

func FuzzHandle(f *testing.F) {
	for _, s := range []string{`{"job":"r1-1","off":0,"len":1024}`, `{"job":"r1-1","off":296755,"len":65536}`, `{"off":-1}`, `null`, `{`} {
		f.Add(s)
	}
	im := loadImage(f, "pybricks-primehub-7.28.0.bin")
	out := &counter{}
	srv, err := New(Options{
		Lookup: func(string) (Transfer, bool) {
			return Transfer{Job: "r1-1", ID: 1, SHA256: im.sha, Size: int64(len(im.data)), ChunkMax: 64 << 10}, true
		},
		Artifacts:  &artifacts{images: map[string]*image{im.sha: im}},
		Sender:     out,
		Logger:     slog.New(slog.DiscardHandler),
		DeviceRate: 1 << 40, // the limiter's arithmetic too, without waits
	})
	if err != nil {
		f.Fatal(err)
	}
	f.Fuzz(func(t *testing.T, s string) {
		before := out.count()
		srv.Handle("dev-1", []byte(s))
		if n := out.count() - before; n > 1 {
			t.Fatalf("%q: got %d messages, want at most 1", s, n)
		}
		if got := srv.Stats().Inflight; got != 0 {
			t.Fatalf("%q: got %d bytes in flight after Handle, want 0", s, got)
		}
	})
}

func TestSendFailureIsCounted(t *testing.T) {
	f := newFixture(t, nil)
	f.pub.fail = errors.New("write timeout")
	f.srv.Handle("dev-1", request("r1-1", 0, 4096))
	f.srv.Handle("dev-2", request("r1-1", 0, 4096)) // an error frame that cannot go out either
	st := f.srv.Stats()
	if st.Dropped != 2 || st.Chunks != 0 || st.Bytes != 0 || st.Inflight != 0 {
		t.Fatalf("got dropped %d, chunks %d, bytes %d, in flight %d; want 2, 0, 0, 0", st.Dropped, st.Chunks, st.Bytes, st.Inflight)
	}
}

// TestMaxInflight holds devices' frames in Send and checks that MaxInflight is an exact bound
// on the frame bytes held, and that what goes over it is answered "busy".
func TestMaxInflight(t *testing.T) {
	const frame = protocol.FrameHeaderSize + protocol.MaxChunkSize
	const limit = 3*frame + 100
	f := newFixture(t, func(o *Options) { o.MaxInflight = limit })
	x := f.xfer["dev-1"]
	x.ChunkMax = protocol.MaxChunkSize
	for _, d := range []string{"big-0", "big-1", "big-2", "small", "tiny"} {
		f.xfer[d] = x
	}
	f.pub.hold = make(chan struct{})
	f.pub.in = make(chan string)
	var wg sync.WaitGroup
	// handle starts a request and returns the topic of the data frame it is sending, or ""
	// when it returned without one.
	handle := func(device string, off int64, n int) string {
		t.Helper()
		done := make(chan struct{})
		wg.Go(func() {
			defer close(done)
			f.srv.Handle(device, request(x.Job, off, n))
		})
		select {
		case topic := <-f.pub.in:
			return topic
		case <-done:
			return ""
		case <-time.After(10 * time.Second):
			t.Fatalf("%s: Handle neither sent a frame nor returned within 10 s", device)
			return ""
		}
	}
	start := func(device string, off int64, n int) {
		t.Helper()
		got, want := handle(device, off, n), protocol.Topic(device, protocol.SuffixChunk)
		if got == "" {
			answer := ""
			if msgs := f.pub.take(); len(msgs) == 1 {
				answer = code(parse(t, device, msgs[0]))
			}
			t.Fatalf("%s: Handle returned with answer %q, want a data frame being sent", device, answer)
		}
		if got != want {
			t.Fatalf("%s: got a data frame on %q, want one on %q", device, got, want)
		}
	}
	released := false
	t.Cleanup(func() { // after a failure: let every Handle finish
		if !released {
			close(f.pub.hold)
		}
		idle := make(chan struct{})
		go func() { wg.Wait(); close(idle) }()
		for {
			select {
			case <-f.pub.in:
			case <-idle:
				return
			}
		}
	})
	inflight := func(want int64) {
		t.Helper()
		if got := f.srv.Stats().Inflight; got != want {
			t.Fatalf("got %d bytes in flight, want %d", got, want)
		}
	}
	busy := func(device string, off int64, n int, wantTotal uint64) {
		t.Helper()
		before := f.srv.Stats().Inflight
		if topic := handle(device, off, n); topic != "" {
			t.Fatalf("%s: got a data frame on %q, want busy", device, topic)
		}
		msgs := f.pub.take()
		if len(msgs) != 1 {
			t.Fatalf("%s: got %d messages, want 1", device, len(msgs))
		}
		fr := parse(t, device, msgs[0])
		if code(fr) != protocol.ErrCodeBusy || int64(fr.Offset) != off || fr.Transfer != x.ID {
			t.Fatalf("%s: got kind %d %q at %d, want busy at %d", device, fr.Kind, fr.Payload, fr.Offset, off)
		}
		if st := f.srv.Stats(); st.BusyTotal != wantTotal || st.ErrorFrames[protocol.ErrCodeBusy] != wantTotal || st.Inflight != before {
			t.Fatalf("%s: got busy %d (%d frames), %d bytes in flight; want %d, %d", device, st.BusyTotal, st.ErrorFrames[protocol.ErrCodeBusy], st.Inflight, wantTotal, before)
		}
	}

	for i := range 3 {
		start(fmt.Sprint("big-", i), int64(i)*protocol.MaxChunkSize, protocol.MaxChunkSize)
		inflight(int64(i+1) * frame)
	}
	busy("small", 1000, 81, 1) // a frame of 101 bytes: one over
	start("small", 1000, 80)   // exactly the 100 left
	inflight(limit)
	busy("tiny", 2000, 1, 2)

	close(f.pub.hold)
	released = true
	wg.Wait()
	inflight(0)
	got := make(map[string]protocol.Frame)
	for _, m := range f.pub.take() {
		d, _, _ := protocol.ParseTopic(m.topic)
		got[d] = parse(t, d, m)
	}
	for d, want := range map[string][2]int{"big-0": {0, protocol.MaxChunkSize}, "big-1": {protocol.MaxChunkSize, protocol.MaxChunkSize}, "big-2": {2 * protocol.MaxChunkSize, protocol.MaxChunkSize}, "small": {1000, 80}} {
		fr, ok := got[d]
		if !ok || fr.Kind != protocol.FrameData || int(fr.Offset) != want[0] || !bytes.Equal(fr.Payload, f.im.data[want[0]:want[0]+want[1]]) {
			t.Errorf("%s: got kind %d at %d, %d bytes (sent %v); want data at %d, %d bytes of the image", d, fr.Kind, fr.Offset, len(fr.Payload), ok, want[0], want[1])
		}
	}
	if len(got) != 4 {
		t.Errorf("got frames for %d devices, want 4", len(got))
	}

	// With the frames written there is room again.
	f.pub.in = nil
	if fr := f.one(t, "tiny", request(x.Job, 2000, 1)); fr.Kind != protocol.FrameData {
		t.Fatalf("after release: got kind %d %q, want data", fr.Kind, fr.Payload)
	}
	if st := f.srv.Stats(); st.BusyTotal != 2 || st.Chunks != 5 || st.Inflight != 0 {
		t.Fatalf("got busy %d, chunks %d, in flight %d; want 2, 5, 0", st.BusyTotal, st.Chunks, st.Inflight)
	}
}

// clock is a fake time source for the rate limiter.
type clock struct {
	mu sync.Mutex
	t  time.Time
}

func newClock() *clock { return &clock{t: time.Unix(1e9, 0)} }

func (c *clock) now() time.Time { c.mu.Lock(); defer c.mu.Unlock(); return c.t }
func (c *clock) add(d time.Duration) {
	c.mu.Lock()
	defer c.mu.Unlock()
	c.t = c.t.Add(d)
}

// pauses replaces Server.pause: it records the waits asked for and, when advance is set,
// lets that much fake time pass, as a device that waits its turn sees.
type pauses struct {
	clk     *clock
	advance bool

	mu    sync.Mutex
	asked []time.Duration
}

func (p *pauses) pause(d time.Duration) bool {
	p.mu.Lock()
	p.asked = append(p.asked, d)
	p.mu.Unlock()
	if p.advance {
		p.clk.add(d)
	}
	return true
}

func (p *pauses) take() []time.Duration {
	p.mu.Lock()
	defer p.mu.Unlock()
	a := p.asked
	p.asked = nil
	return a
}

// Capped devices below: 100,000 bytes per second, so that a frame of 10,000 bytes (9,980 of
// payload) is 100 ms exactly, and a burst of seven such frames.
const (
	capRate    = 100_000
	capBurst   = 70_000
	capPayload = 10_000 - protocol.FrameHeaderSize
	capFrame   = 100 * time.Millisecond
)

// newCapped returns a fixture with DeviceRate on a fake clock and s.pause replaced.
func newCapped(t *testing.T, advance bool) (*fixture, *clock, *pauses) {
	t.Helper()
	f := newFixture(t, func(o *Options) { o.DeviceRate = capRate; o.DeviceBurst = capBurst })
	clk := newClock()
	f.srv.rate = newRateLimiter(capRate, capBurst, clk.now)
	p := &pauses{clk: clk, advance: advance}
	f.srv.pause = p.pause
	return f, clk, p
}

func TestFastDeviceIsPacedThenBusy(t *testing.T) {
	type step struct {
		after time.Duration // fake time passing before the request
		want  string        // "" for data
		wait  time.Duration // pause asked for; 0: none
	}
	for _, tt := range []struct {
		name    string
		advance bool
		steps   []step
	}{
		{
			// Requests arriving faster than the device waits (time stands still): each wait is
			// a frame longer than the last until one would be above 250 ms.
			name: "requests at once",
			steps: []step{
				{0, "", 0}, {0, "", 0}, {0, "", 0}, {0, "", 0}, {0, "", 0}, {0, "", 0}, {0, "", 0}, // the burst
				{0, "", capFrame},
				{0, "", 2 * capFrame},
				{0, protocol.ErrCodeBusy, 0}, // would wait 300 ms
				{0, protocol.ErrCodeBusy, 0}, // the refused one took nothing: still 300 ms
				{capFrame, "", 2 * capFrame},
				{time.Hour, "", 0},
			},
		},
		{
			// A device that waits its turn is paced a frame at a time and never refused.
			name:    "device waits its turn",
			advance: true,
			steps: func() []step {
				s := make([]step, 7, 29) // 29 frames fit in the image
				for range 22 {
					s = append(s, step{0, "", capFrame})
				}
				return s
			}(),
		},
	} {
		t.Run(tt.name, func(t *testing.T) {
			f, clk, p := newCapped(t, tt.advance)
			x := f.xfer["dev-1"]
			var paced, busy, chunks uint64
			for i, s := range tt.steps {
				clk.add(s.after)
				off := int64(i) * capPayload
				fr := f.one(t, "dev-1", request(x.Job, off, capPayload))
				if got := code(fr); got != s.want || int64(fr.Offset) != off {
					t.Fatalf("step %d: got %q at %d, want %q at %d", i, got, fr.Offset, s.want, off)
				}
				if s.want == "" && !bytes.Equal(fr.Payload, f.im.data[off:off+capPayload]) {
					t.Fatalf("step %d: payload differs from the image", i)
				}
				var want []time.Duration
				if s.wait > 0 {
					want = []time.Duration{s.wait}
					paced++
				}
				if s.want == protocol.ErrCodeBusy {
					busy++
				} else {
					chunks++
				}
				if got := p.take(); fmt.Sprint(got) != fmt.Sprint(want) {
					t.Fatalf("step %d: got pauses %v, want %v", i, got, want)
				}
			}
			st := f.srv.Stats()
			if st.Paced != paced || st.BusyRate != busy || st.BusyTotal != 0 || st.Chunks != chunks || st.ErrorFrames[protocol.ErrCodeBusy] != busy {
				t.Fatalf("got paced %d, busy %d (rate) %d (total), chunks %d; want %d, %d, 0, %d", st.Paced, st.BusyRate, st.BusyTotal, st.Chunks, paced, busy, chunks)
			}
		})
	}
}

// TestRefusedRequestsAreRefunded checks that a capped device is not charged for a frame it
// did not get.
func TestRefusedRequestsAreRefunded(t *testing.T) {
	for _, tt := range []struct {
		name string
		fail func(*fixture) (undo func())
		want string // the answer: "" for none
	}{
		{"read error", func(f *fixture) func() {
			f.arts.fail = errors.New("disk on fire")
			return func() { f.arts.fail = nil }
		}, protocol.ErrCodeInternal},
		{"short read", func(f *fixture) func() {
			f.arts.short = true
			return func() { f.arts.short = false }
		}, protocol.ErrCodeInternal},
		{"send failure", func(f *fixture) func() {
			f.pub.fail = errors.New("write timeout")
			return func() { f.pub.fail = nil }
		}, ""},
		{"over MaxInflight", func(f *fixture) func() {
			// As if other devices held every byte: TestMaxInflight holds them for real.
			f.srv.inflight.Store(f.srv.opts.MaxInflight)
			return func() { f.srv.inflight.Store(0) }
		}, protocol.ErrCodeBusy},
	} {
		t.Run(tt.name, func(t *testing.T) {
			f, _, p := newCapped(t, false)
			x := f.xfer["dev-1"]
			f.one(t, "dev-1", request(x.Job, 0, capPayload))
			charged := f.srv.rate.clear["dev-1"]
			if want := newClock().now().Add(capFrame); !charged.Equal(want) {
				t.Fatalf("after one frame: got bucket empty at %v, want %v", charged, want)
			}
			undo := tt.fail(f)
			f.srv.Handle("dev-1", request(x.Job, capPayload, capPayload))
			undo()
			msgs := f.pub.take()
			got := ""
			if len(msgs) == 1 {
				got = code(parse(t, "dev-1", msgs[0]))
			}
			if (tt.want == "") != (len(msgs) == 0) || got != tt.want {
				t.Fatalf("got %d messages (%q), want answer %q", len(msgs), got, tt.want)
			}
			if got := f.srv.rate.clear["dev-1"]; !got.Equal(charged) {
				t.Fatalf("got bucket empty at %v, want %v as before the refused request", got, charged)
			}
			// And the rate still charges what goes out: the burst less the first frame, then
			// a wait of one frame.
			for i := 2; i < 9; i++ {
				if fr := f.one(t, "dev-1", request(x.Job, int64(i)*capPayload, capPayload)); fr.Kind != protocol.FrameData {
					t.Fatalf("request %d: got kind %d %q, want data", i, fr.Kind, fr.Payload)
				}
			}
			if got, want := fmt.Sprint(p.take()), fmt.Sprint([]time.Duration{capFrame}); got != want {
				t.Fatalf("got pauses %v, want %v", got, want)
			}
			if st := f.srv.Stats(); st.Inflight != 0 {
				t.Fatalf("got %d bytes in flight, want 0", st.Inflight)
			}
		})
	}
}

// TestCloseEndsPause closes the server while a capped request waits in the real pause.
func TestCloseEndsPause(t *testing.T) {
	f := newFixture(t, func(o *Options) { o.DeviceRate = capRate; o.DeviceBurst = capBurst })
	clk := newClock()
	f.srv.rate = newRateLimiter(capRate, capBurst, clk.now)
	x := f.xfer["dev-1"]
	x.ChunkMax = protocol.MaxChunkSize
	f.xfer["dev-1"] = x
	for i := range 7 { // the burst: no pause
		if fr := f.one(t, "dev-1", request(x.Job, int64(i)*capPayload, capPayload)); fr.Kind != protocol.FrameData {
			t.Fatalf("request %d: got kind %d %q, want data", i, fr.Kind, fr.Payload)
		}
	}
	// The real pause, but for longer than any request waits, so that only Close can end it.
	wait := f.srv.pause
	asked := make(chan time.Duration, 1)
	f.srv.pause = func(d time.Duration) bool {
		asked <- d
		return wait(time.Hour)
	}
	done := make(chan struct{})
	go func() {
		defer close(done)
		// A frame of 25,000 bytes: 250 ms at the rate, the longest a request waits.
		f.srv.Handle("dev-1", request(x.Job, 7*capPayload, 25_000-protocol.FrameHeaderSize))
	}()
	select {
	case got := <-asked:
		if got != paceMax {
			t.Fatalf("got a pause of %v, want %v", got, paceMax)
		}
	case <-done:
		t.Fatalf("Handle returned without a pause (%d messages), want a pause of %v", len(f.pub.take()), paceMax)
	case <-time.After(10 * time.Second):
		t.Fatal("no pause within 10 s")
	}
	ctx, cancel := context.WithTimeout(context.Background(), 10*time.Second)
	defer cancel()
	if err := f.srv.Close(ctx); err != nil {
		t.Fatalf("Close with a request in pause: got %v, want nil", err)
	}
	within(t, done, "Handle to return")
	if msgs := f.pub.take(); len(msgs) != 0 {
		t.Fatalf("after Close: got %d messages, want none", len(msgs))
	}
	if st := f.srv.Stats(); st.Chunks != 7 || st.Paced != 1 || st.Inflight != 0 {
		t.Fatalf("got chunks %d, paced %d, in flight %d; want 7, 1, 0", st.Chunks, st.Paced, st.Inflight)
	}
}

func TestCloseWaitsForHandle(t *testing.T) {
	f := newFixture(t, nil)
	f.pub.hold = make(chan struct{})
	f.pub.in = make(chan string, 1)
	done := make(chan struct{})
	go func() {
		defer close(done)
		f.srv.Handle("dev-1", request("r1-1", 0, 1024))
	}()
	within(t, f.pub.in, "Handle in Send")

	ctx, cancel := context.WithTimeout(context.Background(), 20*time.Millisecond)
	defer cancel()
	if err := f.srv.Close(ctx); !errors.Is(err, context.DeadlineExceeded) {
		t.Fatalf("Close with a Handle in Send: got %v, want DeadlineExceeded", err)
	}
	select {
	case <-done:
		t.Fatal("Handle returned while its Send was blocked")
	default:
	}
	close(f.pub.hold)
	within(t, done, "Handle to return")
	if err := f.srv.Close(context.Background()); err != nil {
		t.Fatalf("Close: got %v, want nil", err)
	}
	if msgs := f.pub.take(); len(msgs) != 1 {
		t.Fatalf("got %d messages from the Handle in progress, want 1", len(msgs))
	}
	f.pub.in = nil
	requests := f.srv.Stats().Requests
	f.srv.Handle("dev-1", request("r1-1", 0, 1024))
	f.srv.Handle("dev-2", request("r1-1", 0, 1024)) // no error frame either
	if msgs := f.pub.take(); len(msgs) != 0 {
		t.Fatalf("after Close: got %d messages, want none", len(msgs))
	}
	if st := f.srv.Stats(); st.Requests != requests || st.Inflight != 0 {
		t.Fatalf("after Close: got %d requests, %d in flight; want %d, 0", st.Requests, st.Inflight, requests)
	}
	if err := f.srv.Close(context.Background()); err != nil {
		t.Fatalf("second Close: got %v, want nil", err)
	}
}

func TestNewOptions(t *testing.T) {
	const frame = protocol.FrameHeaderSize + protocol.MaxChunkSize
	ok := Options{
		Lookup:    func(string) (Transfer, bool) { return Transfer{}, false },
		Artifacts: &artifacts{},
		Sender:    &recorder{},
	}
	for _, tt := range []struct {
		name string
		edit func(*Options)
	}{
		{"no lookup", func(o *Options) { o.Lookup = nil }},
		{"no artifacts", func(o *Options) { o.Artifacts = nil }},
		{"no sender", func(o *Options) { o.Sender = nil }},
		{"negative max inflight", func(o *Options) { o.MaxInflight = -1 }},
		{"negative rate", func(o *Options) { o.DeviceRate = -1 }},
		{"negative burst", func(o *Options) { o.DeviceBurst = -1 }},
		{"max inflight below a frame", func(o *Options) { o.MaxInflight = frame - 1 }},
		{"burst below a frame", func(o *Options) { o.DeviceRate = 1 << 20; o.DeviceBurst = frame - 1 }},
	} {
		t.Run(tt.name, func(t *testing.T) {
			o := ok
			tt.edit(&o)
			if _, err := New(o); !errors.Is(err, ErrBadOptions) {
				t.Fatalf("got %v, want ErrBadOptions", err)
			}
		})
	}
	for _, tt := range []struct {
		name                  string
		edit                  func(*Options)
		inflight, rate, burst int64
	}{
		{"defaults", func(*Options) {}, DefaultMaxInflight, 0, DefaultDeviceBurst},
		{"one frame", func(o *Options) { o.MaxInflight = frame }, frame, 0, DefaultDeviceBurst},
		{"capped", func(o *Options) { o.DeviceRate = 1 << 20; o.DeviceBurst = frame }, DefaultMaxInflight, 1 << 20, frame},
		{"burst unused without a rate", func(o *Options) { o.DeviceBurst = 1 }, DefaultMaxInflight, 0, 1},
	} {
		t.Run(tt.name, func(t *testing.T) {
			o := ok
			tt.edit(&o)
			s, err := New(o)
			if err != nil {
				t.Fatalf("got %v, want nil", err)
			}
			if s.opts.MaxInflight != tt.inflight || s.opts.DeviceRate != tt.rate || s.opts.DeviceBurst != tt.burst || (s.rate != nil) != (tt.rate > 0) {
				t.Fatalf("got max inflight %d, rate %d, burst %d, limiter %v; want %d, %d, %d, %v",
					s.opts.MaxInflight, s.opts.DeviceRate, s.opts.DeviceBurst, s.rate != nil, tt.inflight, tt.rate, tt.burst, tt.rate > 0)
			}
		})
	}
}

// TestConcurrentDevices has devices download at once under a MaxInflight that fits three of
// their frames: nothing may ever hold more, and every device gets the whole image, asking
// again after "busy".
func TestConcurrentDevices(t *testing.T) {
	const chunk = 16 << 10
	peak := &peakSender{}
	f := newFixture(t, func(o *Options) {
		o.MaxInflight = protocol.FrameHeaderSize + protocol.MaxChunkSize
		o.Sender = peak
		o.DeviceRate = 1 << 40 // the limiter under concurrent use, never waiting
	})
	peak.srv = f.srv
	x := f.xfer["dev-1"]
	devices := make([]string, 8)
	for i := range devices {
		devices[i] = fmt.Sprintf("dev-c%d", i)
		f.xfer[devices[i]] = x
	}
	images := make([][]byte, len(devices))
	errs := make([]error, len(devices))
	var wg sync.WaitGroup
	for i, d := range devices {
		wg.Go(func() {
			for off, tries := int64(0), 0; off < x.Size; tries++ {
				if tries > 10_000 {
					errs[i] = fmt.Errorf("stuck at %d", off)
					return
				}
				f.srv.Handle(d, request(x.Job, off, chunk))
				fr, err := protocol.ParseFrame(peak.last(d))
				switch {
				case err != nil:
					errs[i] = err
					return
				case code(fr) == protocol.ErrCodeBusy:
					continue
				case fr.Kind != protocol.FrameData || int64(fr.Offset) != off:
					errs[i] = fmt.Errorf("got kind %d %q at %d, want data at %d", fr.Kind, fr.Payload, fr.Offset, off)
					return
				}
				images[i] = append(images[i], fr.Payload...)
				off += int64(len(fr.Payload))
			}
		})
	}
	wg.Wait()
	for i, d := range devices {
		if errs[i] != nil {
			t.Fatalf("%s: %v", d, errs[i])
		}
		if !bytes.Equal(images[i], f.im.data) {
			t.Fatalf("%s: got %d bytes, want the %d of the image", d, len(images[i]), len(f.im.data))
		}
	}
	st := f.srv.Stats()
	if got, want := peak.max(), f.srv.opts.MaxInflight; got > want || got < chunk+protocol.FrameHeaderSize {
		t.Fatalf("got at most %d bytes in flight during a Send, want between one frame and %d", got, want)
	}
	if st.Inflight != 0 || st.BusyTotal != st.ErrorFrames[protocol.ErrCodeBusy] {
		t.Fatalf("got %d bytes in flight, %d busy for %d busy frames; want 0 and as many", st.Inflight, st.BusyTotal, st.ErrorFrames[protocol.ErrCodeBusy])
	}
	t.Logf("%d busy answers, at most %d bytes in flight", st.BusyTotal, peak.max())
}

// peakSender keeps each device's last frame and the most bytes in flight a Send saw.
type peakSender struct {
	srv *Server

	mu    sync.Mutex
	peak  int64
	lasts map[string][]byte
}

func (p *peakSender) Send(topic string, payload []byte) error {
	inflight := p.srv.inflight.Load()
	d, _, _ := protocol.ParseTopic(topic)
	p.mu.Lock()
	defer p.mu.Unlock()
	p.peak = max(p.peak, inflight)
	if p.lasts == nil {
		p.lasts = make(map[string][]byte)
	}
	p.lasts[d] = append(p.lasts[d][:0], payload...)
	return nil
}

func (p *peakSender) last(device string) []byte {
	p.mu.Lock()
	defer p.mu.Unlock()
	return bytes.Clone(p.lasts[device])
}

func (p *peakSender) max() int64 {
	p.mu.Lock()
	defer p.mu.Unlock()
	return p.peak
}

// discard is a Sender that drops everything, to measure the server alone.
type discard struct{}

func (discard) Send(string, []byte) error { return nil }

// BenchmarkHandle measures one request from JSON to a written frame, the artifact read from
// the page cache: the server's own share of a chunk's cost, without broker or network.
func BenchmarkHandle(b *testing.B) {
	im := loadImage(b, "pybricks-primehub-7.28.0.bin")
	for _, chunk := range []int{protocol.MinChunkSize, 16 << 10, protocol.MaxChunkSize} {
		b.Run(fmt.Sprintf("%dKiB", chunk>>10), func(b *testing.B) {
			x := Transfer{Job: "r1-1", ID: 1, SHA256: im.sha, Size: int64(len(im.data)), ChunkMax: chunk}
			srv, err := New(Options{
				Lookup:     func(string) (Transfer, bool) { return x, true },
				Artifacts:  &artifacts{images: map[string]*image{im.sha: im}},
				Sender:     discard{},
				Logger:     slog.New(slog.DiscardHandler),
				DeviceRate: 1 << 40, // with the limiter's cost, never its waits
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
			if st := srv.Stats(); st.Chunks == 0 || st.BusyRate+st.BusyTotal != 0 || st.Paced != 0 {
				b.Fatalf("got %+v, want chunks and no busy or paced answers", st)
			}
		})
	}
}

// reachRecorder is a recorder that also says which devices can be written to.
type reachRecorder struct {
	*recorder
	gone map[string]bool
}

func (r reachRecorder) Reachable(device string) bool { return !r.gone[device] }

// countingArtifacts counts reads.
type countingArtifacts struct {
	*artifacts
	reads atomic.Int32
}

func (c *countingArtifacts) ReadAt(sha string, p []byte, off int64) (int, error) {
	c.reads.Add(1)
	return c.artifacts.ReadAt(sha, p, off)
}

// TestUnreachableDeviceSkipsRead: a request from a device whose connection has ended (its
// requests may still be handed over after a write timeout closed it) costs no artifact read
// and sends nothing; a reachable device is served as before.
func TestUnreachableDeviceSkipsRead(t *testing.T) {
	var arts *countingArtifacts
	rr := reachRecorder{recorder: &recorder{}, gone: map[string]bool{"dev-1": true}}
	f := newFixture(t, func(o *Options) {
		arts = &countingArtifacts{artifacts: o.Artifacts.(*artifacts)}
		o.Artifacts = arts
		o.Sender = rr
	})
	f.pub = rr.recorder
	f.xfer["dev-2"] = f.xfer["dev-1"]

	f.srv.Handle("dev-1", request("r1-1", 0, 1024))
	if n := arts.reads.Load(); n != 0 {
		t.Fatalf("got %d artifact reads for an unreachable device, want 0", n)
	}
	if msgs := f.pub.take(); len(msgs) != 0 {
		t.Fatalf("got %d messages to an unreachable device, want 0", len(msgs))
	}
	if st := f.srv.Stats(); st.Dropped != 1 || st.Requests != 1 || st.Chunks != 0 {
		t.Fatalf("Stats: got Dropped %d Requests %d Chunks %d, want 1, 1, 0", st.Dropped, st.Requests, st.Chunks)
	}

	fr := f.one(t, "dev-2", request("r1-1", 0, 1024))
	if fr.Kind != protocol.FrameData || len(fr.Payload) != 1024 || arts.reads.Load() != 1 {
		t.Fatalf("reachable device: got frame kind %d of %d bytes after %d reads, want data of 1024 after 1", fr.Kind, len(fr.Payload), arts.reads.Load())
	}
}
