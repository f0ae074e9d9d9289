"""Builders that turn the validated config into the daemon's parts.

Theory of operation: :mod:`qkdgate.gateway.daemon.daemon` wires parts together;
this module makes them, one small function per part, so each translation
from config dataclass to runtime object is readable (and testable) on its
own: tunnel specs and lifetimes, the per-peer :class:`SessionConfig`, key
sources, identities, kernel backends, and what a SIGHUP may change live.
Every failure is a :class:`~qkdgate.errors.ConfigError` naming the field.
"""

from __future__ import annotations

import ipaddress
import logging
import os
from collections.abc import Callable
from dataclasses import replace
from typing import TYPE_CHECKING, Any

from qkdgate.errors import ConfigError
from qkdgate.gateway.config.model import REQID_SPAN, Config, PeerConfig, TunnelConfig, TunnelType
from qkdgate.interfaces import MacsecLinkSpec, UdpEncap
from qkdgate.keymix.secret import SecretBytes
from qkdgate.private_file import read_private_file
from qkdgate.tunnels.consumer import KeyConsumer, consumer_tunnel
from qkdgate.tunnels.events import TunnelEventSink
from qkdgate.tunnels.ipsec_tunnel import IpsecTunnelSpec, ipsec_tunnel, spi_range_for_node
from qkdgate.tunnels.macsec_tunnel import MacsecTunnelSpec, macsec_tunnel
from qkdgate.tunnels.manager import TunnelManager
from qkdgate.tunnels.policy import KeyPolicy
from qkdgate.tunnels.state import DEFAULT_PATH as REGISTRY_PATH
from qkdgate.tunnels.state import TunnelRegistry
from qkdgate.tunnels.timers import Lifetimes
from qkdgate.tunnels.tunnel import Tunnel

if TYPE_CHECKING:
    from qkdgate.tunnels.wireguard import WireguardSpec

log = logging.getLogger("qkdgate.daemon")


# ---------------------------------------------------------------- tunnels

def lifetimes(t: TunnelConfig) -> Lifetimes:
    r = t.rekey
    # max_bytes is the volume rekey trigger (soft); the kernel's hard byte
    # limit sits at twice that, so a stuck rekey blocks rather than runs on.
    return Lifetimes(soft_seconds=r.soft_lifetime, hard_seconds=r.hard_lifetime,
                     soft_bytes=r.max_bytes, hard_bytes=2 * r.max_bytes,
                     grace_seconds=r.grace)


def _host_net(addr: Any) -> Any:
    return ipaddress.ip_network(f"{addr}/{addr.max_prefixlen}")


def ipsec_spec(t: TunnelConfig, ha_node: int | None = None) -> IpsecTunnelSpec:
    """``ha_node``: this gateway's HA node (1, 2), which picks its half of
    the inbound SPI range; None without HA."""
    s = t.ipsec
    if s is None:
        raise ConfigError("an IPsec tunnel needs its ipsec section",
                          path=f"tunnels[{t.name}].ipsec")
    return IpsecTunnelSpec(
        tunnel_id=t.name, local=s.local_address, remote=s.remote_address,
        local_nets=tuple(s.local_subnets) or (_host_net(s.local_address),),
        remote_nets=tuple(s.remote_subnets) or (_host_net(s.remote_address),),
        reqid_base=s.reqid, reqid_span=REQID_SPAN, mode=s.mode,
        mark=s.mark.to_mark() if s.mark else None, if_id=s.if_id,
        encap=UdpEncap() if s.udp_encap else None, replay_window=s.replay_window,
        aead=s.cipher.aead, esn=s.esn, spi_range=spi_range_for_node(ha_node))


def macsec_spec(t: TunnelConfig) -> MacsecTunnelSpec:
    m = t.macsec
    if m is None:
        raise ConfigError("a MACsec tunnel needs its macsec section",
                          path=f"tunnels[{t.name}].macsec")
    # The peer's SCI (IEEE 802.1AE-2018 8.2.1: its MAC address and port) names
    # the RX secure channel; without it we could not accept a single frame.
    sci = t.macsec_peer_sci
    if sci is None:
        raise ConfigError("MACsec tunnel needs the peer's SCI",
                          path=f"tunnels[{t.name}].macsec.peer_mac",
                          expected="the peer's MAC address")
    link = MacsecLinkSpec(name=t.macsec_interface or "qm-" + t.name[:12], parent=m.parent,
                          port=m.port, cipher=m.cipher, encrypt=m.encrypt,
                          replay_protect=True, replay_window=m.replay_window)
    return MacsecTunnelSpec(t.name, link, int(sci), pn_threshold=t.rekey.macsec_pn_threshold)


