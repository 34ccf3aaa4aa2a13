package firmware

import (
	"bytes"
	"cmp"
	"context"
	"crypto/sha256"
	"encoding/hex"
	"encoding/json"
	"errors"
	"fmt"
	"io"
	"io/fs"
	"os"
	"slices"
	"time"

	bolt "go.etcd.io/bbolt"

	"github.com/fota-dev/fota/firmware/delta"
	"github.com/fota-dev/fota/protocol"
)

// Delta is one stored delta verdict, as operators see it: a patch from the image with sha256
// Base to a stored target, or why there is none.
type Delta struct {
	Base string `json:"base"` // sha256 of the image the patch applies to
	// BaseVersion is the version of a stored image with sha256 Base, if there is one: a
	// device can run a base the store no longer (or never) held.
	BaseVersion string `json:"base_version,omitempty"`
	Model       string `json:"model"`
	Version     string `json:"version"` // the target's
	Target      string `json:"target"`  // sha256 of the target image
	Size        int64  `json:"size"`    // of the target image
	PatchSHA256 string `json:"patch_sha256,omitempty"`
	PatchSize   int64  `json:"patch_size,omitempty"`
	// Uploaded is true for a patch signed offline and added with AddDelta, false for one the
	// server made and signed itself.
	Uploaded bool `json:"uploaded,omitempty"`
	// Verified is true when the store has seen the patch rebuild the exact target from its
	// base: always for the ones it made; for an upload, when it held the base image.
	Verified bool   `json:"verified,omitempty"`
	Refused  string `json:"refused,omitempty"` // why no delta is offered for this pair
}

// AddDelta stores a delta patch whose manifest was signed offline (fota delta sign), so that
// a server holding only the release public key can offer deltas too. m must be signed by the
// release key and describe, apart from its delta, exactly the manifest of a stored target
// image; body must be the patch it names, byte for byte. When the store holds the base image,
// the patch must rebuild the exact target from it; when it does not, devices still check the
// result against the signed sha256 before installing. The patch must be smaller than the
// target image: otherwise the full image is the better offer.
//
// The upload replaces the verdict the store had for the pair (a refusal, or a patch it made
// itself), and the replaced patch file is removed unless a record still names it. Adding the
// same patch again returns created false. Errors are those of Add: ErrBadSignature,
// ErrBadManifest, ErrManifestMismatch, ErrExpired, ErrNotFound for an unknown target, ErrEmpty
// and ErrTooLarge, and delta.ErrBadPatch for a patch that is malformed or does not rebuild the
// target. None of them leave anything behind.
func (s *Store) AddDelta(ctx context.Context, m protocol.Manifest, body io.Reader) (d Delta, created bool, err error) {
	if s.isClosed() {
		return Delta{}, false, fmt.Errorf("add delta: %w", ErrClosed)
	}
	target, err := s.checkDeltaManifest(m, time.Now())
	if err != nil {
		return Delta{}, false, fmt.Errorf("add delta: %w", err)
	}
	what := fmt.Sprintf("add delta to %s %s", m.Model, m.Version)
	u, err := s.receive(ctx, body)
	if err != nil {
		return Delta{}, false, fmt.Errorf("%s: %w", what, err)
	}
	defer func() {
		tmp := u.path
		if rerr := u.remove(); rerr != nil {
			s.log.Warn("remove temp file", "path", tmp, "err", rerr)
		}
	}()
	if u.size != m.Delta.PatchSize || u.sha != m.Delta.PatchSHA256 {
		return Delta{}, false, fmt.Errorf("%s: %w: manifest signs a %d-byte patch with sha256 %s, upload is %d bytes with sha256 %s",
			what, ErrManifestMismatch, m.Delta.PatchSize, m.Delta.PatchSHA256, u.size, u.sha)
	}
	verified, err := s.checkPatch(u.path, m)
	if err != nil {
		return Delta{}, false, fmt.Errorf("%s: %w", what, err)
	}

	rec := deltaRecord{Target: m.SHA256, Manifest: &m, Uploaded: true, Verified: verified}
	key := deltaKey(m.Model, m.Version, m.Delta.Base)
	// The target must still be the record checked above, in the transaction that stores the
	// verdict: deleted and added again, it could carry another counter or expiry.
	still := func(tx *bolt.Tx) (bool, error) {
		b, err := bucket(tx)
		if err != nil {
			return false, err
		}
		f, ok, err := getRecord(b, m.Model, m.Version)
		return ok && f.SHA256 == target.SHA256 && f.Manifest() == target.Manifest(), err
	}
	stored, created, err := s.commitDelta(key, rec, u, still)
	switch {
	case err != nil:
		return Delta{}, false, fmt.Errorf("%s: %w", what, err)
	case !stored:
		return Delta{}, false, fmt.Errorf("%s: %w: the target was deleted or replaced during the upload", what, ErrNotFound)
	}
	if created {
		s.log.Info("delta added", "model", m.Model, "version", m.Version, "base", short(m.Delta.Base),
			"patch", m.Delta.PatchSize, "image", m.Size, "verified", verified)
	}
	var images releases
	if err := s.db.View(func(tx *bolt.Tx) (err error) {
		images, err = readReleases(tx)
		return err
	}); err != nil {
		return Delta{}, false, fmt.Errorf("%s: %w", what, err)
	}
	d, _ = images.delta(m.Model, m.Version, m.Delta.Base, rec)
	return d, created, nil
}

