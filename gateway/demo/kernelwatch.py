"""Which of the demo's traffic paths the kernel could carry, read from the kernel.

Theory of operation: the demo attributes every datagram to a phase of the
run (before the eavesdropper, blocked, after ...). Whether a datagram was
sent while its path was *blocked* must come from what the kernel held,
not from when a daemon event reached the demo: a daemon blocks its
tunnels one after the other, and the two gateways block at their own
hard lifetimes, so "some tunnel somewhere is blocked" says nothing about
one stream's path (issue 10: a MACsec frame counted as delivered "while
blocked" was sent after gw-?/lan blocked but while the MACsec SAs it used
were still installed).

:class:`KernelWatch` runs one thread that reads, every ``interval``, the
SAs each gateway's kernel holds over netlink (read-only: the XFRM SA dump,
``XFRM_MSG_GETSA``, and the macsec genl dump, ``MACSEC_CMD_GET_TXSC``),
stamping each read with the monotonic time before the request and after
the reply. A :class:`Path` says which SAs a stream needs:

* ESP from gateway X to gateway Y: an SA ``X -> Y`` with the same SPI in
  both X's and Y's SAD (the outbound one at X, the inbound one at Y;
  RFC 4301 4.4.2);
* MACsec from X to Y: X's encoding AN has an active TX SA and Y has an
  active RX SA on that AN (IEEE 802.1AE-2018 10.5.1, 10.6.1; the link
  validates strictly, so without both the frame is dropped).

A path is *blocked* between the reply of the first observation that shows
it unkeyed and the request of the last one in that run (:func:`blocked_intervals`):
the kernel was unkeyed at both ends of the interval and nothing in between
re-keyed it (no rekey completes within one poll interval). A datagram sent
inside such an interval crossed a kernel that had no key for it, so it must
not arrive: if it does, something carried it in the clear or under a key
that was gone. Datagrams sent between the last read before a change and
the first read after it (~20 ms, seconds on a starved host) are in a
", transition" phase of their own: nobody knows whether the kernel had a
key for them.

Per-SA counters (ESP packets from the SA's current lifetime; MACsec
OutPktsProtected+Encrypted per TX SA, InPktsOK per RX SA, IEEE 802.1AE-2018
10.7.9) are kept from the last read of each SA, so the summary can say what
each SA carried before it was removed.
"""

from __future__ import annotations

import ipaddress
import itertools
import logging
import struct
import threading
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Any

from qkdgate.errors import TunnelError
from qkdgate.tunnels import macsec_msg as mm
from qkdgate.tunnels import xfrm_msg as xm
from qkdgate.tunnels.netlink import (
    GENLMSGHDR,
    NetlinkChannel,
    genl_family_id,
    iter_nlas,
    parse_nlas,
)

log = logging.getLogger("qkdgate.demo")

NETLINK_GENERIC, NETLINK_XFRM = 16, 6


@dataclass(frozen=True)
class SaView:
    """One SA as read back: ``kind`` "esp" (key: src, dst, spi) or
    "tx"/"rx" (MACsec; key: AN), with its packet counter. For ESP also the
    kernel's ``curlft.add_time`` (wall seconds) and whether it carries a
    key: a larval SA (XFRM_MSG_ALLOCSPI's reservation, no algorithm) has
    the SPI the keyed one will have but is not yet that SA."""

    kind: str
    key: tuple[Any, ...]
    active: bool
    packets: int
    added: int = 0
    keyed: bool = True


@dataclass(frozen=True)
class Reading:
    """Every SA one gateway's kernel held at one read."""

    t_req: float
    t_rep: float
    sas: tuple[SaView, ...]
    encoding_an: int | None = None


