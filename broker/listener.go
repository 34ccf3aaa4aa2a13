package broker

import (
	"crypto/tls"
	"errors"
	"fmt"
	"log/slog"
	"net"
	"sync"
	"sync/atomic"
	"time"

	mqtt "github.com/mochi-mqtt/server/v2"
	"github.com/mochi-mqtt/server/v2/listeners"

	"github.com/fota-dev/fota/certs"
)

const listenerID = "fota-tls"

// listener is our Mochi listener. Mochi's TCP listener has no deadline before CONNECT (the TLS
// handshake happens inside that first read, so silent sockets are held forever) and calls
// Mochi's per-connection code bare, where a decoder panic takes down the process. This one
// handshakes under ConnectTimeout itself, hands Mochi a conn that keeps that deadline until
// CONNECT is read, and recovers panics per connection.
type listener struct {
	b    *Broker
	ln   net.Listener
	quit chan struct{}

	mu     sync.Mutex
	closed bool
	conns  map[net.Conn]struct{} // raw sockets, from accept until their goroutine ends
	wg     sync.WaitGroup        // Serve and one goroutine per connection
}

var _ listeners.Listener = (*listener)(nil)

func newListener(b *Broker, ln net.Listener) *listener {
	l := &listener{b: b, ln: ln, quit: make(chan struct{}), conns: make(map[net.Conn]struct{})}
	// Counted from here, not in Serve, which Mochi starts on a goroutine of its own: Close must
	// wait for it even if it has not run yet.
	l.wg.Add(1)
	// Held until Close has waited for our connections: Mochi adds to ClientsWg inside each
	// connection and waits on it after closing listeners, and an Add from zero racing that
	// Wait is a WaitGroup misuse.
	b.srv.Listeners.ClientsWg.Add(1)
	return l
}

func (l *listener) ID() string                { return listenerID }
func (l *listener) Address() string           { return l.ln.Addr().String() }
func (l *listener) Protocol() string          { return "mqtt+tls" }
func (l *listener) Init(_ *slog.Logger) error { return nil }

// Serve accepts until the listener is closed.
func (l *listener) Serve(establish listeners.EstablishFn) {
	defer l.wg.Done()
	backoff := 5 * time.Millisecond
	for {
		raw, err := l.ln.Accept()
		if err != nil {
			if errors.Is(err, net.ErrClosed) {
				return
			}
			// Out of descriptors or the like: wait rather than spin, as net/http does.
			l.b.log.Warn("accept", "error", err, "retry_in", backoff)
			select {
			case <-time.After(backoff):
			case <-l.quit:
				return
			}
			backoff = min(2*backoff, time.Second)
			continue
		}
		backoff = 5 * time.Millisecond
		sl, cause := l.b.gate.admit(raw.RemoteAddr())
		if sl == nil {
			l.b.refuse(cause, raw.RemoteAddr().String())
			drop(raw)
			continue
		}
		// One deadline for the handshake and the CONNECT packet together.
		_ = raw.SetDeadline(time.Now().Add(l.b.opts.ConnectTimeout))
		l.mu.Lock()
		if l.closed {
			l.mu.Unlock()
			sl.release()
			_ = raw.Close()
			return
		}
		l.conns[raw] = struct{}{}
		l.wg.Add(1)
		l.mu.Unlock()
		go l.handle(raw, sl, establish)
	}
}

// handle runs one connection from TLS handshake to its end.
//
// Its frame stays on the stack for the connection's life, under Mochi's read loop. The
// handshake grows the goroutine's stack to 32 KiB, and the runtime halves a stack at a GC
// only while less than a quarter of it is in use (plus 800 bytes of margin): an idle
// device's goroutine uses 6.5 KiB, 4.7 KiB of it Mochi's frames, so it settles at 16 KiB,
// and 7.2 KiB with the handshake's locals in this frame, which left it 170 bytes short of
// staying at 32 KiB. So the handshake has a function, and a frame, of its own.
func (l *listener) handle(raw net.Conn, sl *slot, establish listeners.EstablishFn) {
	defer l.wg.Done()
	defer l.forget(raw)
	defer raw.Close()
	defer sl.release() // if authentication did not
	// Mochi's part has its own recover (establish), and so has handshake.
	defer l.b.recoverPanic("connection")

	c := l.handshake(raw)
	if c == nil {
		return
	}
	c.slot = sl
	defer close(c.ended)
	err := l.establish(c, establish)
	l.finish(c, err)
}

// handshake runs the TLS handshake and reads the peer's identity from its certificate. It
// returns nil, having counted and logged why, if the connection goes no further.
func (l *listener) handshake(raw net.Conn) *conn {
	b := l.b
	remote := raw.RemoteAddr().String()
	defer b.recoverPanic("connection setup", "remote", remote)

	tc := tls.Server(raw, b.tls)
	if err := tc.Handshake(); err != nil {
		cause := causeTLS
		var ne net.Error
		if errors.As(err, &ne) && ne.Timeout() {
			cause = causeTimeout
		} else if errors.As(err, new(certRefused)) {
			cause = causeRevoked
		}
		b.refuse(cause, remote)
		b.log.Debug("tls handshake failed", "remote", remote, "error", err)
		return nil
	}
	// Writes get a deadline each (conn.Write); the read deadline stays until CONNECT is in.
	_ = raw.SetWriteDeadline(time.Time{})

	c := &conn{Conn: tc, raw: raw, writeTimeout: b.opts.WriteTimeout, ended: make(chan struct{})}
	if r := b.opts.MessageRate; r > 0 {
		burst := b.opts.MessageBurst
		if burst <= 0 {
			burst = r
		}
		c.throttle.bucket = newBucket(float64(r), float64(burst), time.Now())
	}
	state := tc.ConnectionState()
	if len(state.PeerCertificates) == 0 {
		c.idErr = errors.New("no client certificate")
	} else {
		c.id, c.model, c.idErr = certs.DeviceIdentity(state.PeerCertificates[0])
	}
	return c
}

