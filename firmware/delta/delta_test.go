package delta

import (
	"bufio"
	"bytes"
	"crypto/sha256"
	"encoding/binary"
	"encoding/hex"
	"errors"
	"flag"
	"io"
	"math/rand/v2"
	"os"
	"path/filepath"
	"runtime"
	"strings"
	"testing"
)

var update = flag.Bool("update", false, "rewrite testdata/small.patch from testdata/base.bin and target.bin")

var imageDir = filepath.Join("..", "..", "..", "shared", "firmware")

// image returns a real firmware image from the shared directory.
func image(t testing.TB, name string) []byte {
	t.Helper()
	b, err := os.ReadFile(filepath.Join(imageDir, name))
	if errors.Is(err, os.ErrNotExist) {
		t.Skipf("real firmware image %s not found in %s", name, imageDir)
	}
	if err != nil {
		t.Fatal(err)
	}
	return b
}

// sums returns the hex sha256 of each shared image, from SHA256SUMS.
func sums(t *testing.T) map[string]string {
	t.Helper()
	b, err := os.ReadFile(filepath.Join(imageDir, "SHA256SUMS"))
	if errors.Is(err, os.ErrNotExist) {
		t.Skipf("SHA256SUMS not found in %s", imageDir)
	}
	if err != nil {
		t.Fatal(err)
	}
	m := map[string]string{}
	for _, line := range strings.Split(strings.TrimSpace(string(b)), "\n") {
		f := strings.Fields(line)
		if len(f) == 2 {
			m[f[1]] = f[0]
		}
	}
	return m
}

func testdata(t testing.TB, name string) []byte {
	t.Helper()
	b, err := os.ReadFile(filepath.Join("testdata", name))
	if err != nil {
		t.Fatal(err)
	}
	return b
}

// smallPair is the first 16 KiB of two real primehub releases, and the golden patch between
// them. The patch is part of the format's contract: a later decoder must still apply it.
func smallPair(t testing.TB) (base, target, patch []byte) {
	t.Helper()
	base, target = testdata(t, "base.bin"), testdata(t, "target.bin")
	if *update {
		p, err := Make(base, target)
		if err != nil {
			t.Fatal(err)
		}
		if err := os.WriteFile(filepath.Join("testdata", "small.patch"), p, 0o644); err != nil {
			t.Fatal(err)
		}
	}
	return base, target, testdata(t, "small.patch")
}

// TestRoundTripRealFirmware is the target of the format: on real consecutive releases the
// patch rebuilds the exact image and is no larger than Debian's bsdiff 4.3 patch.
func TestRoundTripRealFirmware(t *testing.T) {
	want := sums(t)
	for _, tc := range []struct {
		old, new string
		debian   int // Debian bsdiff 4.3 patch size, from shared/firmware/SOURCES.md
		slow     bool
	}{
		{"pybricks-primehub-7.27.0.bin", "pybricks-primehub-7.28.0.bin", 22851, false},
		{"pybricks-primehub-7.22.0.bin", "pybricks-primehub-7.28.0.bin", 146973, true},
		{"upy-esp8266-v1.9.4.bin", "upy-esp8266-v1.10.bin", 75985, true},
	} {
		t.Run(tc.old+"->"+tc.new, func(t *testing.T) {
			if tc.slow && testing.Short() {
				t.Skip("slow cgo diff; skipped with -short")
			}
			old, new := image(t, tc.old), image(t, tc.new)
			patch, err := Make(old, new)
			if err != nil {
				t.Fatalf("Make: %v", err)
			}
			if len(patch) > tc.debian {
				t.Errorf("patch is %d bytes, want at most Debian bsdiff's %d", len(patch), tc.debian)
			}
			t.Logf("patch %d bytes, %.1f%% of Debian bsdiff", len(patch), 100*float64(len(patch))/float64(tc.debian))
			got, err := Apply(old, bytes.NewReader(patch), int64(len(new)))
			if err != nil {
				t.Fatalf("Apply: %v", err)
			}
			sum := sha256.Sum256(got)
			if hex.EncodeToString(sum[:]) != want[tc.new] {
				t.Errorf("sha256 of output = %x, want %s", sum, want[tc.new])
			}
		})
	}
}

