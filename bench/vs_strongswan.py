"""qkdgate beside strongSwan, same topology, same VM boot (issue 19).

    # once, on the host (the lab VM's root is read-only): Debian's
    # strongswan-charon + strongswan-swanctl + the openssl plugin for X25519
    # (libstrongswan-standard-plugins; no service left enabled) and vici
    .venv/bin/python bench/vs_strongswan.py --setup
    # then in the kernel lab
    bash lab/run.sh -- .venv/bin/python bench/vs_strongswan.py [--sizes 1,10,100] [--reps 3]

Two gateway namespaces joined by a veth (192.0.2.1 -- 192.0.2.2); tunnel i
protects 10.64+i/256.i%256.0/24 <-> 10.128+i/256.i%256.0/24 (tunnel mode,
AES-256-GCM ESP). strongSwan: one charon per namespace, one IKE_SA with N
CHILD_SAs (PSK, ``aes256gcm16-prfsha384-x25519``, log level 0; config in
bench/strongswan/), all N rekeys submitted over vici at once. qkdgate: the
real daemon (``qkdgate run``) per namespace, hybrid-required (ML-KEM +
X25519 + a QKD key from the KME simulator on every rekey), rekeys over the
control socket: one daemon pair, all N tunnels on one peer (one exchange keys
them all), for every N.

Completion comes from NETLINK_XFRM notifications in both namespaces
(XFRMNLGRP_SA): a rekey of N tunnels is done when each side has seen 2N new
keyed SAs (larval SPI reservations carry no algorithm and are ignored) and
the deletion of every outbound SA that was current before. Establish: from
starting the daemons to 2N keyed SAs on each side. The kernel floor is
``ip -batch`` adding and deleting the same SA and policy set on both
gateways. Tunnel-rekeys/s: ``--sustain`` rekey-alls back to back, each asked
for the moment the previous one completed. Prints one table, median
[min-max] over ``--reps``. The topology and the watch are in vs_topology.py,
the two contenders in vs_contenders.py.
"""

from __future__ import annotations

import argparse
import contextlib
import math
import os
import re
import shutil
import signal
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

# bench/ is not a package: its modules import each other by name
from vs_contenders import CHARON, Contender, Qkdgate, StrongSwan
from vs_topology import (
    GA,
    GB,
    VENV_BIN,
    Topology,
    XfrmWatch,
    cpu_seconds,
    kernel_floor,
    keyed_count,
    outbound_spis,
    precompile,
    rss_mb,
    wait_done,
)

APT = ("strongswan-charon", "strongswan-swanctl", "libstrongswan-standard-plugins")

# ------------------------------------------------------------------ set-up

def setup_host() -> int:
    """Install the strongSwan packages (services neither started nor left
    enabled) and the vici client into the checkout's venv."""
    policy_rc = Path("/usr/sbin/policy-rc.d")
    had = policy_rc.exists()
    if not had:   # dpkg's convention: 101 = do not start services while installing
        policy_rc.write_text("#!/bin/sh\nexit 101\n")
        policy_rc.chmod(0o755)
    try:
        env = {**os.environ, "DEBIAN_FRONTEND": "noninteractive"}
        subprocess.run(["apt-get", "install", "-y", "--no-install-recommends", *APT],
                       check=True, env=env)
    finally:
        if not had:
            policy_rc.unlink()
    for unit in ("strongswan-starter.service", "strongswan.service"):
        subprocess.run(["systemctl", "disable", unit], check=False, capture_output=True)
    subprocess.run([str(VENV_BIN / "pip"), "install", "vici==6.0.3", "py-spy==0.4.3"],
                   check=True)   # pyproject.toml extra "bench"
    precompile()
    print("bench set-up done: strongswan-charon, strongswan-swanctl (services disabled), vici")
    return 0


