package broker

import (
	"context"
	"errors"
	"log/slog"
	"net"
	"net/netip"
	"slices"
	"strings"
	"sync"
	"sync/atomic"
	"syscall"
	"testing"
	"time"

	"github.com/fota-dev/fota/fotatest"
	"github.com/fota-dev/fota/protocol"
)

// logRecorder is a slog.Handler that keeps every record, for tests of what the broker logs.
type logRecorder struct {
	mu      *sync.Mutex
	records *[]slog.Record
	attrs   []slog.Attr
}

func newLogRecorder() logRecorder {
	return logRecorder{mu: new(sync.Mutex), records: new([]slog.Record)}
}

func (h logRecorder) Enabled(context.Context, slog.Level) bool { return true }

func (h logRecorder) Handle(_ context.Context, r slog.Record) error {
	r = r.Clone()
	r.AddAttrs(h.attrs...)
	h.mu.Lock()
	*h.records = append(*h.records, r)
	h.mu.Unlock()
	return nil
}

func (h logRecorder) WithAttrs(as []slog.Attr) slog.Handler {
	h.attrs = append(append([]slog.Attr(nil), h.attrs...), as...)
	return h
}

func (h logRecorder) WithGroup(string) slog.Handler { return h }

// logged returns the records with message msg, each as its attributes by key.
func (h logRecorder) logged(msg string) []map[string]slog.Value {
	h.mu.Lock()
	defer h.mu.Unlock()
	var out []map[string]slog.Value
	for _, r := range *h.records {
		if r.Message != msg {
			continue
		}
		m := map[string]slog.Value{"level": slog.StringValue(r.Level.String())}
		r.Attrs(func(a slog.Attr) bool { m[a.Key] = a.Value; return true })
		out = append(out, m)
	}
	return out
}

// sumCounts adds the "count" of records by their key attribute.
func sumCounts(recs []map[string]slog.Value, key string) map[string]uint64 {
	out := make(map[string]uint64)
	for _, r := range recs {
		out[r[key].String()] += r["count"].Uint64()
	}
	return out
}

// dialFrom opens a TCP connection to addr from source address src.
func dialFrom(src, addr string) (net.Conn, error) {
	d := net.Dialer{Timeout: ioTimeout, LocalAddr: &net.TCPAddr{IP: net.ParseIP(src)}}
	return d.Dial("tcp", addr)
}

func mustDialFrom(t *testing.T, src, addr string) net.Conn {
	t.Helper()
	c, err := dialFrom(src, addr)
	if err != nil {
		t.Fatalf("dial from %s: %v", src, err)
	}
	t.Cleanup(func() { _ = c.Close() })
	return c
}

// stillOpen reports whether the server has left c open: it must not be readable within a
// short wait (a pending socket gets nothing until it speaks). A nil c was refused while it
// was being dialled.
func stillOpen(c net.Conn) bool {
	if c == nil {
		return false
	}
	closed, _ := closedWithin(c, 50*time.Millisecond)
	return !closed
}

// refused reports whether the server closes c (nil: refused while dialled) within ioTimeout.
func refused(c net.Conn) bool {
	if c == nil {
		return true
	}
	closed, _ := closedWithin(c, ioTimeout)
	return closed
}

// dialOrRefused is mustDialFrom where the server may refuse the connection so soon that the
// dial itself sees the reset: then it returns nil.
func dialOrRefused(t *testing.T, src, addr string) net.Conn {
	t.Helper()
	c, err := dialFrom(src, addr)
	if errors.Is(err, syscall.ECONNRESET) {
		return nil
	}
	if err != nil {
		t.Fatalf("dial from %s: %v", src, err)
	}
	t.Cleanup(func() { _ = c.Close() })
	return c
}

