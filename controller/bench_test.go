package controller

import (
	"context"
	"encoding/json"
	"fmt"
	"path/filepath"
	"sync"
	"sync/atomic"
	"testing"
	"time"

	"github.com/fota-dev/fota/protocol"
	bolt "go.etcd.io/bbolt"
)

// Benchmarks. They use real bbolt files with fsync (never NoSync), in b.TempDir():
//
//	go test -run '^$' -bench 'Events' -benchtime 100000x ./controller/
//	go test -run '^$' -bench 'Plan1M' -benchtime 1x -timeout 30m ./controller/

// discard is a Publisher that drops everything.
type discard struct{}

func (discard) Publish(string, []byte, byte) error { return nil }

const benchDevices = 1000 // devices sending events at once

// baselineEventsPerSec is what the update-per-event baseline measured in this run.
var baselineEventsPerSec atomic.Uint64

// BenchmarkEvents measures device events durably stored per second. The baseline writes each
// event's job record in its own bbolt transaction (one fsync per event), as a controller
// without group commit would; group-commit runs the controller's whole event path
// (decode, decide, group commit, act) from benchDevices devices at once.
func BenchmarkEvents(b *testing.B) {
	b.Run("baseline-update-per-event", func(b *testing.B) {
		db := benchDB(b)
		job := Job{ID: "r1-1", Rollout: "r1", State: JobDownloading, To: "7.28.0", Size: 1 << 20}
		if err := db.Update(createBuckets); err != nil {
			b.Fatal(err)
		}
		b.ResetTimer()
		start := time.Now()
		runParallel(b.N, benchDevices, func(dev, seq int) {
			j := job
			j.Device, j.Seq, j.Bytes = fmt.Sprintf("dev-%05d", dev), uint64(seq), int64(seq)*1024
			if err := db.Update(func(tx *bolt.Tx) error { return putJob(tx, j) }); err != nil {
				b.Error(err)
			}
		})
		rate := float64(b.N) / time.Since(start).Seconds()
		baselineEventsPerSec.Store(uint64(rate))
		b.ReportMetric(rate, "events/s")
	})
	b.Run("group-commit", func(b *testing.B) {
		db := benchDB(b)
		fw := &fakeFirmware{model: "primehub", version: "7.28.0", image: make([]byte, 1<<20)}
		c, err := New(Options{DB: db, Publisher: discard{}, Firmware: fw, TickInterval: -1})
		if err != nil {
			b.Fatal(err)
		}
		if err := c.Start(); err != nil {
			b.Fatal(err)
		}
		defer c.Close(context.Background())
		if _, err := c.CreateRollout(context.Background(), RolloutSpec{Model: "primehub", Version: "7.28.0", MaxConcurrent: benchDevices}); err != nil {
			b.Fatal(err)
		}
		jobs := make([]string, benchDevices)
		runParallel(benchDevices, benchDevices, func(dev, _ int) {
			id := fmt.Sprintf("dev-%05d", dev)
			st, _ := json.Marshal(protocol.Status{V: 1, Model: "primehub", Version: "7.27.0", State: protocol.StateIdle})
			c.HandleMessage(id, protocol.SuffixStatus, st)
			d, _ := c.GetDevice(id)
			jobs[dev] = d.Job
		})
		for i, j := range jobs {
			if j == "" {
				b.Fatalf("device %d has no job", i)
			}
		}
		commits, writes := c.Stats().Commits.Load(), c.Stats().Writes.Load()
		b.ResetTimer()
		start := time.Now()
		runParallel(b.N, benchDevices, func(dev, seq int) {
			ev, _ := json.Marshal(protocol.Event{V: 1, Job: jobs[dev], Seq: uint64(seq), State: protocol.StateDownloading, Bytes: int64(seq) * 1024})
			c.HandleMessage(fmt.Sprintf("dev-%05d", dev), protocol.SuffixEvent, ev)
		})
		elapsed := time.Since(start)
		b.StopTimer()
		if bad := c.Stats().BadMessages.Load() + c.Stats().StaleEvents.Load(); bad != 0 {
			b.Fatalf("%d events refused or stale", bad)
		}
		rate := float64(b.N) / elapsed.Seconds()
		b.ReportMetric(rate, "events/s")
		if n := c.Stats().Commits.Load() - commits; n > 0 {
			b.ReportMetric(float64(c.Stats().Writes.Load()-writes)/float64(n), "writes/commit")
		}
		if base := baselineEventsPerSec.Load(); base > 0 {
			b.ReportMetric(rate/float64(base), "x-baseline")
		}
	})
}

