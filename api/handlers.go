package api

import (
	"cmp"
	"encoding/base64"
	"encoding/json"
	"errors"
	"fmt"
	"io"
	"mime"
	"mime/multipart"
	"net/http"
	"strconv"
	"strings"
	"time"

	"github.com/fota-dev/fota/certs"
	"github.com/fota-dev/fota/controller"
	"github.com/fota-dev/fota/firmware"
	"github.com/fota-dev/fota/firmware/delta"
	"github.com/fota-dev/fota/protocol"
)

// API paths, shared by the server's routes and the client.
const (
	pathHealth   = "/api/v1/health"
	pathFirmware = "/api/v1/firmware"
	pathRollouts = "/api/v1/rollouts"
	pathDevices  = "/api/v1/devices"
	pathStats    = "/api/v1/stats"
	pathOpenAPI  = "/api/openapi.json"
)

// headerManifest carries the base64 of the JSON of a manifest signed offline, with an upload.
const headerManifest = "Fota-Manifest"

// maxManifest bounds the decoded manifest JSON; a real one is about 500 bytes.
const maxManifest = 8 << 10

// errorBody is the JSON body of every error response.
type errorBody struct {
	Error string `json:"error"`
}

// statusError is an error with the HTTP status and the message the client should see.
type statusError struct {
	status int
	msg    string
}

func (e *statusError) Error() string { return e.msg }

func errStatus(status int, format string, args ...any) error {
	return &statusError{status: status, msg: fmt.Sprintf(format, args...)}
}

// handlerFunc handles one request; a returned error has not been written yet and becomes the
// JSON error response.
type handlerFunc func(w http.ResponseWriter, r *http.Request) error

// route is one endpoint of the API.
type route struct {
	method, path string
	h            handlerFunc
}

// routeList is every endpoint; the OpenAPI document describes each (a test checks).
func (s *Server) routeList() []route {
	return []route{
		{http.MethodGet, pathHealth, s.health},
		{http.MethodGet, pathStats, s.stats},
		{http.MethodGet, pathOpenAPI, s.openAPI},
		{http.MethodPost, pathFirmware, s.addFirmware},
		{http.MethodGet, pathFirmware, s.listFirmware},
		{http.MethodDelete, pathFirmware + "/{model}/{version}", s.deleteFirmware},
		{http.MethodPost, pathDeltas, s.addDelta},
		{http.MethodGet, pathDeltas, s.listDeltas},
		{http.MethodPost, pathRollouts, s.createRollout},
		{http.MethodGet, pathRollouts, s.listRollouts},
		{http.MethodGet, pathRollouts + "/{id}", s.getRollout},
		{http.MethodGet, pathRollouts + "/{id}/jobs", s.rolloutJobs},
		{http.MethodGet, pathRollouts + "/{id}/events", s.rolloutEvents},
		{http.MethodPost, pathRollouts + "/{id}/pause", s.pauseRollout},
		{http.MethodPost, pathRollouts + "/{id}/resume", s.resumeRollout},
		{http.MethodPost, pathRollouts + "/{id}/cancel", s.cancelRollout},
		{http.MethodGet, pathDevices, s.listDevices},
		{http.MethodGet, pathDevices + "/{id}", s.getDevice},
		{http.MethodPost, pathDevices + "/{id}/tags", s.tagDevice},
	}
}

func (s *Server) routes() http.Handler {
	routes := s.routeList()
	mux := http.NewServeMux()
	var paths []string
	allowed := map[string][]string{}
	for _, rt := range routes {
		mux.Handle(rt.method+" "+rt.path, s.handle(rt.h))
		if allowed[rt.path] == nil {
			paths = append(paths, rt.path)
		}
		allowed[rt.path] = append(allowed[rt.path], rt.method)
	}
	// The mux's own 404 and 405 answers are plain text; every answer of ours is JSON.
	for _, p := range paths {
		allow := strings.Join(allowed[p], ", ")
		mux.Handle(p, s.handle(func(w http.ResponseWriter, r *http.Request) error {
			w.Header().Set("Allow", allow)
			return errStatus(http.StatusMethodNotAllowed, "method %s not allowed on %s; use %s", r.Method, r.URL.Path, allow)
		}))
	}
	mux.Handle("/", s.handle(func(w http.ResponseWriter, r *http.Request) error {
		return errStatus(http.StatusNotFound, "no such endpoint: %s", r.URL.Path)
	}))
	return s.requireAdmin(mux)
}

