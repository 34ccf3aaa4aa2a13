package firmware

import (
	"cmp"
	"context"
	"crypto/ed25519"
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
	// SigningKey is the release key; with it Add signs the manifest of what it stores. Nil
	// means offline mode: manifests are signed on another machine and Add requires one.
	SigningKey ed25519.PrivateKey
	// PublicKey is the release public key, which every manifest Add accepts must verify
	// against. Required in offline mode; with SigningKey it defaults to, and must be, the
	// key's public half.
	PublicKey ed25519.PublicKey
}

// Store keeps firmware images and their records. Its methods are safe for concurrent use.
type Store struct {
	dir     string
	db      *bbolt.DB
	maxSize int64
	log     *slog.Logger
	files   *fileCache
	key     ed25519.PrivateKey // nil in offline mode
	pub     ed25519.PublicKey

	// commitMu serialises the steps of Add, Delete, AddDelta, the Patcher (commitDelta,
	// sweepDeltas) and Open's sweep that touch both the buckets and the artifact files, so a file is never removed while
	// another record is about to refer to it, and the inUse callback of Delete can run outside
	// a bbolt transaction. patches.go explains how delta patches rely on it.
	commitMu sync.Mutex
}

// Open prepares the directories and the buckets, moves delta verdicts stored by an older fota
// to their release (see migrateDeltas), and removes what a crash left behind: temp files, and
// artifact files that no record names.
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
	if err := checkKeys(&opts); err != nil {
		return nil, fmt.Errorf("open firmware store: %w", err)
	}
	s := &Store{
		dir:     opts.Dir,
		db:      opts.DB,
		maxSize: opts.MaxSize,
		log:     opts.Logger.With("component", "firmware"),
		files:   newFileCache(defaultMaxOpen),
		key:     opts.SigningKey,
		pub:     opts.PublicKey,
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
	var moved, dropped int
	err := s.db.Update(func(tx *bbolt.Tx) (err error) {
		for _, name := range [][]byte{bucketName, bucketDeltas} {
			if _, err := tx.CreateBucketIfNotExists(name); err != nil {
				return fmt.Errorf("create buckets: %w", err)
			}
		}
		if moved, dropped, err = migrateDeltas(tx); err != nil {
			return fmt.Errorf("migrate delta verdicts: %w", err)
		}
		return nil
	})
	if err != nil {
		return nil, fmt.Errorf("open firmware store: %w", err)
	}
	if moved > 0 || dropped > 0 {
		s.log.Info("delta verdicts now kept per release", "moved", moved, "dropped", dropped)
	}
	if err := s.sweepUnnamed(); err != nil {
		return nil, fmt.Errorf("open firmware store: %w", err)
	}
	if err := s.checkSignatures(); err != nil {
		return nil, fmt.Errorf("open firmware store: %w", err)
	}
	return s, nil
}

// checkKeys fills in opts.PublicKey from opts.SigningKey and checks that the two agree: a
// store that signs with one key and checks uploads against another would accept manifests
// its own devices refuse.
func checkKeys(opts *Options) error {
	if opts.SigningKey != nil {
		if len(opts.SigningKey) != ed25519.PrivateKeySize {
			return fmt.Errorf("%w: signing key of %d bytes, want %d", ErrBadKey, len(opts.SigningKey), ed25519.PrivateKeySize)
		}
		derived := opts.SigningKey.Public().(ed25519.PublicKey)
		if opts.PublicKey == nil {
			opts.PublicKey = derived
		} else if !derived.Equal(opts.PublicKey) {
			return errors.New("public key is not the signing key's")
		}
	}
	switch {
	case opts.PublicKey == nil:
		return errors.New("no release key: a public key (offline mode) or a signing key is required")
	case len(opts.PublicKey) != ed25519.PublicKeySize:
		return fmt.Errorf("%w: public key of %d bytes, want %d", ErrBadKey, len(opts.PublicKey), ed25519.PublicKeySize)
	}
	return nil
}

