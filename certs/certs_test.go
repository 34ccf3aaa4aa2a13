package certs_test

import (
	"bytes"
	"crypto/tls"
	"crypto/x509"
	"crypto/x509/pkix"
	"encoding/pem"
	"errors"
	"io/fs"
	"math/big"
	"net"
	"os"
	"path/filepath"
	"slices"
	"strings"
	"testing"
	"time"

	"github.com/fota-dev/fota/atomicfile"
	"github.com/fota-dev/fota/certs"
	"github.com/fota-dev/fota/certs/certstest"
	"github.com/fota-dev/fota/protocol"
)

func parseCertFile(t *testing.T, path string) *x509.Certificate {
	t.Helper()
	data, err := os.ReadFile(path)
	if err != nil {
		t.Fatal(err)
	}
	return parseCertPEM(t, data)
}

func parseCertPEM(t *testing.T, data []byte) *x509.Certificate {
	t.Helper()
	b, _ := pem.Decode(data)
	if b == nil || b.Type != "CERTIFICATE" {
		t.Fatalf("no CERTIFICATE block in %q", data)
	}
	c, err := x509.ParseCertificate(b.Bytes)
	if err != nil {
		t.Fatal(err)
	}
	return c
}

func mode(t *testing.T, path string) fs.FileMode {
	t.Helper()
	fi, err := os.Stat(path)
	if err != nil {
		t.Fatal(err)
	}
	return fi.Mode().Perm()
}

func TestInit(t *testing.T) {
	dir := filepath.Join(t.TempDir(), "certs")
	if err := certs.Init(dir, certs.InitOptions{Hosts: []string{"fota.example.com", "10.0.0.5", "2001:db8::1", "localhost"}}); err != nil {
		t.Fatal(err)
	}
	for _, tc := range []struct {
		name string
		want fs.FileMode
	}{
		{"", 0o700},
		{certs.DevicesDir, 0o700},
		{certs.CAFile, 0o644},
		{certs.CAKeyFile, 0o600},
		{certs.ServerCertFile, 0o644},
		{certs.ServerKeyFile, 0o600},
		{certs.AdminCertFile, 0o644},
		{certs.AdminKeyFile, 0o600},
	} {
		if got := mode(t, filepath.Join(dir, tc.name)); got != tc.want {
			t.Errorf("mode of %q: got %v, want %v", tc.name, got, tc.want)
		}
	}
	entries, err := os.ReadDir(dir)
	if err != nil {
		t.Fatal(err)
	}
	for _, e := range entries {
		if ok, _ := filepath.Match(atomicfile.TempGlob, e.Name()); ok {
			t.Errorf("temp file %s left behind", e.Name())
		}
	}

	ca := parseCertFile(t, filepath.Join(dir, certs.CAFile))
	if !ca.IsCA {
		t.Errorf("ca.crt IsCA: got false, want true")
	}
	if got, want := ca.NotAfter.Sub(ca.NotBefore), 10*365*24*time.Hour; got < want {
		t.Errorf("CA validity: got %v, want at least %v", got, want)
	}
	if d := time.Since(ca.NotBefore); d < 4*time.Minute || d > 10*time.Minute {
		t.Errorf("CA NotBefore: got %v ago, want about 5 minutes ago", d)
	}

	srv := parseCertFile(t, filepath.Join(dir, certs.ServerCertFile))
	if srv.Subject.CommonName != "fota server" {
		t.Errorf("server CN: got %q, want %q", srv.Subject.CommonName, "fota server")
	}
	if !slices.Equal(srv.ExtKeyUsage, []x509.ExtKeyUsage{x509.ExtKeyUsageServerAuth}) {
		t.Errorf("server ExtKeyUsage: got %v, want [ServerAuth]", srv.ExtKeyUsage)
	}
	if want := []string{"localhost", "fota.example.com"}; !slices.Equal(srv.DNSNames, want) {
		t.Errorf("server DNS names: got %q, want %q", srv.DNSNames, want)
	}
	var ips []string
	for _, ip := range srv.IPAddresses {
		ips = append(ips, ip.String())
	}
	if want := []string{"127.0.0.1", "::1", "10.0.0.5", "2001:db8::1"}; !slices.Equal(ips, want) {
		t.Errorf("server IPs: got %q, want %q", ips, want)
	}
	pool := x509.NewCertPool()
	pool.AddCert(ca)
	for _, host := range []string{"localhost", "127.0.0.1", "::1", "fota.example.com", "10.0.0.5"} {
		if _, err := srv.Verify(x509.VerifyOptions{DNSName: host, Roots: pool}); err != nil {
			t.Errorf("server certificate for %q: %v", host, err)
		}
	}
	if srv.NotAfter.After(ca.NotAfter) {
		t.Errorf("server NotAfter %v after CA NotAfter %v", srv.NotAfter, ca.NotAfter)
	}

	admin := parseCertFile(t, filepath.Join(dir, certs.AdminCertFile))
	if admin.Subject.CommonName != "admin" || !slices.Equal(admin.Subject.OrganizationalUnit, []string{"admin"}) {
		t.Errorf("admin subject: got CN %q OU %q, want CN admin OU [admin]", admin.Subject.CommonName, admin.Subject.OrganizationalUnit)
	}
	if _, err := admin.Verify(x509.VerifyOptions{Roots: pool, KeyUsages: []x509.ExtKeyUsage{x509.ExtKeyUsageClientAuth}}); err != nil {
		t.Errorf("admin certificate as a client: %v", err)
	}
	for _, c := range []*x509.Certificate{ca, srv, admin} {
		if c.SerialNumber.Sign() <= 0 || c.SerialNumber.BitLen() > 128 {
			t.Errorf("serial %v: want positive, at most 128 bits", c.SerialNumber)
		}
	}
	if ca.SerialNumber.Cmp(srv.SerialNumber) == 0 || srv.SerialNumber.Cmp(admin.SerialNumber) == 0 {
		t.Errorf("serials repeat: %v %v %v", ca.SerialNumber, srv.SerialNumber, admin.SerialNumber)
	}

	// A second Init must not replace the CA (every device certificate hangs on it).
	before, _ := os.ReadFile(filepath.Join(dir, certs.CAKeyFile))
	if err := certs.Init(dir, certs.InitOptions{}); !errors.Is(err, certs.ErrExists) {
		t.Fatalf("second Init: got %v, want ErrExists", err)
	}
	after, _ := os.ReadFile(filepath.Join(dir, certs.CAKeyFile))
	if !bytes.Equal(before, after) {
		t.Errorf("refused Init changed ca.key")
	}
	if err := certs.Init(dir, certs.InitOptions{Force: true}); err != nil {
		t.Fatalf("Init with Force: %v", err)
	}
	after, _ = os.ReadFile(filepath.Join(dir, certs.CAKeyFile))
	if bytes.Equal(before, after) {
		t.Errorf("Init with Force kept the old ca.key")
	}
}

