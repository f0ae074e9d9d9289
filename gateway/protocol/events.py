"""Events the peer protocol core hands to its driver (the daemon).

Theory of operation: :class:`~qkdgate.gateway.protocol.session.PeerSession`
never performs I/O. What it needs done, or wants reported, comes out of
``next_event()`` as one of these small frozen dataclasses (aioquic/h11
style). Two kinds:

* imperative (the driver must act and answer): :class:`NeedQkdKeys`
  (answer with ``provide_qkd_keys`` or ``qkd_failed``), :class:`InstallInbound`
  and :class:`InstallOutbound` (answer with ``installed`` or
  ``install_failed``), :class:`RetireGeneration` (no answer),
  :class:`NeedHigherEpoch` (build a fresh session above the epoch given);
* reporting (past tense): :class:`SessionEstablished`, :class:`RekeyFailed`
  (with a typed :class:`FailureCause`), :class:`QkdFallback`,
  :class:`QkdRecovered`, :class:`PeerRestarted`,
  :class:`PeerEpochAuthenticated` (the driver persists it),
  :class:`ProtocolViolation`.

Events carry IDs, provenance and :class:`SessionSecret` objects whose secret
part never prints, so an event can be logged with ``repr`` safely.
"""

from __future__ import annotations

import enum
from collections.abc import Mapping
from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Any

if TYPE_CHECKING:  # keep this module import-light for the CLI
    from qkdgate.keymix.combiner import Provenance, SessionSecret
else:
    Provenance = SessionSecret = Any


class Event:
    """Base class of every protocol event."""

    __slots__ = ()


# ---------------------------------------------------------------- imperative

@dataclass(frozen=True, slots=True)
class NeedQkdKeys(Event):
    """Fetch QKD keys for one exchange.

    ``role == "master"``: call ``KeySource.get_new_keys(peer_sae_id, number,
    size_bits)`` (ETSI GS QKD 014 5.2 enc_keys); ``role == "slave"``: call
    ``KeySource.get_keys_by_id(peer_sae_id, key_ids)`` (014 5.3 dec_keys).
    Answer with ``provide_qkd_keys(request_id, keys, now)`` or
    ``qkd_failed(request_id, error, now)``.
    """

    request_id: int
    role: str                          # "master" | "slave"
    peer_sae_id: str
    key_ids: tuple[str, ...] = ()      # slave: the IDs the master sent
    number: int = 0                    # master: how many keys to fetch
    size_bits: int = 256
    # Several key sources (SessionConfig.qkd_sources): slave: the configured
    # source index of each key_ID, to fetch each from its own KME; master:
    # empty, fetch one key from every source and answer with at least
    # ``SessionConfig.qkd_k`` of them and their ``sources``.
    sources: tuple[int, ...] = ()


@dataclass(frozen=True, slots=True)
class InstallInbound(Event):
    """Install the inbound SAs of ``generation`` for every tunnel, keyed with
    ``qkdgate.keymix.schedule`` from ``session``. ``spis`` maps tunnel id to
    the SPI (IPsec) or AN (MACsec) WE chose and the peer will send to.
    ``role`` is our handshake role: inbound direction is ``"r2i"`` for the
    initiator and ``"i2r"`` for the responder. Answer ``installed`` or
    ``install_failed``."""

    request_id: int
    generation: int
    session: SessionSecret
    role: str                          # "initiator" | "responder"
    spis: Mapping[str, int]


@dataclass(frozen=True, slots=True)
class InstallOutbound(Event):
    """Install the outbound SAs of ``generation`` (``spis``: the PEER's
    chosen SPIs / ANs) and switch traffic to them. Emitted only after key
    confirmation both ways and once the peer has its inbound SAs in place.
    Answer ``installed`` or ``install_failed``."""

    request_id: int
    generation: int
    session: SessionSecret
    role: str
    spis: Mapping[str, int]


@dataclass(frozen=True, slots=True)
class RetireGeneration(Event):
    """Remove every SA of ``generation`` now: the peer aborted its exchange
    (authenticated) after we asked for its inbound SAs, so the peer will never
    send on it. Superseded generations are retired by the tunnel layer, the
    one owner of a generation's lifetime and grace (tunnels/timers.py)."""

    generation: int
    reason: str = "aborted"


