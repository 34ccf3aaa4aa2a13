package api

import (
	"context"
	"encoding/json"
	"io"
	"net/http"
	"reflect"
	"slices"
	"strings"
	"testing"

	"github.com/fota-dev/fota/controller"
)

// TestOpenAPICoversRoutes: the served OpenAPI document describes every registered route, and
// no route that does not exist.
func TestOpenAPICoversRoutes(t *testing.T) {
	e := start(t)
	resp, _ := rawDo(t, e, http.MethodGet, pathOpenAPI, "")
	if resp.StatusCode != http.StatusOK {
		t.Fatalf("got status %d, want 200", resp.StatusCode)
	}
	var doc struct {
		OpenAPI string                                `json:"openapi"`
		Paths   map[string]map[string]json.RawMessage `json:"paths"`
	}
	if err := json.Unmarshal(openAPIDoc, &doc); err != nil {
		t.Fatalf("openapi.json: %v", err)
	}
	if !strings.HasPrefix(doc.OpenAPI, "3.") {
		t.Fatalf("got openapi %q, want 3.x", doc.OpenAPI)
	}
	documented := map[string]bool{}
	for path, ops := range doc.Paths {
		for method := range ops {
			documented[strings.ToUpper(method)+" "+path] = true
		}
	}
	routed := map[string]bool{}
	for _, rt := range e.srv.routeList() {
		key := rt.method + " " + rt.path
		routed[key] = true
		if !documented[key] {
			t.Errorf("route %s is not in openapi.json", key)
		}
	}
	for key := range documented {
		if !routed[key] {
			t.Errorf("openapi.json documents %s, which is not routed", key)
		}
	}
}

