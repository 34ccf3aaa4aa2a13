// Package transfer serves firmware chunks to devices inside the broker process: it answers each
// ChunkRequest a device publishes on its req topic with one chunk frame on its chunk topic, read
// from the artifact store at the requested offset and written to the device's connection by the
// goroutine that read the request, the device's own. So a device's requests are served one
// after another, a device holds at most one frame (its chunk size plus the 20-byte header) in
// the server at a time, and a device that stops reading blocks only itself until the broker's
// write timeout closes its connection. The server bounds the frame bytes it holds over all
// devices (Options.MaxInflight) and can cap each device's rate (Options.DeviceRate).
// PROTOCOL.md ("Chunk frames") is the contract it implements.
package transfer

import (
	"context"
	"encoding/json"
	"errors"
	"fmt"
	"io"
	"log/slog"
	"math"
	"sync"
	"sync/atomic"
	"time"

	"github.com/fota-dev/fota/protocol"
)

// Defaults for the zero fields of Options.
const (
	// DefaultMaxInflight lets 1,024 devices hold a frame of the largest chunk at once.
	DefaultMaxInflight = 1024 * (protocol.MaxChunkSize + protocol.FrameHeaderSize)
	// DefaultDeviceBurst lets a capped device take one frame of the largest chunk at once: a
	// deeper bucket would let a device at a low rate have a whole window at full speed before
	// the cap shows, which is not what an operator setting a rate asks for.
	DefaultDeviceBurst = protocol.MaxChunkSize + protocol.FrameHeaderSize
)

// paceMax is the longest a request waits for a capped device's rate to allow it; well below
// the 2 s after which a device asks again. A longer wait is answered "busy".
const paceMax = 250 * time.Millisecond

// maxRequestSize bounds the JSON of a ChunkRequest; anything longer is not one.
const maxRequestSize = 1 << 10

// ErrBadOptions is returned (wrapped) by New.
var ErrBadOptions = errors.New("invalid transfer options")

// Transfer is what a device may download now: the artifact SHA256 of Size bytes, for job Job,
// with frames carrying transfer id ID. ChunkMax is the largest request length (the offer's
// chunk size); 0 means protocol.DefaultChunkSize, and above protocol.MaxChunkSize means that.
// Paused means the rollout's window closed: requests are answered "busy".
type Transfer struct {
	Job      string
	ID       uint32
	SHA256   string
	Size     int64
	ChunkMax int
	Paused   bool
}

// Lookup returns device's current transfer. It runs on every request, on the requesting
// device's connection goroutine, so it must be cheap and must not block.
type Lookup func(device string) (Transfer, bool)

// Reader reads artifacts by sha256, as io.ReaderAt does (firmware.Store satisfies it).
type Reader interface {
	ReadAt(sha string, p []byte, off int64) (int, error)
}

// Sender writes one message to the device a downstream topic belongs to, on the caller's
// goroutine, and returns once it is written or has failed (broker.Broker satisfies it). It may
// block while that device does not read, for a bounded time, and must not keep payload.
type Sender interface {
	Send(topic string, payload []byte) error
}

// Reacher is an optional interface of a Sender that can tell cheaply whether a device can be
// written to now (the broker can). A request from a device that cannot is dropped before its
// artifact is read: after a write timeout closes a connection, its device's buffered requests
// are still handed over.
type Reacher interface {
	Reachable(device string) bool
}

// Options configures a Server. Zero values mean the defaults above.
type Options struct {
	Lookup    Lookup // required
	Artifacts Reader // required
	Sender    Sender // required
	Logger    *slog.Logger

	// MaxInflight bounds the frame bytes the server holds at once over all devices: read from
	// the artifact store and not yet written. A device holds one frame at a time, so this
	// bounds memory when many devices ask at the same moment; a request that would go over it
	// is answered "busy".
	MaxInflight int64
	// DeviceRate, when above 0, caps each device's frame bytes (header included): over any t
	// seconds a device is sent at most DeviceBurst + DeviceRate*t of them. A request the cap
	// delays by up to 250 ms waits (on the device's own goroutine, so its other requests wait
	// too); one it would delay longer is answered "busy" and charged nothing. So at a rate
	// below 4 frames a second every frame past the burst is answered "busy" until the
	// device's bucket has drained, and the device's pause after "busy" does the pacing. 0
	// means no cap: a device gets what its link and the server give it. DeviceBurst is at
	// least one frame of the largest chunk, the default.
	DeviceRate  int64
	DeviceBurst int64
}

