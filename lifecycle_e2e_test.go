package main

import (
	"bytes"
	"context"
	"fmt"
	"io"
	"strings"
	"testing"
	"time"

	"github.com/fota-dev/fota/certs"
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

// TestRevokedDevicesEndRollout: devices revoked in the middle of their downloads end skipped at
// once on the running server, and the rollout completes without them.
func TestRevokedDevicesEndRollout(t *testing.T) {
	if testing.Short() {
		t.Skip("runs a simulated fleet")
	}
	srv, certsDir := testServer(t)
	client := adminClient(t, srv, certsDir)
	ctx, cancel := context.WithTimeout(context.Background(), time.Minute)
	defer cancel()
	counter, pub := addDemoReleases(ctx, t, client, srv.releasePub, demoFrom, demoTo)
	const n = 3
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
			PublicKey: pub, Broker: srv.broker.Addr().String(), TLSFor: tlsFor, IDPrefix: "rv",
			// Every frame is lost: the devices stay downloading, asking again, until revoked.
			DropRate: 1, RequestTimeout: 5 * time.Second,
		})
	}()
	defer func() { stopFleet(); <-fleetDone }()
	if err := waitOnline(ctx, client, n); err != nil {
		t.Fatal(err)
	}
	r, err := client.CreateRollout(ctx, controller.RolloutSpec{Model: demoModel, Version: demoTo})
	if err != nil {
		t.Fatal(err)
	}
	waitRollout := func(what string, cond func(controller.RolloutDetail) bool) controller.RolloutDetail {
		t.Helper()
		for {
			d, err := client.GetRolloutJobs(ctx, r.ID, 0)
			if err != nil {
				t.Fatal(err)
			}
			if cond(d) {
				return d
			}
			select {
			case <-ctx.Done():
				t.Fatalf("waiting for %s: got %s %v", what, d.State, d.Counts)
			case <-time.After(20 * time.Millisecond):
			}
		}
	}
	waitRollout("every device downloading", func(d controller.RolloutDetail) bool { return d.Counts[controller.JobDownloading] == n })
	for i := 1; i <= n; i++ {
		if err := certs.Revoke(certsDir, fmt.Sprintf("rv-%04d", i)); err != nil {
			t.Fatal(err)
		}
	}
	d := waitRollout("the rollout to complete", func(d controller.RolloutDetail) bool { return d.State == controller.RolloutCompleted })
	if d.Counts[controller.JobSkipped] != n || d.Reason != "0 installed, 0 failed, 3 skipped" {
		t.Errorf("got %v (%q), want %d skipped", d.Counts, d.Reason, n)
	}
	for _, j := range d.Jobs {
		if j.State != controller.JobSkipped || j.Reason != "revoked" {
			t.Errorf("device %s: got %s %q, want skipped: revoked", j.Device, j.State, j.Reason)
		}
	}
}

// TestServeRefusesBadUnreachableAfter: --unreachable-after must be a positive duration.
func TestServeRefusesBadUnreachableAfter(t *testing.T) {
	var stderr bytes.Buffer
	code := run([]string{"serve", "--data", t.TempDir(), "--certs", t.TempDir(), "--unreachable-after", "0s"}, io.Discard, &stderr)
	if code == 0 || !strings.Contains(stderr.String(), "--unreachable-after must be positive") {
		t.Errorf("got exit %d, %q; want a usage error naming --unreachable-after", code, stderr.String())
	}
}
