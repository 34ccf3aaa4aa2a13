// Package certs is fota's small certificate authority: it creates the CA, the server and admin
// certificates, issues and revokes device certificates, and builds the TLS configurations that
// the broker, the admin API and clients use. Every key is ECDSA P-256.
//
// A certs dir holds:
//
//	ca.crt ca.key            the CA (ca.key is needed only to issue)
//	server.crt server.key    the MQTT listener's and the admin API's certificate
//	admin.crt admin.key      the operator's client certificate, admin "admin"
//	admins/NAME.crt NAME.key one pair per further admin
//	devices/ID.crt ID.key    one pair per device
//	revoked.json             revoked device ids and admin names
//
// A certificate's role is its only Subject.OrganizationalUnit without '=' ("device", "admin"
// or "server"); a device's identity is its CN, and its model an OU entry "model=M"; an
// admin's name is its CN. Revocation is per device id or admin name and permanent: a revoked
// id or name is never issued again.
package certs

import (
	"crypto"
	"crypto/ecdsa"
	"crypto/elliptic"
	"crypto/rand"
	"crypto/tls"
	"crypto/x509"
	"crypto/x509/pkix"
	"encoding/hex"
	"encoding/pem"
	"errors"
	"fmt"
	"math/big"
	"net"
	"os"
	"path/filepath"
	"strings"
	"time"

	"github.com/fota-dev/fota/protocol"
)

// Files in a certs dir.
const (
	CAFile         = "ca.crt"
	CAKeyFile      = "ca.key"
	ServerCertFile = "server.crt"
	ServerKeyFile  = "server.key"
	AdminCertFile  = "admin.crt"
	AdminKeyFile   = "admin.key"
	DevicesDir     = "devices"
	RevokedFile    = "revoked.json"
)

var (
	// ErrExists is returned when a CA or a device certificate would be overwritten.
	ErrExists = errors.New("already exists")
	// ErrRevoked is returned for a device id or an admin name that has been revoked, by
	// IssueDeviceFiles, IssueAdminFiles, Init and the TLS verification of ServerTLS.
	// Revocation is permanent.
	ErrRevoked = errors.New("revoked")
	// ErrNotDevice is returned by DeviceIdentity for a certificate that is not a device's.
	ErrNotDevice = errors.New("not a device certificate")
)

// Roles, the first OU of a certificate's subject.
const (
	roleDevice = "device"
	roleAdmin  = "admin"
	roleServer = "server"

	modelPrefix = "model="
	adminCN     = "admin"
	serverCN    = "fota server"
)

// Validity. NotBefore is backdated so a device whose clock lags a little still accepts a
// certificate issued a moment ago.
const (
	caValidity   = 10 * 365 * 24 * time.Hour
	leafValidity = 5 * 365 * 24 * time.Hour
	backdate     = 5 * time.Minute
)

// InitOptions configures Init.
type InitOptions struct {
	// Hosts are extra names or IP addresses for the server certificate, beyond localhost,
	// 127.0.0.1 and ::1.
	Hosts []string
	// Force replaces an existing CA. Device certificates issued by the old CA stop verifying.
	Force bool
}

