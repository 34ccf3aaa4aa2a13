package protocol

import (
	"fmt"
	"strconv"
	"strings"
	"time"
)

// Manifest describes one firmware image, and when Delta is set, the patch that builds it from
// a base image. Devices install only what a manifest signed by the pinned release key allows.
type Manifest struct {
	V       int    `json:"v"`
	Model   string `json:"model"`
	Version string `json:"version"`
	Counter uint64 `json:"counter"` // security counter; devices refuse one not above theirs
	Size    int64  `json:"size"`    // bytes of the whole image
	SHA256  string `json:"sha256"`  // hex sha256 of the whole image
	Delta   *Delta `json:"delta,omitempty"`
	// Expires is an RFC 3339 UTC time after which devices refuse the manifest; empty: never.
	Expires string `json:"expires,omitempty"`
	// Signature is the base64 (standard, padded) ed25519 signature of SigningBytes.
	Signature string `json:"sig,omitempty"`
}

// Delta names the patch that turns the base image into the manifest's image.
type Delta struct {
	Base        string `json:"base"`         // hex sha256 of the image the patch applies to
	PatchSHA256 string `json:"patch_sha256"` // hex sha256 of the patch as transferred
	PatchSize   int64  `json:"patch_size"`
	Format      string `json:"format"` // patch container, e.g. "bsdiff-zstd"
}

// signingMagic opens the canonical encoding; a new encoding gets a new magic.
const signingMagic = "fota-manifest-v1"

// SigningBytes is the canonical encoding that the signature covers: one "key=value" line per
// field, every field always present in this fixed order, each line ending in "\n":
//
//	fota-manifest-v1
//	model=primehub
//	version=7.28.0
//	counter=2
//	size=296756
//	sha256=e5fd8b...
//	delta.base=            (empty when there is no delta)
//	delta.patch_sha256=
//	delta.patch_size=0
//	delta.format=
//	expires=               (empty when it never expires)
//
// It is built with printf on a device as easily as here, and no JSON canonicalisation is
// needed. CheckFields refuses values that could forge a line (new lines, '=' in strings).
func (m Manifest) SigningBytes() []byte {
	var d Delta
	if m.Delta != nil {
		d = *m.Delta
	}
	var b strings.Builder
	b.Grow(384)
	line := func(k, v string) { b.WriteString(k); b.WriteByte('='); b.WriteString(v); b.WriteByte('\n') }
	b.WriteString(signingMagic + "\n")
	line("model", m.Model)
	line("version", m.Version)
	line("counter", strconv.FormatUint(m.Counter, 10))
	line("size", strconv.FormatInt(m.Size, 10))
	line("sha256", m.SHA256)
	line("delta.base", d.Base)
	line("delta.patch_sha256", d.PatchSHA256)
	line("delta.patch_size", strconv.FormatInt(d.PatchSize, 10))
	line("delta.format", d.Format)
	line("expires", m.Expires)
	return []byte(b.String())
}

// CheckFields checks that every field is well formed: a supported protocol version, a valid
// model and semantic version, a positive size, hex hashes, an RFC 3339 expiry. It does not
// check the signature.
func (m Manifest) CheckFields() error {
	if m.V != ProtocolVersion {
		return fmt.Errorf("manifest protocol version %d, want %d", m.V, ProtocolVersion)
	}
	if err := ValidModel(m.Model); err != nil {
		return err
	}
	if v, err := ParseVersion(m.Version); err != nil {
		return fmt.Errorf("manifest: %w", err)
	} else if v.String() != m.Version {
		// The signed bytes hold the version as written: one release, one spelling.
		return fmt.Errorf("manifest version %q is not canonical, want %q", m.Version, v.String())
	}
	if m.Size <= 0 {
		return fmt.Errorf("manifest size %d, want > 0", m.Size)
	}
	if !isHexSHA256(m.SHA256) {
		return fmt.Errorf("manifest sha256 %q is not 64 lowercase hex digits", m.SHA256)
	}
	if d := m.Delta; d != nil {
		if !isHexSHA256(d.Base) || !isHexSHA256(d.PatchSHA256) {
			return fmt.Errorf("manifest delta hashes are not 64 lowercase hex digits")
		}
		if d.PatchSize <= 0 {
			return fmt.Errorf("manifest delta patch size %d, want > 0", d.PatchSize)
		}
		if d.Format == "" || strings.ContainsAny(d.Format, "=\n\r") || len(d.Format) > 32 {
			return fmt.Errorf("manifest delta format %q is not valid", d.Format)
		}
	}
	if m.Expires != "" {
		if _, err := m.ExpiresAt(); err != nil {
			return err
		}
	}
	return nil
}

// ExpiresAt parses Expires; the zero time means it never expires.
func (m Manifest) ExpiresAt() (time.Time, error) {
	if m.Expires == "" {
		return time.Time{}, nil
	}
	t, err := time.Parse(time.RFC3339, m.Expires)
	if err != nil {
		return time.Time{}, fmt.Errorf("manifest expiry %q is not RFC 3339: %w", m.Expires, err)
	}
	return t, nil
}

func isHexSHA256(s string) bool {
	if len(s) != 64 {
		return false
	}
	for _, r := range s {
		if !(r >= '0' && r <= '9' || r >= 'a' && r <= 'f') {
			return false
		}
	}
	return true
}
