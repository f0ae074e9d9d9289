"""Issue 17 finding 1 on the real kernel: a weaker kernel object left before
the tunnel starts (an old IKE daemon's or an operator's bypass out policy; a
macsec link with encryption off and validation relaxed) is not adopted as
ours. The tunnel replaces it, blocking first, so not one cleartext packet of
the protected nets reaches the wire while ``status`` says "blocked"."""

from __future__ import annotations

import time

from kernel_lab import GA, GB, HA, HB, Capture, Stream, analyse_pcap, ipbatch
from kernel_traffic import LAN_A, LAN_B

from qkdgate.interfaces import Direction, MacsecCipher, MacsecLinkSpec, PolicyAction
from qkdgate.tunnels.events import KernelStateReplaced
from qkdgate.tunnels.ipsec_tunnel import IpsecTunnelSpec, ipsec_tunnel
from qkdgate.tunnels.macsec import MacsecBackend
from qkdgate.tunnels.macsec_tunnel import MacsecTunnelSpec, macsec_tunnel
from qkdgate.tunnels.timers import Lifetimes
from qkdgate.tunnels.tunnel import TunnelPolicy
from qkdgate.tunnels.xfrm import XfrmBackend

LT = Lifetimes(soft_seconds=50, hard_seconds=60)


def test_leftover_bypass_out_policy_is_replaced_by_block_and_nothing_leaks(topo, tmp_path):
    # A template-less ALLOW out policy for the tunnel's selector: cleartext passes.
    ipbatch([f"xfrm policy add src {LAN_A} dst {LAN_B} dir out priority 1000"], topo.gA)
    be = XfrmBackend(topo.gA)
    events: list = []
    t = ipsec_tunnel(IpsecTunnelSpec("t1", GA, GB, (LAN_A,), (LAN_B,), reqid_base=0x10000),
                     be, policy=TunnelPolicy.HYBRID_REQUIRED, lifetimes=LT, emit=events.append)
    t.setup(time.monotonic())
    (out,) = [p for p in be.list_policies() if p.direction is Direction.OUT]
    assert out.action is PolicyAction.BLOCK and out.template is None
    assert t.status(time.monotonic())["state"] == "blocked"
    assert any(isinstance(e, KernelStateReplaced) for e in events)
    cap = Capture(topo, str(tmp_path / "adopt.pcap"))
    s = Stream(topo.hA, topo.hB, HA, HB, rate=200).start()
    time.sleep(1.0)
    s.stop(drain=0.3)
    rep = analyse_pcap(cap.stop())
    assert len(s.sent_at) > 50 and not s.received, len(s.received)
    assert rep.cleartext == 0 and rep.pattern_hits == 0, rep
    be.close()


def test_leftover_macsec_link_without_encryption_is_rebuilt_strict(topo):
    ipbatch(["link add link m0 name qm-t type macsec port 1 cipher gcm-aes-256 "
             "encrypt off validate check"], topo.gA)
    be = MacsecBackend(topo.gA)
    before = be.secy_state("qm-t")
    assert not before.encrypt and not before.validate_strict
    events: list = []
    link = MacsecLinkSpec("qm-t", "m0", cipher=MacsecCipher.GCM_AES_XPN_256)
    t = macsec_tunnel(MacsecTunnelSpec("m1", link, 0x0200000000AA0001), be,
                      policy=TunnelPolicy.HYBRID_REQUIRED, lifetimes=LT, emit=events.append)
    t.setup(time.monotonic())
    after = be.secy_state("qm-t")
    assert after.encrypt and after.validate_strict and after.replay_protect
    assert after.cipher is MacsecCipher.GCM_AES_XPN_256
    assert any(isinstance(e, KernelStateReplaced) for e in events)
    assert t.status(time.monotonic())["state"] == "blocked"
    be.close()
