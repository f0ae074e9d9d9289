"""Where the Python of a rekey-all goes, per tunnel (issue 19: why qkdgate is
5x strongSwan at N = 1,000 and not 10x).

Two real daemons in one process on the host, as bench/rekey_n1.py sets them
up (the recording kernel fakes, so no ESP is needed; the KME simulator its own
process; real ETSI 014 clients over mutual TLS), but with N tunnels on their
one peer. After a warm-up rekey it profiles ``--reps`` rekey-alls with
cProfile and prints the wall and CPU time per rekey-all and per tunnel, the
CPU by area (what the daemons do, grouped by the module that spends it) and
the functions with the most time of their own.

    .venv/bin/python bench/profile_rekey.py                      # N=1000, 2 reps
    .venv/bin/python bench/profile_rekey.py --tunnels 100 --reps 5 --top 30 --dump p.prof

The fakes stand in for the kernel: their time is shown as its own area and
left out of the per-tunnel figure (in the lab the kernel's XFRM work is the
floor `ip -batch` measures). A rekey-all is done when each fake holds at least N new
outbound SAs and none of the old ones (bench/vs_strongswan.py's completion);
the wait polls every 5 ms, and the poll's own time is left out as well.
"""
import argparse
import asyncio
import cProfile
import errno
import os
import pstats
import socket
import sys
import time
from pathlib import Path

HERE = Path(__file__).resolve().parent
sys.path.insert(0, str(HERE.parent / "tests" / "interop"))   # rekey_n1 needs daemon_pair
from profile_areas import report  # noqa: E402  (bench/ is not a package)
from rekey_n1 import daemon_pair, rekey_and_wait  # noqa: E402

from qkdgate.errors import TunnelError  # noqa: E402
from qkdgate.interfaces import IPAddress  # noqa: E402
from qkdgate.testing.fakes import RecordingIpsecBackend  # noqa: E402


class CountingKernel(RecordingIpsecBackend):
    """The recording fake without its SPI allocator's scan of every SA (a
    search over all 4N SAs per reservation: seconds per rekey-all at
    N = 1,000). Each fake counts its SPIs up from its own counter and no SA
    reaches it by another way, so a fresh SPI is always free."""

    def allocate_spi(self, src: IPAddress, dst: IPAddress, proto: int = socket.IPPROTO_ESP,
                     low: int = 0xC0000000, high: int = 0xCFFFFFFF, reqid: int = 0) -> int:
        spi = max(self._next_spi, low)
        if spi > high:
            raise TunnelError("allocate_spi", errno.ENOENT, "SPI range exhausted")
        self._next_spi = spi + 1
        self.ops.append(("allocate_spi", spi))
        self.larval_reqids[spi] = reqid
        return spi


async def main(args: argparse.Namespace) -> None:
    async with daemon_pair("profile-rekey-", "50ms", tunnels=args.tunnels,
                           kernel=CountingKernel) as (ds, ks):
        await asyncio.sleep(1.0)
        warm = await rekey_and_wait(ds, ks, tunnels=args.tunnels, poll=0.005,
                                          limit=args.timeout)
        plain, cpu_plain = [], []
        for _ in range(args.reps):           # without the profiler, for comparison
            await asyncio.sleep(0.2)
            c0 = time.thread_time()
            plain.append(await rekey_and_wait(ds, ks, tunnels=args.tunnels, poll=0.005,
                                          limit=args.timeout))
            cpu_plain.append(time.thread_time() - c0)
        # CPU time of this thread (the daemons' event loop): wall time would charge
        # whatever function was running when the host preempted the process
        prof = cProfile.Profile(time.thread_time)
        walls = []
        cpu0 = time.process_time()
        for _ in range(args.reps):
            await asyncio.sleep(0.2)     # past the grace: the old inbound SAs go
            prof.enable()
            walls.append(await rekey_and_wait(ds, ks, tunnels=args.tunnels, poll=0.005,
                                          limit=args.timeout))
            prof.disable()
        cpu = (time.process_time() - cpu0) / args.reps
    print(f"two in-process daemons, {args.tunnels} tunnels on one peer, hybrid-required "
          f"(ML-KEM-768 + X25519 + QKD over ETSI 014); warm-up {warm:.3f} s; host load "
          f"{os.getloadavg()[0]:.1f}")
    print(f"rekey-all without the profiler: wall {', '.join(f'{w:.3f}' for w in plain)} s, "
          f"CPU of the daemons' thread {', '.join(f'{c:.3f}' for c in cpu_plain)} s "
          f"(the recording kernel and the completion polling included)")
    print(f"rekey-all under cProfile: wall {', '.join(f'{w:.3f}' for w in walls)} s; "
          f"process CPU {cpu:.3f} s per rekey-all (profiler overhead included)")
    report(pstats.Stats(prof), args.reps, args.tunnels, args.top)
    if args.dump:
        prof.dump_stats(args.dump)
        print(f"\nprofile written to {args.dump} (python -m pstats {args.dump})")


if __name__ == "__main__":
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--tunnels", type=int, default=1000)
    ap.add_argument("--reps", type=int, default=2)
    ap.add_argument("--top", type=int, default=25)
    ap.add_argument("--timeout", type=float, default=120.0)
    ap.add_argument("--dump", metavar="FILE", help="also write the cProfile data (pstats)")
    asyncio.run(main(ap.parse_args()))
