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
ordinary :class:`~qkdgate.tunnels.tunnel.Tunnel`: the same generations,
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

import copy
import dataclasses
import logging
import threading
from collections import deque
from collections.abc import Callable
from dataclasses import dataclass
from typing import TYPE_CHECKING, Protocol, runtime_checkable

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
    from qkdgate.tunnels.timers import Lifetimes
    from qkdgate.tunnels.tunnel import Tunnel, TunnelPolicy

__all__ = ["CONSUMER_KINDS", "ConsumerDriver", "ConsumerKey", "ConsumerReport", "Invalidation",
           "KeyConsumer", "Outcome", "ThreadedConsumer", "consumer_tunnel"]

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
    pending: bool = False          # queued on a ThreadedConsumer's worker: see Outcome


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


@runtime_checkable
class Supersedable(Protocol):
    """A consumer whose install may stop retrying once a later generation's
    install is queued behind it (strongSwan's re-authentication):
    :class:`ThreadedConsumer` sets ``superseded`` to its
    :meth:`~ThreadedConsumer.newer_install_queued`."""

    superseded: Callable[[int], bool]


@dataclass(frozen=True, slots=True)
class Outcome:
    """What a queued verb of a :class:`ThreadedConsumer` did, once it ran."""

    verb: str                      # "install" | "invalidate" | "prepare" | "retire"
    generation: int | None
    report: ConsumerReport | None  # None: it failed
    error: str | None = None       # safe to print (TunnelError text)


class ThreadedConsumer:
    """A :class:`KeyConsumer` whose verbs run on one worker thread, off the
    event loop, in the order they were called (issue 21 follow-up item 2).

    strongSwan's re-authentication is a synchronous vici ``initiate`` that
    can take up to the connection's ``timeout_ms`` (15 s) on a slow or dead
    peer; run on the daemon's event loop it would stop every other peer's
    protocol and timer for that long. Here ``prepare``, ``install``,
    ``retire`` and ``invalidate`` only queue the call (a copy of the key:
    the caller wipes its own) and return; one worker thread per consumer
    runs the queue in order, so the make-before-break steps keep their
    order exactly (load PPK g, load-conn g + re-authenticate, unload g-1).
    ``setup`` and ``teardown`` (daemon start, the operator's teardown) wait
    for the queue and run inline.

    Time bounds and cancellation: every job is bounded by the inner
    consumer's own timeouts (vici ``timeout_ms``, the socket timeout).
    ``invalidate`` cancels every queued job that has not started (their
    keys wiped) and runs next; a job already running is never cut short (a
    vici ``initiate`` that charon goes on with after we hang up could bring
    up an IKE_SA after the block), so a block takes effect at most one
    running job later. A failed ``install`` is answered on the worker at
    once the way :class:`ConsumerDriver` answers a synchronous one: the
    inner consumer is invalidated with ``block`` (fail closed). Results are
    collected as :class:`Outcome` by :meth:`outcomes` (the driver's
    ``poll``). The thread exists only while there is work and is not a
    daemon thread, so a clean exit runs the queue (the exit's invalidate)
    before the process ends.
    """

    def __init__(self, inner: KeyConsumer, *, name: str | None = None) -> None:
        self.inner = inner
        self._name = name or f"consumer-{inner.tunnel_id}"
        self._cv = threading.Condition()
        self._queue: deque[tuple[str, int | None, Callable[[], ConsumerReport | None],
                                 Callable[[], None]]] = deque()
        self._running: str | None = None
        self._thread: threading.Thread | None = None
        self._outcomes: deque[Outcome] = deque(maxlen=64)
        self._described: dict[str, object] = {}
        if isinstance(inner, Supersedable):
            inner.superseded = self.newer_install_queued

    @property
    def tunnel_id(self) -> str:
        return self.inner.tunnel_id

    @property
    def kind(self) -> str:
        return self.inner.kind

    # ---- the queue -----------------------------------------------------
    def _submit(self, verb: str, generation: int | None,
                job: Callable[[], ConsumerReport | None], cleanup: Callable[[], None],
                first: bool = False) -> None:
        with self._cv:
            if first:
                while self._queue:
                    _, _, _, drop = self._queue.popleft()
                    drop()
                self._queue.appendleft((verb, generation, job, cleanup))
            else:
                self._queue.append((verb, generation, job, cleanup))
            if self._thread is None:
                self._thread = threading.Thread(target=self._work, name=self._name)
                self._thread.start()

    def _work(self) -> None:
        while True:
            with self._cv:
                if not self._queue:
                    self._thread = None
                    self._running = None
                    self._cv.notify_all()
                    return
                verb, generation, job, cleanup = self._queue.popleft()
                self._running = verb
            try:
                self._outcomes.append(self._run(verb, generation, job))
            finally:
                cleanup()
                self._snapshot()

    def _run(self, verb: str, generation: int | None,
             job: Callable[[], ConsumerReport | None]) -> Outcome:
        try:
            return Outcome(verb, generation, job())
        except Exception as exc:  # a worker must fail closed, not die
            if isinstance(exc, QkdgateError):
                why = str(exc)
            else:    # our bug: the traceback once, then the same fail-closed path
                log.exception("tunnel %s: %s on the consumer worker raised", self.tunnel_id,
                              verb, extra={"tunnel": self.tunnel_id})
                why = f"{type(exc).__name__}: {exc}"
        if verb == "install":
            try:
                self.inner.invalidate(Invalidation(
                    self.tunnel_id, f"install of generation {generation} failed", True))
            except QkdgateError as exc:
                log.error("tunnel %s: invalidating after a failed install failed too: %s",
                          self.tunnel_id, exc, extra={"tunnel": self.tunnel_id})
        return Outcome(verb, generation, None, why)

    def _snapshot(self) -> None:
        try:
            self._described = self.inner.describe()
        except Exception as exc:  # noqa: BLE001 - a status read must never stop the worker
            self._described = {"error": f"{type(exc).__name__}: {exc}"}

    def wait_idle(self, timeout: float | None = None) -> bool:
        """Block until the queue is empty and no job runs (tests, setup)."""
        with self._cv:
            return self._cv.wait_for(lambda: self._thread is None, timeout)

    def outcomes(self) -> list[Outcome]:
        """Every outcome since the last call, oldest first."""
        out = []
        while self._outcomes:
            out.append(self._outcomes.popleft())
        return out

    def newer_install_queued(self, generation: int) -> bool:
        """Whether an install of a later generation than ``generation`` waits
        in the queue: the running install's key is superseded, and a step
        it would retry (strongSwan's re-authentication) may stop."""
        with self._cv:
            return any(verb == "install" and g is not None and g > generation
                       for verb, g, _, _ in self._queue)

    @property
    def busy(self) -> str | None:
        """The verb running on the worker now, if any."""
        return self._running

    # ---- KeyConsumer ---------------------------------------------------
    def setup(self, now: float) -> ConsumerReport:
        self.wait_idle()
        report = self.inner.setup(now)
        self._snapshot()
        return report

    @staticmethod
    def _own(key: ConsumerKey) -> ConsumerKey:
        return dataclasses.replace(key, key=copy.copy(key.key))

    def prepare(self, key: ConsumerKey) -> None:
        own = self._own(key)

        def job() -> None:
            self.inner.prepare(own)

        self._submit("prepare", key.generation, job, own.key.wipe)

    def install(self, key: ConsumerKey) -> ConsumerReport:
        own = self._own(key)
        self._submit("install", key.generation, lambda: self.inner.install(own), own.key.wipe)
        return ConsumerReport(key.key_name, key.generation, False, False,
                              "queued on the consumer worker", pending=True)

    def retire(self, generation: int) -> None:
        def job() -> None:
            self.inner.retire(generation)

        self._submit("retire", generation, job, lambda: None)

    def invalidate(self, why: Invalidation) -> ConsumerReport:
        self._submit("invalidate", None, lambda: self.inner.invalidate(why), lambda: None,
                     first=True)
        return ConsumerReport(None, None, False, why.block,
                              f"{why.reason}: queued first on the consumer worker", pending=True)

    def teardown(self) -> bool:
        self.wait_idle()
        return self.inner.teardown()

    def describe(self) -> dict[str, object]:
        # the inner consumer as the worker last saw it: never a vici call
        # from the loop while the worker holds the session
        with self._cv:
            queued = [v for v, _, _, _ in self._queue]
        return {**self._described, "worker": {"running": self._running, "queued": queued}}


