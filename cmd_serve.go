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
	deviceRate := fs.Int64("device-rate", 0, "bytes per second of chunks served to one device at most (0: no cap)")
	unreachable := fs.Duration("unreachable-after", 24*time.Hour, "a device of a rollout offline this long ends 'unreachable', so the rollout can finish")
	if err := parseFlags(fs, args, 0); err != nil {
		return err
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
		DeviceRate: *deviceRate, UnreachableAfter: *unreachable,
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
