package controller

import (
	"encoding/json"
	"fmt"
	"strconv"

	bolt "go.etcd.io/bbolt"
)

// Buckets of the controller's part of the state file. Values are JSON; keys are ids.
var (
	bucketDevices  = []byte("devices")  // device id -> Device
	bucketRollouts = []byte("rollouts") // rollout id -> rolloutRecord
	bucketJobs     = []byte("jobs")     // rollout id + 0x00 + device id -> Job
)

// rolloutRecord is a Rollout as stored: counts are derived from the jobs on read.
type rolloutRecord struct {
	Rollout
	Seq uint64 `json:"seq"` // numeric part of the id, for ordering
}

func createBuckets(tx *bolt.Tx) error {
	for _, b := range [][]byte{bucketDevices, bucketRollouts, bucketJobs} {
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

func getJob(tx *bolt.Tx, rollout, device string) (Job, bool, error) {
	var j Job
	ok, err := getJSON(tx, bucketJobs, jobKey(rollout, device), &j)
	return j, ok, err
}

func putJob(tx *bolt.Tx, j Job) error {
	return putJSON(tx, bucketJobs, jobKey(j.Rollout, j.Device), j)
}

func getRollout(tx *bolt.Tx, id string) (rolloutRecord, bool, error) {
	var r rolloutRecord
	ok, err := getJSON(tx, bucketRollouts, []byte(id), &r)
	return r, ok, err
}

func putRollout(tx *bolt.Tx, r rolloutRecord) error {
	return putJSON(tx, bucketRollouts, []byte(r.ID), r)
}

// eachJob calls fn for every job of a rollout, in device id order.
func eachJob(tx *bolt.Tx, rollout string, fn func(Job) error) error {
	prefix := []byte(rollout + "\x00")
	c := tx.Bucket(bucketJobs).Cursor()
	for k, v := c.Seek(prefix); k != nil && hasPrefix(k, prefix); k, v = c.Next() {
		var j Job
		if err := json.Unmarshal(v, &j); err != nil {
			return fmt.Errorf("decode job %q: %w", k, err)
		}
		if err := fn(j); err != nil {
			return err
		}
	}
	return nil
}

func hasPrefix(b, prefix []byte) bool {
	return len(b) >= len(prefix) && string(b[:len(prefix)]) == string(prefix)
}

// counts returns the number of jobs per state of a rollout.
func counts(tx *bolt.Tx, rollout string) (map[string]int, error) {
	m := make(map[string]int)
	err := eachJob(tx, rollout, func(j Job) error {
		m[j.State]++
		return nil
	})
	return m, err
}

// rolloutID names the n-th rollout.
func rolloutID(n uint64) string { return "r" + strconv.FormatUint(n, 10) }

// jobID names a device's attempt at a rollout; the device sees only this string.
func jobID(rollout string, attempt int) string {
	return rollout + "-" + strconv.Itoa(attempt)
}
