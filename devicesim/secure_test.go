package devicesim_test

import (
	"bytes"
	"crypto/ed25519"
	"encoding/binary"
	"encoding/json"
	"os"
	"path/filepath"
	"strings"
	"sync"
	"testing"
	"time"

	"github.com/fota-dev/fota/devicesim"
	"github.com/fota-dev/fota/firmware"
	"github.com/fota-dev/fota/firmware/delta"
	"github.com/fota-dev/fota/fotatest"
	"github.com/fota-dev/fota/protocol"
)

// installedCounter is the anti-rollback counter of the image the attacked devices run.
const installedCounter = 5

var patches struct {
	once      sync.Once
	good      []byte // 7.27.0 -> 7.28.0
	wrongBase []byte // 7.22.0 -> 7.28.0
	err       error
}

// deltaPatches returns the patch from the old image to the new one, and one from 7.22.0.
func deltaPatches(t *testing.T, f fixture) (good, wrongBase []byte) {
	t.Helper()
	img722 := readFirmware(t, "pybricks-primehub-7.22.0.bin")
	patches.once.Do(func() {
		if patches.good, patches.err = delta.Make(f.oldImg, f.newImg); patches.err != nil {
			return
		}
		patches.wrongBase, patches.err = delta.Make(img722, f.newImg)
	})
	if patches.err != nil {
		t.Fatalf("delta.Make: %v", patches.err)
	}
	return patches.good, patches.wrongBase
}

// manifestFor describes img as version with counter.
func manifestFor(img []byte, version string, counter uint64) protocol.Manifest {
	return protocol.Manifest{
		V: protocol.ProtocolVersion, Model: model, Version: version, Counter: counter,
		Size: int64(len(img)), SHA256: shaHex(img),
	}
}

// withDelta makes m a delta from base by patch.
func withDelta(m protocol.Manifest, base, patch []byte) protocol.Manifest {
	m.Delta = &protocol.Delta{Base: shaHex(base), PatchSHA256: shaHex(patch), PatchSize: int64(len(patch)), Format: delta.Format}
	return m
}

// offerOf offers m, signed by key unless key is nil, transferring as many bytes as m signs.
func offerOf(t *testing.T, m protocol.Manifest, key ed25519.PrivateKey) protocol.Offer {
	t.Helper()
	if key != nil {
		m = sign(t, m, key)
	}
	return protocol.Offer{
		V: protocol.ProtocolVersion, Job: jobID, Transfer: transfer, Manifest: m,
		Size: firmware.TransferSize(m), ChunkSize: testChunk, Window: testWindow,
	}
}

// patchHeader returns a "fota delta v1" header for the given base and target sizes, with
// empty streams: what a hostile server would send to make a device allocate the target.
func patchHeader(base, target int64) []byte {
	b := []byte("FOTADLT1\x01")
	for _, v := range []int64{base, target, 0, 0, 0, 0, 0, 0} {
		b = binary.BigEndian.AppendUint64(b, uint64(v))
	}
	return b
}

// reframe returns frame with its payload changed by change, and a valid CRC.
func reframe(frame []byte, change func(p []byte) []byte) []byte {
	f, err := protocol.ParseFrame(frame)
	if err != nil || f.Kind != protocol.FrameData {
		return frame
	}
	p := change(bytes.Clone(f.Payload))
	return protocol.AppendFrame(nil, protocol.FrameData, f.Transfer, f.Offset, p)
}

// checkState checks what d has installed, and when dir is set, what it persisted there: the
// state file and the image in the active slot.
func checkState(t *testing.T, d *devicesim.Device, dir string, want devicesim.State, image []byte) {
	t.Helper()
	if got := d.State(); got != want {
		t.Errorf("state: got %+v, want %+v", got, want)
	}
	if got := d.Version(); got != want.Version {
		t.Errorf("version: got %s, want %s", got, want.Version)
	}
	if dir == "" {
		return
	}
	dir = filepath.Join(dir, d.Result().ID)
	b, err := os.ReadFile(filepath.Join(dir, "state.json"))
	if err != nil {
		t.Fatalf("persisted state: %v", err)
	}
	var got devicesim.State
	if err := json.Unmarshal(b, &got); err != nil {
		t.Fatalf("persisted state: %v", err)
	}
	if got != want {
		t.Errorf("state.json: got %+v, want %+v", got, want)
	}
	slot := filepath.Join(dir, "slot-"+strings.ToLower(want.Slot())+".bin")
	img, err := os.ReadFile(slot)
	if err != nil {
		t.Fatalf("active slot: %v", err)
	}
	if !bytes.Equal(img, image) {
		t.Errorf("slot %s: got %d bytes with sha256 %s, want %d bytes with %s", want.Slot(), len(img), shaHex(img), len(image), shaHex(image))
	}
}

