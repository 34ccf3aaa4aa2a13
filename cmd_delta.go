package main

import (
	"crypto/sha256"
	"errors"
	"flag"
	"fmt"
	"io"
	"os"

	"github.com/fota-dev/fota/firmware/delta"
)

func runDelta(args []string, stdout io.Writer) error {
	return subcommand("delta", args, stdout, map[string]func([]string, io.Writer) error{
		"make":  runDeltaMake,
		"apply": runDeltaApply,
	})
}

func runDeltaMake(args []string, stdout io.Writer) error {
	fs := newFlags("delta make OLD NEW PATCH", stdout)
	paths, err := parsePositional(fs, args, 3)
	if err != nil {
		return err
	}
	oldPath, newPath, patchPath := paths[0], paths[1], paths[2]
	old, err := os.ReadFile(oldPath)
	if err != nil {
		return fmt.Errorf("delta make: %w", err)
	}
	target, err := os.ReadFile(newPath)
	if err != nil {
		return fmt.Errorf("delta make: %w", err)
	}
	patch, err := delta.Make(old, target)
	if err != nil {
		return fmt.Errorf("delta make: %w", err)
	}
	if err := writeFileAtomic(patchPath, patch, 0o644); err != nil {
		return fmt.Errorf("delta make: %w", err)
	}
	_, err = fmt.Fprintf(stdout, "wrote %s: %d-byte patch, %s of the %d-byte target (base %d bytes)\n",
		patchPath, len(patch), percent(len(patch), len(target)), len(target), len(old))
	return err
}

func runDeltaApply(args []string, stdout io.Writer) error {
	fs := newFlags("delta apply OLD PATCH OUT", stdout)
	maxSize := fs.Int64("max-size", 1<<30, "refuse a patch whose target is larger than this many `bytes`")
	paths, err := parsePositional(fs, args, 3)
	if err != nil {
		return err
	}
	if *maxSize <= 0 {
		return usagef("delta apply: --max-size must be positive, got %d", *maxSize)
	}
	oldPath, patchPath, outPath := paths[0], paths[1], paths[2]
	old, err := os.ReadFile(oldPath)
	if err != nil {
		return fmt.Errorf("delta apply: %w", err)
	}
	f, err := os.Open(patchPath)
	if err != nil {
		return fmt.Errorf("delta apply: %w", err)
	}
	defer f.Close()
	patchSize := int64(-1)
	if fi, err := f.Stat(); err == nil {
		patchSize = fi.Size()
	}
	target, err := delta.Apply(old, f, *maxSize)
	switch {
	case errors.Is(err, delta.ErrWrongBase):
		return fmt.Errorf("delta apply: %s was not made from %s: %w", patchPath, oldPath, err)
	case errors.Is(err, delta.ErrTooLarge):
		return fmt.Errorf("delta apply: %s: %w (raise --max-size if you trust it)", patchPath, err)
	case err != nil:
		return fmt.Errorf("delta apply: %s: %w", patchPath, err)
	}
	if err := writeFileAtomic(outPath, target, 0o644); err != nil {
		return fmt.Errorf("delta apply: %w", err)
	}
	_, err = fmt.Fprintf(stdout, "wrote %s: %d bytes, sha256 %x, from a %d-byte patch (%s of it)\n",
		outPath, len(target), sha256.Sum256(target), patchSize, percent(int(patchSize), len(target)))
	return err
}

// parsePositional parses flags given before, between or after the positional arguments, and
// wants exactly n of those. The flag set's name carries the argument names, so that both -h
// and the errors show them.
func parsePositional(fs *flag.FlagSet, args []string, n int) ([]string, error) {
	var pos []string
	for {
		if err := parseFlags(fs, args, len(args)); err != nil {
			return nil, err
		}
		if fs.NArg() == 0 {
			break
		}
		pos = append(pos, fs.Arg(0))
		args = fs.Args()[1:]
	}
	if len(pos) != n {
		return nil, usagef("%s: got %d arguments, want %d", fs.Name(), len(pos), n)
	}
	return pos, nil
}

// percent is part/whole as a percentage for people.
func percent(part, whole int) string {
	if whole <= 0 || part < 0 {
		return "n/a"
	}
	return fmt.Sprintf("%.2f%%", 100*float64(part)/float64(whole))
}
