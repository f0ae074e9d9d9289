#!/usr/bin/env python3
"""Generate tests/vectors/keymix.json, the keymix known-answer vectors.

Theory of operation: every input is derived from SHA-256 of a fixed string
naming the case and the input, so running this again gives byte-identical
output (``--check`` verifies that). ML-KEM encapsulation in pyca takes no
randomness argument, so the ciphertext is made with kyber-py's
``_encaps_internal(ek, m)`` (FIPS 203 Algorithm 17) from a recorded ``m``, and
pyca then decapsulates it: the vector records a secret both implementations
agree on. Outputs come from qkdgate.keymix; tests/reference checks them with
an independent implementation of docs/keymix.md.

Usage: .venv/bin/python tools/make_vectors.py [--check]
"""

from __future__ import annotations

import argparse
import hashlib
import json
import sys
import uuid
from pathlib import Path

from cryptography.hazmat.primitives.asymmetric.x25519 import X25519PrivateKey
from kyber_py.ml_kem import ML_KEM_768, ML_KEM_1024

from qkdgate.interfaces import MacsecCipher
from qkdgate.keymix import schedule
from qkdgate.keymix.combiner import HybridInputs, combine, fixed_info
from qkdgate.keymix.kem import get_kem
from qkdgate.keymix.secret import SecretBytes

OUT = Path(__file__).resolve().parent.parent / "tests" / "vectors" / "keymix.json"
KYBER = {"ML-KEM-768": ML_KEM_768, "ML-KEM-1024": ML_KEM_1024}
XPN, GCM = MacsecCipher.GCM_AES_XPN_256, MacsecCipher.GCM_AES_256


def det(case: str, what: str, n: int) -> bytes:
    out, i = b"", 0
    while len(out) < n:
        out += hashlib.sha256(f"qkdgate/1 vectors/{case}/{what}/{i}".encode()).digest()
        i += 1
    return out[:n]


def det_uuid(case: str, i: int) -> str:
    return str(uuid.UUID(bytes=det(case, f"key_ID {i}", 16), version=4))


# (case id, kem, x25519?, QKD keys, ESP SAs, MACsec SAs); QKD keys: a number of
# 32-byte keys of one source, or ((source index, key bytes), ...) for several
# sources (docs/keymix.md 4.5)
# ESP SA: (tunnel_id, direction, spi, generation)
# MACsec SA: (tunnel_id, direction, sci, an, generation, cipher)
CASES = [
    ("mlkem768-x25519-qkd", "ML-KEM-768", True, 1,
     [("site-a", "i2r", 0xC0000101, 1), ("site-a", "r2i", 0xC0000102, 1),
      ("site-b", "i2r", 0xC0000201, 1), ("site-b", "r2i", 0xC0000202, 1)],
     [("lan0", "i2r", 0x0200000000010001, 0, 1, XPN),
      ("lan0", "r2i", 0x0200000000020001, 0, 1, XPN),
      ("lan1", "i2r", 0x0200000000010002, 1, 1, GCM)]),
    ("mlkem768-x25519", "ML-KEM-768", True, 0,
     [("site-a", "i2r", 0xC0000101, 1), ("site-a", "r2i", 0xC0000102, 1)],
     [("lan0", "i2r", 0x0200000000010001, 0, 1, GCM)]),
    ("mlkem768-qkd", "ML-KEM-768", False, 1,
     [("site-a", "i2r", 0xC0000101, 2), ("site-a", "r2i", 0xC0000102, 2)],
     [("lan0", "r2i", 0x0200000000020001, 2, 2, XPN)]),
    ("mlkem768-only", "ML-KEM-768", False, 0,
     [("site-a", "i2r", 0xC0000101, 0)],
     [("lan0", "i2r", 0x0200000000010001, 3, 0, GCM),
      ("lan0", "i2r", 0x0200000000010001, 3, 0, XPN)]),
    ("mlkem1024-x25519-qkd", "ML-KEM-1024", True, 1,
     [("core", "i2r", 0xC0001001, 7), ("core", "r2i", 0xC0001002, 7)],
     [("wan0", "i2r", 0x001B21000000A001, 1, 7, XPN),
      ("wan0", "r2i", 0x001B21000000B001, 1, 7, XPN)]),
    ("mlkem1024-x25519", "ML-KEM-1024", True, 0,
     [("core", "i2r", 0xC0001001, 3)],
     [("wan0", "i2r", 0x001B21000000A001, 2, 3, GCM)]),
    ("mlkem1024-qkd", "ML-KEM-1024", False, 1,
     [("core", "r2i", 0xC0001002, 4)],
     [("wan0", "r2i", 0x001B21000000B001, 0, 4, XPN)]),
    ("mlkem1024-only", "ML-KEM-1024", False, 0,
     [("core", "i2r", 0xC0001001, 1)],
     [("wan0", "i2r", 0x001B21000000A001, 1, 1, GCM)]),
    ("mlkem768-x25519-qkd2-extremes", "ML-KEM-768", True, 2,
     [("t", "i2r", 0x100, 0), ("tunnel-m\u00fcnchen", "r2i", 0xFFFFFFFF, 2**64 - 1),
      ("x" * 255, "i2r", 0xDEADBEEF, 123456789)],
     [("t", "i2r", 0, 0, 0, GCM), ("t", "r2i", 2**64 - 1, 3, 2**64 - 1, XPN)]),
    # several key sources: all of two (one per relay path) ...
    ("mlkem768-x25519-qkd-sources-all-of-2", "ML-KEM-768", True, ((0, 32), (1, 32)),
     [("site-a", "i2r", 0xC0000101, 5), ("site-a", "r2i", 0xC0000102, 5)],
     [("lan0", "i2r", 0x0200000000010001, 1, 5, XPN)]),
    # ... and 2 of 3 with source 1 missing and keys of two sizes
    ("mlkem1024-x25519-qkd-sources-2-of-3", "ML-KEM-1024", True, ((0, 32), (2, 64)),
     [("core", "i2r", 0xC0001001, 9), ("core", "r2i", 0xC0001002, 9)],
     [("wan0", "r2i", 0x001B21000000B001, 2, 9, GCM)]),
]


