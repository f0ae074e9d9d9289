"""Key consumers: data planes qkdgate keys but does not run (issue 21).

Theory of operation: XFRM and MACsec SAs are qkdgate's own (one key per SA
and direction, installed by :class:`~qkdgate.tunnels.ipsec_tunnel.IpsecDriver`
and :class:`~qkdgate.tunnels.macsec_tunnel.MacsecDriver`). WireGuard and
strongSwan run their own handshakes and take from qkdgate one symmetric key
per generation: WireGuard's preshared key, mixed into its Noise IKpsk2
handshake, and strongSwan's RFC 8784 post-quantum preshared key (PPK). A
:class:`KeyConsumer` is that narrow interface, Arnika's key sink: two verbs,
*install this generation's key* and *invalidate* (a random key, never a stale
one; with ``block`` also stop what already runs), plus the make-before-break
hooks ``prepare`` / ``retire`` that a consumer with a single key slot
(WireGuard) leaves empty.

:class:`ConsumerDriver` adapts a consumer to
:class:`~qkdgate.tunnels.driver.TunnelDriver`, so a consumer tunnel is an
ordinary :class:`~qkdgate.tunnels.manager.Tunnel`: the same generations,
per-tunnel key policy, lifetimes (a hard lifetime with no new generation
blocks), retire grace, status and events. The mapping (docs/consumers.md 2):

* ``add_inbound`` (InstallInbound: before either side switches) -> ``prepare``;
* ``add_outbound`` + ``switch_to`` (InstallOutbound) -> ``install``;
* ``remove_sa`` of a superseded generation's inbound record -> ``retire``;
* ``remove_sa`` / ``neutralize`` of the generation in use (hard lifetime,
  daemon exit), ``block_outbound`` -> ``invalidate(block=True)``.

The peer protocol runs initiator InstallInbound, responder InstallInbound,
responder InstallOutbound, initiator InstallOutbound; so whichever gateway
installs generation g first, the other has already prepared it, and the
two installs are one protocol message (DONE) apart: the bounded window of
docs/consumers.md 3.

Keys come from ``keymix.schedule.consumer_key`` (its own label per consumer,
docs/keymix.md 6.4) and live in :class:`SecretBytes`, wiped once handed over.
"""

from __future__ import annotations

import logging
from dataclasses import dataclass
from typing import TYPE_CHECKING, Protocol

from qkdgate.errors import QkdgateError, TunnelError
from qkdgate.keymix.secret import SecretBytes
from qkdgate.tunnels.driver import (
    CounterReading,
    KeySchedule,
    NewSa,
    SaRecord,
    SetupReport,
)
from qkdgate.tunnels.events import (
    ConsumerInvalidated,
    ConsumerKeyInstalled,
    KeyInputs,
    TunnelEventSink,
    discard,
)

if TYPE_CHECKING:
    from qkdgate.tunnels.manager import Tunnel, TunnelPolicy
    from qkdgate.tunnels.timers import Lifetimes

__all__ = ["CONSUMER_KINDS", "ConsumerDriver", "ConsumerKey", "ConsumerReport", "Invalidation",
           "KeyConsumer", "consumer_tunnel"]

log = logging.getLogger("qkdgate.tunnels")

CONSUMER_KINDS = ("wireguard", "strongswan")     # gateway.protocol.messages.CONSUMER_KINDS


@dataclass(frozen=True, slots=True)
class ConsumerKey:
    """One generation's key for one consumer tunnel. ``key`` never prints."""

    tunnel_id: str
    kind: str
    generation: int
    key: SecretBytes               # 32 bytes, keymix.schedule.consumer_key
    inputs: KeyInputs              # provenance: safe to print
    role: str                      # our handshake role in this generation
    now: float

    @property
    def key_name(self) -> str:
        """The key's public name, the same on both gateways (the PPK id)."""
        return f"qkdgate-{self.tunnel_id}-g{self.generation}"


