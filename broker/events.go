package broker

import (
	"context"
	"sync"
)

type event struct {
	connect   bool
	id, model string
}

// events delivers OnConnect and OnDisconnect in order on one goroutine. The queue is unbounded
// so that pushing, which happens inside Mochi's hooks, never blocks; events are small and a
// connection makes two, so only a callback stuck for good makes it grow without end.
type events struct {
	b            *Broker
	onConnect    func(id, model string)
	onDisconnect func(id string)

	mu      sync.Mutex
	queue   []event
	wake    chan struct{}
	quit    chan struct{}
	done    chan struct{}
	started bool
}

func (e *events) init(b *Broker, onConnect func(id, model string), onDisconnect func(id string)) {
	e.b = b
	e.onConnect = onConnect
	e.onDisconnect = onDisconnect
	e.wake = make(chan struct{}, 1)
	e.quit = make(chan struct{})
	e.done = make(chan struct{})
}

func (e *events) start() {
	e.mu.Lock()
	defer e.mu.Unlock()
	e.started = true
	go e.run()
}

// push queues ev; the caller may hold Broker.mu, which keeps events in the order of the state
// changes they report.
func (e *events) push(ev event) {
	if e.onConnect == nil && e.onDisconnect == nil {
		return
	}
	e.mu.Lock()
	e.queue = append(e.queue, ev)
	e.mu.Unlock()
	select {
	case e.wake <- struct{}{}:
	default:
	}
}

func (e *events) run() {
	defer close(e.done)
	for {
		select {
		case <-e.wake:
		case <-e.quit:
			e.drain() // the disconnects of Close's own connections
			return
		}
		e.drain()
	}
}

func (e *events) drain() {
	for {
		e.mu.Lock()
		batch := e.queue
		e.queue = nil
		e.mu.Unlock()
		if len(batch) == 0 {
			return
		}
		for _, ev := range batch {
			e.deliver(ev)
		}
	}
}

func (e *events) deliver(ev event) {
	defer e.b.recoverPanic("connection callback", "device", ev.id)
	switch {
	case ev.connect && e.onConnect != nil:
		e.onConnect(ev.id, ev.model)
	case !ev.connect && e.onDisconnect != nil:
		if e.b.Reachable(ev.id) {
			// A newer connection is up and its connect is queued behind this: the device
			// never left. Delivered late, this would mark offline a device whose messages
			// on the new connection were already handled.
			return
		}
		e.onDisconnect(ev.id)
	}
}

// stop delivers what is queued and ends the goroutine, or gives up at ctx.
func (e *events) stop(ctx context.Context) error {
	e.mu.Lock()
	started := e.started
	e.mu.Unlock()
	if !started {
		return nil
	}
	close(e.quit)
	select {
	case <-e.done:
		return nil
	case <-ctx.Done():
		return ctx.Err()
	}
}