def wireguard_spec(t: TunnelConfig) -> WireguardSpec:
    from qkdgate.tunnels.wireguard import WireguardSpec, parse_key  # only with such a tunnel
    w = t.wireguard
    if w is None:
        raise ConfigError("a WireGuard tunnel needs its wireguard section",
                          path=f"tunnels[{t.name}].wireguard")
    return WireguardSpec(t.name, w.interface, parse_key(w.peer_public_key), w.allowed_ips)


def wireguard_consumer(t: TunnelConfig, registry: TunnelRegistry | None) -> KeyConsumer:
    from qkdgate.tunnels.wireguard import WireguardBackend, WireguardConsumer
    return WireguardConsumer(wireguard_spec(t), WireguardBackend(), registry=registry)


def strongswan_consumer(t: TunnelConfig, registry: TunnelRegistry | None) -> KeyConsumer:
    """The strongSwan consumer of tunnel ``t`` (issue 21 item 3): reads its
    connection from swanctl.conf now."""
    from qkdgate.tunnels.strongswan import strongswan_consumer as build
    return build(t, registry)


ConsumerBuilder = Callable[[TunnelConfig, TunnelRegistry | None], KeyConsumer]
CONSUMERS: dict[TunnelType, ConsumerBuilder] = {TunnelType.WIREGUARD: wireguard_consumer,
                                                TunnelType.STRONGSWAN: strongswan_consumer}


def tunnels(cfg: Config, ipsec_backend: Any, macsec_backend: Any,
            emit: TunnelEventSink, *, registry: TunnelRegistry | None = None,
            consumers: dict[TunnelType, ConsumerBuilder] | None = None) -> list[Tunnel]:
    """One :class:`Tunnel` per configured tunnel. Key consumers (WireGuard,
    strongSwan) are built by ``consumers`` (tests pass fakes), recording
    themselves in ``registry`` for ``qkdgate failsafe``."""
    out: list[Tunnel] = []
    builders = CONSUMERS if consumers is None else consumers
    for t in cfg.tunnels:
        if t.type is TunnelType.IPSEC:
            out.append(ipsec_tunnel(ipsec_spec(t, cfg.ha.node if cfg.ha else None),
                                    ipsec_backend, policy=t.policy,
                                   lifetimes=lifetimes(t), emit=emit))
        elif t.type is TunnelType.MACSEC:
            out.append(macsec_tunnel(macsec_spec(t), macsec_backend, policy=t.policy,
                                    lifetimes=lifetimes(t), emit=emit))
        else:
            out.append(consumer_tunnel(builders[t.type](t, registry), policy=t.policy,
                                       lifetimes=lifetimes(t), emit=emit))
    return out


def failsafe_registry(cfg: Config, ipsec: Any, macsec: Any,
             registry_path: str = REGISTRY_PATH) -> TunnelRegistry | None:
    """The one registry `qkdgate failsafe` reads, when anything real is
    built: a netlink backend (none given) or a key consumer."""
    kinds = {t.type for t in cfg.tunnels}
    if (ipsec is None and TunnelType.IPSEC in kinds) or \
            (macsec is None and TunnelType.MACSEC in kinds) or \
            kinds & set(CONSUMERS):
        return TunnelRegistry(registry_path)
    return None


def backends(cfg: Config, ipsec: Any, macsec: Any,
             registry_path: str = REGISTRY_PATH, *,
             shared: TunnelRegistry | None = None) -> tuple[Any, Any]:
    """The kernel backends: the given ones (tests pass fakes), else the
    netlink backends (only if a tunnel needs them). No shipped path builds
    a backend that does not enforce in the kernel. ``shared``: the registry
    the key consumers record in too (:func:`failsafe_registry`)."""
    kinds = {t.type for t in cfg.tunnels}
    registry: TunnelRegistry | None = shared
    if registry is None and ((ipsec is None and TunnelType.IPSEC in kinds) or
                             (macsec is None and TunnelType.MACSEC in kinds)):
        # One registry for both backends: what `qkdgate failsafe` reads.
        registry = TunnelRegistry(registry_path)
    if ipsec is None and TunnelType.IPSEC in kinds:
        from qkdgate.tunnels.xfrm import XfrmBackend
        ipsec = XfrmBackend(registry=registry)
    if macsec is None and TunnelType.MACSEC in kinds:
        from qkdgate.tunnels.macsec import MacsecBackend
        macsec = MacsecBackend(registry=registry)
    return ipsec, macsec


