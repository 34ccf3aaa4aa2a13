package certs

import (
	"crypto/x509"
	"crypto/x509/pkix"
	"errors"
	"fmt"
	"io/fs"
	"os"
	"path/filepath"

	"github.com/fota-dev/fota/protocol"
)

// Admins. The admin Init makes is named "admin" (admin.crt, admin.key); IssueAdminFiles makes
// more, each in admins/NAME.crt and NAME.key, so that revoking one does not lock the
// operator out.
const (
	// DefaultAdmin is the name of the admin certificate Init makes.
	DefaultAdmin = adminCN
	// AdminsDir holds the admins issued after Init.
	AdminsDir = "admins"
	// maxAdminNameLen bounds an admin's name, like a device id's.
	maxAdminNameLen = 64
)

var (
	// ErrNotAdmin is returned by AdminName for a certificate that is not an admin's.
	ErrNotAdmin = errors.New("not an admin certificate")
	// ErrBadAdminName is returned (wrapped) by ValidAdminName.
	ErrBadAdminName = errors.New("invalid admin name")
)

// ValidAdminName reports whether name can name an admin: 1 to 64 bytes of [A-Za-z0-9._-],
// other than "." and "..", since it names the files admins/NAME.crt and NAME.key.
func ValidAdminName(name string) error {
	switch {
	case name == "":
		return fmt.Errorf("%w: empty", ErrBadAdminName)
	case len(name) > maxAdminNameLen:
		return fmt.Errorf("%w: %d bytes, at most %d", ErrBadAdminName, len(name), maxAdminNameLen)
	case name == "." || name == "..":
		return fmt.Errorf("%w: %q is not a name", ErrBadAdminName, name)
	}
	for _, r := range name {
		if !(r >= 'a' && r <= 'z' || r >= 'A' && r <= 'Z' || r >= '0' && r <= '9' || r == '.' || r == '_' || r == '-') {
			return fmt.Errorf("%w: %q: only letters, digits, '.', '_' and '-' are allowed", ErrBadAdminName, name)
		}
	}
	return nil
}

// AdminName returns the name of a verified admin client certificate (its CN), or ErrNotAdmin
// when the certificate's role is not "admin". A device named "admin" is not an admin.
func AdminName(cert *x509.Certificate) (string, error) {
	if cert == nil || cert.IsCA {
		return "", ErrNotAdmin
	}
	role, _ := splitOU(cert.Subject.OrganizationalUnit)
	if role != roleAdmin {
		return "", ErrNotAdmin
	}
	name := cert.Subject.CommonName
	if err := ValidAdminName(name); err != nil {
		return "", fmt.Errorf("admin certificate: %w", err)
	}
	return name, nil
}

// AdminPaths returns where the certificate and key of admin name live in dir: admin.crt and
// admin.key for DefaultAdmin, admins/NAME.crt and NAME.key for the others.
func AdminPaths(dir, name string) (certPath, keyPath string, err error) {
	if err := ValidAdminName(name); err != nil {
		return "", "", err
	}
	if name == DefaultAdmin {
		return filepath.Join(dir, AdminCertFile), filepath.Join(dir, AdminKeyFile), nil
	}
	d := filepath.Join(dir, AdminsDir)
	return filepath.Join(d, name+".crt"), filepath.Join(d, name+".key"), nil
}

// IssueAdminFiles issues a certificate for admin name and writes it with a new key where
// AdminPaths says. It refuses a revoked name with ErrRevoked (revocation is permanent: pick
// another name) and a name that already has a key or a certificate with ErrExists.
func IssueAdminFiles(dir, name string) error {
	certPath, keyPath, err := AdminPaths(dir, name)
	if err != nil {
		return fmt.Errorf("issue admin: %w", err)
	}
	doc, err := readRevokedDoc(filepath.Join(dir, RevokedFile))
	if err != nil {
		return fmt.Errorf("issue admin %q: %w", name, err)
	}
	if doc.adminRevoked(name) {
		return fmt.Errorf("issue admin %q: %w (revocation is permanent; use a new name)", name, ErrRevoked)
	}
	if exists(certPath) || exists(keyPath) {
		return fmt.Errorf("issue admin %q: %s %w", name, certPath, ErrExists)
	}
	a, err := LoadAuthority(dir)
	if err != nil {
		return fmt.Errorf("issue admin %q: %w", name, err)
	}
	certPEM, keyPEM, err := a.issue(adminTemplate(name), IssueOptions{})
	if err != nil {
		return fmt.Errorf("issue admin %q: %w", name, err)
	}
	if err := ensureDir(filepath.Dir(certPath)); err != nil {
		return fmt.Errorf("issue admin %q: %w", name, err)
	}
	// The key first, without clobbering: it is the claim on the name (see IssueDeviceFiles).
	if err := writeFile(keyPath, keyPEM, keyMode, true); err != nil {
		return fmt.Errorf("issue admin %q: %w", name, err)
	}
	if err := writeFile(certPath, certPEM, certMode, true); err != nil {
		return fmt.Errorf("issue admin %q: %w", name, err)
	}
	return nil
}

func adminTemplate(name string) *x509.Certificate {
	return &x509.Certificate{
		Subject:     pkix.Name{CommonName: name, OrganizationalUnit: []string{roleAdmin}},
		ExtKeyUsage: []x509.ExtKeyUsage{x509.ExtKeyUsageClientAuth},
	}
}

// DeviceIssued reports whether dir holds the certificate of device id (devices/ID.crt).
func DeviceIssued(dir, id string) (bool, error) {
	if err := protocol.ValidDeviceID(id); err != nil {
		return false, err
	}
	certPath, _, err := devicePaths(dir, id)
	if err != nil {
		return false, err
	}
	return fileExists(certPath)
}

// AdminIssued reports whether dir holds the certificate of admin name (see AdminPaths).
func AdminIssued(dir, name string) (bool, error) {
	certPath, _, err := AdminPaths(dir, name)
	if err != nil {
		return false, err
	}
	return fileExists(certPath)
}

// fileExists is exists with the error of a path it could not check.
func fileExists(path string) (bool, error) {
	_, err := os.Lstat(path)
	switch {
	case err == nil:
		return true, nil
	case errors.Is(err, fs.ErrNotExist):
		return false, nil
	}
	return false, err
}
