package controller

import (
	"cmp"
	"encoding/json"
	"fmt"
	"hash/fnv"
	"math"
	"slices"
	"sync/atomic"
	"time"

	"github.com/fota-dev/fota/protocol"
	bolt "go.etcd.io/bbolt"
)

// The in-memory index. The state file is the truth; the index is what the controller needs
// at hand to decide quickly: every registered device, the job of each device in the open
// rollout of its model while that job is not finished, and per rollout and wave the number
// of devices in each state. It is rebuilt from the state file when the controller starts.

// stateIdx numbers the job states for the count arrays.
var stateIdx = func() map[string]int {
	if len(JobStates) != nStates {
		panic("controller: nStates does not match JobStates")
	}
	m := make(map[string]int, len(JobStates))
	for i, s := range JobStates {
		m[s] = i
	}
	return m
}()

const nStates = 11 // len(JobStates)

// devState is one registered device.
type devState struct {
	d   Device
	pos uint64 // stable hash position: percent selection and wave order
	// job is the device's unfinished job in the open rollout of its model; done is the state
	// of its finished one. Finished jobs are not kept in memory: a million installed devices
	// would cost hundreds of megabytes for nothing.
	job  *Job
	done string
	// wave is the device's wave in the open rollout of its model, -1 when not part of it.
	wave int
	// queued: in the rollout's offer queue. reserved: holds a concurrency slot before its
	// offer is out (jitter delay, patch being made).
	queued, reserved bool
	// revoked: the device's certificate is revoked; no rollout selects it again.
	revoked bool
	// logJob and logN count the entries the device's current job wrote to the rollout's
	// event log, to bound its share (see admitLog).
	logJob string
	logN   int
}

func (ds *devState) hasJob() bool { return ds.job != nil || ds.done != "" }

// position hashes a device id to its place in the fleet's order. The order does not depend
// on the rollout, so the first wave of every rollout holds the same devices: canaries are
// predictable, and a percentage means the same devices each time.
func position(id string) uint64 {
	h := fnv.New64a()
	h.Write([]byte(id))
	x := h.Sum64()
	// splitmix64 finaliser: FNV's high bits are poorly mixed for short similar ids.
	x ^= x >> 30
	x *= 0xbf58476d1ce4e5b9
	x ^= x >> 27
	x *= 0x94d049bb133111eb
	x ^= x >> 31
	return x
}

// percentLimit is the exclusive upper bound of positions selected by a percentage.
func percentLimit(p int) uint64 {
	if p >= 100 {
		return math.MaxUint64
	}
	return uint64(p) * (math.MaxUint64 / 100)
}

// waveState counts the devices of one wave by job state.
type waveState struct {
	members int
	counts  [nStates]int
}

// excused counts the wave's devices that went away (revoked, unreachable).
func (w *waveState) excused() int {
	n := 0
	for i, s := range JobStates {
		if Excused(s) {
			n += w.counts[i]
		}
	}
	return n
}

func (w *waveState) finished() (failed, finished int) {
	f := w.counts[stateIdx[JobFailed]]
	return f, f + w.counts[stateIdx[JobInstalled]]
}

// rollout is an open rollout: scheduled, active, paused, canceling or completed.
type rollout struct {
	rec      rolloutRecord
	win      *window
	ids      map[string]bool
	limit    uint64
	older    map[string]bool // device version -> older than the target
	manifest *protocol.Manifest
	waves    []waveState
	// queue holds devices that may be offered once there is a slot; entries are checked
	// again when taken.
	queue    []*devState
	inflight int                    // jobs holding a slot
	active   map[*devState]struct{} // jobs in an in-flight state, watched for timeouts
	retry    map[*devState]struct{} // timed-out jobs waiting for their next offer
	jitter   map[*devState]time.Time
	logSeq   uint64
	// paused is read by the chunk server: transfers answer "busy" while a window with
	// window end "pause" is closed.
	paused   atomic.Bool
	winOpen  bool
	winSince time.Time
	swept    time.Time // last sweepGone
}

func newRollout(rec rolloutRecord) (*rollout, error) {
	r := &rollout{
		rec:    rec,
		limit:  percentLimit(rec.Spec.Percent),
		older:  make(map[string]bool),
		waves:  make([]waveState, len(rec.Spec.Waves)),
		active: make(map[*devState]struct{}),
		retry:  make(map[*devState]struct{}),
		jitter: make(map[*devState]time.Time),
	}
	if len(rec.Spec.Devices) > 0 {
		r.ids = make(map[string]bool, len(rec.Spec.Devices))
		for _, id := range rec.Spec.Devices {
			r.ids[id] = true
		}
	}
	if rec.Spec.Window != "" {
		w, err := parseWindow(rec.Spec.Window, rec.Spec.TZ, rec.Spec.WindowDuration.D())
		if err != nil {
			return nil, err
		}
		r.win = w
	}
	return r, nil
}

