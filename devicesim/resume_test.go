package devicesim_test

import (
	"sync"
	"sync/atomic"
	"testing"
	"time"

	"github.com/fota-dev/fota/devicesim"
	"github.com/fota-dev/fota/fotatest"
	"github.com/fota-dev/fota/protocol"
)

// TestResume interrupts a transfer in the ways a device meets in the field and checks that it
// carries on from what it had rather than from the start. It measures the bytes the server
// sent again per interruption, from the requests the server received: at most one window
// (window x chunk) when the device's progress is current (a lost connection, a restart), and
// after a power loss also what arrived since the device's last checkpoint.
func TestResume(t *testing.T) {
	f := newFixture(t)
	const (
		chunk  = testChunk
		window = testWindow
		dev    = "dev-1"
	)
	size := int64(len(f.newImg))
	type run struct {
		t   *testing.T
		s   *updateServer
		cfg devicesim.Config
	}
	// kickOnce has the server drop the device's connection when the first request at or
	// past 8 chunks arrives, without answering it.
	kickOnce := func(s *updateServer, kicks *atomic.Int64, wg *sync.WaitGroup) {
		s.alter = func(dev string, req protocol.ChunkRequest, attempt int, frame []byte) [][]byte {
			if req.Offset < 8*chunk || !kicks.CompareAndSwap(0, 1) {
				return [][]byte{frame}
			}
			// Not from this goroutine: it is the client's own read loop, and closing the TLS
			// connection from it stalls for the 5 s close_notify timeout.
			wg.Go(func() { s.kick(dev) })
			return nil
		}
	}
	tests := []struct {
		name     string
		stateDir bool
		setup    func(s *updateServer, kicks *atomic.Int64, wg *sync.WaitGroup)
		config   func(c *devicesim.Config)
		// start runs the device, and returns the one that finishes the job.
		start func(r run) *devicesim.Device
		// interruptions counts them once the job is done.
		interruptions   func(d *devicesim.Device, kicks int64) int64
		perInterruption int64 // bytes sent again per interruption, at most
		fromScratch     bool  // each interruption starts the download over
	}{
		{
			name: "connection lost, in memory", setup: kickOnce,
			interruptions:   func(_ *devicesim.Device, kicks int64) int64 { return kicks },
			perInterruption: window * chunk,
		},
		{
			name: "connection lost, state dir", stateDir: true, setup: kickOnce,
			interruptions:   func(_ *devicesim.Device, kicks int64) int64 { return kicks },
			perInterruption: window * chunk,
		},
		{
			name:            "disconnect fault every 5 chunks",
			config:          func(c *devicesim.Config) { c.DisconnectEvery = 5 },
			interruptions:   func(d *devicesim.Device, _ int64) int64 { return d.Stats().Disconnects },
			perInterruption: window * chunk,
		},
		{
			name: "device restarted on its state dir", stateDir: true,
			start: func(r run) *devicesim.Device {
				_, stop := runDevice(r.t, r.cfg)
				fotatest.WaitFor(r.t, 30*time.Second, "half the transfer asked for", func() bool {
					log := r.s.requestLog(dev)
					return len(log) > 0 && log[len(log)-1].off >= 8*chunk
				})
				stop()
				return startDevice(r.t, r.cfg)
			},
			interruptions:   func(*devicesim.Device, int64) int64 { return 1 },
			perInterruption: window * chunk,
		},
		{
			name: "power loss, checkpoint every chunk", stateDir: true,
			config: func(c *devicesim.Config) {
				c.PowerLossRate, c.Seed, c.SyncEvery = 0.1, 3, chunk
			},
			interruptions:   func(d *devicesim.Device, _ int64) int64 { return d.Stats().PowerLosses },
			perInterruption: window * chunk,
		},
		{
			name: "power loss, default checkpoints", stateDir: true,
			config: func(c *devicesim.Config) {
				// Seed 2 strikes first at the 9th frame, after the first checkpoint: one
				// before it would rightly start over.
				c.PowerLossRate, c.Seed = 0.1, 2
			},
			interruptions: func(d *devicesim.Device, _ int64) int64 { return d.Stats().PowerLosses },
			// What arrived since the last checkpoint, less than DefaultSyncEvery, is lost too.
			perInterruption: devicesim.DefaultSyncEvery - chunk + window*chunk,
		},
		{
			name: "power loss in memory starts over",
			config: func(c *devicesim.Config) {
				c.PowerLossRate, c.Seed = 0.1, 3
			},
			interruptions: func(d *devicesim.Device, _ int64) int64 { return d.Stats().PowerLosses },
			fromScratch:   true,
		},
	}
	for _, tt := range tests {
		t.Run(tt.name, func(t *testing.T) {
			t.Parallel()
			var kicks atomic.Int64
			var wg sync.WaitGroup
			t.Cleanup(wg.Wait)
			s := newUpdateServer(t, f.ca.ServerTLS(t), f.newImg, offerFor(t, f.newImg, newVer), func(s *updateServer) {
				if tt.setup != nil {
					tt.setup(s, &kicks, &wg)
				}
			})
			cfg := f.device(t, s, dev, oldVer, f.oldImg)
			cfg.RequestTimeout = 5 * time.Second // no answer is late: every request again is the interruption's
			if tt.stateDir {
				cfg.StateDir = t.TempDir()
			}
			if tt.config != nil {
				tt.config(&cfg)
			}
			var d *devicesim.Device
			if tt.start != nil {
				d = tt.start(run{t, s, cfg})
			} else {
				d = startDevice(t, cfg)
			}
			r := waitDone(t, d)
			if r.State != protocol.StateInstalled || d.Version() != newVer {
				t.Fatalf("result: got %s (%s) on %s, want installed on %s", r.State, r.Reason, d.Version(), newVer)
			}
			n := tt.interruptions(d, kicks.Load())
			if n < 1 {
				t.Fatalf("interruptions: got %d, want at least 1", n)
			}
			again := s.askedBytes(dev) - size
			t.Logf("%s: %d interruptions, %d bytes sent again: %d per interruption (window %d bytes)", tt.name, n, again, again/n, window*chunk)
			if tt.fromScratch {
				if got := int64(s.requestsAt(dev, 0)); got != 1+n {
					t.Errorf("requests at offset 0: got %d, want %d (once, then once after each power loss)", got, 1+n)
				}
			} else {
				if again > n*tt.perInterruption {
					t.Errorf("sent again: got %d bytes for %d interruptions, want at most %d each", again, n, tt.perInterruption)
				}
				if got := s.requestsAt(dev, 0); got != 1 {
					t.Errorf("requests at offset 0: got %d, want 1 (resumed, not started over)", got)
				}
			}
			// Restarts neither reuse nor go back in event sequence numbers.
			fotatest.WaitFor(t, 30*time.Second, "installed event", func() bool {
				evs := s.eventsOf(dev)
				return len(evs) > 0 && evs[len(evs)-1].State == protocol.StateInstalled
			})
			var last uint64
			for i, ev := range s.eventsOf(dev) {
				if ev.Seq <= last {
					t.Errorf("event %d (%s): got seq %d after %d, want it to grow", i, ev.State, ev.Seq, last)
				}
				last = ev.Seq
			}
		})
	}
}