@dataclass(frozen=True)
class Path:
    """What stream ``name`` needs from the kernels of ``src_ns`` and ``dst_ns``:
    ``kind`` "esp" (tunnel endpoints ``src``/``dst``) or "macsec"."""

    name: str
    kind: str
    src_ns: str
    dst_ns: str
    src: str = ""
    dst: str = ""

    def keyed(self, a: Reading, b: Reading) -> bool:
        """Could the kernels, as read in ``a`` (source) and ``b``
        (destination), carry this path's traffic?"""
        if self.kind == "esp":
            s, d = ipaddress.ip_address(self.src), ipaddress.ip_address(self.dst)
            out = {v.key[2] for v in a.sas if v.kind == "esp" and v.key[:2] == (s, d)}
            inb = {v.key[2] for v in b.sas if v.kind == "esp" and v.key[:2] == (s, d)}
            return bool(out & inb)
        an = a.encoding_an
        tx = any(v.kind == "tx" and v.active and v.key == (an,) for v in a.sas)
        rx = any(v.kind == "rx" and v.active and v.key == (an,) for v in b.sas)
        return an is not None and tx and rx


def blocked_intervals(obs: list[tuple[float, float, bool]]) -> list[tuple[float, float]]:
    """``obs``: (t_req, t_rep, keyed) in time order. Each run of unkeyed
    observations gives (t_rep of its first, t_req of its last) when that is
    a non-empty interval."""
    out = []
    start: float | None = None
    last_req = 0.0
    for t_req, t_rep, keyed in [*obs, (float("inf"), float("inf"), True)]:
        if not keyed:
            if start is None:
                start = t_rep
            last_req = t_req
        elif start is not None:
            if last_req > start:
                out.append((start, last_req))
            start = None
    return out


def transition_intervals(obs: list[tuple[float, float, bool]]) -> list[tuple[float, float]]:
    """Where the path's state is not known: between the request of the last
    read before a change and the reply of the first read after it (on a
    loaded host reads can be seconds apart)."""
    return [(a[0], b[1]) for a, b in itertools.pairwise(obs) if a[2] != b[2]]


def overlay_blocked(phases: list[tuple[str, float]], blocked: list[tuple[float, float]],
                    transitions: list[tuple[float, float]] | None = None,
                    suffix: str = ", blocked") -> list[tuple[str, float]]:
    """One stream's phases: the run's phases (the eavesdropper's state, the
    policy's PQC fallback) with the run-wide ", blocked" taken off, and
    ", blocked" put back exactly where this stream's path was blocked in
    the kernel (a blocked path shows no fallback: nothing flows). Inside
    ``transitions`` the label ends in ", transition": whether the kernel
    had a key there is unknown, so those datagrams count for neither side."""
    def base(label: str) -> str:
        return label[:-len(suffix)] if label.endswith(suffix) else label

    trans = transitions or []
    cuts = sorted({t for _lbl, t in phases} | {t for iv in blocked + trans for t in iv})
    out: list[tuple[str, float]] = []
    for t in cuts:
        labels = [lbl for lbl, start in phases if start <= t]
        if not labels:
            continue
        label = base(labels[-1])
        if any(a <= t < b for a, b in trans):
            label = label.split(", ")[0] + ", transition"
        elif any(a <= t < b for a, b in blocked):
            label = label.split(", ")[0] + suffix
        if not out or out[-1][0] != label:
            out.append((label, t))
    return out


