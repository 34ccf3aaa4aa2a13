package broker

import (
	"bytes"
	"context"
	"crypto/tls"
	"crypto/x509"
	"errors"
	"fmt"
	"log/slog"
	"math/rand/v2"
	"net"
	"runtime"
	"slices"
	"sync"
	"sync/atomic"
	"testing"
	"time"

	paho "github.com/eclipse/paho.mqtt.golang"

	"github.com/fota-dev/fota/certs/certstest"
	"github.com/fota-dev/fota/fotatest"
	"github.com/fota-dev/fota/protocol"
)

type fixture struct {
	t     *testing.T
	ca    *certstest.CA
	b     *Broker
	addr  string
	conns chan [2]string // OnConnect (id, model)
	gone  chan string    // OnDisconnect
}

func newFixture(t *testing.T, edit func(*Options)) *fixture {
	t.Helper()
	f := &fixture{t: t, ca: certstest.New(t), conns: make(chan [2]string, 64), gone: make(chan string, 64)}
	opts := Options{
		Addr:         "127.0.0.1:0",
		TLS:          f.ca.ServerTLS(t),
		Logger:       slog.New(slog.NewTextHandler(t.Output(), &slog.HandlerOptions{Level: slog.LevelInfo})),
		OnConnect:    func(id, model string) { f.conns <- [2]string{id, model} },
		OnDisconnect: func(id string) { f.gone <- id },
	}
	if edit != nil {
		edit(&opts)
	}
	b, err := New(opts)
	if err != nil {
		t.Fatalf("New: %v", err)
	}
	if err := b.Start(); err != nil {
		t.Fatalf("Start: %v", err)
	}
	t.Cleanup(func() {
		ctx, cancel := context.WithTimeout(context.Background(), 5*time.Second)
		defer cancel()
		if err := b.Close(ctx); err != nil {
			t.Errorf("Close: %v", err)
		}
	})
	f.b = b
	f.addr = b.Addr().String()
	return f
}

// device dials and connects as device id with its own certificate.
func (f *fixture) device(id string) *rawClient {
	f.t.Helper()
	rc := mustDial(f.t, f.addr, f.ca.DeviceTLS(f.t, id, "model-"+id))
	rc.mustConnect(id)
	return rc
}

// subscribed connects device id subscribed to its job topic.
func (f *fixture) subscribed(id string) *rawClient {
	f.t.Helper()
	rc := f.device(id)
	if got := rc.subscribe(protocol.Topic(id, protocol.SuffixJob)); !bytes.Equal(got, []byte{1}) {
		f.t.Fatalf("subscribe own job: got SUBACK % x, want 01", got)
	}
	return rc
}

// roundTrip checks that an in-process publish to rc's job topic reaches it.
func (f *fixture) roundTrip(rc *rawClient, id string) {
	f.t.Helper()
	want := []byte("ping-" + id + "-" + time.Now().String())
	if err := f.b.Publish(protocol.Topic(id, protocol.SuffixJob), want, 1); err != nil {
		f.t.Fatalf("Publish: %v", err)
	}
	topic, got, err := rc.nextPublish(ioTimeout)
	if err != nil {
		f.t.Fatalf("%s: waiting for publish: %v", id, err)
	}
	if topic != protocol.Topic(id, protocol.SuffixJob) || !bytes.Equal(got, want) {
		f.t.Fatalf("%s: got %q %q, want %q %q", id, topic, got, protocol.Topic(id, protocol.SuffixJob), want)
	}
}

func (f *fixture) pool() *x509.CertPool {
	p := x509.NewCertPool()
	p.AddCert(f.ca.Authority.Cert)
	return p
}

func TestNewRefusesBadOptions(t *testing.T) {
	ca := certstest.New(t)
	good := ca.ServerTLS(t)
	request := good.Clone()
	request.ClientAuth = tls.RequestClientCert
	none := good.Clone()
	none.ClientAuth = tls.NoClientCert
	tests := []struct {
		name string
		opts Options
	}{
		{"no TLS", Options{}},
		{"client cert not required", Options{TLS: none}},
		{"client cert requested only", Options{TLS: request}},
		{"keepalive min above max", Options{TLS: good, KeepaliveMin: 60, KeepaliveMax: 30}},
	}
	for _, tt := range tests {
		t.Run(tt.name, func(t *testing.T) {
			b, err := New(tt.opts)
			if !errors.Is(err, ErrBadOptions) {
				t.Fatalf("got %v, %v; want ErrBadOptions", b, err)
			}
		})
	}
}