# ---------------------------------------------------------------- peers

def read_secret_file(path: str, what: str) -> SecretBytes:
    data = read_private_file(path, what, 4097)
    text = data.strip()
    try:   # a hex file (as `openssl rand -hex 32` writes) or raw bytes
        raw = bytes.fromhex(text.decode("ascii"))
    except (UnicodeDecodeError, ValueError):
        raw = data
    if not 16 <= len(raw) <= 4096:
        raise ConfigError(f"{what} must hold 16..4096 bytes", file=path,
                          found=f"{len(raw)} bytes")
    return SecretBytes(raw)


def session_config(cfg: Config, peer: PeerConfig, *, generation_floor: int = 0) -> Any:
    from qkdgate.gateway.protocol.config import SessionConfig, TunnelRef
    ts = cfg.tunnels_for(peer.name)
    policies = {t.policy for t in ts}
    qkd = peer.qkd
    first = qkd.source_list[0] if qkd and qkd.source_list else None
    return SessionConfig(
        local_name=cfg.gateway.name, peer_name=peer.name,
        tunnels=tuple(TunnelRef(t.name, t.type.value) for t in ts),
        kem=cfg.gateway.kem_suite.value,
        x25519=any("x25519" in p.required | p.optional for p in policies) if policies else True,
        psk=read_secret_file(peer.psk_file, "PSK file") if peer.psk_file else None,
        qkd_role=qkd.role.value if qkd else None,
        local_sae_id=first.local_sae_id if first else "",
        peer_sae_id=first.peer_sae_id if first else "",
        qkd_key_bits=first.key_size if first else 256,
        # several sources: each one's key size, in configuration order, and k
        qkd_sources=tuple(s.key_size for s in qkd.source_list) if qkd and qkd.multi else (),
        qkd_required=qkd.required if qkd and qkd.multi else 0,
        allow_pqc_only=any(p in (KeyPolicy.PQC_FALLBACK, KeyPolicy.PQC_ONLY) for p in policies),
        rekey_interval=min((t.rekey.interval for t in ts), default=60.0),
        generation_floor=generation_floor,
    )


def session_factory() -> Callable[..., Any]:
    from qkdgate.gateway.protocol.session import PeerSession
    return PeerSession


def local_identity(cfg: Config) -> Any:
    from qkdgate.gateway.config.identity_files import load_local_identity
    return load_local_identity(cfg.gateway.identity)


def peer_identities(peer: PeerConfig) -> list[Any]:
    """Pinned identities: inline public strings or files holding one."""
    from qkdgate.gateway.protocol.identity import PUBLIC_PREFIX, PeerIdentity
    out = []
    for entry in peer.identities:
        if entry.startswith(PUBLIC_PREFIX + ":"):
            out.append(PeerIdentity.from_string(entry, name=peer.name))
            continue
        try:
            with open(entry, encoding="ascii") as fh:
                text = fh.read(65536)
        except (OSError, UnicodeDecodeError) as exc:
            raise ConfigError(f"cannot read pinned identity of peer {peer.name}: {exc}",
                              file=entry) from None
        try:
            out.append(PeerIdentity.from_string(text, name=peer.name))
        except ConfigError as exc:
            raise ConfigError(f"pinned identity of peer {peer.name}: {exc.reason}", file=entry,
                              expected=exc.expected, found=exc.found) from None
    return out


def key_sources(cfg: Config) -> dict[str, Any]:
    from qkdgate.adapters.registry import create_key_source
    used = {s.key_source for p in cfg.peers if p.qkd for s in p.qkd.source_list}
    return {ks.name: create_key_source(ks.kind, ks) for ks in cfg.key_sources if ks.name in used}


def open_journal(cfg: Config) -> Any:
    from qkdgate.gateway.daemon.journal import Journal
    os.makedirs(cfg.gateway.state_dir, mode=0o700, exist_ok=True)
    return Journal.open(cfg.gateway.state_dir)