// TestAttacksRefused offers what a compromised or confused server could: each must end in a
// failed event with the right reason, and the device must keep running exactly what it ran,
// in memory and on its flash.
func TestAttacksRefused(t *testing.T) {
	f := newFixture(t)
	good, wrongBase := deltaPatches(t, f)
	_, foreignKey := newKey()
	img722 := readFirmware(t, "pybricks-primehub-7.22.0.bin")
	next := func() protocol.Manifest { return manifestFor(f.newImg, newVer, installedCounter+1) }
	full := func(t *testing.T, m protocol.Manifest, key ed25519.PrivateKey) (protocol.Offer, []byte) {
		return offerOf(t, m, key), f.newImg
	}
	patch := func(t *testing.T, p []byte) (protocol.Offer, []byte) {
		return offerOf(t, withDelta(next(), f.oldImg, p), releaseKey), p
	}
	tamperAt := func(at int64) func(req protocol.ChunkRequest, _ int, frame []byte) [][]byte {
		return func(req protocol.ChunkRequest, _ int, frame []byte) [][]byte {
			if req.Offset == at {
				frame = reframe(frame, func(p []byte) []byte { p[100] ^= 0xff; return p })
			}
			return [][]byte{frame}
		}
	}
	tests := []struct {
		name string
		// offer returns the offer, and the bytes the server streams for it.
		offer      func(t *testing.T) (protocol.Offer, []byte)
		alter      func(req protocol.ChunkRequest, attempt int, frame []byte) [][]byte
		wantReason string
		wantErr    error  // its text must be in the reason; nil: not checked
		wantDetail string // must be in the reason
		downloads  bool   // the device asks for chunks before it refuses
	}{
		{
			name:       "tampered image byte with a valid CRC",
			offer:      func(t *testing.T) (protocol.Offer, []byte) { return full(t, next(), releaseKey) },
			alter:      tamperAt(2 * testChunk),
			wantReason: protocol.ReasonHashMismatch, wantErr: firmware.ErrHashMismatch, downloads: true,
		},
		{
			name:       "manifest signed by an unknown key",
			offer:      func(t *testing.T) (protocol.Offer, []byte) { return full(t, next(), foreignKey) },
			wantReason: protocol.ReasonBadManifest, wantErr: firmware.ErrBadSignature,
		},
		{
			name:       "unsigned manifest",
			offer:      func(t *testing.T) (protocol.Offer, []byte) { return full(t, next(), nil) },
			wantReason: protocol.ReasonBadManifest, wantErr: firmware.ErrBadSignature,
		},
		{
			name: "manifest changed after signing",
			offer: func(t *testing.T) (protocol.Offer, []byte) {
				o, img := full(t, next(), releaseKey)
				o.Manifest.Counter = 1 << 40 // would lock out every later release
				return o, img
			},
			wantReason: protocol.ReasonBadManifest, wantErr: firmware.ErrBadSignature,
		},
		{
			name: "replayed older manifest",
			offer: func(t *testing.T) (protocol.Offer, []byte) {
				return full(t, manifestFor(f.newImg, newVer, installedCounter-1), releaseKey)
			},
			wantReason: protocol.ReasonBadManifest, wantErr: firmware.ErrRollback,
		},
		{
			name: "equal counter",
			offer: func(t *testing.T) (protocol.Offer, []byte) {
				return full(t, manifestFor(f.newImg, newVer, installedCounter), releaseKey)
			},
			wantReason: protocol.ReasonBadManifest, wantErr: firmware.ErrRollback,
		},
		{
			name: "expired manifest",
			offer: func(t *testing.T) (protocol.Offer, []byte) {
				m := next()
				m.Expires = time.Now().Add(-time.Hour).UTC().Format(time.RFC3339)
				return full(t, m, releaseKey)
			},
			wantReason: protocol.ReasonBadManifest, wantErr: firmware.ErrExpired,
		},
		{
			name: "manifest for another model",
			offer: func(t *testing.T) (protocol.Offer, []byte) {
				m := next()
				m.Model = "ev3"
				return full(t, m, releaseKey)
			},
			wantReason: protocol.ReasonBadManifest, wantErr: firmware.ErrWrongModel,
		},
		{
			name: "manifest of one image with the bytes of another",
			offer: func(t *testing.T) (protocol.Offer, []byte) {
				o, _ := full(t, next(), releaseKey)
				// 7.22.0, padded to the signed size so that only the hash can tell.
				b := make([]byte, len(f.newImg))
				copy(b, img722)
				return o, b
			},
			wantReason: protocol.ReasonHashMismatch, wantErr: firmware.ErrHashMismatch, downloads: true,
		},
		{
			name: "offer longer than the signed image",
			offer: func(t *testing.T) (protocol.Offer, []byte) {
				o, img := full(t, next(), releaseKey)
				o.Size += 4096
				return o, append(bytes.Clone(img), make([]byte, 4096)...)
			},
			wantReason: protocol.ReasonBadManifest, wantDetail: "offer size",
		},
		{
			name:  "last frame runs past the signed size",
			offer: func(t *testing.T) (protocol.Offer, []byte) { return full(t, next(), releaseKey) },
			alter: func(req protocol.ChunkRequest, _ int, frame []byte) [][]byte {
				if req.Offset+int64(req.Length) == int64(len(f.newImg)) {
					frame = reframe(frame, func(p []byte) []byte { return append(p, make([]byte, 512)...) })
				}
				return [][]byte{frame}
			},
			wantReason: protocol.ReasonSize, wantDetail: "past", downloads: true,
		},
		{
			name:       "patch tampered in transit",
			offer:      func(t *testing.T) (protocol.Offer, []byte) { return patch(t, good) },
			alter:      tamperAt(0),
			wantReason: protocol.ReasonHashMismatch, wantErr: firmware.ErrHashMismatch, downloads: true,
		},
		{
			name: "delta for another base",
			offer: func(t *testing.T) (protocol.Offer, []byte) {
				return offerOf(t, withDelta(next(), img722, wrongBase), releaseKey), wrongBase
			},
			wantReason: protocol.ReasonBadManifest, wantErr: firmware.ErrWrongBase,
		},
		{
			name:       "patch made from another base than it claims",
			offer:      func(t *testing.T) (protocol.Offer, []byte) { return patch(t, wrongBase) },
			wantReason: protocol.ReasonBadManifest, wantErr: delta.ErrWrongBase, downloads: true,
		},
		{
			name: "hostile patch header claiming a 1 TiB target",
			offer: func(t *testing.T) (protocol.Offer, []byte) {
				return patch(t, patchHeader(int64(len(f.oldImg)), 1<<40))
			},
			wantReason: protocol.ReasonPatchApply, wantErr: delta.ErrTooLarge, downloads: true,
		},
		{
			name: "hostile patch cut short",
			offer: func(t *testing.T) (protocol.Offer, []byte) {
				return patch(t, good[:len(good)/2])
			},
			wantReason: protocol.ReasonPatchApply, wantErr: delta.ErrBadPatch, downloads: true,
		},
		{
			name: "hostile patch of garbage bytes",
			offer: func(t *testing.T) (protocol.Offer, []byte) {
				junk := bytes.Repeat([]byte("\xde\xad\xbe\xef"), 2048)
				return patch(t, junk)
			},
			wantReason: protocol.ReasonPatchApply, wantErr: delta.ErrBadPatch, downloads: true,
		},
		{
			name: "unknown delta format",
			offer: func(t *testing.T) (protocol.Offer, []byte) {
				m := withDelta(next(), f.oldImg, good)
				m.Delta.Format = "xdelta3"
				return offerOf(t, m, releaseKey), good
			},
			wantReason: protocol.ReasonBadManifest, wantDetail: "format",
		},
		{
			name: "offer longer than the signed patch",
			offer: func(t *testing.T) (protocol.Offer, []byte) {
				o, p := patch(t, good)
				o.Size = int64(len(f.newImg)) // the full image's size, for the patch's manifest
				return o, p
			},
			wantReason: protocol.ReasonBadManifest, wantDetail: "offer size",
		},
	}
	for _, tt := range tests {
		t.Run(tt.name, func(t *testing.T) {
			t.Parallel()
			o, served := tt.offer(t)
			s := newUpdateServer(t, f.ca.ServerTLS(t), served, o, func(s *updateServer) {
				if tt.alter != nil {
					s.alter = func(_ string, req protocol.ChunkRequest, attempt int, frame []byte) [][]byte {
						return tt.alter(req, attempt, frame)
					}
				}
			})
			cfg := f.device(t, s, "dev-1", oldVer, f.oldImg)
			cfg.Counter, cfg.StateDir, cfg.RequestTimeout = installedCounter, t.TempDir(), 50*time.Millisecond
			d := startDevice(t, cfg)

			r := waitDone(t, d)
			if r.State != protocol.StateFailed || !strings.HasPrefix(r.Reason, tt.wantReason+": ") {
				t.Fatalf("result: got %s %q, want failed %q", r.State, r.Reason, tt.wantReason+": ...")
			}
			if tt.wantErr != nil && !strings.Contains(r.Reason, tt.wantErr.Error()) {
				t.Errorf("reason: got %q, want it to say %q", r.Reason, tt.wantErr)
			}
			if !strings.Contains(r.Reason, tt.wantDetail) {
				t.Errorf("reason: got %q, want it to say %q", r.Reason, tt.wantDetail)
			}
			fotatest.WaitFor(t, 30*time.Second, "failed event", func() bool {
				evs := s.eventsOf("dev-1")
				return len(evs) > 0 && evs[len(evs)-1].State == protocol.StateFailed
			})
			if evs := s.eventsOf("dev-1"); evs[len(evs)-1].Reason != r.Reason {
				t.Errorf("event reason: got %q, want %q", evs[len(evs)-1].Reason, r.Reason)
			}
			if got := s.requestsAt("dev-1", 0); (got > 0) != tt.downloads {
				t.Errorf("chunk requests at 0: got %d, want downloads=%v", got, tt.downloads)
			}
			want := devicesim.State{Model: model, Version: oldVer, Counter: installedCounter, SHA256: shaHex(f.oldImg)}
			checkState(t, d, cfg.StateDir, want, f.oldImg)
			// The counter set at manufacture is reported, so a server can tell what the device
			// will refuse.
			for _, st := range s.statusesOf("dev-1") {
				if st.Counter != installedCounter {
					t.Errorf("status: got counter %d, want the factory image's %d", st.Counter, installedCounter)
				}
			}
		})
	}
}

