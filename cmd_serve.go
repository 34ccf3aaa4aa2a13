package main

import (
	"context"
	"fmt"
	"io"
	"log/slog"
	"os"
	"os/signal"
	"syscall"
	"time"
)

func runServe(args []string, stdout io.Writer) error {
	fs := newFlags("serve", stdout)
	data := fs.String("data", "", "data directory: state file fota.db and artifacts/")
	certsDir := fs.String("certs", os.Getenv("FOTA_CERTS"), "certificates directory made by 'fota certs init' (env FOTA_CERTS)")
	mqttAddr := fs.String("mqtt", ":8883", "MQTT-over-TLS listen address")
	apiAddr := fs.String("api", "127.0.0.1:8080", "admin HTTPS API listen address")
	level := fs.String("log-level", "info", "log level: debug, info, warn, error")
	deviceRate := fs.Int64("device-rate", 0, "frame bytes per second served to one device at most, after a burst of one 64 KiB frame; see PROTOCOL.md, Rate cap (0: no cap)")
	maxPending := fs.Int("max-pending", 0, "connections not yet authenticated (TLS handshake and CONNECT) at most, from all sources (0: default 8192, -1: no cap)")
	maxPendingSrc := fs.Int("max-pending-per-source", 0, "the same from one source address, an IPv6 /64 (0: default 1024, -1: no cap)")
	acceptRate := fs.Int("accept-rate", 0, "connections accepted per second at most (0: default 5000, -1: no cap)")
	acceptRateSrc := fs.Int("accept-rate-per-source", 0, "the same from one source address, an IPv6 /64 (0: default 2000, -1: no cap)")
	unreachable := fs.Duration("unreachable-after", 24*time.Hour, "a device of a rollout offline this long ends 'unreachable', so the rollout can finish")
	if err := parseFlags(fs, args, 0); err != nil {
		return err
	}
	for name, v := range map[string]int{"max-pending": *maxPending, "max-pending-per-source": *maxPendingSrc,
		"accept-rate": *acceptRate, "accept-rate-per-source": *acceptRateSrc} {
		if v < -1 {
			return usagef("serve: --%s must be a positive number, 0 (default) or -1 (no cap)", name)
		}
	}
	if *data == "" {
		return usagef("serve: --data is required")
	}
	if *certsDir == "" {
		return usagef("serve: --certs is required (or set FOTA_CERTS)")
	}
	if *deviceRate < 0 {
		return usagef("serve: --device-rate must not be negative")
	}
	if *unreachable <= 0 {
		return usagef("serve: --unreachable-after must be positive")
	}
	var lvl slog.Level
	if err := lvl.UnmarshalText([]byte(*level)); err != nil {
		return usagef("serve: bad --log-level %q", *level)
	}
	logger := slog.New(slog.NewTextHandler(os.Stderr, &slog.HandlerOptions{Level: lvl}))

	ctx, stop := signal.NotifyContext(context.Background(), os.Interrupt, syscall.SIGTERM)
	defer stop()
	srv, err := startServer(serverConfig{
		DataDir: *data, CertsDir: *certsDir, MQTTAddr: *mqttAddr, APIAddr: *apiAddr, Logger: logger,
		DeviceRate: *deviceRate,
		Limits: connLimits{MaxPending: *maxPending, MaxPendingPerSource: *maxPendingSrc,
			AcceptRate: *acceptRate, AcceptRatePerSource: *acceptRateSrc},
	})
	if err != nil {
		return err
	}
	fmt.Fprintf(stdout, "fota serving: mqtts://%s, admin API https://%s, release key %s\n", srv.broker.Addr(), srv.api.Addr(), srv.releasePub)
	<-ctx.Done()
	logger.Info("shutting down")
	closeCtx, cancel := context.WithTimeout(context.Background(), 10*time.Second)
	defer cancel()
	return srv.Close(closeCtx)
}
