package broker

import (
	"bufio"
	"context"
	"crypto/tls"
	"encoding/binary"
	"errors"
	"flag"
	"fmt"
	"io"
	"log/slog"
	"net"
	"os"
	"runtime"
	"runtime/pprof"
	"sync"
	"testing"
	"time"

	"github.com/fota-dev/fota/certs/certstest"
	"github.com/fota-dev/fota/protocol"
)

var (
	idleDevices = flag.Int("idle.devices", 1000, "devices BenchmarkIdleDevice connects to each server")
	idleProfile = flag.String("idle.heapprofile", "", "BenchmarkIdleDevice writes the heap profile of the idle fleet "+
		"to this file (and the baseline's to file.base); use with -memprofilerate=1 and a small -idle.devices")
)

// idleKeepalive is what the idle devices ask for: long enough that no keepalive expires while
// the benchmark measures (DefaultKeepaliveMax is 600).
const idleKeepalive = 300

// BenchmarkIdleDevice measures what one idle connected device costs in memory: it connects
// -idle.devices devices (CONNECT, SUBSCRIBE to their job and chunk topics) to the broker and,
// in the same run, to a plain crypto/tls server with the same TLS config that answers CONNACK
// and SUBACK and otherwise just reads. It reports, per device, the live heap and goroutine
// stacks after GC (B/device), and the goroutines; base- metrics are the plain server's.
//
// The devices are raw MQTT clients in the same process, one TLS connection and one read buffer
// each and no goroutine, identical for both servers: B/device includes that client side for
// both, so extra-B/device (fota minus baseline) is the broker's own excess, and goroutines are
// the servers' alone. The machine is shared: figures are noisy, compare them within one run.
//
//	go test ./broker/ -run '^$' -bench IdleDevice -benchtime 1x -idle.devices 2000
//
// and for what each device retains, by allocation site:
//
//	go test ./broker/ -run '^$' -bench IdleDevice -benchtime 1x -idle.devices 200 \
//	    -memprofilerate 1 -idle.heapprofile /tmp/idle.pprof
//	go tool pprof -sample_index inuse_space -top /tmp/idle.pprof
func BenchmarkIdleDevice(b *testing.B) {
	n := *idleDevices
	if n <= 0 {
		b.Fatalf("-idle.devices %d: want at least 1", n)
	}
	ca := certstest.New(b)
	serverTLS := ca.ServerTLS(b)
	ids := make([]string, n)
	cfgs := make([]*tls.Config, n)
	for i := range n {
		ids[i] = fmt.Sprintf("idle-%05d", i)
		cfgs[i] = ca.DeviceTLS(b, ids[i], "m")
	}
	baseProfile := ""
	if *idleProfile != "" {
		baseProfile = *idleProfile + ".base"
	}
	var fota, base idleCost
	for b.Loop() {
		base = measureIdle(b, ids, cfgs, baseProfile, func() (string, func()) {
			return startPlainTLS(b, serverTLS)
		})
		fota = measureIdle(b, ids, cfgs, *idleProfile, func() (string, func()) {
			return startIdleBroker(b, serverTLS)
		})
	}
	b.ReportMetric(fota.bytes(), "B/device")
	b.ReportMetric(fota.heap, "heap-B/device")
	b.ReportMetric(fota.stack, "stack-B/device")
	b.ReportMetric(fota.goroutines, "goroutines/device")
	b.ReportMetric(base.bytes(), "base-B/device")
	b.ReportMetric(base.heap, "base-heap-B/device")
	b.ReportMetric(base.stack, "base-stack-B/device")
	b.ReportMetric(base.goroutines, "base-goroutines/device")
	b.ReportMetric(fota.bytes()-base.bytes(), "extra-B/device")
	b.ReportMetric(fota.bytes()/base.bytes(), "ratio")
}

// idleCost is what one device adds, averaged over the fleet.
type idleCost struct {
	heap, stack, goroutines float64
}

