package api

import (
	"bytes"
	"context"
	"crypto/ed25519"
	"crypto/rand"
	"encoding/json"
	"errors"
	"io"
	"mime/multipart"
	"net/http"
	"strings"
	"testing"

	"github.com/fota-dev/fota/firmware"
)

// changelog returns about n bytes of release notes as operators write them: lines, and
// characters a URL must escape.
func changelog(n int) string {
	var b strings.Builder
	for i := 0; b.Len() < n; i++ {
		b.WriteString("- Motorsteuerung: Drift bei 100 % Last behoben (#")
		b.WriteString(strings.Repeat("7", i%5+1))
		b.WriteString(")\n")
	}
	return b.String()[:n]
}

// rawUpload posts body with Content-Type ctype to the firmware path with the admin
// certificate, and returns the status and the error message.
func rawUpload(t *testing.T, e *env, query, ctype string, body []byte) (int, string) {
	t.Helper()
	hc := &http.Client{Transport: &http.Transport{TLSClientConfig: e.ca.AdminTLS(t)}}
	defer hc.CloseIdleConnections()
	req, err := http.NewRequest(http.MethodPost, e.url+pathFirmware+"?"+query, bytes.NewReader(body))
	if err != nil {
		t.Fatal(err)
	}
	req.Header.Set("Content-Type", ctype)
	resp, err := hc.Do(req)
	if err != nil {
		t.Fatalf("upload: %v", err)
	}
	defer resp.Body.Close()
	b, _ := io.ReadAll(resp.Body)
	var eb errorBody
	if resp.StatusCode >= 400 {
		if err := json.Unmarshal(b, &eb); err != nil || eb.Error == "" {
			t.Errorf("got body %q, want a JSON error", b)
		}
	}
	return resp.StatusCode, eb.Error
}

// multipartBody builds a multipart/form-data body of the given parts, in order.
func multipartBody(t *testing.T, parts ...[2]string) ([]byte, string) {
	t.Helper()
	var buf bytes.Buffer
	mw := multipart.NewWriter(&buf)
	for _, p := range parts {
		w, err := mw.CreateFormFile(p[0], p[0])
		if err != nil {
			t.Fatal(err)
		}
		if _, err := io.WriteString(w, p[1]); err != nil {
			t.Fatal(err)
		}
	}
	if err := mw.Close(); err != nil {
		t.Fatal(err)
	}
	return buf.Bytes(), mw.FormDataContentType()
}

