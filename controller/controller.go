// Package controller decides which device installs what and when: it keeps the device registry,
// the rollouts and each device's job in the bbolt state file, answers device status and events,
// and serves firmware chunks to devices. It talks to devices only through a Publisher and reads
// firmware only through a Firmware source, both declared here, so the broker and the artifact
// store can be replaced without touching it.
package controller

import (
	"cmp"
	"context"
	"encoding/json"
	"errors"
	"fmt"
	"log/slog"
	"math/rand/v2"
	"slices"
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
	Now       func() time.Time // clock; default time.Now
	ChunkSize int              // largest chunk a device may ask for; default protocol.DefaultChunkSize
	Window    int              // outstanding requests per device; default protocol.DefaultWindow
	// OfferWorkers publish offers, so a device that stopped reading delays only its own offer.
	OfferWorkers int // default 4
}

func (o *Options) fill() error {
	if o.DB == nil || o.Publisher == nil || o.Firmware == nil {
		return errors.New("controller: DB, Publisher and Firmware are required")
	}
	if o.Logger == nil {
		o.Logger = slog.New(slog.DiscardHandler)
	}
	o.Logger = o.Logger.With("component", "controller")
	if o.Now == nil {
		o.Now = time.Now
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
	return nil
}

// Controller runs rollouts. Create it with New, then Start it.
type Controller struct {
	opts Options
	db   *bolt.DB
	log  *slog.Logger

	// mu serialises state transitions: read, decide, write to bbolt, then act.
	mu sync.Mutex
	// open holds the rollout that currently targets each model, as stored.
	open map[string]rolloutRecord
	// certModel is the model a device's certificate names, when it names one.
	certModel sync.Map // device id -> string

	transfers sync.Map // device id -> *transfer, read on every chunk request

	// waiting holds the devices whose offer waits for a patch, by base+target sha.
	waiting map[string]map[string]bool

	offers chan offerMsg
	wg     sync.WaitGroup
	closed atomic.Bool

	stats Stats
}

// Stats counts what the controller dropped or served.
type Stats struct {
	BadMessages  atomic.Uint64 // undecodable or invalid device messages
	StaleEvents  atomic.Uint64 // duplicate or late events ignored
	ChunksServed atomic.Uint64
	BytesServed  atomic.Uint64
	ChunkErrors  atomic.Uint64 // error frames sent
}

// transfer is what a device may currently download.
type transfer struct {
	job      string
	id       uint32
	sha      string
	size     int64
	chunkMax int
}

type offerMsg struct {
	device  string
	payload []byte
}

// New opens the controller's buckets in opts.DB.
func New(opts Options) (*Controller, error) {
	if err := opts.fill(); err != nil {
		return nil, err
	}
	c := &Controller{
		opts: opts, db: opts.DB, log: opts.Logger,
		open:    make(map[string]rolloutRecord),
		waiting: make(map[string]map[string]bool),
		offers:  make(chan offerMsg, 1024),
	}
	if err := c.db.Update(createBuckets); err != nil {
		return nil, fmt.Errorf("controller: %w", err)
	}
	if err := c.load(); err != nil {
		return nil, fmt.Errorf("controller: load state: %w", err)
	}
	return c, nil
}

// load rebuilds the in-memory indexes from the state file: open rollouts per model and the
// transfers of jobs in progress, so a restarted server serves chunks of jobs offered before.
func (c *Controller) load() error {
	return c.db.View(func(tx *bolt.Tx) error {
		err := tx.Bucket(bucketRollouts).ForEach(func(k, v []byte) error {
			var r rolloutRecord
			if err := json.Unmarshal(v, &r); err != nil {
				return fmt.Errorf("decode rollout %q: %w", k, err)
			}
			if r.State == RolloutActive || r.State == RolloutCompleted {
				c.open[r.Model] = r
			}
			return nil
		})
		if err != nil {
			return err
		}
		for _, r := range c.open {
			err := eachJob(tx, r.ID, func(j Job) error {
				if !Terminal(j.State) && j.State != JobPending {
					c.setTransfer(j)
				}
				return nil
			})
			if err != nil {
				return err
			}
		}
		return nil
	})
}

// Start starts the offer workers. It does not block.
func (c *Controller) Start() error {
	for range c.opts.OfferWorkers {
		c.wg.Add(1)
		go func() {
			defer c.wg.Done()
			for m := range c.offers {
				if err := c.opts.Publisher.Publish(protocol.Topic(m.device, protocol.SuffixJob), m.payload, 1); err != nil {
					c.log.Warn("publish offer", "device", m.device, "err", err)
				}
			}
		}()
	}
	return nil
}

// Close stops the offer workers after the offers already queued are published, or when ctx
// ends.
func (c *Controller) Close(ctx context.Context) error {
	if c.closed.Swap(true) {
		return nil
	}
	c.mu.Lock()
	close(c.offers)
	c.mu.Unlock()
	done := make(chan struct{})
	go func() { c.wg.Wait(); close(done) }()
	select {
	case <-done:
		return nil
	case <-ctx.Done():
		return fmt.Errorf("controller: close: %w", ctx.Err())
	}
}

// Stats returns the live counters.
func (c *Controller) Stats() *Stats { return &c.stats }

// DeviceConnected records that a device authenticated; model is from its certificate ("" when
// the certificate names none). The device's status message follows.
func (c *Controller) DeviceConnected(id, model string) {
	if model != "" {
		c.certModel.Store(id, model)
	}
}

// DeviceDisconnected marks a device offline.
func (c *Controller) DeviceDisconnected(id string) {
	c.mu.Lock()
	defer c.mu.Unlock()
	err := c.db.Update(func(tx *bolt.Tx) error {
		d, ok, err := getDevice(tx, id)
		if err != nil || !ok {
			return err
		}
		d.Online = false
		d.LastSeen = c.opts.Now()
		return putDevice(tx, d)
	})
	if err != nil {
		c.log.Error("mark device offline", "device", id, "err", err)
	}
}

// HandleMessage dispatches a device's publish on an upstream topic. It never panics on what a
// device sends: bad messages are counted and dropped.
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
	case protocol.SuffixRequest:
		var req protocol.ChunkRequest
		if err := json.Unmarshal(payload, &req); err != nil {
			c.bad(device, suffix, err)
			return
		}
		c.serveChunk(device, req)
	default:
		c.bad(device, suffix, errors.New("unknown topic"))
	}
}

