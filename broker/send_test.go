package broker

import (
	"bytes"
	"context"
	"encoding/binary"
	"errors"
	"fmt"
	"io"
	"os"
	"slices"
	"strconv"
	"strings"
	"sync"
	"testing"
	"time"

	paho "github.com/eclipse/paho.mqtt.golang"

	"github.com/fota-dev/fota/fotatest"
	"github.com/fota-dev/fota/protocol"
)

// Tests of Broker.Send against the real broker over mutual TLS: paho for MQTT 3.1.1, and the
// raw client of mqtt_test.go, extended below with the MQTT 5 packets Send must honour (CONNECT
// Maximum Packet Size, SUBSCRIBE subscription identifier), whose PUBLISH decoder checks every
// byte the broker writes.

// chunkFrame is the size of the largest chunk frame: what Send exists for.
const chunkFrame = protocol.FrameHeaderSize + protocol.MaxChunkSize

const (
	typeUnsubscribe = 0xa2 // with the reserved flags 0010
	typeUnsuback    = 0xb0
	propSubID       = 0x0b // MQTT 5 subscription identifier, a variable byte integer
	propMaxPacket   = 0x27 // MQTT 5 maximum packet size, a four-byte integer
)

// newSendFixture is newFixture without the connect callbacks: these tests make more
// connections than the fixture's channels hold and never drain them, and a full one would
// stall Close.
func newSendFixture(t *testing.T, edit func(*Options)) *fixture {
	t.Helper()
	return newFixture(t, func(o *Options) {
		o.OnConnect, o.OnDisconnect = nil, nil
		if edit != nil {
			edit(o)
		}
	})
}

func chunkTopic(id string) string { return protocol.Topic(id, protocol.SuffixChunk) }
func jobTopic(id string) string   { return protocol.Topic(id, protocol.SuffixJob) }

// dialDevice connects device id with its own certificate, speaking MQTT version (4 or 5).
// maxPacket is the MQTT 5 CONNECT's Maximum Packet Size; 0 leaves it out.
func dialDevice(t *testing.T, f *fixture, id string, version byte, maxPacket uint32) *rawClient {
	t.Helper()
	rc := mustDial(t, f.addr, f.ca.DeviceTLS(t, id, "m"))
	rc.version = version
	if version != 5 {
		rc.mustConnect(id)
		return rc
	}
	b := mqttString(nil, "MQTT")
	b = append(b, 5, 0x02) // clean start
	b = binary.BigEndian.AppendUint16(b, 30)
	var props []byte
	if maxPacket > 0 {
		props = binary.BigEndian.AppendUint32([]byte{propMaxPacket}, maxPacket)
	}
	b = varint(b, len(props))
	b = append(b, props...)
	b = mqttString(b, id)
	if err := rc.send(packet(typeConnect, b)); err != nil {
		t.Fatalf("send CONNECT: %v", err)
	}
	typ, body, err := rc.read(ioTimeout)
	if err != nil || typ != typeConnack || len(body) < 2 || body[1] != 0 {
		t.Fatalf("connect %s: got packet %#x % x, err %v; want CONNACK success", id, typ, body, err)
	}
	return rc
}

// subscribeWith subscribes rc to filter at QoS 1, with MQTT 5 subscription identifier subID
// (0: none; ignored for 3.1.1), and returns the SUBACK's reason code.
func subscribeWith(t *testing.T, rc *rawClient, filter string, subID int) byte {
	t.Helper()
	id := rc.nextID
	rc.nextID++
	b := binary.BigEndian.AppendUint16(nil, id)
	if rc.version == 5 {
		var props []byte
		if subID > 0 {
			props = varint([]byte{propSubID}, subID)
		}
		b = varint(b, len(props))
		b = append(b, props...)
	}
	b = mqttString(b, filter)
	b = append(b, 1)
	if err := rc.send(packet(typeSubscribe, b)); err != nil {
		t.Fatalf("send SUBSCRIBE: %v", err)
	}
	typ, body, err := rc.read(ioTimeout)
	if err != nil || typ != typeSuback || len(body) < 3 || binary.BigEndian.Uint16(body) != id {
		t.Fatalf("subscribe %s: got packet %#x % x, err %v; want SUBACK for %d", filter, typ, body, err, id)
	}
	codes := body[2:]
	if rc.version == 5 {
		n, size, err := mqttUvarint(codes)
		if err != nil || size+n > len(codes) {
			t.Fatalf("SUBACK properties: % x (%v)", codes, err)
		}
		codes = codes[size+n:]
	}
	if len(codes) != 1 {
		t.Fatalf("SUBACK: got %d reason codes, want 1", len(codes))
	}
	return codes[0]
}

// mustSubscribe is subscribeWith that wants the subscription granted at QoS 1.
func mustSubscribe(t *testing.T, rc *rawClient, filter string, subID int) {
	t.Helper()
	if code := subscribeWith(t, rc, filter, subID); code != 1 {
		t.Fatalf("subscribe %s: got SUBACK code %#02x, want 01", filter, code)
	}
}

func unsubscribe(t *testing.T, rc *rawClient, filter string) {
	t.Helper()
	id := rc.nextID
	rc.nextID++
	b := binary.BigEndian.AppendUint16(nil, id)
	if rc.version == 5 {
		b = append(b, 0)
	}
	b = mqttString(b, filter)
	if err := rc.send(packet(typeUnsubscribe, b)); err != nil {
		t.Fatalf("send UNSUBSCRIBE: %v", err)
	}
	typ, body, err := rc.read(ioTimeout)
	if err != nil || typ != typeUnsuback || len(body) < 2 || binary.BigEndian.Uint16(body) != id {
		t.Fatalf("unsubscribe %s: got packet %#x % x, err %v; want UNSUBACK for %d", filter, typ, body, err, id)
	}
}

