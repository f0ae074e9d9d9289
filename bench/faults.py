"""Fault injectors and the wire/kernel bookkeeping of the fault matrix (issue 10 items 2 and 4).

Run only inside the kernel lab VM (lab/run.sh): it builds namespaces, runs
real daemons, sniffs the wire and, for the clock fault, steps the VM's
wall clock. bench/fault_matrix.py, bench/soak.py and
tests/kernel/test_fault_matrix.py all use this one module.

Theory of operation. A :class:`Lab` is the demo's topology
(:class:`~qkdgate.gateway.demo.net.DemoNet`: hA - gA - wire - gB - hB, KME
namespace k) with

* the KME simulator in-process (a thread in namespace k) behind a
  :class:`Forwarder` on each gateway's loopback that can black-hole the KME
  (connections accepted, never answered, existing ones cut);
* each gateway daemon as its own process (``ip netns exec`` + this file's
  ``daemon`` subcommand: the real :class:`~qkdgate.gateway.daemon.daemon.Daemon`
  with an event log and its own failsafe registry), so it can be SIGKILLed
  and restarted as systemd would (``ExecStopPost=qkdgate failsafe``,
  ``RestartSec=2s``);
* three paced UDP streams (hA->hB, hB->hA over ESP; gA->gB over MACsec);
* a :class:`WireSniffer` on the wire bridge's gA-side ports that counts
  every frame: ESP by SPI, MACsec, and *cleartext* (an IP packet from or to a
  protected subnet that is not ESP, or a frame carrying the streams' magic);
* the demo's :class:`~qkdgate.gateway.demo.kernelwatch.KernelWatch` reading
  both kernels every 50 ms; :class:`SaTimeline` turns its readings into
  "packets the receiving kernel accepted on an SA after that SA's hard
  lifetime" (ESP inbound SAs: curlft.packets; MACsec RX SAs: InPktsOK).

Killing the local daemon *at a step of the exchange* is deterministic: the
daemon subcommand wraps ``PeerSession._transition``; SIGUSR1 arms it with a
state read from a file (``i-init-sent``, ``r-install-inbound`` ...), and the
next exchange that enters that state stops the whole process with SIGSTOP
from inside the transition, before anything of the new state has run. The
harness sees the process stopped (/proc/PID/stat "T") and SIGKILLs it.

A fault has ``inject(lab)`` and ``clear(lab)``; :func:`run_cell` runs one
with the measurements around it and returns a :class:`Cell`.
"""

from __future__ import annotations

import argparse
import asyncio
import contextlib
import json
import logging
import os
import random
import re
import shutil
import signal
import socket
import struct
import subprocess
import sys
import tempfile
import threading
import time
from bisect import bisect_left, bisect_right
from collections.abc import Callable
from dataclasses import dataclass, field
from ipaddress import ip_address, ip_network
from pathlib import Path
from typing import Any

ROOT = Path(__file__).resolve().parent.parent
THIS = Path(__file__).resolve()

POLICIES = ("hybrid-required", "pqc-fallback", "qkd-mandatory", "pqc-only")
# Exchange states where the local daemon is SIGKILLed (gateway/protocol/exchange.py).
# gw-a is the ETSI 014 master, gw-b the slave: the slave-only state is gw-b's.
KILL_STEPS = (("gw-a", "i-wait-qkd"), ("gw-a", "i-init-sent"), ("gw-b", "i-wait-qkd-slave"),
              ("gw-a", "i-install-inbound"), ("gw-a", "i-confirm-sent"),
              ("gw-a", "i-install-outbound"), ("gw-b", "r-wait-qkd"), ("gw-b", "r-resp-sent"),
              ("gw-b", "r-install-inbound"), ("gw-b", "r-install-outbound"))
QKD_STEPS = {"i-wait-qkd", "i-wait-qkd-slave", "r-wait-qkd"}
PROTECTED = (ip_network("10.1.0.0/24"), ip_network("10.2.0.0/24"), ip_network("172.16.0.0/24"))
MAGIC = b"QKDGATE-DEMO"
KILL_STEP_TIMEOUT = 60.0      # an armed step must be reached within this
RESTART_SEC = 2.0             # systemd unit: RestartSec=2s
KME_TIMEOUT = 4.0             # the gateways' ETSI 014 client timeout
OUTAGE_RUN = 3                # this many consecutive lost datagrams make an outage