// checkDeltaManifest checks what can be checked of a delta manifest before its patch is read,
// and returns the stored target it describes.
func (s *Store) checkDeltaManifest(m protocol.Manifest, now time.Time) (Firmware, error) {
	if err := VerifySignature(m, s.pub); err != nil {
		return Firmware{}, err
	}
	d := m.Delta
	switch {
	case d == nil:
		return Firmware{}, fmt.Errorf("%w: the manifest has no delta; add a full image with 'fota firmware add'", ErrManifestMismatch)
	case d.Format != delta.Format:
		return Firmware{}, fmt.Errorf("%w: patch format %q, this server serves %q", ErrBadManifest, d.Format, delta.Format)
	case d.Base == m.SHA256:
		return Firmware{}, fmt.Errorf("%w: the delta's base is its own target", ErrBadManifest)
	case d.PatchSize >= m.Size:
		return Firmware{}, fmt.Errorf("%w: a %d-byte patch is no smaller than the %d-byte image it builds; devices are better served the image",
			ErrBadManifest, d.PatchSize, m.Size)
	case d.PatchSize > s.maxSize:
		return Firmware{}, fmt.Errorf("%w: patch of %d bytes, the limit is %d", ErrTooLarge, d.PatchSize, s.maxSize)
	}
	exp, err := m.ExpiresAt()
	if err != nil {
		return Firmware{}, fmt.Errorf("%w: %v", ErrBadManifest, err)
	}
	if !exp.IsZero() && !now.Before(exp) {
		return Firmware{}, fmt.Errorf("%w: manifest expired at %s", ErrExpired, m.Expires)
	}
	f, err := s.Get(m.Model, m.Version)
	if errors.Is(err, ErrNotFound) {
		return Firmware{}, fmt.Errorf("%w: no target %s %s; add its image first", ErrNotFound, m.Model, m.Version)
	}
	if err != nil {
		return Firmware{}, err
	}
	full := m
	full.Delta, full.Signature = nil, ""
	stored := f.Manifest()
	stored.Signature = ""
	if full != stored {
		return Firmware{}, fmt.Errorf("%w: the delta manifest describes %s %s as %s; the stored target is %s",
			ErrManifestMismatch, m.Model, m.Version, describe(full), describe(stored))
	}
	return f, nil
}

// describe names the fields of a full manifest that a delta's must repeat.
func describe(m protocol.Manifest) string {
	exp := m.Expires
	if exp == "" {
		exp = "never"
	}
	return fmt.Sprintf("counter %d, %d bytes, sha256 %s, expires %s", m.Counter, m.Size, short(m.SHA256), exp)
}