// readPacket reads one whole packet, fixed header and remaining length included, within d.
func readPacket(rc *rawClient, d time.Duration) ([]byte, error) {
	_ = rc.conn.SetReadDeadline(time.Now().Add(d))
	first, err := rc.r.ReadByte()
	if err != nil {
		return nil, err
	}
	raw := []byte{first}
	n := 0
	for i := 0; ; i++ {
		if i == 4 {
			return nil, fmt.Errorf("remaining length % x longer than 4 bytes", raw[1:])
		}
		c, err := rc.r.ReadByte()
		if err != nil {
			return nil, err
		}
		raw = append(raw, c)
		n |= int(c&0x7f) << (7 * i)
		if c&0x80 == 0 {
			break
		}
	}
	head := len(raw)
	raw = slices.Grow(raw, n)[:head+n]
	if _, err := io.ReadFull(rc.r, raw[head:]); err != nil {
		return nil, fmt.Errorf("packet %#02x, %d of %d bytes: %w", first, head, n, err)
	}
	return raw, nil
}

// mqttUvarint decodes an MQTT variable byte integer: at most four bytes, little-endian groups
// of seven bits.
func mqttUvarint(b []byte) (n, size int, err error) {
	for i := 0; i < 4; i++ {
		if i == len(b) {
			return 0, 0, errors.New("truncated variable byte integer")
		}
		n |= int(b[i]&0x7f) << (7 * i)
		if b[i]&0x80 == 0 {
			return n, i + 1, nil
		}
	}
	return 0, 0, errors.New("variable byte integer longer than 4 bytes")
}

func mqttVarintLen(n int) int { return len(varint(nil, n)) }

// inPublish is a PUBLISH as the device received it.
type inPublish struct {
	header    byte // type and flags
	remaining int
	lenBytes  int // bytes encoding remaining
	topic     string
	packetID  uint16
	propLen   int    // MQTT 5
	subIDs    []int  // MQTT 5 subscription identifiers, in order
	otherProp []byte // MQTT 5 identifiers of any other properties
	payload   []byte
}

func (p inPublish) qos() byte { return p.header >> 1 & 3 }

// decodePublish decodes raw, one whole packet, as a PUBLISH of MQTT version, checking that
// every length in it adds up.
func decodePublish(raw []byte, version byte) (inPublish, error) {
	var p inPublish
	if len(raw) < 2 || raw[0]>>4 != typePublish>>4 {
		return p, fmt.Errorf("not a PUBLISH: % x", raw[:min(len(raw), 8)])
	}
	p.header = raw[0]
	if p.qos() == 3 {
		return p, fmt.Errorf("PUBLISH with QoS 3: %#02x", raw[0])
	}
	var err error
	p.remaining, p.lenBytes, err = mqttUvarint(raw[1:])
	if err != nil {
		return p, fmt.Errorf("remaining length: %w", err)
	}
	body := raw[1+p.lenBytes:]
	if p.remaining != len(body) {
		return p, fmt.Errorf("remaining length %d, packet has %d", p.remaining, len(body))
	}
	if len(body) < 2 {
		return p, errors.New("no topic length")
	}
	tl := int(binary.BigEndian.Uint16(body))
	body = body[2:]
	if tl > len(body) {
		return p, fmt.Errorf("topic length %d, %d bytes left", tl, len(body))
	}
	p.topic, body = string(body[:tl]), body[tl:]
	if p.qos() > 0 {
		if len(body) < 2 {
			return p, errors.New("no packet identifier")
		}
		p.packetID, body = binary.BigEndian.Uint16(body), body[2:]
	}
	if version == 5 {
		n, size, err := mqttUvarint(body)
		if err != nil {
			return p, fmt.Errorf("property length: %w", err)
		}
		body = body[size:]
		if n > len(body) {
			return p, fmt.Errorf("property length %d, %d bytes left", n, len(body))
		}
		p.propLen = n
		props := body[:n]
		body = body[n:]
		if err := p.decodeProps(props); err != nil {
			return p, err
		}
	}
	p.payload = body
	return p, nil
}

func (p *inPublish) decodeProps(b []byte) error {
	skip := func(n int) error {
		if n > len(b) {
			return fmt.Errorf("property of %d bytes, %d left", n, len(b))
		}
		b = b[n:]
		return nil
	}
	str := func() error {
		if len(b) < 2 {
			return errors.New("truncated string property")
		}
		return skip(2 + int(binary.BigEndian.Uint16(b)))
	}
	for len(b) > 0 {
		id := b[0]
		b = b[1:]
		var err error
		switch id {
		case propSubID:
			var n, size int
			n, size, err = mqttUvarint(b)
			if err == nil && n == 0 {
				err = errors.New("subscription identifier 0") // a protocol error [MQTT-3.3.4-3]
			}
			if err == nil {
				p.subIDs = append(p.subIDs, n)
				b = b[size:]
			}
		case 0x01: // payload format indicator
			err = skip(1)
		case 0x02: // message expiry interval
			err = skip(4)
		case 0x23: // topic alias
			err = skip(2)
		case 0x03, 0x08, 0x09: // content type, response topic, correlation data
			err = str()
		case 0x26: // user property
			if err = str(); err == nil {
				err = str()
			}
		default:
			err = fmt.Errorf("property %#02x not allowed in PUBLISH", id)
		}
		if err != nil {
			return err
		}
		if id != propSubID {
			p.otherProp = append(p.otherProp, id)
		}
	}
	return nil
}

// publishLen is the length of the QoS 0 PUBLISH of n payload bytes on topic that MQTT version
// needs for a subscription with identifier subID (0: none).
func publishLen(version byte, topic string, n, subID int) int {
	rem := 2 + len(topic) + n
	if version == 5 {
		props := 0
		if subID > 0 {
			props = 1 + mqttVarintLen(subID)
		}
		rem += mqttVarintLen(props) + props
	}
	return 1 + mqttVarintLen(rem) + rem
}