// runParallel calls fn n times in all, spread over workers goroutines; each worker is one
// device (dev) calling with seq 1, 2, ... in order, as a device sends its events.
func runParallel(n, workers int, fn func(dev, seq int)) {
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

func benchDB(b *testing.B) *bolt.DB {
	b.Helper()
	db, err := bolt.Open(filepath.Join(b.TempDir(), "fota.db"), 0o600, &bolt.Options{Timeout: time.Second})
	if err != nil {
		b.Fatal(err)
	}
	b.Cleanup(func() { db.Close() })
	return db
}

const planDevices = 1_000_000

// BenchmarkPlan1M measures planning a rollout (selection by tag, four waves) over a million
// registered devices. Loading the registry at start is reported as load-s.
func BenchmarkPlan1M(b *testing.B) {
	if testing.Short() {
		b.Skip("writes a million devices")
	}
	db := benchDB(b)
	if err := db.Update(createBuckets); err != nil {
		b.Fatal(err)
	}
	const perTx = 100_000
	for start := 0; start < planDevices; start += perTx {
		err := db.Update(func(tx *bolt.Tx) error {
			bk := tx.Bucket(bucketDevices)
			bk.FillPercent = 1 // keys arrive in order
			for i := start; i < start+perTx; i++ {
				d := Device{ID: fmt.Sprintf("dev-%07d", i), Model: "primehub", Version: "7.27.0", SHA256: "ab", LastSeen: time.Unix(1e9, 0)}
				if i%2 == 0 {
					d.Tags = map[string]string{"ring": "beta"}
				}
				data, err := json.Marshal(d)
				if err != nil {
					return err
				}
				if err := bk.Put([]byte(d.ID), data); err != nil {
					return err
				}
			}
			return nil
		})
		if err != nil {
			b.Fatal(err)
		}
	}
	fw := &fakeFirmware{model: "primehub", version: "7.28.0", image: make([]byte, 1<<20)}
	loadStart := time.Now()
	c, err := New(Options{DB: db, Publisher: discard{}, Firmware: fw, TickInterval: -1})
	if err != nil {
		b.Fatal(err)
	}
	load := time.Since(loadStart)
	if err := c.Start(); err != nil {
		b.Fatal(err)
	}
	defer c.Close(context.Background())
	spec := RolloutSpec{Model: "primehub", Version: "7.28.0", Tags: map[string]string{"ring": "beta"}, Waves: []int{1, 10, 50, 100}}
	b.ResetTimer()
	var r Rollout
	for range b.N {
		r, err = c.CreateRollout(context.Background(), spec)
		if err != nil {
			b.Fatal(err)
		}
		b.StopTimer()
		if _, err := c.CancelRollout(r.ID); err != nil {
			b.Fatal(err)
		}
		b.StartTimer()
	}
	b.StopTimer()
	if r.Devices != planDevices/2 || r.Waves[0].Devices != planDevices/2/100 {
		b.Fatalf("got %d devices, %d in wave 1; want %d, %d", r.Devices, r.Waves[0].Devices, planDevices/2, planDevices/2/100)
	}
	b.ReportMetric(load.Seconds(), "load-s")
	b.ReportMetric(b.Elapsed().Seconds()/float64(b.N), "plan-s")
}