func TestGoldenPatch(t *testing.T) {
	base, target, patch := smallPair(t)
	got, err := Apply(base, bytes.NewReader(patch), int64(len(target)))
	if err != nil {
		t.Fatalf("Apply golden patch: %v", err)
	}
	if !bytes.Equal(got, target) {
		t.Fatalf("golden patch output differs from testdata/target.bin")
	}
	h, err := ReadHeader(bytes.NewReader(patch))
	if err != nil {
		t.Fatalf("ReadHeader: %v", err)
	}
	if h.Format != formatV1 || h.OldSize != int64(len(base)) || h.NewSize != int64(len(target)) {
		t.Errorf("header = %+v, want format 1, sizes %d -> %d", h, len(base), len(target))
	}
	if h.Len() != int64(len(patch)) {
		t.Errorf("header Len() = %d, want the patch length %d", h.Len(), len(patch))
	}
	if !bytes.HasPrefix(patch, []byte("FOTADLT1\x01")) {
		t.Errorf("patch starts with %q, want magic and format byte", patch[:9])
	}
}

func TestMakeEdgeCases(t *testing.T) {
	rnd := rand.New(rand.NewPCG(1, 2))
	random := func(n int) []byte {
		b := make([]byte, n)
		for i := range b {
			b[i] = byte(rnd.Uint32())
		}
		return b
	}
	base := testdata(t, "base.bin")
	for _, tc := range []struct {
		name     string
		old, new []byte
	}{
		{"both empty", nil, nil},
		{"empty base", nil, base[:1000]},
		{"empty target", base[:1000], nil},
		{"identical", base, base},
		{"one byte", []byte{1}, []byte{2}},
		{"incompressible target", base, random(200 << 10)},
		{"incompressible both", random(100 << 10), random(100 << 10)},
	} {
		t.Run(tc.name, func(t *testing.T) {
			patch, err := Make(tc.old, tc.new)
			if err != nil {
				t.Fatalf("Make: %v", err)
			}
			got, err := Apply(tc.old, bytes.NewReader(patch), int64(len(tc.new)))
			if err != nil {
				t.Fatalf("Apply: %v", err)
			}
			if !bytes.Equal(got, tc.new) {
				t.Fatalf("output of %d bytes differs from the %d-byte target", len(got), len(tc.new))
			}
		})
	}
}

func TestApplyRefusesBaseAndSize(t *testing.T) {
	base, target, patch := smallPair(t)
	for _, tc := range []struct {
		name      string
		old       []byte
		maxTarget int64
		want      error
	}{
		{"shorter base", base[:len(base)-1], 1 << 20, ErrWrongBase},
		{"longer base", append(append([]byte{}, base...), 0), 1 << 20, ErrWrongBase},
		{"no base", nil, 1 << 20, ErrWrongBase},
		{"limit one below target", base, int64(len(target)) - 1, ErrTooLarge},
		{"zero limit", base, 0, ErrTooLarge},
		{"limit equals target", base, int64(len(target)), nil},
	} {
		t.Run(tc.name, func(t *testing.T) {
			_, err := Apply(tc.old, bytes.NewReader(patch), tc.maxTarget)
			if !errors.Is(err, tc.want) {
				t.Fatalf("Apply error = %v, want %v", err, tc.want)
			}
		})
	}
}

// hugeHeader claims a 1 TiB target whose streams would follow; none do.
func hugeHeader(oldSize int64) []byte {
	const tib = 1 << 40
	return Header{Format: formatV1, OldSize: oldSize, NewSize: tib,
		Ctrl: Stream{Len: 1 << 20, Decoded: 1 << 20}, Diff: Stream{Len: 1 << 30, Decoded: tib},
		Extra: Stream{Len: 1 << 30, Decoded: 1 << 30}}.marshal()
}

func TestApplyHugeTargetDoesNotAllocate(t *testing.T) {
	base := testdata(t, "base.bin")
	patch := hugeHeader(int64(len(base)))
	for _, tc := range []struct {
		name      string
		maxTarget int64
		want      error
	}{
		{"over the limit", 1 << 30, ErrTooLarge},
		// Within the caller's limit, the output is allocated only once the streams are in:
		// here they never arrive.
		{"within the limit, streams missing", 1 << 41, ErrBadPatch},
	} {
		t.Run(tc.name, func(t *testing.T) {
			var err error
			bytesPerRun := allocated(func() {
				_, err = Apply(base, bytes.NewReader(patch), tc.maxTarget)
			})
			if !errors.Is(err, tc.want) {
				t.Fatalf("Apply error = %v, want %v", err, tc.want)
			}
			if bytesPerRun > 256<<10 {
				t.Errorf("Apply allocated %d bytes for a refused 1 TiB patch, want under 256 KiB", bytesPerRun)
			}
		})
	}
}

