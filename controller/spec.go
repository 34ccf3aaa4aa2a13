package controller

import (
	"fmt"
	"maps"
	"slices"
	"strings"
	"time"
	// Windows are in the operator's zone; a minimal host may have no zoneinfo files.
	_ "time/tzdata"
	"unicode"

	"github.com/fota-dev/fota/protocol"
	"github.com/robfig/cron/v3"
)

// normalize checks the spec and fills in every default, so the stored spec says exactly what
// the rollout does.
func (s *RolloutSpec) normalize() error {
	v, err := protocol.ParseVersion(s.Version)
	if err != nil {
		return fmt.Errorf("%w: %v", ErrInvalid, err)
	}
	s.Version = v.String()
	if s.Model == "" {
		return fmt.Errorf("%w: model is required", ErrInvalid)
	}
	if len(s.Tags) > maxTags {
		return fmt.Errorf("%w: %d tags, at most %d", ErrInvalid, len(s.Tags), maxTags)
	}
	for k, v := range s.Tags {
		if err := ValidTag(k, v); err != nil {
			return err
		}
	}
	if len(s.Devices) > maxSpecDevices {
		return fmt.Errorf("%w: %d devices listed, at most %d", ErrInvalid, len(s.Devices), maxSpecDevices)
	}
	for _, id := range s.Devices {
		if err := protocol.ValidDeviceID(id); err != nil {
			return fmt.Errorf("%w: devices: %v", ErrInvalid, err)
		}
	}
	if len(s.Devices) > 0 {
		s.Devices = slices.Compact(slices.Sorted(slices.Values(s.Devices)))
	}
	switch {
	case s.Percent == 0:
		s.Percent = 100
	case s.Percent < 0 || s.Percent > 100:
		return fmt.Errorf("%w: percent %d: want 1 to 100", ErrInvalid, s.Percent)
	}
	if len(s.Waves) == 0 {
		s.Waves = []int{100}
	}
	if len(s.Waves) > maxWaves {
		return fmt.Errorf("%w: %d waves, at most %d", ErrInvalid, len(s.Waves), maxWaves)
	}
	for i, w := range s.Waves {
		if w < 1 || w > 100 || (i > 0 && w <= s.Waves[i-1]) {
			return fmt.Errorf("%w: waves %v: want growing percentages from 1 to 100, e.g. 1,10,50,100", ErrInvalid, s.Waves)
		}
	}
	if s.Waves[len(s.Waves)-1] != 100 {
		return fmt.Errorf("%w: waves %v: the last wave must be 100", ErrInvalid, s.Waves)
	}
	switch {
	case s.Gate == 0:
		s.Gate = DefaultGate
	case s.Gate < 0 || s.Gate > 100:
		return fmt.Errorf("%w: gate %g: want a percentage from 0 to 100", ErrInvalid, s.Gate)
	}
	if s.Soak < 0 || s.OfferJitter < 0 || s.WindowDuration < 0 ||
		s.TimeoutOffered < 0 || s.TimeoutDownloading < 0 || s.TimeoutInstalling < 0 {
		return fmt.Errorf("%w: durations must not be negative", ErrInvalid)
	}
	if s.TZ == "" {
		s.TZ = DefaultTZ
	}
	if _, err := time.LoadLocation(s.TZ); err != nil {
		return fmt.Errorf("%w: tz %q: %v", ErrInvalid, s.TZ, err)
	}
	if s.Window != "" {
		if s.WindowDuration == 0 {
			return fmt.Errorf("%w: a window needs a window duration", ErrInvalid)
		}
		if _, err := parseWindow(s.Window, s.TZ, s.WindowDuration.D()); err != nil {
			return err
		}
	} else if s.WindowDuration != 0 {
		return fmt.Errorf("%w: a window duration needs a window", ErrInvalid)
	}
	switch s.WindowEnd {
	case "":
		s.WindowEnd = WindowEndContinue
	case WindowEndContinue, WindowEndPause:
	default:
		return fmt.Errorf("%w: window end %q: want %s or %s", ErrInvalid, s.WindowEnd, WindowEndContinue, WindowEndPause)
	}
	switch {
	case s.MaxConcurrent == 0:
		s.MaxConcurrent = DefaultMaxConcurrent
	case s.MaxConcurrent < 0:
		return fmt.Errorf("%w: max concurrent %d: want at least 1", ErrInvalid, s.MaxConcurrent)
	}
	if s.TimeoutOffered == 0 {
		s.TimeoutOffered = Duration(DefaultTimeoutOffered)
	}
	if s.TimeoutDownloading == 0 {
		s.TimeoutDownloading = Duration(DefaultTimeoutDownloading)
	}
	if s.TimeoutInstalling == 0 {
		s.TimeoutInstalling = Duration(DefaultTimeoutInstalling)
	}
	switch {
	case s.MaxAttempts == 0:
		s.MaxAttempts = DefaultMaxAttempts
	case s.MaxAttempts < 0 || s.MaxAttempts > 100:
		return fmt.Errorf("%w: max attempts %d: want 1 to 100", ErrInvalid, s.MaxAttempts)
	}
	switch {
	case s.AbortFailureRate == 0:
		s.AbortFailureRate = DefaultAbortFailureRate
	case s.AbortFailureRate < 0 || s.AbortFailureRate > 100:
		return fmt.Errorf("%w: abort failure rate %g: want a percentage above 0, at most 100", ErrInvalid, s.AbortFailureRate)
	}
	switch {
	case s.AbortMinFinished == 0:
		s.AbortMinFinished = DefaultAbortMinFinished
	case s.AbortMinFinished < 0:
		return fmt.Errorf("%w: abort min finished %d: want at least 1", ErrInvalid, s.AbortMinFinished)
	}
	if s.Tags != nil {
		s.Tags = maps.Clone(s.Tags)
	}
	return nil
}