// Init creates a certs dir: a new CA, the server certificate and the admin certificate (admin
// "admin"). It refuses with ErrExists when dir already holds a CA, unless opts.Force is set.
// revoked.json is kept: revocation is by device id or admin name and outlives the CA, so Init
// refuses with ErrRevoked when the admin "admin" is revoked. dir is created with mode 0700,
// or restricted to it, since it holds the CA key.
func Init(dir string, opts InitOptions) error {
	if fi, err := os.Stat(dir); err == nil && !fi.IsDir() {
		return fmt.Errorf("init %s: not a directory", dir)
	}
	caPath := filepath.Join(dir, CAFile)
	held, err := fileExists(caPath)
	if err != nil {
		return fmt.Errorf("init %s: %w", dir, err)
	}
	if held && !opts.Force {
		return fmt.Errorf("init %s: %s %w (use force to replace it)", dir, caPath, ErrExists)
	}
	revoked, err := readRevokedDoc(filepath.Join(dir, RevokedFile))
	if err != nil {
		return fmt.Errorf("init %s: %w", dir, err)
	}
	if revoked.adminRevoked(DefaultAdmin) {
		return fmt.Errorf("init %s: admin %q %w in %s: the admin certificate init makes would be refused", dir, DefaultAdmin, ErrRevoked, RevokedFile)
	}
	ips, dns, err := serverNames(opts.Hosts)
	if err != nil {
		return fmt.Errorf("init %s: %w", dir, err)
	}
	if err := ensureDir(dir); err != nil {
		return fmt.Errorf("init: %w", err)
	}
	if err := ensureDir(filepath.Join(dir, DevicesDir)); err != nil {
		return fmt.Errorf("init: %w", err)
	}

	now := time.Now()
	caKey, err := newKey()
	if err != nil {
		return fmt.Errorf("init: %w", err)
	}
	serial, err := newSerial()
	if err != nil {
		return fmt.Errorf("init: %w", err)
	}
	caTmpl := &x509.Certificate{
		SerialNumber: serial,
		// The serial in the name keeps two fota CAs apart in tools that show only names.
		Subject:               pkix.Name{CommonName: "fota CA " + hex.EncodeToString(serial.Bytes()[:4]), Organization: []string{"fota"}},
		NotBefore:             now.Add(-backdate),
		NotAfter:              now.Add(caValidity),
		KeyUsage:              x509.KeyUsageCertSign | x509.KeyUsageCRLSign,
		BasicConstraintsValid: true,
		IsCA:                  true,
		MaxPathLenZero:        true,
	}
	caDER, err := x509.CreateCertificate(rand.Reader, caTmpl, caTmpl, caKey.Public(), caKey)
	if err != nil {
		return fmt.Errorf("init: create CA: %w", err)
	}
	caCert, err := x509.ParseCertificate(caDER)
	if err != nil {
		return fmt.Errorf("init: parse CA: %w", err)
	}
	a := &Authority{Cert: caCert, Key: caKey}

	serverTmpl := &x509.Certificate{
		Subject:     pkix.Name{CommonName: serverCN, OrganizationalUnit: []string{roleServer}},
		ExtKeyUsage: []x509.ExtKeyUsage{x509.ExtKeyUsageServerAuth},
		IPAddresses: ips,
		DNSNames:    dns,
	}
	serverCert, serverKey, err := a.issue(serverTmpl, IssueOptions{})
	if err != nil {
		return fmt.Errorf("init: server certificate: %w", err)
	}
	adminCert, adminKey, err := a.issue(adminTemplate(DefaultAdmin), IssueOptions{})
	if err != nil {
		return fmt.Errorf("init: admin certificate: %w", err)
	}
	caKeyPEM, err := encodeKey(caKey)
	if err != nil {
		return fmt.Errorf("init: %w", err)
	}

	// ca.crt goes last: its presence is what makes Init refuse, so it must mean "complete".
	files := []struct {
		name string
		data []byte
		perm os.FileMode
	}{
		{CAKeyFile, caKeyPEM, keyMode},
		{ServerKeyFile, serverKey, keyMode},
		{ServerCertFile, serverCert, certMode},
		{AdminKeyFile, adminKey, keyMode},
		{AdminCertFile, adminCert, certMode},
		{CAFile, pemCert(caDER), certMode},
	}
	for _, f := range files {
		if err := writeFile(filepath.Join(dir, f.name), f.data, f.perm, false); err != nil {
			return fmt.Errorf("init: %w", err)
		}
	}
	return nil
}

// serverNames splits hosts into IP addresses and DNS names, after the loopback defaults.
func serverNames(hosts []string) (ips []net.IP, dns []string, err error) {
	ips = []net.IP{net.IPv4(127, 0, 0, 1), net.IPv6loopback}
	dns = []string{"localhost"}
	seen := map[string]bool{"localhost": true, "127.0.0.1": true, "::1": true}
	for _, h := range hosts {
		h = strings.TrimSpace(h)
		if ip := net.ParseIP(h); ip != nil {
			if !seen[ip.String()] {
				seen[ip.String()] = true
				ips = append(ips, ip)
			}
			continue
		}
		// A colon that is not part of an IP is almost always host:port given by mistake.
		if h == "" || strings.ContainsAny(h, ":/ \t\n") {
			return nil, nil, fmt.Errorf("bad host %q: want a DNS name or an IP address", h)
		}
		h = strings.ToLower(strings.TrimSuffix(h, "."))
		if !seen[h] {
			seen[h] = true
			dns = append(dns, h)
		}
	}
	return ips, dns, nil
}

