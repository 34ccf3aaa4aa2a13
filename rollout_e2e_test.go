package main

import (
	"context"
	"strings"
	"testing"
	"time"

	"github.com/fota-dev/fota/controller"
	"github.com/fota-dev/fota/devicesim"
)

// TestAbortRuleStopsFleet runs 200 simulated devices, 10% of whose installs fail, through the
// real server with an abort threshold of 5%: the rollout pauses in its first wave, and the
// second wave never starts although its gate alone would let it.
func TestAbortRuleStopsFleet(t *testing.T) {
	if testing.Short() {
		t.Skip("runs 200 devices")
	}
	srv, certsDir := testServer(t)
	client := adminClient(t, srv, certsDir)
	ctx, cancel := context.WithTimeout(context.Background(), 2*time.Minute)
	defer cancel()
	counter, pub := addDemoReleases(ctx, t, client, srv.releasePub, demoFrom, demoTo)
	const n = 200
	tlsFor, err := deviceTLSFor(certsDir, srv.broker.Addr().String())
	if err != nil {
		t.Fatal(err)
	}
	fleetCtx, stopFleet := context.WithCancel(ctx)
	fleetDone := make(chan struct{})
	go func() {
		defer close(fleetDone)
		devicesim.RunFleet(fleetCtx, devicesim.FleetConfig{
			N: n, Model: demoModel, Version: demoFrom, Image: demoImage(demoFrom), Counter: counter,
			PublicKey: pub, Broker: srv.broker.Addr().String(), TLSFor: tlsFor, IDPrefix: "abort",
			// A fixed seed: the same devices fail on every run.
			FailInstallRate: 0.10, Seed: 1,
		})
	}()
	defer func() { stopFleet(); <-fleetDone }()
	if err := waitOnline(ctx, client, n); err != nil {
		t.Fatal(err)
	}
	r, err := client.CreateRollout(ctx, controller.RolloutSpec{
		Model: demoModel, Version: demoTo, Waves: []int{50, 100}, Gate: 50,
		AbortFailureRate: 5, AbortMinFinished: 20, MaxConcurrent: n,
	})
	if err != nil {
		t.Fatal(err)
	}
	// Paused, and the devices that were at work when it paused have finished.
	var ro controller.Rollout
	for {
		d, err := client.GetRolloutJobs(ctx, r.ID, 0)
		if err != nil {
			t.Fatal(err)
		}
		ro = d.Rollout
		if ro.State != controller.RolloutActive && inFlight(ro.Waves[0].Counts) == 0 {
			break
		}
		select {
		case <-ctx.Done():
			t.Fatalf("waiting for the abort: %s %v", ro.State, ro.Waves[0].Counts)
		case <-time.After(50 * time.Millisecond):
		}
	}
	w1, w2 := ro.Waves[0], ro.Waves[1]
	if ro.State != controller.RolloutPaused || !strings.Contains(ro.Reason, "abort rule: wave 1:") {
		t.Fatalf("got %s %q, want paused by the abort rule in wave 1", ro.State, ro.Reason)
	}
	failed, installed := w1.Counts[controller.JobFailed], w1.Counts[controller.JobInstalled]
	if failed == 0 || float64(failed)*100 < 5*float64(failed+installed) {
		t.Fatalf("wave 1: %d failed of %d finished, want at least 5%%", failed, failed+installed)
	}
	if w1.Devices != n/2 || w2.Devices != n/2 {
		t.Fatalf("got waves of %d and %d devices, want %d each", w1.Devices, w2.Devices, n/2)
	}
	// The gate (50%) is met, yet wave 2 did not start: none of its devices was offered.
	if installed < w1.Devices/2 {
		t.Fatalf("wave 1: %d installed, want the gate of %d met so that only the abort holds wave 2", installed, w1.Devices/2)
	}
	if ro.WavesStarted != 1 || w2.State != controller.WaveWaiting || w2.Counts[controller.JobPending] != w2.Devices {
		t.Fatalf("got %d waves started, wave 2 %s %v; want only wave 1, wave 2 all pending", ro.WavesStarted, w2.State, w2.Counts)
	}
	jobs, err := client.RolloutJobs(ctx, r.ID, controller.JobQuery{Limit: 1000})
	if err != nil {
		t.Fatal(err)
	}
	if len(jobs) != ro.Devices {
		t.Errorf("got %d jobs listed, want one per device of the rollout, %d", len(jobs), ro.Devices)
	}
	for _, j := range jobs {
		// Every member is listed; wave 2's, never offered, are pending without an offer.
		if j.Wave != 0 && (j.Offers > 0 || j.State != controller.JobPending) {
			t.Errorf("device %s of wave %d was offered: %s after %d offers", j.Device, j.Wave+1, j.State, j.Offers)
		}
		if j.State == controller.JobFailed && !strings.Contains(j.Reason, "install") {
			t.Errorf("device %s failed with %q, want the injected install failure", j.Device, j.Reason)
		}
	}
	log, err := client.RolloutEvents(ctx, r.ID, 0, 10000)
	if err != nil {
		t.Fatal(err)
	}
	for _, e := range log.Events {
		if e.To == "wave 2 started" {
			t.Fatalf("event log: %+v", e)
		}
	}
}
