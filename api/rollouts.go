package api

import (
	_ "embed"
	"net/http"
	"strconv"

	"github.com/fota-dev/fota/controller"
	"github.com/fota-dev/fota/protocol"
)

// openAPIDoc describes every route; it is written by hand and served as is.
//
//go:embed openapi.json
var openAPIDoc []byte

// Listing limits: a rollout may hold a million jobs, so lists are paged.
const (
	defaultJobs   = 1000
	maxJobs       = 10000
	defaultEvents = 1000
	maxEvents     = 10000
)

func (s *Server) openAPI(w http.ResponseWriter, r *http.Request) error {
	h := w.Header()
	h.Set("Content-Type", "application/json")
	h.Set("Cache-Control", "no-store")
	h.Set("X-Content-Type-Options", "nosniff")
	_, _ = w.Write(openAPIDoc)
	return nil
}

// queryInt reads an optional non-negative integer query parameter, at most max.
func queryInt(r *http.Request, name string, def, max int) (int, error) {
	v := r.URL.Query().Get(name)
	if v == "" {
		return def, nil
	}
	n, err := strconv.Atoi(v)
	if err != nil || n < 0 || n > max {
		return 0, errStatus(http.StatusBadRequest, "bad %s %q: want a number from 0 to %d", name, v, max)
	}
	return n, nil
}

func (s *Server) createRollout(w http.ResponseWriter, r *http.Request) error {
	var spec controller.RolloutSpec
	if err := decodeJSON(w, r, &spec); err != nil {
		return err
	}
	ro, err := s.opts.Rollouts.CreateRollout(r.Context(), spec)
	if err != nil {
		return err
	}
	w.Header().Set("Location", pathRollouts+"/"+ro.ID)
	writeJSON(w, http.StatusCreated, ro)
	return nil
}

func (s *Server) listRollouts(w http.ResponseWriter, r *http.Request) error {
	list, err := s.opts.Rollouts.ListRollouts()
	if err != nil {
		return err
	}
	writeJSON(w, http.StatusOK, nonNil(list))
	return nil
}

// getRollout answers the rollout and its first jobs (?jobs=N, default 1000; 0 for none).
func (s *Server) getRollout(w http.ResponseWriter, r *http.Request) error {
	n, err := queryInt(r, "jobs", defaultJobs, maxJobs)
	if err != nil {
		return err
	}
	ro, err := s.opts.Rollouts.Rollout(r.PathValue("id"))
	if err != nil {
		return err
	}
	d := controller.RolloutDetail{Rollout: ro, Jobs: []controller.Job{}}
	if n > 0 {
		jobs, err := s.opts.Rollouts.Jobs(ro.ID, controller.JobQuery{Limit: n})
		if err != nil {
			return err
		}
		d.Jobs = nonNil(jobs)
	}
	writeJSON(w, http.StatusOK, d)
	return nil
}

// rolloutJobs lists jobs of one state (?state=failed is the failure list), paged by device
// id (?after=ID&limit=N).
func (s *Server) rolloutJobs(w http.ResponseWriter, r *http.Request) error {
	limit, err := queryInt(r, "limit", defaultJobs, maxJobs)
	if err != nil {
		return err
	}
	if limit == 0 {
		limit = defaultJobs
	}
	q := r.URL.Query()
	jobs, err := s.opts.Rollouts.Jobs(r.PathValue("id"), controller.JobQuery{State: q.Get("state"), After: q.Get("after"), Limit: limit})
	if err != nil {
		return err
	}
	writeJSON(w, http.StatusOK, nonNil(jobs))
	return nil
}

// rolloutEvents answers the event log after sequence number ?after=N, at most ?limit=N.
func (s *Server) rolloutEvents(w http.ResponseWriter, r *http.Request) error {
	limit, err := queryInt(r, "limit", defaultEvents, maxEvents)
	if err != nil {
		return err
	}
	if limit == 0 {
		limit = defaultEvents
	}
	var after uint64
	if v := r.URL.Query().Get("after"); v != "" {
		if after, err = strconv.ParseUint(v, 10, 64); err != nil {
			return errStatus(http.StatusBadRequest, "bad after %q: want an event sequence number", v)
		}
	}
	log, err := s.opts.Rollouts.Events(r.PathValue("id"), after, limit)
	if err != nil {
		return err
	}
	log.Events = nonNil(log.Events)
	writeJSON(w, http.StatusOK, log)
	return nil
}

// controlRequest is the optional body of pause.
type controlRequest struct {
	Reason string `json:"reason,omitempty"`
}

func (s *Server) pauseRollout(w http.ResponseWriter, r *http.Request) error {
	var req controlRequest
	if r.ContentLength != 0 {
		if err := decodeJSON(w, r, &req); err != nil {
			return err
		}
	}
	if len(req.Reason) > 256 {
		return errStatus(http.StatusBadRequest, "reason longer than 256 bytes")
	}
	ro, err := s.opts.Rollouts.PauseRollout(r.PathValue("id"), req.Reason)
	if err != nil {
		return err
	}
	writeJSON(w, http.StatusOK, ro)
	return nil
}

func (s *Server) resumeRollout(w http.ResponseWriter, r *http.Request) error {
	ro, err := s.opts.Rollouts.ResumeRollout(r.PathValue("id"))
	if err != nil {
		return err
	}
	writeJSON(w, http.StatusOK, ro)
	return nil
}

func (s *Server) cancelRollout(w http.ResponseWriter, r *http.Request) error {
	ro, err := s.opts.Rollouts.CancelRollout(r.PathValue("id"))
	if err != nil {
		return err
	}
	writeJSON(w, http.StatusOK, ro)
	return nil
}

// Device is a device as the API answers it: the controller's record, and whether the device's
// certificate is revoked, which the controller does not know.
type Device struct {
	controller.Device
	Revoked bool `json:"revoked"`
}

func (s *Server) device(d controller.Device) Device {
	return Device{Device: d, Revoked: s.opts.Revoked != nil && s.opts.Revoked.Revoked(d.ID)}
}

func (s *Server) listDevices(w http.ResponseWriter, r *http.Request) error {
	list, err := s.opts.Rollouts.ListDevices()
	if err != nil {
		return err
	}
	out := make([]Device, len(list))
	for i, d := range list {
		out[i] = s.device(d)
	}
	writeJSON(w, http.StatusOK, out)
	return nil
}

func (s *Server) getDevice(w http.ResponseWriter, r *http.Request) error {
	d, err := s.opts.Rollouts.GetDevice(r.PathValue("id"))
	if err != nil {
		return err
	}
	writeJSON(w, http.StatusOK, s.device(d))
	return nil
}

// tagRequest sets tags; an empty value removes the tag.
type tagRequest struct {
	Tags map[string]string `json:"tags"`
}

func (s *Server) tagDevice(w http.ResponseWriter, r *http.Request) error {
	id := r.PathValue("id")
	if err := protocol.ValidDeviceID(id); err != nil {
		return errStatus(http.StatusBadRequest, "%v", err)
	}
	var req tagRequest
	if err := decodeJSON(w, r, &req); err != nil {
		return err
	}
	d, err := s.opts.Rollouts.TagDevice(id, req.Tags)
	if err != nil {
		return err
	}
	writeJSON(w, http.StatusOK, s.device(d))
	return nil
}
