package broker

import (
	"net"
	"net/netip"
	"sync"
	"syscall"
	"time"
)

// Defaults for the limits in Options. A value of -1 in Options turns a limit off.
//
// They are far above what one address's devices do (a fleet behind one NAT reconnecting after
// a server restart, or hundreds of simulated devices on loopback) and far below what exhausts
// the process: with a pending cap, idle sockets that never finish their handshake cost at most
// that many descriptors for ConnectTimeout each, instead of every descriptor there is.
const (
	DefaultMaxPending          = 8192 // connections not yet authenticated, from all sources
	DefaultMaxPendingPerSource = 1024 // the same, from one source address (IPv6: one /64)
	DefaultAcceptRate          = 5000 // connections accepted per second, burst as many
	DefaultAcceptRatePerSource = 2000 // the same, from one source address (IPv6: one /64)

	// A device sends a status on connect and after an install, an event per job transition
	// and one progress event a second while downloading: a few a minute. A burst of 20 covers
	// a reconnect in the middle of a job with room to spare.
	DefaultMessageRate  = 5  // status and event messages per second from one device
	DefaultMessageBurst = 20 // and in one burst
	// DefaultMessageStrikes messages dropped within strikeWindow disconnect the device: a
	// device that keeps at it is broken or hostile, and its messages cost a decode each.
	DefaultMessageStrikes = 100

	DefaultLogInterval = 30 * time.Second
)

// strikeWindow is the window in which MessageStrikes drops disconnect a device.
const strikeWindow = 10 * time.Second

// Refusal causes, as they appear in logs.
const (
	causeSourcePending = "source-pending"
	causeSourceRate    = "source-rate"
	causePending       = "pending"
	causeRate          = "rate"
	causeTLS           = "tls"
	causeRevoked       = "revoked"
	causeTimeout       = "timeout"
	causeIdentity      = "identity"
	causeConnect       = "connect"
)

// RefusedBy counts connections closed before a session, by cause.
type RefusedBy struct {
	SourcePending uint64 // its source address had MaxPendingPerSource connections pending
	SourceRate    uint64 // its source address was over AcceptRatePerSource
	Pending       uint64 // MaxPending connections were pending
	Rate          uint64 // the listener was over AcceptRate
	TLS           uint64 // the TLS handshake failed (no or an unknown certificate, not TLS at all)
	Revoked       uint64 // the certificate is revoked
	Timeout       uint64 // handshake and CONNECT did not finish within ConnectTimeout
	Identity      uint64 // the certificate is not a device's
	Connect       uint64 // CONNECT refused (client id not the certificate's, will topic) or bad
}

func (r *RefusedBy) add(cause string) {
	switch cause {
	case causeSourcePending:
		r.SourcePending++
	case causeSourceRate:
		r.SourceRate++
	case causePending:
		r.Pending++
	case causeRate:
		r.Rate++
	case causeTLS:
		r.TLS++
	case causeRevoked:
		r.Revoked++
	case causeTimeout:
		r.Timeout++
	case causeIdentity:
		r.Identity++
	default:
		r.Connect++
	}
}

// bucket is a token bucket. The zero rate means no limit.
type bucket struct {
	rate, burst float64
	tokens      float64
	last        time.Time
}

func newBucket(rate, burst float64, now time.Time) bucket {
	return bucket{rate: rate, burst: burst, tokens: burst, last: now}
}

// take takes a token if there is one.
func (k *bucket) take(now time.Time) bool {
	if k.rate <= 0 {
		return true
	}
	k.refill(now)
	if k.tokens < 1 {
		return false
	}
	k.tokens--
	return true
}

func (k *bucket) refill(now time.Time) {
	if d := now.Sub(k.last); d > 0 {
		k.tokens = min(k.burst, k.tokens+d.Seconds()*k.rate)
		k.last = now
	}
}

// full reports whether the bucket is as it would be new, so forgetting it loses nothing.
func (k *bucket) full(now time.Time) bool {
	k.refill(now)
	return k.tokens >= k.burst
}

// gate admits accepted connections to the pending state, under the pending caps and accept
// rates, and releases them once they are authenticated or closed. Connections past
// authentication count against nothing here: however many sockets are pending, a device that
// gets through its handshake holds no pending slot, and the pending cap keeps descriptors
// free for devices (see effectivePendingCap).
type gate struct {
	maxPending, maxPerSource int // 0: no cap
	rate, perSourceRate      float64

	mu      sync.Mutex
	now     func() time.Time // time.Now; tests stop the clock
	pending int
	total   bucket
	sources map[netip.Prefix]*source
}

type source struct {
	pending int
	rate    bucket
}

// slot is one admitted connection's place in the pending count.
type slot struct {
	g    *gate
	src  netip.Prefix
	done bool // under g.mu
}

