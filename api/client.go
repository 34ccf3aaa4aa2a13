package api

import (
	"bytes"
	"context"
	"crypto/tls"
	"encoding/base64"
	"encoding/json"
	"errors"
	"fmt"
	"io"
	"mime/multipart"
	"net"
	"net/http"
	"net/url"
	"os"
	"strconv"
	"strings"
	"syscall"
	"time"

	"github.com/fota-dev/fota/controller"
	"github.com/fota-dev/fota/firmware"
	"github.com/fota-dev/fota/protocol"
)

// Error is an error response from the server.
type Error struct {
	StatusCode int
	Message    string
}

func (e *Error) Error() string {
	return fmt.Sprintf("fota server: %s (%d)", e.Message, e.StatusCode)
}

// maxErrorBody bounds how much of an error response the client reads.
const maxErrorBody = 64 << 10

// Client talks to a fota admin API. It is safe for concurrent use.
type Client struct {
	base    string
	baseErr error
	tr      *http.Transport
	http    *http.Client
}

// NewClient returns a client for the server at baseURL (e.g. https://127.0.0.1:8080) that
// authenticates with tlsConf, which should hold the admin certificate and our CA. A bad
// baseURL is reported by the first call.
func NewClient(baseURL string, tlsConf *tls.Config) *Client {
	base := strings.TrimRight(baseURL, "/")
	var baseErr error
	if u, err := url.Parse(base); err != nil {
		baseErr = fmt.Errorf("bad fota server URL %q: %w", baseURL, err)
	} else if u.Scheme != "https" || u.Host == "" {
		baseErr = fmt.Errorf("bad fota server URL %q: want https://HOST:PORT", baseURL)
	}
	tr := &http.Transport{
		Proxy:               http.ProxyFromEnvironment,
		DialContext:         (&net.Dialer{Timeout: 10 * time.Second, KeepAlive: 30 * time.Second}).DialContext,
		TLSClientConfig:     tlsConf.Clone(),
		TLSHandshakeTimeout: 10 * time.Second,
		// Counted from the end of the request body, so it covers the server storing an image,
		// not the upload itself.
		ResponseHeaderTimeout: time.Minute,
		// Uploads ask first, so a refused image (too large, bad version) is not sent at all.
		ExpectContinueTimeout: time.Second,
		MaxIdleConns:          4,
		IdleConnTimeout:       time.Minute,
	}
	// No overall Client.Timeout: an upload may take long; callers bound calls with ctx.
	return &Client{base: base, baseErr: baseErr, tr: tr, http: &http.Client{Transport: tr}}
}

// Close releases idle connections.
func (c *Client) Close() { c.tr.CloseIdleConnections() }

// Health checks that the server answers and accepts our certificate.
func (c *Client) Health(ctx context.Context) error {
	var v map[string]string
	_, err := c.do(ctx, http.MethodGet, pathHealth, nil, nil, nil, -1, &v)
	return err
}

// Stats returns the server's live counters by part, each a map from counter to value.
func (c *Client) Stats(ctx context.Context) (map[string]map[string]float64, error) {
	var v map[string]map[string]float64
	_, err := c.do(ctx, http.MethodGet, pathStats, nil, nil, nil, -1, &v)
	return v, err
}

// AddFirmware uploads an image for the server to sign; see UploadFirmware.
func (c *Client) AddFirmware(ctx context.Context, model, version, notes string, body io.Reader) (firmware.Firmware, bool, error) {
	return c.UploadFirmware(ctx, FirmwareUpload{Model: model, Version: version, Notes: notes, Body: body})
}

// FirmwareUpload is one image to add.
type FirmwareUpload struct {
	// Model and Version may be empty with a Manifest, which names them.
	Model, Version, Notes string
	// Counter is the security counter; 0: the manifest's, or the server picks the next.
	Counter uint64
	// Expires is when devices stop accepting the manifest the server signs; zero: never.
	Expires time.Time
	// Manifest is signed offline by the release key; a server that holds only the public
	// key requires it.
	Manifest *protocol.Manifest
	Body     io.Reader
}

