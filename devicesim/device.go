// Package devicesim is fota's reference device: an MQTT client that speaks the device protocol
// of package protocol the way a real secure device should (status on connect, signed manifest
// checks against a pinned release key and an anti-rollback counter, windowed chunk download
// with retries, full images or delta patches, verification, install into the inactive of two
// slots, reboot, confirmation), and a fleet runner that starts many of them to rehearse a
// rollout.
//
// It is a device, so it talks to the server only over MQTT: it never imports the broker or
// the controller.
package devicesim

import (
	"context"
	"crypto/ed25519"
	"crypto/tls"
	"errors"
	"fmt"
	"log/slog"
	"math/rand/v2"
	"net"
	"net/url"
	"os"
	"path/filepath"
	"sync"
	"sync/atomic"
	"time"

	mqtt "github.com/eclipse/paho.mqtt.golang"

	"github.com/fota-dev/fota/protocol"
)

// MaxImageSize is the largest image, and the largest patch, a device accepts; bigger offers
// are refused.
const MaxImageSize = 64 << 20

// DefaultRequestTimeout is how long a device waits for a chunk before asking again.
const DefaultRequestTimeout = 2 * time.Second

// Connection tuning.
const (
	minBackoff     = 250 * time.Millisecond
	maxBackoff     = 30 * time.Second
	stableSession  = 10 * time.Second // a session this long resets the reconnect backoff
	connectTimeout = 5 * time.Second
	ackTimeout     = 10 * time.Second // SUBACK and PUBACK of the status
	// writeTimeout bounds paho's Publish. When the connection breaks during a Publish, paho
	// v1.5.1 can leave it blocked for this long before the loss is reported, stalling the
	// device; short, because a lost request is re-asked and a lost event is covered by the
	// next Status.
	writeTimeout  = 2 * time.Second
	keepAlive     = 30 * time.Second
	quiesce       = 250 // ms paho waits for DISCONNECT to be written
	progressEvery = time.Second
	maxJobIDLen   = 128
)

// ErrRunning is returned by Run when the device is already running.
var ErrRunning = errors.New("device already running")

// Config describes one device.
type Config struct {
	ID, Model string
	// Version, Image and Counter describe the firmware the device starts with, unless StateDir
	// holds a state already. Image nil means none (its sha256 is then ""); it is never
	// modified, so many devices may share one slice. Counter is the anti-rollback counter of
	// that firmware: offers must carry a higher one.
	Version string
	Image   []byte
	Counter uint64
	// PublicKey is the pinned release key: only manifests it signed are installed. Required.
	PublicKey ed25519.PublicKey
	// StateDir, when set, holds the device's flash in StateDir/ID: state.json and the image
	// slots slot-a.bin and slot-b.bin, and while a job runs job.json and download.bin. A
	// device created on an existing state resumes from it, its download included. Empty
	// keeps everything in memory.
	StateDir string
	// SyncEvery is how many bytes a device with a StateDir receives between two checkpoints
	// of its download (data synced, then job.json rewritten); zero means DefaultSyncEvery.
	SyncEvery int
	// MaxChunk is the largest chunk the device takes, in bytes, within
	// [protocol.MinChunkSize, protocol.MaxChunkSize]. It is announced in every Status, and the
	// device never asks for more, whatever an offer allows. Zero: what the server offers.
	MaxChunk int

	Broker string      // host:port
	TLS    *tls.Config // client configuration with the device certificate
	Logger *slog.Logger
	// RequestTimeout is how long to wait for a chunk before asking again; it doubles with
	// each attempt. Zero means DefaultRequestTimeout.
	RequestTimeout time.Duration

	// Faults, to rehearse a rollout on a bad network; the zero value of each disables it.
	// Rates are probabilities in [0, 1], drawn from a generator seeded with Seed and the
	// device id, so that a run can be repeated.
	DropRate    float64 // a received chunk frame is dropped; the device asks again after its timeout
	CorruptRate float64 // one byte of a received frame's payload is flipped before the CRC check
	// DisconnectEvery cuts the connection, without a DISCONNECT, after every this many chunk
	// frames received. It counts frames rather than time, so that a run is repeatable and
	// each cut lands in the middle of a transfer.
	DisconnectEvery int
	// PowerLossRate is the probability, per chunk frame received during a download, that
	// the device loses power: the connection is cut, nothing more reaches its flash, and what
	// it held only in memory is gone. It then boots from StateDir, resuming its job from the last
	// checkpoint; without a StateDir its firmware survives (the simulated flash is memory)
	// but its download does not, and the job starts over when the server offers it again.
	PowerLossRate float64
	// FailInstallRate is the probability that an install fails after verification: the job
	// fails with reason install, and the installed image, version and counter stay.
	FailInstallRate float64
	// Rate caps the bytes per second the device asks for (a token bucket on its chunk
	// requests, holding one chunk); 0 means no cap.
	Rate int
	// Seed seeds the faults' generator, with the device id; 0 picks a random seed.
	Seed uint64

	// notify, when set, receives a token (without blocking) on each job state change; the
	// fleet runner uses it instead of polling.
	notify chan<- struct{}
	// images, when set, is shared by a fleet's devices so that identical images are held
	// once.
	images *imageCache
}