@dataclass(frozen=True, slots=True)
class NeedHigherEpoch(Event):
    """The peer knows this gateway by an epoch of at least ``above``, higher
    than the session's own: our INITs will be dropped as stale (the other
    node of an HA pair drew higher, or our epoch counter went back). Raise the
    epoch counter past ``above`` and replace the session with a fresh one
    (docs/protocol.md 10.1). ``source`` says who told us: ``"stale"`` (the
    peer's unauthenticated STALE notice, 4.10, echoing our INIT's nonce) or
    ``"init"`` (the receiver epoch of the peer's signed INIT). The session
    does nothing more with its exchange: the driver discards it."""

    above: int
    source: str


# ---------------------------------------------------------------- reporting

@dataclass(frozen=True, slots=True)
class SessionEstablished(Event):
    """Both sides confirmed ``generation`` and our outbound switched to it."""

    generation: int
    provenance: Provenance
    latency: float                     # seconds from first message to switch
    role: str = "initiator"
    reason: str = ""                   # why the exchange ran: timer, volume...
    qkd_fallback: str = ""             # non-empty: PQC-only generation, and why


class FailureCause(enum.Enum):
    """Why an exchange was abandoned, typed so the driver can apply policy
    without parsing ``reason`` (a ``qkd-mandatory`` tunnel blocks on
    :attr:`QKD_LOCAL` and :attr:`QKD_PEER` alike: issue 17 finding 7)."""

    TIMEOUT = "timeout"            # no (authentic) answer within exchange_timeout
    QKD_LOCAL = "qkd-local"        # our key source failed (or timed out) and policy needs QKD
    QKD_PEER = "qkd-peer"          # the peer's QKD failed: signed ABORT QKD_UNAVAILABLE /
                                   # QKD_KEY_LOST, or a signed RESP with QKD absent
    AUTH = "auth"                  # a signed message carried a key confirmation that
                                   # does not verify: the two sides disagree on the secret
    POLICY = "policy"              # suite, tunnel set or QKD roles differ; we refused
    INSTALL = "install"            # our kernel refused SPIs or SAs
    PEER_ABORT = "peer-abort"      # the peer aborted (signed) for a non-QKD reason
    PEER_RESTARTED = "peer-restarted"  # the peer authenticated a new epoch mid-exchange
    LOCAL_BUG = "local-bug"        # an unexpected exception: the session is poisoned


@dataclass(frozen=True, slots=True)
class RekeyFailed(Event):
    """An exchange was abandoned; the previous generation (if any) stays.
    ``cause`` says why (typed, for policy); ``reason`` is the text for
    humans. ``retry_at`` says when the session will try again on its own."""

    generation: int | None
    reason: str
    retry_at: float | None = None
    cause: FailureCause = field(kw_only=True)   # required: every failure site says why

    @property
    def qkd_caused(self) -> bool:
        """QKD failed on either side (the cause a ``qkd-mandatory`` policy acts on)."""
        return self.cause in (FailureCause.QKD_LOCAL, FailureCause.QKD_PEER)


@dataclass(frozen=True, slots=True)
class QkdFallback(Event):
    """QKD keys could not be had; generations are PQC-only until
    :class:`QkdRecovered`. The tunnel manager applies per-tunnel policy."""

    reason: str


@dataclass(frozen=True, slots=True)
class QkdRecovered(Event):
    """A generation with QKD keys was established after a fallback."""


@dataclass(frozen=True, slots=True)
class PeerRestarted(Event):
    """The peer authenticated with a new epoch: it restarted and lost state."""

    old_epoch: str = ""
    new_epoch: str = ""


@dataclass(frozen=True, slots=True)
class PeerEpochAuthenticated(Event):
    """The peer authenticated (hybrid signature) with ``epoch``, higher than
    any epoch authenticated from it before. The driver persists it as the
    peer's epoch floor (journal) and passes it back as ``peer_epoch_floor``
    after a restart, so INITs recorded earlier are dropped before any work
    (issue 17 finding 3)."""

    epoch: int


@dataclass(frozen=True, slots=True)
class ProtocolViolation(Event):
    """Something from the peer (or something claiming to be it) was dropped.
    Rate of these is telemetry; none of them changes session state."""

    reason: str
    detail: str = ""
    counters: Mapping[str, int] = field(default_factory=dict)


__all__ = [
    "Event",
    "FailureCause",
    "InstallInbound",
    "InstallOutbound",
    "NeedQkdKeys",
    "PeerEpochAuthenticated",
    "PeerRestarted",
    "ProtocolViolation",
    "QkdFallback",
    "QkdRecovered",
    "RekeyFailed",
    "RetireGeneration",
    "SessionEstablished",
]