func TestInitTightensDir(t *testing.T) {
	dir := t.TempDir()
	if err := os.Chmod(dir, 0o755); err != nil {
		t.Fatal(err)
	}
	if err := certs.Init(dir, certs.InitOptions{}); err != nil {
		t.Fatal(err)
	}
	if got := mode(t, dir); got != 0o700 {
		t.Errorf("dir mode: got %v, want %v", got, fs.FileMode(0o700))
	}
}

func TestInitBadHost(t *testing.T) {
	for _, h := range []string{"", "fota.example.com:8883", "a b", "https://x"} {
		t.Run(h, func(t *testing.T) {
			dir := t.TempDir()
			if err := certs.Init(dir, certs.InitOptions{Hosts: []string{h}}); err == nil {
				t.Fatalf("Init with host %q: got nil error, want one", h)
			}
			if _, err := os.Stat(filepath.Join(dir, certs.CAFile)); !errors.Is(err, fs.ErrNotExist) {
				t.Errorf("refused Init wrote ca.crt: %v", err)
			}
		})
	}
}

func TestIssueDeviceValidation(t *testing.T) {
	ca := certstest.New(t)
	for _, tc := range []struct {
		name, id string
		ok       bool
	}{
		{"empty", "", false},
		{"65 bytes", strings.Repeat("a", 65), false},
		{"64 bytes", strings.Repeat("a", 64), true},
		{"slash", "a/b", false},
		{"plus", "a+b", false},
		{"hash", "a#b", false},
		{"dollar", "$a", false},
		{"space", "a b", false},
		{"nul", "a\x00b", false},
		{"tab", "a\tb", false},
		{"invalid utf-8", "a\xffb", false},
		{"plain", "dev-1", true},
		{"non-ascii", "ÄÖ-1", true},
	} {
		t.Run(tc.name, func(t *testing.T) {
			certPEM, keyPEM, err := ca.Authority.IssueDevice(tc.id, certs.IssueOptions{})
			if !tc.ok {
				if !errors.Is(err, protocol.ErrBadDeviceID) {
					t.Fatalf("IssueDevice(%q): got %v, want ErrBadDeviceID", tc.id, err)
				}
				return
			}
			if err != nil {
				t.Fatalf("IssueDevice(%q): %v", tc.id, err)
			}
			c := parseCertPEM(t, certPEM)
			if c.Subject.CommonName != tc.id {
				t.Errorf("CN: got %q, want %q", c.Subject.CommonName, tc.id)
			}
			if _, err := tls.X509KeyPair(certPEM, keyPEM); err != nil {
				t.Errorf("key pair: %v", err)
			}
		})
	}
}

