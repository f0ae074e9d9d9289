"""Issue 19: the manager sends the kernel operations of many tunnels that
share one IPsec backend in pipelined batches (IpsecBackend.apply), and
setup/teardown read the kernel once for all of them. The recording fake
models a batch as its ops applied in order, each failing on its own, so
these tests check the same make-before-break and fail-closed outcomes as
the one-at-a-time path, plus how many batches and dumps it took."""

import errno
import ipaddress
import logging

import pytest
from tunnel_helpers import Prov, Schedule, Session

from qkdgate.errors import TunnelError
from qkdgate.interfaces import Direction, PolicyAction
from qkdgate.testing.fakes import RecordingIpsecBackend
from qkdgate.tunnels.events import SaInstalled, SaRetired, SaSwitched, TunnelOpFailed
from qkdgate.tunnels.ipsec_tunnel import IpsecTunnelSpec, ipsec_tunnel
from qkdgate.tunnels.manager import TunnelManager
from qkdgate.tunnels.timers import Lifetimes
from qkdgate.tunnels.tunnel import GenerationRefused, TunnelPolicy

A, B = ipaddress.ip_address("192.0.2.1"), ipaddress.ip_address("192.0.2.2")
LT = Lifetimes(soft_seconds=50, hard_seconds=60, grace_seconds=2)
N = 5


class CountingBackend(RecordingIpsecBackend):
    """Counts the kernel dumps (list_policies / list_sas)."""

    def __init__(self):
        super().__init__()
        self.dumps = 0

    def list_policies(self):
        self.dumps += 1
        return super().list_policies()

    def list_sas(self, reqid_min=0, reqid_max=0xFFFFFFFF):
        self.dumps += 1
        return super().list_sas(reqid_min, reqid_max)


class FailingInstall(CountingBackend):
    """Refuses to install the SA with SPI ``bad`` (as the kernel would an
    SPI already taken: EEXIST)."""

    def __init__(self, bad):
        super().__init__()
        self.bad = bad

    def _install(self, op, direction, sa_id, spec):
        if sa_id.spi == self.bad:
            raise TunnelError(op, errno.EEXIST, "injected")
        super()._install(op, direction, sa_id, spec)


def manager(backend, n=N, events=None, policies=None):
    mgr = TunnelManager()
    for i in range(n):
        spec = IpsecTunnelSpec(f"t{i}", A, B, (ipaddress.ip_network(f"10.1.{i}.0/24"),),
                               (ipaddress.ip_network(f"10.2.{i}.0/24"),),
                               reqid_base=0x1000 + 64 * i)
        policy = (policies or {}).get(i, TunnelPolicy.HYBRID_REQUIRED)
        mgr.add(ipsec_tunnel(spec, backend, policy=policy, lifetimes=LT, schedule=Schedule(),
                             emit=events.append if events is not None else None))
    mgr.setup(0.0)
    return mgr


def spis(mgr, base):
    return {tid: base + i for i, tid in enumerate(mgr.tunnels)}


def test_setup_of_many_tunnels_reads_the_kernel_once():
    be = CountingBackend()
    mgr = manager(be, n=20)
    assert be.dumps == 2                    # one policy dump + one SA dump, not 2 per tunnel
    assert len(be.policies) == 20 * 3 and all(t.state == "blocked" for t in mgr.tunnels.values())


def test_teardown_of_many_tunnels_reads_the_kernel_once_and_removes_every_policy():
    be = CountingBackend()
    mgr = manager(be, n=20)
    be.dumps = 0
    mgr.shutdown(teardown=True)
    assert be.dumps == 2 and be.policies == {}
    assert all(t.state == "down" for t in mgr.tunnels.values())


