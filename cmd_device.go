package main

import (
	"context"
	"fmt"
	"io"
	"strings"

	"github.com/fota-dev/fota/api"
	"github.com/fota-dev/fota/controller"
	"github.com/fota-dev/fota/protocol"
)

func runDevice(args []string, stdout io.Writer) error {
	return subcommand("device", args, stdout, map[string]func([]string, io.Writer) error{
		"list": runDeviceList,
		"show": runDeviceShow,
		"tag":  runDeviceTag,
	})
}

func runDeviceList(args []string, stdout io.Writer) error {
	return runList("device list", args, stdout, (*api.Client).ListDevices, listTable[api.Device]{
		empty:  "no devices yet; a device registers when it first connects",
		header: []string{"ID", "MODEL", "VERSION", "ONLINE", "LAST SEEN", "TAGS", "JOB"},
		cells: func(d api.Device) []string {
			return []string{deviceName(d), orDash(d.Model), orDash(d.Version), yesNo(d.Online), fmtTime(d.LastSeen), orDash(tagFlags(d.Tags).String()), orDash(d.Job)}
		},
	})
}

func runDeviceShow(args []string, stdout io.Writer) error {
	const cmd = "device show"
	fs := newFlags(cmd, stdout)
	af := addAdminFlags(fs)
	asJSON := fs.Bool("json", false, "print as JSON")
	id, err := parseFlagsArg(fs, args, cmd, "device ID")
	if err != nil {
		return err
	}
	if err := protocol.ValidDeviceID(id); err != nil {
		return usagef("%s: bad device ID: %v", cmd, err)
	}
	if err := af.check(cmd); err != nil {
		return err
	}
	return af.callAPI(cmd, func(ctx context.Context, c *api.Client) error {
		d, err := c.GetDevice(ctx, id)
		if err != nil {
			return err
		}
		if *asJSON {
			return printJSON(stdout, d)
		}
		return printDevice(stdout, d)
	})
}

// deviceName is a device's id, marked when its certificate is revoked: such a device stays
// listed, since its record and jobs remain, but will never connect again.
func deviceName(d api.Device) string {
	if d.Revoked {
		return d.ID + " (revoked)"
	}
	return d.ID
}

func printDevice(w io.Writer, d api.Device) error {
	tw := newTable(w)
	row(tw, "device", deviceName(d))
	row(tw, "model", orDash(d.Model))
	row(tw, "version", orDash(d.Version))
	row(tw, "sha256", orDash(d.SHA256))
	row(tw, "online", yesNo(d.Online))
	row(tw, "last seen", fmtTime(d.LastSeen))
	row(tw, "tags", orDash(tagFlags(d.Tags).String()))
	row(tw, "job", orDash(d.Job))
	return tw.Flush()
}

// runDeviceTag sets tags: fota device tag ID k=v [k=v ...]; k= removes tag k.
func runDeviceTag(args []string, stdout io.Writer) error {
	const cmd = "device tag"
	fs := newFlags(cmd, stdout)
	af := addAdminFlags(fs)
	asJSON := fs.Bool("json", false, "print the device as JSON")
	// Flags may come before, between or after the positional arguments.
	var pos []string
	rest := args
	for {
		if err := parseFlags(fs, rest, len(rest)); err != nil {
			return err
		}
		if fs.NArg() == 0 {
			break
		}
		pos = append(pos, fs.Arg(0))
		rest = fs.Args()[1:]
	}
	if len(pos) == 0 {
		return usagef("%s: missing device ID", cmd)
	}
	id := pos[0]
	if err := protocol.ValidDeviceID(id); err != nil {
		return usagef("%s: bad device ID: %v", cmd, err)
	}
	if len(pos) == 1 {
		return usagef("%s: missing tags: want key=value (key= removes a tag)", cmd)
	}
	tags := map[string]string{}
	for _, kv := range pos[1:] {
		k, v, ok := strings.Cut(kv, "=")
		if !ok {
			return usagef("%s: bad tag %q: want key=value (key= removes a tag)", cmd, kv)
		}
		if err := controller.ValidTag(k, v); err != nil {
			return usagef("%s: %v", cmd, err)
		}
		tags[k] = v
	}
	if err := af.check(cmd); err != nil {
		return err
	}
	return af.callAPI(cmd, func(ctx context.Context, c *api.Client) error {
		d, err := c.TagDevice(ctx, id, tags)
		if err != nil {
			return err
		}
		if *asJSON {
			return printJSON(stdout, d)
		}
		note := ""
		if d.LastSeen.IsZero() {
			note = " (not connected yet; rollouts select it by these tags once it reports its version)"
		}
		_, err = fmt.Fprintf(stdout, "device %s tags: %s%s\n", clean(d.ID), orDash(clean(tagFlags(d.Tags).String())), note)
		return err
	})
}

func yesNo(b bool) string {
	if b {
		return "yes"
	}
	return "no"
}
