package certs

import (
	"context"
	"encoding/json"
	"errors"
	"fmt"
	"io"
	"io/fs"
	"os"
	"path/filepath"
	"slices"
	"sync"
	"sync/atomic"
	"time"

	"github.com/fota-dev/fota/protocol"
)

// maxRevokedSize bounds how much of revoked.json is read: a million ids fit.
const maxRevokedSize = 128 << 20

// revokedDoc is the content of revoked.json. Admins came later: a file without "admins" is
// one from before, and a binary from before ignores them.
type revokedDoc struct {
	Revoked []revokedEntry `json:"revoked"`
	Admins  []revokedAdmin `json:"admins,omitempty"`
}

type revokedEntry struct {
	ID string    `json:"id"`
	At time.Time `json:"at"`
}

type revokedAdmin struct {
	Name string    `json:"name"`
	At   time.Time `json:"at"`
}

func (d revokedDoc) adminRevoked(name string) bool {
	for _, e := range d.Admins {
		if e.Name == name {
			return true
		}
	}
	return false
}

// revokeMu serialises the read-modify-write of revoked.json within one process.
var revokeMu sync.Mutex

// Revoke adds device id to revoked.json in dir. Revocation is permanent: the id is refused by
// ServerTLS and can never be issued again. Revoking an id twice, or one never issued, is fine
// (the CLI asks for a flag before it revokes an id its certs dir never issued, see DeviceIssued).
func Revoke(dir, id string) error {
	if err := protocol.ValidDeviceID(id); err != nil {
		return fmt.Errorf("revoke: %w", err)
	}
	err := updateRevoked(dir, func(doc *revokedDoc) bool {
		for _, e := range doc.Revoked {
			if e.ID == id {
				return false
			}
		}
		doc.Revoked = append(doc.Revoked, revokedEntry{ID: id, At: time.Now().UTC().Truncate(time.Second)})
		return true
	})
	if err != nil {
		return fmt.Errorf("revoke %q: %w", id, err)
	}
	return nil
}

// RevokeAdmin adds admin name to revoked.json in dir. Like a device's, the revocation is
// permanent: ServerTLS refuses the name's certificates, a server given the RevocationList
// refuses its requests on connections already open, and the name can never be issued again.
// Revoking a name twice, or one never issued, is fine.
func RevokeAdmin(dir, name string) error {
	if err := ValidAdminName(name); err != nil {
		return fmt.Errorf("revoke admin: %w", err)
	}
	err := updateRevoked(dir, func(doc *revokedDoc) bool {
		if doc.adminRevoked(name) {
			return false
		}
		doc.Admins = append(doc.Admins, revokedAdmin{Name: name, At: time.Now().UTC().Truncate(time.Second)})
		return true
	})
	if err != nil {
		return fmt.Errorf("revoke admin %q: %w", name, err)
	}
	return nil
}

// updateRevoked applies change to revoked.json in dir and writes it back if change says so.
func updateRevoked(dir string, change func(*revokedDoc) bool) error {
	revokeMu.Lock()
	defer revokeMu.Unlock()
	path := filepath.Join(dir, RevokedFile)
	doc, err := readRevokedDoc(path)
	if err != nil {
		return err
	}
	if !change(&doc) {
		return nil
	}
	data, err := json.MarshalIndent(doc, "", "  ")
	if err != nil {
		return err
	}
	if err := ensureDir(dir); err != nil {
		return err
	}
	return writeFile(path, append(data, '\n'), certMode, false)
}

// readRevokedDoc reads revoked.json; a missing file is an empty list.
func readRevokedDoc(path string) (revokedDoc, error) {
	f, err := os.Open(path)
	if errors.Is(err, fs.ErrNotExist) {
		return revokedDoc{}, nil
	}
	if err != nil {
		return revokedDoc{}, err
	}
	defer f.Close()
	return decodeRevoked(f, path)
}

// readRevoked returns the revoked ids of path as a set.
func readRevoked(path string) (map[string]struct{}, error) {
	doc, err := readRevokedDoc(path)
	if err != nil {
		return nil, err
	}
	return revokedSet(doc), nil
}

func decodeRevoked(r io.Reader, path string) (revokedDoc, error) {
	data, err := io.ReadAll(io.LimitReader(r, maxRevokedSize+1))
	if err != nil {
		return revokedDoc{}, fmt.Errorf("read %s: %w", path, err)
	}
	if len(data) > maxRevokedSize {
		return revokedDoc{}, fmt.Errorf("read %s: larger than %d bytes", path, maxRevokedSize)
	}
	var doc revokedDoc
	if err := json.Unmarshal(data, &doc); err != nil {
		return revokedDoc{}, fmt.Errorf("parse %s: %w", path, err)
	}
	for _, e := range doc.Revoked {
		if err := protocol.ValidDeviceID(e.ID); err != nil {
			return revokedDoc{}, fmt.Errorf("parse %s: %w", path, err)
		}
	}
	for _, e := range doc.Admins {
		if err := ValidAdminName(e.Name); err != nil {
			return revokedDoc{}, fmt.Errorf("parse %s: %w", path, err)
		}
	}
	return doc, nil
}

func revokedSet(doc revokedDoc) map[string]struct{} {
	m := make(map[string]struct{}, len(doc.Revoked))
	for _, e := range doc.Revoked {
		m[e.ID] = struct{}{}
	}
	return m
}