// Stats are counters since New.
type Stats struct {
	Requests    uint64            // chunk requests received
	Chunks      uint64            // data frames written
	Bytes       uint64            // payload bytes in those frames
	Paced       uint64            // requests served late: the device was ahead of DeviceRate
	ErrorFrames map[string]uint64 // error frames sent, by protocol.ErrCode*
	BusyRate    uint64            // "busy" answers because the device was far ahead of DeviceRate
	BusyTotal   uint64            // "busy" answers because MaxInflight was reached
	BadRequests uint64            // requests that were not a ChunkRequest, dropped unanswered
	Dropped     uint64            // frames not written: the device was gone or its write failed (timeout); the device asks again
	Inflight    int64             // frame bytes held now, all devices
}

// errCodes are the codes Stats.ErrorFrames counts, in protocol order.
var errCodes = [...]string{protocol.ErrCodeRange, protocol.ErrCodeNoJob, protocol.ErrCodeBusy, protocol.ErrCodeInternal}

// Server answers chunk requests. Its methods are safe for concurrent use.
type Server struct {
	opts Options
	log  *slog.Logger
	rate *rateLimiter // nil: no cap

	// Frame buffers of the largest frame, so a request costs no allocation of its size.
	frames   sync.Pool
	inflight atomic.Int64

	// pause waits d unless the server closes first, and reports whether it waited d; a test
	// replaces it.
	pause func(d time.Duration) bool

	mu     sync.Mutex
	closed bool
	done   chan struct{} // closed by Close: paced requests stop waiting
	active int           // Handle calls in progress
	idle   chan struct{} // closed when closed and active reaches 0

	requests, chunks, bytes, paced, busyRate, busyTotal, bad, dropped atomic.Uint64
	errFrames                                                         [len(errCodes)]atomic.Uint64

	logLimit rateLimitedLog
}

// New checks opts and returns a Server ready for Handle.
func New(opts Options) (*Server, error) {
	switch {
	case opts.Lookup == nil:
		return nil, fmt.Errorf("%w: Lookup required", ErrBadOptions)
	case opts.Artifacts == nil:
		return nil, fmt.Errorf("%w: Artifacts required", ErrBadOptions)
	case opts.Sender == nil:
		return nil, fmt.Errorf("%w: Sender required", ErrBadOptions)
	case opts.MaxInflight < 0, opts.DeviceRate < 0, opts.DeviceBurst < 0:
		return nil, fmt.Errorf("%w: negative limit", ErrBadOptions)
	}
	if opts.Logger == nil {
		opts.Logger = slog.Default()
	}
	if opts.MaxInflight == 0 {
		opts.MaxInflight = DefaultMaxInflight
	}
	if opts.DeviceBurst == 0 {
		opts.DeviceBurst = DefaultDeviceBurst
	}
	const frame = protocol.FrameHeaderSize + protocol.MaxChunkSize
	if opts.MaxInflight < frame {
		return nil, fmt.Errorf("%w: MaxInflight %d is below one frame of the largest chunk (%d)", ErrBadOptions, opts.MaxInflight, frame)
	}
	if opts.DeviceRate > 0 && opts.DeviceBurst < frame {
		return nil, fmt.Errorf("%w: DeviceBurst %d is below one frame of the largest chunk (%d)", ErrBadOptions, opts.DeviceBurst, frame)
	}
	s := &Server{
		opts: opts,
		log:  opts.Logger.With("component", "transfer"),
		done: make(chan struct{}),
	}
	if opts.DeviceRate > 0 {
		s.rate = newRateLimiter(opts.DeviceRate, opts.DeviceBurst, time.Now)
	}
	s.pause = s.wait
	s.frames.New = func() any {
		b := make([]byte, frame)
		return &b
	}
	return s, nil
}

