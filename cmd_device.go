package main

import (
	"context"
	"fmt"
	"io"

	"github.com/fota-dev/fota/api"
	"github.com/fota-dev/fota/controller"
	"github.com/fota-dev/fota/protocol"
)

func runDevice(args []string, stdout io.Writer) error {
	return subcommand("device", args, stdout, map[string]func([]string, io.Writer) error{
		"list": runDeviceList,
		"show": runDeviceShow,
	})
}

func runDeviceList(args []string, stdout io.Writer) error {
	const cmd = "device list"
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
		list, err := c.ListDevices(ctx)
		if err != nil {
			return err
		}
		if *asJSON {
			return printJSON(stdout, list)
		}
		if len(list) == 0 {
			_, err := fmt.Fprintln(stdout, "no devices yet; a device registers when it first connects")
			return err
		}
		tw := newTable(stdout)
		row(tw, "ID", "MODEL", "VERSION", "ONLINE", "LAST SEEN", "JOB")
		for _, d := range list {
			row(tw, d.ID, d.Model, orDash(d.Version), yesNo(d.Online), fmtTime(d.LastSeen), orDash(d.Job))
		}
		return tw.Flush()
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

func printDevice(w io.Writer, d controller.Device) error {
	tw := newTable(w)
	row(tw, "device", d.ID)
	row(tw, "model", d.Model)
	row(tw, "version", orDash(d.Version))
	row(tw, "sha256", orDash(d.SHA256))
	row(tw, "online", yesNo(d.Online))
	row(tw, "last seen", fmtTime(d.LastSeen))
	row(tw, "job", orDash(d.Job))
	return tw.Flush()
}

func yesNo(b bool) string {
	if b {
		return "yes"
	}
	return "no"
}
