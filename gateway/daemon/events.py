"""Protocol-event handlers of the daemon (a mixin of :class:`Daemon`).

Theory of operation: :class:`~qkdgate.gateway.daemon.udp.PeerDriver` hands every
event a :class:`PeerSession` emits to ``_on_event``, which dispatches on the
event's class name to ``_ev_<Name>``. Imperative events are answered on the
session (``provide_qkd_keys`` / ``qkd_failed``, ``installed`` /
``install_failed``) through ``driver.call`` so the session is pumped again;
reporting events update :class:`PeerState` and go to the event hook. A
handler never raises into the driver: every failure becomes an answer, a log
line with peer/tunnel context and an event.
"""

from __future__ import annotations

import asyncio
import logging
import os
from typing import Any

from qkdgate.errors import KeySourceError, KeySourceTimeout, KeyUnavailable, QkdgateError
from qkdgate.gateway.daemon.journal import JournalError, KeyIdReused
from qkdgate.tunnels.events import TunnelEvent
from qkdgate.tunnels.manager import provenance_dict
from qkdgate.gateway.daemon.udp import PeerDriver

log = logging.getLogger("qkdgate.daemon")

KME_TIMEOUT_SLACK = 5.0     # on top of the key source's own timeout x attempts


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


class EventHandlers:
    """Mixin: needs ``config``, ``clock``, ``tunnels``, ``peers``, ``journal``,
    ``metrics``, ``notifier``, ``_key_sources``, ``_source_up``, ``emit``,
    ``_spawn``, ``wake`` and ``_status_line`` from :class:`Daemon`."""

    def _tunnel_event(self, event: TunnelEvent) -> None:
        self.emit(event.to_dict())

    def _on_event(self, driver: PeerDriver, event: Any) -> None:
        handler = getattr(self, "_ev_" + type(event).__name__, None)
        if handler is None:
            log.debug("peer %s: unhandled event %s", driver.name, type(event).__name__)
            return
        handler(driver, event)

    def _ev_NeedQkdKeys(self, driver: PeerDriver, ev: Any) -> None:
        self._spawn(self._fetch_qkd(driver, ev), f"qkd-{driver.name}-{ev.request_id}")

    async def _fetch_qkd(self, driver: PeerDriver, ev: Any) -> None:
        """Answer one ``NeedQkdKeys``. Runs as a TaskGroup child, so nothing
        may escape it (issue 17 finding 5): a KME failure, a key-source
        plug-in bug and a journal error each fail only this exchange, fail
        the tunnels closed by their policy, are reported, and the daemon
        goes on."""
        peer = self.config.peer(driver.name)
        qkd = peer.qkd
        source = qkd.key_source if qkd else "?"
        src = (self._key_sources or {}).get(source) if qkd else None
        t0 = self.clock()
        if self.journal_failure is not None:
            # A key we cannot journal as consumed might be mixed twice after
            # a crash: no new QKD generations until the journal works again.
            self._refuse_qkd(driver, ev, KeyUnavailable(
                f"QKD disabled: the key journal failed ({self.journal_failure})"), "JournalError")
            return
        try:
            if src is None:
                raise KeySourceError(f"no key source configured for peer {driver.name}")
            keys = await self._ask_key_source(src, source, ev)
        except KeySourceError as exc:
            self._key_source_health(source, driver.name, ev.role, t0, exc)
            self.peers[driver.name].last_error = f"QKD: {exc}"
            log.warning("peer %s: QKD keys unavailable: %s", driver.name, exc,
                        extra={"peer": driver.name})
            self._refuse_qkd(driver, ev, exc, type(exc).__name__)
            return
        except Exception as exc:  # noqa: BLE001 - a key-source plug-in's bug, not ours
            # The plug-in is third-party code behind the KeySource interface:
            # whatever it raises fails this exchange (closed), never the daemon.
            log.error("peer %s: key source %s raised %s (a plug-in bug); QKD keys refused",
                      driver.name, source, type(exc).__name__, exc_info=True,
                      extra={"peer": driver.name})
            err = KeySourceError(f"key source {source} failed: {type(exc).__name__}")
            self._key_source_health(source, driver.name, ev.role, t0, err)
            self.peers[driver.name].last_error = f"QKD: {err}"
            self._refuse_qkd(driver, ev, err, "KeySourcePluginError")
            return
        if self.journal is not None:
            # Durable before the keys reach any KDF: a crash after this
            # point can never make us mix the same QKD key twice.
            jt = "peer-" + driver.name
            try:
                self.journal.reserve_qkd_keys(jt, self.journal.next_generation(jt),
                                              [k.key_id for k in keys])
            except KeyIdReused as exc:      # a replayed key_ID is refused: fail closed
                err = KeySourceError(f"QKD key refused: {exc}")
                log.error("peer %s: %s", driver.name, err, extra={"peer": driver.name})
                self._refuse_qkd(driver, ev, err, type(exc).__name__)
                return
            except (JournalError, OSError) as exc:   # ENOSPC, EIO, a failed fsync
                self._journal_failed(exc)
                self._refuse_qkd(driver, ev, KeyUnavailable(
                    f"QKD disabled: the key journal failed ({self.journal_failure})"),
                    "JournalError")
                return
        self._key_source_health(source, driver.name, ev.role, t0, None)
        self.emit({"event": "qkd_keys", "peer": driver.name, "role": ev.role,
                   "key_ids": [k.key_id for k in keys],
                   "latency_ms": round((self.clock() - t0) * 1000, 1)})
        driver.call("provide_qkd_keys",
                    lambda: driver.session.provide_qkd_keys(ev.request_id, keys, self.clock()))

    async def _ask_key_source(self, src: Any, source: str, ev: Any) -> Any:
        timeout = self._kme_timeout(source)
        if ev.role == "master":      # ETSI GS QKD 014 5.2 enc_keys
            call = src.get_new_keys(ev.peer_sae_id, ev.number, ev.size_bits)
        else:                        # ETSI GS QKD 014 5.3 dec_keys
            call = src.get_keys_by_id(ev.peer_sae_id, list(ev.key_ids))
        try:
            async with asyncio.timeout(timeout):
                return await call
        except TimeoutError:
            raise KeySourceTimeout(f"key source {source} did not answer "
                                   f"within {timeout:g} s") from None

    def _refuse_qkd(self, driver: PeerDriver, ev: Any, err: KeySourceError, kind: str) -> None:
        """This exchange gets no QKD keys: report it, block ``qkd-mandatory``
        tunnels now, and tell the session (which falls back to PQC-only where
        the policy allows, else fails the rekey)."""
        self.emit({"event": "qkd_error", "peer": driver.name, "error": str(err), "kind": kind})
        self._block_qkd_mandatory(driver, f"QKD unavailable: {err}")
        driver.call("qkd_failed",
                    lambda: driver.session.qkd_failed(ev.request_id, err, self.clock()))

    def _journal_failed(self, exc: BaseException) -> None:
        """The journal cannot record consumed key_IDs (issue 17 finding 5):
        keep running, but with no new QKD generations (PQC-only where the
        policy allows; ``qkd-mandatory`` blocks at once, ``hybrid-required``
        runs its keys to the hard lifetime). Needs a restart once the disk
        is fixed."""
        if self.journal_failure is not None:
            return
        detail = os.strerror(exc.errno) if isinstance(exc, OSError) and exc.errno \
            else str(exc)
        self.journal_failure = f"{type(exc).__name__}: {detail}"
        log.error("journal: %s; no new QKD generations until restart", self.journal_failure)
        self.emit({"event": "journal_error", "error": self.journal_failure,
                   "consequence": "no new QKD generations"})
        for driver in self.drivers.values():
            self._block_qkd_mandatory(driver, f"QKD disabled: journal {self.journal_failure}")

    def _key_source_health(self, source: str, peer: str, role: str, t0: float,
                           error: BaseException | None) -> None:
        op = {"master": "get_new_keys", "slave": "get_keys_by_id"}.get(role, role)
        if self.metrics is not None:
            self.metrics.observe_key_source_call(source, op, self.clock() - t0, error)
        up = error is None
        if self._source_up.get(source) is not up:
            self._source_up[source] = up
            self.emit({"event": "key_source_up" if up else "key_source_down", "source": source,
                       "peer": peer,
                       "reason": "ok" if up else f"{type(error).__name__}: {error}"})

    async def _qkd_health(self, driver: PeerDriver, qkd: Any) -> None:
        src = (self._key_sources or {}).get(qkd.key_source)
        if src is None:
            return
        t0 = self.clock()
        try:
            async with asyncio.timeout(self._kme_timeout(qkd.key_source)):
                connect = getattr(src, "connect", None)   # StreamKeySource (ETSI 004):
                if connect is not None:                   # both SAEs must attach first;
                    await connect(qkd.peer_sae_id)        # idempotent, so on every poll
                st = await src.status(qkd.peer_sae_id)
        except Exception as exc:   # a broken adapter plugin must not stop the daemon
            if isinstance(exc, KeySourceError):
                err = exc
            elif isinstance(exc, TimeoutError):
                err = KeySourceTimeout("status timed out")
            else:
                log.error("key source %s: status() failed: %r", qkd.key_source, exc,
                          extra={"peer": driver.name})
                err = KeySourceError(f"status() failed: {type(exc).__name__}")
            self._key_source_health(qkd.key_source, driver.name, "status", t0, err)
            self._block_qkd_mandatory(driver, f"QKD key source unreachable: {err}")
            return
        healthy = st.link_up and not st.alarms
        self.emit({"event": "qkd_status", "peer": driver.name, "source": qkd.key_source,
                   "stored_key_count": st.stored_key_count, "max_key_count": st.max_key_count,
                   "qber": st.qber, "link_up": st.link_up, "alarms": list(st.alarms)})
        if st.alarms and self._alarmed.get(qkd.key_source) != st.alarms:
            self.emit({"event": "qkd_alarm", "peer": driver.name, "source": qkd.key_source,
                       "qber": st.qber, "threshold": st.extensions.get("qkdgate_qber_threshold"),
                       "alarms": list(st.alarms)})
        self._alarmed[qkd.key_source] = st.alarms
        if healthy:
            self._key_source_health(qkd.key_source, driver.name, "status", t0, None)
        else:
            reason = ", ".join(st.alarms) or "QKD link down"
            self._key_source_health(qkd.key_source, driver.name, "status", t0,
                                    KeySourceError(reason))
            self._block_qkd_mandatory(driver, f"QKD link alarm: {reason}")

    def _kme_timeout(self, name: str) -> float:
        try:
            ks = self.config.key_source(name)
            return ks.timeout * (ks.retries + 1) + KME_TIMEOUT_SLACK
        except KeyError:
            return 30.0

    def _install(self, driver: PeerDriver, ev: Any, direction: str) -> None:
        now = self.clock()
        fn = self.tunnels.install_inbound if direction == "in" else self.tunnels.install_outbound
        try:
            fn(ev.generation, ev.session, ev.role, ev.spis, now)
        except (QkdgateError, KeyError) as exc:
            self.peers[driver.name].last_error = f"install {direction}: {exc}"
            self.emit({"event": "install_failed", "peer": driver.name, "direction": direction,
                       "generation": ev.generation, "error": str(exc)})
            driver.call("install_failed",
                        lambda e=exc: driver.session.install_failed(ev.request_id, e,
                                                                    self.clock()))
            self._settle_tightened(driver.name)
            return
        self.wake()
        driver.call("installed", lambda: driver.session.installed(ev.request_id, self.clock()))

    def _ev_InstallInbound(self, driver: PeerDriver, ev: Any) -> None:
        self._install(driver, ev, "in")

    def _ev_InstallOutbound(self, driver: PeerDriver, ev: Any) -> None:
        self._install(driver, ev, "out")

    def _ev_RetireGeneration(self, driver: PeerDriver, ev: Any) -> None:
        self.tunnels.retire(self.peers[driver.name].tunnels, ev.generation, self.clock())

    def _ev_SessionEstablished(self, driver: PeerDriver, ev: Any) -> None:
        ps = self.peers[driver.name]
        ps.state, ps.generation, ps.established_at = "established", ev.generation, self.clock()
        ps.rekeys += 1
        ps.last_error = None
        inputs = provenance_dict(ev.provenance)
        if self.journal is not None:
            for tid in ps.tunnels:
                try:
                    if ev.generation > self.journal.committed_generation(tid):
                        self.journal.record_generation(tid, ev.generation)
                except QkdgateError as exc:
                    log.warning("tunnel %s: journal: %s", tid, exc, extra={"tunnel": tid})
        log.info("peer %s: generation %d established in %.0f ms (%s; inputs %s)",
                 driver.name, ev.generation, ev.latency * 1000, ev.reason or "rekey", inputs,
                 extra={"peer": driver.name})
        for tid in ps.tunnels:
            self.emit({"event": "rekey_done", "peer": driver.name, "tunnel": tid,
                       "generation": ev.generation, "inputs": inputs,
                       "latency_ms": round(ev.latency * 1000, 1), "reason": ev.reason})
        self._settle_tightened(driver.name)
        self.notifier.status(self._status_line())

    def _ev_RekeyFailed(self, driver: PeerDriver, ev: Any) -> None:
        ps = self.peers[driver.name]
        ps.rekey_failures += 1
        ps.last_error = ev.reason
        log.warning("peer %s: rekey failed (%s): %s", driver.name, ev.cause.value, ev.reason,
                    extra={"peer": driver.name})
        for tid in ps.tunnels:
            self.emit({"event": "rekey_failed", "tunnel": tid, "peer": driver.name,
                       "generation": ev.generation, "reason": ev.reason,
                       "cause": ev.cause.value,
                       "retry_in": round(ev.retry_at - self.clock(), 1)
                       if ev.retry_at is not None else None})
        if ev.qkd_caused:
            # Issue 17 finding 7: QKD failing on the peer's side (a signed
            # ABORT with QKD_UNAVAILABLE / QKD_KEY_LOST) blocks qkd-mandatory
            # tunnels just as our own KME failing does.
            self._block_qkd_mandatory(driver, f"QKD unavailable ({ev.cause.value}): {ev.reason}")
        self._settle_tightened(driver.name)

    def _ev_QkdFallback(self, driver: PeerDriver, ev: Any) -> None:
        self.peers[driver.name].qkd_fallback = True
        log.warning("peer %s: QKD unavailable, PQC-only generations where policy allows: %s",
                    driver.name, ev.reason, extra={"peer": driver.name})
        self.emit({"event": "qkd_fallback", "peer": driver.name, "reason": ev.reason})
        self._block_qkd_mandatory(driver, f"QKD unavailable: {ev.reason}")

    def _block_qkd_mandatory(self, driver: PeerDriver, reason: str) -> None:
        """``qkd-mandatory`` tunnels stop carrying traffic the moment QKD
        fails (a hybrid-required one runs its current keys to their hard
        lifetime); the next generation with a QKD key unblocks them."""
        now = self.clock()
        for tid in self.peers[driver.name].tunnels:
            tunnel = self.tunnels.get(tid)
            if tunnel.policy.blocks_on_qkd_loss and tunnel.state != "blocked":
                tunnel.block(now, reason)

    def _ev_QkdRecovered(self, driver: PeerDriver, ev: Any) -> None:
        self.peers[driver.name].qkd_fallback = False
        log.info("peer %s: QKD recovered", driver.name, extra={"peer": driver.name})
        self.emit({"event": "qkd_recovered", "peer": driver.name})

    def _ev_PeerEpochAuthenticated(self, driver: PeerDriver, ev: Any) -> None:
        # the floor for INITs after our next restart (issue 17 finding 3)
        if self.journal is not None:
            try:
                self.journal.record_peer_epoch(driver.name, ev.epoch)
            except QkdgateError as exc:
                log.warning("peer %s: journal: %s", driver.name, exc, extra={"peer": driver.name})

    def _ev_PeerRestarted(self, driver: PeerDriver, ev: Any) -> None:
        log.warning("peer %s restarted", driver.name, extra={"peer": driver.name})
        self.emit({"event": "peer_restarted", "peer": driver.name})

    def _ev_ProtocolViolation(self, driver: PeerDriver, ev: Any) -> None:
        ps = self.peers[driver.name]
        ps.violations += 1
        if ps.violations <= 20 or ps.violations % 1000 == 0:   # a flood must not flood the log
            log.warning("peer %s: dropped message: %s", driver.name, ev.reason,
                        extra={"peer": driver.name})
        self.emit({"event": "protocol_violation", "peer": driver.name, "reason": ev.reason,
                   "count": ps.violations})

