package controller

import (
	"cmp"
	"context"
	"encoding/json"
	"fmt"
	"maps"
	"math"
	"math/rand/v2"
	"slices"
	"time"

	"github.com/fota-dev/fota/protocol"
	bolt "go.etcd.io/bbolt"
)

// CreateRollout plans a rollout: it selects the devices, fixes the waves, stores the rollout,
// and starts its first wave when the start time and the window allow. Devices are offered
// the update as slots free up; offline ones when they next connect. Planning writes no job:
// a device's job is created when it is first offered, so planning over a million devices is
// a scan of the in-memory registry and one small transaction.
func (c *Controller) CreateRollout(ctx context.Context, spec RolloutSpec) (Rollout, error) {
	if err := ctx.Err(); err != nil {
		return Rollout{}, err
	}
	if err := spec.normalize(); err != nil {
		return Rollout{}, err
	}
	c.creating.RLock()
	defer c.creating.RUnlock()
	m, err := c.opts.Firmware.Manifest(spec.Model, spec.Version)
	if err != nil {
		return Rollout{}, fmt.Errorf("firmware %s %s: %w", spec.Model, spec.Version, err)
	}
	now := c.clock.Now()
	if err := manifestFresh(m, spec, now); err != nil {
		return Rollout{}, err
	}
	var out Rollout
	shas := make(map[string]bool)
	err = c.txn(func(p *pending, cm *commit) error {
		prev := c.open[spec.Model]
		if prev != nil && prev.rec.State != RolloutCompleted && !prev.empty() {
			return fmt.Errorf("%w: rollout %s of %s %s is still %s", ErrConflict, prev.rec.ID, prev.rec.Model, prev.rec.Version, prev.rec.State)
		}
		seq := c.nextSeq + 1
		rec := rolloutRecord{
			ID: rolloutID(seq), Seq: seq, Model: spec.Model, Version: spec.Version, SHA256: m.SHA256, Size: m.Size,
			State: RolloutActive, Spec: spec, Created: now, Updated: now,
			WaveStarted: make([]time.Time, len(spec.Waves)), WaveGateMet: make([]time.Time, len(spec.Waves)),
		}
		if spec.Start.After(now) {
			rec.State = RolloutScheduled
		}
		r, err := newRollout(rec)
		if err != nil {
			return err
		}
		var positions []uint64
		for _, ds := range c.devList {
			if ds.d.Model == spec.Model && !ds.revoked && c.opts.Revoked(ds.d.ID) {
				// Revoked while the server was down, or before it ever saw the revocation.
				c.change(ds, func() { ds.revoked = true })
			}
			if ds.d.Model == spec.Model && !ds.revoked && ds.d.Version != "" && r.matches(ds) && r.olderThanTarget(ds.d.Version) {
				positions = append(positions, ds.pos)
				if ds.d.SHA256 != "" {
					shas[ds.d.SHA256] = true
				}
			}
		}
		r.rec.Bounds = planBounds(positions, spec.Waves, r.limit)
		c.nextSeq = seq
		if prev != nil {
			c.closeRollout(p, prev, RolloutSuperseded, "superseded by "+rec.ID, now)
		}
		r.manifest = &m
		c.open[spec.Model] = r
		c.rollouts[rec.ID] = &r.rec
		for _, ds := range c.devList {
			if ds.d.Model == spec.Model {
				r.count(ds)
			}
		}
		if r.win != nil {
			r.winOpen, _ = c.windowSession(r, now)
			r.winSince = now
			r.paused.Store(spec.WindowEnd == WindowEndPause && !r.winOpen)
		}
		p.add(putRolloutFn(r.rec))
		c.logEvent(p, r, Event{Time: now, To: r.rec.State, Reason: fmt.Sprintf("created: %s %s for %d devices", r.rec.Model, r.rec.Version, len(positions))}, now)
		c.afterChange(r, now, p, cm)
		out = c.view(r, now)
		return nil
	})
	if err != nil {
		return Rollout{}, err
	}
	if c.opts.Deltas != nil {
		// Start making the patches now, so they are ready when the devices are offered.
		for sha := range shas {
			c.opts.Deltas.Delta(sha, m)
		}
	}
	c.log.Info("rollout created", "rollout", out.ID, "model", out.Model, "version", out.Version, "devices", out.Devices)
	return out, nil
}

// closeRollout ends an open rollout for good (superseded or canceled): its counts are frozen
// in its record and its model's devices leave it.
func (c *Controller) closeRollout(p *pending, r *rollout, state, reason string, now time.Time) {
	members, counts := r.totals()
	r.rec.FinalTotal = members
	r.rec.Final = countsMap(counts)
	r.rec.FinalWaves = make([]map[string]int, len(r.waves))
	for i := range r.waves {
		r.rec.FinalWaves[i] = countsMap(r.waves[i].counts)
	}
	c.setRolloutState(p, r, state, reason, now)
	delete(c.open, r.rec.Model)
	for _, ds := range c.devList {
		if ds.d.Model != r.rec.Model {
			continue
		}
		if ds.job != nil {
			c.transfers.Delete(ds.d.ID)
		}
		ds.job, ds.done, ds.wave, ds.queued, ds.reserved = nil, "", -1, false, false
	}
	r.queue = nil
}

