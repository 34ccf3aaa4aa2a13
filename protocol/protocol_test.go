package protocol

import (
	"bytes"
	"errors"
	"strings"
	"testing"
)

func TestValidDeviceID(t *testing.T) {
	tests := []struct {
		id string
		ok bool
	}{
		{"dev-1", true},
		{"ÄÖ-1", true},
		{strings.Repeat("a", 64), true},
		{"", false},
		{strings.Repeat("a", 65), false},
		{"a/b", false}, {"a+b", false}, {"a#b", false}, {"$a", false}, {"a$", false},
		{"a b", false}, {"a\tb", false}, {"a\x00b", false}, {"a\nb", false}, {"inline", false}, {"\xff\xfe", false},
	}
	for _, tc := range tests {
		err := ValidDeviceID(tc.id)
		if (err == nil) != tc.ok {
			t.Errorf("ValidDeviceID(%q) = %v, want ok=%v", tc.id, err, tc.ok)
		}
		if err != nil && !errors.Is(err, ErrBadDeviceID) {
			t.Errorf("ValidDeviceID(%q) = %v, want ErrBadDeviceID", tc.id, err)
		}
	}
}

func TestValidModel(t *testing.T) {
	tests := []struct {
		model string
		ok    bool
	}{
		{"primehub", true},
		{"ESP8266_v2.rev-b", true},
		{"...", true},
		{".hidden", true},
		{strings.Repeat("x", MaxModelLen), true},
		{"", false},
		{".", false},
		{"..", false},
		{strings.Repeat("x", MaxModelLen+1), false},
		{"a/b", false}, {`a\b`, false}, {"a b", false}, {"a\tb", false}, {"a\x00b", false}, {"a\nb", false},
		{"café", false}, {"a+b", false}, {"a#b", false}, {"\xff", false},
	}
	for _, tc := range tests {
		err := ValidModel(tc.model)
		if (err == nil) != tc.ok {
			t.Errorf("ValidModel(%q) = %v, want ok=%v", tc.model, err, tc.ok)
		}
		if err != nil && !errors.Is(err, ErrBadModel) {
			t.Errorf("ValidModel(%q) = %v, want ErrBadModel", tc.model, err)
		}
	}
}

func TestParseTopic(t *testing.T) {
	tests := []struct {
		topic, device, suffix string
		ok                    bool
	}{
		{"fota/v1/d1/status", "d1", "status", true},
		{Topic("d1", SuffixChunk), "d1", SuffixChunk, true},
		{"fota/v1/d1/a/b", "d1", "a/b", true},
		{"fota/v1/+/status", "", "", false},
		{"fota/v1/d1/#", "", "", false},
		{"fota/v1/d1", "", "", false},
		{"fota/v1//status", "", "", false},
		{"fota/v2/d1/status", "", "", false},
		{"$SYS/x", "", "", false},
	}
	for _, tc := range tests {
		d, s, ok := ParseTopic(tc.topic)
		if d != tc.device || s != tc.suffix || ok != tc.ok {
			t.Errorf("ParseTopic(%q) = %q, %q, %v; want %q, %q, %v", tc.topic, d, s, ok, tc.device, tc.suffix, tc.ok)
		}
	}
	for _, s := range []string{SuffixStatus, SuffixEvent, SuffixRequest} {
		if !Upstream(s) || Downstream(s) {
			t.Errorf("%s: want upstream only", s)
		}
	}
	for _, s := range []string{SuffixJob, SuffixChunk} {
		if Upstream(s) || !Downstream(s) {
			t.Errorf("%s: want downstream only", s)
		}
	}
}

func TestVersions(t *testing.T) {
	order := []string{"0.9.0", "1.0.0-alpha", "1.0.0-alpha.1", "1.0.0-alpha.beta", "1.0.0-beta.2", "1.0.0-beta.11", "1.0.0-rc.1", "1.0.0", "1.2", "1.10.0", "v7.27.0", "7.28.0"}
	for i := range order {
		for j := range order {
			got, err := CompareVersions(order[i], order[j])
			if err != nil {
				t.Fatal(err)
			}
			want := 0
			if i < j {
				want = -1
			} else if i > j {
				want = 1
			}
			if got != want {
				t.Errorf("CompareVersions(%q, %q) = %d, want %d", order[i], order[j], got, want)
			}
		}
	}
	for _, bad := range []string{"", "v", "1", "1.2.3.4", "01.2.3", "1.x.3", "1.2.3-", "1.2.3+build", "1.2.3-a..b", "1.2.-3", "99999999999.0.0", "seven"} {
		if _, err := ParseVersion(bad); !errors.Is(err, ErrBadVersion) {
			t.Errorf("ParseVersion(%q) = %v, want ErrBadVersion", bad, err)
		}
	}
	if v, _ := ParseVersion("v1.10"); v.String() != "1.10.0" {
		t.Errorf("got %q, want 1.10.0", v.String())
	}
}

