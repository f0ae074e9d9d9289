"""Wire codec of the qkdgate peer protocol, version 1 (docs/protocol.md 4).

Theory of operation: every message is ``core || cookie_len(1) || cookie ||
mac1(16)``. The *core* is a fixed 24-byte header followed by the fields of
its type, declared as data in :data:`SCHEMAS` (pyroute2 style) so the
encoder, the decoder and the document cannot drift apart. Transcripts and
signatures cover cores only; the cookie and mac1 are the envelope that the
cheap DoS checks look at before anything expensive happens.

:func:`decode` is total over bytes: it returns a :class:`Message` or raises
:class:`~qkdgate.errors.RemoteProtocolError`, nothing else (tests/fuzz).
It checks structure and value domains, not authenticity; the session does
that (mac1 first, then cookie, then signatures and confirmation tags).
"""

from __future__ import annotations

import enum
import hashlib
import hmac
import itertools
import struct
import uuid
from collections.abc import Mapping
from dataclasses import dataclass
from typing import Any

from qkdgate.errors import LocalProtocolError, RemoteProtocolError
from qkdgate.gateway.protocol.constants import (
    COOKIE_LEN,
    LABEL,
    MAC_LEN,
    MAX_DETAIL,
    MAX_KEY_IDS,
    MAX_SPIS,
    VERSION,
)

__all__ = ["CONSUMER_KINDS", "COOKIE_LEN", "LABEL", "MAC_LEN", "MAX_DETAIL", "MAX_KEY_IDS",
           "MAX_SPIS", "VERSION", "AbortCode", "Message", "MsgType", "QkdMode", "QkdReason",
           "check_mac1", "decode", "encode_core", "encode_fields", "mac1_key", "seal",
           "transcript_hash"]

HEADER = struct.Struct("!BBHQQI")   # type, version, flags, sender epoch, receiver epoch, xid


class MsgType(enum.IntEnum):
    INIT = 1
    RESP = 2
    CONFIRM = 3
    DONE = 4
    ABORT = 5
    COOKIE = 6
    STALE = 7         # "your epoch is below the one I know" (docs/protocol.md 4.10, 10.1)


class QkdMode(enum.IntEnum):
    NONE = 0          # this pair has no QKD link (configuration)
    KEYS = 1          # the sender is master: key_IDs carried here
    EXPECT = 2        # INIT from a slave: the responder (master) must supply IDs
    ABSENT = 3        # QKD requested but unavailable: PQC-only (reason code)
    USING = 4         # RESP from a slave: fetched the initiator's key_IDs


class QkdReason(enum.IntEnum):
    NONE = 0
    UNAVAILABLE = 1   # key source has no key / link down
    TIMEOUT = 2
    AUTH = 3          # KME refused us
    PROTOCOL = 4      # KME answered nonsense
    PEER = 5          # the peer asked for PQC-only


class AbortCode(enum.IntEnum):
    QKD_KEY_LOST = 1        # dec_keys said the key_ID is unknown (lost response)
    QKD_UNAVAILABLE = 2     # slave could not fetch, or master could not get keys
    POLICY = 3              # PQC-only not allowed here / QKD roles mismatch
    INSTALL_FAILED = 4      # the kernel refused our SAs
    SUITE_MISMATCH = 5      # KEM / X25519 choice differs from ours
    AUTH_FAILED = 6         # your confirmation did not verify (informational)


KEM_IDS = {"ML-KEM-768": 1, "ML-KEM-1024": 2}
KEM_NAMES = {v: k for k, v in KEM_IDS.items()}
# The key consumer each tunnel entry is for (docs/protocol.md 4.2, docs/consumers.md):
# IPsec (XFRM) carries the SPI the sender receives on, MACsec the AN; the
# consumers keyed with one key per generation (WireGuard PSK, strongSwan PPK)
# have nothing per-SA to announce and carry a value that must be 0.
TUNNEL_KIND_IDS = {"ipsec": 1, "macsec": 2, "wireguard": 3, "strongswan": 4}
CONSUMER_KINDS = frozenset({"wireguard", "strongswan"})
TUNNEL_KINDS = {v: k for k, v in TUNNEL_KIND_IDS.items()}

