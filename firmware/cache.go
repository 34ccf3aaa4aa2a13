package firmware

import (
	"container/list"
	"errors"
	"fmt"
	"io"
	"io/fs"
	"os"
	"sync"
)

// defaultMaxOpen bounds the cached file handles. A rollout streams a handful of images to many
// devices at once, so a few handles serve nearly every chunk read.
const defaultMaxOpen = 16

// handle is a cached open artifact. refs counts ReadAt calls using f, so that eviction never
// closes a file under a reader; the last reader of an evicted handle closes it.
type handle struct {
	sha     string
	f       *os.File
	size    int64
	refs    int
	evicted bool
	elem    *list.Element
}

// fileCache is a small LRU of open artifacts. Artifacts are immutable, so a handle stays valid
// until its file is deleted.
type fileCache struct {
	mu     sync.Mutex
	max    int
	open   map[string]*handle
	lru    *list.List // of *handle, most recent first
	closed bool
}

func newFileCache(max int) *fileCache {
	return &fileCache{max: max, open: make(map[string]*handle), lru: list.New()}
}

// acquire returns a handle for sha, opening path if needed; release it when done. The file is
// opened under mu on purpose: Delete removes the file and then calls evict, and opening under
// the same lock is what keeps a handle to a deleted file from being cached after that evict.
func (c *fileCache) acquire(sha, path string) (*handle, error) {
	c.mu.Lock()
	defer c.mu.Unlock()
	if c.closed {
		return nil, ErrClosed
	}
	if h, ok := c.open[sha]; ok {
		c.lru.MoveToFront(h.elem)
		h.refs++
		return h, nil
	}
	f, err := os.Open(path)
	if err != nil {
		if errors.Is(err, fs.ErrNotExist) {
			return nil, fmt.Errorf("artifact %s: %w", sha, ErrNotFound)
		}
		return nil, fmt.Errorf("open artifact: %w", err)
	}
	fi, err := f.Stat()
	if err != nil {
		f.Close()
		return nil, fmt.Errorf("stat artifact: %w", err)
	}
	h := &handle{sha: sha, f: f, size: fi.Size(), refs: 1}
	h.elem = c.lru.PushFront(h)
	c.open[sha] = h
	for c.lru.Len() > c.max {
		c.dropLocked(c.lru.Back().Value.(*handle))
	}
	return h, nil
}

func (c *fileCache) release(h *handle) {
	c.mu.Lock()
	defer c.mu.Unlock()
	h.refs--
	if h.evicted && h.refs == 0 {
		h.f.Close()
	}
}

// evict forgets sha, closing its file once no reader uses it.
func (c *fileCache) evict(sha string) {
	c.mu.Lock()
	defer c.mu.Unlock()
	if h, ok := c.open[sha]; ok {
		c.dropLocked(h)
	}
}

func (c *fileCache) dropLocked(h *handle) {
	delete(c.open, h.sha)
	c.lru.Remove(h.elem)
	h.evicted = true
	if h.refs == 0 {
		h.f.Close()
	}
}

// close drops every handle and refuses further acquires.
func (c *fileCache) close() {
	c.mu.Lock()
	defer c.mu.Unlock()
	c.closed = true
	for _, h := range c.open {
		c.dropLocked(h)
	}
}

// ReadAt reads len(p) bytes of the artifact sha at offset off, with the semantics of
// os.File.ReadAt: n < len(p) only with an error, io.EOF (unwrapped) at the end of the image.
// An unknown sha returns ErrNotFound. It is safe for concurrent use.
func (s *Store) ReadAt(sha string, p []byte, off int64) (int, error) {
	h, err := s.acquire(sha)
	if err != nil {
		return 0, fmt.Errorf("read artifact: %w", err)
	}
	defer s.files.release(h)
	n, err := h.f.ReadAt(p, off)
	if err != nil && err != io.EOF {
		return n, fmt.Errorf("read artifact %s: %w", h.sha, err)
	}
	return n, err
}

// Size returns the size in bytes of the artifact sha, or ErrNotFound.
func (s *Store) Size(sha string) (int64, error) {
	h, err := s.acquire(sha)
	if err != nil {
		return 0, fmt.Errorf("artifact size: %w", err)
	}
	defer s.files.release(h)
	return h.size, nil
}

// Path returns the file name of the artifact sha, or ErrNotFound. The file must be treated as
// read-only; it may be removed by Delete.
func (s *Store) Path(sha string) (string, error) {
	norm, ok := validSHA(sha)
	if !ok {
		return "", fmt.Errorf("artifact path: %w: %q is not a hex sha256", ErrNotFound, sha)
	}
	if s.isClosed() {
		return "", fmt.Errorf("artifact path: %w", ErrClosed)
	}
	p := s.artifactPath(norm)
	fi, err := os.Stat(p)
	switch {
	case errors.Is(err, fs.ErrNotExist):
		return "", fmt.Errorf("artifact path %s: %w", norm, ErrNotFound)
	case err != nil:
		return "", fmt.Errorf("artifact path: %w", err)
	case !fi.Mode().IsRegular():
		return "", fmt.Errorf("artifact path %s: not a regular file", norm)
	}
	return p, nil
}

func (s *Store) acquire(sha string) (*handle, error) {
	norm, ok := validSHA(sha)
	if !ok {
		return nil, fmt.Errorf("%w: %q is not a hex sha256", ErrNotFound, sha)
	}
	return s.files.acquire(norm, s.artifactPath(norm))
}
