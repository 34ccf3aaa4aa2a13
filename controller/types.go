package controller

import (
	"encoding/json"
	"errors"
	"fmt"
	"time"

	"github.com/fota-dev/fota/protocol"
)

// Sentinel errors callers branch on (the admin API maps them to HTTP statuses).
var (
	ErrNotFound = errors.New("not found")
	ErrInvalid  = errors.New("invalid request")
	ErrConflict = errors.New("conflict")
	// ErrExpired is returned for a rollout of a release whose signed manifest has expired, or
	// expires before a job could finish within the rollout's phase timeouts.
	ErrExpired = errors.New("release expired")
	// ErrStateWrite is returned when a change could not be written to the state file (a full
	// disk, an I/O error). Nothing of the change was kept; the controller retries what it
	// decides by itself, and the caller may retry the rest.
	ErrStateWrite = errors.New("state write failed")
	// ErrClosed is returned once Close has been called.
	ErrClosed = errors.New("controller closed")
)

// Publisher sends a message to a device topic. The broker satisfies it in process.
type Publisher interface {
	Publish(topic string, payload []byte, qos byte) error
}

// Firmware is what the controller needs of the artifact store: the manifest of a release and
// reads of an artifact at an offset.
type Firmware interface {
	Manifest(model, version string) (protocol.Manifest, error)
	ReadAt(sha string, p []byte, off int64) (int, error)
}

// Deltas makes delta patches. Delta returns the signed manifest of a patch from the image
// with sha base to target; ready is false while the patch is still being made, and err says
// why no delta will be offered for the pair (the device then gets the full image).
type Deltas interface {
	Delta(base string, target protocol.Manifest) (m protocol.Manifest, ready bool, err error)
}

// Clock tells the time. The controller reads it for every decision, so a test can move time
// by hand and drive the scheduler with Tick.
type Clock interface {
	Now() time.Time
}

// SystemClock is the wall clock.
type SystemClock struct{}

// Now returns time.Now().
func (SystemClock) Now() time.Time { return time.Now() }

// Job states, the server's view of one device in one rollout. pending, offered and timed-out
// are the server's own; the rest follow the device's events.
const (
	JobPending     = "pending" // selected, not offered yet (wave not started, no slot, device offline)
	JobOffered     = "offered" // offer sent, device has not started
	JobDownloading = protocol.StateDownloading
	JobVerifying   = protocol.StateVerifying
	JobInstalling  = protocol.StateInstalling
	JobTimedOut    = "timed-out" // went silent in a phase; offered again after a backoff
	JobInstalled   = protocol.StateInstalled
	JobFailed      = protocol.StateFailed // failed for good; Reason says why
	JobCanceled    = "canceled"           // the rollout was canceled before the device installed
	JobSkipped     = "skipped"            // the device's certificate was revoked: it cannot connect again
	// JobUnreachable: the device stayed offline longer than Options.UnreachableAfter. It is
	// not waited for; if it comes back on an older version, its job starts again.
	JobUnreachable = "unreachable"
)

// JobStates lists every job state in the order a job moves through them.
var JobStates = []string{JobPending, JobOffered, JobDownloading, JobVerifying, JobInstalling, JobTimedOut, JobInstalled, JobFailed, JobCanceled, JobSkipped, JobUnreachable}

// Terminal reports whether a job in state s is finished. Every finished job carries a reason,
// except an installed one.
func Terminal(s string) bool {
	switch s {
	case JobInstalled, JobFailed, JobCanceled, JobSkipped, JobUnreachable:
		return true
	}
	return false
}

// Excused reports whether a job in state s ended because its device went away rather than
// by anything the update did: such devices neither count against a wave's gate nor hold the
// rollout open.
func Excused(s string) bool { return s == JobSkipped || s == JobUnreachable }

// InFlight reports whether a job in state s holds one of the rollout's concurrent slots.
func InFlight(s string) bool {
	return s == JobOffered || s == JobDownloading || s == JobVerifying || s == JobInstalling
}

// Rollout states.
const (
	RolloutScheduled  = "scheduled"  // waiting for its start time
	RolloutActive     = "active"     // offering the update, wave by wave
	RolloutPaused     = "paused"     // no new offers; devices at work finish; Reason says why
	RolloutCanceling  = "canceling"  // canceled; waiting for devices mid-install to report
	RolloutCanceled   = "canceled"   // no device of it works on it any more
	RolloutCompleted  = "completed"  // every selected device finished; a device that appears later reopens it
	RolloutSuperseded = "superseded" // a newer rollout of the same model took over
)

// Window end behaviours: what happens to transfers in progress when a maintenance window
// closes.
const (
	WindowEndContinue = "continue" // they go on; only new offers wait for the next window
	WindowEndPause    = "pause"    // chunk requests are answered "busy" until the next window
)