// Tag limits.
const (
	maxTagKey   = 64
	maxTagValue = 128
)

// ValidTag checks a device tag: a key of letters, digits, '.', '_' and '-', and a value of
// printable characters without '=' or ','. An empty value is valid (it removes the tag).
func ValidTag(k, v string) error {
	if k == "" || len(k) > maxTagKey {
		return fmt.Errorf("%w: tag key %q: want 1 to %d characters", ErrInvalid, k, maxTagKey)
	}
	for _, r := range k {
		if !(r == '.' || r == '_' || r == '-' || r < unicode.MaxASCII && (unicode.IsLetter(r) || unicode.IsDigit(r))) {
			return fmt.Errorf("%w: tag key %q: only letters, digits, '.', '_' and '-'", ErrInvalid, k)
		}
	}
	if len(v) > maxTagValue {
		return fmt.Errorf("%w: tag %s: value longer than %d bytes", ErrInvalid, k, maxTagValue)
	}
	if strings.ContainsAny(v, "=,") || strings.ContainsFunc(v, func(r rune) bool { return !unicode.IsPrint(r) || r == unicode.ReplacementChar }) {
		return fmt.Errorf("%w: tag %s: value %q may not hold '=', ',' or unprintable characters", ErrInvalid, k, v)
	}
	return nil
}

// window is a parsed maintenance window: open during dur after each firing of sched.
type window struct {
	sched cron.Schedule
	dur   time.Duration

	// memo of the latest session found open, so a long-open window is not walked back from
	// scratch on every tick.
	memoAt    time.Time // time the memo was computed for
	memoStart time.Time // start of the session open at memoAt
	memoCover time.Time // the session stays open at least until here
}

var windowParser = cron.NewParser(cron.Minute | cron.Hour | cron.Dom | cron.Month | cron.Dow | cron.Descriptor)

// parseWindow parses a cron expression in zone tz. The robfig parser takes its zone from a
// "TZ=" prefix, and slices that prefix without checking it, so the prefix is refused here and
// the zone set from tz instead.
func parseWindow(expr, tz string, dur time.Duration) (w *window, err error) {
	if strings.Contains(expr, "TZ=") {
		return nil, fmt.Errorf("%w: window %q: give the time zone with tz, not in the expression", ErrInvalid, expr)
	}
	loc, err := time.LoadLocation(tz)
	if err != nil {
		return nil, fmt.Errorf("%w: tz %q: %v", ErrInvalid, tz, err)
	}
	defer func() {
		if p := recover(); p != nil {
			w, err = nil, fmt.Errorf("%w: window %q: cannot parse", ErrInvalid, expr)
		}
	}()
	sched, err := windowParser.Parse(expr)
	if err != nil {
		return nil, fmt.Errorf("%w: window %q: %v", ErrInvalid, expr, err)
	}
	spec, ok := sched.(*cron.SpecSchedule)
	if !ok {
		// "@every" counts from whenever it is asked, so it has no fixed openings.
		return nil, fmt.Errorf("%w: window %q: want fixed times, e.g. \"0 2 * * *\", not @every", ErrInvalid, expr)
	}
	spec.Location = loc
	if spec.Next(time.Now()).IsZero() {
		return nil, fmt.Errorf("%w: window %q never opens", ErrInvalid, expr)
	}
	return &window{sched: spec, dur: dur}, nil
}

// maxWalk bounds how many firings one session lookup follows back in time.
const maxWalk = 100_000

// session reports whether the window is open at now and, if it is, when the open stretch
// began: windows that overlap merge into one stretch, which is what "exactly one wave per
// window" counts. floor bounds how far back it looks (the rollout's creation): a stretch open
// since before then begins, for this rollout, at the earliest firing found after floor-dur.
func (w *window) session(now, floor time.Time) (bool, time.Time) {
	f := w.sched.Next(now.Add(-w.dur))
	if f.IsZero() || f.After(now) {
		return false, time.Time{}
	}
	if !w.memoAt.IsZero() && !now.Before(w.memoAt) && w.stillOpen(now) {
		return true, w.memoStart
	}
	start := f
	for range maxWalk {
		if start.Before(floor) {
			break
		}
		p := w.sched.Next(start.Add(-w.dur))
		if p.IsZero() || !p.Before(start) {
			break
		}
		start = p
	}
	w.memoAt, w.memoStart = now, start
	w.memoCover = w.coverAt(now)
	return true, start
}

// coverAt returns until when the window is known open from firings at or before t.
func (w *window) coverAt(t time.Time) time.Time {
	var cover time.Time
	for g, n := w.sched.Next(t.Add(-w.dur)), 0; !g.IsZero() && !g.After(t) && n < maxWalk; g, n = w.sched.Next(g), n+1 {
		cover = g.Add(w.dur)
	}
	return cover
}

// stillOpen reports whether the window stayed open without a gap from memoAt to now, and
// moves the memo forward.
func (w *window) stillOpen(now time.Time) bool {
	cover := w.memoCover
	for g, n := w.sched.Next(w.memoAt), 0; !g.IsZero() && !g.After(now) && n < maxWalk; g, n = w.sched.Next(g), n+1 {
		if g.After(cover) {
			return false
		}
		if e := g.Add(w.dur); e.After(cover) {
			cover = e
		}
	}
	if !cover.After(now) {
		return false
	}
	w.memoAt, w.memoCover = now, cover
	return true
}

// next returns the next opening after now.
func (w *window) next(now time.Time) time.Time { return w.sched.Next(now) }
