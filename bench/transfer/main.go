// Command transfer measures one device's download throughput over fota's chunk protocol (MQTT
// over mutual TLS through the embedded broker and the transfer server, as `fota serve` runs
// them) for several chunk sizes and windows, side by side with an HTTPS download of the same
// image from Go's net/http and with raw TLS, all on loopback with the same certificates.
//
//	go run ./bench/transfer -firmware ../shared/firmware/pybricks-primehub-7.28.0.bin
//
// Every configuration is measured once per round, rounds interleaved so that drift in the
// machine's load hits all of them alike, and the median round is reported. One measurement
// downloads the image -images times back to back on a connection already open. The MQTT
// device is transfertest's minimal client: windowed requests, CRC-32C check of every frame.
// The HTTPS client reads the body into a buffer (HTTP/1.1, TLS checks integrity). Raw TLS
// writes the image on a socket and reads it back: an upper bound for any protocol over TLS.
// Everything runs in this one process, so client and server share the machine's cores.
//
// The transfer server runs as `fota serve` runs it by default: no per-device rate cap.
package main

import (
	"bytes"
	"context"
	"crypto/sha256"
	"crypto/tls"
	"crypto/x509"
	"encoding/binary"
	"encoding/hex"
	"encoding/json"
	"errors"
	"flag"
	"fmt"
	"io"
	"log/slog"
	"net"
	"net/http"
	"os"
	"runtime"
	"runtime/pprof"
	"slices"
	"strconv"
	"strings"
	"sync/atomic"
	"syscall"
	"time"

	"github.com/fota-dev/fota/broker"
	"github.com/fota-dev/fota/certs"
	"github.com/fota-dev/fota/protocol"
	"github.com/fota-dev/fota/transfer"
	"github.com/fota-dev/fota/transfer/transfertest"
)

const deviceID = "bench-1"

func main() {
	image := flag.String("firmware", "../shared/firmware/pybricks-primehub-7.28.0.bin", "firmware image to download")
	rounds := flag.Int("rounds", 5, "rounds; the median is reported")
	images := flag.Int("images", 10, "downloads of the image per measurement")
	chunks := flag.String("chunks", "1,4,16,64", "chunk sizes in KiB")
	windows := flag.String("windows", "1,2,4,8,16", "windows (requests outstanding)")
	rate := flag.Int64("device-rate", 0, "transfer.Options.DeviceRate in bytes/s (0: no cap, as shipped)")
	cpuProfile := flag.String("cpuprofile", "", "write a CPU profile of the measurements to this file")
	asJSON := flag.Bool("json", false, "print the results as one JSON object instead of tables (for bench/suite)")
	flag.Parse()
	cfg := config{image: *image, rounds: *rounds, images: *images, rate: *rate, cpuProfile: *cpuProfile, json: *asJSON}
	var err error
	if cfg.chunks, err = ints(*chunks, 1<<10); err == nil {
		cfg.windows, err = ints(*windows, 1)
	}
	if err == nil {
		err = run(cfg, os.Stdout)
	}
	if err != nil {
		fmt.Fprintln(os.Stderr, "bench-transfer:", err)
		os.Exit(1)
	}
}

type config struct {
	image           string
	rounds, images  int
	chunks, windows []int
	rate            int64
	cpuProfile      string
	json            bool
}

func ints(s string, unit int) ([]int, error) {
	var out []int
	for _, f := range strings.Split(s, ",") {
		n, err := strconv.Atoi(strings.TrimSpace(f))
		if err != nil || n <= 0 {
			return nil, fmt.Errorf("bad list %q", s)
		}
		out = append(out, n*unit)
	}
	return out, nil
}

// fileArtifacts reads the one image through its file, as firmware.Store does.
type fileArtifacts struct {
	sha string
	f   *os.File
}

func (a fileArtifacts) ReadAt(sha string, p []byte, off int64) (int, error) {
	if sha != a.sha {
		return 0, errors.New("no such artifact")
	}
	return a.f.ReadAt(p, off)
}

// measurement is one configuration's throughput in each round.
type measurement struct {
	name          string
	chunk, window int
	mbps          []float64
	cpu           []float64 // CPU seconds of the process per wall second, both cores together
	busy, reasks  int
	run           func() (transfertest.Result, error)
}

func (m *measurement) median() float64 { return median(m.mbps) }

func median(v []float64) float64 {
	s := slices.Clone(v)
	slices.Sort(s)
	return s[len(s)/2]
}

// cpuTime is the process's user and system CPU time so far.
func cpuTime() time.Duration {
	var ru syscall.Rusage
	if err := syscall.Getrusage(syscall.RUSAGE_SELF, &ru); err != nil {
		return 0
	}
	return time.Duration(ru.Utime.Nano() + ru.Stime.Nano())
}