func TestPendingLimits(t *testing.T) {
	logs := newLogRecorder()
	f := newFixture(t, func(o *Options) {
		o.Logger = slog.New(logs)
		o.MaxPending = 6
		o.MaxPendingPerSource = 4
		o.AcceptRate, o.AcceptRatePerSource = -1, -1
		o.LogInterval = 20 * time.Millisecond
	})

	// One source fills its own cap; its next connection is refused at once.
	var flood []net.Conn
	for range 4 {
		flood = append(flood, mustDialFrom(t, "127.0.0.2", f.addr))
	}
	fotatest.WaitFor(t, ioTimeout, "4 pending", func() bool { return f.b.Stats().Pending == 4 })
	if c := dialOrRefused(t, "127.0.0.2", f.addr); !refused(c) {
		t.Fatal("5th pending socket from 127.0.0.2: still open, want closed (per-source cap 4)")
	}
	for _, c := range flood {
		if !stillOpen(c) {
			t.Fatal("a socket within the per-source cap was closed")
		}
	}

	// Another source fills the global cap.
	flood = append(flood, mustDialFrom(t, "127.0.0.3", f.addr), mustDialFrom(t, "127.0.0.3", f.addr))
	fotatest.WaitFor(t, ioTimeout, "6 pending", func() bool { return f.b.Stats().Pending == 6 })
	if c := dialOrRefused(t, "127.0.0.4", f.addr); !refused(c) {
		t.Fatal("7th pending socket: still open, want closed (global cap 6)")
	}

	// A device connected before the flood holds no pending slot and is unaffected, and one
	// gets in as soon as a slot is free.
	_ = flood[0].Close()
	fotatest.WaitFor(t, ioTimeout, "5 pending", func() bool { return f.b.Stats().Pending == 5 })
	rc := f.subscribed("dev-a")
	f.roundTrip(rc, "dev-a")
	if got := f.b.Stats().Pending; got != 5 {
		t.Fatalf("pending after a device authenticated: got %d, want 5", got)
	}
	for _, c := range flood[1:] {
		_ = c.Close()
	}
	fotatest.WaitFor(t, ioTimeout, "0 pending", func() bool { return f.b.Stats().Pending == 0 })

	// The other causes, one connection each.
	plain := mustDialFrom(t, "127.0.0.5", f.addr)
	if _, err := plain.Write([]byte("GET / HTTP/1.0\r\n\r\n")); err != nil {
		t.Fatal(err)
	}
	if closed, _ := closedWithin(plain, ioTimeout); !closed {
		t.Fatal("not TLS: still open")
	}
	if rc, err := dial(t, f.addr, f.ca.AdminTLS(t)); err == nil {
		if code, err := rc.connect("admin", connectOpts{}); err == nil && code == 0 {
			t.Fatal("admin certificate: got CONNACK 0, want refused")
		}
	}
	wrong := mustDial(t, f.addr, f.ca.DeviceTLS(t, "dev-b", "m"))
	if code, err := wrong.connect("dev-c", connectOpts{}); err == nil && code == 0 {
		t.Fatal("client id of another device: got CONNACK 0, want refused")
	}
	f.ca.Revoke(t, "dev-r")
	if rc, err := dial(t, f.addr, f.ca.DeviceTLS(t, "dev-r", "m")); err == nil {
		// TLS 1.3: the client learns of the refusal on its first read.
		if code, err := rc.connect("dev-r", connectOpts{}); err == nil && code == 0 {
			t.Fatal("revoked device: got CONNACK 0, want refused")
		}
	}

	// The six pending sockets closed above ended their TLS handshakes too.
	want := RefusedBy{SourcePending: 1, Pending: 1, TLS: 7, Identity: 1, Connect: 1, Revoked: 1}
	fotatest.WaitFor(t, ioTimeout, "refusals counted", func() bool {
		return f.b.Stats().RefusedBy == want
	})
	st := f.b.Stats()
	if got, want := st.Refused, sumRefused(st.RefusedBy); got != want {
		t.Fatalf("Refused: got %d, want the sum of RefusedBy %d", got, want)
	}

	// Logged in aggregate: the counts add up, one line per cause per interval.
	if err := f.b.Close(context.Background()); err != nil {
		t.Fatal(err)
	}
	byCause := sumCounts(logs.logged("connections refused"), "cause")
	for cause, n := range map[string]uint64{causeSourcePending: 1, causePending: 1, causeTLS: 7,
		causeConnect: 1, causeRevoked: 1, causeIdentity: 1} {
		if byCause[cause] != n {
			t.Errorf("logged refusals for %s: got %d, want %d (all: %v)", cause, byCause[cause], n, byCause)
		}
	}
}