func TestConnect(t *testing.T) {
	f := newFixture(t, nil)
	foreign := certstest.Foreign(t).DeviceTLS(t, "dev-1", "m")
	foreign.RootCAs = f.pool() // it trusts our server; we must not trust it
	revoked := f.ca.DeviceTLS(t, "dev-revoked", "m")
	f.ca.Revoke(t, "dev-revoked")

	const refusedByTLS = 0xff // no CONNACK: the server closed the connection
	tests := []struct {
		name string
		cfg  *tls.Config
		id   string
		opts connectOpts
		want byte
	}{
		{"valid device", f.ca.DeviceTLS(t, "dev-1", "m"), "dev-1", connectOpts{}, 0},
		{"will on own upstream topic", f.ca.DeviceTLS(t, "dev-2", "m"), "dev-2",
			connectOpts{will: &will{protocol.Topic("dev-2", protocol.SuffixStatus), "gone"}}, 0},
		{"no client certificate", &tls.Config{RootCAs: f.pool(), ServerName: "localhost"}, "dev-1", connectOpts{}, refusedByTLS},
		{"certificate from another CA", foreign, "dev-1", connectOpts{}, refusedByTLS},
		{"expired certificate", f.ca.ExpiredDeviceTLS(t, "dev-1"), "dev-1", connectOpts{}, refusedByTLS},
		{"revoked certificate", revoked, "dev-revoked", connectOpts{}, refusedByTLS},
		{"admin certificate", f.ca.AdminTLS(t), "admin", connectOpts{}, 0x05},
		{"admin certificate with a device id", f.ca.AdminTLS(t), "dev-1", connectOpts{}, 0x05},
		{"client id not the certificate's", f.ca.DeviceTLS(t, "dev-3", "m"), "dev-1", connectOpts{}, 0x05},
		{"empty client id", f.ca.DeviceTLS(t, "dev-4", "m"), "", connectOpts{}, 0x05},
		{"client id not the certificate's, MQTT 5", f.ca.DeviceTLS(t, "dev-3", "m"), "dev-1", connectOpts{version: 5}, 0x87},
		{"valid device, MQTT 5", f.ca.DeviceTLS(t, "dev-7", "m"), "dev-7", connectOpts{version: 5}, 0},
		{"device id reserved for the in-process client", f.ca.UncheckedDeviceTLS(t, "inline"), "inline", connectOpts{}, refusedByTLS},
		{"will on another device's topic", f.ca.DeviceTLS(t, "dev-5", "m"), "dev-5",
			connectOpts{will: &will{protocol.Topic("dev-1", protocol.SuffixJob), "x"}}, 0x05},
		{"will on own downstream topic", f.ca.DeviceTLS(t, "dev-6", "m"), "dev-6",
			connectOpts{will: &will{protocol.Topic("dev-6", protocol.SuffixJob), "x"}}, 0x05},
	}
	for _, tt := range tests {
		t.Run(tt.name, func(t *testing.T) {
			before := f.b.Stats().Refused
			var code byte
			rc, err := dial(t, f.addr, tt.cfg)
			if err == nil {
				if tt.opts.version != 0 {
					rc.version = tt.opts.version
				}
				code, err = rc.connect(tt.id, tt.opts)
			}
			if err != nil {
				code = refusedByTLS
			}
			if code != tt.want {
				t.Fatalf("got CONNACK %#x (err %v), want %#x", code, err, tt.want)
			}
			if tt.want == 0 {
				rc.roundTripPing(t)
				return
			}
			fotatest.WaitFor(t, ioTimeout, "Stats().Refused increased", func() bool { return f.b.Stats().Refused > before })
			if rc == nil {
				return // refused in the handshake
			}
			if closed, err := closedWithin(rc.conn, ioTimeout); !closed {
				t.Fatalf("connection still open after refusal (%v)", err)
			}
		})
	}
}

// roundTripPing checks the connection is alive with PINGREQ/PINGRESP.
func (rc *rawClient) roundTripPing(t *testing.T) {
	t.Helper()
	rc.mustSend([]byte{typePingreq, 0})
	typ, _, err := rc.read(ioTimeout)
	if err != nil || typ != typePingresp {
		t.Fatalf("ping: got %#x, %v; want PINGRESP", typ, err)
	}
}

func TestRevokedOnResumedSession(t *testing.T) {
	f := newFixture(t, nil)
	cfg := f.ca.DeviceTLS(t, "dev-r", "m")
	cfg.ClientSessionCache = tls.NewLRUClientSessionCache(8)

	for i, wantResume := range []bool{false, true} {
		rc := mustDial(t, f.addr, cfg)
		rc.mustConnect("dev-r") // reading the CONNACK also reads the session tickets
		if got := rc.conn.(*tls.Conn).ConnectionState().DidResume; got != wantResume {
			t.Fatalf("connection %d: got DidResume %v, want %v", i+1, got, wantResume)
		}
		_ = rc.conn.Close()
	}

	f.ca.Revoke(t, "dev-r")
	rc, err := dial(t, f.addr, cfg)
	if err == nil {
		var code byte
		code, err = rc.connect("dev-r", connectOpts{})
		if err == nil {
			t.Fatalf("revoked device on a resumed session: got CONNACK %#x, want connection refused", code)
		}
	}
}

