"""The IPsec tunnel manager against the recording XFRM fake: which SAs and
policies the kernel holds after each step, and in which order they came."""

import ipaddress
import json

import pytest
from tunnel_helpers import Prov, Schedule, Session

from qkdgate.errors import TunnelError
from qkdgate.interfaces import Direction, Mode, PolicyAction, SaId
from qkdgate.testing.fakes import RecordingIpsecBackend
from qkdgate.tunnels.events import (
    PolicyFallback,
    PolicyRecovered,
    SaHardLifetimeBlock,
    TunnelBlocked,
)
from qkdgate.tunnels.ipsec_tunnel import IpsecTunnelSpec, ipsec_tunnel
from qkdgate.tunnels.manager import TunnelManager
from qkdgate.tunnels.timers import Lifetimes
from qkdgate.tunnels.tunnel import GenerationRefused, TunnelPolicy

A, B = ipaddress.ip_address("192.0.2.1"), ipaddress.ip_address("192.0.2.2")
NET_A, NET_B = ipaddress.ip_network("10.1.0.0/16"), ipaddress.ip_network("10.2.0.0/16")
LT = Lifetimes(soft_seconds=50, hard_seconds=60, grace_seconds=2)


def spec(local=A, remote=B, lnet=NET_A, rnet=NET_B, **kw):
    return IpsecTunnelSpec("t1", local, remote, (lnet,), (rnet,), reqid_base=0x1000, **kw)


def tunnel(backend=None, policy=TunnelPolicy.HYBRID_REQUIRED, lifetimes=LT, events=None, **kw):
    backend = backend or RecordingIpsecBackend()
    t = ipsec_tunnel(spec(**kw), backend, policy=policy, lifetimes=lifetimes, schedule=Schedule(),
                    emit=(events.append if events is not None else None))
    return t, backend


def out_policies(backend):
    return [p for p in backend.policies.values() if p.direction is Direction.OUT]


def sas(backend, direction):
    return sorted(sa.sa_id.spi for sa in backend.sas.values() if sa.direction == direction)


def establish(t, gen, session, role="initiator", now=0.0, in_spi=None, out_spi=None):
    in_spi = in_spi or t.allocate_spi()
    out_spi = out_spi or 0xD0000000 + gen
    t.install_inbound(gen, session, role, in_spi, now)
    t.install_outbound(gen, session, role, out_spi, now)
    return in_spi, out_spi


def test_setup_installs_fail_closed_policies_before_any_sa():
    t, be = tunnel()
    t.setup(0.0)
    assert be.sas == {}
    assert [op for op, _ in be.ops] == ["install_policy"] * 3
    (out,) = out_policies(be)
    assert out.action is PolicyAction.BLOCK and out.template is None
    ins = [p for p in be.policies.values() if p.direction is not Direction.OUT]
    assert {p.direction for p in ins} == {Direction.IN, Direction.FWD}
    assert all(p.template and p.template.reqid == 0x1000 and not p.template.optional for p in ins)
    assert t.state == "blocked"


def test_transport_mode_has_no_fwd_policy():
    t, be = tunnel(mode=Mode.TRANSPORT)
    t.setup(0.0)
    assert {p.direction for p in be.policies.values()} == {Direction.IN, Direction.OUT}


def test_generation_make_before_break_order_and_reqids():
    t, be = tunnel()
    t.setup(0.0)
    be.ops.clear()
    in1, out1 = establish(t, 1, Session(b"g1"))
    names = [op for op, _ in be.ops]
    assert names == ["allocate_spi", "install_inbound", "install_outbound", "switch_outbound"]
    (out,) = out_policies(be)
    r1 = out.template.reqid
    assert out.action is PolicyAction.ALLOW and r1 != 0x1000 and 0x1000 < r1 < 0x1000 + 64
    assert t.state == "up" and t.active.number == 1

    be.ops.clear()
    in2, out2 = establish(t, 2, Session(b"g2"), now=10.0)
    assert [op for op, _ in be.ops] == ["allocate_spi", "install_inbound", "install_outbound",
                                        "switch_outbound"]
    (out,) = out_policies(be)
    assert out.template.reqid not in (r1, 0x1000)
    # old generation still accepted during the grace period
    assert sas(be, "in") == sorted([in1, in2]) and sas(be, "out") == sorted([out1, out2])
    assert t.get_timer() == 12.0
    assert t.handle_timer(11.9) == [] and len(be.sas) == 4
    t.handle_timer(12.0)
    assert sas(be, "in") == [in2] and sas(be, "out") == [out2]
    assert [op for op, _ in be.ops[-2:]] == ["remove_sa", "remove_sa"]