func (c *Controller) bad(device, suffix string, err error) {
	c.stats.BadMessages.Add(1)
	c.log.Warn("device message refused", "device", device, "topic", suffix, "err", err)
}

// handleStatus registers the device, and offers it the open rollout of its model when it runs
// an older version; a device that comes back on the target version has installed it.
func (c *Controller) handleStatus(id string, st protocol.Status) error {
	if st.Model == "" {
		return fmt.Errorf("%w: status without model", ErrInvalid)
	}
	if _, err := protocol.ParseVersion(st.Version); err != nil {
		return fmt.Errorf("%w: status: %v", ErrInvalid, err)
	}
	if m, ok := c.certModel.Load(id); ok && m.(string) != st.Model {
		return fmt.Errorf("%w: status says model %q, certificate says %q", ErrInvalid, st.Model, m)
	}
	now := c.opts.Now()

	c.mu.Lock()
	defer c.mu.Unlock()
	var offer *protocol.Offer
	err := c.db.Update(func(tx *bolt.Tx) error {
		d, _, err := getDevice(tx, id)
		if err != nil {
			return err
		}
		d.ID, d.Model, d.Version, d.SHA256 = id, st.Model, st.Version, st.SHA256
		d.Online, d.LastSeen = true, now
		offer, err = c.reconcile(tx, &d, now)
		if err != nil {
			return err
		}
		return putDevice(tx, d)
	})
	if err != nil {
		return err
	}
	if offer != nil {
		c.sendOffer(id, *offer)
	}
	return nil
}

