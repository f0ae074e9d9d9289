"""One gateway, many peers (issue 19 item 4): the real daemon against one
load-generating process that speaks the peer protocol for every peer.

    bash lab/run.sh -- .venv/bin/python bench/scale_peers.py [--peers 100] [--tunnels 10]

Topology (bench/vs_topology.py): the daemon under test (gw-a, ``qkdgate
run``) in namespace a at 192.0.2.1:4600 with ``--peers`` peers of
``--tunnels`` IPsec tunnels each; the load generator in namespace b, one
:class:`~qkdgate.gateway.protocol.session.PeerSession` per peer on its own
UDP port (192.0.2.2:5000+j), driven by the daemon's own
:class:`~qkdgate.gateway.daemon.udp.PeerDriver`, answering its install
events without a kernel (only the gateway under test installs SAs). Policy
``pqc-only``: a fresh ML-KEM-768 + X25519 exchange per peer and rekey, no
KME (the KME path is bench/vs_strongswan.py's).

Measured, from NETLINK_XFRM notifications in the gateway's namespace:
establish (daemon start to 2 x peers x tunnels keyed SAs); rekey of every
peer (one control-socket rekey per peer, all at once, to every new SA in and
every old outbound SA gone); the daemon's CPU per rekey-all and RSS.
"""

from __future__ import annotations

import argparse
import asyncio
import itertools
import os
import shutil
import signal
import statistics
import subprocess
import sys
import tempfile
import threading
import time
from pathlib import Path
from typing import Any

from vs_topology import (  # bench/ is not a package
    GA,
    GB,
    VENV_BIN,
    Topology,
    XfrmWatch,
    cpu_seconds,
    nets,
    outbound_spis,
    precompile,
    rss_mb,
    wait_done,
)

PORT, LOAD_PORT = 4600, 5000


def write_configs(work: Path, socks: Path, peers: int, tunnels: int,
                  interval: float) -> tuple[Path, list[Any]]:
    """gw-a's configuration and the load side's identities (one per peer).
    The control socket goes in ``socks``, a local directory: the lab's
    ``LAB_OUT`` is a 9p share, which holds no socket files (ENXIO)."""
    from qkdgate.gateway.config.identity_files import save_local_identity
    from qkdgate.gateway.protocol.identity import LocalIdentity
    gw = LocalIdentity.generate(name="gw-a")
    save_local_identity(gw, str(work / "gw-a.identity"))
    (work / "gw-a.pub").write_text(gw.public.to_string() + "\n")
    idents = []
    peer_yaml, tunnel_yaml = [], []
    for j in range(peers):
        ident = LocalIdentity.generate(name=f"p{j}")
        (work / f"p{j}.pub").write_text(ident.public.to_string() + "\n")
        idents.append(ident)
        peer_yaml.append(f"  - {{name: p{j}, address: {GB}, port: {LOAD_PORT + j}, "
                         f"identities: [{work}/p{j}.pub]}}\n")
        for k in range(tunnels):
            i = j * tunnels + k
            ln, rn = nets(i)
            tunnel_yaml.append(f"""  - name: t{i}
    peer: p{j}
    type: ipsec
    policy: pqc-only
    ipsec: {{local_address: {GA}, remote_address: {GB}, local_subnets: [{ln}],
            remote_subnets: [{rn}], reqid: {1000 + 16 * i}}}
    rekey: {{interval: {interval:g}s, soft_lifetime: 7000s, hard_lifetime: 7200s, grace: 50ms}}
""")
    text = f"""version: 1
gateway:
  name: gw-a
  identity: {work}/gw-a.identity
  listen: {{address: {GA}, port: {PORT}}}
  state_dir: {work}/state
  control_socket: {socks}/gw-a.sock
peers:
{"".join(peer_yaml)}tunnels:
{"".join(tunnel_yaml)}telemetry:
  log: {{level: info}}
"""
    path = work / "gw-a.yaml"
    path.write_text(text)
    os.chmod(path, 0o600)
    return path, idents


