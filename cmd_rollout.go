package main

import (
	"context"
	"flag"
	"fmt"
	"io"
	"maps"
	"slices"
	"strconv"
	"strings"
	"time"

	"github.com/fota-dev/fota/api"
	"github.com/fota-dev/fota/controller"
	"github.com/fota-dev/fota/protocol"
)

func runRollout(args []string, stdout io.Writer) error {
	return subcommand("rollout", args, stdout, map[string]func([]string, io.Writer) error{
		"create": runRolloutCreate,
		"list":   runRolloutList,
		"show":   runRolloutShow,
		"pause":  runRolloutPause,
		"resume": runRolloutResume,
		"cancel": runRolloutCancel,
		"watch":  runRolloutWatch,
		"events": runRolloutEvents,
	})
}

// tagFlags collects repeated --tags k=v (or k=v,k2=v2).
type tagFlags map[string]string

func (t tagFlags) String() string {
	var parts []string
	for _, k := range slices.Sorted(maps.Keys(t)) {
		parts = append(parts, k+"="+t[k])
	}
	return strings.Join(parts, ",")
}

func (t tagFlags) Set(s string) error {
	for _, kv := range strings.Split(s, ",") {
		k, v, ok := strings.Cut(kv, "=")
		if !ok || v == "" {
			return fmt.Errorf("want key=value, got %q", kv)
		}
		if err := controller.ValidTag(k, v); err != nil {
			return err
		}
		t[k] = v
	}
	return nil
}

