// Package controller decides which device installs what and when. It keeps the device
// registry, the rollouts and each device's job in the bbolt state file, answers device status
// and events, serves firmware chunks, and schedules rollouts: waves with success gates and
// soak times, cron maintenance windows, concurrency limits with offer jitter, per-phase
// timeouts with retries, an abort rule, and manual pause, resume and cancel.
//
// Every transition is decided in memory, written to the state file by a group-committing
// writer, and acted on (an offer published, a transfer served) only once it is stored, so a
// crash at any moment loses no device and counts none twice. It talks to devices only through
// a Publisher and reads firmware only through a Firmware source, both declared here.
package controller

import (
	"context"
	"encoding/json"
	"errors"
	"fmt"
	"log/slog"
	"math"
	"math/rand/v2"
	"strings"
	"sync"
	"sync/atomic"
	"time"

	"github.com/fota-dev/fota/protocol"
	bolt "go.etcd.io/bbolt"
)

// Options configure a Controller. DB, Publisher and Firmware are required.
type Options struct {
	DB        *bolt.DB
	Publisher Publisher
	Firmware  Firmware
	Deltas    Deltas // optional: without it every device gets the full image
	Logger    *slog.Logger
	Clock     Clock // default SystemClock
	// TickInterval is how often the scheduler looks at windows, waves, timeouts and retries;
	// default 1s. Negative: no background ticks, the caller drives Tick (tests).
	TickInterval time.Duration
	ChunkSize    int // largest chunk a device may ask for; default protocol.DefaultChunkSize
	Window       int // outstanding requests per device; default protocol.DefaultWindow
	// OfferWorkers publish offers, so a device that stopped reading delays only its own offer.
	OfferWorkers int // default 4
	// EventLogSize is how many entries each rollout's event log keeps; default 10000.
	EventLogSize int
	// RetryBackoff is the wait before the second offer of a job that timed out; it doubles
	// with each attempt up to RetryBackoffMax, and half of it is random. Defaults 1m and 1h.
	RetryBackoff, RetryBackoffMax time.Duration
	// UnreachableAfter is how long a device of an open rollout may stay offline before its
	// job ends unreachable, so that the rollout can finish without it; default 24h.
	UnreachableAfter time.Duration
	// Revoked reports whether a device's certificate is revoked; optional. Such a device's
	// job ends skipped, and no new rollout selects it. DeviceRevoked tells of later ones.
	Revoked func(id string) bool
}

func (o *Options) fill() error {
	if o.DB == nil || o.Publisher == nil || o.Firmware == nil {
		return errors.New("controller: DB, Publisher and Firmware are required")
	}
	if o.Logger == nil {
		o.Logger = slog.New(slog.DiscardHandler)
	}
	o.Logger = o.Logger.With("component", "controller")
	if o.Clock == nil {
		o.Clock = SystemClock{}
	}
	if o.TickInterval == 0 {
		o.TickInterval = time.Second
	}
	if o.ChunkSize == 0 {
		o.ChunkSize = protocol.DefaultChunkSize
	}
	if o.ChunkSize < protocol.MinChunkSize || o.ChunkSize > protocol.MaxChunkSize {
		return fmt.Errorf("controller: chunk size %d outside [%d, %d]", o.ChunkSize, protocol.MinChunkSize, protocol.MaxChunkSize)
	}
	if o.Window <= 0 {
		o.Window = protocol.DefaultWindow
	}
	if o.OfferWorkers <= 0 {
		o.OfferWorkers = 4
	}
	if o.EventLogSize <= 0 {
		o.EventLogSize = 10000
	}
	if o.RetryBackoff <= 0 {
		o.RetryBackoff = time.Minute
	}
	if o.RetryBackoffMax < o.RetryBackoff {
		o.RetryBackoffMax = max(time.Hour, o.RetryBackoff)
	}
	if o.UnreachableAfter <= 0 {
		o.UnreachableAfter = 24 * time.Hour
	}
	if o.Revoked == nil {
		o.Revoked = func(string) bool { return false }
	}
	return nil
}

