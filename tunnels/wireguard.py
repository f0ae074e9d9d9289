"""WireGuard as a key consumer: qkdgate's key as the peer's preshared key.

Theory of operation (docs/consumers.md 3). WireGuard's handshake is Noise
IKpsk2: the peer's 32-byte preshared key (PSK) is mixed into the chaining key
of every handshake (WireGuard paper 5.4.3, ``psk`` in the responder's message),
so a handshake succeeds only if both sides hold the same PSK, and the session
keys it yields depend on it. qkdgate sets each generation's key
(``keymix.schedule.consumer_key``, label ``"wireguard psk"``) as the PSK of one
configured peer on one WireGuard device, over the ``wireguard`` generic-netlink
family (include/uapi/linux/wireguard.h, :mod:`qkdgate.tunnels.wireguard_msg`),
and reads it back. WireGuard's own X25519 keys stay the classical leg;
qkdgate adds ML-KEM and QKD through the PSK.

What a rotation does to a session in flight: nothing at once. WireGuard uses
the PSK only in a handshake; the session keys of the current handshake keep
carrying traffic until WireGuard's next handshake (REKEY_AFTER_TIME = 120 s
after the last one while traffic flows; after REJECT_AFTER_TIME = 180 s a
session is never used), which then uses the new PSK. The two gateways set
generation g one qkdgate message (DONE) apart (tunnels/consumer.py); a
WireGuard handshake that falls into that window fails (the initiator cannot
open the responder's answer) and WireGuard retries it after REKEY_TIMEOUT =
5 s, while the current session keeps carrying traffic: no packet is lost.

Fail closed (``invalidate``): a random PSK replaces the key, so no new
handshake can succeed; with ``block`` (hard lifetime passed, policy block,
daemon exit, failsafe) the running session must stop too, since a random
PSK alone leaves it running for up to 180 s. The peer is removed and re-added
in one ``WG_CMD_SET_DEVICE`` (peers are applied in order): the re-added peer
keeps its public key, endpoint and keepalive, has the random PSK, no allowed
IPs and no session keys. With no allowed IPs no packet is routed to it and
none it sends is accepted. ``install`` adds the configured allowed IPs back
with the new PSK (adding, never ``WGPEER_F_REPLACE_ALLOWEDIPS``, which
empties them first); after a block the first packet starts a fresh handshake.
"""

from __future__ import annotations

import base64
import errno
import hmac
import ipaddress
import os
import socket
import struct
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from typing import Protocol

from qkdgate.errors import TunnelError
from qkdgate.interfaces import IPNetwork
from qkdgate.keymix.secret import SecretBytes
from qkdgate.tunnels import wireguard_msg as w
from qkdgate.tunnels.consumer import ConsumerKey, ConsumerReport, Invalidation
from qkdgate.tunnels.netlink import (
    GENLMSGHDR,
    NetlinkChannel,
    genl_family_id,
    iter_nlas,
    nla,
    nla_nested,
    parse_nlas,
)
from qkdgate.tunnels.state import TunnelRegistry

__all__ = ["WgPeerState", "WireguardBackend", "WireguardConsumer", "WireguardKernel",
           "WireguardSpec", "failsafe", "key_b64", "parse_key"]

NETLINK_GENERIC = 16
_TIMESPEC = struct.Struct("=qq")         # struct __kernel_timespec


def parse_key(text: str) -> bytes:
    """A WireGuard key as ``wg`` prints it (base64 of 32 bytes)."""
    raw = base64.b64decode(text, validate=True)
    if len(raw) != w.WG_KEY_LEN:
        raise ValueError("a WireGuard key is 32 bytes")
    return raw


def key_b64(raw: bytes) -> str:
    return base64.b64encode(raw).decode("ascii")


@dataclass(frozen=True, slots=True)
class WgPeerState:
    """One peer as the kernel reports it. The PSK never prints."""

    public_key: bytes
    preshared_key: SecretBytes
    endpoint: bytes | None            # raw struct sockaddr_in / sockaddr_in6
    keepalive: int                    # seconds, 0 = off
    allowed_ips: tuple[IPNetwork, ...]
    last_handshake: float | None      # wall-clock seconds, None: never
    rx_bytes: int = 0
    tx_bytes: int = 0


