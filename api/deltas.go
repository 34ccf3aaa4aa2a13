package api

import (
	"net/http"
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
	u, err := s.startUpload(w, r, "delta patch", 0)
	if err != nil {
		return err
	}
	d, created, err := s.opts.Firmware.AddDelta(r.Context(), m, u)
	if err != nil {
		return u.failed(err)
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
