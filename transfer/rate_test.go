package transfer

import (
	"slices"
	"testing"
	"time"
)

// 1,000 bytes per second: a byte is a millisecond, so the waits below are exact.
const (
	testRate  = 1000
	testBurst = 3000
	testLimit = 250 * time.Millisecond
)

func TestRateLimiterTake(t *testing.T) {
	clk := newClock()
	r := newRateLimiter(testRate, testBurst, clk.now)
	for i, tt := range []struct {
		device string
		after  time.Duration // fake time passing before the take
		n      int64
		wait   time.Duration
		ok     bool
	}{
		{"a", 0, 1000, 0, true},
		{"a", 0, 1000, 0, true},
		{"a", 0, 1000, 0, true}, // the burst goes out at once
		{"a", 0, 1, time.Millisecond, true},
		{"a", 0, 99, 100 * time.Millisecond, true},
		{"a", 0, 100, 200 * time.Millisecond, true}, // waits grow at the rate
		{"a", 0, 51, 0, false},                      // 251 ms: above the limit
		{"a", 0, 50, testLimit, true},               // the refused take took nothing; the limit itself is allowed
		{"a", 0, 1, 0, false},
		{"b", 0, testBurst, 0, true}, // every device has its own bucket
		{"b", 0, 1, time.Millisecond, true},
		{"a", 100 * time.Millisecond, 1, 151 * time.Millisecond, true}, // 100 bytes drained
		{"a", 10 * time.Second, testBurst, 0, true},                    // drained: a whole burst again
		{"a", 0, 1, time.Millisecond, true},                            // but not more
	} {
		clk.add(tt.after)
		wait, ok := r.take(tt.device, tt.n, testLimit)
		if wait != tt.wait || ok != tt.ok {
			t.Fatalf("step %d: %s takes %d after %v: got %v, %v; want %v, %v", i, tt.device, tt.n, tt.after, wait, ok, tt.wait, tt.ok)
		}
	}
}

func TestRateLimiterZeroLimitRefusesAnyWait(t *testing.T) {
	r := newRateLimiter(testRate, testBurst, newClock().now)
	if wait, ok := r.take("a", testBurst, 0); wait != 0 || !ok {
		t.Fatalf("the burst: got %v, %v; want 0, true", wait, ok)
	}
	if wait, ok := r.take("a", 1, 0); wait != 0 || ok {
		t.Fatalf("one byte more: got %v, %v; want 0, false", wait, ok)
	}
}

func TestRateLimiterRefund(t *testing.T) {
	clk := newClock()
	r := newRateLimiter(testRate, testBurst, clk.now)
	take := func(device string, n int64, want time.Duration) {
		t.Helper()
		if wait, ok := r.take(device, n, testLimit); wait != want || !ok {
			t.Fatalf("%s takes %d: got %v, %v; want %v, true", device, n, wait, ok, want)
		}
	}
	take("a", testBurst, 0)
	take("a", 100, 100*time.Millisecond)
	r.refund("a", 100)
	take("a", 100, 100*time.Millisecond) // not 200 ms: the refunded bytes are out of the bucket

	// A refund of more than is left in the bucket banks no credit for later.
	clk.add(10 * time.Second)
	r.refund("a", testBurst)
	take("a", testBurst, 0)
	take("a", 1, time.Millisecond)

	// A refund for a device without a bucket makes none.
	before := len(r.clear)
	r.refund("nobody", 100)
	if _, ok := r.clear["nobody"]; ok || len(r.clear) != before {
		t.Fatalf("got %d buckets (nobody's: %v), want %d", len(r.clear), ok, before)
	}
}

func TestRateLimiterSweepForgetsDrainedDevices(t *testing.T) {
	clk := newClock()
	r := newRateLimiter(testRate, testBurst, clk.now)
	for _, tt := range []struct {
		after time.Duration // fake time passing before the take; since New in the comments
		takes map[string]int64
		want  []string // devices with a bucket after the takes
	}{
		{0, map[string]int64{"a": 500, "b": 2000, "c": 1000}, []string{"a", "b", "c"}},
		{600 * time.Millisecond, map[string]int64{"d": 1}, []string{"a", "b", "c", "d"}}, // a drained, but no sweep yet
		{400 * time.Millisecond, map[string]int64{"e": 1}, []string{"b", "e"}},           // 1 s: a, c (just empty) and d go
		{500 * time.Millisecond, map[string]int64{"f": 1}, []string{"b", "e", "f"}},      // at most one sweep a second
		{600 * time.Millisecond, map[string]int64{"g": 1}, []string{"g"}},                // 2.1 s
	} {
		clk.add(tt.after)
		for d, n := range tt.takes {
			if _, ok := r.take(d, n, testLimit); !ok {
				t.Fatalf("%s takes %d: refused, want taken", d, n)
			}
		}
		got := make([]string, 0, len(r.clear))
		for d := range r.clear {
			got = append(got, d)
		}
		slices.Sort(got)
		if !slices.Equal(got, tt.want) {
			t.Fatalf("after %v more: got buckets for %v, want %v", tt.after, got, tt.want)
		}
	}
}