# Field types: u8 u16 u64 (big-endian), bN (exactly N bytes), var16 (u16
# length + bytes), keyids (u8 form|count + 16-byte binary UUIDs, each after a
# u8 source index in the sourced form; docs/protocol.md 4.2, 9.1), spis (u16 count,
# each u8 id length + UTF-8 id + u8 kind + u32 value; TUNNEL_KIND_IDS), str8 (u8 length +
# printable ASCII).
SCHEMAS: dict[MsgType, tuple[tuple[str, str], ...]] = {
    MsgType.INIT: (("generation_min", "u64"), ("nonce", "b32"), ("kem_id", "u16"),
                   ("kem_public", "var16"), ("x25519_public", "var16"),
                   ("qkd_mode", "u8"), ("qkd_reason", "u8"), ("qkd_flags", "u8"),
                   ("key_ids", "keyids"), ("spis", "spis"), ("signer_id", "b8"),
                   ("ed25519_sig", "b64")),
    MsgType.RESP: (("generation", "u64"), ("nonce", "b32"), ("kem_ciphertext", "var16"),
                   ("x25519_public", "var16"), ("qkd_mode", "u8"), ("qkd_reason", "u8"),
                   ("key_ids", "keyids"), ("spis", "spis"), ("signer_id", "b8"),
                   ("tag", "b32"), ("signature", "var16")),
    MsgType.CONFIRM: (("generation", "u64"), ("signer_id", "b8"), ("tag", "b32"),
                      ("signature", "var16")),
    MsgType.DONE: (("generation", "u64"), ("tag", "b32")),
    MsgType.ABORT: (("generation", "u64"), ("sender_role", "u8"), ("code", "u8"),
                    ("detail", "str8"),
                    ("signer_id", "b8"), ("signature", "var16")),
    MsgType.COOKIE: (("cookie", "b16"),),
    MsgType.STALE: (("epoch_floor", "u64"), ("init_nonce", "b32")),
}
QKD_FLAG_PQC_OK = 0x01
ROLE_INITIATOR, ROLE_RESPONDER = 1, 2
# keyids: the high bit of the count byte marks the sourced form (several QKD
# key sources, issue 13): each key_ID follows the u8 index of its source in
# the configuration order. Indices strictly increase, so each source gives at
# most one key_ID and the order is the order the keys are mixed in.
KEYIDS_SOURCED = 0x80
MAX_SOURCE_INDEX = 15


@dataclass(frozen=True)
class Message:
    type: MsgType
    sender_epoch: int
    receiver_epoch: int
    exchange_id: int
    fields: Mapping[str, object]   # read through msg[name], typed by the schema
    core: bytes                    # the header and fields, as received
    offsets: Mapping[str, int]     # where each field starts in ``core``
    cookie: bytes = b""

    def __getitem__(self, name: str) -> Any:
        return self.fields[name]

    def prefix(self, name: str) -> bytes:
        """The core up to (not including) field ``name``: what a signature
        or transcript placed in that field covers."""
        return self.core[:self.offsets[name]]


# ------------------------------------------------------------------ encode

def _enc(kind: str, value: Any) -> bytes:
    if kind == "u8":
        return struct.pack("!B", value)
    if kind == "u16":
        return struct.pack("!H", value)
    if kind == "u64":
        return struct.pack("!Q", value)
    if kind[0] == "b":
        if len(value) != int(kind[1:]):
            raise LocalProtocolError(f"field needs {kind[1:]} bytes, got {len(value)}")
        return bytes(value)
    if kind == "var16":
        if len(value) > 0xFFFF:
            raise LocalProtocolError("variable field too long")
        return struct.pack("!H", len(value)) + bytes(value)
    if kind == "spis":
        if len(value) > MAX_SPIS:
            raise LocalProtocolError(f"{len(value)} tunnels (at most {MAX_SPIS})")
        out = [struct.pack("!H", len(value))]
        for tid, tkind, val in value:
            raw = tid.encode()
            out.append(struct.pack("!B", len(raw)) + raw
                       + struct.pack("!BI", TUNNEL_KIND_IDS[tkind], val))
        return b"".join(out)
    if kind == "str8":
        text = str(value).encode("ascii", "replace")[:MAX_DETAIL]
        return struct.pack("!B", len(text)) + text
    raise LocalProtocolError(f"unknown field kind {kind}")