func TestIssueDevice(t *testing.T) {
	ca := certstest.New(t)
	certPEM, keyPEM, err := ca.Authority.IssueDevice("dev-1", certs.IssueOptions{Model: "primehub"})
	if err != nil {
		t.Fatal(err)
	}
	if b, _ := pem.Decode(keyPEM); b == nil || (b.Type != "EC PRIVATE KEY" && b.Type != "PRIVATE KEY") {
		t.Errorf("key PEM: got %q, want an EC PRIVATE KEY or PRIVATE KEY block", keyPEM)
	}
	c := parseCertPEM(t, certPEM)
	if want := []string{"device", "model=primehub"}; !slices.Equal(c.Subject.OrganizationalUnit, want) {
		t.Errorf("OU: got %q, want %q", c.Subject.OrganizationalUnit, want)
	}
	if !slices.Equal(c.ExtKeyUsage, []x509.ExtKeyUsage{x509.ExtKeyUsageClientAuth}) {
		t.Errorf("ExtKeyUsage: got %v, want [ClientAuth]", c.ExtKeyUsage)
	}
	if c.IsCA {
		t.Errorf("device certificate IsCA: got true, want false")
	}
	if c.NotAfter.After(ca.Authority.Cert.NotAfter) {
		t.Errorf("NotAfter %v after the CA's %v", c.NotAfter, ca.Authority.Cert.NotAfter)
	}
	if c.NotAfter.Sub(c.NotBefore) < 4*365*24*time.Hour {
		t.Errorf("validity: got %v, want years", c.NotAfter.Sub(c.NotBefore))
	}

	// NotAfter past the CA's is capped; an empty validity is refused.
	certPEM, _, err = ca.Authority.IssueDevice("dev-2", certs.IssueOptions{NotAfter: time.Now().Add(100 * 365 * 24 * time.Hour)})
	if err != nil {
		t.Fatal(err)
	}
	if got := parseCertPEM(t, certPEM).NotAfter; !got.Equal(ca.Authority.Cert.NotAfter) {
		t.Errorf("capped NotAfter: got %v, want the CA's %v", got, ca.Authority.Cert.NotAfter)
	}
	now := time.Now()
	if _, _, err := ca.Authority.IssueDevice("dev-3", certs.IssueOptions{NotBefore: now, NotAfter: now.Add(-time.Second)}); err == nil {
		t.Errorf("NotAfter before NotBefore: got nil error, want one")
	}
	for _, m := range []string{"a b", "a\nb", strings.Repeat("m", 65)} {
		if _, _, err := ca.Authority.IssueDevice("dev-4", certs.IssueOptions{Model: m}); err == nil {
			t.Errorf("model %q: got nil error, want one", m)
		}
	}
}

// signRaw signs an arbitrary subject with the test CA, for roles certs never issues.
func signRaw(t *testing.T, ca *certstest.CA, subject pkix.Name) *x509.Certificate {
	t.Helper()
	cert, err := ca.Authority.DeviceTLS("x", certs.IssueOptions{})
	if err != nil {
		t.Fatal(err)
	}
	tmpl := &x509.Certificate{
		SerialNumber: big.NewInt(42),
		Subject:      subject,
		NotBefore:    time.Now().Add(-time.Minute),
		NotAfter:     time.Now().Add(time.Hour),
		ExtKeyUsage:  []x509.ExtKeyUsage{x509.ExtKeyUsageClientAuth},
	}
	der, err := x509.CreateCertificate(nil, tmpl, ca.Authority.Cert, cert.Leaf.PublicKey, ca.Authority.Key)
	if err != nil {
		t.Fatal(err)
	}
	c, err := x509.ParseCertificate(der)
	if err != nil {
		t.Fatal(err)
	}
	return c
}

