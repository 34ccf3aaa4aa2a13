#!/usr/bin/python3
"""A fota device in Python: the device side of PROTOCOL.md, outside Go.

It connects to a fota server with mutual TLS (client id = device id = certificate name),
reports what it runs, and installs what the server offers once the signed manifest checks
out: full images or fota-delta-v1 patches, downloaded in windowed chunk requests that are
asked again on timeouts, every frame checked with CRC-32C, the result checked with sha256,
then written to the inactive of two slot files and switched to in one atomic step before a
"reboot" (disconnect and reconnect on the new version).

Written for Debian 12's Python 3.11 with python3-paho-mqtt 1.6 (MQTT 3.1.1) and
python3-cryptography (ed25519). Delta patches are applied in pure Python with the standard
lzma module; CRC-32C is implemented here. See README.md next to this file.
"""

import argparse
import base64
import collections
import datetime
import hashlib
import json
import lzma
import os
import random
import re
import signal
import ssl
import struct
import sys
import tempfile
import time
import unicodedata

try:
    import paho.mqtt.client as mqtt
except ImportError:  # reported by main(), so that the pure parts stay importable
    mqtt = None
try:
    from cryptography.exceptions import InvalidSignature
    from cryptography.hazmat.primitives import serialization
    from cryptography.hazmat.primitives.asymmetric.ed25519 import Ed25519PublicKey
except ImportError:
    Ed25519PublicKey = None

PROTOCOL_VERSION = 1
ROOT = "fota/v1"

# Job states and failure reasons (PROTOCOL.md "Device job states").
IDLE, DOWNLOADING, VERIFYING, INSTALLING, INSTALLED, FAILED = (
    "idle", "downloading", "verifying", "installing", "installed", "failed")
BAD_MANIFEST, HASH_MISMATCH, PATCH_APPLY, SIZE, TRANSFER, INSTALL = (
    "bad-manifest", "hash-mismatch", "patch-apply", "size", "transfer", "install")

DELTA_FORMAT = "fota-delta-v1"

# Chunk frames.
FRAME_VERSION = 1
FRAME_HEADER = struct.Struct(">BBHIIII")  # version, kind, reserved, transfer, offset, length, crc
FRAME_DATA, FRAME_ERROR = 0, 1
MIN_CHUNK, MAX_CHUNK, DEFAULT_CHUNK, DEFAULT_WINDOW = 1 << 10, 64 << 10, 16 << 10, 4

# Limits of this device: they bound what a confused or hostile server can make it do.
MAX_IMAGE = 64 << 20      # largest image, and largest patch, accepted
MAX_WINDOW = 32           # requests outstanding at most, whatever the offer says
REQUEST_TIMEOUT = 2.0     # seconds before a chunk request is sent again; doubles per try
MAX_BACKOFF_EXP = 4       # up to 16 x REQUEST_TIMEOUT
MAX_ATTEMPTS = 6          # sends of one range before the job fails with "transfer"
MAX_BUSY = 20             # "busy" answers for one range before the job fails
MAX_JOB_ID = 128
MAX_REASON = 256
MAX_STATE_FILE = 1 << 20

# Connection.
KEEPALIVE = 30
ACK_TIMEOUT = 10.0        # CONNACK, SUBACK, PUBACK
MIN_RECONNECT, MAX_RECONNECT = 0.25, 30.0
STABLE_SESSION = 10.0     # a session this long resets the reconnect backoff
PROGRESS_EVERY = 1.0      # seconds between downloading events
TICK = 0.05               # network poll granularity


class Fatal(Exception):
    """A problem retrying cannot fix: bad flags, files, credentials or a refused identity."""


class Lost(Exception):
    """The connection failed or broke; the device reconnects after a backoff."""


class JobError(Exception):
    """Why a job failed: a protocol reason code and a detail."""

    def __init__(self, reason, detail):
        super().__init__(reason + ": " + detail)
        self.reason = reason


class DeltaError(Exception):
    """A patch that cannot be applied. kind is "bad", "base" (made for another image) or
    "size" (its target is not the signed size)."""

    def __init__(self, kind, msg):
        super().__init__(msg)
        self.kind = kind


def log(msg):
    sys.stderr.write(time.strftime("%H:%M:%S ") + msg + "\n")
    sys.stderr.flush()


def clip(s, n=MAX_REASON):
    return s if len(s) <= n else s[: n - 3] + "..."


# ---------------------------------------------------------------------------------------------
# CRC-32C (Castagnoli), table-driven, reflected polynomial 0x82F63B78.

def _crc32c_table():
    table = []
    for i in range(256):
        c = i
        for _ in range(8):
            c = (c >> 1) ^ 0x82F63B78 if c & 1 else c >> 1
        table.append(c)
    return tuple(table)


CRC32C_TABLE = _crc32c_table()


def crc32c(data, crc=0):
    t = CRC32C_TABLE
    crc ^= 0xFFFFFFFF
    for b in data:
        crc = t[(crc ^ b) & 0xFF] ^ (crc >> 8)
    return crc ^ 0xFFFFFFFF


class FrameError(Exception):
    pass


def parse_frame(b):
    """Returns (kind, transfer, offset, payload) of a chunk frame, or raises FrameError."""
    if len(b) < FRAME_HEADER.size:
        raise FrameError("%d bytes, header is %d" % (len(b), FRAME_HEADER.size))
    version, kind, _reserved, transfer, offset, length, crc = FRAME_HEADER.unpack_from(b)
    if version != FRAME_VERSION:
        raise FrameError("frame version %d" % version)
    if kind not in (FRAME_DATA, FRAME_ERROR):
        raise FrameError("frame kind %d" % kind)
    payload = bytes(b[FRAME_HEADER.size:])
    if length != len(payload):
        raise FrameError("length field %d, payload %d" % (length, len(payload)))
    got = crc32c(payload)
    if got != crc:
        raise FrameError("checksum %08x, header says %08x" % (got, crc))
    return kind, transfer, offset, payload


# ---------------------------------------------------------------------------------------------
# Identifiers and the signed manifest.

HEX64 = re.compile(r"[0-9a-f]{64}")
MODEL = re.compile(r"[A-Za-z0-9._-]{1,64}")
VERSION = re.compile(r"(0|[1-9][0-9]*)\.(0|[1-9][0-9]*)\.(0|[1-9][0-9]*)(?:-([0-9A-Za-z-]+(?:\.[0-9A-Za-z-]+)*))?")
RFC3339 = re.compile(r"(\d{4})-(\d{2})-(\d{2})[Tt](\d{2}):(\d{2}):(\d{2})(\.\d+)?([Zz]|[+-]\d{2}:\d{2})")


def valid_device_id(s):
    """Returns why s is not a device id, or None (PROTOCOL.md "Connection")."""
    n = len(s.encode("utf-8", "surrogatepass"))
    if n == 0 or n > 64:
        return "want 1 to 64 bytes"
    if s == "inline":
        return '"inline" is reserved for the server'
    for ch in s:
        if ch in "/+#$":
            return "may not contain %r" % ch
        if ch == "\ufffd":
            return "is not valid UTF-8"
        if ch.isspace() or unicodedata.category(ch) in ("Cc", "Cs"):
            return "may not contain white space or control characters"
    return None