func sumRefused(r RefusedBy) uint64 {
	return r.SourcePending + r.SourceRate + r.Pending + r.Rate + r.TLS + r.Revoked + r.Timeout + r.Identity + r.Connect
}

func TestAcceptRate(t *testing.T) {
	tests := []struct {
		name            string
		total, perSrc   int
		srcs            []string // one connection from each, in order
		want            RefusedBy
		wantOpenIndexes []int
	}{
		{"per source", -1, 2, []string{"127.0.0.2", "127.0.0.2", "127.0.0.2", "127.0.0.3"},
			RefusedBy{SourceRate: 1}, []int{0, 1, 3}},
		{"total", 2, -1, []string{"127.0.0.2", "127.0.0.3", "127.0.0.4"},
			RefusedBy{Rate: 1}, []int{0, 1}},
		// What one source is refused takes nothing from the total.
		{"per source first", 3, 1, []string{"127.0.0.2", "127.0.0.2", "127.0.0.2", "127.0.0.3", "127.0.0.4"},
			RefusedBy{SourceRate: 2}, []int{0, 3, 4}},
	}
	for _, tt := range tests {
		t.Run(tt.name, func(t *testing.T) {
			f := newFixture(t, func(o *Options) {
				o.AcceptRate, o.AcceptRatePerSource = tt.total, tt.perSrc
			})
			// The clock stops: buckets do not refill, so what is refused does not depend on
			// how fast the connections come.
			f.b.gate.mu.Lock()
			stopped := f.b.gate.now()
			f.b.gate.now = func() time.Time { return stopped }
			f.b.gate.mu.Unlock()

			var conns []net.Conn
			for _, src := range tt.srcs {
				conns = append(conns, dialOrRefused(t, src, f.addr))
			}
			fotatest.WaitFor(t, ioTimeout, "refusals counted", func() bool { return f.b.Stats().RefusedBy == tt.want })
			for i, c := range conns {
				if open := slices.Contains(tt.wantOpenIndexes, i); open && !stillOpen(c) {
					t.Errorf("connection %d from %s: closed, want open", i, tt.srcs[i])
				} else if !open && !refused(c) {
					t.Errorf("connection %d from %s: open, want refused", i, tt.srcs[i])
				}
			}
		})
	}
}

func TestConnectTimeoutCounted(t *testing.T) {
	f := newFixture(t, func(o *Options) { o.ConnectTimeout = 200 * time.Millisecond })
	silent := dialTCP(t, f.addr)
	if closed, _ := closedWithin(silent, ioTimeout); !closed {
		t.Fatal("silent socket: still open")
	}
	quiet := mustDial(t, f.addr, f.ca.DeviceTLS(t, "dev-q", "m"))
	if closed, _ := closedWithin(quiet.conn, ioTimeout); !closed {
		t.Fatal("TLS without CONNECT: still open")
	}
	fotatest.WaitFor(t, ioTimeout, "2 timeouts", func() bool {
		return f.b.Stats().RefusedBy == RefusedBy{Timeout: 2}
	})
}

// raiseNofile raises the soft descriptor limit to at least n, or skips the test.
func raiseNofile(t *testing.T, n uint64) {
	t.Helper()
	var rl syscall.Rlimit
	if err := syscall.Getrlimit(syscall.RLIMIT_NOFILE, &rl); err != nil {
		t.Skipf("getrlimit: %v", err)
	}
	if rl.Cur >= n {
		return
	}
	if rl.Max < n {
		t.Skipf("needs %d descriptors, the hard limit is %d", n, rl.Max)
	}
	old := rl.Cur
	rl.Cur = rl.Max
	if err := syscall.Setrlimit(syscall.RLIMIT_NOFILE, &rl); err != nil {
		t.Skipf("needs %d descriptors, have %d and cannot raise it: %v", n, old, err)
	}
	t.Cleanup(func() {
		rl.Cur = old
		_ = syscall.Setrlimit(syscall.RLIMIT_NOFILE, &rl)
	})
}

