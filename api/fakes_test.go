package api

import (
	"context"
	"errors"
	"fmt"
	"io"
	"slices"
	"sync"
	"sync/atomic"
	"time"

	"github.com/fota-dev/fota/controller"
	"github.com/fota-dev/fota/firmware"
	"github.com/fota-dev/fota/protocol"
)

// fakeRollouts serves fixed data, or err for every call when set.
type fakeRollouts struct {
	mu       sync.Mutex
	err      error
	rollouts []controller.Rollout
	details  map[string]controller.RolloutDetail
	devices  []controller.Device
	specs    []controller.RolloutSpec
	events   []controller.Event
	queries  []controller.JobQuery
	// guard counts the WithoutNewRollouts calls in progress; inUseUnguarded the InUse calls
	// made outside one, which could race a rollout's creation.
	guard, inUseUnguarded atomic.Int32
}

var _ Rollouts = (*fakeRollouts)(nil)

func (f *fakeRollouts) CreateRollout(ctx context.Context, spec controller.RolloutSpec) (controller.Rollout, error) {
	f.mu.Lock()
	defer f.mu.Unlock()
	if f.err != nil {
		return controller.Rollout{}, f.err
	}
	f.specs = append(f.specs, spec)
	r := controller.Rollout{
		ID: fmt.Sprintf("r%d", len(f.specs)), Model: spec.Model, Version: spec.Version,
		State: controller.RolloutActive, Created: testTime, Updated: testTime,
		Counts: map[string]int{controller.JobPending: 2},
	}
	f.rollouts = append(f.rollouts, r)
	if f.details == nil {
		f.details = map[string]controller.RolloutDetail{}
	}
	f.details[r.ID] = controller.RolloutDetail{Rollout: r, Jobs: []controller.Job{}}
	return r, nil
}

func (f *fakeRollouts) ListRollouts() ([]controller.Rollout, error) {
	f.mu.Lock()
	defer f.mu.Unlock()
	return f.rollouts, f.err
}

func (f *fakeRollouts) Rollout(id string) (controller.Rollout, error) {
	f.mu.Lock()
	defer f.mu.Unlock()
	if f.err != nil {
		return controller.Rollout{}, f.err
	}
	d, ok := f.details[id]
	if !ok {
		return controller.Rollout{}, fmt.Errorf("rollout %q: %w", id, controller.ErrNotFound)
	}
	return d.Rollout, nil
}

func (f *fakeRollouts) Jobs(id string, q controller.JobQuery) ([]controller.Job, error) {
	f.mu.Lock()
	defer f.mu.Unlock()
	if f.err != nil {
		return nil, f.err
	}
	d, ok := f.details[id]
	if !ok {
		return nil, fmt.Errorf("rollout %q: %w", id, controller.ErrNotFound)
	}
	f.queries = append(f.queries, q)
	var out []controller.Job
	for _, j := range d.Jobs {
		if (q.State == "" || j.State == q.State) && j.Device > q.After && (q.Limit == 0 || len(out) < q.Limit) {
			out = append(out, j)
		}
	}
	return out, nil
}

// setState is what pause, resume and cancel do to the fake: a new state, or err.
func (f *fakeRollouts) setState(id, state, reason string) (controller.Rollout, error) {
	f.mu.Lock()
	defer f.mu.Unlock()
	if f.err != nil {
		return controller.Rollout{}, f.err
	}
	d, ok := f.details[id]
	if !ok {
		return controller.Rollout{}, fmt.Errorf("rollout %q: %w", id, controller.ErrNotFound)
	}
	if d.State == controller.RolloutCanceled {
		return controller.Rollout{}, fmt.Errorf("%w: rollout %s is canceled", controller.ErrConflict, id)
	}
	d.State, d.Reason = state, reason
	f.details[id] = d
	return d.Rollout, nil
}

func (f *fakeRollouts) PauseRollout(id, reason string) (controller.Rollout, error) {
	return f.setState(id, controller.RolloutPaused, reason)
}

func (f *fakeRollouts) ResumeRollout(id string) (controller.Rollout, error) {
	return f.setState(id, controller.RolloutActive, "")
}

func (f *fakeRollouts) CancelRollout(id string) (controller.Rollout, error) {
	return f.setState(id, controller.RolloutCanceled, "canceled by the operator")
}

func (f *fakeRollouts) Events(id string, after uint64, limit int) (controller.EventLog, error) {
	f.mu.Lock()
	defer f.mu.Unlock()
	if f.err != nil {
		return controller.EventLog{}, f.err
	}
	if _, ok := f.details[id]; !ok {
		return controller.EventLog{}, fmt.Errorf("rollout %q: %w", id, controller.ErrNotFound)
	}
	log := controller.EventLog{Total: uint64(len(f.events))}
	for _, e := range f.events {
		if e.Seq > after && (limit == 0 || len(log.Events) < limit) {
			log.Events = append(log.Events, e)
		}
	}
	return log, nil
}