// UploadFirmware uploads an image, streaming its body. It returns the stored record and
// whether it is new (false when the same image was already stored under that version). If the
// body is a file, its size is sent up front so that an image over the server's limit, or a
// request the server refuses for its manifest, is refused before the image is sent. Notes
// go in the body, ahead of the image; notes the server would refuse (firmware.ValidNotes)
// are refused here, before anything is sent.
func (c *Client) UploadFirmware(ctx context.Context, u FirmwareUpload) (firmware.Firmware, bool, error) {
	if err := firmware.ValidNotes(u.Notes); err != nil {
		return firmware.Firmware{}, false, err
	}
	q := url.Values{}
	for k, v := range map[string]string{"model": u.Model, "version": u.Version} {
		if v != "" {
			q.Set(k, v)
		}
	}
	if u.Counter != 0 {
		q.Set("counter", strconv.FormatUint(u.Counter, 10))
	}
	if !u.Expires.IsZero() {
		q.Set("expires", u.Expires.UTC().Format(time.RFC3339))
	}
	var hdr http.Header
	if u.Manifest != nil {
		b, err := json.Marshal(u.Manifest)
		if err != nil {
			return firmware.Firmware{}, false, fmt.Errorf("encode manifest: %w", err)
		}
		hdr = http.Header{headerManifest: {base64.StdEncoding.EncodeToString(b)}}
	}
	body, size := u.Body, bodySize(u.Body)
	if u.Notes != "" {
		var ctype string
		body, size, ctype = withNotes(u.Notes, body, size)
		if hdr == nil {
			hdr = http.Header{}
		}
		hdr.Set("Content-Type", ctype)
	}
	var f firmware.Firmware
	status, err := c.do(ctx, http.MethodPost, pathFirmware, q, hdr, body, size, &f)
	if err != nil {
		return firmware.Firmware{}, false, err
	}
	return f, status == http.StatusCreated, nil
}

// withNotes wraps an image of size bytes (-1: unknown) in the multipart/form-data body that
// carries notes ahead of it, and returns the body, its size and its Content-Type. The image
// is streamed, not copied.
func withNotes(notes string, image io.Reader, size int64) (io.Reader, int64, string) {
	var head bytes.Buffer
	mw := multipart.NewWriter(&head)
	// Writes to a bytes.Buffer do not fail.
	_ = mw.WriteField(partNotes, notes)
	_, _ = mw.CreateFormFile(partImage, "image")
	tail := "\r\n--" + mw.Boundary() + "--\r\n" // what mw.Close would write
	if size >= 0 {
		size += int64(head.Len() + len(tail))
	}
	return io.MultiReader(&head, image, strings.NewReader(tail)), size, mw.FormDataContentType()
}

// UploadDelta adds a delta patch signed offline ('fota delta sign'): m is its signed delta
// manifest, body the patch. created is false when the server held this very delta already.
func (c *Client) UploadDelta(ctx context.Context, m protocol.Manifest, body io.Reader) (firmware.Delta, bool, error) {
	b, err := json.Marshal(m)
	if err != nil {
		return firmware.Delta{}, false, fmt.Errorf("encode manifest: %w", err)
	}
	hdr := http.Header{headerManifest: {base64.StdEncoding.EncodeToString(b)}}
	var d firmware.Delta
	status, err := c.do(ctx, http.MethodPost, pathDeltas, nil, hdr, body, bodySize(body), &d)
	if err != nil {
		return firmware.Delta{}, false, err
	}
	return d, status == http.StatusCreated, nil
}

// ListDeltas returns, per release, the delta patches the server offers and the bases it
// refused one.
func (c *Client) ListDeltas(ctx context.Context) ([]firmware.Delta, error) {
	var list []firmware.Delta
	_, err := c.do(ctx, http.MethodGet, pathDeltas, nil, nil, nil, -1, &list)
	return list, err
}

