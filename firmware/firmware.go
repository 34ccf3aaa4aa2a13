// Package firmware is fota's artifact store and its release signing: firmware images kept on
// disk by their sha256 and written atomically, with their metadata (model, version, security
// counter, signed manifest) in a bbolt bucket. The chunk server reads images through it at
// arbitrary offsets, and the controller offers devices the manifests it keeps.
//
// Manifests are signed with an ed25519 release key (keys.go, sign.go), online by the store or
// offline on another machine, and verify.go holds the checks a device makes before it installs
// anything: the reference device uses them, and they document what a real one must do.
package firmware

import (
	"crypto/sha256"
	"encoding/hex"
	"errors"
	"fmt"
	"io"
	"os"
	"time"
	"unicode/utf8"

	"github.com/fota-dev/fota/protocol"
)

// Sentinel errors, returned wrapped with context; test with errors.Is.
var (
	ErrNotFound = errors.New("firmware not found")
	ErrConflict = errors.New("firmware version already exists with other content")
	ErrEmpty    = errors.New("firmware image is empty")
	ErrTooLarge = errors.New("firmware image too large")
	ErrInUse    = errors.New("firmware in use")
	ErrBadModel = errors.New("invalid model name")
	// ErrUnsigned: the store holds no signing key (offline mode) and was given no manifest
	// signed by the release key, or the manifest given carries no signature.
	ErrUnsigned = errors.New("firmware manifest not signed")
	// ErrManifestMismatch: a signed manifest that describes other firmware than the upload.
	ErrManifestMismatch = errors.New("manifest does not match the firmware")
	// ErrClosed is returned by every method of a Store after Close.
	ErrClosed = errors.New("firmware store closed")
	// ErrBadNotes: release notes longer than MaxNotesLen, or not UTF-8 text.
	ErrBadNotes = errors.New("bad release notes")
)

// MaxNotesLen is the longest release notes a record keeps, in bytes: room for a changelog,
// while every listing of the store carries them.
const MaxNotesLen = 64 << 10

// ValidNotes reports whether notes can be kept with a release, wrapping ErrBadNotes.
func ValidNotes(notes string) error {
	switch {
	case len(notes) > MaxNotesLen:
		return fmt.Errorf("%w: %d bytes, the limit is %d (64 KiB)", ErrBadNotes, len(notes), MaxNotesLen)
	case !utf8.ValidString(notes):
		return fmt.Errorf("%w: not UTF-8 text", ErrBadNotes)
	}
	return nil
}

// MaxModelLen is the longest model name accepted, in bytes (protocol.ValidModel's limit).
const MaxModelLen = protocol.MaxModelLen

// Firmware is the record of one stored image.
type Firmware struct {
	Model   string    `json:"model"`
	Version string    `json:"version"` // canonical, see protocol.Version.String
	Size    int64     `json:"size"`
	SHA256  string    `json:"sha256"`  // lowercase hex
	Counter uint64    `json:"counter"` // security counter
	Notes   string    `json:"notes,omitempty"`
	Created time.Time `json:"created"`
	// Expires is when devices stop accepting the manifest (whole seconds, UTC); zero: never.
	Expires time.Time `json:"expires,omitzero"`
	// Signature is the manifest's, by the release key; "" only for records stored before
	// signing existed, which a store without the signing key cannot sign.
	Signature string `json:"signature,omitempty"`
}

// Manifest returns the signed manifest that describes f to a device.
func (f Firmware) Manifest() protocol.Manifest {
	return protocol.Manifest{
		V:         protocol.ProtocolVersion,
		Model:     f.Model,
		Version:   f.Version,
		Counter:   f.Counter,
		Size:      f.Size,
		SHA256:    f.SHA256,
		Expires:   formatExpiry(f.Expires),
		Signature: f.Signature,
	}
}

// formatExpiry is the one form of an expiry that records and manifests share, so that a
// record rebuilds exactly the manifest that was signed.
func formatExpiry(t time.Time) string {
	if t.IsZero() {
		return ""
	}
	return t.UTC().Format(time.RFC3339)
}

// ValidModel reports whether model can name a hardware model, by protocol.ValidModel's rule (1
// to MaxModelLen bytes of [A-Za-z0-9._-]), wrapping ErrBadModel.
func ValidModel(model string) error {
	if err := protocol.ValidModel(model); err != nil {
		return fmt.Errorf("%w: %v", ErrBadModel, err)
	}
	return nil
}

// canonicalVersion parses v and returns its canonical string, so that "v1.2" and "1.2.0" name
// the same record.
func canonicalVersion(v string) (protocol.Version, string, error) {
	pv, err := protocol.ParseVersion(v)
	if err != nil {
		return protocol.Version{}, "", err
	}
	return pv, pv.String(), nil
}

// HashFile returns the lowercase hex sha256 and the size of the file at path, reading it in a
// stream.
func HashFile(path string) (sha string, size int64, err error) {
	f, err := os.Open(path)
	if err != nil {
		return "", 0, fmt.Errorf("hash file: %w", err)
	}
	defer f.Close()
	h := sha256.New()
	n, err := io.Copy(h, f)
	if err != nil {
		return "", 0, fmt.Errorf("hash file %s: %w", path, err)
	}
	return hex.EncodeToString(h.Sum(nil)), n, nil
}
