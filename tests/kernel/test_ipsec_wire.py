"""Kernel tests 1 and 2 for IPsec: the wire carries ESP only, injected
cleartext never reaches the protected side, and scapy independently
decrypts what the kernel sent with the key keymix derived for that SPI."""

from __future__ import annotations

import errno
import socket
import time

import pytest
from kernel_lab import (
    GA,
    GA6,
    GB,
    GB6,
    HA,
    HA6,
    HB,
    HB6,
    LAN_A6,
    LAN_B6,
    PATTERN,
    Capture,
    IpsecPair,
    Stream,
    analyse_pcap,
    fixed_session,
    inject,
    mac_of,
    xfrm_stats,
)
from scapy.layers.inet import IP, UDP
from scapy.layers.inet6 import IPv6
from scapy.layers.ipsec import ESP, IPSecIntegrityError, SecurityAssociation
from scapy.layers.l2 import Ether
from scapy.utils import rdpcap

from qkdgate.interfaces import SaId, UdpEncap
from qkdgate.tunnels.netlink import open_socket_in_netns
from qkdgate.tunnels.xfrm import XfrmBackend


def test_esp_only_on_the_wire_and_sa_read_back(topo, tmp_path):
    pair = IpsecPair(topo, fixed_session())
    pair.setup()
    cap = Capture(topo, str(tmp_path / "wire.pcap"))
    s = Stream(topo.hA, topo.hB, HA, HB, rate=300).start()
    time.sleep(1.0)
    pair.rekey()
    time.sleep(1.0)
    s.stop()
    rep = analyse_pcap(cap.stop())
    assert cap.dropped == 0
    assert len(s.sent_at) > 300 and not s.lost(), f"lost {len(s.lost())} of {len(s.sent_at)}"
    assert rep.esp >= len(s.sent_at), rep
    assert rep.cleartext == 0 and rep.pattern_hits == 0, rep
    g = pair.gens[-1]
    st = pair.a.query_sa(SaId(GA, GB, g.spi_ab))
    assert (st.aead, st.key_bits, st.icv_bits, st.replay_window) == ("rfc4106(gcm(aes))", 288, 128, 1024)
    assert st.packets > 0 and st.reqid == g.out_reqid_a
    # the counter poll's one dump reads the same counters as the per-SA query
    (ctr, gone) = pair.a.read_counters([SaId(GA, GB, g.spi_ab), SaId(GA, GB, 0xC0FFFFFE)])
    assert (ctr.spi, ctr.packets, ctr.bytes) == (g.spi_ab, st.packets, st.bytes)
    assert getattr(gone, "errno", None) == errno.ESRCH


def test_injected_cleartext_never_reaches_host_b(topo):
    pair = IpsecPair(topo, fixed_session())
    pair.setup()
    rx = open_socket_in_netns(socket.AF_INET, socket.SOCK_DGRAM, topo.hB)
    rx.bind((str(HB), 5002))
    rx.settimeout(1.0)
    dst_mac = mac_of(topo.gB, "w0")
    before = xfrm_stats(topo.gB)

    def frame(src: str) -> bytes:
        return bytes(Ether(dst=dst_mac, src="02:00:00:00:00:99") /
                     IP(src=src, dst=str(HB), ttl=64) / UDP(sport=1234, dport=5002) /
                     (b"INJECTED-" + src.encode()))
    try:
        inject(topo, frame(str(HA)))          # spoofs protected host A: must be dropped
        with pytest.raises(socket.timeout):
            rx.recv(100)
        after = xfrm_stats(topo.gB)
        dropped = sum(after[k] - before[k] for k in ("XfrmInNoPols", "XfrmInTmplMismatch",
                                                     "XfrmFwdHdrError", "XfrmInPolBlock"))
        assert dropped >= 1, (before, after)
        inject(topo, frame("192.0.2.77"))     # control: unprotected source is forwarded
        assert rx.recv(100) == b"INJECTED-192.0.2.77"
    finally:
        rx.close()


def _first_esp(pcap: str, spi: int):
    for p in rdpcap(pcap):
        if ESP in p and p[ESP].spi == spi:
            return p
    raise AssertionError(f"no ESP packet with SPI {spi:#x} captured")


@pytest.mark.parametrize("v6", [False, True], ids=["ipv4", "ipv6"])
def test_scapy_decrypts_with_the_keymix_key(topo, tmp_path, v6):
    kw = dict(a_net=LAN_A6, b_net=LAN_B6, ga=GA6, gb=GB6) if v6 else {}
    pair = IpsecPair(topo, fixed_session(), "t6" if v6 else "t4", **kw)
    pair.setup()
    pair.rekey()                        # decrypt a generation-2 packet
    cap = Capture(topo, str(tmp_path / "esp.pcap"))
    s = Stream(topo.hA, topo.hB, HA6 if v6 else HA, HB6 if v6 else HB, rate=50).start()
    time.sleep(1.0)
    s.stop(drain=0.5)
    path = cap.stop()
    assert s.received and not s.lost()
    g = pair.gens[-1]
    pkt = _first_esp(path, g.spi_ab)
    key, _ = pair.key_for_spi(g.spi_ab)
    outer = IPv6 if v6 else IP
    hdr = outer(src=str(pair.ga), dst=str(pair.gb))
    sa = SecurityAssociation(ESP, spi=g.spi_ab, crypt_algo="AES-GCM", crypt_key=key.reveal(),
                             tunnel_header=hdr, esn_en=True, esn=0)
    # decrypt() strips the ESP layer from the packet it is given: each try gets a copy
    inner = sa.decrypt(pkt[outer].copy())
    assert PATTERN in bytes(inner)
    assert str(inner.src) == str(HA6 if v6 else HA)
    bad = bytearray(key.reveal())
    bad[5] ^= 0x01
    wrong = SecurityAssociation(ESP, spi=g.spi_ab, crypt_algo="AES-GCM", crypt_key=bytes(bad),
                                tunnel_header=hdr, esn_en=True, esn=0)
    with pytest.raises(IPSecIntegrityError):
        wrong.decrypt(pkt[outer].copy())
    # the previous generation's key does not open it either
    old, _ = pair.key_for_spi(pair.gens[0].spi_ab)
    stale = SecurityAssociation(ESP, spi=g.spi_ab, crypt_algo="AES-GCM", crypt_key=old.reveal(),
                                tunnel_header=hdr, esn_en=True, esn=0)
    with pytest.raises(IPSecIntegrityError):
        stale.decrypt(pkt[outer].copy())


def test_esp_in_udp_encapsulation(topo, tmp_path):
    # RFC 3948: ESP inside UDP 4500 for NAT and UDP-only paths; the receiving
    # kernel decapsulates only on a socket marked UDP_ENCAP_ESPINUDP
    socks = [be.open_encap_socket(4500) for be in (XfrmBackend(topo.gA), XfrmBackend(topo.gB))]
    try:
        pair = IpsecPair(topo, fixed_session(), "nat", encap=UdpEncap(4500, 4500))
        pair.setup()
        cap = Capture(topo, str(tmp_path / "nat.pcap"))
        s = Stream(topo.hA, topo.hB, HA, HB, rate=100).start()
        time.sleep(1.0)
        pair.rekey()
        time.sleep(0.5)
        s.stop(drain=0.5)
        rep = analyse_pcap(cap.stop())
        assert len(s.sent_at) > 100 and not s.lost(), len(s.lost())
        assert rep.esp_in_udp >= len(s.sent_at) and rep.esp == 0, rep
        assert rep.cleartext == 0 and rep.pattern_hits == 0, rep
    finally:
        for sk in socks:
            sk.close()
