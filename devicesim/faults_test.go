package devicesim_test

import (
	"context"
	"crypto/tls"
	"strings"
	"testing"
	"time"

	"github.com/fota-dev/fota/devicesim"
	"github.com/fota-dev/fota/fotatest"
	"github.com/fota-dev/fota/protocol"
)

// TestFaults checks that each fault has the effect it promises, as the server sees it.
func TestFaults(t *testing.T) {
	f := newFixture(t)
	const dev = "dev-1"
	chunks := (len(f.newImg) + testChunk - 1) / testChunk
	tests := []struct {
		name   string
		config func(c *devicesim.Config)
		check  func(t *testing.T, s *updateServer, d *devicesim.Device, cfg devicesim.Config, r devicesim.Result)
	}{
		{
			name: "drop: lost frames are asked again after the timeout",
			config: func(c *devicesim.Config) {
				c.DropRate, c.Seed, c.RequestTimeout = 0.2, 1, 50*time.Millisecond
			},
			check: func(t *testing.T, s *updateServer, d *devicesim.Device, cfg devicesim.Config, r devicesim.Result) {
				st := d.Stats()
				if st.Dropped == 0 {
					t.Fatalf("dropped: got 0 frames, want some")
				}
				if got, want := len(s.requestLog(dev)), chunks+int(st.Dropped); got < want {
					t.Errorf("requests: got %d, want at least %d (%d chunks, %d dropped)", got, want, chunks, st.Dropped)
				}
			},
		},
		{
			name: "corrupt: a damaged frame is fetched again, alone",
			config: func(c *devicesim.Config) {
				// No timeouts: every request again is a corrupt frame's.
				c.CorruptRate, c.Seed, c.RequestTimeout = 0.3, 1, 5*time.Second
			},
			check: func(t *testing.T, s *updateServer, d *devicesim.Device, cfg devicesim.Config, r devicesim.Result) {
				st := d.Stats()
				if st.Corrupted == 0 {
					t.Fatalf("corrupted: got 0 frames, want some")
				}
				if got, want := len(s.requestLog(dev)), chunks+int(st.Corrupted); got != want {
					t.Errorf("requests: got %d, want %d (%d chunks, %d corrupted)", got, want, chunks, st.Corrupted)
				}
				if r.Bytes != int64(len(f.newImg)) {
					t.Errorf("bytes: got %d, want %d", r.Bytes, len(f.newImg))
				}
			},
		},
		{
			name: "fail-install: the install fails and the flash stays",
			config: func(c *devicesim.Config) {
				c.FailInstallRate, c.StateDir = 1, t.TempDir()
			},
			check: func(t *testing.T, s *updateServer, d *devicesim.Device, cfg devicesim.Config, r devicesim.Result) {
				if r.State != protocol.StateFailed || !strings.HasPrefix(r.Reason, protocol.ReasonInstall+": ") {
					t.Errorf("result: got %s %q, want failed %q", r.State, r.Reason, protocol.ReasonInstall+": ...")
				}
				if got := d.Stats().FailedInstalls; got != 1 {
					t.Errorf("failed installs: got %d, want 1", got)
				}
				fotatest.WaitFor(t, 30*time.Second, "failed event", func() bool {
					evs := s.eventsOf(dev)
					return len(evs) > 0 && evs[len(evs)-1].State == protocol.StateFailed
				})
				evs := s.eventsOf(dev)
				if prev := evs[len(evs)-2]; prev.State != protocol.StateInstalling {
					t.Errorf("event before failed: got %s, want %s", prev.State, protocol.StateInstalling)
				}
				want := devicesim.State{Model: model, Version: oldVer, SHA256: shaHex(f.oldImg)}
				checkState(t, d, cfg.StateDir, want, f.oldImg)
			},
		},
		{
			name:   "max chunk: announced in status and never exceeded",
			config: func(c *devicesim.Config) { c.MaxChunk = 4 << 10 },
			check: func(t *testing.T, s *updateServer, d *devicesim.Device, cfg devicesim.Config, r devicesim.Result) {
				if got := s.statusesOf(dev)[0].MaxChunk; got != 4<<10 {
					t.Errorf("status max_chunk: got %d, want %d", got, 4<<10)
				}
				for _, req := range s.requestLog(dev) {
					if req.n > 4<<10 {
						t.Fatalf("request at %d: got %d bytes, want at most %d", req.off, req.n, 4<<10)
					}
				}
				if got, want := len(s.requestLog(dev)), (len(f.newImg)+4<<10-1)/(4<<10); got != want {
					t.Errorf("requests: got %d, want %d", got, want)
				}
			},
		},
	}
	for _, tt := range tests {
		t.Run(tt.name, func(t *testing.T) {
			t.Parallel()
			s := newUpdateServer(t, f.ca.ServerTLS(t), f.newImg, offerFor(t, f.newImg, newVer), nil)
			cfg := f.device(t, s, dev, oldVer, f.oldImg)
			tt.config(&cfg)
			d := startDevice(t, cfg)
			r := waitDone(t, d)
			if cfg.FailInstallRate == 0 && r.State != protocol.StateInstalled {
				t.Fatalf("result: got %s (%s), want installed", r.State, r.Reason)
			}
			tt.check(t, s, d, cfg, r)
		})
	}
}

