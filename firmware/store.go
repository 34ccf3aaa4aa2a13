package firmware

import (
	"cmp"
	"context"
	"errors"
	"fmt"
	"io"
	"log/slog"
	"math"
	"os"
	"path/filepath"
	"slices"
	"sync"
	"time"

	"go.etcd.io/bbolt"

	"github.com/fota-dev/fota/protocol"
)

// DefaultMaxSize is the largest image accepted when Options.MaxSize is zero.
const DefaultMaxSize = 64 << 20

// Options configure a Store. Zero values mean the defaults.
type Options struct {
	// Dir holds the artifacts (Dir/sha256/...) and upload temp files (Dir/tmp). Required.
	// One Store owns a Dir: Open removes whatever it finds in Dir/tmp.
	Dir string
	// DB holds the metadata in the bucket "firmware". Required; the caller opens and closes it.
	DB *bbolt.DB
	// MaxSize is the largest image Add accepts, in bytes; default DefaultMaxSize.
	MaxSize int64
	// Logger defaults to discarding.
	Logger *slog.Logger
}

// Store keeps firmware images and their records. Its methods are safe for concurrent use.
type Store struct {
	dir     string
	db      *bbolt.DB
	maxSize int64
	log     *slog.Logger
	files   *fileCache

	// commitMu serialises the steps of Add and Delete that touch both the bucket and the
	// artifact files, so a file is never removed while another record is about to refer to it,
	// and the inUse callback of Delete can run outside a bbolt transaction.
	commitMu sync.Mutex
}

// Open prepares the directories and the bucket, and removes temp files a crash left behind.
func Open(opts Options) (*Store, error) {
	switch {
	case opts.Dir == "":
		return nil, errors.New("open firmware store: no directory")
	case opts.DB == nil:
		return nil, errors.New("open firmware store: no database")
	case opts.MaxSize < 0:
		return nil, fmt.Errorf("open firmware store: negative max size %d", opts.MaxSize)
	}
	if opts.MaxSize == 0 {
		opts.MaxSize = DefaultMaxSize
	}
	if opts.Logger == nil {
		opts.Logger = slog.New(slog.DiscardHandler)
	}
	s := &Store{
		dir:     opts.Dir,
		db:      opts.DB,
		maxSize: opts.MaxSize,
		log:     opts.Logger.With("component", "firmware"),
		files:   newFileCache(defaultMaxOpen),
	}
	for _, d := range []string{s.dir, filepath.Join(s.dir, objectsDir), filepath.Join(s.dir, tmpDir)} {
		if err := os.MkdirAll(d, 0o750); err != nil {
			return nil, fmt.Errorf("open firmware store: %w", err)
		}
	}
	if err := syncDir(s.dir); err != nil {
		return nil, fmt.Errorf("open firmware store: %w", err)
	}
	if err := s.cleanTmp(); err != nil {
		return nil, fmt.Errorf("open firmware store: %w", err)
	}
	err := s.db.Update(func(tx *bbolt.Tx) error {
		_, err := tx.CreateBucketIfNotExists(bucketName)
		return err
	})
	if err != nil {
		return nil, fmt.Errorf("open firmware store: create bucket: %w", err)
	}
	return s, nil
}

// Close closes the cached file handles. It does not close the DB. Calls after Close fail with
// ErrClosed.
func (s *Store) Close() error {
	s.files.close()
	return nil
}

func (s *Store) isClosed() bool {
	s.files.mu.Lock()
	defer s.files.mu.Unlock()
	return s.files.closed
}

// AddRequest is one image to store.
type AddRequest struct {
	Model   string
	Version string // any form protocol.ParseVersion accepts; stored canonical
	// Counter is the security counter; 0 means one above the highest counter of Model, or 1.
	Counter uint64
	Notes   string
	Body    io.Reader // read once, up to MaxSize+1 bytes
}