log = logging.getLogger("qkdgate.bench.faults")


def in_lab() -> bool:
    """Inside the lab VM (lab/run.sh sets LAB_OUT). Faults that touch the
    whole machine (the wall clock) refuse to run anywhere else."""
    return bool(os.environ.get("LAB_OUT"))


# ====================================================================== timers

@dataclass(frozen=True)
class LabTimers:
    """The tunnels' rekey schedule (seconds)."""

    interval: float = 3.0
    soft: float = 8.0
    hard: float = 12.0
    grace: float = 1.0


# ====================================================================== wire

@dataclass
class WireSniffer:
    """Every frame on the wire bridge's gA-side ports (``wa``: IPsec, ``pma``:
    MACsec), both directions, stamped with time.monotonic() on receipt."""

    netns: str
    ports: tuple[str, ...] = ("wa", "pma")
    frames: int = 0
    esp_t: list[float] = field(default_factory=list)
    esp_spi: list[int] = field(default_factory=list)
    macsec_t: list[float] = field(default_factory=list)
    clear_t: list[float] = field(default_factory=list)   # cleartext protected packets
    samples: list[str] = field(default_factory=list)     # the first few, described

    def start(self) -> WireSniffer:
        from qkdgate.gateway.demo.net import enter_netns
        self._stop = threading.Event()
        ready = threading.Event()
        err: list[BaseException] = []

        def body() -> None:
            try:
                enter_netns(self.netns)
                s = socket.socket(socket.AF_PACKET, socket.SOCK_RAW, socket.htons(0x0003))
                s.setsockopt(socket.SOL_SOCKET, socket.SO_RCVBUF, 8 << 20)
                s.settimeout(0.2)
            except OSError as exc:
                err.append(exc)
                ready.set()
                return
            ready.set()
            with s:
                while not self._stop.is_set():
                    try:
                        frame, addr = s.recvfrom(65535)
                    except TimeoutError:
                        continue
                    if addr[0] in self.ports:
                        self.classify(frame, time.monotonic())
        self._thread = threading.Thread(target=body, name="wire-sniffer", daemon=True)
        self._thread.start()
        ready.wait(30)
        if err:
            raise err[0]
        return self

    def stop(self) -> None:
        self._stop.set()
        self._thread.join(5)

    def classify(self, frame: bytes, t: float) -> None:
        self.frames += 1
        if len(frame) < 14:
            return
        etype = struct.unpack_from("!H", frame, 12)[0]
        if etype == 0x88E5:                    # IEEE 802.1AE-2018 9.5: the MACsec EtherType
            self.macsec_t.append(t)
            return
        clear = MAGIC in frame
        if etype == 0x0800 and len(frame) >= 34:
            ihl = (frame[14] & 0xF) * 4
            proto = frame[23]
            src, dst = ip_address(frame[26:30]), ip_address(frame[30:34])
            if proto == 50 and len(frame) >= 14 + ihl + 4:     # RFC 4303 2.1: SPI first
                self.esp_t.append(t)
                self.esp_spi.append(struct.unpack_from("!I", frame, 14 + ihl)[0])
                return
            if any(src in n or dst in n for n in PROTECTED):
                clear = True
        if clear:
            self.clear_t.append(t)
            if len(self.samples) < 5:
                self.samples.append(frame[:64].hex())

    @staticmethod
    def count(ts: list[float], a: float, b: float) -> int:
        return bisect_right(ts, b) - bisect_left(ts, a)


# ====================================================================== kernel SA timeline

@dataclass
class _Life:
    first: float                  # reply time of the first read that showed it
    deadline: float
    prev: int = 0                 # packets at the previous read
    prev_req: float = 0.0         # request time of the previous read
    after: int = 0
    added: int = 0                # the kernel's curlft.add_time (ESP), 0 for MACsec