class WireguardKernel(Protocol):
    """The narrow kernel interface the consumer uses (fakes in tests)."""

    @property
    def netns(self) -> str | None: ...

    def peer(self, interface: str, public_key: bytes) -> WgPeerState: ...

    def set_peer(self, interface: str, public_key: bytes, psk: SecretBytes,
                 allowed_ips: tuple[IPNetwork, ...] | None) -> None:
        """Set an existing peer's PSK and add ``allowed_ips`` to its allowed
        IPs (never replaces: the kernel would empty them first, dropping
        whatever passes meanwhile)."""

    def block_peer(self, interface: str, public_key: bytes, psk: SecretBytes) -> None:
        """Remove and re-add the peer: ``psk``, no allowed IPs, no session."""


def _allowedip(net: IPNetwork) -> bytes:
    family = socket.AF_INET if net.version == 4 else socket.AF_INET6
    return nla_nested(0, nla(w.WGALLOWEDIP_A_FAMILY, struct.pack("=H", family)),
                      nla(w.WGALLOWEDIP_A_IPADDR, net.network_address.packed),
                      nla(w.WGALLOWEDIP_A_CIDR_MASK, struct.pack("=B", net.prefixlen)))


def _nested_items(data: bytes) -> Iterator[dict[int, bytes]]:
    for _index, body in iter_nlas(data):
        yield parse_nlas(body)


def _peer_state(attrs: dict[int, bytes]) -> WgPeerState:
    nets: list[IPNetwork] = []
    for a in _nested_items(attrs.get(w.WGPEER_A_ALLOWEDIPS, b"")):
        family = struct.unpack("=H", a[w.WGALLOWEDIP_A_FAMILY][:2])[0]
        addr = a[w.WGALLOWEDIP_A_IPADDR][:4 if family == socket.AF_INET else 16]
        nets.append(ipaddress.ip_network((addr, a[w.WGALLOWEDIP_A_CIDR_MASK][0]), strict=False))
    hs = attrs.get(w.WGPEER_A_LAST_HANDSHAKE_TIME)
    sec, nsec = _TIMESPEC.unpack(hs[:16]) if hs and len(hs) >= 16 else (0, 0)
    keepalive = attrs.get(w.WGPEER_A_PERSISTENT_KEEPALIVE_INTERVAL, b"\0\0")
    return WgPeerState(
        public_key=attrs[w.WGPEER_A_PUBLIC_KEY][:32],
        preshared_key=SecretBytes(attrs.get(w.WGPEER_A_PRESHARED_KEY, bytes(32))[:32]),
        endpoint=attrs.get(w.WGPEER_A_ENDPOINT) or None,
        keepalive=struct.unpack("=H", keepalive[:2])[0],
        allowed_ips=tuple(nets),
        last_handshake=sec + nsec / 1e9 if sec or nsec else None,
        rx_bytes=struct.unpack("=Q", attrs.get(w.WGPEER_A_RX_BYTES, bytes(8))[:8])[0],
        tx_bytes=struct.unpack("=Q", attrs.get(w.WGPEER_A_TX_BYTES, bytes(8))[:8])[0])


