// Command fota updates the firmware of a fleet of devices over MQTT-over-TLS: one binary with an
// embedded broker, a rollout controller, an admin API and a device simulator.
package main

import (
	"errors"
	"flag"
	"fmt"
	"io"
	"maps"
	"os"
	"slices"
	"strings"

	"github.com/fota-dev/fota/protocol"
)

// usageError marks a mistake in how the command was called; main exits 2 for it.
type usageError struct{ msg string }

func (e usageError) Error() string { return e.msg }

func usagef(format string, args ...any) error { return usageError{fmt.Sprintf(format, args...)} }

type command struct {
	name, summary string
	run           func(args []string, stdout io.Writer) error
}

func commands() []command {
	return []command{
		{"serve", "run the broker, controller and admin API", runServe},
		{"demo", "update 20 simulated devices end to end in a temp dir", runDemo},
		{"sim", "run simulated devices", runSim},
		{"certs", "init a CA, issue and revoke device and admin certificates", runCerts},
		{"firmware", "add, list, sign and delete firmware", runFirmware},
		{"keys", "generate release signing keys", runKeys},
		{"delta", "make and apply delta patches", runDelta},
		{"rollout", "create, watch, pause, resume and cancel rollouts", runRollout},
		{"device", "list, show and tag devices", runDevice},
		{"stats", "print the server's live counters", runStats},
		{"version", "print the version", runVersion},
	}
}

func main() {
	os.Exit(run(os.Args[1:], os.Stdout, os.Stderr))
}

// run executes one command line and returns the process exit code. Errors are printed as one
// line; usage mistakes exit 2, everything else 1.
func run(args []string, stdout, stderr io.Writer) int {
	err := dispatch(args, stdout)
	if err == nil {
		return 0
	}
	if errors.Is(err, flag.ErrHelp) {
		return 0
	}
	fmt.Fprintf(stderr, "fota: %v\n", err)
	var u usageError
	if errors.As(err, &u) {
		return 2
	}
	return 1
}

func dispatch(args []string, stdout io.Writer) error {
	if len(args) == 0 {
		printUsage(stdout)
		return usagef("no command given; try 'fota help'")
	}
	if args[0] == "help" || args[0] == "-h" || args[0] == "--help" {
		printUsage(stdout)
		return nil
	}
	for _, c := range commands() {
		if c.name == args[0] {
			return c.run(args[1:], stdout)
		}
	}
	return usagef("unknown command %q; try 'fota help'", args[0])
}

func printUsage(w io.Writer) {
	fmt.Fprintln(w, "usage: fota COMMAND [flags]")
	fmt.Fprintln(w)
	for _, c := range commands() {
		fmt.Fprintf(w, "  %-9s %s\n", c.name, c.summary)
	}
}

// newFlags returns a flag set that reports errors instead of exiting; its usage is printed
// only when asked for with -h, so a mistake costs the user one line.
func newFlags(name string, stdout io.Writer) *flag.FlagSet {
	fs := flag.NewFlagSet(name, flag.ContinueOnError)
	fs.SetOutput(helpOutput{stdout})
	fs.Usage = func() {}
	return fs
}

// helpOutput is a flag set's output: it swallows the flag package's own messages (errors are
// returned and printed once by main) and keeps the writer that -h prints to.
type helpOutput struct{ w io.Writer }

func (helpOutput) Write(p []byte) (int, error) { return len(p), nil }

// parseFlags parses args into fs, turning flag errors into usage errors and refusing
// positional arguments beyond maxArgs.
func parseFlags(fs *flag.FlagSet, args []string, maxArgs int) error {
	if err := fs.Parse(args); err != nil {
		if errors.Is(err, flag.ErrHelp) {
			if out, ok := fs.Output().(helpOutput); ok {
				fmt.Fprintf(out.w, "usage: fota %s [flags]\n", fs.Name())
				fs.SetOutput(out.w)
				fs.PrintDefaults()
				fs.SetOutput(out)
			}
			return err
		}
		return usagef("%s: %v", fs.Name(), err)
	}
	if fs.NArg() > maxArgs {
		return usagef("%s: unexpected argument %q", fs.Name(), fs.Arg(maxArgs))
	}
	return nil
}

// subcommand picks the sub-command in args[0] from subs; -h lists them.
func subcommand(group string, args []string, stdout io.Writer, subs map[string]func([]string, io.Writer) error) error {
	names := slices.Sorted(maps.Keys(subs))
	if len(args) == 0 {
		return usagef("%s: missing sub-command, one of: %s", group, strings.Join(names, ", "))
	}
	switch args[0] {
	case "-h", "--help", "help":
		fmt.Fprintf(stdout, "usage: fota %s {%s} [flags]\n", group, strings.Join(names, "|"))
		return flag.ErrHelp
	}
	f, ok := subs[args[0]]
	if !ok {
		return usagef("%s: unknown sub-command %q, want one of: %s", group, args[0], strings.Join(names, ", "))
	}
	return f(args[1:], stdout)
}

// version is set at link time with -X main.version=...
var version = "dev"

func runVersion(args []string, stdout io.Writer) error {
	fs := newFlags("version", stdout)
	if err := parseFlags(fs, args, 0); err != nil {
		return err
	}
	fmt.Fprintf(stdout, "fota %s (protocol v%d)\n", version, protocol.ProtocolVersion)
	return nil
}
