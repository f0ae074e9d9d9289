"""Kernel test 5: 200 tunnels on one gateway pair, installed and rekeyed
make-before-break through one XFRM socket per gateway; every SA is read
back after install, every out policy ends up naming its tunnel's newest
generation, and tunnel 0 carries traffic before and after."""

from __future__ import annotations

import ipaddress
import time

from kernel_lab import HA, HB, LAN_A, LAN_B, Capture, IpsecPair, Stream, analyse_pcap, fixed_session

from qkdgate.interfaces import Direction
from qkdgate.tunnels.xfrm import XfrmBackend

N = 200


def _stream_ok(topo, seconds: float = 1.0) -> None:
    s = Stream(topo.hA, topo.hB, HA, HB, rate=200).start()
    time.sleep(seconds)
    s.stop(drain=0.5)
    assert len(s.sent_at) > 100 and not s.lost(), (len(s.sent_at), len(s.lost()))


def test_200_tunnels_installed_and_rekeyed(topo, tmp_path):
    session = fixed_session()
    a, b = XfrmBackend(topo.gA), XfrmBackend(topo.gB)
    pairs = []
    t0 = time.monotonic()
    for i in range(N):
        nets = ((LAN_A, LAN_B) if i == 0 else
                (ipaddress.ip_network(f"172.20.{i}.0/24"), ipaddress.ip_network(f"172.21.{i}.0/24")))
        p = IpsecPair(topo, session, f"t{i}", base=0x10000 + 16 * i, a_net=nets[0],
                      b_net=nets[1], be_a=a, be_b=b, grace=0.0)
        p.setup()
        pairs.append(p)
    t_install = time.monotonic() - t0
    _stream_ok(topo)
    cap = Capture(topo, str(tmp_path / "scale.pcap"))
    t0 = time.monotonic()
    for p in pairs:
        p.rekey()
    t_rekey = time.monotonic() - t0
    _stream_ok(topo)
    rep = analyse_pcap(cap.stop())
    print(f"{N} tunnels: install {t_install:.1f} s, rekey all {t_rekey:.1f} s "
          f"({1000 * t_rekey / N:.1f} ms per tunnel, both gateways)")
    for be, side in ((a, "a"), (b, "b")):
        sas = be.list_sas()
        assert len(sas) == 2 * N                          # one generation left, in + out
        assert all(st.aead == "rfc4106(gcm(aes))" and st.key_bits == 288 for st in sas)
        pols = be.list_policies()
        assert len(pols) == 3 * N
        outs = {(p.selector.src, p.selector.dst): p.template.reqid
                for p in pols if p.direction is Direction.OUT}
        for pair in pairs:
            sel = pair._out_policy(side, 0).selector
            assert outs[(sel.src, sel.dst)] == pair.gens[-1].out_reqid_a
    assert rep.esp > 0 and rep.cleartext == 0 and rep.pattern_hits == 0, rep
    assert {pairs[0].gens[-1].spi_ab} <= set(rep.spis)
