"""An independent reference for the wire and bindings of docs/protocol.md (qkdgate/1).

Written from docs/protocol.md (sections 3.1, 4, 5, 6) and appendix A only,
with the Python standard library (hashlib, hmac, struct, base64, uuid); it
shares no code with qkdgate and does not import it. Together with
keymix_ref.py (docs/keymix.md) it recomputes, from a protocol transcript
vector, everything that needs no post-quantum primitive: reassembly, the
message layouts, mac1, key ids, the transcript hash, the session secret
(given the recorded ML-KEM secret), the confirmation tags, the messages each
signature covers, and the ESP keys. ML-KEM and ML-DSA themselves are left to
the pyca checks in tests/vectors.
"""

from __future__ import annotations

import base64
import hashlib
import hmac
import struct
import uuid

LABEL = b"qkdgate/1"
MAX_DATAGRAM, FRAG_HEADER, FRAG_PAYLOAD, MAX_MESSAGE = 1200, 16, 1184, 8192 + 4096 * 261


def H(x: bytes) -> bytes:                       # section 2
    return hashlib.sha256(x).digest()


# --- 3.1 datagrams ----------------------------------------------------------

def parse_datagram(d: bytes) -> dict:
    if not FRAG_HEADER < len(d) <= MAX_DATAGRAM:
        raise ValueError("datagram length")
    magic, version, flags, mid, index, count, total = struct.unpack(">2sBBIHHI", d[:16])
    if magic != b"QG" or version != 2 or flags != 0 or not 1 <= total <= MAX_MESSAGE:
        raise ValueError("datagram header")
    if count != -(-total // FRAG_PAYLOAD) or index >= count:
        raise ValueError("fragment count/index")
    want = FRAG_PAYLOAD if index < count - 1 else total - FRAG_PAYLOAD * (count - 1)
    if len(d) - FRAG_HEADER != want:
        raise ValueError("fragment payload length")
    return {"message_id": mid, "index": index, "count": count, "total": total,
            "payload": d[16:]}


def reassemble(datagrams: list[bytes]) -> tuple[int, bytes]:
    parts = [parse_datagram(d) for d in datagrams]
    mids = {p["message_id"] for p in parts}
    if len(mids) != 1 or sorted(p["index"] for p in parts) != list(range(parts[0]["count"])):
        raise ValueError("not one complete message")
    body = b"".join(p["payload"] for p in sorted(parts, key=lambda p: p["index"]))
    if len(body) != parts[0]["total"]:
        raise ValueError("total length")
    return mids.pop(), body


# --- 4 messages -------------------------------------------------------------

TYPES = {1: "INIT", 2: "RESP", 3: "CONFIRM", 4: "DONE", 5: "ABORT", 6: "COOKIE", 7: "STALE"}
# 4.3 .. 4.8, in order: (field, type)
SCHEMA = {
    "INIT": [("generation_min", "u64"), ("nonce", "b32"), ("kem_id", "u16"),
             ("kem_public", "var16"), ("x25519_public", "var16"), ("qkd_mode", "u8"),
             ("qkd_reason", "u8"), ("qkd_flags", "u8"), ("key_ids", "keyids"),
             ("spis", "spis"), ("signer_id", "b8"), ("ed25519_sig", "b64")],
    "RESP": [("generation", "u64"), ("nonce", "b32"), ("kem_ciphertext", "var16"),
             ("x25519_public", "var16"), ("qkd_mode", "u8"), ("qkd_reason", "u8"),
             ("key_ids", "keyids"), ("spis", "spis"), ("signer_id", "b8"), ("tag", "b32"),
             ("signature", "var16")],
    "CONFIRM": [("generation", "u64"), ("signer_id", "b8"), ("tag", "b32"),
                ("signature", "var16")],
    "DONE": [("generation", "u64"), ("tag", "b32")],
    "ABORT": [("generation", "u64"), ("sender_role", "u8"), ("code", "u8"),
              ("detail", "str8"), ("signer_id", "b8"), ("signature", "var16")],
    "COOKIE": [("cookie", "b16")],
    "STALE": [("epoch_floor", "u64"), ("init_nonce", "b32")],
}
SPI_KINDS = {1: "ipsec", 2: "macsec", 3: "wireguard", 4: "strongswan"}


def key_id_text(raw: bytes) -> str:
    """Appendix A.3: a 16-byte binary key_ID as the combiner's text form."""
    return str(uuid.UUID(bytes=raw))


class _R:
    def __init__(self, data: bytes) -> None:
        self.d, self.p = data, 0

    def take(self, n: int) -> bytes:
        if self.p + n > len(self.d):
            raise ValueError("truncated")
        out = self.d[self.p:self.p + n]
        self.p += n
        return out

    def uint(self, n: int) -> int:
        return int.from_bytes(self.take(n), "big")


def _field(r: _R, kind: str):
    if kind in ("u8", "u16", "u64"):
        return r.uint({"u8": 1, "u16": 2, "u64": 8}[kind])
    if kind.startswith("b"):
        return r.take(int(kind[1:]))
    if kind == "var16":
        return r.take(r.uint(2))
    if kind == "keyids":
        head = r.uint(1)
        if head & 0x80:        # 9.1: sourced form, [source index, key_ID] per key
            return [[r.uint(1), key_id_text(r.take(16))] for _ in range(head & 0x7F)]
        return [key_id_text(r.take(16)) for _ in range(head)]
    if kind == "spis":
        out = []
        for _ in range(r.uint(2)):
            tid = r.take(r.uint(1)).decode("utf-8")
            out.append([tid, SPI_KINDS[r.uint(1)], r.uint(4)])
        return out
    if kind == "str8":
        return r.take(r.uint(1)).decode("ascii")
    raise ValueError(kind)


def parse_message(data: bytes) -> dict:
    """message = core || u8(cookie_len) || cookie || mac1 (section 4)."""
    r = _R(data)
    mtype, version, flags = r.uint(1), r.uint(1), r.uint(2)
    if mtype not in TYPES or version != 1 or flags != 0:
        raise ValueError("header")
    name = TYPES[mtype]
    header = {"sender_epoch": r.uint(8), "receiver_epoch": r.uint(8), "exchange_id": r.uint(4)}
    fields, offsets = {}, {}
    for fname, kind in SCHEMA[name]:
        offsets[fname] = r.p
        fields[fname] = _field(r, kind)
    core = data[:r.p]
    cookie_len = r.uint(1)
    if cookie_len not in (0, 16):
        raise ValueError("cookie length")
    cookie = r.take(cookie_len)
    mac = r.take(16)
    if r.p != len(data):
        raise ValueError("trailing bytes")
    return {"type": name, "header": header, "fields": fields, "offsets": offsets,
            "core": core, "cookie": cookie, "mac1": mac}


def prefix(msg: dict, fname: str) -> bytes:
    """The core up to, not including, field ``fname``."""
    return msg["core"][:msg["offsets"][fname]]


# --- 5 bindings -------------------------------------------------------------

def k_mac1(receiver_name: str, psk: bytes | None) -> bytes:            # 5.1
    n = receiver_name.encode()
    return H(LABEL + b" mac1" + b"\0" + bytes([len(n)]) + n + (psk or b""))


def mac1(key: bytes, core: bytes, cookie: bytes = b"") -> bytes:
    return hmac.new(key, core + bytes([len(cookie)]) + cookie, hashlib.sha256).digest()[:16]


def k_th(psk: bytes | None) -> bytes:                                   # 5.2
    return H(LABEL + b" psk" + b"\0" + psk) if psk else bytes(32)


def transcript_hash(psk: bytes | None, name_i: str, name_r: str, init_core: bytes,
                    resp_prefix: bytes) -> bytes:
    ni, nr = name_i.encode(), name_r.encode()
    data = (LABEL + b" transcript" + b"\0" + bytes([len(ni)]) + ni + bytes([len(nr)]) + nr
            + struct.pack(">I", len(init_core)) + init_core
            + struct.pack(">I", len(resp_prefix)) + resp_prefix)
    return hmac.new(k_th(psk), data, hashlib.sha256).digest()


def parse_identity(public: str) -> tuple[str, bytes, bytes]:           # 5.3
    tag, profile, b64 = public.split(":")
    if tag != "qkdgate-id1":
        raise ValueError("identity string")
    raw = base64.urlsafe_b64decode(b64 + "=" * (-len(b64) % 4))
    return profile, raw[:32], raw[32:]


def key_id(profile: str, ed_pk: bytes, ml_pk: bytes) -> bytes:
    return H(profile.encode() + b"\0" + ed_pk + ml_pk)[:8]


def ed25519_signed_bytes(context: str, message: bytes) -> bytes:       # 5.4
    return LABEL + b" " + context.encode() + b"\0" + message


def done_hash(th: bytes) -> bytes:                                      # 4.6
    return H(LABEL + b" done" + b"\0" + th)


def abort_digest(init_core: bytes, abort_prefix: bytes) -> bytes:        # 4.7
    return H(LABEL + b" abort" + b"\0" + H(init_core) + abort_prefix)


MLDSA_SIG_SIZE = {"mldsa65-ed25519": 3309, "mldsa87-ed25519": 4627}
KEM_IDS = {"ML-KEM-768": 1, "ML-KEM-1024": 2}
QKD_MODE = {"NONE": 0, "KEYS": 1, "EXPECT": 2, "ABSENT": 3, "USING": 4}
ABORT_CODE = {"QKD_KEY_LOST": 1, "QKD_UNAVAILABLE": 2, "POLICY": 3, "INSTALL_FAILED": 4,
              "SUITE_MISMATCH": 5, "AUTH_FAILED": 6}
QKD_REASON = {"unavailable": 1, "timeout": 2, "refused": 3, "protocol": 4, "peer": 5}


# --- RFC 8032 5.1.7 Ed25519 verification (after RFC 8032 6's reference code) --

_P = 2**255 - 19
_Q = 2**252 + 27742317777372353535851937790883648493
_D = -121665 * pow(121666, _P - 2, _P) % _P
_SQRT_M1 = pow(2, (_P - 1) // 4, _P)


def _add(a, b):
    A, B = (a[1] - a[0]) * (b[1] - b[0]) % _P, (a[1] + a[0]) * (b[1] + b[0]) % _P
    C, D = 2 * a[3] * b[3] * _D % _P, 2 * a[2] * b[2] % _P
    E, F, G, Hh = B - A, D - C, D + C, B + A
    return (E * F, G * Hh, F * G, E * Hh)


def _mul(s, pt):
    acc = (0, 1, 1, 0)
    while s > 0:
        if s & 1:
            acc = _add(acc, pt)
        pt = _add(pt, pt)
        s >>= 1
    return acc


def _recover_x(y, sign):
    if y >= _P:
        return None
    x2 = (y * y - 1) * pow(_D * y * y + 1, _P - 2, _P)
    if x2 % _P == 0:
        return None if sign else 0
    x = pow(x2, (_P + 3) // 8, _P)
    if (x * x - x2) % _P:
        x = x * _SQRT_M1 % _P
    if (x * x - x2) % _P:
        return None
    return _P - x if (x & 1) != sign else x


def _decompress(s: bytes):
    y = int.from_bytes(s, "little")
    sign, y = y >> 255, y & ((1 << 255) - 1)
    x = _recover_x(y, sign)
    return None if x is None else (x, y, 1, x * y % _P)


_GY = 4 * pow(5, _P - 2, _P) % _P
_G = (_recover_x(_GY, 0), _GY, 1, _recover_x(_GY, 0) * _GY % _P)


def ed25519_verify(public: bytes, message: bytes, signature: bytes) -> bool:
    if len(public) != 32 or len(signature) != 64:
        return False
    a, r = _decompress(public), _decompress(signature[:32])
    s = int.from_bytes(signature[32:], "little")
    if a is None or r is None or s >= _Q:
        return False
    h = int.from_bytes(hashlib.sha512(signature[:32] + public + message).digest(), "little") % _Q
    lhs, rhs = _mul(s, _G), _add(r, _mul(h, a))
    return (lhs[0] * rhs[2] - rhs[0] * lhs[2]) % _P == 0 and \
        (lhs[1] * rhs[2] - rhs[1] * lhs[2]) % _P == 0
