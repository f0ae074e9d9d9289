"""PeerSession: the sans-IO state machine of the qkdgate peer protocol.

Theory of operation (docs/protocol.md has the byte-level specification):
one :class:`PeerSession` runs the protocol with one peer gateway. It is fed
datagrams and the time, and answers with datagrams, a timer and events;
it never touches a socket, the clock or a KME (aioquic/h11 style).

A rekey is one four-message exchange, every time fresh::

    I -> R  INIT     epochs, nonce_i, ephemeral ML-KEM + X25519 public keys,
                     QKD key_IDs (if I is the ETSI 014 master), I's SPIs,
                     Ed25519 signature (the cheap pre-check)
    R -> I  RESP     generation, nonce_r, ML-KEM ciphertext, X25519 share,
                     key_IDs (if R is master), R's SPIs, hybrid signature
                     over TH, R's confirmation tag
    I -> R  CONFIRM  hybrid signature over TH, I's confirmation tag
                     (sent once I's inbound SAs are installed)
    R -> I  DONE     tag (sent once R's inbound SAs are installed)

R installs nothing before it has authenticated I (CONFIRM): a responder
that keyed inbound SAs after RESP would accept traffic from anyone who can
run an INIT. Each side switches outbound only when it knows the other holds
the key AND has its inbound SAs: R after CONFIRM, I after DONE (wireguard's
"confirm before switching").

The initiator owns liveness: it retransmits (INIT until RESP, CONFIRM until
DONE, exponential backoff); the responder only ever answers, and answers a
duplicate with its cached reply (no new crypto). Simultaneous INITs: the one
with the larger nonce wins; the other side abandons its own attempt and
answers. Generations only grow: the responder picks ``max(initiator's floor,
own highest + 1)``.

The class is one file on purpose (no mixins): the exchange's states and
their legal moves are in :mod:`.exchange` (one table, checked in
:meth:`PeerSession._transition`), the pure computations in
:mod:`.handshake`. Errors (h11 ``_connection.py`` style): peer garbage
(:class:`~qkdgate.errors.RemoteProtocolError`) is counted and dropped
inside :meth:`receive_datagram`; any other exception in a driver call is a
bug, and it poisons the session: exchange secrets are wiped, and this and
every later call raise :class:`~qkdgate.errors.SessionFailed`. The driver
then fails the session's tunnels closed and builds a fresh session.
"""

from __future__ import annotations

import contextlib
import hmac
import itertools
import math
import os
from collections import Counter, deque
from collections.abc import Callable, Iterator, Mapping, Sequence
from typing import TYPE_CHECKING

from qkdgate.errors import (
    AuthenticationFailed,
    ConfigError,
    KeyNotFound,
    KeySourceError,
    KeySourceProtocolError,
    LocalProtocolError,
    QkdgateError,
    RemoteProtocolError,
    SessionFailed,
    TunnelError,
)
from qkdgate.gateway.protocol import handshake as H
from qkdgate.gateway.protocol import messages as m
from qkdgate.gateway.protocol.config import SessionConfig, TunnelRef
from qkdgate.gateway.protocol.constants import (
    EXCHANGE_HOLD,
    MAX_PEER_IDENTITIES,
    VERIFY_BURST,
    VERIFY_RATE,
    VIOLATION_EVENT_INTERVAL,
    YIELD_HOLD,
)
from qkdgate.gateway.protocol.dos import CookieJar, TokenBucket
from qkdgate.gateway.protocol.events import (
    Event,
    FailureCause,
    InstallInbound,
    InstallOutbound,
    NeedHigherEpoch,
    NeedQkdKeys,
    PeerEpochAuthenticated,
    PeerRestarted,
    ProtocolViolation,
    QkdFallback,
    QkdRecovered,
    RekeyFailed,
    RetireGeneration,
    SessionEstablished,
)
from qkdgate.gateway.protocol.exchange import (
    MESSAGE_STATES,
    QKD_WAIT_STATES,
    TERMINAL,
    TRANSITIONS,
    Exchange,
)
from qkdgate.gateway.protocol.exchange import ExchangeState as S
from qkdgate.gateway.protocol.fragment import Reassembler, fragment, message_limit
from qkdgate.gateway.protocol.identity import LocalIdentity, PeerIdentity, select_identity
from qkdgate.gateway.protocol.messages import AbortCode, Message, MsgType, QkdMode, QkdReason
from qkdgate.gateway.protocol.timers import SessionTimers
from qkdgate.interfaces import QkdKey

if TYPE_CHECKING:
    from qkdgate.keymix.combiner import Provenance, SessionSecret
    from qkdgate.keymix.kem import KemProvider
    from qkdgate.keymix.secret import SecretBytes

__all__ = ["PeerSession", "SessionConfig", "TunnelRef"]

Handler = Callable[[Message, float], None]


