package devicesim_test

import (
	"bytes"
	"context"
	"crypto/ed25519"
	"crypto/sha256"
	"crypto/tls"
	"encoding/hex"
	"encoding/json"
	"errors"
	"log/slog"
	"net"
	"os"
	"path/filepath"
	"strings"
	"sync"
	"sync/atomic"
	"testing"
	"time"

	mqtt "github.com/mochi-mqtt/server/v2"
	"github.com/mochi-mqtt/server/v2/listeners"
	"github.com/mochi-mqtt/server/v2/packets"

	"github.com/fota-dev/fota/certs/certstest"
	"github.com/fota-dev/fota/devicesim"
	"github.com/fota-dev/fota/firmware"
	"github.com/fota-dev/fota/fotatest"
	"github.com/fota-dev/fota/protocol"
)

// Transfer parameters of the tests' offers: small enough that an image takes several
// windows, so that resuming has something to skip.
const (
	testChunk  = 16 << 10
	testWindow = 4
)

const (
	model    = "primehub"
	oldVer   = "7.27.0"
	newVer   = "7.28.0"
	transfer = 42
	jobID    = "job-1"
)

func readFirmware(t testing.TB, name string) []byte {
	t.Helper()
	b, err := os.ReadFile(filepath.Join("..", "..", "shared", "firmware", name))
	if err != nil {
		t.Fatalf("read firmware: %v", err)
	}
	return b
}

// The release key the devices of these tests pin.
var releasePub, releaseKey = newKey()

func newKey() (ed25519.PublicKey, ed25519.PrivateKey) {
	pub, priv, err := ed25519.GenerateKey(nil)
	if err != nil {
		panic(err)
	}
	return pub, priv
}

func shaHex(b []byte) string {
	sum := sha256.Sum256(b)
	return hex.EncodeToString(sum[:])
}

// sign returns m signed by key.
func sign(t testing.TB, m protocol.Manifest, key ed25519.PrivateKey) protocol.Manifest {
	t.Helper()
	m, err := firmware.Sign(m, key)
	if err != nil {
		t.Fatalf("sign: %v", err)
	}
	return m
}

// offerFor offers img as version with counter 1, signed by the release key.
func offerFor(t testing.TB, img []byte, version string) protocol.Offer {
	t.Helper()
	m := protocol.Manifest{
		V: protocol.ProtocolVersion, Model: model, Version: version, Counter: 1,
		Size: int64(len(img)), SHA256: shaHex(img),
	}
	return protocol.Offer{
		V:         protocol.ProtocolVersion,
		Job:       jobID,
		Transfer:  transfer,
		Manifest:  sign(t, m, releaseKey),
		Size:      int64(len(img)),
		ChunkSize: testChunk,
		Window:    testWindow,
	}
}

// allowHook lets every client in: mutual TLS already checked the certificate, and the
// tests are about the device, not the broker's access control. (Mochi's auth package would
// pull in a YAML module this repository does not use.)
type allowHook struct{ mqtt.HookBase }

func (h *allowHook) ID() string { return "allow" }

func (h *allowHook) Provides(b byte) bool {
	return b == mqtt.OnConnectAuthenticate || b == mqtt.OnACLCheck
}

func (h *allowHook) OnConnectAuthenticate(*mqtt.Client, packets.Packet) bool { return true }

func (h *allowHook) OnACLCheck(*mqtt.Client, string, bool) bool { return true }

// updateServer is a minimal update server on a real Mochi broker with mutual TLS: it offers
// one image to devices that report offerWhen, and answers chunk requests from it. The tests
// use it instead of package broker, which a device must not depend on.
type updateServer struct {
	srv       *mqtt.Server
	addr      string
	image     []byte
	offer     protocol.Offer
	offerWhen string // devices reporting this version get the offer
	offers    int    // how many times to publish it per status; default 1
	// statusHook, when set, is called with every status instead of offering on offerWhen.
	statusHook func(dev string, st protocol.Status)
	// eventHook, when set, is called with every event.
	eventHook func(dev string, ev protocol.Event)
	// alter, when set, returns the frames to send instead of frame, the answer to the
	// attempt-th request for req.Offset.
	alter func(dev string, req protocol.ChunkRequest, attempt int, frame []byte) [][]byte

	mu       sync.Mutex
	statuses map[string][]protocol.Status
	events   map[string][]protocol.Event
	requests map[string]map[int64]int
	log      map[string][]request
}