// setRolloutState moves a rollout to state and logs why.
func (c *Controller) setRolloutState(p *pending, r *rollout, state, reason string, now time.Time) {
	from := r.rec.State
	if from == state {
		return
	}
	recount := state == RolloutCanceling || from == RolloutCanceling
	if recount {
		c.eachMember(r, r.uncount)
	}
	r.rec.State, r.rec.Reason, r.rec.Updated = state, reason, now
	if recount {
		c.eachDevice(r, r.count)
	}
	p.add(putRolloutFn(r.rec))
	c.logEvent(p, r, Event{Time: now, From: from, To: state, Reason: reason}, now)
	c.log.Info("rollout "+state, "rollout", r.rec.ID, "reason", reason)
}

func (c *Controller) eachDevice(r *rollout, fn func(*devState)) {
	for _, ds := range c.devList {
		if ds.d.Model == r.rec.Model {
			fn(ds)
		}
	}
}

func (c *Controller) eachMember(r *rollout, fn func(*devState)) {
	for _, ds := range c.devList {
		if ds.wave >= 0 && ds.d.Model == r.rec.Model {
			fn(ds)
		}
	}
}

// afterChange runs the rules that a transition may have made true: the next wave's start,
// completion, and offers to fill free slots.
func (c *Controller) afterChange(r *rollout, now time.Time, p *pending, cm *commit) {
	if c.open[r.rec.Model] != r {
		return
	}
	c.stopIfExpired(r, now, p)
	c.maybeAdvance(r, now, p)
	c.maybeComplete(r, now, p)
	if c.open[r.rec.Model] == r {
		c.fill(r, now, p, cm)
	}
}

// jobSpan is how long one job may take when each phase runs to its timeout: the manifest
// offered must stay valid that long, or the device may refuse it halfway.
func jobSpan(s RolloutSpec) time.Duration {
	return s.TimeoutOffered.D() + s.TimeoutDownloading.D() + s.TimeoutInstalling.D()
}

// manifestFresh returns ErrExpired when m has expired at now, or expires before a job offered
// now could finish under the spec's timeouts.
func manifestFresh(m protocol.Manifest, s RolloutSpec, now time.Time) error {
	exp, err := m.ExpiresAt()
	if err != nil {
		return fmt.Errorf("%w: %s %s: %v", ErrExpired, m.Model, m.Version, err)
	}
	switch {
	case exp.IsZero():
		return nil
	case !now.Before(exp):
		return fmt.Errorf("%w: %s %s expired at %s; add it again with a later --expires", ErrExpired, m.Model, m.Version, m.Expires)
	case now.Add(jobSpan(s)).After(exp):
		return fmt.Errorf("%w: %s %s expires at %s, before a job offered now could finish (its phase timeouts add up to %v); add it again with a later --expires",
			ErrExpired, m.Model, m.Version, m.Expires, jobSpan(s))
	}
	return nil
}

// stopIfExpired pauses an active rollout whose release can no longer be offered: devices
// refuse an expired manifest, so every offer would be a failure charged to the device.
// Devices already at work finish or time out as usual.
func (c *Controller) stopIfExpired(r *rollout, now time.Time, p *pending) {
	if r.rec.State != RolloutActive {
		return
	}
	m, err := c.manifest(r)
	if err != nil {
		return
	}
	if err := manifestFresh(m, r.rec.Spec, now); err != nil {
		c.setRolloutState(p, r, RolloutPaused, err.Error(), now)
	}
}

// windowSession reports whether r's window is open at now, and the start of the open stretch.
func (c *Controller) windowSession(r *rollout, now time.Time) (bool, time.Time) {
	if r.win == nil {
		return true, time.Time{}
	}
	floor := r.rec.Created
	if r.rec.Spec.Start.After(floor) {
		floor = r.rec.Spec.Start
	}
	return r.win.session(now, floor.Add(-r.win.dur))
}

// accepting reports whether r may make new offers now.
func (c *Controller) accepting(r *rollout, now time.Time) bool {
	if r.rec.State != RolloutActive || r.rec.WavesStarted == 0 {
		return false
	}
	open, _ := c.windowSession(r, now)
	return open
}

// gateMet reports whether wave w has the share of its devices installed that the gate asks.
func (r *rollout) gateMet(w int) bool {
	ws := &r.waves[w]
	// Devices that went away cannot install; the gate judges the ones that can.
	need := int(math.Ceil(r.rec.Spec.Gate / 100 * float64(ws.members-ws.excused())))
	return ws.counts[stateIdx[JobInstalled]] >= need
}

