package devicesim

import (
	"bytes"
	"crypto/ed25519"
	"encoding/binary"
	"encoding/json"
	"errors"
	"fmt"
	"strings"
	"time"

	"github.com/fota-dev/fota/firmware"
	"github.com/fota-dev/fota/firmware/delta"
	"github.com/fota-dev/fota/protocol"
)

// maxReason bounds the reason a device reports; details quote manifest fields, which come
// from the server and may be of any length.
const maxReason = 256

// maxRecentJobs bounds the jobs whose event sequence a device remembers.
const maxRecentJobs = 16

func clip(s string) string {
	if len(s) <= maxReason {
		return s
	}
	return strings.ToValidUTF8(s[:maxReason-3], "") + "..."
}

func jsonMarshal(v any) ([]byte, error) {
	b, err := json.Marshal(v)
	if err != nil {
		return nil, fmt.Errorf("encode %T: %w", v, err)
	}
	return b, nil
}

// jobError is why a job failed: a protocol.Reason code, and the detail after it.
type jobError struct {
	reason string
	err    error
}

func (e *jobError) Error() string { return e.reason + ": " + e.err.Error() }
func (e *jobError) Unwrap() error { return e.err }

func refuse(reason, format string, args ...any) error {
	return &jobError{reason, fmt.Errorf(format, args...)}
}

// verdict wraps an error of package firmware with the reason it names.
func verdict(err error) error {
	reason := firmware.FailureReason(err)
	if reason == "" {
		reason = protocol.ReasonBadManifest
	}
	return &jobError{reason, err}
}

// checkOffer decides from the offer alone whether a device in state st may start on it. The
// manifest decides, by its signature, model, counter, expiry and delta base; the offer only
// says how it is transferred, and that must agree with the signed sizes.
func checkOffer(o protocol.Offer, pub ed25519.PublicKey, st firmware.DeviceState, now time.Time) error {
	m := o.Manifest
	if o.V < 1 || o.V > protocol.ProtocolVersion {
		return refuse(protocol.ReasonBadManifest, "offer version %d not supported", o.V)
	}
	if err := firmware.VerifyManifest(m, pub, st, now); err != nil {
		return verdict(err)
	}
	// Bounds of this device, on top of what the signer allowed.
	if m.Size <= 0 || m.Size > MaxImageSize {
		return refuse(protocol.ReasonBadManifest, "size %d outside 1..%d", m.Size, MaxImageSize)
	}
	want := m.Size
	if d := m.Delta; d != nil {
		if d.Format != delta.Format {
			return refuse(protocol.ReasonBadManifest, "delta format %q, this device applies %q", d.Format, delta.Format)
		}
		if d.PatchSize <= 0 || d.PatchSize > MaxImageSize {
			return refuse(protocol.ReasonBadManifest, "patch size %d outside 1..%d", d.PatchSize, MaxImageSize)
		}
		want = d.PatchSize
	}
	if o.Size != want {
		return refuse(protocol.ReasonBadManifest, "offer size %d differs from the signed size %d", o.Size, want)
	}
	return nil
}

// deviceState is what VerifyManifest checks a manifest against.
func (d *Device) deviceState() firmware.DeviceState {
	st := d.flash.state
	return firmware.DeviceState{Model: d.cfg.Model, Counter: st.Counter, ImageSHA256: st.SHA256}
}

// emit sends the job's next event. Events are QoS 1 and not waited for: a lost one is covered
// by the next Status, and by the server offering the job again. The device's current job is
// persisted first when its state changed or its reserved sequence numbers ran out, so that
// after a restart it neither goes back in state nor reuses a sequence number.
func (d *Device) emit(s *session, j *job, ev protocol.Event) {
	j.seq++
	if j == d.job && (j.seq >= j.seqSaved || j.state != j.saved) {
		if err := d.saveJob(j); err != nil {
			d.log.Warn("persist job", "job", j.id, "err", err)
		}
		j.saved = j.state
	}
	ev.V, ev.Job, ev.Seq = protocol.ProtocolVersion, j.id, j.seq
	if _, ok := d.seqs[j.id]; !ok && len(d.seqs) >= maxRecentJobs {
		for id := range d.seqs { // forget any one; old jobs are rarely offered again
			if id != j.id {
				delete(d.seqs, id)
				break
			}
		}
	}
	d.seqs[j.id] = j.seq
	if ev.State != protocol.StateInstalled && ev.State != protocol.StateFailed {
		ev.Bytes = j.bytes
	}
	b, err := jsonMarshal(ev)
	if err != nil {
		d.log.Error("event", "err", err)
		return
	}
	s.last = s.client.Publish(protocol.Topic(d.cfg.ID, protocol.SuffixEvent), 1, false, b)
}