// allocated returns the bytes f allocates on the heap, averaged over a few runs.
func allocated(f func()) uint64 {
	const runs = 5
	var before, after runtime.MemStats
	runtime.GC()
	runtime.ReadMemStats(&before)
	for range runs {
		f()
	}
	runtime.ReadMemStats(&after)
	return (after.TotalAlloc - before.TotalAlloc) / runs
}

func triples(ts ...int64) []byte {
	var b []byte
	for i := 0; i+2 < len(ts); i += 3 {
		b = triple(b, uint64(ts[i]), uint64(ts[i+1]), ts[i+2])
	}
	return b
}

func TestApplyHostilePatches(t *testing.T) {
	old := []byte("0123456789abcdef") // 16 bytes
	zeros := func(n int) []byte { return encodeRLE0(make([]byte, n)) }
	valid := patchOf(t, old, 12, triples(8, 4, -2), zeros(8), []byte("WXYZ"))
	if got, err := Apply(old, bytes.NewReader(valid), 100); err != nil || string(got) != "01234567WXYZ" {
		t.Fatalf("hand-built patch: Apply = %q, %v; want %q, nil", got, err, "01234567WXYZ")
	}
	_, _, real := smallPair(t)
	withByte := func(b []byte, i int, v byte) []byte {
		c := append([]byte{}, b...)
		c[i] = v
		return c
	}
	hdr := func(field int, v uint64) []byte {
		c := append([]byte{}, valid...)
		binary.BigEndian.PutUint64(c[9+8*field:], v)
		return c
	}
	for _, tc := range []struct {
		name  string
		patch []byte
		want  string // in the error message, to show it failed for the right reason
	}{
		{"empty", nil, "header: unexpected EOF"},
		{"header only", valid[:headerSize], "truncated"},
		{"half a header", valid[:headerSize/2], "header: unexpected EOF"},
		{"last byte missing", valid[:len(valid)-1], "truncated"},
		{"trailing byte", append(append([]byte{}, valid...), 0), "data after the last stream"},
		{"bad magic", withByte(valid, 0, 'X'), "not a fota delta patch"},
		{"unknown format", withByte(valid, 8, 2), "unsupported format 0x02"},
		{"size over int64", hdr(1, 1<<63), "target size 9223372036854775808 out of range"},
		{"extra decodes to more than the target", hdr(7, 13), "extra stream decodes to 13 bytes"},
		{"diff decodes past its bound", hdr(5, 2*12+17), "diff stream decodes to 41 bytes"},
		{"control decodes past its bound", hdr(3, 30*12+31), "control stream decodes to 391 bytes"},
		{"compressed length past its bound", hdr(2, 1<<40), "too long for 3 decoded bytes"},
		{"declared decoded length longer than stream", hdr(5, 20), "diff stream: lzma2 chunks hold 2 bytes, declared 20"},
		{"declared decoded length shorter than stream", hdr(7, 3), "extra stream: lzma2 chunks hold more than the declared 3 bytes"},
		{"garbage", bytes.Repeat([]byte{0xA5}, 500), "not a fota delta patch"},
		{"garbage after a valid header", append(valid[:headerSize:headerSize], bytes.Repeat([]byte{0xFF}, len(valid)-headerSize)...), "control stream: lzma2 properties byte 0xff out of range"},
		{"add past target", patchOf(t, old, 12, triples(13, 0, 0), zeros(13), nil), "add of 13 at output 0 runs past the 12-byte target"},
		{"add past base", patchOf(t, old, 20, triples(17, 3, 0), zeros(17), []byte("abc")), "add of 17 at base 0 runs past the 16-byte base"},
		{"add past base after seek", patchOf(t, old, 12, triples(4, 0, 10, 8, 0, 0), zeros(12), nil), "add of 8 at base 14 runs past"},
		{"copy past target", patchOf(t, old, 12, triples(8, 5, 0), zeros(8), []byte("WXYZV")), "copy of 5 at output 8 runs past"},
		{"seek before base", patchOf(t, old, 12, triples(8, 0, -9, 4, 0, 0), zeros(12), nil), "seek of -9 from base 8 leaves"},
		{"seek past base", patchOf(t, old, 12, triples(8, 0, 9, 4, 0, 0), zeros(12), nil), "seek of 9 from base 8 leaves"},
		{"seek of min int64", patchOf(t, old, 12, triples(8, 0, -1<<63, 4, 0, 0), zeros(12), nil), "seek of -9223372036854775808"},
		{"huge add", patchOf(t, old, 12, triples(1<<62, 0, 0), zeros(8), nil), "add of 4611686018427387904"},
		{"control varint overflow", patchOf(t, old, 12, bytes.Repeat([]byte{0xFF}, 11), zeros(8), []byte("WXYZ")), "varint overflows"},
		{"control ends mid-triple", patchOf(t, old, 12, triples(8, 4, -2)[:2], zeros(8), []byte("WXYZ")), "control triple at output 0: unexpected EOF"},
		{"control ends before target", patchOf(t, old, 12, triples(8, 0, 0), zeros(8), []byte("WXYZ")), "control triple at output 8: unexpected EOF"},
		{"control left over", patchOf(t, old, 12, triples(8, 4, 0, 0, 0, 0), zeros(8), []byte("WXYZ")), "triples after the target is complete"},
		{"diff short", patchOf(t, old, 12, triples(8, 4, 0), zeros(7), []byte("WXYZ")), "diff stream: unexpected EOF"},
		{"diff left over", patchOf(t, old, 12, triples(8, 4, 0), zeros(9), []byte("WXYZ")), "diff stream has bytes after the target"},
		{"diff literal run short", patchOf(t, old, 12, triples(8, 4, 0), []byte{0, 8, 1, 2}, []byte("WXYZ")), "diff stream: unexpected EOF"},
		{"diff run longer than target", patchOf(t, old, 12, triples(8, 4, 0), binary.AppendUvarint(binary.AppendUvarint(nil, 1<<40), 0), []byte("WXYZ")), "run longer than the target"},
		{"extra short", patchOf(t, old, 12, triples(8, 4, 0), zeros(8), []byte("WXY")), "extra stream: unexpected EOF"},
		{"extra left over", patchOf(t, old, 11, triples(8, 3, 0), zeros(8), []byte("WXYZ")), "extra stream: 1 of its declared bytes unused"},
		{"lzma2 lc+lp over 4", withStream(t, valid, 2, []byte{0xE0, 0, 3, 0, 4, 8*9 + 8, 0, 0, 0, 0, 0, 0}), "extra stream: lzma2 properties byte 0x50 out of range"},
		{"lzma2 bytes after end marker", withStream(t, valid, 2, append(stored([]byte("WXYZ")), 0)), "bytes after the lzma2 end marker"},
		{"lzma2 chunk without end marker", withStream(t, valid, 2, stored([]byte("WXYZ"))[:7]), "extra stream: unexpected EOF"},
		{"lzma2 invalid chunk type", withStream(t, valid, 2, []byte{0x03, 0, 0}), "invalid lzma2 chunk control byte 0x03"},
		{"real patch, control stream swapped for extra", swapStreams(t, real), ""},
	} {
		t.Run(tc.name, func(t *testing.T) {
			base := old
			if h, err := ReadHeader(bytes.NewReader(tc.patch)); err == nil && h.OldSize != 16 {
				base, _, _ = smallPair(t)
			}
			got, err := Apply(base, bytes.NewReader(tc.patch), 1<<20)
			if !errors.Is(err, ErrBadPatch) {
				t.Fatalf("Apply = %d bytes, error %v; want ErrBadPatch", len(got), err)
			}
			if !strings.Contains(err.Error(), tc.want) {
				t.Errorf("Apply error = %q, want it to mention %q", err, tc.want)
			}
		})
	}
}

