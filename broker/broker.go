// Package broker is fota's embedded MQTT broker: Mochi MQTT behind one mutual-TLS listener, where
// a device's identity is its certificate, it may only touch its own fota/v1/{id}/ topics in the
// direction each is for, and a hostile or broken client can cost the server one connection but
// never the process. The controller talks to devices through Publish and Subscribe, in process.
package broker

import (
	"context"
	"crypto/tls"
	"errors"
	"fmt"
	"log/slog"
	"net"
	"runtime"
	"runtime/debug"
	"strings"
	"sync"
	"sync/atomic"
	"time"

	mqtt "github.com/mochi-mqtt/server/v2"
	"github.com/mochi-mqtt/server/v2/packets"

	"github.com/fota-dev/fota/protocol"
)

// Defaults for the zero fields of Options.
const (
	DefaultMaxPacketSize  = 128 << 10 // a 64 KiB chunk, its frame header and topic fit with room to spare
	DefaultConnectTimeout = 10 * time.Second
	DefaultKeepaliveMin   = 10  // seconds
	DefaultKeepaliveMax   = 600 // seconds
	DefaultWriteTimeout   = 30 * time.Second

	// DefaultWritesPending is each connection's outbound queue, which only Publish (job
	// messages) uses: Send writes chunk frames straight to the socket. The controller queues
	// at most one offer per device and publishes it from one of a few offer workers, so a
	// device that reads has a handful queued at most; but while Send holds a device's
	// connection, QoS 0 messages queue without waiting and QoS 1 ones in the gaps between
	// frames, and a burst of 100 job messages must still arrive then
	// (TestSendConcurrentWithPublish; the queue holds all but the one being written). The
	// queue is a channel allocated in full for every connection: 256 cost 2 KiB per device,
	// 128 cost 1 KiB (BenchmarkIdleDevice).
	DefaultWritesPending = 128
)

// clientReadBuffer is the size of the buffered reader Mochi puts in front of each connection
// (its default is 2 KiB, held by every idle device). Devices send small JSON messages and
// chunk requests, a few hundred bytes, and Mochi reads the part of a packet that does not fit
// straight into the packet's own slice, so 512 bytes save 1.5 KiB per device
// (BenchmarkIdleDevice) and cost a larger packet one more read call.
const clientReadBuffer = 512

// takeoverWait bounds how long a device's new connection waits for its old one to end.
const takeoverWait = 2 * time.Second

// Errors callers may branch on.
var (
	// ErrClosed is returned by Start, Publish and Subscribe once Close has been called.
	ErrClosed = errors.New("broker closed")
	// ErrBadTopic is returned by Publish and Subscribe for a topic outside what they serve.
	ErrBadTopic = errors.New("invalid topic")
	// ErrBadOptions is returned (wrapped) by New.
	ErrBadOptions = errors.New("invalid broker options")
)

// Options configures a Broker. Zero values mean the defaults above.
type Options struct {
	Addr          string      // listen address, e.g. ":8883" or "127.0.0.1:0"
	TLS           *tls.Config // required, with ClientAuth == tls.RequireAndVerifyClientCert
	Logger        *slog.Logger
	MaxPacketSize uint32 // largest MQTT packet accepted, fixed header byte included

	// ConnectTimeout bounds the TLS handshake and the CONNECT packet together, so sockets that
	// never speak are closed instead of held.
	ConnectTimeout time.Duration

	// KeepaliveMin and KeepaliveMax clamp the keepalive a device asks for (seconds); a device
	// asking 0 (none) gets KeepaliveMax, so every connection has a read deadline.
	KeepaliveMin, KeepaliveMax uint16

	// WritesPending is each connection's outbound queue length, for Publish; a message to a
	// full queue is dropped and counted in Stats.Dropped. Mochi's default of 8192 costs
	// ~124 KiB per connection.
	WritesPending int32

	// WriteTimeout bounds each write to a device; a device that stops reading is disconnected
	// after it. Until then a QoS 1 Publish to that device blocks (Mochi holds the client's
	// lock while it writes); QoS 0 never blocks, it drops.
	WriteTimeout time.Duration

	// OnConnect is called after a device is authenticated and its session is up, OnDisconnect
	// after it is gone. They run one at a time, in order, on a goroutine of their own: a slow
	// callback delays later callbacks, never the broker. A device that reconnects before its
	// old connection is noticed gets a second OnConnect without an OnDisconnect in between.
	OnConnect    func(id, model string)
	OnDisconnect func(id string)

	// Limits on connections that are not yet authenticated ("pending": from accept until
	// CONNECT is accepted), against floods of sockets that never finish a handshake. A
	// connection over a limit is closed at once and counted in Stats.RefusedBy. MaxPending
	// is further held to half the process's descriptor limit. Zero means the default, -1 no
	// limit; rates are per second, with a burst of one second's worth.
	MaxPending, MaxPendingPerSource int
	AcceptRate, AcceptRatePerSource int

	// MessageRate (per second) and MessageBurst limit each device's status and event
	// messages (chunk requests are paced by the chunk server, not here): a message over the
	// limit is dropped (a QoS 1 one still acknowledged) and counted in Stats.Throttled, and
	// MessageStrikes of them within 10 s disconnect the device. Zero means the default; -1
	// means no limit, and for MessageBurst a burst of MessageRate.
	MessageRate, MessageBurst, MessageStrikes int

	// LogInterval is how often refusals, throttled messages and contained panics are
	// logged, one line per cause with a count.
	LogInterval time.Duration
}