def _role(direction: str, inbound: bool) -> str:
    # keymix directions are relative to handshake roles: the initiator
    # receives r2i and sends i2r (tunnels.tunnel.directions)
    return "initiator" if (direction == "r2i") == inbound else "responder"


class ConsumerDriver:
    """A :class:`~qkdgate.tunnels.driver.TunnelDriver` over a :class:`KeyConsumer`."""

    sas_outlive_daemon = False     # nothing bounds a PSK / PPK but us
    batch = None

    def __init__(self, consumer: KeyConsumer, emit: TunnelEventSink | None = None) -> None:
        self.consumer = consumer
        self._emit: TunnelEventSink = emit or discard
        self._pending: dict[int, ConsumerKey] = {}     # added outbound, not yet switched
        self._inputs: dict[int, KeyInputs] = {}         # queued installs' provenance
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
        if report.pending:
            # a ThreadedConsumer: the event comes with its Outcome (poll)
            self._inputs[generation] = key.inputs
            return
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
        """A :class:`ThreadedConsumer`'s outcomes: events for what ran; a
        failed install (the worker has already failed it closed) marks the
        tunnel's consumer blocked and asks for a new generation."""
        outcomes = getattr(self.consumer, "outcomes", None)
        if outcomes is None:
            return CounterReading()
        reason = None
        for o in outcomes():
            if o.verb == "install" and o.generation is not None:
                inputs = self._inputs.pop(o.generation, KeyInputs())
                if o.report is not None:
                    self._emit(ConsumerKeyInstalled(
                        self.tunnel_id, self.kind, o.generation,
                        o.report.key_name or f"generation {o.generation}", inputs,
                        o.report.verified, o.report.detail))
                    continue
                if self.installed == o.generation:
                    self.installed, self.blocked = None, True
                reason = f"{self.kind} install of generation {o.generation} failed"
                self._emit(ConsumerInvalidated(self.tunnel_id, self.kind, reason, True,
                                               o.error or ""))
            elif o.error is not None:     # prepare and retire report nothing
                log.error("tunnel %s: %s %s failed on the consumer worker: %s",
                          self.tunnel_id, self.kind, o.verb, o.error,
                          extra={"tunnel": self.tunnel_id})
        return CounterReading(rekey_reason=reason)

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
    from qkdgate.tunnels.tunnel import Tunnel
    return Tunnel(ConsumerDriver(consumer, emit), policy=policy, lifetimes=lifetimes,
                  schedule=schedule, emit=emit)

