"""The fault lab: namespaces, KME simulator, two daemon processes, traffic,
sniffer and kernel watch (issue 10 items 2 and 4).

Run only inside the kernel lab VM (lab/run.sh): it builds namespaces, runs
real daemons, sniffs the wire and, for the clock fault, steps the VM's
wall clock. bench/fault_matrix.py, bench/soak.py and
tests/kernel/test_fault_matrix.py all use this one lab.

Theory of operation. A :class:`Lab` is the demo's topology
(:class:`~qkdgate.gateway.demo.net.DemoNet`: hA - gA - wire - gB - hB, KME
namespace k) with

* the KME simulator in-process (a thread in namespace k) behind a
  :class:`Forwarder` on each gateway's loopback that can black-hole the KME
  (connections accepted, never answered, existing ones cut);
* each gateway daemon as its own process (``ip netns exec`` +
  bench/fault_gateway.py's ``daemon`` subcommand: the real
  :class:`~qkdgate.gateway.daemon.daemon.Daemon` with an event log and its
  own failsafe registry), so it can be SIGKILLed and restarted as systemd
  would (``ExecStopPost=qkdgate failsafe``, ``RestartSec=2s``);
* three paced UDP streams (hA->hB, hB->hA over ESP; gA->gB over MACsec);
* a :class:`WireSniffer` on the wire bridge's gA-side ports that counts
  every frame: ESP by SPI, MACsec, and *cleartext* (an IP packet from or to a
  protected subnet that is not ESP, or a frame carrying the streams' magic);
* the demo's :class:`~qkdgate.gateway.demo.kernelwatch.KernelWatch` reading
  both kernels every 50 ms; :class:`SaTimeline` turns its readings into
  "packets the receiving kernel accepted on an SA after that SA's hard
  lifetime" (ESP inbound SAs: curlft.packets; MACsec RX SAs: InPktsOK).
"""

from __future__ import annotations

import asyncio
import contextlib
import os
import re
import shutil
import socket
import sys
import tempfile
import threading
import time
from bisect import bisect_left, bisect_right
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Any

sys.path.insert(0, str(Path(__file__).resolve().parent))

from fault_gateway import Gateway  # bench/ is not a package
from fault_observe import RecordingReader, SaTimeline, WireSniffer

ROOT = Path(__file__).resolve().parent.parent
POLICIES = ("hybrid-required", "pqc-fallback", "qkd-mandatory", "pqc-only")
RESTART_SEC = 2.0             # systemd unit: RestartSec=2s
KME_TIMEOUT = 4.0             # the gateways' ETSI 014 client timeout


def in_lab() -> bool:
    """Inside the lab VM (lab/run.sh sets LAB_OUT). Faults that touch the
    whole machine (the wall clock) refuse to run anywhere else."""
    return bool(os.environ.get("LAB_OUT"))


# ====================================================================== timers

@dataclass(frozen=True)
class LabTimers:
    """The tunnels' rekey schedule (seconds). The hard lifetime must leave
    room for an exchange on a starved guest: with two labs side by side at
    host load 12 one took 6.8 s, and a 6 s lifetime then blocked each
    generation 3 s after it was keyed."""

    interval: float = 2.0
    soft: float = 6.0
    hard: float = 10.0
    grace: float = 0.5


# ====================================================================== KME