func TestImpostorLeavesDeviceConnected(t *testing.T) {
	f := newFixture(t, nil)
	real := f.subscribed("dev-a")
	<-f.conns

	impostors := []struct {
		name string
		cfg  *tls.Config
	}{
		{"another device's certificate", f.ca.DeviceTLS(t, "dev-b", "m")},
		{"admin certificate", f.ca.AdminTLS(t)},
	}
	for _, im := range impostors {
		t.Run(im.name, func(t *testing.T) {
			rc := mustDial(t, f.addr, im.cfg)
			code, err := rc.connect("dev-a", connectOpts{})
			if err != nil || code != 0x05 {
				t.Fatalf("impostor as dev-a: got CONNACK %#x, err %v; want 0x05", code, err)
			}
			if !f.b.Connected("dev-a") {
				t.Fatal("dev-a: got Connected false after the impostor, want true")
			}
			f.roundTrip(real, "dev-a")
		})
	}
	select {
	case id := <-f.gone:
		t.Fatalf("got OnDisconnect(%q), want none", id)
	default:
	}
}

func TestTakeoverBySameDevice(t *testing.T) {
	f := newFixture(t, nil)
	old := f.subscribed("dev-a")
	if got := <-f.conns; got != [2]string{"dev-a", "model-dev-a"} {
		t.Fatalf("OnConnect: got %q, want [dev-a model-dev-a]", got)
	}
	fresh := f.subscribed("dev-a")
	if closed, err := closedWithin(old.conn, ioTimeout); !closed {
		t.Fatalf("old connection: still open after the device reconnected (%v)", err)
	}
	if got := <-f.conns; got[0] != "dev-a" {
		t.Fatalf("OnConnect: got %q, want dev-a", got)
	}
	if !f.b.Connected("dev-a") {
		t.Fatal("got Connected false, want true")
	}
	f.roundTrip(fresh, "dev-a")
	select {
	case id := <-f.gone:
		t.Fatalf("got OnDisconnect(%q) for the replaced connection, want none", id)
	default:
	}

	_ = fresh.conn.Close()
	if got := <-f.gone; got != "dev-a" {
		t.Fatalf("OnDisconnect: got %q, want dev-a", got)
	}
	fotatest.WaitFor(t, ioTimeout, "Connected(dev-a) false", func() bool { return !f.b.Connected("dev-a") })
	if got := f.b.Stats(); got.Connected != 0 || got.Sessions != 2 {
		t.Fatalf("Stats: got Connected %d Sessions %d, want 0 and 2", got.Connected, got.Sessions)
	}
}

// Each connection replaces the one before while it is still open. Mochi's own takeover can
// lose the new client from its map (connected, but deaf); this fails most runs without the
// broker's handling of it.
func TestReconnectStorm(t *testing.T) {
	var connects, disconnects atomic.Int32
	f := newFixture(t, func(o *Options) {
		o.OnConnect = func(string, string) { connects.Add(1) }
		o.OnDisconnect = func(string) { disconnects.Add(1) }
	})
	n := 150
	if testing.Short() {
		n = 30
	}
	var rc *rawClient
	for range n {
		rc = f.subscribed("dev-a")
		f.roundTrip(rc, "dev-a")
	}
	fotatest.WaitFor(t, ioTimeout, "an OnConnect per connection", func() bool { return connects.Load() == int32(n) })
	if got := disconnects.Load(); got != 0 {
		t.Fatalf("got %d OnDisconnect while the device stayed connected, want 0", got)
	}
	_ = rc.conn.Close()
	fotatest.WaitFor(t, ioTimeout, "OnDisconnect after the last connection", func() bool { return disconnects.Load() == 1 })
	if got := f.b.Stats(); got.Connected != 0 || got.Sessions != uint64(n) {
		t.Fatalf("Stats: got Connected %d Sessions %d, want 0 and %d", got.Connected, got.Sessions, n)
	}
}

func TestSubscribeACL(t *testing.T) {
	f := newFixture(t, nil)
	a := f.device("dev-a")
	const denied = 0x80
	tests := []struct {
		filter string
		want   byte
	}{
		{protocol.Topic("dev-a", protocol.SuffixJob), 1},
		{protocol.Topic("dev-a", protocol.SuffixChunk), 1},
		{protocol.Topic("dev-b", protocol.SuffixJob), denied},
		{protocol.Topic("dev-b", protocol.SuffixChunk), denied},
		{protocol.Topic("dev-a", protocol.SuffixStatus), denied},
		{protocol.Topic("dev-a", protocol.SuffixEvent), denied},
		{protocol.Topic("dev-a", protocol.SuffixRequest), denied},
		{"#", denied},
		{"+/v1/dev-a/job", denied},
		{"+/+/+/+", denied},
		{"fota/v1/+/job", denied},
		{"fota/v1/dev-a/#", denied},
		{"fota/v1/dev-a/+", denied},
		{"fota/#", denied},
		{"$SYS/#", denied},
		{"$share/g/fota/v1/dev-a/job", denied},
		{"fota/v1/dev-a", denied},
		{"fota/v1/dev-a/job/x", denied},
		{"fota/v1//job", denied},
		{"fota/v2/dev-a/job", denied},
	}
	for _, tt := range tests {
		t.Run(tt.filter, func(t *testing.T) {
			got := a.subscribe(tt.filter)
			if len(got) != 1 || got[0] != tt.want {
				t.Fatalf("SUBACK: got % x, want %02x", got, tt.want)
			}
		})
	}
	// Several filters in one SUBSCRIBE are judged one by one.
	got := a.subscribe("#", protocol.Topic("dev-a", protocol.SuffixJob), protocol.Topic("dev-b", protocol.SuffixJob))
	if want := []byte{denied, 1, denied}; !bytes.Equal(got, want) {
		t.Fatalf("SUBACK for three filters: got % x, want % x", got, want)
	}
}

