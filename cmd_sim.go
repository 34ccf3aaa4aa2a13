package main

import (
	"context"
	"crypto/tls"
	"crypto/x509"
	"errors"
	"fmt"
	"io"
	"log/slog"
	"net"
	"os"
	"os/signal"
	"path/filepath"
	"syscall"

	"github.com/fota-dev/fota/certs"
	"github.com/fota-dev/fota/devicesim"
	"github.com/fota-dev/fota/firmware"
	"github.com/fota-dev/fota/protocol"
)

// maxSimDevices bounds --devices: each device is a TLS connection and ~60 KB of memory.
const maxSimDevices = 100_000

// runSim runs a fleet of simulated devices against a broker.
//
//	fota sim --certs DIR --pubkey F --broker ADDR --devices N --model M --version V
//	         [--image F] [--counter N] [--state-dir DIR] [--until-updated] [--target VERSION]
//	         [--max-chunk BYTES] [--drop-rate P] [--corrupt-rate P] [--disconnect-every N]
//	         [--power-loss-rate P] [--fail-install-rate P] [--rate BYTES] [--seed N]
func runSim(args []string, stdout io.Writer) error {
	fs := newFlags("sim", stdout)
	certsDir := fs.String("certs", os.Getenv("FOTA_CERTS"), "certificate directory: ca.crt, and ca.key to issue device certificates in memory, else devices/ID.crt and .key (default $FOTA_CERTS)")
	broker := fs.String("broker", "127.0.0.1:8883", "broker address, host:port")
	n := fs.Int("devices", 1, "number of devices")
	model := fs.String("model", "", "device model (required)")
	version := fs.String("version", "", "firmware version the devices run (required)")
	imagePath := fs.String("image", "", "file with the firmware the devices run (default none)")
	counter := fs.Uint64("counter", 0, "anti-rollback counter of the firmware the devices run; offers must carry a higher one")
	pubPath := fs.String("pubkey", "", "the release public key (release.pub) the devices pin; only manifests it signed are installed (required)")
	stateDir := fs.String("state-dir", "", "keep each device's slots and state in DIR/ID, and resume from them on the next run (default in memory)")
	prefix := fs.String("prefix", "sim", "device ids are PREFIX-0001, PREFIX-0002, ...")
	until := fs.Bool("until-updated", false, "exit once every device has installed a newer version (or --target); exit 1 if any failed")
	target := fs.String("target", "", "with --until-updated, wait for this version instead of any newer one")
	verbose := fs.Bool("verbose", false, "log every device's progress to stderr")
	maxChunk := fs.Int("max-chunk", 0, "largest chunk each device takes, in bytes (1024 to 65536), announced in its status (default: what the server offers)")
	syncEvery := fs.Int("sync-every", devicesim.DefaultSyncEvery, "with --state-dir, bytes each device receives between two checkpoints of its download")
	dropRate := fs.Float64("drop-rate", 0, "fault: probability that a device drops a chunk frame it received (it asks again after its timeout)")
	corruptRate := fs.Float64("corrupt-rate", 0, "fault: probability that a byte of a received chunk frame is flipped before its CRC check (the chunk is fetched again)")
	disconnectEvery := fs.Int("disconnect-every", 0, "fault: each device cuts its connection, without DISCONNECT, after every N chunk frames it receives (0: never)")
	powerLossRate := fs.Float64("power-loss-rate", 0, "fault: probability per chunk frame that a device loses power and boots again from --state-dir (from scratch without it)")
	failInstallRate := fs.Float64("fail-install-rate", 0, "fault: probability that an install fails (reported failed, reason install; the firmware stays)")
	rate := fs.Int("rate", 0, "bytes per second each device asks for at most (0: no limit)")
	seed := fs.Uint64("seed", 0, "seed of the faults, so that a run can be repeated (0: random)")
	if err := parseFlags(fs, args, 0); err != nil {
		return err
	}

	switch {
	case *certsDir == "":
		return usagef("sim: --certs is required (or set FOTA_CERTS)")
	case *n < 1 || *n > maxSimDevices:
		return usagef("sim: --devices %d: want 1 to %d", *n, maxSimDevices)
	case *pubPath == "":
		return usagef("sim: --pubkey is required: the release public key (release.pub) the devices trust")
	case *model == "":
		return usagef("sim: --model is required")
	case *version == "":
		return usagef("sim: --version is required")
	case *target != "" && !*until:
		return usagef("sim: --target needs --until-updated")
	case *maxChunk != 0 && (*maxChunk < protocol.MinChunkSize || *maxChunk > protocol.MaxChunkSize):
		return usagef("sim: --max-chunk %d: want %d to %d", *maxChunk, protocol.MinChunkSize, protocol.MaxChunkSize)
	case *syncEvery < 1:
		return usagef("sim: --sync-every %d: want at least 1 byte", *syncEvery)
	case *disconnectEvery < 0:
		return usagef("sim: --disconnect-every %d: want a number of chunks, 0 for never", *disconnectEvery)
	case *rate < 0:
		return usagef("sim: --rate %d: want bytes per second, 0 for no limit", *rate)
	}
	for _, p := range []struct {
		name string
		v    float64
	}{{"drop-rate", *dropRate}, {"corrupt-rate", *corruptRate}, {"power-loss-rate", *powerLossRate}, {"fail-install-rate", *failInstallRate}} {
		if !(p.v >= 0 && p.v <= 1) {
			return usagef("sim: --%s %v: want a probability from 0 to 1", p.name, p.v)
		}
	}
	if _, err := protocol.ParseVersion(*version); err != nil {
		return usagef("sim: --version: %v", err)
	}
	if *target != "" {
		c, err := protocol.CompareVersions(*target, *version)
		if err != nil {
			return usagef("sim: --target: %v", err)
		}
		if c <= 0 {
			return usagef("sim: --target %s is not newer than --version %s", *target, *version)
		}
	}
	if err := protocol.ValidDeviceID(*prefix + "-0001"); err != nil {
		return usagef("sim: --prefix: %v", err)
	}
	host, _, err := net.SplitHostPort(*broker)
	if err != nil {
		return usagef("sim: --broker %q: %v", *broker, err)
	}
	if host == "" {
		host = "localhost"
	}

	var image []byte
	if *imagePath != "" {
		fi, err := os.Stat(*imagePath)
		if err != nil {
			return fmt.Errorf("sim: image: %w", err)
		}
		if fi.Size() > devicesim.MaxImageSize {
			return fmt.Errorf("sim: image %s is %d bytes, at most %d", *imagePath, fi.Size(), devicesim.MaxImageSize)
		}
		if image, err = os.ReadFile(*imagePath); err != nil {
			return fmt.Errorf("sim: image: %w", err)
		}
	}
	pub, err := firmware.LoadPublicKey(*pubPath)
	if err != nil {
		return fmt.Errorf("sim: --pubkey: %w", err)
	}
	tlsFor, err := simTLS(*certsDir, host, *model)
	if err != nil {
		return fmt.Errorf("sim: %w", err)
	}

	level := slog.LevelWarn
	if *verbose {
		level = slog.LevelInfo
	}
	ctx, stop := signal.NotifyContext(context.Background(), os.Interrupt, syscall.SIGTERM)
	defer stop()
	rs, err := devicesim.RunFleet(ctx, devicesim.FleetConfig{
		N: *n, Model: *model, Version: *version, Image: image, Counter: *counter,
		PublicKey: pub, StateDir: *stateDir, Broker: *broker,
		TLSFor:       tlsFor,
		IDPrefix:     *prefix,
		UntilVersion: *target,
		UntilUpdated: *until && *target == "",
		Logger:       slog.New(slog.NewTextHandler(os.Stderr, &slog.HandlerOptions{Level: level})),
		MaxChunk:     *maxChunk, SyncEvery: *syncEvery,
		DropRate: *dropRate, CorruptRate: *corruptRate, DisconnectEvery: *disconnectEvery,
		PowerLossRate: *powerLossRate, FailInstallRate: *failInstallRate, Rate: *rate, Seed: *seed,
	})
	if rs == nil {
		return fmt.Errorf("sim: %w", err)
	}
	devicesim.WriteSummary(stdout, rs)
	if !*until {
		if err != nil && !errors.Is(err, context.Canceled) {
			return fmt.Errorf("sim: %w", err)
		}
		return nil // stopped by a signal, as intended
	}
	if err != nil {
		return fmt.Errorf("sim: stopped before every device was updated: %w", err)
	}
	failed := 0
	for _, r := range rs {
		if r.State == protocol.StateFailed {
			failed++
		}
	}
	if failed > 0 {
		return fmt.Errorf("sim: %d of %d devices failed", failed, len(rs))
	}
	return nil
}