// Stats counts what a device did since New.
type Stats struct {
	Sessions       int64 // connections that reached the broker and reported status
	Requests       int64 // chunk requests sent
	RequestedBytes int64 // bytes those requests asked for
	Frames         int64 // chunk frames received, before any fault
	Dropped        int64 // frames the drop fault discarded
	Corrupted      int64 // frames the corrupt fault damaged
	Disconnects    int64 // connections the disconnect fault cut
	PowerLosses    int64
	FailedInstalls int64 // installs the fail-install fault failed
	Checkpoints    int64 // job records written to the state directory
}

// counters are Stats, written by the Run goroutine and read by anyone.
type counters struct {
	sessions, requests, requestedBytes, frames, dropped, corrupted atomic.Int64
	disconnects, powerLosses, failedInstalls, checkpoints          atomic.Int64
}

// Result is a snapshot of a device's latest job.
type Result struct {
	ID, From, To string
	Bytes        int64         // bytes downloaded for the job: the image, or the patch for a delta
	Requested    int64         // bytes asked for in the job, asked again included, since the device booted
	Delta        bool          // the job's transfer is a delta patch
	Duration     time.Duration // from the offer to installed (or failed); so far while running
	State        string        // a protocol State constant; StateIdle before any job
	Reason       string        // why, when State is StateFailed
}

// job is the device's view of one offer.
type job struct {
	id        string
	offer     protocol.Offer
	from      string
	state     string
	reason    string
	seq       uint64
	seqSaved  uint64 // the job's persisted record reserved the sequence numbers below this
	saved     string // state of the job's persisted record
	restored  bool   // read back from the state directory; its offer is checked again
	bytes     int64
	requested int64
	accepted  time.Time
	took      time.Duration // set when the job ends
	dl        *download     // while downloading
	progress  time.Time     // last progress event
	reported  bool          // installed event sent
}

func (j *job) active() bool {
	switch j.state {
	case protocol.StateDownloading, protocol.StateVerifying, protocol.StateInstalling:
		return true
	}
	return false
}

// Device is one simulated device. Run drives it; Version and Result may be called from any
// goroutine.
type Device struct {
	cfg     Config
	log     *slog.Logger
	running atomic.Bool

	dir   string // the device's state directory; "" in memory
	stats counters

	// Owned by the goroutine in Run.
	flash  *slots
	job    *job
	seqs   map[string]uint64 // last event Seq of recent jobs, so a job offered again continues its sequence
	reboot bool              // installed; the session must end and the device come back up
	rng    *rand.Rand        // of the faults
	frames int64             // chunk frames received, for DisconnectEvery
	bucket bucket            // of Rate

	mu     sync.Mutex
	state  State
	result Result
	since  time.Time // when the running job was accepted; zero when none runs
}

