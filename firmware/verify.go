package firmware

import (
	"crypto/ed25519"
	"crypto/sha256"
	"encoding/hex"
	"errors"
	"fmt"
	"strings"
	"time"

	"github.com/fota-dev/fota/protocol"
)

// Why a device refuses an update. VerifyManifest, VerifyImage and VerifyPatch return them
// wrapped with detail; test with errors.Is, and report them with FailureReason.
var (
	// ErrBadManifest: a field is malformed (protocol.Manifest.CheckFields).
	ErrBadManifest = errors.New("malformed manifest")
	// ErrBadSignature: unsigned, or not signed by the pinned release key, or altered since.
	ErrBadSignature = errors.New("bad manifest signature")
	// ErrWrongModel: the manifest is for other hardware.
	ErrWrongModel = errors.New("manifest for another model")
	// ErrRollback: the security counter is not above the installed one.
	ErrRollback = errors.New("security counter not above the installed one")
	// ErrExpired: the manifest's expiry has passed.
	ErrExpired = errors.New("manifest expired")
	// ErrWrongBase: a delta built from an image other than the installed one.
	ErrWrongBase = errors.New("delta for another base image")
	// ErrHashMismatch: the bytes received are not the ones the manifest signs.
	ErrHashMismatch = errors.New("sha256 does not match the manifest")
	// ErrSize: more or fewer bytes than the manifest signs.
	ErrSize = errors.New("size does not match the manifest")
)

// DeviceState is what a device has installed, as far as deciding on an update goes.
type DeviceState struct {
	Model       string // hardware model the device is
	Counter     uint64 // security counter of the installed image; 0 if none
	ImageSHA256 string // hex sha256 of the installed image; "" if none
}

// VerifyManifest decides whether a device in state st may install what m describes, trusting
// only pub, the release key it pins. In order: m is well formed (ErrBadManifest), signed by pub
// (ErrBadSignature), for st.Model (ErrWrongModel), with a counter strictly above st.Counter
// (ErrRollback: an equal counter would let a replayed manifest reinstall a release), not
// expired at now (ErrExpired), and for a delta, built from st.ImageSHA256 (ErrWrongBase).
//
// The signature is checked before any other field is believed. It does not compare versions:
// the counter is the signed anti-rollback rule, and a device may add its own policy on top.
func VerifyManifest(m protocol.Manifest, pub ed25519.PublicKey, st DeviceState, now time.Time) error {
	if err := VerifySignature(m, pub); err != nil {
		return err
	}
	if m.Model != st.Model {
		return fmt.Errorf("%w: manifest for %q, device is %q", ErrWrongModel, m.Model, st.Model)
	}
	if m.Counter <= st.Counter {
		return fmt.Errorf("%w: manifest counter %d, installed %d", ErrRollback, m.Counter, st.Counter)
	}
	exp, err := m.ExpiresAt()
	if err != nil {
		return fmt.Errorf("%w: %v", ErrBadManifest, err)
	}
	if !exp.IsZero() && !now.Before(exp) {
		return fmt.Errorf("%w: at %s", ErrExpired, m.Expires)
	}
	if d := m.Delta; d != nil && !strings.EqualFold(d.Base, st.ImageSHA256) {
		return fmt.Errorf("%w: delta applies to %s, installed image is %s", ErrWrongBase, short(d.Base), short(st.ImageSHA256))
	}
	return nil
}

// VerifyImage checks that image is exactly the image m signs: m.Size bytes (ErrSize) with
// sha256 m.SHA256 (ErrHashMismatch). For a delta, call it on the image the patch built.
func VerifyImage(m protocol.Manifest, image []byte) error {
	if int64(len(image)) != m.Size {
		return fmt.Errorf("%w: image of %d bytes, manifest says %d", ErrSize, len(image), m.Size)
	}
	if sum := sha256.Sum256(image); !strings.EqualFold(hex.EncodeToString(sum[:]), m.SHA256) {
		return fmt.Errorf("%w: image sha256 %s, manifest says %s", ErrHashMismatch, short(hex.EncodeToString(sum[:])), short(m.SHA256))
	}
	return nil
}

// VerifyPatch checks that patch is exactly the delta m signs, before it is applied:
// Delta.PatchSize bytes (ErrSize) with sha256 Delta.PatchSHA256 (ErrHashMismatch). A manifest
// without a delta fails with ErrBadManifest.
func VerifyPatch(m protocol.Manifest, patch []byte) error {
	d := m.Delta
	if d == nil {
		return fmt.Errorf("%w: manifest has no delta", ErrBadManifest)
	}
	if int64(len(patch)) != d.PatchSize {
		return fmt.Errorf("%w: patch of %d bytes, manifest says %d", ErrSize, len(patch), d.PatchSize)
	}
	if sum := sha256.Sum256(patch); !strings.EqualFold(hex.EncodeToString(sum[:]), d.PatchSHA256) {
		return fmt.Errorf("%w: patch sha256 %s, manifest says %s", ErrHashMismatch, short(hex.EncodeToString(sum[:])), short(d.PatchSHA256))
	}
	return nil
}

// TransferSize is how many bytes a device should download for m: the patch for a delta, the
// image otherwise. A device stops at it rather than believing an offer's own size.
func TransferSize(m protocol.Manifest) int64 {
	if m.Delta != nil {
		return m.Delta.PatchSize
	}
	return m.Size
}

// FailureReason maps an error of VerifyManifest, VerifyImage or VerifyPatch to the
// protocol.Reason* code a device reports in its failed event. It returns "" for nil and for
// errors that are none of these.
func FailureReason(err error) string {
	switch {
	case err == nil:
		return ""
	case errors.Is(err, ErrHashMismatch):
		return protocol.ReasonHashMismatch
	case errors.Is(err, ErrSize):
		return protocol.ReasonSize
	case errors.Is(err, ErrBadManifest), errors.Is(err, ErrBadSignature), errors.Is(err, ErrWrongModel),
		errors.Is(err, ErrRollback), errors.Is(err, ErrExpired), errors.Is(err, ErrWrongBase),
		errors.Is(err, ErrBadKey):
		return protocol.ReasonBadManifest
	}
	return ""
}

// short abbreviates a hash in messages; one that is not a hash is quoted whole.
func short(sha string) string {
	if len(sha) == 64 {
		return sha[:12]
	}
	return fmt.Sprintf("%q", sha)
}