func (d *Device) onOffer(s *session, payload []byte, now time.Time) {
	var o protocol.Offer
	if err := json.Unmarshal(payload, &o); err != nil {
		d.log.Warn("offer ignored: undecodable", "err", err)
		return
	}
	if o.Job == "" || len(o.Job) > maxJobIDLen {
		d.log.Warn("offer ignored: bad job id", "len", len(o.Job))
		return
	}
	cur := d.job
	if cur != nil && cur.id == o.Job {
		switch {
		case cur.active():
			d.log.Debug("offer repeated; already at it", "job", o.Job, "state", cur.state)
			return
		case cur.state == protocol.StateInstalled:
			d.log.Info("offer for an installed job; confirming again", "job", o.Job)
			d.emit(s, cur, protocol.Event{State: protocol.StateInstalled, Version: d.flash.state.Version})
			return
		}
		// Failed before: the server asks for another attempt.
	}
	// A job seen before (failed, refused, superseded) continues its event sequence.
	j := &job{id: o.Job, offer: o, from: d.flash.state.Version, seq: d.seqs[o.Job], accepted: now}
	if cur != nil && cur.id == o.Job {
		j.seq = max(j.seq, cur.seq) // restored from flash
	}
	if err := checkOffer(o, d.cfg.PublicKey, d.deviceState(), now); err != nil {
		j.state, j.reason = protocol.StateFailed, clip(err.Error())
		d.log.Warn("offer refused", "job", o.Job, "reason", j.reason)
		if cur == nil || !cur.active() {
			d.job = j
			d.update(now)
		}
		d.emit(s, j, protocol.Event{State: protocol.StateFailed, Reason: j.reason})
		return
	}
	if cur != nil && cur.active() {
		d.log.Info("job superseded", "job", cur.id, "by", o.Job)
		d.dropDownload(cur)
	}
	var data partial
	if d.dir != "" {
		f, err := openPartial(d.dir, o.Size, false)
		if err != nil {
			j.state, j.reason = protocol.StateFailed, clip(protocol.ReasonInstall+": "+err.Error())
			d.job = j
			d.update(now)
			d.emit(s, j, protocol.Event{State: protocol.StateFailed, Reason: j.reason})
			return
		}
		data = f
	} else {
		data = make(memPartial, o.Size)
	}
	cs, w := transferParams(o, d.cfg.MaxChunk)
	j.state, j.dl, j.progress = protocol.StateDownloading, newDownload(o, cs, w, d.cfg.RequestTimeout, data), now
	d.job = j
	d.update(now)
	d.log.Info("downloading", "job", o.Job, "version", o.Manifest.Version, "size", o.Size, "delta", o.Manifest.Delta != nil)
	d.emit(s, j, protocol.Event{State: protocol.StateDownloading})
	d.pump(s, j, now)
}

// pump sends as many chunk requests as the window and the rate limit allow.
func (d *Device) pump(s *session, j *job, now time.Time) {
	topic := protocol.Topic(d.cfg.ID, protocol.SuffixRequest)
	for _, r := range j.dl.requests(now, d.bucket.allow(j.dl.chunkSize, now)) {
		r.Job = j.id
		b, err := jsonMarshal(r)
		if err != nil {
			d.log.Error("request", "err", err)
			continue
		}
		d.stats.requests.Add(1)
		d.stats.requestedBytes.Add(int64(r.Length))
		j.requested += int64(r.Length)
		// QoS 0: a lost request is the same as a lost answer; the timeout covers both.
		s.client.Publish(topic, 0, false, b)
	}
}

func (d *Device) onChunk(s *session, b []byte, now time.Time) {
	j := d.job
	if j == nil || j.state != protocol.StateDownloading {
		return
	}
	dl := j.dl
	f, err := protocol.ParseFrame(b)
	if err != nil {
		// The header is not covered by the checksum, but if it names this transfer and an
		// outstanding range, asking for that range again is cheap and harmless.
		if len(b) >= protocol.FrameHeaderSize && b[0] == protocol.FrameVersion &&
			binary.BigEndian.Uint32(b[4:]) == dl.transfer {
			d.log.Debug("bad frame", "err", err)
			d.check(s, j, dl.reask(binary.BigEndian.Uint32(b[8:]), now), now)
		}
		return
	}
	// An error frame with transfer id 0 answers a request the server has no transfer for.
	if f.Transfer != dl.transfer && (f.Kind != protocol.FrameError || f.Transfer != 0) {
		return
	}
	if f.Kind == protocol.FrameError {
		d.onFrameError(s, j, f, now)
		return
	}
	n, err := dl.accept(f.Offset, f.Payload)
	switch {
	case err != nil:
		d.fail(s, j, clip(protocol.ReasonInstall+": "+err.Error()), now)
		return
	case n < 0:
		d.check(s, j, dl.reask(f.Offset, now), now)
		return
	case n == 0:
		return
	default:
		j.bytes += int64(n)
		s.progressed = true
	}
	if dl.complete() {
		d.finish(s, j, now)
		return
	}
	if d.dir != "" && dl.unsynced >= int64(d.cfg.SyncEvery) {
		if err := d.saveJob(j); err != nil {
			d.log.Warn("checkpoint", "job", j.id, "err", err)
		}
	}
	if now.Sub(j.progress) >= progressEvery {
		j.progress = now
		d.update(now)
		d.emit(s, j, protocol.Event{State: protocol.StateDownloading})
	}
	d.pump(s, j, now)
}