def test_every_sa_has_kernel_soft_and_hard_lifetimes():
    t, be = tunnel(lifetimes=Lifetimes(soft_seconds=49.5, hard_seconds=60, soft_bytes=10**9,
                                       hard_bytes=2 * 10**9))
    t.setup(0.0)
    establish(t, 1, Session(b"g1"))
    for sa in be.sas.values():
        lt = sa.spec.lifetime
        # hard: the generation's 60 s less the 1 s margin; no soft time limit,
        # which would make the kernel move the hard one (ipsec_tunnel.kernel_lifetime)
        assert (lt.soft_add_seconds, lt.hard_add_seconds) == (0, 59)
        assert (lt.soft_bytes, lt.hard_bytes) == (10**9, 2 * 10**9)
        assert sa.spec.aead == "rfc4106(gcm(aes))" and len(sa.spec.key) == 36


def test_both_gateways_install_identical_keys_per_direction():
    ta, ba = tunnel()
    tb, bb = tunnel(local=B, remote=A, lnet=NET_B, rnet=NET_A)
    ta.setup(0.0), tb.setup(0.0)
    s = Session(b"shared")
    spi_a, spi_b = ta.allocate_spi(), tb.allocate_spi() + 0x100   # each side picks its inbound SPI
    ta.install_inbound(1, s, "initiator", spi_a, 0)
    tb.install_inbound(1, s, "responder", spi_b, 0)
    ta.install_outbound(1, s, "initiator", spi_b, 0)
    tb.install_outbound(1, s, "responder", spi_a, 0)
    a_to_b = SaId(A, B, spi_b)
    b_to_a = SaId(B, A, spi_a)
    assert ba.key_of(a_to_b) == bb.key_of(a_to_b)
    assert bb.key_of(b_to_a) == ba.key_of(b_to_a)
    assert ba.key_of(a_to_b) != ba.key_of(b_to_a)   # directions never share a key


def test_soft_lifetime_asks_for_one_rekey_and_hard_lifetime_blocks():
    events = []
    t, be = tunnel(events=events)
    t.setup(0.0)
    establish(t, 1, Session(b"g1"), now=100.0)
    assert t.get_timer() == 150.0
    assert t.handle_timer(150.0) == ["soft_lifetime"]
    assert t.handle_timer(155.0) == []          # asked once, not every tick
    # the hard lifetime (160) is acted on hard_margin before it passes
    assert t.lifetimes.hard_margin == 1.0 and t.get_timer() == 159.0
    t.handle_timer(159.0)
    assert be.sas == {}
    (out,) = out_policies(be)
    assert out.action is PolicyAction.BLOCK and out.template is None
    assert len(be.policies) == 3                 # in/fwd still drop cleartext
    assert t.state == "blocked" and "hard lifetime" in t.last_error
    assert isinstance(events[-1], TunnelBlocked)
    blocks = [e for e in events if isinstance(e, SaHardLifetimeBlock)]
    assert sorted(e.direction for e in blocks) == ["in", "out"]
    assert all(e.generation == 1 and e.tunnel == "t1" for e in blocks)
    # a later generation unblocks
    establish(t, 2, Session(b"g2"), now=170.0)
    assert out_policies(be)[0].action is PolicyAction.ALLOW and t.state == "up"


