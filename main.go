// Command fota updates the firmware of a fleet of devices over MQTT-over-TLS: one binary with an
// embedded broker, a rollout controller, an admin API and a device simulator.
package main

import (
	"errors"
	"flag"
	"fmt"
	"io"
	"os"

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
		{"certs", "init a CA, issue and revoke device certificates", runCerts},
		{"firmware", "add and list firmware", runFirmware},
		{"rollout", "create, list and show rollouts", runRollout},
		{"device", "list and show devices", runDevice},
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

// newFlags returns a flag set that reports errors instead of exiting and prints its usage
// only when asked with -h.
func newFlags(name string, stdout io.Writer) *flag.FlagSet {
	fs := flag.NewFlagSet("fota "+name, flag.ContinueOnError)
	fs.SetOutput(io.Discard)
	fs.Usage = func() {
		fs.SetOutput(stdout)
		fmt.Fprintf(stdout, "usage: fota %s [flags]\n", name)
		fs.PrintDefaults()
		fs.SetOutput(io.Discard)
	}
	return fs
}

// parseFlags parses args into fs, turning flag errors into usage errors and refusing
// positional arguments unless allowed.
func parseFlags(fs *flag.FlagSet, args []string, maxArgs int) error {
	if err := fs.Parse(args); err != nil {
		if errors.Is(err, flag.ErrHelp) {
			return err // fs.Usage has printed the help
		}
		return usagef("%s: %v", fs.Name(), err)
	}
	if fs.NArg() > maxArgs {
		return usagef("%s: unexpected argument %q", fs.Name(), fs.Arg(maxArgs))
	}
	return nil
}

// subcommand picks the sub-command in args[0] from subs.
func subcommand(group string, args []string, stdout io.Writer, subs map[string]func([]string, io.Writer) error) error {
	if len(args) == 0 {
		return usagef("%s: missing sub-command", group)
	}
	f, ok := subs[args[0]]
	if !ok {
		return usagef("%s: unknown sub-command %q", group, args[0])
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
