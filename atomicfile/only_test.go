package atomicfile_test

import (
	"io/fs"
	"os"
	"path/filepath"
	"strings"
	"testing"
)

// TestOnlyWriter keeps this package the project's one atomic file writer: outside it and outside
// tests, no file both makes a temp file and renames or links it into place.
func TestOnlyWriter(t *testing.T) {
	// The firmware store names an upload by its hash, known only once the upload is in, and
	// moves it from the store's own tmp directory: a file whose final name is not known up front.
	allowed := map[string]bool{"firmware/files.go": true}
	root := ".."
	err := filepath.WalkDir(root, func(path string, d fs.DirEntry, err error) error {
		if err != nil {
			return err
		}
		rel, _ := filepath.Rel(root, path)
		if d.IsDir() {
			if rel == "atomicfile" || (rel != "." && strings.HasPrefix(d.Name(), ".")) || d.Name() == "testdata" {
				return filepath.SkipDir
			}
			return nil
		}
		if !strings.HasSuffix(rel, ".go") || strings.HasSuffix(rel, "_test.go") || allowed[filepath.ToSlash(rel)] {
			return nil
		}
		b, err := os.ReadFile(path)
		if err != nil {
			return err
		}
		src := string(b)
		if strings.Contains(src, "os.CreateTemp(") && (strings.Contains(src, "os.Rename(") || strings.Contains(src, "os.Link(")) {
			t.Errorf("%s writes files atomically itself; use atomicfile", rel)
		}
		return nil
	})
	if err != nil {
		t.Fatal(err)
	}
}
