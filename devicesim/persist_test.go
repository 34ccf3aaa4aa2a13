package devicesim

import (
	"crypto/ed25519"
	"crypto/tls"
	"os"
	"path/filepath"
	"slices"
	"testing"
	"time"

	"github.com/fota-dev/fota/firmware"
	"github.com/fota-dev/fota/protocol"
)

// persistFixture is a device with a state directory, and a signed offer of a new image for it.
type persistFixture struct {
	d      *Device
	offer  protocol.Offer
	newImg []byte
}

func newPersistFixture(t *testing.T) persistFixture {
	t.Helper()
	read := func(name string) []byte {
		b, err := os.ReadFile(filepath.Join("..", "..", "shared", "firmware", name))
		if err != nil {
			t.Fatal(err)
		}
		return b
	}
	oldImg, newImg := read("pybricks-primehub-7.27.0.bin"), read("pybricks-primehub-7.28.0.bin")
	pub, key, err := ed25519.GenerateKey(nil)
	if err != nil {
		t.Fatal(err)
	}
	m, err := firmware.Sign(protocol.Manifest{
		V: protocol.ProtocolVersion, Model: "primehub", Version: "7.28.0", Counter: 2,
		Size: int64(len(newImg)), SHA256: sha256Hex(newImg),
	}, key)
	if err != nil {
		t.Fatal(err)
	}
	d, err := New(Config{
		ID: "dev-1", Model: "primehub", Version: "7.27.0", Image: oldImg, Counter: 1, PublicKey: pub,
		StateDir: t.TempDir(), Broker: "127.0.0.1:8883", TLS: &tls.Config{},
	})
	if err != nil {
		t.Fatal(err)
	}
	return persistFixture{d: d, newImg: newImg, offer: protocol.Offer{
		V: protocol.ProtocolVersion, Job: "r1-1", Transfer: 7, Manifest: m,
		Size: int64(len(newImg)), ChunkSize: 16 << 10, Window: 4,
	}}
}

// start gives the device the job of the fixture's offer with the first n ranges received,
// as onOffer and onChunk would, and persists it in state.
func (f persistFixture) start(t *testing.T, n int, state string) *job {
	t.Helper()
	data, err := openPartial(f.d.dir, f.offer.Size, false)
	if err != nil {
		t.Fatal(err)
	}
	cs, w := transferParams(f.offer, 0)
	j := &job{id: f.offer.Job, offer: f.offer, from: "7.27.0", state: protocol.StateDownloading, seq: 5,
		dl: newDownload(f.offer, cs, w, time.Second, data)}
	reqs := j.dl.requests(time.Now(), nil)
	for len(reqs) > 0 && n > 0 {
		for _, r := range reqs {
			if n == 0 {
				break
			}
			if _, err := j.dl.accept(uint32(r.Offset), f.newImg[r.Offset:r.Offset+int64(r.Length)]); err != nil {
				t.Fatal(err)
			}
			n--
		}
		reqs = j.dl.requests(time.Now(), nil)
	}
	j.bytes, j.state = j.dl.received, state
	f.d.job = j
	if err := f.d.saveJob(j); err != nil {
		t.Fatal(err)
	}
	return j
}