// request is one chunk request as the server received it.
type request struct {
	at  time.Time
	off int64
	n   int
}

func newUpdateServer(t *testing.T, tlsCfg *tls.Config, image []byte, offer protocol.Offer, setup func(*updateServer)) *updateServer {
	t.Helper()
	s := &updateServer{
		image: image, offer: offer, offerWhen: oldVer, offers: 1,
		statuses: map[string][]protocol.Status{},
		events:   map[string][]protocol.Event{},
		requests: map[string]map[int64]int{},
		log:      map[string][]request{},
	}
	if setup != nil {
		setup(s)
	}
	s.srv = mqtt.New(&mqtt.Options{InlineClient: true, Logger: slog.New(slog.DiscardHandler)})
	if err := s.srv.AddHook(new(allowHook), nil); err != nil {
		t.Fatal(err)
	}
	l := listeners.NewTCP(listeners.Config{ID: "tls", Address: "127.0.0.1:0", TLSConfig: tlsCfg})
	if err := s.srv.AddListener(l); err != nil {
		t.Fatal(err)
	}
	s.addr = l.Address()
	for suffix, h := range map[string]func(dev string, p []byte){
		protocol.SuffixStatus:  s.onStatus,
		protocol.SuffixEvent:   s.onEvent,
		protocol.SuffixRequest: s.onRequest,
	} {
		err := s.srv.Subscribe(protocol.Topic("+", suffix), 1, func(_ *mqtt.Client, _ packets.Subscription, pk packets.Packet) {
			if dev, _, ok := protocol.ParseTopic(pk.TopicName); ok {
				h(dev, pk.Payload)
			}
		})
		if err != nil {
			t.Fatal(err)
		}
	}
	if err := s.srv.Serve(); err != nil {
		t.Fatal(err)
	}
	t.Cleanup(func() { s.srv.Close() })
	return s
}

func (s *updateServer) publishOffer(dev string) { s.publishOfferOf(dev, s.offer) }

func (s *updateServer) publishOfferOf(dev string, o protocol.Offer) {
	b, _ := json.Marshal(o)
	s.srv.Publish(protocol.Topic(dev, protocol.SuffixJob), b, false, 1)
}

func (s *updateServer) onStatus(dev string, p []byte) {
	var st protocol.Status
	if json.Unmarshal(p, &st) != nil {
		return
	}
	s.mu.Lock()
	s.statuses[dev] = append(s.statuses[dev], st)
	s.mu.Unlock()
	if s.statusHook != nil {
		s.statusHook(dev, st)
		return
	}
	if st.Version == s.offerWhen {
		for range s.offers {
			s.publishOffer(dev)
		}
	}
}

func (s *updateServer) onEvent(dev string, p []byte) {
	var ev protocol.Event
	if json.Unmarshal(p, &ev) != nil {
		return
	}
	s.mu.Lock()
	s.events[dev] = append(s.events[dev], ev)
	s.mu.Unlock()
	if s.eventHook != nil {
		s.eventHook(dev, ev)
	}
}

func (s *updateServer) onRequest(dev string, p []byte) {
	var req protocol.ChunkRequest
	if json.Unmarshal(p, &req) != nil {
		return
	}
	s.mu.Lock()
	if s.requests[dev] == nil {
		s.requests[dev] = map[int64]int{}
	}
	s.requests[dev][req.Offset]++
	attempt := s.requests[dev][req.Offset]
	s.log[dev] = append(s.log[dev], request{time.Now(), req.Offset, req.Length})
	s.mu.Unlock()

	var frame []byte
	switch {
	case req.Job != s.offer.Job:
		frame = protocol.AppendFrame(nil, protocol.FrameError, s.offer.Transfer, uint32(req.Offset), []byte(protocol.ErrCodeNoJob))
	case req.Offset < 0 || req.Length <= 0 || req.Length > s.offer.ChunkSize || req.Offset+int64(req.Length) > int64(len(s.image)):
		frame = protocol.AppendFrame(nil, protocol.FrameError, s.offer.Transfer, uint32(req.Offset), []byte(protocol.ErrCodeRange))
	default:
		frame = protocol.AppendFrame(nil, protocol.FrameData, s.offer.Transfer, uint32(req.Offset), s.image[req.Offset:req.Offset+int64(req.Length)])
	}
	frames := [][]byte{frame}
	if s.alter != nil {
		frames = s.alter(dev, req, attempt, frame)
	}
	for _, fr := range frames {
		s.srv.Publish(protocol.Topic(dev, protocol.SuffixChunk), fr, false, 0)
	}
}