// Stats are counters since New.
type Stats struct {
	Connected int    // devices with a live session now
	Sessions  uint64 // device sessions established
	Sent      uint64 // messages written by Send
	Dropped   uint64 // messages dropped because a device's outbound queue was full
	Refused   uint64 // connections closed before a session, for any cause in RefusedBy
	Panics    uint64 // panics contained: in a connection, a Subscribe handler or a callback
	Restored  uint64 // connected devices put back in Mochi's routing map after it lost them

	RefusedBy RefusedBy // Refused by cause
	Pending   int       // connections accepted and not yet authenticated, now

	Throttled    uint64 // status and event messages dropped over a device's MessageRate
	ThrottledOut uint64 // devices disconnected for MessageStrikes throttled messages
}

// Broker is fota's MQTT broker. Its methods are safe for concurrent use.
type Broker struct {
	opts Options
	tls  *tls.Config
	log  *slog.Logger
	srv  *mqtt.Server
	lst  *listener

	startOnce sync.Once
	closeOnce sync.Once
	closed    atomic.Bool
	closeErr  error

	mu   sync.Mutex
	live map[string]*session // device id -> its newest connection that got past authentication

	events events

	subID atomic.Int32

	sendBufs sync.Pool // packet buffers for Send

	// beforeConnack, set only by tests, runs on a connection's goroutine after its session
	// is recorded and before Mochi writes its CONNACK.
	beforeConnack atomic.Pointer[func(c *conn)]

	sessions, sent, dropped, refused, panics, restored atomic.Uint64
	throttled, throttledOut                            atomic.Uint64

	gate      *gate
	refusedMu sync.Mutex
	refusedBy RefusedBy

	// Logged in aggregate by logLoop.
	refusals, panicSites, throttles tally
	stopLog                         chan struct{}
	logDone                         chan struct{}
}

// session is the newest connection of a device. announced is whether OnConnect was queued
// for the device since its last OnDisconnect; it carries over when a connection is taken over.
type session struct {
	c         *conn
	announced bool
	up        bool // c's own CONNACK is out (Mochi has added it to its client map)
}