class SaTimeline:
    """Packets a receiving kernel accepted on an SA after its hard lifetime.

    Fed every :class:`~qkdgate.gateway.demo.kernelwatch.Reading` of a
    gateway: an inbound ESP SA (destination = that gateway) or a MACsec RX
    SA is one *life* from the first read that shows it to the first that
    does not. Its hard deadline is counted from that first read (the SA is
    at least that young) plus ``slack`` (the kernel's lifetime timer ticks
    once a second; MACsec's deadline is the daemon's timer). Packets its
    counter gains between two reads that were both *requested* after the
    deadline were certainly accepted after it (the earlier read sampled the
    counter no sooner than its request): each is one packet delivered under
    a key past its hard lifetime (RFC 4301 4.4.2.1). Gains across a read
    gap that straddles the deadline are not counted (a starved guest reads
    seconds apart), so the figure is a lower bound.

    A life begins only when the SA is *keyed*: XFRM_MSG_ALLOCSPI leaves a
    larval SA (no algorithm) under the SPI the exchange then keys with
    XFRM_MSG_UPDSA, which replaces the larval state by a new one
    (xfrm_state_update). An exchange waiting for QKD keys or for the peer
    (pool empty, a partition) holds its larval SA for seconds; counting
    from it put the deadline that much before the keyed SA existed and
    counted legitimate packets (the 125 and 231 of docs/faults.md). A new
    ``curlft.add_time`` under the same key is a new SA too."""

    def __init__(self, hard: float, own: dict[str, str], slack: float = 1.5) -> None:
        self.hard, self.own, self.slack = hard, own, slack
        self.live: dict[tuple[Any, ...], _Life] = {}
        self.events: list[tuple[float, int, str]] = []    # (t, packets, which SA)
        self.larval: dict[tuple[str, Any], float] = {}     # larval SA -> first read
        self.larval_waits: list[tuple[float, float]] = []  # (keyed at, s it was larval)
        self.lock = threading.Lock()

    def feed(self, ns: str, rd: Any) -> None:
        with self.lock:
            seen = set()
            seen_larval: set[tuple[str, Any]] = set()
            for v in rd.sas:
                if v.kind == "esp":
                    if str(v.key[1]) != self.own.get(ns):
                        continue       # outbound: the receiver counts
                    if not v.keyed:    # larval: reserved SPI, no key, not yet the SA
                        self.larval.setdefault((ns, v.key), rd.t_rep)
                        seen_larval.add((ns, v.key))
                        continue
                    if (since := self.larval.pop((ns, v.key), None)) is not None:
                        self.larval_waits.append((rd.t_req, rd.t_req - since))
                elif v.kind != "rx":
                    continue
                k = (ns, v.kind, v.key)
                seen.add(k)
                life = self.live.get(k)
                if life is not None and (v.packets < life.prev or v.added != life.added):
                    life = None        # removed and added again between two reads
                if life is None:
                    life = self.live[k] = _Life(rd.t_rep, rd.t_rep + self.hard + self.slack,
                                                prev=v.packets, prev_req=rd.t_req,
                                                added=v.added)
                    continue
                gained = v.packets - life.prev
                if life.prev_req > life.deadline and gained > 0:
                    life.after += gained
                    key = v.key[-1] if v.kind == "esp" else v.key[0]
                    self.events.append((rd.t_req, gained, f"{ns.rsplit('-', 1)[-1]} {v.kind} "
                                        f"{key:#x} seen {rd.t_req - life.first:.1f}s "
                                        "after its first read"))
                life.prev, life.prev_req = v.packets, rd.t_req
            for k in [k for k in self.live if k[0] == ns and k not in seen]:
                del self.live[k]
            for lk in [lk for lk in self.larval if lk[0] == ns and lk not in seen_larval]:
                del self.larval[lk]

    def after_hard(self, a: float, b: float) -> int:
        with self.lock:
            return sum(n for t, n, _w in self.events if a <= t <= b)

    def longest_larval(self, a: float, b: float) -> float:
        """The longest an SPI was held larval before keyed, among SAs keyed in [a, b]."""
        with self.lock:
            return max((w for t, w in self.larval_waits if a <= t <= b), default=0.0)

    def after_hard_where(self, a: float, b: float) -> list[str]:
        with self.lock:
            return [f"{w}: {n}" for t, n, w in self.events if a <= t <= b][:4]