// New checks cfg and returns a device that is not yet connected.
func New(cfg Config) (*Device, error) {
	if err := protocol.ValidDeviceID(cfg.ID); err != nil {
		return nil, fmt.Errorf("new device: %w", err)
	}
	if cfg.Model == "" {
		return nil, fmt.Errorf("new device %s: no model", cfg.ID)
	}
	if _, err := protocol.ParseVersion(cfg.Version); err != nil {
		return nil, fmt.Errorf("new device %s: %w", cfg.ID, err)
	}
	if _, _, err := net.SplitHostPort(cfg.Broker); err != nil {
		return nil, fmt.Errorf("new device %s: broker: %w", cfg.ID, err)
	}
	if cfg.TLS == nil {
		return nil, fmt.Errorf("new device %s: no TLS configuration", cfg.ID)
	}
	if cfg.TLS.ClientSessionCache == nil {
		// A device reconnects after every install and every lost link: resuming its TLS
		// session spares both sides a full handshake (the server still checks revocation).
		cfg.TLS = cfg.TLS.Clone()
		cfg.TLS.ClientSessionCache = tls.NewLRUClientSessionCache(1)
	}
	// Without a pinned key a device would have nothing to check a manifest against.
	if len(cfg.PublicKey) != ed25519.PublicKeySize {
		return nil, fmt.Errorf("new device %s: public key is %d bytes, want an ed25519 key of %d", cfg.ID, len(cfg.PublicKey), ed25519.PublicKeySize)
	}
	if len(cfg.Image) > MaxImageSize {
		return nil, fmt.Errorf("new device %s: image is %d bytes, at most %d", cfg.ID, len(cfg.Image), MaxImageSize)
	}
	if err := checkFaults(cfg); err != nil {
		return nil, fmt.Errorf("new device %s: %w", cfg.ID, err)
	}
	if cfg.MaxChunk != 0 && (cfg.MaxChunk < protocol.MinChunkSize || cfg.MaxChunk > protocol.MaxChunkSize) {
		return nil, fmt.Errorf("new device %s: max chunk %d outside [%d, %d]", cfg.ID, cfg.MaxChunk, protocol.MinChunkSize, protocol.MaxChunkSize)
	}
	if cfg.SyncEvery < 0 {
		return nil, fmt.Errorf("new device %s: sync every %d bytes", cfg.ID, cfg.SyncEvery)
	}
	if cfg.SyncEvery == 0 {
		cfg.SyncEvery = DefaultSyncEvery
	}
	if cfg.RequestTimeout <= 0 {
		cfg.RequestTimeout = DefaultRequestTimeout
	}
	if cfg.Logger == nil {
		cfg.Logger = slog.New(slog.DiscardHandler)
	}
	dir := ""
	if cfg.StateDir != "" {
		var err error
		if dir, err = stateDirFor(cfg.StateDir, cfg.ID); err != nil {
			return nil, fmt.Errorf("new device: %w", err)
		}
	}
	d := &Device{
		cfg:    cfg,
		log:    cfg.Logger.With("component", "devicesim", "device", cfg.ID),
		dir:    dir,
		rng:    newRand(cfg.Seed, cfg.ID),
		bucket: bucket{rate: float64(cfg.Rate)},
	}
	if err := d.boot(); err != nil {
		return nil, fmt.Errorf("new device %s: %w", cfg.ID, err)
	}
	return d, nil
}

// boot reads the device's flash: the installed slot, and the latest job with its download as
// of its last checkpoint. Without a state directory the flash is memory: a device booting
// again keeps its slots, and loses its job and download.
func (d *Device) boot() error {
	if d.flash == nil || d.dir != "" {
		st := State{Model: d.cfg.Model, Version: d.cfg.Version, Counter: d.cfg.Counter}
		flash, err := openSlots(d.dir, st, d.cfg.Image, d.cfg.images)
		if err != nil {
			return err
		}
		d.flash = flash
	}
	if d.seqs == nil || d.dir != "" {
		d.seqs = map[string]uint64{}
	}
	if j := d.job; j != nil && j.dl != nil {
		j.dl.data.Close() // unsynced writes do not count: the record says what does
	}
	d.job = nil
	j, err := d.loadJob()
	if err != nil {
		// A record the device cannot read must not keep it from booting: the server offers
		// the job again, and only its event sequence is lost.
		d.log.Warn("job record dropped", "err", err)
		os.Remove(filepath.Join(d.dir, jobFile))
		j = nil
	}
	if j != nil {
		j.restored, j.saved, j.accepted = true, j.state, time.Now()
		d.job = j
		d.seqs[j.id] = j.seq
		d.log.Info("job resumed", "job", j.id, "state", j.state, "bytes", j.bytes)
	}
	if d.dir != "" {
		st := d.flash.state
		d.log.Debug("state", "dir", d.dir, "slot", st.Slot(), "version", st.Version, "counter", st.Counter)
	}
	d.update(time.Now())
	return nil
}

// Version returns the installed firmware version.
func (d *Device) Version() string {
	d.mu.Lock()
	defer d.mu.Unlock()
	return d.state.Version
}