class LoadGenerator:
    """Every peer's PeerSession on its own UDP socket, in one event loop."""

    def __init__(self, idents: list[Any], gw_pub: Any, tunnels: int) -> None:
        self.idents, self.gw_pub, self.tunnels = idents, gw_pub, tunnels
        self.established: dict[int, list[float]] = {j: [] for j in range(len(idents))}
        self.failures: list[str] = []
        self.drivers: list[Any] = []

    async def start(self) -> None:
        from qkdgate.gateway.daemon.udp import PeerDriver
        from qkdgate.gateway.protocol import events as E
        from qkdgate.gateway.protocol.config import SessionConfig, TunnelRef
        from qkdgate.gateway.protocol.session import PeerSession
        loop = asyncio.get_running_loop()
        for j, ident in enumerate(self.idents):
            cfg = SessionConfig(local_name=f"p{j}", peer_name="gw-a",
                                tunnels=tuple(TunnelRef(f"t{j * self.tunnels + k}", "ipsec")
                                              for k in range(self.tunnels)),
                                allow_pqc_only=True, rekey_interval=3600.0,
                                initiate_on_start=False)
            spis = iter(range(0xC1000000 + (j << 16), 0xC1000000 + ((j + 1) << 16)))
            session = PeerSession(cfg, identity=ident, peer_identities=[self.gw_pub],
                                  now=loop.time(), allocate_spi=lambda _t, s=spis: next(s))
            holder: dict[str, PeerDriver] = {}

            def on_event(ev: object, j: int = j, holder: dict[str, PeerDriver] = holder) -> None:
                drv = holder["d"]
                if isinstance(ev, (E.InstallInbound, E.InstallOutbound)):
                    # answered after this event's handler returns, as the daemon does
                    loop.call_soon(drv.call, "installed",
                                   lambda s, rid=ev.request_id: s.installed(rid, loop.time()))
                elif isinstance(ev, E.SessionEstablished):
                    self.established[j].append(time.monotonic())

            def on_failure(what: str, exc: BaseException, j: int = j) -> None:
                self.failures.append(f"p{j} {what}: {exc!r}")

            drv = PeerDriver(f"p{j}", session, (GA, PORT), clock=loop.time,
                             on_event=on_event, on_failure=on_failure)
            holder["d"] = drv
            transport, _ = await loop.create_datagram_endpoint(
                lambda d=drv: _Rx(d), local_addr=(GB, LOAD_PORT + j))
            drv.transport = transport   # type: ignore[assignment]
            self.drivers.append(drv)
            drv.pump()

    def count(self, since: float) -> int:
        """Peers with an exchange established after ``since``."""
        return sum(1 for ts in self.established.values() if ts and ts[-1] >= since)


class _Rx(asyncio.DatagramProtocol):
    def __init__(self, driver: Any) -> None:
        self.driver = driver

    def datagram_received(self, data: bytes, addr: tuple[str, int]) -> None:
        self.driver.datagram_received(data)


def settle(sock: str, generation: int, timeout: float) -> None:
    """Until the daemon reports every peer established at ``generation`` or
    later: a rekey asked for during a running exchange is coalesced into it
    (PeerSession.initiate_rekey), and the kernel holds the new SAs before
    the exchange has ended."""
    from qkdgate.gateway.daemon.control import request
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        peers = request(sock, "status", timeout=60)["peers"]
        if all(p["state"] == "established" and p["generation"] >= generation for p in peers):
            return
        time.sleep(0.2)
    raise RuntimeError(f"peers not all established at generation {generation}")


def rekey_all(sock: str, peers: int, tunnels: int) -> None:
    from qkdgate.gateway.daemon.control import request
    threads = [threading.Thread(target=request, args=(sock, "rekey"),
                                kwargs={"tunnel": f"t{j * tunnels}", "timeout": 60})
               for j in range(peers)]
    for t in threads:
        t.start()
    for t in threads:
        t.join()


def on_demand(args: argparse.Namespace, proc: subprocess.Popen[bytes], sock: str,
              watch: XfrmWatch, gen: LoadGenerator, a_ns: str) -> list[str]:
    """``--reps`` rekeys of every peer, all asked for at once: table rows."""
    n = args.peers * args.tunnels
    times, cpu = [], []
    for rep in range(args.reps):
        old = [outbound_spis(a_ns, GA)]
        mark = watch.mark()
        c0, t1 = cpu_seconds([proc.pid]), time.monotonic()
        rekey_all(sock, args.peers, args.tunnels)
        done = wait_done([watch], [mark], 2 * n, old, args.timeout, [proc])
        if done is None:
            raise RuntimeError(f"rekey of every peer not done in {args.timeout} s "
                               f"(peers keyed: {gen.count(t1)})")
        times.append(done - t1)
        cpu.append(cpu_seconds([proc.pid]) - c0)
        settle(sock, 2 + rep, args.timeout)
        print(f"  rekey of every peer: {times[-1]:.2f} s, {cpu[-1]:.2f} CPU-s "
              f"({gen.count(t1)} peers saw a new generation)", flush=True)
    return [f"| rekey of every peer (all at once) | {fmt(times, 's')} |",
            f"| tunnel-rekeys/s | {n / statistics.median(times):.0f} |",
            f"| daemon CPU per rekey of every peer | {fmt(cpu, 'CPU-s')} |"]


