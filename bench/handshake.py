#!/usr/bin/env python3
"""CPU cost of the qkdgate peer handshake, beside the bare primitives.

Runs two PeerSessions in memory (tests/protocol harness: fake KME link, no
sockets, no kernel) and measures process CPU time for

* a full first handshake (both sides, INIT..DONE, including QKD bookkeeping);
* a rekey on an established pair (every rekey is a full fresh exchange);
* the sum of the bare primitives one exchange needs: ML-KEM keygen + encaps
  + decaps, 2 X25519 key pairs + 2 exchanges, 2 hybrid signatures + 2
  verifications (ML-DSA + Ed25519 each), the INIT Ed25519 sign + verify, two
  HKDF combines and four confirmation tags.

The ratio says how much the protocol adds on top of the cryptography
(encoding, transcript hashing, fragmentation, state machine, Python; the
harness also derives the per-SA ESP/MACsec keys of two tunnels per
direction, as the tunnel manager would).

Usage: bench/handshake.py [-n ROUNDS] [--cnsa2]
"""

from __future__ import annotations

import argparse
import os
import sys
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT / "tests" / "protocol"))


def cpu(fn, n: int) -> float:
    """CPU seconds per call, best of three batches."""
    best = float("inf")
    for _ in range(3):
        t0 = time.process_time()
        for _ in range(n):
            fn()
        best = min(best, (time.process_time() - t0) / n)
    return best


def primitives(kem_name: str, ident_a, ident_b) -> dict[str, float]:
    from qkdgate.keymix.classical import x25519_keypair, x25519_shared
    from qkdgate.keymix.combiner import HybridInputs, combine
    from qkdgate.keymix.kem import get_kem
    from qkdgate.keymix.schedule import confirmation_tag
    from qkdgate.keymix.secret import SecretBytes

    kem = get_kem(kem_name)
    priv, pk = kem.generate_keypair()
    ct, ss = kem.encapsulate(pk)
    xa, _xpa = x25519_keypair()
    _xb, xpb = x25519_keypair()
    msg = os.urandom(32)
    sig_a = ident_a.sign(msg, b"RESP")
    ed = ident_a.sign_ed25519(msg, b"INIT")
    inputs = HybridInputs(kem_name, ss, x25519_shared(xa, xpb), SecretBytes(os.urandom(32)),
                          ("6f1c9c1e-7d0e-4c55-9a43-1b6f3f0e2a11",), os.urandom(32))
    session = combine(inputs)
    n = 50
    costs = {
        "ML-KEM keygen": cpu(kem.generate_keypair, n),
        "ML-KEM encaps": cpu(lambda: kem.encapsulate(pk), n),
        "ML-KEM decaps": cpu(lambda: kem.decapsulate(priv, ct), n),
        "X25519 keygen x2": 2 * cpu(x25519_keypair, n),
        "X25519 exchange x2": 2 * cpu(lambda: x25519_shared(xa, xpb), n),
        "hybrid sign x2": 2 * cpu(lambda: ident_a.sign(msg, b"RESP"), n),
        "hybrid verify x2": 2 * cpu(lambda: ident_a.public.verify(msg, sig_a, b"RESP"), n),
        "Ed25519 INIT sign+verify": cpu(lambda: ident_b.sign_ed25519(msg, b"INIT"), n)
        + cpu(lambda: ident_a.public.verify_ed25519(msg, ed, b"INIT"), n),
        "combine x2": 2 * cpu(lambda: combine(inputs), n),
        "confirmation tags x4": 4 * cpu(lambda: confirmation_tag(session, "initiator", msg), n),
    }
    return costs


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("-n", "--rounds", type=int, default=30)
    ap.add_argument("--cnsa2", action="store_true", help="ML-KEM-1024 + ML-DSA-87")
    args = ap.parse_args()

    from protocol_harness import identity, make_pair
    profile = "cnsa2" if args.cnsa2 else "default"
    kem_name = "ML-KEM-1024" if args.cnsa2 else "ML-KEM-768"
    ida, idb = identity("gw-a", profile=profile), identity("gw-b", profile=profile)

    def handshake():
        p = make_pair(kem=kem_name, id_a=ida, id_b=idb, seed=int.from_bytes(os.urandom(2), "big"))
        p.roundtrip_until_done()

    def make_established():
        p = make_pair(kem=kem_name, id_a=ida, id_b=idb)
        p.roundtrip_until_done()
        return p

    pair = make_established()

    def rekey():
        pair.a.session.initiate_rekey(pair.now, "bench")
        pair.roundtrip_until_done()

    # warm up imports and caches
    handshake()
    rekey()
    setup = cpu(lambda: make_pair(kem=kem_name, id_a=ida, id_b=idb), args.rounds)
    full = cpu(handshake, args.rounds) - setup
    per_rekey = cpu(rekey, args.rounds)
    prim = primitives(kem_name, ida, idb)
    prim_sum = sum(prim.values())

    print(f"qkdgate handshake benchmark ({kem_name} + X25519, {ida.profile.name}, "
          f"QKD via in-memory fake KME, {args.rounds} rounds, CPU time, one core)")
    print()
    print("bare primitives of one exchange (both sides):")
    for name, t in prim.items():
        print(f"  {name:28s} {t * 1e3:8.3f} ms")
    print(f"  {'sum':28s} {prim_sum * 1e3:8.3f} ms")
    print()
    print(f"full handshake, both sides   {full * 1e3:8.3f} ms   "
          f"(session setup {setup * 1e3:.3f} ms excluded)")
    print(f"rekey, both sides            {per_rekey * 1e3:8.3f} ms")
    print(f"protocol overhead ratio      {per_rekey / prim_sum:8.2f} x  "
          "(rekey / sum of primitives)")
    from qkdgate.gateway.protocol.fragment import Reassembler
    from qkdgate.gateway.protocol.messages import decode
    p = make_pair(kem=kem_name, id_a=ida, id_b=idb)
    p.roundtrip_until_done()
    r, sizes = Reassembler(), []
    for _, d in p.log:
        raw = r.feed(d, 0.0)
        if raw is not None:
            sizes.append(f"{decode(raw).type.name} {len(raw)}")
    print(f"wire per exchange            {len(p.log)} datagrams, "
          f"{sum(len(d) for _, d in p.log)} bytes ({', '.join(sizes)})")
    print(f"handshakes/s on one core     {1 / per_rekey:8.1f}    (both sides on the same core)")
    print(f"                             {2 / per_rekey:8.1f}    (one side each, per gateway core)")
    return 0


if __name__ == "__main__":
    sys.exit(main())