// TestPendingFlood opens 15,000 idle TCP sockets from 127.0.0.2, as an attacker without a
// certificate would to use up the server's descriptors, and checks that devices from
// 127.0.0.1 still connect promptly, with the default limits.
func TestPendingFlood(t *testing.T) {
	if testing.Short() {
		t.Skip("opens 15,000 sockets")
	}
	const flood = 15000
	// Both ends of the flood's sockets are in this process, and the server's side of the
	// refused ones closes at once.
	raiseNofile(t, flood+DefaultMaxPendingPerSource+1000)
	logs := newLogRecorder()
	const interval = 500 * time.Millisecond
	f := newFixture(t, func(o *Options) {
		o.Logger = slog.New(logs)
		o.LogInterval = interval
	})
	start := time.Now()

	var (
		mu      sync.Mutex
		conns   []net.Conn
		dialErr error
		dialed  atomic.Int64
	)
	defer func() {
		for _, c := range conns {
			_ = c.Close()
		}
	}()
	var wg sync.WaitGroup
	const workers = 8
	for range workers {
		wg.Add(1)
		go func() {
			defer wg.Done()
			for range flood / workers {
				c, err := dialFrom("127.0.0.2", f.addr)
				if errors.Is(err, syscall.ECONNRESET) {
					err = nil // refused so soon that the dial saw it
				}
				mu.Lock()
				if err != nil {
					dialErr = err
				} else if c != nil {
					conns = append(conns, c)
				}
				mu.Unlock()
				if err != nil {
					return
				}
				dialed.Add(1)
			}
		}()
	}

	// Devices connect while the flood goes on and after it.
	connect := func(id string) time.Duration {
		t.Helper()
		t0 := time.Now()
		rc := f.subscribed(id)
		took := time.Since(t0)
		f.roundTrip(rc, id)
		return took
	}
	fotatest.WaitFor(t, time.Minute, "half the flood dialled", func() bool { return dialed.Load() >= flood/2 })
	during := connect("dev-during")
	wg.Wait()
	if dialErr != nil {
		t.Fatalf("flood: dial: %v (after %d)", dialErr, dialed.Load())
	}
	after := connect("dev-after")
	t.Logf("%d sockets from 127.0.0.2 in %v; a device connected in %v during the flood, %v after it",
		dialed.Load(), time.Since(start).Round(time.Millisecond), during.Round(time.Millisecond), after.Round(time.Millisecond))
	// Well within a device's connect deadline (ioTimeout, as devicesim's).
	for _, d := range []time.Duration{during, after} {
		if d > ioTimeout/2 {
			t.Errorf("device connect took %v, want well under %v", d, ioTimeout)
		}
	}
	if p := f.b.Stats().Pending; p > DefaultMaxPendingPerSource+2 {
		t.Errorf("pending: got %d, want at most the per-source cap %d (+2 devices)", p, DefaultMaxPendingPerSource)
	}

	// Every flood socket ends refused: over a per-source limit at once, or, admitted to
	// the pending state, at its connect timeout.
	var st Stats
	fotatest.WaitFor(t, 3*DefaultConnectTimeout, "every flood socket refused", func() bool {
		st = f.b.Stats()
		return st.RefusedBy.SourcePending+st.RefusedBy.SourceRate+st.RefusedBy.Timeout == flood
	})
	if st.RefusedBy.Pending != 0 || st.RefusedBy.Rate != 0 {
		t.Errorf("refused by the global limits: %+v, want only the per-source ones", st.RefusedBy)
	}
	t.Logf("refused: %+v", st.RefusedBy)

	// Logged in aggregate: the counts add up, and there are at most one line per cause per
	// interval (plus the one at Close), however the refusals fell into intervals.
	if err := f.b.Close(context.Background()); err != nil {
		t.Fatal(err)
	}
	elapsed := time.Since(start)
	recs := logs.logged("connections refused")
	byCause := sumCounts(recs, "cause")
	for cause, n := range map[string]uint64{causeSourcePending: st.RefusedBy.SourcePending,
		causeSourceRate: st.RefusedBy.SourceRate, causeTimeout: st.RefusedBy.Timeout} {
		if byCause[cause] != n {
			t.Errorf("logged refusals for %s: got %d, want %d", cause, byCause[cause], n)
		}
	}
	if limit := 3 * (int(elapsed/interval) + 2); len(recs) > limit {
		t.Errorf("got %d refusal log lines in %v, want at most %d (3 causes, one line each per %v)",
			len(recs), elapsed, limit, interval)
	}
	t.Logf("%d refusal log lines in %v", len(recs), elapsed.Round(time.Millisecond))
}

