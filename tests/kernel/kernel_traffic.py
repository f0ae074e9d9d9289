"""Kernel-test traffic helpers: a wire capture and its analysis, a sequenced
UDP stream, loss attribution and the kernel counters used to explain loss.
Sockets are created inside namespaces in-process (no `ip netns exec` per
packet source), so the stream costs no process start under TCG."""

from __future__ import annotations

import ipaddress
import signal
import socket
import struct
import subprocess
import threading
import time
from collections.abc import Iterator
from dataclasses import dataclass, field
from typing import TYPE_CHECKING

from qkdgate.tunnels.netlink import (
    NetlinkChannel,
    in_netns,
    open_socket_in_netns,
    parse_nlas,
    set_rcvbuf,
)

if TYPE_CHECKING:   # kernel_lab imports this module
    from kernel_lab import Topology

PATTERN = b"QKDGATE-SECRET-PAYLOAD-7f3a"
ip = ipaddress.ip_address
net = ipaddress.ip_network
LAN_A, LAN_B = net("10.1.0.0/24"), net("10.2.0.0/24")
LAN_A6, LAN_B6 = net("fd01::/64"), net("fd02::/64")
MS_NET = net("172.16.0.0/24")
PROTECTED = (LAN_A, LAN_B, LAN_A6, LAN_B6, MS_NET)


def proc_net(netns: str, name: str) -> str:
    with in_netns(netns), open(f"/proc/thread-self/net/{name}") as f:
        return f.read()


def xfrm_stats(netns: str) -> dict[str, int]:
    return {k: int(v) for k, v in (l.split() for l in proc_net(netns, "xfrm_stat").splitlines())}


def udp_rcvbuf_errors(netns: str) -> int:
    lines = [l.split() for l in proc_net(netns, "snmp").splitlines() if l.startswith("Udp:")]
    hdr, val = lines[0], lines[1]
    return int(val[hdr.index("RcvbufErrors")]) + int(val[hdr.index("InErrors")])


def link_drops(netns: str) -> int:
    """rx_dropped + tx_dropped over every link (rtnl_link_stats64, IFLA_STATS64)."""
    total = 0
    with NetlinkChannel(0, netns) as ch:
        for _t, body in ch.request("list_links", 18, bytes(16), dump=True):
            st = parse_nlas(body, 16).get(23)
            if st and len(st) >= 64:
                total += sum(struct.unpack_from("=8Q", st)[6:8])
    return total


class Capture:
    """tcpdump on the wire bridge into a pcap; ``stop()`` returns the path.
    ``bpf`` (a pcap-filter(7) expression) keeps only what a test looks at,
    e.g. no ESP under a flood whose ESP would make tcpdump drop frames."""

    def __init__(self, topo: Topology, path: str, iface: str = "br0", bpf: str = "") -> None:
        self.path = path
        self.proc = subprocess.Popen(
            ["ip", "netns", "exec", topo.wire, "tcpdump", "-i", iface, "-n", "-U", "-s", "0",
             "-w", path, *([bpf] if bpf else [])], stdout=subprocess.DEVNULL,
            stderr=subprocess.PIPE, text=True)
        deadline = time.monotonic() + 30
        line = ""
        while "listening" not in line:
            line = self.proc.stderr.readline()
            if (not line and self.proc.poll() is not None) or time.monotonic() > deadline:
                raise RuntimeError(f"tcpdump did not start: {line}")
        self.dropped = 0

    def stop(self) -> str:
        time.sleep(0.3)
        self.proc.send_signal(signal.SIGINT)
        err = self.proc.communicate(timeout=30)[1]
        for l in err.splitlines():
            if "dropped by kernel" in l:
                self.dropped = int(l.split()[0])
        return self.path


@dataclass
class WireReport:
    frames: int = 0
    esp: int = 0
    esp_in_udp: int = 0
    macsec: int = 0
    cleartext: int = 0            # IP packets to/from protected nets that are not ESP
    pattern_hits: int = 0
    other: dict[str, int] = field(default_factory=dict)
    spis: dict[int, int] = field(default_factory=dict)


def iter_pcap(path: str) -> Iterator[bytes]:
    """The frames of a classic pcap file (tcpdump -w), in capture order: a
    minimal reader, fast under TCG, unlike scapy for 10^5 frames."""
    with open(path, "rb") as f:
        data = f.read()
    off = 24
    while off + 16 <= len(data):
        caplen = struct.unpack_from("=I", data, off + 8)[0]
        yield data[off + 16:off + 16 + caplen]
        off += 16 + caplen


