// Package transfertest is a minimal device for tests and benchmarks of chunk serving: an MQTT
// 3.1.1 client over TLS that subscribes to its chunk topic and downloads a transfer with a
// window of outstanding requests, as PROTOCOL.md describes, re-asking on timeouts, "busy"
// answers and corrupt frames. It has none of a real device's state machine (devicesim is the
// reference device); it is small so that it measures the server, not itself.
package transfertest

import (
	"bufio"
	"context"
	"crypto/tls"
	"encoding/binary"
	"encoding/json"
	"errors"
	"fmt"
	"io"
	"net"
	"sync"
	"time"

	"github.com/fota-dev/fota/protocol"
)

// MQTT 3.1.1 packet types with their fixed flags.
const (
	typeConnect   = 0x10
	typeConnack   = 0x20
	typePublish   = 0x30
	typeSubscribe = 0x82
	typeSuback    = 0x90
)

// maxPacket bounds what the device reads: the largest frame and its topic fit well within.
const maxPacket = 256 << 10

// Device is one connected device. Request may be called from any goroutine; Download from one
// at a time.
type Device struct {
	ID   string
	conn net.Conn
	r    *bufio.Reader

	wmu sync.Mutex

	readOnce sync.Once
	frames   chan *frame // chunk topic payloads, once the reader runs
	free     chan *frame // buffers Download is done with, for the reader to reuse
	readErr  error       // why frames was closed
}

// frame is one PUBLISH packet as read; payload aliases buf.
type frame struct {
	buf     []byte
	payload []byte
}

// Dial connects as device id (cfg must carry its certificate) and subscribes to its chunk
// topic. Nothing is read from the connection after that until Download is called, so a device
// that only calls Request is one that stopped reading.
func Dial(ctx context.Context, addr string, cfg *tls.Config, id string) (*Device, error) {
	d := &tls.Dialer{Config: cfg}
	c, err := d.DialContext(ctx, "tcp", addr)
	if err != nil {
		return nil, fmt.Errorf("dial %s: %w", addr, err)
	}
	dev := &Device{ID: id, conn: c, r: bufio.NewReaderSize(c, 64<<10), frames: make(chan *frame, 64), free: make(chan *frame, 64)}
	if dl, ok := ctx.Deadline(); ok {
		_ = c.SetDeadline(dl)
	}
	if err := dev.handshake(); err != nil {
		_ = c.Close()
		return nil, fmt.Errorf("device %s: %w", id, err)
	}
	_ = c.SetDeadline(time.Time{})
	return dev, nil
}

func (d *Device) handshake() error {
	body := mqttString(nil, "MQTT")
	body = append(body, 4, 0x02, 0, 0) // 3.1.1, clean session, keepalive 0 (the server's maximum)
	body = mqttString(body, d.ID)
	if err := d.write(packet(typeConnect, body)); err != nil {
		return fmt.Errorf("send connect: %w", err)
	}
	typ, b, err := d.read()
	if err != nil {
		return fmt.Errorf("read connack: %w", err)
	}
	if typ != typeConnack || len(b) != 2 || b[1] != 0 {
		return fmt.Errorf("connect refused: packet %#x % x", typ, b)
	}
	topic := protocol.Topic(d.ID, protocol.SuffixChunk)
	body = binary.BigEndian.AppendUint16(nil, 1)
	body = append(mqttString(body, topic), 0)
	if err := d.write(packet(typeSubscribe, body)); err != nil {
		return fmt.Errorf("send subscribe: %w", err)
	}
	typ, b, err = d.read()
	if err != nil {
		return fmt.Errorf("read suback: %w", err)
	}
	if typ != typeSuback || len(b) != 3 || b[2] != 0 {
		return fmt.Errorf("subscribe %s refused: packet %#x % x", topic, typ, b)
	}
	return nil
}

// Close closes the connection; a Download in progress fails.
func (d *Device) Close() error { return d.conn.Close() }