func TestDeviceIdentity(t *testing.T) {
	ca := certstest.New(t)
	device := func(id, model string) *x509.Certificate {
		c, err := ca.Authority.DeviceTLS(id, certs.IssueOptions{Model: model})
		if err != nil {
			t.Fatal(err)
		}
		return c.Leaf
	}
	for _, tc := range []struct {
		name             string
		cert             *x509.Certificate
		wantID, wantMod  string
		wantErr          error
		wantAdmin, isErr bool
	}{
		{name: "device with model", cert: device("dev-1", "primehub"), wantID: "dev-1", wantMod: "primehub"},
		{name: "device without model", cert: device("ÄÖ-1", ""), wantID: "ÄÖ-1"},
		{name: "device named admin", cert: device("admin", ""), wantID: "admin"},
		{name: "admin", cert: parseCertFile(t, filepath.Join(ca.Dir, certs.AdminCertFile)), wantErr: certs.ErrNotDevice, wantAdmin: true},
		{name: "server", cert: parseCertFile(t, filepath.Join(ca.Dir, certs.ServerCertFile)), wantErr: certs.ErrNotDevice},
		{name: "CA", cert: ca.Authority.Cert, wantErr: certs.ErrNotDevice},
		{name: "nil", cert: nil, wantErr: certs.ErrNotDevice},
		{name: "no role", cert: signRaw(t, ca, pkix.Name{CommonName: "dev-9"}), wantErr: certs.ErrNotDevice},
		{name: "other role", cert: signRaw(t, ca, pkix.Name{CommonName: "dev-9", OrganizationalUnit: []string{"gateway"}}), wantErr: certs.ErrNotDevice},
		{name: "two roles", cert: signRaw(t, ca, pkix.Name{CommonName: "admin", OrganizationalUnit: []string{"device", "admin"}}), wantErr: certs.ErrNotDevice},
		{name: "device with bad id", cert: signRaw(t, ca, pkix.Name{CommonName: "a/#", OrganizationalUnit: []string{"device"}}), wantErr: protocol.ErrBadDeviceID},
		{name: "device with two models", cert: signRaw(t, ca, pkix.Name{CommonName: "d", OrganizationalUnit: []string{"device", "model=a", "model=b"}}), isErr: true},
	} {
		t.Run(tc.name, func(t *testing.T) {
			id, model, err := certs.DeviceIdentity(tc.cert)
			switch {
			case tc.wantErr != nil:
				if !errors.Is(err, tc.wantErr) {
					t.Errorf("err: got %v, want %v", err, tc.wantErr)
				}
			case tc.isErr:
				if err == nil {
					t.Errorf("err: got nil, want one")
				}
			case err != nil:
				t.Errorf("err: got %v, want nil", err)
			case id != tc.wantID || model != tc.wantMod:
				t.Errorf("identity: got (%q, %q), want (%q, %q)", id, model, tc.wantID, tc.wantMod)
			}
			if got := certs.IsAdmin(tc.cert); got != tc.wantAdmin {
				t.Errorf("IsAdmin: got %v, want %v", got, tc.wantAdmin)
			}
		})
	}
}