// TestRetainedWillOn311 checks that an MQTT 3.1.1 client never gets a CONNACK code only MQTT 5
// has: a retained will is accepted as not retained, a malformed CONNECT is closed without a
// CONNACK.
func TestRetainedWillOn311(t *testing.T) {
	f := newFixture(t, nil)
	wills := make(chan string, 4)
	if err := f.b.Subscribe(protocol.SuffixStatus, func(device string, payload []byte) {
		wills <- device + " " + string(payload)
	}); err != nil {
		t.Fatal(err)
	}
	status := protocol.Topic("dev-w", protocol.SuffixStatus)

	for _, tt := range []struct {
		name  string
		flags byte
	}{
		{"reserved flag", 0x02 | 0x01},
		{"retain without a will", 0x02 | 0x20},
		{"will QoS 3", 0x02 | 0x04 | 0x18},
	} {
		t.Run(tt.name, func(t *testing.T) {
			rc := mustDial(t, f.addr, f.ca.DeviceTLS(t, "dev-w", "m"))
			o := connectOpts{flags: tt.flags}
			if tt.flags&0x04 != 0 {
				o.will = &will{topic: status, payload: "x"}
			}
			code, err := rc.connect("dev-w", o)
			if err == nil {
				t.Fatalf("got CONNACK code %#x, want the connection closed without one (3.1.1 has codes 0-5)", code)
			}
		})
	}
	rc := mustDial(t, f.addr, f.ca.DeviceTLS(t, "dev-w", "m"))
	code, err := rc.connect("dev-w", connectOpts{will: &will{topic: status, payload: "gone"}, willRetain: true})
	if err != nil || code != 0 {
		t.Fatalf("3.1.1 CONNECT with a retained will: got code %#x (%v), want 0", code, err)
	}
	// The will still works: the connection ends without DISCONNECT.
	_ = rc.conn.Close()
	select {
	case got := <-wills:
		if got != "dev-w gone" {
			t.Fatalf("will: got %q, want %q", got, "dev-w gone")
		}
	case <-time.After(ioTimeout):
		t.Fatal("will not delivered")
	}

	// In MQTT 5, which can say so, it is refused as the CONNACK announces: no retain.
	rc5 := mustDial(t, f.addr, f.ca.DeviceTLS(t, "dev-w", "m"))
	rc5.version = 5
	if code, err := rc5.connect("dev-w", connectOpts{will: &will{topic: status, payload: "gone"}, willRetain: true}); err != nil || code != 0x9a {
		t.Fatalf("5 CONNECT with a retained will: got code %#x (%v), want 0x9a", code, err)
	}

	ok := f.subscribed("dev-w")
	f.roundTrip(ok, "dev-w")
}

