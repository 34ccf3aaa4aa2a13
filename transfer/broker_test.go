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
	"sync"
	"sync/atomic"
	"testing"
	"time"

	"github.com/fota-dev/fota/broker"
	"github.com/fota-dev/fota/certs/certstest"
	"github.com/fota-dev/fota/protocol"
	"github.com/fota-dev/fota/transfer"
	"github.com/fota-dev/fota/transfer/transfertest"
)

var _ transfer.Publisher = (*broker.Broker)(nil)

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

// counting passes frames on to the broker and counts the bytes of data frames handed over per
// device (error frames are not counted in flight).
type counting struct {
	*broker.Broker
	mu    sync.Mutex
	bytes map[string]int64
}

func (c *counting) Publish(topic string, payload []byte, qos byte) error {
	err := c.Broker.Publish(topic, payload, qos)
	if d, _, ok := protocol.ParseTopic(topic); ok && err == nil && len(payload) > 1 && payload[1] == protocol.FrameData {
		c.mu.Lock()
		c.bytes[d] += int64(len(payload))
		c.mu.Unlock()
	}
	return err
}

func (c *counting) handed(device string) int64 {
	c.mu.Lock()
	defer c.mu.Unlock()
	return c.bytes[device]
}

// TestFrozenDeviceDoesNotStallOthers runs 50 devices downloading the whole image through the
// real broker twice, the second time while one more device asks for chunks as fast as it can
// and never reads its socket. All downloads must complete and match the image; the frozen
// device must be held to its in-flight allowance, and the process's heap must stay bounded.
func TestFrozenDeviceDoesNotStallOthers(t *testing.T) {
	if testing.Short() {
		t.Skip("50 TLS devices; skipped with -short")
	}
	const devices = 50
	path := filepath.Join("..", "..", "shared", "firmware", "pybricks-primehub-7.28.0.bin")
	data, err := os.ReadFile(path)
	if err != nil {
		t.Fatal(err)
	}
	f, err := os.Open(path)
	if err != nil {
		t.Fatal(err)
	}
	defer f.Close()
	sum := sha256.Sum256(data)
	sha := hex.EncodeToString(sum[:])
	size := int64(len(data))

	ca := certstest.New(t)
	log := slog.New(slog.NewTextHandler(t.Output(), &slog.HandlerOptions{Level: slog.LevelWarn}))
	b, err := broker.New(broker.Options{Addr: "127.0.0.1:0", TLS: ca.ServerTLS(t), Logger: log})
	if err != nil {
		t.Fatal(err)
	}
	if err := b.Start(); err != nil {
		t.Fatal(err)
	}
	t.Cleanup(func() {
		ctx, cancel := context.WithTimeout(context.Background(), 10*time.Second)
		defer cancel()
		if err := b.Close(ctx); err != nil {
			t.Errorf("broker Close: %v", err)
		}
	})
	pub := &counting{Broker: b, bytes: make(map[string]int64)}
	job := func(d string) transfer.Transfer {
		return transfer.Transfer{Job: "job-" + d, ID: 42, SHA256: sha, Size: size, ChunkMax: protocol.DefaultChunkSize}
	}
	// A device rate below what the frozen device asks for even under the race detector, so
	// that its allowance is what holds it back; still above what each of 50 devices gets here.
	const rate = 8 << 20
	srv, err := transfer.New(transfer.Options{
		Lookup:     func(d string) (transfer.Transfer, bool) { return job(d), true },
		Artifacts:  fileArtifacts{sha, f},
		Publisher:  pub,
		Logger:     log,
		DeviceRate: rate,
	})
	if err != nil {
		t.Fatal(err)
	}
	t.Cleanup(func() {
		if err := srv.Close(context.Background()); err != nil {
			t.Errorf("transfer Close: %v", err)
		}
	})
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

	// download has every device fetch the image three times, all devices at once, and returns
	// how long the last took: long enough a phase for the ratio to mean something.
	download := func(phase string) time.Duration {
		t.Helper()
		start := time.Now()
		errs := make([]error, devices)
		var wg sync.WaitGroup
		for i, d := range devs {
			wg.Go(func() {
				j := transfertest.Job{Job: "job-" + d.ID, Transfer: 42, Size: size, Chunk: protocol.DefaultChunkSize, Window: protocol.DefaultWindow}
				for range 3 {
					// Timeouts shorter than PROTOCOL.md's, so a lost frame costs the test little.
					r, err := d.Download(ctx, j, transfertest.Options{Reask: 500 * time.Millisecond, BusyPause: 100 * time.Millisecond})
					if err == nil && !bytes.Equal(r.Image, data) {
						err = errors.New("image differs")
					}
					if err != nil {
						errs[i] = err
						return
					}
				}
			})
		}
		wg.Wait()
		el := time.Since(start)
		for i, err := range errs {
			if err != nil {
				t.Fatalf("%s: device %s: %v", phase, devs[i].ID, err)
			}
		}
		return el
	}

	download("warm-up") // the first round pays for pools, page cache and TLS state
	alone := download("without the frozen device")
	runtime.GC()
	var ms runtime.MemStats
	runtime.ReadMemStats(&ms)
	base, baseLive := ms.HeapInuse, ms.HeapAlloc

	// The frozen device subscribes, then only asks: bursts of requests for the whole image four
	// times over, far beyond any window and faster than DeviceRate, until the others are done.
	frozenID := "frozen"
	frozen, err := transfertest.Dial(ctx, addr, ca.DeviceTLS(t, frozenID, "primehub"), frozenID)
	if err != nil {
		t.Fatal(err)
	}
	t.Cleanup(func() { _ = frozen.Close() })
	stop := make(chan struct{})
	var asked atomic.Int64
	var peak atomic.Uint64
	var bg sync.WaitGroup
	frozenStart := time.Now()
	bg.Go(func() {
		for {
			for range 4 {
				for off := int64(0); off < size; off += protocol.DefaultChunkSize {
					if err := frozen.Request("job-"+frozenID, off, protocol.DefaultChunkSize); err != nil {
						return // the broker gave up on it: also fine
					}
					asked.Add(1)
				}
			}
			select {
			case <-stop:
				return
			case <-time.After(20 * time.Millisecond):
			}
		}
	})
	bg.Go(func() {
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
	// The others start once the frozen device's socket buffers and broker queue are full: the
	// broker drops what the server hands it, and the server has refused it for its limit.
	deadline := time.Now().Add(20 * time.Second)
	for b.Stats().Dropped == 0 || srv.Stats().BusyDevice == 0 {
		if time.Now().After(deadline) {
			t.Fatalf("the frozen device's queue never filled: broker dropped %d, server busy %d", b.Stats().Dropped, srv.Stats().BusyDevice)
		}
		time.Sleep(5 * time.Millisecond)
	}
	filled := time.Since(frozenStart)
	with := download("with the frozen device")
	// What stays while the device is still stuck: its frames in the broker, and little else.
	runtime.GC()
	runtime.ReadMemStats(&ms)
	live := int64(ms.HeapAlloc) - int64(baseLive)
	close(stop)
	bg.Wait()
	frozenFor := time.Since(frozenStart)

	st := srv.Stats()
	bs := b.Stats()
	handed := pub.handed(frozenID)
	allowance := transfer.DefaultMaxInflightPerDevice + int64(frozenFor.Seconds()*rate)
	growth := int64(peak.Load()) - int64(base)
	t.Logf("50 devices: %v alone, %v with a frozen device (ratio %.2f)", alone.Round(time.Millisecond), with.Round(time.Millisecond), with.Seconds()/alone.Seconds())
	t.Logf("frozen device: queue full after %v; asked %d chunks (%d MiB) in %v, handed %d KiB to the broker (allowance %d KiB); server busy %d (device) %d (total); broker dropped %d; heap in use grew %d KiB at most, live heap %d KiB",
		filled.Round(time.Millisecond), asked.Load(), asked.Load()*protocol.DefaultChunkSize>>20, frozenFor.Round(time.Millisecond), handed>>10, allowance>>10, st.BusyDevice, st.BusyTotal, bs.Dropped, growth>>10, live>>10)

	if handed > allowance {
		t.Errorf("frozen device was handed %d bytes in %v, want at most %d", handed, frozenFor, allowance)
	}
	if asked.Load()*protocol.DefaultChunkSize <= allowance {
		t.Errorf("frozen device asked %d chunks, want more than its allowance of %d bytes for a meaningful test", asked.Load(), allowance)
	}
	// The garbage of fifty downloads and one broker queue of frames for the frozen device fit
	// well within these; an unbounded queue fed at DeviceRate would not.
	if max := int64(128 << 20); growth > max {
		t.Errorf("heap in use grew by %d MiB with a frozen device, want at most %d MiB", growth>>20, max>>20)
	}
	if max := int64(32 << 20); live > max {
		t.Errorf("live heap grew by %d MiB with a frozen device, want at most %d MiB", live>>20, max>>20)
	}
}
