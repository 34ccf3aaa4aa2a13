package main

import (
	"errors"
	"flag"
	"fmt"
	"io"
	"os"
	"path/filepath"
	"strings"

	"github.com/fota-dev/fota/certs"
	"github.com/fota-dev/fota/protocol"
)

// certsDirEnv names the environment variable that --dir defaults to.
const certsDirEnv = "FOTA_CERTS"

func runCerts(args []string, stdout io.Writer) error {
	return subcommand("certs", args, stdout, map[string]func([]string, io.Writer) error{
		"init":   runCertsInit,
		"issue":  runCertsIssue,
		"revoke": runCertsRevoke,
	})
}

// hostList is a repeatable string flag.
type hostList []string

func (h *hostList) String() string     { return strings.Join(*h, ",") }
func (h *hostList) Set(v string) error { *h = append(*h, v); return nil }

func certsDirFlag(fs *flag.FlagSet) *string {
	return fs.String("dir", os.Getenv(certsDirEnv), "certs directory (default $"+certsDirEnv+")")
}

func needDir(cmd, dir string) error {
	if dir == "" {
		return usagef("%s: --dir is required (or set $%s)", cmd, certsDirEnv)
	}
	return nil
}

func runCertsInit(args []string, stdout io.Writer) error {
	fs := newFlags("certs init", stdout)
	dir := certsDirFlag(fs)
	var hosts hostList
	fs.Var(&hosts, "host", "extra server certificate name or IP, besides localhost (repeatable)")
	force := fs.Bool("force", false, "replace an existing CA; certificates it issued stop working")
	if err := parseFlags(fs, args, 0); err != nil {
		return err
	}
	if err := needDir("certs init", *dir); err != nil {
		return err
	}
	err := certs.Init(*dir, certs.InitOptions{Hosts: hosts, Force: *force})
	if errors.Is(err, certs.ErrExists) {
		return fmt.Errorf("certs init: %s already holds a CA; --force replaces it and every device certificate it issued stops working", *dir)
	}
	if err != nil {
		return fmt.Errorf("certs init: %w", err)
	}
	fmt.Fprintf(stdout, "wrote CA, server and admin certificates to %s\n", *dir)
	return nil
}

func runCertsIssue(args []string, stdout io.Writer) error {
	fs := newFlags("certs issue", stdout)
	dir := certsDirFlag(fs)
	id := fs.String("device", "", "device id: 1-64 bytes, no white space, / + # or leading $")
	admin := fs.String("admin", "", "instead of a device, an admin named so: 1-64 of A-Z a-z 0-9 . _ -")
	model := fs.String("model", "", "hardware model recorded in the certificate: 1-64 of A-Z a-z 0-9 . _ -, as in 'firmware add'")
	if err := parseFlags(fs, args, 0); err != nil {
		return err
	}
	if err := needDir("certs issue", *dir); err != nil {
		return err
	}
	if set(fs, "admin") {
		if set(fs, "device") || set(fs, "model") {
			return usagef("certs issue: --admin issues an admin certificate; it takes neither --device nor --model")
		}
		return issueAdmin(*dir, *admin, stdout)
	}
	if err := validDeviceFlag("certs issue", *id); err != nil {
		return err
	}
	// The rule of 'firmware add': a device whose model no release can have is never updated.
	if *model != "" {
		if err := checkModel("certs issue", *model); err != nil {
			return err
		}
	}
	err := certs.IssueDeviceFiles(*dir, *id, *model)
	switch {
	case errors.Is(err, certs.ErrRevoked):
		return fmt.Errorf("certs issue: device %q was revoked, and revocation is permanent; issue the device a new id", *id)
	case errors.Is(err, certs.ErrExists):
		return fmt.Errorf("certs issue: device %q already has a certificate or key in %s", *id, filepath.Join(*dir, certs.DevicesDir))
	case err != nil:
		return fmt.Errorf("certs issue: %w", err)
	}
	base := filepath.Join(*dir, certs.DevicesDir, *id)
	fmt.Fprintf(stdout, "wrote %s.crt and %s.key\n", base, base)
	return nil
}

