package devicesim

import (
	"crypto/tls"
	"errors"
	"strings"
	"testing"
	"time"
	"unicode/utf8"

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

func TestCheckOffer(t *testing.T) {
	tests := []struct {
		name   string
		change func(o *protocol.Offer)
		want   string // substring of the error; "" for accepted
	}{
		{"valid", func(o *protocol.Offer) {}, ""},
		{"equal counter", func(o *protocol.Offer) { o.Manifest.Counter = 2 }, ""},
		{"upper-case sha256", func(o *protocol.Offer) { o.Manifest.SHA256 = strings.Repeat("AB", 32) }, ""},
		{"largest size", func(o *protocol.Offer) { o.Size, o.Manifest.Size = MaxImageSize, MaxImageSize }, ""},
		{"offer v0", func(o *protocol.Offer) { o.V = 0 }, "offer version 0"},
		{"offer v2", func(o *protocol.Offer) { o.V = protocol.ProtocolVersion + 1 }, "offer version"},
		{"manifest v2", func(o *protocol.Offer) { o.Manifest.V = protocol.ProtocolVersion + 1 }, "manifest version"},
		{"model", func(o *protocol.Offer) { o.Manifest.Model = "n" }, "model"},
		{"same version", func(o *protocol.Offer) { o.Manifest.Version = "1.1.0" }, "not newer"},
		{"older version", func(o *protocol.Offer) { o.Manifest.Version = "1.0.9" }, "not newer"},
		{"pre-release of installed", func(o *protocol.Offer) { o.Manifest.Version = "1.1.0-rc.1" }, "not newer"},
		{"bad version", func(o *protocol.Offer) { o.Manifest.Version = "latest" }, "invalid version"},
		{"counter below", func(o *protocol.Offer) { o.Manifest.Counter = 1 }, "counter 1 below installed 2"},
		{"zero size", func(o *protocol.Offer) { o.Size, o.Manifest.Size = 0, 0 }, "size 0"},
		{"negative size", func(o *protocol.Offer) { o.Size, o.Manifest.Size = -1, -1 }, "size -1"},
		{"too big", func(o *protocol.Offer) { o.Size, o.Manifest.Size = MaxImageSize+1, MaxImageSize+1 }, "size"},
		{"size mismatch", func(o *protocol.Offer) { o.Size = 99 }, "offer size 99"},
		{"short sha256", func(o *protocol.Offer) { o.Manifest.SHA256 = "abcd" }, "sha256"},
		{"non-hex sha256", func(o *protocol.Offer) { o.Manifest.SHA256 = strings.Repeat("zz", 32) }, "sha256"},
	}
	for _, tt := range tests {
		t.Run(tt.name, func(t *testing.T) {
			o := validOffer()
			tt.change(&o)
			err := checkOffer(o, "m", "1.1.0", 2)
			switch {
			case tt.want == "" && err != nil:
				t.Errorf("got %v, want accepted", err)
			case tt.want != "" && (err == nil || !strings.Contains(err.Error(), tt.want)):
				t.Errorf("got %v, want an error containing %q", err, tt.want)
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
	dl := newDownload(o, time.Second)

	reqs := dl.requests(now)
	if len(reqs) != 2 || reqs[0].Offset != 0 || reqs[1].Offset != protocol.MinChunkSize || reqs[1].Length != protocol.MinChunkSize {
		t.Fatalf("first requests: got %+v, want 2 full ranges at 0 and %d", reqs, protocol.MinChunkSize)
	}
	if got := dl.requests(now); len(got) != 0 {
		t.Fatalf("requests with a full window: got %+v, want none", got)
	}
	full := make([]byte, protocol.MinChunkSize)
	if n := dl.accept(0, full); n != protocol.MinChunkSize {
		t.Fatalf("accept: got %d, want %d", n, protocol.MinChunkSize)
	}
	if n := dl.accept(0, full); n != 0 {
		t.Errorf("duplicate: got %d, want 0", n)
	}
	if n := dl.accept(7, full); n != 0 {
		t.Errorf("misaligned offset: got %d, want 0", n)
	}
	if n := dl.accept(protocol.MinChunkSize, full[:5]); n != -1 {
		t.Errorf("short payload: got %d, want -1", n)
	}
	if err := dl.reask(protocol.MinChunkSize, now); err != nil {
		t.Fatalf("reask: %v", err)
	}
	reqs = dl.requests(now)
	if len(reqs) != 2 || reqs[0].Offset != protocol.MinChunkSize || reqs[1].Offset != 2*protocol.MinChunkSize || reqs[1].Length != 10 {
		t.Fatalf("after a short payload: got %+v, want the range again, then the last 10 bytes", reqs)
	}
	dl.accept(2*protocol.MinChunkSize, make([]byte, 10))
	dl.accept(protocol.MinChunkSize, full)
	if !dl.complete() || dl.received != o.Size {
		t.Errorf("complete: got %v with %d bytes, want true with %d", dl.complete(), dl.received, o.Size)
	}
}

func TestDownloadGivesUp(t *testing.T) {
	tests := []struct {
		name  string
		fail  func(dl *download, now time.Time) error
		limit int
	}{
		{"timeouts", func(dl *download, now time.Time) error { return dl.expire(now.Add(time.Hour)) }, maxAttempts},
		{"corrupt frames", func(dl *download, now time.Time) error { return dl.reask(0, now) }, maxAttempts},
		{"busy", func(dl *download, now time.Time) error { return dl.busy(0, now) }, maxBusy + 1},
	}
	for _, tt := range tests {
		t.Run(tt.name, func(t *testing.T) {
			o := validOffer()
			o.Window = 1
			dl := newDownload(o, time.Millisecond)
			now := time.Now()
			var err error
			n := 0
			for err == nil && n < 100 {
				now = now.Add(time.Hour) // past any busy delay
				if reqs := dl.requests(now); len(reqs) != 1 || reqs[0].Offset != 0 {
					t.Fatalf("round %d: got requests %+v, want offset 0 again", n, reqs)
				}
				err = tt.fail(dl, now)
				n++
			}
			if !errors.Is(err, errExhausted) || n != tt.limit {
				t.Errorf("got %v after %d rounds, want %v after %d", err, n, errExhausted, tt.limit)
			}
		})
	}
}

func TestDownloadResetAsksAgainAtOnce(t *testing.T) {
	o := validOffer()
	o.Size, o.Window = 3*protocol.MinChunkSize, 4
	dl := newDownload(o, time.Second)
	now := time.Now()
	if got := len(dl.requests(now)); got != 3 {
		t.Fatalf("requests: got %d, want 3", got)
	}
	dl.reset()
	reqs := dl.requests(now)
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
		dl := newDownload(o, time.Second)
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
	good := Config{ID: "d1", Model: "m", Version: "1.0.0", Broker: "127.0.0.1:8883", TLS: &tls.Config{}}
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
		{ID: "sim-0002", From: "1.0.0", To: "1.1.0", State: protocol.StateFailed, Reason: "hash-mismatch"},
		{ID: "sim-0003", From: "1.0.0", State: protocol.StateIdle},
	})
	want := `DEVICE    FROM   TO     BYTES  SECONDS  STATE
sim-0001  1.0.0  1.1.0  1234   1.50     installed
sim-0002  1.0.0  1.1.0  0      0.00     failed (hash-mismatch)
sim-0003  1.0.0  -      0      0.00     idle
3 devices: 1 installed, 1 failed, 1 other
`
	if got := b.String(); got != want {
		t.Errorf("got\n%s\nwant\n%s", got, want)
	}
}
