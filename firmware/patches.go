package firmware

import (
	"bytes"
	"context"
	"crypto/sha256"
	"encoding/hex"
	"encoding/json"
	"errors"
	"fmt"
	"io/fs"
	"log/slog"
	"os"
	"sync"

	"github.com/fota-dev/fota/firmware/delta"
	"github.com/fota-dev/fota/protocol"
	bolt "go.etcd.io/bbolt"
)

// PatcherOptions configure a Patcher. Store and DB are required, and DB must be the Store's:
// a verdict is stored in the same transaction that checks its target is still there.
type PatcherOptions struct {
	Store *Store
	DB    *bolt.DB
	// Workers is how many patches are made at once. Making one takes 11 to 22 times the
	// image size in memory, so the default is 1.
	Workers int
	// MaxRatio is the largest patch offered, as a share of the full image; default 0.5.
	MaxRatio float64
	// Queue is how many pairs may wait for a worker; default 64. A pair that finds the queue
	// full gets no delta this time and is asked for again later.
	Queue int
	// OnReady is called, from a worker, after a pair's verdict is stored. It is not called
	// when the target was deleted while its patch was being made: nothing is stored then, and
	// asking again would only queue the pair again.
	OnReady func(base, target string)
	Logger  *slog.Logger
}

// Patcher makes delta patches in the background, verifies each by applying it, stores it as
// an artifact and signs its manifest, so the controller can offer deltas without ever waiting
// for one.
type Patcher struct {
	opts    PatcherOptions
	log     *slog.Logger
	queue   chan patchJob
	mu      sync.Mutex
	pending map[string]bool // pairs queued or being made
	wg      sync.WaitGroup
	ctx     context.Context
	cancel  context.CancelFunc

	// beforeVerdict, set only by tests before Start, runs between making a patch and storing
	// its verdict, so a test can delete the target exactly there.
	beforeVerdict func(base, target string)
}

type patchJob struct {
	base   string
	target protocol.Manifest
}

// NewPatcher sweeps what a crash may have left of deleted targets: verdicts whose target has
// no firmware record, and their patches. Start starts the workers.
func NewPatcher(opts PatcherOptions) (*Patcher, error) {
	if opts.Store == nil || opts.DB == nil {
		return nil, errors.New("patcher: Store and DB are required")
	}
	if opts.DB != opts.Store.db {
		return nil, errors.New("patcher: DB must be the Store's")
	}
	if opts.Workers <= 0 {
		opts.Workers = 1
	}
	if opts.MaxRatio <= 0 || opts.MaxRatio > 1 {
		opts.MaxRatio = 0.5
	}
	if opts.Queue <= 0 {
		opts.Queue = 64
	}
	if opts.Logger == nil {
		opts.Logger = slog.New(slog.DiscardHandler)
	}
	log := opts.Logger.With("component", "patcher")
	records, patches, err := opts.Store.sweepDeltas()
	if err != nil {
		return nil, fmt.Errorf("patcher: %w", err)
	}
	if records > 0 || patches > 0 {
		log.Info("swept deltas of deleted firmware", "records", records, "patches", patches)
	}
	ctx, cancel := context.WithCancel(context.Background())
	return &Patcher{
		opts: opts, log: log,
		queue: make(chan patchJob, opts.Queue), pending: make(map[string]bool),
		ctx: ctx, cancel: cancel,
	}, nil
}

// Start starts the workers. It does not block.
func (p *Patcher) Start() {
	for range p.opts.Workers {
		p.wg.Add(1)
		go func() {
			defer p.wg.Done()
			for {
				select {
				case <-p.ctx.Done():
					return
				case j := <-p.queue:
					p.make(j)
				}
			}
		}()
	}
}

// Close stops the workers; a patch being made is abandoned at its next step.
func (p *Patcher) Close(ctx context.Context) error {
	p.cancel()
	done := make(chan struct{})
	go func() { p.wg.Wait(); close(done) }()
	select {
	case <-done:
		return nil
	case <-ctx.Done():
		return fmt.Errorf("patcher: close: %w", ctx.Err())
	}
}

