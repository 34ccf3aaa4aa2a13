// Package transfer serves firmware chunks to devices inside the broker process: it answers each
// ChunkRequest a device publishes on its req topic with one chunk frame on its chunk topic, read
// from the artifact store at the requested offset. It bounds the chunk bytes it hands the broker
// per device and overall, so that a device that stops reading costs a bounded amount of memory
// and never delays the others. PROTOCOL.md ("Chunk frames") is the contract it implements.
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
	// DefaultMaxInflightPerDevice lets a device start a window of 8 requests of the largest
	// chunk at once: the limit should be at least an offer's window times its chunk size plus
	// the frame header, or a device's first window is paced (see ledger).
	DefaultMaxInflightPerDevice = 8 * (protocol.MaxChunkSize + protocol.FrameHeaderSize)
	DefaultMaxInflightTotal     = 64 << 20
	// DefaultDeviceRate is the speed at which a device's in-flight bytes are assumed to reach
	// it: 2.5 times a 100 Mbit/s link, so it does not slow a real device, while a device that
	// asks without reading costs the server (reads, checksums, copies) at most this rate, an
	// eighth of what one device makes it serve on loopback with 64 KiB chunks (bench/transfer).
	DefaultDeviceRate = 32 << 20
)

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

// Publisher sends a message to a device's topic (broker.Broker satisfies it).
type Publisher interface {
	Publish(topic string, payload []byte, qos byte) error
}

// Options configures a Server. Zero values mean the defaults above.
type Options struct {
	Lookup    Lookup // required
	Artifacts Reader // required
	// Publisher is required. Its Publish must not block on a device (QoS 0) and must not keep
	// payload after it returns: the server reuses frame buffers. The embedded broker copies
	// the payload; a publisher that sends later (an MQTT client's queue) must copy it first.
	Publisher Publisher
	Logger    *slog.Logger

	// MaxInflightPerDevice and MaxInflightTotal bound the chunk frame bytes handed to the
	// publisher and not yet written to the device, per device and summed over all devices. The
	// publisher does not say when a frame is written, so "not yet written" is an estimate:
	// each device's bytes are assumed to drain at DeviceRate from the moment they are handed
	// over. A frame over the device's limit is sent later, when it fits (up to 250 ms and 16
	// frames per device), or refused "busy"; one over the total is refused "busy". See ledger.
	MaxInflightPerDevice int64
	MaxInflightTotal     int64
	// DeviceRate, in bytes per second, is how fast a device is assumed to take its frames. It
	// caps one device's download speed, and so what a device that stopped reading is fed
	// until the broker disconnects it: MaxInflightPerDevice + DeviceRate x the broker's write
	// timeout, of which the broker keeps at most its per-connection queue and drops the rest.
	DeviceRate int64
}

// Stats are counters since New.
type Stats struct {
	Requests    uint64            // chunk requests received
	Chunks      uint64            // data frames published
	Bytes       uint64            // payload bytes in those frames
	Paced       uint64            // requests served late: the device was ahead of DeviceRate
	ErrorFrames map[string]uint64 // error frames published, by protocol.ErrCode*
	BusyDevice  uint64            // "busy" answers because the device was at MaxInflightPerDevice
	BusyTotal   uint64            // "busy" answers because all devices were at MaxInflightTotal
	BadRequests uint64            // requests that were not a ChunkRequest, dropped unanswered
	Dropped     uint64            // frames the publisher refused; the device asks again
	Inflight    int64             // estimated in-flight frame bytes now, all devices
}

// errCodes are the codes Stats.ErrorFrames counts, in protocol order.
var errCodes = [...]string{protocol.ErrCodeRange, protocol.ErrCodeNoJob, protocol.ErrCodeBusy, protocol.ErrCodeInternal}

// Server answers chunk requests. Its methods are safe for concurrent use.
type Server struct {
	opts Options
	log  *slog.Logger
	led  *ledger

	// Frame buffers of the largest frame, so a request costs no allocation of its size.
	frames sync.Pool

	mu     sync.Mutex
	closed bool
	active int                      // Handle calls and paced frames in progress
	idle   chan struct{}            // closed when closed and active reaches 0
	held   map[*pacedFrame]struct{} // paced frames waiting for their time
	after  func(time.Duration, func()) timer

	requests, chunks, bytes, paced, busyDevice, busyTotal, bad, dropped atomic.Uint64
	errFrames                                                           [len(errCodes)]atomic.Uint64

	logLimit rateLimitedLog
}

// New checks opts and returns a Server ready for Handle.
func New(opts Options) (*Server, error) {
	switch {
	case opts.Lookup == nil:
		return nil, fmt.Errorf("%w: Lookup required", ErrBadOptions)
	case opts.Artifacts == nil:
		return nil, fmt.Errorf("%w: Artifacts required", ErrBadOptions)
	case opts.Publisher == nil:
		return nil, fmt.Errorf("%w: Publisher required", ErrBadOptions)
	case opts.MaxInflightPerDevice < 0, opts.MaxInflightTotal < 0, opts.DeviceRate < 0:
		return nil, fmt.Errorf("%w: negative limit", ErrBadOptions)
	}
	if opts.Logger == nil {
		opts.Logger = slog.Default()
	}
	if opts.MaxInflightPerDevice == 0 {
		opts.MaxInflightPerDevice = DefaultMaxInflightPerDevice
	}
	if opts.MaxInflightTotal == 0 {
		opts.MaxInflightTotal = DefaultMaxInflightTotal
	}
	if opts.DeviceRate == 0 {
		opts.DeviceRate = DefaultDeviceRate
	}
	if opts.MaxInflightPerDevice < protocol.FrameHeaderSize+protocol.MinChunkSize {
		return nil, fmt.Errorf("%w: MaxInflightPerDevice %d is below one frame of the smallest chunk", ErrBadOptions, opts.MaxInflightPerDevice)
	}
	if opts.MaxInflightTotal < opts.MaxInflightPerDevice {
		return nil, fmt.Errorf("%w: MaxInflightTotal %d is below MaxInflightPerDevice %d", ErrBadOptions, opts.MaxInflightTotal, opts.MaxInflightPerDevice)
	}
	s := &Server{
		opts: opts,
		log:  opts.Logger.With("component", "transfer"),
		led:  newLedger(opts.MaxInflightPerDevice, opts.MaxInflightTotal, opts.DeviceRate, time.Now),
		held: make(map[*pacedFrame]struct{}),
		after: func(d time.Duration, f func()) timer {
			return time.AfterFunc(d, f)
		},
	}
	s.frames.New = func() any {
		b := make([]byte, protocol.FrameHeaderSize+protocol.MaxChunkSize)
		return &b
	}
	return s, nil
}