// revokedSets is what a RevocationList holds: device ids and admin names.
type revokedSets struct {
	devices map[string]struct{}
	admins  map[string]struct{}
}

func newRevokedSets(doc revokedDoc) *revokedSets {
	s := &revokedSets{devices: revokedSet(doc), admins: make(map[string]struct{}, len(doc.Admins))}
	for _, e := range doc.Admins {
		s.admins[e.Name] = struct{}{}
	}
	return s
}

// RevocationList is the revoked.json of a certs dir, reloaded when the file changes. Revoked
// and AdminRevoked are lock-free so that they can sit on the TLS handshake path.
type RevocationList struct {
	path string
	ids  atomic.Pointer[revokedSets]

	mu      sync.Mutex        // serialises Reload
	info    fs.FileInfo       // of the file last loaded; nil while it is missing
	err     error             // of the last Reload
	onAdmin func(name string) // see OnAdminRevoke
}

// OpenRevocationList loads revoked.json from dir. A missing file is an empty list (it appears
// with the first revocation); a corrupt one is an error.
func OpenRevocationList(dir string) (*RevocationList, error) {
	r := &RevocationList{path: filepath.Join(dir, RevokedFile)}
	r.ids.Store(newRevokedSets(revokedDoc{}))
	if _, err := r.Reload(); err != nil {
		return nil, fmt.Errorf("open revocation list: %w", err)
	}
	return r, nil
}

// Revoked reports whether device id is revoked.
func (r *RevocationList) Revoked(id string) bool {
	_, ok := r.ids.Load().devices[id]
	return ok
}

// AdminRevoked reports whether admin name is revoked.
func (r *RevocationList) AdminRevoked(name string) bool {
	_, ok := r.ids.Load().admins[name]
	return ok
}

// Reload re-reads the file if it changed (another inode, size or mtime) and returns the device
// ids revoked since the last load, sorted (admins are not listed: see AdminRevoked and
// OnAdminRevoke). On a corrupt file it keeps the previous list and returns the error. A removed
// file empties the list.
func (r *RevocationList) Reload() (added []string, err error) {
	added, _, err = r.reloadBoth()
	return added, err
}

// OnAdminRevoke sets the function Watch calls with each newly revoked admin name, so that the
// caller can close that admin's open connections. Set it before Watch starts.
func (r *RevocationList) OnAdminRevoke(fn func(name string)) {
	r.mu.Lock()
	defer r.mu.Unlock()
	r.onAdmin = fn
}

// reloadBoth is Reload that also returns the admin names revoked since the last load.
func (r *RevocationList) reloadBoth() (devices, admins []string, err error) {
	r.mu.Lock()
	defer r.mu.Unlock()
	devices, admins, err = r.reload()
	r.err = err
	return devices, admins, err
}

func (r *RevocationList) reload() (devices, admins []string, err error) {
	f, err := os.Open(r.path)
	if errors.Is(err, fs.ErrNotExist) {
		if r.info != nil {
			r.info = nil
			r.ids.Store(newRevokedSets(revokedDoc{}))
		}
		return nil, nil, nil
	}
	if err != nil {
		return nil, nil, fmt.Errorf("reload %s: %w", r.path, err)
	}
	defer f.Close()
	// Stat the open file, not the path, so the recorded state is that of what is read.
	fi, err := f.Stat()
	if err != nil {
		return nil, nil, fmt.Errorf("reload %s: %w", r.path, err)
	}
	if r.info != nil && os.SameFile(r.info, fi) && fi.Size() == r.info.Size() && fi.ModTime().Equal(r.info.ModTime()) {
		return nil, nil, nil
	}
	doc, err := decodeRevoked(f, r.path)
	if err != nil {
		return nil, nil, err
	}
	next := newRevokedSets(doc)
	prev := r.ids.Load()
	r.ids.Store(next)
	r.info = fi
	return newKeys(prev.devices, next.devices), newKeys(prev.admins, next.admins), nil
}

// newKeys returns the keys of next that prev lacks, sorted.
func newKeys(prev, next map[string]struct{}) []string {
	var added []string
	for k := range next {
		if _, ok := prev[k]; !ok {
			added = append(added, k)
		}
	}
	slices.Sort(added)
	return added
}

// Err returns the error of the last Reload, nil after a good one.
func (r *RevocationList) Err() error {
	r.mu.Lock()
	defer r.mu.Unlock()
	return r.err
}

// Watch reloads the list every tick (1s when every <= 0) until ctx is done, calling onRevoke
// (when not nil) for each newly revoked device id, and the function set with OnAdminRevoke for
// each newly revoked admin, so that the caller can drop their live connections. Both are
// called after the list holds the change. A failed reload keeps the previous list and is
// retried next tick; see Err.
func (r *RevocationList) Watch(ctx context.Context, every time.Duration, onRevoke func(id string)) {
	if every <= 0 {
		every = time.Second
	}
	t := time.NewTicker(every)
	defer t.Stop()
	for {
		select {
		case <-ctx.Done():
			return
		case <-t.C:
		}
		devices, admins, _ := r.reloadBoth()
		if onRevoke != nil {
			for _, id := range devices {
				onRevoke(id)
			}
		}
		r.mu.Lock()
		onAdmin := r.onAdmin
		r.mu.Unlock()
		if onAdmin != nil {
			for _, name := range admins {
				onAdmin(name)
			}
		}
	}
}