// withStream replaces stream i of a patch with compressed bytes, header included.
func withStream(t *testing.T, patch []byte, i int, compressed []byte) []byte {
	t.Helper()
	h, err := ReadHeader(bytes.NewReader(patch))
	if err != nil {
		t.Fatal(err)
	}
	streams := [][]byte{}
	body := patch[headerSize:]
	for _, s := range []Stream{h.Ctrl, h.Diff, h.Extra} {
		streams = append(streams, body[:s.Len])
		body = body[s.Len:]
	}
	streams[i] = compressed
	hs := []*Stream{&h.Ctrl, &h.Diff, &h.Extra}
	hs[i].Len = int64(len(compressed))
	out := h.marshal()
	for _, s := range streams {
		out = append(out, s...)
	}
	return out
}

// swapStreams exchanges the control and extra streams of a patch, header included.
func swapStreams(t *testing.T, patch []byte) []byte {
	t.Helper()
	h, err := ReadHeader(bytes.NewReader(patch))
	if err != nil {
		t.Fatal(err)
	}
	body := patch[headerSize:]
	ctrl, diff, extra := body[:h.Ctrl.Len], body[h.Ctrl.Len:h.Ctrl.Len+h.Diff.Len], body[h.Ctrl.Len+h.Diff.Len:]
	h.Ctrl, h.Extra = h.Extra, h.Ctrl
	out := h.marshal()
	for _, s := range [][]byte{extra, diff, ctrl} {
		out = append(out, s...)
	}
	return out
}

