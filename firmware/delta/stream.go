package delta

import (
	"bufio"
	"bytes"
	"encoding/binary"
	"errors"
	"fmt"
	"io"

	"github.com/ulikunitz/xz/lzma"
)

// lzmaProps were chosen on the real firmware pairs: the streams are not text, so fewer literal
// context bits and no position bits do slightly better than xz's lc=3 pb=2.
var lzmaProps = lzma.Properties{LC: 2, LP: 0, PB: 0}

// compress encodes b as one raw LZMA2 stream with the dictionary the format prescribes.
func compress(b []byte) (out []byte, err error) {
	// The encoder is third-party code fed with operator files; a panic in it must not take the
	// server down, and Make checks the result by applying it anyway.
	defer func() {
		if r := recover(); r != nil {
			err = fmt.Errorf("lzma2 encoder panicked: %v", r)
		}
	}()
	var buf bytes.Buffer
	props := lzmaProps
	w, err := lzma.Writer2Config{Properties: &props, DictCap: dictSize(int64(len(b)))}.NewWriter2(&buf)
	if err != nil {
		return nil, err
	}
	if _, err := w.Write(b); err != nil {
		return nil, err
	}
	if err := w.Close(); err != nil {
		return nil, err
	}
	return buf.Bytes(), nil
}

// section decodes one compressed stream of a patch, yielding exactly its declared decoded
// length. Its errors are the patch's fault (the compressed bytes are already in memory); the
// caller wraps them as ErrBadPatch.
type section struct {
	src  *bytes.Reader
	lz   *lzma.Reader2
	left int64
}

func newSection(compressed []byte, decoded int64) (*section, error) {
	if err := checkChunks(compressed, decoded); err != nil {
		return nil, err
	}
	s := &section{src: bytes.NewReader(compressed), left: decoded}
	err := guard(func() error {
		var err error
		s.lz, err = lzma.Reader2Config{DictCap: dictSize(decoded)}.NewReader2(s.src)
		return err
	})
	if err != nil {
		return nil, err
	}
	return s, nil
}

func (s *section) Read(p []byte) (int, error) {
	if s.left == 0 {
		return 0, io.EOF
	}
	if int64(len(p)) > s.left {
		p = p[:s.left]
	}
	var n int
	err := guard(func() error {
		var err error
		n, err = s.lz.Read(p)
		return err
	})
	s.left -= int64(n)
	if errors.Is(err, io.EOF) {
		if s.left > 0 {
			return n, fmt.Errorf("ends %d bytes before its declared length", s.left)
		}
		err = nil
	}
	return n, err
}

// finish checks that the stream was used up: every decoded byte read, the LZMA2 end marker
// next, and no compressed bytes after it.
func (s *section) finish() error {
	if s.left != 0 {
		return fmt.Errorf("%d of its declared bytes unused", s.left)
	}
	var one [1]byte
	var n int
	err := guard(func() error {
		var err error
		n, err = s.lz.Read(one[:])
		return err
	})
	if n != 0 || !errors.Is(err, io.EOF) || !s.lz.EOS() || s.src.Len() != 0 {
		return errors.New("longer than declared")
	}
	return nil
}