// TestDeltaUpdate installs 7.28.0 from a signed patch against the installed 7.27.0: only the
// patch crosses the network.
func TestDeltaUpdate(t *testing.T) {
	f := newFixture(t)
	good, _ := deltaPatches(t, f)
	o := offerOf(t, withDelta(manifestFor(f.newImg, newVer, 1), f.oldImg, good), releaseKey)
	s := newUpdateServer(t, f.ca.ServerTLS(t), good, o, nil)
	cfg := f.device(t, s, "dev-1", oldVer, f.oldImg)
	cfg.StateDir = t.TempDir()
	d := startDevice(t, cfg)

	r := waitDone(t, d)
	if r.State != protocol.StateInstalled {
		t.Fatalf("state: got %s (%s), want installed", r.State, r.Reason)
	}
	if r.Bytes != int64(len(good)) || !r.Delta {
		t.Errorf("result: got %d bytes, delta %v; want the patch's %d bytes, delta true", r.Bytes, r.Delta, len(good))
	}
	if r.Bytes*4 > int64(len(f.newImg)) {
		t.Errorf("downloaded %d bytes for a %d-byte image, want under a quarter", r.Bytes, len(f.newImg))
	}
	checkState(t, d, cfg.StateDir, devicesim.State{Model: model, Active: 1, Version: newVer, Counter: 1, SHA256: shaHex(f.newImg)}, f.newImg)
	fotatest.WaitFor(t, 30*time.Second, "status of the new image", func() bool {
		sts := s.statusesOf("dev-1")
		return len(sts) > 0 && sts[len(sts)-1].SHA256 == shaHex(f.newImg)
	})
}