func TestBootRestoresJob(t *testing.T) {
	const chunk = 16 << 10
	tests := []struct {
		name      string
		received  int    // ranges received before the record was written
		state     string // in the record
		switched  bool   // the new image was installed before the restart
		damage    func(t *testing.T, dir string)
		wantState string
		wantBytes func(size int64) int64
	}{
		{
			name: "downloading resumes with the recorded ranges", received: 5, state: protocol.StateDownloading,
			wantState: protocol.StateDownloading, wantBytes: func(int64) int64 { return 5 * chunk },
		},
		{
			name: "verifying goes back to a complete download", received: 100, state: protocol.StateVerifying,
			wantState: protocol.StateDownloading, wantBytes: func(size int64) int64 { return size },
		},
		{
			name: "installing before the switch installs again", received: 100, state: protocol.StateInstalling,
			wantState: protocol.StateInstalling, wantBytes: func(size int64) int64 { return size },
		},
		{
			name: "installing after the switch is installed", received: 100, state: protocol.StateInstalling, switched: true,
			wantState: protocol.StateInstalled, wantBytes: func(int64) int64 { return 0 },
		},
		{
			name: "download of the wrong size starts over", received: 5, state: protocol.StateDownloading,
			damage: func(t *testing.T, dir string) {
				if err := os.Truncate(filepath.Join(dir, downloadFile), 100); err != nil {
					t.Fatal(err)
				}
			},
			wantState: protocol.StateDownloading, wantBytes: func(int64) int64 { return 0 },
		},
		{
			name: "installing with its download gone fails", received: 100, state: protocol.StateInstalling,
			damage: func(t *testing.T, dir string) {
				if err := os.Remove(filepath.Join(dir, downloadFile)); err != nil {
					t.Fatal(err)
				}
			},
			wantState: protocol.StateFailed, wantBytes: func(int64) int64 { return 0 },
		},
	}
	for _, tt := range tests {
		t.Run(tt.name, func(t *testing.T) {
			f := newPersistFixture(t)
			j := f.start(t, tt.received, tt.state)
			if tt.switched {
				if err := f.d.flash.install(f.offer.Manifest, f.newImg); err != nil {
					t.Fatal(err)
				}
			}
			if tt.damage != nil {
				tt.damage(t, f.d.dir)
			}
			if err := f.d.boot(); err != nil {
				t.Fatalf("boot: %v", err)
			}
			got := f.d.job
			if got == nil {
				t.Fatal("job: got none, want it restored")
			}
			if got.id != j.id || got.state != tt.wantState || got.bytes != tt.wantBytes(f.offer.Size) {
				t.Errorf("job: got %s %s with %d bytes, want %s %s with %d", got.id, got.state, got.bytes, j.id, tt.wantState, tt.wantBytes(f.offer.Size))
			}
			// Events after the restart continue above every sequence number used before.
			if got.seq <= j.seq || got.seqSaved != got.seq {
				t.Errorf("seq: got %d (reserved %d), want above %d and reserved", got.seq, got.seqSaved, j.seq)
			}
			if got.dl != nil && got.dl.complete() != (got.bytes == f.offer.Size) {
				t.Errorf("download complete: got %v with %d of %d bytes", got.dl.complete(), got.bytes, f.offer.Size)
			}
			if got.dl != nil && tt.received < 100 && got.bytes > 0 {
				// The ranges after the resume start at the first one missing.
				reqs := got.dl.requests(time.Now(), nil)
				if len(reqs) == 0 || reqs[0].Offset != int64(tt.received)*chunk {
					t.Errorf("first request after the resume: got %+v, want offset %d", reqs, tt.received*chunk)
				}
			}
		})
	}
}

func TestBootDropsUnreadableJobRecord(t *testing.T) {
	f := newPersistFixture(t)
	f.start(t, 3, protocol.StateDownloading)
	if err := os.WriteFile(filepath.Join(f.d.dir, jobFile), []byte(`{"offer":`), 0o600); err != nil {
		t.Fatal(err)
	}
	if err := f.d.boot(); err != nil {
		t.Fatalf("boot: got %v, want the record dropped", err)
	}
	if f.d.job != nil {
		t.Errorf("job: got %+v, want none", f.d.job)
	}
	if _, err := os.Stat(filepath.Join(f.d.dir, jobFile)); !os.IsNotExist(err) {
		t.Errorf("job record: got %v, want it removed", err)
	}
}

// TestCheckpointNamesOnlySyncedRanges writes ranges without a checkpoint: a boot forgets them,
// as a power loss would, even though the bytes reached the file.
func TestCheckpointNamesOnlySyncedRanges(t *testing.T) {
	f := newPersistFixture(t)
	j := f.start(t, 2, protocol.StateDownloading)
	for _, i := range slices.Clone(j.dl.inflight) {
		off, n := j.dl.span(i)
		if _, err := j.dl.accept(uint32(off), f.newImg[off:off+int64(n)]); err != nil {
			t.Fatal(err)
		}
	}
	if j.dl.received <= 2*16<<10 {
		t.Fatalf("received: got %d, want more than the checkpoint's", j.dl.received)
	}
	if err := f.d.boot(); err != nil {
		t.Fatal(err)
	}
	if got := f.d.job.bytes; got != 2*16<<10 {
		t.Errorf("bytes after boot: got %d, want the checkpoint's %d", got, 2*16<<10)
	}
}