// checkChunks walks the LZMA2 chunk headers of a stream before it is decoded: the chunks must
// add up to the declared decoded length and end with the end marker exactly at the end of the
// stream, and every properties byte must have lc+lp <= 4 as LZMA2 requires. The Go decoder
// does not check that last rule, and lc=8 lp=4 would cost it 6 MiB of probabilities.
func checkChunks(b []byte, decoded int64) error {
	var total int64
	for len(b) > 0 {
		c := b[0]
		switch {
		case c == 0x00:
			if len(b) != 1 {
				return errors.New("bytes after the lzma2 end marker")
			}
			if total != decoded {
				return fmt.Errorf("lzma2 chunks hold %d bytes, declared %d", total, decoded)
			}
			return nil
		case c == 0x01 || c == 0x02: // stored chunk
			if len(b) < 3 {
				return io.ErrUnexpectedEOF
			}
			n := int(b[1])<<8 | int(b[2]) + 1
			if len(b)-3 < n {
				return io.ErrUnexpectedEOF
			}
			total += int64(n)
			b = b[3+n:]
		case c >= 0x80: // LZMA chunk
			hdr := 5
			if c >= 0xC0 { // new properties follow
				hdr = 6
			}
			if len(b) < hdr {
				return io.ErrUnexpectedEOF
			}
			total += int64(c&0x1F)<<16 | int64(b[1])<<8 | int64(b[2]) + 1
			n := int(b[3])<<8 | int(b[4]) + 1
			if hdr == 6 {
				p := b[5]
				if p >= 9*5*5 || p%9+p/9%5 > 4 {
					return fmt.Errorf("lzma2 properties byte 0x%02x out of range", p)
				}
			}
			if len(b)-hdr < n {
				return io.ErrUnexpectedEOF
			}
			b = b[hdr+n:]
		default:
			return fmt.Errorf("invalid lzma2 chunk control byte 0x%02x", c)
		}
		if total > decoded {
			return fmt.Errorf("lzma2 chunks hold more than the declared %d bytes", decoded)
		}
	}
	return io.ErrUnexpectedEOF // no end marker
}

// guard turns a panic of the third-party decoder into an error: its input is hostile.
func guard(f func() error) (err error) {
	defer func() {
		if r := recover(); r != nil {
			err = fmt.Errorf("lzma2 decoder panicked: %v", r)
		}
	}()
	return f()
}

// encodeRLE0 stores a bsdiff diff stream as records of (zero run, literal run, literals):
// nearly all of it is zeros, which a general-purpose compressor spends more bytes on.
func encodeRLE0(d []byte) []byte {
	out := make([]byte, 0, len(d)/8)
	for i := 0; i < len(d); {
		j := i
		for j < len(d) && d[j] == 0 {
			j++
		}
		k := j
		for k < len(d) && d[k] != 0 {
			k++
		}
		out = binary.AppendUvarint(out, uint64(j-i))
		out = binary.AppendUvarint(out, uint64(k-j))
		out = append(out, d[j:k]...)
		i = k
	}
	return out
}

// rle0Reader expands the RLE0 records of a diff stream.
type rle0Reader struct {
	r           *bufio.Reader
	max         uint64 // no run may be longer than the target
	zeros, lits uint64
}

func (z *rle0Reader) Read(p []byte) (int, error) {
	n := 0
	for n < len(p) {
		switch {
		case z.zeros > 0:
			k := int(min(uint64(len(p)-n), z.zeros))
			clear(p[n : n+k])
			n += k
			z.zeros -= uint64(k)
		case z.lits > 0:
			k := int(min(uint64(len(p)-n), z.lits))
			k, err := io.ReadFull(z.r, p[n:n+k])
			n += k
			z.lits -= uint64(k)
			if err != nil {
				return n, err
			}
		default:
			var err error
			if z.zeros, err = binary.ReadUvarint(z.r); err != nil {
				return n, err
			}
			if z.lits, err = binary.ReadUvarint(z.r); err != nil {
				return n, err
			}
			if z.zeros > z.max || z.lits > z.max {
				return n, fmt.Errorf("%w: diff run longer than the target", ErrBadPatch)
			}
		}
	}
	return n, nil
}

// done reports whether the reader sits between records with nothing buffered.
func (z *rle0Reader) done() bool { return z.zeros == 0 && z.lits == 0 && z.r.Buffered() == 0 }

// bad wraps an error met while decoding as ErrBadPatch: the streams are in memory, so whatever
// goes wrong reading them is the patch's fault. An end of stream here is always an early one.
func bad(what string, err error) error {
	if errors.Is(err, io.EOF) {
		err = io.ErrUnexpectedEOF
	}
	return fmt.Errorf("%w: %s: %w", ErrBadPatch, what, err)
}
