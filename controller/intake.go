package controller

import (
	"fmt"
	"log/slog"
	"maps"
	"strings"
	"sync"
	"time"
	"unicode/utf8"

	"github.com/fota-dev/fota/protocol"
)

// What the controller takes from devices. A device is authenticated, not trusted: every field
// it sends is checked and bounded before it reaches memory or the state file, a status that
// changes nothing writes nothing, and what it claims about a job counts only when it agrees
// with the phases the job went through.

const (
	// maxJobIDLen bounds the job id a device may name (PROTOCOL.md: at most 128 bytes).
	maxJobIDLen = 128
	// maxReasonLen is what the server keeps of a failure reason.
	maxReasonLen = 1024
	// maxLogPerJob bounds the entries one device's job writes to its rollout's event log,
	// apart from its final one, so one device cannot evict the fleet's history.
	maxLogPerJob = 16
	// badLogInterval is how often refused device messages are logged: the count in between
	// goes with the next line, so a device cannot fill the log.
	badLogInterval = 10 * time.Second
)

// reasonViolation starts the reason of a job failed because the device's reports did not add
// up.
const reasonViolation = "protocol-violation"

// validStatus checks every field of a device's status and returns its version. The version
// must be in canonical form: two spellings of one version would be two strings to keep.
func validStatus(st protocol.Status) (string, error) {
	if err := protocol.ValidModel(st.Model); err != nil {
		return "", err
	}
	v, err := protocol.ParseVersion(st.Version)
	if err != nil {
		return "", err
	}
	if v.String() != st.Version {
		return "", fmt.Errorf("version %q is not in canonical form %q", st.Version, v.String())
	}
	if st.SHA256 != "" && !validSHA256(st.SHA256) {
		return "", fmt.Errorf("sha256 %q: want 64 lowercase hex digits", clip(st.SHA256))
	}
	switch st.State {
	case protocol.StateIdle, protocol.StateDownloading, protocol.StateVerifying,
		protocol.StateInstalling, protocol.StateInstalled, protocol.StateFailed:
	default:
		return "", fmt.Errorf("state %q: not a device state", clip(st.State))
	}
	if err := validJobID(st.Job); err != nil {
		return "", err
	}
	return st.Version, nil
}

func validJobID(id string) error {
	if len(id) > maxJobIDLen || !utf8.ValidString(id) {
		return fmt.Errorf("job id %q: want at most %d bytes of UTF-8", clip(id), maxJobIDLen)
	}
	return nil
}

func validSHA256(s string) bool {
	if len(s) != 64 {
		return false
	}
	for i := 0; i < len(s); i++ {
		if !(s[i] >= '0' && s[i] <= '9' || s[i] >= 'a' && s[i] <= 'f') {
			return false
		}
	}
	return true
}

// clip shortens a device's string for an error message.
func clip(s string) string {
	if len(s) > 80 {
		return strings.ToValidUTF8(s[:80], "") + "..."
	}
	return s
}

// sameRecord reports whether two device records store the same thing, apart from LastSeen:
// a status that changes nothing else is not written (LastSeen is written on connect and
// disconnect).
func sameRecord(a, b Device) bool {
	return a.ID == b.ID && a.Model == b.Model && a.Version == b.Version && a.SHA256 == b.SHA256 &&
		a.Online == b.Online && a.Job == b.Job && a.MaxChunk == b.MaxChunk && a.Counter == b.Counter &&
		maps.Equal(a.Tags, b.Tags)
}

// handleStatus registers the device and reconciles its job with the version it runs: a
// device back on the target version has installed it if its job went through every phase,
// one that needs the update is offered it when its wave, the window and the limits allow.
func (c *Controller) handleStatus(id string, st protocol.Status) error {
	if err := protocol.ValidDeviceID(id); err != nil {
		return fmt.Errorf("%w: %v", ErrInvalid, err)
	}
	version, err := validStatus(st)
	if err != nil {
		return fmt.Errorf("%w: status: %v", ErrInvalid, err)
	}
	if m, ok := c.certModel.Load(id); ok && m.(string) != st.Model {
		return fmt.Errorf("%w: status says model %q, certificate says %q", ErrInvalid, st.Model, m)
	}
	now := c.clock.Now()
	return c.txn(func(p *pending, cm *commit) error {
		ds := c.devs[id]
		fresh := ds == nil
		if fresh {
			ds = &devState{d: Device{ID: id}, pos: position(id), wave: -1}
			c.addDevice(ds)
		}
		before := ds.d
		if ds.d.Model != "" && ds.d.Model != st.Model && ds.hasJob() {
			// A device whose model changed leaves its job in the old model's rollout.
			c.endJob(p, ds, JobFailed, "device reports model "+st.Model, now)
		}
		c.change(ds, func() {
			ds.d.Model = c.intern(st.Model)
			ds.d.Version = c.intern(version)
			ds.d.SHA256 = c.intern(st.SHA256)
			ds.d.Counter = st.Counter
			ds.d.Online, ds.d.LastSeen = true, now
			ds.d.MaxChunk = 0
			if st.MaxChunk >= protocol.MinChunkSize && st.MaxChunk <= protocol.MaxChunkSize {
				ds.d.MaxChunk = st.MaxChunk
			}
		})
		if fresh || !sameRecord(before, ds.d) {
			p.add(putDeviceFn(ds.d))
		}
		r := c.open[ds.d.Model]
		if r == nil || ds.wave < 0 {
			return nil
		}
		c.reconcile(r, ds, st, now, p, cm)
		c.afterChange(r, now, p, cm)
		return nil
	})
}