func (c idleCost) bytes() float64 { return c.heap + c.stack }

// measureIdle starts a server, connects every device to it, and returns what the fleet added
// to the live heap, the goroutine stacks and the goroutines, per device.
func measureIdle(b *testing.B, ids []string, cfgs []*tls.Config, profile string, start func() (string, func())) idleCost {
	b.Helper()
	addr, stop := start()
	defer stop()

	before, beforeG := settledMem()
	clients := make([]*rawClient, 0, len(ids))
	defer func() {
		for _, rc := range clients {
			_ = rc.conn.Close()
		}
	}()
	for i, id := range ids {
		rc := mustDial(b, addr, cfgs[i])
		clients = append(clients, rc)
		code, err := rc.connect(id, connectOpts{keepalive: idleKeepalive})
		if err != nil || code != 0 {
			b.Fatalf("connect %s: got code %#x, err %v; want 0, nil", id, code, err)
		}
		got := rc.subscribe(protocol.Topic(id, protocol.SuffixJob), protocol.Topic(id, protocol.SuffixChunk))
		if string(got) != "\x01\x01" {
			b.Fatalf("subscribe %s: got SUBACK codes % x, want 01 01", id, got)
		}
	}
	after, afterG := settledMem()
	if profile != "" {
		writeHeapProfile(b, profile)
	}

	n := float64(len(ids))
	return idleCost{
		heap:       (float64(after.HeapAlloc) - float64(before.HeapAlloc)) / n,
		stack:      (float64(after.StackInuse) - float64(before.StackInuse)) / n,
		goroutines: float64(afterG-beforeG) / n,
	}
}

// settledMem collects garbage until goroutine stacks have shrunk to what they use (each GC
// halves a stack that uses under a quarter of it) and returns the memory statistics.
func settledMem() (runtime.MemStats, int) {
	var m runtime.MemStats
	for range 4 {
		runtime.GC()
	}
	runtime.ReadMemStats(&m)
	return m, runtime.NumGoroutine()
}

func writeHeapProfile(b *testing.B, path string) {
	b.Helper()
	f, err := os.Create(path)
	if err != nil {
		b.Fatalf("heap profile: %v", err)
	}
	defer f.Close()
	if err := pprof.Lookup("heap").WriteTo(f, 0); err != nil {
		b.Fatalf("heap profile: %v", err)
	}
}

// startIdleBroker starts a broker the way fota serve does, with no callbacks.
func startIdleBroker(b *testing.B, cfg *tls.Config) (string, func()) {
	b.Helper()
	br, err := New(Options{
		Addr:   "127.0.0.1:0",
		TLS:    cfg,
		Logger: slog.New(slog.NewTextHandler(io.Discard, nil)),
	})
	if err != nil {
		b.Fatalf("New: %v", err)
	}
	if err := br.Start(); err != nil {
		b.Fatalf("Start: %v", err)
	}
	return br.Addr().String(), func() {
		ctx, cancel := context.WithTimeout(context.Background(), 10*time.Second)
		defer cancel()
		if err := br.Close(ctx); err != nil {
			b.Errorf("Close: %v", err)
		}
	}
}

// startPlainTLS starts the baseline: a crypto/tls server with cfg that handshakes under the
// broker's connect timeout, answers CONNACK, SUBACK and PINGRESP, and otherwise just reads, on
// one goroutine per connection, as the bench suite's raw TLS server does.
func startPlainTLS(b *testing.B, cfg *tls.Config) (string, func()) {
	b.Helper()
	ln, err := net.Listen("tcp", "127.0.0.1:0")
	if err != nil {
		b.Fatalf("listen: %v", err)
	}
	var (
		wg    sync.WaitGroup
		mu    sync.Mutex
		conns = make(map[net.Conn]struct{})
	)
	wg.Go(func() {
		for {
			raw, err := ln.Accept()
			if err != nil {
				return
			}
			mu.Lock()
			conns[raw] = struct{}{}
			mu.Unlock()
			wg.Go(func() {
				defer raw.Close()
				servePlain(raw, cfg)
			})
		}
	})
	return ln.Addr().String(), func() {
		_ = ln.Close()
		mu.Lock()
		for c := range conns {
			_ = c.Close()
		}
		mu.Unlock()
		wg.Wait()
	}
}