func TestPublishACL(t *testing.T) {
	f := newFixture(t, nil)
	statuses := make(chan [2]string, 16)
	if err := f.b.Subscribe(protocol.SuffixStatus, func(device string, payload []byte) {
		statuses <- [2]string{device, string(payload)}
	}); err != nil {
		t.Fatalf("Subscribe: %v", err)
	}
	a := f.subscribed("dev-a")
	victim := f.subscribed("dev-b")

	forged := []string{
		protocol.Topic("dev-b", protocol.SuffixJob),    // another device's downstream
		protocol.Topic("dev-b", protocol.SuffixChunk),  // another device's downstream
		protocol.Topic("dev-b", protocol.SuffixStatus), // speaking for another device
		protocol.Topic("dev-a", protocol.SuffixJob),    // its own downstream
		"$SYS/broker/version",
		"other/topic",
	}
	for _, topic := range forged {
		if err := a.publish(topic, []byte("forged"), 0); err != nil {
			t.Fatalf("publish to %s: %v", topic, err)
		}
	}
	// dev-a's packets are handled in order: once this is acked, the forged ones were judged.
	if err := a.publish(protocol.Topic("dev-a", protocol.SuffixStatus), []byte("real"), 1); err != nil {
		t.Fatalf("publish own status: %v", err)
	}
	if got := <-statuses; got != [2]string{"dev-a", "real"} {
		t.Fatalf("status handler: got %q, want [dev-a real] first", got)
	}
	for _, rc := range []struct {
		c  *rawClient
		id string
	}{{victim, "dev-b"}, {a, "dev-a"}} {
		if err := f.b.Publish(protocol.Topic(rc.id, protocol.SuffixJob), []byte("control"), 0); err != nil {
			t.Fatalf("Publish: %v", err)
		}
		topic, payload, err := rc.c.nextPublish(ioTimeout)
		if err != nil || string(payload) != "control" {
			t.Fatalf("%s: got %q %q (err %v) first, want the control message", rc.id, topic, payload, err)
		}
	}

	// MQTT 3.1.1 has no negative PUBACK: a QoS 1 publish where it may not ends the connection.
	if err := a.publish(protocol.Topic("dev-b", protocol.SuffixJob), []byte("forged"), 1); err == nil {
		t.Fatal("QoS 1 publish to another device's topic: got PUBACK, want the connection closed")
	}
	f.roundTrip(victim, "dev-b")
}

func TestBadBytesAfterConnect(t *testing.T) {
	f := newFixture(t, nil)
	ok := f.subscribed("dev-ok")
	rng := rand.New(rand.NewPCG(1, 2))
	garbage := make([]byte, 512)
	for i := range garbage {
		garbage[i] = byte(rng.Uint32())
	}

	tests := []struct {
		name      string
		version   byte
		send      []byte
		hangUp    bool // the client closes after sending; otherwise the server must
		wantPanic bool
	}{
		{"truncated publish, then hang up", 4, []byte{typePublish, 20, 0, 5, 'f', 'o'}, true, false},
		{"garbage", 4, garbage, false, false},
		{"reserved packet type", 4, []byte{0xf0, 0}, false, false},
		{"second CONNECT", 4, connectPacket(4, "dev-x", connectOpts{}), false, false},
		{"malformed remaining length", 4, []byte{typePublish, 0xff, 0xff, 0xff, 0xff, 0x01}, false, false},
		{"oversized publish header", 4, []byte{typePublish, 0x80, 0x80, 0x80, 0x20}, false, false},
		{"subscribe with a truncated filter", 4, []byte{typeSubscribe, 6, 0, 1, 0, 9, 'f', 'o'}, false, false},
		// Mochi's v5 SUBSCRIBE decoder indexes past the end of a filter without its options
		// byte; the panic must cost this connection only.
		{"truncated v5 subscribe (decoder panic)", 5, []byte{typeSubscribe, 6, 0, 1, 0, 0, 1, 'a'}, false, true},
	}
	for _, tt := range tests {
		t.Run(tt.name, func(t *testing.T) {
			panics := f.b.Stats().Panics
			rc := mustDial(t, f.addr, f.ca.DeviceTLS(t, "dev-x", "m"))
			rc.version = tt.version
			rc.mustConnect("dev-x")
			if err := rc.send(tt.send); err != nil {
				t.Fatalf("send: %v", err)
			}
			if tt.hangUp {
				_ = rc.conn.Close()
			} else if closed, err := closedWithin(rc.conn, ioTimeout); !closed {
				t.Fatalf("connection still open after bad bytes (%v)", err)
			}
			fotatest.WaitFor(t, ioTimeout, "Connected(dev-x) false", func() bool { return !f.b.Connected("dev-x") })
			fotatest.WaitFor(t, ioTimeout, "dev-x gone from Mochi's clients", func() bool {
				_, ok := f.b.srv.Clients.Get("dev-x")
				return !ok
			})
			if got := f.b.Stats().Panics - panics; tt.wantPanic != (got > 0) {
				t.Fatalf("got %d panics contained, want panic %v", got, tt.wantPanic)
			}
			f.roundTrip(ok, "dev-ok")
		})
	}
	// dev-x comes back normally after all that.
	x := f.subscribed("dev-x")
	f.roundTrip(x, "dev-x")
}

