"""MacsecBackend: macsec links over rtnetlink, SCs and SAs over generic netlink.

Theory of operation: a macsec netdevice is created on a parent (physical
port or veth) with RTM_NEWLINK, kind ``macsec`` (``ip link add ... type
macsec``); its receive channels and SAs are managed through the ``macsec``
generic-netlink family, whose id is resolved once per backend. Both
sockets live in the backend's network namespace.

Hitless AN rotation (IEEE 802.1AE-2018 10.7.14, 10.7.23): install the new
RX SA on both sides, then the TX SA on the next AN, switch the encoding SA
(a changelink of ``IFLA_MACSEC_ENCODING_SA``), wait a grace period, set the
old SAs inactive and only then delete them: the kernel refuses to delete an
active SA (EBUSY). MACsec SAs carry no lifetime, so a dead daemon's key
would live on: ``qkdgate failsafe`` (:mod:`qkdgate.tunnels.failsafe`)
deactivates TX SAs and takes the link down; links this backend creates are
recorded in the tunnel registry so failsafe can find them.
"""

from __future__ import annotations

import errno
import struct

from qkdgate.errors import LocalProtocolError, TunnelError
from qkdgate.interfaces import (
    MacsecCipher,
    MacsecLinkSpec,
    MacsecSaSpec,
    MacsecSaState,
    MacsecSecyState,
)
from qkdgate.tunnels import macsec_msg as m
from qkdgate.tunnels.netlink import (
    GENLMSGHDR,
    NLM_F_CREATE,
    NLM_F_EXCL,
    NetlinkChannel,
    genl_family_id,
    iter_nlas,
    nla,
    nla_nested,
    parse_nlas,
)
from qkdgate.tunnels.state import TunnelRegistry

NETLINK_ROUTE, NETLINK_GENERIC = 0, 16
_IFINFO = struct.Struct("=BxHiII")       # struct ifinfomsg
_CIPHER_ID = {MacsecCipher.GCM_AES_256: m.MACSEC_CIPHER_ID_GCM_AES_256,
              MacsecCipher.GCM_AES_XPN_256: m.MACSEC_CIPHER_ID_GCM_AES_XPN_256}
_XPN_IDS = {m.MACSEC_CIPHER_ID_GCM_AES_XPN_128, m.MACSEC_CIPHER_ID_GCM_AES_XPN_256}


def _u8(t: int, v: int) -> bytes:
    return nla(t, struct.pack("=B", v))


def _u32(t: int, v: int) -> bytes:
    return nla(t, struct.pack("=I", v))


def _stat(stats: dict[int, bytes], t: int) -> int:
    raw = stats.get(t, b"")
    return int(struct.unpack("=I", raw[:4])[0]) if len(raw) >= 4 else 0


def _sci(t: int, sci: int) -> bytes:
    return nla(t, struct.pack(">Q", sci))   # sci_t: raw big-endian


