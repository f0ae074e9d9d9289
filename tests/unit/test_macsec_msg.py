"""MACsec netlink encoding: constants against the uapi headers, and the
SA configuration each cipher suite needs (PN width, SSCI, salt), checked
without a kernel by recording what the backend would send."""

from __future__ import annotations

import struct

import pytest

from qkdgate.errors import LocalProtocolError
from qkdgate.interfaces import MacsecSaSpec
from qkdgate.keymix.secret import SecretBytes
from qkdgate.tunnels import macsec_msg as m
from qkdgate.tunnels import netlink_decode
from qkdgate.tunnels.macsec import MacsecBackend
from qkdgate.tunnels.netlink import GENLMSGHDR, parse_nlas


def test_constants_match_the_headers():
    # values from include/uapi/linux/if_macsec.h and if_link.h (Linux 6.1)
    assert (m.MACSEC_SA_ATTR_KEYID, m.MACSEC_SA_ATTR_SSCI, m.MACSEC_SA_ATTR_SALT) == (5, 8, 9)
    assert (m.MACSEC_ATTR_TXSA_LIST, m.MACSEC_ATTR_RXSC_LIST, m.MACSEC_CMD_UPD_OFFLOAD) == (5, 6, 10)
    assert (m.MACSEC_CMD_ADD_TXSA, m.MACSEC_CMD_UPD_TXSA, m.MACSEC_CMD_DEL_RXSA) == (4, 6, 8)
    assert (m.IFLA_MACSEC_ENCODING_SA, m.IFLA_MACSEC_VALIDATION, m.IFLA_MACSEC_OFFLOAD) == (6, 13, 15)
    assert m.MACSEC_CIPHER_ID_GCM_AES_XPN_256 == 0x0080C20001000004
    assert m.RXSC_STATS_NAMES[9] == "IN_PKTS_NOT_USING_SA"


class Recorder(MacsecBackend):
    """The backend with its sockets replaced by a recorder of genl commands."""

    def __init__(self, xpn: bool) -> None:  # no sockets
        self.netns, self.registry, self._family = None, None, 0x20
        self._xpn = {"ms0": xpn}
        self.sent: list[tuple[int, dict[int, bytes]]] = []

    def ifindex(self, name: str, op: str = "get_link") -> int:
        return 7

    def _cmd(self, op, cmd, *attrs, dump=False):
        self.sent.append((cmd, parse_nlas(b"".join(attrs))))
        return []


def _sa(**kw) -> MacsecSaSpec:
    base = dict(an=2, key=SecretBytes(bytes(range(32))), keyid=bytes(16), pn=5)
    base.update(kw)
    return MacsecSaSpec(**base)


def test_xpn_tx_sa_carries_u64_pn_big_endian_ssci_and_salt():
    r = Recorder(xpn=True)
    r.add_tx_sa("ms0", _sa(ssci=1, salt=SecretBytes(b"\x11" * 12)))
    cmd, attrs = r.sent[0]
    assert cmd == m.MACSEC_CMD_ADD_TXSA and struct.unpack("=I", attrs[m.MACSEC_ATTR_IFINDEX])[0] == 7
    sa = parse_nlas(attrs[m.MACSEC_ATTR_SA_CONFIG])
    assert sa[m.MACSEC_SA_ATTR_AN] == b"\x02" and sa[m.MACSEC_SA_ATTR_ACTIVE] == b"\x01"
    assert sa[m.MACSEC_SA_ATTR_PN] == struct.pack("=Q", 5)
    assert sa[m.MACSEC_SA_ATTR_SSCI] == b"\x00\x00\x00\x01"   # as it appears in the XPN IV
    assert sa[m.MACSEC_SA_ATTR_SALT] == b"\x11" * 12
    assert sa[m.MACSEC_SA_ATTR_KEY] == bytes(range(32)) and len(sa[m.MACSEC_SA_ATTR_KEYID]) == 16


def test_gcm_rx_sa_has_u32_pn_and_sci_big_endian():
    r = Recorder(xpn=False)
    r.add_rx_sa("ms0", 0x0200_0000_0001_0001, _sa(pn=1))
    cmd, attrs = r.sent[0]
    assert cmd == m.MACSEC_CMD_ADD_RXSA
    rxsc = parse_nlas(attrs[m.MACSEC_ATTR_RXSC_CONFIG])
    assert rxsc[m.MACSEC_RXSC_ATTR_SCI] == bytes.fromhex("0200000000010001")
    sa = parse_nlas(attrs[m.MACSEC_ATTR_SA_CONFIG])
    assert sa[m.MACSEC_SA_ATTR_PN] == struct.pack("=I", 1)
    assert m.MACSEC_SA_ATTR_SSCI not in sa and m.MACSEC_SA_ATTR_SALT not in sa


@pytest.mark.parametrize("kw, why", [
    (dict(ssci=None, salt=None), "XPN without SSCI/salt"),
    (dict(ssci=1, salt=SecretBytes(b"x" * 11)), "short salt"),
    (dict(ssci=1, salt=SecretBytes(b"x" * 12), key=SecretBytes(b"k" * 16)), "128-bit SAK"),
    (dict(ssci=1, salt=SecretBytes(b"x" * 12), pn=0), "PN 0"),
])
def test_bad_sa_specs_are_refused_before_the_kernel(kw, why):
    r = Recorder(xpn=True)
    with pytest.raises(LocalProtocolError):
        r.add_tx_sa("ms0", _sa(**kw))
    assert r.sent == [], why


def test_deactivate_and_delete_carry_only_the_an():
    r = Recorder(xpn=True)
    r.set_tx_sa_active("ms0", 3, False)
    r.remove_rx_sa("ms0", 0x1234, 3)
    (c1, a1), (c2, a2) = r.sent
    assert c1 == m.MACSEC_CMD_UPD_TXSA
    assert parse_nlas(a1[m.MACSEC_ATTR_SA_CONFIG]) == {m.MACSEC_SA_ATTR_AN: b"\x03",
                                                      m.MACSEC_SA_ATTR_ACTIVE: b"\x00"}
    assert c2 == m.MACSEC_CMD_DEL_RXSA
    assert parse_nlas(a2[m.MACSEC_ATTR_SA_CONFIG]) == {m.MACSEC_SA_ATTR_AN: b"\x03"}
    with pytest.raises(LocalProtocolError):
        r.set_tx_sa_active("ms0", 4, True)


def test_pyroute2_declaration_decodes_a_request():
    r = Recorder(xpn=True)
    r.add_tx_sa("ms0", _sa(ssci=2, salt=SecretBytes(b"\x22" * 12)))
    _, attrs = r.sent[0]
    from qkdgate.tunnels.netlink import nla, nla_nested
    body = GENLMSGHDR.pack(m.MACSEC_CMD_ADD_TXSA, 1, 0) + nla(m.MACSEC_ATTR_IFINDEX, attrs[1]) + \
        nla_nested(m.MACSEC_ATTR_SA_CONFIG, attrs[m.MACSEC_ATTR_SA_CONFIG])
    msg = netlink_decode.macsec_genlmsg(struct.pack("=IHHII", 16 + len(body), 0x20, 5, 1, 0) + body)
    msg.decode()
    assert msg.get_attr("MACSEC_ATTR_IFINDEX") == 7
    sa = msg.get_attr("MACSEC_ATTR_SA_CONFIG")
    assert sa.get_attr("MACSEC_SA_ATTR_AN") == 2 and sa.get_attr("MACSEC_SA_ATTR_SSCI") == 2
