"""The shared value types and interfaces that key sources and tunnels implement.

Theory of operation: this module is pure (no I/O, no asyncio, no netlink).
The protocol core and the daemon depend only on these definitions;
``qkdgate.adapters`` implements :class:`KeySource`, ``qkdgate.tunnels``
implements :class:`IpsecBackend` and :class:`MacsecBackend`, and
``qkdgate.testing.fakes`` holds in-memory recording versions of both for tests.

The kernel interface follows strongSwan's ``kernel_ipsec``: a few narrow
operations taking parameter objects (:class:`SaId`, :class:`SaSpec`,
:class:`PolicySpec`) rather than long positional argument lists. Later work
may extend these types (new optional fields with defaults, new methods);
it must not fork them.

Key material is always :class:`~qkdgate.keymix.secret.SecretBytes`, so a
parameter object can be logged or printed without leaking a key.
"""

from __future__ import annotations

import enum
import ipaddress
import socket
import uuid
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field
from typing import Protocol, runtime_checkable

from qkdgate.errors import TunnelError

# Re-exported: defined beside the key schedule that depends on it, and part of
# this module's vocabulary (MacsecLinkSpec, MacsecSaSpec).
from qkdgate.keymix.ciphers import MacsecCipher as MacsecCipher
from qkdgate.keymix.secret import SecretBytes

IPAddress = ipaddress.IPv4Address | ipaddress.IPv6Address
IPNetwork = ipaddress.IPv4Network | ipaddress.IPv6Network


# --------------------------------------------------------------------------
# QKD key sources (ETSI GS QKD 014 / 004 and vendor adapters)
# --------------------------------------------------------------------------

@dataclass(frozen=True, slots=True)
class QkdKey:
    """One QKD key as delivered by a KME. ``key_id`` is a UUID string
    (ETSI GS QKD 014 6.3 key_ID); only the ID may travel to the peer."""

    key_id: str
    key: SecretBytes

    def __post_init__(self) -> None:
        uuid.UUID(self.key_id)  # ValueError on anything that is not a UUID


@dataclass(frozen=True, slots=True)
class KeySourceStatus:
    """What a key source reports about the link to one peer SAE
    (ETSI GS QKD 014 6.1 Status, plus link health the simulator and vendors
    expose as extensions)."""

    source_kme_id: str
    target_kme_id: str
    master_sae_id: str
    slave_sae_id: str
    key_size: int                 # default key size, bits
    stored_key_count: int
    max_key_count: int
    max_key_per_request: int
    max_key_size: int             # bits
    min_key_size: int             # bits
    link_up: bool = True
    qber: float | None = None     # quantum bit error rate, 0..1, if known
    recent_rate: float | None = None  # keys per second recently produced
    alarms: tuple[str, ...] = ()
    extensions: Mapping[str, object] = field(default_factory=dict)


@runtime_checkable
class KeySource(Protocol):
    """A QKD key source for this gateway (its SAE) at its site's KME.

    Master side: :meth:`get_new_keys` returns keys with IDs; only the IDs go
    to the peer. Slave side: :meth:`get_keys_by_id` fetches the same keys
    from its own KME. Errors are :class:`~qkdgate.errors.KeySourceError`
    subclasses saying whose fault it is.
    """

    async def get_new_keys(self, peer_sae_id: str, number: int = 1, size_bits: int = 256,
                           additional_slave_sae_ids: Sequence[str] = ()) -> list[QkdKey]: ...

    async def get_keys_by_id(self, master_sae_id: str, key_ids: Sequence[str]) -> list[QkdKey]: ...

    async def status(self, peer_sae_id: str) -> KeySourceStatus: ...

    async def close(self) -> None: ...


@runtime_checkable
class StreamKeySource(Protocol):
    """A key source whose two SAEs must both attach before either can draw
    a key (ETSI GS QKD 004 OPEN_CONNECT: GET_KEY fails with status 3 until
    the peer opened the stream). The slave learns key_IDs only after the
    master drew keys, so the daemon calls :meth:`connect` for every peer at
    start (and may again after a KeyUnavailable); it is idempotent."""

    async def connect(self, peer_sae_id: str) -> None: ...


