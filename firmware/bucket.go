package firmware

import (
	"bytes"
	"encoding/json"
	"fmt"

	"go.etcd.io/bbolt"
)

// bucketName is the bbolt bucket holding one JSON-encoded Firmware per (model, version).
var bucketName = []byte("firmware")

// recordKey is model NUL canonical-version. NUL cannot occur in a valid model, so a model's
// records are one contiguous key range, found with modelPrefix.
func recordKey(model, version string) []byte {
	return []byte(model + "\x00" + version)
}

func modelPrefix(model string) []byte {
	return []byte(model + "\x00")
}

func encodeRecord(f Firmware) ([]byte, error) {
	b, err := json.Marshal(f)
	if err != nil {
		return nil, fmt.Errorf("encode firmware record: %w", err)
	}
	return b, nil
}

// decodeRecord copies v out, as json.Unmarshal does, so the result outlives the transaction.
func decodeRecord(k, v []byte) (Firmware, error) {
	var f Firmware
	if err := json.Unmarshal(v, &f); err != nil {
		return Firmware{}, fmt.Errorf("decode firmware record %q: %w", k, err)
	}
	return f, nil
}

func bucket(tx *bbolt.Tx) (*bbolt.Bucket, error) {
	b := tx.Bucket(bucketName)
	if b == nil {
		return nil, fmt.Errorf("bucket %q missing", bucketName)
	}
	return b, nil
}

// getRecord returns the record under (model, version); ok is false when there is none.
func getRecord(b *bbolt.Bucket, model, version string) (f Firmware, ok bool, err error) {
	k := recordKey(model, version)
	v := b.Get(k)
	if v == nil {
		return Firmware{}, false, nil
	}
	f, err = decodeRecord(k, v)
	return f, err == nil, err
}

func putRecord(b *bbolt.Bucket, f Firmware) error {
	v, err := encodeRecord(f)
	if err != nil {
		return err
	}
	if err := b.Put(recordKey(f.Model, f.Version), v); err != nil {
		return fmt.Errorf("put firmware record: %w", err)
	}
	return nil
}

// modelRecords calls fn for every record of model, in key (not semantic) order.
func modelRecords(b *bbolt.Bucket, model string, fn func(Firmware) error) error {
	prefix := modelPrefix(model)
	c := b.Cursor()
	for k, v := c.Seek(prefix); k != nil && bytes.HasPrefix(k, prefix); k, v = c.Next() {
		f, err := decodeRecord(k, v)
		if err != nil {
			return err
		}
		if err := fn(f); err != nil {
			return err
		}
	}
	return nil
}

// allRecords calls fn for every record.
func allRecords(b *bbolt.Bucket, fn func(Firmware) error) error {
	return b.ForEach(func(k, v []byte) error {
		f, err := decodeRecord(k, v)
		if err != nil {
			return err
		}
		return fn(f)
	})
}
