"""MACsec AN rotation against the recording fake, and the real key schedule
end to end (both gateways install the same SAK / ESP key for the same SA)."""

import ipaddress

import pytest
from tunnel_helpers import Schedule, Session

from qkdgate.errors import TunnelError
from qkdgate.interfaces import MacsecCipher, MacsecLinkSpec, MacsecSaState, SaId
from qkdgate.keymix import labels
from qkdgate.keymix.combiner import Provenance, SessionSecret
from qkdgate.keymix.secret import SecretBytes
from qkdgate.testing.fakes import RecordingIpsecBackend, RecordingMacsecBackend
from qkdgate.tunnels.events import SaStaleRemoved
from qkdgate.tunnels.ipsec_tunnel import IpsecTunnelSpec, ipsec_tunnel
from qkdgate.tunnels.macsec_tunnel import MacsecTunnelSpec, macsec_tunnel
from qkdgate.tunnels.timers import Lifetimes
from qkdgate.tunnels.tunnel import TunnelPolicy

LT = Lifetimes(soft_seconds=50, hard_seconds=60, grace_seconds=2)


def pair(cipher=MacsecCipher.GCM_AES_XPN_256, schedule=None):
    ba, bb = RecordingMacsecBackend(), RecordingMacsecBackend()
    # Each side's fake assigns SCIs from its own counter; learn them first.
    ta = macsec_tunnel(MacsecTunnelSpec("m1", MacsecLinkSpec("qm-a", "eth0", cipher=cipher), 1),
                      ba, policy=TunnelPolicy.HYBRID_REQUIRED, lifetimes=LT,
                      schedule=schedule or Schedule())
    ba.create_link(ta.driver.spec.link)
    bb._ifindex = 200
    bb.create_link(MacsecLinkSpec("qm-b", "eth0", cipher=cipher))
    sci_a, sci_b = ba.link_sci("qm-a"), bb.link_sci("qm-b")
    ba.destroy_link("qm-a"), bb.destroy_link("qm-b")
    bb._ifindex = 200
    ba._ifindex = 100
    ta = macsec_tunnel(MacsecTunnelSpec("m1", MacsecLinkSpec("qm-a", "eth0", cipher=cipher), sci_b),
                      ba, policy=TunnelPolicy.HYBRID_REQUIRED, lifetimes=LT,
                      schedule=schedule or Schedule())
    tb = macsec_tunnel(MacsecTunnelSpec("m1", MacsecLinkSpec("qm-b", "eth0", cipher=cipher), sci_a),
                      bb, policy=TunnelPolicy.HYBRID_REQUIRED, lifetimes=LT,
                      schedule=schedule or Schedule())
    ta.setup(0), tb.setup(0)
    assert ta.driver.local_sci == sci_a and tb.driver.local_sci == sci_b
    return ta, ba, tb, bb


def generation(ta, tb, gen, session, now=0.0):
    an_a, an_b = ta.allocate_spi(), tb.allocate_spi()   # each receiver picks its AN
    ta.install_inbound(gen, session, "initiator", an_a, now)
    tb.install_inbound(gen, session, "responder", an_b, now)
    ta.install_outbound(gen, session, "initiator", an_b, now)
    tb.install_outbound(gen, session, "responder", an_a, now)
    return an_a, an_b


def test_setup_is_fail_closed_and_sas_match_across_peers():
    ta, ba, tb, bb = pair()
    la, lb = ba.links["qm-a"], bb.links["qm-b"]
    assert la.spec.validate_strict and la.tx == {} and list(la.rx) == [tb.driver.local_sci]
    an_a, an_b = generation(ta, tb, 1, Session(b"s1"))
    # A's TX SA on AN an_b is B's RX SA for SCI A on the same AN, same key
    assert la.tx[an_b].key == lb.rx[ta.driver.local_sci][an_b].key
    assert la.tx[an_b].keyid == lb.rx[ta.driver.local_sci][an_b].keyid
    assert lb.tx[an_a].key == la.rx[tb.driver.local_sci][an_a].key
    assert la.tx[an_b].key != lb.tx[an_a].key
    assert la.encoding_an == an_b and lb.encoding_an == an_a
    assert la.tx[an_b].salt is not None and la.tx[an_b].ssci is not None   # XPN


def test_rotation_uses_next_an_and_retires_old_after_grace():
    ta, ba, tb, bb = pair()
    a1, b1 = generation(ta, tb, 1, Session(b"s1"))
    a2, b2 = generation(ta, tb, 2, Session(b"s2"), now=10)
    assert (a2 - a1) % 4 == 1 and (b2 - b1) % 4 == 1
    la = ba.links["qm-a"]
    assert set(la.tx) == {b1, b2} and la.encoding_an == b2
    ba.ops.clear()
    ta.handle_timer(12.0)
    assert set(la.tx) == {b2} and set(la.rx[tb.driver.local_sci]) == {a2}
    names = [op for op, _ in ba.ops]
    # the kernel refuses to delete an active SA: deactivate first
    assert names.index("set_tx_sa_active") < names.index("remove_tx_sa")
    assert names.index("set_rx_sa_active") < names.index("remove_rx_sa")


