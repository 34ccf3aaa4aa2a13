package fotatest_test

import (
	"fmt"
	"runtime"
	"strings"
	"sync"
	"sync/atomic"
	"testing"
	"time"

	"github.com/fota-dev/fota/fotatest"
)

// recorder is a testing.TB that records a fatal failure instead of ending the real test.
type recorder struct {
	testing.TB // nil: calling anything not overridden here panics, which a test would notice
	mu         sync.Mutex
	fatal      string
	helper     bool
}

func (r *recorder) Helper() {
	r.mu.Lock()
	r.helper = true
	r.mu.Unlock()
}

func (r *recorder) Fatalf(format string, args ...any) {
	r.mu.Lock()
	r.fatal = fmt.Sprintf(format, args...)
	r.mu.Unlock()
	runtime.Goexit() // as testing.T does: nothing after a Fatalf runs
}

// run calls f with a fresh recorder on its own goroutine, as Fatalf's Goexit needs, and returns
// the recorder and whether f returned normally.
func run(f func(tb testing.TB)) (r *recorder, returned bool) {
	r = &recorder{}
	done := make(chan struct{})
	go func() {
		defer close(done)
		f(r)
		returned = true
	}()
	<-done
	return r, returned
}

func TestWaitFor(t *testing.T) {
	tests := []struct {
		name      string
		trueAfter int32 // calls of cond before it holds; -1 for never
		timeout   time.Duration
		wantFatal string
	}{
		{"true at once", 0, time.Second, ""},
		{"true after a few polls", 5, 10 * time.Second, ""},
		{"never true", -1, 50 * time.Millisecond, "timed out after 50ms waiting for the light to turn green"},
	}
	for _, tt := range tests {
		t.Run(tt.name, func(t *testing.T) {
			var calls atomic.Int32
			cond := func() bool { return calls.Add(1) > tt.trueAfter && tt.trueAfter >= 0 }
			start := time.Now()
			r, returned := run(func(tb testing.TB) { fotatest.WaitFor(tb, tt.timeout, "the light to turn green", cond) })
			if r.fatal != tt.wantFatal {
				t.Errorf("failure: got %q, want %q", r.fatal, tt.wantFatal)
			}
			if returned != (tt.wantFatal == "") {
				t.Errorf("returned: got %v, want %v", returned, tt.wantFatal == "")
			}
			if !r.helper {
				t.Error("Helper not called, want the failure reported at the caller's line")
			}
			if tt.trueAfter >= 0 && calls.Load() != tt.trueAfter+1 {
				t.Errorf("cond called %d times, want %d (no call after it held)", calls.Load(), tt.trueAfter+1)
			}
			if tt.wantFatal != "" && time.Since(start) < tt.timeout {
				t.Errorf("gave up after %v, want at least %v", time.Since(start), tt.timeout)
			}
		})
	}
}

func TestWaitForValue(t *testing.T) {
	var n atomic.Int32
	r, returned := run(func(tb testing.TB) {
		got := fotatest.WaitForValue(tb, 10*time.Second, "three", func() (int32, bool) {
			v := n.Add(1)
			return v, v == 3
		})
		if got != 3 {
			t.Errorf("got %d, want 3", got)
		}
	})
	if !returned || r.fatal != "" {
		t.Errorf("got returned %v, failure %q; want a normal return", returned, r.fatal)
	}

	r, returned = run(func(tb testing.TB) {
		fotatest.WaitForValue(tb, 30*time.Millisecond, "a yes", func() (string, bool) { return "still no", false })
	})
	if want := "timed out after 30ms waiting for a yes: last got still no"; returned || r.fatal != want {
		t.Errorf("got returned %v, failure %q; want failure %q", returned, r.fatal, want)
	}
}

func TestPoll(t *testing.T) {
	var n atomic.Int32
	if err := fotatest.Poll(10*time.Second, func() bool { return n.Add(1) == 4 }); err != nil {
		t.Errorf("got %v, want nil once the condition holds", err)
	}
	err := fotatest.Poll(20*time.Millisecond, func() bool { return false })
	if err == nil || !strings.Contains(err.Error(), "timed out after 20ms") {
		t.Errorf("got %v, want a time-out error", err)
	}
}

// TestPollChecksAtDeadline shows that a condition that holds by the deadline counts, even when the
// last interval would have slept past it.
func TestPollChecksAtDeadline(t *testing.T) {
	start := time.Now()
	timeout := 30 * time.Millisecond
	if err := fotatest.Poll(timeout, func() bool { return time.Since(start) >= timeout }); err != nil {
		t.Errorf("got %v, want nil: the condition held at the deadline", err)
	}
}
