package main

import (
	"bytes"
	"context"
	"crypto/ed25519"
	"crypto/sha256"
	"encoding/hex"
	"encoding/json"
	"errors"
	"flag"
	"fmt"
	"io"
	"os"

	"github.com/fota-dev/fota/api"
	"github.com/fota-dev/fota/atomicfile"
	"github.com/fota-dev/fota/firmware"
	"github.com/fota-dev/fota/firmware/delta"
	"github.com/fota-dev/fota/protocol"
)

func runDelta(args []string, stdout io.Writer) error {
	return subcommand("delta", args, stdout, map[string]func([]string, io.Writer) error{
		"make":  runDeltaMake,
		"apply": runDeltaApply,
		"sign":  runDeltaSign,
		"add":   runDeltaAdd,
		"list":  runDeltaList,
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
	if err := atomicfile.Write(patchPath, patch, 0o644); err != nil {
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
	if err := atomicfile.Write(outPath, target, 0o644); err != nil {
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

// runDeltaSign makes a delta patch on the machine that holds the release key, with no server,
// and signs its manifest: the delta manifest repeats the target's signed manifest and names
// the patch. A server holding only release.pub then offers it ('fota delta add').
func runDeltaSign(args []string, stdout io.Writer) error {
	const cmd = "delta sign"
	fs := newFlags(cmd+" OLD NEW PATCH", stdout)
	keyFile := fs.String("key", "", "release private key, release.key from 'fota keys generate'")
	manifestFile := fs.String("manifest", "", "the target's signed manifest, from 'fota firmware sign' for NEW")
	out := fs.String("out", "", "file to write the signed delta manifest to (default PATCH.manifest)")
	paths, err := parsePositional(fs, args, 3)
	if err != nil {
		return err
	}
	oldPath, newPath, patchPath := paths[0], paths[1], paths[2]
	for _, req := range []struct{ name, val string }{{"key", *keyFile}, {"manifest", *manifestFile}} {
		if req.val == "" {
			return usagef("%s: --%s is required", cmd, req.name)
		}
	}
	if *out == "" {
		*out = patchPath + ".manifest"
	}
	key, err := firmware.LoadPrivateKey(*keyFile)
	if err != nil {
		return fmt.Errorf("%s: %w", cmd, err)
	}
	target, err := readManifest(*manifestFile)
	if err != nil {
		return fmt.Errorf("%s: %w", cmd, err)
	}
	// The delta manifest repeats the target's: a target signed by another key, or one
	// altered since, would give a delta its server refuses.
	if err := firmware.VerifySignature(target, key.Public().(ed25519.PublicKey)); err != nil {
		return fmt.Errorf("%s: %s: %w", cmd, *manifestFile, err)
	}
	if target.Delta != nil {
		return fmt.Errorf("%s: %s is a delta's manifest; give the target's own, from 'fota firmware sign'", cmd, *manifestFile)
	}
	old, err := os.ReadFile(oldPath)
	if err != nil {
		return fmt.Errorf("%s: %w", cmd, err)
	}
	img, err := os.ReadFile(newPath)
	if err != nil {
		return fmt.Errorf("%s: %w", cmd, err)
	}
	if err := firmware.VerifyImage(target, img); err != nil {
		return fmt.Errorf("%s: %s is not the image %s signs: %w", cmd, newPath, *manifestFile, err)
	}
	patch, err := delta.Make(old, img)
	if err != nil {
		return fmt.Errorf("%s: %w", cmd, err)
	}
	// Never sign a patch that has not been seen to rebuild the exact target.
	rebuilt, err := delta.Apply(old, bytes.NewReader(patch), target.Size)
	if err != nil {
		return fmt.Errorf("%s: check the patch: %w", cmd, err)
	}
	if err := firmware.VerifyImage(target, rebuilt); err != nil {
		return fmt.Errorf("%s: check the patch: %w", cmd, err)
	}
	if int64(len(patch)) >= target.Size {
		return fmt.Errorf("%s: the patch is %d bytes, no smaller than the %d-byte image: devices are better served the image", cmd, len(patch), target.Size)
	}
	psum := sha256.Sum256(patch)
	m := target
	m.Signature = ""
	m.Delta = &protocol.Delta{Base: fmt.Sprintf("%x", sha256.Sum256(old)), PatchSHA256: hex.EncodeToString(psum[:]),
		PatchSize: int64(len(patch)), Format: delta.Format}
	signed, err := firmware.Sign(m, key)
	if err != nil {
		return fmt.Errorf("%s: %w", cmd, err)
	}
	b, err := json.MarshalIndent(signed, "", "  ")
	if err != nil {
		return fmt.Errorf("%s: encode manifest: %w", cmd, err)
	}
	if err := atomicfile.Write(patchPath, patch, 0o644); err != nil {
		return fmt.Errorf("%s: %w", cmd, err)
	}
	if err := atomicfile.Write(*out, append(b, '\n'), 0o644); err != nil {
		return fmt.Errorf("%s: %w", cmd, err)
	}
	_, err = fmt.Fprintf(stdout, "signed a delta to %s %s: %s patch, %s of the %s image, from base sha256:%s; wrote %s and %s\n",
		m.Model, m.Version, fmtSize(int64(len(patch))), percent(len(patch), int(target.Size)), fmtSize(target.Size), short(m.Delta.Base), patchPath, *out)
	return err
}

// runDeltaAdd uploads a delta patch signed offline, with its manifest, to the server.
func runDeltaAdd(args []string, stdout io.Writer) error {
	const cmd = "delta add"
	fs := newFlags(cmd, stdout)
	af := addAdminFlags(fs)
	file := fs.String("file", "", "delta patch file, from 'fota delta sign'")
	manifestFile := fs.String("manifest", "", "its signed delta manifest (default FILE.manifest)")
	asJSON := fs.Bool("json", false, "print the stored delta as JSON")
	if err := parseFlags(fs, args, 0); err != nil {
		return err
	}
	if *file == "" {
		return usagef("%s: --file is required", cmd)
	}
	if *manifestFile == "" {
		*manifestFile = *file + ".manifest"
	}
	if err := af.check(cmd); err != nil {
		return err
	}
	m, err := readManifest(*manifestFile)
	if err != nil {
		return fmt.Errorf("%s: %w", cmd, err)
	}
	if m.Delta == nil {
		return fmt.Errorf("%s: %s is not a delta's manifest; add a full image with 'fota firmware add'", cmd, *manifestFile)
	}
	f, err := os.Open(*file)
	if err != nil {
		return fmt.Errorf("%s: %w", cmd, err)
	}
	defer f.Close()
	// The server checks everything; the size is free to check here.
	if fi, err := f.Stat(); err != nil || !fi.Mode().IsRegular() {
		return fmt.Errorf("%s: %s is not a regular file", cmd, *file)
	} else if fi.Size() != m.Delta.PatchSize {
		return fmt.Errorf("%s: %s signs a patch of %d bytes, %s has %d", cmd, *manifestFile, m.Delta.PatchSize, *file, fi.Size())
	}
	return af.callAPI(cmd, func(ctx context.Context, c *api.Client) error {
		d, created, err := c.UploadDelta(ctx, m, f)
		if err != nil {
			return err
		}
		if *asJSON {
			return printJSON(stdout, d)
		}
		verb := "added"
		if !created {
			verb = "already had"
		}
		check := "checked: it rebuilds the target from the stored base"
		if !d.Verified {
			check = "the server does not hold the base, so devices alone check what it builds"
		}
		_, err = fmt.Fprintf(stdout, "%s delta %s %s -> %s: %s patch, %s of the image; %s\n",
			verb, clean(d.Model), clean(baseName(d)), clean(d.Version), fmtSize(d.PatchSize), percent(int(d.PatchSize), int(d.Size)), check)
		return err
	})
}

// runDeltaList lists, per release, the delta patches the server offers and the bases it
// refused one.
func runDeltaList(args []string, stdout io.Writer) error {
	return runList("delta list", args, stdout, (*api.Client).ListDeltas, listTable[firmware.Delta]{
		empty:  "no delta patches yet: the server makes them as devices ask (with the release key), or add one with 'fota delta add'",
		header: []string{"MODEL", "FROM", "TO", "PATCH", "OF IMAGE", "SOURCE", "CHECKED", "REFUSED"},
		cells: func(d firmware.Delta) []string {
			if d.PatchSize == 0 {
				return []string{d.Model, baseName(d), d.Version, "-", "-", "-", "-", d.Refused}
			}
			source := "made here"
			if d.Uploaded {
				source = "uploaded"
			}
			return []string{d.Model, baseName(d), d.Version, fmtSize(d.PatchSize), percent(int(d.PatchSize), int(d.Size)),
				source, yesNo(d.Verified), "-"}
		},
	})
}

// baseName names a delta's base: its version when the server holds it, else its sha256.
func baseName(d firmware.Delta) string {
	if d.BaseVersion != "" {
		return d.BaseVersion
	}
	return "sha256:" + short(d.Base)
}
