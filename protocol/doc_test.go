package protocol

import (
	"bytes"
	"encoding/hex"
	"encoding/json"
	"errors"
	"fmt"
	"io"
	"os"
	"path/filepath"
	"reflect"
	"slices"
	"strings"
	"testing"
)

// docPath is the contract these types implement.
var docPath = filepath.Join("..", "PROTOCOL.md")

// docBlock is one fenced code block of a Markdown document.
type docBlock struct {
	line int    // of the opening fence, from 1
	lang string // first word of the info string
	kind string // second word: the message type of a json or hex example
	body string
}

// docBlocks returns the fenced (```) code blocks of a Markdown document.
func docBlocks(doc string) ([]docBlock, error) {
	var blocks []docBlock
	var cur *docBlock
	var body strings.Builder
	for i, line := range strings.Split(doc, "\n") {
		fence := strings.HasPrefix(strings.TrimSpace(line), "```")
		switch {
		case cur == nil && fence:
			info := strings.Fields(strings.TrimPrefix(strings.TrimSpace(line), "```"))
			cur = &docBlock{line: i + 1}
			if len(info) > 0 {
				cur.lang = info[0]
			}
			if len(info) > 1 {
				cur.kind = info[1]
			}
			body.Reset()
		case cur != nil && fence:
			cur.body = body.String()
			blocks = append(blocks, *cur)
			cur = nil
		case cur != nil:
			body.WriteString(line)
			body.WriteByte('\n')
		}
	}
	if cur != nil {
		return nil, fmt.Errorf("code block at line %d is not closed", cur.line)
	}
	return blocks, nil
}

// exampleSpec says how to check a JSON example of one message type.
type exampleSpec struct {
	decode   func(dec *json.Decoder) (any, error)
	required []string
	// check checks the decoded message's values, and returns what the example shows (for
	// the coverage check).
	check func(v any) ([]string, error)
}

func decodeInto[T any](dec *json.Decoder) (any, error) {
	v := new(T)
	err := dec.Decode(v)
	return v, err
}

var manifestRequired = []string{"v", "model", "version", "counter", "size", "sha256"}
var deltaRequired = []string{"base", "patch_sha256", "patch_size", "format"}

