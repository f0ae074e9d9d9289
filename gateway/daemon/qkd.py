"""QKD keys for the peer sessions: fetch, journal, health.

Theory of operation: :class:`QkdFetcher` answers a session's ``NeedQkdKeys``
with :meth:`QkdFetcher.fetch` (ETSI GS QKD 014 5.2 ``enc_keys`` as master,
5.3 ``dec_keys`` as slave, bounded by the source's timeout x (retries + 1)),
journals every key_ID as consumed *before* the keys can reach a KDF, and polls
each KME's status (014 6.1) with :meth:`QkdFetcher.poll`. Whatever goes wrong
leaves this class as one :class:`~qkdgate.errors.KeySourceError` (issue 17
finding 5): a KME failure as the adapter raised it, a plug-in that raised
anything else (its bug; traceback logged once), a reused key_ID, a journal
that cannot write. The caller fails that one exchange closed; the daemon
lives. A journal write error (ENOSPC, EIO) disables QKD until restart: a
key_ID not durably recorded could be mixed twice after a crash.

It reports through ``emit`` (``qkd_keys``, ``qkd_error``, ``key_source_up`` /
``key_source_down``, ``qkd_status``, ``qkd_alarm``, ``journal_error``) and
tells ``on_qkd_lost(peer, reason)`` when QKD is gone for one peer (``None``:
for all), so ``qkd-mandatory`` tunnels block at once.
"""

from __future__ import annotations

import asyncio
import logging
import os
from collections.abc import Callable, Mapping, Sequence
from typing import Protocol

from qkdgate.errors import KeySourceError, KeySourceTimeout, KeyUnavailable
from qkdgate.gateway.config.model import Config, QkdSourceRef
from qkdgate.gateway.daemon.journal import JournalError, KeyIdReused
from qkdgate.gateway.protocol.events import NeedQkdKeys
from qkdgate.gateway.telemetry.events import (
    Event,
    JournalFailed,
    KeySourceDown,
    KeySourceUp,
    QkdAlarm,
    QkdError,
    QkdKeysFetched,
    QkdStatus,
)
from qkdgate.interfaces import KeySource, KeySourceStatus, QkdKey

log = logging.getLogger("qkdgate.daemon")

KME_TIMEOUT_SLACK = 5.0     # on top of the key source's own timeout x attempts
DEFAULT_TIMEOUT = 30.0      # a key source the config does not name (tests)


class KeyJournal(Protocol):
    """What the fetcher needs of :class:`~qkdgate.gateway.daemon.journal.Journal`."""

    def next_generation(self, tunnel: str) -> int: ...
    def reserve_qkd_keys(self, tunnel: str, generation: int,
                         key_ids: Sequence[str]) -> None: ...


class CallObserver(Protocol):
    def __call__(self, source: str, op: str, seconds: float,
                 error: BaseException | None = None) -> None: ...