// Controller runs rollouts. Create it with New, then Start it.
type Controller struct {
	opts  Options
	db    *bolt.DB
	log   *slog.Logger
	clock Clock
	// started is when this controller started: deadlines of jobs offered before a restart
	// count from here, since devices could not reach a server that was down.
	started time.Time

	// mu guards the index and orders decisions: decide in memory, enqueue the writes, and
	// act once they are committed.
	mu       sync.Mutex
	devs     map[string]*devState
	devList  []*devState               // the same devices: scans of a slice are several times faster than of a map
	open     map[string]*rollout       // model -> its open rollout
	rollouts map[string]*rolloutRecord // every rollout; open ones are updated in open
	strs     map[string]string
	strsMax  int // intern table size that triggers its rebuild; see intern
	nextSeq  uint64
	// waiting holds the devices whose offer waits for a patch, by base+target sha.
	waiting map[string]map[string]bool
	closed  bool
	broken  error     // set while memory is ahead of a failed commit; see reloadAfterFailure
	last    *writeReq // the latest write queued, for sync

	// creating is held for reading by CreateRollout from its firmware lookup until the rollout
	// is registered, and for writing by WithoutNewRollouts: a firmware delete that checks InUse
	// under it cannot miss a rollout whose creation already found the firmware.
	creating sync.RWMutex

	// certModel is the model a device's certificate names, when it names one.
	certModel sync.Map // device id -> string
	transfers sync.Map // device id -> *xfer, read on every chunk request

	writes chan *writeReq
	offers *offerQueue
	stop   chan struct{}
	wg     sync.WaitGroup

	brokenMu  sync.Mutex
	brokenErr error

	// beforeCommit, when set, runs inside each state file transaction before its writes;
	// an error fails the commit. Tests use it to make a state write fail on demand.
	beforeCommit atomic.Pointer[func() error]

	stats  Stats
	badLog sampledLog
}

// Stats counts what the controller dropped or stored. Chunks are counted by the chunk server.
type Stats struct {
	BadMessages  atomic.Uint64 // undecodable or invalid device messages
	StaleEvents  atomic.Uint64 // duplicate or late events ignored
	Commits      atomic.Uint64 // state file transactions
	Writes       atomic.Uint64 // transition writes in them
	FailedWrites atomic.Uint64 // transitions lost to a failed commit
	// FailedCommits counts state file transactions that failed (a full disk); after each the
	// controller reloads its state from the file (Reloads) and decides again.
	FailedCommits atomic.Uint64
	Reloads       atomic.Uint64
	// ProtocolViolations counts jobs failed because the device's reports did not add up (an
	// install claimed before the download was verified, a byte count past the transfer).
	ProtocolViolations atomic.Uint64
	// DroppedLogEntries counts event log entries left out because their device had used its
	// share of the rollout's log.
	DroppedLogEntries atomic.Uint64
}

// xfer is what a device may currently download; Transfer hands it to the chunk server.
type xfer struct {
	job      string
	id       uint32
	sha      string
	size     int64
	chunkMax int
	paused   *atomic.Bool
}

type offerMsg struct {
	device  string
	payload []byte
}

// New loads the controller's state from opts.DB.
func New(opts Options) (*Controller, error) {
	if err := opts.fill(); err != nil {
		return nil, err
	}
	c := &Controller{
		opts: opts, db: opts.DB, log: opts.Logger, clock: opts.Clock,
		writes: make(chan *writeReq, 4096),
		offers: newOfferQueue(),
		stop:   make(chan struct{}),
	}
	c.reset()
	if err := c.db.Update(createBuckets); err != nil {
		return nil, fmt.Errorf("controller: %w", err)
	}
	if err := c.load(); err != nil {
		return nil, fmt.Errorf("controller: load state: %w", err)
	}
	c.started = c.clock.Now()
	c.restore(c.started)
	return c, nil
}

// restore sets what the index does not store: window states and offer queues.
func (c *Controller) restore(now time.Time) {
	for _, r := range c.open {
		if r.win != nil {
			r.winOpen, _ = c.windowSession(r, now)
			r.winSince = now
			r.paused.Store(r.rec.Spec.WindowEnd == WindowEndPause && !r.winOpen)
		}
		c.rebuildQueue(r)
	}
}

func (c *Controller) addDevice(ds *devState) {
	c.devs[ds.d.ID] = ds
	c.devList = append(c.devList, ds)
}

func (c *Controller) reset() {
	c.devs = make(map[string]*devState)
	c.devList = nil
	c.open = make(map[string]*rollout)
	c.rollouts = make(map[string]*rolloutRecord)
	c.strs = make(map[string]string)
	c.waiting = make(map[string]map[string]bool)
	c.transfers.Range(func(k, _ any) bool { c.transfers.Delete(k); return true })
}

