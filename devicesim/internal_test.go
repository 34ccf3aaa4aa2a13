package devicesim

import (
	"crypto/ed25519"
	"crypto/tls"
	"errors"
	"fmt"
	"path/filepath"
	"strings"
	"testing"
	"time"
	"unicode/utf8"

	"github.com/fota-dev/fota/firmware"
	"github.com/fota-dev/fota/firmware/delta"
	"github.com/fota-dev/fota/protocol"
)

func validOffer() protocol.Offer {
	return protocol.Offer{
		V: protocol.ProtocolVersion, Job: "j", Transfer: 1,
		Manifest: protocol.Manifest{
			V: protocol.ProtocolVersion, Model: "m", Version: "1.2.0", Counter: 3, Size: 100,
			SHA256: strings.Repeat("ab", 32),
		},
		Size: 100, ChunkSize: protocol.MinChunkSize, Window: 2,
	}
}

// memDownload is a download of o kept in memory, with o's chunk size and window.
func memDownload(o protocol.Offer, timeout time.Duration) *download {
	cs, w := transferParams(o, 0)
	return newDownload(o, cs, w, timeout, make(memPartial, o.Size))
}

// accept is dl.accept for a download in memory, which cannot fail to store.
func accept(dl *download, off uint32, p []byte) int {
	n, err := dl.accept(off, p)
	if err != nil {
		panic(err)
	}
	return n
}

func TestCheckOffer(t *testing.T) {
	pub, key, err := ed25519.GenerateKey(nil)
	if err != nil {
		t.Fatal(err)
	}
	st := firmware.DeviceState{Model: "m", Counter: 2, ImageSHA256: strings.Repeat("cd", 32)}
	asDelta := func(o *protocol.Offer) {
		o.Manifest.Delta = &protocol.Delta{Base: st.ImageSHA256, PatchSHA256: strings.Repeat("ef", 32), PatchSize: 40, Format: delta.Format}
		o.Size = 40
	}
	tests := []struct {
		name   string
		before func(o *protocol.Offer) // changes that are signed
		after  func(o *protocol.Offer) // changes after signing; nil for none
		reason string                  // "" for accepted
		want   string                  // substring of the error
		err    error                   // the error wraps it, when set
	}{
		{name: "valid", before: func(o *protocol.Offer) {}},
		{name: "valid delta", before: asDelta},
		{name: "largest size", before: func(o *protocol.Offer) { o.Size, o.Manifest.Size = MaxImageSize, MaxImageSize }},
		{name: "offer v0", before: func(o *protocol.Offer) { o.V = 0 }, reason: protocol.ReasonBadManifest, want: "offer version 0"},
		{name: "offer v2", before: func(o *protocol.Offer) { o.V = protocol.ProtocolVersion + 1 }, reason: protocol.ReasonBadManifest, want: "offer version"},
		{name: "too big", before: func(o *protocol.Offer) { o.Size, o.Manifest.Size = MaxImageSize+1, MaxImageSize+1 }, reason: protocol.ReasonBadManifest, want: "size"},
		{name: "offer size differs", before: func(o *protocol.Offer) {}, after: func(o *protocol.Offer) { o.Size = 99 }, reason: protocol.ReasonBadManifest, want: "offer size 99"},
		{name: "delta offered at the image size", before: asDelta, after: func(o *protocol.Offer) { o.Size = 100 }, reason: protocol.ReasonBadManifest, want: "offer size 100"},
		{name: "delta format", before: func(o *protocol.Offer) { asDelta(o); o.Manifest.Delta.Format = "other" }, reason: protocol.ReasonBadManifest, want: "format"},
		{name: "patch too big", before: func(o *protocol.Offer) {
			asDelta(o)
			o.Size, o.Manifest.Delta.PatchSize = MaxImageSize+1, MaxImageSize+1
		}, reason: protocol.ReasonBadManifest, want: "patch size"},
		{name: "unsigned", before: func(o *protocol.Offer) {}, after: func(o *protocol.Offer) { o.Manifest.Signature = "" }, reason: protocol.ReasonBadManifest, err: firmware.ErrBadSignature},
		{name: "changed after signing", before: func(o *protocol.Offer) {}, after: func(o *protocol.Offer) { o.Manifest.Counter++ }, reason: protocol.ReasonBadManifest, err: firmware.ErrBadSignature},
		{name: "equal counter", before: func(o *protocol.Offer) { o.Manifest.Counter = 2 }, reason: protocol.ReasonBadManifest, err: firmware.ErrRollback},
		{name: "model", before: func(o *protocol.Offer) { o.Manifest.Model = "n" }, reason: protocol.ReasonBadManifest, err: firmware.ErrWrongModel},
		{name: "delta base", before: func(o *protocol.Offer) { asDelta(o); o.Manifest.Delta.Base = strings.Repeat("00", 32) }, reason: protocol.ReasonBadManifest, err: firmware.ErrWrongBase},
	}
	for _, tt := range tests {
		t.Run(tt.name, func(t *testing.T) {
			o := validOffer()
			tt.before(&o)
			if o.Manifest, err = firmware.Sign(o.Manifest, key); err != nil {
				t.Fatal(err)
			}
			if tt.after != nil {
				tt.after(&o)
			}
			err := checkOffer(o, pub, st, time.Now())
			switch {
			case tt.reason == "" && err != nil:
				t.Errorf("got %v, want accepted", err)
			case tt.reason == "":
			case err == nil:
				t.Errorf("got accepted, want %s", tt.reason)
			case !strings.HasPrefix(err.Error(), tt.reason+": ") || !strings.Contains(err.Error(), tt.want):
				t.Errorf("got %q, want %q with %q", err, tt.reason+": ...", tt.want)
			case tt.err != nil && !errors.Is(err, tt.err):
				t.Errorf("got %v, want it to wrap %v", err, tt.err)
			}
		})
	}
}