// TestPanicLoggedOncePerInterval sends truncated MQTT 5 SUBSCRIBEs, each of which panics
// Mochi's decoder, and checks that the log gets one stack, then counts.
func TestPanicLoggedOncePerInterval(t *testing.T) {
	const n = 25
	logs := newLogRecorder()
	f := newFixture(t, func(o *Options) {
		o.Logger = slog.New(logs)
		o.LogInterval = time.Hour // the summary comes at Close
	})
	ok := f.subscribed("dev-ok")
	for i := range n {
		rc := mustDial(t, f.addr, f.ca.DeviceTLS(t, "dev-x", "m"))
		rc.version = 5
		rc.mustConnect("dev-x")
		rc.mustSend([]byte{typeSubscribe, 6, 0, 1, 0, 0, 1, 'a'})
		if closed, err := closedWithin(rc.conn, ioTimeout); !closed {
			t.Fatalf("%d: still open after a truncated SUBSCRIBE (%v)", i, err)
		}
	}
	fotatest.WaitFor(t, ioTimeout, "panics counted", func() bool { return f.b.Stats().Panics == n })
	f.roundTrip(ok, "dev-ok")

	var errs int
	logs.mu.Lock()
	for _, r := range *logs.records {
		if r.Level >= slog.LevelError {
			errs++
		}
	}
	logs.mu.Unlock()
	if errs != 1 {
		t.Fatalf("got %d log lines at Error for %d panics, want 1", errs, n)
	}
	stacks := logs.logged("panic contained")
	if len(stacks) != 1 {
		t.Fatalf("got %d panic log lines with a stack, want 1", len(stacks))
	}
	if at := stacks[0]["at"].String(); !strings.Contains(at, "packets.") {
		t.Errorf("panic location: got %q, want Mochi's decoder", at)
	}
	if err := f.b.Close(context.Background()); err != nil {
		t.Fatal(err)
	}
	summaries := logs.logged("panics contained")
	if len(summaries) != 1 || summaries[0]["count"].Uint64() != n {
		t.Fatalf("got summaries %v, want one with count %d", summaries, n)
	}
}

func TestDeviceMessageRate(t *testing.T) {
	logs := newLogRecorder()
	f := newFixture(t, func(o *Options) { o.Logger = slog.New(logs) })
	var mu sync.Mutex
	got := map[string]int{}
	for _, suffix := range []string{protocol.SuffixStatus, protocol.SuffixEvent, protocol.SuffixRequest} {
		if err := f.b.Subscribe(suffix, func(device string, _ []byte) {
			mu.Lock()
			got[device+"/"+suffix]++
			mu.Unlock()
		}); err != nil {
			t.Fatal(err)
		}
	}
	count := func(key string) int {
		mu.Lock()
		defer mu.Unlock()
		return got[key]
	}

	// A well-behaved device: a burst within MessageBurst, QoS 1, every one acknowledged and
	// delivered; and chunk requests, which are not limited here.
	const burst = DefaultMessageBurst / 2
	good := f.device("dev-good")
	for i := range burst {
		topic := protocol.Topic("dev-good", protocol.SuffixStatus)
		if i%2 == 1 {
			topic = protocol.Topic("dev-good", protocol.SuffixEvent)
		}
		if err := good.publish(topic, []byte(`{}`), 1); err != nil {
			t.Fatalf("publish %d: %v", i, err)
		}
	}
	const reqs = 200
	for range reqs {
		if err := good.publish(protocol.Topic("dev-good", protocol.SuffixRequest), []byte(`{}`), 0); err != nil {
			t.Fatal(err)
		}
	}
	fotatest.WaitFor(t, ioTimeout, "dev-good's messages delivered", func() bool {
		return count("dev-good/status")+count("dev-good/event") == burst && count("dev-good/req") == reqs
	})

	// A flooding device: most dropped, then disconnected. Its QoS 1 messages are still
	// acknowledged (publish waits for each PUBACK).
	flood := f.device("dev-flood")
	start := time.Now()
	sent := 0
	for i := range 10 {
		if err := flood.publish(protocol.Topic("dev-flood", protocol.SuffixStatus), []byte(`{}`), 1); err != nil {
			t.Fatalf("QoS 1 publish %d: %v", i, err)
		}
		sent++
	}
	for {
		if err := flood.publish(protocol.Topic("dev-flood", protocol.SuffixStatus), []byte(`{}`), 0); err != nil {
			break // disconnected
		}
		if sent++; sent > 100_000 {
			t.Fatal("flooding device still connected after 100,000 messages")
		}
	}
	if closed, err := closedWithin(flood.conn, ioTimeout); !closed {
		t.Fatalf("flooding device: still connected (%v)", err)
	}
	elapsed := time.Since(start)
	fotatest.WaitFor(t, ioTimeout, "flooding device disconnected", func() bool { return !f.b.Connected("dev-flood") })
	st := f.b.Stats()
	delivered := count("dev-flood/status")
	maxPass := DefaultMessageBurst + int(elapsed.Seconds()*DefaultMessageRate) + 1
	if delivered > maxPass {
		t.Errorf("flooding device: %d delivered in %v, want at most %d", delivered, elapsed, maxPass)
	}
	if st.Throttled < DefaultMessageStrikes || st.ThrottledOut != 1 {
		t.Errorf("got Throttled %d, ThrottledOut %d; want at least %d and 1", st.Throttled, st.ThrottledOut, DefaultMessageStrikes)
	}
	t.Logf("flood: %d sent, %d delivered, %d dropped in %v", sent, delivered, st.Throttled, elapsed.Round(time.Millisecond))

	// The well-behaved device is still connected and served.
	if err := good.publish(protocol.Topic("dev-good", protocol.SuffixStatus), []byte(`{}`), 1); err != nil {
		t.Fatal(err)
	}
	fotatest.WaitFor(t, ioTimeout, "dev-good's next status", func() bool { return count("dev-good/status") == burst/2+1 })

	// Logged in aggregate, not per message.
	if err := f.b.Close(context.Background()); err != nil {
		t.Fatal(err)
	}
	recs := logs.logged("device messages over rate")
	byAction := sumCounts(recs, "action")
	if byAction["dropped"] != st.Throttled || byAction["disconnected"] != 1 {
		t.Errorf("logged %v, want dropped %d, disconnected 1", byAction, st.Throttled)
	}
	if len(recs) > 2 {
		t.Errorf("got %d log lines, want 2", len(recs))
	}
}