// Add stores req.Body as the image of (req.Model, req.Version). Adding the same bytes again is
// a no-op that returns the existing record with created false; other bytes under a stored
// version fail with ErrConflict, as does an explicit Counter that differs from the stored one.
// An empty body fails with ErrEmpty, one above MaxSize with ErrTooLarge, a bad model with
// ErrBadModel and a bad version with protocol.ErrBadVersion; none of them leave anything behind.
func (s *Store) Add(ctx context.Context, req AddRequest) (f Firmware, created bool, err error) {
	if err := ValidModel(req.Model); err != nil {
		return Firmware{}, false, fmt.Errorf("add firmware: %w", err)
	}
	_, version, err := canonicalVersion(req.Version)
	if err != nil {
		return Firmware{}, false, fmt.Errorf("add firmware: %w", err)
	}
	if s.isClosed() {
		return Firmware{}, false, fmt.Errorf("add firmware: %w", ErrClosed)
	}
	u, err := s.receive(ctx, req.Body)
	if err != nil {
		return Firmware{}, false, fmt.Errorf("add firmware %s %s: %w", req.Model, version, err)
	}
	defer func() {
		tmp := u.path
		if rerr := u.remove(); rerr != nil {
			s.log.Warn("remove temp file", "path", tmp, "err", rerr)
		}
	}()

	s.commitMu.Lock()
	defer s.commitMu.Unlock()
	if err := ctx.Err(); err != nil {
		return Firmware{}, false, fmt.Errorf("add firmware %s %s: %w", req.Model, version, err)
	}
	installed := false
	err = s.db.Update(func(tx *bbolt.Tx) error {
		b, err := bucket(tx)
		if err != nil {
			return err
		}
		old, exists, err := getRecord(b, req.Model, version)
		if err != nil {
			return err
		}
		if exists {
			if old.SHA256 != u.sha {
				return fmt.Errorf("%w: stored sha256 %s, upload %s", ErrConflict, old.SHA256, u.sha)
			}
			if req.Counter != 0 && req.Counter != old.Counter {
				return fmt.Errorf("%w: stored counter %d, requested %d", ErrConflict, old.Counter, req.Counter)
			}
			// Repair a missing file from the identical upload rather than keep a record
			// whose image cannot be served.
			if _, err := s.install(u); err != nil {
				return err
			}
			f = old
			return nil
		}
		counter := req.Counter
		if counter == 0 {
			if counter, err = nextCounter(b, req.Model); err != nil {
				return err
			}
		}
		f = Firmware{
			Model:   req.Model,
			Version: version,
			Size:    u.size,
			SHA256:  u.sha,
			Counter: counter,
			Notes:   req.Notes,
			// Round(0) drops the monotonic reading, so f equals what Get decodes later.
			Created: time.Now().UTC().Round(0),
		}
		if err := putRecord(b, f); err != nil {
			return err
		}
		// Last, so that any earlier failure leaves no file to clean up.
		installed, err = s.install(u)
		created = true
		return err
	})
	if err != nil {
		if installed {
			// The record did not commit and, under commitMu, no other record can name this
			// sha (the file was not there before), so the file is an orphan.
			if rerr := s.removeArtifact(u.sha); rerr != nil {
				s.log.Warn("remove orphan artifact", "sha256", u.sha, "err", rerr)
			}
		}
		return Firmware{}, false, fmt.Errorf("add firmware %s %s: %w", req.Model, version, err)
	}
	if created {
		s.log.Info("firmware added", "model", f.Model, "version", f.Version, "sha256", f.SHA256, "size", f.Size, "counter", f.Counter)
	}
	return f, created, nil
}

func nextCounter(b *bbolt.Bucket, model string) (uint64, error) {
	var highest uint64
	err := modelRecords(b, model, func(f Firmware) error {
		highest = max(highest, f.Counter)
		return nil
	})
	if err != nil {
		return 0, err
	}
	if highest == math.MaxUint64 {
		return 0, fmt.Errorf("security counter of %s exhausted", model)
	}
	return highest + 1, nil
}

// Get returns the record of (model, version); version may be in any form ParseVersion accepts.
func (s *Store) Get(model, version string) (Firmware, error) {
	if err := ValidModel(model); err != nil {
		return Firmware{}, fmt.Errorf("get firmware: %w", err)
	}
	_, canon, err := canonicalVersion(version)
	if err != nil {
		return Firmware{}, fmt.Errorf("get firmware: %w", err)
	}
	var f Firmware
	err = s.db.View(func(tx *bbolt.Tx) error {
		b, err := bucket(tx)
		if err != nil {
			return err
		}
		var ok bool
		f, ok, err = getRecord(b, model, canon)
		if err == nil && !ok {
			err = ErrNotFound
		}
		return err
	})
	if err != nil {
		return Firmware{}, fmt.Errorf("get firmware %s %s: %w", model, canon, err)
	}
	return f, nil
}