@dataclass(frozen=True, slots=True)
class Invalidation:
    """Why a consumer fails closed. ``block``: also stop running sessions."""

    tunnel_id: str
    reason: str
    block: bool


@dataclass(frozen=True, slots=True)
class ConsumerReport:
    """What a verb did; every field is safe to print."""

    key_name: str | None           # the key in use now; None after invalidate
    generation: int | None
    verified: bool                 # read back and equal to what was set
    blocked: bool                  # running sessions stopped
    detail: str = ""


class KeyConsumer(Protocol):
    """A data plane keyed with one key per generation. Every method either
    completes or raises :class:`~qkdgate.errors.TunnelError`, leaving the
    previous state in place (never half-changed)."""

    @property
    def tunnel_id(self) -> str: ...
    @property
    def kind(self) -> str: ...

    def setup(self, now: float) -> ConsumerReport:
        """Daemon start: the fail-closed state (a random key, sessions
        stopped) until the first generation installs."""

    def prepare(self, key: ConsumerKey) -> None:
        """Make ``key`` usable by the peer's next authentication without
        changing what we use (strongSwan: load PPK g). May be a no-op."""

    def install(self, key: ConsumerKey) -> ConsumerReport:
        """Use ``key`` from now on, read it back, and end any block. On
        failure raise; :class:`ConsumerDriver` then invalidates (fail closed)."""

    def retire(self, generation: int) -> None:
        """``generation`` is superseded and its grace is over. May be a no-op."""

    def invalidate(self, why: Invalidation) -> ConsumerReport:
        """Fail closed: a random key; with ``why.block`` stop running
        sessions too. Idempotent."""

    def teardown(self) -> bool:
        """The operator's explicit teardown: undo what ``setup`` did."""

    def describe(self) -> dict[str, object]:
        """Kind-specific status, safe to print."""


def _role(direction: str, inbound: bool) -> str:
    # keymix directions are relative to handshake roles: the initiator
    # receives r2i and sends i2r (tunnels.manager.directions)
    return "initiator" if (direction == "r2i") == inbound else "responder"


