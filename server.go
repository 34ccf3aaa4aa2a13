package main

import (
	"context"
	"encoding/json"
	"errors"
	"fmt"
	"log/slog"
	"os"
	"path/filepath"
	"time"

	"github.com/fota-dev/fota/api"
	"github.com/fota-dev/fota/broker"
	"github.com/fota-dev/fota/certs"
	"github.com/fota-dev/fota/controller"
	"github.com/fota-dev/fota/firmware"
	"github.com/fota-dev/fota/protocol"
	"github.com/fota-dev/fota/transfer"
	bolt "go.etcd.io/bbolt"
)

// serverConfig is what `fota serve` and `fota demo` run.
type serverConfig struct {
	DataDir  string
	CertsDir string
	MQTTAddr string
	APIAddr  string
	Logger   *slog.Logger
	// DeviceRate caps the chunk bytes per second served to one device; 0: no cap.
	DeviceRate int64
	// UnreachableAfter: see controller.Options; 0 means its default.
	UnreachableAfter time.Duration
	// Limits on the MQTT listener's unauthenticated connections; zero values: the defaults.
	Limits connLimits
}

// connLimits are the broker's connection limits (see broker.Options): 0 default, -1 none.
type connLimits struct {
	MaxPending, MaxPendingPerSource, AcceptRate, AcceptRatePerSource int
}

// server is the broker, controller and admin API wired together over one state file.
type server struct {
	db        *bolt.DB
	store     *firmware.Store
	broker    *broker.Broker
	ctrl      *controller.Controller
	patcher   *firmware.Patcher
	chunks    *transfer.Server
	api       *api.Server
	stopWatch context.CancelFunc
	watchDone chan struct{}
	// releasePub is the release public key file, DATA/release.pub, that devices pin.
	releasePub string
}

// stateFile is the bbolt file in the data dir.
const stateFile = "fota.db"

// errDataDirInUse is returned when another process holds the state file.
var errDataDirInUse = errors.New("data dir is in use by another fota process")

// openState opens the state file, failing fast when another process holds its lock.
func openState(dataDir string) (*bolt.DB, error) {
	if err := os.MkdirAll(dataDir, 0o700); err != nil {
		return nil, fmt.Errorf("data dir: %w", err)
	}
	path := filepath.Join(dataDir, stateFile)
	db, err := bolt.Open(path, 0o600, &bolt.Options{Timeout: time.Second})
	if errors.Is(err, bolt.ErrTimeout) {
		return nil, fmt.Errorf("%w: %s is locked", errDataDirInUse, path)
	}
	if err != nil {
		return nil, fmt.Errorf("open state file %s: %w", path, err)
	}
	return db, nil
}