// maybeAdvance starts the next waves whose turn it is: the wave before met its gate and
// soaked, the start time passed, and, with a window, the window is open and has not started
// a wave yet.
func (c *Controller) maybeAdvance(r *rollout, now time.Time, p *pending) {
	for r.rec.State == RolloutActive && !now.Before(r.rec.Spec.Start) {
		n := r.rec.WavesStarted
		if n > 0 {
			w := n - 1
			if !r.gateMet(w) {
				return
			}
			if r.rec.WaveGateMet[w].IsZero() {
				r.rec.WaveGateMet[w] = now
				p.add(putRolloutFn(r.rec))
				c.logEvent(p, r, Event{Time: now, To: fmt.Sprintf("wave %d gate met", n), Reason: c.waveLine(r, w)}, now)
			}
			if n == len(r.waves) || now.Before(r.rec.WaveGateMet[w].Add(r.rec.Spec.Soak.D())) {
				return
			}
		}
		if r.win != nil {
			open, session := c.windowSession(r, now)
			if !open || !session.After(r.rec.Session) {
				return
			}
			r.rec.Session = session
		}
		r.rec.WavesStarted = n + 1
		r.rec.WaveStarted[n] = now
		r.rec.Updated = now
		p.add(putRolloutFn(r.rec))
		c.logEvent(p, r, Event{Time: now, To: fmt.Sprintf("wave %d started", n+1), Reason: fmt.Sprintf("%d%% of the devices, %d in this wave", r.rec.Spec.Waves[n], r.waves[n].members)}, now)
		c.rebuildQueue(r)
	}
}

func (c *Controller) waveLine(r *rollout, w int) string {
	ws := &r.waves[w]
	return fmt.Sprintf("%d of %d installed", ws.counts[stateIdx[JobInstalled]], ws.members)
}

// maybeComplete marks an active rollout completed once every wave started and every device
// finished, and a canceling one canceled once no device is still verifying or installing.
func (c *Controller) maybeComplete(r *rollout, now time.Time, p *pending) {
	members, counts := r.totals()
	switch r.rec.State {
	case RolloutActive:
		if r.rec.WavesStarted < len(r.waves) || members == 0 {
			return
		}
		done := 0
		for i, s := range JobStates {
			if Terminal(s) {
				done += counts[i]
			}
		}
		if done == members {
			reason := fmt.Sprintf("%d installed, %d failed", counts[stateIdx[JobInstalled]], counts[stateIdx[JobFailed]])
			for i, s := range JobStates {
				if n := counts[i]; n > 0 && Excused(s) {
					reason += fmt.Sprintf(", %d %s", n, s)
				}
			}
			c.setRolloutState(p, r, RolloutCompleted, reason, now)
		}
	case RolloutCanceling:
		if counts[stateIdx[JobVerifying]]+counts[stateIdx[JobInstalling]] == 0 {
			c.closeRollout(p, r, RolloutCanceled, r.rec.Reason, now)
		}
	}
}

// checkAbort pauses the rollout when the failure rate of wave w reached the abort rule's
// threshold.
func (c *Controller) checkAbort(p *pending, r *rollout, w int, now time.Time) {
	if r.rec.State != RolloutActive || w < 0 || w >= len(r.waves) {
		return
	}
	failed, finished := r.waves[w].finished()
	if w < len(r.rec.AbortBase) {
		failed -= r.rec.AbortBase[w][0]
		finished -= r.rec.AbortBase[w][1]
	}
	s := r.rec.Spec
	if finished < s.AbortMinFinished || float64(failed)*100 < s.AbortFailureRate*float64(finished) {
		return
	}
	reason := fmt.Sprintf("abort rule: wave %d: %d of %d finished devices failed (%.1f%%, limit %g%%)",
		w+1, failed, finished, float64(failed)*100/float64(finished), s.AbortFailureRate)
	c.setRolloutState(p, r, RolloutPaused, reason, now)
}

// fill offers the update to queued devices while the rollout has free slots.
func (c *Controller) fill(r *rollout, now time.Time, p *pending, cm *commit) {
	if len(r.queue) == 0 || r.inflight >= r.rec.Spec.MaxConcurrent || !c.accepting(r, now) {
		return
	}
	jitter := r.rec.Spec.OfferJitter.D()
	i := 0
	for ; i < len(r.queue) && r.inflight < r.rec.Spec.MaxConcurrent; i++ {
		ds := r.queue[i]
		r.queue[i] = nil
		ds.queued = false
		if !c.eligible(r, ds) {
			continue
		}
		if jitter > 0 {
			c.change(ds, func() { ds.reserved = true })
			r.jitter[ds] = now.Add(rand.N(jitter + 1))
			continue
		}
		c.offer(r, ds, now, p, cm)
	}
	r.queue = r.queue[i:]
	if len(r.queue) == 0 {
		r.queue = nil
	}
}