// New checks opts and builds a broker; Start makes it listen.
func New(opts Options) (*Broker, error) {
	if opts.TLS == nil {
		return nil, fmt.Errorf("%w: TLS config required", ErrBadOptions)
	}
	if opts.TLS.ClientAuth != tls.RequireAndVerifyClientCert {
		return nil, fmt.Errorf("%w: TLS config must require and verify client certificates", ErrBadOptions)
	}
	if opts.Logger == nil {
		opts.Logger = slog.Default()
	}
	if opts.MaxPacketSize == 0 {
		opts.MaxPacketSize = DefaultMaxPacketSize
	}
	if opts.ConnectTimeout <= 0 {
		opts.ConnectTimeout = DefaultConnectTimeout
	}
	if opts.KeepaliveMin == 0 {
		opts.KeepaliveMin = DefaultKeepaliveMin
	}
	if opts.KeepaliveMax == 0 {
		opts.KeepaliveMax = DefaultKeepaliveMax
	}
	if opts.KeepaliveMin > opts.KeepaliveMax {
		return nil, fmt.Errorf("%w: keepalive min %ds above max %ds", ErrBadOptions, opts.KeepaliveMin, opts.KeepaliveMax)
	}
	if opts.WritesPending <= 0 {
		opts.WritesPending = DefaultWritesPending
	}
	if opts.WriteTimeout <= 0 {
		opts.WriteTimeout = DefaultWriteTimeout
	}
	for _, l := range []struct {
		v   *int
		def int
	}{
		{&opts.MaxPending, DefaultMaxPending}, {&opts.MaxPendingPerSource, DefaultMaxPendingPerSource},
		{&opts.AcceptRate, DefaultAcceptRate}, {&opts.AcceptRatePerSource, DefaultAcceptRatePerSource},
		{&opts.MessageRate, DefaultMessageRate}, {&opts.MessageBurst, DefaultMessageBurst},
		{&opts.MessageStrikes, DefaultMessageStrikes},
	} {
		switch {
		case *l.v == 0:
			*l.v = l.def
		case *l.v < -1:
			return nil, fmt.Errorf("%w: limit %d: want a positive number, 0 (default) or -1 (none)", ErrBadOptions, *l.v)
		}
	}
	if opts.LogInterval <= 0 {
		opts.LogInterval = DefaultLogInterval
	}

	b := &Broker{
		opts: opts,
		// A copy, so the caller cannot loosen client authentication after New checked it.
		tls:  opts.TLS.Clone(),
		log:  opts.Logger.With("component", "broker"),
		live: make(map[string]*session),
		gate: newGate(&opts),
	}
	if verify := b.tls.VerifyConnection; verify != nil {
		// Marked, so that a refusal can be counted as a revocation rather than any TLS failure.
		b.tls.VerifyConnection = func(cs tls.ConnectionState) error {
			if err := verify(cs); err != nil {
				return certRefused{err}
			}
			return nil
		}
	}
	b.events.init(b, opts.OnConnect, opts.OnDisconnect)
	b.sendBufs.New = newSendBuf

	caps := mqtt.NewDefaultServerCapabilities()
	caps.MaximumPacketSize = opts.MaxPacketSize
	caps.MaximumClientWritesPending = opts.WritesPending
	// Sessions end with their connection: state that outlives it is ours, in our own store.
	caps.MaximumSessionExpiryInterval = 0
	// Retained messages would be state in broker memory that devices could fill.
	caps.RetainAvailable = 0
	// An inbound alias pins a whole packet buffer per alias, up to 65535 per connection.
	caps.TopicAliasMaximum = 0
	caps.MinimumProtocolVersion = 4 // 3.1.1 and 5
	b.srv = mqtt.New(&mqtt.Options{
		Capabilities:            caps,
		ClientNetReadBufferSize: clientReadBuffer,
		Logger:                  slog.New(mochiHandler{b.log.Handler().WithAttrs([]slog.Attr{slog.String("lib", "mochi")})}),
		InlineClient:            true,
		// Nobody may read $SYS; refreshing it every second only costs a ReadMemStats.
		SysTopicResendInterval: 24 * 60 * 60,
	})
	if err := b.srv.AddHook(&hook{b: b}, nil); err != nil {
		return nil, fmt.Errorf("add auth hook: %w", err)
	}
	return b, nil
}

// Start binds the listener and serves in the background; it returns at once.
func (b *Broker) Start() error {
	if b.closed.Load() {
		return ErrClosed
	}
	err := errors.New("broker already started")
	b.startOnce.Do(func() { err = b.start() })
	return err
}

func (b *Broker) start() error {
	if b.closed.Load() {
		return ErrClosed
	}
	ln, err := net.Listen("tcp", b.opts.Addr)
	if err != nil {
		return fmt.Errorf("listen %s: %w", b.opts.Addr, err)
	}
	lst := newListener(b, ln)
	if err := b.srv.AddListener(lst); err != nil {
		lst.abandon()
		return fmt.Errorf("add listener: %w", err)
	}
	// Mochi's Serve fails only before it starts serving listeners.
	if err := b.srv.Serve(); err != nil {
		lst.abandon()
		return fmt.Errorf("serve: %w", err)
	}
	b.lst = lst
	b.events.start()
	b.stopLog, b.logDone = make(chan struct{}), make(chan struct{})
	go b.logLoop()
	b.log.Info("listening", "addr", ln.Addr().String())
	return nil
}