func (d *Device) onFrameError(s *session, j *job, f protocol.Frame, now time.Time) {
	code := string(f.Payload)
	switch code {
	case protocol.ErrCodeBusy:
		d.check(s, j, j.dl.busy(f.Offset, now), now)
	case protocol.ErrCodeRange, protocol.ErrCodeNoJob:
		d.fail(s, j, fmt.Sprintf("%s: server says %q at offset %d", protocol.ReasonTransfer, code, f.Offset), now)
	default:
		// "internal" or a code this device does not know: the server may recover, so ask
		// again, counting an attempt.
		if len(code) > 32 {
			code = code[:32]
		}
		d.log.Warn("chunk error", "job", j.id, "code", code, "offset", f.Offset)
		d.check(s, j, j.dl.reask(f.Offset, now), now)
	}
}

func (d *Device) onTick(s *session, now time.Time) {
	j := d.job
	if j == nil || j.state != protocol.StateDownloading {
		return
	}
	d.check(s, j, j.dl.expire(now), now)
}

// check fails the job on err, or sends the requests the download now wants.
func (d *Device) check(s *session, j *job, err error, now time.Time) {
	if err != nil {
		reason := protocol.ReasonTransfer
		if errors.Is(err, errOversize) {
			reason = protocol.ReasonSize
		}
		d.fail(s, j, reason+": "+err.Error(), now)
		return
	}
	d.pump(s, j, now)
}

func (d *Device) fail(s *session, j *job, reason string, now time.Time) {
	d.dropDownload(j)
	j.state, j.reason, j.took = protocol.StateFailed, reason, now.Sub(j.accepted)
	d.update(now)
	d.log.Warn("job failed", "job", j.id, "reason", reason)
	d.emit(s, j, protocol.Event{State: protocol.StateFailed, Reason: reason})
}

// finish verifies the download, builds the image from it for a delta, and installs the image
// into the inactive slot. The running image stays installed unless the new one matches the
// manifest exactly.
func (d *Device) finish(s *session, j *job, now time.Time) {
	m := j.offer.Manifest
	j.state = protocol.StateVerifying
	d.update(now)
	// Persisted with the download synced: a restart from here verifies the same bytes again.
	d.emit(s, j, protocol.Event{State: protocol.StateVerifying})
	data, err := j.dl.data.Bytes()
	if err != nil {
		d.fail(s, j, clip(protocol.ReasonInstall+": "+err.Error()), now)
		return
	}
	img, err := d.verify(m, data)
	if err != nil {
		d.fail(s, j, clip(err.Error()), now)
		return
	}
	j.state = protocol.StateInstalling
	d.update(now)
	d.emit(s, j, protocol.Event{State: protocol.StateInstalling})
	if d.chance(d.cfg.FailInstallRate) {
		d.stats.failedInstalls.Add(1)
		d.fail(s, j, protocol.ReasonInstall+": simulated failure (fail-install fault)", now)
		return
	}
	d.install(s, j, img, now)
}

// install writes img into the inactive slot and switches to it; the reboot follows.
func (d *Device) install(s *session, j *job, img []byte, now time.Time) {
	if err := d.flash.install(j.offer.Manifest, img); err != nil {
		d.fail(s, j, clip(protocol.ReasonInstall+": "+err.Error()), now)
		return
	}
	d.dropDownload(j)
	d.update(now)
	d.reboot = true
}

// reinstall finishes a job that lost power while installing, before the slot switch: the
// server was told "installing" and waits for the reboot, so the device verifies the download
// again and installs it without going back in state.
func (d *Device) reinstall(s *session, j *job, now time.Time) {
	data, err := j.dl.data.Bytes()
	if err == nil {
		data, err = d.verify(j.offer.Manifest, data)
	}
	if err != nil {
		d.fail(s, j, clip(err.Error()), now)
		return
	}
	d.install(s, j, data, now)
}

// verify returns the image that the downloaded data stands for, once it matches m: the data
// itself, or for a delta the result of applying the patch to the installed image.
func (d *Device) verify(m protocol.Manifest, data []byte) ([]byte, error) {
	if m.Delta == nil {
		if err := firmware.VerifyImage(m, data); err != nil {
			return nil, verdict(err)
		}
		return data, nil
	}
	// The patch is checked against its signed hash before the patcher reads a byte of it.
	if err := firmware.VerifyPatch(m, data); err != nil {
		return nil, verdict(err)
	}
	base := d.flash.installed()
	img, err := d.flash.images.apply(d.flash.state.SHA256, m.Delta.PatchSHA256, func() ([]byte, error) {
		return delta.Apply(base, bytes.NewReader(data), m.Size)
	})
	if err != nil {
		// A signed patch that does not apply: made from another base (a manifest that should
		// not have been offered to this device), or unusable as it was signed.
		reason := protocol.ReasonPatchApply
		if errors.Is(err, delta.ErrWrongBase) {
			reason = protocol.ReasonBadManifest
		}
		return nil, &jobError{reason, fmt.Errorf("apply patch: %w", err)}
	}
	if err := firmware.VerifyImage(m, img); err != nil {
		return nil, verdict(err)
	}
	return img, nil
}
