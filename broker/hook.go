package broker

import (
	"fmt"
	"strings"
	"time"

	mqtt "github.com/mochi-mqtt/server/v2"
	"github.com/mochi-mqtt/server/v2/packets"

	"github.com/fota-dev/fota/protocol"
)

// hook authenticates devices by certificate, enforces the topic ACL and reports sessions to
// the Broker. Mochi runs a connection's hooks on that connection's goroutine, except
// OnACLCheck at delivery time, which runs on the publisher's.
type hook struct {
	mqtt.HookBase
	b *Broker
}

var _ mqtt.Hook = (*hook)(nil)

func (h *hook) ID() string { return "fota-auth" }

func (h *hook) Provides(x byte) bool {
	switch x {
	case mqtt.OnConnect, mqtt.OnConnectAuthenticate, mqtt.OnACLCheck,
		mqtt.OnSessionEstablish, mqtt.OnSessionEstablished, mqtt.OnPublishDropped,
		mqtt.OnPacketRead, mqtt.OnPacketEncode, mqtt.OnPublish:
		return true
	}
	return false
}

// OnConnect decides: it runs first after CONNECT is read, before Mochi takes over any session
// with the same client id, so a refused client never disturbs the device it claims to be.
// It refuses with CONNACK "not authorized" itself, because Mochi's own refusal from
// OnConnectAuthenticate says "bad username or password" to MQTT 5 clients.
func (h *hook) OnConnect(cl *mqtt.Client, pk packets.Packet) error {
	c, ok := cl.Net.Conn.(*conn)
	if !ok {
		return packets.ErrNotAuthorized // not from our listener; cannot happen
	}
	if cause, reason := h.refusal(c, pk); reason != "" {
		// Counted and logged in aggregate by finish; one line per attempt would let a
		// device with a valid certificate flood the log.
		c.refusal = cause
		h.b.log.Debug("connect refused", "reason", reason, "client_id", clip(pk.Connect.ClientIdentifier),
			"device", c.id, "remote", c.RemoteAddr().String())
		code := packets.ErrNotAuthorized
		if cl.Properties.ProtocolVersion < 5 {
			code = packets.ErrBadUsernameOrPassword // Mochi maps it to 3.1.1's 0x05 not authorized
		}
		_ = h.b.srv.SendConnack(cl, code, false, nil)
		return code
	}
	c.authed = true
	c.slot.release()
	c.slot = nil // not kept for the life of the connection

	// Mochi sets the read deadline from this right after the hook.
	opts := &h.b.opts
	ka := clampKeepalive(cl.State.Keepalive, opts.KeepaliveMin, opts.KeepaliveMax)
	if ka != cl.State.Keepalive {
		cl.State.Keepalive = ka
		cl.State.ServerKeepalive = true // told to MQTT 5 clients in CONNACK
	}
	// Clean start, no session after the connection: a device resumes transfers from its own
	// persisted offsets, not from broker state.
	cl.Properties.Clean = true
	cl.Properties.Props.SessionExpiryInterval = 0
	return nil
}

// refusal says why c may not connect with pk, with the cause it is counted under, or "" if
// it may.
func (h *hook) refusal(c *conn, pk packets.Packet) (cause, reason string) {
	if c.idErr != nil {
		return causeIdentity, fmt.Sprintf("not a device certificate: %v", c.idErr)
	}
	// Again, for a device revoked between its handshake and its CONNECT.
	if verify := h.b.tls.VerifyConnection; verify != nil {
		if err := verify(c.ConnectionState()); err != nil {
			return causeRevoked, fmt.Sprintf("certificate refused: %v", err)
		}
	}
	if c.id == mqtt.InlineClientId {
		// Mochi keeps its in-process client under this id; a device by that name would take
		// over its session.
		return causeIdentity, "device id reserved by the broker"
	}
	if pk.Connect.ClientIdentifier != c.id {
		return causeConnect, "client id is not the certificate's device id"
	}
	// Mochi publishes a will without an ACL check, so it is checked here as a publish.
	if pk.Connect.WillFlag && !allowed(c.id, pk.Connect.WillTopic, true) {
		return causeConnect, "will topic not allowed"
	}
	return "", ""
}

// OnPacketRead accepts a retained will from an MQTT 3.1.1 client, as not retained. Mochi
// refuses it because the broker keeps no retained messages, with MQTT 5's "retain not
// supported" (0x9A), a code 3.1.1 does not have; and 3.1.1 has no way to say it. Nothing can
// tell the difference: the will goes to the server's in-process subscriber as always, and no
// device may subscribe to another's upstream topics, where a retained will would be read.
func (h *hook) OnPacketRead(cl *mqtt.Client, pk packets.Packet) (packets.Packet, error) {
	if pk.FixedHeader.Type == packets.Connect && pk.ProtocolVersion < 5 && pk.Connect.WillFlag {
		pk.Connect.WillRetain = false
	}
	return pk, nil
}