# --------------------------------------------------------------------------
# IPsec (XFRM) tunnels
# --------------------------------------------------------------------------

class Direction(enum.Enum):
    IN = "in"
    OUT = "out"
    FWD = "fwd"


class Mode(enum.Enum):
    TRANSPORT = "transport"
    TUNNEL = "tunnel"


class PolicyAction(enum.Enum):
    ALLOW = "allow"   # with templates: protect; without: bypass
    BLOCK = "block"


@dataclass(frozen=True, slots=True)
class Mark:
    """XFRM mark (``struct xfrm_mark``): value and mask."""

    value: int
    mask: int = 0xFFFFFFFF


@dataclass(frozen=True, slots=True)
class SaId:
    """Identifies one SA (``struct xfrm_usersa_id``): destination, SPI,
    protocol, family, plus the source and mark/if_id that disambiguate it."""

    src: IPAddress
    dst: IPAddress
    spi: int
    proto: int = socket.IPPROTO_ESP
    mark: Mark | None = None
    if_id: int | None = None

    def __post_init__(self) -> None:
        if not 0x100 <= self.spi <= 0xFFFFFFFF:  # RFC 4303 2.1: 1-255 reserved
            raise ValueError(f"SPI {self.spi:#x} out of range")
        if self.src.version != self.dst.version:
            raise ValueError("SA source and destination differ in address family")


@dataclass(frozen=True, slots=True)
class Selector:
    """Traffic selector (``struct xfrm_selector``)."""

    src: IPNetwork
    dst: IPNetwork
    proto: int = 0      # 0 = any
    sport: int = 0      # 0 = any
    dport: int = 0


@dataclass(frozen=True, slots=True)
class Lifetime:
    """``struct xfrm_lifetime_cfg``; 0 means no limit (the kernel's
    XFRM_INF). Seconds count from SA add time."""

    soft_bytes: int = 0
    hard_bytes: int = 0
    soft_packets: int = 0
    hard_packets: int = 0
    soft_add_seconds: int = 0
    hard_add_seconds: int = 0


@dataclass(frozen=True, slots=True)
class UdpEncap:
    """ESP-in-UDP (RFC 3948), ``struct xfrm_encap_tmpl`` with UDP_ENCAP_ESPINUDP."""

    sport: int = 4500
    dport: int = 4500


@dataclass(frozen=True, slots=True)
class SaSpec:
    """Everything but the identity of an SA (``struct xfrm_usersa_info`` and
    its attributes). The default cipher is AES-256-GCM with a 128-bit ICV
    (RFC 4106): ``key`` is 36 bytes, a 32-byte key then a 4-byte salt."""

    key: SecretBytes
    reqid: int
    mode: Mode = Mode.TUNNEL
    selector: Selector | None = None       # None: any (typical for tunnel mode)
    aead: str = "rfc4106(gcm(aes))"
    icv_bits: int = 128
    replay_window: int = 1024
    esn: bool = True
    lifetime: Lifetime = Lifetime()
    encap: UdpEncap | None = None


@dataclass(frozen=True, slots=True)
class SaState:
    """What the kernel reports about an installed SA (query)."""

    sa_id: SaId
    reqid: int
    aead: str
    key_bits: int           # key length including salt, in bits, as read back
    icv_bits: int
    bytes: int = 0
    packets: int = 0
    add_time: int = 0       # seconds since the epoch
    use_time: int = 0
    replay_window: int = 0
    integrity_failed: int = 0
    replay_errors: int = 0
    expired: bool = False   # hard lifetime reached


@dataclass(frozen=True, slots=True)
class SaCounters:
    """An SA's traffic counters (``struct xfrm_lifetime_cur`` and
    ``struct xfrm_stats``), all the 10-second counter poll needs."""

    spi: int
    bytes: int = 0
    packets: int = 0
    integrity_failed: int = 0
    replay_errors: int = 0


@dataclass(frozen=True, slots=True)
class Template:
    """``struct xfrm_user_tmpl``: which SA a policy requires."""

    src: IPAddress
    dst: IPAddress
    reqid: int
    proto: int = socket.IPPROTO_ESP
    mode: Mode = Mode.TUNNEL
    optional: bool = False   # never True for protected traffic: fail closed


