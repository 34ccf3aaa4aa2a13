package firmware_test

import (
	"crypto/ed25519"
	"crypto/rand"
	"errors"
	"fmt"
	"testing"
	"time"

	"github.com/fota-dev/fota/firmware"
	"github.com/fota-dev/fota/protocol"
)

// fleet is the release key, the real images, and a device running primehub 7.27.0 at
// counter 2 that pins the key.
type fleet struct {
	t             *testing.T
	key           ed25519.PrivateKey
	pub           ed25519.PublicKey
	unknownKey    ed25519.PrivateKey
	v22, v27, v28 []byte
	esp           []byte
	device        firmware.DeviceState
	now           time.Time
	offer         protocol.Manifest // 7.28.0, counter 3, expires in a day: what the device should accept
	deltaFrom27   protocol.Manifest // 7.27.0 -> 7.28.0
	patch         []byte            // stands for the patch of deltaFrom27
}

// manifestOf is an unsigned manifest of img that expires a day after f.now.
func (f *fleet) manifestOf(model, version string, counter uint64, img []byte) protocol.Manifest {
	return protocol.Manifest{
		V: protocol.ProtocolVersion, Model: model, Version: version, Counter: counter,
		Size: int64(len(img)), SHA256: shaOf(img), Expires: f.now.Add(24 * time.Hour).Format(time.RFC3339),
	}
}

// signedManifest is manifestOf signed by the release key.
func (f *fleet) signedManifest(model, version string, counter uint64, img []byte) protocol.Manifest {
	return mustSign(f.t, f.manifestOf(model, version, counter, img), f.key)
}

func newFleet(t *testing.T) *fleet {
	t.Helper()
	f := &fleet{
		t: t, key: testKey, pub: testPub(),
		v22: image(t, "pybricks-primehub-7.22.0.bin"), v27: image(t, "pybricks-primehub-7.27.0.bin"),
		v28: image(t, "pybricks-primehub-7.28.0.bin"), esp: image(t, "upy-esp8266-v1.10.bin"),
		now: time.Date(2030, 6, 1, 12, 0, 0, 0, time.UTC),
	}
	var err error
	if _, f.unknownKey, err = ed25519.GenerateKey(rand.Reader); err != nil {
		t.Fatal(err)
	}
	f.device = firmware.DeviceState{Model: "primehub", Counter: 2, ImageSHA256: shaOf(f.v27)}
	f.offer = f.signedManifest("primehub", "7.28.0", 3, f.v28)
	// Any bytes do as the patch: VerifyPatch checks what is transferred, not how it applies.
	f.patch = f.v28[1000:23851]
	d := f.manifestOf("primehub", "7.28.0", 3, f.v28)
	d.Delta = &protocol.Delta{Base: shaOf(f.v27), PatchSHA256: shaOf(f.patch), PatchSize: int64(len(f.patch)), Format: "bsdiff"}
	f.deltaFrom27 = mustSign(t, d, f.key)
	return f
}

// TestVerifyAccepts makes sure the attacks below fail for their own reason, not because the
// setup would be refused anyway.
func TestVerifyAccepts(t *testing.T) {
	f := newFleet(t)
	if err := firmware.VerifyManifest(f.offer, f.pub, f.device, f.now); err != nil {
		t.Errorf("VerifyManifest(full image) = %v, want nil", err)
	}
	if err := firmware.VerifyImage(f.offer, f.v28); err != nil {
		t.Errorf("VerifyImage = %v, want nil", err)
	}
	if err := firmware.VerifyManifest(f.deltaFrom27, f.pub, f.device, f.now); err != nil {
		t.Errorf("VerifyManifest(delta) = %v, want nil", err)
	}
	if err := firmware.VerifyPatch(f.deltaFrom27, f.patch); err != nil {
		t.Errorf("VerifyPatch = %v, want nil", err)
	}
	if err := firmware.VerifyImage(f.deltaFrom27, f.v28); err != nil {
		t.Errorf("VerifyImage(image built from the delta) = %v, want nil", err)
	}
	fresh := firmware.DeviceState{Model: "primehub"} // nothing installed yet
	if err := firmware.VerifyManifest(f.offer, f.pub, fresh, f.now); err != nil {
		t.Errorf("VerifyManifest on a device with nothing installed = %v, want nil", err)
	}
	never := f.manifestOf("primehub", "7.28.0", 3, f.v28)
	never.Expires = ""
	if err := firmware.VerifyManifest(mustSign(t, never, f.key), f.pub, f.device, f.now.AddDate(100, 0, 0)); err != nil {
		t.Errorf("VerifyManifest(no expiry, a century later) = %v, want nil", err)
	}
	if got, want := firmware.TransferSize(f.offer), int64(len(f.v28)); got != want {
		t.Errorf("TransferSize(full) = %d, want %d", got, want)
	}
	if got, want := firmware.TransferSize(f.deltaFrom27), int64(len(f.patch)); got != want {
		t.Errorf("TransferSize(delta) = %d, want %d", got, want)
	}
}