// Delta returns the signed manifest of a delta from the image with sha base to the release
// target (its full manifest): one the Patcher made, or one signed offline and added with
// Store.AddDelta, and in either case signed for this very release, never for another that
// shares its image. ready is false while the patch is being made (it has been queued); err
// says why no delta is offered for this pair: the base is unknown here, the patch is not
// small enough, or manifests are signed offline and none was added for this release, or the
// one added was signed before the release was last re-signed.
func (p *Patcher) Delta(base string, target protocol.Manifest) (m protocol.Manifest, ready bool, err error) {
	base, ok := validSHA(base)
	if !ok {
		return m, false, errors.New("no delta: base is not a sha256")
	}
	if base == target.SHA256 {
		return m, false, errors.New("no delta: base is the target")
	}
	key := deltaKey(target.Model, target.Version, base)
	var rec deltaRecord
	var found bool
	err = p.opts.DB.View(func(tx *bolt.Tx) error {
		v := tx.Bucket(bucketDeltas).Get([]byte(key))
		if v == nil {
			return nil
		}
		found = true
		return json.Unmarshal(v, &rec)
	})
	if err != nil {
		return m, false, fmt.Errorf("delta cache: %w", err)
	}
	// A verdict on an earlier signing of the release (another expiry) is stale: the
	// Patcher makes the delta again, which replaces it.
	stale := found && (rec.Target != target.SHA256 || rec.Manifest != nil && !forRelease(*rec.Manifest, target))
	switch {
	case found && !stale && rec.Manifest == nil:
		return m, false, errors.New("no delta: " + rec.Refused)
	case found && !stale:
		return *rec.Manifest, true, nil
	}
	if !p.opts.Store.CanSign() {
		if stale {
			return m, false, fmt.Errorf("no delta: the delta manifest added for %s %s was signed before the release was signed again; sign it again with 'fota delta sign' and add it with 'fota delta add'",
				target.Model, target.Version)
		}
		return m, false, errors.New("no delta: manifests are signed offline; sign one with 'fota delta sign' and add it with 'fota delta add'")
	}
	if _, err := p.opts.Store.Path(base); err != nil {
		return m, false, errors.New("no delta: base image is not in the store")
	}
	p.mu.Lock()
	defer p.mu.Unlock()
	if p.pending[key] {
		return m, false, nil
	}
	select {
	case p.queue <- patchJob{base, target}:
		p.pending[key] = true
		return m, false, nil
	default:
		return m, false, errors.New("no delta: patch queue is full")
	}
}

// make builds, verifies, stores and signs one patch, and records the verdict.
func (p *Patcher) make(j patchJob) {
	key := deltaKey(j.target.Model, j.target.Version, j.base)
	rec, u, err := p.build(j)
	defer func() {
		if rerr := u.remove(); rerr != nil {
			p.log.Warn("remove temp file", "err", rerr)
		}
	}()
	if err != nil {
		if p.ctx.Err() != nil {
			p.done(key)
			return // shutting down: nothing recorded, the pair is asked for again later
		}
		rec = deltaRecord{Refused: err.Error()}
	}
	rec.Target = j.target.SHA256
	if p.beforeVerdict != nil {
		p.beforeVerdict(j.base, j.target.SHA256)
	}
	stored, _, err := p.opts.Store.commitDelta(key, rec, u, func(tx *bolt.Tx) (bool, error) {
		b, err := bucket(tx)
		if err != nil {
			return false, err
		}
		f, ok, err := getRecord(b, j.target.Model, j.target.Version)
		return ok && f.SHA256 == j.target.SHA256, err
	})
	p.done(key)
	switch {
	case err != nil:
		p.log.Error("store delta verdict", "err", err)
		return
	case !stored:
		p.log.Info("target deleted while its delta was made: nothing kept", "base", short(j.base), "model", j.target.Model, "target", j.target.Version)
		return
	case rec.Manifest == nil:
		p.log.Warn("no delta", "base", short(j.base), "model", j.target.Model, "target", j.target.Version, "reason", rec.Refused)
	default:
		p.log.Info("delta ready", "base", short(j.base), "model", j.target.Model, "target", j.target.Version, "patch", rec.Manifest.Delta.PatchSize, "image", rec.Manifest.Size)
	}
	if p.opts.OnReady != nil {
		p.opts.OnReady(j.base, j.target.SHA256)
	}
}

// done lets the pair be queued again.
func (p *Patcher) done(key string) {
	p.mu.Lock()
	delete(p.pending, key)
	p.mu.Unlock()
}