def test_an_allocation_skips_ans_in_use():
    ta, ba, tb, bb = pair()
    for g in range(1, 9):   # wraps around the four ANs twice
        generation(ta, tb, g, Session(bytes([g])), now=g * 10)
        ta.handle_timer(g * 10 + 3), tb.handle_timer(g * 10 + 3)
    assert len(ba.links["qm-a"].tx) == 1


def test_hard_lifetime_removes_all_macsec_sas():
    ta, ba, tb, bb = pair()
    generation(ta, tb, 1, Session(b"s1"))
    ta.handle_timer(60.0)
    la = ba.links["qm-a"]
    assert la.tx == {} and la.rx[tb.driver.local_sci] == {} and ta.state == "blocked"


def test_default_exit_removes_sas_but_keeps_strict_link():
    ta, ba, tb, bb = pair()
    generation(ta, tb, 1, Session(b"s1"))
    ta.shutdown(teardown=False)
    assert "qm-a" in ba.links and ba.links["qm-a"].tx == {}
    tb.shutdown(teardown=True)
    assert "qm-b" not in bb.links


@pytest.mark.parametrize("cipher,next_pn,due", [
    (MacsecCipher.GCM_AES_256, 0xBFFF_FFFF, False),
    (MacsecCipher.GCM_AES_256, 0xC000_0000, True),
    (MacsecCipher.GCM_AES_XPN_256, 0xC000_0000, False),
])
def test_packet_number_exhaustion_asks_for_rekey(cipher, next_pn, due):
    ta, ba, tb, bb = pair(cipher)
    generation(ta, tb, 1, Session(b"s1"))
    ba.query_tx_sa = lambda link, an: MacsecSaState(an=an, active=True, next_pn=next_pn,
                                                    octets=1000)
    assert ta.poll(5.0) == (["pn_exhaustion"] if due else [])
    assert ta.counters["bytes_out"] == 1000


def real_session(seed: bytes, qkd=("6f1c2a5e-0000-4000-8000-000000000001",)):
    return SessionSecret(SecretBytes(seed * (labels.HASH_LEN // len(seed))),
                         Provenance("ML-KEM-768", True, qkd))


def test_real_key_schedule_gives_identical_keys_on_both_gateways():
    a, b = ipaddress.ip_address("198.51.100.1"), ipaddress.ip_address("198.51.100.2")
    na, nb = ipaddress.ip_network("10.8.0.0/24"), ipaddress.ip_network("10.9.0.0/24")
    ba, bb = RecordingIpsecBackend(), RecordingIpsecBackend()
    ta = ipsec_tunnel(IpsecTunnelSpec("x", a, b, (na,), (nb,), reqid_base=100), ba,
                     policy=TunnelPolicy.HYBRID_REQUIRED, lifetimes=LT)
    tb = ipsec_tunnel(IpsecTunnelSpec("x", b, a, (nb,), (na,), reqid_base=100), bb,
                     policy=TunnelPolicy.HYBRID_REQUIRED, lifetimes=LT)
    ta.setup(0), tb.setup(0)
    s = real_session(b"\x11\x22")
    ta.install_inbound(7, s, "initiator", 0xC0001000, 0)
    tb.install_inbound(7, s, "responder", 0xC0002000, 0)
    ta.install_outbound(7, s, "initiator", 0xC0002000, 0)
    tb.install_outbound(7, s, "responder", 0xC0001000, 0)
    assert ba.key_of(SaId(a, b, 0xC0002000)) == bb.key_of(SaId(a, b, 0xC0002000))
    assert bb.key_of(SaId(b, a, 0xC0001000)) == ba.key_of(SaId(b, a, 0xC0001000))
    ma, mba, mb, mbb = pair(schedule=None)
    # the default schedule is qkdgate.keymix.schedule
    generation(ma, mb, 1, s)
    la, lb = mba.links["qm-a"], mbb.links["qm-b"]
    an = la.encoding_an
    assert la.tx[an].key == lb.rx[ma.driver.local_sci][an].key


def test_install_with_bad_an_is_refused():
    ta, ba, tb, bb = pair()
    s = Session(b"s")
    with pytest.raises(TunnelError):
        ta.install_outbound(1, s, "initiator", 7, 0)
    assert ba.links["qm-a"].tx == {}


def test_stale_sas_of_a_crashed_run_are_removed_at_setup():
    be = RecordingMacsecBackend()
    spec = MacsecTunnelSpec("m1", MacsecLinkSpec("qm-a", "eth0"), 0x0200000000AA0001)
    be.create_link(spec.link)
    be.add_rx_sc("qm-a", spec.peer_sci)
    stale = Schedule().macsec_keys(Session(b"old"), "m1", "i2r", 1, 0, 1,
                                   MacsecCipher.GCM_AES_XPN_256)
    from qkdgate.interfaces import MacsecSaSpec
    be.add_tx_sa("qm-a", MacsecSaSpec(an=0, key=stale.sak, keyid=stale.keyid))
    be.add_rx_sa("qm-a", spec.peer_sci, MacsecSaSpec(an=2, key=stale.sak, keyid=stale.keyid))
    events = []
    t = macsec_tunnel(spec, be, policy=TunnelPolicy.HYBRID_REQUIRED, lifetimes=LT,
                     schedule=Schedule(), emit=events.append)
    t.setup(0)
    link = be.links["qm-a"]
    assert link.tx == {} and link.rx[spec.peer_sci] == {} and t.state == "blocked"
    assert events[-1] == SaStaleRemoved("m1", 2)
