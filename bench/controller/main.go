// Command controller measures fota's rollout controller on a real bbolt file with fsync:
// device events durably stored per second, against a baseline of one bbolt transaction per
// event measured in the same run, and the time to plan a rollout over a fleet of registered
// devices (a million by default), with the time to register them and to load them at start.
//
//	go run ./bench/controller
//	go run ./bench/controller -devices 1000000 -events 200000 -senders 1000
package main

import (
	"context"
	"encoding/json"
	"flag"
	"fmt"
	"os"
	"path/filepath"
	"sync"
	"time"

	"github.com/fota-dev/fota/controller"
	"github.com/fota-dev/fota/protocol"
	bolt "go.etcd.io/bbolt"
)

func main() {
	devices := flag.Int("devices", 1_000_000, "registered devices for the planning measurement")
	events := flag.Int("events", 200_000, "device events for the throughput measurement")
	senders := flag.Int("senders", 1000, "devices sending events at once (each waits for its event to be stored)")
	dir := flag.String("dir", "", "directory for the state files (default a temp dir, removed after)")
	asJSON := flag.Bool("json", false, "print the results as one JSON object at the end instead of lines (for bench/suite)")
	flag.Parse()
	if err := run(*devices, *events, *senders, *dir, *asJSON); err != nil {
		fmt.Fprintln(os.Stderr, "bench:", err)
		os.Exit(1)
	}
}

// discard is a Publisher that drops everything.
type discard struct{}

func (discard) Publish(string, []byte, byte) error { return nil }

// firmware is one release of a fake 1 MiB image.
type firmware struct{}

func (firmware) Manifest(model, version string) (protocol.Manifest, error) {
	return protocol.Manifest{V: 1, Model: model, Version: version, Counter: 2, Size: 1 << 20, SHA256: fmt.Sprintf("%064x", 1)}, nil
}

func (firmware) ReadAt(sha string, p []byte, off int64) (int, error) { return len(p), nil }

// results are the measurements, as -json prints them.
type results struct {
	Senders         int     `json:"senders"`
	Events          int     `json:"events"`
	BaselineEvents  int     `json:"baseline_events"`
	BaselineRate    float64 `json:"baseline_events_per_s"`
	GroupRate       float64 `json:"events_per_s"`
	WritesPerCommit float64 `json:"writes_per_commit"`
	Devices         int     `json:"devices"`
	RegisterS       float64 `json:"register_s"`
	LoadS           float64 `json:"load_s"`
	PlanS           float64 `json:"plan_s"`
}

func run(devices, events, senders int, dir string, asJSON bool) error {
	printf := func(format string, args ...any) {
		if !asJSON {
			fmt.Printf(format, args...)
		}
	}
	if dir == "" {
		d, err := os.MkdirTemp("", "fota-bench-")
		if err != nil {
			return err
		}
		defer os.RemoveAll(d)
		dir = d
	}
	printf("bbolt with fsync in %s; %d senders\n\n", dir, senders)

	base, err := baseline(filepath.Join(dir, "baseline.db"), events/10, senders)
	if err != nil {
		return fmt.Errorf("baseline: %w", err)
	}
	printf("%-44s %10.0f events/s\n", "baseline: one bbolt transaction per event", base)
	gc, perCommit, err := groupCommit(filepath.Join(dir, "events.db"), events, senders)
	if err != nil {
		return fmt.Errorf("group commit: %w", err)
	}
	printf("%-44s %10.0f events/s  (%.1fx baseline, %.0f writes per commit)\n", "controller: group commit", gc, gc/base, perCommit)

	reg, load, plan, err := planning(filepath.Join(dir, "plan.db"), devices, senders)
	if err != nil {
		return fmt.Errorf("planning: %w", err)
	}
	printf("\n%-44s %10.2f s (%.0f/s)\n", fmt.Sprintf("register %d devices (status messages)", devices), reg.Seconds(), float64(devices)/reg.Seconds())
	printf("%-44s %10.2f s\n", "load the registry at start", load.Seconds())
	printf("%-44s %10.2f s\n", fmt.Sprintf("plan a rollout over %d devices", devices), plan.Seconds())
	if asJSON {
		enc := json.NewEncoder(os.Stdout)
		enc.SetIndent("", "  ")
		enc.SetEscapeHTML(false)
		return enc.Encode(results{
			Senders: senders, Events: events, BaselineEvents: events / 10, BaselineRate: base,
			GroupRate: gc, WritesPerCommit: perCommit, Devices: devices,
			RegisterS: reg.Seconds(), LoadS: load.Seconds(), PlanS: plan.Seconds(),
		})
	}
	return nil
}

func open(path string) (*bolt.DB, error) {
	return bolt.Open(path, 0o600, &bolt.Options{Timeout: time.Second})
}

// each runs n calls of fn spread over workers goroutines, each with its own worker index and
// a sequence number from 1.
func each(n, workers int, fn func(w, seq int)) {
	var wg sync.WaitGroup
	for w := range workers {
		count := n / workers
		if w < n%workers {
			count++
		}
		wg.Go(func() {
			for s := 1; s <= count; s++ {
				fn(w, s)
			}
		})
	}
	wg.Wait()
}

