package delta

import (
	"bytes"
	"encoding/binary"
	"errors"
	"fmt"

	rawdiff "github.com/icedream/go-bsdiff/raw/diff"
)

// Make returns a patch that turns old into new. It runs bsdiff through cgo, whose suffix array
// alone takes 16 bytes per byte of old: budget about 20 times the size of the images. It
// applies the patch before returning it.
func Make(old, new []byte) ([]byte, error) {
	ctrl, diff, extra, err := bsdiff(old, new)
	if err != nil {
		return nil, err
	}
	h := Header{Format: formatV1, OldSize: int64(len(old)), NewSize: int64(len(new))}
	var streams [3][]byte
	for i, s := range []struct {
		h    *Stream
		data []byte
	}{{&h.Ctrl, ctrl}, {&h.Diff, encodeRLE0(diff)}, {&h.Extra, extra}} {
		if streams[i], err = compress(s.data); err != nil {
			return nil, fmt.Errorf("compress delta: %w", err)
		}
		*s.h = Stream{Len: int64(len(streams[i])), Decoded: int64(len(s.data))}
	}
	patch := h.marshal()
	for _, s := range streams {
		patch = append(patch, s...)
	}

	// The encoders are C and third-party Go; a patch that a device would refuse or apply
	// wrongly must fail here, on the server, not in the field.
	got, err := Apply(old, bytes.NewReader(patch), int64(len(new)))
	if err != nil {
		return nil, fmt.Errorf("delta: made a patch that does not apply: %v", err)
	}
	if !bytes.Equal(got, new) {
		return nil, errors.New("delta: made a patch that does not reproduce the target")
	}
	return patch, nil
}

// bsdiff returns the decoded control, diff (expanded) and extra streams.
func bsdiff(old, new []byte) (ctrl, diff, extra []byte, err error) {
	switch {
	case len(new) == 0:
		return nil, nil, nil, nil
	case len(old) == 0:
		// The cgo wrapper takes &old[0]; with no base everything is extra bytes anyway.
		return triple(nil, 0, uint64(len(new)), 0), nil, new, nil
	}
	var raw bytes.Buffer
	raw.Grow(len(new) + len(new)/16)
	if err := rawdiff.Diff(bytes.NewReader(old), bytes.NewReader(new), &raw); err != nil {
		return nil, nil, nil, fmt.Errorf("bsdiff: %w", err)
	}
	return split(raw.Bytes(), len(new))
}

// split turns Endsley's single stream (per step: three 8-byte sign-magnitude little-endian
// integers, then add diff bytes, then copy extra bytes) into the three streams of the format.
func split(raw []byte, newSize int) (ctrl, diff, extra []byte, err error) {
	diff = make([]byte, 0, newSize)
	extra = make([]byte, 0, newSize/8)
	for len(raw) > 0 {
		if len(raw) < 24 {
			return nil, nil, nil, errors.New("bsdiff: truncated control triple")
		}
		add, cp, seek := offtin(raw[0:8]), offtin(raw[8:16]), offtin(raw[16:24])
		raw = raw[24:]
		if add < 0 || cp < 0 || add > int64(len(raw)) || cp > int64(len(raw))-add {
			return nil, nil, nil, fmt.Errorf("bsdiff: bad control triple (%d, %d, %d)", add, cp, seek)
		}
		ctrl = triple(ctrl, uint64(add), uint64(cp), seek)
		diff = append(diff, raw[:add]...)
		extra = append(extra, raw[add:add+cp]...)
		raw = raw[add+cp:]
	}
	return ctrl, diff, extra, nil
}

func triple(b []byte, add, cp uint64, seek int64) []byte {
	b = binary.AppendUvarint(b, add)
	b = binary.AppendUvarint(b, cp)
	return binary.AppendUvarint(b, uint64(seek<<1)^uint64(seek>>63))
}

// offtin reads bsdiff's sign-magnitude integer.
func offtin(b []byte) int64 {
	v := int64(binary.LittleEndian.Uint64(b) &^ (1 << 63))
	if b[7]&0x80 != 0 {
		return -v
	}
	return v
}
