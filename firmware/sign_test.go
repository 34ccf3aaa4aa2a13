package firmware_test

import (
	"bytes"
	"crypto/ed25519"
	"encoding/base64"
	"errors"
	"strings"
	"testing"

	"github.com/fota-dev/fota/firmware"
	"github.com/fota-dev/fota/protocol"
)

// testManifest is a well-formed, unsigned manifest.
func testManifest() protocol.Manifest {
	return protocol.Manifest{
		V: protocol.ProtocolVersion, Model: "primehub", Version: "7.28.0", Counter: 3,
		Size: 296756, SHA256: strings.Repeat("e5", 32), Expires: "2031-01-02T03:04:05Z",
	}
}

func mustSign(t *testing.T, m protocol.Manifest, key ed25519.PrivateKey) protocol.Manifest {
	t.Helper()
	s, err := firmware.Sign(m, key)
	if err != nil {
		t.Fatalf("Sign: %v", err)
	}
	return s
}

func TestSignVerify(t *testing.T) {
	m := testManifest()
	s := mustSign(t, m, testKey)
	if s.Signature == "" {
		t.Fatal("Sign left Signature empty")
	}
	if !bytes.Equal(s.SigningBytes(), m.SigningBytes()) {
		t.Error("Sign changed a signed field")
	}
	if err := firmware.VerifySignature(s, testPub()); err != nil {
		t.Errorf("VerifySignature = %v, want nil", err)
	}
	// ed25519 is deterministic: the same manifest and key give the same signature.
	if again := mustSign(t, s, testKey); again.Signature != s.Signature {
		t.Errorf("re-signing gave %q, want %q", again.Signature, s.Signature)
	}
	d := m
	d.Delta = &protocol.Delta{Base: strings.Repeat("ba", 32), PatchSHA256: strings.Repeat("9a", 32), PatchSize: 22851, Format: "bsdiff"}
	if err := firmware.VerifySignature(mustSign(t, d, testKey), testPub()); err != nil {
		t.Errorf("VerifySignature(delta manifest) = %v, want nil", err)
	}
}

func TestSignRefuses(t *testing.T) {
	tests := []struct {
		name    string
		edit    func(*protocol.Manifest)
		key     ed25519.PrivateKey
		wantErr error
	}{
		{"model with a new line", func(m *protocol.Manifest) { m.Model = "primehub\nversion=9.9.9" }, testKey, firmware.ErrBadManifest},
		{"bad version", func(m *protocol.Manifest) { m.Version = "latest" }, testKey, firmware.ErrBadManifest},
		{"zero size", func(m *protocol.Manifest) { m.Size = 0 }, testKey, firmware.ErrBadManifest},
		{"upper-case sha256", func(m *protocol.Manifest) { m.SHA256 = strings.Repeat("E5", 32) }, testKey, firmware.ErrBadManifest},
		{"protocol version", func(m *protocol.Manifest) { m.V = 2 }, testKey, firmware.ErrBadManifest},
		{"nil key", func(*protocol.Manifest) {}, nil, firmware.ErrBadKey},
		{"short key", func(*protocol.Manifest) {}, testKey[:32], firmware.ErrBadKey},
	}
	for _, tc := range tests {
		t.Run(tc.name, func(t *testing.T) {
			m := testManifest()
			tc.edit(&m)
			got, err := firmware.Sign(m, tc.key)
			if !errors.Is(err, tc.wantErr) {
				t.Errorf("Sign = %v, want %v", err, tc.wantErr)
			}
			if got.Signature != "" {
				t.Errorf("Sign returned signature %q with an error, want none", got.Signature)
			}
		})
	}
}

func TestVerifySignatureRefuses(t *testing.T) {
	good := mustSign(t, testManifest(), testKey)
	tests := []struct {
		name    string
		edit    func(*protocol.Manifest)
		pub     ed25519.PublicKey
		wantErr error
	}{
		{"unsigned", func(m *protocol.Manifest) { m.Signature = "" }, testPub(), firmware.ErrBadSignature},
		{"other key", func(*protocol.Manifest) {}, nil, firmware.ErrBadSignature}, // pub set below
		{"not base64", func(m *protocol.Manifest) { m.Signature = "not base64!" }, testPub(), firmware.ErrBadSignature},
		{"truncated", func(m *protocol.Manifest) { m.Signature = m.Signature[:40] }, testPub(), firmware.ErrBadSignature},
		{"new line inside", func(m *protocol.Manifest) { m.Signature = m.Signature[:20] + "\n" + m.Signature[20:] }, testPub(), firmware.ErrBadSignature},
		{"unpadded", func(m *protocol.Manifest) { m.Signature = strings.TrimRight(m.Signature, "=") }, testPub(), firmware.ErrBadSignature},
		{"bit flipped", func(m *protocol.Manifest) {
			sig, _ := base64.StdEncoding.DecodeString(m.Signature)
			sig[10] ^= 1
			m.Signature = base64.StdEncoding.EncodeToString(sig)
		}, testPub(), firmware.ErrBadSignature},
		{"version changed", func(m *protocol.Manifest) { m.Version = "7.29.0" }, testPub(), firmware.ErrBadSignature},
		{"model changed", func(m *protocol.Manifest) { m.Model = "primehub2" }, testPub(), firmware.ErrBadSignature},
		{"counter raised", func(m *protocol.Manifest) { m.Counter++ }, testPub(), firmware.ErrBadSignature},
		{"size changed", func(m *protocol.Manifest) { m.Size++ }, testPub(), firmware.ErrBadSignature},
		{"sha256 changed", func(m *protocol.Manifest) { m.SHA256 = strings.Repeat("e6", 32) }, testPub(), firmware.ErrBadSignature},
		{"expiry extended", func(m *protocol.Manifest) { m.Expires = "2099-01-02T03:04:05Z" }, testPub(), firmware.ErrBadSignature},
		{"expiry removed", func(m *protocol.Manifest) { m.Expires = "" }, testPub(), firmware.ErrBadSignature},
		{"delta added", func(m *protocol.Manifest) {
			m.Delta = &protocol.Delta{Base: strings.Repeat("ba", 32), PatchSHA256: strings.Repeat("9a", 32), PatchSize: 1, Format: "bsdiff"}
		}, testPub(), firmware.ErrBadSignature},
		{"malformed after signing", func(m *protocol.Manifest) { m.Model = "prime hub" }, testPub(), firmware.ErrBadManifest},
		{"short public key", func(*protocol.Manifest) {}, testPub()[:16], firmware.ErrBadKey},
		{"nil public key", func(*protocol.Manifest) {}, ed25519.PublicKey{}, firmware.ErrBadKey},
	}
	for _, tc := range tests {
		t.Run(tc.name, func(t *testing.T) {
			m := good
			tc.edit(&m)
			pub := tc.pub
			if tc.name == "other key" {
				pub = otherPub(t)
			}
			if err := firmware.VerifySignature(m, pub); !errors.Is(err, tc.wantErr) {
				t.Errorf("VerifySignature = %v, want %v", err, tc.wantErr)
			}
		})
	}
	// The protocol version is outside the signed bytes (the magic line stands for it), so
	// only CheckFields guards it.
	m := good
	m.V = protocol.ProtocolVersion + 1
	if err := firmware.VerifySignature(m, testPub()); !errors.Is(err, firmware.ErrBadManifest) {
		t.Errorf("VerifySignature(manifest v%d) = %v, want ErrBadManifest", m.V, err)
	}
}
