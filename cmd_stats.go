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
	return runQuery("stats", args, stdout, func(ctx context.Context, c *api.Client, asJSON bool) error {
		st, err := c.Stats(ctx)
		if err != nil {
			return err
		}
		if asJSON {
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