// State returns what the device has installed: active slot, version, counter and image hash.
func (d *Device) State() State {
	d.mu.Lock()
	defer d.mu.Unlock()
	return d.state
}

// Stats returns what the device did since New.
func (d *Device) Stats() Stats {
	c := &d.stats
	return Stats{
		Sessions: c.sessions.Load(), Requests: c.requests.Load(), RequestedBytes: c.requestedBytes.Load(),
		Frames: c.frames.Load(), Dropped: c.dropped.Load(), Corrupted: c.corrupted.Load(),
		Disconnects: c.disconnects.Load(), PowerLosses: c.powerLosses.Load(),
		FailedInstalls: c.failedInstalls.Load(), Checkpoints: c.checkpoints.Load(),
	}
}

// Result returns a snapshot of the latest job.
func (d *Device) Result() Result {
	d.mu.Lock()
	defer d.mu.Unlock()
	r := d.result
	if !d.since.IsZero() {
		r.Duration = time.Since(d.since)
	}
	return r
}

// snapshot returns version and result together, for the fleet's completion check.
func (d *Device) snapshot() (string, Result) {
	d.mu.Lock()
	defer d.mu.Unlock()
	return d.state.Version, d.result
}

// update publishes the job state to Version, Result and the fleet.
func (d *Device) update(now time.Time) {
	st := d.flash.state
	r := Result{ID: d.cfg.ID, From: st.Version, State: protocol.StateIdle}
	var since time.Time
	if j := d.job; j != nil {
		r.From, r.To, r.Delta = j.from, j.offer.Manifest.Version, j.offer.Manifest.Delta != nil
		r.Bytes, r.State, r.Reason, r.Duration = j.bytes, j.state, j.reason, j.took
		r.Requested = j.requested
		if j.active() {
			since = j.accepted
		}
	}
	d.mu.Lock()
	d.state, d.result, d.since = st, r, since
	d.mu.Unlock()
	if d.cfg.notify != nil {
		select {
		case d.cfg.notify <- struct{}{}:
		default:
		}
	}
}

// Run connects the device and serves offers until ctx is done, then disconnects and returns
// nil. Lost connections are re-established with exponential backoff and jitter; an install
// ends with a clean disconnect and an immediate reconnect (the "reboot"). It returns an error
// only when the device cannot boot again after a simulated power loss.
func (d *Device) Run(ctx context.Context) error {
	if !d.running.CompareAndSwap(false, true) {
		return ErrRunning
	}
	defer d.running.Store(false)
	var bo backoff
	for ctx.Err() == nil {
		start := time.Now()
		s, err := d.connect(ctx)
		if err == nil {
			err = d.serve(ctx, s)
			if errors.Is(err, errPowerLoss) || errors.Is(err, errCut) {
				s.abort()
			} else {
				s.close()
			}
			if !errors.Is(err, errPowerLoss) {
				d.checkpoint()
			}
		}
		switch {
		case errors.Is(err, errPowerLoss):
			d.log.Info("power lost; booting again")
			if err := d.boot(); err != nil {
				return fmt.Errorf("boot after power loss: %w", err)
			}
			bo = backoff{}
			continue
		case d.reboot && ctx.Err() == nil:
			d.log.Info("rebooting", "version", d.flash.state.Version)
			bo = backoff{}
			continue
		}
		if ctx.Err() != nil {
			break
		}
		// A session that lasted, or in which the transfer moved, shows the broker is fine:
		// the next loss starts the backoff again from its shortest wait.
		if time.Since(start) > stableSession || (s != nil && s.progressed) {
			bo = backoff{}
		}
		wait := bo.next()
		level := slog.LevelWarn
		if errors.Is(err, errCut) {
			level = slog.LevelInfo // asked for: not worth a warning in a run of thousands
		}
		d.log.Log(ctx, level, "disconnected", "err", err, "retry_in", wait.Round(time.Millisecond))
		t := time.NewTimer(wait)
		select {
		case <-ctx.Done():
			t.Stop()
		case <-t.C:
		}
	}
	if j := d.job; j != nil && j.dl != nil {
		j.dl.data.Close() // checkpointed above; opened again if Run is
	}
	return nil
}