// Start starts the writer, the offer workers and the scheduler. It does not block.
func (c *Controller) Start() error {
	c.wg.Add(1)
	go c.writer()
	for range c.opts.OfferWorkers {
		c.wg.Add(1)
		go c.offerWorker()
	}
	if c.opts.TickInterval > 0 {
		c.wg.Add(1)
		go func() {
			defer c.wg.Done()
			t := time.NewTicker(c.opts.TickInterval)
			defer t.Stop()
			for {
				select {
				case <-c.stop:
					return
				case <-t.C:
					c.Tick()
				}
			}
		}()
	}
	return nil
}

// offerWorker publishes offers until Close, then publishes what is still queued.
func (c *Controller) offerWorker() {
	defer c.wg.Done()
	publish := func(m offerMsg) {
		if err := c.opts.Publisher.Publish(protocol.Topic(m.device, protocol.SuffixJob), m.payload, 1); err != nil {
			c.log.Warn("publish offer", "device", m.device, "err", err)
		}
	}
	for {
		if m, ok := c.offers.pop(); ok {
			publish(m)
			continue
		}
		select {
		case <-c.offers.ready:
		case <-c.stop:
			for m, ok := c.offers.pop(); ok; m, ok = c.offers.pop() {
				publish(m)
			}
			return
		}
	}
}

// Close stops the scheduler, commits the writes already queued, publishes the offers already
// queued, and returns; or returns when ctx ends. Offers decided later are dropped: devices
// get them again when they next report to a controller.
func (c *Controller) Close(ctx context.Context) error {
	c.mu.Lock()
	if c.closed {
		c.mu.Unlock()
		return nil
	}
	c.closed = true
	close(c.stop)
	close(c.writes)
	c.mu.Unlock()
	done := make(chan struct{})
	go func() {
		c.wg.Wait()
		close(done)
	}()
	select {
	case <-done:
		return nil
	case <-ctx.Done():
		return fmt.Errorf("controller: close: %w", ctx.Err())
	}
}

// Stats returns the live counters.
func (c *Controller) Stats() *Stats { return &c.stats }

// commit enqueues p under mu; the caller unlocks, then waits and acts.
type commit struct {
	req    *writeReq
	err    error
	offers []offerMsg
	xfers  []*xfer // transfers to serve once stored, by device
	xdevs  []string
}

// finish waits for the commit, then acts: transfers become servable and offers go out.
func (c *Controller) finish(cm *commit) error {
	if cm.err != nil {
		return cm.err
	}
	if err := cm.req.wait(); err != nil {
		c.stats.FailedWrites.Add(1)
		return err
	}
	for i, t := range cm.xfers {
		c.transfers.Store(cm.xdevs[i], t)
	}
	for _, o := range cm.offers {
		c.sendOffer(o)
	}
	return nil
}

// txn runs fn under mu with a fresh pending write set and offer list, queues the writes, and
// after the commit acts on them.
func (c *Controller) txn(fn func(p *pending, cm *commit) error) error {
	var p pending
	var cm commit
	c.mu.Lock()
	err := fn(&p, &cm)
	if err == nil {
		cm.req, cm.err = c.enqueue(&p)
	} else if !p.empty() {
		// fn failed after deciding something: keep what it decided, report the error.
		cm.req, cm.err = c.enqueue(&p)
	}
	c.mu.Unlock()
	if ferr := c.finish(&cm); ferr != nil {
		return ferr
	}
	return err
}

func (c *Controller) sendOffer(o offerMsg) { c.offers.push(o) }

// offerQueue holds the offers waiting for a worker: at most one per device, the latest, in the
// order devices were first queued. It never drops an offer, and never holds more entries than
// there are devices, however slowly the workers publish.
type offerQueue struct {
	mu      sync.Mutex
	order   []string
	pending map[string]offerMsg
	ready   chan struct{} // a token: something may be queued
}

func newOfferQueue() *offerQueue {
	return &offerQueue{pending: make(map[string]offerMsg), ready: make(chan struct{}, 1)}
}

func (q *offerQueue) push(m offerMsg) {
	q.mu.Lock()
	if _, ok := q.pending[m.device]; !ok {
		q.order = append(q.order, m.device)
	}
	q.pending[m.device] = m
	q.mu.Unlock()
	q.signal()
}