// startServer opens the state and starts every part. On error, what was started is stopped.
func startServer(cfg serverConfig) (_ *server, err error) {
	log := cfg.Logger
	s := &server{}
	defer func() {
		if err != nil {
			s.Close(context.Background())
		}
	}()
	// Certificates first: a wrong --certs must fail before the data dir, its state file or a
	// release key is created.
	revoked, err := certs.OpenRevocationList(cfg.CertsDir)
	if err != nil {
		return nil, fmt.Errorf("certs dir %s: %w", cfg.CertsDir, err)
	}
	// One configuration for both listeners: each clones it.
	serverTLS, err := certs.ServerTLS(cfg.CertsDir, revoked)
	if err != nil {
		return nil, fmt.Errorf("certs dir %s: %w (make one with 'fota certs init')", cfg.CertsDir, err)
	}
	if s.db, err = openState(cfg.DataDir); err != nil {
		return nil, err
	}
	// After openState: its lock keeps two servers from generating two keys in one data dir.
	keys, err := firmware.OpenKeys(cfg.DataDir)
	if err != nil {
		return nil, err
	}
	switch {
	case keys.Generated:
		log.Info("generated a release signing key; devices must pin its public key", "public_key", keys.PublicPath)
	case keys.Private == nil:
		log.Info("offline signing: no release.key, so firmware must be added with a manifest signed by the release key", "public_key", keys.PublicPath)
	}
	s.releasePub = keys.PublicPath
	s.store, err = firmware.Open(firmware.Options{
		Dir: filepath.Join(cfg.DataDir, "artifacts"), DB: s.db, Logger: log,
		SigningKey: keys.Private, PublicKey: keys.Public,
	})
	if err != nil {
		return nil, fmt.Errorf("firmware store: %w", err)
	}

	// The controller and the broker refer to each other: the broker delivers device
	// messages to the controller, the controller publishes through the broker.
	var ctrl *controller.Controller
	s.broker, err = broker.New(broker.Options{
		Addr: cfg.MQTTAddr, TLS: serverTLS, Logger: log,
		MaxPending: cfg.Limits.MaxPending, MaxPendingPerSource: cfg.Limits.MaxPendingPerSource,
		AcceptRate: cfg.Limits.AcceptRate, AcceptRatePerSource: cfg.Limits.AcceptRatePerSource,
		OnConnect:    func(id, model string) { ctrl.DeviceConnected(id, model) },
		OnDisconnect: func(id string) { ctrl.DeviceDisconnected(id) },
	})
	if err != nil {
		return nil, fmt.Errorf("broker: %w", err)
	}
	// Each delta patch has its own signed manifest. With the release key the Patcher makes
	// and signs them; offline it serves those signed offline and added with 'fota delta add'.
	s.patcher, err = firmware.NewPatcher(firmware.PatcherOptions{
		Store: s.store, DB: s.db, Logger: log,
		OnReady: func(base, target string) { ctrl.DeltaReady(base, target) },
	})
	if err != nil {
		return nil, err
	}
	ctrl, err = controller.New(controller.Options{
		DB: s.db, Publisher: s.broker, Firmware: firmwareSource{s.store}, Deltas: s.patcher, Logger: log,
		UnreachableAfter: cfg.UnreachableAfter, Revoked: revoked.Revoked,
	})
	if err != nil {
		return nil, err
	}
	s.ctrl = ctrl
	// Chunks are served in process, straight from the artifact store, for the transfer the
	// controller has offered each device.
	s.chunks, err = transfer.New(transfer.Options{
		Lookup: ctrl.Transfer, Artifacts: s.store, Sender: s.broker, Logger: log,
		DeviceRate: cfg.DeviceRate,
	})
	if err != nil {
		return nil, err
	}
	if err := s.broker.Subscribe(protocol.SuffixRequest, s.chunks.Handle); err != nil {
		return nil, fmt.Errorf("broker subscribe: %w", err)
	}
	for _, suffix := range []string{protocol.SuffixStatus, protocol.SuffixEvent} {
		if err := s.broker.Subscribe(suffix, func(device string, payload []byte) {
			ctrl.HandleMessage(device, suffix, payload)
		}); err != nil {
			return nil, fmt.Errorf("broker subscribe: %w", err)
		}
	}
	if err := ctrl.Start(); err != nil {
		return nil, err
	}
	if s.patcher != nil {
		s.patcher.Start()
	}
	if err := s.broker.Start(); err != nil {
		return nil, fmt.Errorf("broker: %w", err)
	}
	s.api, err = api.New(api.Options{
		Addr: cfg.APIAddr, TLS: serverTLS, Rollouts: ctrl, Firmware: s.store, Logger: log,
		Stats: s.stats, Revoked: revoked,
	})
	if err != nil {
		return nil, fmt.Errorf("admin api: %w", err)
	}
	if err := s.api.Start(); err != nil {
		return nil, fmt.Errorf("admin api: %w", err)
	}

	// A revoked device is refused at its next handshake by the TLS config; the watcher also
	// closes the connection it has open now. So for a revoked admin and the admin API.
	revoked.OnAdminRevoke(func(name string) {
		log.Info("admin revoked; its open API connections closed", "admin", name, "connections", s.api.CloseAdmin(name))
	})
	ctx, cancel := context.WithCancel(context.Background())
	s.stopWatch, s.watchDone = cancel, make(chan struct{})
	go func() {
		defer close(s.watchDone)
		revoked.Watch(ctx, time.Second, func(id string) {
			ctrl.DeviceRevoked(id) // its job ends at once: the rollout does not wait for it
			if s.broker.Disconnect(id) {
				log.Info("revoked device disconnected", "device", id)
			}
		})
	}()
	log.Info("fota serving", "mqtt", s.broker.Addr().String(), "api", "https://"+s.api.Addr().String(), "data", cfg.DataDir)
	return s, nil
}