var examples = map[string]exampleSpec{
	"Status": {
		decode:   decodeInto[Status],
		required: []string{"v", "model", "version", "state"},
		check: func(v any) ([]string, error) {
			st := v.(*Status)
			switch {
			case st.V != ProtocolVersion:
				return nil, fmt.Errorf("v %d, want %d", st.V, ProtocolVersion)
			case ValidModel(st.Model) != nil:
				return nil, ValidModel(st.Model)
			case !validState(st.State, true):
				return nil, fmt.Errorf("state %q is not a device state", st.State)
			case (st.State == StateIdle) != (st.Job == ""):
				return nil, fmt.Errorf("state %q with job %q: a job is named exactly when the state is not idle", st.State, st.Job)
			case st.SHA256 != "" && !isHexSHA256(st.SHA256):
				return nil, fmt.Errorf("sha256 %q is not 64 lowercase hex digits", st.SHA256)
			case st.MaxChunk != 0 && (st.MaxChunk < MinChunkSize || st.MaxChunk > MaxChunkSize):
				return nil, fmt.Errorf("max_chunk %d outside [%d, %d]", st.MaxChunk, MinChunkSize, MaxChunkSize)
			}
			if _, err := ParseVersion(st.Version); err != nil {
				return nil, err
			}
			shows := []string{"Status"}
			if st.MaxChunk != 0 {
				shows = append(shows, "Status with max_chunk")
			}
			if st.Counter != 0 {
				shows = append(shows, "Status with counter")
			}
			if st.Job != "" {
				shows = append(shows, "Status with a job")
			}
			return shows, nil
		},
	},
	"Offer": {
		decode:   decodeInto[Offer],
		required: []string{"v", "job", "transfer", "manifest", "size", "chunk_size", "window"},
		check: func(v any) ([]string, error) {
			o := v.(*Offer)
			m := o.Manifest
			signed := m.Size
			if m.Delta != nil {
				signed = m.Delta.PatchSize
			}
			switch {
			case o.V != ProtocolVersion:
				return nil, fmt.Errorf("v %d, want %d", o.V, ProtocolVersion)
			case o.Job == "" || len(o.Job) > 128:
				return nil, fmt.Errorf("job %q: want 1 to 128 bytes", o.Job)
			case o.Transfer == 0:
				return nil, errors.New("transfer 0 is reserved")
			case m.CheckFields() != nil:
				return nil, m.CheckFields()
			case o.Size != signed:
				return nil, fmt.Errorf("size %d, the manifest signs %d", o.Size, signed)
			case o.ChunkSize < MinChunkSize || o.ChunkSize > MaxChunkSize:
				return nil, fmt.Errorf("chunk_size %d outside [%d, %d]", o.ChunkSize, MinChunkSize, MaxChunkSize)
			case o.Window < 1:
				return nil, fmt.Errorf("window %d, want at least 1", o.Window)
			}
			if m.Delta != nil {
				return []string{"Offer of a delta"}, nil
			}
			return []string{"Offer of a full image"}, nil
		},
	},
	"ChunkRequest": {
		decode:   decodeInto[ChunkRequest],
		required: []string{"job", "off", "len"},
		check: func(v any) ([]string, error) {
			r := v.(*ChunkRequest)
			switch {
			case r.Job == "":
				return nil, errors.New("empty job")
			case r.Offset < 0:
				return nil, fmt.Errorf("off %d", r.Offset)
			case r.Length < 1 || r.Length > MaxChunkSize:
				return nil, fmt.Errorf("len %d outside [1, %d]", r.Length, MaxChunkSize)
			}
			return []string{"ChunkRequest"}, nil
		},
	},
	"Event": {
		decode:   decodeInto[Event],
		required: []string{"v", "job", "seq", "state"},
		check: func(v any) ([]string, error) {
			ev := v.(*Event)
			switch {
			case ev.V != ProtocolVersion:
				return nil, fmt.Errorf("v %d, want %d", ev.V, ProtocolVersion)
			case ev.Job == "":
				return nil, errors.New("empty job")
			case ev.Seq < 1:
				return nil, fmt.Errorf("seq %d, want 1 or more", ev.Seq)
			case !validState(ev.State, false):
				return nil, fmt.Errorf("state %q is not an event state", ev.State)
			case ev.Bytes < 0:
				return nil, fmt.Errorf("bytes %d", ev.Bytes)
			case (ev.State == StateFailed) != (ev.Reason != ""):
				return nil, fmt.Errorf("state %q with reason %q: a reason is given exactly when the state is failed", ev.State, ev.Reason)
			case ev.Reason != "" && !knownReason(ev.Reason):
				return nil, fmt.Errorf("reason %q does not start with a failure reason", ev.Reason)
			case (ev.State == StateInstalled) != (ev.Version != ""):
				return nil, fmt.Errorf("state %q with version %q: a version is given exactly when the state is installed", ev.State, ev.Version)
			}
			if ev.Version != "" {
				if _, err := ParseVersion(ev.Version); err != nil {
					return nil, err
				}
			}
			return []string{"Event " + ev.State}, nil
		},
	},
}

func validState(s string, idle bool) bool {
	switch s {
	case StateDownloading, StateVerifying, StateInstalling, StateInstalled, StateFailed:
		return true
	case StateIdle:
		return idle
	}
	return false
}

// reasons are the failure reasons of PROTOCOL.md's table, in its order.
var reasons = []string{ReasonBadManifest, ReasonHashMismatch, ReasonPatchApply, ReasonSize, ReasonTransfer, ReasonInstall}

func knownReason(s string) bool {
	for _, r := range reasons {
		if s == r || strings.HasPrefix(s, r+": ") {
			return true
		}
	}
	return false
}

