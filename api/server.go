// Package api is fota's admin API: a small JSON-over-HTTPS server that `fota serve` runs for
// operators, and the Go client the CLI uses to talk to it. Every request must present an admin
// client certificate whose admin is not revoked; devices never talk to this API, they speak MQTT.
//
// Adding firmware is POST /api/v1/firmware with the raw image as the body
// (application/octet-stream), streamed into the store, and everything else in the query and
// one header, so that the server can refuse a request before the image is sent (the client
// asks with "Expect: 100-continue"). Release notes, which can outgrow any header limit, go in
// the body instead: a multipart/form-data body with a "notes" field (UTF-8, at most
// firmware.MaxNotesLen bytes, refused with 400 otherwise) and then the "image" file, which
// must be the last part. Notes in the query are refused.
//
//	model, version  the image's model and version; optional with a manifest, which names them
//	counter         security counter; default: the manifest's, or one above the model's highest
//	expires         RFC 3339 time after which devices refuse the manifest the server signs
//	Fota-Manifest   header: base64 (standard, padded) of the JSON protocol.Manifest signed
//	                offline by the release key ('fota firmware sign'); required when the server
//	                holds only the release public key, accepted whenever it is validly signed
//
// The answer is the stored record (firmware.Firmware, with the signature of its manifest):
// 201 when new, 200 when the same image was stored already. An unsigned upload to a server
// without the signing key, a manifest not signed by the release key, or one that does not
// describe the image, is refused with 400 and nothing is stored.
//
// Adding a delta patch signed offline ('fota delta sign') is POST /api/v1/deltas with the
// patch as the body and its signed delta manifest in the Fota-Manifest header; the manifest
// must repeat the stored target's exactly, apart from its delta: a delta manifest belongs to
// one release. GET /api/v1/deltas lists, per release, the patches the server offers and the
// bases it refused one.
//
// DELETE /api/v1/firmware/{model}/{version} removes a record and its artifact (204), unless an
// unfinished rollout targets it (409): cancel the rollout, or let it complete, first.
package api

import (
	"context"
	"crypto/tls"
	"errors"
	"fmt"
	"io"
	"log/slog"
	"net"
	"net/http"
	"sync"
	"time"

	"github.com/fota-dev/fota/certs"
	"github.com/fota-dev/fota/controller"
	"github.com/fota-dev/fota/firmware"
	"github.com/fota-dev/fota/protocol"
)

// Rollouts is what the API needs of the controller.
type Rollouts interface {
	CreateRollout(ctx context.Context, spec controller.RolloutSpec) (controller.Rollout, error)
	ListRollouts() ([]controller.Rollout, error)
	Rollout(id string) (controller.Rollout, error)
	Jobs(id string, q controller.JobQuery) ([]controller.Job, error)
	PauseRollout(id, reason string) (controller.Rollout, error)
	ResumeRollout(id string) (controller.Rollout, error)
	CancelRollout(id string) (controller.Rollout, error)
	Events(id string, after uint64, limit int) (controller.EventLog, error)
	ListDevices() ([]controller.Device, error)
	GetDevice(id string) (controller.Device, error)
	TagDevice(id string, tags map[string]string) (controller.Device, error)
	// InUse reports whether an unfinished rollout targets the firmware (model, version), whose
	// version is canonical; such firmware cannot be deleted.
	InUse(model, version string) bool
	// WithoutNewRollouts runs fn while no rollout is being created, so that a firmware delete
	// checking InUse cannot race a creation that already found the firmware.
	WithoutNewRollouts(fn func() error) error
}

var _ Rollouts = (*controller.Controller)(nil)

// FirmwareStore is what the API needs of the artifact store.
type FirmwareStore interface {
	Add(ctx context.Context, req firmware.AddRequest) (f firmware.Firmware, created bool, err error)
	List() ([]firmware.Firmware, error)
	// Delete removes the record and, unless another record shares it, the artifact; it fails
	// with firmware.ErrInUse if inUse returns true for the record, firmware.ErrNotFound if
	// there is none.
	Delete(model, version string, inUse func(firmware.Firmware) bool) error
	// AddDelta stores a delta patch whose manifest was signed offline.
	AddDelta(ctx context.Context, m protocol.Manifest, body io.Reader) (d firmware.Delta, created bool, err error)
	// Deltas lists every delta verdict.
	Deltas() ([]firmware.Delta, error)
}

