"""Where a daemon's memory grows per rekey (issue 10: the soak's RSS slope).

The 1 h soak (bench/soak.py) measured gw-a's RSS growing 45.8 KiB/min and
gw-b's 16.5 KiB/min at about 2.8 rekeys/s. An RSS slope cannot say whether
the growth is bounded (allocator arenas filling up) or a structure that
grows with every rekey. This bench answers that on the host with
``tracemalloc``: two real daemons in one process (the set-up of
bench/rekey_n1.py: recording kernel fakes, the KME simulator its own
process, real ETSI 014 clients, a real key journal), rekeyed back to back;
the fakes' own records of what they were asked are emptied after every
rekey, so what grows is the daemons'.
After a warm-up it takes a snapshot every ``--step`` rekeys and prints, per
step, the traced Python heap and the source lines whose allocations grew
most since the first snapshot, with bytes per rekey. A line that grows by
the same amount in every step grows without bound; one that levels off is
a cache or a pool.

    .venv/bin/python bench/memgrowth.py                   # 300 warm-up, 4 x 500 rekeys
    .venv/bin/python bench/memgrowth.py --step 1000 --steps 3
"""
import argparse
import asyncio
import os
import sys
import time
import tracemalloc
from pathlib import Path

HERE = Path(__file__).resolve().parent
sys.path.insert(0, str(HERE.parent / "tests" / "interop"))   # rekey_n1 needs daemon_pair
from rekey_n1 import daemon_pair, rekey_and_wait  # noqa: E402  (bench/ is not a package)

from qkdgate.gateway.daemon.daemon import Daemon  # noqa: E402
from qkdgate.testing.fakes import RecordingIpsecBackend  # noqa: E402


def rss_kib() -> int:
    with open("/proc/self/status") as f:
        return next(int(line.split()[1]) for line in f if line.startswith("VmRSS:"))


IGNORE = (tracemalloc.Filter(False, tracemalloc.__file__),
          tracemalloc.Filter(False, "<frozen importlib._bootstrap*>"),
          tracemalloc.Filter(False, "<unknown>"))


async def rekeys(ds: list[Daemon], ks: list[RecordingIpsecBackend], n: int) -> None:
    for _ in range(n):
        await rekey_and_wait(ds, ks, poll=0.001, limit=30)
        await asyncio.sleep(0.06)        # past the 50 ms grace: the old SAs go
        for k in ks:                     # the fakes' own records are not the daemon's
            k.ops.clear()
            k.spi_batches.clear()
            k.larval_reqids.clear()


def top_growth(first: tracemalloc.Snapshot, now: tracemalloc.Snapshot,
               rekeys: int, limit: int) -> list[str]:
    out = []
    for st in now.compare_to(first, "lineno")[:limit]:
        if st.size_diff <= 0:
            break
        frame = st.traceback[0]
        where = frame.filename
        for root in (str(HERE.parent) + "/", sys.prefix + "/", sys.base_prefix + "/"):
            where = where.replace(root, "")
        out.append(f"    {st.size_diff / rekeys:8.1f} B/rekey  {st.count_diff:+7d} blocks  "
                   f"{where}:{frame.lineno}")
    return out


async def main(args: argparse.Namespace) -> None:
    async with daemon_pair("memgrowth-", "50ms") as (ds, ks):
        t0 = time.monotonic()
        await rekeys(ds, ks, args.warmup)
        print(f"two in-process daemons, one tunnel, hybrid-required (ML-KEM + X25519 + QKD "
              f"over ETSI 014); warm-up {args.warmup} rekeys in {time.monotonic() - t0:.0f} s; "
              f"host load {os.getloadavg()[0]:.1f}", flush=True)
        first = tracemalloc.take_snapshot().filter_traces(IGNORE)
        base = sum(s.size for s in first.statistics("filename"))
        rss0 = rss_kib()
        done = 0
        for step in range(1, args.steps + 1):
            t0 = time.monotonic()
            await rekeys(ds, ks, args.step)
            done += args.step
            snap = tracemalloc.take_snapshot().filter_traces(IGNORE)
            heap = sum(s.size for s in snap.statistics("filename"))
            rate = args.step / (time.monotonic() - t0)
            print(f"\nstep {step}: {done} rekeys after the warm-up ({rate:.1f}/s); "
                  f"traced heap {heap / 1024:.0f} KiB, {heap - base:+,} B since the warm-up "
                  f"= {(heap - base) / done:.1f} B/rekey; process RSS {rss_kib() / 1024:.1f} MiB, "
                  f"{rss_kib() - rss0:+,} KiB since the warm-up; the lines that grew most:",
                  flush=True)
            print("\n".join(top_growth(first, snap, done, args.top)), flush=True)


if __name__ == "__main__":
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--warmup", type=int, default=300)
    ap.add_argument("--step", type=int, default=500)
    ap.add_argument("--steps", type=int, default=4)
    ap.add_argument("--top", type=int, default=12)
    tracemalloc.start(1)
    asyncio.run(main(ap.parse_args()))
