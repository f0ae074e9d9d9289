"""What the daemon reports: small frozen event types.

(They live here, in the telemetry layer, because telemetry consumes them and
sits below the daemon in the layer rule, .importlinter.)

Theory of operation: every part of the daemon reports through one hook
(:meth:`~qkdgate.gateway.daemon.daemon.Daemon.subscribe`) with an
:data:`Event`: one of the dataclasses below, or a tunnel's own
:class:`~qkdgate.tunnels.events.TunnelEvent`, passed on unchanged. Names are
past tense (they report, they never ask). Consumers -- MQTT telemetry,
Prometheus metrics, the demo view, tests -- ``match`` on the class; one that
meets a class it does not know raises :class:`UnknownEvent` (a bug, so a test
failure, never a silent drop).

:meth:`DaemonEvent.to_dict` is the flat wire form (``{"event": <name>,
fields...}``) that docs/daemon.md and docs/telemetry.md specify; MQTT adds the
envelope (``v``, ``gateway``, ``ts``, ``seq``). Every field is safe to print:
names, generation numbers, reasons, QKD key_IDs (public identifiers), never
key bytes.
"""

from __future__ import annotations

from dataclasses import dataclass, fields
from typing import Any, ClassVar

from qkdgate.errors import LocalProtocolError
from qkdgate.tunnels.events import KeyInputs, TunnelEvent


class UnknownEvent(LocalProtocolError):
    """A consumer met an event class it does not handle: our bug."""

    def __init__(self, event: object, consumer: str) -> None:
        super().__init__(f"{consumer}: unknown event type {type(event).__name__}")


def _plain(value: Any) -> Any:
    if isinstance(value, KeyInputs):
        return value.as_dict()
    if isinstance(value, tuple):
        return [_plain(v) for v in value]
    return value


@dataclass(frozen=True, slots=True)
class DaemonEvent:
    """Base of every event the daemon itself reports."""

    name: ClassVar[str] = "daemon_event"

    def to_dict(self) -> dict[str, Any]:
        out: dict[str, Any] = {"event": self.name}
        for f in fields(self):
            out[f.name] = _plain(getattr(self, f.name))
        return out


Event = DaemonEvent | TunnelEvent


def to_dict(event: Event) -> dict[str, Any]:
    """The wire form of any event the hook carries."""
    return event.to_dict()


# ---------------------------------------------------------------- lifecycle

@dataclass(frozen=True, slots=True)
class DaemonStarted(DaemonEvent):
    """After ``READY``: policies in place, socket bound, sessions started."""

    name: ClassVar[str] = "daemon_started"
    tunnels: tuple[str, ...]


@dataclass(frozen=True, slots=True)
class DaemonStopping(DaemonEvent):
    name: ClassVar[str] = "daemon_stopping"
    teardown: bool


@dataclass(frozen=True, slots=True)
class ConfigReloaded(DaemonEvent):
    name: ClassVar[str] = "config_reloaded"
    applied: tuple[str, ...]
    needs_restart: tuple[str, ...]


@dataclass(frozen=True, slots=True)
class ConfigRejected(DaemonEvent):
    """SIGHUP with a bad file: nothing changed."""

    name: ClassVar[str] = "config_rejected"
    error: str


# ---------------------------------------------------------------- exchanges

@dataclass(frozen=True, slots=True)
class RekeyDone(DaemonEvent):
    """A generation carries traffic (one per tunnel of the peer)."""

    name: ClassVar[str] = "rekey_done"
    peer: str
    tunnel: str
    generation: int
    inputs: KeyInputs
    latency_ms: float
    reason: str


@dataclass(frozen=True, slots=True)
class RekeyFailedReport(DaemonEvent):
    """An exchange was abandoned (one per tunnel of the peer); ``cause``
    names whose failure it was (the protocol's ``FailureCause``)."""

    name: ClassVar[str] = "rekey_failed"
    tunnel: str
    peer: str
    generation: int | None
    reason: str
    retry_in: float | None
    cause: str


@dataclass(frozen=True, slots=True)
class RekeyRequested(DaemonEvent):
    name: ClassVar[str] = "rekey_requested"
    tunnel: str
    peer: str
    reason: str


@dataclass(frozen=True, slots=True)
class InstallFailed(DaemonEvent):
    """A generation was refused by policy or the kernel failed."""

    name: ClassVar[str] = "install_failed"
    peer: str
    direction: str
    generation: int
    error: str


