package atomicfile_test

import (
	"errors"
	"io/fs"
	"os"
	"path/filepath"
	"strings"
	"syscall"
	"testing"

	"github.com/fota-dev/fota/atomicfile"
)

func TestWriteContentAndMode(t *testing.T) {
	// A umask that would strip the bits asked for must not change the mode.
	old := syscall.Umask(0o077)
	defer syscall.Umask(old)
	for _, perm := range []fs.FileMode{0o600, 0o644, 0o640} {
		dir := t.TempDir()
		path := filepath.Join(dir, "f")
		if err := atomicfile.Write(path, []byte("content"), perm); err != nil {
			t.Fatalf("write %v: %v", perm, err)
		}
		checkFile(t, path, "content", perm)
		checkNoTemp(t, dir)
	}
}

func TestWriteReplacesWhole(t *testing.T) {
	dir := t.TempDir()
	path := filepath.Join(dir, "f")
	if err := os.WriteFile(path, []byte("a much longer old content"), 0o600); err != nil {
		t.Fatal(err)
	}
	if err := atomicfile.Write(path, []byte("new"), 0o644); err != nil {
		t.Fatal(err)
	}
	checkFile(t, path, "new", 0o644)
	checkNoTemp(t, dir)
}

func TestWriteRelativePath(t *testing.T) {
	dir := t.TempDir()
	t.Chdir(dir)
	if err := atomicfile.Write("f", []byte("here"), 0o600); err != nil {
		t.Fatal(err)
	}
	checkFile(t, filepath.Join(dir, "f"), "here", 0o600)
	checkNoTemp(t, dir)
}

func TestCreate(t *testing.T) {
	dir := t.TempDir()
	path := filepath.Join(dir, "key")
	if err := atomicfile.Create(path, []byte("first"), 0o600); err != nil {
		t.Fatal(err)
	}
	checkFile(t, path, "first", 0o600)
	err := atomicfile.Create(path, []byte("second"), 0o644)
	if !errors.Is(err, fs.ErrExist) {
		t.Fatalf("create over an existing file: got %v, want fs.ErrExist", err)
	}
	if !strings.Contains(err.Error(), path) {
		t.Errorf("error %q does not name %s", err, path)
	}
	checkFile(t, path, "first", 0o600)
	checkNoTemp(t, dir)
}

// TestFailureLeavesNoTemp covers failures before the temp file exists and after it was written.
func TestFailureLeavesNoTemp(t *testing.T) {
	for _, create := range []bool{false, true} {
		write := atomicfile.Write
		if create {
			write = atomicfile.Create
		}
		t.Run(map[bool]string{false: "write", true: "create"}[create], func(t *testing.T) {
			dir := t.TempDir()
			file := filepath.Join(dir, "file")
			if err := os.WriteFile(file, []byte("x"), 0o600); err != nil {
				t.Fatal(err)
			}
			sub := filepath.Join(dir, "sub")
			if err := os.Mkdir(sub, 0o700); err != nil {
				t.Fatal(err)
			}
			if err := os.WriteFile(filepath.Join(sub, "x"), nil, 0o600); err != nil {
				t.Fatal(err)
			}
			for _, path := range []string{
				filepath.Join(file, "f"),      // parent is a file: no temp file can be made
				filepath.Join(dir, "no", "f"), // parent missing
				sub,                           // a non-empty directory: the rename or link fails
			} {
				err := write(path, []byte("data"), 0o600)
				if err == nil {
					t.Errorf("write %s: got nil error, want one", path)
					continue
				}
				if !strings.Contains(err.Error(), path) {
					t.Errorf("error %q does not name %s", err, path)
				}
			}
			checkNoTemp(t, dir)
			checkNoTemp(t, sub)
			checkFile(t, file, "x", 0o600)
		})
	}
}

func TestReadOnlyDir(t *testing.T) {
	if os.Geteuid() == 0 {
		t.Skip("root writes into read-only directories")
	}
	dir := t.TempDir()
	path := filepath.Join(dir, "f")
	if err := os.WriteFile(path, []byte("old"), 0o600); err != nil {
		t.Fatal(err)
	}
	if err := os.Chmod(dir, 0o500); err != nil {
		t.Fatal(err)
	}
	t.Cleanup(func() { os.Chmod(dir, 0o700) })
	if err := atomicfile.Write(path, []byte("new"), 0o600); err == nil || !strings.Contains(err.Error(), path) {
		t.Errorf("write into a read-only dir: got %v, want an error naming %s", err, path)
	}
	checkFile(t, path, "old", 0o600)
	checkNoTemp(t, dir)
}

func checkFile(t *testing.T, path, want string, perm fs.FileMode) {
	t.Helper()
	b, err := os.ReadFile(path)
	if err != nil {
		t.Fatal(err)
	}
	if string(b) != want {
		t.Errorf("%s: got %q, want %q", path, b, want)
	}
	fi, err := os.Stat(path)
	if err != nil {
		t.Fatal(err)
	}
	if got := fi.Mode().Perm(); got != perm {
		t.Errorf("mode of %s: got %v, want %v", path, got, perm)
	}
}

func checkNoTemp(t *testing.T, dir string) {
	t.Helper()
	left, err := filepath.Glob(filepath.Join(dir, atomicfile.TempGlob))
	if err != nil {
		t.Fatal(err)
	}
	if len(left) != 0 {
		t.Errorf("temp files left in %s: %v", dir, left)
	}
}