@dataclass(frozen=True, slots=True)
class PolicySpec:
    """``struct xfrm_userpolicy_info`` with its template."""

    selector: Selector
    direction: Direction
    action: PolicyAction = PolicyAction.ALLOW
    template: Template | None = None   # None with ALLOW = bypass
    priority: int = 0
    index: int = 0                     # 0 = let the kernel choose
    mark: Mark | None = None
    if_id: int | None = None


# Batched kernel operations (issue 19): parameter objects for
# :meth:`IpsecBackend.apply`, which sends many of them in one pipelined
# netlink batch instead of one request/ack round trip each.

@dataclass(frozen=True, slots=True)
class InstallSa:
    """Add one SA (an inbound one takes over its larval state from
    :meth:`IpsecBackend.allocate_spi`)."""

    sa_id: SaId
    spec: SaSpec
    inbound: bool


@dataclass(frozen=True, slots=True)
class RemoveSa:
    sa_id: SaId


@dataclass(frozen=True, slots=True)
class UpdatePolicy:
    """Install or replace in one step (XFRM_MSG_UPDPOLICY): a switch of the
    out policy to a new generation's reqid, a block, a re-assertion."""

    policy: PolicySpec


IpsecOp = InstallSa | RemoveSa | UpdatePolicy


@dataclass(frozen=True, slots=True)
class AllocateSpi:
    """One inbound SPI reservation for :meth:`IpsecBackend.allocate_spis`
    (the arguments of :meth:`IpsecBackend.allocate_spi`)."""

    src: IPAddress
    dst: IPAddress
    reqid: int = 0
    proto: int = socket.IPPROTO_ESP
    low: int = 0xC0000000
    high: int = 0xCFFFFFFF


class IpsecBackend(Protocol):
    """The narrow kernel interface for IPsec (after strongSwan's kernel_ipsec).

    Make-before-break (see docs/tunnels.md): install inbound SAs of the new
    generation, confirm keys with the peer, install the new outbound SA under
    a new reqid, :meth:`switch_outbound` (an atomic policy update pointing the
    out policy's template at the new reqid), then after a grace period
    :meth:`remove_sa` the old ones. Errors are
    :class:`~qkdgate.errors.TunnelError` carrying the kernel's errno.
    """

    def allocate_spi(self, src: IPAddress, dst: IPAddress, proto: int = socket.IPPROTO_ESP,
                     low: int = 0xC0000000, high: int = 0xCFFFFFFF, reqid: int = 0) -> int:
        """Reserve an inbound SPI: a keyless (larval) SA carrying ``reqid``
        until :meth:`install_inbound` keys it or the kernel drops it."""
        ...

    def allocate_spis(self, requests: Sequence[AllocateSpi]) -> list[int | TunnelError]:
        """Many :meth:`allocate_spi` sent together (one pipelined batch);
        per request its SPI or its error, in order."""
        ...

    def install_inbound(self, sa_id: SaId, spec: SaSpec) -> None: ...

    def install_outbound(self, sa_id: SaId, spec: SaSpec) -> None: ...

    def switch_outbound(self, policy: PolicySpec) -> None: ...

    def query_sa(self, sa_id: SaId) -> SaState: ...

    def read_counters(self, sa_ids: Sequence[SaId]) -> list[SaCounters | TunnelError]:
        """The counters of many SAs in one read of the SA database; per SA
        its counters or an ESRCH error (gone), in order."""
        ...

    def remove_sa(self, sa_id: SaId) -> None: ...

    def list_sas(self, reqid_min: int = 0, reqid_max: int = 0xFFFFFFFF) -> list[SaState]: ...

    def install_policy(self, policy: PolicySpec) -> None: ...

    def update_policy(self, policy: PolicySpec) -> None:
        """Replace the policy with the same selector, direction, mark and
        if_id in one step (XFRM_MSG_UPDPOLICY), e.g. an ALLOW by a BLOCK."""

    def remove_policy(self, policy: PolicySpec) -> None: ...

    def list_policies(self) -> list[PolicySpec]: ...

    def bypass_socket(self, sock: socket.socket) -> None:
        """Per-socket policy so this socket never uses the tunnels (control
        channel, KME, MQTT): it must work while the tunnels are down."""
        ...

    def apply(self, ops: Sequence[IpsecOp]) -> list[TunnelError | None]:
        """Perform ``ops`` in order, sent together; one result per op
        (``None``: done). A failed op does not stop the later ones, so a
        caller orders dependent ops into separate calls (an SA before the
        policy switch to it). Installs are read back and checked like
        :meth:`install_inbound`'s, all in one bulk read."""
        ...


