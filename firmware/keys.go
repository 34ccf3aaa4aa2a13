package firmware

import (
	"crypto/ecdh"
	"crypto/ecdsa"
	"crypto/ed25519"
	"crypto/rand"
	"crypto/rsa"
	"crypto/x509"
	"encoding/pem"
	"errors"
	"fmt"
	"io"
	"io/fs"
	"os"
	"path/filepath"

	"github.com/fota-dev/fota/atomicfile"
)

// Release key files, as GenerateKey writes them and OpenKeys looks for them.
const (
	// PrivateKeyFile holds the ed25519 release key: PEM "PRIVATE KEY", PKCS #8, mode 0600.
	PrivateKeyFile = "release.key"
	// PublicKeyFile holds its public half: PEM "PUBLIC KEY", PKIX. Devices pin it.
	PublicKeyFile = "release.pub"
)

// Key errors, returned wrapped; test with errors.Is.
var (
	// ErrKeyExists: GenerateKey never replaces a release key, since every device pins it.
	ErrKeyExists = errors.New("release key already exists")
	// ErrBadKey: a key file is not the PEM-encoded ed25519 key it should be.
	ErrBadKey = errors.New("not an ed25519 release key")
)

// maxKeyFile bounds what LoadPrivateKey and LoadPublicKey read; a PEM ed25519 key is about
// 120 bytes, so anything near this is not a key.
const maxKeyFile = 64 << 10

// GenerateKey writes a new release key pair into dir (created 0700 if missing): PrivateKeyFile
// and PublicKeyFile. It fails with ErrKeyExists if either file is there already, so an old
// public key cannot end up next to a new private key.
func GenerateKey(dir string) error {
	if err := os.MkdirAll(dir, 0o700); err != nil {
		return fmt.Errorf("generate release key: %w", err)
	}
	for _, name := range []string{PrivateKeyFile, PublicKeyFile} {
		if _, err := os.Lstat(filepath.Join(dir, name)); err == nil {
			return fmt.Errorf("%w: %s", ErrKeyExists, filepath.Join(dir, name))
		} else if !errors.Is(err, fs.ErrNotExist) {
			return fmt.Errorf("generate release key: %w", err)
		}
	}
	pub, priv, err := ed25519.GenerateKey(rand.Reader)
	if err != nil {
		return fmt.Errorf("generate release key: %w", err)
	}
	// The private key first: a crash before the public key is written leaves a state that
	// OpenKeys repairs, while a public key alone would mean offline mode with a lost key.
	if err := writePrivateKey(filepath.Join(dir, PrivateKeyFile), priv); err != nil {
		return fmt.Errorf("generate release key: %w", err)
	}
	if err := writePublicKey(filepath.Join(dir, PublicKeyFile), pub); err != nil {
		return fmt.Errorf("generate release key: %w", err)
	}
	return nil
}

func writePrivateKey(path string, priv ed25519.PrivateKey) error {
	der, err := x509.MarshalPKCS8PrivateKey(priv)
	if err != nil {
		return fmt.Errorf("encode private key: %w", err)
	}
	return createKeyFile(path, pem.EncodeToMemory(&pem.Block{Type: "PRIVATE KEY", Bytes: der}), 0o600)
}

func writePublicKey(path string, pub ed25519.PublicKey) error {
	der, err := x509.MarshalPKIXPublicKey(pub)
	if err != nil {
		return fmt.Errorf("encode public key: %w", err)
	}
	return createKeyFile(path, pem.EncodeToMemory(&pem.Block{Type: "PUBLIC KEY", Bytes: der}), 0o644)
}

// createKeyFile writes a key file that must not exist yet: a key is never replaced, even by a
// concurrent GenerateKey.
func createKeyFile(path string, data []byte, mode os.FileMode) error {
	err := atomicfile.Create(path, data, mode)
	if errors.Is(err, fs.ErrExist) {
		return fmt.Errorf("%w: %s", ErrKeyExists, path)
	}
	return err
}

// LoadPrivateKey reads an ed25519 private key from a PEM "PRIVATE KEY" (PKCS #8) file.
func LoadPrivateKey(path string) (ed25519.PrivateKey, error) {
	der, err := readPEM(path, "PRIVATE KEY")
	if err != nil {
		return nil, err
	}
	k, err := x509.ParsePKCS8PrivateKey(der)
	if err != nil {
		return nil, fmt.Errorf("load release key %s: %w: %v", path, ErrBadKey, err)
	}
	priv, ok := k.(ed25519.PrivateKey)
	if !ok {
		return nil, fmt.Errorf("load release key %s: %w: it holds a %s private key", path, ErrBadKey, keyKind(k))
	}
	return priv, nil
}