// empty reports whether no device is part of the rollout: nothing would be lost if a newer
// rollout of the model superseded it.
func (r *rollout) empty() bool {
	members, _ := r.totals()
	return members == 0
}

// matches reports whether the spec's selection picks d, whatever its version.
func (r *rollout) matches(ds *devState) bool {
	if ds.pos >= r.limit {
		return false
	}
	if r.ids != nil && !r.ids[ds.d.ID] {
		return false
	}
	for k, v := range r.rec.Spec.Tags {
		if ds.d.Tags[k] != v {
			return false
		}
	}
	return true
}

// olderThanTarget caches version comparisons: a fleet runs few distinct versions.
func (r *rollout) olderThanTarget(v string) bool {
	o, ok := r.older[v]
	if !ok {
		if len(r.older) >= internMin {
			// Versions are what devices report: the cache must not grow with them.
			clear(r.older)
		}
		c, err := protocol.CompareVersions(v, r.rec.Version)
		o = err == nil && c < 0
		r.older[v] = o
	}
	return o
}

// member reports whether ds is part of the rollout: it has a job in it, or it is selected
// and runs an older version.
func (r *rollout) member(ds *devState) bool {
	if ds.d.Model != r.rec.Model {
		return false
	}
	if ds.hasJob() {
		return true
	}
	return !ds.revoked && ds.d.Version != "" && r.matches(ds) && r.olderThanTarget(ds.d.Version)
}

// waveOf returns the wave of a hash position.
func (r *rollout) waveOf(pos uint64) int {
	for i, b := range r.rec.Bounds {
		if pos < b {
			return i
		}
	}
	return len(r.waves) - 1
}

// stateOf is the state ds is counted in.
func (r *rollout) stateOf(ds *devState) string {
	switch {
	case ds.job != nil:
		return ds.job.State
	case ds.done != "":
		return ds.done
	case r.rec.State == RolloutCanceling || r.rec.State == RolloutCanceled:
		return JobCanceled
	}
	return JobPending
}

// holdsSlot reports whether ds counts against max-concurrent.
func holdsSlot(ds *devState) bool {
	return ds.reserved || ds.job != nil && InFlight(ds.job.State)
}

// count adds ds to the rollout's counts if it is a member. Every change to what count looks
// at is bracketed by uncount and count (see Controller.change).
func (r *rollout) count(ds *devState) {
	if !r.member(ds) {
		ds.wave = -1
		return
	}
	if ds.job != nil {
		ds.wave = ds.job.Wave
	} else {
		ds.wave = r.waveOf(ds.pos)
	}
	w := &r.waves[ds.wave]
	w.members++
	w.counts[stateIdx[r.stateOf(ds)]]++
	if holdsSlot(ds) {
		r.inflight++
	}
	if ds.job != nil {
		switch {
		case InFlight(ds.job.State):
			r.active[ds] = struct{}{}
		case ds.job.State == JobTimedOut:
			r.retry[ds] = struct{}{}
		}
	}
}

func (r *rollout) uncount(ds *devState) {
	if ds.wave < 0 {
		return
	}
	w := &r.waves[ds.wave]
	w.members--
	w.counts[stateIdx[r.stateOf(ds)]]--
	if holdsSlot(ds) {
		r.inflight--
	}
	delete(r.active, ds)
	delete(r.retry, ds)
	ds.wave = -1
}

// totals sums the waves.
func (r *rollout) totals() (members int, counts [nStates]int) {
	for i := range r.waves {
		members += r.waves[i].members
		for s, n := range r.waves[i].counts {
			counts[s] += n
		}
	}
	return members, counts
}

func countsMap(c [nStates]int) map[string]int {
	m := make(map[string]int)
	for i, n := range c {
		if n > 0 {
			m[JobStates[i]] = n
		}
	}
	return m
}

