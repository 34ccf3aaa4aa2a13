package controller

import (
	"encoding/binary"
	"encoding/json"
	"fmt"
	"strconv"
	"time"

	bolt "go.etcd.io/bbolt"
)

// Buckets of the controller's part of the state file. Values are JSON; keys are ids.
var (
	bucketDevices  = []byte("devices")  // device id -> Device
	bucketRollouts = []byte("rollouts") // rollout id -> rolloutRecord
	bucketJobs     = []byte("jobs")     // rollout id + 0x00 + device id -> Job
	bucketEvents   = []byte("events")   // rollout id -> bucket: 8-byte big-endian seq -> Event
)

// rolloutRecord is a rollout as stored. Counts are not stored while the rollout is open: they
// are derived from the jobs and the registry when the state file is opened, so they cannot
// disagree with them.
type rolloutRecord struct {
	ID      string      `json:"id"`
	Seq     uint64      `json:"seq"` // numeric part of the id, for ordering
	Model   string      `json:"model"`
	Version string      `json:"version"`
	SHA256  string      `json:"sha256"`
	Size    int64       `json:"size"`
	State   string      `json:"state"`
	Reason  string      `json:"reason,omitempty"`
	Spec    RolloutSpec `json:"spec"`
	Created time.Time   `json:"created"`
	Updated time.Time   `json:"updated"`

	// Bounds are the exclusive upper bounds of each wave's hash positions, fixed when the
	// rollout was planned so that a device's wave never changes.
	Bounds       []uint64    `json:"bounds"`
	WavesStarted int         `json:"waves_started"`
	WaveStarted  []time.Time `json:"wave_started"`
	WaveGateMet  []time.Time `json:"wave_gate_met"`
	// Session is the start of the window session that started the latest wave.
	Session time.Time `json:"session,omitzero"`
	// AbortBase holds, per wave, the failed and finished counts when the operator last
	// resumed: the abort rule judges what happened since.
	AbortBase [][2]int `json:"abort_base,omitempty"`

	// Final holds the counts of a closed rollout (superseded or canceled), whose jobs are no
	// longer indexed in memory.
	Final      map[string]int   `json:"final,omitempty"`
	FinalWaves []map[string]int `json:"final_waves,omitempty"`
	FinalTotal int              `json:"final_total,omitempty"`
}

func createBuckets(tx *bolt.Tx) error {
	for _, b := range [][]byte{bucketDevices, bucketRollouts, bucketJobs, bucketEvents} {
		if _, err := tx.CreateBucketIfNotExists(b); err != nil {
			return fmt.Errorf("create bucket %s: %w", b, err)
		}
	}
	return nil
}

func jobKey(rollout, device string) []byte {
	return []byte(rollout + "\x00" + device)
}

func getJSON(tx *bolt.Tx, bucket, key []byte, v any) (bool, error) {
	data := tx.Bucket(bucket).Get(key)
	if data == nil {
		return false, nil
	}
	if err := json.Unmarshal(data, v); err != nil {
		return false, fmt.Errorf("decode %s/%q: %w", bucket, key, err)
	}
	return true, nil
}

func putJSON(tx *bolt.Tx, bucket, key []byte, v any) error {
	data, err := json.Marshal(v)
	if err != nil {
		return fmt.Errorf("encode %s/%q: %w", bucket, key, err)
	}
	return tx.Bucket(bucket).Put(key, data)
}

func getDevice(tx *bolt.Tx, id string) (Device, bool, error) {
	var d Device
	ok, err := getJSON(tx, bucketDevices, []byte(id), &d)
	return d, ok, err
}

func putDevice(tx *bolt.Tx, d Device) error {
	return putJSON(tx, bucketDevices, []byte(d.ID), d)
}

func putJob(tx *bolt.Tx, j Job) error {
	return putJSON(tx, bucketJobs, jobKey(j.Rollout, j.Device), j)
}

func putRollout(tx *bolt.Tx, r rolloutRecord) error {
	return putJSON(tx, bucketRollouts, []byte(r.ID), r)
}

func getRollout(tx *bolt.Tx, id string) (rolloutRecord, bool, error) {
	var r rolloutRecord
	ok, err := getJSON(tx, bucketRollouts, []byte(id), &r)
	return r, ok, err
}

// eachJob calls fn for every job of a rollout, in device id order, starting after device
// id after.
func eachJob(tx *bolt.Tx, rollout, after string, fn func(Job) (bool, error)) error {
	prefix := []byte(rollout + "\x00")
	start := prefix
	if after != "" {
		start = append(jobKey(rollout, after), 0)
	}
	c := tx.Bucket(bucketJobs).Cursor()
	for k, v := c.Seek(start); k != nil && hasPrefix(k, prefix); k, v = c.Next() {
		var j Job
		if err := json.Unmarshal(v, &j); err != nil {
			return fmt.Errorf("decode job %q: %w", k, err)
		}
		more, err := fn(j)
		if err != nil || !more {
			return err
		}
	}
	return nil
}

func hasPrefix(b, prefix []byte) bool {
	return len(b) >= len(prefix) && string(b[:len(prefix)]) == string(prefix)
}

// rolloutID names the n-th rollout.
func rolloutID(n uint64) string { return "r" + strconv.FormatUint(n, 10) }

// jobID names a device's n-th offer of a rollout; the device sees only this string.
func jobID(rollout string, n int) string {
	return rollout + "-" + strconv.Itoa(n)
}

func seqKey(seq uint64) []byte {
	return binary.BigEndian.AppendUint64(nil, seq)
}

// appendEvent writes entry e of a rollout's log and drops the entry that falls out of the
// ring of keep entries.
func appendEvent(tx *bolt.Tx, rollout string, e Event, keep uint64) error {
	b, err := tx.Bucket(bucketEvents).CreateBucketIfNotExists([]byte(rollout))
	if err != nil {
		return fmt.Errorf("event log of %s: %w", rollout, err)
	}
	data, err := json.Marshal(e)
	if err != nil {
		return fmt.Errorf("encode event: %w", err)
	}
	if err := b.Put(seqKey(e.Seq), data); err != nil {
		return err
	}
	if e.Seq > keep {
		return b.Delete(seqKey(e.Seq - keep))
	}
	return nil
}

// lastEventSeq returns the sequence number of a rollout's latest log entry.
func lastEventSeq(tx *bolt.Tx, rollout string) uint64 {
	b := tx.Bucket(bucketEvents).Bucket([]byte(rollout))
	if b == nil {
		return 0
	}
	k, _ := b.Cursor().Last()
	if len(k) != 8 {
		return 0
	}
	return binary.BigEndian.Uint64(k)
}
