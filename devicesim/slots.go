package devicesim

import (
	"crypto/sha256"
	"encoding/hex"
	"encoding/json"
	"errors"
	"fmt"
	"io"
	"os"
	"path/filepath"
	"strings"
	"sync"

	"github.com/fota-dev/fota/atomicfile"
	"github.com/fota-dev/fota/protocol"
)

// Names inside a device's state directory, StateDir/ID.
const (
	stateFile = "state.json"
	maxState  = 4 << 10 // bytes of state.json read at most
)

var slotFiles = [2]string{"slot-a.bin", "slot-b.bin"}

// State is what a device keeps across reboots: which of its two image slots boots, and what
// that slot holds. It is persisted as StateDir/ID/state.json.
type State struct {
	Model   string `json:"model"`
	Active  int    `json:"active"` // 0: slot A boots, 1: slot B
	Version string `json:"version"`
	Counter uint64 `json:"counter"` // anti-rollback counter of the installed firmware
	SHA256  string `json:"sha256"`  // hex sha256 of the active slot's image; "" when it is empty
}

// Slot returns the name of the active slot, "A" or "B".
func (s State) Slot() string { return string(rune('A' + s.Active)) }

// slots is a device's flash: two image slots and the state that says which one boots. An
// install writes the inactive slot and then switches State in one step, so a crash at any
// point leaves the device booting either the old image or the new one, never a mix.
//
// With dir == "" everything lives in memory, for fleets of thousands; image slices are never
// modified, so devices may share their initial image.
type slots struct {
	dir    string
	state  State
	image  [2][]byte
	images *imageCache
}

// imageCache holds one copy of each image a fleet's devices have in their slots: a thousand
// devices that installed the same release hold one slice, not a thousand. Images are never
// modified once in a slot, so sharing them is safe.
//
// It also keeps what applying a patch to a base built. A real fleet applies its patches on as
// many processors as it has devices; a simulated one shares this process's few cores with the
// server under test, where applying the same patch to the same base ten thousand times would
// measure the simulator. So a fleet applies each (base, patch) pair once. Every device still
// checks the patch against its signed manifest before, and the image it installs after.
type imageCache struct {
	mu      sync.Mutex
	m       map[string][]byte // by hex sha256
	applied map[string][]byte // built image by base sha256 + ":" + patch sha256
}

// apply returns what build returns, the image that the patch with sha256 patch builds from
// the base with sha256 base, building it only the first time. Failures are not kept: each
// device meets its own. A nil cache always builds.
func (c *imageCache) apply(base, patch string, build func() ([]byte, error)) ([]byte, error) {
	if c == nil {
		return build()
	}
	key := base + ":" + patch
	c.mu.Lock()
	img, ok := c.applied[key]
	c.mu.Unlock()
	if ok {
		return img, nil
	}
	img, err := build()
	if err != nil {
		return nil, err
	}
	c.mu.Lock()
	defer c.mu.Unlock()
	if prev, ok := c.applied[key]; ok {
		return prev, nil
	}
	if c.applied == nil {
		c.applied = map[string][]byte{}
	}
	c.applied[key] = img
	return img, nil
}

// intern returns the cached image with sum (the sha256 of image), caching image if none is.
// A nil cache returns image.
func (c *imageCache) intern(sum string, image []byte) []byte {
	if c == nil || image == nil {
		return image
	}
	c.mu.Lock()
	defer c.mu.Unlock()
	if c.m == nil {
		c.m = map[string][]byte{}
	}
	if img, ok := c.m[sum]; ok {
		return img
	}
	c.m[sum] = image
	return image
}