def _enc_keyids(ids: Any, sources: Any) -> bytes:
    """docs/protocol.md 4.2, 9.1: plain form (``sources`` empty) or sourced form."""
    if len(ids) > MAX_KEY_IDS:
        raise LocalProtocolError("too many key IDs")
    if not sources:
        return struct.pack("!B", len(ids)) + b"".join(uuid.UUID(k).bytes for k in ids)
    sources = tuple(sources)
    if len(sources) != len(ids) or not ids:
        raise LocalProtocolError("sourced key IDs need one source index per key ID")
    if any(not 0 <= i <= MAX_SOURCE_INDEX for i in sources) \
            or any(a >= b for a, b in itertools.pairwise(sources)):
        raise LocalProtocolError("source indices must increase and stay below 16")
    return struct.pack("!B", KEYIDS_SOURCED | len(ids)) + b"".join(
        struct.pack("!B", i) + uuid.UUID(k).bytes for i, k in zip(sources, ids, strict=True))


def _enc_field(name: str, kind: str, values: Mapping[str, object]) -> bytes:
    if kind == "keyids":   # the one field whose encoding reads a second value
        return _enc_keyids(values[name], values.get("key_sources", ()))
    return _enc(kind, values[name])


def encode_core(mtype: MsgType, sender_epoch: int, receiver_epoch: int, exchange_id: int,
                values: Mapping[str, object], *, stop: str | None = None) -> bytes:
    """Header and fields in schema order, up to (excluding) field ``stop``.
    ``key_ids`` goes out in the sourced form when ``values["key_sources"]``
    (one source index per key_ID) is given and non-empty."""
    out = [HEADER.pack(mtype, VERSION, 0, sender_epoch, receiver_epoch, exchange_id)]
    for name, kind in SCHEMAS[mtype]:
        if name == stop:
            break
        out.append(_enc_field(name, kind, values))
    return b"".join(out)


def encode_fields(mtype: MsgType, values: Mapping[str, object], start: str) -> bytes:
    """Fields from ``start`` to the end (appended after a signed prefix)."""
    names = [n for n, _ in SCHEMAS[mtype]]
    return b"".join(_enc_field(name, kind, values)
                    for name, kind in SCHEMAS[mtype][names.index(start):])


def mac1_key(receiver_name: str, psk: bytes | None) -> bytes:
    raw = receiver_name.encode()
    return hashlib.sha256(LABEL + b" mac1\0" + bytes([len(raw)]) + raw + (psk or b"")).digest()


def seal(core: bytes, key: bytes, cookie: bytes = b"") -> bytes:
    """Add the envelope: cookie and mac1 (HMAC-SHA-256 truncated to 16)."""
    if len(cookie) not in (0, COOKIE_LEN):
        raise LocalProtocolError("cookie must be empty or 16 bytes")
    body = core + bytes([len(cookie)]) + cookie
    return body + hmac.new(key, body, hashlib.sha256).digest()[:MAC_LEN]


def check_mac1(data: bytes, key: bytes) -> bool:
    if len(data) < HEADER.size + 1 + MAC_LEN:
        return False
    want = hmac.new(key, data[:-MAC_LEN], hashlib.sha256).digest()[:MAC_LEN]
    return hmac.compare_digest(want, data[-MAC_LEN:])


# ------------------------------------------------------------------ decode