// largestFit is the largest payload whose PUBLISH is at most limit bytes.
func largestFit(t *testing.T, limit int, version byte, topic string, subID int) int {
	t.Helper()
	n := limit
	for publishLen(version, topic, n, subID) > limit {
		n--
	}
	// Not every limit can be met exactly (the remaining length's own length may jump);
	// the ones used here can, which makes "one byte more" the exact boundary.
	if got := publishLen(version, topic, n, subID); got != limit {
		t.Fatalf("no payload makes a PUBLISH of exactly %d bytes (got %d)", limit, got)
	}
	return n
}

// checkPublish decodes raw and checks every field of the QoS 0 PUBLISH Send should have
// written: fixed header, minimal remaining length, topic, properties (only the subscription
// identifier subID, if any) and payload.
func checkPublish(t *testing.T, raw []byte, version byte, topic string, subID int, payload []byte) {
	t.Helper()
	p, err := decodePublish(raw, version)
	if err != nil {
		t.Fatalf("decode PUBLISH: %v", err)
	}
	if p.header != typePublish {
		t.Errorf("fixed header: got %#02x, want 0x30 (PUBLISH, QoS 0, no DUP, no RETAIN)", p.header)
	}
	if want := mqttVarintLen(p.remaining); p.lenBytes != want {
		t.Errorf("remaining length %d: got it in %d bytes, want the minimum %d", p.remaining, p.lenBytes, want)
	}
	if want := publishLen(version, topic, len(payload), subID); len(raw) != want {
		t.Errorf("packet: got %d bytes, want %d", len(raw), want)
	}
	if p.topic != topic {
		t.Errorf("topic: got %q, want %q", p.topic, topic)
	}
	if version == 5 {
		var wantIDs []int
		wantLen := 0
		if subID > 0 {
			wantIDs = []int{subID}
			wantLen = 1 + mqttVarintLen(subID)
		}
		if !slices.Equal(p.subIDs, wantIDs) {
			t.Errorf("subscription identifiers: got %v, want %v", p.subIDs, wantIDs)
		}
		if p.propLen != wantLen || len(p.otherProp) != 0 {
			t.Errorf("properties: got %d bytes, others % x; want %d bytes, no others", p.propLen, p.otherProp, wantLen)
		}
	}
	if !bytes.Equal(p.payload, payload) {
		t.Errorf("payload: got %d bytes, want %d, first difference at %d", len(p.payload), len(payload), firstDiff(p.payload, payload))
	}
}

func firstDiff(a, b []byte) int {
	for i := range min(len(a), len(b)) {
		if a[i] != b[i] {
			return i
		}
	}
	return min(len(a), len(b))
}

// testBytes returns n bytes that differ for every seed.
func testBytes(n int, seed uint32) []byte {
	b := make([]byte, n)
	x := seed*2654435761 | 1
	for i := range b {
		x ^= x << 13
		x ^= x >> 17
		x ^= x << 5
		b[i] = byte(x)
	}
	return b
}

func TestSendReachesDevice(t *testing.T) {
	f := newSendFixture(t, nil)
	frame := protocol.AppendFrame(nil, protocol.FrameData, 7, 0, testBytes(protocol.MaxChunkSize, 1))

	t.Run("MQTT 3.1.1 with paho", func(t *testing.T) {
		const id = "dev-paho"
		received := make(chan paho.Message, 8)
		c := pahoDevice(t, f.addr, f.ca.DeviceTLS(t, id, "m"), id)
		tok := c.Subscribe(chunkTopic(id), 1, func(_ paho.Client, m paho.Message) { received <- m })
		if !tok.WaitTimeout(ioTimeout) || tok.Error() != nil {
			t.Fatalf("paho subscribe: %v", tok.Error())
		}
		tests := []struct {
			name    string
			payload []byte
		}{
			{"empty", nil},
			{"1 byte", []byte{0x42}},
			{"full chunk frame", frame},
		}
		for _, tt := range tests {
			t.Run(tt.name, func(t *testing.T) {
				if err := f.b.Send(chunkTopic(id), tt.payload); err != nil {
					t.Fatalf("Send: %v", err)
				}
				select {
				case m := <-received:
					if m.Topic() != chunkTopic(id) || !bytes.Equal(m.Payload(), tt.payload) {
						t.Fatalf("got %s with %d bytes, want %s with %d bytes", m.Topic(), len(m.Payload()), chunkTopic(id), len(tt.payload))
					}
					if m.Qos() != 0 || m.Retained() || m.Duplicate() {
						t.Fatalf("got QoS %d retain %v dup %v, want QoS 0, no retain, no dup", m.Qos(), m.Retained(), m.Duplicate())
					}
				case <-time.After(ioTimeout):
					t.Fatalf("nothing received in %v", ioTimeout)
				}
			})
		}
		if !c.IsConnectionOpen() {
			t.Fatal("paho: got connection closed, want open")
		}
	})

	t.Run("MQTT 3.1.1 raw", func(t *testing.T) {
		const id = "dev-raw4"
		rc := dialDevice(t, f, id, 4, 0)
		mustSubscribe(t, rc, chunkTopic(id), 0)
		if err := f.b.Send(chunkTopic(id), frame); err != nil {
			t.Fatalf("Send: %v", err)
		}
		raw, err := readPacket(rc, ioTimeout)
		if err != nil {
			t.Fatalf("read: %v", err)
		}
		checkPublish(t, raw, 4, chunkTopic(id), 0, frame)
	})

	t.Run("MQTT 5", func(t *testing.T) {
		const id = "dev-v5"
		rc := dialDevice(t, f, id, 5, 0)
		// The job subscription's identifier must not leak into chunk messages.
		mustSubscribe(t, rc, jobTopic(id), 99)
		tests := []struct {
			name  string
			subID int
		}{
			{"without subscription identifier", 0},
			{"subscription identifier 1", 1},
			{"subscription identifier 127, one byte", 127},
			{"subscription identifier 128, two bytes", 128},
			{"subscription identifier 16384, three bytes", 16384},
			{"subscription identifier 2097152, four bytes", 2097152},
			{"largest subscription identifier", 268435455},
			{"without one again", 0},
		}
		for i, tt := range tests {
			t.Run(tt.name, func(t *testing.T) {
				// Subscribing again replaces the subscription, identifier included [MQTT-3.8.4-3].
				mustSubscribe(t, rc, chunkTopic(id), tt.subID)
				for _, payload := range [][]byte{nil, testBytes(100+i, uint32(i)), frame} {
					if err := f.b.Send(chunkTopic(id), payload); err != nil {
						t.Fatalf("Send: %v", err)
					}
					raw, err := readPacket(rc, ioTimeout)
					if err != nil {
						t.Fatalf("read: %v", err)
					}
					checkPublish(t, raw, 5, chunkTopic(id), tt.subID, payload)
				}
			})
		}
		// Mochi's own path still tags the job subscription with its identifier (and adds a
		// message expiry, so checkPublish does not apply).
		if err := f.b.Publish(jobTopic(id), []byte("job"), 0); err != nil {
			t.Fatalf("Publish: %v", err)
		}
		raw, err := readPacket(rc, ioTimeout)
		if err != nil {
			t.Fatalf("read: %v", err)
		}
		p, err := decodePublish(raw, 5)
		if err != nil || p.topic != jobTopic(id) || string(p.payload) != "job" || !slices.Equal(p.subIDs, []int{99}) {
			t.Fatalf("got %q %q, subscription identifiers %v (%v); want %q \"job\" [99]", p.topic, p.payload, p.subIDs, err, jobTopic(id))
		}
	})

	t.Run("only the addressed device", func(t *testing.T) {
		a := dialDevice(t, f, "dev-a", 5, 0)
		mustSubscribe(t, a, chunkTopic("dev-a"), 0)
		b := dialDevice(t, f, "dev-b", 4, 0)
		mustSubscribe(t, b, chunkTopic("dev-b"), 0)
		if err := f.b.Send(chunkTopic("dev-a"), []byte("for a")); err != nil {
			t.Fatalf("Send: %v", err)
		}
		if err := f.b.Send(chunkTopic("dev-b"), []byte("for b")); err != nil {
			t.Fatalf("Send: %v", err)
		}
		for _, d := range []struct {
			rc      *rawClient
			id      string
			version byte
		}{{a, "dev-a", 5}, {b, "dev-b", 4}} {
			raw, err := readPacket(d.rc, ioTimeout)
			if err != nil {
				t.Fatalf("%s: read: %v", d.id, err)
			}
			checkPublish(t, raw, d.version, chunkTopic(d.id), 0, []byte("for "+d.id[len("dev-"):]))
		}
	})
}

