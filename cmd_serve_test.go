package main

import (
	"bytes"
	"context"
	"errors"
	"io"
	"log/slog"
	"net"
	"os"
	"path/filepath"
	"strings"
	"testing"
	"time"

	"github.com/fota-dev/fota/certs"
)

func TestServeLimitFlagsRefused(t *testing.T) {
	for _, flag := range []string{"--max-pending", "--max-pending-per-source", "--accept-rate", "--accept-rate-per-source"} {
		t.Run(flag, func(t *testing.T) {
			dir := t.TempDir()
			data := filepath.Join(dir, "data")
			var stderr bytes.Buffer
			code := run([]string{"serve", "--data", data, "--certs", filepath.Join(dir, "certs"), flag, "-2"}, io.Discard, &stderr)
			if code == 0 {
				t.Fatalf("serve %s -2: exit 0, want failure", flag)
			}
			if msg := stderr.String(); !strings.Contains(msg, flag) || strings.Count(msg, "\n") != 1 {
				t.Errorf("got stderr %q, want one line naming %s", msg, flag)
			}
			if _, err := os.Stat(data); !errors.Is(err, os.ErrNotExist) {
				t.Errorf("data dir after a refused flag: %v, want none made", err)
			}
		})
	}
}

// TestServeLimitsWired checks that the server passes its connection limits to the broker: with
// one pending connection allowed per source, a second idle socket is reset at once.
func TestServeLimitsWired(t *testing.T) {
	dir := t.TempDir()
	certsDir := filepath.Join(dir, "certs")
	if err := certs.Init(certsDir, certs.InitOptions{}); err != nil {
		t.Fatal(err)
	}
	srv, err := startServer(serverConfig{
		DataDir: filepath.Join(dir, "data"), CertsDir: certsDir,
		MQTTAddr: "127.0.0.1:0", APIAddr: "127.0.0.1:0", Logger: slog.New(slog.DiscardHandler),
		Limits: connLimits{MaxPendingPerSource: 1},
	})
	if err != nil {
		t.Fatal(err)
	}
	defer srv.Close(context.Background())
	addr := srv.broker.Addr().String()
	var conns []net.Conn
	defer func() {
		for _, c := range conns {
			_ = c.Close()
		}
	}()
	for range 2 {
		c, err := net.DialTimeout("tcp", addr, 5*time.Second)
		if err != nil {
			break // reset while dialling: refused
		}
		conns = append(conns, c)
	}
	if len(conns) == 2 {
		// Reset after the dial: a read ends at once rather than at the deadline.
		_ = conns[1].SetReadDeadline(time.Now().Add(5 * time.Second))
		if _, err := conns[1].Read(make([]byte, 1)); errors.Is(err, os.ErrDeadlineExceeded) {
			t.Fatal("second pending socket from one source: still open, want reset")
		}
	}
	if got := srv.broker.Stats().RefusedBy.SourcePending; got != 1 {
		t.Fatalf("refused by source-pending: got %d, want 1", got)
	}
}
