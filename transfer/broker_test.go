package transfer_test

import (
	"bytes"
	"context"
	"crypto/sha256"
	"encoding/hex"
	"errors"
	"fmt"
	"log/slog"
	"os"
	"path/filepath"
	"runtime"
	"strconv"
	"strings"
	"sync"
	"sync/atomic"
	"testing"
	"time"

	"github.com/fota-dev/fota/broker"
	"github.com/fota-dev/fota/certs/certstest"
	"github.com/fota-dev/fota/fotatest"
	"github.com/fota-dev/fota/protocol"
	"github.com/fota-dev/fota/transfer"
	"github.com/fota-dev/fota/transfer/transfertest"
)

var _ transfer.Sender = (*broker.Broker)(nil)

// fileArtifacts serves one image through its file.
type fileArtifacts struct {
	sha string
	f   *os.File
}

func (a fileArtifacts) ReadAt(sha string, p []byte, off int64) (int, error) {
	if sha != a.sha {
		return 0, errors.New("no such artifact")
	}
	return a.f.ReadAt(p, off)
}

// counting passes frames on to the broker's Send and keeps, per device, the data frame bytes
// it was asked to send and those written, and how many Sends were in progress at once.
type counting struct {
	b *broker.Broker

	mu  sync.Mutex
	dev map[string]*sends
}

type sends struct {
	attempted, written int64     // data frame bytes
	failed             int       // Sends that returned an error
	active, maxActive  int       // Sends in progress, now and at most
	since              time.Time // when the Send in progress started
}

func (c *counting) Send(topic string, payload []byte) error {
	d, _, _ := protocol.ParseTopic(topic)
	data := len(payload) > 1 && payload[1] == protocol.FrameData
	c.mu.Lock()
	s := c.dev[d]
	if s == nil {
		s = &sends{}
		c.dev[d] = s
	}
	s.active++
	s.maxActive = max(s.maxActive, s.active)
	s.since = time.Now()
	if data {
		s.attempted += int64(len(payload))
	}
	c.mu.Unlock()

	err := c.b.Send(topic, payload)

	c.mu.Lock()
	defer c.mu.Unlock()
	s.active--
	switch {
	case err != nil:
		s.failed++
	case data:
		s.written += int64(len(payload))
	}
	return err
}

func (c *counting) get(device string) sends {
	c.mu.Lock()
	defer c.mu.Unlock()
	if s := c.dev[device]; s != nil {
		return *s
	}
	return sends{}
}

// socketBuffers is the most the kernel may buffer on a loopback connection that is not read:
// the largest send buffer plus the largest receive buffer.
func socketBuffers(t *testing.T) int64 {
	var total int64
	for _, name := range []string{"tcp_wmem", "tcp_rmem"} {
		b, err := os.ReadFile("/proc/sys/net/ipv4/" + name)
		fields := strings.Fields(string(b))
		if err != nil || len(fields) != 3 {
			t.Logf("no %s (%v): assuming 32 MiB", name, err)
			total += 32 << 20
			continue
		}
		n, err := strconv.ParseInt(fields[2], 10, 64)
		if err != nil {
			t.Fatalf("%s: %v", name, err)
		}
		total += n
	}
	return total
}