// Authority is a loaded CA that can issue certificates.
type Authority struct {
	Cert *x509.Certificate
	Key  crypto.Signer
}

// LoadAuthority loads the CA of dir, key included.
func LoadAuthority(dir string) (*Authority, error) {
	cert, err := loadCert(filepath.Join(dir, CAFile))
	if err != nil {
		return nil, fmt.Errorf("load CA: %w", err)
	}
	if !cert.IsCA {
		return nil, fmt.Errorf("load CA: %s is not a CA certificate", filepath.Join(dir, CAFile))
	}
	keyPath := filepath.Join(dir, CAKeyFile)
	keyPEM, err := os.ReadFile(keyPath)
	if err != nil {
		return nil, fmt.Errorf("load CA: %w", err)
	}
	key, err := parseKey(keyPEM)
	if err != nil {
		return nil, fmt.Errorf("load CA: %s: %w", keyPath, err)
	}
	pub, ok := key.Public().(interface{ Equal(crypto.PublicKey) bool })
	if !ok || !pub.Equal(cert.PublicKey) {
		return nil, fmt.Errorf("load CA: %s does not match %s", keyPath, CAFile)
	}
	return &Authority{Cert: cert, Key: key}, nil
}

// IssueOptions configures a device certificate. Zero values mean defaults.
type IssueOptions struct {
	// Model, when set, is recorded as an OU entry "model=Model"; it must pass
	// protocol.ValidModel, the rule firmware releases follow too.
	Model string
	// NotBefore defaults to 5 minutes ago, NotAfter to 5 years after NotBefore. NotAfter is
	// capped at the CA's own expiry.
	NotBefore, NotAfter time.Time
}

// IssueDevice issues a certificate and a new key for device id, PEM-encoded. id must pass
// protocol.ValidDeviceID. It does not consult the revocation list: IssueDeviceFiles does.
func (a *Authority) IssueDevice(id string, opts IssueOptions) (certPEM, keyPEM []byte, err error) {
	if err := protocol.ValidDeviceID(id); err != nil {
		return nil, nil, fmt.Errorf("issue device: %w", err)
	}
	ou := []string{roleDevice}
	if opts.Model != "" {
		if err := protocol.ValidModel(opts.Model); err != nil {
			return nil, nil, fmt.Errorf("issue device %q: %w", id, err)
		}
		ou = append(ou, modelPrefix+opts.Model)
	}
	certPEM, keyPEM, err = a.issue(&x509.Certificate{
		Subject:     pkix.Name{CommonName: id, OrganizationalUnit: ou},
		ExtKeyUsage: []x509.ExtKeyUsage{x509.ExtKeyUsageClientAuth},
	}, opts)
	if err != nil {
		return nil, nil, fmt.Errorf("issue device %q: %w", id, err)
	}
	return certPEM, keyPEM, nil
}

// DeviceTLS issues a device certificate in memory, for simulators and tests.
func (a *Authority) DeviceTLS(id string, opts IssueOptions) (tls.Certificate, error) {
	certPEM, keyPEM, err := a.IssueDevice(id, opts)
	if err != nil {
		return tls.Certificate{}, err
	}
	c, err := tls.X509KeyPair(certPEM, keyPEM)
	if err != nil {
		return tls.Certificate{}, fmt.Errorf("device %q key pair: %w", id, err)
	}
	return c, nil
}

// issue signs tmpl (subject, key usages and names filled in by the caller) with a new key.
func (a *Authority) issue(tmpl *x509.Certificate, opts IssueOptions) (certPEM, keyPEM []byte, err error) {
	if a == nil || a.Cert == nil || a.Key == nil {
		return nil, nil, errors.New("no CA loaded")
	}
	notBefore, notAfter := opts.NotBefore, opts.NotAfter
	if notBefore.IsZero() {
		notBefore = time.Now().Add(-backdate)
	}
	if notAfter.IsZero() {
		notAfter = notBefore.Add(leafValidity)
	}
	// A certificate cannot outlive the CA that vouches for it.
	if notAfter.After(a.Cert.NotAfter) {
		notAfter = a.Cert.NotAfter
	}
	if !notAfter.After(notBefore) {
		return nil, nil, fmt.Errorf("validity %s to %s is empty", notBefore.Format(time.RFC3339), notAfter.Format(time.RFC3339))
	}
	key, err := newKey()
	if err != nil {
		return nil, nil, err
	}
	serial, err := newSerial()
	if err != nil {
		return nil, nil, err
	}
	tmpl.SerialNumber = serial
	tmpl.NotBefore, tmpl.NotAfter = notBefore, notAfter
	tmpl.KeyUsage = x509.KeyUsageDigitalSignature
	tmpl.BasicConstraintsValid = true
	der, err := x509.CreateCertificate(rand.Reader, tmpl, a.Cert, key.Public(), a.Key)
	if err != nil {
		return nil, nil, fmt.Errorf("sign certificate: %w", err)
	}
	keyPEM, err = encodeKey(key)
	if err != nil {
		return nil, nil, err
	}
	return pemCert(der), keyPEM, nil
}