// Addr is the bound address, or nil before Start.
func (b *Broker) Addr() net.Addr {
	if b.lst == nil {
		return nil
	}
	return b.lst.ln.Addr()
}

// Publish sends payload to every subscriber of topic, which must be a device's downstream
// topic (protocol.Topic(id, protocol.SuffixJob) or SuffixChunk). The caller may reuse payload's
// buffer once Publish returns. Messages to a device whose queue is full are dropped and counted.
func (b *Broker) Publish(topic string, payload []byte, qos byte) error {
	if b.closed.Load() {
		return ErrClosed
	}
	id, suffix, ok := protocol.ParseTopic(topic)
	if !ok || !protocol.Downstream(suffix) {
		return fmt.Errorf("publish %q: %w", topic, ErrBadTopic)
	}
	if qos > 2 {
		return fmt.Errorf("publish %q: qos %d out of range", topic, qos)
	}
	b.ensureRoutable(id)
	// Mochi copies the payload for each subscriber it queues it for (packets.Packet.Copy), and
	// nothing retains it (retain is off), so the caller may reuse payload once this returns.
	if err := b.srv.Publish(topic, payload, false, qos); err != nil {
		return fmt.Errorf("publish %q: %w", topic, err)
	}
	return nil
}

// Subscribe calls handler with every publish on fota/v1/+/{suffix}, device being the topic's
// device id (which the ACL has bound to the publisher's certificate). handler runs on the
// publishing device's goroutine: it must be cheap or hand off, and must not modify payload
// (it may keep it). A panic in handler is contained and counted.
func (b *Broker) Subscribe(suffix string, handler func(device string, payload []byte)) error {
	if b.closed.Load() {
		return ErrClosed
	}
	if suffix == "" || strings.ContainsAny(suffix, "/+#") {
		return fmt.Errorf("subscribe %q: %w", suffix, ErrBadTopic)
	}
	if handler == nil {
		return errors.New("subscribe: nil handler")
	}
	filter := protocol.Root + "/+/" + suffix
	fn := func(_ *mqtt.Client, _ packets.Subscription, pk packets.Packet) {
		device, _, ok := protocol.ParseTopic(pk.TopicName)
		if !ok {
			return
		}
		defer b.recoverPanic("subscribe handler", "topic", pk.TopicName)
		handler(device, pk.Payload)
	}
	if err := b.srv.Subscribe(filter, int(b.subID.Add(1)), fn); err != nil {
		return fmt.Errorf("subscribe %q: %w", filter, err)
	}
	return nil
}

// Disconnect closes device id's live connection, if it has one (used when its certificate is
// revoked: the TLS check refuses it from then on). It reports whether there was one.
func (b *Broker) Disconnect(id string) bool {
	b.mu.Lock()
	s := b.live[id]
	b.mu.Unlock()
	if s == nil {
		return false
	}
	// Stop closes the socket without writing to it, so a device that does not read cannot
	// make this block.
	s.c.client.Stop(packets.ErrNotAuthorized)
	b.log.Info("disconnected device", "device", id)
	return true
}

// Connected reports whether device id has a live session.
func (b *Broker) Connected(id string) bool {
	b.mu.Lock()
	defer b.mu.Unlock()
	s := b.live[id]
	return s != nil && s.announced
}

// ensureRoutable puts device id's live client back in Mochi's client map if it is missing
// there. Mochi routes a publish through that map by client id, and its expiry sweep deletes
// by id from a snapshot: a stopped client's entry can take the device's newer connection
// with it. gone closes the usual way in; this check, before every publish, covers the rest,
// so that a job message never silently misses a connected device.
func (b *Broker) ensureRoutable(id string) {
	b.mu.Lock()
	defer b.mu.Unlock()
	s := b.live[id]
	if s == nil || !s.up {
		return
	}
	cl := s.c.client
	if cl.Closed() {
		return
	}
	if cur, ok := b.srv.Clients.Get(id); !ok || cur != cl {
		b.srv.Clients.Add(cl)
		b.restored.Add(1)
		b.log.Warn("restored a connected device missing from the routing map", "device", id)
	}
}