func run(cfg config, w io.Writer) error {
	data, err := os.ReadFile(cfg.image)
	if err != nil {
		return err
	}
	f, err := os.Open(cfg.image)
	if err != nil {
		return err
	}
	defer f.Close()
	sum := sha256.Sum256(data)
	sha := hex.EncodeToString(sum[:])
	size := int64(len(data))

	dir, err := os.MkdirTemp("", "bench-transfer-")
	if err != nil {
		return err
	}
	defer os.RemoveAll(dir)
	serverTLS, deviceTLS, err := tlsConfigs(dir)
	if err != nil {
		return err
	}
	log := slog.New(slog.NewTextHandler(os.Stderr, &slog.HandlerOptions{Level: slog.LevelWarn}))

	// The MQTT path: broker, transfer server, one device.
	b, err := broker.New(broker.Options{Addr: "127.0.0.1:0", TLS: serverTLS, Logger: log})
	if err != nil {
		return err
	}
	if err := b.Start(); err != nil {
		return err
	}
	defer b.Close(context.Background())
	var chunkMax atomic.Int64
	srv, err := transfer.New(transfer.Options{
		Lookup: func(string) (transfer.Transfer, bool) {
			return transfer.Transfer{Job: "bench", ID: 1, SHA256: sha, Size: size, ChunkMax: int(chunkMax.Load())}, true
		},
		Artifacts:  fileArtifacts{sha, f},
		Sender:     b,
		Logger:     log,
		DeviceRate: cfg.rate,
	})
	if err != nil {
		return err
	}
	defer srv.Close(context.Background())
	if err := b.Subscribe(protocol.SuffixRequest, srv.Handle); err != nil {
		return err
	}
	ctx := context.Background()
	dev, err := transfertest.Dial(ctx, b.Addr().String(), deviceTLS, deviceID)
	if err != nil {
		return err
	}
	defer dev.Close()

	// HTTPS and raw TLS on their own listeners, same certificates.
	httpsURL, stopHTTPS, err := serveHTTPS(serverTLS, cfg.image, data)
	if err != nil {
		return err
	}
	defer stopHTTPS()
	client := &http.Client{Transport: &http.Transport{TLSClientConfig: deviceTLS, MaxIdleConnsPerHost: 1}}
	rawAddr, stopRaw, err := serveRaw(serverTLS, data)
	if err != nil {
		return err
	}
	defer stopRaw()
	raw, err := tls.Dial("tcp", rawAddr, deviceTLS)
	if err != nil {
		return err
	}
	defer raw.Close()

	var ms []*measurement
	for _, c := range cfg.chunks {
		for _, win := range cfg.windows {
			m := &measurement{name: "MQTT", chunk: c, window: win}
			m.run = func() (transfertest.Result, error) {
				chunkMax.Store(int64(c))
				j := transfertest.Job{Job: "bench", Transfer: 1, Size: size, Chunk: c, Window: win}
				return dev.Download(ctx, j, transfertest.Options{})
			}
			ms = append(ms, m)
		}
	}
	httpsM := &measurement{name: "HTTPS", run: func() (transfertest.Result, error) {
		img, err := getHTTPS(client, httpsURL, size)
		return transfertest.Result{Image: img}, err
	}}
	rawM := &measurement{name: "raw TLS", run: func() (transfertest.Result, error) {
		img, err := getRaw(raw, size)
		return transfertest.Result{Image: img}, err
	}}
	ms = append(ms, httpsM, rawM)

	// One download each, checked against the image, warms every path up.
	for _, m := range ms {
		r, err := m.run()
		if err != nil {
			return fmt.Errorf("%s chunk %d window %d: %w", m.name, m.chunk, m.window, err)
		}
		if !bytes.Equal(r.Image, data) {
			return fmt.Errorf("%s chunk %d window %d: downloaded image differs", m.name, m.chunk, m.window)
		}
	}
	if cfg.cpuProfile != "" {
		pf, err := os.Create(cfg.cpuProfile)
		if err != nil {
			return err
		}
		defer pf.Close()
		if err := pprof.StartCPUProfile(pf); err != nil {
			return err
		}
		defer pprof.StopCPUProfile()
	}
	for round := 0; round < cfg.rounds; round++ {
		for _, m := range ms {
			runtime.GC() // the previous measurement's garbage is not this one's cost
			cpu0 := cpuTime()
			start := time.Now()
			for i := 0; i < cfg.images; i++ {
				r, err := m.run()
				if err != nil {
					return fmt.Errorf("%s chunk %d window %d: %w", m.name, m.chunk, m.window, err)
				}
				m.busy += r.Busy
				m.reasks += r.Reasks
			}
			el := time.Since(start)
			m.mbps = append(m.mbps, float64(size)*float64(cfg.images)/el.Seconds()/1e6)
			m.cpu = append(m.cpu, (cpuTime()-cpu0).Seconds()/el.Seconds())
		}
	}
	if cfg.json {
		return reportJSON(w, cfg, size, ms, srv.Stats(), b.Stats())
	}
	report(w, cfg, size, ms, httpsM, rawM, srv.Stats(), b.Stats())
	return nil
}