func TestIssueDeviceFiles(t *testing.T) {
	ca := certstest.New(t)
	if err := certs.IssueDeviceFiles(ca.Dir, "dev-1", "primehub"); err != nil {
		t.Fatal(err)
	}
	crt := filepath.Join(ca.Dir, certs.DevicesDir, "dev-1.crt")
	key := filepath.Join(ca.Dir, certs.DevicesDir, "dev-1.key")
	if got := mode(t, key); got != 0o600 {
		t.Errorf("key mode: got %v, want %v", got, fs.FileMode(0o600))
	}
	if got := mode(t, crt); got != 0o644 {
		t.Errorf("cert mode: got %v, want %v", got, fs.FileMode(0o644))
	}
	cert, err := certs.LoadDeviceTLS(ca.Dir, "dev-1")
	if err != nil {
		t.Fatal(err)
	}
	if id, model, err := certs.DeviceIdentity(cert.Leaf); err != nil || id != "dev-1" || model != "primehub" {
		t.Errorf("identity: got (%q, %q, %v), want (dev-1, primehub, nil)", id, model, err)
	}

	before, _ := os.ReadFile(crt)
	if err := certs.IssueDeviceFiles(ca.Dir, "dev-1", ""); !errors.Is(err, certs.ErrExists) {
		t.Errorf("issue twice: got %v, want ErrExists", err)
	}
	after, _ := os.ReadFile(crt)
	if !bytes.Equal(before, after) {
		t.Errorf("refused issue changed %s", crt)
	}

	// A key without a certificate (an interrupted issue) still claims the id.
	if err := os.WriteFile(filepath.Join(ca.Dir, certs.DevicesDir, "dev-2.key"), []byte("x"), 0o600); err != nil {
		t.Fatal(err)
	}
	if err := certs.IssueDeviceFiles(ca.Dir, "dev-2", ""); !errors.Is(err, certs.ErrExists) {
		t.Errorf("issue over a stray key: got %v, want ErrExists", err)
	}

	ca.Revoke(t, "dev-3")
	if err := certs.IssueDeviceFiles(ca.Dir, "dev-3", ""); !errors.Is(err, certs.ErrRevoked) {
		t.Errorf("issue revoked id: got %v, want ErrRevoked", err)
	}
	if _, err := os.Stat(filepath.Join(ca.Dir, certs.DevicesDir, "dev-3.key")); !errors.Is(err, fs.ErrNotExist) {
		t.Errorf("refused issue wrote a key: %v", err)
	}
	if err := certs.IssueDeviceFiles(ca.Dir, "a/b", ""); !errors.Is(err, protocol.ErrBadDeviceID) {
		t.Errorf("issue a/b: got %v, want ErrBadDeviceID", err)
	}
	if _, err := certs.LoadDeviceTLS(ca.Dir, "nope"); err == nil {
		t.Errorf("LoadDeviceTLS of a missing device: got nil error, want one")
	}
}

func TestLoadAuthority(t *testing.T) {
	ca := certstest.New(t)
	keyPath := filepath.Join(ca.Dir, certs.CAKeyFile)

	// A PKCS #8 key, as other tools write it, loads too.
	der, err := x509.MarshalPKCS8PrivateKey(ca.Authority.Key)
	if err != nil {
		t.Fatal(err)
	}
	if err := os.WriteFile(keyPath, pem.EncodeToMemory(&pem.Block{Type: "PRIVATE KEY", Bytes: der}), 0o600); err != nil {
		t.Fatal(err)
	}
	if _, err := certs.LoadAuthority(ca.Dir); err != nil {
		t.Fatalf("PKCS #8 key: %v", err)
	}

	// Someone else's key is refused.
	other := certstest.Foreign(t)
	data, err := os.ReadFile(filepath.Join(other.Dir, certs.CAKeyFile))
	if err != nil {
		t.Fatal(err)
	}
	if err := os.WriteFile(keyPath, data, 0o600); err != nil {
		t.Fatal(err)
	}
	if _, err := certs.LoadAuthority(ca.Dir); err == nil {
		t.Errorf("mismatched key: got nil error, want one")
	}
	if err := os.Remove(keyPath); err != nil {
		t.Fatal(err)
	}
	if _, err := certs.LoadAuthority(ca.Dir); !errors.Is(err, fs.ErrNotExist) {
		t.Errorf("missing key: got %v, want ErrNotExist", err)
	}
}

// handshakeResult is what the test server saw of one connection.
type handshakeResult struct {
	err       error
	id, model string
	resumed   bool
}

// startServer accepts TLS connections on 127.0.0.1:0 one at a time, reports each handshake,
// and writes one byte after a good one (which also delivers a TLS 1.3 session ticket).
func startServer(t *testing.T, cfg *tls.Config) (addr string, results <-chan handshakeResult) {
	t.Helper()
	ln, err := net.Listen("tcp", "127.0.0.1:0")
	if err != nil {
		t.Fatal(err)
	}
	ch := make(chan handshakeResult, 16)
	done := make(chan struct{})
	go func() {
		defer close(done)
		for {
			raw, err := ln.Accept()
			if err != nil {
				return
			}
			raw.SetDeadline(time.Now().Add(5 * time.Second))
			c := tls.Server(raw, cfg)
			var r handshakeResult
			if r.err = c.Handshake(); r.err == nil {
				cs := c.ConnectionState()
				r.resumed = cs.DidResume
				r.id, r.model, r.err = certs.DeviceIdentity(cs.PeerCertificates[0])
				if errors.Is(r.err, certs.ErrNotDevice) && certs.IsAdmin(cs.PeerCertificates[0]) {
					r.id, r.err = "(admin)", nil
				}
				if _, err := c.Write([]byte{1}); err != nil && r.err == nil {
					r.err = err
				}
			}
			c.Close()
			ch <- r
		}
	}()
	t.Cleanup(func() {
		ln.Close()
		<-done
	})
	return ln.Addr().String(), ch
}

