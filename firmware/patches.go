package firmware

import (
	"bytes"
	"context"
	"crypto/sha256"
	"encoding/hex"
	"encoding/json"
	"errors"
	"fmt"
	"log/slog"
	"os"
	"sync"

	"github.com/fota-dev/fota/firmware/delta"
	"github.com/fota-dev/fota/protocol"
	bolt "go.etcd.io/bbolt"
)

// bucketDeltas caches what the Patcher decided for each (base, target) pair: a signed delta
// manifest, or why no delta is offered. Key: base sha + ":" + target sha.
var bucketDeltas = []byte("deltas")

// deltaRecord is the Patcher's verdict for one pair.
type deltaRecord struct {
	Manifest *protocol.Manifest `json:"manifest,omitempty"` // signed, with Delta set
	Refused  string             `json:"refused,omitempty"`  // why there is no delta
}

// PatcherOptions configure a Patcher. Store and DB are required.
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
	// OnReady is called, from a worker, after a pair's verdict is stored.
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
}

type patchJob struct {
	base   string
	target protocol.Manifest
}

// NewPatcher creates the cache bucket. Start starts the workers.
func NewPatcher(opts PatcherOptions) (*Patcher, error) {
	if opts.Store == nil || opts.DB == nil {
		return nil, errors.New("patcher: Store and DB are required")
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
	if err := opts.DB.Update(func(tx *bolt.Tx) error {
		_, err := tx.CreateBucketIfNotExists(bucketDeltas)
		return err
	}); err != nil {
		return nil, fmt.Errorf("patcher: %w", err)
	}
	ctx, cancel := context.WithCancel(context.Background())
	return &Patcher{
		opts: opts, log: opts.Logger.With("component", "patcher"),
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

func pairKey(base, target string) string { return base + ":" + target }

// Delta returns the signed manifest of a delta from the image with sha base to target. ready
// is false while the patch is being made (it has been queued); err says why no delta is
// offered for this pair: the base is unknown here, the patch is not small enough, or
// manifests are signed offline.
func (p *Patcher) Delta(base string, target protocol.Manifest) (m protocol.Manifest, ready bool, err error) {
	base, ok := validSHA(base)
	if !ok {
		return m, false, errors.New("no delta: base is not a sha256")
	}
	if base == target.SHA256 {
		return m, false, errors.New("no delta: base is the target")
	}
	key := pairKey(base, target.SHA256)
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
	if found {
		if rec.Manifest == nil {
			return m, false, errors.New("no delta: " + rec.Refused)
		}
		return *rec.Manifest, true, nil
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
	key := pairKey(j.base, j.target.SHA256)
	rec, err := p.build(j)
	if err != nil {
		if p.ctx.Err() != nil {
			return // shutting down: nothing recorded, the pair is asked for again later
		}
		rec = deltaRecord{Refused: err.Error()}
		p.log.Warn("no delta", "base", j.base[:12], "target", j.target.Version, "reason", err)
	}
	data, err := json.Marshal(rec)
	if err == nil {
		err = p.opts.DB.Update(func(tx *bolt.Tx) error {
			return tx.Bucket(bucketDeltas).Put([]byte(key), data)
		})
	}
	p.mu.Lock()
	delete(p.pending, key)
	p.mu.Unlock()
	if err != nil {
		p.log.Error("store delta verdict", "err", err)
		return
	}
	if p.opts.OnReady != nil {
		p.opts.OnReady(j.base, j.target.SHA256)
	}
}

func (p *Patcher) build(j patchJob) (deltaRecord, error) {
	old, err := p.readArtifact(j.base)
	if err != nil {
		return deltaRecord{}, fmt.Errorf("read base: %w", err)
	}
	target, err := p.readArtifact(j.target.SHA256)
	if err != nil {
		return deltaRecord{}, fmt.Errorf("read target: %w", err)
	}
	patch, err := delta.Make(old, target)
	if err != nil {
		return deltaRecord{}, fmt.Errorf("make patch: %w", err)
	}
	if limit := int64(float64(len(target)) * p.opts.MaxRatio); int64(len(patch)) > limit {
		return deltaRecord{}, fmt.Errorf("patch is %d bytes, above %.0f%% of the %d-byte image", len(patch), 100*p.opts.MaxRatio, len(target))
	}
	// Never offer a patch that has not been seen to rebuild the exact target.
	rebuilt, err := delta.Apply(old, bytes.NewReader(patch), j.target.Size)
	if err != nil {
		return deltaRecord{}, fmt.Errorf("verify patch: %w", err)
	}
	if sum := sha256.Sum256(rebuilt); hex.EncodeToString(sum[:]) != j.target.SHA256 {
		return deltaRecord{}, errors.New("verify patch: rebuilt image does not match the target sha256")
	}
	// Sign first: without the key nothing is stored.
	psum := sha256.Sum256(patch)
	m := j.target
	m.Signature = ""
	m.Delta = &protocol.Delta{Base: j.base, PatchSHA256: hex.EncodeToString(psum[:]), PatchSize: int64(len(patch)), Format: delta.Format}
	signed, err := p.opts.Store.SignManifest(m)
	if err != nil {
		return deltaRecord{}, fmt.Errorf("sign delta manifest: %w", err)
	}
	if err := p.ctx.Err(); err != nil {
		return deltaRecord{}, err
	}
	u, err := p.opts.Store.receive(p.ctx, bytes.NewReader(patch))
	if err != nil {
		return deltaRecord{}, fmt.Errorf("store patch: %w", err)
	}
	if _, err := p.opts.Store.install(u); err != nil {
		u.remove()
		return deltaRecord{}, fmt.Errorf("store patch: %w", err)
	}
	p.log.Info("delta ready", "base", j.base[:12], "target", j.target.Version, "patch", len(patch), "image", len(target))
	return deltaRecord{Manifest: &signed}, nil
}

func (p *Patcher) readArtifact(sha string) ([]byte, error) {
	path, err := p.opts.Store.Path(sha)
	if err != nil {
		return nil, err
	}
	return os.ReadFile(path)
}