func TestSendSizes(t *testing.T) {
	// Not the default, so that Send is seen to use the option.
	const maxPacket = 80 << 10
	f := newSendFixture(t, func(o *Options) { o.MaxPacketSize = maxPacket })

	type sizeCase struct {
		name    string
		size    int
		wantErr error
	}
	// run sends each case to rc; after a refused one it sends a marker, which must be the next
	// packet rc reads: nothing of the refused message went out.
	run := func(t *testing.T, rc *rawClient, id string, subID int, tests []sizeCase) {
		t.Helper()
		topic := chunkTopic(id)
		for i, tt := range tests {
			t.Run(tt.name, func(t *testing.T) {
				before := f.b.Stats().Sent
				payload := testBytes(tt.size, uint32(i+1))
				err := f.b.Send(topic, payload)
				if tt.wantErr != nil {
					if !errors.Is(err, tt.wantErr) {
						t.Fatalf("Send of %d bytes: got %v, want %v", tt.size, err, tt.wantErr)
					}
					if got := f.b.Stats().Sent; got != before {
						t.Fatalf("Stats().Sent: got %d after a refused Send, want %d", got, before)
					}
					payload = []byte("marker after " + tt.name)
					err = f.b.Send(topic, payload)
				}
				if err != nil {
					t.Fatalf("Send of %d bytes: got %v, want nil", len(payload), err)
				}
				if got := f.b.Stats().Sent; got != before+1 {
					t.Fatalf("Stats().Sent: got %d, want %d", got, before+1)
				}
				raw, err := readPacket(rc, ioTimeout)
				if err != nil {
					t.Fatalf("read: %v", err)
				}
				checkPublish(t, raw, rc.version, topic, subID, payload)
			})
		}
		if !f.b.Connected(id) {
			t.Fatalf("Connected(%s): got false, want true", id)
		}
		rc.roundTripPing(t)
	}

	for _, c := range []struct {
		name    string
		version byte
		subID   int
	}{
		{"MQTT 3.1.1", 4, 0},
		{"MQTT 5 with subscription identifier", 5, 300},
	} {
		t.Run(c.name, func(t *testing.T) {
			id := "dev-size-" + strconv.Itoa(int(c.version))
			rc := dialDevice(t, f, id, c.version, 0)
			mustSubscribe(t, rc, chunkTopic(id), c.subID)
			fit := largestFit(t, maxPacket, c.version, chunkTopic(id), c.subID)
			run(t, rc, id, c.subID, []sizeCase{
				{"empty", 0, nil},
				{"1 byte", 1, nil},
				{"full chunk frame", chunkFrame, nil},
				{"packet of exactly MaxPacketSize", fit, nil},
				{"packet one byte over MaxPacketSize", fit + 1, ErrTooLarge},
				{"payload of MaxPacketSize", maxPacket, ErrTooLarge},
				{"payload over MaxPacketSize", maxPacket + 1, ErrTooLarge},
				{"4 MiB", 4 << 20, ErrTooLarge},
				{"small after refusals", 10, nil},
			})
		})
	}

	t.Run("MQTT 5 Maximum Packet Size of the device", func(t *testing.T) {
		const id, limit = "dev-small", 1024
		rc := dialDevice(t, f, id, 5, limit)
		mustSubscribe(t, rc, chunkTopic(id), 5)
		fit := largestFit(t, limit, 5, chunkTopic(id), 5)
		run(t, rc, id, 5, []sizeCase{
			{"2000 bytes", 2000, ErrTooLarge},
			{"100 bytes", 100, nil},
			{"payload of the device's limit", limit, ErrTooLarge},
			{"packet of exactly the device's limit", fit, nil},
			{"packet one byte over the device's limit", fit + 1, ErrTooLarge},
			{"full chunk frame", chunkFrame, ErrTooLarge},
			{"100 bytes again", 100, nil},
		})
	})
}

