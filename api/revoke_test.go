package api

import (
	"bufio"
	"context"
	"crypto/tls"
	"errors"
	"fmt"
	"io"
	"log/slog"
	"net/http"
	"net/http/httptrace"
	"strings"
	"testing"
	"time"

	"github.com/fota-dev/fota/certs"
	"github.com/fota-dev/fota/certs/certstest"
	"github.com/fota-dev/fota/controller"
	"github.com/fota-dev/fota/fotatest"
)

// startRevoking runs a server that checks ca's revocation list on every request, with admins
// ops and oncall issued besides the default one.
func startRevoking(t *testing.T, rollouts *fakeRollouts, store *fakeStore) (*certstest.CA, *Server) {
	t.Helper()
	ca := certstest.New(t)
	for _, name := range []string{"ops", "oncall"} {
		if err := certs.IssueAdminFiles(ca.Dir, name); err != nil {
			t.Fatal(err)
		}
	}
	srv, err := New(Options{
		Addr: "127.0.0.1:0", TLS: ca.ServerTLS(t), Rollouts: rollouts, Firmware: store,
		Revoked: ca.Revoked, Logger: slog.New(slog.DiscardHandler),
	})
	if err != nil {
		t.Fatal(err)
	}
	if err := srv.Start(); err != nil {
		t.Fatal(err)
	}
	t.Cleanup(func() {
		ctx, cancel := context.WithTimeout(context.Background(), 5*time.Second)
		defer cancel()
		srv.Close(ctx)
	})
	return ca, srv
}

// adminClientTLS is the client configuration of admin name of ca.
func adminClientTLS(t *testing.T, ca *certstest.CA, name string) *tls.Config {
	t.Helper()
	certPath, keyPath, err := certs.AdminPaths(ca.Dir, name)
	if err != nil {
		t.Fatal(err)
	}
	tc, err := certs.ClientTLS(ca.Dir, certPath, keyPath)
	if err != nil {
		t.Fatal(err)
	}
	tc.ServerName = "localhost"
	return tc
}

// TestRevokedAdminRefusedPerRequest: a connection kept alive from before an admin's
// revocation is refused on its next request, and closed; new connections are refused at the
// handshake; other admins carry on. Nobody closes connections here (see CloseAdmin): this is
// the check every request passes.
func TestRevokedAdminRefusedPerRequest(t *testing.T) {
	ca, srv := startRevoking(t, &fakeRollouts{}, &fakeStore{})
	url := "https://" + srv.Addr().String()
	var reused bool
	ctx := httptrace.WithClientTrace(context.Background(), &httptrace.ClientTrace{
		GotConn: func(info httptrace.GotConnInfo) { reused = info.Reused },
	})
	ops := NewClient(url, adminClientTLS(t, ca, "ops"))
	defer ops.Close()
	oncall := NewClient(url, adminClientTLS(t, ca, "oncall"))
	defer oncall.Close()
	for i := range 2 {
		if err := ops.Health(ctx); err != nil {
			t.Fatalf("ops request %d before revocation: %v", i, err)
		}
	}
	if !reused {
		t.Fatal("ops's second request opened a new connection; the test needs one kept alive")
	}
	if err := oncall.Health(ctx); err != nil {
		t.Fatalf("oncall before revocation: %v", err)
	}

	if err := certs.RevokeAdmin(ca.Dir, "ops"); err != nil {
		t.Fatal(err)
	}
	if _, err := ca.Revoked.Reload(); err != nil {
		t.Fatal(err)
	}
	err := ops.Health(ctx)
	if code, msg := statusOf(t, err); code != http.StatusForbidden || !strings.Contains(msg, `admin certificate "ops" is revoked`) || !reused {
		t.Fatalf("ops's next request: got %d %q on a reused connection %v; want 403 revoked on the open connection", code, msg, reused)
	}
	err = ops.Health(ctx)
	var apiErr *Error
	if err == nil || errors.As(err, &apiErr) || reused {
		t.Errorf("ops after the refusal: got %v, reused %v; want a refused handshake on a new connection", err, reused)
	}
	if err := oncall.Health(ctx); err != nil || !reused {
		t.Errorf("oncall after ops's revocation: got %v, reused %v; want nil on its open connection", err, reused)
	}
	if err := NewClient(url, ca.AdminTLS(t)).Health(context.Background()); err != nil {
		t.Errorf("the default admin after ops's revocation: %v", err)
	}
}