// Request publishes one ChunkRequest at QoS 0.
func (d *Device) Request(job string, off int64, n int) error {
	payload, err := json.Marshal(protocol.ChunkRequest{Job: job, Offset: off, Length: n})
	if err != nil {
		return err
	}
	return d.Publish(protocol.Topic(d.ID, protocol.SuffixRequest), payload)
}

// Publish publishes payload on topic at QoS 0.
func (d *Device) Publish(topic string, payload []byte) error {
	body := mqttString(make([]byte, 0, 2+len(topic)+len(payload)), topic)
	return d.write(packet(typePublish, append(body, payload...)))
}

func (d *Device) write(b []byte) error {
	d.wmu.Lock()
	defer d.wmu.Unlock()
	_ = d.conn.SetWriteDeadline(time.Now().Add(10 * time.Second))
	_, err := d.conn.Write(b)
	return err
}

// read reads one packet; the body is a new slice.
func (d *Device) read() (byte, []byte, error) {
	return d.readInto(nil)
}

// readInto reads one packet into buf, or a larger slice if buf is too small.
func (d *Device) readInto(buf []byte) (byte, []byte, error) {
	typ, err := d.r.ReadByte()
	if err != nil {
		return 0, nil, err
	}
	n, mul := 0, 1
	for i := 0; ; i++ {
		c, err := d.r.ReadByte()
		if err != nil {
			return 0, nil, err
		}
		n += int(c&0x7f) * mul
		mul *= 128
		if c&0x80 == 0 {
			break
		}
		if i == 3 {
			return 0, nil, errors.New("bad remaining length")
		}
	}
	if n > maxPacket {
		return 0, nil, fmt.Errorf("packet of %d bytes", n)
	}
	if cap(buf) < n {
		buf = make([]byte, n, max(n, 64<<10+256))
	}
	b := buf[:n]
	if _, err := io.ReadFull(d.r, b); err != nil {
		return 0, nil, err
	}
	return typ, b, nil
}

// startReader runs the reader: every PUBLISH payload on the chunk topic goes to frames, until
// the connection fails. It ends when the connection is closed.
func (d *Device) startReader() {
	d.readOnce.Do(func() {
		go func() {
			defer close(d.frames)
			for {
				var f *frame
				select {
				case f = <-d.free:
				default:
					f = &frame{}
				}
				typ, b, err := d.readInto(f.buf)
				if err != nil {
					d.readErr = err
					return
				}
				f.buf = b
				if typ&0xf0 != typePublish || len(b) < 2 {
					continue
				}
				tl := int(binary.BigEndian.Uint16(b))
				if 2+tl > len(b) {
					continue
				}
				rest := b[2+tl:]
				if (typ>>1)&3 > 0 { // QoS 1 or 2 carries a packet id; chunks are QoS 0
					continue
				}
				f.payload = rest
				d.frames <- f
			}
		}()
	})
}

// Job is what a device downloads, as an Offer describes it.
type Job struct {
	Job      string
	Transfer uint32
	Size     int64
	Chunk    int // request length
	Window   int // requests outstanding at most
}

// Options tune Download; zero values mean PROTOCOL.md's timeouts.
type Options struct {
	Reask     time.Duration // an unanswered request is sent again after this (2 s)
	BusyPause time.Duration // after "busy" or "internal" the range is asked again after this (1 s)
}

// Result says how a download went.
type Result struct {
	Image    []byte
	Requests int // requests sent, re-asks included
	Reasks   int // requests sent again after a timeout
	Busy     int // "busy" or "internal" answers
	Corrupt  int // frames that failed their checksum
	Stray    int // frames for another transfer or a range not outstanding (duplicates)
}

// ErrRefused is returned (wrapped) by Download when the server answers "range" or "no-job".
var ErrRefused = errors.New("transfer refused")

type pending struct {
	n      int
	due    time.Time // when to send (again)
	paused bool      // due is the end of a pause after "busy", not a timeout
}