// requireAdmin refuses every client but an admin whose name is not revoked. The TLS layer has
// already verified that the certificate comes from our CA, but devices hold such certificates
// too; and it checked revocation only when the connection was made, which keep-alive can make
// long ago, so revocation is checked again on every request.
func (s *Server) requireAdmin(next http.Handler) http.Handler {
	return http.HandlerFunc(func(w http.ResponseWriter, r *http.Request) {
		var name string
		err := certs.ErrNotAdmin
		if r.TLS != nil && len(r.TLS.PeerCertificates) > 0 {
			name, err = certs.AdminName(r.TLS.PeerCertificates[0])
		}
		if err != nil {
			cn := ""
			if r.TLS != nil && len(r.TLS.PeerCertificates) > 0 {
				cn = r.TLS.PeerCertificates[0].Subject.CommonName
			}
			s.log.Warn("refused non-admin client", "remote", r.RemoteAddr, "cn", cn, "method", r.Method, "path", r.URL.Path)
			writeJSON(w, http.StatusForbidden, errorBody{"admin client certificate required"})
			return
		}
		if s.opts.Revoked != nil && s.opts.Revoked.AdminRevoked(name) {
			s.log.Warn("refused revoked admin", "remote", r.RemoteAddr, "admin", name, "method", r.Method, "path", r.URL.Path)
			// Close the connection after the answer: its next request would be refused too.
			w.Header().Set("Connection", "close")
			writeJSON(w, http.StatusForbidden, errorBody{fmt.Sprintf("admin certificate %q is revoked", name)})
			return
		}
		next.ServeHTTP(w, r)
	})
}

// handle adapts h to http.Handler, writing its error as JSON with a fitting status.
func (s *Server) handle(h handlerFunc) http.Handler {
	return http.HandlerFunc(func(w http.ResponseWriter, r *http.Request) {
		start := time.Now()
		err := h(w, r)
		if err == nil {
			s.log.Debug("request", "method", r.Method, "path", r.URL.Path, "dur", time.Since(start))
			return
		}
		status, msg := s.classify(err)
		switch {
		case r.Context().Err() != nil:
			// The client went away; nobody will read the answer.
			s.log.Info("request abandoned by client", "method", r.Method, "path", r.URL.Path, "err", err)
		case status >= 500:
			s.log.Error("request failed", "method", r.Method, "path", r.URL.Path, "status", status, "err", err)
		default:
			s.log.Debug("request refused", "method", r.Method, "path", r.URL.Path, "status", status, "err", err)
		}
		writeJSON(w, status, errorBody{msg})
	})
}

// classify maps an error to an HTTP status and the message the client sees. Errors of the
// documented kinds carry their own text; anything else may hold internals (paths, bbolt
// detail), so the client gets a generic message and the log gets the rest.
func (s *Server) classify(err error) (int, string) {
	var se *statusError
	var mbe *http.MaxBytesError
	switch {
	case errors.As(err, &se):
		return se.status, se.msg
	case errors.As(err, &mbe), errors.Is(err, firmware.ErrTooLarge):
		return http.StatusRequestEntityTooLarge, fmt.Sprintf("firmware image too large: the limit is %d bytes", s.opts.MaxUpload)
	case errors.Is(err, controller.ErrNotFound), errors.Is(err, firmware.ErrNotFound):
		return http.StatusNotFound, err.Error()
	case errors.Is(err, controller.ErrInvalid), errors.Is(err, protocol.ErrBadVersion),
		errors.Is(err, firmware.ErrBadModel), errors.Is(err, firmware.ErrEmpty),
		errors.Is(err, firmware.ErrUnsigned), errors.Is(err, firmware.ErrBadSignature),
		errors.Is(err, firmware.ErrBadManifest), errors.Is(err, firmware.ErrManifestMismatch),
		errors.Is(err, firmware.ErrExpired), errors.Is(err, delta.ErrBadPatch),
		errors.Is(err, firmware.ErrBadNotes):
		return http.StatusBadRequest, err.Error()
	case errors.Is(err, controller.ErrConflict), errors.Is(err, firmware.ErrConflict),
		errors.Is(err, firmware.ErrInUse), errors.Is(err, controller.ErrExpired):
		return http.StatusConflict, err.Error()
	case errors.Is(err, controller.ErrStateWrite):
		// The controller words it without the state file's path; the change was not kept.
		return http.StatusServiceUnavailable, err.Error()
	}
	return http.StatusInternalServerError, "internal server error; see the server log"
}

