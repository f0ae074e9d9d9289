"""Benchmark: keys per second through 1, 2 and 3 QKD hops (trusted-node
relay) at 10 km and 50 km links, two ways:

* **modelled**: a line of KMEs with the default link model (InGaAs, 0.2 dB/km,
  finite-key factor 0.06) on a fake clock: advance T seconds, then draw keys
  through the relay (sans-IO, real hop crypto) until the route is empty;
  keys/s = keys delivered / T. What a network of such links would sustain.
* **HTTPS**: enc_keys + dec_keys of 256-bit keys through qkdgate's ETSI
  014 client against the simulator's HTTPS servers on loopback (mutual TLS,
  connection reuse), pools pre-filled, with links of the same length; every
  relayed hop is a real ETSI GS QKD 020 ``POST /kmapi/v1/ext_keys`` between
  the nodes' own HTTPS servers (mutual TLS) and the enc_keys answer waits
  for the target KME's ``relayed`` ack. One key per request, and 16: the
  simulator's own cost per key. What a client gets is the lower of the two.

    .venv/bin/python bench/relay.py [--seconds 20] [--rounds 200]

Not a test: the second figure depends on the machine.
"""

from __future__ import annotations

import argparse
import asyncio
import tempfile
import time
from dataclasses import replace

from qkdgate.adapters.etsi014 import Etsi014KeySource
from qkdgate.adapters.kmesim.kme import SimNetwork
from qkdgate.adapters.kmesim.linkmodel import REALISTIC
from qkdgate.adapters.kmesim.relay import link_bits
from qkdgate.adapters.kmesim.server import KmeSimulator
from qkdgate.adapters.kmesim.topology import line

KEY_BITS = 256


def nodes(hops: int) -> list[str]:
    return ["KME-A", *[f"KME-R{i}" for i in range(1, hops)], "KME-B"]


def modelled(hops: int, km: float, seconds: float) -> tuple[float, float]:
    """(keys/s measured on the fake clock, keys/s predicted from the rate)."""
    t = [0.0]
    params = replace(REALISTIC, distance_km=km)
    net = SimNetwork.from_topology(line(nodes(hops), params=params, prefill=0,
                                        max_key_count=10_000_000), now=lambda: t[0])
    t[0] = seconds
    delivered, number = 0, 128
    while number:
        r = net.enc_keys("KME-A", "SAE-A", "SAE-B", {"number": number, "size": KEY_BITS})
        if r.status == 200:
            delivered += number
            ids = [k["key_ID"] for k in r.body["keys"]]
            if net.dec_keys("KME-B", "SAE-B", "SAE-A", ids).status != 200:
                raise SystemExit("bench: the slave could not fetch a relayed key")
        else:
            number //= 2
    skr = next(iter(net.links.values())).rate()[0]
    per_key = KEY_BITS if hops == 1 else link_bits(KEY_BITS)
    return delivered / seconds, skr / per_key


async def simulator(hops: int, km: float, rounds: int, number: int, state: str) -> float:
    params = replace(REALISTIC, distance_km=km)
    topo = line(nodes(hops), params=params, prefill=(rounds + 10) * number * 3,
                max_key_count=10_000_000)
    async with KmeSimulator.start(state, topology=topo, qkd004_binary=False) as sim:
        master = Etsi014KeySource(sim.credentials("SAE-A").settings())
        slave = Etsi014KeySource(sim.credentials("SAE-B").settings())

        async def one() -> None:
            got = await master.get_new_keys("SAE-B", number=number, size_bits=KEY_BITS)
            back = await slave.get_keys_by_id("SAE-A", [k.key_id for k in got])
            if [k.key for k in back] != [k.key for k in got]:
                raise SystemExit("bench: the slave got a different key")

        await one()
        start = time.perf_counter()
        for _ in range(rounds):
            await one()
        elapsed = time.perf_counter() - start
        await master.close()
        await slave.close()
    return rounds * number / elapsed


def main() -> None:
    ap = argparse.ArgumentParser(description=(__doc__ or "").split("\n\n")[0])
    ap.add_argument("--seconds", type=float, default=20.0, help="fake-clock time per run")
    ap.add_argument("--rounds", type=int, default=200, help="HTTPS rounds per hop count")
    args = ap.parse_args()
    print(f"keys/s of {KEY_BITS}-bit keys; relayed hops pay {link_bits(KEY_BITS)} link bits "
          f"per key (one-time pad + one-time Poly1305 key), a direct link {KEY_BITS}")
    print(f"{'hops':>4} {'km/link':>8} {'modelled keys/s':>16} {'predicted':>10} "
          f"{'route km':>9}")
    for km in (10.0, 50.0):
        for hops in (1, 2, 3):
            got, predicted = modelled(hops, km, args.seconds)
            print(f"{hops:>4} {km:>8.0f} {got:>16.1f} {predicted:>10.1f} {hops * km:>9.0f}")
    print(f"\nsimulator over HTTPS + mTLS on loopback (ETSI 014 at the edges, ETSI 020 "
          f"between nodes), enc_keys+dec_keys, {args.rounds} rounds")
    print(f"{'hops':>4} {'km/link':>8} {'keys/s 1/req':>13} {'keys/s 16/req':>14}")
    for km in (10.0, 50.0):
        for hops in (1, 2, 3):
            rates = []
            for number in (1, 16):
                with tempfile.TemporaryDirectory() as state:
                    rates.append(asyncio.run(simulator(hops, km, args.rounds, number, state)))
            print(f"{hops:>4} {km:>8.0f} {rates[0]:>13.1f} {rates[1]:>14.1f}")


if __name__ == "__main__":
    main()
