package protocol

// Device job states, reported in Event.State and Status.State. The server keeps its own view
// of each device's job (see controller); these are what the device says about itself.
const (
	StateIdle        = "idle"        // nothing to do
	StateDownloading = "downloading" // fetching chunks
	StateVerifying   = "verifying"   // image complete, checking hash and manifest
	StateInstalling  = "installing"  // writing the inactive slot; a reboot follows
	StateInstalled   = "installed"   // running the new version (sent after the reboot)
	StateFailed      = "failed"      // gave up on the job; Reason says why
)

// Failure reasons a device puts in Event.Reason. A device may add detail after a colon.
const (
	ReasonBadManifest  = "bad-manifest"  // manifest refused (model, version, signature, counter)
	ReasonHashMismatch = "hash-mismatch" // assembled image does not match the manifest
	ReasonSize         = "size"          // transfer longer or shorter than the signed size
	ReasonTransfer     = "transfer"      // chunks stopped coming
	ReasonInstall      = "install"       // writing or booting the new image failed
)

// Status is what a device publishes on SuffixStatus each time it connects, and again after an
// install. It tells the server which firmware runs now.
type Status struct {
	V       int    `json:"v"`                // ProtocolVersion the device speaks
	Model   string `json:"model"`            // hardware model, e.g. "primehub"
	Version string `json:"version"`          // installed firmware version (semantic version)
	SHA256  string `json:"sha256,omitempty"` // hex sha256 of the installed image
	State   string `json:"state"`            // one of the State constants
	Job     string `json:"job,omitempty"`    // job the device is working on, if any
	// MaxChunk is the largest chunk the device can take, in bytes, within
	// [MinChunkSize, MaxChunkSize]; 0 means the server's default. Offers use the smaller of it
	// and the server's chunk size.
	MaxChunk int `json:"max_chunk,omitempty"`
	// Counter is the security counter of the installed image (its manifest's counter; a factory
	// image's is set at manufacture). 0 means unknown.
	Counter uint64 `json:"counter,omitempty"`
}

// Offer is what the server publishes on SuffixJob to ask a device to install a firmware.
// The device decides from Manifest alone whether to install it.
type Offer struct {
	V        int      `json:"v"`
	Job      string   `json:"job"`      // job id; every Event about this job carries it
	Transfer uint32   `json:"transfer"` // id carried by every chunk frame of this job
	Manifest Manifest `json:"manifest"`
	// What is streamed: the full image. (Deltas come with their own manifest fields.)
	Size      int64 `json:"size"`       // bytes to download
	ChunkSize int   `json:"chunk_size"` // the largest Length a request may ask for
	Window    int   `json:"window"`     // the most requests a device may have outstanding
}

// ChunkRequest asks for Length bytes at Offset of the job's transfer, on SuffixRequest.
type ChunkRequest struct {
	Job    string `json:"job"`
	Offset int64  `json:"off"`
	Length int    `json:"len"`
}

// Event reports a job state transition or progress on SuffixEvent. Seq grows by one with
// each event of a job, so the server can drop duplicates and stale events.
type Event struct {
	V       int    `json:"v"`
	Job     string `json:"job"`
	Seq     uint64 `json:"seq"`
	State   string `json:"state"`
	Bytes   int64  `json:"bytes,omitempty"`   // bytes received so far
	Reason  string `json:"reason,omitempty"`  // why, when State is StateFailed
	Version string `json:"version,omitempty"` // version running, when State is StateInstalled
}
