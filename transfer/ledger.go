package transfer

import (
	"math"
	"sync"
	"time"
)

// The broker's Publish returns once a frame is queued for the device's connection, and says
// nothing when it is written, dropped from a full queue, or discarded with the connection. So
// the ledger keeps an estimate of each device's unwritten bytes: a leaky bucket that fills
// with every frame handed over and drains at the rate the device is assumed to read,
// DeviceRate. A frame goes out at once if the device's estimate stays within
// MaxInflightPerDevice; if it would go over, the frame is paced: held (as a request, no
// buffer) until the bucket has room, if that is within paceMax and the device has fewer than
// maxQueued frames held, and refused "busy" otherwise. The sum over devices, held frames
// included, must stay within MaxInflightTotal, or the request is refused "busy".
//
// Pacing rather than refusing matters: a device told "busy" pauses that range for a second or
// more (PROTOCOL.md), so refusing a device that merely reads faster than DeviceRate would drop
// it to a window of chunks per pause. Paced, it gets DeviceRate.
//
// What that guarantees, whatever a device does: over any interval t the server hands one
// device at most MaxInflightPerDevice + DeviceRate*t bytes of chunk frames, holds at most
// maxQueued requests for it, and all devices together get at most MaxInflightTotal above
// what they could have read at DeviceRate. What it does not: a device reading slower than
// DeviceRate, or not at all, is behind its estimate, and its real backlog sits in the broker.
// That backlog is bounded by the broker, not here: a full per-connection queue drops (QoS 0,
// counted by the broker), and a write blocked past the broker's write timeout closes the
// connection.
//
// Each device's bucket is kept as the instant it will be empty (clear), so draining needs no
// bookkeeping and an empty bucket with nothing held needs no entry.
type ledger struct {
	perDevice, total int64
	nsPerByte        float64
	now              func() time.Time

	mu      sync.Mutex
	devices map[string]*account // devices whose bucket may not be empty yet
	// sum is the sum of the accounts' counted, which is at least the true total: an account's
	// own drain is subtracted only when it is settled.
	sum       int64
	lastSweep time.Time
}

type account struct {
	clear   time.Time // when the bucket is empty, draining at the device rate
	counted int64     // this account's share of ledger.sum
	queued  int       // frames paced, not yet sent
}

// Pacing limits. paceMax is well below the 2 s after which a device asks again; maxQueued is
// a generous window: a device that follows the protocol never has more requests outstanding.
const (
	paceMax   = 250 * time.Millisecond
	maxQueued = 16
)

// Sweeps settle every account, for an exact total and to forget empty buckets. One runs at
// least every sweepEvery while requests come in, and when the total looks exceeded, but then
// at most every sweepMin: under overload the estimate errs towards "busy".
const (
	sweepEvery = time.Second
	sweepMin   = 5 * time.Millisecond
)

type verdict int

const (
	admitted verdict = iota
	overDevice
	overTotal
)

func newLedger(perDevice, total, rate int64, now func() time.Time) *ledger {
	return &ledger{
		perDevice: perDevice,
		total:     total,
		nsPerByte: 1e9 / float64(rate),
		now:       now,
		devices:   make(map[string]*account),
		lastSweep: now(),
	}
}

// debt is a's bytes still in flight at now.
func (l *ledger) debt(a *account, now time.Time) int64 {
	d := a.clear.Sub(now)
	if d <= 0 {
		return 0
	}
	// Rounded up, so a bucket is never reported empty before it is.
	return int64(math.Ceil(float64(d) / l.nsPerByte))
}

func (l *ledger) duration(n int64) time.Duration {
	return time.Duration(float64(n) * l.nsPerByte)
}

// settle brings a's share of sum down to its debt at now.
func (l *ledger) settle(a *account, now time.Time) int64 {
	d := min(l.debt(a, now), a.counted)
	l.sum -= a.counted - d
	a.counted = d
	return d
}

func (l *ledger) sweep(now time.Time) {
	l.lastSweep = now
	for id, a := range l.devices {
		if l.settle(a, now) == 0 && a.queued == 0 {
			delete(l.devices, id)
		}
	}
}

// reserve admits n more bytes for device, to be sent after delay (0: now), or says which
// limit refuses them. A delayed frame must be reported with sent when it goes out.
func (l *ledger) reserve(device string, n int64) (verdict, time.Duration) {
	now := l.now()
	l.mu.Lock()
	defer l.mu.Unlock()
	if now.Sub(l.lastSweep) >= sweepEvery {
		l.sweep(now)
	}
	a := l.devices[device]
	var debt int64
	if a != nil {
		debt = l.settle(a, now)
	}
	var delay time.Duration
	if over := debt + n - l.perDevice; over > 0 {
		// It fits once over bytes have drained.
		delay = l.duration(over)
		if delay > paceMax || (a != nil && a.queued >= maxQueued) {
			return overDevice, 0
		}
	}
	if l.sum+n > l.total && now.Sub(l.lastSweep) >= sweepMin {
		l.sweep(now)
		a = l.devices[device] // the sweep may have forgotten an empty one
	}
	if l.sum+n > l.total {
		return overTotal, 0
	}
	if a == nil {
		a = &account{clear: now}
		l.devices[device] = a
	}
	if a.clear.Before(now) {
		a.clear = now
	}
	a.clear = a.clear.Add(l.duration(n))
	a.counted += n
	l.sum += n
	if delay > 0 {
		a.queued++
	}
	return admitted, delay
}

// sent records that a frame reserve delayed is no longer held.
func (l *ledger) sent(device string) {
	l.mu.Lock()
	defer l.mu.Unlock()
	if a := l.devices[device]; a != nil && a.queued > 0 {
		a.queued--
	}
}

// refund takes back n bytes reserved for device that were never handed over.
func (l *ledger) refund(device string, n int64) {
	now := l.now()
	l.mu.Lock()
	defer l.mu.Unlock()
	a := l.devices[device]
	if a == nil {
		return
	}
	a.clear = a.clear.Add(-l.duration(n))
	r := min(n, a.counted)
	a.counted -= r
	l.sum -= r
	if l.settle(a, now) == 0 && a.queued == 0 {
		delete(l.devices, device)
	}
}

// inflight is the estimated total in flight now.
func (l *ledger) inflight() int64 {
	now := l.now()
	l.mu.Lock()
	defer l.mu.Unlock()
	l.sweep(now)
	return l.sum
}
