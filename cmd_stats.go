package main

import (
	"context"
	"fmt"
	"io"
	"maps"
	"slices"
	"strconv"

	"github.com/fota-dev/fota/api"
)

// runStats prints the server's live counters, one per line: part, counter, value.
func runStats(args []string, stdout io.Writer) error {
	const cmd = "stats"
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
		st, err := c.Stats(ctx)
		if err != nil {
			return err
		}
		if *asJSON {
			return printJSON(stdout, st)
		}
		tw := newTable(stdout)
		fmt.Fprintln(tw, "PART\tCOUNTER\tVALUE")
		for _, part := range slices.Sorted(maps.Keys(st)) {
			for _, name := range slices.Sorted(maps.Keys(st[part])) {
				fmt.Fprintf(tw, "%s\t%s\t%s\n", part, name, strconv.FormatFloat(st[part][name], 'f', -1, 64))
			}
		}
		return tw.Flush()
	})
}
