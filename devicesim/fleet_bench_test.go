package devicesim_test

import (
	"bufio"
	"context"
	"crypto/tls"
	"crypto/x509"
	"encoding/json"
	"fmt"
	"io"
	"os"
	"os/exec"
	"path/filepath"
	"runtime"
	"runtime/pprof"
	"strconv"
	"strings"
	"sync"
	"testing"
	"time"

	"github.com/fota-dev/fota/certs"
	"github.com/fota-dev/fota/certs/certstest"
	"github.com/fota-dev/fota/devicesim"
	"github.com/fota-dev/fota/protocol"
)

// Environment of the broker helper process.
const (
	envBrokerCA    = "FOTA_SIM_BENCH_CA"    // certs dir: run as the broker
	envBrokerN     = "FOTA_SIM_BENCH_N"     // devices to wait for
	envBrokerOffer = "FOTA_SIM_BENCH_OFFER" // file with a signed offer to make; empty: none
)

// TestBrokerProcess is not a test: BenchmarkFleet runs the test binary again with it, to have a
// real broker in another process, so that what the benchmark measures is the devices' memory
// alone. It prints "ADDR host:port" once it listens, "ALL" once every device reported its
// status (and with an offer, "DONE" once every device reported the new version), and exits
// when its standard input closes.
func TestBrokerProcess(t *testing.T) {
	dir := os.Getenv(envBrokerCA)
	if dir == "" {
		t.Skip("helper process of BenchmarkFleet")
	}
	n, _ := strconv.Atoi(os.Getenv(envBrokerN))
	revoked, err := certs.OpenRevocationList(dir)
	if err != nil {
		t.Fatal(err)
	}
	srvTLS, err := certs.ServerTLS(dir, revoked)
	if err != nil {
		t.Fatal(err)
	}
	var offer protocol.Offer
	var image []byte
	offerWhen := "none"
	if p := os.Getenv(envBrokerOffer); p != "" {
		b, err := os.ReadFile(p)
		if err != nil {
			t.Fatal(err)
		}
		if err := json.Unmarshal(b, &offer); err != nil {
			t.Fatal(err)
		}
		image = readFirmware(t, "pybricks-primehub-7.28.0.bin")
		offerWhen = oldVer
	}
	// Like a rollout's concurrency limit: at most maxConcurrent devices download at once, so
	// that the update measures the devices rather than a server pushing gigabytes at once.
	const maxConcurrent = 200
	var (
		mu       sync.Mutex
		running  = map[string]bool{}
		waiting  []string
		failures int
	)
	var s *updateServer
	s = newUpdateServer(t, srvTLS, image, offer, func(s *updateServer) {
		s.offerWhen = offerWhen
		// A failed job is offered again at once, as the controller would after its backoff.
		s.eventHook = func(dev string, ev protocol.Event) {
			if ev.State != protocol.StateFailed {
				return
			}
			mu.Lock()
			failures++
			if failures <= 5 {
				fmt.Fprintf(os.Stderr, "broker: %s failed: %s\n", dev, ev.Reason)
			}
			mu.Unlock()
			s.publishOffer(dev)
		}
		s.statusHook = func(dev string, st protocol.Status) {
			if offerWhen == "none" {
				return
			}
			mu.Lock()
			defer mu.Unlock()
			switch {
			case st.Version == newVer && running[dev]:
				delete(running, dev)
				if len(waiting) > 0 {
					next := waiting[0]
					waiting = waiting[1:]
					running[next] = true
					s.publishOffer(next)
				}
			case st.Version == oldVer && running[dev]:
				s.publishOffer(dev) // reconnected: the same offer again
			case st.Version == oldVer && len(running) < maxConcurrent:
				running[dev] = true
				s.publishOffer(dev)
			case st.Version == oldVer:
				waiting = append(waiting, dev)
			}
		}
	})
	fmt.Printf("ADDR %s\n", s.addr)

	var wg sync.WaitGroup
	wg.Go(func() {
		all, done := false, false
		for range time.Tick(5 * time.Millisecond) {
			s.mu.Lock()
			seen, updated := len(s.statuses), 0
			for _, sts := range s.statuses {
				if sts[len(sts)-1].Version == newVer {
					updated++
				}
			}
			s.mu.Unlock()
			if !all && seen >= n {
				all = true
				fmt.Println("ALL")
			}
			if !done && offerWhen != "none" && updated >= n {
				done = true
				mu.Lock()
				fmt.Printf("DONE %d\n", failures)
				mu.Unlock()
			}
		}
	})
	io.Copy(io.Discard, os.Stdin) // until the benchmark closes it
	os.Exit(0)
}