// rebuildQueue queues every eligible device of r, in the fleet's order.
func (c *Controller) rebuildQueue(r *rollout) {
	start := len(r.queue)
	for _, ds := range c.devList {
		if ds.d.Model == r.rec.Model && !ds.queued && c.eligible(r, ds) {
			ds.queued = true
			r.queue = append(r.queue, ds)
		}
	}
	sortQueue(r.queue[start:])
}

// Tick runs the scheduler once at the clock's time: start times, window openings and
// closings, phase timeouts, delayed offers, retries, wave advances and completion. The
// controller ticks by itself every Options.TickInterval; tests with a fake clock call it.
func (c *Controller) Tick() {
	now := c.clock.Now()
	err := c.txn(func(p *pending, cm *commit) error {
		for _, r := range c.open {
			c.tickRollout(r, now, p, cm)
		}
		return nil
	})
	if err != nil && err != ErrClosed {
		c.log.Error("tick", "err", err)
	}
}

func (c *Controller) tickRollout(r *rollout, now time.Time, p *pending, cm *commit) {
	if r.rec.State == RolloutScheduled && !now.Before(r.rec.Spec.Start) {
		c.setRolloutState(p, r, RolloutActive, "start time reached", now)
	}
	if r.win != nil {
		open, _ := c.windowSession(r, now)
		if open != r.winOpen {
			r.winOpen, r.winSince = open, now
			to, reason := "window closed", "no new offers until it opens"
			if open {
				to, reason = "window open", ""
			} else if r.rec.Spec.WindowEnd == WindowEndPause {
				reason = "transfers pause until it opens"
			}
			c.logEvent(p, r, Event{Time: now, To: to, Reason: reason}, now)
			r.paused.Store(r.rec.Spec.WindowEnd == WindowEndPause && !open)
			if open {
				c.rebuildQueue(r)
			}
		}
	}
	for ds := range r.active {
		c.checkTimeout(r, ds, now, p)
	}
	c.sweepGone(r, now, p)
	for ds, at := range r.jitter {
		if at.After(now) {
			continue
		}
		delete(r.jitter, ds)
		c.change(ds, func() { ds.reserved = false })
		if c.accepting(r, now) && c.eligible(r, ds) {
			c.offer(r, ds, now, p, cm)
		} else {
			c.enqueueDevice(r, ds)
		}
	}
	if c.accepting(r, now) {
		for ds := range r.retry {
			if r.inflight >= r.rec.Spec.MaxConcurrent {
				break
			}
			if ds.d.Online && !ds.job.RetryAt.After(now) {
				c.offer(r, ds, now, p, cm)
			}
		}
	}
	c.afterChange(r, now, p, cm)
}

// sweepEvery is how often a rollout's members are scanned for devices that went away: a scan
// costs a pass over the model's devices, and an hour's precision on a day is plenty.
const sweepEvery = time.Minute

// sweepGone ends the jobs of members that will not come back in time: revoked devices
// (skipped) and devices offline for longer than Options.UnreachableAfter (unreachable), so
// that the rollout can finish without them. Revocations while the server runs arrive by
// DeviceRevoked at once; the sweep finds those made while it was down.
func (c *Controller) sweepGone(r *rollout, now time.Time, p *pending) {
	if r.rec.State != RolloutActive && r.rec.State != RolloutPaused || now.Before(r.swept.Add(sweepEvery)) {
		return
	}
	r.swept = now
	gone := now.Add(-c.opts.UnreachableAfter)
	// Offline time counts from the controller's start too: no device could reach a server
	// that was down, and after a long outage they reconnect over the first minutes.
	if !c.started.Before(gone) {
		gone = time.Time{}
	}
	c.eachMember(r, func(ds *devState) {
		switch {
		case ds.done != "":
		case ds.revoked || c.opts.Revoked(ds.d.ID):
			c.endGone(p, r, ds, JobSkipped, "revoked", now)
			c.change(ds, func() { ds.revoked = true })
		case !ds.d.Online && ds.d.LastSeen.Before(gone):
			c.endGone(p, r, ds, JobUnreachable, fmt.Sprintf("unreachable: offline since %s (over %v)",
				ds.d.LastSeen.UTC().Format(time.RFC3339), c.opts.UnreachableAfter), now)
		}
	})
}

// endGone ends the job of a member that went away, creating the job first if the device
// was never offered one, so that every member's end is stored with its reason.
func (c *Controller) endGone(p *pending, r *rollout, ds *devState, state, reason string, now time.Time) {
	if ds.queued || ds.reserved {
		// Taken out of the offer queue and the jitter wait; a patch in the making finds
		// the job ended when it is ready.
		delete(r.jitter, ds)
		c.change(ds, func() { ds.reserved = false })
	}
	if ds.job == nil {
		c.newJob(r, ds, now)
	}
	c.endJob(p, ds, state, reason, now)
}

