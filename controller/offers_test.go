package controller

import (
	"context"
	"fmt"
	"testing"
	"time"

	"github.com/fota-dev/fota/fotatest"
	"github.com/fota-dev/fota/protocol"
)

func TestOfferQueueKeepsLatestPerDevice(t *testing.T) {
	q := newOfferQueue()
	for i := range 3000 {
		q.push(offerMsg{device: fmt.Sprintf("d%04d", i%1000), payload: []byte{byte(i / 1000)}})
	}
	seen := map[string]bool{}
	for m, ok := q.pop(); ok; m, ok = q.pop() {
		if seen[m.device] {
			t.Fatalf("device %s popped twice", m.device)
		}
		seen[m.device] = true
		if m.payload[0] != 2 {
			t.Fatalf("device %s: got offer %d, want the latest (2)", m.device, m.payload[0])
		}
	}
	if len(seen) != 1000 {
		t.Fatalf("got %d devices, want 1000", len(seen))
	}
}

// gatedPublisher blocks every publish until the gate opens, like a broker stuck on slow devices.
type gatedPublisher struct {
	recorder
	gate chan struct{}
}

func (g *gatedPublisher) Publish(topic string, payload []byte, qos byte) error {
	<-g.gate
	return g.recorder.Publish(topic, payload, qos)
}

// TestOffersNeverDropped: more offers than any queue bound while the publisher is stuck, and
// every device still gets its offer once it moves again.
func TestOffersNeverDropped(t *testing.T) {
	gp := &gatedPublisher{gate: make(chan struct{})}
	h := newHarness(t)
	h.c.Close(context.Background())
	h.pub = &gp.recorder
	h.opts = append(h.opts, func(o *Options) { o.Publisher = gp })
	h.start()
	const n = 3000
	for i := range n {
		h.status(fmt.Sprintf("d%04d", i), "7.27.0")
	}
	if _, err := h.c.CreateRollout(context.Background(), RolloutSpec{Model: "primehub", Version: "7.28.0", MaxConcurrent: n}); err != nil {
		t.Fatal(err)
	}
	close(gp.gate)
	fotatest.WaitForValue(t, 20*time.Second, fmt.Sprintf("offers for %d devices", n), func() (int, bool) {
		got := map[string]bool{}
		gp.mu.Lock()
		for _, m := range gp.msgs {
			if d, s, ok := protocol.ParseTopic(m.topic); ok && s == protocol.SuffixJob {
				got[d] = true
			}
		}
		gp.mu.Unlock()
		return len(got), len(got) == n
	})
}