var _ FirmwareStore = (*firmware.Store)(nil)

// Revocations is what the API needs of the revocation list.
type Revocations interface {
	// Revoked reports whether device id is revoked.
	Revoked(id string) bool
	// AdminRevoked reports whether the admin named name is revoked.
	AdminRevoked(name string) bool
}

var _ Revocations = (*certs.RevocationList)(nil)

// Defaults for Options.
const (
	DefaultAddr      = "127.0.0.1:8080"
	DefaultMaxUpload = 64 << 20
)

// Timeouts. Ordinary requests are small, so the connection-wide deadlines are short and keep
// slow or silent clients from holding connections; an upload extends its own deadlines.
const (
	readHeaderTimeout = 10 * time.Second
	readTimeout       = 30 * time.Second
	writeTimeout      = 30 * time.Second
	idleTimeout       = 2 * time.Minute
	uploadTimeout     = 15 * time.Minute
	maxHeaderBytes    = 64 << 10
	maxJSONBody       = 1 << 20
)

// Options configures a Server. Zero values mean the defaults documented on each field.
type Options struct {
	// Addr is the TCP address to listen on; default DefaultAddr (loopback only).
	Addr string
	// TLS is required and must have ClientAuth set to tls.RequireAndVerifyClientCert; the
	// server further requires the client certificate to be an admin's (certs.AdminName).
	TLS *tls.Config
	// Rollouts and Firmware are required.
	Rollouts Rollouts
	Firmware FirmwareStore
	// Logger defaults to slog.Default(); the server adds component=api.
	Logger *slog.Logger
	// MaxUpload is the largest firmware image accepted, in bytes; default DefaultMaxUpload.
	MaxUpload int64
	// Revoked, when set, is asked on every request whether the admin making it was revoked
	// (the TLS config refuses revoked certificates only on new connections, and keep-alive
	// connections outlive a revocation), and marks revoked devices in device answers.
	Revoked Revocations
	// Stats, when set, returns the server's live counters by part (broker, transfer,
	// controller), for GET /api/v1/stats; each part is a JSON object of numbers.
	Stats func() map[string]any
}

// Server is the admin API server. Start it, then Close it.
type Server struct {
	opts Options
	log  *slog.Logger
	http *http.Server

	mu      sync.Mutex
	ln      net.Listener
	done    chan struct{} // closed when the serve goroutine returns
	serveEr error
	closed  bool

	connMu sync.Mutex
	conns  map[net.Conn]string // open connection: the admin it serves ("" if none), see trackConn
}

// New checks opts and returns a server that is not listening yet.
func New(opts Options) (*Server, error) {
	if opts.TLS == nil {
		return nil, errors.New("api: TLS config is required")
	}
	if opts.TLS.ClientAuth != tls.RequireAndVerifyClientCert {
		// Anything weaker would let the handshake succeed without a verified certificate,
		// leaving the admin check as the only guard.
		return nil, errors.New("api: TLS config must require and verify client certificates")
	}
	if opts.Rollouts == nil {
		return nil, errors.New("api: Rollouts is required")
	}
	if opts.Firmware == nil {
		return nil, errors.New("api: Firmware is required")
	}
	if opts.Addr == "" {
		opts.Addr = DefaultAddr
	}
	if opts.MaxUpload <= 0 {
		opts.MaxUpload = DefaultMaxUpload
	}
	if opts.Logger == nil {
		opts.Logger = slog.Default()
	}
	log := opts.Logger.With("component", "api")

	tc := opts.TLS.Clone()
	// HTTP/2 is only wired up by ServeTLS; with our own listener we speak HTTP/1.1 and say so.
	tc.NextProtos = []string{"http/1.1"}
	if tc.MinVersion < tls.VersionTLS12 {
		tc.MinVersion = tls.VersionTLS12
	}
	opts.TLS = tc

	s := &Server{opts: opts, log: log, conns: make(map[net.Conn]string)}
	s.http = &http.Server{
		Handler:           s.routes(),
		ConnState:         s.trackConn,
		TLSConfig:         tc,
		ReadHeaderTimeout: readHeaderTimeout,
		ReadTimeout:       readTimeout,
		WriteTimeout:      writeTimeout,
		IdleTimeout:       idleTimeout,
		MaxHeaderBytes:    maxHeaderBytes,
		// TLS handshake failures (a missing or foreign certificate) land here.
		ErrorLog: slog.NewLogLogger(log.Handler(), slog.LevelDebug),
	}
	return s, nil
}

