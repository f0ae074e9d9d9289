"""One tunnel: protocol generations turned into kernel SAs, make-before-break.

(Moved from qkdgate.tunnels.manager, which keeps :class:`TunnelManager`,
the holder of every tunnel, and re-exports these names.)

Theory of operation. The peer protocol (qkdgate.gateway.protocol) agrees a
:class:`SessionSecret` per *generation* and tells the daemon, in order:
``InstallInbound`` (accept traffic under the new keys), ``InstallOutbound``
(after key confirmation both ways: send under them) and ``RetireGeneration``
(after a grace period). One :class:`Tunnel` per configured tunnel turns those
into calls on the narrow kernel interfaces
(:class:`~qkdgate.interfaces.IpsecBackend`, :class:`MacsecBackend`):

* **Fail closed first.** :meth:`Tunnel.setup` installs the tunnel's policies
  before any SA exists: ``out`` is an explicit BLOCK until the first
  generation, ``in``/``fwd`` require ESP so cleartext is dropped. Policies
  are never removed on the normal path, so between SAs, after a hard
  lifetime, and after the daemon exits, traffic is dropped, never sent in
  clear (strongSwan's trap/drop policies; Rosenpass's "a useless key rather
  than a stale one").
* **Make-before-break** (strongSwan's rekey discipline, wireguard-go's
  key confirmation before switching). Inbound SAs of a generation are added
  under the tunnel's fixed inbound reqid, so the ``in`` policy accepts the
  old and new generation alike. The outbound SA goes in under a *new* reqid
  and is taken into use by one atomic policy update
  (:meth:`IpsecBackend.switch_outbound`), so no packet ever finds no SA. The
  old generation is removed after ``grace_seconds``; when the manager
  switches batching (IPsec) tunnels, their old outbound SAs go at once after
  the switch, since no policy names their reqid any more.
* **Lifetimes.** Every SA carries kernel soft/hard lifetimes (RFC 4301
  4.4.2.1) as a backstop; the tunnel also tracks them on its own clock,
  because MACsec has no kernel lifetimes and because it must *block* (not
  just lose the SA) when the hard lifetime passes without a new generation.
  It acts ``Lifetimes.hard_margin`` before a hard lifetime, in two steps:
  first every due SA of every tunnel stops carrying traffic
  (:meth:`Tunnel.deactivate_expired`: MACsec SAs set inactive, XFRM SAs
  removed), then each tunnel blocks and cleans up, so one tunnel's netlink
  round trips never keep another's expired key usable.
* **Policy per tunnel** (the config's ``KeyPolicy``: which of the legs
  ``mlkem``, ``x25519``, ``qkd`` are required or optional) is checked
  against each generation's provenance before any key reaches the kernel: a
  generation lacking a required leg is refused (:class:`GenerationRefused`),
  so no rekey happens, the current SAs run to their hard lifetime and then
  traffic blocks. A generation lacking only an optional QKD leg raises the
  ``qkd_fallback`` alarm until a generation with QKD clears it.

Per-SA keys are derived here, not in the protocol core, with
``qkdgate.keymix.schedule`` from (tunnel id, direction ``i2r``/``r2i``, SPI or
SCI+AN, generation), so both gateways derive the same key for the same SA.
Every SA records its provenance (ML-KEM algorithm, X25519 yes/no, QKD
key_IDs); keys themselves never leave :class:`SecretBytes`.

Events: every change is reported to the injected sink as a frozen
dataclass of :mod:`qkdgate.tunnels.events` (``SaInstalled``, ``SaSwitched``,
``SaRetired``, ``SaAdopted``, ``PolicyFallback`` / ``PolicyRecovered``,
``SaHardLifetimeBlock`` (one per SA), ``TunnelBlocked``, ``TunnelOpFailed``).

The module is sans-IO in the aioquic sense: the caller passes ``now``
(monotonic seconds) and calls :meth:`TunnelManager.handle_timer` at
:meth:`get_timer`; only the injected backends touch the kernel.
"""

from __future__ import annotations

import errno
import logging
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Protocol

