package controller

import (
	"errors"
	"time"

	"github.com/fota-dev/fota/protocol"
)

// Sentinel errors callers branch on (the admin API maps them to HTTP statuses).
var (
	ErrNotFound = errors.New("not found")
	ErrInvalid  = errors.New("invalid request")
	ErrConflict = errors.New("conflict")
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

// Job states, the server's view of one device in one rollout. pending and offered are the
// server's own; the rest follow the device's events.
const (
	JobPending     = "pending" // selected, not yet offered (device offline)
	JobOffered     = "offered" // offer sent, device has not started
	JobDownloading = protocol.StateDownloading
	JobVerifying   = protocol.StateVerifying
	JobInstalling  = protocol.StateInstalling
	JobInstalled   = protocol.StateInstalled
	JobFailed      = protocol.StateFailed
)

// JobStates lists every job state in the order a job moves through them.
var JobStates = []string{JobPending, JobOffered, JobDownloading, JobVerifying, JobInstalling, JobInstalled, JobFailed}

// Terminal reports whether a job in state s is finished.
func Terminal(s string) bool { return s == JobInstalled || s == JobFailed }

// Rollout states.
const (
	RolloutActive     = "active"     // offering the update to matching devices
	RolloutCompleted  = "completed"  // every selected device finished; a device that appears later reopens it
	RolloutSuperseded = "superseded" // a newer rollout of the same model took over
)

// RolloutSpec is what an operator asks for.
type RolloutSpec struct {
	Model   string `json:"model"`
	Version string `json:"version"`
}

// Rollout is one release going out to the devices of a model.
type Rollout struct {
	ID      string         `json:"id"`
	Model   string         `json:"model"`
	Version string         `json:"version"`
	SHA256  string         `json:"sha256"`
	Size    int64          `json:"size"`
	State   string         `json:"state"`
	Created time.Time      `json:"created"`
	Updated time.Time      `json:"updated"`
	Counts  map[string]int `json:"counts"` // jobs per state
}

// Job is one device's part in a rollout.
type Job struct {
	ID       string    `json:"id"` // protocol job id, unique per device
	Rollout  string    `json:"rollout"`
	Device   string    `json:"device"`
	From     string    `json:"from"`
	To       string    `json:"to"`
	State    string    `json:"state"`
	Reason   string    `json:"reason,omitempty"`
	Bytes    int64     `json:"bytes"`
	Seq      uint64    `json:"seq"` // last device event applied
	Transfer uint32    `json:"transfer"`
	Delta    bool      `json:"delta"`              // streaming a patch rather than the image
	Artifact string    `json:"artifact,omitempty"` // sha256 of what is streamed
	Size     int64     `json:"size,omitempty"`     // bytes streamed
	Created  time.Time `json:"created"`
	Started  time.Time `json:"started,omitzero"`  // first downloading event
	Finished time.Time `json:"finished,omitzero"` // installed or failed
	Updated  time.Time `json:"updated"`
}

// RolloutDetail is a rollout with every job in it, sorted by device id.
type RolloutDetail struct {
	Rollout
	Jobs []Job `json:"jobs"`
}

// Device is a registered device.
type Device struct {
	ID       string    `json:"id"`
	Model    string    `json:"model"`
	Version  string    `json:"version"`
	SHA256   string    `json:"sha256,omitempty"`
	Online   bool      `json:"online"`
	LastSeen time.Time `json:"last_seen"`
	Job      string    `json:"job,omitempty"` // rollout/job id in progress
}