// writeJSON writes v with status. v is one of our own types, so encoding cannot fail in
// practice; if it does, the client gets a 500 rather than half a body.
func writeJSON(w http.ResponseWriter, status int, v any) {
	b, err := json.Marshal(v)
	if err != nil {
		status = http.StatusInternalServerError
		b = []byte(`{"error":"internal server error: cannot encode response"}`)
	}
	h := w.Header()
	h.Set("Content-Type", "application/json")
	h.Set("Cache-Control", "no-store")
	h.Set("X-Content-Type-Options", "nosniff")
	w.WriteHeader(status)
	_, _ = w.Write(append(b, '\n'))
}

// decodeJSON reads exactly one JSON object of at most maxJSONBody bytes into v.
func decodeJSON(w http.ResponseWriter, r *http.Request, v any) error {
	dec := json.NewDecoder(http.MaxBytesReader(w, r.Body, maxJSONBody))
	dec.DisallowUnknownFields()
	if err := dec.Decode(v); err != nil {
		var mbe *http.MaxBytesError
		if errors.As(err, &mbe) {
			return errStatus(http.StatusRequestEntityTooLarge, "request body larger than %d bytes", maxJSONBody)
		}
		return errStatus(http.StatusBadRequest, "bad request body: %v", err)
	}
	if _, err := dec.Token(); err != io.EOF {
		return errStatus(http.StatusBadRequest, "bad request body: want one JSON object")
	}
	return nil
}

func (s *Server) health(w http.ResponseWriter, r *http.Request) error {
	writeJSON(w, http.StatusOK, map[string]string{"status": "ok"})
	return nil
}

// stats returns the live counters: what an operator watches besides rollouts (devices
// connected, messages dropped, chunk requests answered busy, state commits).
func (s *Server) stats(w http.ResponseWriter, r *http.Request) error {
	if s.opts.Stats == nil {
		return errStatus(http.StatusNotFound, "this server keeps no counters")
	}
	h := w.Header()
	h.Set("Cache-Control", "no-store")
	writeJSON(w, http.StatusOK, s.opts.Stats())
	return nil
}

// addFirmware stores the request body as a firmware image, as the package comment describes.
// The body is streamed into the store, never held in memory, and cut off at MaxUpload.
func (s *Server) addFirmware(w http.ResponseWriter, r *http.Request) error {
	q := r.URL.Query()
	if q.Has("notes") {
		// The query and headers together are bounded far below what notes may hold.
		return errStatus(http.StatusBadRequest, "release notes go in the request body, not the query: send multipart/form-data with a %q field and then the %q file", partNotes, partImage)
	}
	req := firmware.AddRequest{Model: q.Get("model"), Version: q.Get("version")}
	// Check the cheap things before reading a possibly large body.
	if v := q.Get("counter"); v != "" {
		n, err := strconv.ParseUint(v, 10, 64)
		if err != nil || n == 0 {
			return errStatus(http.StatusBadRequest, "bad counter %q: want a positive integer", v)
		}
		req.Counter = n
	}
	if v := q.Get("expires"); v != "" {
		t, err := time.Parse(time.RFC3339, v)
		if err != nil {
			return errStatus(http.StatusBadRequest, "bad expires %q: want an RFC 3339 time, e.g. 2030-01-02T15:04:05Z", v)
		}
		req.Expires = t
	}
	if vs := r.Header.Values(headerManifest); len(vs) > 0 {
		m, err := decodeManifestHeader(vs)
		if err != nil {
			return err
		}
		req.Manifest = &m
		req.Model = cmp.Or(req.Model, m.Model)
		req.Version = cmp.Or(req.Version, m.Version)
	}
	if err := firmware.ValidModel(req.Model); err != nil {
		return err
	}
	if _, err := protocol.ParseVersion(req.Version); err != nil {
		return err
	}
	u, notes, err := s.firmwareBody(w, r)
	if err != nil {
		return err
	}
	req.Notes, req.Body = notes, u
	f, created, err := s.opts.Firmware.Add(r.Context(), req)
	if err != nil {
		return u.failed(err)
	}
	status := http.StatusOK
	if created {
		status = http.StatusCreated
	}
	writeJSON(w, status, f)
	return nil
}

// The parts of a multipart/form-data firmware upload, in this order.
const (
	partNotes = "notes" // optional: release notes, UTF-8, at most firmware.MaxNotesLen bytes
	partImage = "image" // the image, streamed into the store; the last part
	// multipartSlack bounds the boundaries and part headers around the notes and the image.
	multipartSlack = 8 << 10
)

