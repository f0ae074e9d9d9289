"""The KME round trip a gateway sees, with the KME simulator in a thread of
the bench (as bench/vs_contenders.py had it until issue 19's third round)
or in its own process (``qkdgate kme-sim``, as it has it now).

    .venv/bin/python bench/kme_path.py [--requests 200] [--busy 1]      # host, root

Why: in the loaded lab, py-spy found both daemons idle for almost all of an
N=100 rekey, one establish logged "KME enc_keys: no answer within 5.0 s",
and N=1 took 1.9 s against strongSwan's 0.12 s; the KME simulator then
shared the bench's Python (its GIL) with the threads that parse the
NETLINK_XFRM notifications. This runs on the host, whose kernel need not
have ESP: no SA is installed.

Each variant builds the bench topology (vs_topology), starts the KME, and
runs a separate client process in gw-a's namespace: the ETSI 014 client the
daemon uses (``Etsi014KeySource``, keep-alive as configured there), asking
``--requests`` times for one 256-bit key (``enc_keys``, ETSI GS QKD 014 5.3)
and timing each. Meanwhile the bench process runs ``--busy`` pure-Python
threads, standing in for its notification parsers under load. Prints the
latency median, 90th percentile and maximum per variant.
"""

from __future__ import annotations

import argparse
import asyncio
import json
import os
import shutil
import statistics
import subprocess
import tempfile
import threading
from pathlib import Path

from vs_contenders import Qkdgate  # bench/ is not a package
from vs_topology import VENV_BIN, Topology

CLIENT = r"""
import asyncio, json, sys, time
from qkdgate.adapters.etsi014 import Etsi014KeySource

url, kme_id, cert, key, ca, hostname, n = sys.argv[1:8]
async def main():
    opts = {"server_hostname": hostname} if hostname != "-" else {}
    src = Etsi014KeySource({"name": "kme", "url": url, "kme_id": kme_id, "timeout": 30,
                            "retries": 0, "tls": {"cert": cert, "key": key, "ca": ca},
                            "options": opts})
    took = []
    for _ in range(int(n)):
        t0 = time.perf_counter()
        keys = await src.get_new_keys("SAE-B", 1, 256)
        took.append(time.perf_counter() - t0)
        for k in keys:
            k.key.wipe()
    print(json.dumps(took))
asyncio.run(main())
"""


def kme_in_thread(q: Qkdgate) -> tuple[object, object, object]:
    """The old way: KmeSimulator on a loop thread of this process, reached
    through TCP forwarders (also threads of this process) from a loopback
    listener in each gateway namespace."""
    from qkdgate.adapters.kmesim.server import KmeSimulator
    from qkdgate.gateway.demo import net as dn
    from qkdgate.gateway.demo.config import KmeEndpoint
    loop = dn.LoopThread(q.topo.k, "kme").start()
    listeners = [dn.loopback_listener(q.topo.a), dn.loopback_listener(q.topo.b)]
    ports = [s.getsockname()[1] for s in listeners]
    ready = threading.Event()
    holder: dict[str, object] = {}

    async def main() -> None:
        stop = asyncio.Event()
        holder["stop"] = stop
        async with KmeSimulator.start(q.work / "kme-thread", prefill=5000,
                                      max_key_count=100000) as sim:
            fwds = [dn.TcpForwarder(s, ("127.0.0.1", sim.ports[k]))
                    for s, k in zip(listeners, ("KME-A", "KME-B"), strict=True)]
            for f in fwds:
                await f.start()
            holder["sim"] = sim
            ready.set()
            await stop.wait()
    fut = loop.submit(main())
    if not ready.wait(60):
        raise RuntimeError("KME simulator did not start")
    c = holder["sim"].credentials("SAE-A")   # type: ignore[attr-defined]
    ep = KmeEndpoint(f"https://127.0.0.1:{ports[0]}", c.kme_id, str(c.cert), str(c.key),
                     str(c.ca))

    def stop() -> None:
        if loop.loop is not None:
            loop.loop.call_soon_threadsafe(holder["stop"].set)   # type: ignore[attr-defined]
        fut.result(10)
        loop.stop()
    return ep, stop, None


def busy(stop: threading.Event) -> None:
    """Pure Python, as a notification parser is: it holds the GIL."""
    import struct
    data = bytes(range(256)) * 16
    while not stop.is_set():
        for off in range(0, len(data) - 16, 16):
            struct.unpack_from("=IHHII", data, off)


def variant(mode: str, requests: int, n_busy: int) -> list[float]:
    topo = Topology().up()
    work = Path(tempfile.mkdtemp(prefix="kmepath-"))
    os.chmod(work, 0o700)
    q = Qkdgate(topo, work, work)
    stop_busy = threading.Event()
    threads = [threading.Thread(target=busy, args=(stop_busy,), daemon=True)
               for _ in range(n_busy)]
    stop_kme = None
    try:
        if mode == "thread":
            ep, stop_kme, _ = kme_in_thread(q)
            hostname = "-"
        else:
            ep, _b = q._kme()
            hostname = "localhost"
        for t in threads:
            t.start()
        out = subprocess.run(["ip", "netns", "exec", topo.a, str(VENV_BIN / "python"), "-c",
                              CLIENT, ep.url, ep.kme_id, ep.cert, ep.key, ep.ca,   # type: ignore[attr-defined]
                              hostname, str(requests)],
                             check=True, capture_output=True, text=True, timeout=600)
        return [float(x) for x in json.loads(out.stdout)]
    finally:
        stop_busy.set()
        for t in threads:
            t.join(5)
        if stop_kme is not None:
            stop_kme()         # type: ignore[operator]
        q.close()
        topo.down()
        shutil.rmtree(work, ignore_errors=True)


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--requests", type=int, default=200)
    ap.add_argument("--busy", type=int, default=1, help="busy Python threads in the bench")
    ap.add_argument("--rounds", type=int, default=2, help="thread/process pairs, interleaved")
    args = ap.parse_args()
    results: dict[tuple[str, int], list[float]] = {}
    for _ in range(args.rounds):
        for busy_n in sorted({0, args.busy}):
            for mode in ("thread", "process"):
                results.setdefault((mode, busy_n), []).extend(
                    variant(mode, args.requests, busy_n))
    load = os.getloadavg()[0]
    print(f"ETSI 014 enc_keys (1 key) from gw-a's namespace, {args.requests} x {args.rounds} "
          f"requests per row, host load {load:.1f}, {os.cpu_count()} CPU(s):")
    print("| KME simulator | busy bench threads | median | p90 | max |")
    print("|---|---|---|---|---|")
    for (mode, busy_n), xs in sorted(results.items(), key=lambda kv: (kv[0][1], kv[0][0])):
        xs.sort()
        p90 = xs[int(0.9 * (len(xs) - 1))]
        where = "thread of the bench" if mode == "thread" else "own process (kme-sim)"
        print(f"| {where} | {busy_n} | {statistics.median(xs) * 1e3:.1f} ms "
              f"| {p90 * 1e3:.1f} ms | {max(xs) * 1e3:.1f} ms |")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