// Stats returns the broker's counters.
func (b *Broker) Stats() Stats {
	b.mu.Lock()
	n := 0
	for _, s := range b.live {
		if s.announced {
			n++
		}
	}
	b.mu.Unlock()
	b.refusedMu.Lock()
	refusedBy := b.refusedBy
	b.refusedMu.Unlock()
	return Stats{
		Connected: n,
		Sessions:  b.sessions.Load(),
		Sent:      b.sent.Load(),
		Restored:  b.restored.Load(),
		Dropped:   b.dropped.Load(),
		Refused:   b.refused.Load(),
		Panics:    b.panics.Load(),
		RefusedBy: refusedBy,
		Pending:   b.gate.pendingNow(),

		Throttled:    b.throttled.Load(),
		ThrottledOut: b.throttledOut.Load(),
	}
}

// Close stops accepting, closes every connection, waits for the broker's goroutines and then
// for the pending OnConnect/OnDisconnect callbacks, or for ctx.
func (b *Broker) Close(ctx context.Context) error {
	b.closeOnce.Do(func() {
		b.closed.Store(true)
		b.startOnce.Do(func() {}) // a Start after Close must not bind
		done := make(chan struct{})
		go func() {
			defer close(done)
			_ = b.srv.Close() // closes our listener, which waits for its connections
		}()
		select {
		case <-done:
		case <-ctx.Done():
			b.closeErr = fmt.Errorf("close broker: %w", ctx.Err())
			return
		}
		if b.stopLog != nil {
			close(b.stopLog)
			<-b.logDone
		}
		if err := b.events.stop(ctx); err != nil {
			b.closeErr = fmt.Errorf("close broker: %w", err)
		}
	})
	return b.closeErr
}

// recoverPanic, deferred, turns a panic into a count and a log line (see contained).
func (b *Broker) recoverPanic(where string, args ...any) {
	if r := recover(); r != nil {
		b.contained(r, append([]any{"in", where}, args...)...)
	}
}

// contained counts a recovered panic r, called from the deferred function that recovered it.
// Anyone who can send a malformed packet can cause one, so only the first of each location in
// a LogInterval is logged with its stack; logLoop logs how many there were.
func (b *Broker) contained(r any, args ...any) {
	b.panics.Add(1)
	site := panicSite()
	if b.panicSites.add(site, fmt.Sprint(r)) {
		b.log.Error("panic contained", append(args, "panic", r, "at", site,
			"note", "further panics here are counted, not logged, until the next summary", "stack", string(debug.Stack()))...)
	}
}

// panicSite names the function and line that panicked, from inside a deferred recover.
func panicSite() string {
	var pcs [32]uintptr
	frames := runtime.CallersFrames(pcs[:runtime.Callers(2, pcs[:])])
	inPanic := false
	for {
		f, more := frames.Next()
		switch {
		case f.Function == "runtime.gopanic":
			inPanic = true
		case inPanic && !strings.HasPrefix(f.Function, "runtime."):
			return fmt.Sprintf("%s:%d", f.Function, f.Line)
		}
		if !more {
			return "unknown"
		}
	}
}

// certRefused marks an error of the TLS config's VerifyConnection: a revoked certificate.
type certRefused struct{ err error }

func (e certRefused) Error() string { return e.err.Error() }
func (e certRefused) Unwrap() error { return e.err }

// refuse counts a connection closed before a session, by cause, for logLoop to log.
func (b *Broker) refuse(cause, remote string) {
	b.refused.Add(1)
	b.refusedMu.Lock()
	b.refusedBy.add(cause)
	b.refusedMu.Unlock()
	b.refusals.add(cause, remote)
}

// logLoop logs, every LogInterval and on Close, what was counted in aggregate: one line per
// refusal cause, per panic location and per kind of throttling, with counts. It also sweeps
// the per-source accept state.
func (b *Broker) logLoop() {
	defer close(b.logDone)
	t := time.NewTicker(b.opts.LogInterval)
	defer t.Stop()
	sweep := time.NewTicker(time.Second)
	defer sweep.Stop()
	for {
		select {
		case <-t.C:
			b.flushLog()
		case <-sweep.C:
			b.gate.sweep()
		case <-b.stopLog:
			b.flushLog()
			return
		}
	}
}