class _Reader:
    __slots__ = ("data", "pos")

    def __init__(self, data: bytes) -> None:
        self.data, self.pos = data, 0

    def take(self, n: int, what: str) -> bytes:
        if self.pos + n > len(self.data):
            raise RemoteProtocolError(f"message truncated in {what}")
        chunk = self.data[self.pos:self.pos + n]
        self.pos += n
        return chunk

    def u8(self, what: str) -> int:
        return self.take(1, what)[0]


def _dec(r: _Reader, name: str, kind: str) -> Any:
    if kind == "u8":
        return r.u8(name)
    if kind == "u16":
        return struct.unpack("!H", r.take(2, name))[0]
    if kind == "u64":
        return struct.unpack("!Q", r.take(8, name))[0]
    if kind[0] == "b":
        return r.take(int(kind[1:]), name)
    if kind == "var16":
        n = struct.unpack("!H", r.take(2, name))[0]
        return r.take(n, name)
    if kind == "keyids":
        head = r.u8(name)
        sourced, n = bool(head & KEYIDS_SOURCED), head & ~KEYIDS_SOURCED
        if n > MAX_KEY_IDS:
            raise RemoteProtocolError(f"{n} key IDs (at most {MAX_KEY_IDS})")
        if sourced and n == 0:
            raise RemoteProtocolError("sourced key IDs form without key IDs")
        sources, ids = [], []
        for _ in range(n):
            if sourced:
                sources.append(r.u8(name))
            ids.append(str(uuid.UUID(bytes=r.take(16, name))))
        if len(set(ids)) != len(ids):
            raise RemoteProtocolError("duplicate key IDs")
        if any(i > MAX_SOURCE_INDEX for i in sources) \
                or any(a >= b for a, b in itertools.pairwise(sources)):
            raise RemoteProtocolError("key source indices must increase and stay below 16")
        return tuple(ids), tuple(sources)
    if kind == "spis":
        n = struct.unpack("!H", r.take(2, name))[0]
        if n > MAX_SPIS:
            raise RemoteProtocolError(f"{n} tunnel entries (at most {MAX_SPIS})")
        entries, seen = [], set()
        for _ in range(n):
            raw = r.take(r.u8(name), name)
            try:
                tid = raw.decode("utf-8")
            except UnicodeDecodeError:
                raise RemoteProtocolError("tunnel id is not UTF-8") from None
            kind_id = r.u8(name)
            val = struct.unpack("!I", r.take(4, name))[0]
            if not tid or tid in seen:
                raise RemoteProtocolError("empty or repeated tunnel id")
            if kind_id not in TUNNEL_KINDS:
                raise RemoteProtocolError(f"unknown tunnel kind {kind_id}")
            tkind = TUNNEL_KINDS[kind_id]
            if tkind == "ipsec" and val < 0x100:   # RFC 4303 2.1: 1..255 reserved
                raise RemoteProtocolError(f"SPI {val:#x} is reserved")
            if tkind == "macsec" and val > 3:      # IEEE 802.1AE-2018 10.5.1: AN 0..3
                raise RemoteProtocolError(f"MACsec AN {val} out of range")
            if tkind in CONSUMER_KINDS and val != 0:   # docs/protocol.md 4.2: reserved
                raise RemoteProtocolError(f"{tkind} tunnel entry value {val:#x} is not 0")
            seen.add(tid)
            entries.append((tid, tkind, val))
        return tuple(entries)
    if kind == "str8":
        raw = r.take(r.u8(name), name)
        if not all(0x20 <= c < 0x7F for c in raw):
            raise RemoteProtocolError("detail text is not printable ASCII")
        return raw.decode("ascii")
    raise LocalProtocolError(f"unknown field kind {kind}")  # pragma: no cover