// finish records the end of c, which establish returned with err.
func (l *listener) finish(c *conn, err error) {
	b := l.b
	if c.client != nil {
		b.gone(c)
		b.log.Debug("device disconnected", "device", c.id, "remote", c.RemoteAddr().String(), "error", err)
		return
	}
	cause := c.refusal
	if cause == "" {
		cause = causeConnect
		var ne net.Error
		if errors.As(err, &ne) && ne.Timeout() {
			cause = causeTimeout
		}
		b.log.Debug("connection refused", "remote", c.RemoteAddr().String(), "error", err)
	}
	b.refuse(cause, c.RemoteAddr().String())
}

// drop closes a socket refused at accept, with a reset rather than a FIN, so that the server
// keeps no TIME_WAIT state for it.
func drop(raw net.Conn) {
	if tc, ok := raw.(*net.TCPConn); ok {
		_ = tc.SetLinger(0)
	}
	_ = raw.Close()
}

// forget drops raw from the connections Close must close.
func (l *listener) forget(raw net.Conn) {
	l.mu.Lock()
	delete(l.conns, raw)
	l.mu.Unlock()
}

// establish hands c to Mochi, which reads CONNECT, runs our hooks and then reads packets
// until the connection ends. A panic in there ends this connection only.
func (l *listener) establish(c *conn, establish listeners.EstablishFn) (err error) {
	defer func() {
		r := recover()
		if r == nil {
			return
		}
		b := l.b
		b.contained(r, "in", "connection", "device", c.id, "remote", c.RemoteAddr().String())
		err = fmt.Errorf("panic: %v", r)
		_ = c.Close()
		// Mochi's own cleanup after the read loop did not run; do it, so nothing is routed
		// to the dead client. No newer connection of the device can race this: it waits in
		// Broker.established until this one has ended.
		if cl := c.client; cl != nil && !cl.IsTakenOver() {
			b.srv.UnsubscribeClient(cl)
			cl.ClearInflights()
			if cur, ok := b.srv.Clients.Get(c.id); ok && cur == cl {
				b.srv.Clients.Delete(c.id)
			}
		}
	}()
	return establish(listenerID, c)
}

// abandon releases a listener whose Serve never ran.
func (l *listener) abandon() {
	l.mu.Lock()
	l.closed = true
	l.mu.Unlock()
	_ = l.ln.Close()
	l.wg.Done()
	l.b.srv.Listeners.ClientsWg.Done()
}

// Close stops accepting and closes every connection, without a DISCONNECT packet: 3.1.1 has
// none from the server, and writing to a device that does not read could block shutdown.
func (l *listener) Close(_ listeners.CloseFn) {
	_ = l.shutdown()
}

func (l *listener) shutdown() error {
	l.mu.Lock()
	if l.closed {
		l.mu.Unlock()
		return nil
	}
	l.closed = true
	close(l.quit)
	for raw := range l.conns {
		_ = raw.Close()
	}
	l.mu.Unlock()
	err := l.ln.Close()
	l.wg.Wait()
	l.b.srv.Listeners.ClientsWg.Done()
	return err
}

// conn is the net.Conn Mochi sees for one device: the TLS connection plus what the handshake
// established about its peer, and write deadlines of its own.
type conn struct {
	*tls.Conn
	raw          net.Conn
	writeTimeout time.Duration

	// Set before Mochi sees the conn, read by hooks on any goroutine.
	id, model string
	idErr     error // the peer certificate is not a device's

	// Set and read on the connection's own goroutine (Mochi's hooks for it run there).
	authed   bool
	refusal  string       // the cause, once the hook refused CONNECT
	client   *mqtt.Client // set once the session is being established
	slot     *slot        // in the pending count until authenticated
	throttle throttle     // this device's messages; a zero rate is no limit

	throttledOut atomic.Bool // disconnected for MessageStrikes throttled messages

	ended chan struct{} // closed when the connection and Mochi's cleanup of it are over
}

// SetDeadline sets the read deadline only. Mochi calls it before each packet with 1.5x the
// keepalive, which would also let a write to a device that stopped reading block that long
// while holding the client's lock (stalling QoS 1 publishes to it); Write bounds writes instead.
func (c *conn) SetDeadline(t time.Time) error { return c.Conn.SetReadDeadline(t) }

// Write writes under WriteTimeout and closes the connection when a write fails: after a failed
// write the TLS stream is unusable, and closing ends Mochi's read loop at once.
func (c *conn) Write(p []byte) (int, error) {
	_ = c.Conn.SetWriteDeadline(time.Now().Add(c.writeTimeout))
	n, err := c.Conn.Write(p)
	if err != nil {
		_ = c.raw.Close()
	}
	return n, err
}

// Close closes the socket without TLS close_notify: tls.Conn.Close writes that alert with a
// 5 s deadline of its own, and Close must not block (Disconnect and session takeover call it).
func (c *conn) Close() error { return c.raw.Close() }
