"""Kernel test: qkdgate keys real WireGuard (issue 21 items 2 and 4).

Two gateways run WireGuard (the traffic device from wg-quick and
docs/consumers.md's snippet); qkdgate's WireGuard consumer sets each
generation's PSK through its own netlink code, in the peer protocol's order
(initiator inbound, responder inbound, responder outbound, initiator
outbound). With 100 datagrams/s both ways over the traffic device, 20
rotations lose nothing; after every rotation both kernels hold the
generation's key (read back with ``wg``, a second implementation) and it
differs from the last, a forced handshake on the probe device succeeds, and
(every rotation) one with a mismatched PSK fails. A policy block on one
gateway stops traffic both ways within the bound docs/consumers.md states;
the next generation restores it. After SIGKILL of a process holding a third
link's tunnels, ``qkdgate failsafe`` replaces the PSK and empties the allowed
IPs. Figures are printed for the notes (run with -s to see them).
"""

from __future__ import annotations

import base64
import json
import os
import signal
import statistics
import subprocess
import sys
import time

import pytest
from kernel_lab import fixed_session
from kernel_traffic import Stream
from wireguard_lab import Probe, WgLink, WgSide, genkey, sh, wg_dump

from qkdgate.keymix import schedule

HERE = os.path.dirname(__file__)
ROTATIONS = 20
RATE = 100


@pytest.fixture(scope="module")
def lab(topo, tmp_path_factory):
    tmp = str(tmp_path_factory.mktemp("wg"))
    k = [genkey() for _ in range(6)]
    main = WgLink("wgq0", 51820, "10.9.0", WgSide(topo.gA, *k[0]), WgSide(topo.gB, *k[1]))
    probe = WgLink("wgq1", 51821, "10.9.1", WgSide(topo.gA, *k[2]), WgSide(topo.gB, *k[3]))
    kill = WgLink("wgq2", 51822, "10.9.2", WgSide(topo.gA, *k[4]), WgSide(topo.gB, *k[5]))
    stub = None
    try:
        main.up_wg_quick(tmp)
        probe.up_wg_set()
        kill.up_wg_set()
        # the process to be SIGKILLed keys wgq2 meanwhile (its start-up overlaps the rotations)
        state = os.path.join(tmp, "tunnels.json")
        stub = subprocess.Popen(
            [sys.executable, os.path.join(HERE, "wireguard_stub.py"),
             json.dumps({"a": [kill.a.ns, kill.a.pub], "b": [kill.b.ns, kill.b.pub],
                         "name": kill.name, "net": kill.net, "state": state})],
            stdout=subprocess.PIPE, text=True)
        yield {"main": main, "probe": probe, "kill": kill, "stub": stub, "state": state}
    finally:
        if stub is not None and stub.poll() is None:
            stub.kill()
            stub.wait()
        for link in (main, probe, kill):
            link.down()


def rotate(links, g: int) -> tuple[float, float]:
    """One generation on every link, in the protocol's order. Returns the
    whole rotation's duration and the window in which the two gateways'
    PSKs differ (responder install to initiator install)."""
    s = fixed_session(b"wg" + g.to_bytes(4, "big"))
    now = time.monotonic()
    t0 = time.perf_counter()
    for link in links:
        link.tunnels["A"].install_inbound(g, s, "initiator", 0, now)
    for link in links:
        link.tunnels["B"].install_inbound(g, s, "responder", 0, now)
    t_r = time.perf_counter()
    for link in links:
        link.tunnels["B"].install_outbound(g, s, "responder", 0, now)
    for link in links:
        link.tunnels["A"].install_outbound(g, s, "initiator", 0, now)
    t1 = time.perf_counter()
    for link in links:
        for t in link.tunnels.values():
            t.retire(g - 1, now)
    return t1 - t0, t1 - t_r


def expected_psk(link: WgLink, g: int) -> str:
    s = fixed_session(b"wg" + g.to_bytes(4, "big"))
    raw = schedule.consumer_key(s, "wireguard", f"wg-{link.name}", g).reveal()
    return base64.b64encode(raw).decode()


def read_back(links) -> dict[tuple[str, str], dict[str, str]]:
    a, b = wg_dump(links[0].a.ns), wg_dump(links[0].b.ns)
    return {(link.name, side): dump[link.name] for link in links
            for side, dump in (("A", a), ("B", b))}