// IssueDeviceFiles issues a certificate for device id and writes devices/ID.crt and ID.key in
// dir. It refuses a revoked id with ErrRevoked (revocation is permanent: give the device a new
// id) and an id that already has a key or a certificate with ErrExists.
func IssueDeviceFiles(dir, id, model string) error {
	if err := protocol.ValidDeviceID(id); err != nil {
		return fmt.Errorf("issue device: %w", err)
	}
	if model != "" {
		if err := protocol.ValidModel(model); err != nil {
			return fmt.Errorf("issue device %q: %w", id, err)
		}
	}
	certPath, keyPath, err := devicePaths(dir, id)
	if err != nil {
		return fmt.Errorf("issue device: %w", err)
	}
	revoked, err := readRevoked(filepath.Join(dir, RevokedFile))
	if err != nil {
		return fmt.Errorf("issue device %q: %w", id, err)
	}
	if _, ok := revoked[id]; ok {
		return fmt.Errorf("issue device %q: %w (revocation is permanent; use a new id)", id, ErrRevoked)
	}
	if exists(certPath) {
		return fmt.Errorf("issue device %q: %s %w", id, certPath, ErrExists)
	}
	a, err := LoadAuthority(dir)
	if err != nil {
		return fmt.Errorf("issue device %q: %w", id, err)
	}
	certPEM, keyPEM, err := a.IssueDevice(id, IssueOptions{Model: model})
	if err != nil {
		return err
	}
	if err := ensureDir(filepath.Join(dir, DevicesDir)); err != nil {
		return fmt.Errorf("issue device %q: %w", id, err)
	}
	// The key is written without clobbering first: it is the claim on the id, so two
	// concurrent issues of one id cannot leave one's certificate next to the other's key.
	if err := writeFile(keyPath, keyPEM, keyMode, true); err != nil {
		return fmt.Errorf("issue device %q: %w", id, err)
	}
	if err := writeFile(certPath, certPEM, certMode, true); err != nil {
		return fmt.Errorf("issue device %q: %w", id, err)
	}
	return nil
}

// LoadDeviceTLS loads the certificate and key of device id from dir.
func LoadDeviceTLS(dir, id string) (tls.Certificate, error) {
	if err := protocol.ValidDeviceID(id); err != nil {
		return tls.Certificate{}, fmt.Errorf("load device: %w", err)
	}
	certPath, keyPath, err := devicePaths(dir, id)
	if err != nil {
		return tls.Certificate{}, fmt.Errorf("load device: %w", err)
	}
	c, err := tls.LoadX509KeyPair(certPath, keyPath)
	if err != nil {
		return tls.Certificate{}, fmt.Errorf("load device %q: %w", id, err)
	}
	return c, nil
}