func TestRolloutControl(t *testing.T) {
	e := start(t)
	c := e.admin(t)
	ctx := context.Background()
	r, err := c.CreateRollout(ctx, controller.RolloutSpec{Model: "primehub", Version: "1.2.0"})
	if err != nil {
		t.Fatal(err)
	}
	e.rollouts.mu.Lock()
	d := e.rollouts.details[r.ID]
	d.Jobs = []controller.Job{
		{ID: "r1-1", Device: "dev-1", State: controller.JobInstalled},
		{ID: "r1-1", Device: "dev-2", State: controller.JobFailed, Reason: "install: flash"},
		{ID: "r1-2", Device: "dev-3", State: controller.JobFailed, Reason: "timed out"},
	}
	e.rollouts.details[r.ID] = d
	e.rollouts.events = []controller.Event{{Seq: 1, To: "active"}, {Seq: 2, Device: "dev-1", To: "offered"}, {Seq: 3, Device: "dev-1", To: "installed"}}
	e.rollouts.devices = []controller.Device{{ID: "dev-1", Model: "primehub"}}
	e.rollouts.mu.Unlock()

	t.Run("pause", func(t *testing.T) {
		got, err := c.PauseRollout(ctx, r.ID, "looking into it")
		if err != nil || got.State != controller.RolloutPaused || got.Reason != "looking into it" {
			t.Fatalf("got %s %q (%v), want paused with the reason", got.State, got.Reason, err)
		}
	})
	t.Run("resume", func(t *testing.T) {
		if got, err := c.ResumeRollout(ctx, r.ID); err != nil || got.State != controller.RolloutActive {
			t.Fatalf("got %s (%v), want active", got.State, err)
		}
	})
	t.Run("failure list", func(t *testing.T) {
		jobs, err := c.RolloutJobs(ctx, r.ID, controller.JobQuery{State: controller.JobFailed})
		if err != nil || len(jobs) != 2 || jobs[0].Reason != "install: flash" {
			t.Fatalf("got %+v (%v), want the two failed jobs with reasons", jobs, err)
		}
		page, err := c.RolloutJobs(ctx, r.ID, controller.JobQuery{After: "dev-1", Limit: 1})
		if err != nil || len(page) != 1 || page[0].Device != "dev-2" {
			t.Fatalf("got page %+v (%v), want dev-2 alone", page, err)
		}
	})
	t.Run("detail with jobs", func(t *testing.T) {
		d, err := c.GetRolloutJobs(ctx, r.ID, 0)
		if err != nil || len(d.Jobs) != 0 || d.ID != r.ID {
			t.Fatalf("got %d jobs (%v), want the rollout without jobs", len(d.Jobs), err)
		}
		d, err = c.GetRollout(ctx, r.ID)
		if err != nil || len(d.Jobs) != 3 {
			t.Fatalf("got %d jobs (%v), want 3", len(d.Jobs), err)
		}
	})
	t.Run("events", func(t *testing.T) {
		log, err := c.RolloutEvents(ctx, r.ID, 1, 1)
		if err != nil || log.Total != 3 || len(log.Events) != 1 || log.Events[0].Seq != 2 {
			t.Fatalf("got %+v (%v), want event 2 of 3", log, err)
		}
	})
	t.Run("tag device", func(t *testing.T) {
		d, err := c.TagDevice(ctx, "dev-1", map[string]string{"ring": "beta"})
		if err != nil || !reflect.DeepEqual(d.Tags, map[string]string{"ring": "beta"}) {
			t.Fatalf("got %+v (%v), want ring=beta", d.Tags, err)
		}
	})
	t.Run("cancel", func(t *testing.T) {
		if got, err := c.CancelRollout(ctx, r.ID); err != nil || got.State != controller.RolloutCanceled {
			t.Fatalf("got %s (%v), want canceled", got.State, err)
		}
	})
	errCases := []struct {
		name       string
		call       func() error
		wantStatus int
		wantMsg    string
	}{
		{"pause unknown", func() error { _, err := c.PauseRollout(ctx, "r9", ""); return err }, 404, `rollout "r9": not found`},
		{"resume canceled", func() error { _, err := c.ResumeRollout(ctx, r.ID); return err }, 409, "conflict: rollout r1 is canceled"},
		{"events unknown", func() error { _, err := c.RolloutEvents(ctx, "r9", 0, 0); return err }, 404, `rollout "r9": not found`},
		{"tag unknown", func() error { _, err := c.TagDevice(ctx, "dev-9", map[string]string{"a": "b"}); return err }, 404, `device "dev-9": not found`},
	}
	for _, tc := range errCases {
		t.Run(tc.name, func(t *testing.T) {
			status, msg := statusOf(t, tc.call())
			if status != tc.wantStatus || msg != tc.wantMsg {
				t.Fatalf("got %d %q, want %d %q", status, msg, tc.wantStatus, tc.wantMsg)
			}
		})
	}
	raw := []struct {
		method, path, body string
		wantStatus         int
		wantMsg            string
	}{
		{http.MethodGet, pathRollouts + "/r1/pause", "", 405, "method GET not allowed on /api/v1/rollouts/r1/pause; use POST"},
		{http.MethodGet, pathRollouts + "/r1/jobs?limit=x", "", 400, `bad limit "x": want a number from 0 to 10000`},
		{http.MethodGet, pathRollouts + "/r1/events?after=-1", "", 400, `bad after "-1": want an event sequence number`},
		{http.MethodPost, pathDevices + "/dev-1/tags", `{"tags":`, 400, ""},
		{http.MethodPost, pathRollouts + "/r1/pause", `{"why":"x"}`, 400, ""},
	}
	for _, tc := range raw {
		t.Run(tc.method+" "+tc.path, func(t *testing.T) {
			resp, eb := rawDo(t, e, tc.method, tc.path, tc.body)
			if resp.StatusCode != tc.wantStatus || (tc.wantMsg != "" && eb.Error != tc.wantMsg) {
				t.Fatalf("got %d %q, want %d %q", resp.StatusCode, eb.Error, tc.wantStatus, tc.wantMsg)
			}
		})
	}
}

// TestOpenAPIServedAsIs: the document is valid JSON and served with a JSON content type.
func TestOpenAPIServedAsIs(t *testing.T) {
	e := start(t)
	hc := &http.Client{Transport: &http.Transport{TLSClientConfig: e.ca.AdminTLS(t)}}
	defer hc.CloseIdleConnections()
	resp, err := hc.Get(e.url + pathOpenAPI)
	if err != nil {
		t.Fatal(err)
	}
	defer resp.Body.Close()
	b, _ := io.ReadAll(resp.Body)
	if !json.Valid(b) || !slices.Equal(b, openAPIDoc) || resp.Header.Get("Content-Type") != "application/json" {
		t.Fatalf("got %d bytes (%s), want the embedded document as JSON", len(b), resp.Header.Get("Content-Type"))
	}
}