def valid_version(s):
    return isinstance(s, str) and len(s) <= 64 and VERSION.fullmatch(s) is not None and all(
        int(p) < 1 << 32 for p in VERSION.fullmatch(s).groups()[:3])


def is_uint(v, bits=64):
    return isinstance(v, int) and not isinstance(v, bool) and 0 <= v < 1 << bits


def parse_rfc3339(s):
    m = RFC3339.fullmatch(s)
    try:
        if not m:
            raise ValueError
        y, mo, d, h, mi, sec = (int(m.group(i)) for i in range(1, 7))
        frac = (m.group(7) or ".")[1:]
        micro = int((frac + "000000")[:6])
        z = m.group(8)
        if z in ("Z", "z"):
            tz = datetime.timezone.utc
        else:
            sign = 1 if z[0] == "+" else -1
            tz = datetime.timezone(sign * datetime.timedelta(hours=int(z[1:3]), minutes=int(z[4:6])))
        return datetime.datetime(y, mo, d, h, mi, sec, micro, tzinfo=tz)
    except ValueError:  # no match, or a field out of range (month 13, offset +99:99)
        raise ValueError("%r is not an RFC 3339 time" % s) from None


def _bad(fmt, *args):
    return JobError(BAD_MANIFEST, fmt % args if args else fmt)


def check_fields(m):
    """Step 1 of "What a device checks": the manifest is well formed."""
    if not isinstance(m, dict):
        raise _bad("manifest is not an object")
    if m.get("v") != PROTOCOL_VERSION or not is_uint(m.get("v")):
        raise _bad("manifest version %r, want %d", m.get("v"), PROTOCOL_VERSION)
    if not isinstance(m.get("model"), str) or not MODEL.fullmatch(m["model"]):
        raise _bad("model %r is not 1 to 64 of A-Z a-z 0-9 . _ -", m.get("model"))
    if not valid_version(m.get("version")):
        raise _bad("version %r is not a canonical semantic version", m.get("version"))
    if not is_uint(m.get("counter")):
        raise _bad("counter %r is not an unsigned 64-bit integer", m.get("counter"))
    if not is_uint(m.get("size"), 63) or m["size"] == 0:
        raise _bad("size %r, want > 0", m.get("size"))
    if not isinstance(m.get("sha256"), str) or not HEX64.fullmatch(m["sha256"]):
        raise _bad("sha256 is not 64 lowercase hex digits")
    d = m.get("delta")
    if d is not None:
        if not isinstance(d, dict):
            raise _bad("delta is not an object")
        for k in ("base", "patch_sha256"):
            if not isinstance(d.get(k), str) or not HEX64.fullmatch(d[k]):
                raise _bad("delta.%s is not 64 lowercase hex digits", k)
        if not is_uint(d.get("patch_size"), 63) or d["patch_size"] == 0:
            raise _bad("delta.patch_size %r, want > 0", d.get("patch_size"))
        f = d.get("format")
        if not isinstance(f, str) or not f or len(f) > 32 or any(c in f for c in "=\n\r"):
            raise _bad("delta.format %r is not valid", f)
    exp = m.get("expires")
    if exp is not None and exp != "":
        if not isinstance(exp, str):
            raise _bad("expires is not a string")
        try:
            parse_rfc3339(exp)
        except ValueError as e:
            raise _bad("expires: %s", e)
    if not isinstance(m.get("sig"), str):
        raise _bad("manifest is not signed")


def signing_bytes(m):
    """The bytes the release key signs, built from the fields (PROTOCOL.md "Signing bytes")."""
    d = m.get("delta") or {}
    lines = [
        "fota-manifest-v1",
        "model=" + m["model"],
        "version=" + m["version"],
        "counter=%d" % m["counter"],
        "size=%d" % m["size"],
        "sha256=" + m["sha256"],
        "delta.base=" + d.get("base", ""),
        "delta.patch_sha256=" + d.get("patch_sha256", ""),
        "delta.patch_size=%d" % d.get("patch_size", 0),
        "delta.format=" + d.get("format", ""),
        "expires=" + (m.get("expires") or ""),
    ]
    return ("\n".join(lines) + "\n").encode("utf-8")


def verify_signature(m, pubkey):
    sig_text = m["sig"]
    try:
        sig = base64.b64decode(sig_text, validate=True)
    except ValueError:
        sig = b""
    # Only the one canonical encoding: one manifest, one string.
    if len(sig) != 64 or base64.b64encode(sig).decode("ascii") != sig_text:
        raise _bad("signature is not 64 bytes of padded standard base64")
    try:
        pubkey.verify(sig, signing_bytes(m))
    except InvalidSignature:
        raise _bad("manifest of %s %s not signed by the release key", m["model"], m["version"])


def check_manifest(m, pubkey, model, counter, image_sha256, now=None):
    """Decides from the signed manifest alone whether this device may install it, in the order
    of PROTOCOL.md "What a device checks" (steps 1 to 6). Raises JobError(bad-manifest)."""
    check_fields(m)
    verify_signature(m, pubkey)
    # From here on the fields are the signer's.
    if m["model"] != model:
        raise _bad("manifest for model %r, this device is %r", m["model"], model)
    if m["counter"] <= counter:
        raise _bad("security counter %d, installed %d: not above it", m["counter"], counter)
    if m.get("expires"):
        now = now or datetime.datetime.now(datetime.timezone.utc)
        if now >= parse_rfc3339(m["expires"]):
            raise _bad("manifest expired at %s", m["expires"])
    d = m.get("delta")
    if d is not None:
        if d["base"] != image_sha256:
            raise _bad("delta applies to %s, installed image is %s", d["base"][:12], (image_sha256 or "none")[:12])
        if d["format"] != DELTA_FORMAT:
            raise _bad("delta format %r, this device applies %r", d["format"], DELTA_FORMAT)


def transfer_size(m):
    return m["delta"]["patch_size"] if m.get("delta") is not None else m["size"]


def check_offer(o, pubkey, model, counter, image_sha256, now=None):
    """Checks a decoded offer: its manifest (steps 1-6) and that the size to download is the
    signed one (step 7)."""
    if not is_uint(o.get("v")) or o["v"] != PROTOCOL_VERSION:
        raise _bad("offer version %r not supported", o.get("v"))
    m = o.get("manifest")
    check_manifest(m, pubkey, model, counter, image_sha256, now)
    if m["size"] > MAX_IMAGE:
        raise _bad("image of %d bytes, this device takes at most %d", m["size"], MAX_IMAGE)
    want = transfer_size(m)
    if want > MAX_IMAGE:
        raise _bad("patch of %d bytes, this device takes at most %d", want, MAX_IMAGE)
    if o.get("size") != want:
        raise _bad("offer size %r differs from the signed size %d", o.get("size"), want)