// checkExample decodes body as a kind message with unknown fields refused, checks its required
// fields and its values, and returns what it shows.
func checkExample(kind, body string) ([]string, error) {
	spec, ok := examples[kind]
	if !ok {
		return nil, fmt.Errorf("unknown message type %q; want one of Status, Offer, ChunkRequest, Event", kind)
	}
	dec := json.NewDecoder(strings.NewReader(body))
	dec.DisallowUnknownFields()
	v, err := spec.decode(dec)
	if err != nil {
		return nil, fmt.Errorf("decode %s: %w", kind, err)
	}
	if _, err := dec.Token(); !errors.Is(err, io.EOF) {
		return nil, fmt.Errorf("decode %s: data after the object", kind)
	}
	var fields map[string]json.RawMessage
	if err := json.Unmarshal([]byte(body), &fields); err != nil {
		return nil, err
	}
	if err := requireFields(kind, fields, spec.required); err != nil {
		return nil, err
	}
	if kind == "Offer" {
		var m map[string]json.RawMessage
		if err := json.Unmarshal(fields["manifest"], &m); err != nil {
			return nil, fmt.Errorf("offer manifest: %w", err)
		}
		if err := requireFields("manifest", m, manifestRequired); err != nil {
			return nil, err
		}
		if d, ok := m["delta"]; ok {
			var dm map[string]json.RawMessage
			if err := json.Unmarshal(d, &dm); err != nil {
				return nil, fmt.Errorf("manifest delta: %w", err)
			}
			if err := requireFields("delta", dm, deltaRequired); err != nil {
				return nil, err
			}
		}
	}
	shows, err := spec.check(v)
	if err != nil {
		return nil, fmt.Errorf("%s: %w", kind, err)
	}
	return shows, nil
}

func requireFields(what string, fields map[string]json.RawMessage, required []string) error {
	for _, f := range required {
		if _, ok := fields[f]; !ok {
			return fmt.Errorf("%s: required field %q missing", what, f)
		}
	}
	return nil
}

// checkFrame parses a hex example of a chunk frame (white space ignored) and returns what it
// shows.
func checkFrame(body string) ([]string, error) {
	b, err := hex.DecodeString(strings.Join(strings.Fields(body), ""))
	if err != nil {
		return nil, fmt.Errorf("frame hex: %w", err)
	}
	f, err := ParseFrame(b)
	if err != nil {
		return nil, err
	}
	if f.Kind == FrameError {
		switch code := string(f.Payload); code {
		case ErrCodeRange, ErrCodeNoJob, ErrCodeBusy, ErrCodeInternal:
		default:
			return nil, fmt.Errorf("error frame code %q is not one of the protocol's", code)
		}
		return []string{"error Frame"}, nil
	}
	return []string{"data Frame"}, nil
}

// docShows is everything PROTOCOL.md must show with a checked example.
var docShows = []string{
	"Status", "Status with max_chunk", "Status with a job", "Status with counter",
	"Offer of a full image", "Offer of a delta",
	"ChunkRequest",
	"Event " + StateDownloading, "Event " + StateVerifying, "Event " + StateInstalling,
	"Event " + StateInstalled, "Event " + StateFailed,
	"data Frame", "error Frame",
}

// TestProtocolDocExamples decodes every JSON example of PROTOCOL.md into the message type its
// fence names (```json Status) with unknown fields refused, checks required fields and values,
// parses every frame example (```hex Frame), and fails unless each message type, each event
// state and both offer and frame kinds have an example.
func TestProtocolDocExamples(t *testing.T) {
	doc, err := os.ReadFile(docPath)
	if err != nil {
		t.Fatal(err)
	}
	blocks, err := docBlocks(string(doc))
	if err != nil {
		t.Fatal(err)
	}
	shown := map[string]int{}
	for _, b := range blocks {
		var shows []string
		var err error
		switch {
		case b.lang == "json":
			shows, err = checkExample(b.kind, b.body)
		case b.lang == "hex" && b.kind == "Frame":
			shows, err = checkFrame(b.body)
		case b.lang == "hex":
			err = fmt.Errorf("hex block names %q, want Frame", b.kind)
		default:
			continue
		}
		if err != nil {
			t.Errorf("PROTOCOL.md line %d: %v", b.line, err)
		}
		for _, s := range shows {
			shown[s]++
		}
	}
	for _, s := range docShows {
		if shown[s] == 0 {
			t.Errorf("PROTOCOL.md: got no example of %s, want at least one", s)
		}
	}
	// The CRC's published check value, so an implementer can test theirs.
	if got := Checksum([]byte("123456789")); got != 0xE3069283 || !bytes.Contains(doc, []byte("0xE3069283")) {
		t.Errorf("CRC-32C check value: got %#08x, want 0xE3069283, stated in PROTOCOL.md", got)
	}
}