// checkpoint persists the download's progress when the session ends, so that a restart
// resumes where this session stopped.
func (d *Device) checkpoint() {
	if j := d.job; d.dir != "" && j != nil && j.dl != nil && j.dl.unsynced > 0 {
		if err := d.saveJob(j); err != nil {
			d.log.Warn("checkpoint", "err", err)
		}
	}
}

// backoff yields exponentially growing delays with "equal jitter": half fixed, half random,
// so a fleet that lost its broker at once does not come back at once.
type backoff struct{ cur time.Duration }

func (b *backoff) next() time.Duration {
	b.cur = min(max(2*b.cur, minBackoff), maxBackoff)
	return b.cur/2 + rand.N(b.cur/2+1)
}

// session is one MQTT connection. Paho's callbacks only hand payloads over to the Run
// goroutine, which owns all device state.
type session struct {
	client mqtt.Client
	conn   atomic.Pointer[tls.Conn]
	lost   chan error
	jobs   chan []byte
	chunks chan []byte
	done   chan struct{}
	last   mqtt.Token // of the latest event
	// progressed is set once a chunk of the transfer arrived in this session.
	progressed bool
}

func (s *session) close() {
	close(s.done) // unblocks a callback waiting to hand over an offer
	s.client.Disconnect(quiesce)
}

// abort ends the session the way a cable pull or a power loss does: the TCP connection
// closes under the client, with neither a DISCONNECT nor a TLS close_notify.
func (s *session) abort() {
	if c := s.conn.Load(); c != nil {
		c.NetConn().Close()
	}
	s.close()
}

func (d *Device) connect(ctx context.Context) (*session, error) {
	s := &session{
		lost:   make(chan error, 1),
		jobs:   make(chan []byte, 8),
		chunks: make(chan []byte, maxWindow), // a window's answers; more are strays
		done:   make(chan struct{}),
	}
	opts := mqtt.NewClientOptions().
		AddBroker("tls://" + d.cfg.Broker).
		SetClientID(d.cfg.ID).
		SetProtocolVersion(4).
		SetCleanSession(true).
		SetAutoReconnect(false).
		SetConnectRetry(false).
		SetKeepAlive(keepAlive).
		SetConnectTimeout(connectTimeout).
		SetWriteTimeout(writeTimeout).
		SetTLSConfig(d.cfg.TLS).
		SetConnectionLostHandler(func(_ mqtt.Client, err error) {
			select {
			case s.lost <- err:
			default:
			}
		}).
		// Dial with ctx so that cancelling Run does not wait out a dead broker's timeout.
		SetCustomOpenConnectionFn(func(u *url.URL, _ mqtt.ClientOptions) (net.Conn, error) {
			dl := &tls.Dialer{NetDialer: &net.Dialer{Timeout: connectTimeout}, Config: d.cfg.TLS}
			c, err := dl.DialContext(ctx, "tcp", u.Host)
			if err != nil {
				return nil, err
			}
			s.conn.Store(c.(*tls.Conn))
			return c, nil
		})
	s.client = mqtt.NewClient(opts)
	if err := wait(ctx, s.client.Connect(), connectTimeout+time.Second); err != nil {
		s.close()
		return nil, fmt.Errorf("connect %s: %w", d.cfg.Broker, err)
	}

	jobTopic := protocol.Topic(d.cfg.ID, protocol.SuffixJob)
	chunkTopic := protocol.Topic(d.cfg.ID, protocol.SuffixChunk)
	tok := s.client.SubscribeMultiple(map[string]byte{jobTopic: 1, chunkTopic: 0}, func(_ mqtt.Client, m mqtt.Message) {
		switch m.Topic() {
		case jobTopic:
			select {
			case s.jobs <- m.Payload():
			case <-s.done:
			}
		case chunkTopic:
			// Never block paho on chunks: a dropped frame is asked for again.
			select {
			case s.chunks <- m.Payload():
			default:
			}
		}
	})
	if err := wait(ctx, tok, ackTimeout); err != nil {
		s.close()
		return nil, fmt.Errorf("subscribe: %w", err)
	}
	for topic, code := range tok.(*mqtt.SubscribeToken).Result() {
		if code > 2 {
			s.close()
			return nil, fmt.Errorf("subscribe %s: refused (code %#x)", topic, code)
		}
	}
	return s, nil
}