// Handle answers one request that device published on its req topic: a chunk frame, an error
// frame, or nothing for a payload that is not a ChunkRequest. It runs on the device's own
// connection goroutine and returns once the answer is written, so it waits for that device
// (and, when the device is capped, for its rate) and for nobody else. After Close it does
// nothing.
func (s *Server) Handle(device string, payload []byte) {
	if !s.enter() {
		return
	}
	defer s.leave()
	s.requests.Add(1)
	if r, ok := s.opts.Sender.(Reacher); ok && !r.Reachable(device) {
		s.dropped.Add(1)
		return
	}

	var req protocol.ChunkRequest
	if len(payload) > maxRequestSize || json.Unmarshal(payload, &req) != nil {
		s.bad.Add(1)
		s.log.Debug("bad chunk request", "device", device, "bytes", len(payload))
		return
	}
	t, ok := s.opts.Lookup(device)
	if !ok {
		s.sendError(device, 0, req.Offset, protocol.ErrCodeNoJob)
		return
	}
	if t.Job == "" || req.Job != t.Job {
		s.sendError(device, t.ID, req.Offset, protocol.ErrCodeNoJob)
		return
	}
	chunkMax := t.ChunkMax
	if chunkMax <= 0 {
		chunkMax = protocol.DefaultChunkSize
	}
	chunkMax = min(chunkMax, protocol.MaxChunkSize)
	// Frames address offsets with 32 bits; nothing past that can be served.
	if req.Offset < 0 || req.Offset >= t.Size || req.Offset > math.MaxUint32 || req.Length <= 0 || req.Length > chunkMax {
		s.sendError(device, t.ID, req.Offset, protocol.ErrCodeRange)
		return
	}
	if t.Paused {
		s.sendError(device, t.ID, req.Offset, protocol.ErrCodeBusy)
		return
	}
	n := int(min(int64(req.Length), t.Size-req.Offset)) // the tail is clamped, not refused
	cost := int64(protocol.FrameHeaderSize + n)
	if s.rate != nil {
		delay, ok := s.rate.take(device, cost, paceMax)
		if !ok {
			s.busyRate.Add(1)
			s.sendError(device, t.ID, req.Offset, protocol.ErrCodeBusy)
			return
		}
		if delay > 0 {
			s.paced.Add(1)
			// t is the transfer as it was asked for; if it ends meanwhile, the device drops
			// the frame as one of another transfer.
			if !s.pause(delay) {
				return
			}
		}
	}
	if !s.hold(cost) {
		s.refund(device, cost)
		s.busyTotal.Add(1)
		s.sendError(device, t.ID, req.Offset, protocol.ErrCodeBusy)
		return
	}
	defer s.inflight.Add(-cost)
	if !s.serve(device, t, req.Offset, n) {
		s.refund(device, cost)
	}
}

// hold counts n more bytes in flight, unless that would go over MaxInflight.
func (s *Server) hold(n int64) bool {
	for {
		cur := s.inflight.Load()
		if cur+n > s.opts.MaxInflight {
			return false
		}
		if s.inflight.CompareAndSwap(cur, cur+n) {
			return true
		}
	}
}

// refund gives a capped device back n bytes it was not sent.
func (s *Server) refund(device string, n int64) {
	if s.rate != nil {
		s.rate.refund(device, n)
	}
}