// TestCheckExampleRefuses shows that the document check fails on what it must catch.
func TestCheckExampleRefuses(t *testing.T) {
	const sha = "e5fd8bbd1030d7db5569b40f0758184ac04175c156ef2c4f72130bfd9e4c6316"
	manifest := `{"v":1,"model":"primehub","version":"7.28.0","counter":2,"size":100,"sha256":"` + sha + `"}`
	tests := []struct {
		name, kind, body, want string
	}{
		{"unknown type", "Stats", `{"v":1}`, "unknown message type"},
		{"unknown field", "Status", `{"v":1,"model":"m","version":"1.0.0","state":"idle","colour":"red"}`, "unknown field"},
		{"wrong type", "Event", `{"v":1,"job":"j","seq":"1","state":"downloading"}`, "cannot unmarshal"},
		{"missing v", "Event", `{"job":"j","seq":1,"state":"downloading"}`, `"v" missing`},
		{"missing job", "ChunkRequest", `{"off":0,"len":1024}`, `"job" missing`},
		{"missing state", "Status", `{"v":1,"model":"m","version":"1.0.0"}`, `"state" missing`},
		{"data after", "ChunkRequest", `{"job":"j","off":0,"len":1024} {}`, "data after"},
		{"failed without reason", "Event", `{"v":1,"job":"j","seq":2,"state":"failed"}`, "reason"},
		{"unknown reason", "Event", `{"v":1,"job":"j","seq":2,"state":"failed","reason":"gremlins"}`, "failure reason"},
		{"installed without version", "Event", `{"v":1,"job":"j","seq":2,"state":"installed"}`, "version"},
		{"idle is not an event", "Event", `{"v":1,"job":"j","seq":2,"state":"idle"}`, "not an event state"},
		{"job without state", "Status", `{"v":1,"model":"m","version":"1.0.0","state":"idle","job":"j"}`, "job"},
		{"max_chunk too small", "Status", `{"v":1,"model":"m","version":"1.0.0","state":"idle","max_chunk":512}`, "max_chunk"},
		{"offer size not signed", "Offer", `{"v":1,"job":"j","transfer":1,"manifest":` + manifest + `,"size":99,"chunk_size":16384,"window":4}`, "size 99"},
		{"offer without window", "Offer", `{"v":1,"job":"j","transfer":1,"manifest":` + manifest + `,"size":100,"chunk_size":16384}`, `"window" missing`},
		{"manifest without counter", "Offer", `{"v":1,"job":"j","transfer":1,"manifest":` + strings.Replace(manifest, `"counter":2,`, "", 1) + `,"size":100,"chunk_size":16384,"window":4}`, `"counter" missing`},
		{"unknown manifest field", "Offer", `{"v":1,"job":"j","transfer":1,"manifest":` + strings.Replace(manifest, `"v":1`, `"v":1,"signer":"x"`, 1) + `,"size":100,"chunk_size":16384,"window":4}`, "unknown field"},
	}
	for _, tt := range tests {
		t.Run(tt.name, func(t *testing.T) {
			_, err := checkExample(tt.kind, tt.body)
			if err == nil || !strings.Contains(err.Error(), tt.want) {
				t.Errorf("got %v, want an error with %q", err, tt.want)
			}
		})
	}
	if _, err := checkFrame("01 01 0000 00000001 00000000 00000004 00000000 62757379"); err == nil {
		t.Errorf("frame with a wrong CRC: got nil, want an error")
	}
	if _, err := docBlocks("text\n```json Status\n{}\n"); err == nil {
		t.Errorf("unclosed block: got nil, want an error")
	}
	blocks, err := docBlocks("```json Event\n{\"v\":1}\n```\n```\nplain\n```\n")
	if err != nil || len(blocks) != 2 || blocks[0].kind != "Event" || blocks[1].lang != "" || blocks[0].line != 1 {
		t.Errorf("docBlocks: got %+v, %v; want an Event json block at line 1 and a plain one", blocks, err)
	}
	if !slices.Contains(docShows, "Event "+StateFailed) {
		t.Errorf("docShows: want failed events required")
	}
}