// reopenUnreachable gives a device back its place in the rollout when it returns after its
// job ended unreachable: a fresh job, pending, and the rollout active again if it had
// completed without it.
func (c *Controller) reopenUnreachable(p *pending, r *rollout, ds *devState, now time.Time) {
	c.change(ds, func() { ds.done = "" })
	c.newJob(r, ds, now)
	p.add(putJobFn(*ds.job))
	c.logEvent(p, r, Event{Time: now, Device: ds.d.ID, From: JobUnreachable, To: JobPending, Reason: "device came back"}, now)
	if r.rec.State == RolloutCompleted {
		c.setRolloutState(p, r, RolloutActive, "device "+ds.d.ID+" came back", now)
	}
}

// DeviceRevoked ends the job of a device whose certificate was just revoked: it cannot
// connect again, so the rollout does not wait for it; no later rollout selects it.
func (c *Controller) DeviceRevoked(id string) {
	now := c.clock.Now()
	err := c.txn(func(p *pending, cm *commit) error {
		ds := c.devs[id]
		if ds == nil {
			return nil
		}
		if r := c.open[ds.d.Model]; r != nil && ds.wave >= 0 && ds.done == "" &&
			r.rec.State != RolloutCanceling && r.rec.State != RolloutCompleted {
			c.endGone(p, r, ds, JobSkipped, "revoked", now)
			c.afterChange(r, now, p, cm)
		}
		c.change(ds, func() { ds.revoked = true })
		return nil
	})
	if err != nil {
		c.log.Error("end revoked device's job", "device", id, "err", err)
	}
}

// checkTimeout times out a job that spent too long in its phase. Deadlines count from the
// job's latest event, from the controller's start (devices cannot report to a server that is
// down), and, for transfers a closed window paused, from the window's opening.
func (c *Controller) checkTimeout(r *rollout, ds *devState, now time.Time, p *pending) {
	j := ds.job
	s := r.rec.Spec
	var limit time.Duration
	switch j.State {
	case JobOffered:
		limit = s.TimeoutOffered.D()
	case JobDownloading:
		limit = s.TimeoutDownloading.D()
	case JobVerifying, JobInstalling:
		limit = s.TimeoutInstalling.D()
	default:
		return
	}
	paused := r.paused.Load()
	if paused && (j.State == JobOffered || j.State == JobDownloading) {
		return
	}
	base := j.Updated
	if base.Before(c.started) {
		base = c.started
	}
	if s.WindowEnd == WindowEndPause && r.win != nil && base.Before(r.winSince) {
		base = r.winSince
	}
	if now.Before(base.Add(limit)) {
		return
	}
	reason := fmt.Sprintf("timed out: %s for %v", j.State, limit)
	if r.rec.State == RolloutCanceling {
		c.endJob(p, ds, JobFailed, reason, now)
		return
	}
	c.retryOrFail(p, r, ds, reason, now)
}

// PauseRollout stops new offers; devices at work finish their jobs.
func (c *Controller) PauseRollout(id, reason string) (Rollout, error) {
	if reason == "" {
		reason = "paused by the operator"
	}
	return c.control(id, func(r *rollout, now time.Time, p *pending, cm *commit) error {
		switch r.rec.State {
		case RolloutActive, RolloutScheduled:
			c.setRolloutState(p, r, RolloutPaused, reason, now)
			return nil
		case RolloutPaused:
			return nil
		}
		return fmt.Errorf("%w: rollout %s is %s", ErrConflict, id, r.rec.State)
	})
}

// ResumeRollout lets a paused rollout go on. The abort rule then judges each wave by what
// happens after the resume.
func (c *Controller) ResumeRollout(id string) (Rollout, error) {
	return c.control(id, func(r *rollout, now time.Time, p *pending, cm *commit) error {
		switch r.rec.State {
		case RolloutActive, RolloutScheduled:
			return nil
		case RolloutPaused:
		default:
			return fmt.Errorf("%w: rollout %s is %s", ErrConflict, id, r.rec.State)
		}
		// The release may have been added again with a later expiry since it was cached.
		r.manifest = nil
		m, err := c.manifest(r)
		if err != nil {
			return err
		}
		if m.SHA256 != r.rec.SHA256 {
			return fmt.Errorf("%w: %s %s now has other bytes than rollout %s", ErrConflict, r.rec.Model, r.rec.Version, id)
		}
		if err := manifestFresh(m, r.rec.Spec, now); err != nil {
			return err
		}
		r.rec.AbortBase = make([][2]int, len(r.waves))
		for i := range r.waves {
			f, n := r.waves[i].finished()
			r.rec.AbortBase[i] = [2]int{f, n}
		}
		state := RolloutActive
		if now.Before(r.rec.Spec.Start) {
			state = RolloutScheduled
		}
		c.setRolloutState(p, r, state, "resumed by the operator", now)
		c.rebuildQueue(r)
		c.afterChange(r, now, p, cm)
		return nil
	})
}