func TestClip(t *testing.T) {
	long := strings.Repeat("é", maxReason) // 2 bytes each: the cut may split one
	got := clip(long)
	if len(got) > maxReason || !strings.HasSuffix(got, "...") || !utf8.ValidString(got) {
		t.Errorf("clip: got %d bytes %q..., want at most %d valid UTF-8 ending in ...", len(got), got[:10], maxReason)
	}
	if got := clip("short"); got != "short" {
		t.Errorf("clip(short): got %q, want %q", got, "short")
	}
}

func TestDownloadWindowAndCompletion(t *testing.T) {
	o := validOffer()
	o.Size, o.ChunkSize, o.Window = 2*protocol.MinChunkSize+10, protocol.MinChunkSize, 2
	now := time.Now()
	dl := memDownload(o, time.Second)

	reqs := dl.requests(now, nil)
	if len(reqs) != 2 || reqs[0].Offset != 0 || reqs[1].Offset != protocol.MinChunkSize || reqs[1].Length != protocol.MinChunkSize {
		t.Fatalf("first requests: got %+v, want 2 full ranges at 0 and %d", reqs, protocol.MinChunkSize)
	}
	if got := dl.requests(now, nil); len(got) != 0 {
		t.Fatalf("requests with a full window: got %+v, want none", got)
	}
	full := make([]byte, protocol.MinChunkSize)
	if n := accept(dl, 0, full); n != protocol.MinChunkSize {
		t.Fatalf("accept: got %d, want %d", n, protocol.MinChunkSize)
	}
	if n := accept(dl, 0, full); n != 0 {
		t.Errorf("duplicate: got %d, want 0", n)
	}
	if n := accept(dl, 7, full); n != 0 {
		t.Errorf("misaligned offset: got %d, want 0", n)
	}
	if n := accept(dl, protocol.MinChunkSize, full[:5]); n != -1 {
		t.Errorf("short payload: got %d, want -1", n)
	}
	if err := dl.reask(protocol.MinChunkSize, now); err != nil {
		t.Fatalf("reask: %v", err)
	}
	reqs = dl.requests(now, nil)
	if len(reqs) != 2 || reqs[0].Offset != protocol.MinChunkSize || reqs[1].Offset != 2*protocol.MinChunkSize || reqs[1].Length != 10 {
		t.Fatalf("after a short payload: got %+v, want the range again, then the last 10 bytes", reqs)
	}
	accept(dl, 2*protocol.MinChunkSize, make([]byte, 10))
	accept(dl, protocol.MinChunkSize, full)
	if !dl.complete() || dl.received != o.Size {
		t.Errorf("complete: got %v with %d bytes, want true with %d", dl.complete(), dl.received, o.Size)
	}
}