// TestApplyEveryBitFlip flips each bit of the golden patch in turn: the result must be one of
// the sentinel errors or an output of the declared size, and never a panic.
func TestApplyEveryBitFlip(t *testing.T) {
	base, target, patch := smallPair(t)
	if testing.Short() {
		patch = patch[:min(len(patch), 512)]
	}
	failed, applied := 0, 0
	for i := range len(patch) * 8 {
		p := append([]byte{}, patch...)
		p[i/8] ^= 1 << (i % 8)
		got, err := Apply(base, bytes.NewReader(p), 1<<20)
		switch {
		case err == nil:
			applied++
			if len(got) != len(target) {
				t.Fatalf("bit %d: applied to %d bytes, want the declared %d", i, len(got), len(target))
			}
		case errors.Is(err, ErrBadPatch), errors.Is(err, ErrWrongBase), errors.Is(err, ErrTooLarge):
			failed++
		default:
			t.Fatalf("bit %d: error %v is none of the sentinel errors", i, err)
		}
	}
	t.Logf("%d flips refused, %d applied (to a wrong image the sha256 check catches)", failed, applied)
}

// TestRLE0 checks the diff encoding on its own, across run lengths that need multi-byte
// varints and reads that split runs.
func TestRLE0(t *testing.T) {
	rnd := rand.New(rand.NewPCG(3, 4))
	for _, tc := range []struct {
		name string
		data []byte
	}{
		{"empty", nil},
		{"zeros", make([]byte, 1000)},
		{"no zeros", bytes.Repeat([]byte{7}, 300)},
		{"leading literal", []byte{1, 0, 0, 2}},
		{"trailing zeros", []byte{0, 3, 0, 0, 0}},
		{"sparse", func() []byte {
			b := make([]byte, 100000)
			for range 500 {
				b[rnd.IntN(len(b))] = byte(rnd.IntN(255) + 1)
			}
			return b
		}()},
	} {
		t.Run(tc.name, func(t *testing.T) {
			enc := encodeRLE0(tc.data)
			if len(enc) > len(tc.data)*2+16 {
				t.Errorf("encoded %d bytes to %d, more than the header bound", len(tc.data), len(enc))
			}
			z := &rle0Reader{r: bufio.NewReader(bytes.NewReader(enc)), max: uint64(len(tc.data))}
			got := make([]byte, len(tc.data))
			for off := 0; off < len(got); {
				n := min(len(got)-off, 1+rnd.IntN(97))
				if _, err := io.ReadFull(z, got[off:off+n]); err != nil {
					t.Fatalf("read at %d: %v", off, err)
				}
				off += n
			}
			if !bytes.Equal(got, tc.data) {
				t.Errorf("decoded data differs from the input")
			}
			if !z.done() {
				t.Errorf("reader not done after the whole input")
			}
		})
	}
}

// TestApplyMemory holds Apply to its documented budget on a real pair: the target, the
// compressed patch, and small fixed decoder state, however large the base.
func TestApplyMemory(t *testing.T) {
	old, new := image(t, "pybricks-primehub-7.27.0.bin"), image(t, "pybricks-primehub-7.28.0.bin")
	patch, err := Make(old, new)
	if err != nil {
		t.Fatal(err)
	}
	var applyErr error
	got := allocated(func() {
		_, applyErr = Apply(old, bytes.NewReader(patch), int64(len(new)))
	})
	if applyErr != nil {
		t.Fatal(applyErr)
	}
	budget := uint64(len(new)) + 2*uint64(len(patch)) + 512<<10
	t.Logf("Apply allocated %d bytes: target %d, patch %d", got, len(new), len(patch))
	if got > budget {
		t.Errorf("Apply allocated %d bytes, want at most %d (target + 2x patch + 512 KiB)", got, budget)
	}
}