def test_hybrid_required_refuses_generation_without_qkd_and_installs_nothing():
    t, be = tunnel(policy=TunnelPolicy.HYBRID_REQUIRED)
    t.setup(0.0)
    with pytest.raises(GenerationRefused, match="requires qkd"):
        t.install_inbound(1, Session(b"x", Prov(qkd_key_ids=())), "initiator", 0xC0000200, 0)
    assert be.sas == {} and "requires qkd" in t.last_error


def test_qkd_mandatory_needs_every_leg():
    t, be = tunnel(policy=TunnelPolicy.QKD_MANDATORY)
    t.setup(0.0)
    with pytest.raises(GenerationRefused, match="qkd"):
        t.install_inbound(1, Session(b"x", Prov(qkd_key_ids=())), "initiator", 0xC0000200, 0)
    with pytest.raises(GenerationRefused, match="x25519"):
        t.install_inbound(1, Session(b"x", Prov(x25519=False)), "initiator", 0xC0000200, 0)
    with pytest.raises(GenerationRefused, match="mlkem"):
        t.install_inbound(1, Session(b"x", Prov(kem_name="")), "initiator", 0xC0000200, 0)
    establish(t, 1, Session(b"g1", Prov()))
    assert t.state == "up"


def test_pqc_only_never_needs_qkd_and_raises_no_alarm():
    events = []
    t, be = tunnel(policy=TunnelPolicy.PQC_ONLY, events=events)
    t.setup(0.0)
    establish(t, 1, Session(b"g1", Prov(qkd_key_ids=())))
    assert t.state == "up" and not t.fallback
    assert not any(isinstance(e, PolicyFallback) for e in events)


def test_pqc_fallback_alarms_and_recovers():
    events = []
    t, be = tunnel(policy=TunnelPolicy.PQC_FALLBACK, events=events)
    t.setup(0.0)
    establish(t, 1, Session(b"g1", Prov(qkd_key_ids=())))
    assert t.fallback and t.state == "up"
    assert any(isinstance(e, PolicyFallback) for e in events)
    establish(t, 2, Session(b"g2"), now=1)
    assert not t.fallback and isinstance(events[-1], PolicyRecovered)


def test_pqc_fallback_still_requires_mlkem_and_x25519():
    t, _ = tunnel(policy=TunnelPolicy.PQC_FALLBACK)
    t.setup(0)
    with pytest.raises(GenerationRefused, match="mlkem"):
        t.install_inbound(1, Session(b"x", Prov(kem_name="")), "initiator", 0xC0000200, 0)
    with pytest.raises(GenerationRefused, match="x25519"):
        t.install_inbound(1, Session(b"x", Prov(x25519=False)), "initiator", 0xC0000200, 0)


def test_retransmitted_install_is_idempotent():
    t, be = tunnel()
    t.setup(0.0)
    s = Session(b"g1")
    establish(t, 1, s, in_spi=0xC0000300, out_spi=0xD0000001)
    n = len(be.ops)
    t.install_inbound(1, s, "initiator", 0xC0000300, 1)
    t.install_outbound(1, s, "initiator", 0xD0000001, 1)
    assert len(be.ops) == n


class FailingSwitch(RecordingIpsecBackend):
    fail = False

    def switch_outbound(self, policy):
        if self.fail:
            raise TunnelError("switch_outbound", 22, "test")
        super().switch_outbound(policy)


def test_failed_switch_removes_new_sa_and_keeps_previous_generation():
    be = FailingSwitch()
    t, _ = tunnel(backend=be)
    t.setup(0.0)
    _, out1 = establish(t, 1, Session(b"g1"))
    reqid = out_policies(be)[0].template.reqid
    be.fail = True
    with pytest.raises(TunnelError):
        establish(t, 2, Session(b"g2"), now=1)
    assert sas(be, "out") == [out1]
    assert out_policies(be)[0].template.reqid == reqid
    assert t.active.number == 1 and "switch_outbound" in t.last_error