// reconcile brings a device's job in the open rollout of its model in line with the version
// the device runs. It returns the offer to send, if any. Called with mu held inside tx.
func (c *Controller) reconcile(tx *bolt.Tx, d *Device, now time.Time) (*protocol.Offer, error) {
	r, ok := c.open[d.Model]
	if !ok {
		return nil, nil
	}
	order, err := protocol.CompareVersions(d.Version, r.Version)
	if err != nil {
		return nil, err
	}
	j, exists, err := getJob(tx, r.ID, d.ID)
	if err != nil {
		return nil, err
	}
	switch {
	case exists && Terminal(j.State):
		return nil, nil
	case !exists && order >= 0:
		return nil, nil // already there, or beyond: not part of this rollout
	case !exists:
		j = c.newJob(r, d, now)
		if err := c.reopen(tx, &r, now); err != nil {
			return nil, err
		}
	}
	switch {
	case order == 0:
		c.finish(&j, JobInstalled, "", now)
		d.Job = ""
		if err := putJob(tx, j); err != nil {
			return nil, err
		}
		return nil, c.maybeComplete(tx, r.ID, now)
	case order > 0:
		c.finish(&j, JobFailed, "device runs newer version "+d.Version, now)
		d.Job = ""
		if err := putJob(tx, j); err != nil {
			return nil, err
		}
		return nil, c.maybeComplete(tx, r.ID, now)
	}
	if j.State == JobInstalling {
		// The device rebooted on its old version: the install did not take.
		c.finish(&j, JobFailed, protocol.ReasonInstall+": device came back on "+d.Version, now)
		d.Job = ""
		if err := putJob(tx, j); err != nil {
			return nil, err
		}
		return nil, c.maybeComplete(tx, r.ID, now)
	}
	m, err := c.opts.Firmware.Manifest(r.Model, r.Version)
	if err != nil {
		return nil, fmt.Errorf("manifest for rollout %s: %w", r.ID, err)
	}
	offered, ok := c.chooseArtifact(d, &j, m)
	if !ok {
		// The patch for this device is being made; it is offered when ready.
		j.Updated = now
		d.Job = j.ID
		return nil, putJob(tx, j)
	}
	if j.State == JobPending {
		j.State = JobOffered
	}
	j.Updated = now
	d.Job = j.ID
	if err := putJob(tx, j); err != nil {
		return nil, err
	}
	c.setTransfer(j)
	return &protocol.Offer{
		V: protocol.ProtocolVersion, Job: j.ID, Transfer: j.Transfer, Manifest: offered,
		Size: j.Size, ChunkSize: c.opts.ChunkSize, Window: c.opts.Window,
	}, nil
}

// chooseArtifact decides what a job streams: a verified patch from the image the device runs
// when one is ready and small enough, else the full image. It returns ok false while a patch
// is being made. A job keeps its choice once offered, so a device that reconnects resumes the
// same transfer.
func (c *Controller) chooseArtifact(d *Device, j *Job, full protocol.Manifest) (protocol.Manifest, bool) {
	useFull := func() (protocol.Manifest, bool) {
		j.Delta, j.Artifact, j.Size = false, full.SHA256, full.Size
		return full, true
	}
	if j.Artifact == full.SHA256 || c.opts.Deltas == nil || d.SHA256 == "" {
		return useFull()
	}
	m, ready, err := c.opts.Deltas.Delta(d.SHA256, full)
	switch {
	case err != nil:
		c.log.Debug("full image", "device", d.ID, "reason", err)
		return useFull()
	case !ready:
		key := d.SHA256 + ":" + full.SHA256
		if c.waiting[key] == nil {
			c.waiting[key] = make(map[string]bool)
		}
		c.waiting[key][d.ID] = true
		return protocol.Manifest{}, false
	}
	j.Delta, j.Artifact, j.Size = true, m.Delta.PatchSHA256, m.Delta.PatchSize
	return m, true
}