// Handle answers one request that device published on its req topic: a chunk frame, an error
// frame, or nothing for a payload that is not a ChunkRequest. It runs on the device's own
// connection goroutine; it reads at most one chunk and publishes at QoS 0, so it never waits
// for any device. A frame for a device ahead of DeviceRate is sent later, from a timer. After
// Close it does nothing.
func (s *Server) Handle(device string, payload []byte) {
	if !s.enter() {
		return
	}
	defer s.leave()
	s.requests.Add(1)

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
	v, delay := s.led.reserve(device, cost)
	switch v {
	case overDevice:
		s.busyDevice.Add(1)
		s.sendError(device, t.ID, req.Offset, protocol.ErrCodeBusy)
		return
	case overTotal:
		s.busyTotal.Add(1)
		s.sendError(device, t.ID, req.Offset, protocol.ErrCodeBusy)
		return
	}
	if delay > 0 {
		s.paced.Add(1)
		// t is the transfer as it is now; if it ends meanwhile, the device drops the frame.
		s.later(delay, func() {
			s.led.sent(device)
			s.serve(device, t, req.Offset, n, cost)
		})
		return
	}
	s.serve(device, t, req.Offset, n, cost)
}

// serve reads n bytes at off of t's artifact and publishes them as one frame; cost bytes
// are reserved for it in the ledger.
func (s *Server) serve(device string, t Transfer, off int64, n int, cost int64) {
	bp := s.frames.Get().(*[]byte)
	defer s.frames.Put(bp)
	buf := *bp
	payload := buf[protocol.FrameHeaderSize : protocol.FrameHeaderSize+n]
	if got, err := s.opts.Artifacts.ReadAt(t.SHA256, payload, off); got != n || (err != nil && !errors.Is(err, io.EOF)) {
		s.led.refund(device, cost)
		if err == nil {
			err = io.ErrUnexpectedEOF
		}
		s.logLimit.do(func() {
			s.log.Error("read artifact", "sha256", t.SHA256, "offset", off, "length", n, "read", got, "err", err)
		})
		s.sendError(device, t.ID, off, protocol.ErrCodeInternal)
		return
	}
	// The payload is in place behind the header's room: AppendFrame writes the header in front
	// of it and copies the payload onto itself.
	frame := protocol.AppendFrame(buf[:0], protocol.FrameData, t.ID, uint32(off), payload)
	if err := s.opts.Publisher.Publish(protocol.Topic(device, protocol.SuffixChunk), frame, 0); err != nil {
		s.led.refund(device, cost)
		s.dropped.Add(1)
		s.logLimit.do(func() { s.log.Warn("publish chunk", "device", device, "err", err) })
		return
	}
	s.chunks.Add(1)
	s.bytes.Add(uint64(n))
}

// later runs f after d on a goroutine of its own, unless Close comes first. It is called from
// Handle, so the server is not closed yet.
func (s *Server) later(d time.Duration, f func()) {
	p := new(pacedFrame)
	s.mu.Lock()
	defer s.mu.Unlock()
	p.t = s.after(d, func() {
		s.mu.Lock()
		delete(s.held, p)
		if s.closed {
			s.mu.Unlock()
			return
		}
		s.active++
		s.mu.Unlock()
		defer s.leave()
		f()
	})
	s.held[p] = struct{}{}
}

// pacedFrame is a frame held for later; its timer's callback needs it as a map key before
// the timer exists.
type pacedFrame struct{ t timer }

// timer is what Server.after returns: *time.Timer, or a test's fake.
type timer interface{ Stop() bool }

// sendError publishes an error frame. Error frames are not counted in flight: they are 20
// bytes and a code, and the broker's per-connection queue bounds how many it keeps.
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
	if err := s.opts.Publisher.Publish(protocol.Topic(device, protocol.SuffixChunk), frame, 0); err != nil {
		s.dropped.Add(1)
		s.logLimit.do(func() { s.log.Warn("publish chunk error", "device", device, "err", err) })
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
		BusyDevice:  s.busyDevice.Load(),
		BusyTotal:   s.busyTotal.Load(),
		BadRequests: s.bad.Load(),
		Dropped:     s.dropped.Load(),
		Inflight:    s.led.inflight(),
	}
	for i, c := range errCodes {
		st.ErrorFrames[c] = s.errFrames[i].Load()
	}
	return st
}

// Close makes Handle a no-op, drops the paced frames not yet sent, and waits for the calls
// and frames in progress, or for ctx. After it returns nil the server publishes nothing more.
func (s *Server) Close(ctx context.Context) error {
	s.mu.Lock()
	if !s.closed {
		s.closed = true
		for p := range s.held {
			// A timer that already fired finds the server closed and does nothing.
			p.t.Stop()
		}
		clear(s.held)
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