class PeerSession:
    def __init__(self, config: SessionConfig, *, identity: LocalIdentity,
                 peer_identities: Sequence[PeerIdentity], rng: Callable[[int], bytes] = os.urandom,
                 now: float, allocate_spi: Callable[[str], int],
                 allocate_spis: Callable[[Sequence[str]], Mapping[str, int]] | None = None,
                 kem: KemProvider | None = None, epoch: int | None = None,
                 peer_epoch_floor: int = 0) -> None:
        """``epoch``: this gateway's epoch, a persisted counter that only grows
        across restarts (the daemon's ``journal.next_local_epoch()``); None
        draws a random one, for tests only. ``peer_epoch_floor``: the highest
        epoch ever authenticated from this peer (``journal.peer_epoch(peer)``);
        INITs from below it are dropped before any work (docs/protocol.md 10).
        ``allocate_spis``: every tunnel's SPI in one call (the driver batches
        the kernel requests, issue 19); without it ``allocate_spi`` is asked
        tunnel by tunnel."""
        config.validate()
        if not 1 <= len(peer_identities) <= MAX_PEER_IDENTITIES:
            raise LocalProtocolError("pin 1..4 identities per peer (2 during a rollover)")
        from qkdgate.keymix.kem import get_kem
        self.config = config
        self.identity = identity
        self.peer_identities = tuple(peer_identities)
        self._rng = rng
        self._allocate_spi = allocate_spi
        self._allocate_spis = allocate_spis
        # ``kem`` lets tests inject a deterministic provider (qkdgate.testing)
        if kem is not None and kem.name != config.kem:
            raise LocalProtocolError(f"injected KEM {kem.name} is not the configured {config.kem}")
        self._kem_injected = kem
        self._kem = kem if kem is not None else get_kem(config.kem)
        self._kinds = {t.tunnel_id: t.kind for t in config.tunnels}
        self._psk = config.psk.reveal() if config.psk is not None else None
        self._mac_in = m.mac1_key(config.local_name, self._psk)
        self._mac_out = m.mac1_key(config.peer_name, self._psk)
        if epoch is None:
            epoch = int.from_bytes(rng(8), "big") | 1      # tests only: see the docstring
        if not 0 < epoch < 2 ** 64 or not 0 <= peer_epoch_floor < 2 ** 64:
            raise LocalProtocolError("epochs are u64 values, the local one nonzero")
        self.epoch = epoch
        self._next_xid = 1
        self._next_msg_id = int.from_bytes(rng(4), "big")
        self._next_request = 1
        self._events: deque[Event] = deque()
        self._out: list[bytes] = []
        self._reasm = Reassembler(max_message=message_limit(self._kinds))
        self._bucket = TokenBucket(config.rate_per_second, config.rate_burst, now)
        self._cookie_bucket = TokenBucket(config.rate_per_second, config.rate_burst, now)
        self._cookies = CookieJar(rng, now)
        self.stats: Counter[str] = Counter()
        self._last_violation: dict[str, float] = {}
        self._failure: BaseException | None = None   # set once: the session is poisoned
        # peer state
        self.peer_epoch: int | None = None        # epoch the peer authenticated in this run
        self._peer_floor = peer_epoch_floor       # highest ever authenticated (journal)
        self._peer_xid_high = 0                   # highest INIT xid from peer_epoch
        self._stale_sent_at = float("-inf")       # last STALE notice (rate limit, 4.10)
        self.superseded_by: int | None = None     # NeedHigherEpoch sent: the driver replaces us
        # exchanges: at most one as initiator and one as responder at a time
        self._ini: Exchange | None = None
        self._res: Exchange | None = None
        self._last_res: Exchange | None = None    # completed responder exchange (DONE cache)
        self._yielded_to: Exchange | None = None  # the responder exchange that beat our INIT
        self._requests: dict[int, tuple[Exchange, str]] = {}
        # generations
        self.generation = 0                       # current established generation
        self._gen_high = config.generation_floor
        self.provenance: Provenance | None = None
        self.established_at: float | None = None
        self._in_fallback = False
        self._pqc_only_next: QkdReason | None = None
        # every timer of the session (generation lifetimes are the tunnels')
        self._timers = SessionTimers(config, self._jitter, now)
        # message dispatch: one bound method per type, typed by MsgType
        self._handlers: dict[MsgType, Handler] = {
            MsgType.INIT: self._on_init, MsgType.RESP: self._on_resp,
            MsgType.CONFIRM: self._on_confirm, MsgType.DONE: self._on_done,
            MsgType.ABORT: self._on_abort, MsgType.COOKIE: self._on_cookie,
            MsgType.STALE: self._on_stale}

    # ================================================================ the guard

    @property
    def failed(self) -> bool:
        """True once a bug poisoned the session (build a fresh one)."""
        return self._failure is not None

    @contextlib.contextmanager
    def _guard(self) -> Iterator[None]:
        """Every driver call runs under this (h11 ``_connection.py``): an
        exception that is not the peer's fault leaves no half-changed session
        running. Peer faults never get here: :meth:`receive_datagram` counts
        and drops them. :class:`~qkdgate.errors.ConfigError` from a reload is
        raised before anything changes and passes through."""
        if self._failure is not None:
            raise SessionFailed(f"session with {self.config.peer_name} failed earlier; "
                                "build a new one") from self._failure
        try:
            yield
        except ConfigError:
            raise
        except Exception as exc:
            self._poison(exc)
            what = f"{type(exc).__name__}: {exc}" if isinstance(exc, QkdgateError) \
                else type(exc).__name__          # a foreign message may quote anything
            raise SessionFailed(f"session with {self.config.peer_name} failed ({what[:200]})"
                                ) from exc

    def _poison(self, exc: BaseException) -> None:
        self._failure = exc
        for ex in (self._ini, self._res):
            if ex is not None and ex.state not in TERMINAL:
                ex.state = S.FAILED   # no transition check: the table may be what broke
                ex.wipe(session=True)
        self._ini = self._res = self._last_res = None
        self._requests.clear()
        self._events.clear()      # answers to a broken session must not be acted on
        self._out.clear()
        self._timers.stop()

    # ================================================================ driver API

    def receive_datagram(self, data: bytes, now: float) -> None:
        """Feed one UDP payload from the peer. Never raises on peer garbage:
        it is counted in :attr:`stats` and reported as ProtocolViolation."""
        with self._guard():
            try:
                raw = self._reasm.feed(data, now)
            except RemoteProtocolError as exc:
                self._violation("fragment", str(exc), now)
                return
            if raw is not None:
                self._message(raw, now)

    def receive_message(self, raw: bytes, now: float) -> None:
        """Feed one message reassembled elsewhere: the daemon's socket
        reassembles itself when several peers share one source address and
        routes the message here by its epochs or signer
        (:mod:`~qkdgate.gateway.protocol.demux`). Same rules as
        :meth:`receive_datagram` from mac1 on."""
        with self._guard():
            self._message(raw, now)

    def _message(self, raw: bytes, now: float) -> None:
        if not m.check_mac1(raw, self._mac_in):
            self._violation("mac1", "bad mac1 (not for us, wrong PSK, or forged)", now)
            return
        try:
            msg = m.decode(raw)
            self._handlers[msg.type](msg, now)
        except AuthenticationFailed as exc:
            self._violation("auth", str(exc), now)
        except RemoteProtocolError as exc:
            self._violation("malformed", str(exc), now)

    def accepts_signer(self, key_id: bytes) -> bool:
        """Does this session pin an identity with this key id (an INIT's
        ``signer_id``)? For routing only: nothing is trusted by it."""
        return any(p.key_id == key_id for p in self.peer_identities)

    def accepts_mac1(self, raw: bytes) -> bool:
        """Is ``raw``'s mac1 keyed for this session (our name, our PSK)? For
        routing only; :meth:`receive_message` checks it again."""
        return m.check_mac1(raw, self._mac_in)

    @property
    def max_message(self) -> int:
        """The longest message this session reassembles (docs/protocol.md 3.2)."""
        return self._reasm.max_message

    def handle_timer(self, now: float) -> None:
        with self._guard():
            timers = self._timers
            for ex in (self._ini, self._res):
                if ex is None:
                    continue
                if timers.expired(ex, now):
                    # a KME that never answered is a QKD failure, not a network one
                    cause = FailureCause.QKD_LOCAL if ex.state in QKD_WAIT_STATES \
                        else FailureCause.TIMEOUT
                    self._fail(ex, f"exchange timed out in state {ex.state}", cause, now)
                elif timers.retransmit_due(ex, now):
                    self.stats["retransmit"] += 1
                    self._send(ex.wire)
                    timers.retransmitted(ex, now)
            if self._ini is None and not self._res_blocks_rekey(now):
                reason = timers.rekey_due(now)
                if reason is not None:
                    self._start(now, reason)
            self._reasm.expire(now)

    def get_timer(self) -> float | None:
        with self._guard():
            hold = self._rekey_hold()
            return self._timers.next_deadline(
                (ex for ex in (self._ini, self._res) if ex is not None),
                rekey_waits=self._ini is not None or hold == math.inf,
                rekey_not_before=hold)

    def datagrams_to_send(self, now: float) -> list[bytes]:
        with self._guard():
            out, self._out = self._out, []
            return out

    def next_event(self) -> Event | None:
        with self._guard():
            return self._events.popleft() if self._events else None

    def reconfigure(self, config: SessionConfig, peer_identities: Sequence[PeerIdentity],
                    now: float) -> None:
        """Apply a reloaded configuration (SIGHUP) without losing protocol state.

        Pins (identity rollover), PSK, QKD role and policy, suite, tunnels
        and timers take effect from the next exchange; a running exchange
        finishes under the settings it began with, except that a new PSK
        changes mac1 at once. The names identify the session and cannot
        change (build a new session for another peer). Validation happens
        before anything changes: a bad config leaves the session as it was
        (ConfigError, not poisoned).
        """
        with self._guard():
            config.validate()
            if (config.local_name, config.peer_name) != (self.config.local_name,
                                                         self.config.peer_name):
                raise ConfigError("a session's names cannot change on reload", path="peer_name")
            if not 1 <= len(peer_identities) <= MAX_PEER_IDENTITIES:
                raise ConfigError("pin 1..4 identities per peer (2 during a rollover)")
            from qkdgate.keymix.kem import get_kem
            inj = self._kem_injected
            kem = inj if inj is not None and inj.name == config.kem else get_kem(config.kem)
            self.config, self.peer_identities, self._kem = config, tuple(peer_identities), kem
            self._kinds = {t.tunnel_id: t.kind for t in config.tunnels}
            self._reasm.max_message = message_limit(self._kinds)
            self._psk = config.psk.reveal() if config.psk is not None else None
            self._mac_in = m.mac1_key(config.local_name, self._psk)
            self._mac_out = m.mac1_key(config.peer_name, self._psk)
            self._bucket = TokenBucket(config.rate_per_second, config.rate_burst, now)
            self._cookie_bucket = TokenBucket(config.rate_per_second, config.rate_burst, now)
            self._timers.reconfigured(config, self.established_at, now)

    def snapshot(self, now: float) -> dict[str, object]:
        """Status for ``qkdgate status`` and telemetry: IDs and counters,
        never key material. JSON-serialisable. Works on a poisoned session."""
        ex = self._ini or self._res
        prov = self.provenance
        return {
            "peer": self.config.peer_name,
            "epoch": f"{self.epoch:016x}",
            "peer_epoch": f"{self.peer_epoch:016x}" if self.peer_epoch is not None else None,
            "generation": self.generation or None,
            "established_age": (now - self.established_at
                                if self.established_at is not None else None),
            "inputs": None if prov is None else {
                "kem": prov.kem_name, "x25519": prov.x25519,
                "qkd_key_ids": list(prov.qkd_key_ids),
                "qkd_sources": list(prov.qkd_sources)},
            "qkd_fallback": self._in_fallback,
            "exchange": None if ex is None else {
                "role": ex.role, "state": str(ex.state), "reason": ex.reason,
                "age": now - ex.started, "generation": ex.generation},
            "next_rekey_in": (self._timers.rekey_at - now if self._timers.rekey_at is not None
                              and ex is None else None),
            "failures": self._timers.failures,
            "failed": self._failure is not None,
            "stats": dict(self.stats),
        }

    def initiate_rekey(self, now: float, reason: str) -> None:
        """Start a fresh exchange now (operator, traffic volume, MACsec PN
        exhaustion...). Ignored while an exchange is already running: that
        one produces the fresh generation asked for."""
        with self._guard():
            if self._ini is not None or self._res_blocks_rekey(now):
                self.stats["rekey_coalesced"] += 1
                return
            self._timers.rekey_started()
            self._start(now, reason)

    def provide_qkd_keys(self, request_id: int, keys: list[QkdKey], now: float,
                         sources: Sequence[int] = ()) -> None:
        """The keys a ``NeedQkdKeys`` asked for. With several key sources
        (``config.qkd_sources``) ``sources`` names the configured source of
        each key: as master at least ``config.qkd_k`` of them, in
        configuration order; as slave exactly the ones the master sent."""
        with self._guard():
            ex = self._take_request(request_id, "qkd")
            if ex is None:
                return
            want: tuple[tuple[str, ...], tuple[int, ...]] | None = None
            if ex.state == S.R_QKD and ex.init is not None \
                    and ex.init["qkd_mode"] == QkdMode.KEYS:
                want = ex.init["key_ids"], ex.init["key_sources"]
            elif ex.state == S.I_QKD_SLAVE and ex.resp is not None:
                want = ex.resp["key_ids"], ex.resp["key_sources"]
            if not self._keys_as_asked(keys, tuple(sources), want):
                self._qkd_failed(ex, KeySourceProtocolError(
                    "key source returned other keys than requested"), now)
                return
            from qkdgate.keymix.secret import SecretBytes
            ex.qkd_key = SecretBytes(b"".join(k.key.reveal() for k in keys))
            ex.qkd_ids = tuple(k.key_id for k in keys)
            ex.qkd_sources = tuple(sources)
            ex.qkd_lengths = tuple(len(k.key) for k in keys)
            if ex.state == S.I_QKD:
                ex.qkd_mode = QkdMode.KEYS
                self._send_init(ex, now)
            elif ex.state == S.I_QKD_SLAVE:
                self._initiator_finish(ex, now)
            elif ex.state == S.R_QKD and ex.init is not None:
                self._responder_compute(ex, now, QkdMode.KEYS if ex.init["qkd_mode"]
                                        == QkdMode.EXPECT else QkdMode.USING, QkdReason.NONE)
            else:
                raise LocalProtocolError(f"QKD keys arrived in state {ex.state}")

    def _keys_as_asked(self, keys: list[QkdKey], sources: tuple[int, ...],
                       want: tuple[tuple[str, ...], tuple[int, ...]] | None) -> bool:
        cfg = self.config
        if not keys:
            return False
        if not cfg.qkd_multi:
            bits = [cfg.qkd_key_bits] * len(keys)
            if sources:
                return False
        else:
            n = len(cfg.qkd_sources)
            if len(sources) != len(keys) or any(not 0 <= i < n for i in sources) \
                    or any(a >= b for a, b in itertools.pairwise(sources)):
                return False
            bits = [cfg.qkd_sources[i] for i in sources]
        if any(len(k.key) * 8 != b for k, b in zip(keys, bits, strict=True)):
            return False
        if want is None:      # master: one key per source, at least k of the sources
            return len(keys) == 1 if not cfg.qkd_multi else len(keys) >= cfg.qkd_k
        return tuple(k.key_id for k in keys) == want[0] and sources == tuple(want[1])

    def qkd_failed(self, request_id: int, error: KeySourceError, now: float) -> None:
        with self._guard():
            ex = self._take_request(request_id, "qkd")
            if ex is not None:
                self._qkd_failed(ex, error, now)

    def installed(self, request_id: int, now: float) -> None:
        with self._guard():
            ex = self._take_request(request_id, "install")
            if ex is None:
                return
            if ex.state == S.I_INSTALL_IN:
                self._send_confirm(ex, now)
            elif ex.state == S.R_INSTALL_IN:
                ex.done_wire = m.seal(H.done_core(self.epoch, ex.peer_epoch, ex.xid,
                                                  self._gen(ex), H.tag(self._secret(ex),
                                                  "responder", H.done_hash(ex.th))),
                                      self._mac_out)
                self._send(ex.done_wire)
                self._request_install(ex, InstallOutbound, S.R_INSTALL_OUT, ex.peer_spis)
            elif ex.state in (S.I_INSTALL_OUT, S.R_INSTALL_OUT):
                self._established(ex, now)
            else:
                raise LocalProtocolError(f"install answer in state {ex.state}")

    def install_failed(self, request_id: int, error: Exception, now: float) -> None:
        with self._guard():
            ex = self._take_request(request_id, "install")
            if ex is None:
                return
            self._abort(ex, AbortCode.INSTALL_FAILED, "SA installation failed")
            self._fail(ex, f"installing SAs failed: {error}", FailureCause.INSTALL, now)

    # ================================================================ state table

    def _transition(self, ex: Exchange, new: S) -> None:
        """The one place an exchange changes state (exchange.TRANSITIONS)."""
        allowed = TRANSITIONS.get((ex.role, ex.state), frozenset())
        if new not in allowed:
            raise LocalProtocolError(f"illegal transition {ex.role} {ex.state} -> {new}")
        ex.state = new

    def _res_blocks_rekey(self, now: float) -> bool:
        hold = self._rekey_hold()
        return hold is not None and now < hold

    def _rekey_hold(self) -> float | None:
        """Until when the responder exchange makes our own rekey wait: None
        (not at all), ``math.inf`` (while it runs) or a time. It does not
        wait while the exchange only answered an epoch that has not
        authenticated in this run (no CONFIRM yet): that may be the other
        node of an HA pair in split brain whose RESPs go elsewhere and which
        would hold us until its exchange timeout (docs/protocol.md 10.1). If
        it is a genuinely restarted peer its CONFIRM completes it beside
        ours; generations still only grow. Except the exchange that beat our
        own in a collision (7): our retry waits while it waits for our KME,
        and then ``YIELD_HOLD`` after our RESP for its CONFIRM; without this
        the two simultaneous first exchanges of a start made two generations
        a moment apart."""
        res = self._res
        if res is None:
            return None
        if not (res.state in (S.R_QKD, S.R_RESP_SENT) and res.peer_epoch != self.peer_epoch):
            return math.inf
        if res is not self._yielded_to:
            return None
        if res.state == S.R_QKD:
            return math.inf
        return res.answered_at + YIELD_HOLD   # a repeated INIT does not extend it

    def _held(self, ep: int, now: float) -> bool:
        """Is a running exchange with another epoch than ``ep`` live (its peer
        heard within EXCHANGE_HOLD)? Then an INIT from ``ep`` -- not the
        authenticated epoch -- neither replaces it nor fails it (10.1).
        Progress counts (the INIT, RESP, CONFIRM, DONE), a repeated INIT does
        not: it says our RESP is not reaching the sender."""
        return any(ex is not None and ex.state not in TERMINAL and ex.peer_epoch != ep
                   and now - ex.heard_at < EXCHANGE_HOLD for ex in (self._ini, self._res))

    def _expects(self, ex: Exchange | None, msg: Message) -> bool:
        """Is ``msg`` legal for the exchange it addresses (exchange.MESSAGE_STATES)?"""
        return ex is not None and ex.state in MESSAGE_STATES[msg.type]

    # ================================================================ initiator

    def _start(self, now: float, reason: str) -> None:
        cfg = self.config
        # The INIT names the peer by the epoch it authenticated with in this
        # run, else by the highest it ever authenticated (the journal's
        # floor; 0 if none): a peer whose counter went back (the other node
        # of an HA pair) learns from it that it must start above (10.1), and
        # a peer that did not restart learns that we know it only from our
        # journal, so its INIT cannot win a collision with ours (7).
        ex = Exchange("initiator", self._next_xid, now, now, reason,
                      TokenBucket(VERIFY_RATE, VERIFY_BURST, now),
                      peer_epoch=self.peer_epoch or self._peer_floor)
        self._timers.exchange_started(ex, now)
        self._next_xid += 1
        self._ini = ex
        forced = self._pqc_only_next
        self._pqc_only_next = None
        if cfg.qkd_role is None:
            ex.qkd_mode = QkdMode.NONE
        elif forced is not None:
            ex.qkd_mode, ex.qkd_reason = QkdMode.ABSENT, forced
            ex.qkd_fallback = H.REASON_TEXT[forced]
        elif cfg.qkd_role == "master":
            self._transition(ex, S.I_QKD)
            rid = self._new_request(ex, "qkd")
            self._events.append(NeedQkdKeys(rid, "master", cfg.peer_sae_id, (), 1,
                                            cfg.qkd_key_bits))
            return
        else:
            ex.qkd_mode = QkdMode.EXPECT
        self._send_init(ex, now)

    def _alloc_spis(self, ex: Exchange, now: float) -> bool:
        """Ask the driver for our SPIs / ANs; a kernel refusal fails the
        exchange cleanly (the driver sees RekeyFailed, not an exception);
        a value that does not fit is the driver's bug (poisons)."""
        try:
            if self._allocate_spis is not None:
                spis = dict(self._allocate_spis(list(self._kinds)))
            else:
                spis = {t: self._allocate_spi(t) for t in self._kinds}
        except TunnelError as exc:
            self._abort(ex, AbortCode.INSTALL_FAILED, "SPI allocation failed")
            self._fail(ex, f"SPI allocation failed: {exc}", FailureCause.INSTALL, now)
            return False
        H.check_our_spis(spis, self._kinds)
        ex.our_spis = spis
        return True

    def _send_init(self, ex: Exchange, now: float) -> None:
        cfg = self.config
        if not self._alloc_spis(ex, now):
            return
        # every key is drawn from the injected rng where the library allows
        # it (ML-KEM seed d || z, X25519 scalar), so a run replays exactly
        ex.kem_priv, kem_pk = self._kem.generate_keypair(self._rng)
        x_pk = b""
        if cfg.x25519:
            from qkdgate.keymix.classical import x25519_keypair
            ex.x_priv, x_pk = x25519_keypair(self._rng)
        ex.nonce_i = self._rng(32)
        values: dict[str, object] = {
            "generation_min": self._gen_high + 1, "nonce": ex.nonce_i,
            "kem_id": m.KEM_IDS[cfg.kem], "kem_public": kem_pk, "x25519_public": x_pk,
            "qkd_mode": ex.qkd_mode, "qkd_reason": ex.qkd_reason,
            "qkd_flags": m.QKD_FLAG_PQC_OK if cfg.allow_pqc_only else 0,
            "key_ids": ex.qkd_ids if ex.qkd_mode == QkdMode.KEYS else (),
            "key_sources": ex.qkd_sources if ex.qkd_mode == QkdMode.KEYS else (),
            "spis": H.spi_entries(ex.our_spis, self._kinds)}
        self.stats["sign_ed25519"] += 1
        ex.init_core = H.init_core(self.identity, self.epoch, ex.peer_epoch, ex.xid, values)
        self._transition(ex, S.I_INIT_SENT)
        self._transmit(ex, m.seal(ex.init_core, self._mac_out), now)

    def _transmit(self, ex: Exchange, wire: bytes, now: float) -> None:
        """Send and retransmit until answered (initiator messages only)."""
        ex.wire = wire
        self._timers.initiator_sent(ex, now)
        self._send(wire)

    def _resend_after_collision(self, ex: Exchange, now: float) -> None:
        """We won a collision: send our INIT again now rather than at the
        retransmission timer. The peer may never have seen it (it was sent
        while the peer was not yet listening), and it will answer it the
        moment it arrives (it loses the same comparison), so the collision
        resolves within one round trip instead of waiting up to
        ``retransmit_max`` (issue 19; docs/protocol.md 7). At most once per
        half ``retransmit_base``, like a cached RESP, so replayed INITs are
        not amplified; the retransmission backoff restarts, since the peer
        has just shown it is there."""
        if ex.state != S.I_INIT_SENT or now - ex.collision_resent_at \
                < self.config.retransmit_base / 2:
            return
        ex.collision_resent_at = now
        self.stats["collision_resend"] += 1
        self._transmit(ex, ex.wire, now)

    def _on_resp(self, msg: Message, now: float) -> None:
        ex = self._ini
        if ex is None or msg.exchange_id != ex.xid or msg.receiver_epoch != self.epoch:
            self.stats["stale"] += 1
            return
        if not self._expects(ex, msg):
            self.stats["duplicate" if msg.core == ex.resp_core else "stale"] += 1
            return
        if msg.sender_epoch < max(self._peer_floor, self.peer_epoch or 0):
            # An answer from an epoch below the peer's authenticated one: the
            # other node of an HA pair with a lower epoch answered our INIT
            # (docs/protocol.md 10.1) or a replay. Dropped before the
            # signature; it would lower the peer's epoch.
            self.stats["stale_epoch"] += 1
            return
        peer = select_identity(self.peer_identities, msg["signer_id"])
        gen = msg["generation"]
        if gen < self._gen_high + 1 or gen >= 2 ** 63:
            raise RemoteProtocolError(f"RESP generation {gen} is stale")
        if len(msg["kem_ciphertext"]) != self._kem.ciphertext_size:
            raise RemoteProtocolError("KEM ciphertext has the wrong length")
        if bool(msg["x25519_public"]) != self.config.x25519:
            raise RemoteProtocolError("X25519 share present/absent against our suite")
        H.check_resp_qkd(ex.qkd_mode, msg["qkd_mode"])
        peer_spis = H.check_spis(msg, self._kinds)
        th = m.transcript_hash(self._psk, self.config.local_name, self.config.peer_name,
                               ex.init_core, msg.prefix("tag"))
        if not self._authentic(ex, peer, H.resp_signed(th, msg), now):
            return
        # authenticated: this is the peer's real answer to our INIT
        ex.resp, ex.resp_core, ex.th, ex.peer_spis = msg, msg.core, th, peer_spis
        ex.peer_epoch, ex.generation = msg.sender_epoch, gen
        ex.heard_at = now
        self._timers.answer_authenticated(ex)
        self._bump_gen(gen)
        self._peer_authenticated(msg.sender_epoch, None)
        if msg["qkd_mode"] == QkdMode.ABSENT and not self.config.allow_pqc_only:
            # checked after the signature: only the real peer's QKD failure
            # fails the exchange (a forged RESP is merely dropped)
            self._abort(ex, AbortCode.POLICY, "PQC-only generation refused: policy requires QKD")
            self._fail(ex, "peer has no QKD key and policy requires QKD: "
                       + H.reason_text(msg["qkd_reason"]), FailureCause.QKD_PEER, now)
            return
        if msg["qkd_mode"] == QkdMode.ABSENT:
            # the peer could not get the key: ours must not be used by one side only
            if ex.qkd_key is not None:
                ex.qkd_key.wipe()
            ex.qkd_key, ex.qkd_ids, ex.qkd_sources, ex.qkd_lengths = None, (), (), ()
            ex.qkd_fallback = ex.qkd_fallback or "peer: " + H.reason_text(msg["qkd_reason"])
        if msg["qkd_mode"] == QkdMode.KEYS:
            try:
                self._check_key_sources(msg)
            except RemoteProtocolError as exc:
                # signed by the peer: its sources or rule differ from ours
                self._abort(ex, AbortCode.POLICY, "QKD key sources differ")
                self._fail(ex, f"QKD key sources configured inconsistently: {exc}",
                           FailureCause.POLICY, now)
                return
            self._transition(ex, S.I_QKD_SLAVE)
            rid = self._new_request(ex, "qkd")
            self._events.append(NeedQkdKeys(rid, "slave", self.config.peer_sae_id,
                                            msg["key_ids"], 0, self.config.qkd_key_bits,
                                            msg["key_sources"]))
            return
        self._initiator_finish(ex, now)

    def _check_key_sources(self, msg: Message) -> None:
        cfg = self.config
        H.check_key_sources(msg["key_ids"], msg["key_sources"], len(cfg.qkd_sources), cfg.qkd_k)

    def _authentic(self, ex: Exchange, peer: PeerIdentity, signed: H.Signed,
                   now: float) -> bool:
        """Verify a hybrid signature on an answer, cheapest gate first.

        A message failing authentication is dropped (AuthenticationFailed,
        counted by :meth:`receive_datagram`) and changes nothing but the
        work budget below: no abort, no state (issue 17 finding 4); the initiator's
        retransmission and the exchange timeout decide. The Ed25519 half is
        checked alone first (~50 us), so a forger without the peer's keys
        never costs an ML-DSA verification; the ML-DSA work that is left is
        bounded per exchange by ``verify_budget``: over it, the message is
        dropped unverified (False), again without any state change."""
        self.stats["verify_ed25519"] += 1
        H.verify_ed25519_half(peer, signed)
        if not ex.verify_budget.take(now):
            self.stats["verify_limited"] += 1
            return False
        self.stats["verify_hybrid"] += 1
        peer.verify(*signed)
        return True

    def _initiator_finish(self, ex: Exchange, now: float) -> None:
        resp = ex.resp
        if resp is None or ex.kem_priv is None:
            raise LocalProtocolError("initiator finishing without RESP or KEM key")
        try:
            self.stats["kem_decaps"] += 1
            kem_ss = self._kem.decapsulate(ex.kem_priv, resp["kem_ciphertext"])
            x_ss = None
            if self.config.x25519:
                from qkdgate.keymix.classical import x25519_shared
                if ex.x_priv is None:
                    raise LocalProtocolError("initiator lost its X25519 key")
                x_ss = x25519_shared(ex.x_priv, resp["x25519_public"])
            ex.session = self._combine(ex, kem_ss, x_ss)
            H.verify_tag(ex.session, "responder", ex.th, resp["tag"])
        except RemoteProtocolError as exc:
            # R signed this RESP, so it is R's real answer: a bad share or a
            # tag that does not match means we disagree on the secret.
            self._abort(ex, AbortCode.AUTH_FAILED, "responder key confirmation failed")
            self._fail(ex, f"key confirmation failed: {exc}", FailureCause.AUTH, now)
            return
        finally:
            ex.kem_priv = ex.x_priv = None
        self._request_install(ex, InstallInbound, S.I_INSTALL_IN, ex.our_spis)

    def _combine(self, ex: Exchange, kem_ss: SecretBytes, x_ss: SecretBytes | None
                 ) -> SessionSecret:
        try:
            sourced = tuple(zip(ex.qkd_sources, ex.qkd_lengths, strict=True)) \
                if self.config.qkd_multi else ()
            return H.combine(self.config.kem, kem_ss, x_ss, ex.qkd_key, ex.qkd_ids, ex.th,
                             sourced)
        finally:
            if ex.qkd_key is not None:
                ex.qkd_key.wipe()
                ex.qkd_key = None

    def _send_confirm(self, ex: Exchange, now: float) -> None:
        self.stats["sign_hybrid"] += 1
        core = H.confirm_core(self.identity, self.epoch, ex.peer_epoch, ex.xid, self._gen(ex),
                              ex.th, H.tag(self._secret(ex), "initiator", ex.th))
        self._transition(ex, S.I_CONFIRM_SENT)
        self._transmit(ex, m.seal(core, self._mac_out), now)

    def _on_done(self, msg: Message, now: float) -> None:
        ex = self._ini
        if ex is None or msg.exchange_id != ex.xid or not self._expects(ex, msg) \
                or msg.sender_epoch != ex.peer_epoch or msg.receiver_epoch != self.epoch:
            self.stats["stale"] += 1
            return
        if msg["generation"] != ex.generation:
            raise RemoteProtocolError("DONE for another generation")
        want = H.tag(self._secret(ex), "responder", H.done_hash(ex.th))
        if not hmac.compare_digest(want, msg["tag"]):
            raise AuthenticationFailed("DONE tag does not verify")   # dropped, no state change
        ex.heard_at = now
        self._timers.answer_authenticated(ex)
        self._request_install(ex, InstallOutbound, S.I_INSTALL_OUT, ex.peer_spis)

    def _on_stale(self, msg: Message, now: float) -> None:
        """The peer dropped our INIT: it knows us by a higher epoch (4.10).
        Unauthenticated (mac1 only), so it is believed only when it echoes
        the nonce of the INIT we are waiting on (an off-path sender never saw
        it) and names an epoch above ours; the driver bounds how far it
        raises the counter (docs/protocol.md 10.1)."""
        ex = self._ini
        floor = msg["epoch_floor"]
        if ex is None or not self._expects(ex, msg) or ex.xid != msg.exchange_id \
                or msg.receiver_epoch != self.epoch or floor <= self.epoch \
                or not hmac.compare_digest(msg["init_nonce"], ex.nonce_i):
            self.stats["stale"] += 1
            return
        self.stats["stale_notice"] += 1
        self._supersede(floor, "stale")

    def _supersede(self, above: int, source: str) -> None:
        """Ask the driver for a session with an epoch above ``above``, once."""
        if self.superseded_by is None:
            self.superseded_by = above
            self._events.append(NeedHigherEpoch(above, source))

    def _on_cookie(self, msg: Message, now: float) -> None:
        ex = self._ini
        if ex is None or not self._expects(ex, msg) or ex.xid != msg.exchange_id \
                or msg.receiver_epoch != self.epoch or msg["cookie"] == ex.cookie \
                or now - ex.cookie_at < self.config.retransmit_base:
            self.stats["stale"] += 1
            return
        self.stats["cookie_received"] += 1
        ex.cookie, ex.cookie_at = msg["cookie"], now
        self._transmit(ex, m.seal(ex.init_core, self._mac_out, ex.cookie), now)

    # ================================================================ responder

    def _on_init(self, msg: Message, now: float) -> None:
        """The cheap gates in order before any expensive work
        (docs/protocol.md 8): mac1 (checked before decoding), replay and
        duplicate checks, the token bucket (over the limit: a stateless
        cookie is demanded), then the Ed25519 half of the initiator's
        identity. Only then are collisions resolved (a forged INIT must never
        make us abandon our own exchange) and the responder encapsulates,
        fetches QKD keys, signs."""
        ep, xid = msg.sender_epoch, msg.exchange_id
        high = max(self._peer_floor, self.peer_epoch or 0)
        if ep < high:
            # Epochs only grow (persisted counters): an INIT from below the
            # highest epoch the peer has authenticated with, ever, is a replay
            # from before a restart. Dropped before any work (finding 3).
            # Or the other node of an HA pair, or a gateway whose counter
            # went back: a STALE notice (one HMAC, rate limited, to the
            # pinned address only) tells it to start above (10.1).
            self.stats["stale_epoch"] += 1
            if now - self._stale_sent_at >= self.config.retransmit_base / 2:
                self._stale_sent_at = now
                self.stats["stale_sent"] += 1
                self._send(m.seal(H.stale_core(self.epoch, msg, high), self._mac_out))
            return
        for old in (self._res, self._last_res):
            if old is not None and old.peer_epoch == ep and old.xid == xid:
                if old.init_core != msg.core:
                    self.stats["stale"] += 1
                    return
                self.stats["duplicate"] += 1
                # cached RESP, no new crypto; at most one per half retransmit
                # interval so replayed INITs cannot be amplified into RESPs
                if old is self._res and old.state == S.R_RESP_SENT \
                        and now - old.cookie_at >= self.config.retransmit_base / 2:
                    old.cookie_at = now
                    self._send(old.wire)
                return
        if ep == self.peer_epoch and xid <= self._peer_xid_high:
            self.stats["stale"] += 1      # replay of an INIT we already handled
            return
        res = self._res
        if res is not None and ep == res.peer_epoch and xid < res.xid:
            self.stats["stale"] += 1      # older than the exchange it would replace
            return
        if ep == high and ep != self.peer_epoch \
                and (self._ini is not None or res is not None):
            # The peer's epoch from before OUR restart (the journal's floor),
            # not yet authenticated in this run: a genuine INIT and one
            # recorded before our restart look alike, so it never preempts a
            # running exchange and never wins a collision (docs/protocol.md 10).
            self.stats["init_unauthenticated_deferred"] += 1
            return
        if ep != self.peer_epoch and self._held(ep, now):
            # Split brain (10.1): an epoch not authenticated in this run never
            # preempts an exchange whose peer is live -- the authenticated
            # epoch's, or the first of two new ones. A peer that really
            # restarted left its old exchange silent: it passes after the hold.
            self.stats["init_new_epoch_deferred"] += 1
            return
        if not self._bucket.take(now):
            if not (msg.cookie and self._cookies.check(msg.core, msg.cookie, now)):
                self.stats["rate_limited"] += 1
                self._answer_cookie(msg, now)
                return
            if not self._cookie_bucket.take(now):
                self.stats["rate_limited"] += 1
                return
        peer = select_identity(self.peer_identities, msg["signer_id"])
        self.stats["verify_ed25519"] += 1
        peer.verify_ed25519(msg.prefix("ed25519_sig"), msg["ed25519_sig"], b"INIT")
        if msg.receiver_epoch > self.epoch:
            # The peer (signed) knows us by a higher epoch than ours: our
            # answer would be dropped as stale. Start above it (10.1).
            self.stats["stale_own_epoch"] += 1
            self._supersede(msg.receiver_epoch, "init")
            return
        # The INIT is from a pinned identity (classically). Resolve collisions.
        ini = self._ini
        yielded = False
        if ini is not None:
            if ini.state in (S.I_QKD, S.I_INIT_SENT):
                if self._ours_wins(ini, msg):
                    self.stats["collision_won"] += 1   # the peer will answer ours
                    self._resend_after_collision(ini, now)
                    return
                self.stats["collision_lost"] += 1
                self._drop(ini)
                self._timers.collision_lost(now)
                yielded = True
            elif ini.peer_epoch != ep:
                # an epoch above any we ever authenticated: the peer restarted
                # and our exchange with its old incarnation cannot complete
                self._fail(ini, "peer restarted during our exchange",
                           FailureCause.PEER_RESTARTED, now)
            else:
                self.stats["stale"] += 1
                return
        if self._res is not None:
            self._drop(self._res)         # the peer gave up on that one
        if ep == self.peer_epoch:
            self._peer_xid_high = max(self._peer_xid_high, xid)
        if msg["generation_min"] >= 2 ** 63:
            raise RemoteProtocolError("generation out of range")
        ex = Exchange("responder", xid, now, now, "peer",
                      TokenBucket(VERIFY_RATE, VERIFY_BURST, now), peer_epoch=ep, init=msg,
                      init_core=msg.core, heard_at=now,
                      generation=max(msg["generation_min"], self._gen_high + 1))
        self._timers.exchange_started(ex, now)
        self._transition(ex, S.R_QKD)
        self._bump_gen(self._gen(ex))
        self._res = ex
        self._yielded_to = ex if yielded else None
        try:
            self._responder_start(ex, msg, now)
        except RemoteProtocolError:
            self._forget(ex)     # e.g. a KEM key failing the FIPS 203 modulus check
            ex.state = S.DROPPED
            raise

    def _ours_wins(self, ini: Exchange, msg: Message) -> bool:
        """Does our INIT win the collision with the peer's INIT ``msg``
        (docs/protocol.md 7)? Both sides decide from the same two headers.
        An INIT that names its receiver by the receiver's current epoch beats
        one that does not: its sender restarted and knows us from its
        journal, and defers every INIT from that epoch until it authenticates
        in this run (10), so the other INIT could never be answered and the
        exchange would wait out ``exchange_timeout``. Otherwise the larger
        nonce wins (an INIT not yet sent, still waiting for QKD keys, has
        none and loses)."""
        ours_names_peer = ini.peer_epoch == msg.sender_epoch
        peer_names_us = msg.receiver_epoch == self.epoch
        if ours_names_peer != peer_names_us:
            return ours_names_peer
        return bool(ini.nonce_i) and ini.nonce_i > msg["nonce"]

    def _responder_start(self, ex: Exchange, msg: Message, now: float) -> None:
        cfg = self.config
        if m.KEM_NAMES[msg["kem_id"]] != cfg.kem or bool(msg["x25519_public"]) != cfg.x25519:
            self._refuse(ex, AbortCode.SUITE_MISMATCH,
                         f"suite differs: here {cfg.kem}, X25519 {'on' if cfg.x25519 else 'off'}",
                         now)
            return
        try:
            peer_spis = H.check_spis(msg, self._kinds)
        except RemoteProtocolError as exc:
            self._refuse(ex, AbortCode.POLICY, str(exc), now)
            return
        ex.peer_spis = peer_spis
        self.stats["kem_encaps"] += 1
        ex.kem_ciphertext, ex.kem_secret = self._kem.encapsulate(msg["kem_public"])
        if cfg.x25519:
            from qkdgate.keymix.classical import x25519_keypair, x25519_shared
            priv, ex.x_public = x25519_keypair(self._rng)
            ex.x_secret = x25519_shared(priv, msg["x25519_public"])
        mode, role = msg["qkd_mode"], cfg.qkd_role
        pqc_ok = bool(msg["qkd_flags"] & m.QKD_FLAG_PQC_OK)
        if role is None:
            if mode != QkdMode.NONE:
                self._refuse(ex, AbortCode.POLICY, "the initiator uses QKD, this side has no "
                             "QKD link configured", now)
                return
            self._responder_compute(ex, now, QkdMode.NONE, QkdReason.NONE)
        elif mode == QkdMode.ABSENT:
            if not (cfg.allow_pqc_only and pqc_ok):
                self._refuse(ex, AbortCode.POLICY, "PQC-only generation refused: policy "
                             "requires QKD", now)
                return
            ex.qkd_fallback = "peer: " + H.reason_text(msg["qkd_reason"])
            self._responder_compute(ex, now, QkdMode.ABSENT, QkdReason.PEER)
        elif role == "slave" and mode == QkdMode.KEYS:
            try:
                self._check_key_sources(msg)
            except RemoteProtocolError as exc:
                self._refuse(ex, AbortCode.POLICY, f"QKD key sources differ: {exc}", now)
                return
            rid = self._new_request(ex, "qkd")
            self._events.append(NeedQkdKeys(rid, "slave", cfg.peer_sae_id, msg["key_ids"], 0,
                                            cfg.qkd_key_bits, msg["key_sources"]))
        elif role == "master" and mode == QkdMode.EXPECT:
            rid = self._new_request(ex, "qkd")
            self._events.append(NeedQkdKeys(rid, "master", cfg.peer_sae_id, (), 1,
                                            cfg.qkd_key_bits))
        else:
            self._refuse(ex, AbortCode.POLICY, f"QKD roles inconsistent: here {role}, "
                         f"initiator mode {QkdMode(mode).name}", now)

    def _refuse(self, ex: Exchange, code: AbortCode, detail: str, now: float) -> None:
        self._abort(ex, code, detail)
        self._fail(ex, f"refused the peer's INIT: {detail}", FailureCause.POLICY, now)

    def _responder_compute(self, ex: Exchange, now: float, mode: QkdMode,
                           reason: QkdReason) -> None:
        cfg = self.config
        if not self._alloc_spis(ex, now):
            return
        if ex.init is None or ex.kem_secret is None:
            raise LocalProtocolError("responder computing without INIT or KEM secret")
        values: dict[str, object] = {
            "generation": self._gen(ex), "nonce": self._rng(32),
            "kem_ciphertext": ex.kem_ciphertext, "x25519_public": ex.x_public,
            "qkd_mode": mode, "qkd_reason": reason,
            "key_ids": ex.qkd_ids if mode == QkdMode.KEYS else (),
            "key_sources": ex.qkd_sources if mode == QkdMode.KEYS else (),
            "spis": H.spi_entries(ex.our_spis, self._kinds)}
        prefix = H.resp_prefix(self.identity, self.epoch, ex.peer_epoch, ex.xid, values)
        ex.th = m.transcript_hash(self._psk, cfg.peer_name, cfg.local_name, ex.init_core, prefix)
        if mode == QkdMode.USING:
            ex.qkd_ids = ex.init["key_ids"]
        ex.session = self._combine(ex, ex.kem_secret, ex.x_secret)
        ex.kem_secret = ex.x_secret = None
        self.stats["sign_hybrid"] += 1
        rest = H.resp_rest(self.identity, ex.th, values, H.tag(ex.session, "responder", ex.th))
        ex.wire = m.seal(prefix + rest, self._mac_out)
        self._transition(ex, S.R_RESP_SENT)
        ex.cookie_at = ex.answered_at = now
        self._send(ex.wire)

    def _on_confirm(self, msg: Message, now: float) -> None:
        ex = self._res
        if ex is None or msg.exchange_id != ex.xid or msg.sender_epoch != ex.peer_epoch \
                or msg.receiver_epoch != self.epoch or not self._expects(ex, msg):
            for done in (self._res, self._last_res):
                if done is not None and done.confirm_core == msg.core \
                        and not self._timers.expired(done, now):
                    self.stats["duplicate"] += 1
                    if done.done_wire:
                        self._send(done.done_wire)   # the DONE was lost: repeat it
                    return
            self.stats["stale"] += 1
            return
        if msg["generation"] != ex.generation:
            raise RemoteProtocolError("CONFIRM for another generation")
        peer = select_identity(self.peer_identities, msg["signer_id"])
        if not self._authentic(ex, peer, H.confirm_signed(ex.th, msg), now):
            return
        try:
            H.verify_tag(self._secret(ex), "initiator", ex.th, msg["tag"])
        except RemoteProtocolError:
            # signed by the peer, yet another secret: never install this one
            self._abort(ex, AbortCode.AUTH_FAILED, "initiator key confirmation failed")
            self._fail(ex, "initiator key confirmation failed", FailureCause.AUTH, now)
            raise
        ex.confirm_core = msg.core
        ex.heard_at = now
        self._peer_authenticated(ex.peer_epoch, ex.xid)
        self._request_install(ex, InstallInbound, S.R_INSTALL_IN, ex.our_spis)

    def _answer_cookie(self, msg: Message, now: float) -> None:
        self.stats["cookie_sent"] += 1
        self._send(m.seal(H.cookie_core(self.epoch, msg, self._cookies.make(msg.core, now)),
                          self._mac_out))

    # ================================================================ QKD answers

    def _qkd_failed(self, ex: Exchange, error: KeySourceError, now: float) -> None:
        reason = H.qkd_reason(error)
        text = H.REASON_TEXT[reason]
        allow = self.config.allow_pqc_only
        self.stats["qkd_failed"] += 1
        if ex.state == S.I_QKD:
            if allow:
                ex.qkd_mode, ex.qkd_reason = QkdMode.ABSENT, reason
                ex.qkd_fallback = text
                self._send_init(ex, now)
            else:
                self._fail(ex, f"QKD unavailable ({text}) and policy requires QKD",
                           FailureCause.QKD_LOCAL, now)
        elif ex.state == S.I_QKD_SLAVE:
            if isinstance(error, KeyNotFound):
                # ETSI GS QKD 014 dec_keys is not idempotent: the key is gone.
                # Never use a key on one side only: abort, restart with new keys.
                self._abort(ex, AbortCode.QKD_KEY_LOST, "dec_keys: key_ID not found")
                self._fail(ex, "QKD key lost (dec_keys found no such key_ID)",
                           FailureCause.QKD_LOCAL, now, retry_in=0.0)
            else:
                self._abort(ex, AbortCode.QKD_UNAVAILABLE, text)
                if allow:
                    self._pqc_only_next = reason
                self._fail(ex, f"QKD unavailable at this side: {text}", FailureCause.QKD_LOCAL,
                           now, retry_in=0.0 if allow else None)
        elif ex.state == S.R_QKD and ex.init is not None:
            peer_ok = bool(ex.init["qkd_flags"] & m.QKD_FLAG_PQC_OK)
            if isinstance(error, KeyNotFound):
                self._abort(ex, AbortCode.QKD_KEY_LOST, "dec_keys: key_ID not found")
                self._fail(ex, "QKD key lost (dec_keys found no such key_ID)",
                           FailureCause.QKD_LOCAL, now)
            elif allow and peer_ok:
                ex.qkd_fallback = text
                self._responder_compute(ex, now, QkdMode.ABSENT, reason)
            else:
                self._abort(ex, AbortCode.QKD_UNAVAILABLE, text)
                self._fail(ex, f"QKD unavailable ({text}) and policy requires QKD",
                           FailureCause.QKD_LOCAL, now)
        else:
            raise LocalProtocolError(f"QKD failure reported in state {ex.state}")

    # ================================================================ aborts

    def _abort(self, ex: Exchange, code: AbortCode, detail: str) -> None:
        """Tell the peer, authenticated, that this exchange is over."""
        if not ex.init_core:
            return  # nothing was sent yet: the peer knows of no exchange
        role = m.ROLE_INITIATOR if ex.role == "initiator" else m.ROLE_RESPONDER
        self.stats["sign_hybrid"] += 1
        self.stats["abort_sent"] += 1
        core = H.abort_core(self.identity, self.epoch, ex.peer_epoch, ex.xid, ex.init_core,
                            ex.generation or 0, role, code, detail)
        self._send(m.seal(core, self._mac_out))

    def _on_abort(self, msg: Message, now: float) -> None:
        ex = self._res if msg["sender_role"] == m.ROLE_INITIATOR else self._ini
        if ex is None or ex.xid != msg.exchange_id or msg.receiver_epoch != self.epoch \
                or not ex.init_core or not self._expects(ex, msg) \
                or (ex.state != S.I_INIT_SENT and ex.peer_epoch != msg.sender_epoch):
            self.stats["stale"] += 1
            return
        peer = select_identity(self.peer_identities, msg["signer_id"])
        if not self._authentic(ex, peer, H.abort_signed(ex.init_core, msg), now):
            return
        code, detail = AbortCode(msg["code"]), msg["detail"]
        self.stats["abort_received"] += 1
        if ex.state in (S.I_INSTALL_OUT, S.R_INSTALL_IN, S.R_INSTALL_OUT):
            # The peer already proved its inbound SAs exist (DONE, CONFIRM):
            # its failure was on its own outbound side, which it repairs by
            # rekeying itself. Our switch to this generation stays valid.
            self.stats["abort_ignored_after_confirm"] += 1
            return
        text = f"peer aborted ({code.name}): {detail}"
        if ex.inbound_requested and ex.generation is not None:
            # authenticated: the peer will never send on this generation
            self._events.append(RetireGeneration(ex.generation, "aborted"))
        cause = FailureCause.QKD_PEER if code in (AbortCode.QKD_KEY_LOST,
                                                  AbortCode.QKD_UNAVAILABLE) \
            else FailureCause.PEER_ABORT
        if ex.role == "initiator" and code == AbortCode.QKD_KEY_LOST:
            self._fail(ex, text, cause, now, retry_in=0.0)   # new exchange, NEW keys
        elif ex.role == "initiator" and code == AbortCode.QKD_UNAVAILABLE \
                and self.config.allow_pqc_only and ex.qkd_mode != QkdMode.ABSENT:
            self._pqc_only_next = QkdReason.PEER
            self._fail(ex, text, cause, now, retry_in=0.0)
        else:
            self._fail(ex, text, cause, now)

    # ================================================================ endings

    def _forget(self, ex: Exchange) -> None:
        if ex is self._ini:
            self._ini = None
        if ex is self._res:
            self._res = None
        if ex is self._yielded_to:
            self._yielded_to = None
        if ex.request_id is not None:
            self._requests.pop(ex.request_id, None)
            ex.request_id = None
        self._timers.exchange_ended(ex)
        ex.wipe()

    def _drop(self, ex: Exchange) -> None:
        """Abandon an exchange silently (lost a collision, superseded)."""
        self._forget(ex)
        self._transition(ex, S.DROPPED)

    def _fail(self, ex: Exchange, reason: str, cause: FailureCause, now: float,
              retry_in: float | None = None) -> None:
        self._forget(ex)
        self._transition(ex, S.FAILED)
        # The initiator owns retries. A responder retries too once it had
        # authenticated the peer and begun installing: the peer may already
        # have switched to keys we could not finish, so waiting for the next
        # scheduled rekey could leave a direction down for a whole interval.
        retry_at = self._timers.failed(now, retry_in, retries=ex.role == "initiator"
                                       or ex.inbound_requested)
        self._events.append(RekeyFailed(ex.generation, reason, retry_at, cause=cause))

    def _peer_authenticated(self, epoch: int, xid: int | None) -> None:
        high = max(self._peer_floor, self.peer_epoch or 0)
        if epoch < high:
            raise LocalProtocolError(f"authenticated epoch {epoch} below {high}")
        if epoch > high and high:
            self._events.append(PeerRestarted(f"{high:016x}", f"{epoch:016x}"))
        if epoch != self.peer_epoch:
            self._peer_xid_high = 0
        if epoch > high:
            self._events.append(PeerEpochAuthenticated(epoch))   # the driver persists it
            self._peer_floor = epoch
        self.peer_epoch = epoch
        if xid is not None:
            self._peer_xid_high = max(self._peer_xid_high, xid)

    def _established(self, ex: Exchange, now: float) -> None:
        self._forget(ex)
        self._transition(ex, S.ESTABLISHED)
        cfg = self.config
        # Keep the finished responder exchange only to repeat DONE to a
        # retransmitted CONFIRM, and only for a while; a newer generation
        # makes the old answer moot.
        self._last_res = ex if ex.role == "responder" else None
        self._timers.keep_done_cache(ex, now)
        gen, session = self._gen(ex), self._secret(ex)
        self.generation, self.provenance, self.established_at = gen, session.provenance, now
        # Older generations are retired by the tunnel layer, grace seconds
        # after its switch (tunnels/timers.py): the one owner of their lifetime.
        self._events.append(SessionEstablished(gen, session.provenance, now - ex.started,
                                               ex.role, ex.reason, ex.qkd_fallback))
        if cfg.qkd_role is not None:
            if not session.provenance.qkd and not self._in_fallback:
                self._in_fallback = True
                self._events.append(QkdFallback(ex.qkd_fallback or "QKD absent"))
            elif session.provenance.qkd and self._in_fallback:
                self._in_fallback = False
                self._events.append(QkdRecovered())
        self._timers.established(now)

    # ================================================================ helpers

    def _violation(self, kind: str, detail: str, now: float) -> None:
        self.stats["violation_" + kind] += 1
        last = self._last_violation.get(kind)
        if last is None or now - last >= VIOLATION_EVENT_INTERVAL:
            self._last_violation[kind] = now
            self._events.append(ProtocolViolation(kind, detail[:200]))

    def _send(self, wire: bytes) -> None:
        self._next_msg_id = (self._next_msg_id + 1) & 0xFFFFFFFF
        self._out.extend(fragment(wire, self._next_msg_id))

    def _jitter(self) -> float:
        return int.from_bytes(self._rng(2), "big") / 65536.0

    @staticmethod
    def _gen(ex: Exchange) -> int:
        if ex.generation is None:
            raise LocalProtocolError(f"{ex.role} exchange in {ex.state} has no generation")
        return ex.generation

    @staticmethod
    def _secret(ex: Exchange) -> SessionSecret:
        if ex.session is None:
            raise LocalProtocolError(f"{ex.role} exchange in {ex.state} has no session secret")
        return ex.session

    def _take_request(self, request_id: int, kind: str) -> Exchange | None:
        entry = self._requests.pop(request_id, None)
        if entry is None or entry[1] != kind or entry[0] not in (self._ini, self._res):
            self.stats["stale_answer"] += 1   # exchange already gone: ignore
            return None
        entry[0].request_id = None
        return entry[0]

    def _new_request(self, ex: Exchange, kind: str) -> int:
        rid = self._next_request
        self._next_request += 1
        self._requests[rid] = (ex, kind)
        ex.request_id = rid
        return rid

    def _request_install(self, ex: Exchange, cls: type[InstallInbound] | type[InstallOutbound],
                         state: S, spis: dict[str, int]) -> None:
        self._transition(ex, state)
        rid = self._new_request(ex, "install")
        gen = self._gen(ex)
        if cls is InstallInbound:
            ex.inbound_requested = True
        self._events.append(cls(rid, gen, self._secret(ex), ex.role, dict(spis)))

    def _bump_gen(self, gen: int) -> None:
        self._gen_high = max(self._gen_high, gen)

