package firmware

import (
	"crypto/ed25519"
	"encoding/base64"
	"fmt"

	"github.com/fota-dev/fota/protocol"
)

// Sign returns m with Signature set to the ed25519 signature, by key, of m.SigningBytes(). It
// refuses a manifest whose fields are not well formed (ErrBadManifest): the canonical encoding
// is only unambiguous for well-formed fields.
func Sign(m protocol.Manifest, key ed25519.PrivateKey) (protocol.Manifest, error) {
	if err := m.CheckFields(); err != nil {
		return protocol.Manifest{}, fmt.Errorf("sign manifest: %w: %v", ErrBadManifest, err)
	}
	if len(key) != ed25519.PrivateKeySize {
		return protocol.Manifest{}, fmt.Errorf("sign manifest: %w: private key of %d bytes, want %d", ErrBadKey, len(key), ed25519.PrivateKeySize)
	}
	m.Signature = base64.StdEncoding.EncodeToString(ed25519.Sign(key, m.SigningBytes()))
	return m, nil
}

// VerifySignature checks that m is well formed (ErrBadManifest) and carries a signature of its
// SigningBytes by pub (ErrBadSignature otherwise, also when it is unsigned).
func VerifySignature(m protocol.Manifest, pub ed25519.PublicKey) error {
	if err := m.CheckFields(); err != nil {
		return fmt.Errorf("%w: %v", ErrBadManifest, err)
	}
	if len(pub) != ed25519.PublicKeySize {
		// ed25519.Verify panics on a key of the wrong size.
		return fmt.Errorf("%w: public key of %d bytes, want %d", ErrBadKey, len(pub), ed25519.PublicKeySize)
	}
	if m.Signature == "" {
		return fmt.Errorf("%w: manifest is not signed", ErrBadSignature)
	}
	sig, err := base64.StdEncoding.Strict().DecodeString(m.Signature)
	// The decoder skips new lines; insisting on the exact encoding keeps one manifest one string.
	if err != nil || len(sig) != ed25519.SignatureSize || base64.StdEncoding.EncodeToString(sig) != m.Signature {
		return fmt.Errorf("%w: signature is not %d bytes of padded standard base64", ErrBadSignature, ed25519.SignatureSize)
	}
	if !ed25519.Verify(pub, m.SigningBytes(), sig) {
		return fmt.Errorf("%w: manifest of %s %s not signed by the release key", ErrBadSignature, m.Model, m.Version)
	}
	return nil
}
