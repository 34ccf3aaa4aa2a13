package main

import (
	"bufio"
	"context"
	"crypto/tls"
	"crypto/x509"
	"errors"
	"fmt"
	"io"
	"net"
	"os"
	"path/filepath"
	"slices"
	"strings"
	"sync"
	"syscall"
	"time"

	"github.com/fota-dev/fota/certs"
)

// stormTimeout bounds one device's dial, handshake and CONNACK; the broker's own bound on the
// handshake and CONNECT is 10 s (broker.DefaultConnectTimeout), and the raw server uses the
// same.
const (
	stormTimeout   = 30 * time.Second
	connectTimeout = 10 * time.Second
)

// connack is the broker's answer to an accepted MQTT 3.1.1 CONNECT.
var connack = [4]byte{0x20, 0x02, 0x00, 0x00}

// connectPacket is an MQTT 3.1.1 CONNECT with a clean session, keepalive 60 s and client id
// id (shorter than 100 bytes, so the remaining length fits one byte).
func connectPacket(id string) []byte {
	p := []byte{0x10, byte(12 + len(id)), 0, 4, 'M', 'Q', 'T', 'T', 4, 0x02, 0, 60, byte(len(id) >> 8), byte(len(id))}
	return append(p, id...)
}

// stormResult is one connect storm against one server.
type stormResult struct {
	ok, failed           int
	took                 time.Duration // first dial -> last CONNACK
	p50, p99             time.Duration // per device: dial -> CONNACK
	errs                 map[string]int
	clientCPU, serverCPU time.Duration
	rss0, rssN           int64 // server before the storm and with every connection open and idle
}

func (r stormResult) rate() float64 { return float64(r.ok) / r.took.Seconds() }

// storm connects one device per configuration to addr, at most conc at once, each with a TLS
// handshake (a full one: no session cache), an MQTT CONNECT and the wait for CONNACK. The
// connections stay open until every device is done, so that the server holds them all; then
// the server's memory is read and they are closed.
func storm(ctx context.Context, addr string, server *proc, ids []string, cfgs []*tls.Config, conc int) (stormResult, error) {
	res := stormResult{errs: map[string]int{}}
	settle(ctx, server, 10*time.Second)
	u0, err := server.usage()
	if err != nil {
		return res, err
	}
	res.rss0 = u0.rss
	conns := make([]net.Conn, len(ids))
	lat := make([]time.Duration, len(ids))
	errs := make([]error, len(ids))
	sem := make(chan struct{}, conc)
	var wg sync.WaitGroup
	cpu0 := selfCPU()
	start := time.Now()
	closeAll := func() {
		for _, c := range conns {
			if c != nil {
				_ = c.Close()
			}
		}
	}
	for i := range ids {
		select {
		case sem <- struct{}{}:
		case <-ctx.Done():
			wg.Wait() // the dials in flight end with ctx
			closeAll()
			return res, ctx.Err()
		}
		wg.Go(func() {
			defer func() { <-sem }()
			t := time.Now()
			conns[i], errs[i] = connectDevice(ctx, addr, ids[i], cfgs[i])
			lat[i] = time.Since(t)
		})
	}
	wg.Wait()
	res.took = time.Since(start)
	res.clientCPU = selfCPU() - cpu0
	u1, err := server.usage()
	if err != nil {
		closeAll()
		return res, err
	}
	res.serverCPU = u1.cpu - u0.cpu
	var ok []time.Duration
	for i, err := range errs {
		if err != nil {
			res.failed++
			res.errs[classify(err)]++
			continue
		}
		res.ok++
		ok = append(ok, lat[i])
	}
	if len(ok) > 0 {
		slices.Sort(ok)
		res.p50, res.p99 = ok[len(ok)/2], ok[len(ok)*99/100]
	}
	// Idle connections, every handshake's garbage given a moment to be collected.
	settle(ctx, server, 10*time.Second)
	if uN, err := server.usage(); err == nil {
		res.rssN = uN.rss
	}
	closeAll()
	return res, nil
}

// connectDevice dials, handshakes, sends CONNECT and reads CONNACK.
func connectDevice(ctx context.Context, addr, id string, cfg *tls.Config) (net.Conn, error) {
	d := net.Dialer{Timeout: stormTimeout}
	raw, err := d.DialContext(ctx, "tcp", addr)
	if err != nil {
		return nil, fmt.Errorf("dial: %w", err)
	}
	_ = raw.SetDeadline(time.Now().Add(stormTimeout))
	tc := tls.Client(raw, cfg)
	if err := tc.HandshakeContext(ctx); err != nil {
		raw.Close()
		return nil, fmt.Errorf("handshake: %w", err)
	}
	if _, err := tc.Write(connectPacket(id)); err != nil {
		raw.Close()
		return nil, fmt.Errorf("connect: %w", err)
	}
	var ack [4]byte
	if _, err := io.ReadFull(tc, ack[:]); err != nil {
		raw.Close()
		return nil, fmt.Errorf("connack: %w", err)
	}
	if ack != connack {
		raw.Close()
		return nil, fmt.Errorf("connack: refused: % x", ack)
	}
	_ = raw.SetDeadline(time.Time{})
	return tc, nil
}

