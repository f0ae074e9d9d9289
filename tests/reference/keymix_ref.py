"""An independent reference implementation of docs/keymix.md (qkdgate/1).

Written from the specification text only, with the Python standard library
(hashlib, hmac, struct): it shares no code with qkdgate and does not import
it, so a bug in qkdgate.keymix (or in the spec's reading of it) shows up as a
disagreement on tests/vectors/keymix.json. Test code only: qkdgate itself
uses pyca/cryptography for every primitive.
"""

from __future__ import annotations

import hashlib
import hmac
import struct

HASHLEN = 48


# --- docs/keymix.md 1: notation -------------------------------------------

def lp16(x: bytes | str) -> bytes:
    if isinstance(x, str):
        x = x.encode("utf-8")
    assert len(x) <= 0xFFFF
    return struct.pack(">H", len(x)) + x


def hkdf_extract(salt: bytes, ikm: bytes, hash=hashlib.sha384) -> bytes:  # RFC 5869 2.2
    return hmac.new(salt, ikm, hash).digest()


def hkdf_expand(prk: bytes, info: bytes, length: int, hash=hashlib.sha384) -> bytes:  # 2.3
    assert length <= 255 * hash().digest_size
    t, okm, i = b"", b"", 1
    while len(okm) < length:
        t = hmac.new(prk, t + info + bytes([i]), hash).digest()
        okm += t
        i += 1
    return okm[:length]


# --- 3, 4: root label and session secret ----------------------------------

def root(kem_name: str, has_x: bool, has_qkd: bool) -> str:
    return ("qkdgate/1 " + kem_name + ("+X25519" if has_x else "")
            + ("+QKD" if has_qkd else "") + " HKDF-SHA384")


def fixed_info(kem_name, z_kem, z_x, z_qkd, key_ids, th, sources=()) -> bytes:
    """4.2; ``sources``: (index, key length) per key_ID when several QKD
    sources contributed (4.5): presence bit 0x08 and one u8 || u16 each."""
    r = root(kem_name, z_x is not None, z_qkd is not None)
    presence = 1 | (2 if z_x is not None else 0) | (4 if z_qkd is not None else 0) \
        | (8 if sources else 0)
    out = lp16(r) + lp16("session secret") + bytes([presence]) + lp16(kem_name)
    out += struct.pack(">HHH", len(z_kem), len(z_x or b""), len(z_qkd or b""))
    out += struct.pack(">H", len(key_ids)) + b"".join(lp16(k) for k in key_ids)
    out += b"".join(struct.pack(">BH", i, n) for i, n in sources)
    return out + lp16(th)


def session_secret(kem_name, z_kem, z_x, z_qkd, key_ids, th, sources=()) -> tuple[str, bytes]:
    r = root(kem_name, z_x is not None, z_qkd is not None)
    zprime = z_kem + (z_x or b"") + (z_qkd or b"")
    prk = hkdf_extract(r.encode(), zprime)
    return r, hkdf_expand(prk, fixed_info(kem_name, z_kem, z_x, z_qkd, key_ids, th, sources), 48)


# --- 5, 6: the label tree -------------------------------------------------

def node(s: bytes, r: str, label: str, fields: bytes, length: int) -> bytes:
    return hkdf_expand(s, lp16(r) + lp16(label) + fields, length)


def session_id(s, r):
    return node(s, r, "session id", b"", 16)


def esp(s, r, tunnel_id, direction, spi, generation) -> bytes:
    f = lp16(tunnel_id) + lp16(direction) + struct.pack(">IQ", spi, generation)
    return node(s, r, "esp rfc4106(gcm(aes)) key+salt", f, 36)


def macsec(s, r, tunnel_id, direction, sci, an, generation, cipher) -> dict:
    f = (lp16(cipher) + lp16(tunnel_id) + lp16(direction) + struct.pack(">Q", sci)
         + bytes([an]) + struct.pack(">Q", generation))
    xpn = cipher == "gcm-aes-xpn-256"
    out = node(s, r, "macsec sak", f, 44 if xpn else 32)
    return {"sak": out[:32], "salt": out[32:] if xpn else None,
            "ssci": ({"i2r": 1, "r2i": 2}[direction] if xpn else None),
            "keyid": node(s, r, "macsec keyid", f, 16)}


def consumer(s, r, kind, tunnel_id, generation) -> bytes:
    label = {"wireguard": "wireguard psk", "strongswan": "strongswan ppk"}[kind]
    return node(s, r, label, lp16(tunnel_id) + struct.pack(">Q", generation), 32)


def confirmation(s, r, role, th) -> bytes:
    return node(s, r, "key confirmation", lp16(role) + lp16(th), 32)


# --- RFC 7748 5: X25519, to check the recorded classical secret ------------

_P = 2**255 - 19


def x25519(k: bytes, u: bytes) -> bytes:
    kn = bytearray(k)
    kn[0] &= 248
    kn[31] &= 127
    kn[31] |= 64
    scalar = int.from_bytes(kn, "little")
    x1 = int.from_bytes(u, "little") & ((1 << 255) - 1)
    x2, z2, x3, z3, swap = 1, 0, x1, 1, 0
    for t in reversed(range(255)):
        bit = (scalar >> t) & 1
        swap ^= bit
        if swap:
            x2, x3, z2, z3 = x3, x2, z3, z2
        swap = bit
        a, b = (x2 + z2) % _P, (x2 - z2) % _P
        aa, bb = a * a % _P, b * b % _P
        e = (aa - bb) % _P
        c, d = (x3 + z3) % _P, (x3 - z3) % _P
        da, cb = d * a % _P, c * b % _P
        x3, z3 = (da + cb) ** 2 % _P, x1 * (da - cb) ** 2 % _P
        x2, z2 = aa * bb % _P, e * (aa + 121665 * e) % _P
    if swap:
        x2, z2 = x3, z3
    return (x2 * pow(z2, _P - 2, _P) % _P).to_bytes(32, "little")