// Spec defaults, filled in by RolloutSpec.normalize. They favour safety: a rollout that goes
// wrong stops itself early.
const (
	DefaultGate               = 95.0
	DefaultMaxConcurrent      = 100
	DefaultTimeoutOffered     = 10 * time.Minute
	DefaultTimeoutDownloading = 10 * time.Minute
	DefaultTimeoutInstalling  = 30 * time.Minute
	DefaultMaxAttempts        = 3
	DefaultAbortFailureRate   = 10.0
	DefaultAbortMinFinished   = 10
	DefaultTZ                 = "UTC"
	maxWaves                  = 20
	maxSpecDevices            = 100_000
	maxTags                   = 32
)

// Duration is a time.Duration that reads and writes JSON as a Go duration string ("4h0m0s");
// it also reads a number of nanoseconds.
type Duration time.Duration

// D returns d as a time.Duration.
func (d Duration) D() time.Duration { return time.Duration(d) }

// MarshalJSON writes d as a string.
func (d Duration) MarshalJSON() ([]byte, error) {
	return json.Marshal(time.Duration(d).String())
}

// UnmarshalJSON reads a duration string or a number of nanoseconds.
func (d *Duration) UnmarshalJSON(b []byte) error {
	var s string
	if err := json.Unmarshal(b, &s); err == nil {
		v, err := time.ParseDuration(s)
		if err != nil {
			return fmt.Errorf("bad duration %q: %w", s, err)
		}
		*d = Duration(v)
		return nil
	}
	var n int64
	if err := json.Unmarshal(b, &n); err != nil {
		return fmt.Errorf("bad duration %s: want a string like \"4h\"", b)
	}
	*d = Duration(n)
	return nil
}

// RolloutSpec is what an operator asks for. Zero values mean the defaults documented on
// each field; the rollout keeps the spec with every default filled in.
type RolloutSpec struct {
	Model   string `json:"model"`
	Version string `json:"version"`

	// Selection. A device is part of the rollout when it is of Model, runs an older version,
	// and matches every criterion given: all Tags, one of Devices, and its stable hash within
	// Percent. Devices that register or change later and match join it.
	Tags    map[string]string `json:"tags,omitempty"`
	Devices []string          `json:"devices,omitempty"`
	Percent int               `json:"percent,omitempty"` // 1-100; default 100

	// Waves are cumulative percentages of the selected devices, the last one 100; default
	// [100]. A wave starts once the one before has Gate percent of its devices installed and
	// has soaked for Soak since.
	Waves []int    `json:"waves,omitempty"`
	Gate  float64  `json:"gate,omitempty"` // default DefaultGate
	Soak  Duration `json:"soak,omitempty"`

	// Schedule. Nothing is offered before Start (default: at once). With Window (a cron
	// expression, minute hour day-of-month month day-of-week, in TZ), new offers go out only
	// during WindowDuration after each firing, and each window starts at most one wave.
	Start          time.Time `json:"start,omitzero"`
	Window         string    `json:"window,omitempty"`
	WindowDuration Duration  `json:"window_duration,omitempty"`
	TZ             string    `json:"tz,omitempty"`         // IANA zone; default UTC
	WindowEnd      string    `json:"window_end,omitempty"` // WindowEndContinue (default) or WindowEndPause

	// Limits.
	MaxConcurrent int      `json:"max_concurrent,omitempty"` // devices in flight; default DefaultMaxConcurrent
	OfferJitter   Duration `json:"offer_jitter,omitempty"`   // each offer waits a random time up to this

	// Timeouts per phase and retries. offered: from the offer to the device's first event;
	// downloading: without progress; installing (verifying included): until installed. A job
	// that times out, or fails its transfer, is offered again after an exponential backoff
	// with jitter, at most MaxAttempts times in all; then it has failed for good.
	TimeoutOffered     Duration `json:"timeout_offered,omitempty"`
	TimeoutDownloading Duration `json:"timeout_downloading,omitempty"`
	TimeoutInstalling  Duration `json:"timeout_installing,omitempty"`
	MaxAttempts        int      `json:"max_attempts,omitempty"`

	// Abort rule: once AbortMinFinished devices of a wave finished and AbortFailureRate
	// percent of them failed, the rollout pauses and no later wave starts.
	AbortFailureRate float64 `json:"abort_failure_rate,omitempty"` // default DefaultAbortFailureRate
	AbortMinFinished int     `json:"abort_min_finished,omitempty"` // default DefaultAbortMinFinished
}