// checkSignatures signs the records stored before signing existed, when it can, and warns
// about those that devices pinning the current key would refuse.
func (s *Store) checkSignatures() error {
	unsigned, foreign := 0, 0
	err := s.db.View(func(tx *bbolt.Tx) error {
		b, err := bucket(tx)
		if err != nil {
			return err
		}
		return allRecords(b, func(f Firmware) error {
			switch {
			case f.Signature == "":
				unsigned++
			case VerifySignature(f.Manifest(), s.pub) != nil:
				foreign++
			}
			return nil
		})
	})
	if err != nil {
		return fmt.Errorf("check signatures: %w", err)
	}
	if unsigned > 0 && s.key != nil {
		// Only now a write transaction: most Opens find nothing to sign.
		err := s.db.Update(func(tx *bbolt.Tx) error {
			b, err := bucket(tx)
			if err != nil {
				return err
			}
			var todo []Firmware
			if err := allRecords(b, func(f Firmware) error {
				if f.Signature == "" {
					todo = append(todo, f)
				}
				return nil
			}); err != nil {
				return err
			}
			for _, f := range todo {
				if err := s.sign(&f); err != nil {
					return err
				}
				if err := putRecord(b, f); err != nil {
					return err
				}
			}
			return nil
		})
		if err != nil {
			return fmt.Errorf("sign old records: %w", err)
		}
		s.log.Info("signed firmware stored before signing", "count", unsigned)
		unsigned = 0
	}
	if unsigned > 0 {
		s.log.Warn("unsigned firmware stored: devices refuse it; add it again with a manifest signed offline", "count", unsigned)
	}
	if foreign > 0 {
		s.log.Warn("firmware signed by another release key stored: devices pinning this key refuse it", "count", foreign)
	}
	return nil
}

// CanSign reports whether the store holds the signing key (online mode).
func (s *Store) CanSign() bool { return s.key != nil }

// SignManifest signs m with the release key, for manifests the store does not keep itself,
// such as those of delta patches. In offline mode it fails with ErrUnsigned.
func (s *Store) SignManifest(m protocol.Manifest) (protocol.Manifest, error) {
	if s.key == nil {
		return protocol.Manifest{}, fmt.Errorf("sign manifest: %w: this server holds only the release public key (offline mode)", ErrUnsigned)
	}
	return Sign(m, s.key)
}

// sign sets f.Signature to the signature of f's manifest; the store must hold the key.
func (s *Store) sign(f *Firmware) error {
	m := f.Manifest()
	m.Signature = ""
	signed, err := Sign(m, s.key)
	if err != nil {
		return err
	}
	f.Signature = signed.Signature
	return nil
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
	// Model and Version name the image; when Manifest is set they may be empty, and are then
	// taken from it.
	Model   string
	Version string // any form protocol.ParseVersion accepts; stored canonical
	// Counter is the security counter; 0 means the Manifest's, or without one, one above the
	// highest counter of Model, or 1.
	Counter uint64
	Notes   string
	// Expires is when devices stop accepting the manifest the store signs; zero: never. It
	// is kept to whole seconds. With a Manifest, the manifest's expiry is the one that counts.
	Expires time.Time
	// Manifest is a manifest signed by the release key, offline; required in offline mode. It
	// must describe exactly this image: model, canonical version, counter, size and sha256,
	// with no delta and an expiry in the form Firmware.Manifest writes (UTC, whole seconds).
	Manifest *protocol.Manifest
	Body     io.Reader // read once, up to MaxSize+1 bytes
}

