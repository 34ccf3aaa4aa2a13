package certs

import (
	"crypto/tls"
	"crypto/x509"
	"errors"
	"fmt"
	"os"
	"path/filepath"
)

// ServerTLS returns the configuration of fota's TLS listeners (MQTT and the admin API): the
// server certificate, client certificates required and verified against the CA, TLS 1.2 or
// later, and device certificates whose id, or admin certificates whose name, is in revoked
// refused.
//
// Revocation is checked in VerifyConnection because it runs on resumed handshakes too; a check
// in VerifyPeerCertificate would let a revoked device back in with a session ticket. Whether a
// verified certificate may do what it asks (a device on MQTT, the admin on the API) is left to
// each listener, see DeviceIdentity and AdminName. A listener that keeps connections open
// across requests checks an admin's name again on each (RevocationList.AdminRevoked). The
// error of a handshake refused for revocation wraps ErrRevoked, so that a listener can count
// and log those refusals apart from the others.
//
// When revoked is nil, ServerTLS keeps its own list of dir's revoked.json and checks the file
// for changes on every handshake. Callers that Watch a list to drop live connections pass it,
// and the handshake then only reads it.
func ServerTLS(dir string, revoked *RevocationList) (*tls.Config, error) {
	cert, err := tls.LoadX509KeyPair(filepath.Join(dir, ServerCertFile), filepath.Join(dir, ServerKeyFile))
	if err != nil {
		return nil, fmt.Errorf("server tls: %w", err)
	}
	pool, err := loadPool(dir)
	if err != nil {
		return nil, fmt.Errorf("server tls: %w", err)
	}
	reload := false
	if revoked == nil {
		if revoked, err = OpenRevocationList(dir); err != nil {
			return nil, fmt.Errorf("server tls: %w", err)
		}
		reload = true
	}
	return &tls.Config{
		MinVersion:   tls.VersionTLS12,
		Certificates: []tls.Certificate{cert},
		ClientCAs:    pool,
		ClientAuth:   tls.RequireAndVerifyClientCert,
		VerifyConnection: func(cs tls.ConnectionState) error {
			if len(cs.PeerCertificates) == 0 {
				return errors.New("no client certificate")
			}
			leaf := cs.PeerCertificates[0]
			id, _, err := DeviceIdentity(leaf)
			admin := ""
			if errors.Is(err, ErrNotDevice) {
				if admin, err = AdminName(leaf); errors.Is(err, ErrNotAdmin) {
					return nil // the server's own certificate, say: the listener decides
				}
			}
			if err != nil {
				return err
			}
			if reload {
				// A corrupt file keeps the last good list, which still refuses what it knew.
				_, _ = revoked.Reload()
			}
			if admin != "" {
				if revoked.AdminRevoked(admin) {
					return fmt.Errorf("admin %q: %w", admin, ErrRevoked)
				}
				return nil
			}
			if revoked.Revoked(id) {
				return fmt.Errorf("device %q: %w", id, ErrRevoked)
			}
			return nil
		},
	}, nil
}

// ClientTLS returns a client configuration that trusts dir's CA and presents the given
// certificate; certFile and keyFile are relative to dir unless absolute. ServerName is left
// for the caller (or the dialer) to fill in.
func ClientTLS(dir, certFile, keyFile string) (*tls.Config, error) {
	if !filepath.IsAbs(certFile) {
		certFile = filepath.Join(dir, certFile)
	}
	if !filepath.IsAbs(keyFile) {
		keyFile = filepath.Join(dir, keyFile)
	}
	cert, err := tls.LoadX509KeyPair(certFile, keyFile)
	if err != nil {
		return nil, fmt.Errorf("client tls: %w", err)
	}
	pool, err := loadPool(dir)
	if err != nil {
		return nil, fmt.Errorf("client tls: %w", err)
	}
	return &tls.Config{
		MinVersion:   tls.VersionTLS12,
		Certificates: []tls.Certificate{cert},
		RootCAs:      pool,
	}, nil
}

func loadPool(dir string) (*x509.CertPool, error) {
	path := filepath.Join(dir, CAFile)
	data, err := os.ReadFile(path)
	if err != nil {
		return nil, err
	}
	pool := x509.NewCertPool()
	if !pool.AppendCertsFromPEM(data) {
		return nil, fmt.Errorf("%s: no certificate", path)
	}
	return pool, nil
}
