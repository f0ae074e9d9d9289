"""Issue 17 finding 1: at start a tunnel adopts only kernel objects at least as
strict as its configuration. A weaker leftover (an ALLOW out policy without
our template, an optional template, a template naming a reqid with no SA of
ours; a macsec link with encrypt off, validate check, no replay protection
or another cipher suite) is replaced, blocking first, and reported."""

import ipaddress

import pytest
from tunnel_helpers import Schedule

from qkdgate.interfaces import (
    Direction,
    MacsecCipher,
    MacsecLinkSpec,
    PolicyAction,
    PolicySpec,
    SaId,
    SaSpec,
    Selector,
    Template,
)
from qkdgate.keymix.secret import SecretBytes
from qkdgate.testing.fakes import RecordingIpsecBackend, RecordingMacsecBackend
from qkdgate.tunnels.events import KernelStateReplaced, SaAdopted
from qkdgate.tunnels.ipsec_tunnel import IpsecTunnelSpec, ipsec_tunnel
from qkdgate.tunnels.macsec_tunnel import MacsecTunnelSpec, macsec_tunnel
from qkdgate.tunnels.timers import Lifetimes
from qkdgate.tunnels.tunnel import TunnelPolicy

A, B = ipaddress.ip_address("192.0.2.1"), ipaddress.ip_address("192.0.2.2")
NET_A, NET_B = ipaddress.ip_network("10.1.0.0/16"), ipaddress.ip_network("10.2.0.0/16")
LT = Lifetimes(soft_seconds=50, hard_seconds=60, grace_seconds=2)
BASE = 0x1000
OUT_SEL = Selector(NET_A, NET_B)


def ipsec(be, events):
    spec = IpsecTunnelSpec("t1", A, B, (NET_A,), (NET_B,), reqid_base=BASE)
    return ipsec_tunnel(spec, be, policy=TunnelPolicy.HYBRID_REQUIRED, lifetimes=LT,
                        schedule=Schedule(), emit=events.append)


def leftover_out(be, action=PolicyAction.ALLOW, template=None):
    be.install_policy(PolicySpec(OUT_SEL, Direction.OUT, action=action, template=template,
                                 priority=1000))


def out_policy(be):
    (p,) = [p for p in be.policies.values() if p.direction is Direction.OUT]
    return p


def our_out_sa(be, reqid):
    be.install_outbound(SaId(A, B, 0xD0000001), SaSpec(SecretBytes(bytes(36)), reqid=reqid))


@pytest.mark.parametrize("template,why", [
    (None, "without a template"),
    (Template(A, B, reqid=BASE + 1, optional=True), "optional"),
    (Template(A, B, reqid=0x9999), "outside"),
    (Template(A, B, reqid=BASE + 1), "no SA"),
], ids=["bypass", "optional-template", "foreign-reqid", "our-reqid-without-sa"])
def test_a_weaker_out_policy_is_replaced_by_block_and_reported(template, why):
    be, events = RecordingIpsecBackend(), []
    leftover_out(be, template=template)
    t = ipsec(be, events)
    t.setup(0.0)
    p = out_policy(be)
    assert p.action is PolicyAction.BLOCK and p.template is None
    assert t.state == "blocked" and t.active is None
    (ev,) = [e for e in events if isinstance(e, KernelStateReplaced)]
    assert ev.tunnel == "t1" and "out policy" in ev.what and why in ev.reason
    # replaced in place (XFRM_MSG_UPDPOLICY): no moment without a policy
    assert ("remove_policy", Direction.OUT) not in be.ops


def test_a_block_out_policy_is_adopted_as_is():
    be, events = RecordingIpsecBackend(), []
    leftover_out(be, action=PolicyAction.BLOCK)
    t = ipsec(be, events)
    t.setup(0.0)
    assert out_policy(be).action is PolicyAction.BLOCK
    assert not any(isinstance(e, KernelStateReplaced) for e in events)


def test_an_out_policy_naming_our_adopted_sa_keeps_forwarding():
    be, events = RecordingIpsecBackend(), []
    leftover_out(be, template=Template(A, B, reqid=BASE + 3))
    our_out_sa(be, BASE + 3)
    t = ipsec(be, events)
    t.setup(0.0)
    p = out_policy(be)
    assert p.action is PolicyAction.ALLOW and p.template.reqid == BASE + 3
    assert t.state == "up" and t.active is not None and t.active.adopted
    assert SaAdopted("t1", 1) in events
    assert not any(isinstance(e, KernelStateReplaced) for e in events)


def test_a_weaker_inbound_policy_is_reasserted_and_reported():
    be, events = RecordingIpsecBackend(), []
    be.install_policy(PolicySpec(Selector(NET_B, NET_A), Direction.IN,
                                 template=Template(B, A, reqid=BASE, optional=True)))
    t = ipsec(be, events)
    t.setup(0.0)
    (p,) = [p for p in be.policies.values() if p.direction is Direction.IN]
    assert not p.template.optional
    assert any(isinstance(e, KernelStateReplaced) and "in policy" in e.what for e in events)


# ---------------------------------------------------------------- MACsec

LINK = MacsecLinkSpec("qm-a", "eth0")
PEER_SCI = 0x0200000000AA0001


def macsec(be, events):
    return macsec_tunnel(MacsecTunnelSpec("m1", LINK, PEER_SCI), be,
                         policy=TunnelPolicy.HYBRID_REQUIRED, lifetimes=LT,
                         schedule=Schedule(), emit=events.append)


@pytest.mark.parametrize("weaker,why", [
    (dict(encrypt=False), "encrypt off"),
    (dict(validate_strict=False), "validate"),
    (dict(replay_protect=False), "replay protection off"),
    (dict(replay_window=4096), "replay window"),
    (dict(cipher=MacsecCipher.GCM_AES_256), "cipher suite"),
], ids=["encrypt-off", "validate-check", "no-replay-protect", "wider-window", "other-cipher"])
def test_a_weaker_macsec_link_is_rebuilt_down_first_and_reported(weaker, why):
    be, events = RecordingMacsecBackend(), []
    be.create_link(MacsecLinkSpec(LINK.name, LINK.parent, **weaker))
    be.ops.clear()
    t = macsec(be, events)
    t.setup(0.0)
    st = be.secy_state(LINK.name)
    assert (st.encrypt, st.validate_strict, st.replay_protect, st.replay_window, st.cipher) == \
        (True, True, True, LINK.replay_window, LINK.cipher)
    ops = [op for op, _ in be.ops]
    assert ops.index("set_link_up") < ops.index("destroy_link") < ops.index("create_link")
    assert be.ops[ops.index("set_link_up")] == ("set_link_up", (LINK.name, False))
    (ev,) = [e for e in events if isinstance(e, KernelStateReplaced)]
    assert ev.tunnel == "m1" and LINK.name in ev.what and why in ev.reason
    assert t.state == "blocked" and be.links[LINK.name].rx == {PEER_SCI: {}}


def test_a_macsec_link_as_strict_as_configured_is_adopted():
    be, events = RecordingMacsecBackend(), []
    be.create_link(MacsecLinkSpec(LINK.name, LINK.parent, replay_window=8))   # stricter
    be.ops.clear()
    t = macsec(be, events)
    t.setup(0.0)
    assert "destroy_link" not in [op for op, _ in be.ops]
    assert be.secy_state(LINK.name).replay_window == 8
    assert not any(isinstance(e, KernelStateReplaced) for e in events)