// bodySize returns the number of bytes left in r, or -1 if that is unknown.
func bodySize(r io.Reader) int64 {
	switch b := r.(type) {
	case interface{ Len() int }: // bytes.Reader, bytes.Buffer, strings.Reader
		return int64(b.Len())
	case *os.File:
		fi, err := b.Stat()
		if err != nil || !fi.Mode().IsRegular() {
			return -1
		}
		off, err := b.Seek(0, io.SeekCurrent)
		if err != nil || off > fi.Size() {
			return -1
		}
		return fi.Size() - off
	}
	return -1
}

// ListFirmware returns every stored image.
func (c *Client) ListFirmware(ctx context.Context) ([]firmware.Firmware, error) {
	var list []firmware.Firmware
	_, err := c.do(ctx, http.MethodGet, pathFirmware, nil, nil, nil, -1, &list)
	return list, err
}

// DeleteFirmware deletes a stored image: its record, and its artifact unless another record
// shares it. The server refuses (an *Error with status 409) while an unfinished rollout
// targets the image.
func (c *Client) DeleteFirmware(ctx context.Context, model, version string) error {
	if model == "" || version == "" {
		return errors.New("firmware model and version are required")
	}
	if model == "." || model == ".." {
		// Valid as a model name, but a URL path cannot carry it: it would be resolved away.
		return fmt.Errorf("firmware model %q cannot be deleted through the API", model)
	}
	_, err := c.do(ctx, http.MethodDelete, pathFirmware+"/"+url.PathEscape(model)+"/"+url.PathEscape(version), nil, nil, nil, -1, nil)
	return err
}

// CreateRollout starts a rollout.
func (c *Client) CreateRollout(ctx context.Context, spec controller.RolloutSpec) (controller.Rollout, error) {
	b, err := json.Marshal(spec)
	if err != nil {
		return controller.Rollout{}, fmt.Errorf("encode rollout spec: %w", err)
	}
	var r controller.Rollout
	_, err = c.do(ctx, http.MethodPost, pathRollouts, nil, nil, strings.NewReader(string(b)), int64(len(b)), &r)
	return r, err
}

// ListRollouts returns every rollout.
func (c *Client) ListRollouts(ctx context.Context) ([]controller.Rollout, error) {
	var list []controller.Rollout
	_, err := c.do(ctx, http.MethodGet, pathRollouts, nil, nil, nil, -1, &list)
	return list, err
}

// GetRollout returns one rollout with its jobs.
func (c *Client) GetRollout(ctx context.Context, id string) (controller.RolloutDetail, error) {
	var d controller.RolloutDetail
	if id == "" {
		return d, errors.New("rollout id is empty")
	}
	_, err := c.do(ctx, http.MethodGet, pathRollouts+"/"+url.PathEscape(id), nil, nil, nil, -1, &d)
	return d, err
}

// GetRolloutJobs returns a rollout with its first n jobs (0 for none).
func (c *Client) GetRolloutJobs(ctx context.Context, id string, n int) (controller.RolloutDetail, error) {
	var d controller.RolloutDetail
	if id == "" {
		return d, errors.New("rollout id is empty")
	}
	q := url.Values{"jobs": {strconv.Itoa(n)}}
	_, err := c.do(ctx, http.MethodGet, pathRollouts+"/"+url.PathEscape(id), q, nil, nil, -1, &d)
	return d, err
}

// RolloutJobs returns jobs of a rollout: of one state when q.State is set (JobFailed gives
// the failure list with reasons), after device q.After, at most q.Limit (default 1000).
func (c *Client) RolloutJobs(ctx context.Context, id string, q controller.JobQuery) ([]controller.Job, error) {
	if id == "" {
		return nil, errors.New("rollout id is empty")
	}
	v := url.Values{}
	if q.State != "" {
		v.Set("state", q.State)
	}
	if q.After != "" {
		v.Set("after", q.After)
	}
	if q.Limit > 0 {
		v.Set("limit", strconv.Itoa(q.Limit))
	}
	var jobs []controller.Job
	_, err := c.do(ctx, http.MethodGet, pathRollouts+"/"+url.PathEscape(id)+"/jobs", v, nil, nil, -1, &jobs)
	return jobs, err
}

