package delta

import (
	"bytes"
	"encoding/binary"
	"errors"
	"testing"
)

// FuzzApply feeds Apply arbitrary patches against a fixed real base: it must never panic, must
// classify every failure as one of the sentinel errors, and must return exactly the declared
// target size when it succeeds.
func FuzzApply(f *testing.F) {
	base, target, patch := smallPair(f)
	f.Add(patch)
	for _, n := range []int{0, 8, 9, headerSize - 1, headerSize, headerSize + 1, len(patch) / 2, len(patch) - 1} {
		f.Add(patch[:n])
	}
	for field := range 8 {
		for _, v := range []uint64{0, 1, 1 << 40, 1<<63 - 1} {
			p := append([]byte{}, patch...)
			binary.BigEndian.PutUint64(p[9+8*field:], v)
			f.Add(p)
		}
	}
	// Small hand-built patches reach the control loop's checks in few mutations.
	old16 := base[:16]
	for _, p := range [][]byte{
		patchOf(f, old16, 12, triples(8, 4, -2), encodeRLE0(make([]byte, 8)), []byte("WXYZ")),
		patchOf(f, old16, 12, triples(4, 0, 10, 8, 0, 0), encodeRLE0(make([]byte, 12)), nil),
		patchOf(f, old16, 16, triples(16, 0, -16), []byte{0, 16, 1, 2, 3, 4, 5, 6, 7, 8, 9, 10, 11, 12, 13, 14, 15, 16}, nil),
	} {
		f.Add(p)
	}
	f.Fuzz(func(t *testing.T, patch []byte) {
		old := base
		if h, err := ReadHeader(bytes.NewReader(patch)); err == nil && h.OldSize == 16 {
			old = base[:16]
		}
		got, err := Apply(old, bytes.NewReader(patch), int64(len(target))*4)
		if err != nil {
			if !errors.Is(err, ErrBadPatch) && !errors.Is(err, ErrWrongBase) && !errors.Is(err, ErrTooLarge) {
				t.Fatalf("error %v is none of the sentinel errors", err)
			}
			return
		}
		h, err := ReadHeader(bytes.NewReader(patch))
		if err != nil {
			t.Fatalf("Apply accepted a patch whose header ReadHeader refuses: %v", err)
		}
		if int64(len(got)) != h.NewSize {
			t.Fatalf("Apply returned %d bytes, header says %d", len(got), h.NewSize)
		}
	})
}

// patchOf builds a patch from decoded streams as given, so a test can say exactly what a
// hostile patch contains. It stores them in uncompressed LZMA2 chunks, which is valid and fast.
func patchOf(tb testing.TB, old []byte, newSize int64, ctrl, rle, extra []byte) []byte {
	tb.Helper()
	h := Header{Format: formatV1, OldSize: int64(len(old)), NewSize: newSize}
	var body []byte
	for _, s := range []struct {
		h    *Stream
		data []byte
	}{{&h.Ctrl, ctrl}, {&h.Diff, rle}, {&h.Extra, extra}} {
		c := stored(s.data)
		*s.h = Stream{Len: int64(len(c)), Decoded: int64(len(s.data))}
		body = append(body, c...)
	}
	return append(h.marshal(), body...)
}

// FuzzApplyDecoded fuzzes the streams before compression, which random mutations of LZMA2
// bytes rarely reach: it drives the control loop's bounds checks directly.
func FuzzApplyDecoded(f *testing.F) {
	f.Add(uint16(12), triples(8, 4, -2), encodeRLE0(make([]byte, 8)), []byte("WXYZ"))
	f.Add(uint16(12), triples(4, 0, 10, 8, 0, 0), encodeRLE0(make([]byte, 12)), []byte{})
	f.Add(uint16(16), triples(16, 0, -16), []byte{0, 16, 1, 2, 3, 4, 5, 6, 7, 8, 9, 10, 11, 12, 13, 14, 15, 16}, []byte{})
	f.Add(uint16(40), triples(0, 0, 0, 8, 2, 3, 5, 25, -11), []byte{3, 2, 7, 7, 1, 1, 9}, bytes.Repeat([]byte("x"), 27))
	old := []byte("0123456789abcdef")
	f.Fuzz(func(t *testing.T, newSize uint16, ctrl, rle, extra []byte) {
		patch := patchOf(t, old, int64(newSize), ctrl, rle, extra)
		got, err := Apply(old, bytes.NewReader(patch), 1<<16)
		if err != nil {
			if !errors.Is(err, ErrBadPatch) {
				t.Fatalf("error %v, want ErrBadPatch", err)
			}
			return
		}
		if len(got) != int(newSize) {
			t.Fatalf("Apply returned %d bytes, header says %d", len(got), newSize)
		}
	})
}

// stored encodes b as LZMA2 uncompressed chunks: control byte 1 (dictionary reset) for the
// first, 2 for the rest, the chunk size minus one in two bytes, the bytes; then the end marker.
func stored(b []byte) []byte {
	var out []byte
	ctl := byte(1)
	for len(b) > 0 {
		n := min(len(b), 1<<16)
		out = append(out, ctl, byte((n-1)>>8), byte(n-1))
		out = append(out, b[:n]...)
		b, ctl = b[n:], 2
	}
	return append(out, 0)
}