class MacsecBackend:
    """:class:`~qkdgate.interfaces.MacsecBackend` on the Linux macsec driver."""

    def __init__(self, netns: str | None = None, *,
                 registry: TunnelRegistry | None = None) -> None:
        self.netns = netns
        self.rt = NetlinkChannel(NETLINK_ROUTE, netns)
        self.genl = NetlinkChannel(NETLINK_GENERIC, netns)
        self.registry = registry   # what failsafe reads; None: record nothing
        self._family: int | None = None
        self._xpn: dict[str, bool] = {}

    def close(self) -> None:
        self.rt.close()
        self.genl.close()

    # ------------------------------------------------------------- plumbing
    def _family_id(self) -> int:
        if self._family is None:
            self._family = genl_family_id(self.genl, m.MACSEC_GENL_NAME,
                                          "resolve_macsec_family")
        return self._family

    def _cmd(self, op: str, cmd: int, *attrs: bytes, dump: bool = False) -> list[tuple[int, bytes]]:
        body = GENLMSGHDR.pack(cmd, m.MACSEC_GENL_VERSION, 0) + b"".join(attrs)
        return self.genl.request(op, self._family_id(), body, dump=dump)

    def ifindex(self, name: str, op: str = "get_link") -> int:
        replies = self.rt.request(op, m.RTM_GETLINK, _IFINFO.pack(0, 0, 0, 0, 0)
                                  + nla(m.IFLA_IFNAME, name.encode() + b"\0"))
        if not replies:
            raise TunnelError(op, errno.ENODEV, name)
        return int(_IFINFO.unpack_from(replies[0][1])[2])

    def _ifattr(self, link: str, op: str) -> bytes:
        return _u32(m.MACSEC_ATTR_IFINDEX, self.ifindex(link, op))

    def _is_xpn(self, link: str) -> bool:
        if link not in self._xpn:
            secy = self._secy(link)
            cipher = struct.unpack("=Q", secy[m.MACSEC_SECY_ATTR_CIPHER_SUITE][:8])[0]
            self._xpn[link] = cipher in _XPN_IDS
        return self._xpn[link]

    def _txsc_dump(self, link: str) -> dict[int, bytes]:
        idx = self.ifindex(link, "query_link")
        for _t, body in self._cmd("query_link", m.MACSEC_CMD_GET_TXSC, dump=True):
            attrs = parse_nlas(body, GENLMSGHDR.size)
            if struct.unpack("=I", attrs.get(m.MACSEC_ATTR_IFINDEX, b"\0\0\0\0")[:4])[0] == idx:
                return attrs
        raise TunnelError("query_link", errno.ENODEV, f"{link} is not a macsec link")

    def _secy(self, link: str) -> dict[int, bytes]:
        return parse_nlas(self._txsc_dump(link)[m.MACSEC_ATTR_SECY])

    # ------------------------------------------------------------- links
    def create_link(self, spec: MacsecLinkSpec) -> int:
        parent = self.ifindex(spec.parent, "create_link")
        if spec.cipher not in _CIPHER_ID:
            raise LocalProtocolError(f"unsupported MACsec cipher {spec.cipher}")
        data = [nla(m.IFLA_MACSEC_PORT, struct.pack(">H", spec.port)),
                nla(m.IFLA_MACSEC_CIPHER_SUITE, struct.pack("=Q", _CIPHER_ID[spec.cipher])),
                _u8(m.IFLA_MACSEC_ICV_LEN, spec.icv_len),
                _u8(m.IFLA_MACSEC_ENCRYPT, int(spec.encrypt)),
                _u8(m.IFLA_MACSEC_PROTECT, 1),
                _u8(m.IFLA_MACSEC_VALIDATION, m.MACSEC_VALIDATE_STRICT if spec.validate_strict
                    else m.MACSEC_VALIDATE_CHECK),
                _u8(m.IFLA_MACSEC_REPLAY_PROTECT, int(spec.replay_protect))]
        if spec.replay_protect:  # the driver wants a window with replay protection
            data.append(_u32(m.IFLA_MACSEC_WINDOW, spec.replay_window))
        body = (_IFINFO.pack(0, 0, 0, 0, 0) + nla(m.IFLA_IFNAME, spec.name.encode() + b"\0")
                + _u32(m.IFLA_LINK, parent)
                + nla_nested(m.IFLA_LINKINFO, nla(m.IFLA_INFO_KIND, b"macsec"),
                             nla_nested(m.IFLA_INFO_DATA, *data)))
        self.rt.request("create_link", m.RTM_NEWLINK, body, NLM_F_CREATE | NLM_F_EXCL)
        self._xpn[spec.name] = spec.cipher is MacsecCipher.GCM_AES_XPN_256
        if self.registry is not None:
            self.registry.add_macsec_link(self.netns, spec.name)
        return self.ifindex(spec.name, "create_link")

    def destroy_link(self, name: str) -> None:
        idx = self.ifindex(name, "destroy_link")
        self.rt.request("destroy_link", m.RTM_DELLINK, _IFINFO.pack(0, 0, idx, 0, 0))
        self._xpn.pop(name, None)
        if self.registry is not None:
            self.registry.remove_macsec_link(self.netns, name)

    def set_link_up(self, name: str, up: bool) -> None:
        idx = self.ifindex(name, "set_link_up")
        self.rt.request("set_link_up", m.RTM_NEWLINK,
                        _IFINFO.pack(0, 0, idx, m.IFF_UP if up else 0, m.IFF_UP))

    def link_sci(self, name: str) -> int:
        return int(struct.unpack(">Q", self._secy(name)[m.MACSEC_SECY_ATTR_SCI][:8])[0])

    def secy_state(self, name: str) -> MacsecSecyState:
        """The link's SecY settings (MACSEC_ATTR_SECY of MACSEC_CMD_GET_TXSC;
        the kernel sends MACSEC_SECY_ATTR_WINDOW only with replay protection)."""
        secy = self._secy(name)

        def num(attr: int, fmt: str = "=B") -> int:
            raw = secy.get(attr)
            return int(struct.unpack_from(fmt, raw)[0]) if raw else 0
        suite = num(m.MACSEC_SECY_ATTR_CIPHER_SUITE, "=Q")
        cipher = next((c for c, cid in _CIPHER_ID.items() if cid == suite), None)
        return MacsecSecyState(
            cipher=cipher, icv_len=num(m.MACSEC_SECY_ATTR_ICV_LEN),
            protect=bool(num(m.MACSEC_SECY_ATTR_PROTECT)),
            encrypt=bool(num(m.MACSEC_SECY_ATTR_ENCRYPT)),
            validate_strict=num(m.MACSEC_SECY_ATTR_VALIDATE) == m.MACSEC_VALIDATE_STRICT,
            replay_protect=bool(num(m.MACSEC_SECY_ATTR_REPLAY)),
            replay_window=num(m.MACSEC_SECY_ATTR_WINDOW, "=I"))

    def set_encoding_sa(self, link: str, an: int) -> None:
        if not 0 <= an <= 3:
            raise LocalProtocolError(f"MACsec AN {an} not in 0..3")
        idx = self.ifindex(link, "set_encoding_sa")
        body = (_IFINFO.pack(0, 0, idx, 0, 0)
                + nla_nested(m.IFLA_LINKINFO, nla(m.IFLA_INFO_KIND, b"macsec"),
                             nla_nested(m.IFLA_INFO_DATA, _u8(m.IFLA_MACSEC_ENCODING_SA, an))))
        self.rt.request("set_encoding_sa", m.RTM_NEWLINK, body)

    def macsec_links(self) -> list[str]:
        """Names of every macsec link in this namespace (failsafe's sweep)."""
        names = []
        for _t, body in self.rt.request("list_links", m.RTM_GETLINK,
                                        _IFINFO.pack(0, 0, 0, 0, 0), dump=True):
            attrs = parse_nlas(body, _IFINFO.size)
            info = attrs.get(m.IFLA_LINKINFO)
            if info and parse_nlas(info).get(m.IFLA_INFO_KIND, b"").rstrip(b"\0") == b"macsec":
                names.append(attrs[m.IFLA_IFNAME].rstrip(b"\0").decode())
        return names

    # ------------------------------------------------------------- SCs and SAs
    def add_rx_sc(self, link: str, sci: int) -> None:
        self._cmd("add_rx_sc", m.MACSEC_CMD_ADD_RXSC, self._ifattr(link, "add_rx_sc"),
                  nla_nested(m.MACSEC_ATTR_RXSC_CONFIG, _sci(m.MACSEC_RXSC_ATTR_SCI, sci),
                             _u8(m.MACSEC_RXSC_ATTR_ACTIVE, 1)))

    def remove_rx_sc(self, link: str, sci: int) -> None:
        self._cmd("remove_rx_sc", m.MACSEC_CMD_DEL_RXSC, self._ifattr(link, "remove_rx_sc"),
                  nla_nested(m.MACSEC_ATTR_RXSC_CONFIG, _sci(m.MACSEC_RXSC_ATTR_SCI, sci)))

    def _sa_config(self, link: str, sa: MacsecSaSpec, op: str) -> bytes:
        xpn = self._is_xpn(link)
        if xpn and (sa.ssci is None or sa.salt is None or len(sa.salt) != m.MACSEC_SALT_LEN):
            raise LocalProtocolError(f"{op}: XPN cipher suites need an SSCI and a 12-byte salt")
        if len(sa.key) != 32:
            raise LocalProtocolError(f"{op}: a 256-bit cipher suite needs a 32-byte SAK")
        if sa.pn < 1 or sa.pn >= (1 << (64 if xpn else 32)):
            raise LocalProtocolError(f"{op}: initial PN {sa.pn} out of range")
        key = sa.key.reveal()
        try:
            attrs = [_u8(m.MACSEC_SA_ATTR_AN, sa.an), _u8(m.MACSEC_SA_ATTR_ACTIVE, int(sa.active)),
                     nla(m.MACSEC_SA_ATTR_PN, struct.pack("=Q" if xpn else "=I", sa.pn)),
                     nla(m.MACSEC_SA_ATTR_KEYID, sa.keyid), nla(m.MACSEC_SA_ATTR_KEY, key)]
        finally:
            del key
        if xpn:
            if sa.salt is None or sa.ssci is None:
                raise LocalProtocolError(f"{op}: an XPN SA needs a salt and an SSCI")
            attrs.append(nla(m.MACSEC_SA_ATTR_SSCI, struct.pack(">I", sa.ssci)))
            attrs.append(nla(m.MACSEC_SA_ATTR_SALT, sa.salt.reveal()))
        return nla_nested(m.MACSEC_ATTR_SA_CONFIG, *attrs)

    def add_rx_sa(self, link: str, sci: int, sa: MacsecSaSpec) -> None:
        self._cmd("add_rx_sa", m.MACSEC_CMD_ADD_RXSA, self._ifattr(link, "add_rx_sa"),
                  nla_nested(m.MACSEC_ATTR_RXSC_CONFIG, _sci(m.MACSEC_RXSC_ATTR_SCI, sci)),
                  self._sa_config(link, sa, "add_rx_sa"))

    def add_tx_sa(self, link: str, sa: MacsecSaSpec) -> None:
        self._cmd("add_tx_sa", m.MACSEC_CMD_ADD_TXSA, self._ifattr(link, "add_tx_sa"),
                  self._sa_config(link, sa, "add_tx_sa"))

    def _an(self, an: int) -> bytes:
        if not 0 <= an <= 3:
            raise LocalProtocolError(f"MACsec AN {an} not in 0..3")
        return _u8(m.MACSEC_SA_ATTR_AN, an)

    def set_rx_sa_active(self, link: str, sci: int, an: int, active: bool) -> None:
        self._cmd("set_rx_sa_active", m.MACSEC_CMD_UPD_RXSA, self._ifattr(link, "set_rx_sa_active"),
                  nla_nested(m.MACSEC_ATTR_RXSC_CONFIG, _sci(m.MACSEC_RXSC_ATTR_SCI, sci)),
                  nla_nested(m.MACSEC_ATTR_SA_CONFIG, self._an(an),
                             _u8(m.MACSEC_SA_ATTR_ACTIVE, int(active))))

    def set_tx_sa_active(self, link: str, an: int, active: bool) -> None:
        self._cmd("set_tx_sa_active", m.MACSEC_CMD_UPD_TXSA, self._ifattr(link, "set_tx_sa_active"),
                  nla_nested(m.MACSEC_ATTR_SA_CONFIG, self._an(an),
                             _u8(m.MACSEC_SA_ATTR_ACTIVE, int(active))))

    def remove_rx_sa(self, link: str, sci: int, an: int) -> None:
        self._cmd("remove_rx_sa", m.MACSEC_CMD_DEL_RXSA, self._ifattr(link, "remove_rx_sa"),
                  nla_nested(m.MACSEC_ATTR_RXSC_CONFIG, _sci(m.MACSEC_RXSC_ATTR_SCI, sci)),
                  nla_nested(m.MACSEC_ATTR_SA_CONFIG, self._an(an)))

    def remove_tx_sa(self, link: str, an: int) -> None:
        self._cmd("remove_tx_sa", m.MACSEC_CMD_DEL_TXSA, self._ifattr(link, "remove_tx_sa"),
                  nla_nested(m.MACSEC_ATTR_SA_CONFIG, self._an(an)))

    def tx_sas(self, link: str) -> list[MacsecSaState]:
        """Every TX SA of ``link`` with its next PN and counters."""
        dump = self._txsc_dump(link)
        out = []
        for _i, entry in iter_nlas(dump.get(m.MACSEC_ATTR_TXSA_LIST, b"")):
            a = parse_nlas(entry)
            pn_raw = a.get(m.MACSEC_SA_ATTR_PN, b"\0" * 4)
            wide = len(pn_raw) >= 8
            pn = int(struct.unpack("=Q" if wide else "=I", pn_raw[:8 if wide else 4])[0])
            stats = parse_nlas(a.get(m.MACSEC_SA_ATTR_STATS, b""))
            out.append(MacsecSaState(an=a[m.MACSEC_SA_ATTR_AN][0],
                                     active=bool(a.get(m.MACSEC_SA_ATTR_ACTIVE, b"\0")[0]),
                                     next_pn=pn,
                                     packets=_stat(stats, m.MACSEC_SA_STATS_ATTR_OUT_PKTS_PROTECTED)
                                     + _stat(stats, m.MACSEC_SA_STATS_ATTR_OUT_PKTS_ENCRYPTED)))
        return out

    def query_tx_sa(self, link: str, an: int) -> MacsecSaState:
        for st in self.tx_sas(link):
            if st.an == an:
                return st
        raise TunnelError("query_tx_sa", errno.ENODEV, f"no TX SA on AN {an} of {link}")

    def rx_sc_stats(self, link: str) -> dict[int, dict[str, int]]:
        """Per receive channel (by SCI) the u64 counters of
        ``enum macsec_rxsc_stats_attr`` (IEEE 802.1AE-2018 10.7.9), named as
        in the header without the prefix: ``IN_PKTS_LATE``, ``IN_PKTS_NOT_USING_SA``..."""
        out: dict[int, dict[str, int]] = {}
        for _i, entry in iter_nlas(self._txsc_dump(link).get(m.MACSEC_ATTR_RXSC_LIST, b"")):
            a = parse_nlas(entry)
            sci = struct.unpack(">Q", a[m.MACSEC_RXSC_ATTR_SCI][:8])[0]
            stats = parse_nlas(a.get(m.MACSEC_RXSC_ATTR_STATS, b""))
            out[sci] = {name: struct.unpack("=Q", stats[i][:8])[0]
                        for i, name in enumerate(m.RXSC_STATS_NAMES) if i in stats and name}
        return out

    def encoding_sa(self, link: str) -> int:
        return self._secy(link)[m.MACSEC_SECY_ATTR_ENCODING_SA][0]
