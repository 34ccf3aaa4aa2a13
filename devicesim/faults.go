package devicesim

import (
	"errors"
	"fmt"
	"hash/fnv"
	"math"
	"math/rand/v2"
	"time"

	"github.com/fota-dev/fota/protocol"
)

// Sessions ended by a fault. Run handles both; they never leave the package.
var (
	errCut       = errors.New("connection cut (disconnect fault)")
	errPowerLoss = errors.New("power lost (power-loss fault)")
)

// checkFaults refuses fault settings that mean nothing.
func checkFaults(cfg Config) error {
	for _, r := range []struct {
		name string
		p    float64
	}{
		{"drop rate", cfg.DropRate}, {"corrupt rate", cfg.CorruptRate},
		{"power-loss rate", cfg.PowerLossRate}, {"fail-install rate", cfg.FailInstallRate},
	} {
		if math.IsNaN(r.p) || r.p < 0 || r.p > 1 {
			return fmt.Errorf("%s %v: want a probability in [0, 1]", r.name, r.p)
		}
	}
	if cfg.DisconnectEvery < 0 {
		return fmt.Errorf("disconnect every %d chunks: want 0 (never) or more", cfg.DisconnectEvery)
	}
	if cfg.Rate < 0 {
		return fmt.Errorf("rate %d bytes/s: want 0 (no limit) or more", cfg.Rate)
	}
	return nil
}

// newRand returns the faults' generator of device id: repeatable for a non-zero seed, and
// different for each device of a fleet that shares it.
func newRand(seed uint64, id string) *rand.Rand {
	if seed == 0 {
		seed = rand.Uint64()
	}
	h := fnv.New64a()
	h.Write([]byte(id))
	return rand.New(rand.NewPCG(seed, h.Sum64()))
}

// chance reports whether an event of probability p happens. It draws nothing for p == 0, so
// enabling one fault does not change where the others strike.
func (d *Device) chance(p float64) bool {
	return p > 0 && d.rng.Float64() < p
}

// onFrame applies the faults to a chunk frame as it arrives, then handles it. It returns
// errPowerLoss or errCut when a fault ends the session.
func (d *Device) onFrame(s *session, b []byte, now time.Time) error {
	d.stats.frames.Add(1)
	// Power is lost only in the middle of a download, where it costs something: a frame
	// that arrives before the offer (one the broker routed to this connection in answer to
	// the previous one's requests) would otherwise count a loss that interrupted nothing.
	if j := d.job; j != nil && j.state == protocol.StateDownloading && d.chance(d.cfg.PowerLossRate) {
		d.stats.powerLosses.Add(1)
		return errPowerLoss
	}
	switch {
	case d.chance(d.cfg.DropRate):
		d.stats.dropped.Add(1)
	default:
		if len(b) > protocol.FrameHeaderSize && d.chance(d.cfg.CorruptRate) {
			i := protocol.FrameHeaderSize + d.rng.IntN(len(b)-protocol.FrameHeaderSize)
			b[i] ^= byte(1 + d.rng.IntN(255))
			d.stats.corrupted.Add(1)
		}
		d.onChunk(s, b, now)
	}
	if n := d.cfg.DisconnectEvery; n > 0 && !d.reboot {
		d.frames++
		if d.frames%int64(n) == 0 {
			d.stats.disconnects.Add(1)
			return errCut
		}
	}
	return nil
}

// bucket is the token bucket of Config.Rate: requests spend their length in tokens, which
// come back at rate per second, up to one chunk.
type bucket struct {
	rate   float64 // tokens per second; 0: no limit
	tokens float64
	last   time.Time
}

// allow returns the rate limit's check for a download in ranges of chunkSize, or nil when
// there is no limit. It starts with a full bucket, so that from any instant t0 the device asks
// for at most chunkSize + rate*(t-t0) bytes by time t.
func (b *bucket) allow(chunkSize int, now time.Time) func(n int) bool {
	if b.rate <= 0 {
		return nil
	}
	burst := float64(chunkSize)
	if b.last.IsZero() {
		b.tokens = burst
	} else {
		b.tokens = min(burst, b.tokens+b.rate*now.Sub(b.last).Seconds())
	}
	b.last = now
	return func(n int) bool {
		if b.tokens < float64(n) {
			return false
		}
		b.tokens -= float64(n)
		return true
	}
}