// TestCloseAdmin: CloseAdmin closes the named admin's connections, idle or in the middle of
// an upload, and nobody else's.
func TestCloseAdmin(t *testing.T) {
	store := &fakeStore{}
	ca, srv := startRevoking(t, &fakeRollouts{}, store)
	dial := func(name string) (*tls.Conn, *bufio.Reader) {
		t.Helper()
		c, err := tls.Dial("tcp", srv.Addr().String(), adminClientTLS(t, ca, name))
		if err != nil {
			t.Fatal(err)
		}
		t.Cleanup(func() { c.Close() })
		return c, bufio.NewReader(c)
	}
	// get sends one request and reads its answer, keeping the connection open.
	get := func(c *tls.Conn, r *bufio.Reader) {
		t.Helper()
		fmt.Fprintf(c, "GET %s HTTP/1.1\r\nHost: fota\r\n\r\n", pathHealth)
		resp, err := http.ReadResponse(r, nil)
		if err != nil {
			t.Fatal(err)
		}
		io.Copy(io.Discard, resp.Body)
		resp.Body.Close()
		if resp.StatusCode != http.StatusOK {
			t.Fatalf("health: got %d, want 200", resp.StatusCode)
		}
	}
	idle, idleR := dial("ops")
	get(idle, idleR)
	other, otherR := dial("oncall")
	get(other, otherR)
	upload, _ := dial("ops")
	fmt.Fprintf(upload, "POST %s?model=primehub&version=1.0.0 HTTP/1.1\r\nHost: fota\r\nContent-Type: application/octet-stream\r\nContent-Length: 100000\r\n\r\n%s",
		pathFirmware, strings.Repeat("x", 1000))
	fotatest.WaitForValue(t, 20*time.Second, "the server to read the upload's first 1000 bytes", func() (int64, bool) {
		n := store.received.Load()
		return n, n >= 1000
	})

	if n := srv.CloseAdmin("ops"); n != 2 {
		t.Errorf("CloseAdmin(ops): got %d, want 2 (the idle connection and the upload)", n)
	}
	idle.SetReadDeadline(time.Now().Add(10 * time.Second))
	upload.SetReadDeadline(time.Now().Add(10 * time.Second))
	for name, r := range map[string]io.Reader{"idle": idleR, "upload": upload} {
		if _, err := io.ReadAll(r); err != nil && !errors.Is(err, io.ErrUnexpectedEOF) && !strings.Contains(err.Error(), "reset") {
			t.Errorf("ops's %s connection after CloseAdmin: got %v, want it closed", name, err)
		}
	}
	if list, _ := store.List(); len(list) != 0 {
		t.Errorf("the cut upload stored %d records, want none", len(list))
	}
	get(other, otherR)
	if n := srv.CloseAdmin("ops"); n != 0 {
		t.Errorf("CloseAdmin(ops) again: got %d, want 0", n)
	}
}

// TestDeviceRevokedField: device answers say which devices are revoked.
func TestDeviceRevokedField(t *testing.T) {
	rollouts := &fakeRollouts{devices: []controller.Device{{ID: "dev-1", Model: "primehub"}, {ID: "dev-2", Model: "primehub"}}}
	ca, srv := startRevoking(t, rollouts, &fakeStore{})
	ca.Revoke(t, "dev-1")
	c := NewClient("https://"+srv.Addr().String(), ca.AdminTLS(t))
	defer c.Close()
	ctx := context.Background()
	list, err := c.ListDevices(ctx)
	if err != nil || len(list) != 2 || !list[0].Revoked || list[1].Revoked {
		t.Errorf("ListDevices: got %+v, %v; want dev-1 revoked, dev-2 not", list, err)
	}
	for id, want := range map[string]bool{"dev-1": true, "dev-2": false} {
		if d, err := c.GetDevice(ctx, id); err != nil || d.Revoked != want {
			t.Errorf("GetDevice(%s): got %+v, %v; want revoked %v", id, d, err, want)
		}
	}
}
