"""No cleartext while charon re-routes a trapped connection (issue 21
follow-up, item 1).

``load-conn`` of a connection with ``start_action = trap`` makes charon
remove its trap policies and add them again. With no CHILD_SA up (the first
install, the first install after a block) a packet sent in between matches
no policy and is forwarded in clear. The consumer's own XFRM block policies
beneath charon's (tunnels/strongswan.py ``block_policies``) close that gap.
This test floods both directions between the two LANs while gA and gB go
through the first install and then several block / install cycles, captures
the wire between the gateways, and asserts not one inner packet in clear.
"""

from __future__ import annotations

import contextlib
import os
import signal
import socket
import struct
import subprocess
import threading
import time

import pytest
from kernel_lab import HA, HB, PATTERN, Stream, analyse_pcap, open_socket_in_netns
from strongswan_lab import TID, gateways, key  # noqa: F401 (fixture)

from qkdgate.testing.fakes import RecordingIpsecBackend
from qkdgate.tunnels.consumer import Invalidation
from qkdgate.tunnels.strongswan import StrongswanConsumer

# Opt-in until root-caused: in the 16:41 fresh-clone rehearsal of CI (idle
# host, one VM) gA's IKE_SA stayed CONNECTING under the 3000/s flood and
# vici initiate failed ("establishing CHILD_SA 'lan' failed"); the one control
# run failed the same way, so the test cannot yet tell the gap from a charon
# that never gets its IKE_SA up. It passed once (95 s). test_strongswan.py
# (20 rotations over the same block policies) passed in the same rehearsal.
pytestmark = pytest.mark.skipif(
    os.environ.get("QKDGATE_STRONGSWAN_GAP_TEST") != "1",
    reason="opt-in: QKDGATE_STRONGSWAN_GAP_TEST=1 (flaky under its flood: issue 21)")

CYCLES = 6          # installs after a block, each one a charon re-route
# The control run (evidence that this test sees the gap): with a file
# gap-control.flag beside this one (the lab passes no environment into the
# VM), the consumers' block policies go to an in-memory SPD instead of the
# kernel: what the kernel saw before the fix. It must then FAIL.
CONTROL = os.path.exists(os.path.join(os.path.dirname(__file__), "gap-control.flag"))
RATE = 3000         # datagrams/s each way: a re-route's gap is a few ms


class ClearCapture:
    """tcpdump on the wire bridge of everything but ESP and IKE: the flood's
    ESP would make tcpdump drop frames under TCG, and only a frame in clear
    matters here. ``stop()`` returns the pcap path."""

    FILTER = "ip and not esp and not (udp port 500 or udp port 4500)"

    def __init__(self, wire_ns: str, path: str) -> None:
        self.path = path
        self.proc = subprocess.Popen(
            ["ip", "netns", "exec", wire_ns, "tcpdump", "-i", "br0", "-n", "-U", "-s", "0",
             "-w", path, self.FILTER], stdout=subprocess.DEVNULL, stderr=subprocess.PIPE,
            text=True)
        assert self.proc.stderr is not None
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
        for line in err.splitlines():
            if "dropped by kernel" in line:
                self.dropped = int(line.split()[0])
        return self.path


class Flood:
    """Paced UDP from one LAN host to the other, as fast as the lab allows
    up to ``RATE``; nothing is received: only the wire is looked at."""

    def __init__(self, src_ns: str, src: object, dst: object, port: int) -> None:
        self.sock = open_socket_in_netns(socket.AF_INET, socket.SOCK_DGRAM, src_ns)
        self.sock.bind((str(src), 0))
        self.dst = (str(dst), port)
        self.sent = 0
        self._stop = threading.Event()
        self._t = threading.Thread(target=self._run, daemon=True)

    def start(self) -> Flood:
        self._t.start()
        return self

    def _run(self) -> None:
        t0 = time.monotonic()
        while not self._stop.is_set():
            due = t0 + self.sent / RATE
            now = time.monotonic()
            if due > now:
                time.sleep(min(due - now, 0.005))
                continue
            for _ in range(20):
                with contextlib.suppress(OSError):
                    self.sock.sendto(PATTERN + struct.pack("!Q", self.sent) + b"." * 32, self.dst)
                self.sent += 1

    def stop(self) -> None:
        self._stop.set()
        self._t.join()
        self.sock.close()


def test_no_cleartext_during_first_install_and_installs_after_block(topo, gateways, tmp_path):  # noqa: F811
    a, b = gateways
    if CONTROL:
        for s in (a, b):
            s.c = StrongswanConsumer(s.c.spec, netns=s.charon.netns, xfrm=RecordingIpsecBackend)
    for s in (a, b):
        s.c.setup(time.monotonic())
    cap = ClearCapture(topo.wire, str(tmp_path / "gap.pcap"))
    floods = [Flood(topo.hA, HA, HB, 5301).start(), Flood(topo.hB, HB, HA, 5302).start()]
    # a paced, received stream: proof the tunnel carried traffic between blocks
    probe = Stream(topo.hA, topo.hB, HA, HB, rate=100, port=5303).start()
    t_start = time.monotonic()
    installs = []
    try:
        time.sleep(0.5)
        for g in range(1, CYCLES + 2):
            if g > 1:
                for s in (a, b):
                    assert s.c.invalidate(Invalidation(TID, "policy", True)).blocked
                time.sleep(0.3)
            secret = os.urandom(32)
            t0 = time.monotonic()
            a.c.prepare(key(g, "initiator", secret))
            b.c.prepare(key(g, "responder", secret))
            b.c.install(key(g, "responder", secret))      # a re-route with no CHILD_SA
            rep = a.c.install(key(g, "initiator", secret))
            installs.append(time.monotonic() - t0)
            assert rep.verified, rep
            time.sleep(0.3)
    finally:
        for f in floods:
            f.stop()
        probe.stop(0.5)
        wire = analyse_pcap(cap.stop())
    sent = sum(f.sent for f in floods)
    summary = (f"{CYCLES + 1} installs with no CHILD_SA up (first + {CYCLES} after a block) in "
               f"{time.monotonic() - t_start:.1f} s, {sent} datagrams sent "
               f"({sent / (time.monotonic() - t_start):.0f}/s); install p50 "
               f"{sorted(installs)[len(installs) // 2]:.3f} s; probe stream "
               f"{len(probe.received_set())}/{len(probe.sent_at)} through; wire (non-ESP) "
               f"cleartext {wire.cleartext}, pattern hits {wire.pattern_hits}, "
               f"tcpdump dropped {cap.dropped}")
    print(summary)
    assert len(probe.received_set()) > 100, summary     # the tunnel carried traffic
    assert cap.dropped == 0, summary           # the capture saw every frame
    assert wire.cleartext == 0 and wire.pattern_hits == 0, summary
