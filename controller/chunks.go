package controller

import (
	"github.com/fota-dev/fota/protocol"
)

// serveChunk answers one chunk request from the device's current transfer. It runs on the
// requesting device's own connection goroutine, so a slow disk read delays only that device;
// frames go out at QoS 0 and a device re-asks what it did not get.
func (c *Controller) serveChunk(device string, req protocol.ChunkRequest) {
	v, ok := c.transfers.Load(device)
	if !ok {
		c.chunkError(device, 0, req.Offset, protocol.ErrCodeNoJob)
		return
	}
	t := v.(*transfer)
	if req.Job != t.job {
		c.chunkError(device, t.id, req.Offset, protocol.ErrCodeNoJob)
		return
	}
	if req.Offset < 0 || req.Offset >= t.size || req.Length <= 0 || req.Length > t.chunkMax {
		c.chunkError(device, t.id, req.Offset, protocol.ErrCodeRange)
		return
	}
	if t.paused != nil && t.paused.Load() {
		// The rollout's window closed with window end "pause": the device asks again later.
		c.chunkError(device, t.id, req.Offset, protocol.ErrCodeBusy)
		return
	}
	n := int(min(int64(req.Length), t.size-req.Offset))
	// A new buffer per frame: the broker queues the payload without copying it.
	frame := make([]byte, protocol.FrameHeaderSize+n)
	payload := frame[protocol.FrameHeaderSize:]
	if _, err := c.opts.Firmware.ReadAt(t.sha, payload, req.Offset); err != nil {
		c.log.Error("read artifact", "sha256", t.sha, "offset", req.Offset, "err", err)
		c.chunkError(device, t.id, req.Offset, protocol.ErrCodeInternal)
		return
	}
	// The payload is already in place; AppendFrame writes the header in front of it.
	frame = protocol.AppendFrame(frame[:0], protocol.FrameData, t.id, uint32(req.Offset), payload)
	if err := c.opts.Publisher.Publish(protocol.Topic(device, protocol.SuffixChunk), frame, 0); err != nil {
		c.log.Warn("publish chunk", "device", device, "err", err)
		return
	}
	c.stats.ChunksServed.Add(1)
	c.stats.BytesServed.Add(uint64(n))
}

func (c *Controller) chunkError(device string, transfer uint32, offset int64, code string) {
	c.stats.ChunkErrors.Add(1)
	off := uint32(0)
	if offset > 0 && offset <= int64(^uint32(0)) {
		off = uint32(offset)
	}
	frame := protocol.AppendFrame(nil, protocol.FrameError, transfer, off, []byte(code))
	if err := c.opts.Publisher.Publish(protocol.Topic(device, protocol.SuffixChunk), frame, 0); err != nil {
		c.log.Warn("publish chunk error", "device", device, "err", err)
	}
}