// Start binds the listen address and serves in the background. It returns once the listener is
// bound, so Addr is valid after it.
func (s *Server) Start() error {
	s.mu.Lock()
	defer s.mu.Unlock()
	if s.closed {
		return errors.New("api: server closed")
	}
	if s.ln != nil {
		return errors.New("api: server already started")
	}
	ln, err := net.Listen("tcp", s.opts.Addr)
	if err != nil {
		return fmt.Errorf("api: listen: %w", err)
	}
	s.ln = ln
	s.done = make(chan struct{})
	tln := tls.NewListener(ln, s.opts.TLS)
	go func() {
		defer close(s.done)
		err := s.http.Serve(tln)
		if err != nil && !errors.Is(err, http.ErrServerClosed) {
			s.log.Error("admin API stopped", "err", err)
			s.mu.Lock()
			s.serveEr = fmt.Errorf("api: serve: %w", err)
			s.mu.Unlock()
		}
	}()
	s.log.Info("admin API listening", "addr", ln.Addr().String())
	return nil
}

// trackConn records which admin each open connection serves, for CloseAdmin. A connection
// turns active only once its handshake is done and its first request arrives, so its
// certificate is known then.
func (s *Server) trackConn(c net.Conn, state http.ConnState) {
	switch state {
	case http.StateActive:
		s.connMu.Lock()
		_, known := s.conns[c]
		s.connMu.Unlock()
		if known {
			return
		}
		name := ""
		if tc, ok := c.(*tls.Conn); ok {
			if cs := tc.ConnectionState(); len(cs.PeerCertificates) > 0 {
				name, _ = certs.AdminName(cs.PeerCertificates[0])
			}
		}
		s.connMu.Lock()
		s.conns[c] = name
		s.connMu.Unlock()
	case http.StateClosed, http.StateHijacked:
		s.connMu.Lock()
		delete(s.conns, c)
		s.connMu.Unlock()
	}
}

// CloseAdmin closes every open connection of admin name, idle or in the middle of a request
// (an upload, say), and returns how many it closed. The server calls it when the admin is
// revoked; a connection whose first request is still on its way is refused by the check every
// request passes (Options.Revoked).
func (s *Server) CloseAdmin(name string) int {
	var victims []net.Conn
	s.connMu.Lock()
	for c, n := range s.conns {
		if n == name {
			victims = append(victims, c)
			delete(s.conns, c)
		}
	}
	s.connMu.Unlock()
	for _, c := range victims {
		c.Close()
	}
	return len(victims)
}

// Addr returns the bound address, or nil before Start.
func (s *Server) Addr() net.Addr {
	s.mu.Lock()
	defer s.mu.Unlock()
	if s.ln == nil {
		return nil
	}
	return s.ln.Addr()
}

// Close stops accepting connections and waits for requests in flight to finish, until ctx is
// done; then it cuts the remaining connections. It returns once the serve goroutine is gone.
func (s *Server) Close(ctx context.Context) error {
	s.mu.Lock()
	s.closed = true
	done := s.done
	s.mu.Unlock()

	err := s.http.Shutdown(ctx)
	if err != nil {
		// ctx ended with requests still running: cut them off. Close's own error would only
		// repeat that the listener is already closed.
		_ = s.http.Close()
		err = fmt.Errorf("api: shutdown: %w", err)
	}
	if done != nil {
		<-done
	}
	s.mu.Lock()
	defer s.mu.Unlock()
	if err == nil {
		err = s.serveEr
	}
	return err
}
