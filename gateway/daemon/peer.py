"""One peer: its protocol session, the driver that feeds it, the answers.

Theory of operation: a :class:`PeerRunner` owns one
:class:`~qkdgate.gateway.protocol.session.PeerSession` and the
:class:`~qkdgate.gateway.daemon.udp.PeerDriver` that pumps it. Every event the
session emits is dispatched through one table keyed by the event's class
(:attr:`PeerRunner.handlers`); a class missing from the table raises
:class:`~qkdgate.gateway.telemetry.events.UnknownEvent` -- our bug, handled like
any other. Imperative events are answered on the session (``installed`` /
``install_failed``, ``provide_qkd_keys`` / ``qkd_failed``); reporting events
update :class:`PeerState` and are emitted as typed daemon events.

Bugs fail closed (issue 9 item 2, h11's rule): peer garbage never raises
out of a session (it counts it as a ``ProtocolViolation``), so any exception
from the session -- or from our handler of one of its events -- means the
session may be half-changed. The driver stops using it and calls
:meth:`PeerRunner.session_failed`: the traceback is logged once, every tunnel
of the peer is blocked (its policies drop the traffic), ``session_failed``
is reported, and a fresh session (a new epoch) replaces it; the next
exchange unblocks the tunnels. The daemon never dies of one peer's bug.
"""

from __future__ import annotations

import asyncio
import logging
from collections.abc import Callable, Mapping, Sequence
from typing import Any, Protocol

from qkdgate.errors import KeySourceError, LocalProtocolError, QkdgateError
from qkdgate.gateway.daemon.journal import JournalError
from qkdgate.gateway.daemon.qkd import QkdFetcher
from qkdgate.gateway.daemon.udp import PeerDriver, Session
from qkdgate.gateway.protocol import events as pe
from qkdgate.gateway.telemetry.events import (
    Event,
    InstallFailed,
    PeerRestartedReport,
    ProtocolViolationReport,
    QkdFallbackReport,
    QkdRecoveredReport,
    RekeyDone,
    RekeyFailedReport,
    SessionFailedReport,
    UnknownEvent,
)
from qkdgate.tunnels.events import KeyInputs
from qkdgate.tunnels.manager import TunnelManager

log = logging.getLogger("qkdgate.daemon")

REBUILD_MIN_INTERVAL = 1.0   # a session failing at once again is rebuilt no faster
# A tunnel that may fall back to PQC-only gives the QKD wait at most this share
# of what its sending keys have left (docs/faults.md "The QKD wait"); the rest
# is for the exchange's remaining round trips and installs.
QKD_WAIT_SHARE = 0.5


class GenerationJournal(Protocol):
    def committed_generation(self, tunnel: str) -> int: ...
    def record_generations(self, tunnels: Sequence[str], generation: int) -> None: ...
    def record_started(self, peer: str, generation: int) -> None: ...
    def record_peer_epoch(self, peer: str, epoch: int) -> None: ...


class KeyServiceHooks(Protocol):
    """What the key service (qkdgate.keyservice.runner) is told of each
    generation (docs/keyservice.md 4)."""

    def generation_keyed(self, peer: str, generation: int, session: Any, role: str,
                         now: float) -> None: ...
    def generation_confirmed(self, peer: str, generation: int, now: float) -> None: ...
    def generation_aborted(self, peer: str, generation: int, now: float) -> None: ...
    def peer_failed(self, peer: str, now: float) -> None: ...


class PeerState:
    """What the daemon knows about one peer (for status and telemetry)."""

    def __init__(self, name: str, tunnels: list[str]) -> None:
        self.name = name
        self.tunnels = tunnels
        self.state = "connecting"
        self.generation: int | None = None
        self.established_at: float | None = None
        self.last_error: str | None = None
        self.qkd_fallback = False
        self.violations = 0
        self.rekeys = 0
        self.rekey_failures = 0
        self.session_failures = 0


