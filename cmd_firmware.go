package main

import (
	"context"
	"errors"
	"fmt"
	"io"
	"io/fs"
	"os"
	"strconv"

	"github.com/fota-dev/fota/api"
	"github.com/fota-dev/fota/firmware"
	"github.com/fota-dev/fota/protocol"
)

func runFirmware(args []string, stdout io.Writer) error {
	return subcommand("firmware", args, stdout, map[string]func([]string, io.Writer) error{
		"add":  runFirmwareAdd,
		"list": runFirmwareList,
	})
}

func runFirmwareAdd(args []string, stdout io.Writer) error {
	const cmd = "firmware add"
	fs := newFlags(cmd, stdout)
	af := addAdminFlags(fs)
	model := fs.String("model", "", "hardware model the image is for")
	version := fs.String("version", "", "firmware version, MAJOR.MINOR.PATCH[-PRERELEASE]")
	file := fs.String("file", "", "firmware image file")
	notes := fs.String("notes", "", "release notes, kept with the image")
	asJSON := fs.Bool("json", false, "print the stored record as JSON")
	if err := parseFlags(fs, args, 0); err != nil {
		return err
	}
	switch {
	case *model == "":
		return usagef("%s: --model is required", cmd)
	case *version == "":
		return usagef("%s: --version is required", cmd)
	case *file == "":
		return usagef("%s: --file is required", cmd)
	}
	if err := firmware.ValidModel(*model); err != nil {
		return usagef("%s: --model: %v", cmd, err)
	}
	if _, err := protocol.ParseVersion(*version); err != nil {
		return usagef("%s: bad version %q: want MAJOR.MINOR.PATCH with an optional -PRERELEASE, e.g. 1.2.3", cmd, *version)
	}
	if err := af.check(cmd); err != nil {
		return err
	}
	// Check the file before dialling, so a typo in the path is reported as such.
	f, err := openImage(*file)
	if err != nil {
		return fmt.Errorf("%s: %w", cmd, err)
	}
	defer f.Close()

	return af.callAPI(cmd, func(ctx context.Context, c *api.Client) error {
		fw, created, err := c.AddFirmware(ctx, *model, *version, *notes, f)
		if err != nil {
			return err
		}
		if *asJSON {
			return printJSON(stdout, fw)
		}
		format := "added firmware %s %s: %s, counter %d, sha256 %s\n"
		if !created {
			format = "firmware %s %s was already stored with this image: %s, counter %d, sha256 %s\n"
		}
		_, err = fmt.Fprintf(stdout, format, clean(fw.Model), clean(fw.Version), fmtSize(fw.Size), fw.Counter, clean(fw.SHA256))
		return err
	})
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
	const cmd = "firmware list"
	fs := newFlags(cmd, stdout)
	af := addAdminFlags(fs)
	asJSON := fs.Bool("json", false, "print as JSON")
	if err := parseFlags(fs, args, 0); err != nil {
		return err
	}
	if err := af.check(cmd); err != nil {
		return err
	}
	return af.callAPI(cmd, func(ctx context.Context, c *api.Client) error {
		list, err := c.ListFirmware(ctx)
		if err != nil {
			return err
		}
		if *asJSON {
			return printJSON(stdout, list)
		}
		if len(list) == 0 {
			_, err := fmt.Fprintln(stdout, "no firmware stored; add some with 'fota firmware add'")
			return err
		}
		tw := newTable(stdout)
		row(tw, "MODEL", "VERSION", "COUNTER", "SIZE", "SHA256", "CREATED", "NOTES")
		for _, f := range list {
			row(tw, f.Model, f.Version, strconv.FormatUint(f.Counter, 10), fmtSize(f.Size), short(f.SHA256), fmtTime(f.Created), f.Notes)
		}
		return tw.Flush()
	})
}