func TestHugeConnectRefusedWithoutAllocating(t *testing.T) {
	f := newFixture(t, nil)
	ok := f.subscribed("dev-ok")

	var before, after runtime.MemStats
	runtime.ReadMemStats(&before)
	rc := mustDial(t, f.addr, f.ca.DeviceTLS(t, "dev-huge", "m"))
	// A CONNECT claiming 256 MiB, then the start of it.
	rc.mustSend(append([]byte{typeConnect, 0xff, 0xff, 0xff, 0x7f}, connectPacket(4, "dev-huge", connectOpts{})[2:]...))
	if closed, err := closedWithin(rc.conn, ioTimeout); !closed {
		t.Fatalf("connection still open after a 256 MiB CONNECT header (%v)", err)
	}
	runtime.ReadMemStats(&after)
	if grew := after.TotalAlloc - before.TotalAlloc; grew > 64<<20 {
		t.Fatalf("allocated %d MiB while refusing it, want well under 256", grew>>20)
	}
	f.roundTrip(ok, "dev-ok")
}

func TestConnectDeadline(t *testing.T) {
	const timeout = 300 * time.Millisecond
	f := newFixture(t, func(o *Options) { o.ConnectTimeout = timeout })
	devTLS := f.ca.DeviceTLS(t, "dev-slow", "m")

	tests := []struct {
		name string
		open func(t *testing.T) net.Conn
	}{
		{"silent TCP", func(t *testing.T) net.Conn { return dialTCP(t, f.addr) }},
		{"stalled TLS handshake", func(t *testing.T) net.Conn {
			c := dialTCP(t, f.addr)
			// A handshake record header promising 512 bytes, and 10 of them.
			if _, err := c.Write([]byte{0x16, 0x03, 0x01, 0x02, 0x00, 1, 0, 0, 0, 0, 0, 0, 0, 0, 0}); err != nil {
				t.Fatal(err)
			}
			return c
		}},
		{"TLS but no CONNECT", func(t *testing.T) net.Conn { return mustDial(t, f.addr, devTLS).conn }},
		{"partial CONNECT", func(t *testing.T) net.Conn {
			rc := mustDial(t, f.addr, devTLS)
			rc.mustSend(connectPacket(4, "dev-slow", connectOpts{})[:5])
			return rc.conn
		}},
	}
	for _, tt := range tests {
		t.Run(tt.name, func(t *testing.T) {
			start := time.Now()
			c := tt.open(t)
			closed, err := closedWithin(c, 10*timeout)
			if !closed {
				t.Fatalf("still open after %v, want closed after about %v", time.Since(start), timeout)
			}
			t.Logf("closed after %v: %v", time.Since(start).Round(time.Millisecond), err)
		})
	}

	// The deadline ends with CONNECT: a connected device outlives it.
	rc := f.subscribed("dev-ok")
	time.Sleep(3 * timeout) // time passing is what is tested
	f.roundTrip(rc, "dev-ok")
}

func dialTCP(t *testing.T, addr string) net.Conn {
	t.Helper()
	c, err := net.DialTimeout("tcp", addr, ioTimeout)
	if err != nil {
		t.Fatalf("dial: %v", err)
	}
	t.Cleanup(func() { _ = c.Close() })
	return c
}

func TestKeepaliveClamped(t *testing.T) {
	f := newFixture(t, func(o *Options) { o.KeepaliveMin, o.KeepaliveMax = 20, 300 })
	tests := []struct {
		asked, want uint16
	}{
		{0, 300}, {1, 20}, {20, 20}, {60, 60}, {300, 300}, {5000, 300},
	}
	for _, tt := range tests {
		for _, version := range []byte{4, 5} {
			id := "dev-ka"
			t.Run(fmt.Sprintf("MQTT %d asks %d", version, tt.asked), func(t *testing.T) {
				rc := mustDial(t, f.addr, f.ca.DeviceTLS(t, id, "m"))
				rc.version = version
				if code, err := rc.connect(id, connectOpts{keepalive: tt.asked}); err != nil || code != 0 {
					t.Fatalf("connect: got %#x, %v", code, err)
				}
				cl, ok := f.b.srv.Clients.Get(id)
				if !ok {
					t.Fatal("client not found")
				}
				if got := cl.State.Keepalive; got != tt.want {
					t.Fatalf("MQTT %d, asked %d: got keepalive %d, want %d", version, tt.asked, got, tt.want)
				}
				_ = rc.conn.Close()
			})
		}
	}
}