def make_case(cid, kem_name, with_x, n_qkd, esp_sas, macsec_sas) -> dict:
    kem = get_kem(kem_name)
    seed = det(cid, "ML-KEM seed d||z", 64)
    priv, pub = kem.keypair_from_seed(SecretBytes(seed))  # type: ignore[attr-defined]
    m = det(cid, "ML-KEM encaps m", 32)
    k_kyber, ct = KYBER[kem_name]._encaps_internal(pub, m)
    kem_secret = kem.decapsulate(priv, ct)
    if kem_secret.reveal() != k_kyber:   # not assert: the check must survive python -O
        raise SystemExit(f"{cid}: pyca and kyber-py disagree on the ML-KEM secret")

    inputs: dict = {"kem_name": kem_name, "kem_seed": seed.hex(), "kem_public_key": pub.hex(),
                    "kem_encaps_m": m.hex(), "kem_ciphertext": ct.hex(),
                    "kem_secret": kem_secret.reveal().hex()}
    x_secret = None
    if with_x:
        ia = X25519PrivateKey.from_private_bytes(det(cid, "X25519 initiator", 32))
        ra = X25519PrivateKey.from_private_bytes(det(cid, "X25519 responder", 32))
        shared = ia.exchange(ra.public_key())
        if shared != ra.exchange(ia.public_key()):
            raise SystemExit(f"{cid}: X25519 exchange is not symmetric")
        x_secret = SecretBytes(shared)
        inputs |= {"x25519_initiator_private": det(cid, "X25519 initiator", 32).hex(),
                   "x25519_initiator_public": ia.public_key().public_bytes_raw().hex(),
                   "x25519_responder_private": det(cid, "X25519 responder", 32).hex(),
                   "x25519_responder_public": ra.public_key().public_bytes_raw().hex()}
    inputs["x25519_secret"] = x_secret.reveal().hex() if x_secret else None
    sourced = tuple(n_qkd) if isinstance(n_qkd, tuple) else ()
    sizes = [n for _, n in sourced] if sourced else [32] * n_qkd
    ids = tuple(det_uuid(cid, i) for i in range(len(sizes)))
    qkd = b"".join(det(cid, f"QKD key {i}", n) for i, n in enumerate(sizes))
    inputs["qkd_key"] = qkd.hex() if sizes else None
    inputs["qkd_key_ids"] = list(ids)
    if sourced:
        inputs["qkd_sources"] = [list(s) for s in sourced]
    th = hashlib.sha384(f"transcript of {cid}".encode()).digest()
    inputs["transcript_hash"] = th.hex()

    hi = HybridInputs(kem_name, kem_secret, x_secret, SecretBytes(qkd) if sizes else None, ids, th,
                      sourced)
    s = combine(hi)
    out: dict = {"root_label": s.root_label, "fixed_info": fixed_info(hi).hex(),
                 "session_secret": s.secret.reveal().hex(), "session_id": s.session_id.hex()}
    out["esp"] = [{"tunnel_id": t, "direction": d, "spi": spi, "generation": g,
                   "key": schedule.esp_key(s, t, d, spi, g).reveal().hex()}
                  for t, d, spi, g in esp_sas]
    out["macsec"] = []
    for t, d, sci, an, g, c in macsec_sas:
        k = schedule.macsec_keys(s, t, d, sci, an, g, c)
        out["macsec"].append({"tunnel_id": t, "direction": d, "sci": sci, "an": an,
                              "generation": g, "cipher": c.value, "sak": k.sak.reveal().hex(),
                              "salt": k.salt.reveal().hex() if k.salt else None,
                              "ssci": k.ssci, "keyid": k.keyid.hex()})
    # key consumers (docs/keymix.md 6.4): one key per tunnel and generation
    out["consumers"] = [{"consumer": k, "tunnel_id": t, "generation": g,
                         "key": schedule.consumer_key(s, k, t, g).reveal().hex()}
                        for t, _d, _spi, g in esp_sas for k in ("wireguard", "strongswan")]
    th2 = hashlib.sha384(f"final transcript of {cid}".encode()).digest()
    out["confirmation"] = [{"role": r, "transcript_hash": h.hex(),
                            "tag": schedule.confirmation_tag(s, r, h).hex()}
                           for r in schedule.ROLES for h in (th, th2)]
    return {"id": cid, "inputs": inputs, "outputs": out}


def build() -> str:
    doc = {"description": "qkdgate/1 keymix known-answer vectors (docs/keymix.md); "
                          "generated by tools/make_vectors.py",
           "cases": [make_case(*c) for c in CASES]}
    return json.dumps(doc, indent=1, ensure_ascii=True) + "\n"


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--check", action="store_true",
                    help="exit 1 if the committed file differs from a fresh build")
    args = ap.parse_args()
    text = build()
    if args.check:
        same = OUT.exists() and OUT.read_text() == text
        print(f"{OUT}: {'up to date' if same else 'DIFFERS'}")
        return 0 if same else 1
    OUT.write_text(text)
    print(f"wrote {OUT} ({len(CASES)} cases)")
    return 0


if __name__ == "__main__":
    sys.exit(main())