func servePlain(raw net.Conn, cfg *tls.Config) {
	_ = raw.SetDeadline(time.Now().Add(DefaultConnectTimeout))
	tc := tls.Server(raw, cfg)
	if err := tc.Handshake(); err != nil {
		return
	}
	r := bufio.NewReader(tc)
	first := true
	for {
		typ, body, err := readPlainPacket(r)
		if err != nil {
			return
		}
		var reply []byte
		switch {
		case first && typ == typeConnect:
			reply = []byte{typeConnack, 2, 0, 0}
			_ = raw.SetDeadline(time.Time{})
			first = false
		case first:
			return
		case typ == typeSubscribe && len(body) >= 2:
			codes := 0
			for rest := body[2:]; len(rest) >= 2; codes++ {
				rest = rest[min(len(rest), 2+int(binary.BigEndian.Uint16(rest))+1):]
			}
			reply = append(varint([]byte{typeSuback}, 2+codes), body[:2]...)
			for range codes {
				reply = append(reply, 1)
			}
		case typ == typePingreq:
			reply = []byte{typePingresp, 0}
		}
		if reply != nil {
			if _, err := tc.Write(reply); err != nil {
				return
			}
		}
	}
}

// readPlainPacket reads one MQTT packet of at most 64 KiB.
func readPlainPacket(r *bufio.Reader) (byte, []byte, error) {
	typ, err := r.ReadByte()
	if err != nil {
		return 0, nil, err
	}
	n, shift := 0, 0
	for i := 0; ; i++ {
		d, err := r.ReadByte()
		if err != nil {
			return 0, nil, err
		}
		n |= int(d&0x7f) << shift
		shift += 7
		if d&0x80 == 0 {
			break
		}
		if i == 3 {
			return 0, nil, errors.New("bad remaining length")
		}
	}
	if n > 64<<10 {
		return 0, nil, errors.New("packet too large")
	}
	body := make([]byte, n)
	_, err = io.ReadFull(r, body)
	return typ, body, err
}

// TestJobBurstWhileWriting checks that the outbound queue, made short to save memory, holds
// more job messages than the controller ever has in flight to one device (one queued offer
// per device, a few offer workers), while the device's connection is busy: here its lock is
// held as Send holds it while writing a chunk frame, so nothing drains the queue. The burst
// is QoS 0: a QoS 1 publish waits for that lock (for a packet id) before it is queued.
func TestJobBurstWhileWriting(t *testing.T) {
	const id, burst = "dev-burst", 16
	f := newFixture(t, nil)
	rc := f.subscribed(id)
	f.b.mu.Lock()
	cl := f.b.live[id].c.client
	f.b.mu.Unlock()

	cl.Lock()
	var errs []error
	for i := range burst {
		if err := f.b.Publish(jobTopic(id), fmt.Appendf(nil, "job-%d", i), 0); err != nil {
			errs = append(errs, fmt.Errorf("publish %d: %w", i, err))
		}
	}
	dropped := f.b.Stats().Dropped
	cl.Unlock()
	if err := errors.Join(errs...); err != nil {
		t.Fatal(err)
	}
	if dropped != 0 {
		t.Fatalf("got %d messages dropped, want 0", dropped)
	}
	for i := range burst {
		topic, got, err := rc.nextPublish(ioTimeout)
		if err != nil {
			t.Fatalf("message %d: %v", i, err)
		}
		if want := fmt.Sprintf("job-%d", i); topic != jobTopic(id) || string(got) != want {
			t.Fatalf("message %d: got %q %q, want %q %q", i, topic, got, jobTopic(id), want)
		}
	}
}
