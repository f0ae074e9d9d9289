"""Benchmark: ETSI 014 enc_keys + dec_keys through qkdgate's client against
the KME simulator on loopback (real HTTPS, mutual TLS), with and without
connection reuse. Prints keys per second and p50/p99 latency of one
master/slave round (enc_keys at KME-A, then dec_keys at KME-B).

    .venv/bin/python bench/qkd.py [--rounds 300] [--keys 1] [--concurrency 1]

Not a test: figures depend on the machine. The simulator runs in the same
process and event loop, so the figures include server-side cost.
"""

from __future__ import annotations

import argparse
import asyncio
import statistics
import tempfile
import time

from qkdgate.adapters.etsi014 import Etsi014KeySource
from qkdgate.adapters.kmesim.server import KmeSimulator


async def run(rounds: int, keys: int, concurrency: int, reuse: bool, state: str) -> dict:
    async with KmeSimulator.start(state, prefill=rounds * keys + 100,
                                  max_key_count=rounds * keys + 1000) as sim:
        master = Etsi014KeySource(sim.credentials("SAE-A").settings(reuse_connections=reuse))
        slave = Etsi014KeySource(sim.credentials("SAE-B").settings(reuse_connections=reuse))
        lat: list[float] = []

        async def one() -> None:
            t0 = time.perf_counter()
            got = await master.get_new_keys("SAE-B", number=keys, size_bits=256)
            back = await slave.get_keys_by_id("SAE-A", [k.key_id for k in got])
            lat.append(time.perf_counter() - t0)
            if [k.key for k in back] != [k.key for k in got]:
                raise SystemExit("bench: the slave got different keys from the master")

        await one()   # warm-up: first handshakes when reusing
        lat.clear()
        start = time.perf_counter()
        for i in range(0, rounds, concurrency):
            await asyncio.gather(*(one() for _ in range(min(concurrency, rounds - i))))
        elapsed = time.perf_counter() - start
        await master.close()
        await slave.close()
    lat.sort()
    return {"keys_per_s": rounds * keys / elapsed,
            "p50_ms": statistics.median(lat) * 1e3, "mean_ms": statistics.fmean(lat) * 1e3,
            "p99_ms": lat[min(len(lat) - 1, int(len(lat) * 0.99))] * 1e3}


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--rounds", type=int, default=300)
    ap.add_argument("--keys", type=int, default=1, help="keys per enc_keys request")
    ap.add_argument("--concurrency", type=int, default=1)
    args = ap.parse_args()
    with tempfile.TemporaryDirectory() as state:
        print(f"ETSI 014 enc_keys+dec_keys over mTLS on loopback, {args.rounds} rounds, "
              f"{args.keys} key(s) of 256 bits per round, concurrency {args.concurrency}")
        for reuse in (True, False):
            r = asyncio.run(run(args.rounds, args.keys, args.concurrency, reuse, state))
            label = "keep-alive reuse " if reuse else "new TLS per call "
            print(f"  {label}: {r['keys_per_s']:8.1f} keys/s   p50 {r['p50_ms']:6.2f} ms   "
                  f"p99 {r['p99_ms']:6.2f} ms   mean {r['mean_ms']:6.2f} ms")


if __name__ == "__main__":
    main()