// TestResumeReportsJobInStatus checks the resumed device's status: after a restart in the
// middle of a download it reports the job it is at, so the server sends the same offer again.
func TestResumeReportsJobInStatus(t *testing.T) {
	f := newFixture(t)
	s := newUpdateServer(t, f.ca.ServerTLS(t), f.newImg, offerFor(t, f.newImg, newVer), nil)
	cfg := f.device(t, s, "dev-1", oldVer, f.oldImg)
	cfg.StateDir, cfg.Rate = t.TempDir(), 256<<10 // slow enough to stop it half way
	_, stop := runDevice(t, cfg)
	fotatest.WaitFor(t, 30*time.Second, "a few chunks asked for", func() bool { return len(s.requestLog("dev-1")) >= 4 })
	stop()
	d := startDevice(t, cfg)
	fotatest.WaitFor(t, 30*time.Second, "status of the restarted device", func() bool { return len(s.statusesOf("dev-1")) >= 2 })
	if st := s.statusesOf("dev-1")[1]; st.State != protocol.StateDownloading || st.Job != jobID {
		t.Errorf("status after the restart: got state %q job %q, want downloading %q", st.State, st.Job, jobID)
	}
	if r := waitDone(t, d); r.State != protocol.StateInstalled {
		t.Fatalf("result: got %s (%s), want installed", r.State, r.Reason)
	}
}
