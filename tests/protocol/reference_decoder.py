"""An independent decoder written from docs/protocol.md alone (stdlib only).

It does not import qkdgate. test_reference.py checks that it agrees with the
real codec on every message of real exchanges, and recomputes mac1, the
transcript hash and the cookie from the document's formulas, so the document
is shown to be complete enough to reimplement the wire format.
"""

from __future__ import annotations

import hashlib
import hmac
import struct
import uuid

# docs/protocol.md 4.3 - 4.8: (name, type) per message type
LAYOUT = {
    1: [("generation_min", "u64"), ("nonce", "b32"), ("kem_id", "u16"), ("kem_public", "var16"),
        ("x25519_public", "var16"), ("qkd_mode", "u8"), ("qkd_reason", "u8"),
        ("qkd_flags", "u8"), ("key_ids", "keyids"), ("spis", "spis"), ("signer_id", "b8"),
        ("ed25519_sig", "b64")],
    2: [("generation", "u64"), ("nonce", "b32"), ("kem_ciphertext", "var16"),
        ("x25519_public", "var16"), ("qkd_mode", "u8"), ("qkd_reason", "u8"),
        ("key_ids", "keyids"), ("spis", "spis"), ("signer_id", "b8"), ("tag", "b32"),
        ("signature", "var16")],
    3: [("generation", "u64"), ("signer_id", "b8"), ("tag", "b32"), ("signature", "var16")],
    4: [("generation", "u64"), ("tag", "b32")],
    5: [("generation", "u64"), ("sender_role", "u8"), ("code", "u8"), ("detail", "str8"),
        ("signer_id", "b8"), ("signature", "var16")],
    6: [("cookie", "b16")],
}


class Bad(Exception):
    pass


def reassemble(datagrams: list[bytes]) -> list[bytes]:
    """docs 3.1: collect fragments per message id, in any order."""
    parts: dict[int, dict[int, bytes]] = {}
    meta: dict[int, tuple[int, int]] = {}
    done = []
    for d in datagrams:
        if d[:2] != b"QG" or d[2] != 2 or d[3] != 0 or len(d) > 1200:
            raise Bad("datagram header")
        mid, idx, cnt, total = struct.unpack("!IHHI", d[4:16])
        if cnt != -(-total // 1184) or idx >= cnt:
            raise Bad("fragment numbering")
        meta[mid] = (cnt, total)
        parts.setdefault(mid, {})[idx] = d[16:]
        if len(parts[mid]) == cnt:
            msg = b"".join(parts[mid][i] for i in range(cnt))
            if len(msg) != total:
                raise Bad("fragment lengths")
            done.append(msg)
            del parts[mid]
    return done


def decode(data: bytes) -> dict:
    pos = 0

    def take(n: int) -> bytes:
        nonlocal pos
        if pos + n > len(data):
            raise Bad("truncated")
        pos += n
        return data[pos - n:pos]

    mtype, version, flags = take(1)[0], take(1)[0], struct.unpack("!H", take(2))[0]
    s_epoch, r_epoch, xid = struct.unpack("!QQI", take(20))
    if version != 1 or flags != 0 or mtype not in LAYOUT or s_epoch == 0:
        raise Bad("header")
    out = {"type": mtype, "sender_epoch": s_epoch, "receiver_epoch": r_epoch,
           "exchange_id": xid, "offsets": {}}
    for name, kind in LAYOUT[mtype]:
        out["offsets"][name] = pos
        if kind == "u8":
            v = take(1)[0]
        elif kind == "u16":
            v = struct.unpack("!H", take(2))[0]
        elif kind == "u64":
            v = struct.unpack("!Q", take(8))[0]
        elif kind.startswith("b"):
            v = take(int(kind[1:]))
        elif kind == "var16":
            v = take(struct.unpack("!H", take(2))[0])
        elif kind == "keyids":
            v = tuple(str(uuid.UUID(bytes=take(16))) for _ in range(take(1)[0]))
        elif kind == "spis":
            v = []
            for _ in range(struct.unpack("!H", take(2))[0]):
                tid = take(take(1)[0]).decode()
                kind_id, val = take(1)[0], struct.unpack("!I", take(4))[0]
                v.append((tid, {1: "ipsec", 2: "macsec"}[kind_id], val))
            v = tuple(v)
        else:  # str8
            v = take(take(1)[0]).decode("ascii")
        out[name] = v
    out["core"] = data[:pos]
    clen = take(1)[0]
    if clen not in (0, 16):
        raise Bad("cookie length")
    out["cookie"] = take(clen)
    out["mac1"] = take(16)
    if pos != len(data):
        raise Bad("trailing")
    return out


def mac1_ok(data: bytes, receiver: str, psk: bytes = b"") -> bool:
    """docs 5.1"""
    name = receiver.encode()
    key = hashlib.sha256(b"qkdgate/1 mac1\x00" + bytes([len(name)]) + name + psk).digest()
    return hmac.compare_digest(hmac.new(key, data[:-16], hashlib.sha256).digest()[:16],
                               data[-16:])


def transcript_hash(init: dict, resp: dict, name_i: str, name_r: str, psk: bytes = b"") -> bytes:
    """docs 5.2"""
    key = hashlib.sha256(b"qkdgate/1 psk\x00" + psk).digest() if psk else bytes(32)
    resp_prefix = resp["core"][:resp["offsets"]["tag"]]
    msg = b"qkdgate/1 transcript\x00"
    for n in (name_i.encode(), name_r.encode()):
        msg += bytes([len(n)]) + n
    for part in (init["core"], resp_prefix):
        msg += struct.pack("!I", len(part)) + part
    return hmac.new(key, msg, hashlib.sha256).digest()


def key_id(public_string: str) -> bytes:
    """docs 5.3: from the pinned string qkdgate-id1:<profile>:<b64url>"""
    import base64
    _, profile, b64 = public_string.split(":")
    raw = base64.urlsafe_b64decode(b64 + "=" * (-len(b64) % 4))
    return hashlib.sha256(profile.encode() + b"\x00" + raw).digest()[:8]
