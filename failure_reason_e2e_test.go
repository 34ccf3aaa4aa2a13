package main

import (
	"context"
	"testing"
	"time"

	"github.com/fota-dev/fota/controller"
	"github.com/fota-dev/fota/devicesim"
	"github.com/fota-dev/fota/protocol"
)

// TestInstallFailureReasonAgrees: a device whose install fails (devicesim's fail-install
// fault) and the server record the same reason for the job.
func TestInstallFailureReasonAgrees(t *testing.T) {
	if testing.Short() {
		t.Skip("runs a simulated fleet")
	}
	srv, certsDir := testServer(t)
	client := adminClient(t, srv, certsDir)
	ctx, cancel := context.WithTimeout(context.Background(), time.Minute)
	defer cancel()
	counter, pub := addDemoReleases(ctx, t, client, srv.releasePub, demoFrom, demoTo)
	const n = 5
	tlsFor, err := deviceTLSFor(certsDir, srv.broker.Addr().String())
	if err != nil {
		t.Fatal(err)
	}
	type fleetResult struct {
		rs  []devicesim.Result
		err error
	}
	done := make(chan fleetResult, 1)
	go func() {
		rs, err := devicesim.RunFleet(ctx, devicesim.FleetConfig{
			N: n, Model: demoModel, Version: demoFrom, Image: demoImage(demoFrom), Counter: counter,
			PublicKey: pub, Broker: srv.broker.Addr().String(), TLSFor: tlsFor, IDPrefix: "fi",
			UntilVersion: demoTo, FailInstallRate: 1, Seed: 1,
		})
		done <- fleetResult{rs, err}
	}()
	if err := waitOnline(ctx, client, n); err != nil {
		t.Fatal(err)
	}
	r, err := client.CreateRollout(ctx, controller.RolloutSpec{Model: demoModel, Version: demoTo, AbortMinFinished: n + 1})
	if err != nil {
		t.Fatal(err)
	}
	fr := <-done
	if fr.err != nil {
		t.Fatalf("fleet: %v", fr.err)
	}
	device := map[string]string{}
	for _, res := range fr.rs {
		if res.State != protocol.StateFailed {
			t.Fatalf("device %s: got %s, want failed by the fault", res.ID, res.State)
		}
		device[res.ID] = res.Reason
	}
	var jobs []controller.Job
	for {
		jobs, err = client.RolloutJobs(ctx, r.ID, controller.JobQuery{State: controller.JobFailed})
		if err != nil {
			t.Fatal(err)
		}
		if len(jobs) == n {
			break
		}
		select {
		case <-ctx.Done():
			all, _ := client.RolloutJobs(context.Background(), r.ID, controller.JobQuery{})
			for _, j := range all {
				t.Logf("%s %s %q history %q device %q", j.Device, j.State, j.Reason, j.History, device[j.Device])
			}
			t.Fatalf("got %d failed jobs, want %d", len(jobs), n)
		case <-time.After(20 * time.Millisecond):
		}
	}
	for _, j := range jobs {
		if j.Reason != device[j.Device] {
			t.Errorf("device %s: server recorded %q, device %q", j.Device, j.Reason, device[j.Device])
		}
	}
}
