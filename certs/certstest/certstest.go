// Package certstest makes throwaway fota CAs for tests: a fresh certs dir per test, and client
// configurations for devices, the admin, expired and foreign certificates. Certificates are
// made when a test runs and never committed, so they cannot expire in the repository.
package certstest

import (
	"crypto/ecdsa"
	"crypto/elliptic"
	"crypto/rand"
	"crypto/tls"
	"crypto/x509"
	"crypto/x509/pkix"
	"math/big"
	"testing"
	"time"

	"github.com/fota-dev/fota/certs"
)

// CA is a certs dir in a test's temp dir, with its authority and revocation list loaded.
type CA struct {
	Dir       string
	Authority *certs.Authority
	Revoked   *certs.RevocationList
}

// New runs certs.Init in t.TempDir().
func New(t testing.TB) *CA {
	t.Helper()
	dir := t.TempDir()
	if err := certs.Init(dir, certs.InitOptions{}); err != nil {
		t.Fatalf("certstest: %v", err)
	}
	a, err := certs.LoadAuthority(dir)
	if err != nil {
		t.Fatalf("certstest: %v", err)
	}
	r, err := certs.OpenRevocationList(dir)
	if err != nil {
		t.Fatalf("certstest: %v", err)
	}
	return &CA{Dir: dir, Authority: a, Revoked: r}
}

// Foreign returns a CA unrelated to any other, for "signed by someone else" tests.
func Foreign(t testing.TB) *CA {
	t.Helper()
	return New(t)
}

// ServerTLS returns certs.ServerTLS for this CA, checking c.Revoked.
func (c *CA) ServerTLS(t testing.TB) *tls.Config {
	t.Helper()
	cfg, err := certs.ServerTLS(c.Dir, c.Revoked)
	if err != nil {
		t.Fatalf("certstest: %v", err)
	}
	return cfg
}

// DeviceTLS returns a client configuration for device id with a freshly issued certificate,
// trusting this CA, for a server reached as "localhost".
func (c *CA) DeviceTLS(t testing.TB, id, model string) *tls.Config {
	t.Helper()
	return c.deviceTLS(t, id, certs.IssueOptions{Model: model})
}

// ExpiredDeviceTLS is DeviceTLS with a certificate that expired an hour ago.
func (c *CA) ExpiredDeviceTLS(t testing.TB, id string) *tls.Config {
	t.Helper()
	now := time.Now()
	return c.deviceTLS(t, id, certs.IssueOptions{NotBefore: now.Add(-2 * time.Hour), NotAfter: now.Add(-time.Hour)})
}

func (c *CA) deviceTLS(t testing.TB, id string, opts certs.IssueOptions) *tls.Config {
	t.Helper()
	cert, err := c.Authority.DeviceTLS(id, opts)
	if err != nil {
		t.Fatalf("certstest: %v", err)
	}
	return &tls.Config{
		MinVersion:   tls.VersionTLS12,
		Certificates: []tls.Certificate{cert},
		RootCAs:      c.pool(),
		ServerName:   "localhost",
	}
}

// AdminTLS returns the admin client configuration from the certs dir, for "localhost".
func (c *CA) AdminTLS(t testing.TB) *tls.Config {
	t.Helper()
	cfg, err := certs.ClientTLS(c.Dir, certs.AdminCertFile, certs.AdminKeyFile)
	if err != nil {
		t.Fatalf("certstest: %v", err)
	}
	cfg.ServerName = "localhost"
	return cfg
}

// Revoke revokes device id and reloads c.Revoked, so the next handshake refuses it.
func (c *CA) Revoke(t testing.TB, id string) {
	t.Helper()
	if err := certs.Revoke(c.Dir, id); err != nil {
		t.Fatalf("certstest: %v", err)
	}
	if _, err := c.Revoked.Reload(); err != nil {
		t.Fatalf("certstest: %v", err)
	}
}

func (c *CA) pool() *x509.CertPool {
	p := x509.NewCertPool()
	p.AddCert(c.Authority.Cert)
	return p
}

// UncheckedDeviceTLS is DeviceTLS for an id that fota refuses to issue (a reserved or malformed
// id), signed by this CA directly: a certificate another tool could have made, so tests can
// check that the servers refuse it on their own.
func (c *CA) UncheckedDeviceTLS(t testing.TB, id string) *tls.Config {
	t.Helper()
	key, err := ecdsa.GenerateKey(elliptic.P256(), rand.Reader)
	if err != nil {
		t.Fatal(err)
	}
	now := time.Now()
	tmpl := &x509.Certificate{
		SerialNumber: big.NewInt(now.UnixNano()),
		Subject:      pkix.Name{CommonName: id, OrganizationalUnit: []string{"device"}},
		NotBefore:    now.Add(-time.Minute), NotAfter: now.Add(time.Hour),
		KeyUsage:    x509.KeyUsageDigitalSignature,
		ExtKeyUsage: []x509.ExtKeyUsage{x509.ExtKeyUsageClientAuth},
	}
	der, err := x509.CreateCertificate(rand.Reader, tmpl, c.Authority.Cert, key.Public(), c.Authority.Key)
	if err != nil {
		t.Fatalf("certstest: %v", err)
	}
	return &tls.Config{
		MinVersion:   tls.VersionTLS12,
		Certificates: []tls.Certificate{{Certificate: [][]byte{der}, PrivateKey: key}},
		RootCAs:      c.pool(),
		ServerName:   "localhost",
	}
}