func (s *updateServer) eventsOf(dev string) []protocol.Event {
	s.mu.Lock()
	defer s.mu.Unlock()
	return append([]protocol.Event(nil), s.events[dev]...)
}

func (s *updateServer) statusesOf(dev string) []protocol.Status {
	s.mu.Lock()
	defer s.mu.Unlock()
	return append([]protocol.Status(nil), s.statuses[dev]...)
}

func (s *updateServer) requestsAt(dev string, off int64) int {
	s.mu.Lock()
	defer s.mu.Unlock()
	return s.requests[dev][off]
}

// requestLog returns the chunk requests of dev in the order they arrived.
func (s *updateServer) requestLog(dev string) []request {
	s.mu.Lock()
	defer s.mu.Unlock()
	return append([]request(nil), s.log[dev]...)
}

// askedBytes is how many bytes dev asked for, in all its requests.
func (s *updateServer) askedBytes(dev string) int64 {
	var n int64
	for _, r := range s.requestLog(dev) {
		n += int64(r.n)
	}
	return n
}

// kick closes dev's connection on the broker, as a network failure would.
func (s *updateServer) kick(dev string) {
	if cl, ok := s.srv.Clients.Get(dev); ok {
		cl.Stop(errors.New("test: kicked"))
	}
}

// startDevice runs a device until the test ends.
func startDevice(t *testing.T, cfg devicesim.Config) *devicesim.Device {
	t.Helper()
	d, stop := runDevice(t, cfg)
	t.Cleanup(stop)
	return d
}

// runDevice runs a device until stop is called.
func runDevice(t *testing.T, cfg devicesim.Config) (d *devicesim.Device, stop func()) {
	t.Helper()
	d, err := devicesim.New(cfg)
	if err != nil {
		t.Fatalf("New: %v", err)
	}
	ctx, cancel := context.WithCancel(context.Background())
	done := make(chan error, 1)
	go func() { done <- d.Run(ctx) }()
	var once sync.Once
	return d, func() {
		once.Do(func() {
			cancel()
			if err := <-done; err != nil {
				t.Errorf("Run: got %v, want nil", err)
			}
		})
	}
}

func waitDone(t *testing.T, d *devicesim.Device) devicesim.Result {
	t.Helper()
	var r devicesim.Result
	fotatest.WaitFor(t, 30*time.Second, "job to end", func() bool {
		r = d.Result()
		return r.State == protocol.StateInstalled || r.State == protocol.StateFailed
	})
	return r
}

type fixture struct {
	ca     *certstest.CA
	oldImg []byte
	newImg []byte
}

func newFixture(t *testing.T) fixture {
	return fixture{
		ca:     certstest.New(t),
		oldImg: readFirmware(t, "pybricks-primehub-7.27.0.bin"),
		newImg: readFirmware(t, "pybricks-primehub-7.28.0.bin"),
	}
}

func (f fixture) device(t *testing.T, s *updateServer, id, version string, img []byte) devicesim.Config {
	return devicesim.Config{
		ID: id, Model: model, Version: version, Image: img, PublicKey: releasePub,
		Broker: s.addr, TLS: f.ca.DeviceTLS(t, id, model),
		RequestTimeout: 200 * time.Millisecond,
		Logger:         slog.New(slog.NewTextHandler(t.Output(), nil)),
	}
}

// TestUpdateEndToEnd installs a signed full image, on a device that keeps its state in memory
// and on one that persists it.
func TestUpdateEndToEnd(t *testing.T) {
	f := newFixture(t)
	for _, persist := range []bool{false, true} {
		name := "in memory"
		if persist {
			name = "state dir"
		}
		t.Run(name, func(t *testing.T) {
			t.Parallel()
			testUpdateEndToEnd(t, f, persist)
		})
	}
}

