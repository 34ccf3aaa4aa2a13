package broker

import (
	"encoding/binary"
	"errors"
	"fmt"

	mqtt "github.com/mochi-mqtt/server/v2"

	"github.com/fota-dev/fota/protocol"
)

// ErrNotSubscribed is returned by Send when the device is not connected or has not
// subscribed to the topic: there is nobody to write to, as for a Publish without subscribers.
var ErrNotSubscribed = errors.New("device not subscribed")

// ErrTooLarge is returned by Send for a message above MaxPacketSize or the device's own
// maximum packet size.
var ErrTooLarge = errors.New("message too large")

// sendHeaderRoom is room for the PUBLISH header Send writes in front of a payload: the fixed
// header, the topic and the MQTT 5 properties. A longer one grows the buffer.
const sendHeaderRoom = 256

// Send writes payload as one QoS 0 PUBLISH on topic, a device's downstream topic, straight to
// that device's connection on the caller's goroutine. Publish hands a message to Mochi, which
// copies it for the device's queue, and whose writer then encodes it into a buffer grown from
// empty; for a chunk frame those copies cost more than the TLS encryption. Send builds the
// packet once, in a pooled buffer, and writes it in one Write call: the TLS connection
// serialises whole writes, so packets never interleave. Send also holds the client's lock, the
// lock Mochi's own writes take, so that write deadlines set by the two writers never overlap.
// Mochi may hold a few small packets buffered while its queue drains and writes them after;
// that reorders a job message around a chunk frame, which the protocol allows (order is kept
// within a topic, and Send is the only writer of its topics' packets that uses it).
//
// Send blocks while the device's socket is full, at most the broker's WriteTimeout for the
// one write, after which the connection is closed: the caller waits for its device and nobody
// else. It returns ErrNotSubscribed when the device has no session or no subscription to
// topic, ErrTooLarge for a packet the device may not receive, and the write's error otherwise.
// The caller may reuse payload once Send returns.
func (b *Broker) Send(topic string, payload []byte) error {
	if b.closed.Load() {
		return ErrClosed
	}
	id, suffix, ok := protocol.ParseTopic(topic)
	if !ok || !protocol.Downstream(suffix) {
		return fmt.Errorf("send %q: %w", topic, ErrBadTopic)
	}
	b.mu.Lock()
	s := b.live[id]
	var cl *mqtt.Client
	if s != nil && s.up {
		cl = s.c.client
	}
	b.mu.Unlock()
	if cl == nil || cl.Closed() {
		return fmt.Errorf("send %q: %w", topic, ErrNotSubscribed)
	}
	sub, ok := cl.State.Subscriptions.Get(topic)
	if !ok {
		return fmt.Errorf("send %q: %w", topic, ErrNotSubscribed)
	}

	limit := int(b.opts.MaxPacketSize)
	if m := cl.Properties.Props.MaximumPacketSize; m > 0 && int64(m) < int64(limit) {
		limit = int(m)
	}
	if len(payload) > limit {
		return fmt.Errorf("send %q: %d bytes: %w", topic, len(payload), ErrTooLarge)
	}
	bp := b.sendBufs.Get().(*[]byte)
	defer b.sendBufs.Put(bp)
	pk, err := appendPublish((*bp)[:0], topic, payload, cl.Properties.ProtocolVersion, sub.Identifier)
	*bp = pk[:0] // keep a buffer that grew
	if err != nil {
		return fmt.Errorf("send %q: %w", topic, err)
	}
	if len(pk) > limit {
		return fmt.Errorf("send %q: %d bytes: %w", topic, len(pk), ErrTooLarge)
	}

	cl.Lock()
	defer cl.Unlock()
	if _, err := cl.Net.Conn.Write(pk); err != nil {
		return fmt.Errorf("send %q: %w", topic, err)
	}
	b.sent.Add(1)
	return nil
}

// Reachable reports whether device id has a connection Send can write to now: its CONNACK is
// out and the connection has not ended.
func (b *Broker) Reachable(id string) bool {
	b.mu.Lock()
	s := b.live[id]
	up := s != nil && s.up
	b.mu.Unlock()
	return up && !s.c.client.Closed()
}

// appendPublish appends a QoS 0 PUBLISH packet of payload on topic, for a client speaking MQTT
// version (4: 3.1.1, 5: 5.0) that subscribed with subscription identifier subID (0: none).
func appendPublish(dst []byte, topic string, payload []byte, version byte, subID int) ([]byte, error) {
	var props []byte
	var propBuf [1 + 4]byte
	if version == 5 && subID > 0 {
		// [MQTT-3.3.4-3]: the subscription identifier goes with every message the
		// subscription matches.
		propBuf[0] = 0x0B
		props = binary.AppendUvarint(propBuf[:1], uint64(subID))
	}
	remaining := 2 + len(topic) + len(payload)
	if version == 5 {
		remaining += uvarintLen(len(props)) + len(props)
	}
	if remaining > maxRemaining {
		return dst, ErrTooLarge
	}
	dst = append(dst, 0x30) // PUBLISH, QoS 0, no DUP, no RETAIN
	dst = binary.AppendUvarint(dst, uint64(remaining))
	dst = binary.BigEndian.AppendUint16(dst, uint16(len(topic)))
	dst = append(dst, topic...)
	if version == 5 {
		dst = binary.AppendUvarint(dst, uint64(len(props)))
		dst = append(dst, props...)
	}
	return append(dst, payload...), nil
}

// maxRemaining is the largest remaining length MQTT's four-byte variable integer encodes.
const maxRemaining = 268_435_455

// uvarintLen is the length of n as an MQTT variable byte integer, which is a uvarint.
func uvarintLen(n int) int {
	l := 1
	for ; n >= 0x80; n >>= 7 {
		l++
	}
	return l
}

// newSendBuf makes a packet buffer with room for the largest chunk frame.
func newSendBuf() any {
	b := make([]byte, 0, sendHeaderRoom+protocol.FrameHeaderSize+protocol.MaxChunkSize)
	return &b
}
