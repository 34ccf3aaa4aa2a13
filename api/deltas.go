package api

import (
	"fmt"
	"net/http"
	"time"
)

// pathDeltas lists the delta patches, and takes those signed offline.
const pathDeltas = "/api/v1/deltas"

// addDelta stores a delta patch whose manifest was signed offline: the manifest in the
// Fota-Manifest header, the patch as the body.
func (s *Server) addDelta(w http.ResponseWriter, r *http.Request) error {
	vs := r.Header.Values(headerManifest)
	if len(vs) == 0 {
		return errStatus(http.StatusBadRequest, "a delta needs its signed manifest in the %s header; make both with 'fota delta sign'", headerManifest)
	}
	m, err := decodeManifestHeader(vs)
	if err != nil {
		return err
	}
	if r.ContentLength > s.opts.MaxUpload {
		return errStatus(http.StatusRequestEntityTooLarge, "delta patch too large: %d bytes, the limit is %d", r.ContentLength, s.opts.MaxUpload)
	}
	if r.ContentLength == 0 {
		return errStatus(http.StatusBadRequest, "empty delta patch")
	}
	rc := http.NewResponseController(w)
	deadline := time.Now().Add(uploadTimeout)
	if err := rc.SetReadDeadline(deadline); err != nil {
		return fmt.Errorf("extend read deadline: %w", err)
	}
	if err := rc.SetWriteDeadline(deadline); err != nil {
		return fmt.Errorf("extend write deadline: %w", err)
	}
	body := &limitReader{r: http.MaxBytesReader(w, r.Body, s.opts.MaxUpload)}
	d, created, err := s.opts.Firmware.AddDelta(r.Context(), m, body)
	if err != nil {
		if body.over {
			return errStatus(http.StatusRequestEntityTooLarge, "delta patch too large: the limit is %d bytes", s.opts.MaxUpload)
		}
		return err
	}
	status := http.StatusOK
	if created {
		status = http.StatusCreated
	}
	writeJSON(w, status, d)
	return nil
}

// listDeltas lists every delta verdict: the patches offered, and the pairs refused a patch.
func (s *Server) listDeltas(w http.ResponseWriter, r *http.Request) error {
	list, err := s.opts.Firmware.Deltas()
	if err != nil {
		return err
	}
	writeJSON(w, http.StatusOK, nonNil(list))
	return nil
}