func TestSendErrors(t *testing.T) {
	f := newSendFixture(t, nil)
	jobOnly := f.device("dev-job")
	mustSubscribe(t, jobOnly, jobTopic("dev-job"), 0)
	chunkOnly := dialDevice(t, f, "dev-chunk", 5, 0)
	mustSubscribe(t, chunkOnly, chunkTopic("dev-chunk"), 0)
	left := f.device("dev-gone")
	mustSubscribe(t, left, chunkTopic("dev-gone"), 0)
	_ = left.conn.Close()
	fotatest.WaitFor(t, ioTimeout, "dev-gone disconnected", func() bool { return !f.b.Connected("dev-gone") })
	unsub := f.device("dev-unsub")
	mustSubscribe(t, unsub, chunkTopic("dev-unsub"), 0)
	unsubscribe(t, unsub, chunkTopic("dev-unsub"))

	tests := []struct {
		name  string
		topic string
		want  error
	}{
		{"upstream request topic", protocol.Topic("dev-chunk", protocol.SuffixRequest), ErrBadTopic},
		{"upstream status topic", protocol.Topic("dev-chunk", protocol.SuffixStatus), ErrBadTopic},
		{"upstream event topic", protocol.Topic("dev-chunk", protocol.SuffixEvent), ErrBadTopic},
		{"not a fota topic", "other/dev-chunk/chunk", ErrBadTopic},
		{"another protocol version", "fota/v2/dev-chunk/chunk", ErrBadTopic},
		{"wildcard device", "fota/v1/+/chunk", ErrBadTopic},
		{"wildcard suffix", "fota/v1/dev-chunk/+", ErrBadTopic},
		{"multi-level wildcard", "fota/v1/dev-chunk/#", ErrBadTopic},
		{"everything", "#", ErrBadTopic},
		{"empty", "", ErrBadTopic},
		{"no suffix", "fota/v1/dev-chunk", ErrBadTopic},
		{"extra level", "fota/v1/dev-chunk/chunk/x", ErrBadTopic},
		{"empty device", "fota/v1//chunk", ErrBadTopic},
		{"never connected", chunkTopic("nobody"), ErrNotSubscribed},
		{"connected, subscribed to its job topic only", chunkTopic("dev-job"), ErrNotSubscribed},
		{"connected, subscribed to its chunk topic only", jobTopic("dev-chunk"), ErrNotSubscribed},
		{"disconnected", chunkTopic("dev-gone"), ErrNotSubscribed},
		{"unsubscribed", chunkTopic("dev-unsub"), ErrNotSubscribed},
	}
	sentinels := []error{ErrBadTopic, ErrNotSubscribed, ErrTooLarge, ErrClosed}
	for _, tt := range tests {
		t.Run(tt.name, func(t *testing.T) {
			err := f.b.Send(tt.topic, []byte("x"))
			if !errors.Is(err, tt.want) {
				t.Fatalf("Send(%q): got %v, want %v", tt.topic, err, tt.want)
			}
			for _, s := range sentinels {
				if s != tt.want && errors.Is(err, s) {
					t.Fatalf("Send(%q): got %v, which is also %v", tt.topic, err, s)
				}
			}
		})
	}
	if got := f.b.Stats().Sent; got != 0 {
		t.Fatalf("Stats().Sent: got %d after failed Sends only, want 0", got)
	}
	// Nothing reached the devices that are connected: the next thing each reads is a marker.
	if err := f.b.Send(chunkTopic("dev-chunk"), []byte("marker")); err != nil {
		t.Fatalf("Send: %v", err)
	}
	raw, err := readPacket(chunkOnly, ioTimeout)
	if err != nil {
		t.Fatalf("read: %v", err)
	}
	checkPublish(t, raw, 5, chunkTopic("dev-chunk"), 0, []byte("marker"))
	f.roundTrip(jobOnly, "dev-job")

	t.Run("replaced connection", func(t *testing.T) {
		const id = "dev-re"
		old := dialDevice(t, f, id, 4, 0)
		mustSubscribe(t, old, chunkTopic(id), 0)
		fresh := dialDevice(t, f, id, 4, 0)
		if closed, err := closedWithin(old.conn, ioTimeout); !closed {
			t.Fatalf("old connection: still open after the device reconnected (%v)", err)
		}
		// Sessions end with their connection: the old subscription is gone.
		if err := f.b.Send(chunkTopic(id), []byte("x")); !errors.Is(err, ErrNotSubscribed) {
			t.Fatalf("Send before the new connection subscribed: got %v, want ErrNotSubscribed", err)
		}
		mustSubscribe(t, fresh, chunkTopic(id), 0)
		if err := f.b.Send(chunkTopic(id), []byte("to the new one")); err != nil {
			t.Fatalf("Send: %v", err)
		}
		raw, err := readPacket(fresh, ioTimeout)
		if err != nil {
			t.Fatalf("read: %v", err)
		}
		checkPublish(t, raw, 4, chunkTopic(id), 0, []byte("to the new one"))
	})

	t.Run("after Close", func(t *testing.T) {
		g := newSendFixture(t, nil)
		rc := dialDevice(t, g, "dev-c", 4, 0)
		mustSubscribe(t, rc, chunkTopic("dev-c"), 0)
		if err := g.b.Send(chunkTopic("dev-c"), []byte("before")); err != nil {
			t.Fatalf("Send before Close: %v", err)
		}
		ctx, cancel := context.WithTimeout(context.Background(), 5*time.Second)
		defer cancel()
		if err := g.b.Close(ctx); err != nil {
			t.Fatalf("Close: %v", err)
		}
		for _, topic := range []string{chunkTopic("dev-c"), chunkTopic("nobody"), "bad"} {
			if err := g.b.Send(topic, []byte("after")); !errors.Is(err, ErrClosed) {
				t.Errorf("Send(%q) after Close: got %v, want ErrClosed", topic, err)
			}
		}
		if got := g.b.Stats().Sent; got != 1 {
			t.Errorf("Stats().Sent: got %d, want 1", got)
		}
	})
}