def _check_domains(mtype: MsgType, f: Mapping[str, Any]) -> None:
    if "qkd_mode" in f and f["qkd_mode"] not in QkdMode.__members__.values():
        raise RemoteProtocolError(f"unknown QKD mode {f['qkd_mode']}")
    if "qkd_reason" in f and f["qkd_reason"] not in QkdReason.__members__.values():
        raise RemoteProtocolError(f"unknown QKD reason {f['qkd_reason']}")
    if mtype is MsgType.INIT:
        if f["kem_id"] not in KEM_NAMES:
            raise RemoteProtocolError(f"unknown KEM id {f['kem_id']}")
        if f["qkd_flags"] & ~QKD_FLAG_PQC_OK:
            raise RemoteProtocolError("reserved QKD flags set")
        if f["qkd_mode"] == QkdMode.USING:
            raise RemoteProtocolError("QKD mode USING is not valid in INIT")
    if mtype is MsgType.RESP and f["qkd_mode"] == QkdMode.EXPECT:
        raise RemoteProtocolError("QKD mode EXPECT is not valid in RESP")
    if "x25519_public" in f and len(f["x25519_public"]) not in (0, 32):
        raise RemoteProtocolError("X25519 public key must be 0 or 32 bytes")
    if "key_ids" in f and bool(f["key_ids"]) != (f["qkd_mode"] == QkdMode.KEYS):
        raise RemoteProtocolError("key IDs present without QKD mode KEYS, or missing with it")
    if mtype is MsgType.ABORT:
        if f["code"] not in AbortCode.__members__.values():
            raise RemoteProtocolError(f"unknown abort code {f['code']}")
        if f["sender_role"] not in (ROLE_INITIATOR, ROLE_RESPONDER):
            raise RemoteProtocolError(f"unknown ABORT sender role {f['sender_role']}")


def decode(data: bytes) -> Message:
    """Parse one reassembled message, or raise RemoteProtocolError."""
    if not isinstance(data, (bytes, bytearray, memoryview)):
        raise RemoteProtocolError("message is not bytes")
    data = bytes(data)
    r = _Reader(data)
    mtype_raw, version, flags, s_epoch, r_epoch, xid = HEADER.unpack(r.take(HEADER.size,
                                                                            "header"))
    if version != VERSION:
        raise RemoteProtocolError(f"unsupported protocol version {version}")
    try:
        mtype = MsgType(mtype_raw)
    except ValueError:
        raise RemoteProtocolError(f"unknown message type {mtype_raw}") from None
    if flags:
        raise RemoteProtocolError(f"reserved header flags set ({flags:#x})")
    if s_epoch == 0:
        raise RemoteProtocolError("sender epoch is zero")
    fields: dict[str, Any] = {}
    offsets: dict[str, int] = {}
    for name, kind in SCHEMAS[mtype]:
        offsets[name] = r.pos
        fields[name] = _dec(r, name, kind)
        if kind == "keyids":   # one wire field, two values: IDs and their sources
            fields[name], fields["key_sources"] = fields[name]
    core_end = r.pos
    clen = r.u8("cookie length")
    if clen not in (0, COOKIE_LEN):
        raise RemoteProtocolError(f"cookie length {clen}")
    cookie = r.take(clen, "cookie")
    r.take(MAC_LEN, "mac1")
    if r.pos != len(data):
        raise RemoteProtocolError(f"{len(data) - r.pos} trailing bytes")
    _check_domains(mtype, fields)
    return Message(mtype, s_epoch, r_epoch, xid, fields, data[:core_end], offsets, cookie)


def transcript_hash(psk: bytes | None, initiator: str, responder: str, init_core: bytes,
                    resp_prefix: bytes) -> bytes:
    """TH (docs/protocol.md 5): HMAC-SHA-256 keyed with the PSK digest (or
    32 zero bytes) over the names and both cores, so a wrong PSK yields a
    different TH and therefore different keys and failing signatures."""
    key = hashlib.sha256(LABEL + b" psk\0" + psk).digest() if psk else bytes(32)
    h = hmac.new(key, LABEL + b" transcript\0", hashlib.sha256)
    for part in (initiator.encode(), responder.encode()):
        h.update(bytes([len(part)]) + part)
    for part in (init_core, resp_prefix):
        h.update(struct.pack("!I", len(part)) + part)
    return h.digest()