// wait waits for a paho token, ctx or timeout.
func wait(ctx context.Context, t mqtt.Token, timeout time.Duration) error {
	timer := time.NewTimer(timeout)
	defer timer.Stop()
	select {
	case <-t.Done():
		return t.Error()
	case <-ctx.Done():
		return ctx.Err()
	case <-timer.C:
		return errors.New("timed out")
	}
}

// serve runs one session: it reports status, then handles offers, chunks and request
// timeouts until the connection is lost, ctx is done, a fault ends it, or an install asks
// for a reboot.
func (d *Device) serve(ctx context.Context, s *session) error {
	now := time.Now()
	d.reboot = false
	if j := d.job; j != nil && j.state == protocol.StateInstalling && !j.restored {
		// Back up after the reboot into the new image.
		j.state, j.took = protocol.StateInstalled, now.Sub(j.accepted)
		d.update(now)
		d.log.Info("installed", "job", j.id, "version", d.flash.state.Version, "took", j.took.Round(time.Millisecond))
	}
	if err := d.sendStatus(ctx, s); err != nil {
		return err
	}
	d.stats.sessions.Add(1)
	if j := d.job; j != nil {
		switch {
		case j.state == protocol.StateInstalled && !j.reported:
			j.reported = true
			d.emit(s, j, protocol.Event{State: protocol.StateInstalled, Version: d.flash.state.Version})
		case j.state == protocol.StateDownloading:
			d.resume(s, j, now)
		case j.state == protocol.StateInstalling: // restored, cut off before the slot switch
			j.restored = false
			d.reinstall(s, j, now)
		}
	}

	tick := min(max(d.cfg.RequestTimeout/4, 10*time.Millisecond), 250*time.Millisecond)
	if d.cfg.Rate > 0 {
		tick = min(tick, 50*time.Millisecond) // requests wait for tokens, not for answers
	}
	ticker := time.NewTicker(tick)
	defer ticker.Stop()
	for !d.reboot {
		select {
		case <-ctx.Done():
			// A fleet stops as soon as its devices' own states say they are done; the event
			// that told the server (a failure, say) may still be queued behind that.
			d.flushEvents(context.Background(), s)
			return ctx.Err()
		case err := <-s.lost:
			return fmt.Errorf("connection lost: %w", err)
		case p := <-s.jobs:
			d.onOffer(s, p, time.Now())
		case p := <-s.chunks:
			if err := d.onFrame(s, p, time.Now()); err != nil {
				return err
			}
		case now := <-ticker.C:
			d.onTick(s, now)
		}
	}
	d.flushEvents(ctx, s)
	return nil
}

// flushEvents waits for the latest event's acknowledgement. Paho may write DISCONNECT ahead
// of queued publishes; the last event before a reboot (installing) or a shutdown must not be
// lost that way.
func (d *Device) flushEvents(ctx context.Context, s *session) {
	if s.last != nil {
		if err := wait(ctx, s.last, ackTimeout); err != nil {
			d.log.Warn("last event not acknowledged", "err", err)
		}
	}
}

// resume carries on with the download of j in a new session: the requests of the last one
// cannot be answered any more, so they are asked again at once.
func (d *Device) resume(s *session, j *job, now time.Time) {
	if j.restored {
		// Read back from flash after a restart: the manifest is checked again (it may have
		// expired meanwhile).
		j.restored = false
		if err := checkOffer(j.offer, d.cfg.PublicKey, d.deviceState(), now); err != nil {
			d.fail(s, j, clip(err.Error()), now)
			return
		}
	}
	if j.dl.complete() {
		d.finish(s, j, now)
		return
	}
	j.dl.reset()
	d.pump(s, j, now)
}

func (d *Device) sendStatus(ctx context.Context, s *session) error {
	st := protocol.Status{
		V:        protocol.ProtocolVersion,
		Model:    d.cfg.Model,
		Version:  d.flash.state.Version,
		SHA256:   d.flash.state.SHA256,
		State:    protocol.StateIdle,
		MaxChunk: d.cfg.MaxChunk,
		Counter:  d.flash.state.Counter,
	}
	if j := d.job; j != nil {
		st.State, st.Job = j.state, j.id
	}
	b, err := jsonMarshal(st)
	if err != nil {
		return err
	}
	if err := wait(ctx, s.client.Publish(protocol.Topic(d.cfg.ID, protocol.SuffixStatus), 1, false, b), ackTimeout); err != nil {
		return fmt.Errorf("publish status: %w", err)
	}
	return nil
}