def test_a_rekey_of_all_tunnels_is_three_batches_and_a_retire_one():
    events = []
    be = CountingBackend()
    mgr = manager(be, events=events)
    s1, s2 = Session(b"g1"), Session(b"g2")
    mgr.install_inbound(1, s1, "initiator", spis(mgr, 0xC0001000), 0.0)
    mgr.install_outbound(1, s1, "initiator", spis(mgr, 0xD0001000), 0.0)
    assert be.batches == [N, N, N]          # inbound SAs; outbound SAs; policy switches
    be.batches.clear()
    mgr.install_inbound(2, s2, "initiator", spis(mgr, 0xC0002000), 1.0)
    mgr.install_outbound(2, s2, "initiator", spis(mgr, 0xD0002000), 1.0)
    # ... and the previous outbound SAs go in a fourth, right after the switches
    assert be.batches == [N, N, N, N]
    be.batches.clear()
    mgr.retire(list(mgr.tunnels), 1, 3.0)
    assert be.batches == [N]                # generation 1's inbound SAs, after the grace
    assert sorted(sa.sa_id.spi for sa in be.sas.values()) == sorted(
        [*spis(mgr, 0xC0002000).values(), *spis(mgr, 0xD0002000).values()])
    for t in mgr.tunnels.values():
        (out,) = [p for p in be.policies.values()
                  if p.direction is Direction.OUT and p.selector.src.overlaps(
                      t.driver.spec.local_nets[0])]
        assert out.action is PolicyAction.ALLOW and out.template.reqid == \
            t.active.outbound.reqid
        assert list(t.generations) == [2]
    kinds = [type(e) for e in events]
    assert kinds.count(SaInstalled) == 2 * N and kinds.count(SaSwitched) == 2 * N
    assert kinds.count(SaRetired) == N


def test_an_inbound_failure_in_the_batch_removes_what_the_batch_installed():
    bad = 0xC0001002
    events = []
    be = FailingInstall(bad)
    mgr = manager(be, events=events)
    with pytest.raises(TunnelError, match="EEXIST"):
        mgr.install_inbound(1, Session(b"g1"), "initiator", spis(mgr, 0xC0001000), 0.0)
    assert be.sas == {}                      # all or nothing, as one at a time
    assert all(1 not in t.generations for t in mgr.tunnels.values())
    failed = [e for e in events if isinstance(e, TunnelOpFailed)]
    assert [e.tunnel for e in failed] == ["t2"]


def test_an_outbound_failure_fails_that_tunnel_closed_and_the_others_switch():
    bad = 0xD0001003
    be = FailingInstall(bad)
    mgr = manager(be)
    s1 = Session(b"g1")
    mgr.install_inbound(1, s1, "initiator", spis(mgr, 0xC0001000), 0.0)
    with pytest.raises(TunnelError, match="EEXIST"):
        mgr.install_outbound(1, s1, "initiator", spis(mgr, 0xD0001000), 0.0)
    for i, t in enumerate(mgr.tunnels.values()):
        outs = [p for p in be.policies.values() if p.direction is Direction.OUT
                and p.selector.src == t.driver.spec.local_nets[0]]
        if i == 3:    # never switched: still the fail-closed BLOCK, no outbound SA
            assert outs[0].action is PolicyAction.BLOCK and t.state == "blocked"
            assert t.generations[1].outbound is None
        else:
            assert outs[0].action is PolicyAction.ALLOW and t.state == "up"
    assert bad not in {sa.sa_id.spi for sa in be.sas.values()}


def test_a_failed_policy_switch_removes_the_new_outbound_sa_of_that_tunnel_only():
    class FailingSwitch(CountingBackend):
        def switch_outbound(self, policy):
            if policy.selector.src == ipaddress.ip_network("10.1.1.0/24"):
                raise TunnelError("switch_outbound", errno.ENOMEM, "injected")
            super().switch_outbound(policy)

    be = FailingSwitch()
    mgr = manager(be)
    s1 = Session(b"g1")
    mgr.install_inbound(1, s1, "initiator", spis(mgr, 0xC0001000), 0.0)
    with pytest.raises(TunnelError, match="ENOMEM"):
        mgr.install_outbound(1, s1, "initiator", spis(mgr, 0xD0001000), 0.0)
    outbound = {sa.sa_id.spi for sa in be.sas.values() if sa.direction == "out"}
    assert 0xD0001001 not in outbound and len(outbound) == N - 1
    assert mgr.tunnels["t1"].state == "blocked" and mgr.tunnels["t0"].state == "up"


