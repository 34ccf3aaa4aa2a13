package delta

import (
	"bufio"
	"bytes"
	"encoding/binary"
	"errors"
	"fmt"
	"io"
	"math"
)

// Apply rebuilds the target image from old and a patch, reading the patch to its end. It
// refuses, before allocating the target, a patch for a base of another size (ErrWrongBase) and
// one whose target exceeds maxTarget (ErrTooLarge); the caller takes maxTarget from the signed
// manifest. Anything malformed is ErrBadPatch. Memory: the compressed patch, the target, and
// three LZMA2 dictionaries of at most 64 KiB.
//
// A patch that applies cleanly can still be the wrong one: check the result's sha256 against
// the manifest.
func Apply(old []byte, patch io.Reader, maxTarget int64) ([]byte, error) {
	h, err := ReadHeader(patch)
	if err != nil {
		return nil, err
	}
	if h.OldSize != int64(len(old)) {
		return nil, fmt.Errorf("%w: patch base is %d bytes, have %d", ErrWrongBase, h.OldSize, len(old))
	}
	if h.NewSize > maxTarget || h.NewSize > math.MaxInt {
		return nil, fmt.Errorf("%w: patch target is %d bytes, limit %d", ErrTooLarge, h.NewSize, maxTarget)
	}
	var comp [3][]byte
	for i, s := range []Stream{h.Ctrl, h.Diff, h.Extra} {
		if comp[i], err = readN(patch, s.Len); err != nil {
			return nil, err
		}
	}
	var one [1]byte
	switch n, err := io.ReadFull(patch, one[:]); {
	case n > 0:
		return nil, fmt.Errorf("%w: data after the last stream", ErrBadPatch)
	case !errors.Is(err, io.EOF):
		return nil, fmt.Errorf("read delta patch: %w", err)
	}
	return apply(old, h, comp)
}

// readN reads n bytes into a buffer that grows as they arrive, so a header that lies about a
// length costs only the bytes actually sent.
func readN(r io.Reader, n int64) ([]byte, error) {
	var buf bytes.Buffer
	buf.Grow(int(min(n, 64<<10)))
	got, err := buf.ReadFrom(io.LimitReader(r, n))
	if err != nil {
		return nil, fmt.Errorf("read delta patch: %w", err)
	}
	if got < n {
		return nil, fmt.Errorf("%w: truncated: %w", ErrBadPatch, io.ErrUnexpectedEOF)
	}
	return buf.Bytes(), nil
}

var streamNames = [3]string{"control", "diff", "extra"}

func apply(old []byte, h Header, comp [3][]byte) ([]byte, error) {
	var sections [3]*section
	var err error
	for i, s := range []Stream{h.Ctrl, h.Diff, h.Extra} {
		if sections[i], err = newSection(comp[i], s.Decoded); err != nil {
			return nil, bad(streamNames[i]+" stream", err)
		}
	}
	ctrlS, diffS, extra := sections[0], sections[1], sections[2]
	ctrl := bufio.NewReaderSize(ctrlS, 4096)
	diff := &rle0Reader{r: bufio.NewReaderSize(diffS, 4096), max: uint64(h.NewSize)}

	out := make([]byte, h.NewSize)
	size, oldSize := h.NewSize, int64(len(old))
	// Invariants: 0 <= newPos <= size and 0 <= oldPos <= oldSize, so the differences below
	// never overflow and every slice expression is in range.
	var newPos, oldPos int64
	for newPos < size {
		var t [3]uint64
		for i := range t {
			if t[i], err = binary.ReadUvarint(ctrl); err != nil {
				return nil, bad(fmt.Sprintf("control triple at output %d", newPos), err)
			}
		}
		add, cp := t[0], t[1]
		seek := int64(t[2]>>1) ^ -int64(t[2]&1)

		if add > uint64(size-newPos) {
			return nil, fmt.Errorf("%w: add of %d at output %d runs past the %d-byte target", ErrBadPatch, add, newPos, size)
		}
		if add > uint64(oldSize-oldPos) {
			return nil, fmt.Errorf("%w: add of %d at base %d runs past the %d-byte base", ErrBadPatch, add, oldPos, oldSize)
		}
		dst := out[newPos : newPos+int64(add)]
		if _, err := io.ReadFull(diff, dst); err != nil {
			return nil, bad("diff stream", err)
		}
		for i, b := range old[oldPos : oldPos+int64(add)] {
			dst[i] += b
		}
		newPos += int64(add)
		oldPos += int64(add)

		if cp > uint64(size-newPos) {
			return nil, fmt.Errorf("%w: copy of %d at output %d runs past the %d-byte target", ErrBadPatch, cp, newPos, size)
		}
		if _, err := io.ReadFull(extra, out[newPos:newPos+int64(cp)]); err != nil {
			return nil, bad("extra stream", err)
		}
		newPos += int64(cp)

		if seek < -oldPos || seek > oldSize-oldPos {
			return nil, fmt.Errorf("%w: seek of %d from base %d leaves the %d-byte base", ErrBadPatch, seek, oldPos, oldSize)
		}
		oldPos += seek
	}
	if ctrl.Buffered() != 0 {
		return nil, fmt.Errorf("%w: control stream has triples after the target is complete", ErrBadPatch)
	}
	if !diff.done() {
		return nil, fmt.Errorf("%w: diff stream has bytes after the target is complete", ErrBadPatch)
	}
	for i, s := range sections {
		if err := s.finish(); err != nil {
			return nil, bad(streamNames[i]+" stream", err)
		}
	}
	return out, nil
}
