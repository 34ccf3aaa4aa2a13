package controller

import (
	"errors"
	"fmt"
	"io/fs"

	bolt "go.etcd.io/bbolt"
)

// Group commit. Every state transition is decided in memory under Controller.mu and then
// written to bbolt before anything is done about it (an offer published, a transfer served).
// One fsync per device message would cap the controller at a few thousand messages a second,
// so a single writer goroutine gathers whatever writes are queued into one transaction. The
// queue is FIFO and fed under mu, so a transaction never holds a decision without the
// decisions it was based on: after a crash the state file holds a prefix of them.

// maxBatch bounds the writes of one transaction, so one commit does not hold back the
// devices whose writes arrived first for too long.
const maxBatch = 4096

// txFn is one write of a transition. It must not keep slices of the transaction.
type txFn func(tx *bolt.Tx) error

// writeReq is the writes of one transition; fin is closed once they are committed or
// failed, err says which.
type writeReq struct {
	fns []txFn
	fin chan struct{}
	err error
}

func newReq(fns []txFn) *writeReq { return &writeReq{fns: fns, fin: make(chan struct{})} }

func (req *writeReq) finish(err error) {
	req.err = err
	close(req.fin)
}

// pending collects the writes of one transition under mu; enqueue hands them to the writer.
type pending struct {
	fns []txFn
}

func (p *pending) add(fn txFn) { p.fns = append(p.fns, fn) }

func (p *pending) empty() bool { return len(p.fns) == 0 }

// enqueue queues the writes; called with mu held so the queue order is the decision order.
// It returns nil when there is nothing to write.
func (c *Controller) enqueue(p *pending) (*writeReq, error) {
	if p.empty() {
		return nil, nil
	}
	if c.closed {
		return nil, ErrClosed
	}
	if c.broken != nil {
		return nil, c.broken
	}
	req := newReq(p.fns)
	c.writes <- req
	c.last = req
	return req, nil
}

// wait waits for req's commit. A nil req has nothing to wait for.
func (req *writeReq) wait() error {
	if req == nil {
		return nil
	}
	<-req.fin
	return req.err
}

// sync waits until every transition decided so far is stored, so that a read of the state
// file, or of memory, shows nothing that a crash could still undo.
func (c *Controller) sync() error {
	c.mu.Lock()
	last := c.last
	c.mu.Unlock()
	if last != nil {
		// A failed write fails its own caller; a read after it shows what is stored.
		<-last.fin
	}
	return nil
}

// writer commits queued writes until the queue is closed.
func (c *Controller) writer() {
	defer c.wg.Done()
	batch := make([]*writeReq, 0, 64)
	for first := range c.writes {
		batch = append(batch[:0], first)
		n := len(first.fns)
	gather:
		for n < maxBatch {
			select {
			case r, ok := <-c.writes:
				if !ok {
					break gather
				}
				batch = append(batch, r)
				n += len(r.fns)
			default:
				break gather
			}
		}
		c.brokenMu.Lock()
		berr := c.brokenErr
		c.brokenMu.Unlock()
		if berr != nil {
			for _, r := range batch {
				r.finish(berr)
			}
			clear(batch)
			continue
		}
		err := c.db.Update(func(tx *bolt.Tx) error {
			if hook := c.beforeCommit.Load(); hook != nil {
				if err := (*hook)(); err != nil {
					return err
				}
			}
			for _, r := range batch {
				for _, fn := range r.fns {
					if err := fn(tx); err != nil {
						return err
					}
				}
			}
			return nil
		})
		c.stats.Commits.Add(1)
		c.stats.Writes.Add(uint64(n))
		if err != nil {
			c.stats.FailedCommits.Add(1)
			c.log.Error("state file write failed; reloading state", "err", err)
			// The caller (an operator, through the admin API) sees the cause without the state
			// file's path.
			cause := err
			var pe *fs.PathError
			if errors.As(err, &pe) {
				cause = pe.Err
			}
			err = fmt.Errorf("%w: %v", ErrStateWrite, cause)
			c.fail(err)
		}
		for _, r := range batch {
			r.finish(err)
		}
		clear(batch)
	}
}

// fail marks the in-memory state as ahead of the state file: every write queued after the
// failed one was decided on state that was never stored, so they fail too, until reload has
// rebuilt memory from the file.
func (c *Controller) fail(err error) {
	c.brokenMu.Lock()
	c.brokenErr = err
	c.brokenMu.Unlock()
	c.wg.Add(1)
	go c.reloadAfterFailure(err)
}