func (q *offerQueue) pop() (offerMsg, bool) {
	q.mu.Lock()
	defer q.mu.Unlock()
	for len(q.order) > 0 {
		d := q.order[0]
		q.order = q.order[1:]
		if m, ok := q.pending[d]; ok {
			delete(q.pending, d)
			if len(q.order) > 0 {
				q.signal() // wake another worker for the rest
			} else {
				q.order = nil
			}
			return m, true
		}
	}
	return offerMsg{}, false
}

func (q *offerQueue) signal() {
	select {
	case q.ready <- struct{}{}:
	default:
	}
}

// reloadAfterFailure rebuilds memory from the state file after a failed commit. Every write queued
// before it takes mu was decided on state that was never stored; the writer fails them while
// brokenErr is set, and a barrier tells when the last one is through.
func (c *Controller) reloadAfterFailure(cause error) {
	defer c.wg.Done()
	c.mu.Lock()
	defer c.mu.Unlock()
	if c.closed {
		return
	}
	c.broken = cause
	barrier := newReq(nil)
	c.writes <- barrier
	<-barrier.fin
	// Presence is not state the file can restore: the devices' connections outlived the
	// failed commit, and a device marked offline would be offered nothing until it reconnects,
	// which, with its connection up, may be never.
	online := make(map[string]time.Time)
	for _, ds := range c.devList {
		if ds.d.Online {
			online[ds.d.ID] = ds.d.LastSeen
		}
	}
	c.reset()
	c.nextSeq = 0
	if err := c.load(); err != nil {
		c.log.Error("reload state after failed commit; refusing changes", "err", err)
		return
	}
	for id, seen := range online {
		if ds := c.devs[id]; ds != nil {
			ds.d.Online, ds.d.LastSeen = true, seen
		}
	}
	c.restore(c.clock.Now())
	c.stats.Reloads.Add(1)
	c.broken = nil
	c.brokenMu.Lock()
	c.brokenErr = nil
	c.brokenMu.Unlock()
	c.log.Info("state reloaded after failed commit")
}

// DeviceConnected registers a device on its authenticated connection; model is from its
// certificate ("" when the certificate names none, and the first status names it). The
// device's status message follows.
func (c *Controller) DeviceConnected(id, model string) {
	if protocol.ValidDeviceID(id) != nil {
		return
	}
	if model != "" {
		c.certModel.Store(id, model)
	}
	now := c.clock.Now()
	err := c.txn(func(p *pending, cm *commit) error {
		ds := c.devs[id]
		if ds == nil {
			if model == "" {
				return nil // registered by its first status
			}
			ds = &devState{d: Device{ID: id, Model: c.intern(model)}, pos: position(id), wave: -1}
			c.addDevice(ds)
		}
		if ds.d.Model == "" && model != "" {
			// Registered by its tags before it first connected.
			c.change(ds, func() { ds.d.Model = c.intern(model) })
		}
		wasOnline := ds.d.Online
		ds.d.Online, ds.d.LastSeen = true, now
		p.add(putDeviceFn(ds.d))
		// A job left pending while the device was offline (its patch became ready then)
		// waits for a slot again. Its status, which usually follows, does the same; but
		// connection events can lag the device's messages, and a status handled before
		// this event would leave the job pending for good.
		if r := c.open[ds.d.Model]; r != nil && !wasOnline && ds.job != nil && ds.job.State == JobPending {
			c.enqueueDevice(r, ds)
			c.afterChange(r, now, p, cm)
		}
		return nil
	})
	if err != nil {
		c.log.Error("register device", "device", id, "err", err)
	}
}

// DeviceDisconnected marks a device offline.
func (c *Controller) DeviceDisconnected(id string) {
	now := c.clock.Now()
	err := c.txn(func(p *pending, cm *commit) error {
		ds := c.devs[id]
		if ds == nil {
			return nil
		}
		ds.d.Online, ds.d.LastSeen = false, now
		p.add(putDeviceFn(ds.d))
		return nil
	})
	if err != nil {
		c.log.Error("mark device offline", "device", id, "err", err)
	}
}