func TestInProcessWithPaho(t *testing.T) {
	f := newFixture(t, nil)
	const id = "dev-p"
	received := make(chan paho.Message, 16)
	c := pahoDevice(t, f.addr, f.ca.DeviceTLS(t, id, "m-p"), id)
	if got := <-f.conns; got != [2]string{id, "m-p"} {
		t.Fatalf("OnConnect: got %q, want [%s m-p]", got, id)
	}
	if !f.b.Connected(id) {
		t.Fatal("got Connected false, want true")
	}
	for _, suffix := range []string{protocol.SuffixJob, protocol.SuffixChunk} {
		tok := c.Subscribe(protocol.Topic(id, suffix), 1, func(_ paho.Client, m paho.Message) { received <- m })
		if !tok.WaitTimeout(ioTimeout) || tok.Error() != nil {
			t.Fatalf("paho subscribe: %v", tok.Error())
		}
	}

	t.Run("Publish reaches the device", func(t *testing.T) {
		chunk := make([]byte, 64<<10)
		for i := range chunk {
			chunk[i] = byte(i * 7)
		}
		sent := append([]byte(nil), chunk...)
		if err := f.b.Publish(protocol.Topic(id, protocol.SuffixChunk), chunk, 0); err != nil {
			t.Fatalf("Publish: %v", err)
		}
		clear(chunk) // Publish copied it
		m := <-received
		if m.Topic() != protocol.Topic(id, protocol.SuffixChunk) || !bytes.Equal(m.Payload(), sent) {
			t.Fatalf("got %s with %d bytes, want %s with the 64 KiB chunk", m.Topic(), len(m.Payload()), protocol.Topic(id, protocol.SuffixChunk))
		}
		if err := f.b.Publish(protocol.Topic(id, protocol.SuffixJob), []byte(`{"job":1}`), 1); err != nil {
			t.Fatalf("Publish: %v", err)
		}
		if m := <-received; string(m.Payload()) != `{"job":1}` || m.Qos() != 1 {
			t.Fatalf("got %q at QoS %d, want the job at QoS 1", m.Payload(), m.Qos())
		}
	})

	t.Run("Subscribe receives the device's upstream", func(t *testing.T) {
		got := make(chan [2]string, 4)
		if err := f.b.Subscribe(protocol.SuffixEvent, func(device string, payload []byte) {
			if string(payload) == "boom" {
				panic("handler bug")
			}
			got <- [2]string{device, string(payload)}
		}); err != nil {
			t.Fatalf("Subscribe: %v", err)
		}
		panics := f.b.Stats().Panics
		for _, p := range []string{"boom", "progress"} {
			tok := c.Publish(protocol.Topic(id, protocol.SuffixEvent), 1, false, p)
			if !tok.WaitTimeout(ioTimeout) || tok.Error() != nil {
				t.Fatalf("paho publish %q: %v", p, tok.Error())
			}
		}
		if g := <-got; g != [2]string{id, "progress"} {
			t.Fatalf("handler: got %q, want [%s progress]", g, id)
		}
		if d := f.b.Stats().Panics - panics; d != 1 {
			t.Fatalf("got %d panics counted, want 1 (the handler's)", d)
		}
	})

	t.Run("bad topics", func(t *testing.T) {
		for _, topic := range []string{
			protocol.Topic(id, protocol.SuffixStatus), "fota/v1/+/job", "fota/v1/#", "elsewhere", "",
		} {
			if err := f.b.Publish(topic, nil, 0); !errors.Is(err, ErrBadTopic) {
				t.Errorf("Publish(%q): got %v, want ErrBadTopic", topic, err)
			}
		}
		for _, suffix := range []string{"", "#", "+", "a/b"} {
			if err := f.b.Subscribe(suffix, func(string, []byte) {}); !errors.Is(err, ErrBadTopic) {
				t.Errorf("Subscribe(%q): got %v, want ErrBadTopic", suffix, err)
			}
		}
	})

	t.Run("Disconnect closes the device", func(t *testing.T) {
		if !f.b.Disconnect(id) {
			t.Fatal("Disconnect: got false, want true")
		}
		if got := <-f.gone; got != id {
			t.Fatalf("OnDisconnect: got %q, want %q", got, id)
		}
		fotatest.WaitFor(t, ioTimeout, "paho sees the connection lost", func() bool { return !c.IsConnectionOpen() })
		if f.b.Connected(id) {
			t.Fatal("got Connected true after Disconnect, want false")
		}
		if f.b.Disconnect(id) {
			t.Fatal("second Disconnect: got true, want false")
		}
		if f.b.Disconnect("nobody") {
			t.Fatal("Disconnect(nobody): got true, want false")
		}
	})
}