// CancelRollout stops the rollout: devices not yet verifying or installing are canceled at
// once (their transfers end), and the rollout is canceled once the others have reported.
func (c *Controller) CancelRollout(id string) (Rollout, error) {
	return c.control(id, func(r *rollout, now time.Time, p *pending, cm *commit) error {
		switch r.rec.State {
		case RolloutCanceling:
			return nil
		case RolloutCompleted:
			c.closeRollout(p, r, RolloutCanceled, "canceled by the operator after completion", now)
			return nil
		}
		c.setRolloutState(p, r, RolloutCanceling, "canceled by the operator", now)
		for ds := range r.jitter {
			c.change(ds, func() { ds.reserved = false })
		}
		clear(r.jitter)
		for _, q := range r.queue {
			q.queued = false
		}
		r.queue = nil
		c.eachMember(r, func(ds *devState) {
			if ds.job == nil {
				return
			}
			switch ds.job.State {
			case JobVerifying, JobInstalling:
			default:
				c.endJob(p, ds, JobCanceled, "rollout canceled", now)
			}
		})
		c.maybeComplete(r, now, p)
		return nil
	})
}

// control runs a state change on an open rollout and returns the rollout after it.
func (c *Controller) control(id string, fn func(r *rollout, now time.Time, p *pending, cm *commit) error) (Rollout, error) {
	now := c.clock.Now()
	var out Rollout
	err := c.txn(func(p *pending, cm *commit) error {
		rec := c.rollouts[id]
		if rec == nil {
			return fmt.Errorf("rollout %q: %w", id, ErrNotFound)
		}
		r := c.open[rec.Model]
		if r == nil || r.rec.ID != id {
			return fmt.Errorf("%w: rollout %s is %s", ErrConflict, id, rec.State)
		}
		if err := fn(r, now, p, cm); err != nil {
			return err
		}
		if c.open[rec.Model] == r {
			out = c.view(r, now)
		} else {
			out = c.closedView(rec)
		}
		return nil
	})
	return out, err
}

// view describes an open rollout; called with mu held.
func (c *Controller) view(r *rollout, now time.Time) Rollout {
	members, counts := r.totals()
	v := c.closedView(&r.rec)
	v.Devices, v.Counts = members, countsMap(counts)
	v.Waves = make([]WaveStatus, len(r.waves))
	for i := range r.waves {
		ws := WaveStatus{
			Percent: r.rec.Spec.Waves[i], Devices: r.waves[i].members, Counts: countsMap(r.waves[i].counts),
			Started: r.rec.WaveStarted[i], GateMet: r.rec.WaveGateMet[i], State: WaveWaiting,
		}
		switch {
		case i >= r.rec.WavesStarted:
		case ws.GateMet.IsZero():
			ws.State = WaveRunning
		case now.Before(ws.GateMet.Add(r.rec.Spec.Soak.D())):
			ws.State = WaveSoaking
		default:
			ws.State = WaveDone
		}
		v.Waves[i] = ws
	}
	if r.win != nil {
		open, _ := c.windowSession(r, now)
		v.Window = &WindowState{Open: open}
		if !open {
			v.Window.Next = r.win.next(now)
		}
	}
	return v
}

// closedView describes a rollout from its record alone.
func (c *Controller) closedView(rec *rolloutRecord) Rollout {
	v := Rollout{
		ID: rec.ID, Model: rec.Model, Version: rec.Version, SHA256: rec.SHA256, Size: rec.Size,
		State: rec.State, Reason: rec.Reason, Spec: rec.Spec, Created: rec.Created, Updated: rec.Updated,
		Devices: rec.FinalTotal, Counts: maps.Clone(rec.Final), WavesStarted: rec.WavesStarted,
		Waves: make([]WaveStatus, len(rec.Spec.Waves)),
	}
	if v.Counts == nil {
		v.Counts = map[string]int{}
	}
	v.Spec.Tags = maps.Clone(rec.Spec.Tags)
	v.Spec.Devices = slices.Clone(rec.Spec.Devices)
	v.Spec.Waves = slices.Clone(rec.Spec.Waves)
	for i := range v.Waves {
		ws := WaveStatus{Percent: rec.Spec.Waves[i], State: WaveWaiting, Counts: map[string]int{}}
		if i < len(rec.WaveStarted) {
			ws.Started = rec.WaveStarted[i]
		}
		if i < len(rec.WaveGateMet) {
			ws.GateMet = rec.WaveGateMet[i]
		}
		if i < len(rec.FinalWaves) {
			ws.Counts = maps.Clone(rec.FinalWaves[i])
			for _, n := range ws.Counts {
				ws.Devices += n
			}
		}
		if i < rec.WavesStarted {
			ws.State = WaveDone
		}
		v.Waves[i] = ws
	}
	return v
}

