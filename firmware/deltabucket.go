package firmware

import (
	"bytes"
	"encoding/json"
	"fmt"
	"strings"

	bolt "go.etcd.io/bbolt"

	"github.com/fota-dev/fota/protocol"
)

// bucketDeltas holds one verdict per delta a release can be offered: a signed delta manifest,
// or why no delta is offered. Key: deltaKey(model, target version, base sha256). A delta's
// manifest belongs to one release of one model, with that release's counter and expiry, so
// two releases that share an image (the same bytes under two models, or re-released under a
// new version to roll back) each have their own verdicts; the patch files they name are
// stored once, by content, and kept while any record names them.
var bucketDeltas = []byte("deltas")

// deltaRecord is the verdict on a delta to one release from one base.
type deltaRecord struct {
	Target   string             `json:"target"`             // sha256 of the release's image
	Manifest *protocol.Manifest `json:"manifest,omitempty"` // signed, with Delta set
	Refused  string             `json:"refused,omitempty"`  // why there is no delta
	// Uploaded marks a patch signed offline and added with Store.AddDelta; Verified, that
	// the store saw it rebuild the target (it always does for the ones it makes).
	Uploaded bool `json:"uploaded,omitempty"`
	Verified bool `json:"verified,omitempty"`
}

// deltaKey is model NUL canonical-version NUL base sha256. NUL cannot occur in a valid model
// or version, so a release's verdicts are one contiguous key range, found with
// releasePrefix.
func deltaKey(model, version, base string) string {
	return model + "\x00" + version + "\x00" + base
}

func releasePrefix(model, version string) string {
	return model + "\x00" + version + "\x00"
}

// parseDeltaKey splits a deltaKey; ok is false for anything else, such as a key of the
// former layout.
func parseDeltaKey(k []byte) (model, version, base string, ok bool) {
	parts := strings.Split(string(k), "\x00")
	if len(parts) != 3 {
		return "", "", "", false
	}
	return parts[0], parts[1], parts[2], true
}

// forRelease reports whether the signed delta manifest m was signed for the release whose
// full manifest is target: the same model, version, counter, size, image and expiry. A
// release re-signed since (a new expiry) leaves its earlier delta manifests stale.
func forRelease(m, target protocol.Manifest) bool {
	m.Delta, m.Signature, target.Delta, target.Signature = nil, "", nil, ""
	return m == target
}

// migrateDeltas rewrites the verdicts stored under the former key, base ":" target sha256,
// which made a manifest signed for one release serve every release sharing its image. A
// stored manifest moves to the key of the release it was signed for, if that release still
// has this image and the key is free; every other former verdict, and every refusal (the
// Patcher decides it again on the next ask), is dropped. The patch files only dropped
// verdicts named are left to Open's sweep of unnamed artifacts.
func migrateDeltas(tx *bolt.Tx) (moved, dropped int, err error) {
	b := tx.Bucket(bucketDeltas)
	fb, err := bucket(tx)
	if err != nil {
		return 0, 0, err
	}
	var old [][]byte
	if err := b.ForEach(func(k, _ []byte) error {
		if !bytes.Contains(k, []byte{0}) {
			old = append(old, bytes.Clone(k))
		}
		return nil
	}); err != nil {
		return 0, 0, err
	}
	// Changed after the walk: bbolt does not allow changing a bucket inside its ForEach.
	for _, k := range old {
		key, v, err := migratedDelta(fb, k, b.Get(k))
		if err != nil {
			return 0, 0, err
		}
		if err := b.Delete(k); err != nil {
			return 0, 0, fmt.Errorf("delete delta verdict: %w", err)
		}
		if key == "" || b.Get([]byte(key)) != nil {
			dropped++
			continue
		}
		if err := b.Put([]byte(key), v); err != nil {
			return 0, 0, fmt.Errorf("put delta verdict: %w", err)
		}
		moved++
	}
	return moved, dropped, nil
}

// migratedDelta returns the key and value under which the former verdict v on key k is kept,
// or "" when it is dropped.
func migratedDelta(fb *bolt.Bucket, k, v []byte) (string, []byte, error) {
	base, target, ok := bytes.Cut(k, []byte(":"))
	if !ok {
		return "", nil, nil
	}
	var rec deltaRecord
	if json.Unmarshal(v, &rec) != nil || rec.Manifest == nil || rec.Manifest.Delta == nil {
		return "", nil, nil
	}
	m := rec.Manifest
	if m.SHA256 != string(target) || m.Delta.Base != string(base) {
		return "", nil, nil
	}
	f, ok, err := getRecord(fb, m.Model, m.Version)
	if err != nil || !ok || f.SHA256 != m.SHA256 {
		return "", nil, err
	}
	rec.Target = m.SHA256
	nv, err := json.Marshal(rec)
	if err != nil {
		return "", nil, fmt.Errorf("encode delta verdict: %w", err)
	}
	return deltaKey(m.Model, m.Version, m.Delta.Base), nv, nil
}

// dropDeltas deletes the verdicts for which gone, given the release and its target sha,
// reports true, and returns how many it deleted and the patches they named that no remaining
// record names.
func dropDeltas(tx *bolt.Tx, gone func(model, version, target string) bool) (dropped int, unnamed []string, err error) {
	b := tx.Bucket(bucketDeltas)
	if b == nil {
		return 0, nil, nil // no Patcher has run on this database
	}
	var keys [][]byte
	patches := make(map[string]bool)
	err = b.ForEach(func(k, v []byte) error {
		model, version, _, ok := parseDeltaKey(k)
		if !ok {
			return nil
		}
		var rec deltaRecord
		if json.Unmarshal(v, &rec) != nil {
			rec = deltaRecord{} // undecodable: its target is no image
		}
		if !gone(model, version, rec.Target) {
			return nil
		}
		keys = append(keys, bytes.Clone(k))
		if p := patchOf(v); p != "" {
			patches[p] = true
		}
		return nil
	})
	if err != nil {
		return 0, nil, err
	}
	// Deleted after the walk: bbolt does not allow changing a bucket inside its ForEach.
	for _, k := range keys {
		if err := b.Delete(k); err != nil {
			return 0, nil, fmt.Errorf("delete delta verdict: %w", err)
		}
	}
	if len(patches) == 0 {
		return len(keys), nil, nil
	}
	named, err := namedSHAs(tx)
	if err != nil {
		return 0, nil, err
	}
	for p := range patches {
		if !named[p] {
			unnamed = append(unnamed, p)
		}
	}
	return len(keys), unnamed, nil
}