def test_restart_adopts_previous_sas_then_replaces_them():
    be = RecordingIpsecBackend()
    old, _ = tunnel(backend=be)
    old.setup(0.0)
    in1, out1 = establish(old, 1, Session(b"g1"))
    old.shutdown(teardown=False)                 # default exit keeps everything
    assert len(be.sas) == 2 and len(be.policies) == 3
    be.ops.clear()
    new, _ = tunnel(backend=be)
    new.setup(1000.0)
    assert [op for op, _ in be.ops] == []        # nothing reinstalled, nothing removed
    assert new.state == "up" and new.active.adopted
    establish(new, 1, Session(b"fresh"), now=1001.0, out_spi=0xD0000100)
    assert len(be.sas) == 4
    new.handle_timer(1001.0 + LT.grace_seconds)
    assert in1 not in sas(be, "in") and out1 not in sas(be, "out") and len(be.sas) == 2


def test_teardown_removes_everything():
    t, be = tunnel()
    t.setup(0)
    establish(t, 1, Session(b"g1"))
    t.shutdown(teardown=True)
    assert be.sas == {} and be.policies == {} and t.state == "down"


def test_status_shows_inputs_and_never_keys():
    t, be = tunnel()
    t.setup(0)
    s = Session(b"g1")
    establish(t, 1, s, now=10)
    st = t.status(25.0)
    assert st["state"] == "up" and st["generation"] == 1 and st["sa_age"] == 15.0
    assert st["inputs"] == {"kem": "ML-KEM-768", "x25519": True,
                            "qkd_key_ids": list(Prov().qkd_key_ids)}
    assert st["soft_expiry_in"] == 35.0
    text = json.dumps(st)
    for sa in be.sas.values():
        assert sa.spec.key.reveal().hex() not in text


def two_tunnels(be, p2=TunnelPolicy.HYBRID_REQUIRED):
    m = TunnelManager()
    t1 = ipsec_tunnel(spec(), be, policy=TunnelPolicy.PQC_FALLBACK, lifetimes=LT,
                     schedule=Schedule())
    t2 = ipsec_tunnel(IpsecTunnelSpec("t2", A, B, (ipaddress.ip_network("10.3.0.0/16"),), (NET_B,),
                                     reqid_base=0x2000), be, policy=p2,
                     lifetimes=LT, schedule=Schedule())
    m.add(t1), m.add(t2)
    t1.setup(0), t2.setup(0)
    return m, t1, t2


def test_manager_mixed_policies_rekey_the_tunnels_that_allow_it():
    be = RecordingIpsecBackend()
    m, t1, t2 = two_tunnels(be)
    pqc_only = Session(b"x", Prov(qkd_key_ids=()))
    spis = {"t1": 0xC0000400, "t2": 0xC0000401}
    m.install_inbound(1, pqc_only, "initiator", spis, 0)      # t2 refuses, t1 goes on
    m.install_outbound(1, pqc_only, "initiator", {"t1": 0xD0000400, "t2": 0xD0000401}, 0)
    assert t1.state == "up" and t1.fallback and t2.state == "blocked"
    assert sorted(sa.sa_id.spi for sa in be.sas.values()) == [0xC0000400, 0xD0000400]


def test_manager_refuses_when_every_tunnel_refuses():
    be = RecordingIpsecBackend()
    m, t1, t2 = two_tunnels(be)
    no_x = Session(b"x", Prov(x25519=False))
    with pytest.raises(GenerationRefused):
        m.install_inbound(1, no_x, "initiator", {"t1": 0xC0000400, "t2": 0xC0000401}, 0)
    assert be.sas == {}


class FailingInbound(RecordingIpsecBackend):
    def install_inbound(self, sa_id, spec):
        if sa_id.spi == 0xC0000401:
            raise TunnelError("install_inbound", 12, "test")
        super().install_inbound(sa_id, spec)