// TestFramesPastTheSignedSizeAreDropped has the server append frames past the end of every
// answer: the device stores none of them and installs exactly the signed image.
func TestFramesPastTheSignedSizeAreDropped(t *testing.T) {
	f := newFixture(t)
	good, _ := deltaPatches(t, f)
	tests := []struct {
		name   string
		offer  protocol.Offer
		served []byte
	}{
		{"full image", offerOf(t, manifestFor(f.newImg, newVer, 1), releaseKey), f.newImg},
		{"delta", offerOf(t, withDelta(manifestFor(f.newImg, newVer, 1), f.oldImg, good), releaseKey), good},
	}
	for _, tt := range tests {
		t.Run(tt.name, func(t *testing.T) {
			t.Parallel()
			end := uint32(tt.offer.Size)
			s := newUpdateServer(t, f.ca.ServerTLS(t), tt.served, tt.offer, func(s *updateServer) {
				s.alter = func(_ string, req protocol.ChunkRequest, _ int, frame []byte) [][]byte {
					junk := bytes.Repeat([]byte{0xa5}, testChunk)
					return [][]byte{
						protocol.AppendFrame(nil, protocol.FrameData, transfer, end, junk),
						protocol.AppendFrame(nil, protocol.FrameData, transfer, end+testChunk, junk),
						frame,
						protocol.AppendFrame(nil, protocol.FrameData, transfer, end, junk),
					}
				}
			})
			cfg := f.device(t, s, "dev-1", oldVer, f.oldImg)
			cfg.StateDir = t.TempDir()
			d := startDevice(t, cfg)
			r := waitDone(t, d)
			if r.State != protocol.StateInstalled || r.Bytes != tt.offer.Size {
				t.Fatalf("result: got %s (%s) with %d bytes, want installed with %d", r.State, r.Reason, r.Bytes, tt.offer.Size)
			}
			checkState(t, d, cfg.StateDir, devicesim.State{Model: model, Active: 1, Version: newVer, Counter: 1, SHA256: shaHex(f.newImg)}, f.newImg)
		})
	}
}

