"""Tunnel benchmark; run it in the kernel lab VM (the host may lack ESP):

    lab/run.sh -- .venv/bin/python bench/tunnels.py [--pairs 2000]

Prints: XFRM SA install+delete pairs per second through qkdgate's netlink
code (with and without the read-back check) beside `ip -batch` doing the
same in the same run, and the ratio; the time to rekey N = 1, 10, 100, 1000
tunnels make-before-break on a gateway pair (both ends, policies switched
by UPDPOLICY); the kernel memory per tunnel (Slab delta per gateway) and the
Python-side cost of the backend objects per tunnel.
"""

from __future__ import annotations

import argparse
import ipaddress
import os
import subprocess
import sys
import tempfile
import time
import tracemalloc
import uuid

from qkdgate.interfaces import (
    Direction,
    InstallSa,
    Lifetime,
    PolicySpec,
    RemoveSa,
    SaId,
    SaSpec,
    Selector,
    Template,
)
from qkdgate.keymix.secret import SecretBytes
from qkdgate.tunnels.xfrm import XfrmBackend

GA, GB = ipaddress.ip_address("192.0.2.1"), ipaddress.ip_address("192.0.2.2")
KEY = SecretBytes(os.urandom(36))
LT = Lifetime(soft_add_seconds=3000, hard_add_seconds=3600)


def netns(name: str, op: str = "add") -> None:
    subprocess.run(["ip", "netns", op, name], check=True)


def slab_kb() -> int:
    with open("/proc/meminfo") as f:
        for line in f:
            if line.startswith("Slab:"):
                return int(line.split()[1])
    return 0


def bench_pairs(ns: str, n: int, verify: bool) -> float:
    be = XfrmBackend(ns, verify=verify, registry=None)
    spec = SaSpec(key=KEY, reqid=7, lifetime=LT)
    t0 = time.perf_counter()
    for i in range(n):
        sa = SaId(GA, GB, 0x1000 + i)
        be.install_outbound(sa, spec)
        be.remove_sa(sa)
    dt = time.perf_counter() - t0
    be.close()
    return n / dt


def bench_pairs_batched(ns: str, n: int, verify: bool) -> float:
    """The same pairs through IpsecBackend.apply: installs in one pipelined
    batch (read back in one multi-get with ``verify``), deletes in another."""
    be = XfrmBackend(ns, verify=verify, registry=None)
    spec = SaSpec(key=KEY, reqid=7, lifetime=LT)
    ids = [SaId(GA, GB, 0x1000 + i) for i in range(n)]
    t0 = time.perf_counter()
    results = be.apply([InstallSa(sa, spec, inbound=False) for sa in ids])
    results += be.apply([RemoveSa(sa) for sa in ids])
    dt = time.perf_counter() - t0
    be.close()
    failed = [r for r in results if r is not None]
    if failed:
        raise SystemExit(f"batched pairs: {len(failed)} failed, first {failed[0]}")
    return n / dt


def bench_ip_batch(ns: str, n: int) -> float:
    key = "0x" + KEY.reveal().hex()
    lines = []
    for i in range(n):
        spi = hex(0x1000 + i)
        lines.append(f"xfrm state add src {GA} dst {GB} proto esp spi {spi} reqid 7 mode tunnel "
                     f"replay-window 1024 flag esn aead 'rfc4106(gcm(aes))' {key} 128 "
                     f"limit time-soft 3000 limit time-hard 3600")
        lines.append(f"xfrm state delete src {GA} dst {GB} proto esp spi {spi}")
    with tempfile.NamedTemporaryFile("w", suffix=".batch", delete=False) as f:
        f.write("\n".join(lines) + "\n")
    try:
        t0 = time.perf_counter()
        subprocess.run(["ip", "-n", ns, "-batch", f.name], check=True)
        dt = time.perf_counter() - t0
    finally:
        os.unlink(f.name)
    return n / dt