// TestFirmwareNotesInBody: release notes travel in the body, so notes far larger than the
// header limit are stored whole; notes above firmware.MaxNotesLen are refused with a message
// naming the limit, and a refused upload leaves the store as it was.
func TestFirmwareNotesInBody(t *testing.T) {
	_, priv, err := ed25519.GenerateKey(rand.Reader)
	if err != nil {
		t.Fatal(err)
	}
	store := realStore(t, priv, nil)
	e := start(t, func(o *Options) { o.Firmware = store })
	c := e.admin(t)
	ctx := context.Background()

	notes := changelog(60 << 10)
	f, created, err := c.UploadFirmware(ctx, FirmwareUpload{Model: "primehub", Version: "1.0.0", Notes: notes, Body: strings.NewReader("image 1")})
	if err != nil || !created {
		t.Fatalf("upload with 60 KiB of notes: %v, created %v; want nil, true", err, created)
	}
	if f.Notes != notes {
		t.Errorf("stored notes: got %d bytes, want the %d sent", len(f.Notes), len(notes))
	}
	list, err := c.ListFirmware(ctx)
	if err != nil || len(list) != 1 || list[0].Notes != notes || list[0].Size != int64(len("image 1")) {
		t.Fatalf("list after the upload: got %d records (%v), want the one with its notes", len(list), err)
	}
	want := list

	// The client refuses notes over the limit before sending anything.
	big := changelog(100 << 10)
	body := &sizedCounter{r: bytes.NewReader([]byte("image 2"))}
	_, _, err = c.UploadFirmware(ctx, FirmwareUpload{Model: "primehub", Version: "1.1.0", Notes: big, Body: body})
	if err == nil || !strings.Contains(err.Error(), "65536") || body.n != 0 {
		t.Errorf("upload with 100 KiB of notes: got %v after sending %d bytes, want an error naming the 65536-byte limit after 0", err, body.n)
	}
	if !errors.Is(err, firmware.ErrBadNotes) {
		t.Errorf("upload with 100 KiB of notes: got %v, want firmware.ErrBadNotes", err)
	}

	// So does the server, for any other client.
	refused := []struct {
		name, query string
		parts       [][2]string
		status      int
		msg         string
	}{
		{"notes over the limit", "model=primehub&version=1.1.0", [][2]string{{"notes", big}, {"image", "image 2"}},
			http.StatusBadRequest, "over the limit of 65536 bytes"},
		{"notes not UTF-8", "model=primehub&version=1.1.0", [][2]string{{"notes", "caf\xe9"}, {"image", "image 2"}},
			http.StatusBadRequest, "not UTF-8"},
		{"notes in the query", "model=primehub&version=1.1.0&notes=hello", [][2]string{{"image", "image 2"}},
			http.StatusBadRequest, "release notes go in the request body"},
		{"image not last", "model=primehub&version=1.1.0", [][2]string{{"image", "image 2"}, {"notes", "late"}},
			http.StatusBadRequest, `"image" part must be the last`},
		{"no image", "model=primehub&version=1.1.0", [][2]string{{"notes", "hello"}},
			http.StatusBadRequest, `no "image" part`},
		{"unknown part", "model=primehub&version=1.1.0", [][2]string{{"readme", "x"}, {"image", "image 2"}},
			http.StatusBadRequest, `unexpected part "readme"`},
	}
	for _, tt := range refused {
		t.Run(tt.name, func(t *testing.T) {
			b, ctype := multipartBody(t, tt.parts...)
			status, msg := rawUpload(t, e, tt.query, ctype, b)
			if status != tt.status || !strings.Contains(msg, tt.msg) {
				t.Errorf("got %d %q, want %d %q", status, msg, tt.status, tt.msg)
			}
			if list, err := c.ListFirmware(ctx); err != nil || len(list) != 1 || list[0] != want[0] {
				t.Errorf("list after the refusal: got %d records (%v), want only the first, unchanged", len(list), err)
			}
		})
	}

	// A raw image with no notes is still an upload.
	if status, msg := rawUpload(t, e, "model=primehub&version=1.2.0", "application/octet-stream", []byte("image 3")); status != http.StatusCreated {
		t.Errorf("raw image: got %d %q, want 201", status, msg)
	}
}

// TestNotesUploadImageLimit: with notes in the body, the image itself is still held to
// MaxUpload, and the refusal names the image.
func TestNotesUploadImageLimit(t *testing.T) {
	_, priv, err := ed25519.GenerateKey(rand.Reader)
	if err != nil {
		t.Fatal(err)
	}
	store := realStore(t, priv, nil)
	e := start(t, func(o *Options) { o.Firmware, o.MaxUpload = store, 16 })
	b, ctype := multipartBody(t, [2]string{"notes", "short"}, [2]string{"image", strings.Repeat("x", 17)})
	status, msg := rawUpload(t, e, "model=primehub&version=1.0.0", ctype, b)
	if status != http.StatusRequestEntityTooLarge || !strings.Contains(msg, "firmware image too large") {
		t.Errorf("17-byte image with notes: got %d %q, want 413 firmware image too large", status, msg)
	}
	if list, err := store.List(); err != nil || len(list) != 0 {
		t.Errorf("store after the refusal: got %d records (%v), want none", len(list), err)
	}
	b, ctype = multipartBody(t, [2]string{"notes", "short"}, [2]string{"image", strings.Repeat("x", 16)})
	if status, msg := rawUpload(t, e, "model=primehub&version=1.0.0", ctype, b); status != http.StatusCreated {
		t.Errorf("16-byte image with notes: got %d %q, want 201", status, msg)
	}
}
