"""Kernel test 4: fail closed when the daemon dies.

A child process installs the tunnel through qkdgate's backends and is
SIGKILLed, so nobody rekeys or cleans up. IPsec: traffic survives the kill
(the keys are in the kernel) until the SA's hard lifetime, then stops, and
not one cleartext packet reaches the wire. Then, as systemd's ExecStopPost
would, `python -m qkdgate failsafe` stops IPsec and MACsec at once while
the blocking policies stay."""

from __future__ import annotations

import contextlib
import json
import os
import signal
import subprocess
import sys
import time

import pytest
from kernel_lab import HA, HB, MS_A, MS_B, Capture, Stream, analyse_pcap

from qkdgate.interfaces import Direction
from qkdgate.tunnels.macsec import MacsecBackend
from qkdgate.tunnels.xfrm import XfrmBackend

HERE = os.path.dirname(__file__)


@pytest.fixture
def ends():
    """Streams and stand-ins end with the test, also when it fails: a failed
    test once left its stream's receiver bound to hB:5001 and its stub
    alive, and the next test died of EADDRINUSE (issue 10, CPU-hog run)."""
    with contextlib.ExitStack() as stack:
        yield stack


def stream(ends, *args, **kw) -> Stream:
    s = Stream(*args, **kw).start()
    ends.callback(s.stop, drain=0)
    return s


def start_stub(topo, kind: str, state: str, hard: int = 0, ends=None
               ) -> tuple[subprocess.Popen, float]:
    args = [sys.executable, os.path.join(HERE, "daemon_stub.py"), kind, json.dumps(topo.all), state]
    if hard:
        args.append(str(hard))
    p = subprocess.Popen(args, stdout=subprocess.PIPE, text=True)
    if ends is not None:
        ends.callback(kill, p)
    line = p.stdout.readline()
    assert line.startswith("READY"), f"stub failed: {line!r} rc={p.poll()}"
    return p, float(line.split()[1])


def kill(p: subprocess.Popen) -> float:
    if p.poll() is None:
        p.send_signal(signal.SIGKILL)
    p.wait()
    if p.stdout is not None:
        p.stdout.close()
    return time.time()


def failsafe(state: str) -> str:
    r = subprocess.run([sys.executable, "-m", "qkdgate", "failsafe", "--state", state],
                       capture_output=True, text=True, timeout=120)
    assert r.returncode == 0, r.stdout + r.stderr
    return r.stdout


def wall_to_mono(t: float) -> float:
    return time.monotonic() - (time.time() - t)


def sas_added(topo) -> list[int]:
    """The kernel's add_time (wall seconds) of every keyed SA in both gateways."""
    added = []
    for ns in (topo.gA, topo.gB):
        be = XfrmBackend(ns)
        added += [st.add_time for st in be.list_sas() if st.aead]
        be.close()
    assert len(added) == 4, added       # one tunnel: two SAs on each gateway
    return added


def policies_kept(topo) -> None:
    for ns in (topo.gA, topo.gB):
        be = XfrmBackend(ns)
        pols = be.list_policies()
        assert {p.direction for p in pols} == {Direction.IN, Direction.OUT, Direction.FWD}
        assert all(p.template is not None and not p.template.optional for p in pols)
        assert be.list_sas() == []
        be.close()


def test_ipsec_hard_lifetime_stops_traffic_after_sigkill(topo, tmp_path, ends):
    # 20 s: with a second VM on the 2-core host the guest took 10 s from the
    # SAs' add_time to the kill, so 10 s expired before the kill
    hard = 20
    # the capture first: tcpdump takes seconds to start on a loaded host, and
    # started after the stub it ate the SAs' 6 s before the kill (issue 10)
    cap = Capture(topo, str(tmp_path / "kill.pcap"))
    stub, _ = start_stub(topo, "ipsec", str(tmp_path / "tunnels.json"), hard, ends)
    # The kernel's hard lifetime is the backstop. It counts from each SA's own
    # add_time (whole wall-clock seconds, read back from the kernel), not from
    # the stub's READY line: a starved stub printed READY seconds after the
    # kernel added its SAs, and a deadline dated from READY put the test's
    # survival window after the real expiry (0 of 180 in a CPU-hog run).
    added = sas_added(topo)
    earliest = wall_to_mono(min(added) + hard)           # no SA expires before this
    deadline = wall_to_mono(max(added) + 1 + hard) + 1.5  # all have (1 s timer resolution)
    s = stream(ends, topo.hA, topo.hB, HA, HB, rate=200)
    # Kill once the stream flows through the SAs, not after a fixed pause: a
    # starved guest took seconds to start the sender, and a fixed 6 s lifetime
    # was nearly used up before the kill (22 and 29 of > 50 in lab runs).
    until = time.monotonic() + hard / 2
    while s.received_since(0) < 20 and time.monotonic() < until:
        time.sleep(0.05)
    assert s.received_since(0) >= 20, "the stream never flowed through the SAs"
    t_kill = wall_to_mono(kill(stub))
    assert t_kill + 1.0 < earliest, ("the guest was too slow to kill the stub before the "
                                     f"SAs' expiry ({earliest - t_kill:.1f} s left)")
    time.sleep(1.0)
    window = [i for i, t in enumerate(list(s.sent_at))
              if t_kill + 0.1 <= t < min(t_kill + 1.0, earliest - 0.2)]
    time.sleep(max(0.0, deadline - time.monotonic()))
    time.sleep(1.5)
    s.stop(drain=0.5)
    rep = analyse_pcap(cap.stop())
    # what the guest sent in the second after the kill still arrives (not a
    # fixed rate: a starved sender sends fewer than 200/s). Counted once the
    # stream stopped, not 1 s after the kill: a starved receiver thread had
    # read only 102 of 147 by then (issue 10, CPU-hog run), all sent and
    # delivered under the SAs the dead stub left.
    got = s.received_set()
    survived = sum(1 for i in window if i in got)
    assert len(window) >= 10 and survived >= 0.8 * len(window), \
        ("traffic should survive the daemon until expiry", len(window), survived)
    after = s.received_since(deadline)
    sent_after = sum(1 for t in s.sent_at if t >= deadline)
    assert sent_after > 50 and after == 0, (sent_after, after)   # 200/s, starved: fewer
    assert rep.cleartext == 0 and rep.pattern_hits == 0 and rep.esp > 0, rep
    policies_kept(topo)