func TestFrameRoundTrip(t *testing.T) {
	payload := bytes.Repeat([]byte("firmware"), 512)
	b := AppendFrame(nil, FrameData, 7, 4096, payload)
	if len(b) != FrameHeaderSize+len(payload) {
		t.Fatalf("got %d bytes, want %d", len(b), FrameHeaderSize+len(payload))
	}
	f, err := ParseFrame(b)
	if err != nil {
		t.Fatal(err)
	}
	if f.Kind != FrameData || f.Transfer != 7 || f.Offset != 4096 || !bytes.Equal(f.Payload, payload) {
		t.Fatalf("got %+v, want transfer 7 offset 4096 and the payload", f)
	}
	corrupt := func(i int, v byte) []byte { c := bytes.Clone(b); c[i] ^= v; return c }
	for name, bad := range map[string][]byte{
		"empty":           nil,
		"short header":    b[:FrameHeaderSize-1],
		"truncated":       b[:len(b)-1],
		"extra byte":      append(bytes.Clone(b), 0),
		"version":         corrupt(0, 0xff),
		"kind":            corrupt(1, 0x07),
		"payload bit":     corrupt(FrameHeaderSize+100, 0x01),
		"checksum":        corrupt(16, 0x80),
		"length too long": corrupt(12, 0x10),
	} {
		if _, err := ParseFrame(bad); !errors.Is(err, ErrBadFrame) {
			t.Errorf("%s: got %v, want ErrBadFrame", name, err)
		}
	}
}

func TestManifestSigningBytes(t *testing.T) {
	m := Manifest{V: 1, Model: "primehub", Version: "7.28.0", Counter: 2, Size: 296756,
		SHA256: strings.Repeat("ab", 32)}
	want := "fota-manifest-v1\nmodel=primehub\nversion=7.28.0\ncounter=2\nsize=296756\nsha256=" + strings.Repeat("ab", 32) +
		"\ndelta.base=\ndelta.patch_sha256=\ndelta.patch_size=0\ndelta.format=\nexpires=\n"
	if got := string(m.SigningBytes()); got != want {
		t.Fatalf("got\n%s\nwant\n%s", got, want)
	}
	if err := m.CheckFields(); err != nil {
		t.Fatal(err)
	}
	withDelta := m
	withDelta.Delta = &Delta{Base: strings.Repeat("cd", 32), PatchSHA256: strings.Repeat("ef", 32), PatchSize: 22000, Format: "bsdiff-zstd"}
	if bytes.Equal(withDelta.SigningBytes(), m.SigningBytes()) {
		t.Fatal("a delta does not change the signed bytes")
	}
	for name, mut := range map[string]func(*Manifest){
		"version 2":       func(m *Manifest) { m.V = 2 },
		"model with line": func(m *Manifest) { m.Model = "a\nsize=1" },
		"model empty":     func(m *Manifest) { m.Model = "" },
		"bad version":     func(m *Manifest) { m.Version = "x" },
		"zero size":       func(m *Manifest) { m.Size = 0 },
		"upper hex":       func(m *Manifest) { m.SHA256 = strings.Repeat("AB", 32) },
		"short hex":       func(m *Manifest) { m.SHA256 = "abc" },
		"bad expiry":      func(m *Manifest) { m.Expires = "tomorrow" },
		"delta format nl": func(m *Manifest) {
			m.Delta = &Delta{Base: m.SHA256, PatchSHA256: m.SHA256, PatchSize: 1, Format: "x\nexpires="}
		},
		"delta patch size": func(m *Manifest) { m.Delta = &Delta{Base: m.SHA256, PatchSHA256: m.SHA256, Format: "x"} },
	} {
		bad := m
		mut(&bad)
		if err := bad.CheckFields(); err == nil {
			t.Errorf("%s: CheckFields accepted %+v", name, bad)
		}
	}
}
