package firmware

import (
	"context"
	"crypto/sha256"
	"encoding/hex"
	"errors"
	"fmt"
	"io"
	"io/fs"
	"os"
	"path/filepath"

	"go.etcd.io/bbolt"
)

const (
	objectsDir = "sha256"
	tmpDir     = "tmp"
	tmpPattern = "upload-*"
)

// validSHA normalises sha to lowercase and checks it is 64 hex digits. It guards every path
// built from a caller's string: nothing else may reach the file system.
func validSHA(sha string) (string, bool) {
	if len(sha) != 2*sha256.Size {
		return "", false
	}
	b := []byte(sha)
	for i, c := range b {
		switch {
		case c >= '0' && c <= '9' || c >= 'a' && c <= 'f':
		case c >= 'A' && c <= 'F':
			b[i] = c + ('a' - 'A')
		default:
			return "", false
		}
	}
	return string(b), true
}

// artifactPath is DIR/sha256/<first 2 hex>/<hex>; sha must have passed validSHA.
func (s *Store) artifactPath(sha string) string {
	return filepath.Join(s.dir, objectsDir, sha[:2], sha)
}

// upload is a body streamed to a temp file, not yet under its final name.
type upload struct {
	path string
	sha  string
	size int64
}

func (u *upload) remove() error {
	if u == nil || u.path == "" {
		return nil
	}
	err := os.Remove(u.path)
	u.path = ""
	if err != nil && !errors.Is(err, fs.ErrNotExist) {
		return err
	}
	return nil
}

// ctxReader stops a long upload once its context is done.
type ctxReader struct {
	ctx context.Context
	r   io.Reader
}

func (r ctxReader) Read(p []byte) (int, error) {
	if err := r.ctx.Err(); err != nil {
		return 0, err
	}
	return r.r.Read(p)
}

// receive streams body into a temp file under DIR/tmp while hashing it, reading at most
// maxSize+1 bytes so an oversized body is detected without reading it all. The file is synced
// before it is returned; on error nothing is left behind.
func (s *Store) receive(ctx context.Context, body io.Reader) (u *upload, err error) {
	if body == nil {
		return nil, ErrEmpty
	}
	f, err := os.CreateTemp(filepath.Join(s.dir, tmpDir), tmpPattern)
	if err != nil {
		return nil, fmt.Errorf("create temp file: %w", err)
	}
	defer func() {
		if err != nil {
			f.Close()
			tmp := &upload{path: f.Name()}
			if rerr := tmp.remove(); rerr != nil {
				s.log.Warn("remove temp file", "path", f.Name(), "err", rerr)
			}
		}
	}()
	h := sha256.New()
	n, err := io.Copy(io.MultiWriter(f, h), io.LimitReader(ctxReader{ctx, body}, s.maxSize+1))
	switch {
	case err != nil:
		return nil, fmt.Errorf("read body: %w", err)
	case n == 0:
		return nil, ErrEmpty
	case n > s.maxSize:
		return nil, fmt.Errorf("%w: more than %d bytes", ErrTooLarge, s.maxSize)
	}
	if err := f.Sync(); err != nil {
		return nil, fmt.Errorf("sync temp file: %w", err)
	}
	if err := f.Close(); err != nil {
		return nil, fmt.Errorf("close temp file: %w", err)
	}
	return &upload{path: f.Name(), sha: hex.EncodeToString(h.Sum(nil)), size: n}, nil
}

// install moves u to its final name. installed is false when an identical artifact was
// already there; u's temp file is gone either way on success.
func (s *Store) install(u *upload) (installed bool, err error) {
	final := s.artifactPath(u.sha)
	if fi, err := os.Stat(final); err == nil && fi.Mode().IsRegular() && fi.Size() == u.size {
		// Content-addressed and written only by rename: same name and size is the same image.
		return false, u.remove()
	}
	sub := filepath.Dir(final)
	switch err := os.Mkdir(sub, 0o750); {
	case err == nil:
		if err := syncDir(filepath.Dir(sub)); err != nil {
			return false, err
		}
	case errors.Is(err, fs.ErrExist):
	default:
		return false, fmt.Errorf("create artifact dir: %w", err)
	}
	if err := os.Rename(u.path, final); err != nil {
		return false, fmt.Errorf("install artifact: %w", err)
	}
	u.path = ""
	if err := syncDir(sub); err != nil {
		return true, err
	}
	return true, nil
}

// removeArtifact deletes an artifact file and makes the removal durable.
func (s *Store) removeArtifact(sha string) error {
	p := s.artifactPath(sha)
	if err := os.Remove(p); err != nil && !errors.Is(err, fs.ErrNotExist) {
		return fmt.Errorf("remove artifact: %w", err)
	}
	return syncDir(filepath.Dir(p))
}

// syncDir fsyncs a directory so that a rename or removal in it survives a crash.
func syncDir(dir string) error {
	d, err := os.Open(dir)
	if err != nil {
		return fmt.Errorf("sync dir: %w", err)
	}
	defer d.Close()
	if err := d.Sync(); err != nil {
		return fmt.Errorf("sync dir %s: %w", dir, err)
	}
	return nil
}

// cleanTmp removes uploads left behind by a crash. One Store owns a Dir, so at Open every temp
// file is stale.
func (s *Store) cleanTmp() error {
	dir := filepath.Join(s.dir, tmpDir)
	entries, err := os.ReadDir(dir)
	if err != nil {
		return fmt.Errorf("read temp dir: %w", err)
	}
	removed := 0
	for _, e := range entries {
		if !e.Type().IsRegular() {
			s.log.Warn("ignoring unexpected entry in temp dir", "name", e.Name())
			continue
		}
		if err := os.Remove(filepath.Join(dir, e.Name())); err != nil && !errors.Is(err, fs.ErrNotExist) {
			return fmt.Errorf("remove stale temp file: %w", err)
		}
		removed++
	}
	if removed > 0 {
		s.log.Info("removed stale temp files", "count", removed)
	}
	return nil
}

// sweepUnnamed removes the artifacts that no record names: an image or patch whose record a
// crash left uncommitted after its file was installed (Add, commitDelta), or whose removal
// it interrupted after the record was gone (Delete). Only names the store writes,
// <2 hex>/<64 lowercase hex>, are considered. One Store owns a Dir, and Open runs this
// before anything can add, so the records read are the whole truth.
func (s *Store) sweepUnnamed() error {
	s.commitMu.Lock()
	defer s.commitMu.Unlock()
	var named map[string]bool
	if err := s.db.View(func(tx *bbolt.Tx) (err error) {
		named, err = namedSHAs(tx)
		return err
	}); err != nil {
		return fmt.Errorf("sweep artifacts: %w", err)
	}
	root := filepath.Join(s.dir, objectsDir)
	subs, err := os.ReadDir(root)
	if err != nil {
		return fmt.Errorf("sweep artifacts: %w", err)
	}
	removed := 0
	for _, sub := range subs {
		if !sub.IsDir() {
			continue
		}
		entries, err := os.ReadDir(filepath.Join(root, sub.Name()))
		if err != nil {
			return fmt.Errorf("sweep artifacts: %w", err)
		}
		for _, e := range entries {
			sha, ok := validSHA(e.Name())
			if !ok || sha != e.Name() || sha[:2] != sub.Name() || !e.Type().IsRegular() || named[sha] {
				continue
			}
			if err := s.removeArtifact(sha); err != nil {
				return fmt.Errorf("sweep artifacts: %w", err)
			}
			removed++
		}
	}
	if removed > 0 {
		s.log.Info("removed artifacts no record names", "count", removed)
	}
	return nil
}