from qkdgate.errors import LocalProtocolError, QkdgateError, TunnelError
from qkdgate.interfaces import MacsecSaState, SaCounters
from qkdgate.tunnels.driver import (
    CounterReading,
    KernelSnapshot,
    KeySchedule,
    NewSa,
    SaRecord,
    TunnelDriver,
)
from qkdgate.tunnels.events import (
    KernelStateReplaced,
    KeyInputs,
    PolicyFallback,
    PolicyRecovered,
    SaAdopted,
    SaHardLifetimeBlock,
    SaInstalled,
    SaRemovalEscalated,
    SaRetired,
    SaStaleRemoved,
    SaSwitched,
    TunnelBlocked,
    TunnelEvent,
    TunnelEventSink,
    TunnelOpFailed,
    discard,
)
from qkdgate.tunnels.policy import KeyPolicy
from qkdgate.tunnels.timers import (
    REMOVE_ATTEMPTS_BEFORE_ESCALATION,
    Expiry,
    Lifetimes,
    TunnelTimers,
)

if TYPE_CHECKING:
    from qkdgate.keymix.combiner import Provenance, SessionSecret
__all__ = [
    "Generation",
    "GenerationRefused",
    "KeySchedule",
    "Lifetimes",
    "SaRecord",
    "Tunnel",
    "TunnelDriver",
    "TunnelPolicy",
    "check_policy",
    "legs_of",
    "provenance_dict",
]

log = logging.getLogger("qkdgate.tunnels")


# The per-tunnel key policy: which key legs ("x25519", "mlkem", "qkd") a
# generation must have, and which it may lack.
TunnelPolicy = KeyPolicy

SaObserver = Callable[[str, str, "SaCounters | MacsecSaState"], None]


class GenerationRefused(QkdgateError):
    """The tunnel policy forbids installing this generation (fail closed)."""


def default_schedule() -> KeySchedule:
    from qkdgate.keymix import schedule  # late: keymix may load optional backends
    return schedule


def provenance_dict(prov: Provenance | None) -> dict[str, object]:
    """The safe-to-print summary of a generation's key inputs."""
    return KeyInputs.of(prov).as_dict()


def legs_of(prov: Provenance | None) -> frozenset[str]:
    """The key legs a generation was made from, as named in the config."""
    legs = set()
    if prov is not None and prov.kem_name:
        legs.add("mlkem")
    if prov is not None and prov.x25519:
        legs.add("x25519")
    if prov is not None and prov.qkd_key_ids:
        legs.add("qkd")
    return frozenset(legs)


def check_policy(policy: TunnelPolicy, prov: Provenance | None) -> bool:
    """Raise :class:`GenerationRefused` unless ``prov`` has every leg
    ``policy`` requires. Returns True when an optional QKD leg is missing
    (the PQC fallback alarm)."""
    legs = legs_of(prov)
    missing = policy.required - legs
    if missing:
        raise GenerationRefused(f"policy {policy.value} requires "
                                f"{', '.join(sorted(missing))}; generation has "
                                f"{', '.join(sorted(legs)) or 'nothing'}")
    return "qkd" in policy.optional and "qkd" not in legs


# --------------------------------------------------------------------------
# records
# --------------------------------------------------------------------------

@dataclass
class Generation:
    """The SAs of one generation and what made them (its deadlines are
    :class:`~qkdgate.tunnels.timers.TunnelTimers`')."""

    number: int
    provenance: Provenance | None
    role: str                      # "initiator" | "responder" | "adopted"
    inbound: SaRecord | None = None
    outbound: SaRecord | None = None
    adopted: bool = False          # found in the kernel at start, keys unknown to us
    extra: list[SaRecord] = field(default_factory=list)   # more adopted SAs
    remove_failures: int = 0       # attempts to remove its SAs that failed
    escalated: bool = False        # made harmless after REMOVE_ATTEMPTS_BEFORE_ESCALATION
    hard_expired: bool = False     # its SAs were stopped at its hard lifetime

    def forget(self, rec: SaRecord) -> None:
        """``rec`` is gone from the kernel."""
        if rec is self.outbound:
            self.outbound = None
        elif rec is self.inbound:
            self.inbound = None
        else:
            self.extra.remove(rec)

    def records(self) -> list[SaRecord]:
        return [r for r in (self.inbound, self.outbound) if r is not None] + self.extra


def directions(role: str) -> tuple[str, str]:
    """(inbound, outbound) key-schedule directions for our handshake role."""
    if role == "initiator":
        return "r2i", "i2r"
    if role == "responder":
        return "i2r", "r2i"
    raise ValueError(f"unknown handshake role {role!r}")


