// Package fotatest holds the test helpers that every fota package shares, so that each concern has
// one copy: today, waiting for a condition with a deadline instead of sleeping. It imports only the
// standard library, so tests of the device side can use it without cgo, bbolt or the broker.
package fotatest

import (
	"fmt"
	"testing"
	"time"
)

// The interval between polls starts short, so that a condition that is nearly true costs the test
// almost nothing, and grows so that a long wait does not spin the machine the other tests share.
const (
	firstInterval = time.Millisecond
	maxInterval   = 20 * time.Millisecond
)

// Poll calls cond until it returns true or timeout passes. It returns nil as soon as cond holds,
// and an error "timed out after TIMEOUT" otherwise; cond is called once more at the deadline.
// It is for callers that hold no testing.TB, such as a goroutine a test started.
func Poll(timeout time.Duration, cond func() bool) error {
	_, err := poll(timeout, func() (struct{}, bool) { return struct{}{}, cond() })
	return err
}

// WaitFor polls cond until it returns true, failing t with "timed out after TIMEOUT waiting for
// WHAT" if it does not within timeout.
func WaitFor(t testing.TB, timeout time.Duration, what string, cond func() bool) {
	t.Helper()
	if err := Poll(timeout, cond); err != nil {
		t.Fatalf("%v waiting for %s", err, what)
	}
}

// WaitForValue polls cond until its second result is true and returns its first. If that does
// not happen within timeout it fails t with "timed out after TIMEOUT waiting for WHAT: last got
// V", V being the last value cond returned, which says how far the wait got.
func WaitForValue[T any](t testing.TB, timeout time.Duration, what string, cond func() (T, bool)) T {
	t.Helper()
	v, err := poll(timeout, cond)
	if err != nil {
		t.Fatalf("%v waiting for %s: last got %+v", err, what, v)
	}
	return v
}

func poll[T any](timeout time.Duration, cond func() (T, bool)) (T, error) {
	deadline := time.Now().Add(timeout)
	for interval := firstInterval; ; interval = min(2*interval, maxInterval) {
		v, ok := cond()
		if ok {
			return v, nil
		}
		left := time.Until(deadline)
		if left <= 0 {
			return v, fmt.Errorf("timed out after %v", timeout)
		}
		time.Sleep(min(interval, left))
	}
}
