package broker

import (
	"bufio"
	"crypto/tls"
	"encoding/binary"
	"errors"
	"fmt"
	"io"
	"net"
	"os"
	"testing"
	"time"
)

// A raw MQTT client over TLS, for checks a client library hides: exact CONNACK and SUBACK
// codes, malformed packets, and whether the server closed the connection.

const (
	typeConnect   = 0x10
	typeConnack   = 0x20
	typePublish   = 0x30
	typePuback    = 0x40
	typeSubscribe = 0x82 // with the reserved flags 0010
	typeSuback    = 0x90
	typePingreq   = 0xc0
	typePingresp  = 0xd0
)

const ioTimeout = 10 * time.Second

type rawClient struct {
	t       testing.TB
	conn    net.Conn
	r       *bufio.Reader
	version byte // 4 (3.1.1) or 5
	nextID  uint16
}

// dial opens a TLS connection and completes the client side of the handshake.
func dial(t testing.TB, addr string, cfg *tls.Config) (*rawClient, error) {
	t.Helper()
	d := &net.Dialer{Timeout: ioTimeout}
	c, err := tls.DialWithDialer(d, "tcp", addr, cfg)
	if err != nil {
		return nil, err
	}
	t.Cleanup(func() { _ = c.Close() })
	return &rawClient{t: t, conn: c, r: bufio.NewReader(c), version: 4, nextID: 1}, nil
}

// mustDial is dial that fails the test on error.
func mustDial(t testing.TB, addr string, cfg *tls.Config) *rawClient {
	t.Helper()
	rc, err := dial(t, addr, cfg)
	if err != nil {
		t.Fatalf("dial %s: %v", addr, err)
	}
	return rc
}

// varint appends MQTT's variable byte integer.
func varint(b []byte, n int) []byte {
	for {
		d := byte(n % 128)
		n /= 128
		if n > 0 {
			d |= 0x80
		}
		b = append(b, d)
		if n == 0 {
			return b
		}
	}
}

func mqttString(b []byte, s string) []byte {
	b = binary.BigEndian.AppendUint16(b, uint16(len(s)))
	return append(b, s...)
}

func packet(typeFlags byte, body []byte) []byte {
	return append(varint([]byte{typeFlags}, len(body)), body...)
}

type will struct{ topic, payload string }

type connectOpts struct {
	keepalive  uint16
	will       *will
	willRetain bool
	flags      byte // the CONNECT flags as they are, if not 0
	version    byte // for the table in TestConnect; 0 means the client's
}

func connectPacket(version byte, id string, o connectOpts) []byte {
	flags := byte(0x02) // clean session
	if o.will != nil {
		flags |= 0x04
	}
	if o.willRetain {
		flags |= 0x20
	}
	if o.flags != 0 {
		flags = o.flags
	}
	b := mqttString(nil, "MQTT")
	b = append(b, version, flags)
	b = binary.BigEndian.AppendUint16(b, o.keepalive)
	if version == 5 {
		b = append(b, 0) // no properties
	}
	b = mqttString(b, id)
	if o.will != nil {
		if version == 5 {
			b = append(b, 0) // no will properties
		}
		b = mqttString(b, o.will.topic)
		b = mqttString(b, o.will.payload)
	}
	return packet(typeConnect, b)
}

func (rc *rawClient) send(b []byte) error {
	_ = rc.conn.SetWriteDeadline(time.Now().Add(ioTimeout))
	_, err := rc.conn.Write(b)
	return err
}

func (rc *rawClient) mustSend(b []byte) {
	rc.t.Helper()
	if err := rc.send(b); err != nil {
		rc.t.Fatalf("send: %v", err)
	}
}

// read reads one packet within d.
func (rc *rawClient) read(d time.Duration) (typeFlags byte, body []byte, err error) {
	_ = rc.conn.SetReadDeadline(time.Now().Add(d))
	typeFlags, err = rc.r.ReadByte()
	if err != nil {
		return 0, nil, err
	}
	n, mul := 0, 1
	for i := 0; ; i++ {
		d, err := rc.r.ReadByte()
		if err != nil {
			return 0, nil, err
		}
		n += int(d&0x7f) * mul
		mul *= 128
		if d&0x80 == 0 {
			break
		}
		if i == 3 {
			return 0, nil, errors.New("bad remaining length")
		}
	}
	body = make([]byte, n)
	if _, err := io.ReadFull(rc.r, body); err != nil {
		return 0, nil, err
	}
	return typeFlags, body, nil
}

