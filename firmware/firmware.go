// Package firmware is fota's artifact store: firmware images kept on disk by their sha256 and
// written atomically, with their metadata (model, version, security counter) in a bbolt bucket.
// The chunk server reads images through it at arbitrary offsets, and the controller builds the
// manifests it offers to devices from its records.
package firmware

import (
	"crypto/sha256"
	"encoding/hex"
	"errors"
	"fmt"
	"io"
	"os"
	"time"

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
	// ErrClosed is returned by every method of a Store after Close.
	ErrClosed = errors.New("firmware store closed")
)

// MaxModelLen is the longest model name accepted, in bytes.
const MaxModelLen = 64

// Firmware is the record of one stored image.
type Firmware struct {
	Model   string    `json:"model"`
	Version string    `json:"version"` // canonical, see protocol.Version.String
	Size    int64     `json:"size"`
	SHA256  string    `json:"sha256"`  // lowercase hex
	Counter uint64    `json:"counter"` // security counter
	Notes   string    `json:"notes,omitempty"`
	Created time.Time `json:"created"`
}

// Manifest returns the manifest that describes f to a device.
func (f Firmware) Manifest() protocol.Manifest {
	return protocol.Manifest{
		V:       protocol.ProtocolVersion,
		Model:   f.Model,
		Version: f.Version,
		Counter: f.Counter,
		Size:    f.Size,
		SHA256:  f.SHA256,
	}
}

// ValidModel reports whether model can name a hardware model: 1 to MaxModelLen bytes of
// [A-Za-z0-9._-]. Models end up in keys, manifests and command lines, so the set is kept small.
func ValidModel(model string) error {
	if model == "" {
		return fmt.Errorf("%w: empty", ErrBadModel)
	}
	if len(model) > MaxModelLen {
		return fmt.Errorf("%w: %d bytes, at most %d", ErrBadModel, len(model), MaxModelLen)
	}
	for i := 0; i < len(model); i++ {
		c := model[i]
		if !(c >= 'a' && c <= 'z' || c >= 'A' && c <= 'Z' || c >= '0' && c <= '9' || c == '.' || c == '_' || c == '-') {
			return fmt.Errorf("%w: %q may contain only letters, digits, '.', '_' and '-'", ErrBadModel, model)
		}
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