// HandleMessage dispatches a device's publish on an upstream topic. It returns once what the
// message changed is stored. It never panics on what a device sends: bad messages are
// counted and dropped.
func (c *Controller) HandleMessage(device, suffix string, payload []byte) {
	switch suffix {
	case protocol.SuffixStatus:
		var st protocol.Status
		if err := json.Unmarshal(payload, &st); err != nil {
			c.bad(device, suffix, err)
			return
		}
		if err := c.handleStatus(device, st); err != nil {
			c.bad(device, suffix, err)
		}
	case protocol.SuffixEvent:
		var ev protocol.Event
		if err := json.Unmarshal(payload, &ev); err != nil {
			c.bad(device, suffix, err)
			return
		}
		if err := c.handleEvent(device, ev); err != nil {
			c.bad(device, suffix, err)
		}
	default:
		c.bad(device, suffix, errors.New("unknown topic"))
	}
}

func (c *Controller) bad(device, suffix string, err error) {
	if errors.Is(err, ErrClosed) {
		return // shutting down; the device reports again to the next controller
	}
	c.stats.BadMessages.Add(1)
	c.badLog.warn(c.log, "device message refused", "device", device, "topic", suffix, "err", err)
}

// change brackets a change to ds with its rollout's bookkeeping.
func (c *Controller) change(ds *devState, fn func()) {
	r := c.open[ds.d.Model]
	if r != nil {
		r.uncount(ds)
	}
	fn()
	if r2 := c.open[ds.d.Model]; r2 != nil {
		r2.count(ds)
	}
}

// reconcile brings a member's job in line with the status the device reports.
func (c *Controller) reconcile(r *rollout, ds *devState, st protocol.Status, now time.Time, p *pending, cm *commit) {
	order, _ := protocol.CompareVersions(ds.d.Version, r.rec.Version)
	if ds.done == JobUnreachable && order < 0 {
		c.reopenUnreachable(p, r, ds, now)
	}
	if ds.done != "" {
		return
	}
	j := ds.job
	switch {
	case order == 0:
		if j == nil {
			c.newJob(r, ds, now)
		}
		if reason := c.installViolation(ds.job, r.rec.SHA256, st); reason != "" {
			c.violation(p, ds, reason, now)
			return
		}
		c.endJob(p, ds, JobInstalled, "", now)
		return
	case order > 0:
		if j == nil {
			return
		}
		c.endJob(p, ds, JobFailed, "device runs newer version "+ds.d.Version, now)
		return
	}
	if j == nil {
		if r.rec.State == RolloutCompleted {
			c.setRolloutState(p, r, RolloutActive, "device "+ds.d.ID+" joined", now)
		}
		c.enqueueDevice(r, ds)
		return
	}
	switch j.State {
	case JobInstalling:
		if st.Job == j.ID && st.State == protocol.StateInstalling {
			return // reconnected while installing; the reboot is still to come
		}
		// The device rebooted on its old version: the install did not take.
		reason := protocol.ReasonInstall + ": device came back on " + ds.d.Version
		if st.Job == j.ID && st.State == protocol.StateFailed {
			// It failed the job, but its failed event, which carries the device's reason,
			// was lost (the device stopped before it was acknowledged).
			reason = protocol.ReasonInstall + ": device reports the job failed; its reason was lost with its failed event"
		}
		c.endJob(p, ds, JobFailed, reason, now)
	case JobOffered, JobDownloading, JobVerifying:
		// The device reconnected: offer the same job again, so it resumes the same transfer.
		if o := c.offerMsg(r, ds, now); o != nil {
			cm.offers = append(cm.offers, *o)
		}
	case JobPending:
		c.enqueueDevice(r, ds)
	case JobTimedOut:
		if !j.RetryAt.After(now) && c.accepting(r, now) && r.inflight < r.rec.Spec.MaxConcurrent {
			c.offer(r, ds, now, p, cm)
		}
	}
}

// enqueueDevice puts an eligible device in the offer queue.
func (c *Controller) enqueueDevice(r *rollout, ds *devState) {
	if ds.queued || ds.reserved || !c.eligible(r, ds) {
		return
	}
	ds.queued = true
	r.queue = append(r.queue, ds)
}

// eligible reports whether ds may be offered a new job once there is a slot.
func (c *Controller) eligible(r *rollout, ds *devState) bool {
	return ds.d.Online && ds.wave >= 0 && ds.wave < r.rec.WavesStarted && ds.done == "" &&
		(ds.job == nil || ds.job.State == JobPending) && !ds.reserved
}