// List returns every record, by model, then by semantic version, oldest first.
func (s *Store) List() ([]Firmware, error) {
	var all []Firmware
	err := s.db.View(func(tx *bbolt.Tx) error {
		b, err := bucket(tx)
		if err != nil {
			return err
		}
		return allRecords(b, func(f Firmware) error {
			all = append(all, f)
			return nil
		})
	})
	if err != nil {
		return nil, fmt.Errorf("list firmware: %w", err)
	}
	slices.SortFunc(all, func(a, b Firmware) int {
		if c := cmp.Compare(a.Model, b.Model); c != 0 {
			return c
		}
		return compareVersions(a.Version, b.Version)
	})
	return all, nil
}

// compareVersions orders stored (hence parseable) versions; a record that somehow fails to
// parse sorts by its string rather than breaking List.
func compareVersions(a, b string) int {
	c, err := protocol.CompareVersions(a, b)
	if err != nil {
		return cmp.Compare(a, b)
	}
	return c
}

// Latest returns the record of model with the highest semantic version, pre-releases included,
// or ErrNotFound.
func (s *Store) Latest(model string) (Firmware, error) {
	if err := ValidModel(model); err != nil {
		return Firmware{}, fmt.Errorf("latest firmware: %w", err)
	}
	var latest Firmware
	found := false
	err := s.db.View(func(tx *bbolt.Tx) error {
		b, err := bucket(tx)
		if err != nil {
			return err
		}
		return modelRecords(b, model, func(f Firmware) error {
			if !found || compareVersions(f.Version, latest.Version) > 0 {
				latest, found = f, true
			}
			return nil
		})
	})
	if err != nil {
		return Firmware{}, fmt.Errorf("latest firmware %s: %w", model, err)
	}
	if !found {
		return Firmware{}, fmt.Errorf("latest firmware %s: %w", model, ErrNotFound)
	}
	return latest, nil
}

// Delete removes the record of (model, version), and its artifact file unless another record
// names the same sha256. If inUse is not nil and returns true for the record, Delete fails
// with ErrInUse. inUse runs outside any transaction of the store, so it may use the same DB;
// it must not call Add or Delete.
func (s *Store) Delete(model, version string, inUse func(Firmware) bool) error {
	if err := ValidModel(model); err != nil {
		return fmt.Errorf("delete firmware: %w", err)
	}
	_, canon, err := canonicalVersion(version)
	if err != nil {
		return fmt.Errorf("delete firmware: %w", err)
	}
	if s.isClosed() {
		return fmt.Errorf("delete firmware: %w", ErrClosed)
	}
	s.commitMu.Lock()
	defer s.commitMu.Unlock()
	// Under commitMu nothing else writes the bucket, so the record read here is the one the
	// update below deletes.
	f, err := s.Get(model, canon)
	if err != nil {
		return fmt.Errorf("delete firmware: %w", err)
	}
	if inUse != nil && inUse(f) {
		return fmt.Errorf("delete firmware %s %s: %w", model, canon, ErrInUse)
	}
	shared := false
	err = s.db.Update(func(tx *bbolt.Tx) error {
		b, err := bucket(tx)
		if err != nil {
			return err
		}
		if err := b.Delete(recordKey(model, canon)); err != nil {
			return err
		}
		return allRecords(b, func(o Firmware) error {
			shared = shared || o.SHA256 == f.SHA256
			return nil
		})
	})
	if err != nil {
		return fmt.Errorf("delete firmware %s %s: %w", model, canon, err)
	}
	s.log.Info("firmware deleted", "model", model, "version", canon, "sha256", f.SHA256, "artifact_kept", shared)
	if shared {
		return nil
	}
	sha, ok := validSHA(f.SHA256)
	if !ok {
		return fmt.Errorf("delete firmware %s %s: record has bad sha256 %q", model, canon, f.SHA256)
	}
	err = s.removeArtifact(sha)
	// Evict after removing: a ReadAt racing with us either opened the file before the removal
	// (and its handle is dropped here) or finds it gone.
	s.files.evict(sha)
	if err != nil {
		return fmt.Errorf("delete firmware %s %s: %w", model, canon, err)
	}
	return nil
}