// streamResult is what the device read in TestSendConcurrentWithPublish.
type streamResult struct {
	frames []int // per sender, frames received
	jobs   []int // job numbers received, in order
	err    error
}

// Frames of these payload sizes go out in turn: empty, around the frame header, around Mochi's
// 2 KiB write buffer and a TLS record, and the largest.
var concurrentSizes = []int{0, 1, 19, 20, 100, 1000, 2047, 2048, 4000, 16364, 16365, 16384, 40000, protocol.MaxChunkSize}

// concurrentFrames is how many frames each sender sends.
const concurrentFrames = 50

func TestSendConcurrentWithPublish(t *testing.T) {
	const senders, frames, jobs = 8, concurrentFrames, 100
	for _, version := range []byte{4, 5} {
		t.Run(fmt.Sprintf("MQTT %d", version), func(t *testing.T) {
			f := newSendFixture(t, nil)
			const id = "dev-c"
			rc := dialDevice(t, f, id, version, 0)
			chunkID, jobID := 0, 0
			if version == 5 {
				chunkID, jobID = 9, 7
			}
			mustSubscribe(t, rc, chunkTopic(id), chunkID)
			mustSubscribe(t, rc, jobTopic(id), jobID)

			results := make(chan streamResult, 1)
			go func() {
				res := readStream(rc, id, senders, chunkID, jobID)
				if res.err != nil {
					// Unblock the senders: the test is over.
					_ = rc.conn.Close()
				}
				results <- res
			}()

			var wg sync.WaitGroup
			errs := make(chan error, senders+1)
			for g := range senders {
				wg.Go(func() {
					var buf []byte
					for i := range frames {
						size := concurrentSizes[(g*frames+i)%len(concurrentSizes)]
						buf = protocol.AppendFrame(buf[:0], protocol.FrameData, uint32(g), uint32(i), testBytes(size, uint32(g<<16|i)))
						if err := f.b.Send(chunkTopic(id), buf); err != nil {
							errs <- fmt.Errorf("sender %d frame %d: %w", g, i, err)
							return
						}
						// Send is done with buf: the next frame overwrites it.
					}
				})
			}
			wg.Go(func() {
				for n := range jobs {
					if err := f.b.Publish(jobTopic(id), jobPayload(n), byte(n%2)); err != nil {
						errs <- fmt.Errorf("job %d: %w", n, err)
						return
					}
				}
			})
			wg.Wait()
			close(errs)
			// Sends wrote their frames before returning, and the end marker follows the jobs
			// in Mochi's queue: once it is in, everything is.
			dropped := f.b.Stats().Dropped
			if err := f.b.Publish(jobTopic(id), []byte("end"), 1); err != nil {
				t.Errorf("Publish end: %v", err)
			}
			var res streamResult
			select {
			case res = <-results:
			case <-time.After(20 * time.Second):
				t.Fatal("device still reading after 20 s")
			}
			// The device's view first: a corrupt stream explains the senders' errors.
			if res.err != nil {
				t.Errorf("device: %v", res.err)
			}
			for err := range errs {
				t.Error(err)
			}
			if t.Failed() {
				return
			}
			for g, n := range res.frames {
				if n != frames {
					t.Errorf("sender %d: got %d frames, want %d", g, n, frames)
				}
			}
			got := map[int]bool{}
			for _, n := range res.jobs {
				got[n] = true
			}
			for n := 1; n < jobs; n += 2 {
				if !got[n] {
					t.Errorf("QoS 1 job %d: not received", n)
				}
			}
			if int(dropped)+len(res.jobs) != jobs {
				t.Errorf("jobs: got %d received and %d dropped, want %d in all", len(res.jobs), dropped, jobs)
			}
			if !f.b.Connected(id) {
				t.Fatal("Connected: got false, want true")
			}
			rc.roundTripPing(t)
			if got := f.b.Stats().Sent; got != senders*frames {
				t.Fatalf("Stats().Sent: got %d, want %d", got, senders*frames)
			}
		})
	}
}

func jobPayload(n int) []byte {
	b := fmt.Appendf(nil, "job %d ", n)
	return append(b, strings.Repeat(string(rune('a'+n%26)), n*97%3000)...)
}