class PeerRunner:
    """The session of one peer and the daemon's answers to its events."""

    def __init__(self, name: str, tunnel_ids: list[str], address: tuple[str, int], *,
                 new_session: Callable[[float], Session], tunnels: TunnelManager,
                 qkd: QkdFetcher | None, journal: GenerationJournal | None,
                 emit: Callable[[Event], None], clock: Callable[[], float],
                 spawn: Callable[[Any, str], None], wake: Callable[[], None],
                 exchange_ended: Callable[[list[str]], None],
                 key_service: KeyServiceHooks | None = None,
                 raise_epoch: Callable[[int], None] | None = None) -> None:
        self.name = name
        self._raise_epoch = raise_epoch
        self._key_service = key_service
        self.state = PeerState(name, tunnel_ids)
        self._new_session = new_session
        self._tunnels = tunnels
        self._qkd = qkd
        self._journal = journal
        self._emit = emit
        self._clock = clock
        self._spawn = spawn
        self._wake = wake
        self._exchange_ended = exchange_ended
        self._rebuilt_at: float | None = None
        self._rebuild: asyncio.TimerHandle | None = None
        self.handlers: Mapping[type, Callable[[Any], None]] = {
            pe.NeedQkdKeys: self._need_qkd_keys,
            pe.InstallInbound: self._install_inbound,
            pe.InstallOutbound: self._install_outbound,
            pe.RetireGeneration: self._retire,
            pe.SessionEstablished: self._established,
            pe.RekeyFailed: self._rekey_failed,
            pe.QkdFallback: self._qkd_fallback,
            pe.QkdRecovered: self._qkd_recovered,
            pe.PeerRestarted: self._peer_restarted,
            pe.PeerEpochAuthenticated: self._peer_epoch,
            pe.NeedHigherEpoch: self._need_higher_epoch,
            pe.ProtocolViolation: self._violation,
        }
        self.driver = PeerDriver(name, new_session(clock()), address, clock=clock,
                                 on_event=self._dispatch, on_failure=self.session_failed)

    # ---------------------------------------------------------------- driving
    def start(self) -> None:
        self.driver.pump()        # lets a session with initiate_on_start send INIT

    def rekey(self, reason: str) -> None:
        self.driver.call("initiate_rekey",
                         lambda s: s.initiate_rekey(self._clock(), reason))

    def close(self) -> None:
        if self._rebuild is not None:
            self._rebuild.cancel()
        self.driver.close()

    def _dispatch(self, event: object) -> None:
        handler = self.handlers.get(type(event))
        if handler is None:
            raise UnknownEvent(event, f"peer {self.name}")
        handler(event)

    # ---------------------------------------------------------------- failure
    def session_failed(self, what: str, exc: BaseException) -> None:
        """The session (or our handling of its event) raised: it is never
        used again. Fail the peer's tunnels closed, report, rebuild."""
        now = self._clock()
        st = self.state
        st.session_failures += 1
        st.state = "connecting"
        st.last_error = f"session failed ({type(exc).__name__} in {what}); rebuilt"
        log.error("peer %s: session failed in %s; blocking its tunnels and starting a fresh "
                  "session", self.name, what, exc_info=exc, extra={"peer": self.name})
        blocked = []
        for tid in st.tunnels:
            tunnel = self._tunnels.get(tid)
            if tunnel.state != "blocked":
                tunnel.block(now, f"peer {self.name}: session failed ({type(exc).__name__})")
                blocked.append(tid)
        if self._key_service is not None:
            self._key_service.peer_failed(self.name, now)     # serve nothing until rebuilt
        self._emit(SessionFailedReport(self.name, f"{type(exc).__name__} in {what}",
                                       tuple(blocked)))
        self._wake()
        if self._rebuilt_at is not None and now - self._rebuilt_at < REBUILD_MIN_INTERVAL:
            # Failing again at once: do not spin; try a fresh session shortly.
            self._rebuild = asyncio.get_running_loop().call_later(
                REBUILD_MIN_INTERVAL, self._rebuild_session)
            return
        self._rebuild_session()

    def _need_higher_epoch(self, ev: pe.NeedHigherEpoch) -> None:
        """The peer knows us by a higher epoch than our session's (another
        node of our HA pair, or our counter went back): raise the counter past
        it and replace the session, whose INITs the peer would drop as stale
        (docs/protocol.md 10.1). The tunnels are left as they are: nothing was
        keyed by this session's failed attempt."""
        if self._raise_epoch is None:
            return
        try:
            self._raise_epoch(ev.above)
        except (QkdgateError, OSError) as exc:     # beyond the bound, or the disk
            self.state.last_error = f"cannot move our epoch above the peer's floor: {exc}"
            log.warning("peer %s: %s", self.name, self.state.last_error,
                        extra={"peer": self.name})
            return
        log.warning("peer %s knows this gateway by epoch %016x (%s), above our session's: "
                    "starting a fresh session above it", self.name, ev.above, ev.source,
                    extra={"peer": self.name})
        now = self._clock()
        if self._rebuild is not None:
            return                                  # a rebuild is already due
        if self._rebuilt_at is not None and now - self._rebuilt_at < REBUILD_MIN_INTERVAL:
            self._rebuild = asyncio.get_running_loop().call_later(
                REBUILD_MIN_INTERVAL - (now - self._rebuilt_at), self._rebuild_session)
            return
        self._rebuild_session()

    def _rebuild_session(self) -> None:
        self._rebuild = None
        now = self._clock()
        self._rebuilt_at = now
        self.driver.replace_session(self._new_session(now))

    # ---------------------------------------------------------------- QKD
    def _need_qkd_keys(self, ev: pe.NeedQkdKeys) -> None:
        self._spawn(self._answer_qkd(ev), f"qkd-{self.name}-{ev.request_id}")

    async def _answer_qkd(self, ev: pe.NeedQkdKeys) -> None:
        # A TaskGroup child: nothing may escape (issue 17 finding 5). The
        # fetcher turns every failure into KeySourceError.
        session = self.driver.session
        if self._qkd is None:
            err: KeySourceError = KeySourceError(f"no key source configured for {self.name}")
        else:
            try:
                keys, sources = await self._qkd.fetch(self.name, ev,
                                                      within=self.qkd_wait_bound())
            except KeySourceError as exc:
                err = exc
            else:
                if self.driver.session is not session:
                    return      # that session failed meanwhile; its request died with it
                self.driver.call("provide_qkd_keys",
                                 lambda s: s.provide_qkd_keys(ev.request_id, keys,
                                                              self._clock(), sources))
                return
        self.state.last_error = f"QKD: {err}"
        self.qkd_lost(f"QKD unavailable: {err}")
        if self.driver.session is not session:
            return
        self.driver.call("qkd_failed",
                         lambda s: s.qkd_failed(ev.request_id, err, self._clock()))

    def qkd_wait_bound(self) -> float | None:
        """How long this exchange may wait for QKD keys, when a tunnel could
        run on PQC-only keys instead (``pqc-fallback``): ``QKD_WAIT_SHARE`` of
        the time until the earliest such tunnel must stop sending on its
        current keys (``TunnelTimers.hard_act_at``), so the fallback is keyed
        before they expire (docs/faults.md "The QKD wait"). ``None``: no
        bound but the key source's own timeout (no such tunnel is sending;
        a tunnel that requires QKD gains nothing from a shorter wait)."""
        now = self._clock()
        ends = []
        for tid in self.state.tunnels:
            tunnel = self._tunnels.get(tid)
            active = tunnel.timers.active
            if active is not None and "qkd" in tunnel.policy.optional:
                ends.append(tunnel.timers.hard_act_at(active))
        return max(0.0, (min(ends) - now) * QKD_WAIT_SHARE) if ends else None

    def qkd_lost(self, reason: str) -> None:
        """``qkd-mandatory`` tunnels stop carrying traffic the moment QKD
        fails, ours or the peer's (a hybrid-required one runs its current
        keys to their hard lifetime); the next generation with a QKD key
        unblocks them."""
        now = self._clock()
        for tid in self.state.tunnels:
            tunnel = self._tunnels.get(tid)
            if tunnel.policy.blocks_on_qkd_loss and tunnel.state != "blocked":
                tunnel.block(now, reason)

    # ---------------------------------------------------------------- installs
    def _install_inbound(self, ev: pe.InstallInbound) -> None:
        self._install(ev, "in")

    def _install_outbound(self, ev: pe.InstallOutbound) -> None:
        self._install(ev, "out")

    def _install(self, ev: pe.InstallInbound | pe.InstallOutbound, direction: str) -> None:
        now = self._clock()
        fn = self._tunnels.install_inbound if direction == "in" \
            else self._tunnels.install_outbound
        try:
            if direction == "in" and self._journal is not None:
                # Durable before the first SA: a restart of both ends must
                # not install this generation number again (journal.py).
                self._journal.record_started(self.name, ev.generation)
            fn(ev.generation, ev.session, ev.role, ev.spis, now)
        except LocalProtocolError:
            raise       # our bug (e.g. a tunnel id we never configured): fail the peer closed
        except QkdgateError as exc:      # GenerationRefused by policy, TunnelError, JournalError
            self.state.last_error = f"install {direction}: {exc}"
            self._emit(InstallFailed(self.name, direction, ev.generation, str(exc)))
            error: Exception = exc

            def refuse(s: Session) -> None:
                s.install_failed(ev.request_id, error, self._clock())

            self.driver.call("install_failed", refuse)
            self._exchange_ended(self.state.tunnels)
            return
        if self._key_service is not None:
            # InstallInbound: the secret is held (the initiator has checked the
            # responder's confirmation); InstallOutbound: confirmed both ways.
            if direction == "in":
                self._key_service.generation_keyed(self.name, ev.generation, ev.session,
                                                   ev.role, now)
            else:
                self._key_service.generation_confirmed(self.name, ev.generation, now)
        self._wake()
        self.driver.call("installed", lambda s: s.installed(ev.request_id, self._clock()))

    def _retire(self, ev: pe.RetireGeneration) -> None:
        self._tunnels.retire(self.state.tunnels, ev.generation, self._clock())
        if self._key_service is not None:
            self._key_service.generation_aborted(self.name, ev.generation, self._clock())

    # ---------------------------------------------------------------- reports
    def _established(self, ev: pe.SessionEstablished) -> None:
        st = self.state
        st.state, st.generation, st.established_at = "established", ev.generation, self._clock()
        st.rekeys += 1
        st.last_error = None
        inputs = KeyInputs.of(ev.provenance)
        if self._journal is not None:
            behind = [tid for tid in st.tunnels
                      if ev.generation > self._journal.committed_generation(tid)]
            try:
                self._journal.record_generations(behind, ev.generation)
            except (JournalError, OSError) as exc:
                # The keys are in place; only the restart floor is not
                # durable (the next start re-reads the journal).
                log.warning("peer %s: journal: generation %d of %d tunnel(s) not recorded: %s",
                            self.name, ev.generation, len(behind), exc,
                            extra={"peer": self.name})
        log.info("peer %s: generation %d established in %.0f ms (%s; inputs %s)",
                 self.name, ev.generation, ev.latency * 1000, ev.reason or "rekey",
                 inputs.as_dict(), extra={"peer": self.name})
        for tid in st.tunnels:
            self._emit(RekeyDone(self.name, tid, ev.generation, inputs,
                                 round(ev.latency * 1000, 1), ev.reason))
        self._exchange_ended(self.state.tunnels)

    def _rekey_failed(self, ev: pe.RekeyFailed) -> None:
        st = self.state
        st.rekey_failures += 1
        st.last_error = ev.reason
        cause = ev.cause.value
        log.warning("peer %s: rekey failed (%s): %s", self.name, cause, ev.reason,
                    extra={"peer": self.name})
        retry_in = round(ev.retry_at - self._clock(), 1) if ev.retry_at is not None else None
        for tid in st.tunnels:
            self._emit(RekeyFailedReport(tid, self.name, ev.generation, ev.reason, retry_in,
                                         cause))
        if ev.qkd_caused:
            # Issue 17 finding 7: the peer's QKD failure (a signed ABORT with
            # QKD_UNAVAILABLE / QKD_KEY_LOST) counts like our own.
            self.qkd_lost(f"QKD unavailable ({cause}): {ev.reason}")
        self._exchange_ended(self.state.tunnels)

    def _qkd_fallback(self, ev: pe.QkdFallback) -> None:
        self.state.qkd_fallback = True
        log.warning("peer %s: QKD unavailable, PQC-only generations where policy allows: %s",
                    self.name, ev.reason, extra={"peer": self.name})
        self._emit(QkdFallbackReport(self.name, ev.reason))
        self.qkd_lost(f"QKD unavailable: {ev.reason}")

    def _qkd_recovered(self, ev: pe.QkdRecovered) -> None:
        self.state.qkd_fallback = False
        log.info("peer %s: QKD recovered", self.name, extra={"peer": self.name})
        self._emit(QkdRecoveredReport(self.name))

    def _peer_restarted(self, ev: pe.PeerRestarted) -> None:
        log.warning("peer %s restarted", self.name, extra={"peer": self.name})
        self._emit(PeerRestartedReport(self.name))

    def _peer_epoch(self, ev: pe.PeerEpochAuthenticated) -> None:
        """Issue 17 finding 3: the highest epoch the peer authenticated with
        is durable, so after our restart INITs recorded before it are
        dropped before any KEM, signature or QKD work (``peer_epoch_floor``)."""
        if self._journal is None:
            return
        try:
            self._journal.record_peer_epoch(self.name, ev.epoch)
        except (JournalError, OSError) as exc:
            # Only the replay floor after a restart is weaker; keys are unaffected.
            log.warning("peer %s: journal: cannot record the peer's epoch: %s", self.name, exc,
                        extra={"peer": self.name})

    def _violation(self, ev: pe.ProtocolViolation) -> None:
        st = self.state
        st.violations += 1
        if st.violations <= 20 or st.violations % 1000 == 0:   # a flood must not flood the log
            log.warning("peer %s: dropped message: %s", self.name, ev.reason,
                        extra={"peer": self.name})
        self._emit(ProtocolViolationReport(self.name, ev.reason, st.violations))

