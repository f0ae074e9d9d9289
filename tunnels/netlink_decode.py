"""pyroute2 declarations of the XFRM, MACsec and WireGuard netlink
messages, for decoding only: the unit tests use them as a codec independent
of ours, and a human can decode a captured dump with them.

Theory of operation: nothing shipped sends or parses with these classes
(requests and dumps go through the tables and layouts of
:mod:`qkdgate.tunnels.xfrm_msg`, ``macsec_msg`` and ``wireguard_msg``), so
they live apart from those tables: importing ``pyroute2.netlink`` runs
pyroute2's package ``__init__``, which loads its whole library (asyncio,
NDB, IPDB, conntrack...): about 0.4 s on an idle host, seconds more under
load and tens of seconds in a starved TCG VM. ``qkdgate failsafe`` (the
unit's ExecStopPost, racing TimeoutStopSec) and the daemon's start import
the tables and must not pay for it.
"""

from __future__ import annotations

from pyroute2.netlink import genlmsg, nla, nlmsg

from qkdgate.tunnels.xfrm_msg import (
    xfrm_algo_aead,
    xfrm_encap_tmpl,
    xfrm_lifetime_cur,
    xfrm_mark,
    xfrm_replay_state_esn,
    xfrm_user_expire,
    xfrm_user_tmpl,
    xfrm_userpolicy_id,
    xfrm_userpolicy_info,
    xfrm_usersa_id,
    xfrm_usersa_info,
    xfrm_userspi_info,
)

# --------------------------------------------------------------------------
# XFRM (include/uapi/linux/xfrm.h), from the field tables in xfrm_msg
# --------------------------------------------------------------------------

class _xfrm_nlas:
    nla_map = (
        ("XFRMA_UNSPEC", "none"), ("XFRMA_ALG_AUTH", "hex"), ("XFRMA_ALG_CRYPT", "hex"),
        ("XFRMA_ALG_COMP", "hex"), ("XFRMA_ENCAP", "xfrm_encap_tmpl"),
        ("XFRMA_TMPL", "xfrm_user_tmpl"), ("XFRMA_SA", "hex"), ("XFRMA_POLICY", "hex"),
        ("XFRMA_SEC_CTX", "hex"), ("XFRMA_LTIME_VAL", "xfrm_lifetime_cur"),
        ("XFRMA_REPLAY_VAL", "hex"), ("XFRMA_REPLAY_THRESH", "uint32"),
        ("XFRMA_ETIMER_THRESH", "uint32"), ("XFRMA_SRCADDR", "hex"), ("XFRMA_COADDR", "hex"),
        ("XFRMA_LASTUSED", "uint64"), ("XFRMA_POLICY_TYPE", "hex"), ("XFRMA_MIGRATE", "hex"),
        ("XFRMA_ALG_AEAD", "xfrm_algo_aead"), ("XFRMA_KMADDRESS", "hex"),
        ("XFRMA_ALG_AUTH_TRUNC", "hex"), ("XFRMA_MARK", "xfrm_mark"),
        ("XFRMA_TFCPAD", "uint32"), ("XFRMA_REPLAY_ESN_VAL", "xfrm_replay_state_esn"),
        ("XFRMA_SA_EXTRA_FLAGS", "uint32"), ("XFRMA_PROTO", "uint8"),
        ("XFRMA_ADDRESS_FILTER", "hex"), ("XFRMA_PAD", "hex"), ("XFRMA_OFFLOAD_DEV", "hex"),
        ("XFRMA_SET_MARK", "uint32"), ("XFRMA_SET_MARK_MASK", "uint32"),
        ("XFRMA_IF_ID", "uint32"),
    )

    class xfrm_encap_tmpl(nla):
        fields = xfrm_encap_tmpl

    class xfrm_user_tmpl(nla):
        fields = xfrm_user_tmpl

    class xfrm_lifetime_cur(nla):
        fields = xfrm_lifetime_cur

    class xfrm_algo_aead(nla):
        fields = xfrm_algo_aead   # alg_key[] follows; not decoded (secret)

    class xfrm_mark(nla):
        fields = xfrm_mark

    class xfrm_replay_state_esn(nla):
        fields = xfrm_replay_state_esn


class xfrm_usersa_info_msg(_xfrm_nlas, nlmsg):
    fields = xfrm_usersa_info


class xfrm_usersa_id_msg(_xfrm_nlas, nlmsg):
    fields = xfrm_usersa_id


class xfrm_userpolicy_info_msg(_xfrm_nlas, nlmsg):
    fields = xfrm_userpolicy_info


class xfrm_userpolicy_id_msg(_xfrm_nlas, nlmsg):
    fields = xfrm_userpolicy_id


class xfrm_userspi_info_msg(_xfrm_nlas, nlmsg):
    fields = xfrm_userspi_info


class xfrm_user_expire_msg(_xfrm_nlas, nlmsg):
    fields = xfrm_user_expire


# --------------------------------------------------------------------------
# MACsec (include/uapi/linux/if_macsec.h), names as in macsec_msg
# --------------------------------------------------------------------------

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


# --------------------------------------------------------------------------
# WireGuard (include/uapi/linux/wireguard.h), names as in wireguard_msg
# --------------------------------------------------------------------------

class wg_genlmsg(genlmsg):
    """The wireguard family in pyroute2's declaration style (decoding only)."""

    prefix = "WGDEVICE_A_"
    nla_map = (
        ("WGDEVICE_A_UNSPEC", "none"), ("WGDEVICE_A_IFINDEX", "uint32"),
        ("WGDEVICE_A_IFNAME", "asciiz"), ("WGDEVICE_A_PRIVATE_KEY", "hex"),
        ("WGDEVICE_A_PUBLIC_KEY", "hex"), ("WGDEVICE_A_FLAGS", "uint32"),
        ("WGDEVICE_A_LISTEN_PORT", "uint16"), ("WGDEVICE_A_FWMARK", "uint32"),
        ("WGDEVICE_A_PEERS", "hex"),
    )

    class peer(nla):
        nla_map = (
            ("WGPEER_A_UNSPEC", "none"), ("WGPEER_A_PUBLIC_KEY", "hex"),
            ("WGPEER_A_PRESHARED_KEY", "hex"), ("WGPEER_A_FLAGS", "uint32"),
            ("WGPEER_A_ENDPOINT", "hex"), ("WGPEER_A_PERSISTENT_KEEPALIVE_INTERVAL", "uint16"),
            ("WGPEER_A_LAST_HANDSHAKE_TIME", "hex"), ("WGPEER_A_RX_BYTES", "uint64"),
            ("WGPEER_A_TX_BYTES", "uint64"), ("WGPEER_A_ALLOWEDIPS", "hex"),
            ("WGPEER_A_PROTOCOL_VERSION", "uint32"),
        )
