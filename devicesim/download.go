package devicesim

import (
	"errors"
	"fmt"
	"math/rand/v2"
	"time"

	"github.com/fota-dev/fota/protocol"
)

// Transfer limits. They bound what a confused or hostile server can make a device do: a
// request is asked again a few times, then the job fails instead of spinning forever.
const (
	maxAttempts   = 6  // sends of one range before the job fails with ReasonTransfer
	maxBusy       = 20 // "busy" answers for one range before the job fails
	maxWindow     = 32 // the most requests kept outstanding, whatever the offer says
	maxBackoffExp = 4  // request timeouts double up to 16x RequestTimeout
)

// errExhausted is returned when one range was asked for too often; the job fails with
// ReasonTransfer.
var errExhausted = errors.New("chunk not delivered")

// errOversize is returned when one range kept coming back with bytes past the end of the
// transfer; the job fails with ReasonSize. Those bytes are never stored.
var errOversize = errors.New("transfer longer than the signed size")

type chunkState uint8

const (
	chunkPending     chunkState = iota // not asked yet, or waiting in the retry queue
	chunkOutstanding                   // asked; the answer is due by chunk.due
	chunkDone
)

type chunk struct {
	state    chunkState
	attempts int       // sends that went unanswered or came back corrupt
	busy     int       // "busy" answers
	due      time.Time // outstanding: re-ask after; queued for retry: not before
	past     bool      // the latest bad answer ran past the end of the transfer
}

// download is the state of one transfer: which ranges are done, outstanding or to be asked
// again, and where the bytes received so far are kept. The transfer is split into fixed
// ranges of chunkSize bytes (the last one shorter), so a frame maps to exactly one range by
// its offset.
//
// It holds no network state: what a restart needs is the data and the done ranges (done), and
// a device with a state directory persists exactly those.
type download struct {
	transfer  uint32
	size      int64
	chunkSize int
	window    int
	timeout   time.Duration

	data     partial
	chunks   []chunk
	next     int   // ranges below next were asked for, or were done when the download resumed
	retry    []int // ranges to ask again, oldest first; at most window long
	inflight []int // outstanding ranges; at most window long
	received int64
	unsynced int64 // bytes received since the last checkpoint
}

// transferParams returns the chunk size and window a device uses for offer o: the offer's,
// within the protocol's limits and this device's, with maxChunk the largest chunk the device
// takes (0: no limit of its own). A device may always ask for less than the offer allows.
func transferParams(o protocol.Offer, maxChunk int) (chunkSize, window int) {
	cs := o.ChunkSize
	switch {
	case cs <= 0:
		cs = protocol.DefaultChunkSize
	case cs > protocol.MaxChunkSize:
		cs = protocol.MaxChunkSize
	case cs < protocol.MinChunkSize:
		// Out of contract, but asking for small ranges still works with any server that
		// honours lengths up to the ChunkSize it announced.
	}
	if maxChunk > 0 {
		cs = min(cs, maxChunk)
	}
	w := o.Window
	switch {
	case w <= 0:
		w = protocol.DefaultWindow
	case w > maxWindow:
		w = maxWindow
	}
	return cs, w
}

// newDownload starts the transfer of offer o into data, which holds o.Size bytes, in ranges of
// chunkSize with at most window requests outstanding.
func newDownload(o protocol.Offer, chunkSize, window int, timeout time.Duration, data partial) *download {
	n := int((o.Size + int64(chunkSize) - 1) / int64(chunkSize))
	return &download{
		transfer:  o.Transfer,
		size:      o.Size,
		chunkSize: chunkSize,
		window:    window,
		timeout:   timeout,
		data:      data,
		chunks:    make([]chunk, n),
	}
}

// done returns a bitmap of the ranges received: bit i%8 of byte i/8 is range i.
func (dl *download) done() []byte {
	b := make([]byte, (len(dl.chunks)+7)/8)
	for i := range dl.chunks {
		if dl.chunks[i].state == chunkDone {
			b[i/8] |= 1 << (i % 8)
		}
	}
	return b
}

// restore marks the ranges of bitmap done as received, for a download resumed from what a
// device persisted. The ranges before the first one missing are never asked for again.
func (dl *download) restore(bitmap []byte) {
	for i := range dl.chunks {
		if i/8 < len(bitmap) && bitmap[i/8]&(1<<(i%8)) != 0 {
			_, n := dl.span(i)
			dl.chunks[i].state = chunkDone
			dl.received += int64(n)
		}
	}
	for dl.next < len(dl.chunks) && dl.chunks[dl.next].state == chunkDone {
		dl.next++
	}
}

// span returns the offset and length of range i.
func (dl *download) span(i int) (off int64, n int) {
	off = int64(i) * int64(dl.chunkSize)
	return off, int(min(int64(dl.chunkSize), dl.size-off))
}

// index maps a frame offset to an outstanding range, or returns -1.
func (dl *download) index(off uint32) int {
	if int64(off)%int64(dl.chunkSize) != 0 || int64(off) >= dl.size {
		return -1
	}
	i := int(int64(off) / int64(dl.chunkSize))
	if dl.chunks[i].state != chunkOutstanding {
		return -1
	}
	return i
}

func (dl *download) complete() bool { return dl.received == dl.size }