// Download fetches j from offset 0 and returns the image. It stops at the first "range" or
// "no-job" answer, when the connection fails, or with ctx.
func (d *Device) Download(ctx context.Context, j Job, opts Options) (Result, error) {
	if opts.Reask <= 0 {
		opts.Reask = 2 * time.Second
	}
	if opts.BusyPause <= 0 {
		opts.BusyPause = time.Second
	}
	if j.Chunk <= 0 || j.Window <= 0 || j.Size <= 0 {
		return Result{}, fmt.Errorf("download %s: bad job %+v", j.Job, j)
	}
	d.startReader()
	res := Result{Image: make([]byte, j.Size)}
	out := make(map[int64]*pending, j.Window)
	var next, got int64
	timer := time.NewTimer(time.Hour)
	defer timer.Stop()

	send := func(off int64, p *pending, now time.Time) error {
		res.Requests++
		p.due = now.Add(opts.Reask)
		return d.Request(j.Job, off, p.n)
	}
	for got < j.Size {
		now := time.Now()
		for len(out) < j.Window && next < j.Size {
			p := &pending{n: int(min(int64(j.Chunk), j.Size-next))}
			out[next] = p
			if err := send(next, p, now); err != nil {
				return res, fmt.Errorf("download %s: request: %w", j.Job, err)
			}
			next += int64(j.Chunk)
		}
		earliest := now.Add(time.Hour)
		for off, p := range out {
			if !p.due.After(now) {
				if !p.paused {
					res.Reasks++
				}
				p.paused = false
				if err := send(off, p, now); err != nil {
					return res, fmt.Errorf("download %s: request: %w", j.Job, err)
				}
			}
			if p.due.Before(earliest) {
				earliest = p.due
			}
		}
		timer.Reset(earliest.Sub(now))
		select {
		case <-ctx.Done():
			return res, fmt.Errorf("download %s: %d of %d bytes: %w", j.Job, got, j.Size, ctx.Err())
		case fr, ok := <-d.frames:
			if !ok {
				return res, fmt.Errorf("download %s: connection: %w", j.Job, d.readErr)
			}
			err := d.handleFrame(fr.payload, j, out, &res, &got, opts)
			select {
			case d.free <- fr:
			default:
			}
			if err != nil {
				return res, err
			}
		case <-timer.C:
		}
	}
	return res, nil
}

// handleFrame takes in one chunk topic payload b; an error ends the download.
func (d *Device) handleFrame(b []byte, j Job, out map[int64]*pending, res *Result, got *int64, opts Options) error {
	f, err := protocol.ParseFrame(b)
	if err != nil {
		res.Corrupt++
		// The header may be what is corrupt; an intact one names the range to re-ask.
		if len(b) >= protocol.FrameHeaderSize && binary.BigEndian.Uint32(b[4:]) == j.Transfer {
			if p := out[int64(binary.BigEndian.Uint32(b[8:]))]; p != nil {
				p.due = time.Now()
				p.paused = true // not a timeout
			}
		}
		return nil
	}
	off := int64(f.Offset)
	p := out[off]
	if f.Transfer != j.Transfer || p == nil {
		res.Stray++
		return nil
	}
	if f.Kind == protocol.FrameError {
		switch code := string(f.Payload); code {
		case protocol.ErrCodeBusy, protocol.ErrCodeInternal:
			res.Busy++
			p.due = time.Now().Add(opts.BusyPause)
			p.paused = true
			return nil
		default:
			return fmt.Errorf("download %s at %d: %w: %q", j.Job, off, ErrRefused, code)
		}
	}
	if len(f.Payload) != p.n {
		res.Stray++
		return nil
	}
	copy(res.Image[off:], f.Payload)
	*got += int64(p.n)
	delete(out, off)
	return nil
}

func mqttString(b []byte, s string) []byte {
	b = binary.BigEndian.AppendUint16(b, uint16(len(s)))
	return append(b, s...)
}

func packet(typeFlags byte, body []byte) []byte {
	b := []byte{typeFlags}
	for n := len(body); ; {
		c := byte(n % 128)
		n /= 128
		if n > 0 {
			c |= 0x80
		}
		b = append(b, c)
		if n == 0 {
			break
		}
	}
	return append(b, body...)
}