// TestVerifyManifestAttacks is what a device must refuse before it downloads or installs
// anything; each case is one way to make a device install what the release key did not allow.
func TestVerifyManifestAttacks(t *testing.T) {
	f := newFleet(t)
	exp := f.now.Add(time.Hour)
	tests := []struct {
		name       string
		manifest   func() protocol.Manifest
		now        time.Time
		wantErr    error
		wantReason string
	}{
		{"manifest signed by an unknown key", func() protocol.Manifest {
			return mustSign(t, f.manifestOf("primehub", "7.28.0", 3, f.v28), f.unknownKey)
		}, f.now, firmware.ErrBadSignature, protocol.ReasonBadManifest},
		{"unsigned manifest", func() protocol.Manifest {
			return f.manifestOf("primehub", "7.28.0", 3, f.v28)
		}, f.now, firmware.ErrBadSignature, protocol.ReasonBadManifest},
		{"version changed after signing", func() protocol.Manifest {
			m := f.offer
			m.Version = "7.99.0"
			return m
		}, f.now, firmware.ErrBadSignature, protocol.ReasonBadManifest},
		{"counter raised after signing", func() protocol.Manifest {
			m := f.signedManifest("primehub", "7.22.0", 1, f.v22)
			m.Counter = 99
			return m
		}, f.now, firmware.ErrBadSignature, protocol.ReasonBadManifest},
		{"image swapped in after signing", func() protocol.Manifest {
			m := f.offer
			m.Size, m.SHA256 = int64(len(f.v22)), shaOf(f.v22)
			return m
		}, f.now, firmware.ErrBadSignature, protocol.ReasonBadManifest},
		{"expiry removed after signing", func() protocol.Manifest {
			m := f.offer
			m.Expires = ""
			return m
		}, f.now, firmware.ErrBadSignature, protocol.ReasonBadManifest},
		{"replayed older release (lower counter)", func() protocol.Manifest {
			return f.signedManifest("primehub", "7.22.0", 1, f.v22)
		}, f.now, firmware.ErrRollback, protocol.ReasonBadManifest},
		{"replayed installed release (equal counter)", func() protocol.Manifest {
			return f.signedManifest("primehub", "7.27.0", 2, f.v27)
		}, f.now, firmware.ErrRollback, protocol.ReasonBadManifest},
		{"newer version with the installed counter", func() protocol.Manifest {
			return f.signedManifest("primehub", "7.28.0", 2, f.v28)
		}, f.now, firmware.ErrRollback, protocol.ReasonBadManifest},
		{"expired manifest", func() protocol.Manifest {
			m := f.manifestOf("primehub", "7.28.0", 3, f.v28)
			m.Expires = f.now.Add(-time.Second).Format(time.RFC3339)
			return mustSign(t, m, f.key)
		}, f.now, firmware.ErrExpired, protocol.ReasonBadManifest},
		{"expires at this very second", func() protocol.Manifest {
			m := f.manifestOf("primehub", "7.28.0", 3, f.v28)
			m.Expires = exp.Format(time.RFC3339)
			return mustSign(t, m, f.key)
		}, exp, firmware.ErrExpired, protocol.ReasonBadManifest},
		{"manifest for another model", func() protocol.Manifest {
			return f.signedManifest("esp8266", "1.10.0", 3, f.esp)
		}, f.now, firmware.ErrWrongModel, protocol.ReasonBadManifest},
		{"delta for the wrong base", func() protocol.Manifest {
			m := f.manifestOf("primehub", "7.28.0", 3, f.v28)
			m.Delta = &protocol.Delta{Base: shaOf(f.v22), PatchSHA256: shaOf(f.patch), PatchSize: int64(len(f.patch)), Format: "bsdiff"}
			return mustSign(t, m, f.key)
		}, f.now, firmware.ErrWrongBase, protocol.ReasonBadManifest},
		{"delta to a device with nothing installed", func() protocol.Manifest {
			return f.deltaFrom27
		}, f.now, firmware.ErrWrongBase, protocol.ReasonBadManifest},
		{"malformed manifest", func() protocol.Manifest {
			m := f.offer
			m.SHA256 = "../../etc/passwd"
			return m
		}, f.now, firmware.ErrBadManifest, protocol.ReasonBadManifest},
	}
	for _, tc := range tests {
		t.Run(tc.name, func(t *testing.T) {
			st := f.device
			if tc.name == "delta to a device with nothing installed" {
				st = firmware.DeviceState{Model: "primehub"}
			}
			err := firmware.VerifyManifest(tc.manifest(), f.pub, st, tc.now)
			if !errors.Is(err, tc.wantErr) {
				t.Fatalf("VerifyManifest = %v, want %v", err, tc.wantErr)
			}
			if got := firmware.FailureReason(err); got != tc.wantReason {
				t.Errorf("FailureReason(%v) = %q, want %q", err, got, tc.wantReason)
			}
		})
	}
	// One second before the expiry the same manifest is fine.
	m := f.manifestOf("primehub", "7.28.0", 3, f.v28)
	m.Expires = exp.Format(time.RFC3339)
	if err := firmware.VerifyManifest(mustSign(t, m, f.key), f.pub, f.device, exp.Add(-time.Second)); err != nil {
		t.Errorf("VerifyManifest a second before expiry = %v, want nil", err)
	}
}