func TestGateSources(t *testing.T) {
	now := time.Unix(1000, 0)
	g := newGate(&Options{MaxPending: 3, MaxPendingPerSource: 1, AcceptRate: 100, AcceptRatePerSource: 10})
	g.now = func() time.Time { return now }
	addr := func(s string) net.Addr { return net.TCPAddrFromAddrPort(netip.MustParseAddrPort(s)) }

	var slots []*slot
	for _, tt := range []struct {
		remote, want string
	}{
		{"10.0.0.1:1", ""},
		{"10.0.0.1:2", causeSourcePending},
		{"[2001:db8::1]:1", ""},
		{"[2001:db8::2]:1", causeSourcePending}, // the same /64
		{"[2001:db8:0:1::1]:1", ""},
		{"10.0.0.2:1", causePending},
		{"10.0.0.3:1", causePending},
	} {
		sl, cause := g.admit(addr(tt.remote))
		if cause != tt.want {
			t.Fatalf("%s: got cause %q, want %q", tt.remote, cause, tt.want)
		}
		if sl != nil {
			slots = append(slots, sl)
		}
	}
	// Refused sources are not kept.
	if got := len(g.sources); got != 3 {
		t.Fatalf("sources kept: got %d, want 3 (the admitted ones)", got)
	}
	for _, sl := range slots {
		sl.release()
		sl.release() // a second release does nothing
	}
	if got := g.pendingNow(); got != 0 {
		t.Fatalf("pending after release: got %d, want 0", got)
	}
	g.sweep()
	if got := len(g.sources); got != 3 {
		t.Fatalf("sources swept before their buckets refilled: got %d left, want 3", got)
	}
	now = now.Add(time.Second)
	g.sweep()
	if got := len(g.sources); got != 0 {
		t.Fatalf("sources after sweep: got %d, want 0", got)
	}
}

func TestEffectivePendingCap(t *testing.T) {
	for _, tt := range []struct {
		asked  int
		nofile uint64
		want   int
	}{
		{8192, 1 << 20, 8192},
		{8192, 4096, 2048}, // half the descriptors stay for devices
		{8192, 0, 8192},    // limit unknown
		{8192, 1, 1},
	} {
		if got := effectivePendingCap(tt.asked, tt.nofile); got != tt.want {
			t.Errorf("effectivePendingCap(%d, %d): got %d, want %d", tt.asked, tt.nofile, got, tt.want)
		}
	}
}