class Forwarder:
    """TCP relay from a gateway's loopback to the KME simulator that can
    black-hole it (:meth:`cut`): open connections are closed and new ones
    accepted but never answered, as with a dead route. The client sees
    timeouts, not refusals."""

    def __init__(self, listen: socket.socket, target: tuple[str, int]) -> None:
        self.listen, self.target = listen, target
        self.blackhole = False
        self.lifted = asyncio.Event()
        self.server: asyncio.AbstractServer | None = None
        self.open: set[asyncio.StreamWriter] = set()

    async def start(self) -> None:
        self.listen.setblocking(False)
        self.server = await asyncio.start_server(self._handle, sock=self.listen)

    def cut(self, on: bool) -> None:
        self.blackhole = on
        if on:
            self.lifted.clear()
            for w in list(self.open):
                w.close()
        else:
            self.lifted.set()

    async def _handle(self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        if self.blackhole:
            self.open.add(writer)
            await self.lifted.wait()        # silent until the route is back, then reset
            writer.close()
            self.open.discard(writer)
            return
        try:
            up_r, up_w = await asyncio.open_connection(*self.target)
        except OSError:
            writer.close()
            return
        self.open.update((writer, up_w))

        from qkdgate.gateway.demo.net import pipe

        async def tracked(r: asyncio.StreamReader, w: asyncio.StreamWriter) -> None:
            try:
                await pipe(r, w)
            finally:
                self.open.discard(w)
        await asyncio.gather(tracked(reader, up_w), tracked(up_r, writer))

    async def close(self) -> None:
        self.cut(True)
        if self.server is not None:
            self.server.close()


# ====================================================================== the lab

def gateway_config(side: str, folder: Path, kme: Any, policy: str, timers: LabTimers,
                   macsec_peer_mac: str | None) -> str:
    from qkdgate.gateway.demo.config import Timers, gateway_yaml
    t = Timers(timers.interval, timers.soft, timers.hard, timers.grace)
    text = gateway_yaml(side, folder, kme, policy="hybrid-required", timers=t,
                        macsec_peer_mac=macsec_peer_mac)
    text = text.replace("policy: hybrid-required", f"policy: {policy}")
    # the demo's 2 s is tight for a KME simulator and two daemons in one
    # TCG guest; the slow-KME fault answers after 5 s, still past it
    text = text.replace("timeout: 2s", f"timeout: {KME_TIMEOUT:g}s")
    if policy == "pqc-only":     # no tunnel uses QKD: no qkd section (check-config says so)
        text = re.sub(r"\n    qkd:\n(      .*\n)+", "\n", text)
    return text


class Lab:
    """Namespaces, KME simulator, two daemon processes, traffic, sniffer,
    kernel watch. ``up()`` then ``down()`` (always, in ``finally``)."""

    def __init__(self, policy: str, *, timers: LabTimers | None = None, rate: int = 50,
                 macsec: bool = True, age_pki: bool = True, watch_interval: float = 0.1,
                 keep: Path | None = None) -> None:
        from qkdgate.gateway.demo.net import Cleanup, DemoNet
        if policy not in POLICIES:
            raise ValueError(f"unknown policy {policy!r}")
        self.policy, self.timers = policy, timers or LabTimers()
        self.rate, self.macsec = rate, macsec
        self.age_pki, self.watch_interval, self.keep = age_pki, watch_interval, keep
        self.net = DemoNet()
        self.cleanup = Cleanup()
        self.folder = Path(tempfile.mkdtemp(prefix="qkdgate-faults-"))
        os.chmod(self.folder, 0o700)
        self.gw: dict[str, Gateway] = {}
        self.fwd: list[Forwarder] = []
        self.streams: list[Any] = []
        self.kme_thread: Any = None
        self.sim: Any = None
        self.notes: list[str] = []

    # ------------------------------------------------------------ set-up
    def up(self) -> Lab:
        from qkdgate.gateway.demo.config import KmeEndpoint, write_identities
        from qkdgate.gateway.demo.run import prefetch_imports
        prefetch_imports()
        self.cleanup.push("state", lambda: self._keep_or_remove())
        self.cleanup.push("namespaces", self.net.down)
        self.net.up()
        write_identities(self.folder)
        self._start_kme()
        eps = []
        for sae, fwd in (("SAE-A", self.fwd[0]), ("SAE-B", self.fwd[1])):
            c = self.sim.credentials(sae)
            port = fwd.listen.getsockname()[1]
            eps.append(KmeEndpoint(f"https://127.0.0.1:{port}", c.kme_id, str(c.cert),
                                   str(c.key), str(c.ca)))
        macs = (self._mac(self.net.gA), self._mac(self.net.gB)) if self.macsec else (None, None)
        for side, name, ns, ep, peer_mac in (("a", "gw-a", self.net.gA, eps[0], macs[1]),
                                             ("b", "gw-b", self.net.gB, eps[1], macs[0])):
            path = self.folder / f"{name}.yaml"
            path.write_text(gateway_config(side, self.folder, ep, self.policy, self.timers,
                                           peer_mac))
            os.chmod(path, 0o600)
            self.gw[name] = Gateway(name, ns, path, self.folder)
        for g in self.gw.values():
            self.cleanup.push(f"{g.name} daemon", g.stop)
            g.start()
        self.wait_ready()
        self._start_observers()
        return self

    def _keep_or_remove(self) -> None:
        if self.keep is not None:
            dest = self.keep / f"faults-{self.policy}-{self.net.tag}"
            with contextlib.suppress(OSError):
                shutil.copytree(self.folder, dest, ignore=shutil.ignore_patterns(
                    "*.identity", "*.key", "kme", "*-state", "*-run"))
        shutil.rmtree(self.folder, True)

    def _mac(self, ns: str) -> str:
        from qkdgate.gateway.demo.net import run_ip
        parts = run_ip(["ip", "-n", ns, "-o", "link", "show", "m0"]).stdout.split()
        return parts[parts.index("link/ether") + 1]

    def _start_kme(self) -> None:
        from qkdgate.adapters.kmesim.server import KmeSimulator
        from qkdgate.gateway.demo.net import LoopThread, loopback_listener
        self.kme_thread = LoopThread(self.net.k, "kme").start()
        self.cleanup.push("KME thread", self.kme_thread.stop)
        listeners = [loopback_listener(self.net.gA), loopback_listener(self.net.gB)]
        ready, stop = threading.Event(), asyncio.Event()

        async def main() -> None:
            async with KmeSimulator.start(self.folder / "kme", prefill=1000) as sim:
                self.fwd = [Forwarder(s, ("127.0.0.1", sim.ports[k]))
                            for s, k in zip(listeners, ("KME-A", "KME-B"), strict=True)]
                for f in self.fwd:
                    await f.start()
                self.sim = sim
                ready.set()
                await stop.wait()
                for f in self.fwd:
                    await f.close()
        with self._aged_clock():
            fut = self.kme_thread.submit(main())
            while not ready.wait(0.2):
                if fut.done():
                    fut.result()
                    raise RuntimeError("KME simulator stopped during start-up")

        def stop_kme() -> None:
            loop = self.kme_thread.loop
            if loop is not None:
                loop.call_soon_threadsafe(stop.set)
                with contextlib.suppress(Exception):
                    fut.result(10)
        self.cleanup.push("KME simulator", stop_kme)

    @contextlib.contextmanager
    def _aged_clock(self) -> Any:
        """The demo PKI is issued "now - 5 min"; a real deployment's is
        older. In the lab the certificates are issued with the clock two
        hours back, so stepping the clock back an hour tests the daemon,
        not a certificate issued a minute ago."""
        if not (self.age_pki and in_lab()):
            yield
            return
        wall, mono = time.time(), time.monotonic()
        time.clock_settime(time.CLOCK_REALTIME, wall - 7200)
        try:
            yield
        finally:
            time.clock_settime(time.CLOCK_REALTIME, wall + time.monotonic() - mono)

    def kme(self, fn: Callable[[Any], Any]) -> Any:
        """Run ``fn(sim)`` on the simulator's loop."""
        async def call() -> Any:
            return fn(self.sim)
        return self.kme_thread.call(call(), timeout=10)

    def cut_kme(self, on: bool) -> None:
        def f(_sim: Any) -> None:
            for fw in self.fwd:
                fw.cut(on)
        self.kme(f)

    def wait_ready(self, timeout: float = 600.0) -> None:
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            sts = [g.status() for g in self.gw.values()]
            if all(st and st.get("tunnels") and all(t["state"] == "up" for t in st["tunnels"])
                   for st in sts):
                return
            for g in self.gw.values():
                if not g.alive():
                    raise RuntimeError(f"{g.name} exited: {g.log.read_text()[-3000:]}")
            time.sleep(0.3)
        raise RuntimeError(f"tunnels not up within {timeout:.0f} s (logs in {self.folder})")

    def _start_observers(self) -> None:
        from qkdgate.gateway.demo import net as dn
        from qkdgate.gateway.demo.kernelwatch import KernelWatch
        from qkdgate.gateway.demo.kernelwatch import Path as KPath
        from qkdgate.gateway.demo.traffic import UdpStream
        n = self.net
        self.timeline = SaTimeline(self.timers.hard, {n.gA: dn.GA, n.gB: dn.GB})
        paths = [KPath("hA->hB", "esp", n.gA, n.gB, dn.GA, dn.GB),
                 KPath("hB->hA", "esp", n.gB, n.gA, dn.GB, dn.GA)]
        if self.macsec:
            paths.append(KPath("gA->gB (MACsec)", "macsec", n.gA, n.gB))
            self.macsec_addresses()
        self.watch = KernelWatch(paths, interval=self.watch_interval,
                                 reader=lambda ns: RecordingReader(ns, self.timeline)).start()
        self.cleanup.push("kernel watch", self.watch.stop)
        self.sniffer = WireSniffer(n.w).start()
        self.cleanup.push("sniffer", self.sniffer.stop)
        self.streams = [UdpStream("hA->hB", 1, n.hA, dn.HA, n.hB, dn.HB, rate=self.rate).start(),
                        UdpStream("hB->hA", 2, n.hB, dn.HB, n.hA, dn.HA, rate=self.rate).start()]
        if self.macsec:
            self.streams.append(UdpStream("gA->gB (MACsec)", 3, n.gA, dn.MS_A, n.gB, dn.MS_B,
                                          rate=self.rate, port=5002).start())
        for s in self.streams:
            self.cleanup.push(f"stream {s.name}", lambda s=s: s.stop(0.0))

    def macsec_addresses(self) -> None:
        """The MACsec link's addresses (a restarted daemon may make the link anew)."""
        from qkdgate.gateway.demo import net as dn
        for ns, addr in ((self.net.gA, dn.MS_A), (self.net.gB, dn.MS_B)):
            have = dn.run_ip(["ip", "-n", ns, "-o", "addr", "show", "dev", "qm-link"]).stdout
            if f"{addr}/" not in have:
                dn.run_ip(["ip", "-n", ns, "addr", "add", f"{addr}/24", "dev", "qm-link"])

    def wait_keyed(self, settle: float = 2.0, timeout: float = 120.0) -> bool:
        """Every path keyed in both kernels for ``settle`` s, and each stream
        delivering in the last second."""
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            now = time.monotonic()
            if self.macsec:
                self.macsec_addresses()
            ok = all((s := self.watch.keyed_since(p.name)) is not None and now - s >= settle
                     for p in self.watch.paths)
            if ok and all(_delivered(st, now - 1.5, now - 0.5) >= 0.9 for st in self.streams):
                return True
            time.sleep(0.25)
        return False

    def diagnose(self) -> str:
        """What to look at when a path is not keyed: daemons, kernel watch,
        streams, wire, the daemons' last log lines."""
        now = time.monotonic()
        out = [f"watch reads {self.watch.reads} errors {self.watch.errors} "
               f"max gap {self.watch.max_gap:.2f} s; wire frames {self.sniffer.frames} "
               f"esp {len(self.sniffer.esp_t)} macsec {len(self.sniffer.macsec_t)} "
               f"clear {len(self.sniffer.clear_t)}"]
        for p in self.watch.paths:
            k = self.watch.keyed_since(p.name)
            out.append(f"path {p.name}: keyed since {'-' if k is None else f'{now - k:.1f} s'}")
        for st in self.streams:
            out.append(f"stream {st.name}: {st.counters()} foreign {st.foreign} "
                       f"last 2 s {_delivered(st, now - 3, now - 1):.2f}")
        for g in self.gw.values():
            st = g.status(timeout=5) if g.alive() else None
            tun = [(t.get("name"), t.get("state"), t.get("generation")) for t in
                   (st or {}).get("tunnels", [])]
            kinds: dict[str, int] = {}
            for ev in g.read_events():
                kinds[ev.get("event", "?")] = kinds.get(ev.get("event", "?"), 0) + 1
            out.append(f"{g.name}: alive {g.alive()} starts {g.starts} tunnels {tun} "
                       f"events {kinds}")
            if g.log.exists():
                out += ["    " + line for line in g.log.read_text().splitlines()[-12:]]
        return "\n".join(out)

    def restart(self, name: str, failsafe: bool = True) -> str:
        """What systemd does for a crashed daemon: ExecStopPost failsafe,
        RestartSec, start again."""
        g = self.gw[name]
        g.kill()
        out = g.failsafe() if failsafe else ""
        time.sleep(RESTART_SEC)
        g.start()
        return out

    # ------------------------------------------------------------ figures
    def key_ids_reused(self) -> list[str]:
        """QKD key_IDs one gateway used for two generations of one tunnel
        (its journal's reservations, its rekey_done events). One exchange
        keys every tunnel to its peer from one session secret (the tunnels'
        keys differ by label), so one key_ID in generation n of ``lan`` and
        of ``link`` is one use, not two."""
        out = []
        for g in self.gw.values():
            for k, uses in g.journal_key_ids().items():
                per_tunnel: dict[str, set[int]] = {}
                for tun, gen in uses:
                    if tun:
                        per_tunnel.setdefault(tun, set()).add(gen)
                out += [f"{g.name} journal {k} {t} {sorted(gs)}"
                        for t, gs in per_tunnel.items() if len(gs) > 1]
            seen: dict[tuple[str, str], int] = {}
            for ev in g.read_events():
                if ev.get("event") != "rekey_done":
                    continue
                tun, gen = str(ev.get("tunnel", "")), int(ev.get("generation", 0))
                for k in (ev.get("inputs") or {}).get("qkd_key_ids", []):
                    first = seen.setdefault((tun, k.lower()), gen)
                    if first != gen:
                        out.append(f"{g.name} events {k} {tun} {first},{gen}")
        return sorted(set(out))

    def rekeys(self) -> int:
        return sum(1 for g in self.gw.values() for ev in g.read_events()
                   if ev.get("event") == "rekey_done")

    def down(self) -> list[str]:
        return self.cleanup.run()


def _delivered(stream: Any, a: float, b: float) -> float:
    i, j = bisect_left(stream.sent_at, a), bisect_right(stream.sent_at, b)
    if j <= i:
        return 0.0
    got = sum(1 for s in range(i, j) if s in stream.received)
    return got / (j - i)