class RecordingReader:
    """KernelWatch's reader, also feeding each reading to a SaTimeline."""

    def __init__(self, ns: str, timeline: SaTimeline) -> None:
        from qkdgate.gateway.demo.kernelwatch import _Reader
        self.ns, self.inner, self.timeline = ns, _Reader(ns), timeline

    def read(self, clock: Callable[[], float]) -> Any:
        rd = self.inner.read(clock)
        self.timeline.feed(self.ns, rd)
        return rd

    def close(self) -> None:
        self.inner.close()


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


# ====================================================================== gateways

class Gateway:
    """One gateway daemon, a process of its own in its namespace."""

    def __init__(self, name: str, ns: str, config: Path, folder: Path) -> None:
        self.name, self.ns, self.config = name, ns, config
        self.events = folder / f"{name}.events.jsonl"
        self.registry = folder / f"{name}-run" / "tunnels.json"
        self.arm_file = folder / f"{name}.arm"
        self.log = folder / f"{name}.log"
        self.proc: subprocess.Popen[bytes] | None = None
        self.starts = 0

    @property
    def control(self) -> str:
        return str(self.config.parent / f"{self.name}-run" / "control.sock")

    @property
    def pid(self) -> int:
        if self.proc is None:
            raise RuntimeError(f"{self.name} is not running")
        return self.proc.pid

    def start(self) -> None:
        self.registry.parent.mkdir(mode=0o700, exist_ok=True)
        with open(self.log, "ab") as out:
            self.proc = subprocess.Popen(
                ["ip", "netns", "exec", self.ns, sys.executable, str(THIS), "daemon",
                 "--config", str(self.config), "--events", str(self.events),
                 "--registry", str(self.registry), "--arm-file", str(self.arm_file)],
                stdout=out, stderr=subprocess.STDOUT, cwd=str(ROOT))
        self.starts += 1

    def alive(self) -> bool:
        return self.proc is not None and self.proc.poll() is None

    def status(self, timeout: float = 5.0) -> dict[str, Any] | None:
        from qkdgate.errors import QkdgateError
        from qkdgate.gateway.daemon.control import request
        try:
            st: dict[str, Any] = request(self.control, "status", timeout=timeout)
        except (QkdgateError, OSError):
            return None
        return st

    def signal(self, sig: int) -> None:
        if self.alive():
            os.kill(self.pid, sig)

    def kill(self) -> None:
        """SIGKILL and reap."""
        if self.proc is not None and self.proc.poll() is None:
            self.proc.send_signal(signal.SIGKILL)
            self.proc.wait(30)

    def stop(self) -> None:
        if self.proc is not None and self.proc.poll() is None:
            self.proc.send_signal(signal.SIGTERM)
            try:
                self.proc.wait(30)
            except subprocess.TimeoutExpired:
                self.kill()

    def failsafe(self) -> str:
        """What systemd's ExecStopPost=qkdgate failsafe does after a crash:
        the same code, run in-process in a thread inside the gateway's
        namespace (a fresh interpreter costs minutes on a loaded TCG guest)."""
        import io

        from qkdgate.gateway.demo.net import in_thread_netns
        from qkdgate.tunnels import failsafe
        p = argparse.ArgumentParser()
        failsafe.add_arguments(p)
        args = p.parse_args(["--state", str(self.registry)])
        out = io.StringIO()

        def body() -> int:
            with contextlib.redirect_stdout(out):
                return failsafe.run(args)
        rc = in_thread_netns(self.ns, body)
        return f"{out.getvalue()} (exit {rc})"

    def arm(self, state: str) -> None:
        self.arm_file.write_text(state)
        self.signal(signal.SIGUSR1)

    def wait_stopped(self, timeout: float) -> bool:
        """Has the process stopped itself (SIGSTOP: state T in /proc)?"""
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            if not self.alive():
                return False
            with contextlib.suppress(OSError):
                stat = Path(f"/proc/{self.pid}/stat").read_text()
                if stat.rsplit(")", 1)[1].split()[0] in ("T", "t"):
                    return True
            time.sleep(0.02)
        return False

    def rss_kib(self) -> int:
        for line in Path(f"/proc/{self.pid}/status").read_text().splitlines():
            if line.startswith("VmRSS:"):
                return int(line.split()[1])
        return 0

    def fds(self) -> int:
        return len(os.listdir(f"/proc/{self.pid}/fd"))

    def read_events(self) -> list[dict[str, Any]]:
        out = []
        if self.events.exists():
            for line in self.events.read_text().splitlines():
                with contextlib.suppress(ValueError):
                    out.append(json.loads(line))
        return out

    def journal_key_ids(self) -> dict[str, set[tuple[str, int]]]:
        """key_ID -> the (tunnel, generation)s the journal reserved it for."""
        out: dict[str, set[tuple[str, int]]] = {}
        cfg_state = _state_dir(self.config)
        path = cfg_state / "journal"
        if not path.exists():
            return out
        for line in path.read_bytes().splitlines():
            if len(line) < 10:
                continue
            try:
                rec = json.loads(line[9:])
            except ValueError:
                continue
            if isinstance(rec, dict) and rec.get("t") == "keys":
                for k in rec.get("ids", []):
                    out.setdefault(k.lower(), set()).add((rec.get("tun", ""), rec.get("gen", 0)))
        return out