// broker is the helper process.
type broker struct {
	cmd   *exec.Cmd
	stdin io.Closer
	lines chan string
	addr  string
}

func startBroker(b *testing.B, ca *certstest.CA, n int, offerFile string) *broker {
	b.Helper()
	cmd := exec.Command(os.Args[0], "-test.run=^TestBrokerProcess$", "-test.count=1")
	cmd.Env = append(os.Environ(), envBrokerCA+"="+ca.Dir, envBrokerN+"="+strconv.Itoa(n), envBrokerOffer+"="+offerFile)
	cmd.Stderr = os.Stderr
	stdin, err := cmd.StdinPipe()
	if err != nil {
		b.Fatal(err)
	}
	stdout, err := cmd.StdoutPipe()
	if err != nil {
		b.Fatal(err)
	}
	if err := cmd.Start(); err != nil {
		b.Fatal(err)
	}
	br := &broker{cmd: cmd, stdin: stdin, lines: make(chan string, 16)}
	go func() {
		sc := bufio.NewScanner(stdout)
		for sc.Scan() {
			br.lines <- sc.Text()
		}
		close(br.lines)
	}()
	b.Cleanup(func() { stdin.Close(); cmd.Wait() })
	line := br.expect(b, "ADDR ", 30*time.Second)
	br.addr = strings.TrimPrefix(line, "ADDR ")
	return br
}

// expect waits for a line of the broker that starts with prefix.
func (br *broker) expect(b *testing.B, prefix string, timeout time.Duration) string {
	b.Helper()
	deadline := time.After(timeout)
	for {
		select {
		case l, ok := <-br.lines:
			if !ok {
				b.Fatalf("broker exited before %q", prefix)
			}
			if strings.HasPrefix(l, prefix) {
				return l
			}
		case <-deadline:
			b.Fatalf("timed out waiting for %q from the broker", prefix)
		}
	}
}

// writeHeapProfile writes the live heap to path, to see what a device's bytes are.
func writeHeapProfile(b *testing.B, path string) {
	f, err := os.Create(path)
	if err != nil {
		b.Fatal(err)
	}
	defer f.Close()
	if err := pprof.Lookup("heap").WriteTo(f, 0); err != nil {
		b.Fatal(err)
	}
}

// live returns the memory the process holds in heap objects and in goroutine stacks, after
// collections: each one at most halves a goroutine stack that grew while devices downloaded,
// so a few show what a fleet that has been idle for a while holds.
func live() (heap, stack uint64) {
	for range 5 {
		runtime.GC()
	}
	var ms runtime.MemStats
	runtime.ReadMemStats(&ms)
	return ms.HeapAlloc, ms.StackInuse
}

// BenchmarkFleet connects fleets of 1,000 and 5,000 in-memory devices to a real broker in
// another process over mutual TLS, with certificates issued in memory, and reports the time
// until every device has reported its status, and the memory and goroutines each device
// costs while connected and idle; the update variant then updates every device to 7.28.0 and
// reports the memory each device holds afterwards. Run it alone:
//
//	go test ./devicesim -run '^$' -bench Fleet -benchtime 1x
func BenchmarkFleet(b *testing.B) {
	for _, n := range []int{1000, 5000} {
		for _, update := range []bool{false, true} {
			name := fmt.Sprintf("n=%d", n)
			if update {
				name += "/update"
			}
			b.Run(name, func(b *testing.B) {
				for range b.N {
					benchFleet(b, n, update)
				}
			})
		}
	}
}