// dial connects with cfg and reports whether the server let it in, and whether it resumed.
func dial(t *testing.T, addr string, cfg *tls.Config) (resumed bool, err error) {
	t.Helper()
	c, err := tls.DialWithDialer(&net.Dialer{Timeout: 5 * time.Second}, "tcp", addr, cfg)
	if err != nil {
		return false, err
	}
	defer c.Close()
	c.SetDeadline(time.Now().Add(5 * time.Second))
	// With TLS 1.3 the client finishes first: a refusal shows only on the first read.
	// TLS 1.2 may hand over the byte together with the server's close_notify as EOF.
	if n, err := c.Read(make([]byte, 1)); n == 0 {
		return false, err
	}
	return c.ConnectionState().DidResume, nil
}

func receive(t *testing.T, ch <-chan handshakeResult) handshakeResult {
	t.Helper()
	select {
	case r := <-ch:
		return r
	case <-time.After(5 * time.Second):
		t.Fatal("server saw no connection")
		return handshakeResult{}
	}
}

func TestServerTLS(t *testing.T) {
	ca := certstest.New(t)
	foreign := certstest.Foreign(t)
	addr, results := startServer(t, ca.ServerTLS(t))
	ca.Revoke(t, "dev-revoked")

	// A client picks a certificate the server's CA list names; a hostile one sends it anyway.
	foreignDevice := foreign.DeviceTLS(t, "dev-1", "")
	foreignDevice.RootCAs = ca.DeviceTLS(t, "x", "").RootCAs
	foreignCert := foreignDevice.Certificates[0]
	foreignDevice.GetClientCertificate = func(*tls.CertificateRequestInfo) (*tls.Certificate, error) { return &foreignCert, nil }
	noCert := ca.DeviceTLS(t, "dev-1", "")
	noCert.Certificates = nil

	for _, tc := range []struct {
		name    string
		cfg     *tls.Config
		wantID  string
		wantMod string
		check   func(error) bool // the server's error, when refused
	}{
		{name: "device", cfg: ca.DeviceTLS(t, "dev-1", "primehub"), wantID: "dev-1", wantMod: "primehub"},
		{name: "admin", cfg: ca.AdminTLS(t), wantID: "(admin)"},
		{name: "revoked", cfg: ca.DeviceTLS(t, "dev-revoked", ""), check: func(err error) bool { return errors.Is(err, certs.ErrRevoked) }},
		{name: "foreign CA", cfg: foreignDevice, check: func(err error) bool {
			var e x509.UnknownAuthorityError
			return errors.As(err, &e)
		}},
		{name: "expired", cfg: ca.ExpiredDeviceTLS(t, "dev-1"), check: func(err error) bool {
			var e x509.CertificateInvalidError
			return errors.As(err, &e) && e.Reason == x509.Expired
		}},
		{name: "no client certificate", cfg: noCert, check: func(err error) bool { return err != nil }},
	} {
		t.Run(tc.name, func(t *testing.T) {
			_, err := dial(t, addr, tc.cfg)
			r := receive(t, results)
			if tc.check != nil {
				if err == nil {
					t.Errorf("client: got nil error, want the connection refused")
				}
				if !tc.check(r.err) {
					t.Errorf("server: got error %v, want the %s refusal", r.err, tc.name)
				}
				return
			}
			if err != nil || r.err != nil {
				t.Fatalf("got client error %v, server error %v, want none", err, r.err)
			}
			if r.id != tc.wantID || r.model != tc.wantMod {
				t.Errorf("identity: got (%q, %q), want (%q, %q)", r.id, r.model, tc.wantID, tc.wantMod)
			}
		})
	}
}

// countingCache counts the dials that found a session to resume.
type countingCache struct {
	tls.ClientSessionCache
	hits int
}

func (c *countingCache) Get(key string) (*tls.ClientSessionState, bool) {
	s, ok := c.ClientSessionCache.Get(key)
	if ok && s != nil {
		c.hits++
	}
	return s, ok
}

