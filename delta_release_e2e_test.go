package main

import (
	"bytes"
	"context"
	"testing"
	"time"

	"github.com/fota-dev/fota/api"
	"github.com/fota-dev/fota/controller"
	"github.com/fota-dev/fota/devicesim"
	"github.com/fota-dev/fota/firmware"
	"github.com/fota-dev/fota/protocol"
)

// TestRollbackReleaseGetsItsOwnDelta re-releases bytes under a new version, as a deliberate
// rollback and return do, through the real server: 8.0.2 updates the fleet by delta from
// 8.0.1; the fleet is rolled back to 8.0.1's bytes as 8.0.3 (counter 5); 8.0.4, the 8.0.2
// bytes again, must reach every device by a delta signed for 8.0.4 with counter 6. With the
// delta's manifest looked up by image alone, each device was offered 8.0.2's (counter 4) and
// refused it.
func TestRollbackReleaseGetsItsOwnDelta(t *testing.T) {
	srv, certsDir := testServer(t)
	client := adminClient(t, srv, certsDir)
	ctx, cancel := context.WithTimeout(context.Background(), 90*time.Second)
	defer cancel()
	add := func(version string, counter uint64, image []byte) {
		t.Helper()
		if _, _, err := client.UploadFirmware(ctx, api.FirmwareUpload{Model: demoModel, Version: version, Counter: counter, Body: bytes.NewReader(image)}); err != nil {
			t.Fatal(err)
		}
	}
	from, to := demoImage(demoFrom), demoImage(demoTo)
	add("8.0.1", 3, from)
	add("8.0.2", 4, to)
	pub, err := firmware.LoadPublicKey(srv.releasePub)
	if err != nil {
		t.Fatal(err)
	}
	tlsFor, err := deviceTLSFor(certsDir, srv.broker.Addr().String())
	if err != nil {
		t.Fatal(err)
	}
	const n = 3
	// update runs the fleet on version (image, counter) until every device runs until, by a
	// rollout created once each has reported version, and returns the devices' results.
	update := func(version string, image []byte, counter uint64, until string) []devicesim.Result {
		t.Helper()
		done := make(chan []devicesim.Result, 1)
		go func() {
			rs, _ := devicesim.RunFleet(ctx, devicesim.FleetConfig{
				N: n, Model: demoModel, Version: version, Image: image, Counter: counter,
				PublicKey: pub, Broker: srv.broker.Addr().String(), TLSFor: tlsFor, IDPrefix: "rb", UntilVersion: until,
			})
			done <- rs
		}()
		if err := waitReporting(ctx, client, version, n); err != nil {
			t.Fatal(err)
		}
		if _, err := client.CreateRollout(ctx, controller.RolloutSpec{Model: demoModel, Version: until}); err != nil {
			t.Fatal(err)
		}
		return <-done
	}
	check := func(rs []devicesim.Result, to string) {
		t.Helper()
		if len(rs) != n {
			t.Fatalf("got %d results, want %d", len(rs), n)
		}
		for _, r := range rs {
			if r.State != protocol.StateInstalled || r.To != to || !r.Delta {
				t.Errorf("device %s: got %s %q to %s (delta %v), want %s installed by delta", r.ID, r.State, r.Reason, r.To, r.Delta, to)
			}
		}
	}
	check(update("8.0.1", from, 3, "8.0.2"), "8.0.2")

	add("8.0.3", 5, from)
	add("8.0.4", 6, to)
	check(update("8.0.3", from, 5, "8.0.4"), "8.0.4")
	ds, err := client.ListDeltas(ctx)
	if err != nil {
		t.Fatal(err)
	}
	var versions []string
	for _, d := range ds {
		versions = append(versions, d.Version)
	}
	if len(ds) != 2 || ds[0].Version != "8.0.2" || ds[1].Version != "8.0.4" || ds[0].PatchSHA256 != ds[1].PatchSHA256 {
		t.Errorf("deltas: got %d to versions %v, want one each to 8.0.2 and 8.0.4 sharing one patch", len(ds), versions)
	}
}

// waitReporting polls until n devices are online and report version.
func waitReporting(ctx context.Context, client *api.Client, version string, n int) error {
	for {
		ds, err := client.ListDevices(ctx)
		if err != nil {
			return err
		}
		got := 0
		for _, d := range ds {
			if d.Online && d.Version == version {
				got++
			}
		}
		if got >= n {
			return nil
		}
		select {
		case <-ctx.Done():
			return ctx.Err()
		case <-time.After(50 * time.Millisecond):
		}
	}
}