def _state_dir(config: Path) -> Path:
    m = re.search(r"^\s*state_dir:\s*(\S+)", config.read_text(), re.M)
    if m is None:
        raise RuntimeError(f"{config}: no state_dir")
    return Path(m.group(1))


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


# ====================================================================== faults

class Fault:
    """One fault of the matrix: ``inject`` then, ``hold`` s later, ``clear``."""

    name = "fault"
    hold = 10.0
    qkd = False            # only meaningful where a policy uses QKD

    def inject(self, lab: Lab) -> None:
        raise NotImplementedError

    def clear(self, lab: Lab) -> None:
        raise NotImplementedError

    def applies(self, policy: str) -> bool:
        return not self.qkd or policy != "pqc-only"


class KmeUnreachable(Fault):
    name, qkd = "KME unreachable", True

    def inject(self, lab: Lab) -> None:
        lab.cut_kme(True)

    def clear(self, lab: Lab) -> None:
        lab.cut_kme(False)


class KmeSlow(Fault):
    """Both KMEs answer after 5 s (the client's timeout is 2 s)."""

    name, qkd = "KME slow (5 s)", True

    def inject(self, lab: Lab) -> None:
        def f(sim: Any) -> None:
            for k in ("KME-A", "KME-B"):
                sim.faults[k].delay = 5.0
        lab.kme(f)

    def clear(self, lab: Lab) -> None:
        def f(sim: Any) -> None:
            for k in ("KME-A", "KME-B"):
                sim.faults[k].delay = 0.0
        lab.kme(f)


class PoolEmpty(Fault):
    name, qkd = "key pool empty", True

    def inject(self, lab: Lab) -> None:
        lab.kme(lambda sim: sim.exhaust(refill=False))

    def clear(self, lab: Lab) -> None:
        lab.kme(lambda sim: sim.fill(1000))


class Eavesdropper(Fault):
    """Intercept-resend on half the photons: QBER ~12.5 % > 8 %, QBER alarm."""

    name, qkd = "eavesdropper (QBER alarm)", True

    def inject(self, lab: Lab) -> None:
        lab.kme(lambda sim: sim.set_eavesdropper(0.5))

    def clear(self, lab: Lab) -> None:
        lab.kme(lambda sim: sim.set_eavesdropper(0.0))


class KmeGarbage(Fault):
    name, qkd = "KME returns garbage", True

    def __init__(self, kind: str = "json") -> None:
        self.kind = kind

    def inject(self, lab: Lab) -> None:
        def f(sim: Any) -> None:
            for k in ("KME-A", "KME-B"):
                sim.faults[k].garbage = self.kind
        lab.kme(f)

    def clear(self, lab: Lab) -> None:
        def f(sim: Any) -> None:
            for k in ("KME-A", "KME-B"):
                sim.faults[k].garbage = None
        lab.kme(f)