// jsonResult is one configuration's throughput in the -json output.
type jsonResult struct {
	Method string  `json:"method"` // MQTT, HTTPS or raw TLS
	Chunk  int     `json:"chunk,omitempty"`
	Window int     `json:"window,omitempty"`
	MBps   float64 `json:"mbps"` // median round, 10^6 bytes per second
	Min    float64 `json:"mbps_min"`
	Max    float64 `json:"mbps_max"`
	CPU    float64 `json:"cpu_cores"` // median CPU seconds per wall second, client and server together
}

// reportJSON writes what report prints, as one JSON object that bench/suite reads.
func reportJSON(w io.Writer, cfg config, size int64, ms []*measurement, st transfer.Stats, bs broker.Stats) error {
	out := struct {
		ImageBytes int64        `json:"image_bytes"`
		Images     int          `json:"images"`
		Rounds     int          `json:"rounds"`
		GOMAXPROCS int          `json:"gomaxprocs"`
		DeviceRate int64        `json:"device_rate"` // 0: no cap
		Results    []jsonResult `json:"results"`
		Busy       int          `json:"busy"`
		Reasks     int          `json:"reasks"`
		Chunks     int64        `json:"server_chunks"`
		Dropped    int64        `json:"server_dropped"`
		BrokerDrop int64        `json:"broker_dropped"`
	}{
		ImageBytes: size, Images: cfg.images, Rounds: cfg.rounds, GOMAXPROCS: runtime.GOMAXPROCS(0),
		DeviceRate: cfg.rate,
		Chunks:     int64(st.Chunks), Dropped: int64(st.Dropped), BrokerDrop: int64(bs.Dropped),
	}
	for _, m := range ms {
		out.Results = append(out.Results, jsonResult{
			Method: m.name, Chunk: m.chunk, Window: m.window,
			MBps: m.median(), Min: slices.Min(m.mbps), Max: slices.Max(m.mbps), CPU: median(m.cpu),
		})
		out.Busy += m.busy
		out.Reasks += m.reasks
	}
	enc := json.NewEncoder(w)
	enc.SetIndent("", "  ")
	enc.SetEscapeHTML(false)
	return enc.Encode(out)
}

func report(w io.Writer, cfg config, size int64, ms []*measurement, httpsM, rawM *measurement, st transfer.Stats, bs broker.Stats) {
	https := httpsM.median()
	fmt.Fprintf(w, "One device, %d-byte image downloaded %d times per measurement, median of %d rounds, GOMAXPROCS=%d, %s.\n",
		size, cfg.images, cfg.rounds, runtime.GOMAXPROCS(0), runtime.Version())
	rate := "no cap"
	if cfg.rate > 0 {
		rate = fmt.Sprintf("%d B/s", cfg.rate)
	}
	fmt.Fprintf(w, "transfer: DeviceRate %s.\n\n", rate)
	fmt.Fprintf(w, "HTTPS (net/http, HTTP/1.1, mutual TLS): %.1f MB/s; raw TLS: %.1f MB/s (%.2fx HTTPS).\n\n", https, rawM.median(), rawM.median()/https)

	fmt.Fprintf(w, "MQTT MB/s by chunk size (rows) and window (columns); in brackets, the ratio to HTTPS:\n\n")
	fmt.Fprintf(w, "| chunk |")
	for _, win := range cfg.windows {
		fmt.Fprintf(w, " window %d |", win)
	}
	fmt.Fprintf(w, "\n|---|")
	for range cfg.windows {
		fmt.Fprintf(w, "---|")
	}
	fmt.Fprintln(w)
	best := make(map[int]*measurement)
	for _, c := range cfg.chunks {
		fmt.Fprintf(w, "| %d KiB |", c>>10)
		for _, m := range ms {
			if m.name != "MQTT" || m.chunk != c {
				continue
			}
			fmt.Fprintf(w, " %.1f (%.2f) |", m.median(), m.median()/https)
			if b := best[c]; b == nil || m.median() > b.median() {
				best[c] = m
			}
		}
		fmt.Fprintln(w)
	}
	fmt.Fprintf(w, "\nBest window per chunk size (CPU: cores busy, client and server together, of %d):\n\n", runtime.NumCPU())
	fmt.Fprintf(w, "| method | chunk | window | MB/s | vs HTTPS | min..max MB/s | CPU |\n|---|---|---|---|---|---|---|\n")
	row := func(m *measurement, chunk, window string) {
		lo, hi := slices.Min(m.mbps), slices.Max(m.mbps)
		fmt.Fprintf(w, "| %s | %s | %s | %.1f | %.2f | %.1f..%.1f | %.2f |\n", m.name, chunk, window, m.median(), m.median()/https, lo, hi, median(m.cpu))
	}
	for _, c := range cfg.chunks {
		m := best[c]
		row(m, fmt.Sprintf("%d KiB", c>>10), strconv.Itoa(m.window))
	}
	row(httpsM, "-", "-")
	row(rawM, "-", "-")

	busy, reasks := 0, 0
	for _, m := range ms {
		busy += m.busy
		reasks += m.reasks
	}
	fmt.Fprintf(w, "\nDevice saw %d busy answers and re-asked %d times; server: %d chunks, %d paced, %d busy (rate %d, total %d), %d dropped; broker dropped %d.\n",
		busy, reasks, st.Chunks, st.Paced, st.ErrorFrames[protocol.ErrCodeBusy], st.BusyRate, st.BusyTotal, st.Dropped, bs.Dropped)
}