func (f *fakeRollouts) TagDevice(id string, tags map[string]string) (controller.Device, error) {
	f.mu.Lock()
	defer f.mu.Unlock()
	if f.err != nil {
		return controller.Device{}, f.err
	}
	for i, d := range f.devices {
		if d.ID == id {
			if d.Tags == nil {
				d.Tags = map[string]string{}
			}
			for k, v := range tags {
				if v == "" {
					delete(d.Tags, k)
				} else {
					d.Tags[k] = v
				}
			}
			f.devices[i] = d
			return d, nil
		}
	}
	return controller.Device{}, fmt.Errorf("device %q: %w", id, controller.ErrNotFound)
}

func (f *fakeRollouts) WithoutNewRollouts(fn func() error) error {
	f.guard.Add(1)
	defer f.guard.Add(-1)
	return fn()
}

func (f *fakeRollouts) InUse(model, version string) bool {
	if f.guard.Load() == 0 {
		f.inUseUnguarded.Add(1)
	}
	f.mu.Lock()
	defer f.mu.Unlock()
	for _, d := range f.details {
		if d.Model == model && d.Version == version && unfinished(d.State) {
			return true
		}
	}
	return false
}

func (f *fakeRollouts) ListDevices() ([]controller.Device, error) {
	f.mu.Lock()
	defer f.mu.Unlock()
	return f.devices, f.err
}

func (f *fakeRollouts) GetDevice(id string) (controller.Device, error) {
	f.mu.Lock()
	defer f.mu.Unlock()
	if f.err != nil {
		return controller.Device{}, f.err
	}
	for _, d := range f.devices {
		if d.ID == id {
			return d, nil
		}
	}
	return controller.Device{}, fmt.Errorf("device %q: %w", id, controller.ErrNotFound)
}

// fakeStore reads each upload to the end, like the real store, and keeps what it read.
type fakeStore struct {
	err      error // returned after reading the body
	mu       sync.Mutex
	list     []firmware.Firmware
	bodies   map[string][]byte
	calls    atomic.Int64
	received atomic.Int64        // bytes read from the current upload so far
	last     firmware.AddRequest // the last request, without its body
}

var _ FirmwareStore = (*fakeStore)(nil)

func (s *fakeStore) Add(ctx context.Context, req firmware.AddRequest) (firmware.Firmware, bool, error) {
	s.calls.Add(1)
	s.received.Store(0)
	s.mu.Lock()
	s.last = req
	s.last.Body = nil
	s.mu.Unlock()
	var body []byte
	buf := make([]byte, 4096)
	for {
		n, err := req.Body.Read(buf)
		body = append(body, buf[:n]...)
		s.received.Add(int64(n))
		if err == io.EOF {
			break
		}
		if err != nil {
			return firmware.Firmware{}, false, fmt.Errorf("add firmware: read body: %w", err)
		}
	}
	if s.err != nil {
		return firmware.Firmware{}, false, s.err
	}
	if len(body) == 0 {
		return firmware.Firmware{}, false, fmt.Errorf("add firmware: %w", firmware.ErrEmpty)
	}
	s.mu.Lock()
	defer s.mu.Unlock()
	key := req.Model + " " + req.Version
	for _, f := range s.list {
		if f.Model == req.Model && f.Version == req.Version {
			if string(s.bodies[key]) != string(body) {
				return firmware.Firmware{}, false, fmt.Errorf("add firmware %s: %w", key, firmware.ErrConflict)
			}
			return f, false, nil
		}
	}
	f := firmware.Firmware{
		Model: req.Model, Version: req.Version, Size: int64(len(body)),
		SHA256: fmt.Sprintf("%064x", len(body)), Counter: uint64(len(s.list) + 1),
		Notes: req.Notes, Created: testTime,
	}
	s.list = append(s.list, f)
	if s.bodies == nil {
		s.bodies = map[string][]byte{}
	}
	s.bodies[key] = body
	return f, true, nil
}

// AddDelta and Deltas are served by the real store in the tests that use them
// (deltas_test.go); the fake has none.
func (s *fakeStore) AddDelta(context.Context, protocol.Manifest, io.Reader) (firmware.Delta, bool, error) {
	return firmware.Delta{}, false, errors.New("fakeStore holds no deltas")
}

func (s *fakeStore) Deltas() ([]firmware.Delta, error) { return nil, nil }

func (s *fakeStore) List() ([]firmware.Firmware, error) {
	s.mu.Lock()
	defer s.mu.Unlock()
	return s.list, s.err
}

// Delete removes a record as the real store does, asking inUse first.
func (s *fakeStore) Delete(model, version string, inUse func(firmware.Firmware) bool) error {
	s.mu.Lock()
	defer s.mu.Unlock()
	if s.err != nil {
		return s.err
	}
	for i, f := range s.list {
		if f.Model != model || f.Version != version {
			continue
		}
		if inUse != nil && inUse(f) {
			return fmt.Errorf("delete firmware %s %s: %w", model, version, firmware.ErrInUse)
		}
		s.list = slices.Delete(s.list, i, i+1)
		delete(s.bodies, model+" "+version)
		return nil
	}
	return fmt.Errorf("delete firmware: get firmware %s %s: %w", model, version, firmware.ErrNotFound)
}

var testTime = time.Date(2025, 3, 4, 5, 6, 7, 0, time.UTC)
