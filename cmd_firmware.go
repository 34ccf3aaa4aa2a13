package main

import (
	"bytes"
	"context"
	"crypto/sha256"
	"encoding/hex"
	"encoding/json"
	"errors"
	"fmt"
	"io"
	"io/fs"
	"os"
	"strconv"
	"strings"
	"time"

	"github.com/fota-dev/fota/api"
	"github.com/fota-dev/fota/atomicfile"
	"github.com/fota-dev/fota/firmware"
	"github.com/fota-dev/fota/protocol"
)

func runFirmware(args []string, stdout io.Writer) error {
	return subcommand("firmware", args, stdout, map[string]func([]string, io.Writer) error{
		"add":    runFirmwareAdd,
		"delete": runFirmwareDelete,
		"list":   runFirmwareList,
		"sign":   runFirmwareSign,
	})
}

func runFirmwareAdd(args []string, stdout io.Writer) error {
	const cmd = "firmware add"
	fs := newFlags(cmd, stdout)
	af := addAdminFlags(fs)
	model := fs.String("model", "", "hardware model the image is for (default: the manifest's)")
	version := fs.String("version", "", "firmware version, MAJOR.MINOR.PATCH[-PRERELEASE] (default: the manifest's)")
	file := fs.String("file", "", "firmware image file")
	notes := fs.String("notes", "", "release notes, kept with the image (UTF-8, at most 64 KiB)")
	notesFile := fs.String("notes-file", "", "file holding the release notes, instead of --notes")
	counter := fs.Uint64("counter", 0, "security counter (default: the manifest's, or one above the model's highest)")
	expires := fs.String("expires", "", "when devices stop accepting the manifest the server signs: RFC 3339 time or duration (e.g. 2160h, 90d)")
	manifestFile := fs.String("manifest", "", "manifest signed offline with 'fota firmware sign'; required by a server that holds only release.pub")
	asJSON := fs.Bool("json", false, "print the stored record as JSON")
	if err := parseFlags(fs, args, 0); err != nil {
		return err
	}
	switch {
	case *model == "" && *manifestFile == "":
		return usagef("%s: --model is required", cmd)
	case *version == "" && *manifestFile == "":
		return usagef("%s: --version is required", cmd)
	case *file == "":
		return usagef("%s: --file is required", cmd)
	case *expires != "" && *manifestFile != "":
		return usagef("%s: --expires cannot change a signed manifest; sign it again with 'fota firmware sign --expires'", cmd)
	case *notes != "" && *notesFile != "":
		return usagef("%s: give --notes or --notes-file, not both", cmd)
	}
	if err := firmware.ValidNotes(*notes); err != nil {
		return usagef("%s: --notes: %v", cmd, err)
	}
	if *model != "" {
		if err := checkModel(cmd, *model); err != nil {
			return err
		}
	}
	if *version != "" {
		if _, err := checkVersion(cmd, *version); err != nil {
			return err
		}
	}
	var exp time.Time
	if *expires != "" {
		var err error
		if exp, err = parseExpiry(*expires, time.Now()); err != nil {
			return usagef("%s: --expires: %v", cmd, err)
		}
	}
	if err := af.check(cmd); err != nil {
		return err
	}
	// Check the files before dialling, so a typo in a path is reported as such.
	if *notesFile != "" {
		text, err := readNotes(*notesFile)
		if err != nil {
			return fmt.Errorf("%s: %w", cmd, err)
		}
		*notes = text
	}
	f, err := openImage(*file)
	if err != nil {
		return fmt.Errorf("%s: %w", cmd, err)
	}
	defer f.Close()
	var manifest *protocol.Manifest
	if *manifestFile != "" {
		m, err := readManifest(*manifestFile)
		if err != nil {
			return fmt.Errorf("%s: %w", cmd, err)
		}
		// The server checks everything; the size is free to check here, and saves sending an
		// image only to have it refused.
		if fi, err := f.Stat(); err == nil && fi.Size() != m.Size {
			return fmt.Errorf("%s: manifest %s signs an image of %d bytes, %s has %d", cmd, *manifestFile, m.Size, *file, fi.Size())
		}
		manifest = &m
	}

	return af.callAPI(cmd, func(ctx context.Context, c *api.Client) error {
		fw, created, err := c.UploadFirmware(ctx, api.FirmwareUpload{
			Model: *model, Version: *version, Notes: *notes, Counter: *counter, Expires: exp,
			Manifest: manifest, Body: f,
		})
		if err != nil {
			return err
		}
		if *asJSON {
			return printJSON(stdout, fw)
		}
		format := "added firmware %s %s: %s, counter %d, sha256 %s%s\n"
		if !created {
			format = "firmware %s %s was already stored with this image: %s, counter %d, sha256 %s%s\n"
		}
		extra := ""
		if !fw.Expires.IsZero() {
			extra = ", expires " + fw.Expires.UTC().Format(time.RFC3339)
		}
		_, err = fmt.Fprintf(stdout, format, clean(fw.Model), clean(fw.Version), fmtSize(fw.Size), fw.Counter, clean(fw.SHA256), extra)
		return err
	})
}