// newJob creates the job of ds in r, pending.
func (c *Controller) newJob(r *rollout, ds *devState, now time.Time) {
	c.change(ds, func() {
		ds.job = &Job{
			Rollout: r.rec.ID, Device: ds.d.ID, Wave: r.waveOf(ds.pos), From: ds.d.Version, To: r.rec.Version,
			State: JobPending, Created: now, Updated: now,
		}
	})
}

// offer starts a new attempt of ds's job: a fresh job id and transfer, then the offer once a
// patch (if any) is ready. It returns false when it could not.
func (c *Controller) offer(r *rollout, ds *devState, now time.Time, p *pending, cm *commit) bool {
	m, err := c.manifest(r)
	if err != nil {
		c.log.Error("offer", "rollout", r.rec.ID, "err", err)
		return false
	}
	if err := manifestFresh(m, r.rec.Spec, now); err != nil {
		c.stopIfExpired(r, now, p)
		return false
	}
	if c.counterRefused(r, ds, m, now, p) {
		return false
	}
	if ds.job == nil {
		c.newJob(r, ds, now)
	}
	prevState := ds.job.State
	c.change(ds, func() {
		j := ds.job
		j.Attempt++
		j.Offers++
		j.ID = jobID(r.rec.ID, j.Offers)
		j.Transfer = rand.Uint32N(math.MaxUint32) + 1 // 0 is reserved for "no transfer"
		j.From = ds.d.Version
		j.Seq, j.Bytes, j.Reason, j.RetryAt = 0, 0, "", time.Time{}
		j.Delta, j.Artifact, j.Size, j.Reached = false, "", 0, ""
		j.State, j.Offered, j.Updated = JobPending, time.Time{}, now
		ds.reserved = false
	})
	ds.d.Job = ds.job.ID
	p.add(putDeviceFn(ds.d))
	offered, ok := c.chooseArtifact(r, ds, ds.job, m, now)
	if !ok {
		// The patch for this device is being made; it is offered when ready, and holds its
		// slot meanwhile.
		c.change(ds, func() { ds.reserved = true })
		p.add(putJobFn(*ds.job))
		return true
	}
	c.change(ds, func() {
		ds.job.State, ds.job.Offered = JobOffered, now
	})
	p.add(putJobFn(*ds.job))
	c.logEvent(p, r, Event{Time: now, Device: ds.d.ID, Job: ds.job.ID, From: prevState, To: JobOffered}, now)
	t := c.newTransfer(r, ds.job)
	cm.xfers, cm.xdevs = append(cm.xfers, t), append(cm.xdevs, ds.d.ID)
	cm.offers = append(cm.offers, c.encodeOffer(ds.d.ID, ds.job, offered))
	return true
}

// offerMsg encodes the offer of ds's current job again (a device that reconnected). A
// manifest expired since is not sent: the phase timeout ends the job.
func (c *Controller) offerMsg(r *rollout, ds *devState, now time.Time) *offerMsg {
	j := ds.job
	m, err := c.manifest(r)
	if err != nil {
		c.log.Error("offer", "rollout", r.rec.ID, "err", err)
		return nil
	}
	if exp, _ := m.ExpiresAt(); !exp.IsZero() && !now.Before(exp) {
		return nil
	}
	offered := m
	if j.Delta && c.opts.Deltas != nil {
		dm, ready, err := c.opts.Deltas.Delta(ds.d.SHA256, m)
		if err != nil || !ready || dm.Delta == nil || dm.Delta.PatchSHA256 != j.Artifact {
			return nil // the job's patch is gone; the phase timeout retries it
		}
		if exp, _ := dm.ExpiresAt(); !exp.IsZero() && !now.Before(exp) {
			return nil
		}
		offered = dm
	}
	o := c.encodeOffer(ds.d.ID, j, offered)
	return &o
}

func (c *Controller) encodeOffer(device string, j *Job, m protocol.Manifest) offerMsg {
	payload, err := json.Marshal(protocol.Offer{
		V: protocol.ProtocolVersion, Job: j.ID, Transfer: j.Transfer, Manifest: m,
		Size: j.Size, ChunkSize: c.chunkSize(j), Window: c.opts.Window,
	})
	if err != nil {
		c.log.Error("encode offer", "device", device, "err", err)
	}
	return offerMsg{device, payload}
}