// RolloutEvents returns entries of a rollout's event log after sequence number after, at
// most limit (0: the server's default).
func (c *Client) RolloutEvents(ctx context.Context, id string, after uint64, limit int) (controller.EventLog, error) {
	var log controller.EventLog
	if id == "" {
		return log, errors.New("rollout id is empty")
	}
	v := url.Values{}
	if after > 0 {
		v.Set("after", strconv.FormatUint(after, 10))
	}
	if limit > 0 {
		v.Set("limit", strconv.Itoa(limit))
	}
	_, err := c.do(ctx, http.MethodGet, pathRollouts+"/"+url.PathEscape(id)+"/events", v, nil, nil, -1, &log)
	return log, err
}

// PauseRollout pauses a rollout; reason may be empty.
func (c *Client) PauseRollout(ctx context.Context, id, reason string) (controller.Rollout, error) {
	return c.control(ctx, id, "pause", controlRequest{Reason: reason})
}

// ResumeRollout resumes a paused rollout.
func (c *Client) ResumeRollout(ctx context.Context, id string) (controller.Rollout, error) {
	return c.control(ctx, id, "resume", nil)
}

// CancelRollout cancels a rollout.
func (c *Client) CancelRollout(ctx context.Context, id string) (controller.Rollout, error) {
	return c.control(ctx, id, "cancel", nil)
}

func (c *Client) control(ctx context.Context, id, verb string, body any) (controller.Rollout, error) {
	var r controller.Rollout
	if id == "" {
		return r, errors.New("rollout id is empty")
	}
	_, err := c.doJSON(ctx, http.MethodPost, pathRollouts+"/"+url.PathEscape(id)+"/"+verb, body, &r)
	return r, err
}

// TagDevice sets tags of a device; an empty value removes the tag.
func (c *Client) TagDevice(ctx context.Context, id string, tags map[string]string) (Device, error) {
	var d Device
	if id == "" {
		return d, errors.New("device id is empty")
	}
	_, err := c.doJSON(ctx, http.MethodPost, pathDevices+"/"+url.PathEscape(id)+"/tags", tagRequest{Tags: tags}, &d)
	return d, err
}

// doJSON sends body (nil for none) as JSON.
func (c *Client) doJSON(ctx context.Context, method, path string, body, out any) (int, error) {
	if body == nil {
		return c.do(ctx, method, path, nil, nil, nil, -1, out)
	}
	b, err := json.Marshal(body)
	if err != nil {
		return 0, fmt.Errorf("encode request: %w", err)
	}
	return c.do(ctx, method, path, nil, nil, bytes.NewReader(b), int64(len(b)), out)
}

// ListDevices returns every registered device.
func (c *Client) ListDevices(ctx context.Context) ([]Device, error) {
	var list []Device
	_, err := c.do(ctx, http.MethodGet, pathDevices, nil, nil, nil, -1, &list)
	return list, err
}

// GetDevice returns one device.
func (c *Client) GetDevice(ctx context.Context, id string) (Device, error) {
	var d Device
	if id == "" {
		return d, errors.New("device id is empty")
	}
	_, err := c.do(ctx, http.MethodGet, pathDevices+"/"+url.PathEscape(id), nil, nil, nil, -1, &d)
	return d, err
}