class PeerKilled(Fault):
    """gw-b SIGKILLed and left dead (no failsafe: the machine is gone) for
    ``hold`` s; then restarted. gw-a's kernel and daemon must cope alone."""

    name = "peer daemon SIGKILLed"

    def inject(self, lab: Lab) -> None:
        lab.gw["gw-b"].kill()

    def clear(self, lab: Lab) -> None:
        lab.gw["gw-b"].start()


class LocalKilledAt(Fault):
    """The daemon stops itself when an exchange enters ``step``
    (deterministic, see the module docstring), is SIGKILLed there, and
    systemd's way follows: failsafe, 2 s, restart."""

    hold = 0.0

    def __init__(self, gateway: str, step: str) -> None:
        self.gateway, self.step = gateway, step
        self.name = f"local daemon SIGKILLed at {step} ({gateway})"
        self.qkd = step in QKD_STEPS
        self.reached = False

    def inject(self, lab: Lab) -> None:
        g = lab.gw[self.gateway]
        g.arm(self.step)
        self.reached = g.wait_stopped(KILL_STEP_TIMEOUT)
        if not self.reached:
            lab.notes.append(f"{self.name}: step not reached in {KILL_STEP_TIMEOUT:.0f} s")
        g.kill()

    def clear(self, lab: Lab) -> None:
        out = lab.restart(self.gateway, failsafe=True)
        if "deleted" not in out and "taken down" not in out:
            lab.notes.append(f"{self.name}: failsafe said {out.strip()[-200:]!r}")


class BrokenReload(Fault):
    """gw-a's config file is broken and SIGHUPed; the daemon must keep
    running on the old one. Cleared: the file restored, SIGHUP again."""

    name = "reload with a broken config"

    def inject(self, lab: Lab) -> None:
        g = lab.gw["gw-a"]
        self.text = g.config.read_text()
        g.config.write_text(self.text.replace("tunnels:", "tunnels: [", 1) + "\nbogus: {\n")
        g.signal(signal.SIGHUP)

    def clear(self, lab: Lab) -> None:
        g = lab.gw["gw-a"]
        g.config.write_text(self.text)
        if not g.alive():
            lab.notes.append("broken reload: gw-a died")
            g.start()
            return
        rejected = any(e.get("event") == "config_rejected" for e in g.read_events())
        if not rejected:
            lab.notes.append("broken reload: no config_rejected event")
        g.signal(signal.SIGHUP)


class Partition(Fault):
    """The wire bridge down for 10 s: nothing crosses, in either direction."""

    name = "wire partition (10 s)"

    def inject(self, lab: Lab) -> None:
        _ip(lab.net.w, "link", "set", "br0", "down")

    def clear(self, lab: Lab) -> None:
        _ip(lab.net.w, "link", "set", "br0", "up")


class ClockStep(Fault):
    """The (VM's) wall clock stepped by ``delta`` s; stepped back when cleared.
    Lifetimes must run on CLOCK_MONOTONIC (RFC 4301 4.4.2.1 lifetimes are
    durations): nothing may expire early, late, or twice."""

    def __init__(self, delta: float) -> None:
        self.delta = delta
        self.name = f"wall clock stepped {'+' if delta > 0 else '-'}{abs(delta) / 3600:g} h"

    def inject(self, lab: Lab) -> None:
        if not in_lab():
            raise RuntimeError("the clock fault runs only inside the lab VM")
        time.clock_settime(time.CLOCK_REALTIME, time.time() + self.delta)

    def clear(self, lab: Lab) -> None:
        time.clock_settime(time.CLOCK_REALTIME, time.time() - self.delta)


def _ip(ns: str, *args: str) -> None:
    r = subprocess.run(["ip", "-n", ns, *args], capture_output=True, text=True)
    if r.returncode:
        raise RuntimeError(f"ip -n {ns} {' '.join(args)}: {r.stderr.strip()}")