class QkdFetcher:
    def __init__(self, config: Config, key_sources: Mapping[str, KeySource], *,
                 journal: KeyJournal | None, emit: Callable[[Event], None],
                 clock: Callable[[], float],
                 on_qkd_lost: Callable[[str | None, str], None],
                 observe: CallObserver | None = None) -> None:
        self._config = config
        self._sources = dict(key_sources)
        self._journal = journal
        self._emit = emit
        self._clock = clock
        self._on_qkd_lost = on_qkd_lost
        self._observe = observe
        self._up: dict[str, bool] = {}                  # key source -> last health seen
        self._alarmed: dict[str, tuple[str, ...]] = {}  # key source -> last alarms seen
        self.journal_failure: str | None = None

    def reconfigure(self, config: Config) -> None:
        """A reload changed only live parts (key sources need a restart)."""
        self._config = config

    def timeout(self, source: str) -> float:
        try:
            ks = self._config.key_source(source)
        except KeyError:
            return DEFAULT_TIMEOUT
        return ks.worst_wait + KME_TIMEOUT_SLACK

    # ---------------------------------------------------------------- fetch
    async def fetch(self, peer: str, ev: NeedQkdKeys, *, within: float | None = None
                    ) -> tuple[Sequence[QkdKey], tuple[int, ...]]:
        """The keys for one exchange, journaled as consumed, and the
        configured source index of each (empty with a single source); or
        :class:`KeySourceError` (already reported, never anything else).

        ``within``: seconds the caller can wait at most, when that is less
        than a source's own bound (``timeout x (retries + 1)`` + slack): a
        session that may fall back to PQC-only must have its answer while
        the sending keys still live (docs/faults.md "The QKD wait").

        Several sources (docs/qkd.md "Several key sources"): as master, one
        key from every source at once; at least k must deliver and then all
        that did are used, in configuration order. As slave, each key_ID from
        the source the master named; every one must deliver (the master's
        choice is in the transcript)."""
        qkd = self._config.peer(peer).qkd
        refs = qkd.source_list if qkd is not None else ()
        multi = qkd is not None and qkd.multi
        t0 = self._clock()
        try:
            keys, sources = await self._gather(peer, ev, refs, multi,
                                               qkd.required if qkd is not None else 1, within)
            self._reserve(peer, keys)
        except _Refusal as refusal:
            self._emit(QkdError(peer, str(refusal.error), refusal.kind))
            raise refusal.error from None
        except KeySourceError as exc:
            self._emit(QkdError(peer, str(exc), type(exc).__name__))
            raise
        if not multi:
            self._health(refs[0].key_source if refs else "?", peer, ev.role, t0, None)
        self._emit(QkdKeysFetched(peer, ev.role, tuple(k.key_id for k in keys),
                                  round((self._clock() - t0) * 1000, 1),
                                  tuple(refs[i].key_source for i in sources)))
        return keys, sources

    async def _gather(self, peer: str, ev: NeedQkdKeys, refs: Sequence[QkdSourceRef],
                      multi: bool, k: int, within: float | None
                      ) -> tuple[Sequence[QkdKey], tuple[int, ...]]:
        if self.journal_failure is not None:
            raise _Refusal(KeyUnavailable(
                f"QKD disabled: the key journal failed ({self.journal_failure})"), "JournalError")
        if not multi:
            source = refs[0].key_source if refs else "?"
            sae = refs[0].peer_sae_id if refs else ev.peer_sae_id
            return await self._ask(peer, source, ev.role, sae, ev.key_ids, ev.number,
                                   ev.size_bits, within, health_ok=False), ()
        if ev.role == "master":
            wanted = list(range(len(refs)))
            asks = [self._ask(peer, refs[i].key_source, "master", refs[i].peer_sae_id, (), 1,
                              refs[i].key_size, within) for i in wanted]
        else:
            wanted = list(ev.sources)
            if len(wanted) != len(ev.key_ids) or any(not 0 <= i < len(refs) for i in wanted):
                raise _Refusal(KeySourceError("the peer's key_IDs name unknown key sources"),
                               "KeySourceMismatch")
            asks = [self._ask(peer, refs[i].key_source, "slave", refs[i].peer_sae_id, (kid,), 0,
                              refs[i].key_size, within)
                    for i, kid in zip(wanted, ev.key_ids, strict=True)]
        results = await asyncio.gather(*asks, return_exceptions=True)
        keys: list[QkdKey] = []
        sources: list[int] = []
        failed: list[tuple[int, KeySourceError, str]] = []
        for i, res in zip(wanted, results, strict=True):
            if isinstance(res, _Refusal):
                failed.append((i, res.error, res.kind))
            elif isinstance(res, KeySourceError):
                failed.append((i, res, type(res).__name__))
            elif isinstance(res, BaseException):
                raise res      # cancellation: not a key source's answer
            elif len(res) != 1:
                failed.append((i, KeySourceError(f"key source {refs[i].key_source} returned "
                                                 f"{len(res)} keys, not 1"), "KeySourceError"))
            else:
                keys.append(res[0])
                sources.append(i)
        for i, err, kind in failed:      # one event per failed source (metrics count them too)
            self._emit(QkdError(peer, f"source #{i} {refs[i].key_source}: {err}", kind,
                                refs[i].key_source))
        if failed and ev.role == "slave":
            _, err, kind = failed[0]     # the master chose these keys: all or nothing
            raise _Refusal(err, kind)
        if len(keys) < k:
            names = ", ".join(refs[i].key_source for i, _, _ in failed)
            raise _Refusal(KeyUnavailable(
                f"{len(keys)} of {len(refs)} QKD key sources delivered, the rule needs {k} "
                f"(failed: {names})"), "TooFewSources")
        return keys, tuple(sources)

    async def _ask(self, peer: str, source: str, role: str, peer_sae_id: str,
                   key_ids: Sequence[str], number: int, size_bits: int,
                   within: float | None, *, health_ok: bool = True) -> list[QkdKey]:
        if self.journal_failure is not None:
            raise _Refusal(KeyUnavailable(
                f"QKD disabled: the key journal failed ({self.journal_failure})"), "JournalError")
        src = self._sources.get(source)
        t0 = self._clock()
        try:
            if src is None:
                raise KeySourceError(f"no key source configured for peer {peer}")
            timeout, why = self.timeout(source), ""
            if within is not None and within < timeout:
                timeout, why = max(0.0, within), " (the sending keys' hard lifetime is near)"
            try:
                async with asyncio.timeout(timeout):
                    if role == "master":         # ETSI GS QKD 014 5.2 enc_keys
                        keys = await src.get_new_keys(peer_sae_id, number, size_bits)
                    else:                        # ETSI GS QKD 014 5.3 dec_keys
                        keys = await src.get_keys_by_id(peer_sae_id, list(key_ids))
            except TimeoutError:
                raise KeySourceTimeout(f"key source {source} did not answer "
                                       f"within {timeout:.3g} s{why}") from None
            if not isinstance(keys, list) or not all(isinstance(k, QkdKey) for k in keys):
                raise TypeError(f"{type(src).__name__} returned {type(keys).__name__}, "
                                "not a list of QkdKey")
        except KeySourceError as exc:
            self._health(source, peer, role, t0, exc)
            log.warning("peer %s: QKD keys unavailable from %s: %s", peer, source, exc,
                        extra={"peer": peer, "source": source})
            raise
        except Exception as exc:
            # Third-party code behind the KeySource interface: whatever it
            # raises fails this exchange (closed), never the daemon.
            log.exception("peer %s: key source %s raised %s (a plug-in bug); QKD keys refused",
                          peer, source, type(exc).__name__, extra={"peer": peer})
            err = KeySourceError(f"key source {source} failed: {type(exc).__name__}")
            self._health(source, peer, role, t0, err)
            raise _Refusal(err, "KeySourcePluginError") from None
        if health_ok:
            self._health(source, peer, role, t0, None)
        return keys

    def _reserve(self, peer: str, keys: Sequence[QkdKey]) -> None:
        if self._journal is None:
            return
        # Durable before the keys reach any KDF: a crash after this point
        # can never make us mix the same QKD key twice.
        jt = "peer-" + peer
        try:
            self._journal.reserve_qkd_keys(jt, self._journal.next_generation(jt),
                                           [k.key_id for k in keys])
        except KeyIdReused as exc:        # a replayed key_ID is refused: fail closed
            log.error("peer %s: QKD key refused: %s", peer, exc, extra={"peer": peer})
            raise _Refusal(KeySourceError(f"QKD key refused: {exc}"), "KeyIdReused") from None
        except (JournalError, OSError) as exc:   # ENOSPC, EIO, a failed fsync
            self._journal_failed(exc)
            raise _Refusal(KeyUnavailable(
                f"QKD disabled: the key journal failed ({self.journal_failure})"),
                "JournalError") from None

    def _journal_failed(self, exc: JournalError | OSError) -> None:
        if self.journal_failure is not None:
            return
        detail = os.strerror(exc.errno) if isinstance(exc, OSError) and exc.errno else str(exc)
        self.journal_failure = f"{type(exc).__name__}: {detail}"
        log.error("journal: %s; no new QKD generations until restart", self.journal_failure)
        self._emit(JournalFailed(self.journal_failure, "no new QKD generations"))
        self._on_qkd_lost(None, f"QKD disabled: journal {self.journal_failure}")

    # ---------------------------------------------------------------- health
    async def poll(self, peer: str) -> None:
        """One status poll of each of ``peer``'s KMEs (ETSI GS QKD 014 6.1).
        Both roles see a link alarm this way, also the slave, which otherwise
        only talks to its KME when the master sends key_IDs. QKD counts as
        lost for the peer (``qkd-mandatory`` blocks) once fewer sources are
        healthy than its rule needs."""
        qkd = self._config.peer(peer).qkd
        if qkd is None:
            return
        refs = [r for r in qkd.source_list if r.key_source in self._sources]
        if not refs:
            return
        problems = [p for p in await asyncio.gather(*(self._poll_one(peer, r) for r in refs))
                    if p is not None]
        if problems and len(refs) - len(problems) < qkd.required:
            self._on_qkd_lost(peer, "; ".join(problems))

    async def _poll_one(self, peer: str, ref: QkdSourceRef) -> str | None:
        """Poll one source; the reason it counts as down, or None."""
        source, src = ref.key_source, self._sources[ref.key_source]
        t0 = self._clock()
        st: KeySourceStatus | None = None
        try:
            async with asyncio.timeout(self.timeout(source)):
                connect = getattr(src, "connect", None)   # StreamKeySource (ETSI 004):
                if connect is not None:                   # both SAEs must attach first;
                    await connect(ref.peer_sae_id)        # idempotent, so on every poll
                st = await src.status(ref.peer_sae_id)
            if not isinstance(st, KeySourceStatus):
                raise TypeError(f"status() returned {type(st).__name__}, not KeySourceStatus")
            err: KeySourceError | None = None
        except KeySourceError as exc:
            err = exc
        except TimeoutError:
            err = KeySourceTimeout("status timed out")
        except Exception as exc:
            log.exception("key source %s: status() raised %s (a plug-in bug)", source,
                          type(exc).__name__, extra={"peer": peer})
            err = KeySourceError(f"status() failed: {type(exc).__name__}")
        qkd = self._config.peer(peer).qkd
        named = f" {source}" if qkd is not None and qkd.multi else ""
        if err is None and st is not None:
            alarm = self._status(peer, source, t0, st)
            return None if alarm is None else f"QKD link alarm{named}: {alarm}"
        self._health(source, peer, "status", t0, err)
        return f"QKD key source{named} unreachable: {err}"

    def _status(self, peer: str, source: str, t0: float, st: KeySourceStatus) -> str | None:
        # ETSI GS QKD 004 has no pool size: its source reports 0/0 and says so;
        # None keeps a key-pool gauge (and the KeyPoolLow alert) off it.
        known = st.extensions.get("etsi004_pool_known") is not False
        self._emit(QkdStatus(peer, source, st.stored_key_count if known else None,
                             st.max_key_count if known else None, st.qber,
                             st.link_up, tuple(st.alarms)))
        alarms = tuple(st.alarms)
        if alarms and self._alarmed.get(source) != alarms:
            threshold = st.extensions.get("qkdgate_qber_threshold")
            self._emit(QkdAlarm(peer, source, st.qber,
                                threshold if isinstance(threshold, (int, float)) else None,
                                alarms))
        self._alarmed[source] = alarms
        if st.link_up and not alarms:
            self._health(source, peer, "status", t0, None)
            return None
        reason = ", ".join(alarms) or "QKD link down"
        self._health(source, peer, "status", t0, KeySourceError(reason))
        return reason

    def _health(self, source: str, peer: str, role: str, t0: float,
                error: BaseException | None) -> None:
        op = {"master": "get_new_keys", "slave": "get_keys_by_id"}.get(role, role)
        if self._observe is not None:
            self._observe(source, op, self._clock() - t0, error)
        up = error is None
        if self._up.get(source) is not up:
            self._up[source] = up
            if up:
                self._emit(KeySourceUp(source, peer, "ok"))
            else:
                self._emit(KeySourceDown(source, peer, f"{type(error).__name__}: {error}"))


class _Refusal(Exception):
    """No QKD keys for this exchange for a reason that is not the KME's own
    answer: ``error`` is what the session is told, ``kind`` names the reason
    in the ``qkd_error`` event."""

    def __init__(self, error: KeySourceError, kind: str) -> None:
        super().__init__(str(error))
        self.error = error
        self.kind = kind