// TestVerifyTransferAttacks is what a device must refuse after the download, before it
// installs: bytes that are not the ones the valid manifest it accepted signs.
func TestVerifyTransferAttacks(t *testing.T) {
	f := newFleet(t)
	tampered := func(b []byte, off int) []byte {
		c := append([]byte(nil), b...)
		c[off] ^= 0x01
		return c
	}
	tests := []struct {
		name       string
		verify     func() error
		wantErr    error
		wantReason string
	}{
		{"tampered image byte", func() error {
			return firmware.VerifyImage(f.offer, tampered(f.v28, 123457))
		}, firmware.ErrHashMismatch, protocol.ReasonHashMismatch},
		{"tampered last byte", func() error {
			return firmware.VerifyImage(f.offer, tampered(f.v28, len(f.v28)-1))
		}, firmware.ErrHashMismatch, protocol.ReasonHashMismatch},
		{"manifest A with image B", func() error {
			return firmware.VerifyImage(f.offer, f.v27) // 7.28.0's manifest, 7.27.0's bytes
		}, firmware.ErrSize, protocol.ReasonSize},
		{"manifest A with image B of the same size", func() error {
			b := append(append([]byte(nil), f.v27...), make([]byte, len(f.v28)-len(f.v27))...)
			return firmware.VerifyImage(f.offer, b)
		}, firmware.ErrHashMismatch, protocol.ReasonHashMismatch},
		{"transfer longer than the signed size", func() error {
			return firmware.VerifyImage(f.offer, append(append([]byte(nil), f.v28...), 0))
		}, firmware.ErrSize, protocol.ReasonSize},
		{"transfer shorter than the signed size", func() error {
			return firmware.VerifyImage(f.offer, f.v28[:len(f.v28)-1])
		}, firmware.ErrSize, protocol.ReasonSize},
		{"empty transfer", func() error {
			return firmware.VerifyImage(f.offer, nil)
		}, firmware.ErrSize, protocol.ReasonSize},
		{"tampered patch byte", func() error {
			return firmware.VerifyPatch(f.deltaFrom27, tampered(f.patch, 7))
		}, firmware.ErrHashMismatch, protocol.ReasonHashMismatch},
		{"patch longer than the signed size", func() error {
			return firmware.VerifyPatch(f.deltaFrom27, append(append([]byte(nil), f.patch...), 0))
		}, firmware.ErrSize, protocol.ReasonSize},
		{"whole image sent instead of the patch", func() error {
			return firmware.VerifyPatch(f.deltaFrom27, f.v28)
		}, firmware.ErrSize, protocol.ReasonSize},
		{"patch against a manifest without delta", func() error {
			return firmware.VerifyPatch(f.offer, f.patch)
		}, firmware.ErrBadManifest, protocol.ReasonBadManifest},
		{"patch applied to give other bytes", func() error {
			return firmware.VerifyImage(f.deltaFrom27, tampered(f.v28, 0))
		}, firmware.ErrHashMismatch, protocol.ReasonHashMismatch},
	}
	for _, tc := range tests {
		t.Run(tc.name, func(t *testing.T) {
			err := tc.verify()
			if !errors.Is(err, tc.wantErr) {
				t.Fatalf("got %v, want %v", err, tc.wantErr)
			}
			if got := firmware.FailureReason(err); got != tc.wantReason {
				t.Errorf("FailureReason(%v) = %q, want %q", err, got, tc.wantReason)
			}
		})
	}
}

func TestFailureReason(t *testing.T) {
	tests := []struct {
		err  error
		want string
	}{
		{nil, ""},
		{errors.New("connection lost"), ""},
		{firmware.ErrBadSignature, protocol.ReasonBadManifest},
		{firmware.ErrWrongModel, protocol.ReasonBadManifest},
		{firmware.ErrRollback, protocol.ReasonBadManifest},
		{firmware.ErrExpired, protocol.ReasonBadManifest},
		{firmware.ErrWrongBase, protocol.ReasonBadManifest},
		{firmware.ErrBadManifest, protocol.ReasonBadManifest},
		{fmt.Errorf("verify: %w", firmware.ErrHashMismatch), protocol.ReasonHashMismatch},
		{fmt.Errorf("verify: %w", firmware.ErrSize), protocol.ReasonSize},
	}
	for _, tc := range tests {
		t.Run(fmt.Sprint(tc.err), func(t *testing.T) {
			if got := firmware.FailureReason(tc.err); got != tc.want {
				t.Errorf("FailureReason(%v) = %q, want %q", tc.err, got, tc.want)
			}
		})
	}
}