def test_manager_kernel_failure_is_all_or_nothing():
    be = FailingInbound()
    m, t1, t2 = two_tunnels(be, p2=TunnelPolicy.PQC_FALLBACK)
    with pytest.raises(TunnelError):
        m.install_inbound(1, Session(b"g"), "initiator", {"t1": 0xC0000400, "t2": 0xC0000401}, 0)
    assert be.sas == {}


class StrictSwitch(RecordingIpsecBackend):
    """Like the XFRM backend: switch_outbound only swaps templates; a
    template-less BLOCK goes through update_policy."""

    def switch_outbound(self, policy):
        if policy.template is None:
            from qkdgate.errors import LocalProtocolError
            raise LocalProtocolError("switch_outbound takes an OUT policy with a template")
        super().switch_outbound(policy)

    def update_policy(self, policy):
        self.policies[(policy.selector, policy.direction, policy.mark, policy.if_id)] = policy
        self.ops.append(("update_policy", policy.action))


def test_hard_lifetime_block_uses_update_policy_when_the_backend_has_it():
    be = StrictSwitch()
    t, _ = tunnel(backend=be)
    t.setup(0.0)
    establish(t, 1, Session(b"g1"))
    t.handle_timer(60.0)
    (out,) = out_policies(be)
    assert out.action is PolicyAction.BLOCK and ("update_policy", PolicyAction.BLOCK) in be.ops
    assert t.last_error.startswith("hard lifetime")


def test_setup_reasserts_an_inbound_policy_that_no_longer_matches():
    be = RecordingIpsecBackend()
    old = ipsec_tunnel(IpsecTunnelSpec("t1", A, B, (NET_A,), (NET_B,), reqid_base=0x500), be,
                      policy=TunnelPolicy.HYBRID_REQUIRED, lifetimes=LT, schedule=Schedule())
    old.setup(0)
    t, _ = tunnel(backend=be)                  # same selectors, reqid now 0x1000
    t.setup(1)
    ins = [p for p in be.policies.values() if p.direction is not Direction.OUT]
    assert len(ins) == 2 and all(p.template.reqid == 0x1000 for p in ins)


def test_poll_sums_counters_asks_for_rekey_at_soft_bytes_and_feeds_the_observer():
    from qkdgate.gateway.telemetry.metrics import Metrics
    be = RecordingIpsecBackend()
    t, _ = tunnel(backend=be, lifetimes=Lifetimes(soft_seconds=50, hard_seconds=60,
                                                  soft_bytes=1000, hard_bytes=2000))
    metrics = Metrics()
    t.on_sa_state = metrics.observe_sa
    t.setup(0)
    establish(t, 1, Session(b"g1"))
    real_query = be.query_sa

    def query(sa_id):
        st = real_query(sa_id)
        from dataclasses import replace
        return replace(st, bytes=600 if sa_id.dst == B else 100, packets=3)
    be.query_sa = query
    assert t.poll(1.0) == []
    assert t.counters == {"bytes_out": 600, "bytes_in": 100, "packets_out": 3, "packets_in": 3}
    text = metrics.exposition().decode()
    assert 'qkdgate_sa_bytes_total{direction="out",tunnel="t1"} 600.0' in text
    be.query_sa = lambda sa_id: replace_bytes(real_query(sa_id), 1000)
    assert t.poll(2.0) == ["soft_bytes"]
    assert t.poll(3.0) == []               # asked once


def replace_bytes(st, n):
    from dataclasses import replace
    return replace(st, bytes=n)


def test_an_unknown_tunnel_id_is_a_local_error_and_installs_nothing():
    from qkdgate.errors import LocalProtocolError
    t, be = tunnel()
    t.setup(0.0)
    mgr = TunnelManager()
    mgr.add(t)
    with pytest.raises(LocalProtocolError, match="unknown tunnel id 'nope'"):
        mgr.install_inbound(1, Session(b"g1"), "initiator",
                            {"t1": t.allocate_spi(), "nope": 0xC0000999}, 0.0)
    assert be.sas == {} and 1 not in t.generations      # all or nothing
    with pytest.raises(LocalProtocolError):
        mgr.get("nope")