// openSlots resumes the device persisted in dir, or when dir holds no state yet (or is ""),
// starts from init with image in slot A. Images read from dir are interned in images.
func openSlots(dir string, init State, image []byte, images *imageCache) (*slots, error) {
	s := &slots{dir: dir, state: init, images: images}
	s.state.Active = 0
	s.state.SHA256 = ""
	if image != nil {
		s.state.SHA256 = sha256Hex(image)
	}
	s.image[0] = images.intern(s.state.SHA256, image)
	if dir == "" {
		return s, nil
	}
	if err := os.MkdirAll(dir, 0o700); err != nil {
		return nil, fmt.Errorf("state dir: %w", err)
	}
	if stale, _ := filepath.Glob(filepath.Join(dir, atomicfile.TempGlob)); len(stale) > 0 {
		for _, p := range stale {
			os.Remove(p) // best effort: a leftover only wastes space
		}
	}
	b, err := readLimited(filepath.Join(dir, stateFile), maxState)
	switch {
	case errors.Is(err, os.ErrNotExist):
		if image != nil {
			if err := atomicfile.Write(filepath.Join(dir, slotFiles[0]), image, 0o600); err != nil {
				return nil, fmt.Errorf("write slot A: %w", err)
			}
		}
		if err := s.saveState(s.state); err != nil {
			return nil, err
		}
		return s, nil
	case err != nil:
		return nil, fmt.Errorf("read state: %w", err)
	}
	var st State
	if err := json.Unmarshal(b, &st); err != nil {
		return nil, fmt.Errorf("read state %s: %w", filepath.Join(dir, stateFile), err)
	}
	if err := checkState(st, init.Model); err != nil {
		return nil, fmt.Errorf("read state %s: %w", filepath.Join(dir, stateFile), err)
	}
	s.state, s.image = st, [2][]byte{}
	if st.SHA256 == "" {
		return s, nil
	}
	// Boot only an image that is what the state says: a slot damaged behind the device's back
	// must not run, nor serve as the base of a delta.
	path := filepath.Join(dir, slotFiles[st.Active])
	img, err := readLimited(path, MaxImageSize)
	if err != nil {
		return nil, fmt.Errorf("read slot %s: %w", st.Slot(), err)
	}
	if got := sha256Hex(img); got != st.SHA256 {
		return nil, fmt.Errorf("slot %s (%s) has sha256 %s, state says %s", st.Slot(), path, got, st.SHA256)
	}
	s.image[st.Active] = images.intern(st.SHA256, img)
	return s, nil
}

func checkState(st State, model string) error {
	switch {
	case st.Model != model:
		return fmt.Errorf("model %q, this device is %q", st.Model, model)
	case st.Active != 0 && st.Active != 1:
		return fmt.Errorf("active slot %d, want 0 or 1", st.Active)
	case st.SHA256 != "" && !isSHA256(st.SHA256):
		return fmt.Errorf("sha256 %q is not 64 lowercase hex digits", st.SHA256)
	}
	if _, err := protocol.ParseVersion(st.Version); err != nil {
		return err
	}
	return nil
}

// installed returns the image that boots; nil when there is none.
func (s *slots) installed() []byte { return s.image[s.state.Active] }

// install writes image, which matches m, to the inactive slot and makes it the one that boots,
// with m's version and counter. On error nothing changed: the old image still boots.
func (s *slots) install(m protocol.Manifest, image []byte) error {
	next := 1 - s.state.Active
	st := s.state
	st.Active, st.Version, st.SHA256 = next, m.Version, sha256Hex(image)
	st.Counter = max(st.Counter, m.Counter)
	if s.dir != "" {
		if err := atomicfile.Write(filepath.Join(s.dir, slotFiles[next]), image, 0o600); err != nil {
			return fmt.Errorf("write slot %s: %w", st.Slot(), err)
		}
		// The switch: active slot, version and counter change together in one rename.
		if err := s.saveState(st); err != nil {
			return err
		}
	}
	s.state = st
	s.image[next] = s.images.intern(st.SHA256, image)
	s.image[1-next] = nil // the old image stays on flash, but nothing reads it again
	return nil
}

func (s *slots) saveState(st State) error {
	b, err := json.MarshalIndent(st, "", "  ")
	if err != nil {
		return fmt.Errorf("encode state: %w", err)
	}
	if err := atomicfile.Write(filepath.Join(s.dir, stateFile), append(b, '\n'), 0o600); err != nil {
		return fmt.Errorf("write state: %w", err)
	}
	return nil
}

// readLimited reads a file of at most limit bytes; a bigger one is an error, not an
// allocation of whatever size it has.
func readLimited(path string, limit int64) ([]byte, error) {
	f, err := os.Open(path)
	if err != nil {
		return nil, err
	}
	defer f.Close()
	b, err := io.ReadAll(io.LimitReader(f, limit+1))
	if err != nil {
		return nil, err
	}
	if int64(len(b)) > limit {
		return nil, fmt.Errorf("%s is larger than %d bytes", path, limit)
	}
	return b, nil
}

// stateDirFor returns the directory of device id under root, refusing ids that would not
// name a single directory inside it ("." and ".." are valid device ids).
func stateDirFor(root, id string) (string, error) {
	if id == "." || id == ".." || strings.ContainsAny(id, `/\`) || !filepath.IsLocal(id) {
		return "", fmt.Errorf("device id %q cannot name a state directory", id)
	}
	return filepath.Join(root, id), nil
}

func sha256Hex(b []byte) string {
	sum := sha256.Sum256(b)
	return hex.EncodeToString(sum[:])
}

func isSHA256(s string) bool {
	if len(s) != 2*sha256.Size {
		return false
	}
	for i := 0; i < len(s); i++ {
		if c := s[i]; !(c >= '0' && c <= '9' || c >= 'a' && c <= 'f') {
			return false
		}
	}
	return true
}
