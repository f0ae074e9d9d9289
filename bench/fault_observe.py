"""What the fault matrix watches: the wire and the receiving kernels' SAs.

:class:`WireSniffer` counts every frame on the wire bridge's gA-side ports
(ESP by SPI, MACsec, and *cleartext*: an IP packet from or to a protected
subnet that is not ESP, or a frame carrying the streams' magic).
:class:`SaTimeline`, fed every reading of the demo's
:class:`~qkdgate.gateway.demo.kernelwatch.KernelWatch` through
:class:`RecordingReader`, counts packets a receiving kernel accepted on an SA
after that SA's hard lifetime (ESP inbound SAs: curlft.packets; MACsec RX
SAs: InPktsOK). Used by bench/fault_lab.py; see docs/faults.md.
"""

from __future__ import annotations

import socket
import struct
import threading
import time
from bisect import bisect_left, bisect_right
from collections.abc import Callable
from dataclasses import dataclass, field
from ipaddress import ip_address, ip_network
from typing import Any

PROTECTED = (ip_network("10.1.0.0/24"), ip_network("10.2.0.0/24"), ip_network("172.16.0.0/24"))
MAGIC = b"QKDGATE-DEMO"


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
        from qkdgate.tunnels.netlink import set_rcvbuf
        self._stop = threading.Event()
        ready = threading.Event()
        err: list[BaseException] = []

        def body() -> None:
            try:
                enter_netns(self.netns)
                s = socket.socket(socket.AF_PACKET, socket.SOCK_RAW, socket.htons(0x0003))
                set_rcvbuf(s, 8 << 20)
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