class _Keyed(Protocol):
    """What the tunnels read from a generation's session secret."""

    @property
    def provenance(self) -> Provenance: ...


# --------------------------------------------------------------------------
# one tunnel: generations over one kernel driver
# --------------------------------------------------------------------------

class Tunnel:
    """Generations of one tunnel over one :class:`TunnelDriver`."""

    def __init__(self, driver: TunnelDriver, *, policy: TunnelPolicy, lifetimes: Lifetimes,
                 schedule: KeySchedule | None = None,
                 emit: TunnelEventSink | None = None) -> None:
        self.driver = driver
        self.tunnel_id = driver.tunnel_id
        self.kind = driver.kind
        self.policy = policy
        self.timers = TunnelTimers(lifetimes)
        self._schedule = schedule
        self._emit: TunnelEventSink = emit or discard
        self.generations: dict[int, Generation] = {}
        self.state = "down"                        # down | up | blocked
        self.last_error: str | None = None
        self.fallback = False                      # running on a PQC-only generation
        self._blocking = False
        self.counters: dict[str, int] = {"bytes_out": 0, "bytes_in": 0, "packets_out": 0,
                                         "packets_in": 0}
        # observer of raw kernel SA counters (tunnel, direction, SaCounters or
        # MacsecSaState): the Prometheus metrics fold them into per-tunnel counters
        self.on_sa_state: SaObserver | None = None

    def _observe(self, direction: str, state: SaCounters | MacsecSaState) -> None:
        if self.on_sa_state is not None:
            try:
                self.on_sa_state(self.tunnel_id, direction, state)
            except Exception:   # metrics must never break the tunnel
                log.exception("tunnel %s: SA counter observer failed", self.tunnel_id)

    # ---- helpers -------------------------------------------------------
    @property
    def lifetimes(self) -> Lifetimes:
        return self.timers.lifetimes

    @lifetimes.setter
    def lifetimes(self, value: Lifetimes) -> None:   # a config reload
        self.timers.lifetimes = value

    @property
    def active(self) -> Generation | None:
        """The generation we send under."""
        n = self.timers.active
        return None if n is None else self.generations.get(n)

    @property
    def schedule(self) -> KeySchedule:
        if self._schedule is None:
            self._schedule = default_schedule()
        return self._schedule

    def emit(self, event: TunnelEvent) -> None:
        self._emit(event)

    def _fail(self, op: str, exc: BaseException) -> None:
        self.last_error = f"{op}: {exc}"
        log.error("tunnel %s: %s failed: %s", self.tunnel_id, op, exc,
                  extra={"tunnel": self.tunnel_id})
        self.emit(TunnelOpFailed(self.tunnel_id, op, str(exc)))

    def _generation(self, number: int, session: _Keyed, role: str, now: float) -> Generation:
        gen = self.generations.get(number)
        if gen is None:
            gen = Generation(number, session.provenance, role)
            self.generations[number] = gen
            self.timers.generation_created(number, now)
        return gen

    def _new_sa(self, session: SessionSecret, gen: Generation, direction: str, spi: int,
                now: float) -> NewSa:
        return NewSa(session=session, generation=gen.number, direction=direction, spi=spi,
                     lifetimes=self.lifetimes, schedule=self.schedule, now=now,
                     hard_at=self.timers.hard_at(gen.number))

    # ---- start and stop -------------------------------------------------
    def setup(self, now: float, snapshot: KernelSnapshot | None = None) -> None:
        """Install the fail-closed kernel state; adopt what a previous run left.
        ``snapshot``: the kernel's state read once for many tunnels
        (:meth:`TunnelManager.setup`); without it the driver reads its own."""
        batch = self.driver.batch
        report = batch.setup_from(snapshot, now) if batch is not None and snapshot is not None \
            else self.driver.setup(now)
        for what, why in report.replaced:
            log.warning("tunnel %s: %s was weaker than the configuration (%s): replaced",
                        self.tunnel_id, what, why, extra={"tunnel": self.tunnel_id})
            self.emit(KernelStateReplaced(self.tunnel_id, what, why))
        if report.adopted:
            self._adopt(report.adopted, report.sending_reqid, now)
        if report.stale_removed:
            log.warning("tunnel %s: removed %d stale SA(s) left by a previous run",
                        self.tunnel_id, report.stale_removed, extra={"tunnel": self.tunnel_id})
            self.emit(SaStaleRemoved(self.tunnel_id, report.stale_removed))
        self.state = "up" if self.active else "blocked"
        if self.active is None:
            self.last_error = None

    def _adopt(self, found: tuple[SaRecord, ...], sending_reqid: int | None,
               now: float) -> None:
        """SAs a previous run left become generation 0."""
        gen = Generation(0, None, "adopted", adopted=True)
        for rec in found:
            if rec.direction == "in" and gen.inbound is None:
                gen.inbound = rec
            elif rec.direction == "out" and gen.outbound is None:
                gen.outbound = rec
            else:
                gen.extra.append(rec)
        self.generations[0] = gen
        self.timers.generation_adopted(
            0, now, sending=gen.outbound is not None and gen.outbound.reqid == sending_reqid)
        log.debug("tunnel %s: adopted %d SA(s) from a previous run", self.tunnel_id, len(found),
                  extra={"tunnel": self.tunnel_id})
        self.emit(SaAdopted(self.tunnel_id, len(found)))

    def shutdown(self, teardown: bool, now: float = 0.0,
                 snapshot: KernelSnapshot | None = None) -> None:
        """Default (``teardown=False``): IPsec keeps policies *and* SAs (their
        kernel lifetimes end them; a restarted daemon adopts them); MACsec
        SAs, which nothing would ever end, are removed and the strict link
        stays, so traffic blocks. ``teardown=True`` removes everything we
        installed: the operator's explicit choice to leave traffic
        unprotected by us."""
        if not teardown and self.driver.sas_outlive_daemon:
            log.debug("tunnel %s: exit keeps policies and SAs (kernel lifetimes apply)",
                      self.tunnel_id, extra={"tunnel": self.tunnel_id})
            return
        for gen in list(self.generations.values()):
            self._drop_generation(gen, now)
        self.state = "blocked"
        if teardown:
            batch = self.driver.batch
            try:
                if batch.teardown_from(snapshot) if batch is not None and snapshot is not None \
                        else self.driver.teardown():
                    self.state = "down"
            except TunnelError as exc:
                self._fail("teardown", exc)

    def allocate_spi(self) -> int:
        in_use = frozenset(g.inbound.spi for g in self.generations.values()
                           if g.inbound is not None)
        return self.driver.allocate_spi(in_use)

    # ---- protocol-driven operations -------------------------------------
    def install_inbound(self, generation: int, session: SessionSecret, role: str, spi: int,
                        now: float) -> None:
        """Accept traffic under ``generation`` (InstallInbound). Raises
        GenerationRefused or TunnelError; nothing is half-installed."""
        try:
            plan = self.begin_inbound(generation, session, role, spi, now)
            if plan is None:
                return  # a retransmitted event: the SA is already there
            gen, sa, fallback = plan
            record = self.driver.add_inbound(sa)
        except QkdgateError as exc:
            self._fail("install_inbound", exc)
            raise
        self.inbound_installed(gen, record, session, fallback)

    def begin_inbound(self, generation: int, session: SessionSecret, role: str, spi: int,
                      now: float) -> tuple[Generation, NewSa, bool] | None:
        """What :meth:`install_inbound` decides before the kernel: the policy
        check (GenerationRefused) and the generation record. None: the SA is
        already there. Returns the SA to install and the fallback flag."""
        fallback = check_policy(self.policy, session.provenance)
        gen = self._generation(generation, session, role, now)
        if gen.inbound is not None:
            return None
        in_dir, _ = directions(role)
        return gen, self._new_sa(session, gen, in_dir, spi, now), fallback

    def inbound_installed(self, gen: Generation, record: SaRecord, session: SessionSecret,
                          fallback: bool) -> None:
        gen.inbound = record
        # per-tunnel detail at DEBUG: at INFO a rekey logs one line per exchange
        log.debug("tunnel %s: generation %d inbound SA %#x installed (inputs %s)",
                  self.tunnel_id, gen.number, record.spi, provenance_dict(session.provenance),
                  extra={"tunnel": self.tunnel_id})
        self.emit(SaInstalled(self.tunnel_id, gen.number, "in", record.spi,
                              KeyInputs.of(session.provenance), fallback))

    def install_outbound(self, generation: int, session: SessionSecret, role: str, spi: int,
                         now: float) -> None:
        """Send under ``generation`` from now on (InstallOutbound): new
        outbound SA, atomic switch, previous generation retires after grace."""
        try:
            plan = self.begin_outbound(generation, session, role, spi, now)
            if plan is None:
                return
            gen, sa, in_use, fallback = plan
            record = self.driver.add_outbound(sa, in_use)
            gen.outbound = record
            try:
                self.driver.switch_to(record)
            except QkdgateError:
                self.switch_failed(gen, record)
                raise
        except QkdgateError as exc:
            self._fail("install_outbound", exc)
            raise
        self.outbound_switched(gen, session, fallback, now)

    def begin_outbound(self, generation: int, session: SessionSecret, role: str, spi: int,
                       now: float) -> tuple[Generation, NewSa, frozenset[int], bool] | None:
        """What :meth:`install_outbound` decides before the kernel (see
        :meth:`begin_inbound`), plus the outbound reqids in use."""
        fallback = check_policy(self.policy, session.provenance)
        gen = self._generation(generation, session, role, now)
        if gen.outbound is not None:
            return None
        _, out_dir = directions(role)
        in_use = frozenset(r.reqid for g in self.generations.values() for r in g.records()
                           if r.direction == "out")
        return gen, self._new_sa(session, gen, out_dir, spi, now), in_use, fallback

    def switch_failed(self, gen: Generation, record: SaRecord) -> None:
        """The switch to ``record`` failed (the driver pointed back what
        moved): the new outbound SA goes, never left keyed and unseen."""
        gen.outbound = None
        if not self._remove_record(record):
            gen.extra.append(record)

    def outbound_switched(self, gen: Generation, session: SessionSecret, fallback: bool,
                          now: float) -> None:
        if gen.outbound is None:
            raise LocalProtocolError(f"tunnel {self.tunnel_id}: switched without an SA")
        spi = gen.outbound.spi
        previous = self.active
        self.timers.generation_switched(gen.number, now)
        self.state = "up"
        self.last_error = None
        was_fallback, self.fallback = self.fallback, fallback
        inputs = provenance_dict(session.provenance)
        log.debug("tunnel %s: switched outbound to generation %d SA %#x (inputs %s)",
                  self.tunnel_id, gen.number, spi, inputs, extra={"tunnel": self.tunnel_id})
        self.emit(SaSwitched(self.tunnel_id, gen.number, spi, KeyInputs.of(session.provenance),
                             previous.number if previous else None))
        if fallback and not was_fallback:
            log.warning("tunnel %s: generation %d has no QKD key: running on the PQC "
                        "fallback (policy %s)", self.tunnel_id, gen.number, self.policy.value,
                        extra={"tunnel": self.tunnel_id})
            self.emit(PolicyFallback(self.tunnel_id, self.policy.value, gen.number,
                                     "generation without a QKD key"))
        elif was_fallback and not fallback:
            log.info("tunnel %s: QKD keys again from generation %d", self.tunnel_id,
                     gen.number, extra={"tunnel": self.tunnel_id})
            self.emit(PolicyRecovered(self.tunnel_id, self.policy.value, gen.number))

    def retire(self, generation: int, now: float,
               removed: Mapping[int, TunnelError | None] | None = None) -> None:
        """RetireGeneration: remove that generation's SAs (never the active one)."""
        gen = self.retirable(generation)
        if gen is not None:
            self._drop_generation(gen, now, removed)

    def block(self, now: float, reason: str) -> None:
        """Remove every SA and block (the policies stay)."""
        act = self.active
        if act is not None and not act.hard_expired and \
                now >= self.timers.hard_act_at(act.number):
            self._report_hard_lifetime(act)
        self._blocking = True
        try:
            for gen in list(self.generations.values()):
                self._drop_generation(gen, now)
        finally:
            self._blocking = False
        self.timers.tunnel_blocked()
        try:
            self.driver.block_outbound()
        except QkdgateError as exc:
            self._fail("block", exc)
        self.state = "blocked"
        self.last_error = reason
        log.warning("tunnel %s: blocked: %s", self.tunnel_id, reason,
                    extra={"tunnel": self.tunnel_id})
        self.emit(TunnelBlocked(self.tunnel_id, reason))

    # ---- time (every deadline is TunnelTimers') -----------------------
    def get_timer(self) -> float | None:
        return self.timers.next_deadline()

    def due(self, now: float) -> bool:
        """Whether :meth:`handle_timer` (or :meth:`deactivate_expired`)
        would do anything at ``now``."""
        at = self.timers.next_action()
        return at is not None and at <= now

    def _report_hard_lifetime(self, gen: Generation) -> None:
        for rec in gen.records():
            self.emit(SaHardLifetimeBlock(self.tunnel_id, rec.direction, rec.spi, gen.number))

    def deactivate_expired(self, now: float) -> None:
        """Step one of every hard lifetime (RFC 4301 4.4.2.1), before any
        slower cleanup on this or another tunnel: every SA of a generation
        whose hard lifetime (less ``hard_margin``) has passed stops carrying
        traffic, in the fewest netlink round trips. The driver deactivates
        what it can (MACsec: the SA set inactive, IEEE 802.1AE-2018 10.7.22);
        what it cannot (XFRM has no inactive SA) is removed here. The
        generation itself is blocked or retired by :meth:`handle_timer`."""
        for number in self.timers.hard_due(now):
            gen = self.generations.get(number)
            if gen is None or gen.hard_expired:
                continue
            gen.hard_expired = True
            if number == self.timers.active:
                self._report_hard_lifetime(gen)
            for rec in sorted(gen.records(), key=lambda r: r.direction != "out"):
                try:
                    _, contained = self.driver.neutralize(rec)
                except TunnelError as exc:
                    self._fail("deactivate", exc)
                    contained = False
                if not contained and self._remove_record(rec):
                    gen.forget(rec)

    def handle_timer(self, now: float) -> list[str]:
        """Act on the deadlines that passed; returns rekey reasons the daemon
        must act on."""
        self.deactivate_expired(now)
        wants: list[str] = []
        for kind, number in self.timers.expired(now):
            gen = self.generations.get(number)
            if gen is None:
                continue
            if kind is Expiry.REMOVE_RETRY:
                self._drop_generation(gen, now)
            elif kind is Expiry.RETIRE or kind is Expiry.HARD_UNUSED:
                self.expired_generation(gen, now)
            elif kind is Expiry.HARD_ACTIVE:
                self.expired_hard_lifetime(gen, now)
            elif kind is Expiry.SOFT:
                self.timers.rekey_requested(now)
                wants.append("soft_lifetime")
        return wants

    def expired_generation(self, gen: Generation, now: float) -> None:
        """A superseded generation's grace (or an unused one's hard lifetime) is over."""
        self._drop_generation(gen, now)

    def expired_hard_lifetime(self, gen: Generation, now: float) -> None:
        # RFC 4301 4.4.2.1: a hard lifetime ends the SA; we block rather
        # than send clear or under a stale key.
        self.block(now, f"hard lifetime of generation {gen.number} reached "
                        "without a new generation")

    def poll(self, now: float) -> list[str]:
        """Read kernel counters; returns rekey reasons (soft byte limit)."""
        act = self.active
        if act is None:
            return []
        records = act.records()
        return self._counted(now, lambda: self.driver.poll(records))

    def poll_read(self, now: float, records: Sequence[SaRecord],
                  states: Sequence[SaCounters | TunnelError]) -> list[str]:
        """:meth:`poll` from ``states``, the kernel's answers for ``records``
        (the active generation's, from :meth:`active_records`) that
        :meth:`TunnelManager.poll` read for many tunnels in one batch."""
        batch = self.driver.batch
        if batch is None:
            raise LocalProtocolError(f"tunnel {self.tunnel_id} does not batch")
        return self._counted(now, lambda: batch.counters_from(records, states))

    def active_records(self) -> list[SaRecord]:
        """The SAs whose counters :meth:`poll` reads (none when nothing sends)."""
        act = self.active
        return [] if act is None else act.records()

    def _counted(self, now: float, read: Callable[[], CounterReading]) -> list[str]:
        try:
            reading = read()
        except QkdgateError as exc:
            self._fail("query", exc)
            return []
        for direction, st in reading.observed:
            self._observe(direction, st)
        self.counters = {**self.counters, **reading.counters}
        reason = reading.rekey_reason
        soft = self.lifetimes.soft_bytes
        if reason is None and soft and \
                max(self.counters["bytes_out"], self.counters["bytes_in"]) >= soft:
            reason = "soft_bytes"
        if reason and self.timers.rekey_requested_at is None:
            self.timers.rekey_requested(now)
            return [reason]
        return []

    # ---- introspection ---------------------------------------------------
    def status(self, now: float) -> dict[str, object]:
        act = self.active
        gens = []
        for g in sorted(self.generations.values(), key=lambda g: g.number):
            gens.append({
                "generation": g.number, "role": g.role, "adopted": g.adopted,
                "active": g is act, "age": round(now - self.timers.created_at(g.number), 1),
                "inputs": provenance_dict(g.provenance),
                "sas": [r.describe() for r in g.records()],
                "remove_failures": g.remove_failures,
            })
        return {
            "tunnel": self.tunnel_id, "type": self.kind, "policy": self.policy.value,
            "state": self.state, "generation": act.number if act else None,
            "sa_age": round(now - self.timers.created_at(act.number), 1) if act else None,
            "inputs": provenance_dict(act.provenance) if act else None,
            "fallback": self.fallback,
            "soft_expiry_in": round(self.timers.soft_at(act.number) - now, 1) if act else None,
            "hard_expiry_in": round(self.timers.hard_at(act.number) - now, 1) if act else None,
            **self.counters, "last_error": self.last_error, "generations": gens,
            **({"consumer": extra} if (extra := self.driver.describe()) else {}),
        }

    def _drop_generation(self, gen: Generation, now: float,
                         removed: Mapping[int, TunnelError | None] | None = None) -> bool:
        """Remove every SA of ``gen``; forget it only once they are all gone.

        Issue 17 finding 8a: a failed removal keeps the generation and the
        records that failed (status shows them), retries on the tunnel's
        timer, and after REMOVE_ATTEMPTS_BEFORE_ESCALATION failures makes the
        SAs harmless (:meth:`_escalate`). Returns True when it is gone.
        ``removed``: results of removals the manager already made in one
        batch, by ``id()`` of the record (the rest are removed here)."""
        outbound, inbound = gen.outbound, gen.inbound
        left = [r for r in (outbound, inbound, *gen.extra)
                if r is not None and not (self._removal_settled(removed[id(r)])
                                          if removed is not None and id(r) in removed
                                          else self._remove_record(r))]
        gen.outbound = outbound if any(r is outbound for r in left) else None
        gen.inbound = inbound if any(r is inbound for r in left) else None
        gen.extra = [r for r in left if r is not outbound and r is not inbound]
        if left:
            gen.remove_failures += 1
            self.timers.removal_failed(gen.number, now)
            if gen.remove_failures >= REMOVE_ATTEMPTS_BEFORE_ESCALATION and not gen.escalated:
                self._escalate(gen, now)
            return False
        self.generations.pop(gen.number, None)
        self.timers.generation_dropped(gen.number)
        log.debug("tunnel %s: generation %d retired", self.tunnel_id, gen.number,
                  extra={"tunnel": self.tunnel_id})
        self.emit(SaRetired(self.tunnel_id, gen.number))
        return True

    def _escalate(self, gen: Generation, now: float) -> None:
        """SAs that will not go are made harmless by the driver; if it cannot
        contain them, the tunnel blocks. Removal is still retried."""
        gen.escalated = True
        actions: list[str] = []
        contained = True
        for rec in gen.records():
            try:
                action, ok = self.driver.neutralize(rec)
            except TunnelError as exc:
                action, ok = f"{rec.direction} SA {rec.spi:#x}: {exc}", False
            actions.append(action)
            contained = contained and ok
        action = "; ".join(actions)
        log.error("tunnel %s: SAs of generation %d could not be removed after %d attempts: %s",
                  self.tunnel_id, gen.number, gen.remove_failures, action,
                  extra={"tunnel": self.tunnel_id})
        self.emit(SaRemovalEscalated(self.tunnel_id, gen.number, action))
        if not contained and not self._blocking:
            self.block(now, f"SAs of generation {gen.number} could not be removed: {action}")

    def _remove_record(self, rec: SaRecord) -> bool:
        """Remove one SA; True when it is gone from the kernel."""
        try:
            self.driver.remove_sa(rec)
        except TunnelError as exc:
            return self._removal_settled(exc)
        return True

    def _removal_settled(self, exc: TunnelError | None) -> bool:
        """Whether a removal with this result left the SA gone."""
        if exc is None or exc.errno in (errno.ESRCH, errno.ENODEV):   # expired already
            return True
        self._fail("remove_sa", exc)
        return False

    def retirable(self, generation: int) -> Generation | None:
        """The generation :meth:`retire` would drop (never the active one)."""
        gen = self.generations.get(generation)
        return None if gen is None or gen is self.active else gen
