// Package protocol is fota's device protocol: topic names, control messages, the binary chunk
// frame and the firmware manifest. Server and devices share it, so it imports only the standard
// library. PROTOCOL.md at the repository root is the document these types implement.
package protocol

// ProtocolVersion is the version of the device protocol spoken on fota/v1/...
//
// History:
//
//	1: status, event and chunk request upstream; job offers and chunk frames downstream;
//	   20-byte chunk frame header with a CRC-32C of the payload; signed manifests with
//	   optional delta; max_chunk in Status (an optional field old servers ignore);
//	   counter in Status (optional, likewise) and the patch-apply failure reason (a server
//	   that does not know it treats it as final, as it does any unknown reason).
const ProtocolVersion = 1
