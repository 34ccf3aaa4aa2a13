package main

import (
	"context"
	"errors"
	"fmt"
	"io"
	"strings"
	"time"

	"github.com/fota-dev/fota/api"
	"github.com/fota-dev/fota/controller"
)

// runRolloutWatch redraws a rollout's progress, one bar per wave, until it ends or Ctrl-C.
func runRolloutWatch(args []string, stdout io.Writer) error {
	const cmd = "rollout watch"
	fs := newFlags(cmd, stdout)
	af := addAdminFlags(fs)
	interval := fs.Duration("interval", time.Second, "redraw this often")
	once := fs.Bool("once", false, "draw one frame, without cursor movement, and exit")
	id, err := parseFlagsArg(fs, args, cmd, "rollout ID")
	if err != nil {
		return err
	}
	if *interval < 100*time.Millisecond {
		return usagef("%s: --interval %v: want at least 100ms", cmd, *interval)
	}
	if err := af.check(cmd); err != nil {
		return err
	}
	return af.callAPI(cmd, func(ctx context.Context, c *api.Client) error {
		var eta etaEstimate
		lines := 0
		for {
			r, err := c.GetRolloutJobs(ctx, id, 0)
			if err != nil {
				if errors.Is(err, context.Canceled) {
					return nil // Ctrl-C
				}
				return err
			}
			eta.add(time.Now(), r.Rollout)
			frame := watchFrame(r.Rollout, eta.left(), 30)
			if !*once && lines > 0 {
				// Back to the top of the previous frame, and clear below.
				fmt.Fprintf(stdout, "\x1b[%dA\x1b[J", lines)
			}
			if _, err := io.WriteString(stdout, frame); err != nil {
				return err
			}
			lines = strings.Count(frame, "\n")
			if *once || rolloutEnded(r.State) {
				return nil
			}
			select {
			case <-ctx.Done():
				return nil
			case <-time.After(*interval):
			}
		}
	})
}

func rolloutEnded(state string) bool {
	switch state {
	case controller.RolloutCompleted, controller.RolloutCanceled, controller.RolloutSuperseded:
		return true
	}
	return false
}

// etaEstimate projects when every device will have finished from the rate seen so far.
type etaEstimate struct {
	firstAt   time.Time
	firstDone int
	rate      float64 // devices finished per second
	remaining int
}

func finished(counts map[string]int) int {
	n := 0
	for s, k := range counts {
		if controller.Terminal(s) {
			n += k
		}
	}
	return n
}

func (e *etaEstimate) add(now time.Time, r controller.Rollout) {
	done := finished(r.Counts)
	if e.firstAt.IsZero() {
		e.firstAt, e.firstDone = now, done
	}
	if secs := now.Sub(e.firstAt).Seconds(); secs > 0 && done > e.firstDone {
		e.rate = float64(done-e.firstDone) / secs
	}
	e.remaining = r.Devices - done
}

// left returns the time to go, or -1 when unknown.
func (e *etaEstimate) left() time.Duration {
	if e.remaining <= 0 {
		return 0
	}
	if e.rate <= 0 {
		return -1
	}
	return time.Duration(float64(e.remaining) / e.rate * float64(time.Second)).Round(time.Second)
}

// watchFrame draws a rollout: a header, one bar per wave (installed '#', failed 'x', device
// gone '-' (skipped or unreachable), in flight '>', waiting '.'), and counts per state.
func watchFrame(r controller.Rollout, eta time.Duration, width int) string {
	var b strings.Builder
	etaText := "ETA unknown"
	switch {
	case rolloutEnded(r.State):
		etaText = "ended"
	case eta == 0:
		etaText = "ETA now"
	case eta > 0:
		etaText = "ETA " + eta.String()
	}
	fmt.Fprintf(&b, "rollout %s  %s %s  %s  %d/%d finished  %s\n", clean(r.ID), clean(r.Model), clean(r.Version),
		clean(r.State), finished(r.Counts), r.Devices, etaText)
	if r.Reason != "" {
		fmt.Fprintf(&b, "  %s\n", clean(r.Reason))
	}
	if r.Window != nil {
		if r.Window.Open {
			b.WriteString("  window open\n")
		} else {
			fmt.Fprintf(&b, "  window closed, opens %s\n", fmtTime(r.Window.Next))
		}
	}
	for i, w := range r.Waves {
		fmt.Fprintf(&b, "wave %-2d %3d%% %s %-8s %s\n", i+1, w.Percent, bar(w.Counts, w.Devices, width), w.State, waveCounts(w))
	}
	return b.String()
}

func waveCounts(w controller.WaveStatus) string {
	parts := []string{fmt.Sprintf("%d devices", w.Devices)}
	for _, s := range controller.JobStates {
		if n := w.Counts[s]; n > 0 {
			parts = append(parts, fmt.Sprintf("%s %d", s, n))
		}
	}
	return strings.Join(parts, ", ")
}

// bar draws counts out of n as width cells.
func bar(counts map[string]int, n, width int) string {
	if n <= 0 {
		return "[" + strings.Repeat(" ", width) + "]"
	}
	cells := func(k int) int { return (k*width + n/2) / n }
	inst := cells(counts[controller.JobInstalled])
	fail := cells(counts[controller.JobFailed] + counts[controller.JobCanceled])
	gone := cells(counts[controller.JobSkipped] + counts[controller.JobUnreachable])
	fly := cells(inFlight(counts))
	if over := inst + fail + gone + fly - width; over > 0 {
		fly = max(0, fly-over)
	}
	rest := width - inst - fail - gone - fly
	return "[" + strings.Repeat("#", inst) + strings.Repeat("x", fail) + strings.Repeat("-", gone) + strings.Repeat(">", fly) + strings.Repeat(".", max(rest, 0)) + "]"
}