// TestFrozenDeviceDoesNotStallOthers runs 50 devices downloading the whole image through the
// real broker while one more device asks for chunks as fast as it can and never reads its
// socket. The frozen device's frame waits in the broker's Send on its own connection's
// goroutine: the 50 must all finish, with the right bytes, while it is stuck there; the broker's
// write timeout must then disconnect it; and it must have been handed no more than its socket
// buffers hold, with the process's heap bounded.
func TestFrozenDeviceDoesNotStallOthers(t *testing.T) {
	if testing.Short() {
		t.Skip("50 TLS devices; skipped with -short")
	}
	const (
		devices      = 50
		writeTimeout = 2 * time.Second
		frame        = protocol.FrameHeaderSize + protocol.DefaultChunkSize
	)
	path := filepath.Join("..", "..", "shared", "firmware", "pybricks-primehub-7.28.0.bin")
	data, err := os.ReadFile(path)
	if err != nil {
		t.Fatal(err)
	}
	f, err := os.Open(path)
	if err != nil {
		t.Fatal(err)
	}
	t.Cleanup(func() { _ = f.Close() }) // after the servers' Close: a Handle may read until then
	sum := sha256.Sum256(data)
	sha := hex.EncodeToString(sum[:])
	size := int64(len(data))

	ca := certstest.New(t)
	log := slog.New(slog.NewTextHandler(t.Output(), &slog.HandlerOptions{Level: slog.LevelError}))
	b, err := broker.New(broker.Options{Addr: "127.0.0.1:0", TLS: ca.ServerTLS(t), Logger: log, WriteTimeout: writeTimeout})
	if err != nil {
		t.Fatal(err)
	}
	out := &counting{b: b, dev: make(map[string]*sends)}
	srv, err := transfer.New(transfer.Options{
		Lookup: func(d string) (transfer.Transfer, bool) {
			return transfer.Transfer{Job: "job-" + d, ID: 42, SHA256: sha, Size: size, ChunkMax: protocol.DefaultChunkSize}, true
		},
		Artifacts: fileArtifacts{sha, f},
		Sender:    out,
		Logger:    log,
	})
	if err != nil {
		t.Fatal(err)
	}
	t.Cleanup(func() {
		// The broker first, as transfer's Close asks: that ends a Send still blocked.
		ctx, cancel := context.WithTimeout(context.Background(), 10*time.Second)
		defer cancel()
		if err := b.Close(ctx); err != nil {
			t.Errorf("broker Close: %v", err)
		}
		if err := srv.Close(ctx); err != nil {
			t.Errorf("transfer Close: %v", err)
		}
	})
	if err := b.Start(); err != nil {
		t.Fatal(err)
	}
	if err := b.Subscribe(protocol.SuffixRequest, srv.Handle); err != nil {
		t.Fatal(err)
	}

	ctx, cancel := context.WithTimeout(context.Background(), 60*time.Second)
	defer cancel()
	addr := b.Addr().String()
	devs := make([]*transfertest.Device, devices)
	for i := range devs {
		id := fmt.Sprintf("dev-%02d", i)
		d, err := transfertest.Dial(ctx, addr, ca.DeviceTLS(t, id, "primehub"), id)
		if err != nil {
			t.Fatal(err)
		}
		t.Cleanup(func() { _ = d.Close() })
		devs[i] = d
	}

	// download has every device fetch the image once, all devices at once.
	download := func(phase string) time.Duration {
		t.Helper()
		start := time.Now()
		errs := make([]error, devices)
		var wg sync.WaitGroup
		for i, d := range devs {
			wg.Go(func() {
				j := transfertest.Job{Job: "job-" + d.ID, Transfer: 42, Size: size, Chunk: protocol.DefaultChunkSize, Window: protocol.DefaultWindow}
				// Timeouts shorter than PROTOCOL.md's, so a lost frame costs the test little.
				r, err := d.Download(ctx, j, transfertest.Options{Reask: 500 * time.Millisecond, BusyPause: 100 * time.Millisecond})
				if err == nil && !bytes.Equal(r.Image, data) {
					err = errors.New("image differs")
				}
				errs[i] = err
			})
		}
		wg.Wait()
		for i, err := range errs {
			if err != nil {
				t.Fatalf("%s: device %s: %v", phase, devs[i].ID, err)
			}
		}
		return time.Since(start)
	}

	alone := download("without the frozen device") // also pays for pools, page cache and TLS state
	runtime.GC()
	var ms runtime.MemStats
	runtime.ReadMemStats(&ms)
	base, baseLive := ms.HeapInuse, ms.HeapAlloc

	// The frozen device subscribes, then only asks, for the whole image over and over, until
	// its own socket is full or the broker closes it.
	const frozenID = "frozen"
	frozen, err := transfertest.Dial(ctx, addr, ca.DeviceTLS(t, frozenID, "primehub"), frozenID)
	if err != nil {
		t.Fatal(err)
	}
	stop := make(chan struct{})
	var asked atomic.Int64
	var peak atomic.Uint64
	var bg sync.WaitGroup
	t.Cleanup(func() { _ = frozen.Close(); bg.Wait() })
	bg.Go(func() {
		for {
			for off := int64(0); off < size; off += protocol.DefaultChunkSize {
				if err := frozen.Request("job-"+frozenID, off, protocol.DefaultChunkSize); err != nil {
					return // the broker closed it, or its socket stayed full
				}
				asked.Add(1)
			}
		}
	})
	bg.Go(func() { // samples the heap in use while the frozen device is stuck
		var ms runtime.MemStats
		for {
			runtime.ReadMemStats(&ms)
			if ms.HeapInuse > peak.Load() {
				peak.Store(ms.HeapInuse)
			}
			select {
			case <-stop:
				return
			case <-time.After(20 * time.Millisecond):
			}
		}
	})
	stopSampling := sync.OnceFunc(func() { close(stop) })
	defer stopSampling()

	// Stuck: a Send to it in progress for a while. A device that reads takes a frame in well
	// under a millisecond; one whose socket is full never does.
	var stuck sends
	fotatest.WaitFor(t, 20*time.Second, "frozen device stuck in Send", func() bool {
		stuck = out.get(frozenID)
		return stuck.active == 1 && time.Since(stuck.since) > 100*time.Millisecond
	})
	with := download("with the frozen device")
	now := out.get(frozenID)
	if !b.Connected(frozenID) || now.active != 1 || !now.since.Equal(stuck.since) {
		t.Fatalf("the frozen device was not stuck in one Send throughout: connected %v, %d Sends in progress, the one from %v (before: %v); the downloads took %v, the write timeout is %v",
			b.Connected(frozenID), now.active, now.since, stuck.since, with, writeTimeout)
	}
	// What stays while the device is still stuck: one frame and little else.
	runtime.GC()
	runtime.ReadMemStats(&ms)
	live := int64(ms.HeapAlloc) - int64(baseLive)
	stopSampling()
	growth := int64(peak.Load()) - int64(base)

	fotatest.WaitFor(t, 3*writeTimeout, "frozen device disconnected by the write timeout", func() bool { return !b.Connected(frozenID) })
	fotatest.WaitFor(t, 10*time.Second, "no frame bytes in flight", func() bool { return srv.Stats().Inflight == 0 })
	bg.Wait() // its Request fails once the broker closed it

	st := srv.Stats()
	fz := out.get(frozenID)
	buffers := socketBuffers(t)
	t.Logf("50 devices: %v alone, %v with a frozen device (ratio %.2f)", alone.Round(time.Millisecond), with.Round(time.Millisecond), with.Seconds()/alone.Seconds())
	t.Logf("frozen device: asked %d chunks (%d MiB), %d KiB written to it (socket buffers at most %d KiB), %d KiB attempted, %d Sends failed; server dropped %d; heap in use grew %d KiB at most, live heap %d KiB",
		asked.Load(), asked.Load()*protocol.DefaultChunkSize>>20, fz.written>>10, buffers>>10, fz.attempted>>10, fz.failed, st.Dropped, growth>>10, live>>10)

	if fz.written > buffers+frame {
		t.Errorf("frozen device was written %d bytes, want at most its socket buffers (%d) and a frame", fz.written, buffers)
	}
	if fz.written == 0 || fz.failed == 0 || st.Dropped == 0 {
		t.Errorf("got %d bytes written to the frozen device, %d failed Sends, %d dropped; want some of each", fz.written, fz.failed, st.Dropped)
	}
	if a := asked.Load() * protocol.DefaultChunkSize; a < 10*fz.attempted {
		t.Errorf("frozen device asked for %d bytes and was handed %d, want it to ask ten times more for a meaningful test", a, fz.attempted)
	}
	for _, d := range append(devs, frozen) {
		if s := out.get(d.ID); s.maxActive != 1 {
			t.Errorf("%s: got at most %d Sends at once, want 1", d.ID, s.maxActive)
		}
	}
	if st.BusyTotal != 0 {
		t.Errorf("got %d busy answers, want none under the default MaxInflight", st.BusyTotal)
	}
	// Fifty downloads' garbage fits well within these; frames queued for the frozen device
	// at the rate it asks would not.
	if max := int64(64 << 20); growth > max {
		t.Errorf("heap in use grew by %d MiB with a frozen device, want at most %d MiB", growth>>20, max>>20)
	}
	if max := int64(16 << 20); live > max {
		t.Errorf("live heap grew by %d MiB with a frozen device, want at most %d MiB", live>>20, max>>20)
	}
}