// Close stops the API, the broker and the controller, then closes the state file. It returns
// the first error.
func (s *server) Close(ctx context.Context) error {
	var errs []error
	if s.stopWatch != nil {
		s.stopWatch()
		<-s.watchDone
	}
	if s.api != nil {
		errs = append(errs, s.api.Close(ctx))
	}
	if s.broker != nil {
		errs = append(errs, s.broker.Close(ctx))
	}
	if s.chunks != nil {
		errs = append(errs, s.chunks.Close(ctx))
	}
	if s.patcher != nil {
		errs = append(errs, s.patcher.Close(ctx))
	}
	if s.ctrl != nil {
		errs = append(errs, s.ctrl.Close(ctx))
	}
	if s.store != nil {
		errs = append(errs, s.store.Close())
	}
	if s.db != nil {
		errs = append(errs, s.db.Close())
	}
	for _, err := range errs {
		if err != nil {
			return err
		}
	}
	return nil
}

// firmwareSource gives the controller the manifests and artifacts of the store.
type firmwareSource struct{ *firmware.Store }

var _ controller.Firmware = firmwareSource{}

// stats returns the live counters of the broker, the chunk server and the controller, each
// as a flat object of numbers (a nested count, like the chunk server's error frames by code,
// becomes "ErrorFrames.busy").
func (s *server) stats() map[string]any {
	cs := s.ctrl.Stats()
	return map[string]any{
		"broker":   flatCounters(s.broker.Stats()),
		"transfer": flatCounters(s.chunks.Stats()),
		"controller": map[string]uint64{
			"BadMessages": cs.BadMessages.Load(), "StaleEvents": cs.StaleEvents.Load(),
			"Commits": cs.Commits.Load(), "Writes": cs.Writes.Load(), "FailedWrites": cs.FailedWrites.Load(),
			"FailedCommits": cs.FailedCommits.Load(), "Reloads": cs.Reloads.Load(),
			"ProtocolViolations": cs.ProtocolViolations.Load(), "DroppedLogEntries": cs.DroppedLogEntries.Load(),
		},
	}
}

// flatCounters turns a struct of counters into a flat map by field name.
func flatCounters(v any) map[string]float64 {
	out := make(map[string]float64)
	b, err := json.Marshal(v)
	if err != nil {
		return out
	}
	var m map[string]any
	if json.Unmarshal(b, &m) != nil {
		return out
	}
	var walk func(prefix string, m map[string]any)
	walk = func(prefix string, m map[string]any) {
		for k, v := range m {
			switch x := v.(type) {
			case float64:
				out[prefix+k] = x
			case map[string]any:
				walk(prefix+k+".", x)
			}
		}
	}
	walk("", m)
	return out
}

var _ transfer.Reacher = (*broker.Broker)(nil) // chunk requests of a gone device skip the artifact read

func (f firmwareSource) Manifest(model, version string) (protocol.Manifest, error) {
	fw, err := f.Get(model, version)
	if err != nil {
		return protocol.Manifest{}, err
	}
	return fw.Manifest(), nil
}