class _Reader:
    """Read-only netlink dumps in one namespace (sockets made once, there)."""

    def __init__(self, netns: str) -> None:
        self.netns = netns
        self.xfrm = NetlinkChannel(NETLINK_XFRM, netns)
        self.genl = NetlinkChannel(NETLINK_GENERIC, netns)
        self._family: int | None = None

    def close(self) -> None:
        self.xfrm.close()
        self.genl.close()

    def esp(self) -> list[SaView]:
        out = []
        # xfrm_dump_sa takes no fixed header (see XfrmBackend.list_sas)
        for mtype, body in self.xfrm.request("watch_sas", xm.XFRM_MSG_GETSA, b"", dump=True):
            if mtype != xm.XFRM_MSG_NEWSA:
                continue
            info = xm.USERSA_INFO.unpack(body)
            fam = info["family"]
            n = 4 if fam == 2 else 16
            src = ipaddress.ip_address(bytes(info["saddr"])[:n])
            dst = ipaddress.ip_address(bytes(info["id.daddr"])[:n])
            attrs = parse_nlas(body, xm.USERSA_INFO.size)
            keyed = any(a in attrs for a in (xm.XFRMA_ALG_AEAD, xm.XFRMA_ALG_CRYPT,
                                             xm.XFRMA_ALG_AUTH, xm.XFRMA_ALG_AUTH_TRUNC))
            out.append(SaView("esp", (src, dst, info["id.spi"]), True,
                              int(info["curlft.packets"]), int(info["curlft.add_time"]), keyed))
        return out

    def _family_id(self) -> int | None:
        if self._family is None:
            try:
                self._family = genl_family_id(self.genl, mm.MACSEC_GENL_NAME, "watch_family")
            except TunnelError:      # macsec not loaded: no MACsec paths to watch
                return None
        return self._family

    def macsec(self) -> tuple[list[SaView], int | None]:
        fam = self._family_id()
        if fam is None:
            return [], None
        sas: list[SaView] = []
        enc = None
        body = GENLMSGHDR.pack(mm.MACSEC_CMD_GET_TXSC, mm.MACSEC_GENL_VERSION, 0)
        for _t, reply in self.genl.request("watch_macsec", fam, body, dump=True):
            attrs = parse_nlas(reply, GENLMSGHDR.size)    # the demo has one macsec link per gateway
            secy = parse_nlas(attrs.get(mm.MACSEC_ATTR_SECY, b""))
            if mm.MACSEC_SECY_ATTR_ENCODING_SA in secy:
                enc = secy[mm.MACSEC_SECY_ATTR_ENCODING_SA][0]
            for _i, entry in iter_nlas(attrs.get(mm.MACSEC_ATTR_TXSA_LIST, b"")):
                a = parse_nlas(entry)
                st = parse_nlas(a.get(mm.MACSEC_SA_ATTR_STATS, b""))
                pk = _u32(st, mm.MACSEC_SA_STATS_ATTR_OUT_PKTS_PROTECTED) + \
                    _u32(st, mm.MACSEC_SA_STATS_ATTR_OUT_PKTS_ENCRYPTED)
                sas.append(SaView("tx", (a[mm.MACSEC_SA_ATTR_AN][0],),
                                  bool(a.get(mm.MACSEC_SA_ATTR_ACTIVE, b"\0")[0]), pk))
            for _i, sc in iter_nlas(attrs.get(mm.MACSEC_ATTR_RXSC_LIST, b"")):
                s = parse_nlas(sc)
                for _j, entry in iter_nlas(s.get(mm.MACSEC_RXSC_ATTR_SA_LIST, b"")):
                    a = parse_nlas(entry)
                    st = parse_nlas(a.get(mm.MACSEC_SA_ATTR_STATS, b""))
                    sas.append(SaView("rx", (a[mm.MACSEC_SA_ATTR_AN][0],),
                                      bool(a.get(mm.MACSEC_SA_ATTR_ACTIVE, b"\0")[0]),
                                      _u32(st, mm.MACSEC_SA_STATS_ATTR_IN_PKTS_OK)))
        return sas, enc

    def read(self, clock: Callable[[], float]) -> Reading:
        t0 = clock()
        sas = self.esp()
        ms, enc = self.macsec()
        return Reading(t0, clock(), tuple(sas + ms), enc)


def _u32(stats: dict[int, bytes], t: int) -> int:
    raw = stats.get(t, b"")
    return struct.unpack("=I", raw[:4])[0] if len(raw) >= 4 else 0


@dataclass
class _SaLife:
    """What the watch saw of one SA: first and last read, last counter."""

    netns: str
    kind: str
    key: tuple[Any, ...]
    first: float
    last: float
    packets: int = 0
    gone: float | None = None       # first read without it