// readNotes reads release notes from path, refusing more than the server keeps.
func readNotes(path string) (string, error) {
	f, err := os.Open(path)
	if err != nil {
		var pe *fs.PathError
		if errors.As(err, &pe) {
			err = pe.Err
		}
		return "", fmt.Errorf("cannot read notes file %s: %w", path, err)
	}
	defer f.Close()
	b, err := io.ReadAll(io.LimitReader(f, firmware.MaxNotesLen+1))
	switch {
	case err != nil:
		return "", fmt.Errorf("cannot read notes file %s: %w", path, err)
	case len(b) > firmware.MaxNotesLen:
		return "", fmt.Errorf("notes file %s is larger than the limit of %d bytes (64 KiB)", path, firmware.MaxNotesLen)
	}
	if err := firmware.ValidNotes(string(b)); err != nil {
		return "", fmt.Errorf("notes file %s: %w", path, err)
	}
	return string(b), nil
}

// maxManifestFile bounds what readManifest reads; a manifest is about 500 bytes.
const maxManifestFile = 64 << 10

// readManifest reads a manifest as 'fota firmware sign' writes it.
func readManifest(path string) (protocol.Manifest, error) {
	var m protocol.Manifest
	b, err := os.ReadFile(path)
	if err != nil {
		var pe *fs.PathError
		if errors.As(err, &pe) {
			err = pe.Err
		}
		return m, fmt.Errorf("cannot read manifest %s: %w", path, err)
	}
	if len(b) > maxManifestFile {
		return m, fmt.Errorf("manifest %s is larger than %d bytes", path, maxManifestFile)
	}
	dec := json.NewDecoder(bytes.NewReader(b))
	dec.DisallowUnknownFields()
	if err := dec.Decode(&m); err != nil {
		return m, fmt.Errorf("manifest %s is not a manifest's JSON: %w", path, err)
	}
	if _, err := dec.Token(); err != io.EOF {
		return m, fmt.Errorf("manifest %s holds more than one JSON object", path)
	}
	if m.Signature == "" {
		return m, fmt.Errorf("manifest %s is not signed; sign it with 'fota firmware sign'", path)
	}
	return m, nil
}

// parseExpiry reads an expiry as an RFC 3339 time or as a duration from now: Go's syntax
// (2160h) or whole days (90d). It must lie in the future.
func parseExpiry(s string, now time.Time) (time.Time, error) {
	if t, err := time.Parse(time.RFC3339, s); err == nil {
		if !t.After(now) {
			return time.Time{}, fmt.Errorf("%s has passed", s)
		}
		return t, nil
	}
	var d time.Duration
	if days, ok := strings.CutSuffix(s, "d"); ok {
		n, err := strconv.ParseUint(days, 10, 16)
		if err != nil {
			return time.Time{}, fmt.Errorf("bad %q: want an RFC 3339 time (2030-01-02T15:04:05Z) or a duration (2160h, 90d)", s)
		}
		d = time.Duration(n) * 24 * time.Hour
	} else {
		var err error
		if d, err = time.ParseDuration(s); err != nil {
			return time.Time{}, fmt.Errorf("bad %q: want an RFC 3339 time (2030-01-02T15:04:05Z) or a duration (2160h, 90d)", s)
		}
	}
	if d < time.Second {
		return time.Time{}, fmt.Errorf("%s: want a duration of at least a second", s)
	}
	return now.Add(d), nil
}

// runFirmwareSign signs a manifest on the machine that holds the release key, with no server:
// the server, holding only release.pub, then accepts the image with this manifest.
func runFirmwareSign(args []string, stdout io.Writer) error {
	const cmd = "firmware sign"
	fs := newFlags(cmd, stdout)
	keyFile := fs.String("key", "", "release private key, release.key from 'fota keys generate'")
	model := fs.String("model", "", "hardware model the image is for")
	version := fs.String("version", "", "firmware version, MAJOR.MINOR.PATCH[-PRERELEASE]")
	counter := fs.Uint64("counter", 0, "security counter; devices refuse one not above what they run")
	file := fs.String("file", "", "firmware image file")
	expires := fs.String("expires", "", "when devices stop accepting it: RFC 3339 time or duration (e.g. 2160h, 90d); default never")
	out := fs.String("out", "", "file to write the signed manifest to, or - for stdout")
	if err := parseFlags(fs, args, 0); err != nil {
		return err
	}
	for _, req := range []struct{ name, val string }{{"key", *keyFile}, {"model", *model}, {"version", *version}, {"file", *file}, {"out", *out}} {
		if req.val == "" {
			return usagef("%s: --%s is required", cmd, req.name)
		}
	}
	if *counter == 0 {
		return usagef("%s: --counter is required and must be above 0", cmd)
	}
	if err := checkModel(cmd, *model); err != nil {
		return err
	}
	canonical, err := checkVersion(cmd, *version)
	if err != nil {
		return err
	}
	m := protocol.Manifest{V: protocol.ProtocolVersion, Model: *model, Version: canonical, Counter: *counter}
	if *expires != "" {
		exp, err := parseExpiry(*expires, time.Now())
		if err != nil {
			return usagef("%s: --expires: %v", cmd, err)
		}
		// The store keeps expiries as UTC whole seconds; a manifest in any other form could
		// not be rebuilt from the record, and the server refuses it.
		m.Expires = exp.UTC().Truncate(time.Second).Format(time.RFC3339)
	}
	key, err := firmware.LoadPrivateKey(*keyFile)
	if err != nil {
		return fmt.Errorf("%s: %w", cmd, err)
	}
	f, err := openImage(*file)
	if err != nil {
		return fmt.Errorf("%s: %w", cmd, err)
	}
	defer f.Close()
	h := sha256.New()
	if m.Size, err = io.Copy(h, f); err != nil {
		return fmt.Errorf("%s: read %s: %w", cmd, *file, err)
	}
	m.SHA256 = hex.EncodeToString(h.Sum(nil))
	signed, err := firmware.Sign(m, key)
	if err != nil {
		return fmt.Errorf("%s: %w", cmd, err)
	}
	b, err := json.MarshalIndent(signed, "", "  ")
	if err != nil {
		return fmt.Errorf("%s: encode manifest: %w", cmd, err)
	}
	b = append(b, '\n')
	if *out == "-" {
		_, err := stdout.Write(b)
		return err
	}
	if err := atomicfile.Write(*out, b, 0o644); err != nil {
		return fmt.Errorf("%s: %w", cmd, err)
	}
	extra := ""
	if m.Expires != "" {
		extra = ", expires " + m.Expires
	}
	_, err = fmt.Fprintf(stdout, "signed %s %s: %s, counter %d, sha256 %s%s; wrote %s\n",
		m.Model, m.Version, fmtSize(m.Size), m.Counter, m.SHA256, extra, *out)
	return err
}