func testUpdateEndToEnd(t *testing.T, f fixture, persist bool) {
	s := newUpdateServer(t, f.ca.ServerTLS(t), f.newImg, offerFor(t, f.newImg, newVer), nil)
	cfg := f.device(t, s, "dev-1", oldVer, f.oldImg)
	if persist {
		cfg.StateDir = t.TempDir()
	}
	d := startDevice(t, cfg)

	r := waitDone(t, d)
	if r.State != protocol.StateInstalled {
		t.Fatalf("state: got %s (%s), want installed", r.State, r.Reason)
	}
	if got := d.Version(); got != newVer {
		t.Errorf("version: got %s, want %s", got, newVer)
	}
	if r.Bytes != int64(len(f.newImg)) || r.Delta || r.From != oldVer || r.To != newVer || r.Duration <= 0 {
		t.Errorf("result: got %+v, want %d bytes, no delta, from %s to %s", r, len(f.newImg), oldVer, newVer)
	}
	checkState(t, d, cfg.StateDir, devicesim.State{Model: model, Active: 1, Version: newVer, Counter: 1, SHA256: shaHex(f.newImg)}, f.newImg)

	fotatest.WaitFor(t, 30*time.Second, "installed event", func() bool {
		evs := s.eventsOf("dev-1")
		return len(evs) > 0 && evs[len(evs)-1].State == protocol.StateInstalled
	})
	evs := s.eventsOf("dev-1")
	var states []string
	for i, ev := range evs {
		if ev.Job != jobID || ev.Seq != uint64(i+1) || ev.V != protocol.ProtocolVersion {
			t.Errorf("event %d: got job %q seq %d v %d, want %q %d %d", i, ev.Job, ev.Seq, ev.V, jobID, i+1, protocol.ProtocolVersion)
		}
		if len(states) == 0 || states[len(states)-1] != ev.State {
			states = append(states, ev.State)
		}
	}
	want := []string{protocol.StateDownloading, protocol.StateVerifying, protocol.StateInstalling, protocol.StateInstalled}
	if strings.Join(states, ",") != strings.Join(want, ",") {
		t.Errorf("event states: got %v, want %v", states, want)
	}
	if last := evs[len(evs)-1]; last.Version != newVer {
		t.Errorf("installed event version: got %q, want %q", last.Version, newVer)
	}

	// After the reboot the device reports the new image.
	sts := s.statusesOf("dev-1")
	sum := sha256.Sum256(f.newImg)
	if len(sts) < 2 {
		t.Fatalf("statuses: got %d, want 2 (before and after the reboot)", len(sts))
	}
	if first := sts[0]; first.Version != oldVer || first.State != protocol.StateIdle || first.Model != model || first.Counter != cfg.Counter {
		t.Errorf("first status: got %+v, want idle %s %s counter %d", first, model, oldVer, cfg.Counter)
	}
	// The counter is the installed manifest's from the reboot on.
	if last := sts[len(sts)-1]; last.Version != newVer || last.SHA256 != hex.EncodeToString(sum[:]) || last.Counter != 1 {
		t.Errorf("status after reboot: got %s %s counter %d, want %s %x counter 1", last.Version, last.SHA256, last.Counter, newVer, sum)
	}

	// The same job offered again is confirmed again, not installed again.
	s.publishOffer("dev-1")
	fotatest.WaitFor(t, 30*time.Second, "second installed event", func() bool {
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
}

// TestTransferFaults checks that a device recovers from what a lossy or busy server does, and
// gives up on what it cannot recover from.
func TestTransferFaults(t *testing.T) {
	const at = 2 * testChunk
	f := newFixture(t)
	errFrame := func(code string) []byte {
		return protocol.AppendFrame(nil, protocol.FrameError, transfer, at, []byte(code))
	}
	tests := []struct {
		name       string
		alter      func(req protocol.ChunkRequest, attempt int, frame []byte) [][]byte
		wantState  string
		wantReason string
		wantAsked  int // requests for offset at, at least
	}{
		{
			name: "corrupt frame is asked again",
			alter: func(req protocol.ChunkRequest, attempt int, frame []byte) [][]byte {
				if req.Offset == at && attempt == 1 {
					frame[protocol.FrameHeaderSize+100] ^= 0xff // header CRC now wrong
				}
				return [][]byte{frame}
			},
			wantState: protocol.StateInstalled, wantAsked: 2,
		},
		{
			name: "lost frame is asked again after the timeout",
			alter: func(req protocol.ChunkRequest, attempt int, frame []byte) [][]byte {
				if req.Offset == at && attempt == 1 {
					return nil
				}
				return [][]byte{frame}
			},
			wantState: protocol.StateInstalled, wantAsked: 2,
		},
		{
			name: "busy is asked again later",
			alter: func(req protocol.ChunkRequest, attempt int, frame []byte) [][]byte {
				if req.Offset == at && attempt == 1 {
					return [][]byte{errFrame(protocol.ErrCodeBusy)}
				}
				return [][]byte{frame}
			},
			wantState: protocol.StateInstalled, wantAsked: 2,
		},
		{
			name: "duplicate, foreign and misplaced frames are ignored",
			alter: func(req protocol.ChunkRequest, attempt int, frame []byte) [][]byte {
				junk := bytes.Repeat([]byte{1}, req.Length)
				return [][]byte{
					protocol.AppendFrame(nil, protocol.FrameData, transfer+1, uint32(req.Offset), junk),
					protocol.AppendFrame(nil, protocol.FrameData, transfer, uint32(req.Offset)+1, junk),
					protocol.AppendFrame(nil, protocol.FrameData, transfer, uint32(len(f.newImg)), junk),
					frame, frame,
				}
			},
			wantState: protocol.StateInstalled, wantAsked: 1,
		},
		{
			name: "a frame that never parses fails after bounded attempts",
			alter: func(req protocol.ChunkRequest, attempt int, frame []byte) [][]byte {
				if req.Offset == at {
					return [][]byte{append(frame, 0)} // length field no longer matches
				}
				return [][]byte{frame}
			},
			wantState: protocol.StateFailed, wantReason: protocol.ReasonTransfer, wantAsked: 6,
		},
		{
			name: "no-job fails the transfer",
			alter: func(req protocol.ChunkRequest, attempt int, frame []byte) [][]byte {
				if req.Offset == at {
					return [][]byte{errFrame(protocol.ErrCodeNoJob)}
				}
				return [][]byte{frame}
			},
			wantState: protocol.StateFailed, wantReason: protocol.ReasonTransfer, wantAsked: 1,
		},
		{
			name: "range fails the transfer",
			alter: func(req protocol.ChunkRequest, attempt int, frame []byte) [][]byte {
				if req.Offset == at {
					return [][]byte{errFrame(protocol.ErrCodeRange)}
				}
				return [][]byte{frame}
			},
			wantState: protocol.StateFailed, wantReason: protocol.ReasonTransfer, wantAsked: 1,
		},
	}
	for _, tt := range tests {
		t.Run(tt.name, func(t *testing.T) {
			t.Parallel()
			s := newUpdateServer(t, f.ca.ServerTLS(t), f.newImg, offerFor(t, f.newImg, newVer), func(s *updateServer) {
				s.alter = func(_ string, req protocol.ChunkRequest, attempt int, frame []byte) [][]byte {
					return tt.alter(req, attempt, frame)
				}
			})
			cfg := f.device(t, s, "dev-1", oldVer, f.oldImg)
			cfg.RequestTimeout = 50 * time.Millisecond
			d := startDevice(t, cfg)
			r := waitDone(t, d)
			if r.State != tt.wantState || !strings.HasPrefix(r.Reason, tt.wantReason) {
				t.Fatalf("result: got %s %q, want %s %q", r.State, r.Reason, tt.wantState, tt.wantReason)
			}
			if got := s.requestsAt("dev-1", at); got < tt.wantAsked {
				t.Errorf("requests at %d: got %d, want at least %d", at, got, tt.wantAsked)
			}
			wantVer := newVer
			if tt.wantState == protocol.StateFailed {
				wantVer = oldVer
			}
			if got := d.Version(); got != wantVer {
				t.Errorf("version: got %s, want %s", got, wantVer)
			}
			if tt.wantState == protocol.StateInstalled && r.Bytes != int64(len(f.newImg)) {
				t.Errorf("bytes: got %d, want %d", r.Bytes, len(f.newImg))
			}
			if tt.wantState == protocol.StateFailed {
				fotatest.WaitFor(t, 30*time.Second, "failed event", func() bool {
					evs := s.eventsOf("dev-1")
					return len(evs) > 0 && evs[len(evs)-1].State == protocol.StateFailed &&
						strings.HasPrefix(evs[len(evs)-1].Reason, tt.wantReason)
				})
			}
		})
	}
}

// TestFailedJobOfferedAgainIsRetried serves a tampered image once: the job fails, and when the
// server offers it again the device downloads it again and installs it.
func TestFailedJobOfferedAgainIsRetried(t *testing.T) {
	f := newFixture(t)
	s := newUpdateServer(t, f.ca.ServerTLS(t), f.newImg, offerFor(t, f.newImg, newVer), func(s *updateServer) {
		s.alter = func(_ string, req protocol.ChunkRequest, attempt int, frame []byte) [][]byte {
			if req.Offset == 0 && attempt == 1 {
				p := append([]byte(nil), frame[protocol.FrameHeaderSize:]...)
				p[0] ^= 1
				return [][]byte{protocol.AppendFrame(nil, protocol.FrameData, transfer, 0, p)}
			}
			return [][]byte{frame}
		}
	})
	d := startDevice(t, f.device(t, s, "dev-1", oldVer, f.oldImg))
	if r := waitDone(t, d); r.State != protocol.StateFailed || !strings.HasPrefix(r.Reason, protocol.ReasonHashMismatch) {
		t.Fatalf("first attempt: got %s %q, want failed %s", r.State, r.Reason, protocol.ReasonHashMismatch)
	}
	fotatest.WaitFor(t, 30*time.Second, "failed event", func() bool {
		evs := s.eventsOf("dev-1")
		return len(evs) > 0 && evs[len(evs)-1].State == protocol.StateFailed
	})
	s.publishOffer("dev-1")
	fotatest.WaitFor(t, 30*time.Second, "installed", func() bool { return d.Result().State == protocol.StateInstalled })
	if got := d.Version(); got != newVer {
		t.Errorf("version: got %s, want %s", got, newVer)
	}
	fotatest.WaitFor(t, 30*time.Second, "installed event", func() bool {
		evs := s.eventsOf("dev-1")
		return len(evs) > 0 && evs[len(evs)-1].State == protocol.StateInstalled
	})
	for i, ev := range s.eventsOf("dev-1") {
		if ev.Seq != uint64(i+1) {
			t.Errorf("event %d (%s): got seq %d, want %d", i, ev.State, ev.Seq, i+1)
		}
	}
}

func TestRepeatedOfferIgnored(t *testing.T) {
	f := newFixture(t)
	s := newUpdateServer(t, f.ca.ServerTLS(t), f.newImg, offerFor(t, f.newImg, newVer), func(s *updateServer) { s.offers = 3 })
	d := startDevice(t, f.device(t, s, "dev-1", oldVer, f.oldImg))
	if r := waitDone(t, d); r.State != protocol.StateInstalled {
		t.Fatalf("state: got %s (%s), want installed", r.State, r.Reason)
	}
	starts := 0
	for _, ev := range s.eventsOf("dev-1") {
		if ev.State == protocol.StateDownloading && ev.Bytes == 0 {
			starts++
		}
	}
	if starts != 1 {
		t.Errorf("downloads started: got %d, want 1", starts)
	}
	if got := s.requestsAt("dev-1", 0); got != 1 {
		t.Errorf("requests at offset 0: got %d, want 1", got)
	}
}

func TestRunFleet(t *testing.T) {
	f := newFixture(t)
	s := newUpdateServer(t, f.ca.ServerTLS(t), f.newImg, offerFor(t, f.newImg, newVer), nil)
	ctx, cancel := context.WithTimeout(context.Background(), 8*time.Second)
	defer cancel()
	stateDir := t.TempDir()
	rs, err := devicesim.RunFleet(ctx, devicesim.FleetConfig{
		N: 3, Model: model, Version: oldVer, Image: f.oldImg, PublicKey: releasePub, StateDir: stateDir, Broker: s.addr,
		TLSFor: func(id string) (*tls.Config, error) {
			return f.ca.DeviceTLS(t, id, model), nil
		},
		UntilVersion: newVer,
	})
	if err != nil {
		t.Fatalf("RunFleet: %v", err)
	}
	wantIDs := []string{"sim-0001", "sim-0002", "sim-0003"}
	if len(rs) != len(wantIDs) {
		t.Fatalf("results: got %d, want %d", len(rs), len(wantIDs))
	}
	for i, r := range rs {
		if r.ID != wantIDs[i] || r.State != protocol.StateInstalled || r.To != newVer || r.Bytes != int64(len(f.newImg)) {
			t.Errorf("result %d: got %+v, want %s installed %s with %d bytes", i, r, wantIDs[i], newVer, len(f.newImg))
		}
		var st devicesim.State
		b, err := os.ReadFile(filepath.Join(stateDir, wantIDs[i], "state.json"))
		if err == nil {
			err = json.Unmarshal(b, &st)
		}
		if err != nil || st.Version != newVer || st.Counter != 1 || st.SHA256 != shaHex(f.newImg) {
			t.Errorf("%s state.json: got %+v (%v), want %s counter 1 sha256 %s", wantIDs[i], st, err, newVer, shaHex(f.newImg))
		}
	}
	var out strings.Builder
	devicesim.WriteSummary(&out, rs)
	if got := strings.Count(out.String(), "installed"); got != 4 { // 3 rows and the total
		t.Errorf("summary: got %d mentions of installed, want 4:\n%s", got, out.String())
	}
}

func TestRunFleetStopsWithContext(t *testing.T) {
	f := newFixture(t)
	// The server offers nothing, so the fleet never reaches the version.
	s := newUpdateServer(t, f.ca.ServerTLS(t), f.newImg, offerFor(t, f.newImg, newVer), func(s *updateServer) { s.offerWhen = "none" })
	ctx, cancel := context.WithCancel(context.Background())
	defer cancel()
	go func() {
		defer cancel()
		// Cancel once both devices have reported, or after 20 s regardless.
		_ = fotatest.Poll(20*time.Second, func() bool {
			return len(s.statusesOf("sim-0001")) > 0 && len(s.statusesOf("sim-0002")) > 0
		})
	}()
	rs, err := devicesim.RunFleet(ctx, devicesim.FleetConfig{
		N: 2, Model: model, Version: oldVer, Image: f.oldImg, PublicKey: releasePub, Broker: s.addr,
		TLSFor:       func(id string) (*tls.Config, error) { return f.ca.DeviceTLS(t, id, model), nil },
		UntilVersion: newVer,
	})
	if !errors.Is(err, context.Canceled) {
		t.Fatalf("RunFleet: got %v, want %v", err, context.Canceled)
	}
	if len(rs) != 2 || rs[0].State != protocol.StateIdle || rs[0].From != oldVer {
		t.Errorf("results: got %+v, want 2 idle at %s", rs, oldVer)
	}
}

// TestReconnectsUntilCancelled points a device at a listener that drops every connection: the
// device keeps trying, with backoff, and Run returns promptly once cancelled.
func TestReconnectsUntilCancelled(t *testing.T) {
	f := newFixture(t)
	ln, err := net.Listen("tcp", "127.0.0.1:0")
	if err != nil {
		t.Fatal(err)
	}
	var accepts atomic.Int32
	var wg sync.WaitGroup
	wg.Go(func() {
		for {
			c, err := ln.Accept()
			if err != nil {
				return
			}
			accepts.Add(1)
			c.Close()
		}
	})
	t.Cleanup(func() { ln.Close(); wg.Wait() })

	d, err := devicesim.New(devicesim.Config{
		ID: "dev-1", Model: model, Version: oldVer, PublicKey: releasePub, Broker: ln.Addr().String(),
		TLS: f.ca.DeviceTLS(t, "dev-1", model),
	})
	if err != nil {
		t.Fatal(err)
	}
	ctx, cancel := context.WithCancel(context.Background())
	done := make(chan error, 1)
	go func() { done <- d.Run(ctx) }()
	fotatest.WaitFor(t, 30*time.Second, "a second connection attempt", func() bool { return accepts.Load() >= 2 })
	if err := d.Run(ctx); !errors.Is(err, devicesim.ErrRunning) {
		t.Errorf("second Run: got %v, want %v", err, devicesim.ErrRunning)
	}
	cancel()
	select {
	case err := <-done:
		if err != nil {
			t.Errorf("Run: got %v, want nil", err)
		}
	case <-time.After(3 * time.Second):
		t.Fatal("Run did not return within 3s of cancel")
	}
	if r := d.Result(); r.State != protocol.StateIdle || r.From != oldVer {
		t.Errorf("result: got %+v, want idle at %s", r, oldVer)
	}
}
