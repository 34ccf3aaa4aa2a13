package devicesim

import (
	"encoding/json"
	"errors"
	"fmt"
	"io"
	"os"
	"path/filepath"

	"github.com/fota-dev/fota/atomicfile"
	"github.com/fota-dev/fota/protocol"
)

// Names of the job's files inside a device's state directory, next to the slots.
const (
	jobFile      = "job.json"     // jobRecord of the latest job
	downloadFile = "download.bin" // the transfer's bytes while it downloads
	maxJobRecord = 64 << 10       // an offer plus a bitmap of at most 64 MiB / 1 KiB ranges
	// seqReserve is how many event sequence numbers a persisted record reserves: after a power
	// loss the job's events continue above the reserve, so the server never takes a new event
	// for a duplicate, and the record is not rewritten for every progress event.
	seqReserve = 32
	// DefaultSyncEvery is how many bytes a device with a state directory receives between two
	// checkpoints of its download. A power loss costs what came in since the last one.
	DefaultSyncEvery = 64 << 10
)

// partial holds a transfer's bytes while they arrive: in memory, or in a file on the
// device's flash so that a restart can resume.
type partial interface {
	WriteAt(p []byte, off int64) (int, error)
	// Sync makes what was written durable.
	Sync() error
	// Bytes returns the whole transfer.
	Bytes() ([]byte, error)
	Close() error
}

type memPartial []byte

func (m memPartial) WriteAt(p []byte, off int64) (int, error) { return copy(m[off:], p), nil }
func (m memPartial) Sync() error                              { return nil }
func (m memPartial) Bytes() ([]byte, error)                   { return m, nil }
func (m memPartial) Close() error                             { return nil }

// filePartial is download.bin. Writes go to the file at their offset; only Sync makes them
// count for a restart, since a checkpoint is written after it.
type filePartial struct {
	f    *os.File
	size int64
}

// openPartial opens dir/download.bin for a transfer of size bytes. Unless keep, it starts
// empty; with keep, an existing file of exactly that size is reused, and anything else is an
// error.
func openPartial(dir string, size int64, keep bool) (*filePartial, error) {
	path := filepath.Join(dir, downloadFile)
	flag := os.O_RDWR | os.O_CREATE
	if keep {
		flag = os.O_RDWR
	} else {
		flag |= os.O_TRUNC
	}
	f, err := os.OpenFile(path, flag, 0o600)
	if err != nil {
		return nil, fmt.Errorf("open download: %w", err)
	}
	if keep {
		fi, err := f.Stat()
		if err == nil && fi.Size() != size {
			err = fmt.Errorf("%s is %d bytes, want %d", path, fi.Size(), size)
		}
		if err != nil {
			f.Close()
			return nil, fmt.Errorf("open download: %w", err)
		}
	} else if err := f.Truncate(size); err != nil {
		f.Close()
		return nil, fmt.Errorf("open download: %w", err)
	}
	return &filePartial{f: f, size: size}, nil
}

func (p *filePartial) WriteAt(b []byte, off int64) (int, error) { return p.f.WriteAt(b, off) }
func (p *filePartial) Sync() error                              { return p.f.Sync() }
func (p *filePartial) Close() error                             { return p.f.Close() }

func (p *filePartial) Bytes() ([]byte, error) {
	b := make([]byte, p.size)
	if _, err := p.f.ReadAt(b, 0); err != nil && !errors.Is(err, io.EOF) {
		return nil, fmt.Errorf("read download: %w", err)
	}
	return b, nil
}

// jobRecord is what a device with a state directory persists about its latest job, in
// job.json: enough to report the job with its next event sequence numbers after a restart,
// and to resume its download. It is rewritten atomically on each state change, at each
// download checkpoint, and when the reserved sequence numbers run out.
type jobRecord struct {
	Offer  protocol.Offer `json:"offer"`
	From   string         `json:"from"`
	State  string         `json:"state"`
	Reason string         `json:"reason,omitempty"`
	// Seq is above every sequence number the job's events used so far.
	Seq uint64 `json:"seq"`
	// Reported is set once the installed event went out.
	Reported bool `json:"reported,omitempty"`
	// While downloading or verifying: the range size of the download, and a bitmap of the
	// ranges download.bin holds (bit i%8 of byte i/8 is range i), synced before this record
	// was written.
	ChunkSize int    `json:"chunk_size,omitempty"`
	Done      []byte `json:"done,omitempty"`
}

