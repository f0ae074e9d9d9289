"""Kernel test: qkdgate keys real WireGuard (issue 21 items 2 and 4).

Two gateways run WireGuard from wg-quick (docs/consumers.md's snippet);
qkdgate's WireGuard consumer sets each generation's PSK through its own
netlink code, in the peer protocol's order (initiator inbound, responder
inbound, responder outbound, initiator outbound). With 100 datagrams/s both
ways over the traffic device, 20 rotations lose nothing; after every rotation
both kernels hold the generation's key (read back with ``wg``, a second
implementation), it differs from the last one, a forced handshake on the
probe device succeeds, and one with a mismatched PSK fails. A policy block
stops traffic both ways within the bound docs/consumers.md states, and after
SIGKILL of the process holding the tunnels, ``qkdgate failsafe`` replaces the
PSK and empties the allowed IPs. Figures go to stdout (-s) for the notes.
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
from wireguard_lab import WgLink, WgSide, genkey, sh

from qkdgate.keymix import schedule

HERE = os.path.dirname(__file__)
ROTATIONS = 20
RATE = 100


@pytest.fixture
def links(topo, tmp_path):
    keys = [genkey() for _ in range(4)]
    main = WgLink("wgq0", 51820, "10.9.0", WgSide(topo.gA, *keys[0]), WgSide(topo.gB, *keys[1]))
    probe = WgLink("wgq1", 51821, "10.9.1", WgSide(topo.gA, *keys[2]), WgSide(topo.gB, *keys[3]))
    try:
        yield main.up(str(tmp_path)), probe.up(str(tmp_path))
    finally:
        main.down()
        probe.down()


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


def test_20_rotations_under_traffic_fresh_handshakes_block_and_recovery(links):
    main, probe = links
    for link in links:
        link.consumer_tunnels()
        for t in link.tunnels.values():
            t.setup(time.monotonic())
        # fail closed from the start: random PSK, no allowed IPs
        assert link.allowed(link.a) == "(none)" and link.allowed(link.b) == "(none)"
    assert not main.ping(wait=1)
    rotate(links, 1)
    assert main.ping(count=3), "no traffic after the first generation"

    fwd = Stream(main.a.ns, main.b.ns, main.addr_a, main.addr_b, rate=RATE, port=5101).start()
    rev = Stream(main.b.ns, main.a.ns, main.addr_b, main.addr_a, rate=RATE, port=5102).start()
    time.sleep(0.5)
    durations, windows, psks = [], [], {expected_psk(main, 1)}
    handshakes = failed_mismatch = 0
    for g in range(2, 2 + ROTATIONS):
        d, w = rotate(links, g)
        durations.append(d)
        windows.append(w)
        for link in links:      # both kernels hold generation g's key, read back by `wg`
            assert link.psk(link.a) == link.psk(link.b) == expected_psk(link, g)
        assert expected_psk(main, g) not in psks
        psks.add(expected_psk(main, g))
        # a fresh handshake under the new PSK succeeds ...
        before = probe.last_handshake(probe.a) or 0.0
        probe.drop_session(probe.a)
        assert probe.ping(wait=2), f"generation {g}: fresh handshake failed"
        assert (probe.last_handshake(probe.a) or 0.0) > before
        handshakes += 1
        # ... and one with a mismatched PSK does not
        wrong = base64.b64encode(os.urandom(32)).decode()
        sh(probe.b.ns, "wg", "set", probe.name, "peer", probe.a.pub, "preshared-key",
           "/dev/stdin", input=wrong + "\n")
        before = probe.last_handshake(probe.a)
        probe.drop_session(probe.a)
        assert not probe.ping(wait=1), f"generation {g}: handshake with a wrong PSK passed"
        assert probe.last_handshake(probe.a) == before
        failed_mismatch += 1
    time.sleep(0.5)
    fwd.stop()
    rev.stop()
    for name, st in (("A->B", fwd), ("B->A", rev)):
        lost = st.lost()
        print(f"wireguard {name}: sent {len(st.sent_at)}, lost {len(lost)}, "
              f"send errors {st.send_errors}, rcvbuf errors {st.rcvbuf_errors}")
        assert not lost and not st.send_errors
    q = statistics.quantiles(durations, n=100)
    qw = statistics.quantiles(windows, n=100)
    print(f"wireguard rotations {ROTATIONS}: rotation (4 installs, 2 links) p50 "
          f"{statistics.median(durations) * 1000:.1f} ms p99 {q[98] * 1000:.1f} ms; "
          f"PSK mismatch window p50 {statistics.median(windows) * 1000:.1f} ms p99 "
          f"{qw[98] * 1000:.1f} ms; fresh handshakes {handshakes}, mismatched refused "
          f"{failed_mismatch}")

    # a policy block on ONE gateway stops traffic both ways at once
    fwd = Stream(main.a.ns, main.b.ns, main.addr_a, main.addr_b, rate=RATE, port=5103).start()
    rev = Stream(main.b.ns, main.a.ns, main.addr_b, main.addr_a, rate=RATE, port=5104).start()
    time.sleep(1.0)
    assert fwd.received_set() and rev.received_set()
    t_block = time.monotonic()
    main.tunnels["A"].block(t_block, "policy block (test)")
    t_done = time.monotonic()
    time.sleep(1.0)
    fwd.stop(drain=0.5)
    rev.stop(drain=0.5)
    after = []
    for st in (fwd, rev):
        got = st.received_set()
        assert not [s for s in got if st.sent_at[s] >= t_done], "traffic after the block"
        after.append(max(st.sent_at[s] for s in got) - t_block)
    print(f"wireguard block: netlink {1000 * (t_done - t_block):.1f} ms; last datagram "
          f"through sent {1000 * max(after):.1f} ms after the block began")
    assert max(after) <= t_done - t_block + 0.001
    assert main.allowed(main.a) == "(none)"
    # recovery: the next generation restores the allowed IPs and traffic
    rotate(links, 2 + ROTATIONS)
    assert main.allowed(main.a) == f"{main.addr_b}/32"
    assert main.ping(count=2)


def test_failsafe_invalidates_the_psk_after_sigkill(topo, links, tmp_path):
    main, _probe = links
    state = str(tmp_path / "tunnels.json")
    args = [sys.executable, os.path.join(HERE, "wireguard_stub.py"),
            json.dumps({"a": [main.a.ns, main.a.pub], "b": [main.b.ns, main.b.pub],
                        "name": main.name, "state": state})]
    p = subprocess.Popen(args, stdout=subprocess.PIPE, text=True)
    line = p.stdout.readline()
    assert line.startswith("READY"), f"stub failed: {line!r} rc={p.poll()}"
    assert main.psk(main.a) == main.psk(main.b) == expected_psk(main, 1)
    assert main.ping(count=2)
    p.send_signal(signal.SIGKILL)
    p.wait()
    # nothing bounds a PSK: after the kill WireGuard would run on with it
    assert main.psk(main.a) == expected_psk(main, 1) and main.ping()
    t0 = time.monotonic()
    r = subprocess.run([sys.executable, "-m", "qkdgate", "failsafe", "--state", state],
                       capture_output=True, text=True, timeout=120)
    took = time.monotonic() - t0
    assert r.returncode == 0, r.stdout + r.stderr
    print(f"wireguard failsafe after SIGKILL: {took * 1000:.0f} ms\n{r.stdout}")
    for side in (main.a, main.b):
        psk = main.psk(side)
        assert psk not in (expected_psk(main, 1), "(none)")
        assert main.allowed(side) == "(none)"
    assert main.psk(main.a) != main.psk(main.b)
    assert not main.ping(wait=1)