// docSection returns the text of the section of doc under the heading line head (e.g.
// "### Status"), up to the next heading of the same or a higher level.
func docSection(doc, head string) (string, error) {
	level := strings.Index(head, " ")
	lines := strings.Split(doc, "\n")
	for i, l := range lines {
		if l != head {
			continue
		}
		var b strings.Builder
		for _, l := range lines[i+1:] {
			if n := strings.Index(l, " "); n > 0 && n <= level && strings.Trim(l[:n], "#") == "" {
				break
			}
			b.WriteString(l)
			b.WriteByte('\n')
		}
		return b.String(), nil
	}
	return "", fmt.Errorf("no section %q", head)
}

// tableKeys returns the first cell of every row of the Markdown tables in text whose first
// cell is one code span (`name`), in order.
func tableKeys(text string) []string {
	var keys []string
	for _, l := range strings.Split(text, "\n") {
		cells := strings.Split(l, "|")
		if len(cells) < 3 || strings.TrimSpace(cells[0]) != "" {
			continue
		}
		c := strings.TrimSpace(cells[1])
		if len(c) > 2 && c[0] == '`' && c[len(c)-1] == '`' && !strings.Contains(c[1:len(c)-1], "`") {
			keys = append(keys, c[1:len(c)-1])
		}
	}
	return keys
}

// jsonFields returns the JSON names of v's struct fields, in order.
func jsonFields(v any) []string {
	var names []string
	t := reflect.TypeOf(v)
	for i := range t.NumField() {
		name, _, _ := strings.Cut(t.Field(i).Tag.Get("json"), ",")
		names = append(names, name)
	}
	return names
}

// TestProtocolDocTables checks PROTOCOL.md's tables against the code: each message's field
// table lists exactly the fields of its Go type, in order; the failure reasons and error codes
// tables list exactly the protocol's; and the numbers the Limits section states are the
// code's.
func TestProtocolDocTables(t *testing.T) {
	b, err := os.ReadFile(docPath)
	if err != nil {
		t.Fatal(err)
	}
	doc := string(b)
	for _, tt := range []struct {
		head string
		want []string
	}{
		{"### Status", jsonFields(Status{})},
		{"### Offer", jsonFields(Offer{})},
		{"### ChunkRequest", jsonFields(ChunkRequest{})},
		{"### Event", jsonFields(Event{})},
		{"## Failure reasons", reasons},
		{"### Error codes", errCodes},
	} {
		sec, err := docSection(doc, tt.head)
		if err != nil {
			t.Errorf("PROTOCOL.md: %v", err)
			continue
		}
		if got := tableKeys(sec); !slices.Equal(got, tt.want) {
			t.Errorf("PROTOCOL.md %s: table lists %q, want %q", tt.head, got, tt.want)
		}
	}

	limits, err := docSection(doc, "## Limits")
	if err != nil {
		t.Fatalf("PROTOCOL.md: %v", err)
	}
	flat := strings.Join(strings.Fields(limits), " ")
	// 32-bit frame offsets: the largest transfer.
	if off := reflect.TypeOf(Frame{}.Offset).Bits(); off != 32 || !strings.Contains(flat, "at most 2^32 bytes (4 GiB)") {
		t.Errorf("Limits: want the largest transfer stated as 2^32 bytes for %d-bit offsets", off)
	}
	// The largest counter every JSON parser carries exactly, written in the signing bytes as
	// plain decimal.
	const exact = uint64(1) << 53
	if !strings.Contains(flat, fmt.Sprintf("0 to 2^53 (%d)", exact)) {
		t.Errorf("Limits: want the counter range stated as 0 to 2^53 (%d)", exact)
	}
	m := Manifest{V: ProtocolVersion, Model: "m", Version: "1.0.0", Counter: exact, Size: 1, SHA256: strings.Repeat("ab", 32)}
	if sb := string(m.SigningBytes()); !strings.Contains(sb, fmt.Sprintf("\ncounter=%d\n", exact)) || !strings.Contains(sb, "\ndelta.patch_size=0\n") {
		t.Errorf("signing bytes %q: want integers in plain decimal", sb)
	}
}

// errCodes are the error codes of PROTOCOL.md's table, in its order.
var errCodes = []string{ErrCodeRange, ErrCodeNoJob, ErrCodeBusy, ErrCodeInternal}