func TestDownloadGivesUp(t *testing.T) {
	tests := []struct {
		name  string
		fail  func(dl *download, now time.Time) error
		limit int
		want  error
	}{
		{"timeouts", func(dl *download, now time.Time) error { return dl.expire(now.Add(time.Hour)) }, maxAttempts, errExhausted},
		{"corrupt frames", func(dl *download, now time.Time) error { return dl.reask(0, now) }, maxAttempts, errExhausted},
		{"busy", func(dl *download, now time.Time) error { return dl.busy(0, now) }, maxBusy + 1, errExhausted},
		{"short answers", func(dl *download, now time.Time) error {
			accept(dl, 0, make([]byte, dl.size-1))
			return dl.reask(0, now)
		}, maxAttempts, errExhausted},
		{"answers past the end", func(dl *download, now time.Time) error {
			if n := accept(dl, 0, make([]byte, dl.size+1)); n != -1 {
				t.Fatalf("accept of a long answer: got %d, want -1", n)
			}
			return dl.reask(0, now)
		}, maxAttempts, errOversize},
	}
	for _, tt := range tests {
		t.Run(tt.name, func(t *testing.T) {
			o := validOffer()
			o.Window = 1
			dl := memDownload(o, time.Millisecond)
			now := time.Now()
			var err error
			n := 0
			for err == nil && n < 100 {
				now = now.Add(time.Hour) // past any busy delay
				if reqs := dl.requests(now, nil); len(reqs) != 1 || reqs[0].Offset != 0 {
					t.Fatalf("round %d: got requests %+v, want offset 0 again", n, reqs)
				}
				err = tt.fail(dl, now)
				n++
			}
			if !errors.Is(err, tt.want) || n != tt.limit {
				t.Errorf("got %v after %d rounds, want %v after %d", err, n, tt.want, tt.limit)
			}
		})
	}
}

func TestDownloadResetAsksAgainAtOnce(t *testing.T) {
	o := validOffer()
	o.Size, o.Window = 3*protocol.MinChunkSize, 4
	dl := memDownload(o, time.Second)
	now := time.Now()
	if got := len(dl.requests(now, nil)); got != 3 {
		t.Fatalf("requests: got %d, want 3", got)
	}
	dl.reset()
	reqs := dl.requests(now, nil)
	if len(reqs) != 3 {
		t.Fatalf("after reset: got %d requests, want 3", len(reqs))
	}
	for i := range dl.chunks {
		if dl.chunks[i].attempts != 0 {
			t.Errorf("range %d: got %d attempts, want 0 (a lost connection is not the range's fault)", i, dl.chunks[i].attempts)
		}
	}
}

func TestNewDownloadClampsTransferParameters(t *testing.T) {
	tests := []struct {
		chunk, window         int
		wantChunk, wantWindow int
	}{
		{0, 0, protocol.DefaultChunkSize, protocol.DefaultWindow},
		{protocol.MaxChunkSize * 2, maxWindow * 2, protocol.MaxChunkSize, maxWindow},
		{protocol.MinChunkSize, 1, protocol.MinChunkSize, 1},
	}
	for _, tt := range tests {
		o := validOffer()
		o.ChunkSize, o.Window = tt.chunk, tt.window
		dl := memDownload(o, time.Second)
		if dl.chunkSize != tt.wantChunk || dl.window != tt.wantWindow {
			t.Errorf("chunk %d window %d: got %d %d, want %d %d", tt.chunk, tt.window, dl.chunkSize, dl.window, tt.wantChunk, tt.wantWindow)
		}
	}
}

func TestBackoffGrowsWithJitterAndCaps(t *testing.T) {
	var b backoff
	prevCap := time.Duration(0)
	for i := range 20 {
		d := b.next()
		if d < b.cur/2 || d > b.cur || b.cur > maxBackoff || b.cur < prevCap {
			t.Fatalf("step %d: got %v with cap %v, want within [cap/2, cap], cap non-decreasing and <= %v", i, d, b.cur, maxBackoff)
		}
		prevCap = b.cur
	}
	if b.cur != maxBackoff {
		t.Errorf("cap after 20 steps: got %v, want %v", b.cur, maxBackoff)
	}
}

