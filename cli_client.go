package main

import (
	"context"
	"encoding/json"
	"flag"
	"fmt"
	"io"
	"net/url"
	"os"
	"os/signal"
	"strings"
	"text/tabwriter"
	"time"
	"unicode"

	"github.com/fota-dev/fota/api"
	"github.com/fota-dev/fota/certs"
	"github.com/fota-dev/fota/firmware"
	"github.com/fota-dev/fota/protocol"
)

// serverEnv names the environment variable that --server defaults to.
const serverEnv = "FOTA_SERVER"

const defaultServer = "https://127.0.0.1:8080"

// adminEnv names the environment variable that --admin defaults to.
const adminEnv = "FOTA_ADMIN"

// adminFlags are the flags of every command that talks to the admin API.
type adminFlags struct {
	server, certs, admin *string
}

func addAdminFlags(fs *flag.FlagSet) adminFlags {
	server := os.Getenv(serverEnv)
	if server == "" {
		server = defaultServer
	}
	admin := os.Getenv(adminEnv)
	if admin == "" {
		admin = certs.DefaultAdmin
	}
	return adminFlags{
		server: fs.String("server", server, "admin API URL (env "+serverEnv+")"),
		certs:  fs.String("certs", os.Getenv(certsDirEnv), "certs dir holding ca.crt and the admin's certificate and key (env "+certsDirEnv+")"),
		admin:  fs.String("admin", admin, "which admin's certificate to use: admin.crt for \"admin\", else admins/NAME.crt (env "+adminEnv+")"),
	}
}

// check reports a missing --certs or a malformed --server as a usage error. Commands call it
// with their other flag checks, before doing any work.
func (f adminFlags) check(cmd string) error {
	if *f.certs == "" {
		return usagef("%s: --certs is required (or set $%s)", cmd, certsDirEnv)
	}
	if err := certs.ValidAdminName(*f.admin); err != nil {
		return usagef("%s: --admin: %v", cmd, err)
	}
	u, err := url.Parse(*f.server)
	if err != nil || u.Scheme != "https" || u.Host == "" || strings.Trim(u.Path, "/") != "" || u.RawQuery != "" || u.User != nil {
		return usagef("%s: bad --server %q: want https://HOST:PORT", cmd, *f.server)
	}
	return nil
}

// client loads the certificate of admin --admin and returns a client for --server.
func (f adminFlags) client(cmd string) (*api.Client, error) {
	certPath, keyPath, err := certs.AdminPaths(*f.certs, *f.admin)
	if err != nil {
		return nil, fmt.Errorf("%s: --admin: %w", cmd, err)
	}
	tc, err := certs.ClientTLS(*f.certs, certPath, keyPath)
	if err != nil {
		return nil, fmt.Errorf("%s: load the certificate of admin %q: %w", cmd, *f.admin, err)
	}
	return api.NewClient(*f.server, tc), nil
}

// callAPI runs fn with a client and a context that Ctrl-C cancels, then releases the client's
// connections.
func (f adminFlags) callAPI(cmd string, fn func(ctx context.Context, c *api.Client) error) error {
	c, err := f.client(cmd)
	if err != nil {
		return err
	}
	defer c.Close()
	ctx, stop := signal.NotifyContext(context.Background(), os.Interrupt)
	defer stop()
	return fn(ctx, c)
}

// parseFlagsArg parses args holding exactly one positional argument, which may come before,
// between or after the flags (flag stops at the first non-flag, so "show ID --json" needs two
// passes).
func parseFlagsArg(fs *flag.FlagSet, args []string, cmd, what string) (string, error) {
	if err := parseFlags(fs, args, len(args)); err != nil {
		return "", err
	}
	if fs.NArg() == 0 {
		return "", usagef("%s: missing %s", cmd, what)
	}
	arg, rest := fs.Arg(0), fs.Args()[1:]
	if err := parseFlags(fs, rest, 0); err != nil {
		return "", err
	}
	return arg, nil
}

// printJSON writes v as indented JSON.
func printJSON(w io.Writer, v any) error {
	b, err := json.MarshalIndent(v, "", "  ")
	if err != nil {
		return fmt.Errorf("encode JSON: %w", err)
	}
	_, err = w.Write(append(b, '\n'))
	return err
}