class ConsumerDriver:
    """A :class:`~qkdgate.tunnels.driver.TunnelDriver` over a :class:`KeyConsumer`."""

    sas_outlive_daemon = False     # nothing bounds a PSK / PPK but us
    batch = None

    def __init__(self, consumer: KeyConsumer, emit: TunnelEventSink | None = None) -> None:
        self.consumer = consumer
        self._emit: TunnelEventSink = emit or discard
        self._pending: dict[int, ConsumerKey] = {}     # added outbound, not yet switched
        self.installed: int | None = None               # the generation the consumer uses
        self.blocked = False

    @property
    def tunnel_id(self) -> str:
        return self.consumer.tunnel_id

    @property
    def kind(self) -> str:
        return self.consumer.kind

    def _key(self, sa: NewSa, inbound: bool) -> ConsumerKey:
        schedule: KeySchedule = sa.schedule
        key = schedule.consumer_key(sa.session, self.kind, self.tunnel_id, sa.generation)
        return ConsumerKey(self.tunnel_id, self.kind, sa.generation, key,
                           KeyInputs.of(sa.session.provenance), _role(sa.direction, inbound),
                           sa.now)

    # ---- TunnelDriver ----------------------------------------------------
    def setup(self, now: float) -> SetupReport:
        report = self.consumer.setup(now)
        self.installed, self.blocked = None, True
        self._emit(ConsumerInvalidated(self.tunnel_id, self.kind, "start: no generation yet",
                                       report.blocked, report.detail))
        return SetupReport()

    def allocate_spi(self, inbound_in_use: frozenset[int]) -> int:
        return 0      # docs/protocol.md 4.2: a consumer entry carries 0

    def add_inbound(self, sa: NewSa) -> SaRecord:
        key = self._key(sa, inbound=True)
        try:
            self.consumer.prepare(key)
        finally:
            key.key.wipe()
        return SaRecord("in", 0, 0, sa.now, (sa.generation, 0))

    def add_outbound(self, sa: NewSa, reqids_in_use: frozenset[int]) -> SaRecord:
        old = self._pending.pop(sa.generation, None)
        if old is not None:
            old.key.wipe()
        self._pending[sa.generation] = self._key(sa, inbound=False)
        return SaRecord("out", 0, 0, sa.now, (sa.generation, 1))

    def switch_to(self, outbound: SaRecord) -> None:
        generation = _generation(outbound)
        key = self._pending.pop(generation, None)
        if key is None:
            raise TunnelError("install_key", None,
                             f"{self.tunnel_id}: no key of generation {generation}")
        try:
            report = self.consumer.install(key)
        except QkdgateError:
            # whatever the consumer holds now is unconfirmed: fail closed
            # (a random key, sessions stopped), report, and let the next
            # generation rebuild it
            try:
                self._invalidate(f"install of generation {generation} failed")
            except TunnelError as exc:
                log.error("tunnel %s: invalidating after a failed install failed too: %s "
                          "(the tunnel's next block retries)", self.tunnel_id, exc,
                          extra={"tunnel": self.tunnel_id})
            raise
        finally:
            key.key.wipe()
        self.installed, self.blocked = generation, False
        self._emit(ConsumerKeyInstalled(self.tunnel_id, self.kind, generation,
                                        report.key_name or key.key_name, key.inputs,
                                        report.verified, report.detail))

    def block_outbound(self) -> None:
        if self.blocked and self.installed is None:
            return       # already invalidated and blocked since the last install
        self._invalidate("tunnel blocked")

    def _invalidate(self, reason: str) -> None:
        report = self.consumer.invalidate(Invalidation(self.tunnel_id, reason, True))
        self.installed, self.blocked = None, True
        self._emit(ConsumerInvalidated(self.tunnel_id, self.kind, reason, report.blocked,
                                       report.detail))

    def remove_sa(self, rec: SaRecord) -> None:
        generation = _generation(rec)
        if rec.direction == "in":
            self.consumer.retire(generation)
            return
        pending = self._pending.pop(generation, None)
        if pending is not None:
            pending.key.wipe()
        if generation == self.installed:
            # the key in use goes (hard lifetime, daemon exit): a random one
            # replaces it and nothing runs on under the old one
            self._invalidate(f"generation {generation} removed")

    def neutralize(self, rec: SaRecord) -> tuple[str, bool]:
        if rec.direction == "out" and _generation(rec) == self.installed:
            self._invalidate(f"generation {_generation(rec)} neutralised")
            return f"{self.kind} key of generation {_generation(rec)} replaced by a random " \
                   "key, sessions stopped", True
        return f"{self.kind} generation {_generation(rec)} not in use", True

    def poll(self, records: list[SaRecord]) -> CounterReading:
        return CounterReading()

    def teardown(self) -> bool:
        for key in self._pending.values():
            key.key.wipe()
        self._pending.clear()
        return self.consumer.teardown()

    def describe(self) -> dict[str, object]:
        return {"kind": self.kind, "installed_generation": self.installed,
                "blocked": self.blocked, **self.consumer.describe()}


def _generation(rec: SaRecord) -> int:
    handle = rec.handle
    if not isinstance(handle, tuple):
        raise TunnelError("consumer_record", None, f"not a consumer record: {rec.describe()}")
    return int(handle[0])


def consumer_tunnel(consumer: KeyConsumer, *, policy: TunnelPolicy, lifetimes: Lifetimes,
                    schedule: KeySchedule | None = None,
                    emit: TunnelEventSink | None = None) -> Tunnel:
    """A consumer :class:`Tunnel`: the generation manager over a :class:`ConsumerDriver`."""
    from qkdgate.tunnels.manager import Tunnel
    return Tunnel(ConsumerDriver(consumer, emit), policy=policy, lifetimes=lifetimes,
                  schedule=schedule, emit=emit)

