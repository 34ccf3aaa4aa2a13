package protocol

import (
	"errors"
	"fmt"
	"strings"
	"unicode"
)

// Root is the prefix of every fota topic. A device lives in Root/{deviceID}/.
const Root = "fota/v1"

// Topic suffixes under Root/{deviceID}/. Upstream topics are published by the device and
// read by the server; downstream topics are published by the server and read by the device.
const (
	// Upstream.
	SuffixStatus  = "status" // Status, QoS 1, sent on every connect and after each install
	SuffixEvent   = "event"  // Event, QoS 1, every job state transition and progress
	SuffixRequest = "req"    // ChunkRequest, QoS 0
	// Downstream.
	SuffixJob   = "job"   // Offer, QoS 1
	SuffixChunk = "chunk" // binary chunk frames, QoS 0
)

// MaxDeviceIDLen is the longest device id accepted, in bytes.
const MaxDeviceIDLen = 64

// reservedID is the client id the embedded broker uses for itself.
const reservedID = "inline"

// ErrBadDeviceID is returned (wrapped) by ValidDeviceID.
var ErrBadDeviceID = errors.New("invalid device id")

// ValidDeviceID reports whether id can name a device: 1 to 64 bytes of valid UTF-8 without the
// MQTT specials '/', '+', '#', a leading '$', NUL, control characters or white space. The id is
// a topic level and the certificate's CN, so anything that could widen a topic is refused.
func ValidDeviceID(id string) error {
	switch {
	case id == "":
		return fmt.Errorf("%w: empty", ErrBadDeviceID)
	case len(id) > MaxDeviceIDLen:
		return fmt.Errorf("%w: %d bytes, at most %d", ErrBadDeviceID, len(id), MaxDeviceIDLen)
	case id == reservedID:
		return fmt.Errorf("%w: %q is reserved for the server's own client", ErrBadDeviceID, id)
	}
	for _, r := range id {
		switch {
		case r == '/' || r == '+' || r == '#' || r == '$':
			return fmt.Errorf("%w: %q may not contain %q", ErrBadDeviceID, id, r)
		case r == unicode.ReplacementChar:
			return fmt.Errorf("%w: %q is not valid UTF-8", ErrBadDeviceID, id)
		case r == 0 || unicode.IsSpace(r) || unicode.IsControl(r):
			return fmt.Errorf("%w: %q may not contain white space or control characters", ErrBadDeviceID, id)
		}
	}
	return nil
}

// MaxModelLen is the longest model name accepted, in bytes.
const MaxModelLen = 64

// ErrBadModel matches (errors.Is) every error of ValidModel.
var ErrBadModel = errors.New("invalid model")

// ValidModel reports whether s can name a hardware model: 1 to 64 bytes of [A-Za-z0-9._-],
// other than "." and "..". It is the one rule for a model wherever one is given: a device
// certificate, a firmware release, a manifest, a device's status. A model is a path segment
// of the admin API, where "." and ".." would name another path.
func ValidModel(s string) error {
	switch {
	case s == "" || len(s) > MaxModelLen:
		return modelError(fmt.Sprintf("model %q: want 1 to %d characters", s, MaxModelLen))
	case s == "." || s == "..":
		return modelError(fmt.Sprintf("model %q: \".\" and \"..\" are not names", s))
	}
	for _, r := range s {
		if !(r >= 'a' && r <= 'z' || r >= 'A' && r <= 'Z' || r >= '0' && r <= '9' || r == '.' || r == '_' || r == '-') {
			return modelError(fmt.Sprintf("model %q: only letters, digits, '.', '_' and '-' are allowed", s))
		}
	}
	return nil
}

// modelError is ValidModel's error: its own text, and ErrBadModel to errors.Is.
type modelError string

func (e modelError) Error() string        { return string(e) }
func (e modelError) Is(target error) bool { return target == ErrBadModel }

// Topic returns Root/device/suffix.
func Topic(device, suffix string) string {
	return Root + "/" + device + "/" + suffix
}

// ParseTopic splits Root/device/suffix. ok is false for anything else, including wildcards.
func ParseTopic(topic string) (device, suffix string, ok bool) {
	rest, found := strings.CutPrefix(topic, Root+"/")
	if !found {
		return "", "", false
	}
	device, suffix, found = strings.Cut(rest, "/")
	if !found || device == "" || suffix == "" || strings.ContainsAny(rest, "+#") {
		return "", "", false
	}
	return device, suffix, true
}

// Upstream reports whether suffix is a topic a device publishes to.
func Upstream(suffix string) bool {
	return suffix == SuffixStatus || suffix == SuffixEvent || suffix == SuffixRequest
}

// Downstream reports whether suffix is a topic a device subscribes to.
func Downstream(suffix string) bool {
	return suffix == SuffixJob || suffix == SuffixChunk
}