// readStream reads rc until the "end" job, checking every packet: each a well-formed PUBLISH,
// frames intact and in order per sender, jobs intact and in order, QoS 1 ones acked.
func readStream(rc *rawClient, id string, senders, chunkID, jobID int) streamResult {
	res := streamResult{frames: make([]int, senders)}
	last := -1
	for {
		raw, err := readPacket(rc, 10*time.Second)
		if err != nil {
			res.err = fmt.Errorf("after %v frames and %d jobs: %w", res.frames, len(res.jobs), err)
			return res
		}
		p, err := decodePublish(raw, rc.version)
		if err != nil {
			res.err = err
			return res
		}
		if p.qos() == 1 {
			if err := rc.send(packet(typePuback, binary.BigEndian.AppendUint16(nil, p.packetID))); err != nil {
				res.err = fmt.Errorf("PUBACK: %w", err)
				return res
			}
		}
		switch p.topic {
		case chunkTopic(id):
			if err := checkFrame(p, res.frames, chunkID); err != nil {
				res.err = err
				return res
			}
		case jobTopic(id):
			if string(p.payload) == "end" {
				return res
			}
			var n int
			if _, err := fmt.Sscanf(string(p.payload), "job %d ", &n); err != nil || !bytes.Equal(p.payload, jobPayload(n)) {
				res.err = fmt.Errorf("job: got %d bytes starting %q, not a job's", len(p.payload), p.payload[:min(len(p.payload), 16)])
				return res
			}
			if n <= last {
				res.err = fmt.Errorf("job %d after job %d", n, last)
				return res
			}
			last = n
			if p.qos() != byte(n%2) || (rc.version == 5 && !slices.Equal(p.subIDs, []int{jobID})) {
				res.err = fmt.Errorf("job %d: got QoS %d, subscription identifiers %v; want QoS %d, [%d]", n, p.qos(), p.subIDs, n%2, jobID)
				return res
			}
			res.jobs = append(res.jobs, n)
		default:
			res.err = fmt.Errorf("PUBLISH on %q", p.topic)
			return res
		}
	}
}

// checkFrame checks a chunk PUBLISH against the frame its sender should have sent next.
func checkFrame(p inPublish, next []int, chunkID int) error {
	if p.header != typePublish {
		return fmt.Errorf("chunk PUBLISH header: got %#02x, want 0x30", p.header)
	}
	if chunkID > 0 && !slices.Equal(p.subIDs, []int{chunkID}) {
		return fmt.Errorf("chunk: got subscription identifiers %v, want [%d]", p.subIDs, chunkID)
	}
	fr, err := protocol.ParseFrame(p.payload)
	if err != nil {
		return err
	}
	g, i := int(fr.Transfer), int(fr.Offset)
	if g >= len(next) || i != next[g] {
		return fmt.Errorf("got frame %d of sender %d, want sender < %d and frame %v", i, g, len(next), next)
	}
	size := concurrentSizes[(g*concurrentFrames+i)%len(concurrentSizes)]
	if !bytes.Equal(fr.Payload, testBytes(size, uint32(g<<16|i))) {
		return fmt.Errorf("sender %d frame %d: got %d bytes, want %d bytes of its own", g, i, len(fr.Payload), size)
	}
	next[g]++
	return nil
}

func TestSendToDeviceThatStopsReading(t *testing.T) {
	const writeTimeout = 300 * time.Millisecond
	// How much longer than writeTimeout a Send may take: scheduling on a loaded machine, and
	// waiting for the client lock a blocked Send holds, which the first failure releases.
	const slack = time.Second
	f := newSendFixture(t, func(o *Options) { o.WriteTimeout = writeTimeout })
	// dev-stuck reads its CONNACK and SUBACK, then nothing: once the socket buffers between
	// it and the broker are full (a few MiB on loopback), a write to it blocks.
	stuck := dialDevice(t, f, "dev-stuck", 4, 0)
	mustSubscribe(t, stuck, chunkTopic("dev-stuck"), 0)
	healthy := dialDevice(t, f, "dev-ok", 4, 0)
	mustSubscribe(t, healthy, chunkTopic("dev-ok"), 0)
	fotatest.WaitFor(t, ioTimeout, "two devices connected", func() bool { return f.b.Stats().Connected == 2 })

	// The healthy device gets Sends back to back until the stuck device's senders are done,
	// each timed, so that some can be seen to have completed while a Send to the stuck device
	// was blocked.
	type span struct{ start, end time.Time }
	stuckDone := make(chan struct{})
	type healthyResult struct {
		spans []span
		err   error
	}
	healthyRes := make(chan healthyResult, 1)
	go func() {
		var res healthyResult
		defer func() { healthyRes <- res }()
		for n := 0; ; n++ {
			select {
			case <-stuckDone:
				return
			default:
			}
			payload := fmt.Appendf(nil, "healthy %d", n)
			start := time.Now()
			if err := f.b.Send(chunkTopic("dev-ok"), payload); err != nil {
				res.err = fmt.Errorf("Send %d: %w", n, err)
				return
			}
			raw, err := readPacket(healthy, ioTimeout)
			if err != nil {
				res.err = fmt.Errorf("read %d: %w", n, err)
				return
			}
			p, err := decodePublish(raw, 4)
			if err != nil || !bytes.Equal(p.payload, payload) {
				res.err = fmt.Errorf("message %d: got %q (%v), want %q", n, p.payload, err, payload)
				return
			}
			res.spans = append(res.spans, span{start, time.Now()})
		}
	}()

	// Several senders to the stuck device, until each gets an error.
	const stuckSenders = 3
	type stuckResult struct {
		ok       int // successful Sends
		failed   span
		err      error
		gaveUpAt int
	}
	stuckRes := make(chan stuckResult, stuckSenders)
	frame := protocol.AppendFrame(nil, protocol.FrameData, 1, 0, testBytes(protocol.MaxChunkSize, 3))
	giveUp := time.Now().Add(10 * time.Second)
	for range stuckSenders {
		go func() {
			var res stuckResult
			for {
				start := time.Now()
				err := f.b.Send(chunkTopic("dev-stuck"), frame)
				end := time.Now()
				if err != nil {
					res.err, res.failed = err, span{start, end}
					break
				}
				res.ok++
				if end.After(giveUp) {
					res.gaveUpAt = res.ok
					break
				}
			}
			stuckRes <- res
		}()
	}
	var stuckOK int
	var blocked []span // failed Sends that hit the write deadline
	for range stuckSenders {
		var res stuckResult
		select {
		case res = <-stuckRes:
		case <-time.After(time.Until(giveUp) + 5*time.Second):
			close(stuckDone)
			t.Fatal("a Send to the stuck device still blocked 15 s after the start, want it to fail after about WriteTimeout")
		}
		stuckOK += res.ok
		if res.err == nil {
			t.Errorf("stuck device: %d Sends in 10 s all succeeded, want one to fail after about %v", res.gaveUpAt, writeTimeout)
			continue
		}
		if d := res.failed.end.Sub(res.failed.start); d > writeTimeout+slack {
			t.Errorf("failed Send to the stuck device: took %v, want at most about %v (%v)", d, writeTimeout, res.err)
		}
		if errors.Is(res.err, os.ErrDeadlineExceeded) {
			blocked = append(blocked, res.failed)
		}
		t.Logf("sender: %d Sends, then after %v: %v", res.ok, res.failed.end.Sub(res.failed.start).Round(time.Millisecond), res.err)
	}
	close(stuckDone)
	hres := <-healthyRes
	if hres.err != nil {
		t.Fatalf("healthy device: %v", hres.err)
	}
	if len(blocked) == 0 {
		t.Fatal("no Send to the stuck device ended in its write deadline, want one")
	}
	// The Send whose write timed out blocked for the whole WriteTimeout; the others that
	// report its error waited for the client lock from later on.
	var longest time.Duration
	for _, b := range blocked {
		longest = max(longest, b.end.Sub(b.start))
	}
	during := 0
	for _, s := range hres.spans {
		if slices.ContainsFunc(blocked, func(b span) bool { return s.start.After(b.start) && s.end.Before(b.end) }) {
			during++
		}
	}
	if longest < writeTimeout {
		t.Errorf("Sends that hit the write deadline: the longest took %v, want at least %v", longest, writeTimeout)
	}
	if during == 0 {
		t.Fatalf("got no Send to the healthy device completed while one to the stuck device was blocked (%d in all), want some", len(hres.spans))
	}
	t.Logf("%d Sends to the healthy device completed while the stuck one was blocked", during)

	fotatest.WaitFor(t, ioTimeout, "dev-stuck disconnected", func() bool { return !f.b.Connected("dev-stuck") })
	fotatest.WaitFor(t, ioTimeout, "one device connected", func() bool { return f.b.Stats().Connected == 1 })
	if err := f.b.Send(chunkTopic("dev-stuck"), []byte("x")); !errors.Is(err, ErrNotSubscribed) {
		t.Fatalf("Send to the disconnected device: got %v, want ErrNotSubscribed", err)
	}
	if closed, err := closedWithin(stuck.conn, ioTimeout); !closed {
		t.Fatalf("stuck device's connection: still open (%v)", err)
	}
	if err := f.b.Send(chunkTopic("dev-ok"), []byte("after")); err != nil {
		t.Fatalf("Send to the healthy device afterwards: %v", err)
	}
	raw, err := readPacket(healthy, ioTimeout)
	if err != nil {
		t.Fatalf("read: %v", err)
	}
	checkPublish(t, raw, 4, chunkTopic("dev-ok"), 0, []byte("after"))
	if got, want := f.b.Stats().Sent, uint64(stuckOK+len(hres.spans)+1); got != want {
		t.Fatalf("Stats().Sent: got %d, want %d (successful Sends only)", got, want)
	}
}

