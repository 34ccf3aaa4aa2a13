package devicesim

import (
	"context"
	"crypto/ed25519"
	"crypto/tls"
	"fmt"
	"io"
	"log/slog"
	"math/rand/v2"
	"slices"
	"strings"
	"sync"
	"text/tabwriter"
	"time"

	"github.com/fota-dev/fota/protocol"
)

// Fleet start-up: devices connect one after another, at most staggerMax apart and within
// staggerTotal overall, so the broker does not take every TLS handshake in the same instant.
const (
	staggerMax   = 20 * time.Millisecond
	staggerTotal = 2 * time.Second
)

// FleetConfig describes a fleet of identical devices.
type FleetConfig struct {
	N              int
	Model, Version string
	Image          []byte
	Counter        uint64            // anti-rollback counter of Version; see Config
	PublicKey      ed25519.PublicKey // pinned release key; required
	StateDir       string            // optional; device ID keeps its state in StateDir/ID
	Broker         string
	TLSFor         func(id string) (*tls.Config, error) // certificate per device
	IDPrefix       string                               // ids IDPrefix-0001 ...; default "sim"
	// UntilVersion, when set, makes RunFleet return once every device runs this version
	// (or has failed).
	UntilVersion string
	// UntilUpdated makes RunFleet return once every device runs a version newer than Version
	// (or has failed).
	UntilUpdated   bool
	RequestTimeout time.Duration // per device; zero means DefaultRequestTimeout
	Logger         *slog.Logger

	// Per device, as in Config.
	MaxChunk        int
	SyncEvery       int
	DropRate        float64
	CorruptRate     float64
	DisconnectEvery int
	PowerLossRate   float64
	FailInstallRate float64
	Rate            int
	// Seed seeds every device's faults, each with its own id; 0 picks a random seed.
	Seed uint64
}

// RunFleet starts cfg.N devices and runs them until the UntilVersion or UntilUpdated
// condition holds for all of them, or until ctx ends; then it returns ctx.Err() with the
// results so far. Results are sorted by device id.
func RunFleet(ctx context.Context, cfg FleetConfig) ([]Result, error) {
	if cfg.N < 1 {
		return nil, fmt.Errorf("run fleet: %d devices", cfg.N)
	}
	if cfg.TLSFor == nil {
		return nil, fmt.Errorf("run fleet: no TLSFor")
	}
	if cfg.PublicKey == nil {
		return nil, fmt.Errorf("run fleet: no PublicKey: devices install only what the release key signed")
	}
	if cfg.IDPrefix == "" {
		cfg.IDPrefix = "sim"
	}
	if cfg.Logger == nil {
		cfg.Logger = slog.New(slog.DiscardHandler)
	}
	if cfg.UntilVersion != "" {
		if _, err := protocol.ParseVersion(cfg.UntilVersion); err != nil {
			return nil, fmt.Errorf("run fleet: until: %w", err)
		}
	}
	if cfg.Seed == 0 {
		cfg.Seed = rand.Uint64() // one seed for the fleet, so the log can name it
	}
	cfg.Logger.Info("fleet", "devices", cfg.N, "seed", cfg.Seed)
	changed := make(chan struct{}, 1)
	images := new(imageCache)
	devs := make([]*Device, cfg.N)
	for i := range devs {
		id := fmt.Sprintf("%s-%04d", cfg.IDPrefix, i+1)
		tc, err := cfg.TLSFor(id)
		if err != nil {
			return nil, fmt.Errorf("run fleet: %s: %w", id, err)
		}
		d, err := New(Config{
			ID: id, Model: cfg.Model, Version: cfg.Version, Image: cfg.Image, Counter: cfg.Counter,
			PublicKey: cfg.PublicKey, StateDir: cfg.StateDir,
			Broker: cfg.Broker, TLS: tc, Logger: cfg.Logger, RequestTimeout: cfg.RequestTimeout,
			MaxChunk: cfg.MaxChunk, SyncEvery: cfg.SyncEvery,
			DropRate: cfg.DropRate, CorruptRate: cfg.CorruptRate, DisconnectEvery: cfg.DisconnectEvery,
			PowerLossRate: cfg.PowerLossRate, FailInstallRate: cfg.FailInstallRate, Rate: cfg.Rate,
			Seed:   cfg.Seed,
			notify: changed, images: images,
		})
		if err != nil {
			return nil, fmt.Errorf("run fleet: %w", err)
		}
		devs[i] = d
	}

	runCtx, cancel := context.WithCancel(ctx)
	defer cancel()
	var wg sync.WaitGroup
	stagger := min(staggerMax, staggerTotal/time.Duration(cfg.N))
	for i, d := range devs {
		wg.Go(func() {
			t := time.NewTimer(time.Duration(i) * stagger)
			defer t.Stop()
			select {
			case <-runCtx.Done():
				return
			case <-t.C:
			}
			d.Run(runCtx) // returns nil once runCtx is done
		})
	}

	var err error
	for err == nil {
		if (cfg.UntilVersion != "" || cfg.UntilUpdated) && fleetDone(devs, cfg) {
			break
		}
		select {
		case <-ctx.Done():
			err = ctx.Err()
		case <-changed:
		}
	}
	cancel()
	wg.Wait()

	rs := make([]Result, len(devs))
	for i, d := range devs {
		rs[i] = d.Result()
	}
	slices.SortFunc(rs, func(a, b Result) int { return strings.Compare(a.ID, b.ID) })
	return rs, err
}

// fleetDone reports whether every device has reached the fleet's goal or failed.
func fleetDone(devs []*Device, cfg FleetConfig) bool {
	for _, d := range devs {
		v, r := d.snapshot()
		switch {
		case r.State == protocol.StateFailed:
			continue
		case r.State == protocol.StateInstalling:
			return false // not rebooted yet
		case cfg.UntilVersion != "":
			if c, err := protocol.CompareVersions(v, cfg.UntilVersion); err != nil || c != 0 {
				return false
			}
		default:
			if c, err := protocol.CompareVersions(v, cfg.Version); err != nil || c <= 0 {
				return false
			}
		}
	}
	return true
}

// WriteSummary prints one line per result, and a total.
func WriteSummary(w io.Writer, rs []Result) {
	tw := tabwriter.NewWriter(w, 0, 0, 2, ' ', 0)
	fmt.Fprintln(tw, "DEVICE\tFROM\tTO\tBYTES\tAS\tSECONDS\tSTATE")
	counts := map[string]int{}
	for _, r := range rs {
		state := r.State
		if r.Reason != "" {
			state += " (" + r.Reason + ")"
		}
		to := r.To
		if to == "" {
			to = "-"
		}
		as := "-"
		switch {
		case r.Bytes > 0 && r.Delta:
			as = "delta"
		case r.Bytes > 0:
			as = "image"
		}
		fmt.Fprintf(tw, "%s\t%s\t%s\t%d\t%s\t%.2f\t%s\n", r.ID, r.From, to, r.Bytes, as, r.Duration.Seconds(), state)
		counts[r.State]++
	}
	tw.Flush()
	fmt.Fprintf(w, "%d devices: %d installed, %d failed, %d other\n", len(rs),
		counts[protocol.StateInstalled], counts[protocol.StateFailed],
		len(rs)-counts[protocol.StateInstalled]-counts[protocol.StateFailed])
}
