"""MACsec netlink declarations: the ``macsec`` generic-netlink family
(include/uapi/linux/if_macsec.h) and the rtnetlink link attributes
(include/uapi/linux/if_link.h ``IFLA_MACSEC_*``).

Theory of operation: names are copied verbatim from the headers so they
grep; values are checked by tests/unit/test_macsec_msg.py against a C
program including the headers. The pyroute2 ``genlmsg`` class declares the
attribute tree in pyroute2's style and decodes dumps in tests; requests are
packed by :mod:`qkdgate.tunnels.macsec` with :func:`~qkdgate.tunnels.netlink.nla`,
which is all these small messages need.

Byte order (drivers/net/macsec.c): ``sci_t`` travels as the raw big-endian
64-bit SCI (``nla_put_sci`` copies its memory), ``IFLA_MACSEC_PORT`` is
``__be16``, the cipher suite is a host-order u64, PN is u32 or (XPN) u64,
SSCI is four raw bytes placed into the XPN IV (sent big-endian, as
IEEE 802.1AEbw-2013 10.5.2 writes it), the salt 12 raw bytes.
"""

from __future__ import annotations

from pyroute2.netlink import genlmsg, nla

MACSEC_GENL_NAME = "macsec"
MACSEC_GENL_VERSION = 1
MACSEC_KEYID_LEN = 16
MACSEC_SALT_LEN = 12

MACSEC_CIPHER_ID_GCM_AES_128 = 0x0080C20001000001
MACSEC_CIPHER_ID_GCM_AES_256 = 0x0080C20001000002
MACSEC_CIPHER_ID_GCM_AES_XPN_128 = 0x0080C20001000003
MACSEC_CIPHER_ID_GCM_AES_XPN_256 = 0x0080C20001000004

# enum macsec_attrs
(MACSEC_ATTR_UNSPEC, MACSEC_ATTR_IFINDEX, MACSEC_ATTR_RXSC_CONFIG, MACSEC_ATTR_SA_CONFIG,
 MACSEC_ATTR_SECY, MACSEC_ATTR_TXSA_LIST, MACSEC_ATTR_RXSC_LIST, MACSEC_ATTR_TXSC_STATS,
 MACSEC_ATTR_SECY_STATS, MACSEC_ATTR_OFFLOAD) = range(10)
# enum macsec_secy_attrs
(MACSEC_SECY_ATTR_UNSPEC, MACSEC_SECY_ATTR_SCI, MACSEC_SECY_ATTR_ENCODING_SA,
 MACSEC_SECY_ATTR_WINDOW, MACSEC_SECY_ATTR_CIPHER_SUITE, MACSEC_SECY_ATTR_ICV_LEN,
 MACSEC_SECY_ATTR_PROTECT, MACSEC_SECY_ATTR_REPLAY, MACSEC_SECY_ATTR_OPER,
 MACSEC_SECY_ATTR_VALIDATE, MACSEC_SECY_ATTR_ENCRYPT, MACSEC_SECY_ATTR_INC_SCI,
 MACSEC_SECY_ATTR_ES, MACSEC_SECY_ATTR_SCB, MACSEC_SECY_ATTR_PAD) = range(15)
# enum macsec_rxsc_attrs
(MACSEC_RXSC_ATTR_UNSPEC, MACSEC_RXSC_ATTR_SCI, MACSEC_RXSC_ATTR_ACTIVE,
 MACSEC_RXSC_ATTR_SA_LIST, MACSEC_RXSC_ATTR_STATS, MACSEC_RXSC_ATTR_PAD) = range(6)
# enum macsec_sa_attrs
(MACSEC_SA_ATTR_UNSPEC, MACSEC_SA_ATTR_AN, MACSEC_SA_ATTR_ACTIVE, MACSEC_SA_ATTR_PN,
 MACSEC_SA_ATTR_KEY, MACSEC_SA_ATTR_KEYID, MACSEC_SA_ATTR_STATS, MACSEC_SA_ATTR_PAD,
 MACSEC_SA_ATTR_SSCI, MACSEC_SA_ATTR_SALT) = range(10)
# enum macsec_sa_stats_attr
(MACSEC_SA_STATS_ATTR_UNSPEC, MACSEC_SA_STATS_ATTR_IN_PKTS_OK,
 MACSEC_SA_STATS_ATTR_IN_PKTS_INVALID, MACSEC_SA_STATS_ATTR_IN_PKTS_NOT_VALID,
 MACSEC_SA_STATS_ATTR_IN_PKTS_NOT_USING_SA, MACSEC_SA_STATS_ATTR_IN_PKTS_UNUSED_SA,
 MACSEC_SA_STATS_ATTR_OUT_PKTS_PROTECTED, MACSEC_SA_STATS_ATTR_OUT_PKTS_ENCRYPTED) = range(8)
# enum macsec_rxsc_stats_attr (u64 each), index -> name without MACSEC_RXSC_STATS_ATTR_
RXSC_STATS_NAMES = ("", "IN_OCTETS_VALIDATED", "IN_OCTETS_DECRYPTED", "IN_PKTS_UNCHECKED",
                    "IN_PKTS_DELAYED", "IN_PKTS_OK", "IN_PKTS_INVALID", "IN_PKTS_LATE",
                    "IN_PKTS_NOT_VALID", "IN_PKTS_NOT_USING_SA", "IN_PKTS_UNUSED_SA")
