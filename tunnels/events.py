"""What a tunnel reports: small frozen event types.

Theory of operation: a :class:`~qkdgate.tunnels.tunnel.Tunnel` reports every
change of its kernel state (an SA installed, switched, retired, a block, a
failed kernel operation) by calling its sink (``Callable[[TunnelEvent],
None]``, injected by whoever builds the tunnel) with one of the dataclasses
below. Names are past tense: they report, they do not ask (STYLE.md). The
daemon turns them into its own events; :meth:`TunnelEvent.to_dict` gives the
flat dict (``{"event": <name>, "tunnel": ..., fields...}``) documented in
docs/daemon.md and docs/tunnels.md, which telemetry and the control socket
carry.

Every field is safe to print: SPIs, reqids, generation numbers, the *names*
of the key legs and QKD key_IDs, never key bytes.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass, fields
from typing import ClassVar, Protocol


class _Provenance(Protocol):
    """What the protocol records about a generation's key inputs."""

    @property
    def kem_name(self) -> str | None: ...
    @property
    def x25519(self) -> bool: ...
    @property
    def qkd_key_ids(self) -> tuple[str, ...] | list[str]: ...
    @property
    def qkd_sources(self) -> tuple[int, ...]: ...


@dataclass(frozen=True, slots=True)
class KeyInputs:
    """The safe-to-print summary of a generation's key inputs."""

    kem: str | None = None
    x25519: bool | None = None
    qkd_key_ids: tuple[str, ...] = ()
    # several QKD key sources: the configured source index of each key_ID
    qkd_sources: tuple[int, ...] = ()

    @classmethod
    def of(cls, prov: _Provenance | None) -> KeyInputs:
        if prov is None:
            return cls()
        return cls(prov.kem_name, bool(prov.x25519), tuple(prov.qkd_key_ids),
                   tuple(prov.qkd_sources))

    def as_dict(self) -> dict[str, object]:
        out: dict[str, object] = {"kem": self.kem, "x25519": self.x25519,
                                  "qkd_key_ids": list(self.qkd_key_ids)}
        if self.qkd_sources:
            out["qkd_sources"] = list(self.qkd_sources)
        return out


@dataclass(frozen=True, slots=True)
class TunnelEvent:
    """Base of every tunnel event: which tunnel it concerns."""

    name: ClassVar[str] = "tunnel_event"
    tunnel: str

    def to_dict(self) -> dict[str, object]:
        """The flat dict form the daemon's subscribers receive."""
        out: dict[str, object] = {"event": self.name}
        for f in fields(self):
            value = getattr(self, f.name)
            out[f.name] = value.as_dict() if isinstance(value, KeyInputs) else value
        return out


@dataclass(frozen=True, slots=True)
class SaInstalled(TunnelEvent):
    """An inbound SA of ``generation`` accepts traffic."""

    name: ClassVar[str] = "sa_installed"
    generation: int
    direction: str
    spi: int
    inputs: KeyInputs
    fallback: bool


@dataclass(frozen=True, slots=True)
class SaSwitched(TunnelEvent):
    """Outbound traffic now goes under ``generation``."""

    name: ClassVar[str] = "sa_switched"
    generation: int
    spi: int
    inputs: KeyInputs
    previous: int | None


@dataclass(frozen=True, slots=True)
class SaRetired(TunnelEvent):
    """Every SA of ``generation`` is gone from the kernel and our records."""

    name: ClassVar[str] = "sa_retired"
    generation: int


@dataclass(frozen=True, slots=True)
class SaAdopted(TunnelEvent):
    """``count`` SAs a previous run left were taken over at start."""

    name: ClassVar[str] = "sa_adopted"
    count: int


@dataclass(frozen=True, slots=True)
class SaStaleRemoved(TunnelEvent):
    """``count`` MACsec SAs a crashed run left were removed at start."""

    name: ClassVar[str] = "sa_stale_removed"
    count: int


@dataclass(frozen=True, slots=True)
class KernelStateReplaced(TunnelEvent):
    """A kernel object found at start was weaker than the configuration
    (``what``: which one; ``reason``: how) and was replaced, blocking first,
    instead of being adopted."""

    name: ClassVar[str] = "kernel_state_replaced"
    what: str
    reason: str


@dataclass(frozen=True, slots=True)
class PolicyFallback(TunnelEvent):
    """The tunnel runs on a generation without its optional QKD leg."""

    name: ClassVar[str] = "policy_fallback"
    policy: str
    generation: int
    reason: str


@dataclass(frozen=True, slots=True)
class PolicyRecovered(TunnelEvent):
    """A generation with QKD ended the fallback."""

    name: ClassVar[str] = "policy_recovered"
    policy: str
    generation: int


@dataclass(frozen=True, slots=True)
class SaHardLifetimeBlock(TunnelEvent):
    """One SA of the active generation reached its hard lifetime: blocked."""

    name: ClassVar[str] = "sa_hard_lifetime_block"
    direction: str
    spi: int
    generation: int


@dataclass(frozen=True, slots=True)
class SaRemovalEscalated(TunnelEvent):
    """SAs of ``generation`` could not be removed after repeated attempts;
    ``action`` says how they were made harmless (an SA set inactive, the
    macsec link taken down, the tunnel blocked). Removal is still retried."""

    name: ClassVar[str] = "sa_removal_escalated"
    generation: int
    action: str


@dataclass(frozen=True, slots=True)
class TunnelBlocked(TunnelEvent):
    """No SA sends any more; the policies drop the tunnel's traffic."""

    name: ClassVar[str] = "tunnel_blocked"
    reason: str


@dataclass(frozen=True, slots=True)
class TunnelOpFailed(TunnelEvent):
    """A kernel operation failed (``op``, errno text in ``error``)."""

    name: ClassVar[str] = "tunnel_error"
    op: str
    error: str


@dataclass(frozen=True, slots=True)
class ConsumerKeyInstalled(TunnelEvent):
    """A key consumer (WireGuard, strongSwan: docs/consumers.md) uses the key
    of ``generation`` from now on. ``key_name`` is its public name (the PPK
    id); ``verified``: read back from the kernel / daemon and equal."""

    name: ClassVar[str] = "consumer_key_installed"
    kind: str
    generation: int
    key_name: str
    inputs: KeyInputs
    verified: bool
    detail: str


@dataclass(frozen=True, slots=True)
class ConsumerInvalidated(TunnelEvent):
    """A key consumer was failed closed: a random key replaced its key
    (never a stale one kept); ``blocked``: its running sessions were stopped
    too (WireGuard: the peer's allowed IPs emptied)."""

    name: ClassVar[str] = "consumer_invalidated"
    kind: str
    reason: str
    blocked: bool
    detail: str


TunnelEventSink = Callable[[TunnelEvent], None]


def discard(event: TunnelEvent) -> None:
    """The sink of a tunnel nobody listens to."""