def all_faults(kill_steps: tuple[tuple[str, str], ...] = KILL_STEPS) -> list[Fault]:
    """Every fault of the matrix, in the table's order."""
    return [KmeUnreachable(), KmeSlow(), PoolEmpty(), Eavesdropper(), KmeGarbage(),
            PeerKilled(), *(LocalKilledAt(g, s) for g, s in kill_steps), BrokenReload(),
            Partition(), ClockStep(3600), ClockStep(-3600)]


# ====================================================================== one cell

@dataclass
class Cell:
    fault: str
    policy: str
    cleartext: int = 0
    after_hard: int = 0
    key_ids_reused: int = 0
    sent: int = 0
    lost: int = 0
    recovery_s: float | None = None      # None: did not recover within the wait
    outage_s: float = 0.0                # longest run of lost datagrams in the cell
    rekeys: int = 0
    notes: list[str] = field(default_factory=list)
    diag: str = ""

    def row(self) -> list[str]:
        rec = "-" if self.recovery_s is None else f"{self.recovery_s:.1f}"
        return [self.fault, self.policy, str(self.cleartext), str(self.after_hard),
                str(self.key_ids_reused), f"{self.lost}/{self.sent}", f"{self.outage_s:.1f}",
                rec, str(self.rekeys), "; ".join(self.notes)]


HEADER = ["fault", "policy", "cleartext on wire", "delivered after hard lifetime",
          "QKD key_IDs used twice", "datagrams lost/sent", "longest outage (s)",
          "recovery after clear (s)", "rekeys", "notes"]


def outages(stream: Any, a: float, b: float) -> list[tuple[float, float]]:
    """Runs of >= OUTAGE_RUN consecutive lost datagrams sent in [a, b]:
    (first send time, last send time)."""
    out = []
    i, j = bisect_left(stream.sent_at, a), bisect_right(stream.sent_at, b)
    run_start = None
    n = 0
    for s in range(i, j):
        if s not in stream.received:
            if run_start is None:
                run_start = s
            n += 1
            continue
        if run_start is not None and n >= OUTAGE_RUN:
            out.append((stream.sent_at[run_start], stream.sent_at[s - 1]))
        run_start, n = None, 0
    if run_start is not None and n >= OUTAGE_RUN:
        out.append((stream.sent_at[run_start], stream.sent_at[j - 1]))
    return out


def run_cell(lab: Lab, fault: Fault, *, recover_timeout: float = 90.0,
             settle: float = 2.0) -> Cell:
    """Baseline (every path keyed), inject, hold, clear, wait for recovery;
    the figures of the cell's window."""
    cell = Cell(fault.name, lab.policy)
    if not lab.wait_keyed(settle=settle):
        cell.notes.append("not keyed before the fault")
        cell.diag = lab.diagnose()
    reused0 = set(lab.key_ids_reused())
    rekeys0 = lab.rekeys()
    lab.notes.clear()
    t0 = time.monotonic()
    fault.inject(lab)
    if fault.hold:
        time.sleep(fault.hold)
    fault.clear(lab)
    t_clear = time.monotonic()
    recovered = lab.wait_keyed(settle=settle, timeout=recover_timeout)
    time.sleep(1.5)                       # datagrams in flight arrive
    t1 = time.monotonic() - 1.0
    cell.cleartext = lab.sniffer.count(lab.sniffer.clear_t, t0, t1)
    cell.after_hard = lab.timeline.after_hard(t0, t1)
    reused = sorted(set(lab.key_ids_reused()) - reused0)
    cell.key_ids_reused = len(reused)
    cell.notes += [f"reused {r}" for r in reused[:3]]
    if (larval := lab.timeline.longest_larval(t0, t1)) >= lab.timers.hard / 4:
        cell.notes.append(f"an SPI larval {larval:.1f} s before keyed")
    if cell.after_hard:
        cell.notes += [f"after hard {w}" for w in lab.timeline.after_hard_where(t0, t1)]
        cell.notes.append(f"watch max gap {lab.watch.max_gap:.1f} s")
    cell.rekeys = lab.rekeys() - rekeys0
    last_out = t_clear
    for st in lab.streams:
        i, j = bisect_left(st.sent_at, t0), bisect_right(st.sent_at, t1)
        cell.sent += j - i
        cell.lost += sum(1 for s in range(i, j) if s not in st.received)
        for a, b in outages(st, t0, t1):
            cell.outage_s = max(cell.outage_s, b - a)
            last_out = max(last_out, b)
    cell.recovery_s = round(last_out - t_clear, 1) if recovered else None
    for g in lab.gw.values():
        if not g.alive():
            cell.notes.append(f"{g.name} not running")
            g.start()
    cell.notes.extend(lab.notes)
    if cell.cleartext:
        cell.notes.append("cleartext sample " + lab.sniffer.samples[-1][:60])
    if cell.recovery_s is None:
        cell.diag += "\n-- after the fault --\n" + lab.diagnose()
    return cell