// TestRateLimit caps a device's requests and checks, request by request as the server
// receives them, that it never asked for more than one chunk plus the rate times the time
// since it started. Slowness elsewhere can only make the bound easier to meet.
func TestRateLimit(t *testing.T) {
	f := newFixture(t)
	const rate = 512 << 10
	s := newUpdateServer(t, f.ca.ServerTLS(t), f.newImg, offerFor(t, f.newImg, newVer), nil)
	cfg := f.device(t, s, "dev-1", oldVer, f.oldImg)
	cfg.Rate = rate
	start := time.Now()
	d := startDevice(t, cfg)
	if r := waitDone(t, d); r.State != protocol.StateInstalled {
		t.Fatalf("result: got %s (%s), want installed", r.State, r.Reason)
	}
	var asked int64
	for i, req := range s.requestLog("dev-1") {
		asked += int64(req.n)
		allowed := testChunk + int64(rate*req.at.Sub(start).Seconds())
		if asked > allowed {
			t.Fatalf("request %d, %v after the start: got %d bytes asked, want at most %d", i, req.at.Sub(start), asked, allowed)
		}
	}
	if asked < int64(len(f.newImg)) {
		t.Errorf("asked: got %d bytes, want the image's %d", asked, len(f.newImg))
	}
}

// TestNewRefusesBadFaults checks the fault settings New accepts.
func TestNewRefusesBadFaults(t *testing.T) {
	f := newFixture(t)
	for name, change := range map[string]func(c *devicesim.Config){
		"negative drop rate":     func(c *devicesim.Config) { c.DropRate = -0.1 },
		"corrupt rate above 1":   func(c *devicesim.Config) { c.CorruptRate = 1.5 },
		"power-loss rate NaN":    func(c *devicesim.Config) { c.PowerLossRate = nan() },
		"fail-install rate 2":    func(c *devicesim.Config) { c.FailInstallRate = 2 },
		"negative disconnect":    func(c *devicesim.Config) { c.DisconnectEvery = -1 },
		"negative rate":          func(c *devicesim.Config) { c.Rate = -1 },
		"max chunk below 1 KiB":  func(c *devicesim.Config) { c.MaxChunk = 512 },
		"max chunk above 64 KiB": func(c *devicesim.Config) { c.MaxChunk = 128 << 10 },
		"negative sync":          func(c *devicesim.Config) { c.SyncEvery = -1 },
	} {
		t.Run(name, func(t *testing.T) {
			cfg := devicesim.Config{
				ID: "dev-1", Model: model, Version: oldVer, PublicKey: releasePub,
				Broker: "127.0.0.1:8883", TLS: f.ca.DeviceTLS(t, "dev-1", model),
			}
			if _, err := devicesim.New(cfg); err != nil {
				t.Fatalf("valid config: got %v, want nil", err)
			}
			change(&cfg)
			if _, err := devicesim.New(cfg); err == nil {
				t.Errorf("got nil error, want one")
			}
		})
	}
}

func nan() float64 {
	var zero float64
	return zero / zero
}

// TestFleetWithFaults runs a fleet on a network that drops, damages and cuts: every device
// still installs the update.
func TestFleetWithFaults(t *testing.T) {
	f := newFixture(t)
	s := newUpdateServer(t, f.ca.ServerTLS(t), f.newImg, offerFor(t, f.newImg, newVer), nil)
	ctx, cancel := context.WithTimeout(context.Background(), 20*time.Second)
	defer cancel()
	rs, err := devicesim.RunFleet(ctx, devicesim.FleetConfig{
		N: 4, Model: model, Version: oldVer, Image: f.oldImg, PublicKey: releasePub, Broker: s.addr,
		TLSFor:         func(id string) (*tls.Config, error) { return f.ca.DeviceTLS(t, id, model), nil },
		UntilVersion:   newVer,
		RequestTimeout: 100 * time.Millisecond,
		DropRate:       0.05, CorruptRate: 0.05, DisconnectEvery: 7, Seed: 1,
	})
	if err != nil {
		t.Fatalf("RunFleet: %v", err)
	}
	var disconnects int
	for _, r := range rs {
		if r.State != protocol.StateInstalled || r.To != newVer {
			t.Errorf("%s: got %s (%s), want installed %s", r.ID, r.State, r.Reason, newVer)
		}
		if r.Requested <= int64(len(f.newImg)) {
			t.Errorf("%s: asked for %d bytes, want more than the image's %d after drops and cuts", r.ID, r.Requested, len(f.newImg))
		}
		disconnects += len(s.statusesOf(r.ID)) - 2 // one before the update, one after the reboot
	}
	if disconnects < len(rs) {
		t.Errorf("reconnects: got %d for %d devices, want at least one each", disconnects, len(rs))
	}
}