// build makes, verifies and signs one patch, and writes it to a temp file. The patch is
// installed with its verdict, by commitDelta, once the target is known to be still there.
func (p *Patcher) build(j patchJob) (deltaRecord, *upload, error) {
	old, err := p.readArtifact(j.base)
	if err != nil {
		return deltaRecord{}, nil, fmt.Errorf("read base: %w", err)
	}
	target, err := p.readArtifact(j.target.SHA256)
	if err != nil {
		return deltaRecord{}, nil, fmt.Errorf("read target: %w", err)
	}
	patch, err := delta.Make(old, target)
	if err != nil {
		return deltaRecord{}, nil, fmt.Errorf("make patch: %w", err)
	}
	if limit := int64(float64(len(target)) * p.opts.MaxRatio); int64(len(patch)) > limit {
		return deltaRecord{}, nil, fmt.Errorf("patch is %d bytes, above %.0f%% of the %d-byte image", len(patch), 100*p.opts.MaxRatio, len(target))
	}
	// Never offer a patch that has not been seen to rebuild the exact target.
	rebuilt, err := delta.Apply(old, bytes.NewReader(patch), j.target.Size)
	if err != nil {
		return deltaRecord{}, nil, fmt.Errorf("verify patch: %w", err)
	}
	if sum := sha256.Sum256(rebuilt); hex.EncodeToString(sum[:]) != j.target.SHA256 {
		return deltaRecord{}, nil, errors.New("verify patch: rebuilt image does not match the target sha256")
	}
	// Sign first: without the key nothing is stored.
	psum := sha256.Sum256(patch)
	m := j.target
	m.Signature = ""
	m.Delta = &protocol.Delta{Base: j.base, PatchSHA256: hex.EncodeToString(psum[:]), PatchSize: int64(len(patch)), Format: delta.Format}
	signed, err := p.opts.Store.SignManifest(m)
	if err != nil {
		return deltaRecord{}, nil, fmt.Errorf("sign delta manifest: %w", err)
	}
	if err := p.ctx.Err(); err != nil {
		return deltaRecord{}, nil, err
	}
	u, err := p.opts.Store.receive(p.ctx, bytes.NewReader(patch))
	if err != nil {
		return deltaRecord{}, nil, fmt.Errorf("store patch: %w", err)
	}
	return deltaRecord{Manifest: &signed}, u, nil
}

func (p *Patcher) readArtifact(sha string) ([]byte, error) {
	path, err := p.opts.Store.Path(sha)
	if err != nil {
		return nil, err
	}
	return os.ReadFile(path)
}

// A patch lives as long as a release it leads to: Store.Delete drops the verdicts on a
// release with its record, and their patches unless another verdict (of another release
// sharing the image) or a firmware record names them; deleting a base keeps its patches,
// since devices still running that base can use them.
//
// Locking. Every step that installs or removes an artifact file, or writes a record that
// names one, runs under Store.commitMu: Add, Delete, commitDelta (for the Patcher and
// AddDelta), sweepDeltas and Open's sweepUnnamed. A verdict is stored in the transaction that
// checks the release's firmware record still names its target (AddDelta: still has the
// manifest the upload repeats), and Delete removes that record and the release's verdicts
// in one transaction, so either the verdict commits first and Delete drops it, or Delete
// commits first and the verdict is not stored.
// Whether a patch is still named by a firmware record or another verdict is decided inside
// the transaction that drops a verdict, and the file is removed after the commit but before
// commitMu is released, so no record can start naming it, nor install's "already there"
// shortcut rely on it, between the decision and the removal.

// commitDelta stores the verdict rec under key (a deltaKey) and installs its patch u (nil for a
// refusal), provided still, run in the same transaction, reports that the target is still
// there. stored is false when it is not: the target was deleted while the patch was being
// made or uploaded, and then nothing is installed. created is false when the key already had
// this very verdict. A patch the replaced verdict named, and no record names any more, is
// removed.
func (s *Store) commitDelta(key string, rec deltaRecord, u *upload, still func(*bolt.Tx) (bool, error)) (stored, created bool, err error) {
	data, err := json.Marshal(rec)
	if err != nil {
		return false, false, fmt.Errorf("encode delta verdict: %w", err)
	}
	s.commitMu.Lock()
	defer s.commitMu.Unlock()
	installed := false
	var unnamed []string
	err = s.db.Update(func(tx *bolt.Tx) error {
		stored, created, installed, unnamed = false, false, false, nil
		ok, err := still(tx)
		if err != nil || !ok {
			return err
		}
		b := tx.Bucket(bucketDeltas)
		old := b.Get([]byte(key))
		created = !bytes.Equal(old, data)
		if err := b.Put([]byte(key), data); err != nil {
			return err
		}
		stored = true
		if p := patchOf(old); p != "" && (rec.Manifest == nil || p != rec.Manifest.Delta.PatchSHA256) {
			named, err := namedSHAs(tx)
			if err != nil {
				return err
			}
			if !named[p] {
				unnamed = append(unnamed, p)
			}
		}
		if u == nil {
			return nil
		}
		// Last, as in Add, so that a failure above leaves no file to clean up.
		installed, err = s.install(u)
		return err
	})
	if err != nil {
		if installed {
			// The file was not there before, and under commitMu no other record can have
			// come to name it, so it is an orphan now that the verdict did not commit.
			if rerr := s.removeArtifact(u.sha); rerr != nil {
				s.log.Warn("remove orphan patch", "sha256", u.sha, "err", rerr)
			}
		}
		return false, false, fmt.Errorf("store delta verdict: %w", err)
	}
	if _, err := s.removePatches(unnamed); err != nil {
		s.log.Warn("remove replaced patch", "err", err)
	}
	return stored, created, nil
}