// checkPatch checks the patch file at path against m: a whole patch for an m.Size-byte
// target and, when the store holds the base image, one that rebuilds the exact target from
// it. verified reports whether that second check ran.
func (s *Store) checkPatch(path string, m protocol.Manifest) (verified bool, err error) {
	patch, err := os.ReadFile(path)
	if err != nil {
		return false, fmt.Errorf("read patch: %w", err)
	}
	h, err := delta.ReadHeader(bytes.NewReader(patch))
	if err != nil {
		return false, err
	}
	switch {
	case h.Len() != int64(len(patch)):
		return false, fmt.Errorf("%w: the header accounts for %d bytes, the patch has %d", delta.ErrBadPatch, h.Len(), len(patch))
	case h.NewSize != m.Size:
		return false, fmt.Errorf("%w: it builds a %d-byte image, the target has %d", delta.ErrBadPatch, h.NewSize, m.Size)
	}
	basePath, err := s.Path(m.Delta.Base)
	if err != nil {
		return false, nil // not held here: the devices check the result
	}
	old, err := os.ReadFile(basePath)
	if errors.Is(err, fs.ErrNotExist) {
		return false, nil // deleted since: as if never held
	}
	if err != nil {
		return false, fmt.Errorf("read base: %w", err)
	}
	rebuilt, err := delta.Apply(old, bytes.NewReader(patch), m.Size)
	if err != nil {
		return false, fmt.Errorf("apply to the stored base: %w", err)
	}
	if sum := sha256.Sum256(rebuilt); hex.EncodeToString(sum[:]) != m.SHA256 {
		return false, fmt.Errorf("%w: applied to the stored base it does not rebuild the target's sha256", delta.ErrBadPatch)
	}
	return true, nil
}

// Deltas lists every delta verdict the store holds, ordered by target model and version,
// then base.
func (s *Store) Deltas() ([]Delta, error) {
	var out []Delta
	err := s.db.View(func(tx *bolt.Tx) error {
		db := tx.Bucket(bucketDeltas)
		if db == nil {
			return nil // no Patcher has run on this database
		}
		images, err := readReleases(tx)
		if err != nil {
			return err
		}
		return db.ForEach(func(k, v []byte) error {
			model, version, base, ok := parseDeltaKey(k)
			if !ok {
				return nil
			}
			var rec deltaRecord
			if err := json.Unmarshal(v, &rec); err != nil {
				return fmt.Errorf("decode delta verdict %q: %w", k, err)
			}
			if d, ok := images.delta(model, version, base, rec); ok {
				out = append(out, d)
			}
			return nil
		})
	})
	if err != nil {
		return nil, fmt.Errorf("list deltas: %w", err)
	}
	sortDeltas(out)
	return out, nil
}

// releases are the firmware records, for describing delta verdicts.
type releases []Firmware

func readReleases(tx *bolt.Tx) (releases, error) {
	b, err := bucket(tx)
	if err != nil {
		return nil, err
	}
	var out releases
	err = allRecords(b, func(f Firmware) error {
		out = append(out, f)
		return nil
	})
	return out, err
}

// delta describes the verdict rec on the delta from base to (model, version). ok is false
// when the store no longer holds that release with the verdict's image.
func (rs releases) delta(model, version, base string, rec deltaRecord) (d Delta, ok bool) {
	d = Delta{Base: base, Model: model, Version: version, Target: rec.Target, Refused: rec.Refused}
	for _, f := range rs {
		switch {
		case f.Model == model && f.Version == version:
			ok = f.SHA256 == rec.Target
			d.Size = f.Size
		case f.SHA256 == base && (d.BaseVersion == "" || f.Model == model):
			// Of several records of the base image, the one of the same model names it.
			d.BaseVersion = f.Version
		}
	}
	if m := rec.Manifest; m != nil && m.Delta != nil {
		d.PatchSHA256, d.PatchSize = m.Delta.PatchSHA256, m.Delta.PatchSize
		d.Uploaded = rec.Uploaded
		d.Verified = !rec.Uploaded || rec.Verified
	}
	return d, ok
}

// sortDeltas orders deltas by target model and semantic version, then by base.
func sortDeltas(ds []Delta) {
	slices.SortFunc(ds, func(a, b Delta) int {
		if c := cmp.Compare(a.Model, b.Model); c != 0 {
			return c
		}
		if c := compareVersions(a.Version, b.Version); c != 0 {
			return c
		}
		return cmp.Compare(a.Base, b.Base)
	})
}
