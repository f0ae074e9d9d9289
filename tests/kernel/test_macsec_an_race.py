"""The kernel's MACsec AN race, shown on real frames (docs/tunnels.md,
"MACsec: one frame at the AN switch"; tests/kernel/macsec_audit.py).

Two SAs with fixed keys on AN 0 and AN 1 of A's TX SC (both installed at
B), A's ``encodingsa`` toggled between them as fast as netlink allows for
20 s, under two flood pings and a sequenced stream. Nothing is rekeyed, so
a frame that fails B's ICV check can only be one the kernel sealed with one
AN's key and labelled with the other: every stream frame on the wire must
open with its own AN's key or, for the race, with the other's (and then its
datagram was lost); none may open with neither. Then the same flood without
switching: no frame fails.

Opt-in (QKDGATE_KERNEL_DEFECTS=1): the race is rare (3 and 4 frames of
about 33,000 and 52,000 in two lab runs of 2026-12-06; 2 of 11,443 stream
frames in a third), so a run may show none, and scapy opens every stream frame,
which takes minutes under TCG. A fixed kernel would show none forever."""

from __future__ import annotations

import os
import subprocess
import time

import pytest
from kernel_lab import MS_A, MS_B, PATTERN, Capture, MacsecPair, Stream, fixed_session, iter_pcap
from macsec_audit import SaKeys, open_frame, sectag, stream_seq

pytestmark = pytest.mark.skipif(os.environ.get("QKDGATE_KERNEL_DEFECTS") != "1",
                                reason="opt-in: QKDGATE_KERNEL_DEFECTS=1 (a kernel defect, shown)")

# Ethernet + SecTAG with SCI + IPv4 + UDP + the stream's datagram + ICV
STREAM_FRAME = 14 + 16 + 20 + 8 + len(PATTERN) + 8 + 64 + 16
HISTORY = [(1, 0), (2, 1)]            # (generation, AN): generation g's key on AN g - 1


def flood(ns: str, seconds: int) -> list[subprocess.Popen]:
    return [subprocess.Popen(["ip", "netns", "exec", ns, "ping", "-q", "-f", "-s", "64",
                              "-w", str(seconds), "172.16.0.2"], stdout=subprocess.DEVNULL)
            for _ in range(2)]


def counters(pair: MacsecPair) -> tuple[int, int]:
    """B's IN_PKTS_NOT_VALID and IN_PKTS_LATE for A's SC (802.1AE 10.7.9)."""
    st = pair.b.rx_sc_stats("ms0")[pair.sci_a]
    return st.get("IN_PKTS_NOT_VALID", 0), st.get("IN_PKTS_LATE", 0)


def test_encodingsa_switch_seals_a_frame_with_the_other_ans_key(topo, tmp_path):
    pair = MacsecPair(topo, fixed_session(), grace=0.0)
    pair.setup()                                       # generation 1 on AN 0
    pair.b.add_rx_sa("ms0", pair.sci_a, pair._sa("i2r", 1, 2))   # generation 2 on AN 1
    pair.a.add_tx_sa("ms0", pair._sa("i2r", 1, 2))
    bad0, late0 = counters(pair)
    mac = ":".join(f"{b:02x}" for b in pair.sci_a.to_bytes(8, "big")[:6])
    cap = Capture(topo, str(tmp_path / "race.pcap"), bpf=f"ether proto 0x88e5 and ether src {mac}")
    s = Stream(topo.gA, topo.gB, MS_A, MS_B, rate=500).start()
    pings = flood(topo.gA, 22)
    time.sleep(1)
    n, t_end = 0, time.monotonic() + 20
    while time.monotonic() < t_end:
        n += 1
        pair.a.set_encoding_sa("ms0", n % 2)
    pair.a.set_encoding_sa("ms0", 0)
    for p in pings:
        p.wait()
    s.stop()
    cap.stop()
    bad, late = (x - y for x, y in zip(counters(pair), (bad0, late0), strict=True))

    def keys(an: int) -> SaKeys:
        return SaKeys.of(pair.keys("i2r", an, HISTORY[an][0]))

    lost = set(s.lost())
    own = other = 0
    race: list[tuple[int, int, int]] = []               # (datagram, wire AN, PN)
    neither: list[tuple[int, int]] = []
    for f in iter_pcap(cap.path):
        tag = sectag(f)
        if len(f) != STREAM_FRAME or tag is None:
            continue
        if open_frame(f, pair.sci_a, keys(tag.an), stream_seq) is not None:
            own += 1
        elif (seq := open_frame(f, pair.sci_a, keys(1 - tag.an), stream_seq)) is not None:
            other += 1
            race.append((seq, tag.an, tag.pn))
        else:
            neither.append((tag.an, tag.pn))
    print(f"{n} switches, {len(s.sent_at)} datagrams, {own} frames open with their AN's key, "
          f"{other} with the other AN's (the race: {race}), {len(neither)} with neither; "
          f"B counted {bad} not valid and {late} late (pings included), "
          f"cap dropped {cap.dropped}")
    assert not neither, neither
    assert own >= len(s.sent_at) - len(lost) and cap.dropped == 0
    assert all(seq in lost for seq, _, _ in race), (race, "a race frame was delivered")
    # B drops a race frame as not valid (its ICV), or as late before checking
    # the ICV when the frame's PN, the other SA's, is below this SA's replay
    # window (10.6.2; both SAs here keep counting, unlike a rekey's fresh SA)
    assert bad + late >= other, (bad, late, race)
    assert bad > 0 or other > 0, "the race did not show in this run"

    pings = flood(topo.gA, 5)                          # the control: no switching
    bad0, _ = counters(pair)
    for p in pings:
        p.wait()
    assert counters(pair)[0] == bad0