// planBounds fixes the waves' position bounds so that each wave holds its share of the
// devices selected now, rounded up. Devices that join later fall in by position. With no
// device selected yet, the bounds split the selected range evenly.
func planBounds(positions []uint64, waves []int, limit uint64) []uint64 {
	bounds := make([]uint64, len(waves))
	n := len(positions)
	if n > 0 {
		slices.Sort(positions)
	}
	for i, pct := range waves {
		switch {
		case pct >= 100:
			bounds[i] = math.MaxUint64
		case n == 0:
			bounds[i] = uint64(float64(limit) / 100 * float64(pct))
		default:
			k := (n*pct + 99) / 100 // devices in waves up to i
			if k >= n {
				bounds[i] = math.MaxUint64
			} else {
				bounds[i] = positions[k]
			}
		}
	}
	return bounds
}

// load rebuilds the index from the state file.
func (c *Controller) load() error {
	return c.db.View(func(tx *bolt.Tx) error {
		err := tx.Bucket(bucketRollouts).ForEach(func(k, v []byte) error {
			var rec rolloutRecord
			if err := json.Unmarshal(v, &rec); err != nil {
				return fmt.Errorf("decode rollout %q: %w", k, err)
			}
			c.nextSeq = max(c.nextSeq, rec.Seq)
			c.rollouts[rec.ID] = &rec
			if !openState(rec.State) {
				return nil
			}
			r, err := newRollout(rec)
			if err != nil {
				return fmt.Errorf("rollout %s: %w", rec.ID, err)
			}
			r.logSeq = lastEventSeq(tx, rec.ID)
			if prev := c.open[rec.Model]; prev != nil {
				// Only one rollout per model is open; a file that says otherwise keeps the newer.
				if prev.rec.Seq > rec.Seq {
					return nil
				}
			}
			c.open[rec.Model] = r
			c.rollouts[rec.ID] = &r.rec
			return nil
		})
		if err != nil {
			return err
		}
		err = tx.Bucket(bucketDevices).ForEach(func(k, v []byte) error {
			ds := &devState{wave: -1}
			if err := json.Unmarshal(v, &ds.d); err != nil {
				return fmt.Errorf("decode device %q: %w", k, err)
			}
			ds.d.Model = c.intern(ds.d.Model)
			ds.d.Version = c.intern(ds.d.Version)
			ds.d.SHA256 = c.intern(ds.d.SHA256)
			// Nobody is connected to a controller that just started.
			ds.d.Online = false
			ds.pos = position(ds.d.ID)
			c.addDevice(ds)
			return nil
		})
		if err != nil {
			return err
		}
		for _, r := range c.open {
			err := eachJob(tx, r.rec.ID, "", func(j Job) (bool, error) {
				ds := c.devs[j.Device]
				if ds == nil {
					return true, nil
				}
				if Terminal(j.State) {
					ds.done = j.State
				} else {
					jj := j
					ds.job = &jj
					if InFlight(j.State) || j.State == JobPending && !j.Offered.IsZero() {
						c.setTransfer(r, &jj)
					}
				}
				return true, nil
			})
			if err != nil {
				return err
			}
		}
		for _, ds := range c.devList {
			if r := c.open[ds.d.Model]; r != nil {
				r.count(ds)
			}
		}
		return nil
	})
}

// openState reports whether a rollout in state s is indexed in memory.
func openState(s string) bool {
	switch s {
	case RolloutScheduled, RolloutActive, RolloutPaused, RolloutCanceling, RolloutCompleted:
		return true
	}
	return false
}

// internMin is the size the intern table may grow to before it is rebuilt from the strings
// devices hold now.
const internMin = 4096

// intern shares the strings that many devices hold (model, version, image hash). The strings
// come from devices, so the table is bounded: when full, it is rebuilt from what the registry
// still refers to, and may then grow to twice that (or internMin), so a rebuild costs a scan
// of the registry only after as many new strings as it keeps.
func (c *Controller) intern(s string) string {
	if s == "" {
		return ""
	}
	if v, ok := c.strs[s]; ok {
		return v
	}
	if len(c.strs) >= max(internMin, c.strsMax) {
		live := make(map[string]string)
		for _, ds := range c.devList {
			for _, v := range [...]string{ds.d.Model, ds.d.Version, ds.d.SHA256} {
				if v != "" {
					live[v] = v
				}
			}
		}
		c.strs, c.strsMax = live, 2*len(live)
	}
	c.strs[s] = s
	return s
}

// sortQueue orders a queue by wave, then position: the fleet's order.
func sortQueue(q []*devState) {
	slices.SortFunc(q, func(a, b *devState) int {
		return cmp.Or(cmp.Compare(a.wave, b.wave), cmp.Compare(a.pos, b.pos))
	})
}