// ListRollouts returns every rollout, newest first, with counts per job state.
func (c *Controller) ListRollouts() ([]Rollout, error) {
	if err := c.sync(); err != nil {
		return nil, err
	}
	now := c.clock.Now()
	c.mu.Lock()
	defer c.mu.Unlock()
	out := make([]Rollout, 0, len(c.rollouts))
	for _, rec := range c.rollouts {
		if r := c.open[rec.Model]; r != nil && r.rec.ID == rec.ID {
			out = append(out, c.view(r, now))
		} else {
			out = append(out, c.closedView(rec))
		}
	}
	seq := func(id string) uint64 { return c.rollouts[id].Seq }
	slices.SortFunc(out, func(a, b Rollout) int { return cmp.Compare(seq(b.ID), seq(a.ID)) })
	return out, nil
}

// Rollout returns one rollout without its jobs.
func (c *Controller) Rollout(id string) (Rollout, error) {
	if err := c.sync(); err != nil {
		return Rollout{}, err
	}
	now := c.clock.Now()
	c.mu.Lock()
	defer c.mu.Unlock()
	rec := c.rollouts[id]
	if rec == nil {
		return Rollout{}, fmt.Errorf("rollout %q: %w", id, ErrNotFound)
	}
	if r := c.open[rec.Model]; r != nil && r.rec.ID == id {
		return c.view(r, now), nil
	}
	return c.closedView(rec), nil
}

// GetRollout returns a rollout and every job in it.
func (c *Controller) GetRollout(id string) (RolloutDetail, error) {
	r, err := c.Rollout(id)
	if err != nil {
		return RolloutDetail{}, err
	}
	jobs, err := c.Jobs(id, JobQuery{})
	return RolloutDetail{Rollout: r, Jobs: jobs}, err
}

// Jobs returns the jobs of a rollout that q selects, sorted by device id. A member of an open
// rollout that was never offered has no stored job yet; it is listed all the same, pending
// (or canceled), so that the list agrees with the rollout's counts.
func (c *Controller) Jobs(id string, q JobQuery) ([]Job, error) {
	if q.State != "" {
		if _, ok := stateIdx[q.State]; !ok {
			return nil, fmt.Errorf("%w: no job state %q", ErrInvalid, q.State)
		}
	}
	if err := c.sync(); err != nil {
		return nil, err
	}
	unstored := c.unstoredJobs(id, q)
	out := []Job{}
	err := c.db.View(func(tx *bolt.Tx) error {
		if tx.Bucket(bucketRollouts).Get([]byte(id)) == nil {
			return fmt.Errorf("rollout %q: %w", id, ErrNotFound)
		}
		return eachJob(tx, id, q.After, func(j Job) (bool, error) {
			if q.State == "" || j.State == q.State {
				out = append(out, j)
			}
			return q.Limit <= 0 || len(out) < q.Limit, nil
		})
	})
	if err != nil || len(unstored) == 0 {
		return out, err
	}
	// Both lists are sorted by device id and hold at most Limit jobs each, so the first Limit
	// of their union are among them. A device offered since the snapshot is in both: the
	// stored job wins.
	merged := make([]Job, 0, len(out)+len(unstored))
	for i, k := 0, 0; i < len(out) || k < len(unstored); {
		switch {
		case k == len(unstored) || i < len(out) && out[i].Device < unstored[k].Device:
			merged = append(merged, out[i])
			i++
		case i == len(out) || unstored[k].Device < out[i].Device:
			merged = append(merged, unstored[k])
			k++
		default:
			merged = append(merged, out[i])
			i, k = i+1, k+1
		}
	}
	if q.Limit > 0 && len(merged) > q.Limit {
		merged = merged[:q.Limit]
	}
	return merged, nil
}

// unstoredJobs describes the members of open rollout id that have no job yet, as q selects
// them, sorted by device id.
func (c *Controller) unstoredJobs(id string, q JobQuery) []Job {
	c.mu.Lock()
	defer c.mu.Unlock()
	rec := c.rollouts[id]
	if rec == nil {
		return nil
	}
	r := c.open[rec.Model]
	if r == nil || r.rec.ID != id {
		return nil
	}
	var out []Job
	c.eachMember(r, func(ds *devState) {
		if ds.hasJob() || ds.d.ID <= q.After && q.After != "" {
			return
		}
		st := r.stateOf(ds)
		if q.State != "" && st != q.State {
			return
		}
		j := Job{Rollout: id, Device: ds.d.ID, Wave: ds.wave, From: ds.d.Version, To: r.rec.Version,
			State: st, Created: r.rec.Created, Updated: r.rec.Created}
		if st == JobCanceled {
			j.Reason = "rollout canceled"
		}
		out = append(out, j)
	})
	slices.SortFunc(out, func(a, b Job) int { return cmp.Compare(a.Device, b.Device) })
	if q.Limit > 0 && len(out) > q.Limit {
		out = out[:q.Limit]
	}
	return out
}