// openImage opens the firmware file at path, refusing what cannot be an image.
func openImage(path string) (*os.File, error) {
	f, err := os.Open(path)
	if err != nil {
		var pe *fs.PathError
		if errors.As(err, &pe) {
			err = pe.Err
		}
		return nil, fmt.Errorf("cannot read firmware file %s: %w", path, err)
	}
	fi, err := f.Stat()
	switch {
	case err != nil:
		f.Close()
		return nil, fmt.Errorf("cannot read firmware file %s: %w", path, err)
	case fi.IsDir():
		f.Close()
		return nil, fmt.Errorf("firmware file %s is a directory", path)
	case !fi.Mode().IsRegular():
		// The upload sends the size first so that the server can refuse an oversized image
		// before it is sent; only a regular file has one.
		f.Close()
		return nil, fmt.Errorf("firmware file %s is not a regular file", path)
	case fi.Size() == 0:
		f.Close()
		return nil, fmt.Errorf("firmware file %s is empty", path)
	}
	return f, nil
}

func runFirmwareList(args []string, stdout io.Writer) error {
	return runList("firmware list", args, stdout, (*api.Client).ListFirmware, listTable[firmware.Firmware]{
		empty:  "no firmware stored; add some with 'fota firmware add'",
		header: []string{"MODEL", "VERSION", "COUNTER", "SIGNED", "SIZE", "SHA256", "EXPIRES", "CREATED", "NOTES"},
		cells: func(f firmware.Firmware) []string {
			return []string{f.Model, f.Version, strconv.FormatUint(f.Counter, 10), yesNo(f.Signature != ""),
				fmtSize(f.Size), short(f.SHA256), fmtTime(f.Expires), fmtTime(f.Created), notesLine(f.Notes)}
		},
	})
}

// notesLine is what a table row shows of release notes, which may run to 64 KiB: the first
// line, cut short. --json has them whole.
func notesLine(notes string) string {
	const maxRunes = 60
	line, _, more := strings.Cut(strings.TrimSpace(notes), "\n")
	line = strings.TrimSpace(line)
	if r := []rune(line); len(r) > maxRunes {
		line, more = string(r[:maxRunes]), true
	}
	if more {
		line += "…"
	}
	return line
}

// runFirmwareDelete removes an image from the server. The server refuses while an unfinished
// rollout targets it, so a device mid-download never loses the file it is fetching.
func runFirmwareDelete(args []string, stdout io.Writer) error {
	const cmd = "firmware delete"
	fs := newFlags(cmd, stdout)
	af := addAdminFlags(fs)
	model := fs.String("model", "", "hardware model of the image (required)")
	version := fs.String("version", "", "version of the image to delete (required)")
	if err := parseFlags(fs, args, 0); err != nil {
		return err
	}
	switch {
	case *model == "":
		return usagef("%s: --model is required", cmd)
	case *version == "":
		return usagef("%s: --version is required", cmd)
	}
	if err := checkModel(cmd, *model); err != nil {
		return err
	}
	canonical, err := checkVersion(cmd, *version)
	if err != nil {
		return err
	}
	if err := af.check(cmd); err != nil {
		return err
	}
	return af.callAPI(cmd, func(ctx context.Context, c *api.Client) error {
		if err := c.DeleteFirmware(ctx, *model, canonical); err != nil {
			return err
		}
		_, err := fmt.Fprintf(stdout, "deleted firmware %s %s\n", *model, canonical)
		return err
	})
}