def analyse_pcap(path: str) -> WireReport:
    with open(path, "rb") as f:
        rep = WireReport(pattern_hits=f.read().count(PATTERN))
    for frame in iter_pcap(path):
        rep.frames += 1
        etype = struct.unpack_from("!H", frame, 12)[0]
        if etype == 0x88E5:
            rep.macsec += 1
            continue
        if etype == 0x0800:
            ihl = (frame[14] & 0xF) * 4
            proto, src, dst = frame[23], ip(frame[26:30]), ip(frame[30:34])
            l4 = 14 + ihl
        elif etype == 0x86DD:
            proto, src, dst = frame[20], ip(frame[22:38]), ip(frame[38:54])
            l4 = 54
        else:
            rep.other[hex(etype)] = rep.other.get(hex(etype), 0) + 1
            continue
        if proto == 50:
            rep.esp += 1
            spi = struct.unpack_from("!I", frame, l4)[0]
            rep.spis[spi] = rep.spis.get(spi, 0) + 1
        elif proto == 17 and struct.unpack_from("!H", frame, l4 + 2)[0] == 4500:
            rep.esp_in_udp += 1
        elif any(src in n or dst in n for n in PROTECTED):
            rep.cleartext += 1
        else:
            k = f"ip-proto-{proto}"
            rep.other[k] = rep.other.get(k, 0) + 1
    return rep


class Stream:
    """A paced UDP stream with sequence numbers from one namespace to another."""

    def __init__(self, src_ns: str, dst_ns: str, src: object, dst: object, rate: int = 500,
                 port: int = 5001) -> None:
        fam = socket.AF_INET if dst.version == 4 else socket.AF_INET6
        self.rx = open_socket_in_netns(fam, socket.SOCK_DGRAM, dst_ns)
        # Not plain SO_RCVBUF: the lab kernel caps it at rmem_max (208 KiB),
        # about 1 s of this stream once a WireGuard skb's overhead counts, and a
        # reader starved that long in a loaded CI VM lost 206 datagrams as UDP
        # RcvbufErrors (the wireguard test's only loss, 2026-12-06).
        got = set_rcvbuf(self.rx, 4 << 20)
        assert got >= 4 << 20, f"receive buffer {got} B: the test would drop, not the tunnel"
        self.rx.bind((str(dst), port))
        self.rx.settimeout(0.2)
        self.tx = open_socket_in_netns(fam, socket.SOCK_DGRAM, src_ns)
        self.tx.bind((str(src), 0))
        self.dst, self.port, self.rate = str(dst), port, rate
        self.dst_ns = dst_ns
        self.sent_at: list[float] = []
        self.send_errors = 0
        self.received: set[int] = set()   # read it while running via received_set()
        self._lock = threading.Lock()
        self._stop = threading.Event()
        self._rx_stop = threading.Event()
        self.rcvbuf0 = udp_rcvbuf_errors(dst_ns)

    def start(self) -> Stream:
        self._t_rx = threading.Thread(target=self._recv, daemon=True)
        self._t_tx = threading.Thread(target=self._send, daemon=True)
        self._t_rx.start()
        self._t_tx.start()
        return self

    def _send(self) -> None:
        seq, t0 = 0, time.monotonic()
        pad = b"." * 64
        while not self._stop.is_set():
            due = t0 + seq / self.rate
            now = time.monotonic()
            if due > now:
                time.sleep(min(due - now, 0.01))
                continue
            self.sent_at.append(now)
            try:
                self.tx.sendto(PATTERN + struct.pack("!Q", seq) + pad, (self.dst, self.port))
            except OSError:
                self.send_errors += 1
            seq += 1

    def _recv(self) -> None:
        n = len(PATTERN)
        while not self._rx_stop.is_set():
            try:
                data = self.rx.recv(2048)
            except TimeoutError:
                continue
            if data.startswith(PATTERN):
                with self._lock:
                    self.received.add(struct.unpack_from("!Q", data, n)[0])

    def received_set(self) -> set[int]:
        """A copy, safe while the receiver thread still adds to it."""
        with self._lock:
            return set(self.received)

    def received_since(self, t: float) -> int:
        return sum(1 for s in self.received_set() if s < len(self.sent_at) and self.sent_at[s] >= t)

    def stop(self, drain: float = 1.0) -> None:
        if self.rx.fileno() == -1:      # stopped already (a test's cleanup after its own stop)
            return
        self._stop.set()
        self._t_tx.join()
        time.sleep(drain)
        self._rx_stop.set()
        self._t_rx.join()
        self.rcvbuf_errors = udp_rcvbuf_errors(self.dst_ns) - self.rcvbuf0
        self.rx.close()
        self.tx.close()

    def lost(self) -> list[int]:
        return [s for s in range(len(self.sent_at)) if s not in self.received]


WINDOW_SLACK = 0.05     # s: a datagram sent this long after a window still counts against it


def in_window(t: float, windows: list[tuple[float, float]]) -> int | None:
    """The index of the first rekey window that datagram send time ``t``
    counts against (see attribute_loss), else None."""
    return next((i for i, (a, b) in enumerate(windows) if a <= t <= b + WINDOW_SLACK), None)


def attribute_loss(stream: Stream, windows: list[tuple[float, float]],
                   host_drops: int) -> tuple[list[int], list[int]]:
    """Split lost sequence numbers into (in a rekey window, outside any).

    A packet counts against a rekey window if it was sent between the
    window's start and 50 ms after its end (time in flight through two
    ESP gateways under TCG is well below that)."""
    in_win, outside = [], []
    for s in stream.lost():
        t = stream.sent_at[s]
        (in_win if in_window(t, windows) is not None else outside).append(s)
    return in_win, outside