func (c *Controller) manifest(r *rollout) (protocol.Manifest, error) {
	if r.manifest != nil {
		return *r.manifest, nil
	}
	m, err := c.opts.Firmware.Manifest(r.rec.Model, r.rec.Version)
	if err != nil {
		return protocol.Manifest{}, fmt.Errorf("manifest for rollout %s: %w", r.rec.ID, err)
	}
	r.manifest = &m
	return m, nil
}

// chooseArtifact decides what a job streams: a verified patch from the image the device runs
// when one is ready, small enough and its manifest fresh for the job's span, else the full
// image. It returns ok false while a patch is being made.
func (c *Controller) chooseArtifact(r *rollout, ds *devState, j *Job, full protocol.Manifest, now time.Time) (protocol.Manifest, bool) {
	j.Chunk = ds.d.MaxChunk
	useFull := func() (protocol.Manifest, bool) {
		j.Delta, j.Artifact, j.Size = false, full.SHA256, full.Size
		return full, true
	}
	if c.opts.Deltas == nil || ds.d.SHA256 == "" {
		return useFull()
	}
	m, ready, err := c.opts.Deltas.Delta(ds.d.SHA256, full)
	switch {
	case err != nil:
		c.log.Debug("full image", "device", ds.d.ID, "reason", err)
		return useFull()
	case !ready:
		key := ds.d.SHA256 + ":" + full.SHA256
		if c.waiting[key] == nil {
			c.waiting[key] = make(map[string]bool)
		}
		c.waiting[key][ds.d.ID] = true
		return protocol.Manifest{}, false
	case m.Delta == nil:
		return useFull()
	case manifestFresh(m, r.rec.Spec, now) != nil:
		c.log.Debug("full image: the patch's manifest expires too soon", "device", ds.d.ID, "expires", m.Expires)
		return useFull()
	}
	j.Delta, j.Artifact, j.Size = true, m.Delta.PatchSHA256, m.Delta.PatchSize
	return m, true
}

// DeltaReady is called when the verdict on the patch from base to target is in: the devices
// waiting for it are offered the patch, or the full image.
func (c *Controller) DeltaReady(base, target string) {
	now := c.clock.Now()
	err := c.txn(func(p *pending, cm *commit) error {
		key := base + ":" + target
		devices := c.waiting[key]
		delete(c.waiting, key)
		for id := range devices {
			ds := c.devs[id]
			if ds == nil || ds.job == nil || ds.job.State != JobPending || !ds.reserved {
				continue
			}
			r := c.open[ds.d.Model]
			if r == nil {
				continue
			}
			m, err := c.manifest(r)
			if err != nil {
				return err
			}
			if manifestFresh(m, r.rec.Spec, now) != nil {
				// Not offered; the device waits in its job, pending, until the rollout resumes.
				c.change(ds, func() { ds.reserved = false })
				c.stopIfExpired(r, now, p)
				continue
			}
			offered, ok := c.chooseArtifact(r, ds, ds.job, m, now)
			if !ok {
				continue
			}
			if !ds.d.Online {
				c.change(ds, func() { ds.reserved = false })
				p.add(putJobFn(*ds.job))
				continue
			}
			c.change(ds, func() {
				ds.reserved = false
				ds.job.State, ds.job.Offered, ds.job.Updated = JobOffered, now, now
			})
			p.add(putJobFn(*ds.job))
			c.logEvent(p, r, Event{Time: now, Device: id, Job: ds.job.ID, From: JobPending, To: JobOffered}, now)
			t := c.newTransfer(r, ds.job)
			cm.xfers, cm.xdevs = append(cm.xfers, t), append(cm.xdevs, id)
			cm.offers = append(cm.offers, c.encodeOffer(id, ds.job, offered))
		}
		return nil
	})
	if err != nil {
		c.log.Error("offer after delta", "err", err)
	}
}

func (c *Controller) newTransfer(r *rollout, j *Job) *xfer {
	return &xfer{job: j.ID, id: j.Transfer, sha: j.Artifact, size: j.Size, chunkMax: c.chunkSize(j), paused: &r.paused}
}

func (c *Controller) setTransfer(r *rollout, j *Job) {
	c.transfers.Store(j.Device, c.newTransfer(r, j))
}