def test_20_rotations_under_traffic_fresh_handshakes_block_and_recovery(lab):
    main, probe = lab["main"], lab["probe"]
    links = [main, probe]
    for link in links:
        link.consumer_tunnels()
        for t in link.tunnels.values():
            t.setup(time.monotonic())
    # fail closed from the start: random PSK, no allowed IPs, nothing passes
    assert {v["allowed"] for v in read_back(links).values()} == {"(none)"}
    p_main, p_probe = Probe(main, 5200), Probe(probe, 5201)
    assert not p_main.through(0.5)
    rotate(links, 1)
    assert p_main.through(5.0), "no traffic after the first generation"

    fwd = Stream(main.a.ns, main.b.ns, main.addr_a, main.addr_b, rate=RATE, port=5101).start()
    rev = Stream(main.b.ns, main.a.ns, main.addr_b, main.addr_a, rate=RATE, port=5102).start()
    time.sleep(0.5)
    durations, windows, seen = [], [], {expected_psk(main, 1)}
    handshakes = refused = 0
    t_start = time.monotonic()
    for g in range(2, 2 + ROTATIONS):
        d, w = rotate(links, g)
        durations.append(d)
        windows.append(w)
        got = read_back(links)     # both kernels hold generation g's key, as `wg` reads it
        for link in links:
            want = expected_psk(link, g)
            assert got[(link.name, "A")]["psk"] == got[(link.name, "B")]["psk"] == want
        assert expected_psk(main, g) not in seen
        seen.add(expected_psk(main, g))
        # a fresh handshake under the new PSK succeeds ...
        before = probe.last_handshake(probe.a) or 0.0
        probe.drop_session(probe.a)
        assert p_probe.through(5.0), f"generation {g}: fresh handshake failed"
        assert (probe.last_handshake(probe.a) or 0.0) > before
        handshakes += 1
        # ... and one with a mismatched PSK does not
        wrong = base64.b64encode(os.urandom(32)).decode()
        sh(probe.b.ns, "wg", "set", probe.name, "peer", probe.a.pub, "preshared-key",
           "/dev/stdin", input=wrong + "\n")
        before = probe.last_handshake(probe.a)
        probe.drop_session(probe.a)
        assert not p_probe.through(0.7), f"generation {g}: a wrong PSK handshook"
        assert probe.last_handshake(probe.a) == before
        refused += 1
    elapsed = time.monotonic() - t_start
    time.sleep(0.3)
    fwd.stop(drain=0.5)
    rev.stop(drain=0.5)
    for name, st in (("A->B", fwd), ("B->A", rev)):
        lost = st.lost()
        print(f"wireguard {name}: sent {len(st.sent_at)}, lost {len(lost)}, "
              f"send errors {st.send_errors}, rcvbuf errors {st.rcvbuf_errors}")
        assert not lost and not st.send_errors
    q, qw = statistics.quantiles(durations, n=100), statistics.quantiles(windows, n=100)
    print(f"wireguard: {ROTATIONS} rotations in {elapsed:.1f} s; rotation (2 links x 4 "
          f"installs, each set + read back) p50 {statistics.median(durations) * 1e3:.1f} ms "
          f"p99 {q[98] * 1e3:.1f} ms; PSKs differ between the gateways for p50 "
          f"{statistics.median(windows) * 1e3:.1f} ms p99 {qw[98] * 1e3:.1f} ms; fresh "
          f"handshakes {handshakes}/{ROTATIONS}, mismatched refused {refused}/{ROTATIONS}")

    # a policy block on ONE gateway stops traffic both ways at once
    fwd = Stream(main.a.ns, main.b.ns, main.addr_a, main.addr_b, rate=RATE, port=5103).start()
    rev = Stream(main.b.ns, main.a.ns, main.addr_b, main.addr_a, rate=RATE, port=5104).start()
    time.sleep(1.0)
    t_block = time.monotonic()
    main.tunnels["A"].block(t_block, "policy block (test)")
    t_done = time.monotonic()
    time.sleep(1.0)
    fwd.stop(drain=0.5)
    rev.stop(drain=0.5)
    after = []
    for st in (fwd, rev):
        got = st.received_set()
        assert got, "no traffic before the block"
        assert not [s for s in got if st.sent_at[s] >= t_done], "traffic after the block"
        after.append(max(st.sent_at[s] for s in got) - t_block)
    print(f"wireguard block: one netlink request, {1e3 * (t_done - t_block):.1f} ms; last "
          f"datagram through was sent {1e3 * max(after):.1f} ms after the block began")
    assert wg_dump(main.a.ns)[main.name]["allowed"] == "(none)"
    # recovery: the next generation restores the allowed IPs and the traffic
    rotate(links, 2 + ROTATIONS)
    assert wg_dump(main.a.ns)[main.name]["allowed"] == f"{main.addr_b}/32"
    assert p_main.through(5.0)
    p_main.close()
    p_probe.close()


def test_failsafe_invalidates_the_psk_after_sigkill(lab):
    kill, stub = lab["kill"], lab["stub"]
    line = stub.stdout.readline()
    assert line.startswith("READY"), f"stub failed: {line!r} rc={stub.poll()}"
    p = Probe(kill, 5202)
    want = expected_psk(kill, 1)
    assert {wg_dump(ns)[kill.name]["psk"] for ns in (kill.a.ns, kill.b.ns)} == {want}
    assert p.through(5.0)
    stub.send_signal(signal.SIGKILL)
    stub.wait()
    # nothing bounds a PSK: after the kill WireGuard would run on with it
    assert wg_dump(kill.a.ns)[kill.name]["psk"] == want and p.through(2.0)
    t0 = time.monotonic()
    r = subprocess.run([sys.executable, "-m", "qkdgate", "failsafe", "--state", lab["state"]],
                       capture_output=True, text=True, timeout=120)
    took = time.monotonic() - t0
    assert r.returncode == 0, r.stdout + r.stderr
    print(f"wireguard failsafe after SIGKILL: {took:.1f} s (with Python start-up)\n{r.stdout}")
    psks = set()
    for ns in (kill.a.ns, kill.b.ns):
        peer = wg_dump(ns)[kill.name]
        assert peer["psk"] not in (want, "(none)") and peer["allowed"] == "(none)"
        psks.add(peer["psk"])
    assert len(psks) == 2
    assert not p.through(1.0)
    p.close()
