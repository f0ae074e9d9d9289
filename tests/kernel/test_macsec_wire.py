"""Kernel tests 1 and 2 for MACsec: only 802.1AE frames on the wire, and
scapy's MACsec layer decrypts them with the SAK keymix derived."""

from __future__ import annotations

import time

import pytest
from cryptography.exceptions import InvalidTag
from kernel_lab import MS_A, MS_B, PATTERN, Capture, MacsecPair, Stream, analyse_pcap, fixed_session
from scapy.contrib.macsec import MACsec, MACsecSA
from scapy.utils import rdpcap

from qkdgate.interfaces import MacsecCipher


@pytest.mark.parametrize("cipher", [MacsecCipher.GCM_AES_XPN_256, MacsecCipher.GCM_AES_256],
                         ids=["xpn256", "gcm256"])
def test_macsec_frames_only_and_scapy_decrypts(topo, tmp_path, cipher):
    pair = MacsecPair(topo, fixed_session(), cipher=cipher)
    pair.setup()
    pair.rotate()
    cap = Capture(topo, str(tmp_path / "ms.pcap"))
    s = Stream(topo.gA, topo.gB, MS_A, MS_B, rate=100).start()
    time.sleep(1.5)
    s.stop(drain=0.5)
    path = cap.stop()
    rep = analyse_pcap(path)
    assert s.received and not s.lost(), f"lost {len(s.lost())}/{len(s.sent_at)}"
    assert rep.macsec >= len(s.sent_at) and rep.cleartext == 0 and rep.pattern_hits == 0, rep
    st = pair.a.query_tx_sa("ms0", pair.an)
    assert st.active and st.next_pn > len(s.sent_at) // 2
    assert pair.a.encoding_sa("ms0") == pair.an
    def sci_of(p) -> bytes:
        sci = p[MACsec].SCI
        return sci.to_bytes(8, "big") if isinstance(sci, int) else bytes(sci)
    frames = [p for p in rdpcap(path) if MACsec in p and pair.an == p[MACsec].AN
              and sci_of(p) == pair.sci_a.to_bytes(8, "big")]
    assert frames, ("no frame from A's SC captured",
                    {(sci_of(p).hex(), p[MACsec].AN) for p in rdpcap(path) if MACsec in p},
                    hex(pair.sci_a), pair.an)
    k = pair.keys("i2r", pair.an, pair.gen)
    xpn = cipher is MacsecCipher.GCM_AES_XPN_256

    def sa(key: bytes, salt=None):
        return MACsecSA(sci=pair.sci_a.to_bytes(8, "big"), an=pair.an, pn=0, key=key, icvlen=16,
                        encrypt=1, send_sci=1, xpn_en=xpn, ssci=k.ssci if xpn else None,
                        salt=salt if xpn else None)
    salt = k.salt.reveal() if xpn else None
    frame = max(frames, key=len)          # a stream datagram, not an ARP frame
    clear = sa(k.sak.reveal(), salt).decrypt(frame)
    assert PATTERN in bytes(clear)
    bad = bytearray(k.sak.reveal())
    bad[0] ^= 0x80
    with pytest.raises(InvalidTag):
        sa(bytes(bad), salt).decrypt(frame)
    if xpn:
        bad_salt = bytearray(salt)
        bad_salt[11] ^= 1
        with pytest.raises(InvalidTag):
            sa(k.sak.reveal(), bytes(bad_salt)).decrypt(frame)
