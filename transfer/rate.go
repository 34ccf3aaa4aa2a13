package transfer

import (
	"sync"
	"time"
)

// rateLimiter caps each device's chunk bytes per second. Each device has a bucket that
// fills with every frame and drains at the rate; a frame goes out once the bucket, with the
// frame in it, holds at most burst bytes. A bucket is kept as the instant it will be empty,
// so draining needs no bookkeeping, and an empty one needs no entry: a sweep at most every
// second forgets them, so the map holds the devices that downloaded within about a second.
type rateLimiter struct {
	burst     time.Duration // the bucket's depth, as the time it takes to drain
	nsPerByte float64
	now       func() time.Time

	mu        sync.Mutex
	clear     map[string]time.Time // device -> when its bucket is empty
	lastSweep time.Time
}

const sweepEvery = time.Second

func newRateLimiter(rate, burst int64, now func() time.Time) *rateLimiter {
	r := &rateLimiter{nsPerByte: 1e9 / float64(rate), now: now, clear: make(map[string]time.Time), lastSweep: now()}
	r.burst = r.duration(burst)
	return r
}

func (r *rateLimiter) duration(n int64) time.Duration {
	return time.Duration(float64(n) * r.nsPerByte)
}

// take puts n bytes in device's bucket and returns how long to wait before sending them, or
// reports false, with nothing taken, when that wait would exceed limit.
func (r *rateLimiter) take(device string, n int64, limit time.Duration) (time.Duration, bool) {
	now := r.now()
	r.mu.Lock()
	defer r.mu.Unlock()
	if now.Sub(r.lastSweep) >= sweepEvery {
		r.lastSweep = now
		for id, c := range r.clear {
			if !c.After(now) {
				delete(r.clear, id)
			}
		}
	}
	c := r.clear[device]
	if c.Before(now) {
		c = now
	}
	end := c.Add(r.duration(n))
	wait := max(end.Sub(now)-r.burst, 0)
	if wait > limit {
		return 0, false
	}
	r.clear[device] = end
	return wait, true
}

// refund takes n bytes that were not sent out of device's bucket.
func (r *rateLimiter) refund(device string, n int64) {
	r.mu.Lock()
	defer r.mu.Unlock()
	if c, ok := r.clear[device]; ok {
		r.clear[device] = c.Add(-r.duration(n))
	}
}