// TestStateSurvivesRestart installs on a device with a state dir, then makes a new device from
// the same dir: it runs the new image, with its counter, so a replay of the same signed offer
// is refused.
func TestStateSurvivesRestart(t *testing.T) {
	f := newFixture(t)
	s := newUpdateServer(t, f.ca.ServerTLS(t), f.newImg, offerFor(t, f.newImg, newVer), nil)
	cfg := f.device(t, s, "dev-1", oldVer, f.oldImg)
	cfg.StateDir = t.TempDir()
	d, stop := runDevice(t, cfg)
	t.Cleanup(stop)
	if r := waitDone(t, d); r.State != protocol.StateInstalled {
		t.Fatalf("state: got %s (%s), want installed", r.State, r.Reason)
	}
	fotatest.WaitFor(t, 30*time.Second, "installed event", func() bool {
		evs := s.eventsOf("dev-1")
		return len(evs) > 0 && evs[len(evs)-1].State == protocol.StateInstalled
	})
	stop()

	// The configuration still names the old image; the state dir wins.
	want := devicesim.State{Model: model, Active: 1, Version: newVer, Counter: 1, SHA256: shaHex(f.newImg)}
	d2 := startDevice(t, cfg)
	checkState(t, d2, cfg.StateDir, want, f.newImg)
	if old, err := os.ReadFile(filepath.Join(cfg.StateDir, "dev-1", "slot-a.bin")); err != nil || !bytes.Equal(old, f.oldImg) {
		t.Errorf("slot A: got %d bytes (%v), want the old image kept", len(old), err)
	}
	fotatest.WaitFor(t, 30*time.Second, "status of the resumed device", func() bool {
		sts := s.statusesOf("dev-1")
		return len(sts) >= 3 && sts[len(sts)-1].Version == newVer && sts[len(sts)-1].SHA256 == shaHex(f.newImg)
	})

	// A new process remembers job-1 from its flash: offered again, it is confirmed, not
	// installed again.
	s.publishOffer("dev-1")
	fotatest.WaitFor(t, 30*time.Second, "installed confirmed again", func() bool {
		n := 0
		for _, ev := range s.eventsOf("dev-1") {
			if ev.State == protocol.StateInstalled {
				n++
			}
		}
		return n == 2
	})
	if got := s.requestsAt("dev-1", 0); got != 1 {
		t.Errorf("requests at offset 0: got %d, want 1", got)
	}

	// The same signed manifest under another job id: only the persisted counter refuses it.
	replay := s.offer
	replay.Job = "job-replay"
	s.publishOfferOf("dev-1", replay)
	var r devicesim.Result
	fotatest.WaitFor(t, 30*time.Second, "replayed offer refused", func() bool {
		r = d2.Result()
		return r.State == protocol.StateFailed
	})
	if !strings.Contains(r.Reason, firmware.ErrRollback.Error()) {
		t.Errorf("replayed offer: got %s %q, want failed with %q", r.State, r.Reason, firmware.ErrRollback)
	}
	checkState(t, d2, cfg.StateDir, want, f.newImg)
}