// do sends one request, with the extra headers hdr, and decodes a successful JSON answer into
// out, unless out is nil. size is the body's length, or -1 if unknown.
func (c *Client) do(ctx context.Context, method, path string, q url.Values, hdr http.Header, body io.Reader, size int64, out any) (int, error) {
	if c.baseErr != nil {
		return 0, c.baseErr
	}
	u := c.base + path
	if len(q) > 0 {
		u += "?" + q.Encode()
	}
	var rc io.ReadCloser = http.NoBody
	if body != nil && size != 0 {
		// The transport closes the request body; the caller's reader (often its file) is
		// the caller's to close.
		rc = io.NopCloser(body)
	}
	req, err := http.NewRequestWithContext(ctx, method, u, rc)
	if err != nil {
		return 0, fmt.Errorf("build request: %w", err)
	}
	for k, vs := range hdr {
		req.Header[k] = vs
	}
	req.Header.Set("Accept", "application/json")
	if rc != http.NoBody {
		req.ContentLength = size
		if path == pathFirmware {
			if req.Header.Get("Content-Type") == "" { // a multipart upload has set its own
				req.Header.Set("Content-Type", "application/octet-stream")
			}
			req.Header.Set("Expect", "100-continue")
		} else {
			req.Header.Set("Content-Type", "application/json")
		}
	}
	resp, err := c.http.Do(req)
	if err != nil {
		return 0, c.requestError(err)
	}
	defer resp.Body.Close()
	if resp.StatusCode < 200 || resp.StatusCode > 299 {
		return resp.StatusCode, responseError(resp)
	}
	if out == nil || resp.StatusCode == http.StatusNoContent {
		_, _ = io.Copy(io.Discard, io.LimitReader(resp.Body, maxErrorBody))
		return resp.StatusCode, nil
	}
	if err := json.NewDecoder(resp.Body).Decode(out); err != nil {
		return resp.StatusCode, fmt.Errorf("fota server: bad response to %s %s: %w", method, path, err)
	}
	// Drain what is left so the connection can be reused.
	_, _ = io.Copy(io.Discard, io.LimitReader(resp.Body, maxErrorBody))
	return resp.StatusCode, nil
}

// responseError turns an error response into an *Error with the server's message.
func responseError(resp *http.Response) error {
	b, _ := io.ReadAll(io.LimitReader(resp.Body, maxErrorBody))
	var eb errorBody
	msg := ""
	if json.Unmarshal(b, &eb) == nil {
		msg = eb.Error
	}
	if msg == "" {
		msg = http.StatusText(resp.StatusCode)
		if msg == "" {
			msg = "unexpected response"
		}
	}
	// Callers print errors as one line.
	msg = strings.Join(strings.Fields(msg), " ")
	return &Error{StatusCode: resp.StatusCode, Message: msg}
}

// requestError turns a transport failure into one line that names the server and the cause,
// without the method and URL noise of *url.Error.
func (c *Client) requestError(err error) error {
	var opErr *net.OpError
	var dnsErr *net.DNSError
	var errno syscall.Errno
	var verr *tls.CertificateVerificationError
	switch {
	case errors.Is(err, context.Canceled), errors.Is(err, context.DeadlineExceeded):
		return fmt.Errorf("request to fota server at %s: %w", c.base, ctxErr(err))
	case errors.As(err, &dnsErr):
		return fmt.Errorf("cannot reach fota server at %s: %w", c.base, dnsErr)
	case errors.As(err, &opErr) && opErr.Op == "dial":
		if errors.As(opErr.Err, &errno) {
			return fmt.Errorf("cannot reach fota server at %s: %w", c.base, errno)
		}
		return fmt.Errorf("cannot reach fota server at %s: %w", c.base, opErr.Err)
	case errors.As(err, &opErr) && opErr.Op == "remote error":
		// The server sent a TLS alert: our certificate was missing or not from its CA.
		return fmt.Errorf("fota server at %s refused our client certificate (want the admin certificate of its CA): %w", c.base, opErr.Err)
	case errors.As(err, &verr):
		return fmt.Errorf("fota server at %s is not trusted (want ca.crt of its certs dir): %w", c.base, verr)
	}
	var uerr *url.Error
	if errors.As(err, &uerr) {
		err = uerr.Err
	}
	return fmt.Errorf("fota server at %s: %w", c.base, err)
}

func ctxErr(err error) error {
	if errors.Is(err, context.Canceled) {
		return context.Canceled
	}
	return context.DeadlineExceeded
}