@dataclass(frozen=True, slots=True)
class PeerRestartedReport(DaemonEvent):
    name: ClassVar[str] = "peer_restarted"
    peer: str


@dataclass(frozen=True, slots=True)
class ProtocolViolationReport(DaemonEvent):
    """A datagram was dropped (forged, replayed, malformed); ``count`` so far."""

    name: ClassVar[str] = "protocol_violation"
    peer: str
    reason: str
    count: int


@dataclass(frozen=True, slots=True)
class SessionFailedReport(DaemonEvent):
    """Our own code failed while serving ``peer`` (a bug, not peer input):
    its tunnels were failed closed (``blocked``) and a fresh session built."""

    name: ClassVar[str] = "session_failed"
    peer: str
    error: str
    blocked: tuple[str, ...]


@dataclass(frozen=True, slots=True)
class PolicyShortfall(DaemonEvent):
    """A reload tightened ``tunnel``'s policy and the generation carrying
    traffic falls short of it: rekeying now (``qkd-mandatory`` blocks now)."""

    name: ClassVar[str] = "policy_shortfall"
    tunnel: str
    policy: str
    generation: int
    reason: str


# ---------------------------------------------------------------- QKD

@dataclass(frozen=True, slots=True)
class QkdKeysFetched(DaemonEvent):
    name: ClassVar[str] = "qkd_keys"
    peer: str
    role: str
    key_ids: tuple[str, ...]
    latency_ms: float
    sources: tuple[str, ...] = ()   # several key sources: the source of each key_ID


@dataclass(frozen=True, slots=True)
class QkdError(DaemonEvent):
    """The exchange got no QKD keys; ``kind`` says why (docs/daemon.md)."""

    name: ClassVar[str] = "qkd_error"
    peer: str
    error: str
    kind: str
    source: str = ""     # several key sources: the one that failed ("" for the exchange)


@dataclass(frozen=True, slots=True)
class JournalFailed(DaemonEvent):
    """The journal cannot record consumed key_IDs: no QKD until restart."""

    name: ClassVar[str] = "journal_error"
    error: str
    consequence: str


@dataclass(frozen=True, slots=True)
class KeySourceUp(DaemonEvent):
    name: ClassVar[str] = "key_source_up"
    source: str
    peer: str
    reason: str


@dataclass(frozen=True, slots=True)
class KeySourceDown(DaemonEvent):
    name: ClassVar[str] = "key_source_down"
    source: str
    peer: str
    reason: str


@dataclass(frozen=True, slots=True)
class QkdStatus(DaemonEvent):
    """One KME status poll (ETSI GS QKD 014 6.1)."""

    name: ClassVar[str] = "qkd_status"
    peer: str
    source: str
    stored_key_count: int | None
    max_key_count: int | None
    qber: float | None
    link_up: bool
    alarms: tuple[str, ...]


@dataclass(frozen=True, slots=True)
class QkdAlarm(DaemonEvent):
    name: ClassVar[str] = "qkd_alarm"
    peer: str
    source: str
    qber: float | None
    threshold: float | None
    alarms: tuple[str, ...]


@dataclass(frozen=True, slots=True)
class QkdFallbackReport(DaemonEvent):
    """The session runs without QKD (PQC-only where the policy allows)."""

    name: ClassVar[str] = "qkd_fallback"
    peer: str
    reason: str


@dataclass(frozen=True, slots=True)
class QkdRecoveredReport(DaemonEvent):
    name: ClassVar[str] = "qkd_recovered"
    peer: str


@dataclass(frozen=True, slots=True)
class KeyServiceDelivered(DaemonEvent):
    """The key service handed keys to an SAE (docs/keyservice.md 6): which
    pool and API, the SAE pair, the key_IDs (public), and the generation and
    inputs they came from. Never key bytes."""

    name: ClassVar[str] = "keyservice_delivered"
    pool: str
    api: str
    master_sae: str
    slave_sae: str
    key_ids: tuple[str, ...]
    generation: int
    inputs: KeyInputs


@dataclass(frozen=True, slots=True)
class KeyServiceRefused(DaemonEvent):
    """The key service refused a request; ``status`` is the ETSI 014 one."""

    name: ClassVar[str] = "keyservice_refused"
    pool: str | None
    api: str
    caller: str | None
    status: int
    reason: str