class Run:
    """One contender at one size: establish, rekey-all reps, CPU, RSS."""

    def __init__(self, topo: Topology, c: Contender, n: int, reps: int) -> None:
        self.topo, self.c, self.n, self.reps = topo, c, n, reps
        self.watches = [XfrmWatch(topo.a, GA), XfrmWatch(topo.b, GB)]
        self.establish = math.nan
        self.rekeys: list[float] = []
        self.cpu_per_rekey: list[float] = []
        self.rss = math.nan
        self.sustained = math.nan
        self.xfrm_drops: dict[str, int] = {}

    def __enter__(self) -> Run:
        return self

    def __exit__(self, *exc: object) -> None:
        self.c.stop()
        for w in self.watches:
            w.close()
        self.topo.flush()

    def go(self, timeout: float) -> None:
        marks = [w.mark() for w in self.watches]
        t0 = time.monotonic()
        self.c.start(self.n)
        done = wait_done(self.watches, marks, 2 * self.n, [set(), set()], timeout)
        if done is None:
            raise RuntimeError(f"{self.c.name}: {self.n} tunnels not established in {timeout} s"
                               f" (SAs: {keyed_count(self.topo.a)}/{keyed_count(self.topo.b)})")
        self.establish = done - t0
        self.c.settle(timeout)
        time.sleep(0.5)
        for _ in range(self.reps):
            self.rekeys.append(self.rekey_all(timeout))
        self.rss = rss_mb(self.c.pids)

    def rekey_all(self, timeout: float) -> float:
        old = [outbound_spis(self.topo.a, GA), outbound_spis(self.topo.b, GB)]
        marks = [w.mark() for w in self.watches]
        cpu0 = cpu_seconds(self.c.pids)
        t0 = time.monotonic()
        self.c.rekey_all()
        done = wait_done(self.watches, marks, 2 * self.n, old, timeout)
        if done is None:
            raise RuntimeError(f"{self.c.name}: rekey of {self.n} tunnel(s) not done in "
                               f"{timeout} s")
        self.cpu_per_rekey.append(cpu_seconds(self.c.pids) - cpu0)
        return done - t0

    def sustain(self, rounds: int, timeout: float) -> None:
        """Tunnel-rekeys per second over ``rounds`` back-to-back rekey-alls:
        each asked for the moment the previous one is complete (the old
        outbound SPIs come from the notifications, not from a dump)."""
        old = [outbound_spis(self.topo.a, GA), outbound_spis(self.topo.b, GB)]
        t0 = time.monotonic()
        done: float | None = t0
        for _ in range(rounds):
            marks = [w.mark() for w in self.watches]
            self.c.rekey_all()
            done = wait_done(self.watches, marks, 2 * self.n, old, timeout)
            if done is None:
                raise RuntimeError(f"{self.c.name}: sustained rekey of {self.n} not done")
            old = [w.outbound_since(m) for w, m in zip(self.watches, marks, strict=True)]
        self.sustained = rounds * self.n / (done - t0)

    def xfrm_stat(self) -> dict[str, int]:
        """/proc/net/xfrm_stat of both namespaces, summed (per netns counters:
        why the kernel dropped a packet, e.g. XfrmOutStateInvalid: an outbound
        packet whose SA was deleted under it)."""
        total: dict[str, int] = {}
        for ns in (self.topo.a, self.topo.b):
            out = subprocess.run(["ip", "netns", "exec", ns, "cat", "/proc/net/xfrm_stat"],
                                 capture_output=True, text=True, check=False).stdout
            for line in out.splitlines():
                name, _, value = line.partition(" ")
                if value.strip().isdigit():
                    total[name] = total.get(name, 0) + int(value)
        return total

    def loss(self, rekeys: int, timeout: float) -> tuple[int, int]:
        """Packets sent and lost by ping -i 0.002 through tunnel 0 across
        ``rekeys`` back-to-back rekeys of tunnel 0 (and the kernel's XFRM
        drop counters that moved meanwhile, in ``self.xfrm_drops``)."""
        before = self.xfrm_stat()
        p = subprocess.Popen(["ip", "netns", "exec", self.topo.a, "ping", "-q", "-i", "0.002",
                              "-W", "1", "-I", "10.64.0.1", "10.128.0.1"],
                             stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)
        time.sleep(0.5)
        for _ in range(rekeys):
            marks = [w.mark() for w in self.watches]
            self.c.rekey_one()
            if wait_done(self.watches, marks, 2, [set(), set()], timeout) is None:
                break
            time.sleep(0.05)
        time.sleep(1.0)
        p.send_signal(signal.SIGINT)
        out, _ = p.communicate(10)
        after = self.xfrm_stat()
        self.xfrm_drops = {k: v - before.get(k, 0) for k, v in after.items()
                           if v != before.get(k, 0)}
        m = re.search(r"(\d+) packets transmitted, (\d+) received", out)
        if not m:
            return 0, 0
        sent, got = int(m.group(1)), int(m.group(2))
        return sent, sent - got