def test_a_tunnel_refusing_by_policy_is_skipped_and_the_others_batch():
    be = CountingBackend()
    mgr = manager(be, policies={0: TunnelPolicy.HYBRID_REQUIRED})
    no_qkd = Session(b"g1", Prov(qkd_key_ids=()))
    mgr.tunnels["t1"].policy = TunnelPolicy.PQC_FALLBACK
    mgr.install_inbound(1, no_qkd, "initiator", spis(mgr, 0xC0001000), 0.0)
    assert be.batches == [1]        # only t1 accepts a generation without QKD
    assert [sa.sa_id.spi for sa in be.sas.values()] == [0xC0001001]
    with pytest.raises(GenerationRefused):
        mgr.install_inbound(2, no_qkd, "initiator", {"t0": 0xC0003000}, 0.0)


def test_a_rekey_logs_nothing_per_tunnel_at_info_and_the_details_at_debug(caplog):
    """Issue 19: at INFO a rekey costs one line per exchange (the peer's
    'generation N established'), none per tunnel; the details stay at DEBUG."""
    mgr = manager(CountingBackend(), n=20)

    def rekey(gen):
        s = Session(b"g%d" % gen)
        mgr.install_inbound(gen, s, "initiator", spis(mgr, 0xC0000000 + 0x100 * gen), gen)
        mgr.install_outbound(gen, s, "initiator", spis(mgr, 0xD0000000 + 0x100 * gen), gen)
        if gen > 1:
            mgr.retire(list(mgr.tunnels), gen - 1, gen + 0.5)

    with caplog.at_level(logging.INFO, logger="qkdgate"):
        rekey(1)
        rekey(2)
    assert caplog.records == []
    with caplog.at_level(logging.DEBUG, logger="qkdgate"):
        rekey(3)
    per_tunnel = {r.tunnel for r in caplog.records if hasattr(r, "tunnel")}
    assert len(per_tunnel) == 20


class RefusingSpi(CountingBackend):
    """Runs out of SPIs after ``left`` reservations (as the kernel's range
    would: ENOENT)."""

    def __init__(self, left):
        super().__init__()
        self.left = left

    def allocate_spi(self, src, dst, proto=50, low=0xC0000000, high=0xCFFFFFFF, reqid=0):
        if self.left == 0:
            raise TunnelError("allocate_spi", errno.ENOENT, "injected")
        self.left -= 1
        return super().allocate_spi(src, dst, proto, low, high, reqid)


def test_spis_of_every_tunnel_are_reserved_in_one_batch():
    be = CountingBackend()
    mgr = manager(be, n=20)
    tids = list(reversed(mgr.tunnels))
    got = mgr.allocate_spis(tids)
    assert be.spi_batches == [20]                 # one batch, not one round trip per tunnel
    assert list(got) == tids and len(set(got.values())) == 20
    # each larval SA carries its tunnel's inbound reqid (failsafe's sweep finds it)
    assert {be.larval_reqids[got[t]] for t in tids} == \
        {mgr.get(t).driver.spec.reqid_base for t in tids}
    mgr.install_inbound(1, Session(b"g1"), "initiator", got, 0.0)
    assert all(t.generations[1].inbound.spi == got[tid] for tid, t in mgr.tunnels.items())


def test_a_refused_spi_reservation_fails_the_allocation():
    mgr = manager(RefusingSpi(left=3), n=5)
    with pytest.raises(TunnelError) as info:
        mgr.allocate_spis(list(mgr.tunnels))
    assert info.value.errno == errno.ENOENT


