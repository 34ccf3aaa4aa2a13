package main

import (
	"bufio"
	"bytes"
	"context"
	"errors"
	"fmt"
	"io"
	"net"
	"os"
	"strings"
	"syscall"
	"testing"
	"time"

	"github.com/fota-dev/fota/certs"
)

func TestConnectPacketReadPacket(t *testing.T) {
	for _, id := range []string{"a", "storm-00001", strings.Repeat("x", 90)} {
		t.Run(fmt.Sprint(len(id)), func(t *testing.T) {
			p := connectPacket(id)
			if got, want := int(p[1]), len(p)-2; got != want {
				t.Fatalf("remaining length %d, want %d", got, want)
			}
			// readPacket must consume exactly the packet, leaving what follows.
			r := bufio.NewReader(bytes.NewReader(append(p, 0xAB)))
			if err := readPacket(r); err != nil {
				t.Fatalf("readPacket: %v", err)
			}
			if b, err := r.ReadByte(); err != nil || b != 0xAB {
				t.Fatalf("after the packet: got %x, %v; want ab", b, err)
			}
		})
	}
	t.Run("truncated", func(t *testing.T) {
		p := connectPacket("dev")
		if err := readPacket(bufio.NewReader(bytes.NewReader(p[:len(p)-1]))); err == nil {
			t.Fatal("got no error for a truncated packet")
		}
	})
	t.Run("bad length", func(t *testing.T) {
		if err := readPacket(bufio.NewReader(bytes.NewReader([]byte{0x10, 0xff, 0xff, 0xff, 0xff, 0x01}))); err == nil {
			t.Fatal("got no error for a five-byte remaining length")
		}
	})
}

// TestRawServer runs the storm's client against the baseline server, and checks that a
// device without a certificate from the CA is refused.
func TestRawServer(t *testing.T) {
	dir := t.TempDir()
	if err := certs.Init(dir, certs.InitOptions{}); err != nil {
		t.Fatal(err)
	}
	cfg, err := rawTLSConfig(dir)
	if err != nil {
		t.Fatal(err)
	}
	ln, err := net.Listen("tcp", "127.0.0.1:0")
	if err != nil {
		t.Fatal(err)
	}
	done := make(chan error, 1)
	go func() { done <- serveRaw(ln, cfg) }()
	t.Cleanup(func() {
		ln.Close()
		if err := <-done; !errors.Is(err, net.ErrClosed) {
			t.Errorf("serveRaw returned %v, want net.ErrClosed", err)
		}
	})

	ids, cfgs, err := deviceConfigs(dir, 3)
	if err != nil {
		t.Fatal(err)
	}
	for i, id := range ids {
		c, err := connectDevice(context.Background(), ln.Addr().String(), id, cfgs[i])
		if err != nil {
			t.Fatalf("device %s: %v", id, err)
		}
		c.Close()
	}

	other := t.TempDir()
	if err := certs.Init(other, certs.InitOptions{}); err != nil {
		t.Fatal(err)
	}
	_, strangers, err := deviceConfigs(other, 1)
	if err != nil {
		t.Fatal(err)
	}
	strangers[0].RootCAs = cfgs[0].RootCAs // trusts the server; the server must not trust it
	if c, err := connectDevice(context.Background(), ln.Addr().String(), "stranger", strangers[0]); err == nil {
		c.Close()
		t.Fatal("a device with a certificate from another CA connected")
	}
}

func TestClassify(t *testing.T) {
	tests := []struct {
		err  error
		want string
	}{
		{fmt.Errorf("dial: %w", &net.OpError{Op: "dial", Err: os.NewSyscallError("connect", syscall.ECONNREFUSED)}), "dial: connection refused"},
		{fmt.Errorf("handshake: %w", os.ErrDeadlineExceeded), "handshake: timeout"},
		{fmt.Errorf("connack: %w", io.EOF), "connack: closed by the server"},
		{fmt.Errorf("connack: %w", syscall.ECONNRESET), "connack: connection reset"},
		{errors.New("handshake: remote error: tls: bad certificate"), "handshake: bad certificate"},
	}
	for _, tt := range tests {
		t.Run(tt.want, func(t *testing.T) {
			if got := classify(tt.err); got != tt.want {
				t.Errorf("classify(%v) = %q, want %q", tt.err, got, tt.want)
			}
		})
	}
}

func TestProcUsage(t *testing.T) {
	// Burn a little CPU so that there is some to see.
	deadline := time.Now().Add(30 * time.Millisecond)
	for time.Now().Before(deadline) {
	}
	u, err := procUsage(os.Getpid())
	if err != nil {
		t.Fatal(err)
	}
	if u.cpu <= 0 || u.rss <= 0 || u.hwm < u.rss {
		t.Errorf("got cpu %v, rss %d, hwm %d; want cpu and rss above 0, hwm at least rss", u.cpu, u.rss, u.hwm)
	}
	if m := machineCPU(); m < u.cpu {
		t.Errorf("machine CPU %v is below this process's %v", m, u.cpu)
	}
}

