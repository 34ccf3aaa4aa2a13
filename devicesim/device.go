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
	// slots slot-a.bin and slot-b.bin. A device created on an existing state resumes from it.
	// Empty keeps everything in memory.
	StateDir string

	Broker string      // host:port
	TLS    *tls.Config // client configuration with the device certificate
	Logger *slog.Logger
	// RequestTimeout is how long to wait for a chunk before asking again; it doubles with
	// each attempt. Zero means DefaultRequestTimeout.
	RequestTimeout time.Duration

	// notify, when set, receives a token (without blocking) on each job state change; the
	// fleet runner uses it instead of polling.
	notify chan<- struct{}
}

// Result is a snapshot of a device's latest job.
type Result struct {
	ID, From, To string
	Bytes        int64         // bytes downloaded for the job: the image, or the patch for a delta
	Delta        bool          // the job's transfer is a delta patch
	Duration     time.Duration // from the offer to installed (or failed); so far while running
	State        string        // a protocol State constant; StateIdle before any job
	Reason       string        // why, when State is StateFailed
}

// job is the device's view of one offer.
type job struct {
	id       string
	offer    protocol.Offer
	from     string
	state    string
	reason   string
	seq      uint64
	bytes    int64
	accepted time.Time
	took     time.Duration // set when the job ends
	dl       *download     // while downloading
	progress time.Time     // last progress event
	reported bool          // installed event sent
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

	// Owned by the goroutine in Run.
	flash  *slots
	job    *job
	seqs   map[string]uint64 // last event Seq of recent jobs, so a job offered again continues its sequence
	reboot bool              // installed; the session must end and the device come back up

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
	// Without a pinned key a device would have nothing to check a manifest against.
	if len(cfg.PublicKey) != ed25519.PublicKeySize {
		return nil, fmt.Errorf("new device %s: public key is %d bytes, want an ed25519 key of %d", cfg.ID, len(cfg.PublicKey), ed25519.PublicKeySize)
	}
	if len(cfg.Image) > MaxImageSize {
		return nil, fmt.Errorf("new device %s: image is %d bytes, at most %d", cfg.ID, len(cfg.Image), MaxImageSize)
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
	flash, err := openSlots(dir, State{Model: cfg.Model, Version: cfg.Version, Counter: cfg.Counter}, cfg.Image)
	if err != nil {
		return nil, fmt.Errorf("new device %s: %w", cfg.ID, err)
	}
	d := &Device{
		cfg:   cfg,
		log:   cfg.Logger.With("component", "devicesim", "device", cfg.ID),
		flash: flash,
		seqs:  map[string]uint64{},
	}
	if dir != "" {
		st := flash.state
		d.log.Debug("state", "dir", dir, "slot", st.Slot(), "version", st.Version, "counter", st.Counter)
	}
	d.update(time.Now())
	return d, nil
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
// ends with a clean disconnect and an immediate reconnect (the "reboot").
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
			s.close()
		}
		if ctx.Err() != nil {
			break
		}
		if d.reboot {
			d.log.Info("rebooting", "version", d.flash.state.Version)
			bo = backoff{}
			continue
		}
		if time.Since(start) > stableSession {
			bo = backoff{}
		}
		wait := bo.next()
		d.log.Warn("disconnected", "err", err, "retry_in", wait.Round(time.Millisecond))
		t := time.NewTimer(wait)
		select {
		case <-ctx.Done():
			t.Stop()
		case <-t.C:
		}
	}
	return nil
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
	lost   chan error
	jobs   chan []byte
	chunks chan []byte
	done   chan struct{}
	last   mqtt.Token // of the latest event
}

func (s *session) close() {
	close(s.done) // unblocks a callback waiting to hand over an offer
	s.client.Disconnect(quiesce)
}

func (d *Device) connect(ctx context.Context) (*session, error) {
	s := &session{
		lost:   make(chan error, 1),
		jobs:   make(chan []byte, 8),
		chunks: make(chan []byte, 2*maxWindow),
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
			return dl.DialContext(ctx, "tcp", u.Host)
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
// timeouts until the connection is lost, ctx is done, or an install asks for a reboot.
func (d *Device) serve(ctx context.Context, s *session) error {
	now := time.Now()
	d.reboot = false
	if j := d.job; j != nil && j.state == protocol.StateInstalling {
		// Back up after the reboot into the new image.
		j.state, j.took = protocol.StateInstalled, now.Sub(j.accepted)
		d.update(now)
		d.log.Info("installed", "job", j.id, "version", d.flash.state.Version, "took", j.took.Round(time.Millisecond))
	}
	if err := d.sendStatus(ctx, s); err != nil {
		return err
	}
	if j := d.job; j != nil {
		switch {
		case j.state == protocol.StateInstalled && !j.reported:
			d.emit(s, j, protocol.Event{State: protocol.StateInstalled, Version: d.flash.state.Version})
			j.reported = true
		case j.state == protocol.StateDownloading:
			j.dl.reset()
			d.pump(s, j, now)
		}
	}

	tick := min(max(d.cfg.RequestTimeout/4, 10*time.Millisecond), 250*time.Millisecond)
	ticker := time.NewTicker(tick)
	defer ticker.Stop()
	for !d.reboot {
		select {
		case <-ctx.Done():
			return ctx.Err()
		case err := <-s.lost:
			return fmt.Errorf("connection lost: %w", err)
		case p := <-s.jobs:
			d.onOffer(s, p, time.Now())
		case p := <-s.chunks:
			d.onChunk(s, p, time.Now())
		case now := <-ticker.C:
			d.onTick(s, now)
		}
	}
	// Paho may write DISCONNECT ahead of queued publishes; the last event before the reboot
	// (installing) must not be lost that way.
	if s.last != nil {
		if err := wait(ctx, s.last, ackTimeout); err != nil {
			d.log.Warn("event before reboot not acknowledged", "err", err)
		}
	}
	return nil
}

func (d *Device) sendStatus(ctx context.Context, s *session) error {
	st := protocol.Status{
		V:       protocol.ProtocolVersion,
		Model:   d.cfg.Model,
		Version: d.flash.state.Version,
		SHA256:  d.flash.state.SHA256,
		State:   protocol.StateIdle,
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