def test_failsafe_stops_ipsec_at_once_after_sigkill(topo, tmp_path, ends):
    state = str(tmp_path / "tunnels.json")
    stub, _ = start_stub(topo, "ipsec", state, 3600, ends)
    with open(state) as f:
        reg = json.load(f)
    assert set(reg["namespaces"]) == {topo.gA, topo.gB}
    cap = Capture(topo, str(tmp_path / "fs.pcap"))
    s = stream(ends, topo.hA, topo.hB, HA, HB, rate=200)
    time.sleep(0.5)
    t_kill = wall_to_mono(kill(stub))
    time.sleep(1.0)
    assert s.received_since(t_kill + 0.1) > 50
    out = failsafe(state)
    t_fs = time.monotonic()
    time.sleep(1.5)
    s.stop(drain=0.5)
    rep = analyse_pcap(cap.stop())
    assert "deleted 2 SA(s)" in out, out
    assert s.received_since(t_fs + 0.05) == 0
    assert rep.cleartext == 0 and rep.pattern_hits == 0, rep
    policies_kept(topo)


def test_failsafe_stops_macsec_after_sigkill(topo, tmp_path, ends):
    state = str(tmp_path / "tunnels.json")
    stub, _ = start_stub(topo, "macsec", state, ends=ends)
    cap = Capture(topo, str(tmp_path / "ms-fs.pcap"))
    s = stream(ends, topo.gA, topo.gB, MS_A, MS_B, rate=200)
    time.sleep(0.5)
    t_kill = wall_to_mono(kill(stub))
    time.sleep(1.0)
    assert s.received_since(t_kill + 0.1) > 50, "MACsec SAs have no lifetime: traffic goes on"
    out = failsafe(state)
    t_fs = time.monotonic()
    time.sleep(1.5)
    s.stop(drain=0.5)
    rep = analyse_pcap(cap.stop())
    assert "taken down" in out, out
    assert s.received_since(t_fs + 0.05) == 0
    assert rep.cleartext == 0 and rep.pattern_hits == 0 and rep.macsec > 0, rep
    for ns in (topo.gA, topo.gB):
        be = MacsecBackend(ns)
        assert be.tx_sas("ms0") and not any(st.active for st in be.tx_sas("ms0"))
        be.close()


def test_failsafe_deletes_the_spi_a_dead_exchange_reserved(topo, tmp_path, ends):
    """A daemon killed mid-exchange (or after losing a collision) leaves the
    inbound SPI it reserved: a keyless larval SA the kernel keeps for
    net.core.xfrm_acq_expires (30 s). It carries the tunnel's inbound reqid
    (ALLOCSPI's xfrm_usersa_info.reqid), so failsafe deletes it with the rest
    and gA holds no SA at all (issue 10: the systemd SIGKILL case saw a
    reqid-0 larval SA survive failsafe)."""
    from kernel_lab import GA, GB, sysctl

    from qkdgate.tunnels.netlink import in_netns
    from qkdgate.tunnels.state import TunnelRegistry

    # The kernel drops a larval SA net.core.xfrm_acq_expires (30 s, per
    # namespace) after ALLOCSPI; in a starved lab VM failsafe's Python start
    # took longer, the kernel had already dropped it ("deleted 2 SA(s)":
    # issue 10, CPU-hog run). Here it lives until failsafe has run.
    with in_netns(topo.gA), open("/proc/sys/net/core/xfrm_acq_expires") as f:
        acq = f.read().strip()
    sysctl(topo.gA, "net/core/xfrm_acq_expires", "3600")
    ends.callback(sysctl, topo.gA, "net/core/xfrm_acq_expires", acq)
    state = str(tmp_path / "tunnels.json")
    stub, _ = start_stub(topo, "ipsec", state, 3600, ends)
    be = XfrmBackend(topo.gA, registry=TunnelRegistry(state))
    spi = be.allocate_spi(GB, GA, reqid=0x10000)   # kernel_lab.IpsecPair's inbound reqid
    larval = [st for st in be.list_sas() if st.sa_id.spi == spi]
    be.close()
    assert [(st.reqid, st.aead) for st in larval] == [(0x10000, "")], larval
    kill(stub)
    out = failsafe(state)
    assert "deleted 3 SA(s) (1 reserved SPI(s) never keyed)" in out, out
    policies_kept(topo)     # no SA left in either namespace, larval included