// sweepDeltas drops the verdicts whose release no firmware record holds with their target
// image, a crash having left them between Delete's steps or an older fota before patches
// were collected, and removes the patches only they named. (Open has already removed every file no record names.) It
// runs under commitMu.
func (s *Store) sweepDeltas() (records, patches int, err error) {
	s.commitMu.Lock()
	defer s.commitMu.Unlock()
	var unnamed []string
	err = s.db.Update(func(tx *bolt.Tx) error {
		b, err := bucket(tx)
		if err != nil {
			return err
		}
		images := make(map[string]string) // by recordKey
		if err := allRecords(b, func(f Firmware) error {
			images[string(recordKey(f.Model, f.Version))] = f.SHA256
			return nil
		}); err != nil {
			return err
		}
		records, unnamed, err = dropDeltas(tx, func(model, version, target string) bool {
			sha, ok := images[string(recordKey(model, version))]
			return !ok || sha != target
		})
		return err
	})
	if err != nil {
		return 0, 0, fmt.Errorf("sweep deltas: %w", err)
	}
	patches, err = s.removePatches(unnamed)
	if err != nil {
		return records, patches, fmt.Errorf("sweep deltas: %w", err)
	}
	return records, patches, nil
}

// patchOf returns the patch sha a stored verdict names, or "" for a refusal. A verdict that
// does not decode names nothing: Delta cannot serve it, so no device reaches a patch through it.
func patchOf(v []byte) string {
	var rec deltaRecord
	if json.Unmarshal(v, &rec) != nil || rec.Manifest == nil || rec.Manifest.Delta == nil {
		return ""
	}
	sha, _ := validSHA(rec.Manifest.Delta.PatchSHA256)
	return sha
}

// imagesBySHA returns the firmware records by image sha256; of two records sharing an image,
// the first in key order.
func imagesBySHA(tx *bolt.Tx) (map[string]Firmware, error) {
	b, err := bucket(tx)
	if err != nil {
		return nil, err
	}
	images := make(map[string]Firmware)
	err = allRecords(b, func(f Firmware) error {
		if sha, ok := validSHA(f.SHA256); ok {
			if _, seen := images[sha]; !seen {
				images[sha] = f
			}
		}
		return nil
	})
	return images, err
}

// namedSHAs returns every artifact sha a record names: images and delta patches.
func namedSHAs(tx *bolt.Tx) (map[string]bool, error) {
	images, err := imagesBySHA(tx)
	if err != nil {
		return nil, err
	}
	named := make(map[string]bool, len(images))
	for sha := range images {
		named[sha] = true
	}
	if b := tx.Bucket(bucketDeltas); b != nil {
		err = b.ForEach(func(_, v []byte) error {
			if p := patchOf(v); p != "" {
				named[p] = true
			}
			return nil
		})
	}
	return named, err
}

// removePatches removes the patch artifacts shas, which no record names any more, and
// returns how many files it removed. Callers hold commitMu.
func (s *Store) removePatches(shas []string) (int, error) {
	removed := 0
	var errs []error
	for _, sha := range shas {
		if _, err := os.Stat(s.artifactPath(sha)); errors.Is(err, fs.ErrNotExist) {
			continue
		}
		err := s.removeArtifact(sha)
		// Evict after removing, as Delete does for images.
		s.files.evict(sha)
		if err != nil {
			errs = append(errs, fmt.Errorf("patch %s: %w", sha, err))
			continue
		}
		removed++
	}
	return removed, errors.Join(errs...)
}
