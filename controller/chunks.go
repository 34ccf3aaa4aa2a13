package controller

import (
	"github.com/fota-dev/fota/protocol"
	"github.com/fota-dev/fota/transfer"
)

// Transfer tells the chunk server what a device may download now: its current job's artifact,
// and whether the rollout's window closed with window end "pause".
func (c *Controller) Transfer(device string) (transfer.Transfer, bool) {
	v, ok := c.transfers.Load(device)
	if !ok {
		return transfer.Transfer{}, false
	}
	t := v.(*xfer)
	return transfer.Transfer{
		Job: t.job, ID: t.id, SHA256: t.sha, Size: t.size, ChunkMax: t.chunkMax,
		Paused: t.paused != nil && t.paused.Load(),
	}, true
}

// chunkSize is the largest chunk a job's device may ask for: the server's, or less when the
// device said it takes less.
func (c *Controller) chunkSize(j *Job) int {
	if j.Chunk >= protocol.MinChunkSize && j.Chunk < c.opts.ChunkSize {
		return j.Chunk
	}
	return c.opts.ChunkSize
}