func issueAdmin(dir, name string, stdout io.Writer) error {
	if err := validAdminFlag("certs issue", name); err != nil {
		return err
	}
	err := certs.IssueAdminFiles(dir, name)
	switch {
	case errors.Is(err, certs.ErrRevoked):
		return fmt.Errorf("certs issue: admin %q was revoked, and revocation is permanent; choose another name", name)
	case errors.Is(err, certs.ErrExists):
		return fmt.Errorf("certs issue: admin %q already has a certificate or key in %s", name, dir)
	case err != nil:
		return fmt.Errorf("certs issue: %w", err)
	}
	certPath, keyPath, err := certs.AdminPaths(dir, name)
	if err != nil {
		return fmt.Errorf("certs issue: %w", err)
	}
	fmt.Fprintf(stdout, "wrote %s and %s; use them with --admin %s or $%s=%s\n", certPath, keyPath, name, adminEnv, name)
	return nil
}

func runCertsRevoke(args []string, stdout io.Writer) error {
	fs := newFlags("certs revoke", stdout)
	dir := certsDirFlag(fs)
	id := fs.String("device", "", "device id to revoke, permanently")
	admin := fs.String("admin", "", "instead of a device, the admin to revoke, permanently (the one 'certs init' made is \"admin\")")
	unissued := fs.Bool("unissued", false, "revoke even though this certs dir never issued the id or name")
	if err := parseFlags(fs, args, 0); err != nil {
		return err
	}
	if err := needDir("certs revoke", *dir); err != nil {
		return err
	}
	what, name := "device", *id
	if set(fs, "admin") {
		if set(fs, "device") {
			return usagef("certs revoke: give --device or --admin, not both")
		}
		if err := validAdminFlag("certs revoke", *admin); err != nil {
			return err
		}
		what, name = "admin", *admin
	} else if err := validDeviceFlag("certs revoke", *id); err != nil {
		return err
	}
	list, err := certs.OpenRevocationList(*dir)
	if err != nil {
		return fmt.Errorf("certs revoke: %w", err)
	}
	issued, err := certs.DeviceIssued(*dir, name)
	revoked := list.Revoked(name)
	if what == "admin" {
		issued, err = certs.AdminIssued(*dir, name)
		revoked = list.AdminRevoked(name)
	}
	if err != nil {
		return fmt.Errorf("certs revoke: %w", err)
	}
	// Revocation is permanent, so a mistyped id or a wrong --dir would burn a name for good
	// while the certificate meant stays valid: only what this dir issued is revoked unasked.
	warn := !issued && !revoked
	if warn && !*unissued {
		return fmt.Errorf("certs revoke: %s %q was never issued from %s; check the name and --dir, or give --unissued to revoke it anyway (permanent)", what, name, *dir)
	}
	if what == "admin" {
		err = certs.RevokeAdmin(*dir, name)
	} else {
		err = certs.Revoke(*dir, name)
	}
	if err != nil {
		return fmt.Errorf("certs revoke: %w", err)
	}
	if warn {
		fmt.Fprintf(stdout, "warning: %s %q was never issued from %s; revoked anyway, as --unissued asks\n", what, name, *dir)
	}
	fmt.Fprintf(stdout, "revoked %s %q in %s (permanent: it cannot be issued again)\n", what, name, filepath.Join(*dir, certs.RevokedFile))
	return nil
}

// set reports whether the flag name was given on the command line, even as empty.
func set(fs *flag.FlagSet, name string) bool {
	found := false
	fs.Visit(func(f *flag.Flag) { found = found || f.Name == name })
	return found
}

// validAdminFlag turns a bad --admin into a usage error.
func validAdminFlag(cmd, name string) error {
	if err := certs.ValidAdminName(name); err != nil {
		return usagef("%s: --admin: %v", cmd, err)
	}
	return nil
}

// validDeviceFlag turns a bad --device into a usage error: it is a typing mistake, not a
// failure of the command.
func validDeviceFlag(cmd, id string) error {
	if id == "" {
		return usagef("%s: --device is required", cmd)
	}
	if err := protocol.ValidDeviceID(id); err != nil {
		return usagef("%s: --device: %v", cmd, err)
	}
	return nil
}