func TestSlowReaderDropsThenDisconnected(t *testing.T) {
	f := newFixture(t, func(o *Options) {
		o.WritesPending = 4
		o.WriteTimeout = 300 * time.Millisecond
	})
	stuck := f.device("dev-stuck")
	if got := stuck.subscribe(protocol.Topic("dev-stuck", protocol.SuffixChunk)); !bytes.Equal(got, []byte{1}) {
		t.Fatalf("SUBACK: got % x, want 01", got)
	}
	ok := f.subscribed("dev-ok")
	// dev-stuck never reads again: its socket buffers fill, then its queue, then a write
	// times out and the broker hangs up.
	chunk := make([]byte, 100<<10)
	deadline := time.Now().Add(10 * time.Second)
	for f.b.Connected("dev-stuck") {
		if time.Now().After(deadline) {
			t.Fatalf("dev-stuck still connected after 10 s of publishes it does not read (dropped %d)", f.b.Stats().Dropped)
		}
		if err := f.b.Publish(protocol.Topic("dev-stuck", protocol.SuffixChunk), chunk, 0); err != nil {
			t.Fatalf("Publish: %v", err)
		}
	}
	if f.b.Stats().Dropped == 0 {
		t.Fatal("got 0 messages dropped for a device that does not read, want some")
	}
	f.roundTrip(ok, "dev-ok")
}

func TestClose(t *testing.T) {
	baseline := runtime.NumGoroutine()
	ca := certstest.New(t)
	gone := make(chan string, 4)
	b, err := New(Options{
		Addr:           "127.0.0.1:0",
		TLS:            ca.ServerTLS(t),
		Logger:         slog.New(slog.NewTextHandler(t.Output(), &slog.HandlerOptions{Level: slog.LevelWarn})),
		OnDisconnect:   func(id string) { gone <- id },
		ConnectTimeout: time.Minute, // so Close, not the deadline, ends the silent socket
	})
	if err != nil {
		t.Fatalf("New: %v", err)
	}
	if err := b.Start(); err != nil {
		t.Fatalf("Start: %v", err)
	}
	if err := b.Start(); err == nil {
		t.Fatal("second Start: got nil, want an error")
	}
	addr := b.Addr().String()
	var devices []*rawClient
	for _, id := range []string{"dev-1", "dev-2"} {
		rc := mustDial(t, addr, ca.DeviceTLS(t, id, "m"))
		rc.mustConnect(id)
		devices = append(devices, rc)
	}
	silent := dialTCP(t, addr)
	fotatest.WaitFor(t, ioTimeout, "two devices connected", func() bool { return b.Stats().Connected == 2 })

	ctx, cancel := context.WithTimeout(context.Background(), 5*time.Second)
	defer cancel()
	if err := b.Close(ctx); err != nil {
		t.Fatalf("Close: %v", err)
	}
	// Close waited for the callbacks: both disconnects are in.
	if len(gone) != 2 {
		t.Fatalf("got %d OnDisconnect calls by the end of Close, want 2", len(gone))
	}
	for _, c := range append([]net.Conn{silent}, devices[0].conn, devices[1].conn) {
		if closed, err := closedWithin(c, ioTimeout); !closed {
			t.Fatalf("connection still open after Close (%v)", err)
		}
	}
	if c, err := net.DialTimeout("tcp", addr, time.Second); err == nil {
		_ = c.Close()
		t.Fatal("dial after Close: got a connection, want refused")
	}
	if err := b.Publish(protocol.Topic("dev-1", protocol.SuffixJob), nil, 0); !errors.Is(err, ErrClosed) {
		t.Fatalf("Publish after Close: got %v, want ErrClosed", err)
	}
	if err := b.Start(); !errors.Is(err, ErrClosed) {
		t.Fatalf("Start after Close: got %v, want ErrClosed", err)
	}
	if err := b.Close(ctx); err != nil {
		t.Fatalf("second Close: got %v, want nil", err)
	}
	fotatest.WaitFor(t, ioTimeout, "goroutines back to the baseline", func() bool { return runtime.NumGoroutine() <= baseline })
}

func TestAllowed(t *testing.T) {
	tests := []struct {
		topic string
		write bool
		want  bool
	}{
		{"fota/v1/d/status", true, true},
		{"fota/v1/d/event", true, true},
		{"fota/v1/d/req", true, true},
		{"fota/v1/d/job", true, false},
		{"fota/v1/d/job", false, true},
		{"fota/v1/d/chunk", false, true},
		{"fota/v1/d/status", false, false},
		{"fota/v1/dd/job", false, false},
		{"fota/v1/d", false, false},
		{"fota/v1/d/", false, false},
		{"fota/v1d/job", false, false},
		{"fota/v1/d/job/", false, false},
		{"fota/v1/+/job", false, false},
		{"", false, false},
	}
	for _, tt := range tests {
		if got := allowed("d", tt.topic, tt.write); got != tt.want {
			t.Errorf("allowed(d, %q, write=%v): got %v, want %v", tt.topic, tt.write, got, tt.want)
		}
	}
	if n := testing.AllocsPerRun(100, func() { allowed("d", "fota/v1/d/chunk", false) }); n != 0 {
		t.Errorf("allowed allocates %v times per call, want 0", n)
	}
}

