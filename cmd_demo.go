package main

import (
	"bytes"
	"context"
	"embed"
	"fmt"
	"io"
	"log/slog"
	"os"
	"path/filepath"
	"time"

	"github.com/fota-dev/fota/api"
	"github.com/fota-dev/fota/certs"
	"github.com/fota-dev/fota/controller"
	"github.com/fota-dev/fota/devicesim"
	"github.com/fota-dev/fota/firmware"
)

// demoFirmware holds two real releases of one device's firmware; see demofirmware/NOTICE.md.
//
//go:embed demofirmware/pybricks-primehub-7.27.0.bin demofirmware/pybricks-primehub-7.28.0.bin
var demoFirmware embed.FS

const (
	demoModel   = "primehub"
	demoFrom    = "7.27.0"
	demoTo      = "7.28.0"
	demoDevices = 20
)

func demoImage(version string) []byte {
	b, err := demoFirmware.ReadFile("demofirmware/pybricks-primehub-" + version + ".bin")
	if err != nil {
		panic("embedded demo firmware missing: " + err.Error()) // a build defect, not input
	}
	return b
}

func runDemo(args []string, stdout io.Writer) error {
	fs := newFlags("demo", stdout)
	n := fs.Int("devices", demoDevices, "number of simulated devices")
	timeout := fs.Duration("timeout", 2*time.Minute, "give up after this long")
	verbose := fs.Bool("v", false, "show server logs")
	if err := parseFlags(fs, args, 0); err != nil {
		return err
	}
	if *n < 1 || *n > 10000 {
		return usagef("demo: --devices must be between 1 and 10000")
	}
	level := slog.LevelWarn
	if *verbose {
		level = slog.LevelInfo
	}
	logger := slog.New(slog.NewTextHandler(os.Stderr, &slog.HandlerOptions{Level: level}))
	ctx, cancel := context.WithTimeout(context.Background(), *timeout)
	defer cancel()
	return demo(ctx, *n, stdout, logger)
}

// demo runs the whole product on loopback in a temp dir: certificates, server, two firmware
// releases, n simulated devices on the old one, and a rollout to the new one.
func demo(ctx context.Context, n int, out io.Writer, logger *slog.Logger) error {
	dir, err := os.MkdirTemp("", "fota-demo-")
	if err != nil {
		return err
	}
	defer os.RemoveAll(dir)
	certsDir := filepath.Join(dir, "certs")
	if err := certs.Init(certsDir, certs.InitOptions{}); err != nil {
		return fmt.Errorf("certificates: %w", err)
	}
	fmt.Fprintf(out, "demo: certificates in %s\n", certsDir)

	srv, err := startServer(serverConfig{
		DataDir: filepath.Join(dir, "data"), CertsDir: certsDir,
		MQTTAddr: "127.0.0.1:0", APIAddr: "127.0.0.1:0", Logger: logger,
	})
	if err != nil {
		return err
	}
	defer srv.Close(context.Background())
	brokerAddr := srv.broker.Addr().String()
	fmt.Fprintf(out, "demo: server up, mqtts://%s, admin API https://%s\n", brokerAddr, srv.api.Addr())

	adminTLS, err := certs.ClientTLS(certsDir, certs.AdminCertFile, certs.AdminKeyFile)
	if err != nil {
		return err
	}
	client := api.NewClient("https://"+srv.api.Addr().String(), adminTLS)
	var fromCounter uint64
	for _, v := range []string{demoFrom, demoTo} {
		f, _, err := client.AddFirmware(ctx, demoModel, v, "demo", bytes.NewReader(demoImage(v)))
		if err != nil {
			return fmt.Errorf("add firmware %s: %w", v, err)
		}
		if v == demoFrom {
			fromCounter = f.Counter
		}
		fmt.Fprintf(out, "demo: firmware %s %s added, %d bytes, sha256 %s, counter %d, signed\n", f.Model, f.Version, f.Size, f.SHA256[:16], f.Counter)
	}
	pub, err := firmware.LoadPublicKey(srv.releasePub)
	if err != nil {
		return err
	}

	tlsFor, err := deviceTLSFor(certsDir, brokerAddr)
	if err != nil {
		return err
	}
	type fleetResult struct {
		rs  []devicesim.Result
		err error
	}
	done := make(chan fleetResult, 1)
	start := time.Now()
	go func() {
		rs, err := devicesim.RunFleet(ctx, devicesim.FleetConfig{
			N: n, Model: demoModel, Version: demoFrom, Image: demoImage(demoFrom), Counter: fromCounter,
			PublicKey: pub, Broker: brokerAddr, TLSFor: tlsFor, IDPrefix: "demo", UntilVersion: demoTo, Logger: logger,
		})
		done <- fleetResult{rs, err}
	}()
	fmt.Fprintf(out, "demo: %d devices starting on %s\n", n, demoFrom)
	if err := waitOnline(ctx, client, n); err != nil {
		return err
	}
	r, err := client.CreateRollout(ctx, controller.RolloutSpec{Model: demoModel, Version: demoTo})
	if err != nil {
		return fmt.Errorf("create rollout: %w", err)
	}
	fmt.Fprintf(out, "demo: rollout %s of %s %s created\n", r.ID, r.Model, r.Version)

	res := <-done
	if res.err != nil {
		return fmt.Errorf("devices: %w", res.err)
	}
	fmt.Fprintln(out)
	devicesim.WriteSummary(out, res.rs)
	fmt.Fprintln(out)

	for _, x := range res.rs {
		if x.State != controller.JobInstalled || x.To != demoTo {
			return fmt.Errorf("device %s ended %s (%s)", x.ID, x.State, x.Reason)
		}
	}
	// The devices are done; the server records their last reports a moment later.
	detail, err := waitFinished(ctx, client, r.ID, n)
	if err != nil {
		return err
	}
	installed := detail.Counts[controller.JobInstalled]
	fmt.Fprintf(out, "demo: rollout %s %s: %d of %d devices installed %s in %.1fs\n",
		detail.ID, detail.State, installed, n, demoTo, time.Since(start).Seconds())
	if installed != n {
		return fmt.Errorf("server counts %d installed, want %d", installed, n)
	}
	return nil
}

// waitFinished polls a rollout until n of its jobs finished, installed or failed.
func waitFinished(ctx context.Context, client *api.Client, id string, n int) (controller.RolloutDetail, error) {
	for {
		d, err := client.GetRollout(ctx, id)
		if err != nil {
			return d, err
		}
		if d.Counts[controller.JobInstalled]+d.Counts[controller.JobFailed] >= n {
			return d, nil
		}
		select {
		case <-ctx.Done():
			return d, fmt.Errorf("waiting for rollout %s: %v: %w", id, d.Counts, ctx.Err())
		case <-time.After(50 * time.Millisecond):
		}
	}
}

// waitOnline polls the registry until n devices are online.
func waitOnline(ctx context.Context, client *api.Client, n int) error {
	for {
		ds, err := client.ListDevices(ctx)
		if err != nil {
			return err
		}
		online := 0
		for _, d := range ds {
			if d.Online {
				online++
			}
		}
		if online >= n {
			return nil
		}
		select {
		case <-ctx.Done():
			return fmt.Errorf("waiting for devices: %d of %d online: %w", online, n, ctx.Err())
		case <-time.After(50 * time.Millisecond):
		}
	}
}