// deviceTLSFor returns the client configuration of each device of a fleet that reaches the
// broker at broker (host:port), with certificates that name no model; see simTLS.
func deviceTLSFor(dir, broker string) (func(id string) (*tls.Config, error), error) {
	host, _, err := net.SplitHostPort(broker)
	if err != nil {
		return nil, fmt.Errorf("broker %q: %w", broker, err)
	}
	if host == "" {
		host = "localhost"
	}
	return simTLS(dir, host, "")
}

// simTLS returns the client configuration of each simulated device, trusting dir's CA and
// checking the server's certificate for serverName. With the CA key at hand certificates are
// issued in memory (naming model, when set), so any number of devices can run without
// issuing files; otherwise they are loaded from dir/devices.
func simTLS(dir, serverName, model string) (func(id string) (*tls.Config, error), error) {
	caPath := filepath.Join(dir, certs.CAFile)
	pem, err := os.ReadFile(caPath)
	if err != nil {
		return nil, fmt.Errorf("read CA: %w", err)
	}
	pool := x509.NewCertPool()
	if !pool.AppendCertsFromPEM(pem) {
		return nil, fmt.Errorf("read CA: %s holds no certificate", caPath)
	}
	config := func(c tls.Certificate) *tls.Config {
		return &tls.Config{
			MinVersion:   tls.VersionTLS12,
			Certificates: []tls.Certificate{c},
			RootCAs:      pool,
			ServerName:   serverName,
		}
	}

	if _, err := os.Stat(filepath.Join(dir, certs.CAKeyFile)); err == nil {
		ca, err := certs.LoadAuthority(dir)
		if err != nil {
			return nil, err
		}
		return func(id string) (*tls.Config, error) {
			c, err := ca.DeviceTLS(id, certs.IssueOptions{Model: model})
			if err != nil {
				return nil, err
			}
			// A client never reads its own parsed certificate; without it each of thousands
			// of devices holds about 3.5 KB less.
			c.Leaf = nil
			return config(c), nil
		}, nil
	} else if !errors.Is(err, os.ErrNotExist) {
		return nil, fmt.Errorf("CA key: %w", err)
	}
	return func(id string) (*tls.Config, error) {
		c, err := certs.LoadDeviceTLS(dir, id)
		if err != nil {
			return nil, err
		}
		return config(c), nil
	}, nil
}