# ---------------------------------------------------------------------------------------------
# fota-delta-v1 (PROTOCOL.md "Delta patches").

DELTA_MAGIC = b"FOTADLT1"
DELTA_HEADER = struct.Struct(">8sB8Q")  # 73 bytes
DELTA_NAMES = ("control", "diff", "extra")


class _Stream:
    """Decodes one raw LZMA2 stream of a patch incrementally, yielding exactly its declared
    decoded length, so that memory stays at a small buffer whatever the header claims."""

    BLOCK = 64 << 10

    def __init__(self, name, comp, decoded):
        self.name = name
        self.d = lzma.LZMADecompressor(lzma.FORMAT_RAW, filters=[{"id": lzma.FILTER_LZMA2, "dict_size": 65536}])
        self.src = comp
        self.declared = decoded
        self.produced = 0
        self.buf = b""
        self.pos = 0

    def _fill(self):
        """Decodes the next block; returns False at the end of the stream."""
        if self.d.eof:
            return False
        try:
            out = self.d.decompress(self.src, max_length=self.BLOCK)
        except lzma.LZMAError as e:
            raise DeltaError("bad", "%s stream: %s" % (self.name, e))
        self.src = b""
        self.produced += len(out)
        if self.produced > self.declared:
            raise DeltaError("bad", "%s stream is longer than its declared %d bytes" % (self.name, self.declared))
        if not out and not self.d.eof and self.d.needs_input:
            raise DeltaError("bad", "%s stream is truncated: no end marker" % self.name)
        self.buf = self.buf[self.pos:] + out
        self.pos = 0
        return bool(out) or not self.d.eof

    def read(self, n):
        while len(self.buf) - self.pos < n:
            if not self._fill():
                raise DeltaError("bad", "%s stream ends early" % self.name)
        b = self.buf[self.pos:self.pos + n]
        self.pos += n
        return b

    def byte(self):
        if self.pos >= len(self.buf):
            while self.pos >= len(self.buf):
                if not self._fill():
                    raise DeltaError("bad", "%s stream ends early" % self.name)
        b = self.buf[self.pos]
        self.pos += 1
        return b

    def uvarint(self):
        x, s = 0, 0
        for i in range(10):
            b = self.byte()
            if b < 0x80:
                if i == 9 and b > 1:
                    break
                return x | b << s
            x |= (b & 0x7F) << s
            s += 7
        raise DeltaError("bad", "%s stream: varint overflows 64 bits" % self.name)

    def finish(self):
        """Checks the stream was used up: every declared byte read, the end marker next, and
        nothing after it."""
        if self.pos < len(self.buf):
            raise DeltaError("bad", "%s stream has bytes left over" % self.name)
        while self._fill():
            if self.pos < len(self.buf):
                raise DeltaError("bad", "%s stream has bytes left over" % self.name)
        if self.produced != self.declared:
            raise DeltaError("bad", "%s stream decodes to %d bytes, declared %d" % (self.name, self.produced, self.declared))
        if self.d.unused_data:
            raise DeltaError("bad", "%s stream has bytes after its end marker" % self.name)


def apply_delta(old, patch, max_target):
    """Rebuilds the target image from the installed image old and a fota-delta-v1 patch. A
    patch for a base of another size, or with a target above max_target, is refused before any
    allocation. The caller checks the result's sha256 against the manifest."""
    if len(patch) < DELTA_HEADER.size:
        raise DeltaError("bad", "patch of %d bytes is shorter than its header" % len(patch))
    fields = DELTA_HEADER.unpack_from(patch)
    if fields[0] != DELTA_MAGIC:
        raise DeltaError("bad", "not a fota delta patch")
    if fields[1] != 0x01:
        raise DeltaError("bad", "unsupported patch format 0x%02x" % fields[1])
    vals = fields[2:]
    if any(v >= 1 << 63 for v in vals):
        raise DeltaError("bad", "patch header integer out of range")
    old_size, new_size = vals[0], vals[1]
    streams = [(vals[2], vals[3]), (vals[4], vals[5]), (vals[6], vals[7])]
    limits = (30 * (new_size + 1), 2 * new_size + 16, new_size)
    for name, (clen, dec), lim in zip(DELTA_NAMES, streams, limits):
        if dec > lim:
            raise DeltaError("bad", "%s stream decodes to %d bytes, more than a %d-byte target allows" % (name, dec, new_size))
        if clen > dec + dec // 8 + 64:
            raise DeltaError("bad", "%s stream is %d bytes, too long for %d decoded bytes" % (name, clen, dec))
    if old_size != len(old):
        raise DeltaError("base", "patch base is %d bytes, installed image is %d" % (old_size, len(old)))
    if new_size > max_target:
        raise DeltaError("size", "patch target is %d bytes, the manifest signs %d" % (new_size, max_target))
    total = DELTA_HEADER.size + sum(c for c, _ in streams)
    if len(patch) < total:
        raise DeltaError("bad", "patch is truncated: %d bytes, header says %d" % (len(patch), total))
    if len(patch) > total:
        raise DeltaError("bad", "%d bytes after the last stream" % (len(patch) - total))
    pos, dec = DELTA_HEADER.size, []
    for name, (clen, n) in zip(DELTA_NAMES, streams):
        dec.append(_Stream(name, patch[pos:pos + clen], n))
        pos += clen
    ctrl, diff, extra = dec

    out = bytearray(new_size)
    newpos = oldpos = 0
    zeros = lits = 0  # pending RLE0 runs of the diff stream
    while newpos < new_size:
        add, copy, seek = ctrl.uvarint(), ctrl.uvarint(), ctrl.uvarint()
        seek = (seek >> 1) ^ -(seek & 1)
        if add > new_size - newpos:
            raise DeltaError("bad", "add of %d at output %d runs past the %d-byte target" % (add, newpos, new_size))
        if add > old_size - oldpos:
            raise DeltaError("bad", "add of %d at base %d runs past the %d-byte base" % (add, oldpos, old_size))
        while add > 0:
            if zeros:
                k = min(add, zeros)
                out[newpos:newpos + k] = old[oldpos:oldpos + k]
                zeros -= k
            elif lits:
                k = min(add, lits)
                lit = diff.read(k)
                out[newpos:newpos + k] = bytes((a + b) & 0xFF for a, b in zip(old[oldpos:oldpos + k], lit))
                lits -= k
            else:
                zeros, lits = diff.uvarint(), diff.uvarint()
                if zeros > new_size or lits > new_size:
                    raise DeltaError("bad", "diff run longer than the target")
                continue
            newpos += k
            oldpos += k
            add -= k
        if copy > new_size - newpos:
            raise DeltaError("bad", "copy of %d at output %d runs past the %d-byte target" % (copy, newpos, new_size))
        out[newpos:newpos + copy] = extra.read(copy)
        newpos += copy
        if seek < -oldpos or seek > old_size - oldpos:
            raise DeltaError("bad", "seek of %d from base %d leaves the %d-byte base" % (seek, oldpos, old_size))
        oldpos += seek
    if zeros or lits:
        raise DeltaError("bad", "diff stream has bytes left over")
    for s in dec:
        s.finish()
    return bytes(out)