// phaseRank orders the phases a device reports for a job.
var phaseRank = map[string]int{
	"":                        0,
	protocol.StateDownloading: 1,
	protocol.StateVerifying:   2,
	protocol.StateInstalling:  3,
	protocol.StateInstalled:   4,
}

// verified reports whether j went through its phases far enough for an install to count: the
// device reported verifying or installing with every byte of the transfer. (Its downloading
// events may be missing: a server killed after a device's event and before storing it does
// not see it again.)
func verified(j *Job) bool {
	return phaseRank[j.Reached] >= phaseRank[protocol.StateVerifying] && j.Bytes == j.Size
}

// installViolation returns why a status naming the target version does not prove the job
// installed, or "" when it does: the device reports the target's sha256 and the job was
// verified with every byte.
//
// One exception: a job offered before this controller started may have lost the device's
// later events while the server was down, since a device installs and reboots without waiting
// for a server that is gone. For such a job, the device having started the download is
// enough before the release's sha256: only a server restart opens this gap, not the device.
func (c *Controller) installViolation(j *Job, target string, st protocol.Status) string {
	outage := !j.Offered.IsZero() && j.Offered.Before(c.started) && phaseRank[j.Reached] >= phaseRank[protocol.StateDownloading]
	switch {
	case st.SHA256 == "":
		return fmt.Sprintf("%s: status reports %s without the image's sha256", reasonViolation, st.Version)
	case st.SHA256 != target:
		return fmt.Sprintf("%s: status reports %s with sha256 %.12s, the release's is %.12s", reasonViolation, st.Version, st.SHA256, target)
	case !verified(j) && !outage:
		return fmt.Sprintf("%s: status reports %s before the download was verified (job %s, %d of %d bytes)",
			reasonViolation, st.Version, j.State, j.Bytes, j.Size)
	}
	return ""
}

// violation fails ds's job for a protocol violation. It counts as a failure for the abort
// rule, so devices that lie cannot pass a wave's gate.
func (c *Controller) violation(p *pending, ds *devState, reason string, now time.Time) {
	c.stats.ProtocolViolations.Add(1)
	c.endJob(p, ds, JobFailed, reason, now)
}

// counterRefused ends ds's job instead of offering it a release whose security counter is not
// above the one the device runs: the device would refuse it, and every offer would use an
// attempt for nothing.
func (c *Controller) counterRefused(r *rollout, ds *devState, m protocol.Manifest, now time.Time, p *pending) bool {
	if ds.d.Counter == 0 || m.Counter > ds.d.Counter {
		return false
	}
	if ds.job == nil {
		c.newJob(r, ds, now)
	}
	c.endJob(p, ds, JobFailed, fmt.Sprintf("counter: release %s has security counter %d, not above the device's %d; not offered",
		m.Version, m.Counter, ds.d.Counter), now)
	return true
}

