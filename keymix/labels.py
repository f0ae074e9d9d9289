"""The label tree and the byte encodings every derivation uses.

Theory of operation: every key qkdgate derives is bound to its purpose by a
label, and every label hangs under one root string naming the protocol
version, the inputs actually present and the KDF, e.g.
``"qkdgate/1 ML-KEM-768+X25519+QKD HKDF-SHA384"`` (after Rosenpass' hash
domains). Two sessions that differ in which inputs they had therefore differ
in the root, and no derived key of one can equal a key of the other.

The tree (docs/keymix.md 5 lists it with every field)::

    ROOT = "qkdgate/1 <KEM>[+X25519][+QKD] HKDF-SHA384"
    |-- "session secret"                 HKDF(Z') -> S, 48 bytes
        |-- "session id"                 16 bytes, public handle for logs
        |-- "esp rfc4106(gcm(aes)) key+salt"   36 bytes per ESP SA
        |-- "macsec sak"                 32 (+12 salt for XPN) bytes per MACsec SA
        |-- "macsec keyid"               16 bytes per MACsec SA, public
        |-- "wireguard psk"              32 bytes per WireGuard tunnel and generation
        |-- "strongswan ppk"             32 bytes per strongSwan tunnel and generation
        |-- "key confirmation"           32 bytes per role and transcript
        |-- "key service pool"           48 bytes per pool and generation (keymix/keypool.py)
            |-- "key service key"        one key per SAE pair, index and size
            |-- "key service key id"     16 bytes per index, public (a UUID)

Encoding: integers are unsigned big-endian of fixed width; every
variable-length field is length-prefixed with a 16-bit length (``lp16``), so
no two different field lists encode to the same bytes.
"""

from __future__ import annotations

import functools
import struct

from qkdgate.errors import LocalProtocolError

PROTOCOL_ID = "qkdgate/1"
KDF_ID = "HKDF-SHA384"
HASH_LEN = 48                       # SHA-384 output, and the session secret size

LABEL_SESSION = "session secret"
LABEL_SESSION_ID = "session id"
LABEL_ESP = "esp rfc4106(gcm(aes)) key+salt"
LABEL_MACSEC_SAK = "macsec sak"
LABEL_MACSEC_KEYID = "macsec keyid"
LABEL_CONFIRM = "key confirmation"
# Key consumers that take one symmetric key per generation (docs/consumers.md,
# docs/keymix.md 6.4): each its own label, so one generation's keys for
# different consumers are independent PRF outputs.
LABEL_WIREGUARD_PSK = "wireguard psk"
LABEL_STRONGSWAN_PPK = "strongswan ppk"
# The key service (docs/keyservice.md): a pool secret per pool and generation,
# then keys and key_IDs under the pool secret (keymix/keypool.py).
LABEL_KS_POOL = "key service pool"
LABEL_KS_KEY = "key service key"
LABEL_KS_KEY_ID = "key service key id"

# Presence bitmap in FixedInfo (docs/keymix.md 4.2).
PRESENT_KEM = 0x01
PRESENT_X25519 = 0x02
PRESENT_QKD = 0x04
PRESENT_QKD_SOURCED = 0x08   # several QKD sources: per-key source and length follow


def root_label(kem_name: str, x25519: bool, qkd: bool) -> str:
    """The root of the label tree for a session with these inputs."""
    legs = kem_name + ("+X25519" if x25519 else "") + ("+QKD" if qkd else "")
    return f"{PROTOCOL_ID} {legs} {KDF_ID}"


def u8(n: int) -> bytes:
    return _uint(n, 1, "B")


def u16(n: int) -> bytes:
    return _uint(n, 2, ">H")


def u32(n: int) -> bytes:
    return _uint(n, 4, ">I")


def u64(n: int) -> bytes:
    return _uint(n, 8, ">Q")


def _uint(n: int, width: int, fmt: str) -> bytes:
    if not isinstance(n, int) or isinstance(n, bool) or not 0 <= n < 1 << (8 * width):
        raise LocalProtocolError(f"{n!r} does not fit an unsigned {8 * width}-bit field")
    return struct.pack(fmt, n)


def lp16(data: bytes | str) -> bytes:
    """16-bit big-endian length, then the bytes (strings as UTF-8)."""
    if isinstance(data, str):
        return _lp16_text(data)
    return _lp16_raw(bytes(data))


@functools.lru_cache(maxsize=4096)
def _lp16_text(text: str) -> bytes:
    """lp16 of a string. Strings here are public names (labels, tunnel IDs,
    directions, KEM names, QKD key IDs; secrets are bytes), and the same few
    come back for every SA of a rekey: 4 per ESP SA were 6 % of a rekey's
    Python at 1,000 tunnels (issue 19). Bounded, so a stream of key IDs only
    cycles it. A too-long string raises and is not cached."""
    return _lp16_raw(text.encode("utf-8"))


def _lp16_raw(raw: bytes) -> bytes:
    if len(raw) > 0xFFFF:
        raise LocalProtocolError("field longer than 65535 bytes")
    return struct.pack(">H", len(raw)) + raw


def info(root: str, label: str, *fields: bytes) -> bytes:
    """HKDF ``info`` for one node of the tree: lp16(root) || lp16(label) || fields."""
    return lp16(root) + lp16(label) + b"".join(fields)