// firmwareBody returns the image of a firmware upload and the release notes sent before it:
// the whole body when it is the raw image, or the parts of a multipart/form-data body. Notes
// that break the rules are refused before the image is read.
func (s *Server) firmwareBody(w http.ResponseWriter, r *http.Request) (*upload, string, error) {
	mt, params, err := mime.ParseMediaType(r.Header.Get("Content-Type"))
	if err != nil || mt != "multipart/form-data" {
		u, err := s.startUpload(w, r, "firmware image", 0)
		return u, "", err
	}
	body, err := s.startUpload(w, r, "firmware upload", firmware.MaxNotesLen+multipartSlack)
	if err != nil {
		return nil, "", err
	}
	mr := multipart.NewReader(body, params["boundary"])
	var notes string
	seenNotes := false
	for {
		p, err := mr.NextPart()
		if errors.Is(err, io.EOF) {
			return nil, "", errStatus(http.StatusBadRequest, "the multipart body has no %q part", partImage)
		}
		if err != nil {
			return nil, "", body.failed(errStatus(http.StatusBadRequest, "bad multipart body: %v", err))
		}
		switch name := p.FormName(); {
		case name == partNotes && !seenNotes:
			b, err := io.ReadAll(io.LimitReader(p, firmware.MaxNotesLen+1))
			if err != nil {
				return nil, "", body.failed(errStatus(http.StatusBadRequest, "read the %q part: %v", partNotes, err))
			}
			if len(b) > firmware.MaxNotesLen {
				return nil, "", fmt.Errorf("%w: over the limit of %d bytes (64 KiB)", firmware.ErrBadNotes, firmware.MaxNotesLen)
			}
			notes, seenNotes = string(b), true
			if err := firmware.ValidNotes(notes); err != nil {
				return nil, "", err
			}
		case name == partImage:
			image := &lastPart{Reader: p, mr: mr}
			u := &upload{limitReader: &limitReader{r: http.MaxBytesReader(w, image, s.opts.MaxUpload)}, what: "firmware image", limit: s.opts.MaxUpload}
			return u, notes, nil
		default:
			return nil, "", errStatus(http.StatusBadRequest, "unexpected part %q: a firmware upload has a %q field and then the %q file", name, partNotes, partImage)
		}
	}
}

// lastPart is the image part of a multipart upload, which ends the body: it reports the end
// of the image only once the body is seen to hold nothing after it, so that nothing sent is
// silently ignored.
type lastPart struct {
	io.Reader
	mr *multipart.Reader
}

func (l *lastPart) Read(b []byte) (int, error) {
	n, err := l.Reader.Read(b)
	if !errors.Is(err, io.EOF) {
		return n, err
	}
	switch _, next := l.mr.NextPart(); {
	case errors.Is(next, io.EOF):
		return n, io.EOF
	case next == nil:
		return n, errStatus(http.StatusBadRequest, "the %q part must be the last of the body", partImage)
	default:
		return n, errStatus(http.StatusBadRequest, "bad multipart body: %v", next)
	}
}

func (l *lastPart) Close() error { return nil }

// decodeManifestHeader decodes the one Fota-Manifest header. Its signature is the store's to
// check.
func decodeManifestHeader(vs []string) (protocol.Manifest, error) {
	var m protocol.Manifest
	if len(vs) != 1 {
		return m, errStatus(http.StatusBadRequest, "%d %s headers, want one", len(vs), headerManifest)
	}
	if base64.StdEncoding.DecodedLen(len(vs[0])) > maxManifest {
		return m, errStatus(http.StatusBadRequest, "%s header larger than %d bytes", headerManifest, maxManifest)
	}
	b, err := base64.StdEncoding.DecodeString(strings.TrimSpace(vs[0]))
	if err != nil {
		return m, errStatus(http.StatusBadRequest, "bad %s header: want the base64 of a manifest's JSON: %v", headerManifest, err)
	}
	dec := json.NewDecoder(strings.NewReader(string(b)))
	dec.DisallowUnknownFields()
	if err := dec.Decode(&m); err != nil {
		return m, errStatus(http.StatusBadRequest, "bad %s header: manifest JSON: %v", headerManifest, err)
	}
	if _, err := dec.Token(); err != io.EOF {
		return m, errStatus(http.StatusBadRequest, "bad %s header: want one JSON manifest", headerManifest)
	}
	return m, nil
}

// upload is the body of a request that streams a file (an image, a patch) into the store.
type upload struct {
	*limitReader
	what  string // "firmware image", for messages
	limit int64
}