func TestProxyCounts(t *testing.T) {
	echo, err := net.Listen("tcp", "127.0.0.1:0")
	if err != nil {
		t.Fatal(err)
	}
	defer echo.Close()
	go func() {
		for {
			c, err := echo.Accept()
			if err != nil {
				return
			}
			go func() {
				defer c.Close()
				// Answer every byte with two, so the two directions differ.
				buf := make([]byte, 1024)
				for {
					n, err := c.Read(buf)
					if err != nil {
						return
					}
					if _, err := c.Write(append(buf[:n:n], buf[:n]...)); err != nil {
						return
					}
				}
			}()
		}
	}()
	p, err := startProxy(echo.Addr().String())
	if err != nil {
		t.Fatal(err)
	}
	for range 2 {
		c, err := net.Dial("tcp", p.ln.Addr().String())
		if err != nil {
			t.Fatal(err)
		}
		if _, err := c.Write(make([]byte, 1000)); err != nil {
			t.Fatal(err)
		}
		if _, err := io.ReadFull(c, make([]byte, 2000)); err != nil {
			t.Fatal(err)
		}
		c.Close()
	}
	p.close()
	if got, want := [3]int64{p.up.Load(), p.down.Load(), p.conns.Load()}, [3]int64{2000, 4000, 2}; got != want {
		t.Errorf("up, down, connections: got %v, want %v", got, want)
	}
}

func TestParseConfig(t *testing.T) {
	tests := []struct {
		name    string
		args    []string
		wantErr string
		check   func(*config) string
	}{
		{name: "full defaults", check: func(c *config) string {
			if fmt.Sprint(c.fleet) != "[1000 5000 10000]" || c.storm != 10000 || c.fleetReps != 3 || c.maxConcurrent != 1000 {
				return fmt.Sprintf("fleet %v, storm %d, reps %d, max concurrent %d", c.fleet, c.storm, c.fleetReps, c.maxConcurrent)
			}
			return ""
		}},
		{name: "quick defaults", args: []string{"-quick"}, check: func(c *config) string {
			if fmt.Sprint(c.fleet) != "[200]" || c.storm != 1000 || c.fleetReps != 1 || c.stormConc != 250 || c.timeout != 5*time.Minute {
				return fmt.Sprintf("fleet %v, storm %d, reps %d, in flight %d, timeout %v", c.fleet, c.storm, c.fleetReps, c.stormConc, c.timeout)
			}
			return ""
		}},
		{name: "concurrency capped at the storm", args: []string{"-storm", "100", "-storm-concurrency", "500"}, check: func(c *config) string {
			if c.stormConc != 100 {
				return fmt.Sprintf("in flight %d, want 100", c.stormConc)
			}
			return ""
		}},
		{name: "quoted command", args: []string{"-command", "make bench"}, check: func(c *config) string {
			if want := "go run ./bench/suite -command 'make bench'"; c.invocation != want {
				return fmt.Sprintf("invocation %q, want %q", c.invocation, want)
			}
			return ""
		}},
		{name: "fleet too big", args: []string{"-fleet", "20000"}, wantErr: "at most 10000"},
		{name: "no such figure", args: []string{"-figures", "1,7"}, wantErr: "no figure 7"},
		{name: "bad list", args: []string{"-fleet", "10,x"}, wantErr: "bad list"},
		{name: "argument", args: []string{"extra"}, wantErr: "unexpected argument"},
	}
	for _, tt := range tests {
		t.Run(tt.name, func(t *testing.T) {
			c, err := parseConfig(tt.args)
			if tt.wantErr != "" {
				if err == nil || !strings.Contains(err.Error(), tt.wantErr) {
					t.Fatalf("got error %v, want one containing %q", err, tt.wantErr)
				}
				return
			}
			if err != nil {
				t.Fatal(err)
			}
			if msg := tt.check(c); msg != "" {
				t.Error(msg)
			}
		})
	}
}

func TestFormat(t *testing.T) {
	tests := []struct{ got, want string }{
		{thousands(1234567), "1,234,567"},
		{thousands(-1234), "-1,234"},
		{thousands(12), "12"},
		{size(512), "512 B"},
		{size(64 << 10), "64.0 KiB"},
		{size(3 << 20), "3.0 MiB"},
		{secs(250 * time.Millisecond), "250 ms"},
		{secs(2500 * time.Millisecond), "2.50 s"},
		{secs(65 * time.Second), "65.0 s"},
		{secs(1061500 * time.Millisecond), "17m42s"},
		{ratio(1, 0), "-"},
		{ratio(1, 4), "0.25"},
		{countsText(map[string]int{"installed": 3, "offered": 1200}), "offered 1,200, installed 3"},
		{fmt.Sprint(medianOf([]int{5, 1, 3, 2}, func(i int) float64 { return float64(i) })), "3"},
	}
	for _, tt := range tests {
		if tt.got != tt.want {
			t.Errorf("got %q, want %q", tt.got, tt.want)
		}
	}
}
