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
"confirm before switching"). The old generation is retired after a grace.

Losses are repaired by the initiator retransmitting (INIT until RESP,
CONFIRM until DONE, exponential backoff); the responder only ever answers,
and answers a duplicate with its cached reply (no new crypto). Simultaneous
INITs: the one with the larger nonce wins; the other side abandons its own
attempt and answers. A restarted peer comes back with a new random epoch;
its fresh INIT is accepted like any other and :class:`PeerRestarted` is
reported once it has authenticated. Generations only grow: the responder
picks ``max(initiator's floor, own highest + 1)``, so neither side ever
reuses a generation it has installed, even after the other restarted.
"""

from __future__ import annotations

import os
from collections import Counter, deque
from typing import Any, Callable, Sequence

from qkdgate.errors import (AuthenticationFailed, KeyNotFound, KeySourceAuthError,
                            KeySourceError, KeySourceTimeout, LocalProtocolError,
                            RemoteProtocolError)
from qkdgate.gateway.protocol.identity import LocalIdentity, PeerIdentity
from qkdgate.gateway.protocol import exchange as X
from qkdgate.gateway.protocol import messages as m
from qkdgate.gateway.protocol.config import SessionConfig, TunnelRef
from qkdgate.gateway.protocol.dos import CookieJar, TokenBucket
from qkdgate.gateway.protocol.events import (Event, FailureCause, InstallInbound, InstallOutbound,
                                             ProtocolViolation, RetireGeneration)
from qkdgate.gateway.protocol.exchange import Exchange
from qkdgate.gateway.protocol.fragment import Reassembler, fragment
from qkdgate.gateway.protocol.initiator import InitiatorMixin
from qkdgate.gateway.protocol.lifecycle import LifecycleMixin
from qkdgate.gateway.protocol.messages import AbortCode, MsgType, QkdMode, QkdReason
from qkdgate.gateway.protocol.responder import ResponderMixin
from qkdgate.interfaces import QkdKey
from qkdgate.keymix.kem import KemProvider

__all__ = ["PeerSession", "SessionConfig", "TunnelRef"]

VIOLATION_EVENT_INTERVAL = 1.0
QKD_WAIT_STATES = (X.I_QKD, X.I_QKD_SLAVE, X.R_QKD)
_REASON_TEXT = X.REASON_TEXT


def _qkd_reason(error: BaseException) -> QkdReason:
    if isinstance(error, KeySourceTimeout):
        return QkdReason.TIMEOUT
    if isinstance(error, KeySourceAuthError):
        return QkdReason.AUTH
    if isinstance(error, KeySourceError) and type(error).__name__ == "KeySourceProtocolError":
        return QkdReason.PROTOCOL
    return QkdReason.UNAVAILABLE


class PeerSession(InitiatorMixin, ResponderMixin, LifecycleMixin):
    def __init__(self, config: SessionConfig, *, identity: LocalIdentity,
                 peer_identities: Sequence[PeerIdentity], rng: Callable[[int], bytes] = os.urandom,
                 now: float, allocate_spi: Callable[[str], int],
                 kem: KemProvider | None = None) -> None:
        config.validate()
        if not 1 <= len(peer_identities) <= 4:
            raise LocalProtocolError("pin 1..4 identities per peer (2 during a rollover)")
        from qkdgate.keymix.kem import get_kem
        self.config = config
        self.identity = identity
        self.peer_identities = tuple(peer_identities)
        self._rng = rng
        self._allocate_spi = allocate_spi
        # ``kem`` lets tests inject a deterministic provider (qkdgate.testing)
        if kem is not None and kem.name != config.kem:
            raise LocalProtocolError(f"injected KEM {kem.name} is not the configured {config.kem}")
        self._kem_injected = kem
        self._kem = kem if kem is not None else get_kem(config.kem)
        self._kinds = {t.tunnel_id: t.kind for t in config.tunnels}
        psk = config.psk.reveal() if config.psk is not None else None
        self._psk = psk
        self._mac_in = m.mac1_key(config.local_name, psk)
        self._mac_out = m.mac1_key(config.peer_name, psk)
        self.epoch = int.from_bytes(rng(8), "big") | 1
        self._next_xid = 1
        self._next_msg_id = int.from_bytes(rng(4), "big")
        self._next_request = 1
        self._events: deque[Event] = deque()
        self._out: list[bytes] = []
        self._reasm = Reassembler()
        self._bucket = TokenBucket(config.rate_per_second, config.rate_burst, now)
        self._cookie_bucket = TokenBucket(config.rate_per_second, config.rate_burst, now)
        self._cookies = CookieJar(rng, now)
        self.stats: Counter[str] = Counter()
        self._last_violation: dict[str, float] = {}
        # peer state
        self.peer_epoch: int | None = None        # authenticated epoch of the peer
        self._peer_xid_high = 0                   # highest INIT xid from peer_epoch
        self._dead_epochs: deque[int] = deque(maxlen=16)
        # exchanges: at most one as initiator and one as responder at a time
        self._ini: Exchange | None = None
        self._res: Exchange | None = None
        self._last_res: Exchange | None = None    # completed responder exchange (DONE cache)
        self._requests: dict[int, tuple[Exchange, str]] = {}
        # generations
        self.generation = 0                       # current established generation
        self._gen_high = config.generation_floor
        self._open_gens: set[int] = set()         # inbound installed, not retired
        self._retire: list[tuple[float, int, str]] = []
        self.provenance: Any = None
        self.established_at: float | None = None
        self._in_fallback = False
        self._pqc_only_next: QkdReason | None = None
        self._failures = 0
        self._rekey_at: float | None = now if config.initiate_on_start else None
        self._rekey_reason = "start"

    # ================================================================ driver API

    def receive_datagram(self, data: bytes, now: float) -> None:
        """Feed one UDP payload from the peer. Never raises on peer garbage:
        it is counted in :attr:`stats` and reported as ProtocolViolation."""
        try:
            raw = self._reasm.feed(data, now)
        except RemoteProtocolError as exc:
            self._violation("fragment", str(exc), now)
            return
        if raw is None:
            return
        if not m.check_mac1(raw, self._mac_in):
            self._violation("mac1", "bad mac1 (not for us, wrong PSK, or forged)", now)
            return
        try:
            msg = m.decode(raw)
            self._dispatch(msg, now)
        except AuthenticationFailed as exc:
            self._violation("auth", str(exc), now)
        except RemoteProtocolError as exc:
            self._violation("malformed", str(exc), now)

    def handle_timer(self, now: float) -> None:
        while self._retire and self._retire[0][0] <= now:
            _, gen, why = self._retire.pop(0)
            self._open_gens.discard(gen)
            self._events.append(RetireGeneration(gen, why))
        for ex in (self._ini, self._res):
            if ex is None:
                continue
            if now >= ex.deadline:
                cause = FailureCause.QKD_LOCAL if ex.state in QKD_WAIT_STATES \
                    else FailureCause.TIMEOUT    # a KME that never answered is a QKD failure
                self._fail(ex, f"exchange timed out in state {ex.state}", cause, now)
            elif ex.retx_at is not None and now >= ex.retx_at:
                self.stats["retransmit"] += 1
                self._send(ex.wire)
                ex.retx_interval = min(ex.retx_interval * 2, self.config.retransmit_max)
                ex.retx_at = now + ex.retx_interval
        if self._rekey_at is not None and now >= self._rekey_at and self._ini is None \
                and self._res is None:
            self._rekey_at = None
            self._start(now, self._rekey_reason)
        self._reasm.expire(now)

    def get_timer(self) -> float | None:
        times = [t for t, _, _ in self._retire[:1]]
        for ex in (self._ini, self._res):
            if ex is not None:
                times.append(ex.deadline)
                if ex.retx_at is not None:
                    times.append(ex.retx_at)
        if self._rekey_at is not None and self._ini is None and self._res is None:
            times.append(self._rekey_at)   # a due rekey waits for the running exchange
        return min(times) if times else None

    def datagrams_to_send(self, now: float) -> list[bytes]:
        out, self._out = self._out, []
        return out

    def next_event(self) -> Event | None:
        return self._events.popleft() if self._events else None

    def reconfigure(self, config: SessionConfig, peer_identities: Sequence[PeerIdentity],
                    now: float) -> None:
        """Apply a reloaded configuration (SIGHUP) without losing protocol state.

        Pins (identity rollover), PSK, QKD role and policy, suite, tunnels
        and timers take effect from the next exchange; a running exchange
        finishes under the settings it began with, except that a new PSK
        changes mac1 at once. The names identify the session and cannot
        change (build a new session for another peer). Validation happens
        before anything changes: a bad config leaves the session as it was.
        """
        from qkdgate.errors import ConfigError
        config.validate()
        if (config.local_name, config.peer_name) != (self.config.local_name,
                                                     self.config.peer_name):
            raise ConfigError("a session's names cannot change on reload", path="peer_name")
        if not 1 <= len(peer_identities) <= 4:
            raise ConfigError("pin 1..4 identities per peer (2 during a rollover)")
        from qkdgate.keymix.kem import get_kem
        inj = self._kem_injected
        kem = inj if inj is not None and inj.name == config.kem else get_kem(config.kem)
        self.config, self.peer_identities, self._kem = config, tuple(peer_identities), kem
        self._kinds = {t.tunnel_id: t.kind for t in config.tunnels}
        self._psk = config.psk.reveal() if config.psk is not None else None
        self._mac_in = m.mac1_key(config.local_name, self._psk)
        self._mac_out = m.mac1_key(config.peer_name, self._psk)
        self._bucket = TokenBucket(config.rate_per_second, config.rate_burst, now)
        self._cookie_bucket = TokenBucket(config.rate_per_second, config.rate_burst, now)
        if self.established_at is not None and self._rekey_reason == "timer":
            due = self.established_at + config.rekey_interval
            if self._rekey_at is None or due < self._rekey_at:
                self._rekey_at = max(now, due)

    def snapshot(self, now: float) -> dict[str, Any]:
        """Status for ``qkdgate status`` and telemetry: IDs and counters,
        never key material. JSON-serialisable."""
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
                "qkd_key_ids": list(prov.qkd_key_ids)},
            "qkd_fallback": self._in_fallback,
            "exchange": None if ex is None else {
                "role": ex.role, "state": ex.state, "reason": ex.reason,
                "age": now - ex.started, "generation": ex.generation},
            "next_rekey_in": (self._rekey_at - now if self._rekey_at is not None
                              and ex is None else None),
            "failures": self._failures,
            "stats": dict(self.stats),
        }

    def initiate_rekey(self, now: float, reason: str) -> None:
        """Start a fresh exchange now (operator, traffic volume, MACsec PN
        exhaustion...). Ignored while an exchange is already running: that
        one produces the fresh generation asked for."""
        if self._ini is not None or self._res is not None:
            self.stats["rekey_coalesced"] += 1
            return
        self._rekey_at = None
        self._start(now, reason)

    def provide_qkd_keys(self, request_id: int, keys: list[QkdKey], now: float) -> None:
        ex = self._take_request(request_id, "qkd")
        if ex is None:
            return
        want_ids = ex.init["key_ids"] if (ex.role == "responder" and ex.state == X.R_QKD
                                          and ex.init["qkd_mode"] == QkdMode.KEYS) else \
            ex.resp["key_ids"] if ex.state == X.I_QKD_SLAVE else None
        if not keys or (want_ids is not None and tuple(k.key_id for k in keys) != want_ids) \
                or (want_ids is None and len(keys) != 1) \
                or any(len(k.key) * 8 != self.config.qkd_key_bits for k in keys):
            from qkdgate.errors import KeySourceProtocolError
            self.qkd_failed(request_id, KeySourceProtocolError(
                "key source returned other keys than requested"), now, _taken=ex)
            return
        from qkdgate.keymix.secret import SecretBytes
        ex.qkd_key = SecretBytes(b"".join(k.key.reveal() for k in keys))
        ex.qkd_ids = tuple(k.key_id for k in keys)
        if ex.state == X.I_QKD:
            ex.qkd_mode = QkdMode.KEYS
            self._send_init(ex, now)
        elif ex.state == X.I_QKD_SLAVE:
            self._initiator_finish(ex, now)
        else:
            self._responder_compute(ex, now, QkdMode.KEYS if ex.init["qkd_mode"]
                                    == QkdMode.EXPECT else QkdMode.USING, QkdReason.NONE)

    def qkd_failed(self, request_id: int, error: KeySourceError, now: float, *,
                   _taken: Exchange | None = None) -> None:
        ex = _taken or self._take_request(request_id, "qkd")
        if ex is None:
            return
        reason = _qkd_reason(error)
        allow = self.config.allow_pqc_only
        self.stats["qkd_failed"] += 1
        if ex.state == X.I_QKD:
            if allow:
                ex.qkd_mode, ex.qkd_reason = QkdMode.ABSENT, reason
                ex.qkd_fallback = _REASON_TEXT[reason]
                self._send_init(ex, now)
            else:
                self._fail(ex, f"QKD unavailable ({_REASON_TEXT[reason]}) and policy "
                               "requires QKD", FailureCause.QKD_LOCAL, now)
        elif ex.state == X.I_QKD_SLAVE:
            if isinstance(error, KeyNotFound):
                # ETSI GS QKD 014 dec_keys is not idempotent: the key is gone.
                # Never use a key on one side only: abort, restart with new keys.
                self._abort(ex, AbortCode.QKD_KEY_LOST, "dec_keys: key_ID not found", now)
                self._fail(ex, "QKD key lost (dec_keys found no such key_ID)",
                           FailureCause.QKD_LOCAL, now, retry_in=0.0)
            else:
                self._abort(ex, AbortCode.QKD_UNAVAILABLE, _REASON_TEXT[reason], now)
                if allow:
                    self._pqc_only_next = reason
                self._fail(ex, f"QKD unavailable at this side: {_REASON_TEXT[reason]}",
                           FailureCause.QKD_LOCAL, now,
                           retry_in=0.0 if allow else None)
        elif ex.state == X.R_QKD:
            peer_ok = bool(ex.init["qkd_flags"] & m.QKD_FLAG_PQC_OK)
            if isinstance(error, KeyNotFound):
                self._abort(ex, AbortCode.QKD_KEY_LOST, "dec_keys: key_ID not found", now)
                self._fail(ex, "QKD key lost (dec_keys found no such key_ID)",
                           FailureCause.QKD_LOCAL, now)
            elif allow and peer_ok:
                ex.qkd_fallback = _REASON_TEXT[reason]
                self._responder_compute(ex, now, QkdMode.ABSENT, reason)
            else:
                self._abort(ex, AbortCode.QKD_UNAVAILABLE, _REASON_TEXT[reason], now)
                self._fail(ex, f"QKD unavailable ({_REASON_TEXT[reason]}) and policy "
                               "requires QKD", FailureCause.QKD_LOCAL, now)

    def installed(self, request_id: int, now: float) -> None:
        ex = self._take_request(request_id, "install")
        if ex is None:
            return
        if ex.state == X.I_INSTALL_IN:
            self._send_confirm(ex, now)
        elif ex.state == X.R_INSTALL_IN:
            done = {"generation": ex.generation,
                    "tag": self._tag(ex.session, "responder", X.done_hash(ex.th))}
            ex.done_wire = m.seal(m.encode_core(MsgType.DONE, self.epoch, ex.peer_epoch, ex.xid,
                                                done), self._mac_out)
            self._send(ex.done_wire)
            self._request_install(ex, InstallOutbound, X.R_INSTALL_OUT, ex.peer_spis)
        elif ex.state in (X.I_INSTALL_OUT, X.R_INSTALL_OUT):
            self._established(ex, now)

    def install_failed(self, request_id: int, error: Exception, now: float) -> None:
        ex = self._take_request(request_id, "install")
        if ex is None:
            return
        self._abort(ex, AbortCode.INSTALL_FAILED, "SA installation failed", now)
        self._fail(ex, f"installing SAs failed: {error}", FailureCause.INSTALL, now)

    # ================================================================ internals

    def _violation(self, kind: str, detail: str, now: float) -> None:
        self.stats["violation_" + kind] += 1
        last = self._last_violation.get(kind)
        if last is None or now - last >= VIOLATION_EVENT_INTERVAL:
            self._last_violation[kind] = now
            self._events.append(ProtocolViolation(kind, detail[:200]))

    def _send(self, wire: bytes) -> None:
        self._next_msg_id = (self._next_msg_id + 1) & 0xFFFFFFFF
        self._out.extend(fragment(wire, self._next_msg_id))

    def _tag(self, session: Any, role: str, th: bytes) -> bytes:
        from qkdgate.keymix.schedule import confirmation_tag
        return confirmation_tag(session, role, th)

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

    def _request_install(self, ex: Exchange, cls: type, state: str, spis: dict) -> None:
        ex.state = state
        rid = self._new_request(ex, "install")
        if cls is InstallInbound:
            ex.inbound_requested = True
            self._open_gens.add(ex.generation)
        self._events.append(cls(rid, ex.generation, ex.session, ex.role, dict(spis)))

    def _bump_gen(self, gen: int) -> None:
        self._gen_high = max(self._gen_high, gen)