// classify names an error without the addresses and ports in it, so that errors can be
// counted by kind.
func classify(err error) string {
	step, _, _ := strings.Cut(err.Error(), ":")
	switch {
	case errors.Is(err, os.ErrDeadlineExceeded):
		return step + ": timeout"
	case errors.Is(err, syscall.ECONNRESET):
		return step + ": connection reset"
	case errors.Is(err, syscall.ECONNREFUSED):
		return step + ": connection refused"
	case errors.Is(err, syscall.EADDRNOTAVAIL):
		return step + ": no local port left"
	case errors.Is(err, io.EOF), errors.Is(err, io.ErrUnexpectedEOF):
		return step + ": closed by the server"
	}
	msg := err.Error()
	if i := strings.LastIndex(msg, ": "); i >= 0 {
		msg = step + ":" + msg[i+1:]
	}
	return msg
}

// deviceConfigs issues n device certificates from the CA in certsDir, in memory, and returns
// a client configuration for each: no session cache, so every handshake is a full one.
func deviceConfigs(certsDir string, n int) ([]string, []*tls.Config, error) {
	ca, err := certs.LoadAuthority(certsDir)
	if err != nil {
		return nil, nil, err
	}
	pool := x509.NewCertPool()
	pool.AddCert(ca.Cert)
	ids := make([]string, n)
	cfgs := make([]*tls.Config, n)
	errs := make([]error, n)
	var wg sync.WaitGroup
	workers := 8
	for w := range workers {
		wg.Go(func() {
			for i := w; i < n; i += workers {
				ids[i] = fmt.Sprintf("storm-%05d", i+1)
				c, err := ca.DeviceTLS(ids[i], certs.IssueOptions{})
				c.Leaf = nil
				errs[i] = err
				cfgs[i] = &tls.Config{MinVersion: tls.VersionTLS12, Certificates: []tls.Certificate{c}, RootCAs: pool, ServerName: "localhost"}
			}
		})
	}
	wg.Wait()
	return ids, cfgs, errors.Join(errs...)
}

// rawServerArgs makes the suite's binary a plain crypto/tls server: see rawServer.
const rawServerArg = "-bench-suite-raw-tls"

// rawServer is the baseline of the connect storm: a plain crypto/tls server with fota's
// server certificate and CA, requiring and verifying client certificates like the broker,
// with the broker's 10 s bound on the handshake and first packet. It reads one MQTT packet
// and answers CONNACK, the least any server must do, then holds the connection until the
// client closes it. It prints its address and serves until killed.
func rawServer(certsDir string) error {
	cfg, err := rawTLSConfig(certsDir)
	if err != nil {
		return err
	}
	ln, err := net.Listen("tcp", "127.0.0.1:0")
	if err != nil {
		return err
	}
	fmt.Printf("raw tls serving: %s\n", ln.Addr())
	return serveRaw(ln, cfg)
}

// rawTLSConfig is the baseline server's configuration: fota's server certificate, client
// certificates required and verified against fota's CA, TLS 1.2 or later, nothing more.
func rawTLSConfig(certsDir string) (*tls.Config, error) {
	cert, err := tls.LoadX509KeyPair(filepath.Join(certsDir, certs.ServerCertFile), filepath.Join(certsDir, certs.ServerKeyFile))
	if err != nil {
		return nil, err
	}
	pem, err := os.ReadFile(filepath.Join(certsDir, certs.CAFile))
	if err != nil {
		return nil, err
	}
	pool := x509.NewCertPool()
	if !pool.AppendCertsFromPEM(pem) {
		return nil, errors.New("no CA certificate")
	}
	return &tls.Config{MinVersion: tls.VersionTLS12, Certificates: []tls.Certificate{cert}, ClientCAs: pool, ClientAuth: tls.RequireAndVerifyClientCert}, nil
}

// serveRaw answers connections on ln until it is closed.
func serveRaw(ln net.Listener, cfg *tls.Config) error {
	for {
		raw, err := ln.Accept()
		if err != nil {
			return err
		}
		go func() {
			defer raw.Close()
			_ = raw.SetDeadline(time.Now().Add(connectTimeout))
			tc := tls.Server(raw, cfg)
			if err := tc.Handshake(); err != nil {
				return
			}
			r := bufio.NewReader(tc)
			if err := readPacket(r); err != nil {
				return
			}
			if _, err := tc.Write(connack[:]); err != nil {
				return
			}
			_ = raw.SetDeadline(time.Time{})
			_, _ = io.Copy(io.Discard, r)
		}()
	}
}

// readPacket reads one MQTT packet: a type byte, a variable-length remaining length, the rest.
func readPacket(r *bufio.Reader) error {
	if _, err := r.ReadByte(); err != nil {
		return err
	}
	n, shift := 0, 0
	for i := 0; ; i++ {
		b, err := r.ReadByte()
		if err != nil {
			return err
		}
		n |= int(b&0x7f) << shift
		shift += 7
		if b&0x80 == 0 {
			break
		}
		if i == 3 {
			return errors.New("bad remaining length")
		}
	}
	_, err := r.Discard(n)
	return err
}

// startRawServer runs rawServer in a child process, so that its CPU and memory are measured
// apart like fota serve's.
func startRawServer(ctx context.Context, dir, certsDir string) (*proc, string, error) {
	self, err := os.Executable()
	if err != nil {
		return nil, "", err
	}
	p, err := startProc("rawtls", dir, nil, self, rawServerArg, certsDir)
	if err != nil {
		return nil, "", err
	}
	deadline := time.Now().Add(10 * time.Second)
	for {
		if a, ok := strings.CutPrefix(firstLine(p.out), "raw tls serving: "); ok {
			return p, a, nil
		}
		if p.exited() || time.Now().After(deadline) {
			p.stop(time.Second)
			return nil, "", fmt.Errorf("raw tls server did not start: %s", p.tail(1000))
		}
		if err := sleep(ctx, 20*time.Millisecond); err != nil {
			p.stop(time.Second)
			return nil, "", err
		}
	}
}