// baseline stores each event's job record in a transaction of its own.
func baseline(path string, n, senders int) (float64, error) {
	db, err := open(path)
	if err != nil {
		return 0, err
	}
	defer db.Close()
	bucket := []byte("jobs")
	if err := db.Update(func(tx *bolt.Tx) error { _, err := tx.CreateBucketIfNotExists(bucket); return err }); err != nil {
		return 0, err
	}
	start := time.Now()
	var mu sync.Mutex
	var first error
	each(n, senders, func(w, seq int) {
		j := controller.Job{ID: "r1-1", Rollout: "r1", Device: fmt.Sprintf("dev-%07d", w), State: controller.JobDownloading, Seq: uint64(seq), Bytes: int64(seq) << 10}
		err := db.Update(func(tx *bolt.Tx) error {
			b, err := json.Marshal(j)
			if err != nil {
				return err
			}
			return tx.Bucket(bucket).Put([]byte(j.Rollout+"\x00"+j.Device), b)
		})
		if err != nil {
			mu.Lock()
			first = err
			mu.Unlock()
		}
	})
	return float64(n) / time.Since(start).Seconds(), first
}

func newController(db *bolt.DB) (*controller.Controller, error) {
	c, err := controller.New(controller.Options{DB: db, Publisher: discard{}, Firmware: firmware{}, TickInterval: -1})
	if err != nil {
		return nil, err
	}
	return c, c.Start()
}

func status(c *controller.Controller, id string) {
	st, _ := json.Marshal(protocol.Status{V: 1, Model: "primehub", Version: "7.27.0", State: protocol.StateIdle})
	c.HandleMessage(id, protocol.SuffixStatus, st)
}

// groupCommit sends events through the controller's whole path, senders devices at once.
func groupCommit(path string, n, senders int) (rate, perCommit float64, err error) {
	db, err := open(path)
	if err != nil {
		return 0, 0, err
	}
	defer db.Close()
	c, err := newController(db)
	if err != nil {
		return 0, 0, err
	}
	defer c.Close(context.Background())
	ctx := context.Background()
	if _, err := c.CreateRollout(ctx, controller.RolloutSpec{Model: "primehub", Version: "7.28.0", MaxConcurrent: senders}); err != nil {
		return 0, 0, err
	}
	jobs := make([]string, senders)
	each(senders, senders, func(w, _ int) {
		id := fmt.Sprintf("dev-%07d", w)
		status(c, id)
		d, _ := c.GetDevice(id)
		jobs[w] = d.Job
	})
	for w, j := range jobs {
		if j == "" {
			return 0, 0, fmt.Errorf("device %d was not offered", w)
		}
	}
	commits, writes := c.Stats().Commits.Load(), c.Stats().Writes.Load()
	start := time.Now()
	each(n, senders, func(w, seq int) {
		ev, _ := json.Marshal(protocol.Event{V: 1, Job: jobs[w], Seq: uint64(seq), State: protocol.StateDownloading, Bytes: int64(seq) << 10})
		c.HandleMessage(fmt.Sprintf("dev-%07d", w), protocol.SuffixEvent, ev)
	})
	rate = float64(n) / time.Since(start).Seconds()
	if bad := c.Stats().BadMessages.Load() + c.Stats().StaleEvents.Load(); bad > 0 {
		return 0, 0, fmt.Errorf("%d events refused or stale", bad)
	}
	if k := c.Stats().Commits.Load() - commits; k > 0 {
		perCommit = float64(c.Stats().Writes.Load()-writes) / float64(k)
	}
	return rate, perCommit, nil
}

// planning registers n devices, restarts the controller, and plans a rollout over them.
func planning(path string, n, senders int) (reg, load, plan time.Duration, err error) {
	db, err := open(path)
	if err != nil {
		return 0, 0, 0, err
	}
	defer db.Close()
	c, err := newController(db)
	if err != nil {
		return 0, 0, 0, err
	}
	start := time.Now()
	each(n, senders, func(w, seq int) { status(c, fmt.Sprintf("dev-%07d", (seq-1)*senders+w)) })
	reg = time.Since(start)
	if err := c.Close(context.Background()); err != nil {
		return 0, 0, 0, err
	}
	start = time.Now()
	c, err = newController(db)
	if err != nil {
		return 0, 0, 0, err
	}
	load = time.Since(start)
	defer c.Close(context.Background())
	start = time.Now()
	r, err := c.CreateRollout(context.Background(), controller.RolloutSpec{Model: "primehub", Version: "7.28.0", Waves: []int{1, 10, 50, 100}})
	plan = time.Since(start)
	if err != nil {
		return 0, 0, 0, err
	}
	if r.Devices != n {
		return 0, 0, 0, fmt.Errorf("planned %d devices, want %d", r.Devices, n)
	}
	return reg, load, plan, nil
}