# ---------------------------------------------------------------------------------------------
# Flash: two image slots and state.json, in --state-dir.

SLOT_FILES = ("slot-a.bin", "slot-b.bin")
STATE_FILE = "state.json"
JOB_FILE = "job.json"        # the job in progress or last finished: id, event seq, progress
PART_FILE = "download.part"  # bytes of the download in progress


def sha256_hex(b):
    return hashlib.sha256(b).hexdigest()


def write_atomic(directory, name, data):
    """Replaces directory/name with data: temp file, fsync, rename, fsync of the directory, so
    that after a crash it holds either the old content or the new one."""
    fd, tmp = tempfile.mkstemp(prefix="." + name + ".tmp-", dir=directory)
    try:
        with os.fdopen(fd, "wb") as f:
            f.write(data)
            f.flush()
            os.fsync(f.fileno())
        os.replace(tmp, os.path.join(directory, name))
    except BaseException:
        try:
            os.unlink(tmp)
        except OSError:
            pass
        raise
    dfd = os.open(directory, os.O_RDONLY)
    try:
        os.fsync(dfd)
    finally:
        os.close(dfd)


def read_limited(path, limit):
    with open(path, "rb") as f:
        b = f.read(limit + 1)
    if len(b) > limit:
        raise Fatal("%s is larger than %d bytes" % (path, limit))
    return b


class Flash:
    """A device's flash: slot files A and B, and state.json saying which one boots, with its
    version, security counter and sha256. An install writes the inactive slot, then replaces
    state.json in one rename: a crash leaves the old image or the new one, never a mix."""

    def __init__(self, directory, model):
        self.dir = directory
        self.model = model
        self.state = None
        self.image = b""

    def exists(self):
        return os.path.exists(os.path.join(self.dir, STATE_FILE))

    def clean(self):
        """Removes temp files a crash left between create and rename."""
        try:
            names = os.listdir(self.dir)
        except OSError:
            return  # reading the state reports the problem
        for name in names:
            if name.startswith(".") and ".tmp-" in name:
                try:
                    os.unlink(os.path.join(self.dir, name))
                except OSError:
                    pass

    def init(self, version, counter, image):
        os.makedirs(self.dir, mode=0o700, exist_ok=True)
        self.clean()
        write_atomic(self.dir, SLOT_FILES[0], image)
        st = {"model": self.model, "active": 0, "version": version, "counter": counter, "sha256": sha256_hex(image)}
        self._save(st)
        self.state, self.image = st, image

    def load(self):
        self.clean()
        path = os.path.join(self.dir, STATE_FILE)
        try:
            st = json.loads(read_limited(path, MAX_STATE_FILE))
        except (OSError, ValueError) as e:
            raise Fatal("read %s: %s" % (path, e))
        if not isinstance(st, dict):
            raise Fatal("%s does not hold a state object" % path)
        if st.get("model") != self.model:
            raise Fatal("%s is for model %r, this device is %r" % (path, st.get("model"), self.model))
        if st.get("active") not in (0, 1) or isinstance(st.get("active"), bool):
            raise Fatal("%s: active slot %r, want 0 or 1" % (path, st.get("active")))
        if not valid_version(st.get("version")) or not is_uint(st.get("counter")):
            raise Fatal("%s: bad version or counter" % path)
        if not isinstance(st.get("sha256"), str) or not HEX64.fullmatch(st["sha256"]):
            raise Fatal("%s: sha256 is not 64 lowercase hex digits" % path)
        # Boot only an image that is what the state says: a slot damaged behind the device's
        # back must not run, nor serve as the base of a delta.
        slot = os.path.join(self.dir, SLOT_FILES[st["active"]])
        try:
            img = read_limited(slot, MAX_IMAGE)
        except OSError as e:
            raise Fatal("read slot: %s" % e)
        if sha256_hex(img) != st["sha256"]:
            raise Fatal("%s has sha256 %s, %s says %s" % (slot, sha256_hex(img), path, st["sha256"]))
        self.state, self.image = st, img

    def install(self, manifest, image):
        nxt = 1 - self.state["active"]
        write_atomic(self.dir, SLOT_FILES[nxt], image)
        st = dict(self.state, active=nxt, version=manifest["version"], sha256=sha256_hex(image),
                  counter=max(self.state["counter"], manifest["counter"]))
        self._save(st)  # the switch: slot, version and counter change together
        self.state, self.image = st, image

    def _save(self, st):
        write_atomic(self.dir, STATE_FILE, (json.dumps(st, indent=2) + "\n").encode())

    def slot(self):
        return "AB"[self.state["active"]]


# ---------------------------------------------------------------------------------------------
# The download: fixed ranges of chunk_size bytes, requested with a bounded window.

PENDING, OUTSTANDING, DONE = 0, 1, 2


class _Chunk:
    __slots__ = ("state", "attempts", "busy", "due", "past")

    def __init__(self):
        self.state, self.attempts, self.busy, self.due, self.past = PENDING, 0, 0, 0.0, False


class Exhausted(Exception):
    def __init__(self, reason, msg):
        super().__init__(msg)
        self.reason = reason


