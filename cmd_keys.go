package main

import (
	"errors"
	"fmt"
	"io"
	"path/filepath"

	"github.com/fota-dev/fota/firmware"
)

func runKeys(args []string, stdout io.Writer) error {
	return subcommand("keys", args, stdout, map[string]func([]string, io.Writer) error{
		"generate": runKeysGenerate,
	})
}

// runKeysGenerate makes a release key pair, for signing offline: the private key stays on the
// signing machine, the server gets only release.pub.
func runKeysGenerate(args []string, stdout io.Writer) error {
	const cmd = "keys generate"
	fs := newFlags(cmd, stdout)
	out := fs.String("out", "", "directory to write release.key and release.pub to (created if missing)")
	if err := parseFlags(fs, args, 0); err != nil {
		return err
	}
	if *out == "" {
		return usagef("%s: --out is required", cmd)
	}
	if err := firmware.GenerateKey(*out); err != nil {
		if errors.Is(err, firmware.ErrKeyExists) {
			return fmt.Errorf("%s: %w; devices pin the release key, so it is never replaced", cmd, err)
		}
		return fmt.Errorf("%s: %w", cmd, err)
	}
	_, err := fmt.Fprintf(stdout,
		"wrote %s: the private release key; keep it secret, and sign with 'fota firmware sign --key'\n"+
			"wrote %s: the public key; devices pin it, and 'fota serve' with only it in --data accepts only firmware and deltas signed offline\n",
		filepath.Join(*out, firmware.PrivateKeyFile), filepath.Join(*out, firmware.PublicKeyFile))
	return err
}