func (dl *download) wait(attempts int) time.Duration {
	return dl.timeout << min(attempts, maxBackoffExp)
}

// requests marks up to the window's worth of ranges outstanding and returns them: ranges to
// ask again first, then new ones in order. allow, when set, is asked before each request
// with its length, and ends the round when it says no (the rate limit).
func (dl *download) requests(now time.Time, allow func(n int) bool) []protocol.ChunkRequest {
	var reqs []protocol.ChunkRequest
	for len(dl.inflight) < dl.window {
		i, k := -1, -1
		for kk, r := range dl.retry {
			if !dl.chunks[r].due.After(now) {
				i, k = r, kk
				break
			}
		}
		if i < 0 {
			for dl.next < len(dl.chunks) && dl.chunks[dl.next].state == chunkDone {
				dl.next++ // received before a restart
			}
			if dl.next < len(dl.chunks) {
				i = dl.next
			}
		}
		if i < 0 {
			break
		}
		if _, n := dl.span(i); allow != nil && !allow(n) {
			break
		}
		if k >= 0 {
			dl.retry = append(dl.retry[:k], dl.retry[k+1:]...)
		} else {
			dl.next++
		}
		c := &dl.chunks[i]
		c.state = chunkOutstanding
		c.due = now.Add(dl.wait(c.attempts))
		dl.inflight = append(dl.inflight, i)
		off, n := dl.span(i)
		reqs = append(reqs, protocol.ChunkRequest{Offset: off, Length: n})
	}
	return reqs
}

// accept stores a data frame's payload. It returns the bytes taken, 0 for a frame that is
// not an answer to an outstanding request (duplicate, late, at or past the end of the
// transfer), or -1 for an answer of the wrong length, which the caller treats like a corrupt
// frame. Nothing past the transfer's size is ever stored, whatever a server sends. An error
// is the device's own storage failing.
func (dl *download) accept(off uint32, payload []byte) (int, error) {
	i := dl.index(off)
	if i < 0 {
		return 0, nil
	}
	o, n := dl.span(i)
	if len(payload) != n {
		dl.chunks[i].past = o+int64(len(payload)) > dl.size
		return -1, nil
	}
	if _, err := dl.data.WriteAt(payload, o); err != nil {
		return 0, fmt.Errorf("store chunk at %d: %w", o, err)
	}
	dl.chunks[i].state = chunkDone
	dl.drop(i)
	dl.received += int64(n)
	dl.unsynced += int64(n)
	return n, nil
}

// drop removes range i from the outstanding list.
func (dl *download) drop(i int) {
	for k, r := range dl.inflight {
		if r == i {
			dl.inflight = append(dl.inflight[:k], dl.inflight[k+1:]...)
			return
		}
	}
}

// requeue moves outstanding range i to the retry queue, to be asked again from notBefore.
func (dl *download) requeue(i int, notBefore time.Time) {
	dl.drop(i)
	c := &dl.chunks[i]
	c.state = chunkPending
	c.due = notBefore
	dl.retry = append(dl.retry, i)
}

// reask handles a corrupt or malformed answer at off: that range alone is asked again now.
// Frames for ranges not outstanding are ignored.
func (dl *download) reask(off uint32, now time.Time) error {
	i := dl.index(off)
	if i < 0 {
		return nil
	}
	c := &dl.chunks[i]
	c.attempts++
	if c.attempts >= maxAttempts {
		o, _ := dl.span(i)
		if c.past {
			return fmt.Errorf("%w: answers at offset %d ran past %d bytes %d times", errOversize, o, dl.size, c.attempts)
		}
		return fmt.Errorf("%w: offset %d corrupt %d times", errExhausted, o, c.attempts)
	}
	c.past = false
	dl.requeue(i, now)
	return nil
}

// busy handles a "busy" answer at off: the range is asked again later, with a growing,
// jittered delay so that many devices told "busy" at once do not come back at once.
func (dl *download) busy(off uint32, now time.Time) error {
	i := dl.index(off)
	if i < 0 {
		return nil
	}
	c := &dl.chunks[i]
	c.busy++
	if c.busy > maxBusy {
		o, _ := dl.span(i)
		return fmt.Errorf("%w: offset %d: server busy %d times", errExhausted, o, c.busy)
	}
	d := dl.wait(c.busy - 1)
	dl.requeue(i, now.Add(d/2+rand.N(d/2+1)))
	return nil
}

// expire re-queues outstanding ranges whose answer is overdue, and fails once one of them
// has been asked maxAttempts times.
func (dl *download) expire(now time.Time) error {
	for k := 0; k < len(dl.inflight); {
		i := dl.inflight[k]
		c := &dl.chunks[i]
		if c.due.After(now) {
			k++
			continue
		}
		c.attempts++
		if c.attempts >= maxAttempts {
			o, _ := dl.span(i)
			return fmt.Errorf("%w: offset %d unanswered after %d requests", errExhausted, o, c.attempts)
		}
		dl.requeue(i, now) // shrinks inflight at k
	}
	return nil
}

// reset forgets outstanding requests after a lost connection: their answers can no longer
// arrive, so they are asked again at once, without counting as attempts.
func (dl *download) reset() {
	for len(dl.inflight) > 0 {
		dl.requeue(dl.inflight[0], time.Time{})
	}
}