func TestNewRefusesBadConfig(t *testing.T) {
	pub, _, err := ed25519.GenerateKey(nil)
	if err != nil {
		t.Fatal(err)
	}
	good := Config{ID: "d1", Model: "m", Version: "1.0.0", Broker: "127.0.0.1:8883", TLS: &tls.Config{}, PublicKey: pub}
	if _, err := New(good); err != nil {
		t.Fatalf("valid config: got %v, want nil", err)
	}
	tests := []struct {
		name   string
		change func(c *Config)
	}{
		{"bad id", func(c *Config) { c.ID = "a/b" }},
		{"no model", func(c *Config) { c.Model = "" }},
		{"bad version", func(c *Config) { c.Version = "x" }},
		{"bad broker", func(c *Config) { c.Broker = "nohost" }},
		{"no tls", func(c *Config) { c.TLS = nil }},
		{"image too big", func(c *Config) { c.Image = make([]byte, MaxImageSize+1) }},
		{"no public key", func(c *Config) { c.PublicKey = nil }},
		{"short public key", func(c *Config) { c.PublicKey = pub[:16] }},
		{"id that climbs out of the state dir", func(c *Config) { c.ID, c.StateDir = "..", t.TempDir() }},
		{"state dir of another model", func(c *Config) {
			c.StateDir = t.TempDir()
			if _, err := openSlots(filepath.Join(c.StateDir, c.ID), State{Model: "other", Version: "1.0.0"}, nil, nil); err != nil {
				t.Fatal(err)
			}
		}},
	}
	for _, tt := range tests {
		t.Run(tt.name, func(t *testing.T) {
			c := good
			tt.change(&c)
			if _, err := New(c); err == nil {
				t.Errorf("got nil error, want one")
			}
		})
	}
}

func TestWriteSummary(t *testing.T) {
	var b strings.Builder
	WriteSummary(&b, []Result{
		{ID: "sim-0001", From: "1.0.0", To: "1.1.0", Bytes: 1234, Duration: 1500 * time.Millisecond, State: protocol.StateInstalled},
		{ID: "sim-0004", From: "1.0.0", To: "1.1.0", Bytes: 99, Delta: true, Duration: 250 * time.Millisecond, State: protocol.StateInstalled},
		{ID: "sim-0002", From: "1.0.0", To: "1.1.0", State: protocol.StateFailed, Reason: "hash-mismatch"},
		{ID: "sim-0003", From: "1.0.0", State: protocol.StateIdle},
	})
	want := `DEVICE    FROM   TO     BYTES  AS     SECONDS  STATE
sim-0001  1.0.0  1.1.0  1234   image  1.50     installed
sim-0004  1.0.0  1.1.0  99     delta  0.25     installed
sim-0002  1.0.0  1.1.0  0      -      0.00     failed (hash-mismatch)
sim-0003  1.0.0  -      0      -      0.00     idle
4 devices: 2 installed, 1 failed, 1 other
`
	if got := b.String(); got != want {
		t.Errorf("got\n%s\nwant\n%s", got, want)
	}
}

// TestDownloadBusyIsNotASend checks PROTOCOL.md's rule that a range asked again after "busy"
// does not count toward the 6 sends that fail a job: only sends that went unanswered, came
// back corrupt or were answered "internal" do. A range unanswered 5 times and then told
// "busy" 20 times still completes, and its next unanswered send is still the 6th.
func TestDownloadBusyIsNotASend(t *testing.T) {
	for _, tt := range []struct {
		name string
		last func(dl *download, now time.Time) error // after 5 timeouts and maxBusy busy answers
		want error
	}{
		{"then data", func(dl *download, now time.Time) error {
			if n := accept(dl, 0, make([]byte, dl.size)); n != int(dl.size) {
				t.Fatalf("accept: got %d, want %d", n, dl.size)
			}
			if !dl.complete() {
				t.Fatal("download not complete after the range arrived")
			}
			return nil
		}, nil},
		{"then a sixth timeout", func(dl *download, now time.Time) error { return dl.expire(now.Add(time.Hour)) }, errExhausted},
	} {
		t.Run(tt.name, func(t *testing.T) {
			o := validOffer()
			o.Window = 1
			dl := memDownload(o, time.Millisecond)
			now := time.Now()
			ask := func(round string) {
				t.Helper()
				now = now.Add(time.Hour) // past any timeout or pause
				if reqs := dl.requests(now, nil); len(reqs) != 1 || reqs[0].Offset != 0 {
					t.Fatalf("%s: got requests %+v, want offset 0 again", round, reqs)
				}
			}
			for i := range maxAttempts - 1 {
				ask(fmt.Sprintf("timeout %d", i+1))
				if err := dl.expire(now.Add(time.Hour)); err != nil {
					t.Fatalf("timeout %d: got %v, want the range asked again", i+1, err)
				}
			}
			for i := range maxBusy {
				ask(fmt.Sprintf("busy %d", i+1))
				if err := dl.busy(0, now); err != nil {
					t.Fatalf("busy %d after %d timeouts: got %v, want the range asked again", i+1, maxAttempts-1, err)
				}
			}
			ask("last")
			if err := tt.last(dl, now); !errors.Is(err, tt.want) {
				t.Fatalf("got %v, want %v", err, tt.want)
			}
		})
	}
}