func benchFleet(b *testing.B, n int, update bool) {
	ca := certstest.New(b)
	oldImg := readFirmware(b, "pybricks-primehub-7.27.0.bin")
	offerFile := ""
	if update {
		newImg := readFirmware(b, "pybricks-primehub-7.28.0.bin")
		o, _ := json.Marshal(offerFor(b, newImg, newVer))
		offerFile = filepath.Join(b.TempDir(), "offer.json")
		if err := os.WriteFile(offerFile, o, 0o600); err != nil {
			b.Fatal(err)
		}
	}
	br := startBroker(b, ca, n, offerFile)

	// One CA pool for the fleet, as fota sim does.
	pool := x509.NewCertPool()
	pem, err := os.ReadFile(filepath.Join(ca.Dir, certs.CAFile))
	if err != nil || !pool.AppendCertsFromPEM(pem) {
		b.Fatalf("CA pool: %v", err)
	}
	tlsFor := func(id string) (*tls.Config, error) {
		c, err := ca.Authority.DeviceTLS(id, certs.IssueOptions{Model: model})
		if err != nil {
			return nil, err
		}
		c.Leaf = nil // as fota sim does: a client never reads it
		return &tls.Config{MinVersion: tls.VersionTLS12, Certificates: []tls.Certificate{c}, RootCAs: pool, ServerName: "localhost"}, nil
	}

	g0 := runtime.NumGoroutine()
	h0, s0 := live()
	ctx, cancel := context.WithCancel(context.Background())
	defer cancel()
	start := time.Now()
	done := make(chan error, 1)
	go func() {
		_, err := devicesim.RunFleet(ctx, devicesim.FleetConfig{
			N: n, Model: model, Version: oldVer, Image: oldImg, PublicKey: releasePub,
			Broker: br.addr, TLSFor: tlsFor,
		})
		done <- err
	}()
	br.expect(b, "ALL", 5*time.Minute)
	connected := time.Since(start)
	perDevice := func(a, b uint64) float64 { return (float64(a) - float64(b)) / float64(n) }
	if !update {
		g1 := runtime.NumGoroutine()
		h1, s1 := live()
		b.ReportMetric(connected.Seconds(), "s-connect")
		b.ReportMetric(perDevice(h1+s1, h0+s0), "B/device")
		b.ReportMetric(perDevice(h1, h0), "heap-B/device")
		b.ReportMetric(perDevice(s1, s0), "stack-B/device")
		b.ReportMetric(float64(g1-g0)/float64(n), "goroutines/device")
		if p := os.Getenv("FOTA_SIM_BENCH_HEAP"); p != "" {
			writeHeapProfile(b, p)
			if f, err := os.Create(p + ".goroutines"); err == nil {
				pprof.Lookup("goroutine").WriteTo(f, 1)
				f.Close()
			}
		}
	} else {
		line := br.expect(b, "DONE", 10*time.Minute)
		updated := time.Since(start)
		failures, _ := strconv.Atoi(strings.TrimPrefix(line, "DONE "))
		b.ReportMetric(float64(failures), "failed-attempts")
		h1, s1 := live()
		b.ReportMetric(updated.Seconds(), "s-update")
		b.ReportMetric(perDevice(h1+s1, h0+s0), "B/device-after")
		b.ReportMetric(perDevice(h1, h0), "heap-B/device-after")
		b.ReportMetric(perDevice(s1, s0), "stack-B/device-after")
		b.ReportMetric(float64(runtime.NumGoroutine()-g0)/float64(n), "goroutines/device-after")
	}
	cancel()
	<-done
}