// LoadPublicKey reads an ed25519 public key from a PEM "PUBLIC KEY" (PKIX) file.
func LoadPublicKey(path string) (ed25519.PublicKey, error) {
	der, err := readPEM(path, "PUBLIC KEY")
	if err != nil {
		return nil, err
	}
	k, err := x509.ParsePKIXPublicKey(der)
	if err != nil {
		return nil, fmt.Errorf("load release public key %s: %w: %v", path, ErrBadKey, err)
	}
	pub, ok := k.(ed25519.PublicKey)
	if !ok {
		return nil, fmt.Errorf("load release public key %s: %w: it holds a %s public key", path, ErrBadKey, keyKind(k))
	}
	return pub, nil
}

// readPEM returns the bytes of the first PEM block of path, which must be of type want.
func readPEM(path, want string) ([]byte, error) {
	what := "release key"
	if want == "PUBLIC KEY" {
		what = "release public key"
	}
	f, err := os.Open(path)
	if err != nil {
		return nil, fmt.Errorf("load %s: %w", what, err)
	}
	defer f.Close()
	b, err := io.ReadAll(io.LimitReader(f, maxKeyFile+1))
	if err != nil {
		return nil, fmt.Errorf("load %s: %w", what, err)
	}
	if len(b) > maxKeyFile {
		return nil, fmt.Errorf("load %s %s: %w: file larger than %d bytes", what, path, ErrBadKey, maxKeyFile)
	}
	block, _ := pem.Decode(b)
	switch {
	case block == nil:
		return nil, fmt.Errorf("load %s %s: %w: no PEM block, want %q", what, path, ErrBadKey, want)
	case block.Type != want:
		hint := ""
		switch block.Type {
		case "PUBLIC KEY":
			hint = " (is this the public key? give the private release.key)"
		case "PRIVATE KEY":
			hint = " (this is a private key; give the public release.pub)"
		}
		return nil, fmt.Errorf("load %s %s: %w: PEM block %q, want %q%s", what, path, ErrBadKey, block.Type, want, hint)
	}
	return block.Bytes, nil
}

func keyKind(k any) string {
	switch k.(type) {
	case *rsa.PrivateKey, *rsa.PublicKey:
		return "RSA"
	case *ecdsa.PrivateKey, *ecdsa.PublicKey:
		return "ECDSA"
	case *ecdh.PrivateKey, *ecdh.PublicKey:
		return "ECDH (X25519)"
	}
	return fmt.Sprintf("%T", k)
}

// Keys is the release key material a server runs with. Private is nil in offline mode, where
// manifests are signed on another machine and the server only checks them.
type Keys struct {
	Private ed25519.PrivateKey
	Public  ed25519.PublicKey
	// PublicPath is the file devices should pin.
	PublicPath string
	// Generated is true when OpenKeys made a new pair.
	Generated bool
}

// OpenKeys finds the release keys in dir. With PrivateKeyFile it signs online (and writes a
// missing PublicKeyFile from it); with only PublicKeyFile it runs offline; with neither, it
// generates a pair. A PublicKeyFile that does not match PrivateKeyFile is an error: devices
// pinning it would refuse everything the server signs.
func OpenKeys(dir string) (Keys, error) {
	privPath, pubPath := filepath.Join(dir, PrivateKeyFile), filepath.Join(dir, PublicKeyFile)
	k := Keys{PublicPath: pubPath}
	privExists, err := exists(privPath)
	if err != nil {
		return Keys{}, fmt.Errorf("release keys: %w", err)
	}
	pubExists, err := exists(pubPath)
	if err != nil {
		return Keys{}, fmt.Errorf("release keys: %w", err)
	}
	switch {
	case !privExists && !pubExists:
		if err := GenerateKey(dir); err != nil {
			return Keys{}, fmt.Errorf("release keys: %w", err)
		}
		k.Generated = true
	case !privExists:
		if k.Public, err = LoadPublicKey(pubPath); err != nil {
			return Keys{}, fmt.Errorf("release keys: %w", err)
		}
		return k, nil
	}
	if k.Private, err = LoadPrivateKey(privPath); err != nil {
		return Keys{}, fmt.Errorf("release keys: %w", err)
	}
	derived := k.Private.Public().(ed25519.PublicKey)
	if !pubExists && !k.Generated {
		if err := writePublicKey(pubPath, derived); err != nil && !errors.Is(err, ErrKeyExists) {
			return Keys{}, fmt.Errorf("release keys: %w", err)
		}
	}
	if k.Public, err = LoadPublicKey(pubPath); err != nil {
		return Keys{}, fmt.Errorf("release keys: %w", err)
	}
	if !k.Public.Equal(derived) {
		return Keys{}, fmt.Errorf("release keys: %s does not belong to %s", pubPath, privPath)
	}
	return k, nil
}

func exists(path string) (bool, error) {
	_, err := os.Stat(path)
	switch {
	case err == nil:
		return true, nil
	case errors.Is(err, fs.ErrNotExist):
		return false, nil
	}
	return false, err
}