func tlsConfigs(dir string) (server, device *tls.Config, err error) {
	if err := certs.Init(dir, certs.InitOptions{}); err != nil {
		return nil, nil, err
	}
	a, err := certs.LoadAuthority(dir)
	if err != nil {
		return nil, nil, err
	}
	rl, err := certs.OpenRevocationList(dir)
	if err != nil {
		return nil, nil, err
	}
	if server, err = certs.ServerTLS(dir, rl); err != nil {
		return nil, nil, err
	}
	cert, err := a.DeviceTLS(deviceID, certs.IssueOptions{})
	if err != nil {
		return nil, nil, err
	}
	pool := x509.NewCertPool()
	pool.AddCert(a.Cert)
	device = &tls.Config{MinVersion: tls.VersionTLS12, Certificates: []tls.Certificate{cert}, RootCAs: pool, ServerName: "localhost"}
	return server, device, nil
}

func serveHTTPS(cfg *tls.Config, name string, data []byte) (string, func(), error) {
	ln, err := net.Listen("tcp", "127.0.0.1:0")
	if err != nil {
		return "", nil, err
	}
	mod := time.Now()
	hs := &http.Server{
		Handler: http.HandlerFunc(func(w http.ResponseWriter, r *http.Request) {
			http.ServeContent(w, r, name, mod, bytes.NewReader(data))
		}),
		TLSConfig: cfg.Clone(),
		ErrorLog:  nil,
	}
	go func() { _ = hs.Serve(tls.NewListener(ln, hs.TLSConfig)) }()
	return "https://" + ln.Addr().String() + "/image.bin", func() { _ = hs.Close() }, nil
}

var httpBuf []byte

func getHTTPS(c *http.Client, url string, size int64) ([]byte, error) {
	resp, err := c.Get(url)
	if err != nil {
		return nil, err
	}
	defer resp.Body.Close()
	if resp.StatusCode != http.StatusOK || resp.ContentLength != size {
		return nil, fmt.Errorf("GET %s: %s, %d bytes", url, resp.Status, resp.ContentLength)
	}
	if int64(len(httpBuf)) != size {
		httpBuf = make([]byte, size)
	}
	if _, err := io.ReadFull(resp.Body, httpBuf); err != nil {
		return nil, err
	}
	return httpBuf, nil
}

// serveRaw answers each 8-byte length with that many bytes of data, repeated.
func serveRaw(cfg *tls.Config, data []byte) (string, func(), error) {
	ln, err := tls.Listen("tcp", "127.0.0.1:0", cfg)
	if err != nil {
		return "", nil, err
	}
	go func() {
		for {
			c, err := ln.Accept()
			if err != nil {
				return
			}
			go func() {
				defer c.Close()
				var h [8]byte
				for {
					if _, err := io.ReadFull(c, h[:]); err != nil {
						return
					}
					n := int64(binary.BigEndian.Uint64(h[:]))
					for n > 0 {
						k := min(n, int64(len(data)))
						if _, err := c.Write(data[:k]); err != nil {
							return
						}
						n -= k
					}
				}
			}()
		}
	}()
	return ln.Addr().String(), func() { _ = ln.Close() }, nil
}

var rawBuf []byte

func getRaw(c net.Conn, size int64) ([]byte, error) {
	if int64(len(rawBuf)) != size {
		rawBuf = make([]byte, size)
	}
	if _, err := c.Write(binary.BigEndian.AppendUint64(nil, uint64(size))); err != nil {
		return nil, err
	}
	if _, err := io.ReadFull(c, rawBuf); err != nil {
		return nil, err
	}
	return rawBuf, nil
}