// startUpload checks a streamed body's declared length against MaxUpload plus extra (room for
// what comes with the file) before any of it is read, gives the request the longer upload
// deadlines, and returns the body, limited to that. what names the body in messages.
func (s *Server) startUpload(w http.ResponseWriter, r *http.Request, what string, extra int64) (*upload, error) {
	limit := s.opts.MaxUpload + extra
	if r.ContentLength > limit {
		return nil, errStatus(http.StatusRequestEntityTooLarge, "%s too large: %d bytes, the limit is %d", what, r.ContentLength, limit)
	}
	if r.ContentLength == 0 {
		return nil, errStatus(http.StatusBadRequest, "%s is empty", what)
	}
	// The server-wide deadlines suit small requests; a file over a slow link needs longer.
	rc := http.NewResponseController(w)
	deadline := time.Now().Add(uploadTimeout)
	if err := rc.SetReadDeadline(deadline); err != nil {
		return nil, fmt.Errorf("extend read deadline: %w", err)
	}
	if err := rc.SetWriteDeadline(deadline); err != nil {
		return nil, fmt.Errorf("extend write deadline: %w", err)
	}
	return &upload{limitReader: &limitReader{r: http.MaxBytesReader(w, r.Body, limit)}, what: what, limit: limit}, nil
}

// failed is the error to answer when the store refused the upload with err: a body cut at
// the limit is too large, whatever the store wrapped the read error in.
func (u *upload) failed(err error) error {
	if u.over {
		return errStatus(http.StatusRequestEntityTooLarge, "%s too large: the limit is %d bytes", u.what, u.limit)
	}
	return err
}

// limitReader remembers whether the upload limit was hit.
type limitReader struct {
	r    io.Reader
	over bool
}

func (l *limitReader) Read(p []byte) (int, error) {
	n, err := l.r.Read(p)
	var mbe *http.MaxBytesError
	if err != nil && errors.As(err, &mbe) {
		l.over = true
	}
	return n, err
}

func (s *Server) listFirmware(w http.ResponseWriter, r *http.Request) error {
	list, err := s.opts.Firmware.List()
	if err != nil {
		return fmt.Errorf("list firmware: %w", err)
	}
	writeJSON(w, http.StatusOK, nonNil(list))
	return nil
}

// deleteFirmware removes one image, refusing while an unfinished rollout targets it: a device
// mid-download would otherwise ask for chunks of a file that is gone.
func (s *Server) deleteFirmware(w http.ResponseWriter, r *http.Request) error {
	model, version := r.PathValue("model"), r.PathValue("version")
	if err := firmware.ValidModel(model); err != nil {
		return err
	}
	pv, err := protocol.ParseVersion(version)
	if err != nil {
		return err
	}
	canon := pv.String()
	err = s.opts.Rollouts.WithoutNewRollouts(func() error {
		return s.opts.Firmware.Delete(model, canon, func(f firmware.Firmware) bool {
			return s.opts.Rollouts.InUse(f.Model, f.Version)
		})
	})
	switch {
	case errors.Is(err, firmware.ErrInUse):
		return errStatus(http.StatusConflict, "firmware %s %s is used by an unfinished rollout%s", model, canon, s.blockingRollout(model, canon))
	case errors.Is(err, firmware.ErrNotFound):
		// The store's text repeats the operation twice; the client knows what it asked.
		return errStatus(http.StatusNotFound, "firmware %s %s not found", model, canon)
	case err != nil:
		return err
	}
	s.log.Info("firmware deleted", "model", model, "version", canon, "remote", r.RemoteAddr)
	h := w.Header()
	h.Set("Cache-Control", "no-store")
	w.WriteHeader(http.StatusNoContent)
	return nil
}

// blockingRollout names the unfinished rollout of (model, version) and what the operator can
// do about it, for the refusal of a delete; "" if it cannot be found (it finished meanwhile,
// or listing failed: the refusal stands either way).
func (s *Server) blockingRollout(model, version string) string {
	list, err := s.opts.Rollouts.ListRollouts()
	if err != nil {
		s.log.Warn("list rollouts to explain a refused delete", "err", err)
		return ""
	}
	for _, ro := range list {
		if ro.Model != model || ro.Version != version || !unfinished(ro.State) {
			continue
		}
		if ro.State == controller.RolloutCanceling {
			return fmt.Sprintf(": rollout %s is %s; retry once it is %s", ro.ID, ro.State, controller.RolloutCanceled)
		}
		return fmt.Sprintf(": rollout %s is %s; cancel it first", ro.ID, ro.State)
	}
	return ""
}

// unfinished reports whether a rollout in state may still offer its firmware to a device.
func unfinished(state string) bool {
	// A completed rollout still offers its firmware to late devices: it holds it too.
	switch state {
	case controller.RolloutCanceled, controller.RolloutSuperseded:
		return false
	}
	return true
}

// nonNil makes an empty list encode as [] rather than null.
func nonNil[T any](s []T) []T {
	if s == nil {
		return []T{}
	}
	return s
}
