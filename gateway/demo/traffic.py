"""The demo's traffic: paced UDP streams with sequence numbers, host to host.

Theory of operation: each :class:`UdpStream` sends from a socket opened in
the source host's namespace to one opened in the destination host's, so
every datagram crosses gateway A, the wire and gateway B, and is carried by
ESP only when the tunnel is up (the gateways' policies block otherwise:
fail closed). A datagram is ``MAGIC | stream id | u64 sequence | padding``;
the receiver keeps the set of sequence numbers it saw, the sender the send
time of each, so a loss can be attributed to the phase of the run it
happened in (:func:`loss_by_phase`: before the eavesdropper, while it
listens, while traffic is blocked, after recovery).

Sending uses plain threads (one per direction and side): they block in the
kernel, not in Python, and need no event loop.
"""

from __future__ import annotations

import socket
import struct
import threading
import time
from bisect import bisect_right
from collections.abc import Callable

from qkdgate.gateway.demo.net import enter_netns
from qkdgate.tunnels.netlink import set_rcvbuf

MAGIC = b"QKDGATE-DEMO"
HEADER = struct.Struct("!12sBQ")
PORT = 5001


class UdpStream:
    """One direction: ``src_ns``/``src`` -> ``dst_ns``/``dst``:``port``."""

    def __init__(self, name: str, stream_id: int, src_ns: str, src: str, dst_ns: str, dst: str,
                 *, rate: int = 100, port: int = PORT,
                 clock: Callable[[], float] = time.monotonic) -> None:
        self.name, self.stream_id = name, stream_id
        self.src_ns, self.src, self.dst_ns, self.dst = src_ns, src, dst_ns, dst
        self.rate, self.port, self.clock = rate, port, clock
        self.sent_at: list[float] = []
        self.received: set[int] = set()
        self.send_errors = 0
        self.foreign = 0            # datagrams on our port that are not ours
        self._stop_tx = threading.Event()
        self._stop_rx = threading.Event()
        self._ready = threading.Barrier(3)
        self._threads: list[threading.Thread] = []

    @property
    def sent(self) -> int:
        return len(self.sent_at)

    def start(self) -> UdpStream:
        self._threads = [threading.Thread(target=self._rx, name=f"rx-{self.name}", daemon=True),
                         threading.Thread(target=self._tx, name=f"tx-{self.name}", daemon=True)]
        for t in self._threads:
            t.start()
        self._ready.wait(30)
        return self

    def _rx(self) -> None:
        enter_netns(self.dst_ns)
        s = socket.socket(socket.AF_INET, socket.SOCK_DGRAM)
        set_rcvbuf(s, 4 << 20)
        s.bind((self.dst, self.port))
        s.settimeout(0.2)
        self._ready.wait(30)
        with s:
            while not self._stop_rx.is_set():
                try:
                    data = s.recv(2048)
                except TimeoutError:
                    continue
                except OSError:
                    break
                if len(data) < HEADER.size:
                    self.foreign += 1
                    continue
                magic, sid, seq = HEADER.unpack_from(data)
                if magic != MAGIC or sid != self.stream_id or seq >= len(self.sent_at):
                    self.foreign += 1
                    continue
                self.received.add(seq)

    def _tx(self) -> None:
        enter_netns(self.src_ns)
        s = socket.socket(socket.AF_INET, socket.SOCK_DGRAM)
        s.bind((self.src, 0))
        self._ready.wait(30)
        pad = b"." * 64
        seq, t0 = 0, self.clock()
        with s:
            while not self._stop_tx.is_set():
                due, now = t0 + seq / self.rate, self.clock()
                if due > now:
                    self._stop_tx.wait(min(due - now, 0.05))
                    continue
                if now - due > 1.0:       # a stalled thread does not burst to catch up
                    t0 += now - due
                self.sent_at.append(now)   # before sending: the receiver checks seq < sent
                try:
                    s.sendto(HEADER.pack(MAGIC, self.stream_id, seq) + pad, (self.dst, self.port))
                except OSError:
                    # EPERM/EHOSTUNREACH while a policy blocks: counted lost, not fatal
                    self.send_errors += 1
                seq += 1

    def stop(self, drain: float = 1.0) -> None:
        self._stop_tx.set()
        if self._threads:
            self._threads[1].join(5)
            time.sleep(drain)
            self._stop_rx.set()
            self._threads[0].join(5)

    def received_since(self, t: float) -> int:
        """Datagrams sent at or after ``t`` that arrived (for the live view)."""
        i = bisect_right(self.sent_at, t - 1e-9)
        return sum(1 for s in list(self.received) if s >= i)

    def counters(self) -> dict[str, int]:
        sent = self.sent
        received = len(self.received)
        return {"sent": sent, "received": received, "lost": sent - received,
                "send_errors": self.send_errors}


def loss_by_phase(sent_at: list[float], received: set[int],
                  phases: list[tuple[str, float]],
                  end: float | None = None) -> dict[str, dict[str, int]]:
    """Attribute each datagram to the phase it was sent in.

    ``phases`` is ``[(label, start), ...]`` in time order; a phase lasts until
    the next one starts. Datagrams sent after ``end`` (still in flight when
    the run stopped) are left out. Returns ``{label: {sent, received, lost}}``
    with the labels in phase order (a label may repeat: counts add up)."""
    out: dict[str, dict[str, int]] = {}
    starts = [t for _l, t in phases]
    for label, _t in phases:
        out.setdefault(label, {"sent": 0, "received": 0, "lost": 0})
    for seq, t in enumerate(sent_at):
        if end is not None and t > end:
            break
        i = bisect_right(starts, t) - 1
        if i < 0:
            continue
        row = out[phases[i][0]]
        row["sent"] += 1
        if seq in received:
            row["received"] += 1
        else:
            row["lost"] += 1
    return out