// Add stores req.Body as the image of (req.Model, req.Version) with a signed manifest: the
// store signs it, or req.Manifest, signed offline, comes with the upload. Adding the same
// bytes again returns the existing record with created false; it is re-signed when the request
// brings a new expiry or another valid manifest, and is left alone otherwise. Other bytes under
// a stored version fail with ErrConflict, as does an explicit Counter that differs from the
// stored one.
//
// An empty body fails with ErrEmpty, one above MaxSize with ErrTooLarge, a bad model with
// ErrBadModel, a bad version with protocol.ErrBadVersion, notes above MaxNotesLen or not
// UTF-8 with ErrBadNotes. Without the signing key and without a manifest, or with an unsigned
// one, Add fails with ErrUnsigned; a manifest not signed by the release key fails with
// ErrBadSignature, one that describes other firmware with ErrManifestMismatch, an expiry
// already passed with ErrExpired. Those about the notes and the manifest fail before the body
// is read. None of them leave anything behind.
func (s *Store) Add(ctx context.Context, req AddRequest) (f Firmware, created bool, err error) {
	if m := req.Manifest; m != nil {
		req.Model = cmp.Or(req.Model, m.Model)
		req.Version = cmp.Or(req.Version, m.Version)
	}
	if err := ValidModel(req.Model); err != nil {
		return Firmware{}, false, fmt.Errorf("add firmware: %w", err)
	}
	_, version, err := canonicalVersion(req.Version)
	if err != nil {
		return Firmware{}, false, fmt.Errorf("add firmware: %w", err)
	}
	if err := ValidNotes(req.Notes); err != nil {
		return Firmware{}, false, fmt.Errorf("add firmware %s %s: %w", req.Model, version, err)
	}
	if s.isClosed() {
		return Firmware{}, false, fmt.Errorf("add firmware: %w", ErrClosed)
	}
	// Refuse a bad manifest before reading what may be a large body.
	if err := s.checkRequest(&req, version, time.Now()); err != nil {
		return Firmware{}, false, fmt.Errorf("add firmware %s %s: %w", req.Model, version, err)
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
	if m := req.Manifest; m != nil && (m.Size != u.size || m.SHA256 != u.sha) {
		return Firmware{}, false, fmt.Errorf("add firmware %s %s: %w: manifest signs %d bytes with sha256 %s, upload is %d bytes with sha256 %s",
			req.Model, version, ErrManifestMismatch, m.Size, m.SHA256, u.size, u.sha)
	}

	s.commitMu.Lock()
	defer s.commitMu.Unlock()
	if err := ctx.Err(); err != nil {
		return Firmware{}, false, fmt.Errorf("add firmware %s %s: %w", req.Model, version, err)
	}
	installed, resigned := false, false
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
			f = old
			if resigned, err = s.resign(&f, req); err != nil {
				return err
			}
			if resigned {
				if err := putRecord(b, f); err != nil {
					return err
				}
			}
			// Repair a missing file from the identical upload rather than keep a record
			// whose image cannot be served.
			if _, err := s.install(u); err != nil {
				return err
			}
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
			Expires: expiry(req.Expires),
		}
		if err := s.signNew(&f, req.Manifest); err != nil {
			return err
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
	switch {
	case created:
		s.log.Info("firmware added", "model", f.Model, "version", f.Version, "sha256", f.SHA256, "size", f.Size,
			"counter", f.Counter, "expires", formatExpiry(f.Expires), "signed_offline", req.Manifest != nil)
	case resigned:
		s.log.Info("firmware re-signed", "model", f.Model, "version", f.Version, "expires", formatExpiry(f.Expires),
			"signed_offline", req.Manifest != nil)
	}
	return f, created, nil
}

// expiry normalises an expiry to what a manifest can carry: UTC, whole seconds. Rounding
// down keeps it from ever lasting longer than asked.
func expiry(t time.Time) time.Time {
	if t.IsZero() {
		return time.Time{}
	}
	return t.UTC().Truncate(time.Second)
}

// checkRequest checks what can be checked of req before its body is read: that the store can
// sign it or that its manifest is signed by the release key and names this model, version and
// counter, and that no expiry has already passed. version is canonical. It sets req.Counter
// from the manifest.
func (s *Store) checkRequest(req *AddRequest, version string, now time.Time) error {
	m := req.Manifest
	if m == nil {
		if s.key == nil {
			return fmt.Errorf("%w: this server holds only the release public key (offline mode); "+
				"sign a manifest with 'fota firmware sign' and add it with the image", ErrUnsigned)
		}
		if exp := expiry(req.Expires); !exp.IsZero() && !now.Before(exp) {
			return fmt.Errorf("%w: expiry %s has passed", ErrExpired, formatExpiry(exp))
		}
		return nil
	}
	if m.Signature == "" {
		return fmt.Errorf("%w: the manifest carries no signature", ErrUnsigned)
	}
	if err := VerifySignature(*m, s.pub); err != nil {
		return err
	}
	switch {
	case m.Delta != nil:
		return fmt.Errorf("%w: the manifest is a delta's; add the full image with its own manifest", ErrManifestMismatch)
	case m.Model != req.Model:
		return fmt.Errorf("%w: manifest model %q, upload %q", ErrManifestMismatch, m.Model, req.Model)
	case m.Version != version:
		// The record keeps the canonical version and rebuilds the manifest from it, so a
		// manifest must name the version that way to keep its signature valid.
		return fmt.Errorf("%w: manifest version %q, upload %q (manifests name canonical versions)", ErrManifestMismatch, m.Version, version)
	case req.Counter != 0 && req.Counter != m.Counter:
		return fmt.Errorf("%w: manifest counter %d, requested %d", ErrManifestMismatch, m.Counter, req.Counter)
	}
	exp, err := m.ExpiresAt()
	if err != nil {
		return fmt.Errorf("%w: %v", ErrBadManifest, err)
	}
	if formatExpiry(exp) != m.Expires {
		return fmt.Errorf("%w: expiry %q is not in the form %s (UTC, whole seconds)", ErrBadManifest, m.Expires, formatExpiry(exp))
	}
	if !exp.IsZero() && !now.Before(exp) {
		return fmt.Errorf("%w: manifest expired at %s", ErrExpired, m.Expires)
	}
	if e := expiry(req.Expires); !e.IsZero() && !e.Equal(exp) {
		return fmt.Errorf("%w: manifest expires at %q, requested %s", ErrManifestMismatch, m.Expires, formatExpiry(e))
	}
	req.Counter = m.Counter
	return nil
}

// signNew gives a new record its signature: m's, which checkRequest and the upload's hashes
// have matched to f, or the store's own.
func (s *Store) signNew(f *Firmware, m *protocol.Manifest) error {
	if m == nil {
		return s.sign(f)
	}
	f.Expires, _ = m.ExpiresAt()
	f.Signature = m.Signature
	if f.Manifest() != *m {
		// checkRequest and the hash comparison rule this out; an unnoticed difference would
		// store a record whose manifest no device accepts.
		return fmt.Errorf("%w: stored record would not rebuild the signed manifest", ErrManifestMismatch)
	}
	return nil
}

// resign updates an existing record f for a repeated Add: with another valid manifest, or a
// new expiry, or the first signature of a record stored before signing existed. It reports
// whether f changed.
func (s *Store) resign(f *Firmware, req AddRequest) (bool, error) {
	if m := req.Manifest; m != nil {
		if f.Manifest() == *m {
			return false, nil
		}
		next := *f
		if err := s.signNew(&next, m); err != nil {
			return false, err
		}
		*f = next
		return true, nil
	}
	exp := expiry(req.Expires)
	if f.Signature != "" && (exp.IsZero() || exp.Equal(f.Expires)) {
		return false, nil
	}
	next := *f
	if !exp.IsZero() {
		next.Expires = exp
	}
	if err := s.sign(&next); err != nil {
		return false, err
	}
	*f = next
	return true, nil
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
// names the same sha256. With the record go the delta verdicts on that release and the patch
// files they name, unless another record (such as a verdict of another release sharing the
// image) names the same file; patches from the image, as a base, stay. If inUse is not nil
// and returns true for the record, Delete fails with ErrInUse. inUse runs outside any
// transaction of the store, so it may use the same DB; it must not call Add or Delete.
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
	sha, shaOK := validSHA(f.SHA256)
	shared := false
	var patches []string // named by the dropped verdicts and by no remaining record
	err = s.db.Update(func(tx *bbolt.Tx) error {
		shared, patches = false, nil
		b, err := bucket(tx)
		if err != nil {
			return err
		}
		if err := b.Delete(recordKey(model, canon)); err != nil {
			return err
		}
		if err := allRecords(b, func(o Firmware) error {
			shared = shared || o.SHA256 == f.SHA256
			return nil
		}); err != nil {
			return err
		}
		// In this transaction, so that a verdict being stored for this release either
		// commits first and is dropped here, or finds the release gone (see commitDelta).
		_, patches, err = dropDeltas(tx, func(m, v, _ string) bool { return m == model && v == canon })
		return err
	})
	if err != nil {
		return fmt.Errorf("delete firmware %s %s: %w", model, canon, err)
	}
	if !shared && !shaOK {
		return fmt.Errorf("delete firmware %s %s: record has bad sha256 %q", model, canon, f.SHA256)
	}
	if !shared {
		err = s.removeArtifact(sha)
		// Evict after removing: a ReadAt racing with us either opened the file before the
		// removal (and its handle is dropped here) or finds it gone.
		s.files.evict(sha)
	}
	// Still under commitMu: nothing can come to name these patches before they are gone.
	removed, perr := s.removePatches(patches)
	s.log.Info("firmware deleted", "model", model, "version", canon, "sha256", f.SHA256, "artifact_kept", shared, "patches_removed", removed)
	if err = errors.Join(err, perr); err != nil {
		return fmt.Errorf("delete firmware %s %s: %w", model, canon, err)
	}
	return nil
}