func TestSendStats(t *testing.T) {
	f := newSendFixture(t, func(o *Options) { o.MaxPacketSize = 4 << 10 })
	a := dialDevice(t, f, "dev-a", 4, 0)
	mustSubscribe(t, a, chunkTopic("dev-a"), 0)
	b := dialDevice(t, f, "dev-b", 5, 0)
	mustSubscribe(t, b, chunkTopic("dev-b"), 1)
	steps := []struct {
		topic   string
		size    int
		wantErr error
	}{
		{chunkTopic("dev-a"), 10, nil},
		{chunkTopic("dev-b"), 0, nil},
		{chunkTopic("dev-a"), 8 << 10, ErrTooLarge},
		{jobTopic("dev-a"), 10, ErrNotSubscribed},
		{protocol.Topic("dev-a", protocol.SuffixRequest), 10, ErrBadTopic},
		{chunkTopic("dev-b"), 1000, nil},
		{chunkTopic("dev-a"), 1, nil},
	}
	var want uint64
	for i, s := range steps {
		if err := f.b.Send(s.topic, testBytes(s.size, uint32(i))); !errors.Is(err, s.wantErr) {
			t.Fatalf("step %d: Send(%s, %d bytes): got %v, want %v", i, s.topic, s.size, err, s.wantErr)
		}
		if s.wantErr == nil {
			want++
		}
		if got := f.b.Stats().Sent; got != want {
			t.Fatalf("step %d: Stats().Sent: got %d, want %d", i, got, want)
		}
	}
	for _, d := range []struct {
		rc      *rawClient
		id      string
		version byte
		subID   int
		steps   []int
	}{{a, "dev-a", 4, 0, []int{0, 6}}, {b, "dev-b", 5, 1, []int{1, 5}}} {
		for _, i := range d.steps {
			raw, err := readPacket(d.rc, ioTimeout)
			if err != nil {
				t.Fatalf("%s: read: %v", d.id, err)
			}
			checkPublish(t, raw, d.version, chunkTopic(d.id), d.subID, testBytes(steps[i].size, uint32(i)))
		}
	}
	// Publish is not Send: it does not count.
	mustSubscribe(t, a, jobTopic("dev-a"), 0)
	f.roundTrip(a, "dev-a")
	if got := f.b.Stats().Sent; got != want {
		t.Fatalf("Stats().Sent after a Publish: got %d, want %d", got, want)
	}
}

// TestReachable: a device is reachable from its CONNACK until its connection ends.
func TestReachable(t *testing.T) {
	f := newFixture(t, nil)
	if f.b.Reachable("dev-r") {
		t.Fatal("Reachable before the device connected: got true, want false")
	}
	rc := f.device("dev-r")
	fotatest.WaitFor(t, ioTimeout, "reachable once connected", func() bool { return f.b.Reachable("dev-r") })
	_ = rc.conn.Close()
	fotatest.WaitFor(t, ioTimeout, "unreachable once its connection ended", func() bool { return !f.b.Reachable("dev-r") })
}