// devicePaths returns where the certificate and key of device id live in dir.
func devicePaths(dir, id string) (certPath, keyPath string, err error) {
	// ValidDeviceID already refuses '/', this also covers other systems' separators.
	if !filepath.IsLocal(id+".crt") || strings.ContainsAny(id, `/\`) {
		return "", "", fmt.Errorf("device id %q cannot name a file", id)
	}
	d := filepath.Join(dir, DevicesDir)
	return filepath.Join(d, id+".crt"), filepath.Join(d, id+".key"), nil
}

// DeviceIdentity returns the device id and model of a verified peer certificate, or
// ErrNotDevice when the certificate's role is not "device" (admin, server, anything else).
func DeviceIdentity(cert *x509.Certificate) (id, model string, err error) {
	if cert == nil || cert.IsCA {
		return "", "", ErrNotDevice
	}
	role, attrs := splitOU(cert.Subject.OrganizationalUnit)
	if role != roleDevice {
		return "", "", ErrNotDevice
	}
	id = cert.Subject.CommonName
	if err := protocol.ValidDeviceID(id); err != nil {
		return "", "", fmt.Errorf("device certificate: %w", err)
	}
	for _, a := range attrs {
		if m, ok := strings.CutPrefix(a, modelPrefix); ok {
			if model != "" {
				return "", "", fmt.Errorf("device certificate %q: more than one model", id)
			}
			model = m
		}
	}
	return id, model, nil
}

// IsAdmin reports whether cert is an admin client certificate, whatever the admin's name. A
// device named "admin" is not. It does not consult the revocation list: see AdminName and
// RevocationList.AdminRevoked.
func IsAdmin(cert *x509.Certificate) bool {
	_, err := AdminName(cert)
	return err == nil
}

// splitOU returns the single role among ou (entries without '=') and the key=value entries.
// More than one role yields no role: a certificate claiming two cannot be trusted with either.
func splitOU(ou []string) (role string, attrs []string) {
	roles := 0
	for _, e := range ou {
		if strings.Contains(e, "=") {
			attrs = append(attrs, e)
			continue
		}
		roles++
		role = e
	}
	if roles != 1 {
		return "", attrs
	}
	return role, attrs
}

func newKey() (*ecdsa.PrivateKey, error) {
	k, err := ecdsa.GenerateKey(elliptic.P256(), rand.Reader)
	if err != nil {
		return nil, fmt.Errorf("generate key: %w", err)
	}
	return k, nil
}

// newSerial returns a random, positive, 128-bit serial number.
func newSerial() (*big.Int, error) {
	limit := new(big.Int).Lsh(big.NewInt(1), 128)
	for {
		n, err := rand.Int(rand.Reader, limit)
		if err != nil {
			return nil, fmt.Errorf("serial number: %w", err)
		}
		// At least 32 significant bits so the CA name suffix has 4 bytes to show.
		if n.BitLen() > 32 {
			return n, nil
		}
	}
}

func encodeKey(k *ecdsa.PrivateKey) ([]byte, error) {
	der, err := x509.MarshalECPrivateKey(k)
	if err != nil {
		return nil, fmt.Errorf("encode key: %w", err)
	}
	return pem.EncodeToMemory(&pem.Block{Type: "EC PRIVATE KEY", Bytes: der}), nil
}

// parseKey reads a PEM "EC PRIVATE KEY" or PKCS #8 "PRIVATE KEY" holding a P-256 key.
func parseKey(data []byte) (crypto.Signer, error) {
	for {
		var b *pem.Block
		b, data = pem.Decode(data)
		if b == nil {
			return nil, errors.New("no EC PRIVATE KEY or PRIVATE KEY block")
		}
		var key any
		var err error
		switch b.Type {
		case "EC PRIVATE KEY":
			key, err = x509.ParseECPrivateKey(b.Bytes)
		case "PRIVATE KEY":
			key, err = x509.ParsePKCS8PrivateKey(b.Bytes)
		default:
			continue
		}
		if err != nil {
			return nil, fmt.Errorf("parse key: %w", err)
		}
		ec, ok := key.(*ecdsa.PrivateKey)
		if !ok || ec.Curve != elliptic.P256() {
			return nil, errors.New("key is not ECDSA P-256")
		}
		return ec, nil
	}
}

func pemCert(der []byte) []byte {
	return pem.EncodeToMemory(&pem.Block{Type: "CERTIFICATE", Bytes: der})
}

// loadCert reads the first certificate of a PEM file.
func loadCert(path string) (*x509.Certificate, error) {
	data, err := os.ReadFile(path)
	if err != nil {
		return nil, err
	}
	for {
		var b *pem.Block
		b, data = pem.Decode(data)
		if b == nil {
			return nil, fmt.Errorf("%s: no CERTIFICATE block", path)
		}
		if b.Type != "CERTIFICATE" {
			continue
		}
		c, err := x509.ParseCertificate(b.Bytes)
		if err != nil {
			return nil, fmt.Errorf("%s: %w", path, err)
		}
		return c, nil
	}
}