class WireguardBackend:
    """:class:`WireguardKernel` on the Linux ``wireguard`` genl family."""

    def __init__(self, netns: str | None = None) -> None:
        self.netns = netns
        self.genl = NetlinkChannel(NETLINK_GENERIC, netns)
        self._family: int | None = None

    def close(self) -> None:
        self.genl.close()

    def _family_id(self) -> int:
        if self._family is None:
            self._family = genl_family_id(self.genl, w.WG_GENL_NAME,
                                          "resolve_wireguard_family")
        return self._family

    def _ifname(self, interface: str) -> bytes:
        return nla(w.WGDEVICE_A_IFNAME, interface.encode() + b"\0")

    def _set(self, op: str, interface: str, *peers: bytes) -> None:
        body = (GENLMSGHDR.pack(w.WG_CMD_SET_DEVICE, w.WG_GENL_VERSION, 0)
                + self._ifname(interface) + nla_nested(w.WGDEVICE_A_PEERS, *peers))
        self.genl.request(op, self._family_id(), body)

    def peers(self, interface: str) -> list[WgPeerState]:
        body = GENLMSGHDR.pack(w.WG_CMD_GET_DEVICE, w.WG_GENL_VERSION, 0) + self._ifname(interface)
        out = []
        for _t, payload in self.genl.request("get_wireguard_device", self._family_id(), body,
                                             dump=True):
            attrs = parse_nlas(payload, GENLMSGHDR.size)
            out += [_peer_state(p) for p in _nested_items(attrs.get(w.WGDEVICE_A_PEERS, b""))]
        return out

    def peer(self, interface: str, public_key: bytes) -> WgPeerState:
        for st in self.peers(interface):
            if st.public_key == public_key:
                return st
        raise TunnelError("get_wireguard_peer", errno.ENOENT,
                          f"{interface} has no peer {key_b64(public_key)}")

    def set_peer(self, interface: str, public_key: bytes, psk: SecretBytes,
                 allowed_ips: tuple[IPNetwork, ...] | None) -> None:
        # UPDATE_ONLY: never create a peer the operator did not. No
        # REPLACE_ALLOWEDIPS: the kernel would remove them all before adding
        # (wg_allowedips_remove_by_peer), and a packet in between is dropped;
        # adding the configured ones again changes nothing while they are there
        # and restores them after a block.
        attrs = [nla(w.WGPEER_A_PUBLIC_KEY, public_key),
                 nla(w.WGPEER_A_PRESHARED_KEY, psk.reveal()),
                 nla(w.WGPEER_A_FLAGS, struct.pack("=I", w.WGPEER_F_UPDATE_ONLY))]
        if allowed_ips:
            attrs.append(nla_nested(w.WGPEER_A_ALLOWEDIPS, *map(_allowedip, allowed_ips)))
        self._set("set_wireguard_psk", interface, nla_nested(0, *attrs))

    def block_peer(self, interface: str, public_key: bytes, psk: SecretBytes) -> None:
        st = self.peer(interface, public_key)
        again = [nla(w.WGPEER_A_PUBLIC_KEY, public_key),
                 nla(w.WGPEER_A_PRESHARED_KEY, psk.reveal()),
                 nla(w.WGPEER_A_FLAGS, struct.pack("=I", w.WGPEER_F_REPLACE_ALLOWEDIPS))]
        if st.endpoint is not None:
            again.append(nla(w.WGPEER_A_ENDPOINT, st.endpoint))
        if st.keepalive:
            again.append(nla(w.WGPEER_A_PERSISTENT_KEEPALIVE_INTERVAL,
                             struct.pack("=H", st.keepalive)))
        remove = nla_nested(0, nla(w.WGPEER_A_PUBLIC_KEY, public_key),
                            nla(w.WGPEER_A_FLAGS, struct.pack("=I", w.WGPEER_F_REMOVE_ME)))
        self._set("block_wireguard_peer", interface, remove, nla_nested(1, *again))


@dataclass(frozen=True, slots=True)
class WireguardSpec:
    """One WireGuard peer keyed by one qkdgate tunnel (config: ``wireguard``)."""

    tunnel_id: str
    interface: str
    peer_public_key: bytes
    allowed_ips: tuple[IPNetwork, ...]

    def __post_init__(self) -> None:
        if len(self.peer_public_key) != w.WG_KEY_LEN:
            raise ValueError("a WireGuard public key is 32 bytes")
        if not self.allowed_ips:
            raise ValueError("a WireGuard peer needs allowed IPs to restore after a block")

    def record(self) -> dict[str, str]:
        """What ``qkdgate failsafe`` needs (tunnels/state.py)."""
        return {"kind": "wireguard", "interface": self.interface,
                "peer": key_b64(self.peer_public_key)}


