package devicesim_test

import (
	"bytes"
	"crypto/ed25519"
	"encoding/hex"
	"encoding/pem"
	"os"
	"path/filepath"
	"regexp"
	"strconv"
	"strings"
	"testing"

	"github.com/fota-dev/fota/firmware"
	"github.com/fota-dev/fota/protocol"
)

// TestReleasePubLayout checks what PROTOCOL.md ("The release key") tells a device without an
// ASN.1 parser about release.pub, against a key made by the firmware package as the server
// makes it: a PEM "PUBLIC KEY" block whose DER has the stated length and 12-byte prefix, and
// the raw Ed25519 key at the stated offset, which verifies the release key's signatures.
func TestReleasePubLayout(t *testing.T) {
	doc, err := os.ReadFile(filepath.Join("..", "PROTOCOL.md"))
	if err != nil {
		t.Fatal(err)
	}
	text := strings.Join(strings.Fields(string(doc)), " ") // claims may wrap across lines
	claim := func(re string) string {
		t.Helper()
		m := regexp.MustCompile(re).FindStringSubmatch(text)
		if m == nil {
			t.Fatalf("PROTOCOL.md: no claim matching %q", re)
		}
		return m[1]
	}
	length, err := strconv.Atoi(claim(`the DER is always (\d+) bytes`))
	if err != nil {
		t.Fatal(err)
	}
	prefix, err := hex.DecodeString(strings.ReplaceAll(claim("the 12 bytes `([0-9a-f ]+)`"), " ", ""))
	if err != nil {
		t.Fatal(err)
	}
	offset, err := strconv.Atoi(claim(`raw 32-byte public key at byte offset (\d+)`))
	if err != nil {
		t.Fatal(err)
	}
	if len(prefix) != 12 || offset != len(prefix) || length != offset+ed25519.PublicKeySize {
		t.Fatalf("PROTOCOL.md: %d prefix bytes, key at %d, DER of %d: want 12, 12 and 44", len(prefix), offset, length)
	}

	for i := range 8 { // keys differ in every byte but the prefix: try a few
		dir := filepath.Join(t.TempDir(), "keys")
		if err := firmware.GenerateKey(dir); err != nil {
			t.Fatal(err)
		}
		b, err := os.ReadFile(filepath.Join(dir, firmware.PublicKeyFile))
		if err != nil {
			t.Fatal(err)
		}
		if !bytes.HasPrefix(b, []byte("-----BEGIN PUBLIC KEY-----\n")) {
			t.Fatalf("key %d: release.pub starts %q, want the PEM PUBLIC KEY line", i, b[:min(len(b), 30)])
		}
		block, rest := pem.Decode(b)
		if block == nil || block.Type != "PUBLIC KEY" || len(bytes.TrimSpace(rest)) != 0 {
			t.Fatalf("key %d: release.pub is not one PEM PUBLIC KEY block", i)
		}
		der := block.Bytes
		if len(der) != length || !bytes.Equal(der[:offset], prefix) {
			t.Fatalf("key %d: DER % x, want %d bytes starting % x", i, der, length, prefix)
		}
		raw := ed25519.PublicKey(der[offset:])
		if pub, err := firmware.LoadPublicKey(filepath.Join(dir, firmware.PublicKeyFile)); err != nil || !raw.Equal(pub) {
			t.Fatalf("key %d: bytes at %d are % x, the key is % x (%v)", i, offset, []byte(raw), []byte(pub), err)
		}
		priv, err := firmware.LoadPrivateKey(filepath.Join(dir, firmware.PrivateKeyFile))
		if err != nil {
			t.Fatal(err)
		}
		m := protocol.Manifest{V: protocol.ProtocolVersion, Model: "primehub", Version: "7.28.0", Counter: 2, Size: 1, SHA256: strings.Repeat("ab", 32)}
		if !ed25519.Verify(raw, m.SigningBytes(), ed25519.Sign(priv, m.SigningBytes())) {
			t.Fatalf("key %d: the raw key does not verify the release key's signature", i)
		}
	}
}