def markdown(cells: list[Cell]) -> str:
    lines = ["| " + " | ".join(HEADER) + " |", "|" + "---|" * len(HEADER)]
    lines += ["| " + " | ".join(c.row()) + " |" for c in cells]
    return "\n".join(lines)


# ====================================================================== the daemon wrapper

def daemon_main(argv: list[str]) -> int:
    """``faults.py daemon``: ``qkdgate run`` with an event log, a registry of
    its own (two daemons share one /run here) and the kill-at-step hook."""
    p = argparse.ArgumentParser(prog="faults.py daemon")
    p.add_argument("--config", required=True)
    p.add_argument("--events", required=True)
    p.add_argument("--registry", required=True)
    p.add_argument("--arm-file", required=True)
    a = p.parse_args(argv)

    from qkdgate.gateway.config.model import load_config
    from qkdgate.gateway.daemon.daemon import Daemon
    from qkdgate.gateway.protocol.session import PeerSession
    from qkdgate.gateway.telemetry.events import to_dict
    from qkdgate.gateway.telemetry.metrics import configure_logging
    from qkdgate.keymix.secret import disable_core_dumps
    from qkdgate.tunnels.macsec import MacsecBackend
    from qkdgate.tunnels.state import TunnelRegistry
    from qkdgate.tunnels.xfrm import XfrmBackend

    cfg = load_config(a.config)
    configure_logging(cfg.telemetry.log.level, cfg.telemetry.log.format)
    disable_core_dumps()
    registry = TunnelRegistry(a.registry)
    armed: list[str] = []

    def arm(_sig: int, _frm: object) -> None:
        with contextlib.suppress(OSError):
            armed[:] = [Path(a.arm_file).read_text().strip()]
    signal.signal(signal.SIGUSR1, arm)

    original = PeerSession._transition

    def transition(self: Any, ex: Any, new: Any) -> None:
        original(self, ex, new)
        if armed and str(new) == armed[0]:
            armed.clear()
            os.kill(os.getpid(), signal.SIGSTOP)     # the harness SIGKILLs us here
    PeerSession._transition = transition     # type: ignore[method-assign]

    events = open(a.events, "a", buffering=1)    # noqa: SIM115  lives as long as the process

    def record(ev: Any) -> None:
        events.write(json.dumps({"t": time.monotonic(), **to_dict(ev)}, default=str) + "\n")

    async def main() -> None:
        d = Daemon(cfg, config_path=a.config, ipsec_backend=XfrmBackend(registry=registry),
                   macsec_backend=MacsecBackend(registry=registry))
        d.subscribe(record)
        d.install_signal_handlers()
        await d.run()
    asyncio.run(main())
    return 0


# ====================================================================== soak helpers

def random_fault(rng: random.Random, policy: str) -> Fault:
    """A fault drawn from the matrix (seeded), one that applies to ``policy``."""
    while True:
        f = rng.choice(all_faults())
        if f.applies(policy):
            return f


if __name__ == "__main__":
    if len(sys.argv) > 1 and sys.argv[1] == "daemon":
        sys.exit(daemon_main(sys.argv[2:]))
    print("usage: faults.py daemon --config FILE --events FILE --registry FILE --arm-file FILE\n"
          "(the fault matrix is bench/fault_matrix.py, the soak bench/soak.py)")
    sys.exit(2)