func newGate(o *Options) *gate {
	g := &gate{now: time.Now, sources: make(map[netip.Prefix]*source)}
	if o.MaxPending > 0 {
		g.maxPending = effectivePendingCap(o.MaxPending, nofileLimit())
	}
	g.maxPerSource = max(o.MaxPendingPerSource, 0)
	g.rate = float64(max(o.AcceptRate, 0))
	g.perSourceRate = float64(max(o.AcceptRatePerSource, 0))
	g.total = newBucket(g.rate, g.rate, g.now())
	return g
}

// effectivePendingCap keeps pending connections to half the descriptors the process may open,
// so that they can never take the descriptors authenticated devices need.
func effectivePendingCap(asked int, nofile uint64) int {
	if nofile == 0 {
		return asked
	}
	return int(min(uint64(asked), max(nofile/2, 1)))
}

func nofileLimit() uint64 {
	var rl syscall.Rlimit
	if err := syscall.Getrlimit(syscall.RLIMIT_NOFILE, &rl); err != nil {
		return 0
	}
	return rl.Cur
}

// sourceOf is the address a per-source limit applies to: the IPv4 address, or the /64 of an
// IPv6 address, which one subscriber usually holds whole.
func sourceOf(a net.Addr) netip.Prefix {
	ap, err := netip.ParseAddrPort(a.String())
	if err != nil {
		return netip.Prefix{}
	}
	ip := ap.Addr().Unmap()
	bits := 32
	if ip.Is6() {
		bits = 64
	}
	p, _ := ip.Prefix(bits)
	return p
}

// admit returns a slot for a connection from remote, or the cause of its refusal. Per-source
// limits are checked first, and a connection they refuse takes nothing from the totals, so
// that one source cannot spend the listener's accept rate or pending cap on its own.
func (g *gate) admit(remote net.Addr) (*slot, string) {
	src := sourceOf(remote)
	g.mu.Lock()
	defer g.mu.Unlock()
	now := g.now()
	s, known := g.sources[src]
	if !known {
		// Kept only once admitted: sources that are only ever refused, however many, take
		// no memory here.
		s = &source{rate: newBucket(g.perSourceRate, g.perSourceRate, now)}
	}
	switch {
	case g.maxPerSource > 0 && s.pending >= g.maxPerSource:
		return nil, causeSourcePending
	case !s.rate.take(now):
		return nil, causeSourceRate
	case g.maxPending > 0 && g.pending >= g.maxPending:
		return nil, causePending
	case !g.total.take(now):
		return nil, causeRate
	}
	s.pending++
	g.pending++
	if !known {
		g.sources[src] = s
	}
	return &slot{g: g, src: src}, ""
}

// release gives the slot back; later calls do nothing.
func (sl *slot) release() {
	if sl == nil {
		return
	}
	g := sl.g
	g.mu.Lock()
	defer g.mu.Unlock()
	if sl.done {
		return
	}
	sl.done = true
	g.pending--
	if s := g.sources[sl.src]; s != nil {
		s.pending--
	}
}

// sweep forgets sources with nothing pending and a full rate bucket. Run every second, it
// keeps the map to the sources admitted within about a second, which the accept rate bounds.
func (g *gate) sweep() {
	g.mu.Lock()
	defer g.mu.Unlock()
	now := g.now()
	for p, s := range g.sources {
		if s.pending == 0 && s.rate.full(now) {
			delete(g.sources, p)
		}
	}
}

// pendingNow is the number of pending connections.
func (g *gate) pendingNow() int {
	g.mu.Lock()
	defer g.mu.Unlock()
	return g.pending
}

// throttle limits one device's upstream status and event messages.
type throttle struct {
	mu          sync.Mutex
	bucket      bucket
	windowStart time.Time
	strikes     int
}

// allow reports whether a message may pass now, and whether the device has had strikes
// messages dropped within strikeWindow.
func (t *throttle) allow(now time.Time, strikes int) (ok, abuse bool) {
	t.mu.Lock()
	defer t.mu.Unlock()
	if t.bucket.take(now) {
		return true, false
	}
	if now.Sub(t.windowStart) > strikeWindow {
		t.windowStart, t.strikes = now, 0
	}
	t.strikes++
	return false, strikes > 0 && t.strikes >= strikes
}

// tally counts occurrences by key between two flushes, for logging in aggregate: one line per
// key per interval, whatever the number of occurrences.
type tally struct {
	mu     sync.Mutex
	counts map[string]*tallied
}

type tallied struct {
	n      uint64
	detail string // from the latest occurrence, e.g. a remote address
}

// add counts one occurrence of key and reports whether it is the first since the last flush.
func (t *tally) add(key, detail string) bool {
	t.mu.Lock()
	defer t.mu.Unlock()
	if t.counts == nil {
		t.counts = make(map[string]*tallied)
	}
	e := t.counts[key]
	first := e == nil
	if first {
		e = &tallied{}
		t.counts[key] = e
	}
	e.n++
	e.detail = detail
	return first
}

// flush calls fn for each key counted since the last flush and starts over.
func (t *tally) flush(fn func(key string, n uint64, detail string)) {
	t.mu.Lock()
	counts := t.counts
	t.counts = nil
	t.mu.Unlock()
	for k, e := range counts {
		fn(k, e.n, e.detail)
	}
}