// Events returns up to limit entries of a rollout's event log with a sequence number above
// after, oldest first; limit 0 means all that are kept.
func (c *Controller) Events(id string, after uint64, limit int) (EventLog, error) {
	if err := c.sync(); err != nil {
		return EventLog{}, err
	}
	out := EventLog{Events: []Event{}}
	err := c.db.View(func(tx *bolt.Tx) error {
		if tx.Bucket(bucketRollouts).Get([]byte(id)) == nil {
			return fmt.Errorf("rollout %q: %w", id, ErrNotFound)
		}
		b := tx.Bucket(bucketEvents).Bucket([]byte(id))
		if b == nil {
			return nil
		}
		out.Total = lastEventSeq(tx, id)
		cur := b.Cursor()
		for k, v := cur.Seek(seqKey(after + 1)); k != nil; k, v = cur.Next() {
			var e Event
			if err := json.Unmarshal(v, &e); err != nil {
				return fmt.Errorf("decode event %x of %s: %w", k, id, err)
			}
			out.Events = append(out.Events, e)
			if limit > 0 && len(out.Events) >= limit {
				break
			}
		}
		return nil
	})
	return out, err
}

// ListDevices returns every registered device, sorted by id.
func (c *Controller) ListDevices() ([]Device, error) {
	if err := c.sync(); err != nil {
		return nil, err
	}
	c.mu.Lock()
	out := make([]Device, 0, len(c.devs))
	for _, ds := range c.devList {
		out = append(out, ds.d)
	}
	c.mu.Unlock()
	for i := range out {
		out[i].Tags = maps.Clone(out[i].Tags)
	}
	slices.SortFunc(out, func(a, b Device) int { return cmp.Compare(a.ID, b.ID) })
	return out, nil
}

// GetDevice returns one registered device.
func (c *Controller) GetDevice(id string) (Device, error) {
	if err := c.sync(); err != nil {
		return Device{}, err
	}
	c.mu.Lock()
	defer c.mu.Unlock()
	ds := c.devs[id]
	if ds == nil {
		return Device{}, fmt.Errorf("device %q: %w", id, ErrNotFound)
	}
	d := ds.d
	d.Tags = maps.Clone(d.Tags)
	return d, nil
}

// TagDevice sets tags of a device; an empty value removes the tag. A device whose new tags
// match an open rollout joins it. A valid id never seen is registered with its tags, so that
// devices can be tagged before they first connect; its model and version come with it.
func (c *Controller) TagDevice(id string, tags map[string]string) (Device, error) {
	if len(tags) == 0 {
		return Device{}, fmt.Errorf("%w: no tags given", ErrInvalid)
	}
	for k, v := range tags {
		if err := ValidTag(k, v); err != nil {
			return Device{}, err
		}
	}
	now := c.clock.Now()
	var out Device
	err := c.txn(func(p *pending, cm *commit) error {
		ds := c.devs[id]
		if ds == nil {
			if err := protocol.ValidDeviceID(id); err != nil {
				return fmt.Errorf("%w: %v", ErrInvalid, err)
			}
			ds = &devState{d: Device{ID: id}, pos: position(id), wave: -1}
			c.addDevice(ds)
		}
		next := maps.Clone(ds.d.Tags)
		if next == nil {
			next = make(map[string]string)
		}
		for k, v := range tags {
			if v == "" {
				delete(next, k)
			} else {
				next[k] = v
			}
		}
		if len(next) > maxTags {
			return fmt.Errorf("%w: device %s would have %d tags, at most %d", ErrInvalid, id, len(next), maxTags)
		}
		if len(next) == 0 {
			next = nil
		}
		// The map is replaced, never changed in place: writes queued earlier hold the old one.
		c.change(ds, func() { ds.d.Tags = next })
		p.add(putDeviceFn(ds.d))
		if r := c.open[ds.d.Model]; r != nil && ds.wave >= 0 {
			if !ds.hasJob() && r.rec.State == RolloutCompleted {
				c.setRolloutState(p, r, RolloutActive, "device "+id+" joined", now)
			}
			c.enqueueDevice(r, ds)
			c.afterChange(r, now, p, cm)
		}
		out = ds.d
		out.Tags = maps.Clone(next)
		return nil
	})
	return out, err
}

// WithoutNewRollouts runs fn while no rollout is being created: every creation that found
// its firmware before fn started is registered, so InUse inside fn sees it, and every
// creation after fn looks its firmware up again. Deleting firmware goes through it. fn must
// not create a rollout.
func (c *Controller) WithoutNewRollouts(fn func() error) error {
	c.creating.Lock()
	defer c.creating.Unlock()
	return fn()
}

// InUse reports whether an open rollout needs the firmware (model, version). A completed
// rollout counts: a matching device that appears later still gets it, until the rollout is
// canceled or a newer one supersedes it.
func (c *Controller) InUse(model, version string) bool {
	c.mu.Lock()
	defer c.mu.Unlock()
	r := c.open[model]
	return r != nil && r.rec.Version == version
}