// newTable returns a writer that aligns tab-separated columns; Flush it.
func newTable(w io.Writer) *tabwriter.Writer {
	return tabwriter.NewWriter(w, 0, 0, 2, ' ', 0)
}

// row writes one table row; cells are cleaned so a value cannot break the layout.
func row(w io.Writer, cells ...string) {
	for i, c := range cells {
		cells[i] = clean(c)
	}
	fmt.Fprintln(w, strings.Join(cells, "\t"))
}

// clean makes s safe to print on one line of a terminal. Some of what we print (failure
// reasons, versions) comes from devices, and a control character could move the cursor or
// rewrite what the operator sees.
func clean(s string) string {
	return strings.Map(func(r rune) rune {
		if r == '\t' || r == '\n' || r == '\r' {
			return ' '
		}
		if unicode.IsControl(r) {
			return '?'
		}
		return r
	}, s)
}

func orDash(s string) string {
	if s == "" {
		return "-"
	}
	return s
}

func fmtTime(t time.Time) string {
	if t.IsZero() {
		return "-"
	}
	return t.Local().Format("2006-01-02 15:04:05")
}

// fmtSize formats a byte count for people: 812 B, 1.5 KiB, 12.3 MiB.
func fmtSize(n int64) string {
	const unit = 1024
	if n < unit {
		return fmt.Sprintf("%d B", n)
	}
	v, i := float64(n)/unit, 0
	for v >= unit && i < 4 {
		v /= unit
		i++
	}
	return fmt.Sprintf("%.1f %ciB", v, "KMGTP"[i])
}

// short abbreviates a hash for tables.
func short(sha string) string {
	if len(sha) > 12 {
		return sha[:12]
	}
	return orDash(sha)
}

// listTable is what a list command prints: a hint when there is nothing, else a table.
type listTable[T any] struct {
	empty  string           // printed instead of an empty table
	header []string         // column names
	cells  func(T) []string // one row per item
}

// runList is every list command: runQuery with one API call, then the items as JSON or as a
// table.
func runList[T any](cmd string, args []string, stdout io.Writer, fetch func(*api.Client, context.Context) ([]T, error), t listTable[T]) error {
	return runQuery(cmd, args, stdout, func(ctx context.Context, c *api.Client, asJSON bool) error {
		list, err := fetch(c, ctx)
		if err != nil {
			return err
		}
		if asJSON {
			return printJSON(stdout, list)
		}
		if len(list) == 0 {
			_, err := fmt.Fprintln(stdout, t.empty)
			return err
		}
		tw := newTable(stdout)
		row(tw, t.header...)
		for _, item := range list {
			row(tw, t.cells(item)...)
		}
		return tw.Flush()
	})
}

// runQuery is every read-only command without arguments: the admin flags and --json, then
// show with a client of the admin API.
func runQuery(cmd string, args []string, stdout io.Writer, show func(ctx context.Context, c *api.Client, asJSON bool) error) error {
	fs := newFlags(cmd, stdout)
	af := addAdminFlags(fs)
	asJSON := fs.Bool("json", false, "print as JSON")
	if err := parseFlags(fs, args, 0); err != nil {
		return err
	}
	if err := af.check(cmd); err != nil {
		return err
	}
	return af.callAPI(cmd, func(ctx context.Context, c *api.Client) error { return show(ctx, c, *asJSON) })
}

// checkModel and checkVersion check a release's flags before anything is sent, as usage
// errors; checkVersion returns the canonical version.
func checkModel(cmd, model string) error {
	if err := firmware.ValidModel(model); err != nil {
		return usagef("%s: --model: %v", cmd, err)
	}
	return nil
}

func checkVersion(cmd, version string) (string, error) {
	v, err := protocol.ParseVersion(version)
	if err != nil {
		return "", usagef("%s: bad version %q: want MAJOR.MINOR.PATCH with an optional -PRERELEASE, e.g. 1.2.3", cmd, version)
	}
	return v.String(), nil
}