// connect sends CONNECT and returns the CONNACK code, or an error if the server closed the
// connection (or failed the TLS handshake) instead.
func (rc *rawClient) connect(id string, o connectOpts) (byte, error) {
	if err := rc.send(connectPacket(rc.version, id, o)); err != nil {
		return 0, err
	}
	typ, body, err := rc.read(ioTimeout)
	if err != nil {
		return 0, err
	}
	if typ != typeConnack || len(body) < 2 {
		return 0, fmt.Errorf("got packet %#x % x, want CONNACK", typ, body)
	}
	return body[1], nil
}

func (rc *rawClient) mustConnect(id string) {
	rc.t.Helper()
	code, err := rc.connect(id, connectOpts{keepalive: 30})
	if err != nil || code != 0 {
		rc.t.Fatalf("connect %q: got code %#x, err %v; want 0, nil", id, code, err)
	}
}

// subscribe subscribes to filters at QoS 1 in one SUBSCRIBE and returns the SUBACK codes.
func (rc *rawClient) subscribe(filters ...string) []byte {
	rc.t.Helper()
	id := rc.nextID
	rc.nextID++
	b := binary.BigEndian.AppendUint16(nil, id)
	if rc.version == 5 {
		b = append(b, 0)
	}
	for _, f := range filters {
		b = mqttString(b, f)
		b = append(b, 1)
	}
	rc.mustSend(packet(typeSubscribe, b))
	for {
		typ, body, err := rc.read(ioTimeout)
		if err != nil {
			rc.t.Fatalf("read SUBACK: %v", err)
		}
		if typ&0xf0 == typePublish {
			continue // a retained or queued message is not what we wait for
		}
		if typ != typeSuback || len(body) < 2 || binary.BigEndian.Uint16(body) != id {
			rc.t.Fatalf("got packet %#x % x, want SUBACK for %d", typ, body, id)
		}
		codes := body[2:]
		if rc.version == 5 {
			codes = codes[1+int(codes[0]):] // skip the properties (short, one length byte)
		}
		return codes
	}
}

// publish sends a PUBLISH; at QoS 1 it waits for the PUBACK.
func (rc *rawClient) publish(topic string, payload []byte, qos byte) error {
	b := mqttString(nil, topic)
	var id uint16
	if qos > 0 {
		id = rc.nextID
		rc.nextID++
		b = binary.BigEndian.AppendUint16(b, id)
	}
	if rc.version == 5 {
		b = append(b, 0)
	}
	b = append(b, payload...)
	if err := rc.send(packet(typePublish|qos<<1, b)); err != nil {
		return err
	}
	if qos == 0 {
		return nil
	}
	for {
		typ, body, err := rc.read(ioTimeout)
		if err != nil {
			return fmt.Errorf("read PUBACK: %w", err)
		}
		if typ == typePuback && len(body) >= 2 && binary.BigEndian.Uint16(body) == id {
			return nil
		}
	}
}

// nextPublish reads until a PUBLISH arrives and returns its topic and payload, acking QoS 1.
func (rc *rawClient) nextPublish(d time.Duration) (topic string, payload []byte, err error) {
	deadline := time.Now().Add(d)
	for {
		typ, body, err := rc.read(time.Until(deadline))
		if err != nil {
			return "", nil, err
		}
		if typ&0xf0 != typePublish {
			continue
		}
		qos := (typ >> 1) & 3
		n := int(binary.BigEndian.Uint16(body))
		topic = string(body[2 : 2+n])
		rest := body[2+n:]
		if qos > 0 {
			id := rest[:2]
			rest = rest[2:]
			if err := rc.send(packet(typePuback, id)); err != nil {
				return "", nil, err
			}
		}
		if rc.version == 5 {
			rest = rest[1+int(rest[0]):]
		}
		return topic, rest, nil
	}
}

// closedWithin reports whether the server closes the connection within d, reading (and
// discarding) whatever it sends first.
func closedWithin(conn net.Conn, d time.Duration) (bool, error) {
	deadline := time.Now().Add(d)
	_ = conn.SetReadDeadline(deadline)
	buf := make([]byte, 4096)
	for {
		_, err := conn.Read(buf)
		if err == nil {
			continue
		}
		if errors.Is(err, os.ErrDeadlineExceeded) {
			return false, nil
		}
		return true, err
	}
}