def test_a_timer_wake_up_works_only_on_tunnels_with_a_deadline_passed(monkeypatch):
    """Issue 19: the tunnel loop wakes on every step of every peer's exchange;
    TunnelManager.handle_timer visits only tunnels whose (cached) next
    deadline has passed instead of every tunnel each time."""
    from qkdgate.tunnels.tunnel import Tunnel
    be = CountingBackend()
    mgr = manager(be, n=20)
    s1, s2 = Session(b"g1"), Session(b"g2")
    mgr.install_inbound(1, s1, "initiator", spis(mgr, 0xC0001000), 0.0)
    mgr.install_outbound(1, s1, "initiator", spis(mgr, 0xD0001000), 0.0)
    mgr.install_inbound(2, s2, "initiator", {"t3": 0xC0002003}, 1.0)
    mgr.install_outbound(2, s2, "initiator", {"t3": 0xD0002003}, 1.0)
    visited = []
    real = Tunnel.handle_timer
    monkeypatch.setattr(Tunnel, "handle_timer",
                        lambda self, now: visited.append(self.tunnel_id) or real(self, now))
    assert mgr.handle_timer(2.0) == {} and visited == []        # nothing due yet
    mgr.handle_timer(3.5)                                       # t3's grace (2 s) is over
    assert visited == ["t3"]
    assert list(mgr.get("t3").generations) == [2]
    assert all(list(t.generations) == [1] for tid, t in mgr.tunnels.items() if tid != "t3")
    assert mgr.get_timer() == 50.0                              # everyone else's soft lifetime


class FailingRemove(CountingBackend):
    """Refuses to remove the SA with SPI ``bad`` once (EBUSY)."""

    def __init__(self, bad):
        super().__init__()
        self.bad = bad

    def remove_sa(self, sa_id):
        if sa_id.spi == self.bad:
            self.bad = None
            raise TunnelError("remove_sa", errno.EBUSY, "injected")
        super().remove_sa(sa_id)


def test_the_previous_outbound_sa_goes_at_the_switch_and_its_inbound_after_the_grace():
    """Issue 19: nothing selects the old outbound SA once the out policy
    names the new reqid, so it is removed right after the switch; the old
    inbound SA stays until the generation retires (the peer may still send
    under it). A removal that fails at the switch is retried at the retire."""
    be = FailingRemove(bad=0xD0001001)
    events = []
    mgr = manager(be, events=events)
    s1, s2 = Session(b"g1"), Session(b"g2")
    mgr.install_inbound(1, s1, "initiator", spis(mgr, 0xC0001000), 0.0)
    mgr.install_outbound(1, s1, "initiator", spis(mgr, 0xD0001000), 0.0)
    mgr.install_inbound(2, s2, "initiator", spis(mgr, 0xC0002000), 1.0)
    mgr.install_outbound(2, s2, "initiator", spis(mgr, 0xD0002000), 1.0)
    live = {sa.sa_id.spi for sa in be.sas.values()}
    assert live == {*spis(mgr, 0xC0001000).values(), *spis(mgr, 0xC0002000).values(),
                    *spis(mgr, 0xD0002000).values(), 0xD0001001}
    t1 = mgr.get("t1")
    assert t1.generations[1].outbound.spi == 0xD0001001          # kept for the retire
    assert mgr.get("t0").generations[1].outbound is None
    assert [e.op for e in events if isinstance(e, TunnelOpFailed)] == ["remove_sa"]
    mgr.retire(list(mgr.tunnels), 1, 3.0)
    assert {sa.sa_id.spi for sa in be.sas.values()} == {
        *spis(mgr, 0xC0002000).values(), *spis(mgr, 0xD0002000).values()}
    assert all(list(t.generations) == [2] for t in mgr.tunnels.values())
    assert sum(isinstance(e, SaRetired) for e in events) == N
