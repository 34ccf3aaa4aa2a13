package main

import (
	"context"
	"fmt"
	"io"
	"slices"
	"strconv"
	"strings"

	"github.com/fota-dev/fota/api"
	"github.com/fota-dev/fota/controller"
	"github.com/fota-dev/fota/firmware"
	"github.com/fota-dev/fota/protocol"
)

func runRollout(args []string, stdout io.Writer) error {
	return subcommand("rollout", args, stdout, map[string]func([]string, io.Writer) error{
		"create": runRolloutCreate,
		"list":   runRolloutList,
		"show":   runRolloutShow,
	})
}

func runRolloutCreate(args []string, stdout io.Writer) error {
	const cmd = "rollout create"
	fs := newFlags(cmd, stdout)
	af := addAdminFlags(fs)
	model := fs.String("model", "", "hardware model to update")
	version := fs.String("version", "", "firmware version to install (added with 'fota firmware add')")
	asJSON := fs.Bool("json", false, "print the new rollout as JSON")
	if err := parseFlags(fs, args, 0); err != nil {
		return err
	}
	switch {
	case *model == "":
		return usagef("%s: --model is required", cmd)
	case *version == "":
		return usagef("%s: --version is required", cmd)
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
	return af.callAPI(cmd, func(ctx context.Context, c *api.Client) error {
		r, err := c.CreateRollout(ctx, controller.RolloutSpec{Model: *model, Version: *version})
		if err != nil {
			return err
		}
		if *asJSON {
			return printJSON(stdout, r)
		}
		_, err = fmt.Fprintf(stdout, "rollout %s created: %s %s, %s, %s\n",
			clean(r.ID), clean(r.Model), clean(r.Version), clean(r.State), countsLine(r.Counts))
		return err
	})
}

func runRolloutList(args []string, stdout io.Writer) error {
	const cmd = "rollout list"
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
		list, err := c.ListRollouts(ctx)
		if err != nil {
			return err
		}
		if *asJSON {
			return printJSON(stdout, list)
		}
		if len(list) == 0 {
			_, err := fmt.Fprintln(stdout, "no rollouts; start one with 'fota rollout create'")
			return err
		}
		tw := newTable(stdout)
		row(tw, "ID", "MODEL", "VERSION", "STATE", "JOBS", "INSTALLED", "FAILED", "CREATED")
		for _, r := range list {
			row(tw, r.ID, r.Model, r.Version, r.State, strconv.Itoa(total(r.Counts)),
				strconv.Itoa(r.Counts[controller.JobInstalled]), strconv.Itoa(r.Counts[controller.JobFailed]), fmtTime(r.Created))
		}
		return tw.Flush()
	})
}

func runRolloutShow(args []string, stdout io.Writer) error {
	const cmd = "rollout show"
	fs := newFlags(cmd, stdout)
	af := addAdminFlags(fs)
	asJSON := fs.Bool("json", false, "print as JSON, with every job")
	id, err := parseFlagsArg(fs, args, cmd, "rollout ID")
	if err != nil {
		return err
	}
	if err := af.check(cmd); err != nil {
		return err
	}
	return af.callAPI(cmd, func(ctx context.Context, c *api.Client) error {
		d, err := c.GetRollout(ctx, id)
		if err != nil {
			return err
		}
		if *asJSON {
			return printJSON(stdout, d)
		}
		return printRollout(stdout, d)
	})
}

// printRollout writes a header, then one row per job.
func printRollout(w io.Writer, d controller.RolloutDetail) error {
	tw := newTable(w)
	row(tw, "rollout", d.ID)
	row(tw, "model", d.Model)
	row(tw, "version", fmt.Sprintf("%s (%s, sha256 %s)", d.Version, fmtSize(d.Size), short(d.SHA256)))
	row(tw, "state", d.State)
	row(tw, "created", fmtTime(d.Created))
	row(tw, "updated", fmtTime(d.Updated))
	row(tw, "jobs", countsLine(d.Counts))
	if err := tw.Flush(); err != nil {
		return err
	}
	if len(d.Jobs) == 0 {
		return nil
	}
	fmt.Fprintln(w)
	tw = newTable(w)
	row(tw, "DEVICE", "FROM", "TO", "STATE", "BYTES", "REASON")
	for _, j := range d.Jobs {
		row(tw, j.Device, orDash(j.From), j.To, j.State, fmtSize(j.Bytes), orDash(j.Reason))
	}
	return tw.Flush()
}

// countsLine summarises jobs per state, in the order a job moves through them: "4 jobs:
// pending 1, downloading 2, installed 1".
func countsLine(counts map[string]int) string {
	n := total(counts)
	if n == 0 {
		return "0 jobs"
	}
	states := slices.Clone(controller.JobStates)
	var extra []string
	for s := range counts {
		if !slices.Contains(states, s) {
			extra = append(extra, s)
		}
	}
	slices.Sort(extra)
	var parts []string
	for _, s := range append(states, extra...) {
		if counts[s] > 0 {
			parts = append(parts, fmt.Sprintf("%s %d", clean(s), counts[s]))
		}
	}
	noun := "jobs"
	if n == 1 {
		noun = "job"
	}
	return fmt.Sprintf("%d %s: %s", n, noun, strings.Join(parts, ", "))
}

func total(counts map[string]int) int {
	n := 0
	for _, c := range counts {
		n += c
	}
	return n
}