class WireguardConsumer:
    """:class:`~qkdgate.tunnels.consumer.KeyConsumer` for one WireGuard peer."""

    kind = "wireguard"

    def __init__(self, spec: WireguardSpec, kernel: WireguardKernel, *,
                 registry: TunnelRegistry | None = None,
                 rng: Callable[[int], bytes] = os.urandom) -> None:
        self.spec = spec
        self.kernel = kernel
        self.registry = registry
        self._rng = rng
        self.key_name: str | None = None      # what the PSK is now: a key name or None
        self.blocked = False

    @property
    def tunnel_id(self) -> str:
        return self.spec.tunnel_id

    def _where(self) -> str:
        return f"{self.spec.interface} peer {key_b64(self.spec.peer_public_key)[:8]}..."

    def _read_back(self, op: str, psk: SecretBytes,
                   allowed: tuple[IPNetwork, ...] | None) -> WgPeerState:
        st = self.kernel.peer(self.spec.interface, self.spec.peer_public_key)
        if not hmac.compare_digest(st.preshared_key.reveal(), psk.reveal()):
            raise TunnelError(op, None, f"{self._where()}: preshared key read back differs")
        if allowed is not None and (not set(allowed) <= set(st.allowed_ips)
                                    or (not allowed and st.allowed_ips)):
            raise TunnelError(op, None, f"{self._where()}: allowed IPs read back "
                                        f"{[str(n) for n in st.allowed_ips]}, want "
                                        f"{[str(n) for n in allowed]}")
        return st

    # ---- KeyConsumer -----------------------------------------------------
    def setup(self, now: float) -> ConsumerReport:
        if self.registry is not None:       # before the kernel changes: failsafe must know
            self.registry.add_consumer(self.kernel.netns, self.spec.record())
        return self.invalidate(Invalidation(self.tunnel_id, "start", True))

    def prepare(self, key: ConsumerKey) -> None:
        """One PSK slot: nothing to stage (docs/consumers.md 3)."""

    def install(self, key: ConsumerKey) -> ConsumerReport:
        # a failure raises; ConsumerDriver then invalidates: never a PSK we
        # could not confirm
        self.kernel.set_peer(self.spec.interface, self.spec.peer_public_key, key.key,
                             self.spec.allowed_ips)
        self._read_back("install_wireguard_psk", key.key, self.spec.allowed_ips)
        self.key_name, self.blocked = key.key_name, False
        return ConsumerReport(key.key_name, key.generation, True, False,
                              f"preshared key of {self._where()} set and read back")

    def retire(self, generation: int) -> None:
        """One PSK slot: the next install replaced it already."""

    def invalidate(self, why: Invalidation) -> ConsumerReport:
        psk = SecretBytes(self._rng(w.WG_KEY_LEN))
        try:
            if why.block:
                self.kernel.block_peer(self.spec.interface, self.spec.peer_public_key, psk)
            else:
                self.kernel.set_peer(self.spec.interface, self.spec.peer_public_key, psk, None)
            self._read_back("invalidate_wireguard_psk", psk, () if why.block else None)
        finally:
            psk.wipe()
        self.key_name = None
        self.blocked = self.blocked or why.block
        what = "random preshared key" + (", session removed, no allowed IPs" if why.block
                                         else "")
        return ConsumerReport(None, None, True, self.blocked, f"{self._where()}: {what}")

    def teardown(self) -> bool:
        """The operator's ``--teardown``: WireGuard as it was without qkdgate
        (no preshared key, the configured allowed IPs)."""
        self.kernel.set_peer(self.spec.interface, self.spec.peer_public_key,
                             SecretBytes(bytes(w.WG_KEY_LEN)), self.spec.allowed_ips)
        self.key_name, self.blocked = None, False
        return True

    def describe(self) -> dict[str, object]:
        return {"interface": self.spec.interface,
                "peer": key_b64(self.spec.peer_public_key),
                "preshared_key": self.key_name or "random", "peer_blocked": self.blocked}


def failsafe(ns: str | None, records: list[dict[str, str]], dry: bool,
             say: Callable[[str | None, str], None]) -> int:
    """``qkdgate failsafe`` for WireGuard: every recorded peer gets a random
    PSK, loses its session and its allowed IPs. Returns the failures."""
    failures = 0
    backend = WireguardBackend(ns)
    try:
        for rec in records:
            iface, peer = rec.get("interface", ""), rec.get("peer", "")
            where = f"WireGuard {iface} peer {peer[:8]}..."
            if dry:
                say(ns, f"{where}: would get a random preshared key and no allowed IPs")
                continue
            psk = SecretBytes(os.urandom(w.WG_KEY_LEN))
            try:
                key = parse_key(peer)
                backend.block_peer(iface, key, psk)
                st = backend.peer(iface, key)
                if not hmac.compare_digest(st.preshared_key.reveal(), psk.reveal()) \
                        or st.allowed_ips:
                    raise TunnelError("failsafe_wireguard", None, "read back differs")
                say(ns, f"{where}: random preshared key, session removed, no allowed IPs")
            except TunnelError as exc:
                if exc.errno in (errno.ENODEV, errno.ENOENT):
                    say(ns, f"{where}: already gone")
                    continue
                say(ns, f"{where}: {exc}")
                failures += 1
            except ValueError as exc:
                say(ns, f"{where}: bad registry record ({exc})")
                failures += 1
            finally:
                psk.wipe()
    finally:
        backend.close()
    return failures
