// Package atomicfile writes files so that a reader, or the system after a crash, sees either the
// old content or the whole new content under the final name, never a prefix.
//
// It uses the standard library only: devices import it as well as the server.
package atomicfile

import (
	"errors"
	"fmt"
	"io/fs"
	"os"
	"path/filepath"
)

// TempGlob matches, within a directory, the temp files Write and Create make there. Only a
// crash between creating and renaming one leaves it behind, so whoever owns the directory may
// remove what matches on startup.
const TempGlob = ".*.tmp-*"

// Write replaces path with data, created with mode perm regardless of the umask: a temp file in
// the same directory is written and synced, renamed over path, and the directory is synced so
// the rename survives a crash. On error path is unchanged and no temp file remains. Errors name
// path.
func Write(path string, data []byte, perm fs.FileMode) error {
	return write(path, data, perm, false)
}

// Create is Write for a file that must not exist yet: the last step is a hard link instead of a
// rename, so an existing path, even one another process created a moment ago, is never
// replaced. Then the error satisfies errors.Is(err, fs.ErrExist).
func Create(path string, data []byte, perm fs.FileMode) error {
	return write(path, data, perm, true)
}

func write(path string, data []byte, perm fs.FileMode, noClobber bool) (err error) {
	dir, base := filepath.Split(path)
	if dir == "" {
		dir = "."
	}
	f, err := os.CreateTemp(dir, "."+base+".tmp-*")
	if err != nil {
		return fmt.Errorf("write %s: %w", path, err)
	}
	tmp := f.Name()
	// Removing after a successful rename fails harmlessly; after a link it drops the extra name.
	defer os.Remove(tmp)
	if err := fill(f, data, perm); err != nil {
		return fmt.Errorf("write %s: %w", path, err)
	}
	if noClobber {
		if err := os.Link(tmp, path); err != nil {
			if errors.Is(err, fs.ErrExist) {
				return fmt.Errorf("write %s: %w", path, fs.ErrExist)
			}
			return fmt.Errorf("write %s: %w", path, err)
		}
	} else if err := os.Rename(tmp, path); err != nil {
		return fmt.Errorf("write %s: %w", path, err)
	}
	if err := syncDir(dir); err != nil {
		return fmt.Errorf("write %s: %w", path, err)
	}
	return nil
}

// fill writes data into the new temp file f, syncs and closes it.
func fill(f *os.File, data []byte, perm fs.FileMode) error {
	// CreateTemp makes the file 0600; Chmod, unlike a mode given to open, ignores the umask.
	err := f.Chmod(perm)
	if err == nil {
		_, err = f.Write(data)
	}
	if err == nil {
		err = f.Sync()
	}
	if cerr := f.Close(); err == nil {
		err = cerr
	}
	return err
}

// syncDir makes a rename or link in dir durable.
func syncDir(dir string) error {
	d, err := os.Open(dir)
	if err != nil {
		return err
	}
	err = d.Sync()
	if cerr := d.Close(); err == nil {
		err = cerr
	}
	if err != nil {
		return fmt.Errorf("sync directory %s: %w", dir, err)
	}
	return nil
}
