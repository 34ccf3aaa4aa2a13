package main

import (
	"crypto/ed25519"
	"encoding/json"
	"strings"
	"testing"

	"github.com/fota-dev/fota/firmware"
)

// releaseNotes returns n bytes of release notes as operators write them: lines, and
// characters a URL must escape.
func releaseNotes(n int) string {
	var b strings.Builder
	for i := 0; b.Len() < n; i++ {
		b.WriteString("- Überarbeitete Motorsteuerung: 100 % Last ohne Drift (#4")
		b.WriteString(strings.Repeat("2", i%4+1))
		b.WriteString(")\n")
	}
	return b.String()[:n]
}

// TestFirmwareAddNotes: 'firmware add' sends notes far above the header limit, from the
// command line or from --notes-file; notes above the 64 KiB limit get one line naming it,
// a non-zero exit, and leave the server's store as it was.
func TestFirmwareAddNotes(t *testing.T) {
	_, priv, err := ed25519.GenerateKey(nil)
	if err != nil {
		t.Fatal(err)
	}
	a, store := storeAPI(t, priv, nil)
	image := writeTestFile(t, "fw.bin", []byte("firmware image"))
	notes := releaseNotes(60 << 10)

	code, out, errOut := a.fota(t, "firmware", "add", "--model", "primehub", "--version", "1.0.0", "--file", image,
		"--notes-file", writeTestFile(t, "notes.md", []byte(notes)))
	if code != 0 || !strings.HasPrefix(out, "added firmware primehub 1.0.0") {
		t.Fatalf("firmware add --notes-file of 60 KiB: got exit %d, stdout %q, stderr %q; want 0, added", code, out, errOut)
	}
	code, out, errOut = a.fota(t, "firmware", "list", "--json")
	var list []firmware.Firmware
	if code != 0 || json.Unmarshal([]byte(out), &list) != nil || len(list) != 1 || list[0].Notes != notes {
		t.Fatalf("firmware list --json: got exit %d, %d records, stderr %q; want the release with its %d bytes of notes", code, len(list), errOut, len(notes))
	}
	code, out, _ = a.fota(t, "firmware", "list")
	if first, _, _ := strings.Cut(notes, "\n"); code != 0 || !strings.Contains(out, first) || len(out) > 1000 {
		t.Errorf("firmware list: got exit %d and %d bytes, want the notes' first line %q in a short table", code, len(out), first)
	}

	big := releaseNotes(100 << 10)
	bigFile := writeTestFile(t, "big.md", []byte(big))
	refusals := []struct {
		name string
		args []string
		code int
		want string
	}{
		{"100 KB of --notes", []string{"--notes", big}, 2, "bad release notes: 102400 bytes, the limit is 65536"},
		{"100 KB --notes-file", []string{"--notes-file", bigFile}, 1, "notes file " + bigFile + " is larger than the limit of 65536 bytes"},
		{"missing --notes-file", []string{"--notes-file", bigFile + ".gone"}, 1, "cannot read notes file " + bigFile + ".gone: no such file"},
		{"both", []string{"--notes", "x", "--notes-file", bigFile}, 2, "give --notes or --notes-file, not both"},
	}
	for _, tt := range refusals {
		t.Run(tt.name, func(t *testing.T) {
			args := append([]string{"firmware", "add", "--model", "primehub", "--version", "1.1.0", "--file", image}, tt.args...)
			code, out, errOut := a.fota(t, args...)
			if code != tt.code || out != "" || strings.Count(errOut, "\n") != 1 || !strings.Contains(errOut, tt.want) {
				t.Errorf("got exit %d, stdout %q, stderr %q; want exit %d and one line saying %q", code, out, errOut, tt.code, tt.want)
			}
			if list, err := store.List(); err != nil || len(list) != 1 || list[0].Version != "1.0.0" || list[0].Notes != notes {
				t.Errorf("store after the refusal: got %d records (%v), want only 1.0.0 with its notes", len(list), err)
			}
		})
	}
}