def scheduled(args: argparse.Namespace, proc: subprocess.Popen[bytes],
              gen: LoadGenerator) -> list[str]:
    """The daemon's own schedule (``rekey.interval`` of every tunnel), watched
    for ``--window`` seconds from the end of establishment: when each peer's
    new generations arrive (the load side's SessionEstablished), how far apart."""
    start, c0 = time.monotonic(), cpu_seconds([proc.pid])
    while time.monotonic() < start + args.window:
        if proc.poll() is not None:
            raise RuntimeError(f"the daemon exited with status {proc.returncode}")
        time.sleep(1.0)
    end, cpu = time.monotonic(), cpu_seconds([proc.pid]) - c0
    gaps: list[float] = []
    counts: list[int] = []
    for times in gen.established.values():
        # the last establishment before the window, then every one in it
        before = [t for t in times if t < start]
        inside = [t for t in times if start <= t < end]
        points = before[-1:] + inside + [end]
        gaps.append(max(b - a for a, b in itertools.pairwise(points)))
        counts.append(len(inside))
    late = sum(1 for g in gaps if g > 2 * args.interval)
    rekeys = sum(counts)
    print(f"  scheduled: {rekeys} peer rekeys in {end - start:.0f} s; per peer "
          f"{min(counts)}-{max(counts)}; longest time without a new generation "
          f"{max(gaps):.1f} s", flush=True)
    return [f"| scheduled rekeys in {end - start:.0f} s (interval {args.interval:g} s) | "
            f"{rekeys} peer exchanges, {min(counts)}-{max(counts)} per peer |",
            f"| longest time a peer went without a new generation | {fmt(gaps, 's')} "
            f"(median [min-max] over peers) |",
            f"| peers that missed an interval (no new generation within 2 x interval) | "
            f"{late} of {len(gaps)} |",
            f"| tunnel-rekeys/s sustained | {rekeys * args.tunnels / (end - start):.0f} |",
            f"| daemon CPU | {cpu / (end - start) * 100:.0f} % of one CPU |"]


def fmt(xs: list[float], unit: str) -> str:
    return f"{statistics.median(xs):.2f} [{min(xs):.2f}-{max(xs):.2f}] {unit}"


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--peers", type=int, default=100)
    ap.add_argument("--tunnels", type=int, default=10, help="tunnels per peer")
    ap.add_argument("--reps", type=int, default=3)
    ap.add_argument("--interval", type=float, default=0.0,
                    help="rekey.interval of every tunnel, seconds; with it the daemon's own "
                         "schedule is watched for --window instead of the --reps rekeys")
    ap.add_argument("--window", type=float, default=0.0,
                    help="how long to watch the schedule (default: 4 intervals)")
    ap.add_argument("--timeout", type=float, default=900.0)
    args = ap.parse_args()
    if args.interval and not 1 <= args.interval < 7000:
        ap.error("--interval must be at least 1 s and below the soft lifetime (7000 s)")
    args.window = args.window or 4 * args.interval
    if not precompile():
        print("warning: could not byte-compile the checkout (run it once on the host)",
              file=sys.stderr)
    from qkdgate.gateway.demo import net as dn
    from qkdgate.gateway.protocol.identity import PeerIdentity
    n = args.peers * args.tunnels
    topo = Topology().up()
    work = Path(tempfile.mkdtemp(prefix="scale-", dir=os.environ.get("LAB_OUT")))
    os.chmod(work, 0o700)
    socks = Path(tempfile.mkdtemp(prefix="scale-sock-"))
    watch = XfrmWatch(topo.a, GA)
    load = dn.LoopThread(topo.b, "load").start()
    proc: subprocess.Popen[bytes] | None = None
    try:
        cfg, idents = write_configs(work, socks, args.peers, args.tunnels,
                                    args.interval or 3600.0)
        gen = LoadGenerator(idents, PeerIdentity.from_string(
            (work / "gw-a.pub").read_text().strip(), "gw-a"), args.tunnels)
        load.call(gen.start(), 120)
        t0 = time.monotonic()
        with open(work / "daemon.log", "w") as log:
            proc = subprocess.Popen(["ip", "netns", "exec", topo.a, str(VENV_BIN / "qkdgate"),
                                     "run", "-c", str(cfg), "--teardown-on-exit"],
                                    stdout=log, stderr=subprocess.STDOUT)
        done = wait_done([watch], [0], 2 * n, [set()], args.timeout, [proc])
        if done is None:
            raise RuntimeError(f"not established in {args.timeout} s; load failures: "
                               f"{gen.failures[:3]}")
        establish = done - t0
        print(f"  established {args.peers} peers x {args.tunnels} tunnels in "
              f"{establish:.2f} s", flush=True)
        sock = str(socks / "gw-a.sock")
        settle(sock, 1, args.timeout)
        rows = (scheduled(args, proc, gen) if args.interval
                else on_demand(args, proc, sock, watch, gen, topo.a))
        rss = rss_mb([proc.pid])
        if gen.failures:
            rows.append(f"| load-side failures | {len(gen.failures)}: {gen.failures[:2]} |")
    finally:
        if proc is not None:
            proc.send_signal(signal.SIGTERM)
            try:
                proc.wait(120)
            except subprocess.TimeoutExpired:
                proc.kill()
        load.stop()
        watch.close()
        topo.down()
        shutil.rmtree(socks, ignore_errors=True)
        if os.environ.get("LAB_OUT") is None:
            shutil.rmtree(work, ignore_errors=True)

    print(f"\none gateway (the real daemon), {args.peers} peers x {args.tunnels} tunnels = "
          f"{n} tunnels, kernel {os.uname().release}, {os.cpu_count()} CPU(s):")
    print("| measure | value |\n|---|---|")
    print(f"| establish (daemon start to {2 * n} SAs) | {establish:.2f} s |")
    print("\n".join(rows))
    print(f"| daemon RSS at the end | {rss:.0f} MB |")
    return 0


if __name__ == "__main__":
    sys.exit(main())