class Download:
    def __init__(self, offer, timeout=REQUEST_TIMEOUT):
        cs = offer.get("chunk_size")
        if not is_uint(cs, 31) or cs == 0:
            cs = DEFAULT_CHUNK
        # Below the protocol's minimum a server is out of contract; asking for at least 1 KiB
        # keeps the bookkeeping of a 64 MiB image bounded.
        cs = max(min(cs, MAX_CHUNK), MIN_CHUNK)
        w = offer.get("window")
        if not is_uint(w, 31) or w == 0:
            w = DEFAULT_WINDOW
        self.transfer = offer["transfer"]
        self.size = offer["size"]
        self.chunk_size = cs
        self.window = min(w, MAX_WINDOW)
        self.timeout = timeout
        self.buf = bytearray(self.size)
        self.chunks = [_Chunk() for _ in range((self.size + cs - 1) // cs)]
        self.next = 0        # first range never asked for
        self.retry = []      # ranges to ask again, oldest first
        self.inflight = []   # outstanding ranges
        self.received = 0

    def span(self, i):
        off = i * self.chunk_size
        return off, min(self.chunk_size, self.size - off)

    def index(self, off):
        """The outstanding range that starts at off, or -1."""
        if off % self.chunk_size or off >= self.size:
            return -1
        i = off // self.chunk_size
        return i if self.chunks[i].state == OUTSTANDING else -1

    def complete(self):
        return self.received == self.size

    def wait(self, attempts):
        return self.timeout * (1 << min(attempts, MAX_BACKOFF_EXP))

    def done_bitmap(self):
        bits = bytearray((len(self.chunks) + 7) // 8)
        for i, c in enumerate(self.chunks):
            if c.state == DONE:
                bits[i >> 3] |= 1 << (i & 7)
        return base64.b64encode(bytes(bits)).decode("ascii")

    def restore(self, bitmap, data):
        """Marks the ranges of a persisted download done, with their bytes."""
        for i, c in enumerate(self.chunks):
            if i >> 3 < len(bitmap) and bitmap[i >> 3] >> (i & 7) & 1:
                off, n = self.span(i)
                self.buf[off:off + n] = data[off:off + n]
                c.state = DONE
                self.received += n
        while self.next < len(self.chunks) and self.chunks[self.next].state == DONE:
            self.next += 1

    def requests(self, now):
        """Marks up to the window's worth of ranges outstanding and returns (offset, length)
        of each: ranges to ask again first, then new ones in order."""
        reqs = []
        while len(self.inflight) < self.window:
            i = -1
            for k, r in enumerate(self.retry):
                if self.chunks[r].due <= now:
                    i = r
                    del self.retry[k]
                    break
            while i < 0 and self.next < len(self.chunks):
                if self.chunks[self.next].state != DONE:
                    i = self.next
                self.next += 1
            if i < 0:
                break
            c = self.chunks[i]
            c.state, c.due = OUTSTANDING, now + self.wait(c.attempts)
            self.inflight.append(i)
            reqs.append(self.span(i))
        return reqs

    def accept(self, off, payload):
        """Stores an answer: returns the bytes taken, 0 for a frame that answers nothing
        outstanding, -1 for one of the wrong length. Nothing past size is ever stored."""
        i = self.index(off)
        if i < 0:
            return 0
        o, n = self.span(i)
        if len(payload) != n:
            self.chunks[i].past = o + len(payload) > self.size
            return -1
        self.buf[o:o + n] = payload
        self.chunks[i].state = DONE
        self.inflight.remove(i)
        self.received += n
        return n

    def _requeue(self, i, not_before):
        self.inflight.remove(i)
        c = self.chunks[i]
        c.state, c.due = PENDING, not_before
        self.retry.append(i)

    def reask(self, off, now):
        """A corrupt or malformed answer at off: that range is asked again now."""
        i = self.index(off)
        if i < 0:
            return
        c = self.chunks[i]
        c.attempts += 1
        if c.attempts >= MAX_ATTEMPTS:
            if c.past:
                raise Exhausted(SIZE, "answers at offset %d ran past %d bytes %d times" % (off, self.size, c.attempts))
            raise Exhausted(TRANSFER, "offset %d corrupt %d times" % (off, c.attempts))
        c.past = False
        self._requeue(i, now)

    def busy(self, off, now):
        """A "busy" answer: asked again after a growing, jittered pause."""
        i = self.index(off)
        if i < 0:
            return
        c = self.chunks[i]
        c.busy += 1
        if c.busy > MAX_BUSY:
            raise Exhausted(TRANSFER, "offset %d: server busy %d times" % (off, c.busy))
        d = self.wait(c.busy - 1)
        self._requeue(i, now + d / 2 + random.uniform(0, d / 2))

    def expire(self, now):
        """Re-queues overdue requests; fails once one range was sent MAX_ATTEMPTS times."""
        for i in [i for i in self.inflight if self.chunks[i].due <= now]:
            c = self.chunks[i]
            c.attempts += 1
            if c.attempts >= MAX_ATTEMPTS:
                raise Exhausted(TRANSFER, "offset %d unanswered after %d requests" % (self.span(i)[0], c.attempts))
            self._requeue(i, now)

    def reset(self):
        """After a lost connection: outstanding answers cannot arrive any more, so they are
        asked again at once, without counting as attempts."""
        for i in list(self.inflight):
            self._requeue(i, 0.0)


# ---------------------------------------------------------------------------------------------
# The device.

class Job:
    def __init__(self, jid, offer=None, from_version="", seq=0):
        self.id = jid
        self.offer = offer
        self.manifest = offer["manifest"] if offer else None
        to = self.manifest.get("version") if offer else ""
        self.to = to if isinstance(to, str) else ""  # checked later; the offer may be refused
        self.from_version = from_version
        self.state = IDLE
        self.reason = ""
        self.seq = seq
        self.bytes = 0
        self.dl = None
        self.progress = 0.0
        self.reported = False

    def active(self):
        return self.state in (DOWNLOADING, VERIFYING, INSTALLING)


class Device:
    def __init__(self, args, tls, pubkey, flash):
        self.id = args.id
        self.model = args.model
        self.host, self.port = args.host, args.port
        self.tls = tls
        self.pubkey = pubkey
        self.flash = flash
        self.until_updated = args.until_updated
        self.deadline = time.monotonic() + args.timeout if args.timeout else None
        self.request_timeout = args.request_timeout
        self.job = None
        self.seqs = {}           # last event seq of jobs seen, so a job offered again continues
        self.resume = None       # a download persisted by an earlier run
        self._part = None        # file with the bytes of the download in progress
        self.reboot = False
        self.result = None       # why --until-updated gives up, once it does
        self.updated = False
        self.client = None
        self.inbox = collections.deque()
        self.last_event = None   # MQTTMessageInfo of the latest event
        self.topic = lambda suffix: "%s/%s/%s" % (ROOT, self.id, suffix)
        self._load_job()

    # -- persistence of the job across restarts -----------------------------------------------

    def _load_job(self):
        path = os.path.join(self.flash.dir, JOB_FILE)
        try:
            rec = json.loads(read_limited(path, MAX_STATE_FILE))
        except FileNotFoundError:
            return
        except (OSError, ValueError, Fatal) as e:
            log("ignoring %s: %s" % (path, e))
            return
        if not isinstance(rec, dict) or not isinstance(rec.get("job"), str) or not is_uint(rec.get("seq")):
            return
        self.seqs[rec["job"]] = rec["seq"]
        if rec.get("state") == INSTALLING and rec.get("to") == self.flash.state["version"]:
            # Died between the slot switch and the confirmation: we are up on the new image.
            j = Job(rec["job"], seq=rec["seq"])
            j.state, j.to = INSTALLING, rec["to"]
            self.job = j
        elif rec.get("state") == DOWNLOADING:
            self.resume = rec

    def _save_job(self, j):
        rec = {"job": j.id, "seq": j.seq, "state": j.state, "to": j.to}
        try:
            if j.state == DOWNLOADING and j.dl is not None and self._part is not None:
                # The bytes first, then the record that says they are there.
                os.fsync(self._part.fileno())
                m = j.manifest
                rec.update(artifact=m["delta"]["patch_sha256"] if m.get("delta") else m["sha256"],
                           size=j.dl.size, chunk_size=j.dl.chunk_size, done=j.dl.done_bitmap())
            write_atomic(self.flash.dir, JOB_FILE, json.dumps(rec).encode())
        except OSError as e:
            log("save %s: %s" % (JOB_FILE, e))

    def _open_part(self, j):
        """Opens the file that holds the download's bytes, resuming a persisted download of the
        same artifact when there is one."""
        self._close_part(remove=False)
        m, dl = j.manifest, j.dl
        artifact = m["delta"]["patch_sha256"] if m.get("delta") else m["sha256"]
        path = os.path.join(self.flash.dir, PART_FILE)
        r, self.resume = self.resume, None
        if (r and r.get("artifact") == artifact and r.get("size") == dl.size
                and r.get("chunk_size") == dl.chunk_size and isinstance(r.get("done"), str)):
            try:
                data = read_limited(path, MAX_IMAGE)
                if len(data) == dl.size:
                    dl.restore(base64.b64decode(r["done"]), data)
                    j.bytes = dl.received
                    log("resuming download: %d of %d bytes already here" % (dl.received, dl.size))
            except (OSError, ValueError, Fatal) as e:
                log("cannot resume download: %s" % e)
        try:
            fd = os.open(path, os.O_RDWR | os.O_CREAT, 0o600)
            self._part = os.fdopen(fd, "r+b")
            if dl.received == 0:
                self._part.truncate(0)
            self._part.truncate(dl.size)
        except OSError as e:
            log("cannot keep the download in %s, it will not survive a restart: %s" % (path, e))
            self._part = None

    def _close_part(self, remove=True):
        if self._part is not None:
            self._part.close()
            self._part = None
        if remove:
            try:
                os.unlink(os.path.join(self.flash.dir, PART_FILE))
            except OSError:
                pass

    # -- messages ------------------------------------------------------------------------------

    def status(self):
        st = {"v": PROTOCOL_VERSION, "model": self.model, "version": self.flash.state["version"],
              "sha256": self.flash.state["sha256"], "state": IDLE}
        if self.flash.state["counter"]:
            # The installed image's counter, so the server need not offer what this device
            # refuses; 0 (unknown) is left out.
            st["counter"] = self.flash.state["counter"]
        if self.job is not None:
            st["state"], st["job"] = self.job.state, self.job.id
        return st

    def emit(self, j, state, **extra):
        """Sends the job's next event (QoS 1, not waited for: a lost one is covered by the next
        Status and the server's repeated offer)."""
        j.seq += 1
        self.seqs[j.id] = j.seq
        if len(self.seqs) > 16:
            self.seqs.pop(next(k for k in self.seqs if k != j.id))
        ev = {"v": PROTOCOL_VERSION, "job": j.id, "seq": j.seq, "state": state}
        if state not in (INSTALLED, FAILED) and j.bytes:
            ev["bytes"] = j.bytes
        ev.update(extra)
        if j is self.job:
            self._save_job(j)
        self.last_event = self.client.publish(self.topic("event"), json.dumps(ev, separators=(",", ":")), qos=1)

    def on_offer(self, payload, now):
        try:
            o = json.loads(payload)
        except ValueError as e:
            log("offer ignored: undecodable: %s" % e)
            return
        if not isinstance(o, dict) or not isinstance(o.get("job"), str) or not 0 < len(o["job"]) <= MAX_JOB_ID:
            log("offer ignored: no valid job id")
            return
        if not is_uint(o.get("transfer"), 32) or not is_uint(o.get("size"), 63) or not isinstance(o.get("manifest"), dict):
            log("offer ignored: bad transfer, size or manifest")
            return
        jid, cur = o["job"], self.job
        if cur is not None and cur.id == jid:
            if cur.active():
                return  # a repeated offer does not restart the job
            if cur.state == INSTALLED:
                self.emit(cur, INSTALLED, version=self.flash.state["version"])
                return
            # failed before: the server asks for another attempt
        j = Job(jid, o, self.flash.state["version"], self.seqs.get(jid, 0))
        st = self.flash.state
        try:
            check_offer(o, self.pubkey, self.model, st["counter"], st["sha256"])
        except JobError as e:
            j.state, j.reason = FAILED, clip(str(e))
            log("offer %s refused: %s" % (jid, j.reason))
            if cur is None or not cur.active():
                self.job = j
                self._finish_failed(j)
            self.emit(j, FAILED, reason=j.reason)
            return
        if cur is not None and cur.active():
            log("job %s superseded by %s" % (cur.id, jid))
        m = o["manifest"]
        j.state, j.progress = DOWNLOADING, now
        j.dl = Download(o, self.request_timeout)
        self.job = j
        self._open_part(j)
        log("job %s: downloading %s %s, %d bytes (%s)" % (
            jid, m["model"], m["version"], o["size"], "delta from " + st["version"] if m.get("delta") else "full image"))
        self.emit(j, DOWNLOADING)
        if j.dl.complete():
            self.finish(j)
        else:
            self.pump(j, now)

    def pump(self, j, now):
        for off, n in j.dl.requests(now):
            req = json.dumps({"job": j.id, "off": off, "len": n}, separators=(",", ":"))
            # QoS 0: a lost request is the same as a lost answer; the timeout covers both.
            self.client.publish(self.topic("req"), req, qos=0)

    def on_chunk(self, b, now):
        j = self.job
        if j is None or j.state != DOWNLOADING:
            return
        dl = j.dl
        try:
            kind, transfer, off, payload = parse_frame(b)
        except FrameError:
            # The header is not covered by the checksum, but if it names this transfer and an
            # outstanding range, asking for that range again is cheap and harmless.
            if len(b) >= FRAME_HEADER.size and b[0] == FRAME_VERSION:
                _, _, _, transfer, off, _, _ = FRAME_HEADER.unpack_from(b)
                if transfer == dl.transfer:
                    self.check(j, lambda: dl.reask(off, now), now)
            return
        if transfer != dl.transfer:
            return
        if kind == FRAME_ERROR:
            code = payload[:32].decode("ascii", "replace")
            if code == "busy":
                self.check(j, lambda: dl.busy(off, now), now)
            elif code in ("range", "no-job"):
                self.fail(j, "%s: server says %r at offset %d" % (TRANSFER, code, off))
            else:  # "internal" or unknown: the server may recover; ask again, counting a try
                log("chunk error %r at offset %d" % (code, off))
                self.check(j, lambda: dl.reask(off, now), now)
            return
        n = dl.accept(off, payload)
        if n < 0:
            self.check(j, lambda: dl.reask(off, now), now)
            return
        if n == 0:
            return
        j.bytes += n
        if self._part is not None:
            try:
                os.pwrite(self._part.fileno(), payload, off)
            except OSError as e:
                log("write %s: %s" % (PART_FILE, e))
                self._close_part(remove=True)
        if dl.complete():
            self.finish(j)
            return
        if now - j.progress >= PROGRESS_EVERY:
            j.progress = now
            self.emit(j, DOWNLOADING)
        self.pump(j, now)

    def on_tick(self, now):
        j = self.job
        if j is not None and j.state == DOWNLOADING:
            self.check(j, lambda: j.dl.expire(now), now)

    def check(self, j, step, now):
        """Runs a download step; fails the job when it gives up, else sends what is due."""
        try:
            step()
        except Exhausted as e:
            self.fail(j, "%s: %s" % (e.reason, e))
            return
        self.pump(j, now)

    def fail(self, j, reason):
        j.state, j.reason, j.dl = FAILED, clip(reason), None
        self._close_part()
        log("job %s failed: %s" % (j.id, j.reason))
        self.emit(j, FAILED, reason=j.reason)
        self._finish_failed(j)

    def _finish_failed(self, j):
        if self.until_updated and self.result is None:
            self.result = "update failed: job %s: %s" % (j.id, j.reason)

    def finish(self, j):
        """Verifies the download, builds the image from it for a delta, and installs it into
        the inactive slot; then the device reboots."""
        m = j.manifest
        j.state = VERIFYING
        self.emit(j, VERIFYING)
        data, j.dl = bytes(j.dl.buf), None
        self._close_part()
        try:
            image = self.verify(m, data)
        except JobError as e:
            self.fail(j, str(e))
            return
        j.state = INSTALLING
        self.emit(j, INSTALLING)
        try:
            self.flash.install(m, image)
        except OSError as e:
            self.fail(j, "%s: %s" % (INSTALL, e))
            return
        log("job %s: installed %s in slot %s (counter %d); rebooting" % (
            j.id, m["version"], self.flash.slot(), self.flash.state["counter"]))
        self.reboot = True

    def verify(self, m, data):
        """Step 8: the image the download stands for, once it matches the manifest exactly."""
        d = m.get("delta")
        if d is None:
            image = data
        else:
            # The patch is checked against its signed hash before a byte of it is parsed.
            if len(data) != d["patch_size"]:
                raise JobError(SIZE, "patch of %d bytes, manifest says %d" % (len(data), d["patch_size"]))
            if sha256_hex(data) != d["patch_sha256"]:
                raise JobError(HASH_MISMATCH, "patch sha256 %s, manifest says %s" % (sha256_hex(data)[:12], d["patch_sha256"][:12]))
            try:
                image = apply_delta(self.flash.image, data, m["size"])
            except DeltaError as e:
                # The patch arrived as signed, so it is not a hash mismatch: one made for
                # another base was offered wrongly, anything else cannot be applied.
                reason = BAD_MANIFEST if e.kind == "base" else PATCH_APPLY
                raise JobError(reason, "apply patch: %s" % e)
        if len(image) != m["size"]:
            raise JobError(SIZE, "image of %d bytes, manifest says %d" % (len(image), m["size"]))
        if sha256_hex(image) != m["sha256"]:
            raise JobError(HASH_MISMATCH, "image sha256 %s, manifest says %s" % (sha256_hex(image)[:12], m["sha256"][:12]))
        return image

    # -- connection ----------------------------------------------------------------------------

    def left(self):
        return None if self.deadline is None else self.deadline - time.monotonic()

    def run(self):
        """Connects and serves until --until-updated is satisfied (returns None) or fails
        (returns the failure). Without --until-updated it runs until stopped."""
        cur = 0.0
        while True:
            start = time.monotonic()
            try:
                self.session()
            except Lost as e:
                if self.result is not None:
                    return self.result
                if self.reboot:
                    continue
                if time.monotonic() - start > STABLE_SESSION:
                    cur = 0.0
                # Exponential backoff with half of each wait random ("equal jitter"), so a fleet
                # that lost its server does not come back at the same instant.
                cur = min(max(2 * cur, MIN_RECONNECT), MAX_RECONNECT)
                wait = cur / 2 + random.uniform(0, cur / 2)
                log("%s; reconnecting in %.2fs" % (e, wait))
                if self.left() is not None and self.left() < wait:
                    return "timed out: %s" % e
                time.sleep(wait)
                continue
            if self.result is not None:
                return self.result
            if self.updated:
                return None
            if self.reboot:
                log("rebooting into %s" % self.flash.state["version"])
                cur = 0.0

    def _wait(self, cond, what, timeout=ACK_TIMEOUT):
        end = time.monotonic() + timeout
        while not cond():
            if time.monotonic() > end:
                raise Lost("no %s within %.0fs" % (what, timeout))
            self._loop()

    def _loop(self, timeout=TICK):
        rc = self.client.loop(timeout=timeout)
        if rc != mqtt.MQTT_ERR_SUCCESS:
            raise Lost("connection lost: %s" % mqtt.error_string(rc))
        left = self.left()
        if left is not None and left <= 0:
            j = self.job
            what = "no update" if j is None else "job %s %s (%d bytes)" % (j.id, j.state, j.bytes)
            self.result = self.result or "timed out: %s" % what
            raise Lost("timed out")

    def session(self):
        """One MQTT connection: status, then offers, chunks and request timeouts until the
        connection breaks or an install asks for a reboot."""
        self.reboot = False
        connack, granted = [], []
        c = mqtt.Client(client_id=self.id, clean_session=True, protocol=mqtt.MQTTv311)
        c.tls_set_context(self.tls)
        c.on_connect = lambda _c, _u, _f, rc: connack.append(rc)
        c.on_subscribe = lambda _c, _u, _mid, qos: granted.extend(qos)
        c.on_message = lambda _c, _u, msg: self.inbox.append((msg.topic, msg.payload))
        self.client, self.inbox = c, collections.deque()
        try:
            try:
                c.connect(self.host, self.port, keepalive=KEEPALIVE)
            except ssl.SSLCertVerificationError as e:
                raise Fatal("TLS: the server's certificate does not check out against --ca: %s" % e.verify_message)
            except (OSError, ssl.SSLError) as e:
                raise Lost("connect %s:%d: %s" % (self.host, self.port, getattr(e, "strerror", None) or e))
            try:
                self._wait(lambda: connack, "CONNACK")
            except Lost:
                if not connack:  # paho reports a refused CONNACK as a lost connection too
                    raise
            if connack[0] != 0:
                msg = "broker refused the connection: %s" % mqtt.connack_string(connack[0]).rstrip(".")
                if connack[0] == 5:
                    raise Fatal(msg + " (is --id the device id in --cert?)")
                if connack[0] in (1, 2, 4):
                    raise Fatal(msg)
                raise Lost(msg)
            job_t, chunk_t = self.topic("job"), self.topic("chunk")
            c.subscribe([(job_t, 1), (chunk_t, 0)])
            self._wait(lambda: granted, "SUBACK")
            if any(q not in (0, 1, 2) for q in granted):
                raise Fatal("broker refused the subscription to %s and %s: %r" % (job_t, chunk_t, granted))
            self.serve()
        finally:
            try:
                c.disconnect()
                c.loop(timeout=0.1)
            except Exception:
                pass
            self.client = None

    def serve(self):
        j = self.job
        if j is not None and j.state == INSTALLING:
            j.state = INSTALLED  # back up after the reboot, on the new image
            log("job %s: running %s" % (j.id, self.flash.state["version"]))
        info = self.client.publish(self.topic("status"), json.dumps(self.status(), separators=(",", ":")), qos=1)
        self._wait(info.is_published, "PUBACK of the status")
        if j is not None:
            if j.state == INSTALLED and not j.reported:
                self.emit(j, INSTALLED, version=self.flash.state["version"])
                self._wait(self.last_event.is_published, "PUBACK of the installed event")
                j.reported = True
                if self.until_updated:
                    self.updated = True
                    return
            elif j.state == DOWNLOADING:
                j.dl.reset()
                self.pump(j, time.monotonic())
        while not self.reboot:
            self._loop()
            now = time.monotonic()
            while self.inbox:
                topic, payload = self.inbox.popleft()
                if topic.endswith("/job"):
                    self.on_offer(payload, now)
                elif topic.endswith("/chunk"):
                    self.on_chunk(payload, now)
            self.on_tick(now)
            if self.result is not None:
                # Let the failed event reach the server before leaving.
                if self.last_event is not None:
                    try:
                        self._wait(self.last_event.is_published, "PUBACK of the failed event", 2.0)
                    except Lost:
                        pass
                return
        # Before the reboot, the server must have the installing event.
        self._wait(self.last_event.is_published, "PUBACK of the installing event")


# ---------------------------------------------------------------------------------------------
# Command line.

def parse_args(argv):
    p = argparse.ArgumentParser(
        prog="fota_device.py",
        description="A fota device: connects to a fota server over MQTT with mutual TLS and installs "
                    "the firmware it is offered when the signed manifest checks out.")
    p.add_argument("--broker", required=True, metavar="HOST:PORT", help="the fota server's MQTT address")
    p.add_argument("--ca", required=True, metavar="FILE", help="fleet CA certificate (ca.crt)")
    p.add_argument("--cert", required=True, metavar="FILE", help="this device's certificate")
    p.add_argument("--key", required=True, metavar="FILE", help="this device's private key")
    p.add_argument("--id", required=True, help="device id: the certificate's common name")
    p.add_argument("--model", required=True, help="hardware model")
    p.add_argument("--version", help="version of the installed firmware (when --state-dir holds no state yet)")
    p.add_argument("--image", metavar="FILE", help="the installed firmware image (when --state-dir holds no state yet)")
    p.add_argument("--counter", type=int, default=0, help="security counter of the installed firmware (default 0)")
    p.add_argument("--state-dir", required=True, metavar="DIR", help="the device's flash: slot files and state.json")
    p.add_argument("--pubkey", required=True, metavar="FILE", help="the release public key to pin (release.pub)")
    p.add_argument("--until-updated", action="store_true", help="exit 0 once a newer version is installed, non-zero on failure")
    p.add_argument("--timeout", type=float, default=0, metavar="SECONDS", help="give up after this long (default: never)")
    p.add_argument("--request-timeout", type=float, default=REQUEST_TIMEOUT, help=argparse.SUPPRESS)
    args = p.parse_args(argv)

    host, sep, port = args.broker.rpartition(":")
    host = host[1:-1] if host.startswith("[") and host.endswith("]") else host
    if not sep or not host or not port.isdigit() or not 0 < int(port) < 65536:
        p.error("--broker %r: want HOST:PORT" % args.broker)
    args.host, args.port = host, int(port)
    why = valid_device_id(args.id)
    if why:
        p.error("--id %r: %s" % (args.id, why))
    if not MODEL.fullmatch(args.model):
        p.error("--model %r: want 1 to 64 of A-Z a-z 0-9 . _ -" % args.model)
    if args.version is not None and not valid_version(args.version):
        p.error("--version %r: want a semantic version such as 7.27.0" % args.version)
    if not is_uint(args.counter):
        p.error("--counter %d: want 0 to 2^64-1" % args.counter)
    if args.timeout < 0 or args.request_timeout <= 0:
        p.error("--timeout must not be negative")
    return args


def load_tls(args):
    ctx = ssl.SSLContext(ssl.PROTOCOL_TLS_CLIENT)  # verifies the server's certificate and name
    ctx.minimum_version = ssl.TLSVersion.TLSv1_2
    try:
        ctx.load_verify_locations(cafile=args.ca)
    except (OSError, ssl.SSLError) as e:
        raise Fatal("--ca %s: %s" % (args.ca, getattr(e, "strerror", None) or e))
    try:
        ctx.load_cert_chain(args.cert, args.key)
    except (OSError, ssl.SSLError) as e:
        raise Fatal("--cert %s / --key %s: %s" % (args.cert, args.key, getattr(e, "strerror", None) or e))
    return ctx


def load_pubkey(path):
    try:
        with open(path, "rb") as f:
            key = serialization.load_pem_public_key(f.read(64 << 10))
    except OSError as e:
        raise Fatal("--pubkey %s: %s" % (path, e.strerror or e))
    except ValueError:
        raise Fatal("--pubkey %s: not a PEM public key (want release.pub)" % path)
    if not isinstance(key, Ed25519PublicKey):
        raise Fatal("--pubkey %s: not an ed25519 key" % path)
    return key


def open_flash(args):
    flash = Flash(args.state_dir, args.model)
    if flash.exists():
        flash.load()
        st = flash.state
        log("resuming from %s: %s in slot %s, counter %d" % (args.state_dir, st["version"], flash.slot(), st["counter"]))
        return flash
    if args.version is None or args.image is None:
        raise Fatal("--state-dir %s holds no state yet: --version and --image are required" % args.state_dir)
    try:
        image = read_limited(args.image, MAX_IMAGE)
    except OSError as e:
        raise Fatal("--image %s: %s" % (args.image, e.strerror or e))
    try:
        flash.init(args.version, args.counter, image)
    except OSError as e:
        raise Fatal("--state-dir %s: %s" % (args.state_dir, e.strerror or e))
    return flash


class _Stop(Exception):
    pass


def _stop(_signum, _frame):
    raise _Stop()


def main(argv=None):
    args = parse_args(sys.argv[1:] if argv is None else argv)
    prog = "fota_device.py"
    if mqtt is None or Ed25519PublicKey is None:
        missing = " and ".join(n for n, m in (("python3-paho-mqtt", mqtt), ("python3-cryptography", Ed25519PublicKey)) if m is None)
        sys.stderr.write("%s: error: %s is not installed (apt-get install %s)\n" % (prog, missing, missing))
        return 1
    signal.signal(signal.SIGTERM, _stop)
    try:
        pubkey = load_pubkey(args.pubkey)
        tls = load_tls(args)
        flash = open_flash(args)
        dev = Device(args, tls, pubkey, flash)
        log("device %s (%s) running %s, counter %d, connecting to %s:%d" % (
            args.id, args.model, flash.state["version"], flash.state["counter"], args.host, args.port))
        failure = dev.run()
    except Fatal as e:
        sys.stderr.write("%s: error: %s\n" % (prog, e))
        return 1
    except (KeyboardInterrupt, _Stop):
        log("stopped")
        return 1 if args.until_updated else 0
    if failure:
        sys.stderr.write("%s: error: %s\n" % (prog, failure))
        return 1
    log("updated to %s" % flash.state["version"])
    return 0


if __name__ == "__main__":
    sys.exit(main())
