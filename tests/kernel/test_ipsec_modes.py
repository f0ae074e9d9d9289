"""Route-based IPsec (an XFRM interface, policies and SAs with if_id) and
transport mode between the gateways, rekeyed under traffic, ESP only on the wire."""

from __future__ import annotations

import ipaddress
import time

from kernel_lab import (
    GA,
    GB,
    HA,
    HB,
    Capture,
    IpsecPair,
    Stream,
    analyse_pcap,
    fixed_session,
    ipbatch,
)

from qkdgate.interfaces import Mode


def _run(topo, tmp_path, pair, src_ns, dst_ns, src, dst, name):
    pair.setup()
    cap = Capture(topo, str(tmp_path / f"{name}.pcap"))
    s = Stream(src_ns, dst_ns, src, dst, rate=200).start()
    time.sleep(0.7)
    for _ in range(3):
        pair.rekey()
        time.sleep(0.2)
    time.sleep(0.5)
    s.stop(drain=0.5)
    rep = analyse_pcap(cap.stop())
    assert len(s.sent_at) > 200 and not s.lost(), (len(s.sent_at), len(s.lost()))
    assert rep.esp >= len(s.sent_at) and rep.pattern_hits == 0 and rep.cleartext == 0, rep
    assert len({g.spi_ab for g in pair.gens} & set(rep.spis)) >= 3
    return rep


def test_route_based_with_if_id(topo, tmp_path):
    for g, peer_lan, _via in ((topo.gA, "10.2.0.0/24", "192.0.2.2"),
                             (topo.gB, "10.1.0.0/24", "192.0.2.1")):
        ipbatch(["link add ipsec42 type xfrm dev w0 if_id 42", "link set ipsec42 up",
                 f"route replace {peer_lan} dev ipsec42"], g)
    try:
        pair = IpsecPair(topo, fixed_session(), "xfrmi", if_id=42)
        _run(topo, tmp_path, pair, topo.hA, topo.hB, HA, HB, "xfrmi")
        pols = pair.a.list_policies()
        assert pols and all(p.if_id == 42 for p in pols)
        assert all(st.sa_id.if_id == 42 for st in pair.a.list_sas())
    finally:
        for g, peer_lan, via in ((topo.gA, "10.2.0.0/24", "192.0.2.2"),
                                 (topo.gB, "10.1.0.0/24", "192.0.2.1")):
            ipbatch([f"route replace {peer_lan} via {via}", "link del ipsec42"], g)


def test_transport_mode_between_gateways(topo, tmp_path):
    pair = IpsecPair(topo, fixed_session(), "tr", mode=Mode.TRANSPORT,
                     a_net=ipaddress.ip_network(f"{GA}/32"), b_net=ipaddress.ip_network(f"{GB}/32"))
    _run(topo, tmp_path, pair, topo.gA, topo.gB, GA, GB, "transport")