class Tunnel:
    def __init__(self, i: int, a: XfrmBackend, b: XfrmBackend) -> None:
        self.base = 0x10000 + 16 * i
        self.na = ipaddress.ip_network(f"10.{64 + i // 256}.{i % 256}.0/24")
        self.nb = ipaddress.ip_network(f"10.{128 + i // 256}.{i % 256}.0/24")
        self.a, self.b, self.gen, self.sas = a, b, 0, []

    def out_policy(self, side: str, reqid: int) -> PolicySpec:
        if side == "a":
            return PolicySpec(Selector(self.na, self.nb), Direction.OUT,
                              template=Template(GA, GB, reqid))
        return PolicySpec(Selector(self.nb, self.na), Direction.OUT,
                          template=Template(GB, GA, reqid))

    def setup(self) -> None:
        for side, be, me, peer, mine, theirs in (("a", self.a, GA, GB, self.na, self.nb),
                                                 ("b", self.b, GB, GA, self.nb, self.na)):
            be.install_policy(self.out_policy(side, self.base + 1))
            t = Template(peer, me, self.base)
            be.install_policy(PolicySpec(Selector(theirs, mine), Direction.IN, template=t))
            be.install_policy(PolicySpec(Selector(theirs, mine), Direction.FWD, template=t))
        self.rekey()

    def rekey(self) -> None:
        self.gen += 1
        spi_ab, spi_ba = self.b.allocate_spi(GA, GB), self.a.allocate_spi(GB, GA)
        self.b.install_inbound(SaId(GA, GB, spi_ab), SaSpec(KEY, self.base, lifetime=LT))
        self.a.install_inbound(SaId(GB, GA, spi_ba), SaSpec(KEY, self.base, lifetime=LT))
        out = self.base + 1 + self.gen % 8
        self.a.install_outbound(SaId(GA, GB, spi_ab), SaSpec(KEY, out, lifetime=LT))
        self.b.install_outbound(SaId(GB, GA, spi_ba), SaSpec(KEY, out, lifetime=LT))
        self.a.switch_outbound(self.out_policy("a", out))
        self.b.switch_outbound(self.out_policy("b", out))
        old, self.sas = self.sas, [(spi_ab, spi_ba)]
        for ab, ba in old:
            for be in (self.a, self.b):
                be.remove_sa(SaId(GA, GB, ab))
                be.remove_sa(SaId(GB, GA, ba))


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--pairs", type=int, default=2000)
    ap.add_argument("--sizes", default="1,10,100,1000")
    args = ap.parse_args()
    tag = uuid.uuid4().hex[:4]
    na, nb = f"bench{tag}a", f"bench{tag}b"
    netns(na)
    netns(nb)
    try:
        # warm up first: the kernel's first ESP states instantiate the AEAD
        # templates (and ask modprobe for candidates), which costs milliseconds
        # each for a while and would penalise whichever contender runs first
        bench_pairs(na, 500, verify=False)
        ipb = bench_ip_batch(na, args.pairs)
        ours = bench_pairs(na, args.pairs, verify=False)
        ours_v = bench_pairs(na, args.pairs, verify=True)
        ours_b = bench_pairs_batched(na, args.pairs, verify=False)
        ours_bv = bench_pairs_batched(na, args.pairs, verify=True)
        print(f"SA install+delete pairs/s over {args.pairs}: qkdgate {ours:,.0f} "
              f"(with read-back {ours_v:,.0f}), ip -batch {ipb:,.0f}; "
              f"ratio qkdgate/ip-batch {ours / ipb:.2f} (with read-back {ours_v / ipb:.2f})")
        print(f"  batched (IpsecBackend.apply): qkdgate {ours_b:,.0f} (with read-back "
              f"{ours_bv:,.0f}); ratio qkdgate/ip-batch {ours_b / ipb:.2f} "
              f"(with read-back {ours_bv / ipb:.2f})")
        for n in (int(x) for x in args.sizes.split(",")):
            a, b = XfrmBackend(na, registry=None), XfrmBackend(nb, registry=None)
            slab0 = slab_kb()
            tracemalloc.start()
            tunnels = [Tunnel(i, a, b) for i in range(n)]
            for t in tunnels:
                t.setup()
            py_bytes = tracemalloc.get_traced_memory()[0]
            tracemalloc.stop()
            slab1 = slab_kb()
            t0 = time.perf_counter()
            for t in tunnels:
                t.rekey()
            dt = time.perf_counter() - t0
            print(f"rekey {n:5d} tunnel(s): {dt * 1000:8.1f} ms "
                  f"({dt * 1000 / n:.2f} ms per tunnel, "
                  f"both gateways, read-back on); kernel memory "
                  f"{(slab1 - slab0) * 1024 / n / 2:,.0f} B per tunnel per gateway "
                  f"(2 SAs + 3 policies); Python {py_bytes / n:,.0f} B per tunnel")
            for be in (a, b):
                for st in be.list_sas():
                    be.remove_sa(st.sa_id)
                for p in be.list_policies():
                    be.remove_policy(p)
                be.close()
    finally:
        netns(na, "del")
        netns(nb, "del")
    return 0


if __name__ == "__main__":
    sys.exit(main())
