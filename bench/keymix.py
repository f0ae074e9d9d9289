#!/usr/bin/env python3
"""keymix throughput: qkdgate's wrappers beside the bare pyca primitives.

Prints operations per second for ML-KEM keygen / encaps / decaps per provider
(pyca/cryptography; liboqs when installed), X25519, and one full hybrid
rekey computed by both sides (ML-KEM + X25519 + QKD key -> session secret ->
100 ESP SA keys + 2 confirmation tags per side), each beside the same work
done with bare pyca calls, so the Python overhead of keymix shows as a ratio.

Usage: .venv/bin/python bench/keymix.py [--seconds 0.3]
"""

from __future__ import annotations

import argparse
import os
import time

from cryptography.hazmat.primitives import hashes
from cryptography.hazmat.primitives.asymmetric import mlkem
from cryptography.hazmat.primitives.asymmetric.x25519 import X25519PrivateKey, X25519PublicKey
from cryptography.hazmat.primitives.kdf.hkdf import HKDF, HKDFExpand

from qkdgate.keymix import schedule
from qkdgate.keymix.classical import x25519_keypair, x25519_shared
from qkdgate.keymix.combiner import HybridInputs, combine
from qkdgate.keymix.kem import available_kems, get_kem
from qkdgate.keymix.secret import SecretBytes

SA_KEYS = 100
TH = os.urandom(48)
KEY_ID = "0b7d4c2e-1f3a-4b5c-8d9e-0a1b2c3d4e5f"


def rate(fn, seconds: float) -> float:
    fn()
    n, start = 0, time.perf_counter()
    while (elapsed := time.perf_counter() - start) < seconds:
        for _ in range(5):
            fn()
        n += 5
    return n / elapsed


def row(name: str, ours: float, bare: float | None) -> None:
    if bare is None:
        print(f"{name:<50} {ours:>11,.0f}/s")
    else:
        print(f"{name:<50} {ours:>11,.0f}/s  bare pyca {bare:>11,.0f}/s  "
              f"overhead x{bare / ours:4.2f}")


def bench_kems(seconds: float) -> None:
    bare_cls = {"ML-KEM-768": (mlkem.MLKEM768PrivateKey, mlkem.MLKEM768PublicKey),
                "ML-KEM-1024": (mlkem.MLKEM1024PrivateKey, mlkem.MLKEM1024PublicKey)}
    for name in available_kems():
        kem = get_kem(name)
        priv, pub = kem.generate_keypair()
        ct, _ = kem.encapsulate(pub)
        label = f"{name} [{getattr(kem, 'backend', '?').split(' (')[0]}]"
        if name in bare_cls:
            cls, pub_cls = bare_cls[name]
            bpriv = cls.generate()
            bct = bpriv.public_key().encapsulate()[1]
            bare = (rate(lambda c=cls: c.generate().public_key().public_bytes_raw(), seconds),
                    rate(lambda c=pub_cls, p=pub: c.from_public_bytes(p).encapsulate(), seconds),
                    rate(lambda k=bpriv, c=bct: k.decapsulate(c), seconds))
        else:
            bare = (None, None, None)
        row(f"{label} keygen", rate(kem.generate_keypair, seconds), bare[0])
        row(f"{label} encaps", rate(lambda k=kem, p=pub: k.encapsulate(p), seconds), bare[1])
        row(f"{label} decaps", rate(lambda k=kem, p=priv, c=ct: k.decapsulate(p, c), seconds),
            bare[2])


def bench_x25519(seconds: float) -> None:
    _, peer = x25519_keypair()

    def ours():
        k, _ = x25519_keypair()
        x25519_shared(k, peer)

    peer_obj = X25519PublicKey.from_public_bytes(peer)

    def bare():
        k = X25519PrivateKey.generate()
        k.public_key().public_bytes_raw()
        k.exchange(peer_obj)

    row("X25519 keypair + exchange", rate(ours, seconds), rate(bare, seconds))


def full_rekey_ours(kem_name: str) -> None:
    kem = get_kem(kem_name)
    qkd = os.urandom(32)
    priv, pub = kem.generate_keypair()
    ct, ss_r = kem.encapsulate(pub)
    ss_i = kem.decapsulate(priv, ct)
    a, pa = x25519_keypair()
    b, pb = x25519_keypair()
    sides = [(ss_i, x25519_shared(a, pb)), (ss_r, x25519_shared(b, pa))]
    for ss, xs in sides:
        s = combine(HybridInputs(kem_name, ss, xs, SecretBytes(qkd), (KEY_ID,), TH))
        for n in range(SA_KEYS):
            schedule.esp_key(s, f"tunnel-{n // 2}", ("i2r", "r2i")[n % 2], 0xC0000000 + n, 1)
        schedule.confirmation_tag(s, "initiator", TH)
        schedule.confirmation_tag(s, "responder", TH)


def full_rekey_bare(cls) -> None:
    qkd = os.urandom(32)
    priv = cls.generate()
    ss_r, ct = priv.public_key().encapsulate()
    ss_i = priv.decapsulate(ct)
    a, b = X25519PrivateKey.generate(), X25519PrivateKey.generate()
    xs = [a.exchange(b.public_key()), b.exchange(a.public_key())]
    for ss, x in zip((ss_i, ss_r), xs, strict=True):
        s = HKDF(hashes.SHA384(), 48, b"salt", b"info").derive(ss + x + qkd)
        for n in range(SA_KEYS + 2):
            HKDFExpand(hashes.SHA384(), 36, n.to_bytes(4, "big")).derive(s)


def main() -> None:
    ap = argparse.ArgumentParser(description="keymix throughput")
    ap.add_argument("--seconds", type=float, default=0.3, help="time per measurement")
    args = ap.parse_args()
    from cryptography.hazmat.backends.openssl.backend import backend
    print(f"{backend.openssl_version_text()}, {os.cpu_count()} CPUs; "
          f"{args.seconds}s per figure, single thread")
    bench_kems(args.seconds)
    bench_x25519(args.seconds)
    for name, cls in (("ML-KEM-768", mlkem.MLKEM768PrivateKey),
                      ("ML-KEM-1024", mlkem.MLKEM1024PrivateKey)):
        row(f"rekey {name}+X25519+QKD, 2 sides x {SA_KEYS} SA keys",
            rate(lambda n=name: full_rekey_ours(n), args.seconds),
            rate(lambda c=cls: full_rekey_bare(c), args.seconds))
    s = combine(HybridInputs("ML-KEM-768", SecretBytes(os.urandom(32)), None, None, (), TH))
    row("one ESP SA key (HKDF-Expand + checks)",
        rate(lambda: schedule.esp_key(s, "t", "i2r", 0xC0000001, 1), args.seconds),
        rate(lambda: HKDFExpand(hashes.SHA384(), 36, b"x" * 60).derive(os.urandom(48)),
             args.seconds))


if __name__ == "__main__":
    main()