// DeltaReady is called when the verdict on the patch from base to target is in: the devices
// waiting for it are offered the patch, or the full image.
func (c *Controller) DeltaReady(base, target string) {
	c.mu.Lock()
	defer c.mu.Unlock()
	key := base + ":" + target
	devices := c.waiting[key]
	delete(c.waiting, key)
	for id := range devices {
		var offer *protocol.Offer
		err := c.db.Update(func(tx *bolt.Tx) error {
			d, ok, err := getDevice(tx, id)
			if err != nil || !ok || !d.Online {
				return err
			}
			if offer, err = c.reconcile(tx, &d, c.opts.Now()); err != nil {
				return err
			}
			return putDevice(tx, d)
		})
		if err != nil {
			c.log.Error("offer after delta", "device", id, "err", err)
			continue
		}
		if offer != nil {
			c.sendOffer(id, *offer)
		}
	}
}

func (c *Controller) newJob(r rolloutRecord, d *Device, now time.Time) Job {
	return Job{
		ID: jobID(r.ID, 1), Rollout: r.ID, Device: d.ID, From: d.Version, To: r.Version,
		State: JobPending, Transfer: rand.Uint32(), Created: now, Updated: now,
	}
}

// reopen marks a completed rollout active again when a late device joins it.
func (c *Controller) reopen(tx *bolt.Tx, r *rolloutRecord, now time.Time) error {
	if r.State == RolloutActive {
		return nil
	}
	r.State, r.Updated = RolloutActive, now
	c.open[r.Model] = *r
	return putRollout(tx, *r)
}

func (c *Controller) finish(j *Job, state, reason string, now time.Time) {
	j.State, j.Reason, j.Finished, j.Updated = state, reason, now, now
	c.transfers.Delete(j.Device)
}

// maybeComplete marks a rollout completed once none of its jobs is left unfinished.
func (c *Controller) maybeComplete(tx *bolt.Tx, rollout string, now time.Time) error {
	r, ok, err := getRollout(tx, rollout)
	if err != nil || !ok || r.State != RolloutActive {
		return err
	}
	unfinished := false
	err = eachJob(tx, rollout, func(j Job) error {
		if !Terminal(j.State) {
			unfinished = true
		}
		return nil
	})
	if err != nil || unfinished {
		return err
	}
	r.State, r.Updated = RolloutCompleted, now
	c.open[r.Model] = r
	return putRollout(tx, r)
}

func (c *Controller) setTransfer(j Job) {
	c.transfers.Store(j.Device, &transfer{
		job: j.ID, id: j.Transfer, sha: j.Artifact, size: j.Size, chunkMax: c.opts.ChunkSize,
	})
}

func (c *Controller) sendOffer(device string, o protocol.Offer) {
	payload, err := json.Marshal(o)
	if err != nil {
		c.log.Error("encode offer", "device", device, "err", err)
		return
	}
	if c.closed.Load() {
		return
	}
	// Called with mu held; Close takes mu before closing the channel.
	select {
	case c.offers <- offerMsg{device, payload}:
	default:
		// The queue is full of offers to slow devices; this device gets the offer again
		// when it next reports its status.
		c.log.Warn("offer queue full, offer deferred", "device", device)
	}
}

// handleEvent applies a device's report about its job. Duplicates and events about other jobs
// are ignored; a job that finished stays finished.
func (c *Controller) handleEvent(id string, ev protocol.Event) error {
	switch ev.State {
	case protocol.StateDownloading, protocol.StateVerifying, protocol.StateInstalling,
		protocol.StateInstalled, protocol.StateFailed:
	default:
		return fmt.Errorf("%w: event state %q", ErrInvalid, ev.State)
	}
	now := c.opts.Now()
	c.mu.Lock()
	defer c.mu.Unlock()
	return c.db.Update(func(tx *bolt.Tx) error {
		d, ok, err := getDevice(tx, id)
		if err != nil {
			return err
		}
		if !ok || d.Job == "" || d.Job != ev.Job {
			c.stats.StaleEvents.Add(1)
			return nil
		}
		r, ok := c.open[d.Model]
		if !ok {
			c.stats.StaleEvents.Add(1)
			return nil
		}
		j, ok, err := getJob(tx, r.ID, id)
		if err != nil {
			return err
		}
		if !ok || j.ID != ev.Job || Terminal(j.State) || ev.Seq <= j.Seq {
			c.stats.StaleEvents.Add(1)
			return nil
		}
		j.Seq, j.Updated = ev.Seq, now
		if ev.Bytes > j.Bytes {
			j.Bytes = min(ev.Bytes, j.Size)
		}
		switch ev.State {
		case protocol.StateDownloading:
			if j.Started.IsZero() {
				j.Started = now
			}
			j.State = JobDownloading
		case protocol.StateVerifying, protocol.StateInstalling:
			j.State = ev.State
		case protocol.StateFailed:
			c.finish(&j, JobFailed, cmp.Or(ev.Reason, "unspecified"), now)
		case protocol.StateInstalled:
			if ev.Version != j.To {
				c.finish(&j, JobFailed, fmt.Sprintf("%s: device reports %q installed, want %q", protocol.ReasonInstall, ev.Version, j.To), now)
			} else {
				c.finish(&j, JobInstalled, "", now)
				d.Version = ev.Version
			}
		}
		if Terminal(j.State) {
			d.Job = ""
			if err := putDevice(tx, d); err != nil {
				return err
			}
		}
		if err := putJob(tx, j); err != nil {
			return err
		}
		if Terminal(j.State) {
			return c.maybeComplete(tx, r.ID, now)
		}
		return nil
	})
}