// Rollout is one release going out to the devices of a model.
type Rollout struct {
	ID      string      `json:"id"`
	Model   string      `json:"model"`
	Version string      `json:"version"`
	SHA256  string      `json:"sha256"`
	Size    int64       `json:"size"`
	State   string      `json:"state"`
	Reason  string      `json:"reason,omitempty"` // why it is paused or canceled
	Spec    RolloutSpec `json:"spec"`
	Created time.Time   `json:"created"`
	Updated time.Time   `json:"updated"`
	// Devices is how many devices the rollout targets; Counts splits them by job state
	// (devices without a job yet are pending).
	Devices int            `json:"devices"`
	Counts  map[string]int `json:"counts"`
	// WavesStarted counts the waves started so far.
	WavesStarted int          `json:"waves_started"`
	Waves        []WaveStatus `json:"waves"`
	Window       *WindowState `json:"window,omitempty"`
}

// Wave states.
const (
	WaveWaiting = "waiting" // not started
	WaveRunning = "running" // started, gate not met
	WaveSoaking = "soaking" // gate met, soak time running
	WaveDone    = "done"    // gate met and soaked
)

// WaveStatus is one wave of a rollout.
type WaveStatus struct {
	Percent int            `json:"percent"` // cumulative share of the selected devices
	State   string         `json:"state"`
	Devices int            `json:"devices"`
	Counts  map[string]int `json:"counts"`
	Started time.Time      `json:"started,omitzero"`
	GateMet time.Time      `json:"gate_met,omitzero"`
}

// WindowState says whether a rollout's maintenance window is open now.
type WindowState struct {
	Open bool      `json:"open"`
	Next time.Time `json:"next,omitzero"` // next opening, when closed
}

// Job is one device's part in a rollout.
type Job struct {
	ID      string   `json:"id"` // protocol job id, unique per device and offer
	Rollout string   `json:"rollout"`
	Device  string   `json:"device"`
	Wave    int      `json:"wave"` // 0-based
	From    string   `json:"from"`
	To      string   `json:"to"`
	State   string   `json:"state"`
	Reason  string   `json:"reason,omitempty"`
	Attempt int      `json:"attempt"`           // attempts used, counted against the rollout's max attempts
	Offers  int      `json:"offers"`            // fresh offers made, each with its own job id
	History []string `json:"history,omitempty"` // why earlier attempts ended
	Bytes   int64    `json:"bytes"`
	Seq     uint64   `json:"seq"` // last device event applied
	// Reached is the furthest phase the device reported in this offer (downloading, verifying,
	// installing, installed): an install counts only once it was verified with every byte.
	Reached  string    `json:"reached,omitempty"`
	Transfer uint32    `json:"transfer"`
	Delta    bool      `json:"delta"`              // streaming a patch rather than the image
	Artifact string    `json:"artifact,omitempty"` // sha256 of what is streamed
	Size     int64     `json:"size,omitempty"`     // bytes streamed
	Chunk    int       `json:"chunk,omitempty"`    // largest chunk the device takes; 0: the server's
	Created  time.Time `json:"created"`
	Offered  time.Time `json:"offered,omitzero"`  // latest offer
	Started  time.Time `json:"started,omitzero"`  // first downloading event
	Finished time.Time `json:"finished,omitzero"` // when it reached a terminal state
	RetryAt  time.Time `json:"retry_at,omitzero"` // when timed-out: next offer
	Updated  time.Time `json:"updated"`           // latest transition or device event
}

// RolloutDetail is a rollout with jobs in it, sorted by device id.
type RolloutDetail struct {
	Rollout
	Jobs []Job `json:"jobs"`
}

// JobQuery selects jobs of a rollout: of one state (all when empty), at most Limit (all when
// zero), after device id After (for paging).
type JobQuery struct {
	State string
	After string
	Limit int
}

// Device is a registered device.
type Device struct {
	ID       string            `json:"id"`
	Model    string            `json:"model"`
	Version  string            `json:"version"`
	SHA256   string            `json:"sha256,omitempty"`
	Tags     map[string]string `json:"tags,omitempty"`
	Online   bool              `json:"online"`
	LastSeen time.Time         `json:"last_seen"`
	Job      string            `json:"job,omitempty"`       // job id in progress
	MaxChunk int               `json:"max_chunk,omitempty"` // largest chunk the device takes; 0: the server's
	// Counter is the security counter of the image the device runs, as it reports it; 0:
	// unknown. A release whose counter is not above it is never offered: the device would
	// refuse it.
	Counter uint64 `json:"counter,omitempty"`
}

// Event is one entry of a rollout's event log: a transition of the rollout or of one of its
// devices.
type Event struct {
	Seq    uint64    `json:"seq"`
	Time   time.Time `json:"time"`
	Device string    `json:"device,omitempty"` // empty for the rollout's own transitions
	Job    string    `json:"job,omitempty"`
	From   string    `json:"from,omitempty"`
	To     string    `json:"to"`
	Reason string    `json:"reason,omitempty"`
}

// EventLog is a page of a rollout's event log. Only the latest entries are kept; Total counts
// every entry ever written.
type EventLog struct {
	Total  uint64  `json:"total"`
	Events []Event `json:"events"`
}