def profile(r: Run, folder: Path, timeout: float) -> None:
    """py-spy (sampling, 250 Hz) on both qkdgate daemons during one rekey-all."""
    folder.mkdir(parents=True, exist_ok=True)
    spy = str(VENV_BIN / "py-spy")
    procs = [subprocess.Popen([spy, "record", "--rate", "250", "--format", "raw", "--nonblocking",
                               "-o", str(folder / f"rekey-{r.n}-{side}.txt"), "--pid", str(pid)],
                              stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
             for side, pid in zip("ab", r.c.pids[:2], strict=False)]
    time.sleep(2.0)        # py-spy attaches
    took = r.rekey_all(timeout)
    r.cpu_per_rekey.pop()  # not one of the measured reps
    time.sleep(0.5)
    for p in procs:
        p.send_signal(signal.SIGINT)
        with contextlib.suppress(subprocess.TimeoutExpired):
            p.wait(30)
    print(f"  profile: rekey-all of {r.n} under py-spy took {took:.3f} s; stacks in {folder}")


def cprofile(r: Run, folder: Path, timeout: float) -> None:
    """cProfile (bench/cprofile_daemon.py) on both qkdgate daemons during one
    rekey-all; prints where their CPU went (bench/profile_areas.py)."""
    import pstats

    from profile_areas import report as areas  # bench/ is not a package
    for pid in r.c.pids[:2]:
        os.kill(pid, signal.SIGUSR2)
    time.sleep(1.0)
    took = r.rekey_all(timeout)
    r.cpu_per_rekey.pop()  # not one of the measured reps
    for pid in r.c.pids[:2]:
        os.kill(pid, signal.SIGUSR2)
    dumps = [folder / f"gw-{side}-n{r.n}.1" for side in "ab"]
    deadline = time.monotonic() + 60
    while not all(d.exists() for d in dumps) and time.monotonic() < deadline:
        time.sleep(0.2)
    if not all(d.exists() for d in dumps):
        print(f"  cprofile: no profile written within 60 s ({folder})", flush=True)
        return
    print(f"  cprofile: rekey-all of {r.n} under cProfile took {took:.3f} s; both daemons' "
          f"stats in {folder}", flush=True)
    areas(pstats.Stats(*(str(d) for d in dumps)), 1, r.n, 25)


def fmt(xs: list[float], unit: str = "s") -> str:
    xs = [x for x in xs if not math.isnan(x)]
    if not xs:
        return "-"
    if len(xs) == 1:
        return f"{xs[0]:.3f} {unit}"
    return f"{statistics.median(xs):.3f} [{min(xs):.3f}-{max(xs):.3f}] {unit}"


def ratio(a: list[float], b: list[float]) -> str:
    a = [x for x in a if not math.isnan(x)]
    b = [x for x in b if not math.isnan(x)]
    if not a or not b:
        return "-"
    return f"{statistics.median(a) / statistics.median(b):.2f}"


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--setup", action="store_true", help="install strongSwan + vici (host)")
    ap.add_argument("--sizes", default="1,10,100,500,1000")
    ap.add_argument("--reps", type=int, default=3)
    ap.add_argument("--big-reps", type=int, default=1,
                    help="reps (and sustained rounds, at least 2) at N >= 500: keeps the "
                         "full table within ~30 min of one TCG lab VM")
    ap.add_argument("--loss-rekeys", type=int, default=50)
    ap.add_argument("--sustain", type=int, default=3, metavar="ROUNDS",
                    help="back-to-back rekey-alls per size for tunnel-rekeys/s (0: skip)")
    ap.add_argument("--timeout", type=float, default=600.0)
    ap.add_argument("--only", choices=("strongswan", "qkdgate"), default=None)
    ap.add_argument("--keep", action="store_true", help="keep the work directory (logs)")
    ap.add_argument("--daemon-log", default="warning", help="qkdgate daemons' log level")
    ap.add_argument("--profile", metavar="DIR", default=None,
                    help="after the reps at the largest size, py-spy one more qkdgate "
                         "rekey-all (both daemons; collapsed stacks in DIR)")
    ap.add_argument("--cprofile", metavar="DIR", default=None,
                    help="run the qkdgate daemons under bench/cprofile_daemon.py and, after "
                         "the reps at N=100 and the largest size, cProfile one more "
                         "rekey-all; prints where both daemons' CPU went")
    args = ap.parse_args()
    if args.setup:
        return setup_host()
    missing = [x for x in (CHARON, shutil.which("swanctl") or "/usr/sbin/swanctl")
               if not os.path.exists(x)]
    if missing and args.only != "qkdgate":
        print(f"missing {missing}: run `.venv/bin/python bench/vs_strongswan.py --setup` "
              "on the host first", file=sys.stderr)
        return 2
    if not precompile():
        print("warning: could not byte-compile the checkout (read-only in the lab guest): "
              "run --setup on the host first, or every daemon start compiles its sources",
              file=sys.stderr)
    sizes = [int(x) for x in args.sizes.split(",")]
    topo = Topology().up()
    # in the lab, keep the run directory (daemon and charon logs) beside the VM's output
    work = Path(tempfile.mkdtemp(prefix="vs-", dir=os.environ.get("LAB_OUT")))
    # unix sockets need a local file system (LAB_OUT is the VM's 9p share)
    socks = Path(tempfile.mkdtemp(prefix="vs-sock-"))
    os.chmod(work, 0o700)
    results: dict[tuple[str, int], Run] = {}
    floors: dict[int, list[float]] = {}
    loss: dict[str, tuple[int, int]] = {}
    drops: dict[str, dict[str, int]] = {}
    q = Qkdgate(topo, work, socks)
    q.log_level = args.daemon_log
    if args.cprofile:
        q.cprofile = Path(args.cprofile).resolve()
        q.cprofile.mkdir(parents=True, exist_ok=True)
    contenders: list[Contender] = []
    if args.only != "strongswan":   # first: at the largest N strongSwan takes longest
        contenders.append(q)
    if args.only != "qkdgate":
        contenders.append(StrongSwan(topo, work, socks))

    try:
        for n in sizes:
            try:
                floors[n] = [kernel_floor(topo, n) for _ in range(max(args.reps, 3))]
            except subprocess.CalledProcessError as exc:   # e.g. a host kernel without ESP
                print(f"kernel floor N={n}: ip -batch failed: {exc.stderr.strip()[:200]}",
                      file=sys.stderr)
                topo.flush()
            for c in contenders:
                try:
                    big = n >= 500
                    with Run(topo, c, n, args.big_reps if big else args.reps) as r:
                        r.go(args.timeout)
                        results[(c.name, n)] = r
                        if args.sustain:
                            r.sustain(max(2, min(args.sustain, args.big_reps)) if big
                                      else args.sustain, args.timeout)
                        if n == sizes[0] and args.loss_rekeys:
                            loss[c.name] = r.loss(args.loss_rekeys, args.timeout)
                            drops[c.name] = r.xfrm_drops
                        if args.profile and c is q and n in (100, max(sizes)):
                            profile(r, Path(args.profile), args.timeout)
                        if args.cprofile and c is q and n in (100, max(sizes)):
                            cprofile(r, Path(args.cprofile), args.timeout)
                except RuntimeError as exc:     # one contender failing leaves the table
                    print(f"  FAILED: {exc}", flush=True)
                    continue
                print(f"  done: {c.name} N={n}: establish {r.establish:.3f} s, "
                      f"rekey-all {fmt(r.rekeys)}, {r.sustained:.0f} tunnel-rekeys/s, "
                      f"RSS {r.rss:.0f} MB", flush=True)
    finally:
        q.close()
        topo.down()
        shutil.rmtree(socks, ignore_errors=True)
        if args.keep:
            print(f"work directory kept: {work}", file=sys.stderr)
        else:
            shutil.rmtree(work, ignore_errors=True)
    report(sizes, results, floors, loss, drops, args)
    return 0


def report(sizes: list[int], results: dict[tuple[str, int], Run], floors: dict[int, list[float]],
           loss: dict[str, tuple[int, int]], drops: dict[str, dict[str, int]],
           args: argparse.Namespace) -> None:
    kver = os.uname().release
    print(f"\nqkdgate vs strongSwan, kernel {kver}, {os.cpu_count()} CPU(s), "
          f"median [min-max] of {args.reps} rep(s); "
          "qkdgate: one daemon pair, all N tunnels on one peer")
    print("| N | what | strongSwan | qkdgate | strongSwan/qkdgate | kernel floor (ip -batch) |")
    print("|---|---|---|---|---|---|")
    for n in sizes:
        s, q = results.get(("strongSwan", n)), results.get(("qkdgate", n))
        sr = s.rekeys if s else []
        qr = q.rekeys if q else []
        print(f"| {n} | rekey all | {fmt(sr)} | {fmt(qr)} | {ratio(sr, qr)} | "
              f"{fmt(floors.get(n, []))} |")
        se = [s.establish] if s else []
        qe = [q.establish] if q else []
        print(f"| {n} | establish | {fmt(se)} | {fmt(qe)} | {ratio(se, qe)} | |")
        # --sustain 0: N over the median rekey-all instead
        sus = [([r.sustained] if not math.isnan(r.sustained)
                else [n / statistics.median(r.rekeys)] if r.rekeys else []) if r else []
               for r in (s, q)]
        print(f"| {n} | tunnel-rekeys/s (back-to-back rekey-alls) | "
              f"{fmt(sus[0], '/s')} | {fmt(sus[1], '/s')} | {ratio(sus[1], sus[0])} (q/s) | |")
        cpu = [r.cpu_per_rekey if r else [] for r in (s, q)]
        print(f"| {n} | CPU per rekey-all (both daemons) | {fmt(cpu[0], 'CPU-s')} | "
              f"{fmt(cpu[1], 'CPU-s')} | {ratio(cpu[0], cpu[1])} | |")
        rss = [[r.rss] if r else [] for r in (s, q)]
        print(f"| {n} | RSS after the rekeys (both daemons) | {fmt(rss[0], 'MB')} | "
              f"{fmt(rss[1], 'MB')} | {ratio(rss[0], rss[1])} | |")
    for n in sizes:
        q = results.get(("qkdgate", n))
        if q and q.rekeys and floors.get(n):
            print(f"N={n}: qkdgate rekey-all / kernel floor = {ratio(q.rekeys, floors[n])}")
    for name in ("strongSwan", "qkdgate"):
        if name in loss:
            sent, lost = loss[name]
            print(f"loss, {name}: {lost} of {sent} packets (ping -i 0.002) across "
                  f"{args.loss_rekeys} back-to-back rekeys of one tunnel (N={sizes[0]}); "
                  f"XFRM drop counters that moved (both namespaces): "
                  f"{drops.get(name) or 'none'}")


if __name__ == "__main__":
    sys.exit(main())