func (b *Broker) flushLog() {
	every := b.opts.LogInterval
	b.refusals.flush(func(cause string, n uint64, remote string) {
		b.log.Info("connections refused", "cause", cause, "count", n, "last_remote", remote, "every", every)
	})
	b.panicSites.flush(func(site string, n uint64, last string) {
		b.log.Warn("panics contained", "at", site, "count", n, "last_panic", last, "every", every)
	})
	b.throttles.flush(func(what string, n uint64, device string) {
		b.log.Warn("device messages over rate", "action", what, "count", n, "last_device", device, "every", every)
	})
}

// established records c as device id's newest connection, before Mochi takes over any older
// one, so that the older one's end is not reported as the device leaving.
//
// An older connection is closed and, for up to takeoverWait, waited for here, so that Mochi
// finds no session to take over. Its takeover is racy: the old client's cleanup can delete the
// new client from Mochi's map by id, leaving the device connected but deaf (see gone). And it
// first writes a DISCONNECT to the old socket, which after a network drop is often full, and
// would hold the new CONNACK for WriteTimeout.
func (b *Broker) established(c *conn) {
	b.mu.Lock()
	prev := b.live[c.id]
	b.live[c.id] = &session{c: c, announced: prev != nil && prev.announced}
	b.mu.Unlock()
	if prev == nil {
		return
	}
	_ = prev.c.Close()
	t := time.NewTimer(takeoverWait)
	defer t.Stop()
	select {
	case <-prev.c.ended:
	case <-t.C:
		b.log.Warn("old connection slow to end, taking over", "device", c.id)
	}
}

// connected queues OnConnect once c's CONNACK is out, unless a newer connection replaced it.
func (b *Broker) connected(c *conn) {
	b.mu.Lock()
	defer b.mu.Unlock()
	if s := b.live[c.id]; s != nil && s.c == c {
		s.announced = true
		s.up = true
		b.sessions.Add(1)
		b.events.push(event{connect: true, id: c.id, model: c.model})
	}
}

// gone forgets c once its connection has ended (Mochi's cleanup of it is done), and queues
// OnDisconnect if c was the device's newest connection.
func (b *Broker) gone(c *conn) {
	b.mu.Lock()
	defer b.mu.Unlock()
	// Mochi leaves a client whose CONNACK could not be written in its map, stopped, and its
	// expiry sweep (every second) later deletes that id from the map, which by then may name
	// the device's next connection: connected and deaf. Remove the stopped one now, while the
	// next connection still waits in established for this one to end.
	if cl := c.client; cl != nil {
		if cur, ok := b.srv.Clients.Get(c.id); ok && cur == cl {
			b.srv.Clients.Delete(c.id)
		}
	}
	s := b.live[c.id]
	switch {
	case s == nil:
	case s.c == c:
		delete(b.live, c.id)
		if s.announced {
			b.events.push(event{id: c.id})
		}
	case s.up:
		// c was taken over by s.c after established gave up waiting. Mochi's cleanup of the
		// old client checks "taken over" before the takeover marks it, then deletes by client
		// id, which can remove the new client from Mochi's map: the device would stay
		// connected and receive nothing. Put it back.
		if cl := s.c.client; !cl.Closed() {
			if _, ok := b.srv.Clients.Get(c.id); !ok {
				b.srv.Clients.Add(cl)
				b.restored.Add(1)
				b.log.Warn("restored client lost in a session takeover", "device", c.id)
			}
		}
	}
}

// mochiHandler passes Mochi's log records on at Debug (Error at Warn): Mochi logs every
// malformed packet and low keepalive at Warn or Info, with the packet and payload attached,
// which is per-device noise and, from a hostile device, a way to flood the log.
type mochiHandler struct{ h slog.Handler }

func demote(l slog.Level) slog.Level {
	if l >= slog.LevelError {
		return slog.LevelWarn
	}
	return slog.LevelDebug
}

func (m mochiHandler) Enabled(ctx context.Context, l slog.Level) bool {
	return m.h.Enabled(ctx, demote(l))
}

func (m mochiHandler) Handle(ctx context.Context, r slog.Record) error {
	r.Level = demote(r.Level)
	return m.h.Handle(ctx, r)
}

func (m mochiHandler) WithAttrs(as []slog.Attr) slog.Handler { return mochiHandler{m.h.WithAttrs(as)} }
func (m mochiHandler) WithGroup(name string) slog.Handler    { return mochiHandler{m.h.WithGroup(name)} }