# enum macsec_nl_commands
(MACSEC_CMD_GET_TXSC, MACSEC_CMD_ADD_RXSC, MACSEC_CMD_DEL_RXSC, MACSEC_CMD_UPD_RXSC,
 MACSEC_CMD_ADD_TXSA, MACSEC_CMD_DEL_TXSA, MACSEC_CMD_UPD_TXSA, MACSEC_CMD_ADD_RXSA,
 MACSEC_CMD_DEL_RXSA, MACSEC_CMD_UPD_RXSA, MACSEC_CMD_UPD_OFFLOAD) = range(11)

# include/uapi/linux/if_link.h, IFLA_MACSEC_*
(IFLA_MACSEC_UNSPEC, IFLA_MACSEC_SCI, IFLA_MACSEC_PORT, IFLA_MACSEC_ICV_LEN,
 IFLA_MACSEC_CIPHER_SUITE, IFLA_MACSEC_WINDOW, IFLA_MACSEC_ENCODING_SA, IFLA_MACSEC_ENCRYPT,
 IFLA_MACSEC_PROTECT, IFLA_MACSEC_INC_SCI, IFLA_MACSEC_ES, IFLA_MACSEC_SCB,
 IFLA_MACSEC_REPLAY_PROTECT, IFLA_MACSEC_VALIDATION, IFLA_MACSEC_PAD,
 IFLA_MACSEC_OFFLOAD) = range(16)
MACSEC_VALIDATE_DISABLED, MACSEC_VALIDATE_CHECK, MACSEC_VALIDATE_STRICT = 0, 1, 2

# rtnetlink basics (linux/rtnetlink.h, if_link.h; the generic netlink
# controller is in tunnels/netlink.py)
RTM_NEWLINK, RTM_DELLINK, RTM_GETLINK = 16, 17, 18
IFLA_ADDRESS, IFLA_IFNAME, IFLA_LINK, IFLA_OPERSTATE, IFLA_LINKINFO = 1, 3, 5, 16, 18
IFLA_INFO_KIND, IFLA_INFO_DATA = 1, 2
IFF_UP = 0x1


class macsec_genlmsg(genlmsg):
    """The macsec family in pyroute2's declaration style (decoding only)."""

    prefix = "MACSEC_ATTR_"
    nla_map = (
        ("MACSEC_ATTR_UNSPEC", "none"), ("MACSEC_ATTR_IFINDEX", "uint32"),
        ("MACSEC_ATTR_RXSC_CONFIG", "rxsc"), ("MACSEC_ATTR_SA_CONFIG", "sa"),
        ("MACSEC_ATTR_SECY", "secy"), ("MACSEC_ATTR_TXSA_LIST", "hex"),
        ("MACSEC_ATTR_RXSC_LIST", "rxsc_list"), ("MACSEC_ATTR_TXSC_STATS", "hex"),
        ("MACSEC_ATTR_SECY_STATS", "hex"), ("MACSEC_ATTR_OFFLOAD", "hex"),
    )

    class sa(nla):
        nla_map = (
            ("MACSEC_SA_ATTR_UNSPEC", "none"), ("MACSEC_SA_ATTR_AN", "uint8"),
            ("MACSEC_SA_ATTR_ACTIVE", "uint8"), ("MACSEC_SA_ATTR_PN", "hex"),
            ("MACSEC_SA_ATTR_KEY", "hex"), ("MACSEC_SA_ATTR_KEYID", "hex"),
            ("MACSEC_SA_ATTR_STATS", "hex"), ("MACSEC_SA_ATTR_PAD", "hex"),
            ("MACSEC_SA_ATTR_SSCI", "be32"), ("MACSEC_SA_ATTR_SALT", "hex"),
        )

    class rxsc(nla):
        nla_map = (
            ("MACSEC_RXSC_ATTR_UNSPEC", "none"), ("MACSEC_RXSC_ATTR_SCI", "be64"),
            ("MACSEC_RXSC_ATTR_ACTIVE", "uint8"), ("MACSEC_RXSC_ATTR_SA_LIST", "hex"),
            ("MACSEC_RXSC_ATTR_STATS", "hex"), ("MACSEC_RXSC_ATTR_PAD", "hex"),
        )

    class rxsc_list(nla):
        nla_map = (("MACSEC_RXSC", "hex"),)

    class secy(nla):
        nla_map = (
            ("MACSEC_SECY_ATTR_UNSPEC", "none"), ("MACSEC_SECY_ATTR_SCI", "be64"),
            ("MACSEC_SECY_ATTR_ENCODING_SA", "uint8"), ("MACSEC_SECY_ATTR_WINDOW", "uint32"),
            ("MACSEC_SECY_ATTR_CIPHER_SUITE", "uint64"), ("MACSEC_SECY_ATTR_ICV_LEN", "uint8"),
            ("MACSEC_SECY_ATTR_PROTECT", "uint8"), ("MACSEC_SECY_ATTR_REPLAY", "uint8"),
            ("MACSEC_SECY_ATTR_OPER", "uint8"), ("MACSEC_SECY_ATTR_VALIDATE", "uint8"),
            ("MACSEC_SECY_ATTR_ENCRYPT", "uint8"), ("MACSEC_SECY_ATTR_INC_SCI", "uint8"),
            ("MACSEC_SECY_ATTR_ES", "uint8"), ("MACSEC_SECY_ATTR_SCB", "uint8"),
            ("MACSEC_SECY_ATTR_PAD", "hex"),
        )