func TestServerTLSRevokedResumption(t *testing.T) {
	for _, v := range []struct {
		name string
		max  uint16
	}{{"TLS 1.2", tls.VersionTLS12}, {"TLS 1.3", tls.VersionTLS13}} {
		t.Run(v.name, func(t *testing.T) {
			ca := certstest.New(t)
			addr, results := startServer(t, ca.ServerTLS(t))
			cache := &countingCache{ClientSessionCache: tls.NewLRUClientSessionCache(4)}
			cfg := ca.DeviceTLS(t, "dev-1", "")
			cfg.MaxVersion = v.max
			cfg.ClientSessionCache = cache

			if _, err := dial(t, addr, cfg); err != nil {
				t.Fatalf("first dial: %v (server: %v)", err, receive(t, results).err)
			}
			if r := receive(t, results); r.err != nil || r.resumed {
				t.Fatalf("first handshake: got error %v resumed %v, want a full handshake", r.err, r.resumed)
			}
			// Control: without a revocation the session is resumed, so the refusal below is
			// of a resumption, not of a full handshake.
			resumed, err := dial(t, addr, cfg)
			if err != nil {
				t.Fatalf("second dial: %v", err)
			}
			if r := receive(t, results); !resumed || !r.resumed || r.err != nil {
				t.Fatalf("second handshake: got client resumed %v, server resumed %v, error %v; want a resumption", resumed, r.resumed, r.err)
			}

			ca.Revoke(t, "dev-1")
			hits := cache.hits
			if _, err := dial(t, addr, cfg); err == nil {
				t.Errorf("dial after revoke: got nil error, want the connection refused")
			}
			if r := receive(t, results); !errors.Is(r.err, certs.ErrRevoked) {
				t.Errorf("server after revoke: got %v, want ErrRevoked", r.err)
			}
			if cache.hits != hits+1 {
				t.Errorf("session cache hits on the revoked dial: got %d, want 1 (no resumption attempted)", cache.hits-hits)
			}
		})
	}
}

func TestServerTLSNilRevocationList(t *testing.T) {
	ca := certstest.New(t)
	cfg, err := certs.ServerTLS(ca.Dir, nil)
	if err != nil {
		t.Fatal(err)
	}
	addr, results := startServer(t, cfg)
	client := ca.DeviceTLS(t, "dev-1", "")
	if _, err := dial(t, addr, client); err != nil {
		t.Fatalf("before revoke: %v", err)
	}
	receive(t, results)
	if err := certs.Revoke(ca.Dir, "dev-1"); err != nil {
		t.Fatal(err)
	}
	// Nobody reloads a list here: ServerTLS's own list must notice the file.
	if _, err := dial(t, addr, client); err == nil {
		t.Errorf("after revoke: got nil error, want the connection refused")
	}
	if r := receive(t, results); !errors.Is(r.err, certs.ErrRevoked) {
		t.Errorf("server after revoke: got %v, want ErrRevoked", r.err)
	}
}

func TestClientTLS(t *testing.T) {
	ca := certstest.New(t)
	if err := certs.IssueDeviceFiles(ca.Dir, "dev-1", ""); err != nil {
		t.Fatal(err)
	}
	addr, results := startServer(t, ca.ServerTLS(t))
	abs := filepath.Join(ca.Dir, certs.DevicesDir)
	for _, tc := range []struct{ name, cert, key, wantID string }{
		{"relative", certs.AdminCertFile, certs.AdminKeyFile, "(admin)"},
		{"absolute", filepath.Join(abs, "dev-1.crt"), filepath.Join(abs, "dev-1.key"), "dev-1"},
	} {
		t.Run(tc.name, func(t *testing.T) {
			cfg, err := certs.ClientTLS(ca.Dir, tc.cert, tc.key)
			if err != nil {
				t.Fatal(err)
			}
			// No ServerName: the dialer derives 127.0.0.1, which the server certificate names.
			if _, err := dial(t, addr, cfg); err != nil {
				t.Fatal(err)
			}
			if r := receive(t, results); r.err != nil || r.id != tc.wantID {
				t.Errorf("server: got (%q, %v), want (%q, nil)", r.id, r.err, tc.wantID)
			}
		})
	}
	if _, err := certs.ClientTLS(ca.Dir, "missing.crt", "missing.key"); err == nil {
		t.Errorf("missing files: got nil error, want one")
	}
}