# ---------------------------------------------------------------- reload

def _protocol_settings(cfg: Config, peer: PeerConfig) -> tuple[bool, bool, float]:
    ts = cfg.tunnels_for(peer.name)
    policies = {t.policy for t in ts}
    return (any(p in (KeyPolicy.PQC_FALLBACK, KeyPolicy.PQC_ONLY) for p in policies),
            any("x25519" in p.required | p.optional for p in policies),
            min((t.rekey.interval for t in ts), default=60.0))


def apply_live(old: Config, new: Config, manager: TunnelManager) -> tuple[list[str], list[str]]:
    """Apply what may change without a restart; list what needs one.

    Live: a tunnel's key policy and lifetimes (they apply from the next
    generation and the next timer), and the log level. Everything that
    names sockets, peers, identities, key sources or kernel objects needs a
    restart: changing those under running SAs could strand them unkeyed.
    """
    applied: list[str] = []
    restart: list[str] = []
    if old.gateway != new.gateway:
        restart.append("gateway settings")
    if old.peers != new.peers:
        restart.append("peers")
    if old.key_sources != new.key_sources:
        restart.append("key_sources")
    if old.key_service != new.key_service:
        restart.append("key_service")
    if old.ha != new.ha:        # the role machine and the epoch parity are built at start
        restart.append("ha")
    if old.telemetry.mqtt != new.telemetry.mqtt or \
            old.telemetry.prometheus != new.telemetry.prometheus:
        restart.append("telemetry")
    if old.telemetry.log != new.telemetry.log:
        logging.getLogger("qkdgate").setLevel(new.telemetry.log.level.value.upper())
        applied.append("log level")
    for peer in new.peers:
        try:
            before = _protocol_settings(old, old.peer(peer.name))
        except KeyError:
            continue
        if before != _protocol_settings(new, peer):
            restart.append(f"peer {peer.name} protocol settings (policy legs, interval)")
    old_t = {t.name: t for t in old.tunnels}
    new_t = {t.name: t for t in new.tunnels}
    if set(old_t) != set(new_t):
        restart.append("tunnels added or removed")
    for name in set(old_t) & set(new_t):
        a, b = old_t[name], new_t[name]
        if replace(a, policy=b.policy, rekey=b.rekey) != b:
            restart.append(f"tunnel {name}")
            continue
        tunnel = manager.tunnels.get(name)
        if a.policy != b.policy and tunnel is not None:
            tunnel.policy = b.policy
            applied.append(f"tunnel {name} policy {b.policy.value}")
        if a.rekey != b.rekey and tunnel is not None:
            tunnel.lifetimes = lifetimes(b)
            applied.append(f"tunnel {name} lifetimes")
    return applied, restart


def key_service(cfg: Config, *, clock: Callable[[], float],
                emit: Callable[[Any], None]) -> Any:
    """The key service runner (docs/keyservice.md), or None without a
    ``key_service`` section. Its pools and times come from the config only."""
    ks = cfg.key_service
    if ks is None:
        return None
    from qkdgate.keyservice.runner import KeyServiceRunner, SkipListener
    from qkdgate.keyservice.service import KeyService
    from qkdgate.keyservice.settings import PoolSpec, ServiceTimes

    times = ServiceTimes(ks.serve_margin, ks.dec_window, ks.clock_skew)
    pools = [PoolSpec(p.name, p.peer, p.local_sae, p.remote_sae, key_size=p.key_size,
                      keys=p.keys, lifetime=p.lifetime, policy=p.policy) for p in ks.pools]
    service = KeyService(pools, times, kme_id=ks.kme_id or f"qkdgate-{cfg.gateway.name}",
                         emit=emit)
    skip = [SkipListener(s.local_system, _host_port(str(s.address), s.port), s.psk_file,
                         s.tls_mode.value) for s in ks.skip]
    return KeyServiceRunner(service, host=str(ks.address), port=ks.port, cert=str(ks.tls.cert),
                            key=str(ks.tls.key), ca=str(ks.tls.ca),
                            state_dir=cfg.gateway.state_dir, skip=skip, stunnel=ks.stunnel,
                            clock=clock)


def _host_port(host: str, port: int) -> str:
    return f"[{host}]:{port}" if ":" in host else f"{host}:{port}"
