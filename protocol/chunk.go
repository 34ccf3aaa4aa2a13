package protocol

import (
	"encoding/binary"
	"errors"
	"fmt"
	"hash/crc32"
)

// Chunk frame layout, all integers big-endian:
//
//	offset size field
//	0      1    frame version, FrameVersion
//	1      1    kind: FrameData or FrameError
//	2      2    reserved, zero
//	4      4    transfer id, from the Offer
//	8      4    offset of the payload in the transfer
//	12     4    payload length
//	16     4    CRC-32C (Castagnoli) of the payload
//	20     ...  payload: image bytes, or for FrameError an ASCII error code
const (
	FrameVersion    = 1
	FrameHeaderSize = 20

	FrameData  = 0
	FrameError = 1
)

// Chunk size limits. A device may ask for any length in [MinChunkSize, the Offer's ChunkSize];
// the Offer's ChunkSize is at most MaxChunkSize.
const (
	MinChunkSize = 1 << 10
	MaxChunkSize = 64 << 10
	// Measured with bench/transfer on loopback: 64 KiB chunks with 8 outstanding give the most
	// throughput per device (about 0.4 of an HTTPS download; 16 KiB gives 0.3, 1 KiB 0.05).
	// A device with little memory asks for less: requests may be any length up to the offer's
	// chunk_size, and max_chunk in its status lowers that.
	DefaultChunkSize = 64 << 10
	DefaultWindow    = 8
)

// Error codes carried in FrameError payloads.
const (
	ErrCodeRange    = "range"    // offset or length outside the transfer
	ErrCodeNoJob    = "no-job"   // the job is unknown or no longer offered to this device
	ErrCodeBusy     = "busy"     // server over its in-flight limit; ask again later
	ErrCodeInternal = "internal" // the server could not read the artifact
)

// ErrBadFrame is returned (wrapped) by ParseFrame.
var ErrBadFrame = errors.New("invalid chunk frame")

var castagnoli = crc32.MakeTable(crc32.Castagnoli)

// Frame is one decoded chunk frame. Payload aliases the input of ParseFrame.
type Frame struct {
	Kind     byte
	Transfer uint32
	Offset   uint32
	Payload  []byte
}

// Checksum returns the CRC-32C used in chunk frames.
func Checksum(p []byte) uint32 { return crc32.Checksum(p, castagnoli) }

// AppendFrame appends the encoded frame to dst and returns the extended slice.
func AppendFrame(dst []byte, kind byte, transfer, offset uint32, payload []byte) []byte {
	var h [FrameHeaderSize]byte
	h[0] = FrameVersion
	h[1] = kind
	binary.BigEndian.PutUint32(h[4:], transfer)
	binary.BigEndian.PutUint32(h[8:], offset)
	binary.BigEndian.PutUint32(h[12:], uint32(len(payload)))
	binary.BigEndian.PutUint32(h[16:], Checksum(payload))
	dst = append(dst, h[:]...)
	return append(dst, payload...)
}

// ParseFrame decodes and checks a chunk frame: version, kind, length and checksum.
func ParseFrame(b []byte) (Frame, error) {
	if len(b) < FrameHeaderSize {
		return Frame{}, fmt.Errorf("%w: %d bytes, header is %d", ErrBadFrame, len(b), FrameHeaderSize)
	}
	if b[0] != FrameVersion {
		return Frame{}, fmt.Errorf("%w: version %d, want %d", ErrBadFrame, b[0], FrameVersion)
	}
	if b[1] != FrameData && b[1] != FrameError {
		return Frame{}, fmt.Errorf("%w: kind %d", ErrBadFrame, b[1])
	}
	n := binary.BigEndian.Uint32(b[12:])
	if uint64(n) != uint64(len(b)-FrameHeaderSize) {
		return Frame{}, fmt.Errorf("%w: length field %d, payload %d", ErrBadFrame, n, len(b)-FrameHeaderSize)
	}
	payload := b[FrameHeaderSize:]
	if got, want := Checksum(payload), binary.BigEndian.Uint32(b[16:]); got != want {
		return Frame{}, fmt.Errorf("%w: checksum %08x, header says %08x", ErrBadFrame, got, want)
	}
	return Frame{
		Kind:     b[1],
		Transfer: binary.BigEndian.Uint32(b[4:]),
		Offset:   binary.BigEndian.Uint32(b[8:]),
		Payload:  payload,
	}, nil
}