# --------------------------------------------------------------------------
# MACsec (IEEE 802.1AE)
# --------------------------------------------------------------------------

@dataclass(frozen=True, slots=True)
class MacsecLinkSpec:
    """A macsec netdevice on ``parent`` (``ip link add ... type macsec``)."""

    name: str
    parent: str
    port: int = 1
    cipher: MacsecCipher = MacsecCipher.GCM_AES_XPN_256
    encrypt: bool = True
    validate_strict: bool = True
    replay_protect: bool = True
    replay_window: int = 32      # 0 = strict order: reordered frames count as late
    icv_len: int = 16


@dataclass(frozen=True, slots=True)
class MacsecSaSpec:
    """One MACsec SA (IEEE 802.1AE-2018 7.1.3). ``keyid`` is the 16-byte
    MACSEC_KEYID the kernel requires; ``ssci`` and ``salt`` (12 bytes) only
    for XPN cipher suites."""

    an: int
    key: SecretBytes
    keyid: bytes
    pn: int = 1
    active: bool = True
    ssci: int | None = None
    salt: SecretBytes | None = None

    def __post_init__(self) -> None:
        if not 0 <= self.an <= 3:
            raise ValueError(f"MACsec AN {self.an} not in 0..3")
        if len(self.keyid) != 16:
            raise ValueError("MACsec KEYID must be 16 bytes")


@dataclass(frozen=True, slots=True)
class MacsecSecyState:
    """A macsec link's SecY settings as the kernel reports them
    (``MACSEC_SECY_ATTR_*``, IEEE 802.1AE-2018 10.7)."""

    cipher: MacsecCipher | None     # None: a suite qkdgate never configures
    icv_len: int
    protect: bool
    encrypt: bool
    validate_strict: bool
    replay_protect: bool
    replay_window: int


@dataclass(frozen=True, slots=True)
class MacsecSaState:
    an: int
    active: bool
    next_pn: int
    packets: int = 0
    octets: int = 0


class MacsecBackend(Protocol):
    """MACsec link, RX SC/SA and TX SA operations (the ``macsec`` genetlink
    family, include/uapi/linux/if_macsec.h). Hitless rotation: new RX SA on
    both sides, new TX SA on the next AN, :meth:`set_encoding_sa`, grace,
    deactivate, then delete (the kernel refuses to delete an active SA)."""

    def create_link(self, spec: MacsecLinkSpec) -> int: ...

    def destroy_link(self, name: str) -> None: ...

    def link_sci(self, name: str) -> int: ...

    def secy_state(self, name: str) -> MacsecSecyState: ...

    def add_rx_sc(self, link: str, sci: int) -> None: ...

    def remove_rx_sc(self, link: str, sci: int) -> None: ...

    def add_rx_sa(self, link: str, sci: int, sa: MacsecSaSpec) -> None: ...

    def add_tx_sa(self, link: str, sa: MacsecSaSpec) -> None: ...

    def set_encoding_sa(self, link: str, an: int) -> None: ...

    def set_rx_sa_active(self, link: str, sci: int, an: int, active: bool) -> None: ...

    def set_tx_sa_active(self, link: str, an: int, active: bool) -> None: ...

    def remove_rx_sa(self, link: str, sci: int, an: int) -> None: ...

    def remove_tx_sa(self, link: str, an: int) -> None: ...

    def query_tx_sa(self, link: str, an: int) -> MacsecSaState: ...

    def set_link_up(self, name: str, up: bool) -> None: ...