// serve reads n bytes at off of t's artifact and writes them as one frame, or an error frame
// when they cannot be read. It reports whether the data frame went out.
func (s *Server) serve(device string, t Transfer, off int64, n int) bool {
	bp := s.frames.Get().(*[]byte)
	defer s.frames.Put(bp)
	buf := *bp
	payload := buf[protocol.FrameHeaderSize : protocol.FrameHeaderSize+n]
	if got, err := s.opts.Artifacts.ReadAt(t.SHA256, payload, off); got != n || (err != nil && !errors.Is(err, io.EOF)) {
		if err == nil {
			err = io.ErrUnexpectedEOF
		}
		s.logLimit.do(func() {
			s.log.Error("read artifact", "sha256", t.SHA256, "offset", off, "length", n, "read", got, "err", err)
		})
		s.sendError(device, t.ID, off, protocol.ErrCodeInternal)
		return false
	}
	// The payload is in place behind the header's room: AppendFrame writes the header in front
	// of it and copies the payload onto itself.
	frame := protocol.AppendFrame(buf[:0], protocol.FrameData, t.ID, uint32(off), payload)
	if err := s.opts.Sender.Send(protocol.Topic(device, protocol.SuffixChunk), frame); err != nil {
		s.dropped.Add(1)
		s.logLimit.do(func() { s.log.Warn("send chunk", "device", device, "err", err) })
		return false
	}
	s.chunks.Add(1)
	s.bytes.Add(uint64(n))
	return true
}

// wait is the pause of a running server.
func (s *Server) wait(d time.Duration) bool {
	t := time.NewTimer(d)
	defer t.Stop()
	select {
	case <-t.C:
		return true
	case <-s.done:
		return false
	}
}

// sendError sends an error frame. Error frames are not counted in flight: they are 20 bytes
// and a code, on the stack.
func (s *Server) sendError(device string, transfer uint32, offset int64, code string) {
	for i, c := range errCodes {
		if c == code {
			s.errFrames[i].Add(1)
		}
	}
	off := uint32(0)
	if offset > 0 && offset <= math.MaxUint32 {
		off = uint32(offset)
	}
	var buf [protocol.FrameHeaderSize + 16]byte
	frame := protocol.AppendFrame(buf[:0], protocol.FrameError, transfer, off, []byte(code))
	if err := s.opts.Sender.Send(protocol.Topic(device, protocol.SuffixChunk), frame); err != nil {
		s.dropped.Add(1)
		s.logLimit.do(func() { s.log.Warn("send chunk error", "device", device, "err", err) })
	}
}

// Stats returns the server's counters.
func (s *Server) Stats() Stats {
	st := Stats{
		Requests:    s.requests.Load(),
		Chunks:      s.chunks.Load(),
		Bytes:       s.bytes.Load(),
		Paced:       s.paced.Load(),
		ErrorFrames: make(map[string]uint64, len(errCodes)),
		BusyRate:    s.busyRate.Load(),
		BusyTotal:   s.busyTotal.Load(),
		BadRequests: s.bad.Load(),
		Dropped:     s.dropped.Load(),
		Inflight:    s.inflight.Load(),
	}
	for i, c := range errCodes {
		st.ErrorFrames[c] = s.errFrames[i].Load()
	}
	return st
}

// Close makes Handle a no-op, ends the waits of paced requests, and waits for the calls in
// progress, or for ctx. A call may be blocked writing to a device that does not read, until
// the sender's write timeout: close the broker first, which ends those writes. After Close
// returns nil the server sends nothing more.
func (s *Server) Close(ctx context.Context) error {
	s.mu.Lock()
	if !s.closed {
		s.closed = true
		close(s.done)
		s.idle = make(chan struct{})
		if s.active == 0 {
			close(s.idle)
		}
	}
	idle := s.idle
	s.mu.Unlock()
	select {
	case <-idle:
		return nil
	case <-ctx.Done():
		return fmt.Errorf("close transfer server: %w", ctx.Err())
	}
}

func (s *Server) enter() bool {
	s.mu.Lock()
	defer s.mu.Unlock()
	if s.closed {
		return false
	}
	s.active++
	return true
}

func (s *Server) leave() {
	s.mu.Lock()
	defer s.mu.Unlock()
	s.active--
	if s.closed && s.active == 0 {
		close(s.idle)
	}
}

// rateLimitedLog runs at most one log call per second: a missing artifact or a closed broker
// fails every request of every device, which must not flood the log.
type rateLimitedLog struct{ next atomic.Int64 }

func (r *rateLimitedLog) do(f func()) {
	now := time.Now().UnixNano()
	next := r.next.Load()
	if now < next || !r.next.CompareAndSwap(next, now+int64(time.Second)) {
		return
	}
	f()
}
