package certs

import (
	"errors"
	"fmt"
	"io/fs"
	"os"

	"github.com/fota-dev/fota/atomicfile"
)

// Modes of what a certs dir holds. Certificates are public, but the directory also holds the CA
// key, so nobody but the owner may list or enter it.
const (
	dirMode  = 0o700
	keyMode  = 0o600
	certMode = 0o644
)

// ensureDir creates dir with mode 0700, and tightens an existing one that lets others in.
func ensureDir(dir string) error {
	if err := os.MkdirAll(dir, dirMode); err != nil {
		return fmt.Errorf("create %s: %w", dir, err)
	}
	fi, err := os.Stat(dir)
	if err != nil {
		return fmt.Errorf("stat %s: %w", dir, err)
	}
	if !fi.IsDir() {
		return fmt.Errorf("%s: not a directory", dir)
	}
	if fi.Mode().Perm()&0o077 != 0 {
		if err := os.Chmod(dir, dirMode); err != nil {
			return fmt.Errorf("restrict %s: %w", dir, err)
		}
	}
	return nil
}

// writeFile writes data to path through atomicfile. With noClobber it fails with ErrExists when
// path exists, even if another process raced us to it.
func writeFile(path string, data []byte, perm fs.FileMode, noClobber bool) error {
	if !noClobber {
		return atomicfile.Write(path, data, perm)
	}
	if err := atomicfile.Create(path, data, perm); err != nil {
		if errors.Is(err, fs.ErrExist) {
			return fmt.Errorf("write %s: %w", path, ErrExists)
		}
		return err
	}
	return nil
}

// exists reports whether path exists; errors other than "not there" count as existing so a
// caller refuses rather than overwrites what it could not check.
func exists(path string) bool {
	_, err := os.Lstat(path)
	return !errors.Is(err, fs.ErrNotExist)
}
