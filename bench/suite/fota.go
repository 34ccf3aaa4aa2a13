package main

import (
	"bufio"
	"context"
	"encoding/json"
	"fmt"
	"os"
	"path/filepath"
	"strings"
	"time"
)

// cliTimeout bounds one fota CLI command.
const cliTimeout = 2 * time.Minute

// fotaServer is a `fota serve` process with its own CA and data dir, driven through the fota
// CLI as an operator would.
type fotaServer struct {
	bin   string // the fota binary
	dir   string
	certs string
	data  string
	mqtt  string // host:port
	api   string // https://host:port
	p     *proc
}

// startFota makes a CA with `fota certs init` and starts `fota serve` on loopback ports the
// kernel picks, which it reads back from the server's first line.
func startFota(ctx context.Context, bin, dir string) (*fotaServer, error) {
	s := &fotaServer{bin: bin, dir: dir, certs: filepath.Join(dir, "certs"), data: filepath.Join(dir, "data")}
	if _, err := run(ctx, cliTimeout, nil, bin, "certs", "init", "--dir", s.certs); err != nil {
		return nil, err
	}
	p, err := startProc("serve", dir, nil, bin, "serve", "--data", s.data, "--certs", s.certs,
		"--mqtt", "127.0.0.1:0", "--api", "127.0.0.1:0", "--log-level", "warn",
		// Every simulated device connects from loopback, as no real fleet does.
		"--max-pending", "-1", "--max-pending-per-source", "-1", "--accept-rate", "-1", "--accept-rate-per-source", "-1")
	if err != nil {
		return nil, err
	}
	s.p = p
	deadline := time.Now().Add(30 * time.Second)
	for {
		// fota serving: mqtts://ADDR, admin API https://ADDR, release key PATH
		if line := firstLine(p.out); strings.HasPrefix(line, "fota serving:") {
			for _, f := range strings.Split(strings.TrimPrefix(line, "fota serving:"), ",") {
				f = strings.TrimSpace(f)
				if a, ok := strings.CutPrefix(f, "mqtts://"); ok {
					s.mqtt = a
				} else if a, ok := strings.CutPrefix(f, "admin API "); ok {
					s.api = a
				}
			}
			if s.mqtt == "" || s.api == "" {
				s.close()
				return nil, fmt.Errorf("fota serve: cannot read its addresses from %q", line)
			}
			return s, nil
		}
		if p.exited() || time.Now().After(deadline) {
			s.close()
			return nil, fmt.Errorf("fota serve did not start: %s", p.tail(2000))
		}
		if err := sleep(ctx, 50*time.Millisecond); err != nil {
			s.close()
			return nil, err
		}
	}
}

func firstLine(path string) string {
	f, err := os.Open(path)
	if err != nil {
		return ""
	}
	defer f.Close()
	sc := bufio.NewScanner(f)
	if sc.Scan() {
		return sc.Text()
	}
	return ""
}

func (s *fotaServer) close() {
	if s.p != nil {
		s.p.stop(15 * time.Second)
	}
}

// releasePub is the release public key the devices pin.
func (s *fotaServer) releasePub() string { return filepath.Join(s.data, "release.pub") }

// env is what the CLI needs to reach this server as its admin.
func (s *fotaServer) env() []string {
	return []string{"FOTA_CERTS=" + s.certs, "FOTA_SERVER=" + s.api}
}

// cli runs `fota ARGS` against this server and returns its stdout.
func (s *fotaServer) cli(ctx context.Context, args ...string) ([]byte, error) {
	return run(ctx, cliTimeout, s.env(), append([]string{s.bin}, args...)...)
}

// cliJSON runs `fota ARGS` and decodes its JSON output into v.
func (s *fotaServer) cliJSON(ctx context.Context, v any, args ...string) error {
	out, err := s.cli(ctx, args...)
	if err != nil {
		return err
	}
	if err := json.Unmarshal(out, v); err != nil {
		return fmt.Errorf("fota %s: decode output: %w", strings.Join(args[:min(2, len(args))], " "), err)
	}
	return nil
}

// addFirmware adds an image with `fota firmware add`.
func (s *fotaServer) addFirmware(ctx context.Context, model, version, file string, counter int) error {
	_, err := s.cli(ctx, "firmware", "add", "--model", model, "--version", version, "--file", file,
		"--counter", fmt.Sprint(counter))
	return err
}

// online counts the devices the server's registry shows online (`fota device list --json`).
func (s *fotaServer) online(ctx context.Context) (int, error) {
	var list []struct {
		Online bool `json:"online"`
	}
	if err := s.cliJSON(ctx, &list, "device", "list", "--json"); err != nil {
		return 0, err
	}
	n := 0
	for _, d := range list {
		if d.Online {
			n++
		}
	}
	return n, nil
}

// rolloutView is the part of `fota rollout show --json` the suite reads.
type rolloutView struct {
	ID      string         `json:"id"`
	State   string         `json:"state"`
	Created time.Time      `json:"created"`
	Counts  map[string]int `json:"counts"`
	Jobs    []jobView      `json:"jobs"`
}

type jobView struct {
	Device   string    `json:"device"`
	State    string    `json:"state"`
	Delta    bool      `json:"delta"`
	Size     int64     `json:"size"`
	Bytes    int64     `json:"bytes"`
	Attempt  int       `json:"attempt"`
	Offered  time.Time `json:"offered"`
	Started  time.Time `json:"started"`
	Finished time.Time `json:"finished"`
}