// TestDeviceRateBoundsBytes downloads part of an image through the real broker with
// DeviceRate set, and checks what PROTOCOL.md promises a capped device: over any stretch of t
// seconds it gets at most one frame of the largest chunk + rate*t frame bytes; a frame the rate delays by at
// most 250 ms waits, and only a longer delay is answered "busy". Elapsed time is measured
// around the whole download, so the bound holds however slowly the machine runs.
func TestDeviceRateBoundsBytes(t *testing.T) {
	const (
		chunk = 16 << 10
		// The burst PROTOCOL.md states: one frame of the largest chunk.
		burst = protocol.MaxChunkSize + protocol.FrameHeaderSize
	)
	path := filepath.Join("..", "..", "shared", "firmware", "pybricks-primehub-7.28.0.bin")
	data, err := os.ReadFile(path)
	if err != nil {
		t.Fatal(err)
	}
	f, err := os.Open(path)
	if err != nil {
		t.Fatal(err)
	}
	t.Cleanup(func() { _ = f.Close() })
	sum := sha256.Sum256(data)
	sha := hex.EncodeToString(sum[:])
	ca := certstest.New(t)
	log := slog.New(slog.NewTextHandler(t.Output(), &slog.HandlerOptions{Level: slog.LevelError}))

	for _, tt := range []struct {
		name  string
		rate  int64 // bytes per second
		size  int64 // of the transfer: the image's first bytes
		paced bool  // some frames must have waited
		busy  bool  // some requests must have been answered "busy"; none otherwise
	}{
		// A 16 KiB frame is 63 ms at this rate: every frame past the burst waits, none is busy.
		{name: "frames wait their turn", rate: 256 << 10, size: 10 * chunk, paced: true},
		// Here a frame is 500 ms, above the 250 ms a request may wait: past the burst the
		// device hears "busy" and asks again later.
		{name: "busy beyond the wait", rate: 32 << 10, size: 6 * chunk, busy: true},
	} {
		t.Run(tt.name, func(t *testing.T) {
			b, err := broker.New(broker.Options{Addr: "127.0.0.1:0", TLS: ca.ServerTLS(t), Logger: log})
			if err != nil {
				t.Fatal(err)
			}
			srv, err := transfer.New(transfer.Options{
				Lookup: func(d string) (transfer.Transfer, bool) {
					return transfer.Transfer{Job: "job-1", ID: 7, SHA256: sha, Size: tt.size, ChunkMax: chunk}, true
				},
				Artifacts:  fileArtifacts{sha, f},
				Sender:     b,
				Logger:     log,
				DeviceRate: tt.rate,
			})
			if err != nil {
				t.Fatal(err)
			}
			t.Cleanup(func() {
				ctx, cancel := context.WithTimeout(context.Background(), 10*time.Second)
				defer cancel()
				if err := b.Close(ctx); err != nil {
					t.Errorf("broker Close: %v", err)
				}
				if err := srv.Close(ctx); err != nil {
					t.Errorf("transfer Close: %v", err)
				}
			})
			if err := b.Start(); err != nil {
				t.Fatal(err)
			}
			if err := b.Subscribe(protocol.SuffixRequest, srv.Handle); err != nil {
				t.Fatal(err)
			}
			ctx, cancel := context.WithTimeout(context.Background(), 60*time.Second)
			defer cancel()
			d, err := transfertest.Dial(ctx, b.Addr().String(), ca.DeviceTLS(t, "dev-1", "primehub"), "dev-1")
			if err != nil {
				t.Fatal(err)
			}
			t.Cleanup(func() { _ = d.Close() })

			start := time.Now()
			j := transfertest.Job{Job: "job-1", Transfer: 7, Size: tt.size, Chunk: chunk, Window: protocol.DefaultWindow}
			r, err := d.Download(ctx, j, transfertest.Options{Reask: 5 * time.Second, BusyPause: 50 * time.Millisecond})
			elapsed := time.Since(start)
			if err != nil {
				t.Fatal(err)
			}
			if !bytes.Equal(r.Image, data[:tt.size]) {
				t.Fatal("downloaded bytes differ from the image")
			}
			// Counters are added after a frame is written: wait for the last one's.
			fotatest.WaitFor(t, 10*time.Second, "no frame bytes in flight", func() bool { return srv.Stats().Inflight == 0 })
			st := srv.Stats()
			sent := int64(st.Bytes) + int64(st.Chunks)*protocol.FrameHeaderSize
			bound := float64(tt.rate)*elapsed.Seconds() + burst
			t.Logf("rate %d B/s: %d frame bytes in %v (bound %.0f); %d requests, %d paced, %d busy",
				tt.rate, sent, elapsed.Round(time.Millisecond), bound, st.Requests, st.Paced, st.BusyRate)
			if float64(sent) > bound {
				t.Errorf("got %d frame bytes in %v, want at most burst %d + rate %d x elapsed = %.0f",
					sent, elapsed, burst, tt.rate, bound)
			}
			if tt.paced && st.Paced == 0 {
				t.Errorf("got no paced request, want frames past the burst to wait")
			}
			if tt.busy != (st.BusyRate > 0) || uint64(r.Busy) != st.BusyRate {
				t.Errorf("got %d busy answers (device saw %d), want some: %v", st.BusyRate, r.Busy, tt.busy)
			}
		})
	}
}