// TestStaleDisconnectNotDelivered: connection events are delivered on their own goroutine,
// behind the device's messages. When the device's old connection ended and a new one is
// already up by the time that end is delivered, delivering it would mark offline a device
// that is connected; its new connect follows anyway.
func TestStaleDisconnectNotDelivered(t *testing.T) {
	gate := make(chan struct{})
	var mu sync.Mutex
	var got []string
	f := newFixture(t, func(o *Options) {
		o.OnConnect = func(id, _ string) {
			<-gate // holds the event goroutine: what follows queues behind
			mu.Lock()
			got = append(got, "connect")
			mu.Unlock()
		}
		o.OnDisconnect = func(id string) {
			mu.Lock()
			got = append(got, "disconnect")
			mu.Unlock()
		}
	})
	old := f.device("dev-a")
	_ = old.conn.Close()
	// The old connection's end is recorded (and its disconnect queued) before the new one
	// arrives, as when a device reconnects after a drop the broker noticed.
	fotatest.WaitFor(t, ioTimeout, "the old connection gone", func() bool { return !f.b.Connected("dev-a") })
	rc := f.subscribed("dev-a")
	fotatest.WaitFor(t, ioTimeout, "the new connection up", func() bool { return f.b.Connected("dev-a") })
	close(gate)
	fotatest.WaitFor(t, ioTimeout, "both connects delivered", func() bool {
		mu.Lock()
		defer mu.Unlock()
		n := 0
		for _, e := range got {
			if e == "connect" {
				n++
			}
		}
		return n == 2
	})
	f.roundTrip(rc, "dev-a")
	mu.Lock()
	defer mu.Unlock()
	if want := []string{"connect", "connect"}; !slices.Equal(got, want) {
		t.Fatalf("got events %v, want %v: the old connection's disconnect arrived after the new connection was up", got, want)
	}
}

// TestPublishRestoresLostClient: Mochi routes publishes through its client map by id, and
// its once-a-second expiry sweep deletes stale entries by id from a snapshot, which can take a
// device's newer connection with it. Publish must still reach the connected device.
func TestPublishRestoresLostClient(t *testing.T) {
	f := newFixture(t, nil)
	rc := f.subscribed("dev-a")
	f.roundTrip(rc, "dev-a")
	f.b.srv.Clients.Delete("dev-a") // what the sweep's race leaves behind
	f.roundTrip(rc, "dev-a")
	if got := f.b.Stats().Restored; got != 1 {
		t.Fatalf("Stats.Restored: got %d, want 1", got)
	}
	// A device that is not connected is not invented.
	if err := f.b.Publish(protocol.Topic("dev-b", protocol.SuffixJob), []byte("x"), 1); err != nil {
		t.Fatal(err)
	}
	if _, ok := f.b.srv.Clients.Get("dev-b"); ok {
		t.Fatal("Publish to an unconnected device added it to the client map")
	}
}

// TestFailedConnackLeavesNoEntry: a device that gives up waiting for its CONNACK closes the
// socket, and Mochi, failing to write the CONNACK, returns without removing the client from
// its map. Its expiry sweep would later delete that id from under the device's next
// connection, so the broker removes the entry as the connection ends.
func TestFailedConnackLeavesNoEntry(t *testing.T) {
	f := newFixture(t, nil)
	ended := make(chan *conn, 1)
	var once atomic.Bool
	fail := func(c *conn) {
		if c.id == "dev-gone" && once.CompareAndSwap(false, true) {
			_ = c.raw.Close() // the device left: the CONNACK write fails
			ended <- c
		}
	}
	f.b.beforeConnack.Store(&fail)
	rc := mustDial(t, f.addr, f.ca.DeviceTLS(t, "dev-gone", "model-x"))
	rc.mustSend(connectPacket(4, "dev-gone", connectOpts{keepalive: 30}))
	var c *conn
	select {
	case c = <-ended:
	case <-time.After(ioTimeout):
		t.Fatal("the connection never reached its session")
	}
	select {
	case <-c.ended:
	case <-time.After(ioTimeout):
		t.Fatal("the connection did not end after its CONNACK failed")
	}
	if _, ok := f.b.srv.Clients.Get("dev-gone"); ok {
		t.Fatal("a client whose CONNACK failed is still in Mochi's client map after its connection ended")
	}
	// The device's next connection works.
	rc2 := f.subscribed("dev-gone")
	f.roundTrip(rc2, "dev-gone")
}

// pahoDevice connects device id with paho over MQTT 3.1.1, the client library devicesim
// uses, and disconnects it when the test ends.
func pahoDevice(t *testing.T, addr string, cfg *tls.Config, id string) paho.Client {
	t.Helper()
	o := paho.NewClientOptions().
		AddBroker("tls://" + addr).
		SetClientID(id).
		SetTLSConfig(cfg).
		SetProtocolVersion(4).
		SetAutoReconnect(false).
		SetConnectRetry(false)
	c := paho.NewClient(o)
	if tok := c.Connect(); !tok.WaitTimeout(ioTimeout) || tok.Error() != nil {
		t.Fatalf("paho connect: %v", tok.Error())
	}
	t.Cleanup(func() { c.Disconnect(0) })
	return c
}
