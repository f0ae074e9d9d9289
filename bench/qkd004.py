"""Benchmark: the ETSI 004 key source (GET_KEY per key) against the KME
simulator on loopback with mutual TLS, on each 004 binding (etsi-binary:
frames on a TLS stream; json: HTTPS POST), beside ETSI 014 for the same
rounds. Prints keys per second and p50/p99 latency of one master/slave
round (master get_new_keys at KME-A, slave get_keys_by_id at KME-B).

    .venv/bin/python bench/qkd004.py [--rounds 300] [--keys 1]

Not a test: figures depend on the machine. The simulator runs in the same
process and event loop, so the figures include server-side cost.
"""

from __future__ import annotations

import argparse
import asyncio
import statistics
import tempfile
import time

from qkdgate.adapters.etsi004_source import Etsi004KeySource
from qkdgate.adapters.etsi014 import Etsi014KeySource
from qkdgate.adapters.kmesim.server import KmeSimulator


async def run(kind: str, rounds: int, keys: int, state: str) -> dict:
    async with KmeSimulator.start(state, prefill=rounds * keys + 100,
                                  max_key_count=rounds * keys + 1000) as sim:
        master: Etsi004KeySource | Etsi014KeySource
        slave: Etsi004KeySource | Etsi014KeySource
        if kind.startswith("etsi004"):
            binding = kind.split(":", 1)[1]
            master = Etsi004KeySource(sim.credentials("SAE-A").settings(binding=binding))
            slave = Etsi004KeySource(sim.credentials("SAE-B").settings(binding=binding))
        else:
            master = Etsi014KeySource(sim.credentials("SAE-A").settings())
            slave = Etsi014KeySource(sim.credentials("SAE-B").settings())
        if isinstance(slave, Etsi004KeySource):
            await slave.connect("SAE-A")
        lat: list[float] = []

        async def one() -> None:
            t0 = time.perf_counter()
            got = await master.get_new_keys("SAE-B", number=keys, size_bits=256)
            back = await slave.get_keys_by_id("SAE-A", [k.key_id for k in got])
            lat.append(time.perf_counter() - t0)
            if [k.key for k in back] != [k.key for k in got]:
                raise SystemExit("bench: the slave got different keys from the master")

        await one()   # warm-up: first handshakes, stream opening
        lat.clear()
        start = time.perf_counter()
        for _ in range(rounds):
            await one()
        elapsed = time.perf_counter() - start
        await master.close()
        await slave.close()
    lat.sort()
    return {"keys_per_s": rounds * keys / elapsed, "p50_ms": statistics.median(lat) * 1e3,
            "p99_ms": lat[min(len(lat) - 1, int(len(lat) * 0.99))] * 1e3}


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--rounds", type=int, default=300)
    ap.add_argument("--keys", type=int, default=1, help="keys per master request")
    args = ap.parse_args()
    with tempfile.TemporaryDirectory() as state:
        print(f"master+slave rounds over mTLS on loopback, {args.rounds} rounds, "
              f"{args.keys} key(s) of 256 bits per round, keep-alive connections")
        for kind in ("etsi014", "etsi004:etsi-binary", "etsi004:json"):
            r = asyncio.run(run(kind, args.rounds, args.keys, state))
            print(f"  {kind:<20} {r['keys_per_s']:8.1f} keys/s   p50 {r['p50_ms']:6.2f} ms   "
                  f"p99 {r['p99_ms']:6.2f} ms")


if __name__ == "__main__":
    main()
