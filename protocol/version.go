package protocol

import (
	"errors"
	"fmt"
	"strconv"
	"strings"
)

// ErrBadVersion is returned (wrapped) by ParseVersion.
var ErrBadVersion = errors.New("invalid version")

// Version is a semantic version, MAJOR.MINOR.PATCH with an optional -prerelease; a leading
// "v" is accepted on input. Build metadata (+...) is refused: it would make two strings name
// the same version.
type Version struct {
	Major, Minor, Patch uint64
	Pre                 string
}

// ParseVersion parses s as a semantic version. "1.10" is read as 1.10.0.
func ParseVersion(s string) (Version, error) {
	in := s
	s = strings.TrimPrefix(s, "v")
	if s == "" || len(s) > 64 {
		return Version{}, fmt.Errorf("%w %q: want MAJOR.MINOR.PATCH, e.g. 1.2.3", ErrBadVersion, in)
	}
	core, pre, hasPre := strings.Cut(s, "-")
	if hasPre && !validPre(pre) {
		return Version{}, fmt.Errorf("%w %q: bad pre-release %q", ErrBadVersion, in, pre)
	}
	parts := strings.Split(core, ".")
	if len(parts) < 2 || len(parts) > 3 {
		return Version{}, fmt.Errorf("%w %q: want MAJOR.MINOR.PATCH, e.g. 1.2.3", ErrBadVersion, in)
	}
	var n [3]uint64
	for i, p := range parts {
		if p == "" || (len(p) > 1 && p[0] == '0') {
			return Version{}, fmt.Errorf("%w %q: bad number %q", ErrBadVersion, in, p)
		}
		v, err := strconv.ParseUint(p, 10, 32)
		if err != nil {
			return Version{}, fmt.Errorf("%w %q: bad number %q", ErrBadVersion, in, p)
		}
		n[i] = v
	}
	return Version{Major: n[0], Minor: n[1], Patch: n[2], Pre: pre}, nil
}

func validPre(pre string) bool {
	if pre == "" {
		return false
	}
	for _, id := range strings.Split(pre, ".") {
		if id == "" {
			return false
		}
		for _, r := range id {
			if !(r >= '0' && r <= '9' || r >= 'a' && r <= 'z' || r >= 'A' && r <= 'Z' || r == '-') {
				return false
			}
		}
	}
	return true
}

// String returns the canonical form, without a leading "v".
func (v Version) String() string {
	s := fmt.Sprintf("%d.%d.%d", v.Major, v.Minor, v.Patch)
	if v.Pre != "" {
		s += "-" + v.Pre
	}
	return s
}

// Compare returns -1, 0 or +1 as v is older than, equal to or newer than w, by semver rules.
func (v Version) Compare(w Version) int {
	for _, d := range [...][2]uint64{{v.Major, w.Major}, {v.Minor, w.Minor}, {v.Patch, w.Patch}} {
		if d[0] != d[1] {
			if d[0] < d[1] {
				return -1
			}
			return 1
		}
	}
	switch {
	case v.Pre == w.Pre:
		return 0
	case v.Pre == "":
		return 1
	case w.Pre == "":
		return -1
	}
	a, b := strings.Split(v.Pre, "."), strings.Split(w.Pre, ".")
	for i := 0; i < len(a) && i < len(b); i++ {
		if c := comparePreID(a[i], b[i]); c != 0 {
			return c
		}
	}
	switch {
	case len(a) < len(b):
		return -1
	case len(a) > len(b):
		return 1
	}
	return 0
}

func comparePreID(a, b string) int {
	na, ea := strconv.ParseUint(a, 10, 64)
	nb, eb := strconv.ParseUint(b, 10, 64)
	switch {
	case ea == nil && eb == nil:
		switch {
		case na < nb:
			return -1
		case na > nb:
			return 1
		}
		return 0
	case ea == nil:
		return -1
	case eb == nil:
		return 1
	}
	return strings.Compare(a, b)
}

// CompareVersions parses a and b and compares them; see Version.Compare.
func CompareVersions(a, b string) (int, error) {
	va, err := ParseVersion(a)
	if err != nil {
		return 0, err
	}
	vb, err := ParseVersion(b)
	if err != nil {
		return 0, err
	}
	return va.Compare(vb), nil
}