// saveJob persists j: its data first (synced), then the record that says what of it counts.
// Without a state directory it only marks j's sequence numbers as reserved.
func (d *Device) saveJob(j *job) error {
	reserve := j.seq + seqReserve
	if d.dir == "" {
		j.seqSaved = reserve
		return nil
	}
	rec := jobRecord{Offer: j.offer, From: j.from, State: j.state, Reason: j.reason, Seq: reserve, Reported: j.reported}
	if dl := j.dl; dl != nil {
		if err := dl.data.Sync(); err != nil {
			return fmt.Errorf("save job: sync download: %w", err)
		}
		rec.ChunkSize, rec.Done = dl.chunkSize, dl.done()
		dl.unsynced = 0
	}
	b, err := json.Marshal(rec)
	if err != nil {
		return fmt.Errorf("save job: %w", err)
	}
	if err := atomicfile.Write(filepath.Join(d.dir, jobFile), b, 0o600); err != nil {
		return fmt.Errorf("save job: %w", err)
	}
	j.seqSaved = reserve
	d.stats.checkpoints.Add(1)
	return nil
}

// loadJob returns the job persisted in the state directory, with its download reopened when
// it was downloading, or nil when there is none. A download that cannot be resumed (its data
// missing or of another size) starts again from the beginning; the job and its sequence stay.
func (d *Device) loadJob() (*job, error) {
	if d.dir == "" {
		return nil, nil
	}
	b, err := readLimited(filepath.Join(d.dir, jobFile), maxJobRecord)
	if errors.Is(err, os.ErrNotExist) {
		return nil, nil
	}
	if err != nil {
		return nil, fmt.Errorf("read job: %w", err)
	}
	var rec jobRecord
	if err := json.Unmarshal(b, &rec); err != nil {
		return nil, fmt.Errorf("read job %s: %w", filepath.Join(d.dir, jobFile), err)
	}
	if rec.Offer.Job == "" || len(rec.Offer.Job) > maxJobIDLen {
		return nil, fmt.Errorf("read job %s: bad job id", filepath.Join(d.dir, jobFile))
	}
	j := &job{
		id: rec.Offer.Job, offer: rec.Offer, from: rec.From, state: rec.State, reason: rec.Reason,
		seq: rec.Seq, seqSaved: rec.Seq, reported: rec.Reported,
	}
	switch rec.State {
	case protocol.StateInstalled, protocol.StateFailed:
		return j, nil
	case protocol.StateInstalling:
		if st := d.flash.state; st.SHA256 == rec.Offer.Manifest.SHA256 && st.Version == rec.Offer.Manifest.Version {
			// The slot switch happened: the device is back up on the new image.
			j.state = protocol.StateInstalled
			return j, nil
		}
		// Cut off before the switch: it stays installing, which is what the server was
		// told, and installs again from the download (see reinstall).
	case protocol.StateDownloading, protocol.StateVerifying:
		// A download cut off while verifying is complete: it resumes with every range done,
		// and is verified again.
		j.state = protocol.StateDownloading
	default:
		return nil, fmt.Errorf("read job %s: state %q", filepath.Join(d.dir, jobFile), rec.State)
	}
	if rec.Offer.Size <= 0 || rec.Offer.Size > MaxImageSize {
		return nil, fmt.Errorf("read job %s: size %d", filepath.Join(d.dir, jobFile), rec.Offer.Size)
	}
	cs, w := transferParams(j.offer, d.cfg.MaxChunk)
	if rec.ChunkSize >= protocol.MinChunkSize && rec.ChunkSize <= protocol.MaxChunkSize {
		cs = rec.ChunkSize // the ranges the bitmap counts
	}
	data, err := openPartial(d.dir, j.offer.Size, true)
	keep := err == nil && len(rec.Done) == (int((j.offer.Size+int64(cs)-1)/int64(cs))+7)/8
	if !keep {
		if data != nil {
			data.Close()
		}
		d.log.Warn("download cannot resume; starting it again", "job", j.id, "err", err)
		cs, _ = transferParams(j.offer, d.cfg.MaxChunk)
		if data, err = openPartial(d.dir, j.offer.Size, false); err != nil {
			return nil, err
		}
	}
	j.dl = newDownload(j.offer, cs, w, d.cfg.RequestTimeout, data)
	if keep {
		j.dl.restore(rec.Done)
	}
	j.bytes = j.dl.received
	if j.state == protocol.StateInstalling && !j.dl.complete() {
		// Installing always follows a complete, synced download; anything else is a flash
		// that cannot be trusted, and the install cannot be finished.
		j.state, j.reason = protocol.StateFailed, protocol.ReasonInstall+": download lost before the install finished"
		d.dropDownload(j)
	}
	return j, nil
}

// dropDownload closes and removes the download's data, once the job no longer needs it.
func (d *Device) dropDownload(j *job) {
	if j.dl == nil {
		return
	}
	j.dl.data.Close()
	j.dl = nil
	if d.dir != "" {
		if err := os.Remove(filepath.Join(d.dir, downloadFile)); err != nil && !errors.Is(err, os.ErrNotExist) {
			d.log.Warn("remove download", "err", err)
		}
	}
}