// OnPacketEncode makes sure an MQTT 3.1.1 client never gets a CONNACK code only MQTT 5 has
// (3.1.1 knows 0 to 5). Mochi answers a malformed CONNECT (a reserved flag set, a will QoS
// of 3) with such a code; 3.1.1 says to close the connection without a CONNACK instead, so the
// connection is closed and the write fails.
func (h *hook) OnPacketEncode(cl *mqtt.Client, pk packets.Packet) packets.Packet {
	if pk.FixedHeader.Type == packets.Connack && cl.Properties.ProtocolVersion < 5 &&
		pk.ReasonCode > packets.Err3NotAuthorized.Code {
		if c, ok := cl.Net.Conn.(*conn); ok {
			if c.refusal == "" {
				c.refusal = causeConnect
			}
			_ = c.Close()
		}
	}
	return pk
}

// OnPublish holds each device to its MessageRate for status and event messages. Chunk
// requests are exempt: the chunk server paces them, and a device asks again after a timeout
// for what it did not get.
func (h *hook) OnPublish(cl *mqtt.Client, pk packets.Packet) (packets.Packet, error) {
	if cl.Net.Inline {
		return pk, nil
	}
	c, ok := cl.Net.Conn.(*conn)
	if !ok || c.throttle.bucket.rate <= 0 {
		return pk, nil
	}
	_, suffix, ok := protocol.ParseTopic(pk.TopicName)
	if !ok || (suffix != protocol.SuffixStatus && suffix != protocol.SuffixEvent) {
		return pk, nil
	}
	pass, abuse := c.throttle.allow(time.Now(), h.b.opts.MessageStrikes)
	if pass {
		return pk, nil
	}
	b := h.b
	b.throttled.Add(1)
	b.throttles.add("dropped", c.id)
	if abuse {
		// Once: later messages of the closing connection are dropped without a count here.
		if c.throttledOut.CompareAndSwap(false, true) {
			b.throttledOut.Add(1)
			b.throttles.add("disconnected", c.id)
			_ = c.Close()
		}
	}
	// Ignored rather than rejected: a QoS 1 message is still acknowledged, so the device
	// does not send it again, and is delivered to no one.
	return pk, packets.CodeSuccessIgnore
}

func (h *hook) OnConnectAuthenticate(cl *mqtt.Client, _ packets.Packet) bool {
	c, ok := cl.Net.Conn.(*conn)
	return ok && c.authed
}

// OnACLCheck runs for every SUBSCRIBE filter and PUBLISH, and again for every delivery on the
// real topic, so it only compares strings.
func (h *hook) OnACLCheck(cl *mqtt.Client, topic string, write bool) bool {
	if cl.Net.Inline {
		return true
	}
	c, ok := cl.Net.Conn.(*conn)
	if !ok || c.idErr != nil {
		return false
	}
	return allowed(c.id, topic, write)
}

// allowed reports whether device id may publish (write) or subscribe to topic: exactly
// Root/id/suffix with an upstream suffix to publish and a downstream one to subscribe. A
// filter with wildcards never equals one of those, so it is refused as a whole.
func allowed(id, topic string, write bool) bool {
	rest, ok := strings.CutPrefix(topic, protocol.Root)
	if !ok || len(rest) == 0 || rest[0] != '/' {
		return false
	}
	rest, ok = strings.CutPrefix(rest[1:], id)
	if !ok || len(rest) == 0 || rest[0] != '/' {
		return false
	}
	suffix := rest[1:]
	if write {
		return protocol.Upstream(suffix)
	}
	return protocol.Downstream(suffix)
}

func (h *hook) OnSessionEstablish(cl *mqtt.Client, _ packets.Packet) {
	if c, ok := cl.Net.Conn.(*conn); ok {
		c.client = cl
		h.b.established(c)
		if fn := h.b.beforeConnack.Load(); fn != nil {
			(*fn)(c)
		}
	}
}

func (h *hook) OnSessionEstablished(cl *mqtt.Client, _ packets.Packet) {
	if c, ok := cl.Net.Conn.(*conn); ok {
		h.b.connected(c)
		h.b.log.Debug("device connected", "device", c.id, "model", c.model, "remote", c.RemoteAddr().String(),
			"keepalive", cl.State.Keepalive, "mqtt", cl.Properties.ProtocolVersion)
	}
}

func (h *hook) OnPublishDropped(_ *mqtt.Client, _ packets.Packet) {
	h.b.dropped.Add(1)
}

// clampKeepalive returns the keepalive (seconds) a device gets for asking asked.
func clampKeepalive(asked, lo, hi uint16) uint16 {
	if asked == 0 {
		return hi
	}
	return min(max(asked, lo), hi)
}

// clip shortens a client-supplied string for a log line.
func clip(s string) string {
	const n = 64
	if len(s) > n {
		return s[:n] + "..."
	}
	return s
}