func runRolloutCreate(args []string, stdout io.Writer) error {
	const cmd = "rollout create"
	fs := newFlags(cmd, stdout)
	af := addAdminFlags(fs)
	model := fs.String("model", "", "hardware model to update (required)")
	version := fs.String("version", "", "firmware version to install, added with 'fota firmware add' (required)")
	tags := tagFlags{}
	fs.Var(tags, "tags", "select devices with this tag, key=value; repeat for more (all must match)")
	devices := fs.String("devices", "", "select only these devices, id,id,...")
	percent := fs.Int("percent", 100, "select this stable share of the devices, by hash of the id (the same devices every time)")
	waves := fs.String("waves", "100", "cumulative percentages of the selected devices per wave, e.g. 1,10,50,100")
	gate := fs.Float64("gate", controller.DefaultGate, "percent of a wave installed before the next wave starts")
	soak := fs.Duration("soak", 0, "wait this long after a wave met its gate before the next starts")
	start := fs.String("start", "", "start at this time: RFC 3339 (2025-03-04T02:00:00+01:00) or +DURATION from now (default at once)")
	window := fs.String("window", "", `maintenance windows as a cron expression, e.g. "0 2 * * *"; new offers only inside, and each window starts at most one wave`)
	windowDur := fs.Duration("window-duration", 0, "how long each window stays open, e.g. 4h (required with --window)")
	tz := fs.String("tz", controller.DefaultTZ, "time zone of --window, e.g. Europe/Paris")
	windowEnd := fs.String("window-end", controller.WindowEndContinue, "when a window closes, transfers under way: continue, or pause until the next window")
	maxConc := fs.Int("max-concurrent", controller.DefaultMaxConcurrent, "at most this many devices in flight")
	jitter := fs.Duration("offer-jitter", 0, "delay each offer by a random time up to this, so devices do not all start at once")
	tOffered := fs.Duration("timeout-offered", controller.DefaultTimeoutOffered, "an offered device that has not started by then times out")
	tDownloading := fs.Duration("timeout-downloading", controller.DefaultTimeoutDownloading, "a downloading device without progress for this long times out")
	tInstalling := fs.Duration("timeout-installing", controller.DefaultTimeoutInstalling, "a device verifying or installing for this long times out")
	attempts := fs.Int("max-attempts", controller.DefaultMaxAttempts, "offers per device (a timeout or broken transfer is retried with exponential backoff); then it failed for good")
	abortRate := fs.Float64("abort-failure-rate", controller.DefaultAbortFailureRate, "pause the rollout when this percent of a wave's finished devices failed")
	abortMin := fs.Int("abort-min-finished", controller.DefaultAbortMinFinished, "the abort rule applies once this many devices of a wave finished")
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
	if err := checkModel(cmd, *model); err != nil {
		return err
	}
	if _, err := checkVersion(cmd, *version); err != nil {
		return err
	}
	spec := controller.RolloutSpec{
		Model: *model, Version: *version, Percent: *percent, Gate: *gate, Soak: controller.Duration(*soak),
		Window: *window, WindowDuration: controller.Duration(*windowDur), TZ: *tz, WindowEnd: *windowEnd,
		MaxConcurrent: *maxConc, OfferJitter: controller.Duration(*jitter),
		TimeoutOffered: controller.Duration(*tOffered), TimeoutDownloading: controller.Duration(*tDownloading),
		TimeoutInstalling: controller.Duration(*tInstalling), MaxAttempts: *attempts,
		AbortFailureRate: *abortRate, AbortMinFinished: *abortMin,
	}
	if len(tags) > 0 {
		spec.Tags = tags
	}
	if *devices != "" {
		for _, id := range strings.Split(*devices, ",") {
			if err := protocol.ValidDeviceID(id); err != nil {
				return usagef("%s: --devices: %v", cmd, err)
			}
			spec.Devices = append(spec.Devices, id)
		}
	}
	for _, w := range strings.Split(*waves, ",") {
		n, err := strconv.Atoi(strings.TrimSpace(w))
		if err != nil {
			return usagef("%s: --waves %q: want percentages like 1,10,50,100", cmd, *waves)
		}
		spec.Waves = append(spec.Waves, n)
	}
	if *start != "" {
		t, err := parseStart(*start, time.Now())
		if err != nil {
			return usagef("%s: --start: %v", cmd, err)
		}
		spec.Start = t
	}
	if *windowEnd != controller.WindowEndContinue && *windowEnd != controller.WindowEndPause {
		return usagef("%s: --window-end %q: want continue or pause", cmd, *windowEnd)
	}
	if (*window == "") != (*windowDur == 0) {
		return usagef("%s: --window and --window-duration go together", cmd)
	}
	if err := af.check(cmd); err != nil {
		return err
	}
	return af.callAPI(cmd, func(ctx context.Context, c *api.Client) error {
		r, err := c.CreateRollout(ctx, spec)
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

// parseStart reads an RFC 3339 time or +DURATION from now.
func parseStart(s string, now time.Time) (time.Time, error) {
	if d, ok := strings.CutPrefix(s, "+"); ok {
		v, err := time.ParseDuration(d)
		if err != nil || v < 0 {
			return time.Time{}, fmt.Errorf("bad duration %q", d)
		}
		return now.Add(v), nil
	}
	t, err := time.Parse(time.RFC3339, s)
	if err != nil {
		return time.Time{}, fmt.Errorf("bad time %q: want RFC 3339, e.g. 2025-03-04T02:00:00Z, or +2h", s)
	}
	return t, nil
}

func runRolloutList(args []string, stdout io.Writer) error {
	return runList("rollout list", args, stdout, (*api.Client).ListRollouts, listTable[controller.Rollout]{
		empty:  "no rollouts; start one with 'fota rollout create'",
		header: []string{"ID", "MODEL", "VERSION", "STATE", "DEVICES", "INSTALLED", "FAILED", "WAVES", "CREATED"},
		cells: func(r controller.Rollout) []string {
			return []string{r.ID, r.Model, r.Version, r.State, strconv.Itoa(total(r.Counts)),
				strconv.Itoa(r.Counts[controller.JobInstalled]), strconv.Itoa(r.Counts[controller.JobFailed]),
				fmt.Sprintf("%d/%d", r.WavesStarted, len(r.Spec.Waves)), fmtTime(r.Created)}
		},
	})
}

func runRolloutShow(args []string, stdout io.Writer) error {
	const cmd = "rollout show"
	fs := newFlags(cmd, stdout)
	af := addAdminFlags(fs)
	asJSON := fs.Bool("json", false, "print as JSON: state, counts per device state overall and per wave, and jobs")
	jobs := fs.Int("jobs", 1000, "show at most this many jobs (0 for none)")
	failed := fs.Bool("failed", false, "list every device that failed for good, with its reason")
	id, err := parseFlagsArg(fs, args, cmd, "rollout ID")
	if err != nil {
		return err
	}
	if *jobs < 0 || *jobs > 10000 {
		return usagef("%s: --jobs %d: want 0 to 10000", cmd, *jobs)
	}
	if err := af.check(cmd); err != nil {
		return err
	}
	return af.callAPI(cmd, func(ctx context.Context, c *api.Client) error {
		if *failed {
			list, err := allJobs(ctx, c, id, controller.JobFailed)
			if err != nil {
				return err
			}
			if *asJSON {
				return printJSON(stdout, list)
			}
			return printFailures(stdout, list)
		}
		d, err := c.GetRolloutJobs(ctx, id, *jobs)
		if err != nil {
			return err
		}
		if *asJSON {
			return printJSON(stdout, d)
		}
		return printRollout(stdout, d)
	})
}

// allJobs pages through every job of a rollout in a state.
func allJobs(ctx context.Context, c *api.Client, id, state string) ([]controller.Job, error) {
	out := []controller.Job{}
	q := controller.JobQuery{State: state, Limit: 10000}
	for {
		page, err := c.RolloutJobs(ctx, id, q)
		if err != nil {
			return nil, err
		}
		out = append(out, page...)
		if len(page) < q.Limit {
			return out, nil
		}
		q.After = page[len(page)-1].Device
	}
}

func printFailures(w io.Writer, jobs []controller.Job) error {
	if len(jobs) == 0 {
		_, err := fmt.Fprintln(w, "no device failed")
		return err
	}
	tw := newTable(w)
	row(tw, "DEVICE", "FROM", "TO", "ATTEMPTS", "FINISHED", "REASON")
	for _, j := range jobs {
		row(tw, j.Device, orDash(j.From), j.To, strconv.Itoa(j.Attempt), fmtTime(j.Finished), orDash(j.Reason))
	}
	return tw.Flush()
}

// printRollout writes a header, the waves, then one row per job.
func printRollout(w io.Writer, d controller.RolloutDetail) error {
	s := d.Spec
	tw := newTable(w)
	row(tw, "rollout", d.ID)
	row(tw, "model", d.Model)
	row(tw, "version", fmt.Sprintf("%s (%s, sha256 %s)", d.Version, fmtSize(d.Size), short(d.SHA256)))
	row(tw, "state", d.State)
	if d.Reason != "" {
		row(tw, "reason", d.Reason)
	}
	row(tw, "created", fmtTime(d.Created))
	row(tw, "updated", fmtTime(d.Updated))
	row(tw, "devices", countsLine(d.Counts))
	if sel := selectionLine(s); sel != "" {
		row(tw, "selection", sel)
	}
	if len(s.Waves) > 0 {
		row(tw, "waves", fmt.Sprintf("%d of %d started; gate %g%%, soak %v", d.WavesStarted, len(s.Waves), s.Gate, s.Soak.D()))
	}
	if s.Window != "" {
		state := "closed"
		if d.Window != nil && d.Window.Open {
			state = "open"
		} else if d.Window != nil && !d.Window.Next.IsZero() {
			state += ", opens " + fmtTime(d.Window.Next)
		}
		row(tw, "window", fmt.Sprintf("%q for %v (%s), window end %s; %s", s.Window, s.WindowDuration.D(), s.TZ, s.WindowEnd, state))
	}
	if !s.Start.IsZero() {
		row(tw, "start", fmtTime(s.Start))
	}
	if s.MaxConcurrent > 0 {
		row(tw, "limits", fmt.Sprintf("%d in flight, offer jitter %v; timeouts offered %v, downloading %v, installing %v; %d attempts",
			s.MaxConcurrent, s.OfferJitter.D(), s.TimeoutOffered.D(), s.TimeoutDownloading.D(), s.TimeoutInstalling.D(), s.MaxAttempts))
		row(tw, "abort", fmt.Sprintf("at %g%% failed of at least %d finished in a wave", s.AbortFailureRate, s.AbortMinFinished))
	}
	if err := tw.Flush(); err != nil {
		return err
	}
	if len(d.Waves) > 0 {
		fmt.Fprintln(w)
		tw = newTable(w)
		row(tw, "WAVE", "PERCENT", "STATE", "DEVICES", "INSTALLED", "FAILED", "IN FLIGHT", "WAITING", "STARTED")
		for i, wv := range d.Waves {
			row(tw, strconv.Itoa(i+1), strconv.Itoa(wv.Percent)+"%", wv.State, strconv.Itoa(wv.Devices),
				strconv.Itoa(wv.Counts[controller.JobInstalled]), strconv.Itoa(wv.Counts[controller.JobFailed]),
				strconv.Itoa(inFlight(wv.Counts)), strconv.Itoa(wv.Counts[controller.JobPending]+wv.Counts[controller.JobTimedOut]),
				fmtTime(wv.Started))
		}
		if err := tw.Flush(); err != nil {
			return err
		}
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

func selectionLine(s controller.RolloutSpec) string {
	var parts []string
	if len(s.Tags) > 0 {
		parts = append(parts, "tags "+tagFlags(s.Tags).String())
	}
	if len(s.Devices) > 0 {
		parts = append(parts, fmt.Sprintf("%d listed devices", len(s.Devices)))
	}
	if s.Percent > 0 && s.Percent < 100 {
		parts = append(parts, fmt.Sprintf("%d%% of the fleet", s.Percent))
	}
	return strings.Join(parts, ", ")
}

func inFlight(counts map[string]int) int {
	return counts[controller.JobOffered] + counts[controller.JobDownloading] + counts[controller.JobVerifying] + counts[controller.JobInstalling]
}

// countsLine summarises devices per state, in the order a job moves through them: "4
// devices: pending 1, downloading 2, installed 1".
func countsLine(counts map[string]int) string {
	n := total(counts)
	if n == 0 {
		return "0 devices"
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
	noun := "devices"
	if n == 1 {
		noun = "device"
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

// rolloutControl runs pause, resume or cancel.
func rolloutControl(cmd string, args []string, stdout io.Writer, extra func(fs *flag.FlagSet) func() string,
	call func(ctx context.Context, c *api.Client, id, reason string) (controller.Rollout, error)) error {
	fs := newFlags(cmd, stdout)
	af := addAdminFlags(fs)
	asJSON := fs.Bool("json", false, "print the rollout as JSON")
	reason := func() string { return "" }
	if extra != nil {
		reason = extra(fs)
	}
	id, err := parseFlagsArg(fs, args, cmd, "rollout ID")
	if err != nil {
		return err
	}
	if err := af.check(cmd); err != nil {
		return err
	}
	return af.callAPI(cmd, func(ctx context.Context, c *api.Client) error {
		r, err := call(ctx, c, id, reason())
		if err != nil {
			return err
		}
		if *asJSON {
			return printJSON(stdout, r)
		}
		line := fmt.Sprintf("rollout %s %s", clean(r.ID), clean(r.State))
		if r.State == controller.RolloutCanceling {
			line += fmt.Sprintf(": waiting for %d devices verifying or installing to report",
				r.Counts[controller.JobVerifying]+r.Counts[controller.JobInstalling])
		}
		if r.Reason != "" && r.State != controller.RolloutCanceling {
			line += " (" + clean(r.Reason) + ")"
		}
		_, err = fmt.Fprintln(stdout, line)
		return err
	})
}

func runRolloutPause(args []string, stdout io.Writer) error {
	return rolloutControl("rollout pause", args, stdout, func(fs *flag.FlagSet) func() string {
		r := fs.String("reason", "", "why, kept with the rollout and in its event log")
		return func() string { return *r }
	}, func(ctx context.Context, c *api.Client, id, reason string) (controller.Rollout, error) {
		return c.PauseRollout(ctx, id, reason)
	})
}

func runRolloutResume(args []string, stdout io.Writer) error {
	return rolloutControl("rollout resume", args, stdout, nil, func(ctx context.Context, c *api.Client, id, _ string) (controller.Rollout, error) {
		return c.ResumeRollout(ctx, id)
	})
}

func runRolloutCancel(args []string, stdout io.Writer) error {
	return rolloutControl("rollout cancel", args, stdout, nil, func(ctx context.Context, c *api.Client, id, _ string) (controller.Rollout, error) {
		return c.CancelRollout(ctx, id)
	})
}

func runRolloutEvents(args []string, stdout io.Writer) error {
	const cmd = "rollout events"
	fs := newFlags(cmd, stdout)
	af := addAdminFlags(fs)
	asJSON := fs.Bool("json", false, "print as JSON")
	after := fs.Uint64("after", 0, "only events after this sequence number")
	limit := fs.Int("limit", 100, "at most this many events (the server keeps the latest ones of each rollout)")
	id, err := parseFlagsArg(fs, args, cmd, "rollout ID")
	if err != nil {
		return err
	}
	if *limit < 1 || *limit > 10000 {
		return usagef("%s: --limit %d: want 1 to 10000", cmd, *limit)
	}
	if err := af.check(cmd); err != nil {
		return err
	}
	return af.callAPI(cmd, func(ctx context.Context, c *api.Client) error {
		from := *after
		if from == 0 {
			// Without --after, the latest events: find where they start.
			head, err := c.RolloutEvents(ctx, id, 0, 1)
			if err != nil {
				return err
			}
			if head.Total > uint64(*limit) {
				from = head.Total - uint64(*limit)
			}
		}
		log, err := c.RolloutEvents(ctx, id, from, *limit)
		if err != nil {
			return err
		}
		if *asJSON {
			return printJSON(stdout, log)
		}
		if len(log.Events) == 0 {
			_, err := fmt.Fprintf(stdout, "no events (%d in all)\n", log.Total)
			return err
		}
		tw := newTable(stdout)
		row(tw, "SEQ", "TIME", "DEVICE", "JOB", "FROM", "TO", "REASON")
		for _, e := range log.Events {
			row(tw, strconv.FormatUint(e.Seq, 10), fmtTime(e.Time), orDash(e.Device), orDash(e.Job), orDash(e.From), e.To, orDash(e.Reason))
		}
		if err := tw.Flush(); err != nil {
			return err
		}
		first := log.Events[0].Seq
		if first > 1 {
			_, err = fmt.Fprintf(stdout, "%d events in all; showing %d from %d\n", log.Total, len(log.Events), first)
		}
		return err
	})
}