// CreateRollout starts offering a firmware to every device of its model that runs an older
// version. Devices online now are offered at once; the others when they next connect.
func (c *Controller) CreateRollout(ctx context.Context, spec RolloutSpec) (Rollout, error) {
	if err := ctx.Err(); err != nil {
		return Rollout{}, err
	}
	v, err := protocol.ParseVersion(spec.Version)
	if err != nil {
		return Rollout{}, fmt.Errorf("%w: %v", ErrInvalid, err)
	}
	spec.Version = v.String()
	m, err := c.opts.Firmware.Manifest(spec.Model, spec.Version)
	if err != nil {
		return Rollout{}, fmt.Errorf("firmware %s %s: %w", spec.Model, spec.Version, err)
	}
	now := c.opts.Now()

	c.mu.Lock()
	defer c.mu.Unlock()
	type pendingOffer struct {
		device string
		offer  protocol.Offer
	}
	var offers []pendingOffer
	var out rolloutRecord
	err = c.db.Update(func(tx *bolt.Tx) error {
		if prev, ok := c.open[spec.Model]; ok {
			if prev.State == RolloutActive {
				return fmt.Errorf("%w: rollout %s of %s %s is still active", ErrConflict, prev.ID, prev.Model, prev.Version)
			}
			prev.State, prev.Updated = RolloutSuperseded, now
			if err := putRollout(tx, prev); err != nil {
				return err
			}
		}
		b := tx.Bucket(bucketRollouts)
		seq, err := b.NextSequence()
		if err != nil {
			return err
		}
		out = rolloutRecord{Seq: seq, Rollout: Rollout{
			ID: rolloutID(seq), Model: spec.Model, Version: spec.Version, SHA256: m.SHA256,
			Size: m.Size, State: RolloutActive, Created: now, Updated: now,
		}}
		if err := putRollout(tx, out); err != nil {
			return err
		}
		c.open[spec.Model] = out
		var devices []Device
		err = tx.Bucket(bucketDevices).ForEach(func(k, v []byte) error {
			var d Device
			if err := json.Unmarshal(v, &d); err != nil {
				return fmt.Errorf("decode device %q: %w", k, err)
			}
			if d.Model == spec.Model {
				devices = append(devices, d)
			}
			return nil
		})
		if err != nil {
			return err
		}
		for _, d := range devices {
			if order, err := protocol.CompareVersions(d.Version, spec.Version); err != nil || order >= 0 {
				continue
			}
			if !d.Online {
				j := c.newJob(out, &d, now)
				if err := putJob(tx, j); err != nil {
					return err
				}
				if c.opts.Deltas != nil && d.SHA256 != "" {
					// Start making its patch now, so it is ready when the device connects.
					c.opts.Deltas.Delta(d.SHA256, m)
				}
				continue
			}
			o, err := c.reconcile(tx, &d, now)
			if err != nil {
				return err
			}
			if err := putDevice(tx, d); err != nil {
				return err
			}
			if o != nil {
				offers = append(offers, pendingOffer{d.ID, *o})
			}
		}
		return nil
	})
	if err != nil {
		// The transaction rolled back; so must the index.
		if reloadErr := c.reloadOpen(); reloadErr != nil {
			c.log.Error("reload rollouts", "err", reloadErr)
		}
		return Rollout{}, err
	}
	for _, p := range offers {
		c.sendOffer(p.device, p.offer)
	}
	c.log.Info("rollout created", "rollout", out.ID, "model", out.Model, "version", out.Version, "offered", len(offers))
	return c.withCounts(out.Rollout)
}