@dataclass
class KernelWatch:
    """Polls the gateways' kernels in a thread; see the module docstring."""

    paths: list[Path]
    interval: float = 0.02
    clock: Callable[[], float] = time.monotonic
    obs: dict[str, list[tuple[float, float, bool]]] = field(default_factory=dict)
    lives: list[_SaLife] = field(default_factory=list)
    reads: int = 0
    errors: int = 0
    max_gap: float = 0.0
    reader: Callable[[str], Any] = field(default=lambda ns: _Reader(ns))

    def __post_init__(self) -> None:
        self._stop = threading.Event()
        self._thread: threading.Thread | None = None
        self._live: dict[tuple[str, str, tuple[Any, ...]], _SaLife] = {}

    def start(self) -> KernelWatch:
        names = sorted({p.src_ns for p in self.paths} | {p.dst_ns for p in self.paths})
        self._readers = {n: self.reader(n) for n in names}
        self.obs = {p.name: [] for p in self.paths}
        self._thread = threading.Thread(target=self._run, name="kernel-watch", daemon=True)
        self._thread.start()
        return self

    def stop(self) -> None:
        self._stop.set()
        if self._thread is not None:
            self._thread.join(10)
            self._thread = None
        for r in getattr(self, "_readers", {}).values():
            r.close()
        self._readers = {}

    def _run(self) -> None:
        prev = None
        while not self._stop.is_set():
            try:
                self.poll_once()
            except (TunnelError, OSError) as exc:   # a failed read is a gap, not a verdict
                self.errors += 1
                log.warning("kernel watch: %s", exc)
            now = self.clock()
            if prev is not None:
                self.max_gap = max(self.max_gap, now - prev)
            prev = now
            self._stop.wait(self.interval)

    def poll_once(self) -> None:
        reads = {n: r.read(self.clock) for n, r in self._readers.items()}
        self.reads += 1
        for p in self.paths:
            a, b = reads[p.src_ns], reads[p.dst_ns]
            self.obs[p.name].append((min(a.t_req, b.t_req), max(a.t_rep, b.t_rep),
                                     p.keyed(a, b)))
        for n, rd in reads.items():
            seen = set()
            for v in rd.sas:
                k = (n, v.kind, v.key)
                seen.add(k)
                life = self._live.get(k)
                if life is not None and v.packets < life.packets:   # removed and re-added
                    life.gone = rd.t_rep
                    life = None
                if life is None:
                    life = self._live[k] = _SaLife(n, v.kind, v.key, rd.t_rep, rd.t_rep)
                    self.lives.append(life)
                life.last, life.packets = rd.t_req, v.packets
            for k in [k for k in self._live if k[0] == n and k not in seen]:
                self._live.pop(k).gone = rd.t_rep

    def keyed_since(self, name: str) -> float | None:
        """Since when the path has been keyed without a break (the reply of
        the first keyed read after the last unkeyed one); None while unkeyed
        or before the first read."""
        since = None
        for _t_req, t_rep, keyed in reversed(list(self.obs.get(name, []))):
            if not keyed:
                break
            since = t_rep
        return since

    def blocked(self, name: str) -> list[tuple[float, float]]:
        return blocked_intervals(self.obs.get(name, []))

    def transitions(self, name: str) -> list[tuple[float, float]]:
        return transition_intervals(self.obs.get(name, []))

    def sa_report(self, t0: float) -> list[dict[str, Any]]:
        """Each SA seen: where, what, when (seconds from ``t0``), packets."""
        out = []
        for s in self.lives:
            key = [str(k) if not isinstance(k, int) else k for k in s.key]
            out.append({"netns": s.netns.rsplit("-", 1)[-1], "kind": s.kind, "key": key,
                        "first": round(s.first - t0, 3), "last": round(s.last - t0, 3),
                        "gone": round(s.gone - t0, 3) if s.gone is not None else None,
                        "packets": s.packets})
        return out