// handleEvent applies a device's report about its job. Duplicates and events about other jobs
// are ignored; a job that finished stays finished. Reports that contradict the job's transfer
// fail it as a protocol violation.
func (c *Controller) handleEvent(id string, ev protocol.Event) error {
	switch ev.State {
	case protocol.StateDownloading, protocol.StateVerifying, protocol.StateInstalling,
		protocol.StateInstalled, protocol.StateFailed:
	default:
		return fmt.Errorf("%w: event state %q", ErrInvalid, clip(ev.State))
	}
	if err := validJobID(ev.Job); err != nil {
		return fmt.Errorf("%w: event: %v", ErrInvalid, err)
	}
	if ev.Bytes < 0 {
		return fmt.Errorf("%w: event: bytes %d", ErrInvalid, ev.Bytes)
	}
	if len(ev.Version) > 64 {
		return fmt.Errorf("%w: event: version of %d bytes", ErrInvalid, len(ev.Version))
	}
	if len(ev.Reason) > maxReasonLen {
		ev.Reason = strings.ToValidUTF8(ev.Reason[:maxReasonLen], "")
	}
	now := c.clock.Now()
	return c.txn(func(p *pending, cm *commit) error {
		ds := c.devs[id]
		if ds != nil && ds.job == nil && ds.done == JobInstalled &&
			ev.State == protocol.StateInstalled && ev.Version == ds.d.Version {
			// The installed event the protocol prescribes after the Status that completed
			// the job: expected, so not stale, and there is nothing left to change.
			return nil
		}
		if ds == nil || ds.job == nil || ds.job.ID != ev.Job || ev.Seq <= ds.job.Seq {
			c.stats.StaleEvents.Add(1)
			return nil
		}
		r := c.open[ds.d.Model]
		if r == nil {
			c.stats.StaleEvents.Add(1)
			return nil
		}
		j := ds.job
		from := j.State
		switch ev.State {
		case protocol.StateDownloading, protocol.StateVerifying, protocol.StateInstalling:
			bytes := max(j.Bytes, ev.Bytes)
			switch {
			case ev.Bytes > j.Size:
				c.violation(p, ds, fmt.Sprintf("%s: %s with %d bytes of a %d-byte transfer", reasonViolation, ev.State, ev.Bytes, j.Size), now)
			case ev.State != protocol.StateDownloading && bytes != j.Size:
				c.violation(p, ds, fmt.Sprintf("%s: %s with %d of %d bytes", reasonViolation, ev.State, bytes, j.Size), now)
			default:
				c.change(ds, func() {
					j.Seq, j.Updated, j.State, j.RetryAt, j.Bytes = ev.Seq, now, ev.State, time.Time{}, bytes
					if phaseRank[ev.State] > phaseRank[j.Reached] {
						j.Reached = ev.State
					}
					if j.Started.IsZero() {
						j.Started = now
					}
				})
				p.add(putJobFn(*j))
				if j.State == from {
					return nil // progress
				}
				c.logEvent(p, r, Event{Time: now, Device: id, Job: j.ID, From: from, To: j.State}, now)
			}
		case protocol.StateFailed:
			j.Seq = ev.Seq
			reason := ev.Reason
			if reason == "" {
				reason = "unspecified"
			}
			switch {
			case transferReason(reason) && r.paused.Load():
				// The window closed on the transfer (window end "pause"): not the device's
				// fault, so no attempt is used; it is offered again in the next window.
				c.change(ds, func() {
					j.History = appendHistory(j.History, reason)
					j.Attempt--
					j.State, j.Reason, j.Updated = JobPending, reason, now
				})
				c.transfers.Delete(id)
				p.add(putJobFn(*j))
				c.logEvent(p, r, Event{Time: now, Device: id, Job: j.ID, From: from, To: JobPending, Reason: reason}, now)
				c.enqueueDevice(r, ds)
			case transferReason(reason) && r.rec.State != RolloutCanceling:
				c.retryOrFail(p, r, ds, reason, now)
			default:
				c.endJob(p, ds, JobFailed, reason, now)
			}
		case protocol.StateInstalled:
			j.Seq = ev.Seq
			switch {
			case ev.Version != j.To:
				c.endJob(p, ds, JobFailed, fmt.Sprintf("%s: device reports %q installed, want %q", protocol.ReasonInstall, clip(ev.Version), j.To), now)
			case !verified(j):
				c.violation(p, ds, fmt.Sprintf("%s: installed before the download was verified (job %s, %d of %d bytes)",
					reasonViolation, j.State, j.Bytes, j.Size), now)
			default:
				// The event alone proves nothing: the status that reports the target's
				// sha256 completes the job (it normally comes first, after the reboot).
				j.Reached, j.Updated = protocol.StateInstalled, now
				p.add(putJobFn(*j))
			}
		}
		c.afterChange(r, now, p, cm)
		return nil
	})
}

// admitLog reports whether e goes into its rollout's event log. Each device's job has a
// share of maxLogPerJob entries, plus its final one; what goes past it is dropped and
// counted, so a device that flaps between states cannot evict other devices' entries.
func (c *Controller) admitLog(e Event) bool {
	if e.Device == "" || Terminal(e.To) {
		return true
	}
	ds := c.devs[e.Device]
	if ds == nil {
		return true
	}
	if ds.logJob != e.Job {
		ds.logJob, ds.logN = e.Job, 0
	}
	if ds.logN >= maxLogPerJob {
		c.stats.DroppedLogEntries.Add(1)
		return false
	}
	ds.logN++
	return true
}

// sampledLog writes at most one line per badLogInterval, with the number of lines it left
// out since the last.
type sampledLog struct {
	mu      sync.Mutex
	next    time.Time
	dropped uint64
}

func (s *sampledLog) warn(log *slog.Logger, msg string, args ...any) {
	now := time.Now()
	s.mu.Lock()
	if now.Before(s.next) {
		s.dropped++
		s.mu.Unlock()
		return
	}
	n := s.dropped
	s.dropped, s.next = 0, now.Add(badLogInterval)
	s.mu.Unlock()
	if n > 0 {
		args = append(args, "more_since_last", n)
	}
	log.Warn(msg, args...)
}