// endJob finishes ds's job in state (installed, failed or canceled).
func (c *Controller) endJob(p *pending, ds *devState, state, reason string, now time.Time) {
	r := c.open[ds.d.Model]
	j := ds.job
	if j == nil || r == nil {
		return
	}
	from := j.State
	c.change(ds, func() {
		j.State, j.Reason, j.Finished, j.Updated, j.RetryAt = state, reason, now, now, time.Time{}
		ds.job, ds.done, ds.reserved = nil, state, false
		if state == JobInstalled {
			ds.d.Version = c.intern(j.To)
		}
	})
	c.transfers.Delete(ds.d.ID)
	ds.d.Job = ""
	p.add(putJobFn(*j))
	p.add(putDeviceFn(ds.d))
	c.logEvent(p, r, Event{Time: now, Device: ds.d.ID, Job: j.ID, From: from, To: state, Reason: reason}, now)
	if state != JobCanceled {
		// Installs count too: the rule waits for enough finished devices.
		c.checkAbort(p, r, j.Wave, now)
	}
}

// retryOrFail ends an attempt that went nowhere (a timeout, a transfer that broke off): the
// job is offered again after a backoff, unless it used up its attempts.
func (c *Controller) retryOrFail(p *pending, r *rollout, ds *devState, reason string, now time.Time) {
	j := ds.job
	if j.Attempt >= r.rec.Spec.MaxAttempts {
		c.endJob(p, ds, JobFailed, fmt.Sprintf("%s (attempt %d of %d)", reason, j.Attempt, r.rec.Spec.MaxAttempts), now)
		return
	}
	from := j.State
	wait := c.backoff(j.Attempt)
	c.change(ds, func() {
		j.History = appendHistory(j.History, reason)
		j.State, j.Reason, j.Updated, j.RetryAt = JobTimedOut, reason, now, now.Add(wait)
	})
	// The transfer stays servable: a device that was only slow may still finish, and its
	// events bring the job back until the next offer replaces it.
	p.add(putJobFn(*j))
	c.logEvent(p, r, Event{Time: now, Device: ds.d.ID, Job: j.ID, From: from, To: JobTimedOut, Reason: reason}, now)
}

// backoff returns the wait before the next offer after attempt n (from 1): exponential, half
// of it random ("equal jitter"), so devices that failed together do not return together.
func (c *Controller) backoff(n int) time.Duration {
	d := c.opts.RetryBackoff
	for i := 1; i < n && d < c.opts.RetryBackoffMax; i++ {
		d *= 2
	}
	d = min(d, c.opts.RetryBackoffMax)
	return d/2 + rand.N(d/2+1)
}

// transferReason reports whether a device's failure reason says the transfer broke off, which
// is worth another attempt; every other reason is a verdict on the image and final.
func transferReason(reason string) bool {
	return reason == protocol.ReasonTransfer || strings.HasPrefix(reason, protocol.ReasonTransfer+":")
}

// maxHistory bounds the reasons a job keeps of its earlier attempts.
const maxHistory = 16

func appendHistory(h []string, reason string) []string {
	if len(h) >= maxHistory {
		h = append(h[:0:0], h[len(h)-maxHistory+1:]...)
	}
	return append(h, reason)
}

// logEvent appends an entry to the rollout's event log.
func (c *Controller) logEvent(p *pending, r *rollout, e Event, now time.Time) {
	if !c.admitLog(e) {
		return
	}
	r.logSeq++
	e.Seq = r.logSeq
	if e.Time.IsZero() {
		e.Time = now
	}
	id, keep := r.rec.ID, uint64(c.opts.EventLogSize)
	p.add(func(tx *bolt.Tx) error { return appendEvent(tx, id, e, keep) })
}

func putDeviceFn(d Device) txFn {
	return func(tx *bolt.Tx) error { return putDevice(tx, d) }
}

func putJobFn(j Job) txFn {
	return func(tx *bolt.Tx) error { return putJob(tx, j) }
}

func putRolloutFn(rec rolloutRecord) txFn {
	rec.Bounds = append([]uint64(nil), rec.Bounds...)
	rec.WaveStarted = append([]time.Time(nil), rec.WaveStarted...)
	rec.WaveGateMet = append([]time.Time(nil), rec.WaveGateMet...)
	rec.AbortBase = append([][2]int(nil), rec.AbortBase...)
	return func(tx *bolt.Tx) error { return putRollout(tx, rec) }
}
