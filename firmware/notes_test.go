package firmware_test

import (
	"bytes"
	"errors"
	"strings"
	"testing"

	"github.com/fota-dev/fota/firmware"
)

func TestAddBoundsNotes(t *testing.T) {
	tests := []struct {
		name, notes string
		want        error
	}{
		{"at the limit", strings.Repeat("n", firmware.MaxNotesLen), nil},
		{"over the limit", strings.Repeat("n", firmware.MaxNotesLen+1), firmware.ErrBadNotes},
		{"not UTF-8", "caf\xe9", firmware.ErrBadNotes},
	}
	for _, tt := range tests {
		t.Run(tt.name, func(t *testing.T) {
			e := newEnv(t, 0)
			f, _, err := e.s.Add(t.Context(), firmware.AddRequest{Model: "primehub", Version: "1.0.0", Notes: tt.notes, Body: bytes.NewReader([]byte("image"))})
			if !errors.Is(err, tt.want) {
				t.Fatalf("Add: got %v, want %v", err, tt.want)
			}
			list, lerr := e.s.List()
			switch {
			case lerr != nil:
				t.Fatal(lerr)
			case tt.want == nil && (len(list) != 1 || list[0].Notes != tt.notes || f.Notes != tt.notes):
				t.Errorf("after Add: got %d records, want one with the notes", len(list))
			case tt.want != nil && (len(list) != 0 || len(e.artifacts(t)) != 0 || len(e.temps(t)) != 0):
				t.Errorf("after a refused Add: got %d records, %d artifacts, %d temp files; want none", len(list), len(e.artifacts(t)), len(e.temps(t)))
			}
			if tt.want != nil && !strings.Contains(err.Error(), "primehub 1.0.0") {
				t.Errorf("Add: got %q, want it to name the release", err)
			}
		})
	}
}