func (c *Controller) reloadOpen() error {
	c.open = make(map[string]rolloutRecord)
	return c.db.View(func(tx *bolt.Tx) error {
		return tx.Bucket(bucketRollouts).ForEach(func(k, v []byte) error {
			var r rolloutRecord
			if err := json.Unmarshal(v, &r); err != nil {
				return err
			}
			if r.State == RolloutActive || r.State == RolloutCompleted {
				c.open[r.Model] = r
			}
			return nil
		})
	})
}

func (c *Controller) withCounts(r Rollout) (Rollout, error) {
	err := c.db.View(func(tx *bolt.Tx) error {
		var err error
		r.Counts, err = counts(tx, r.ID)
		return err
	})
	return r, err
}

// ListRollouts returns every rollout, newest first, with counts per job state.
func (c *Controller) ListRollouts() ([]Rollout, error) {
	var out []rolloutRecord
	err := c.db.View(func(tx *bolt.Tx) error {
		return tx.Bucket(bucketRollouts).ForEach(func(k, v []byte) error {
			var r rolloutRecord
			if err := json.Unmarshal(v, &r); err != nil {
				return fmt.Errorf("decode rollout %q: %w", k, err)
			}
			r.Counts, _ = counts(tx, r.ID)
			out = append(out, r)
			return nil
		})
	})
	if err != nil {
		return nil, err
	}
	slices.SortFunc(out, func(a, b rolloutRecord) int { return cmp.Compare(b.Seq, a.Seq) })
	rs := make([]Rollout, len(out))
	for i, r := range out {
		rs[i] = r.Rollout
	}
	return rs, nil
}

// GetRollout returns a rollout and its jobs.
func (c *Controller) GetRollout(id string) (RolloutDetail, error) {
	var out RolloutDetail
	err := c.db.View(func(tx *bolt.Tx) error {
		r, ok, err := getRollout(tx, id)
		if err != nil {
			return err
		}
		if !ok {
			return fmt.Errorf("rollout %q: %w", id, ErrNotFound)
		}
		out.Rollout = r.Rollout
		out.Counts = make(map[string]int)
		out.Jobs = []Job{}
		return eachJob(tx, id, func(j Job) error {
			out.Counts[j.State]++
			out.Jobs = append(out.Jobs, j)
			return nil
		})
	})
	return out, err
}

// ListDevices returns every registered device, sorted by id.
func (c *Controller) ListDevices() ([]Device, error) {
	out := []Device{}
	err := c.db.View(func(tx *bolt.Tx) error {
		return tx.Bucket(bucketDevices).ForEach(func(k, v []byte) error {
			var d Device
			if err := json.Unmarshal(v, &d); err != nil {
				return fmt.Errorf("decode device %q: %w", k, err)
			}
			out = append(out, d)
			return nil
		})
	})
	return out, err
}

// GetDevice returns one registered device.
func (c *Controller) GetDevice(id string) (Device, error) {
	var d Device
	err := c.db.View(func(tx *bolt.Tx) error {
		var ok bool
		var err error
		d, ok, err = getDevice(tx, id)
		if err == nil && !ok {
			err = fmt.Errorf("device %q: %w", id, ErrNotFound)
		}
		return err
	})
	return d, err
}

// InUse reports whether an unfinished rollout needs the firmware (model, version).
func (c *Controller) InUse(model, version string) bool {
	c.mu.Lock()
	defer c.mu.Unlock()
	r, ok := c.open[model]
	return ok && r.State == RolloutActive && r.Version == version
}
