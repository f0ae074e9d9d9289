"""Dispatch, abort, failure and establishment for
:class:`~qkdgate.gateway.protocol.session.PeerSession`.

Theory of operation: the legal message per state is decided by the
handlers (:data:`HANDLERS` maps each type to one); a message that does not
fit the current exchange is counted as duplicate or stale and dropped
without any crypto. Aborts are signed (context ``ABORT``, over the INIT of
the exchange and the ABORT itself) and name the sender's role, so a peer can
tell "my exchange" from "yours" and nobody can abort an exchange they are
not part of. A failed exchange never touches the current generation: the
previous keys stay in force until their hard lifetime (the tunnel manager's
fail-closed rule), and the initiator retries with exponential backoff.
"""

from __future__ import annotations

from typing import Any

from qkdgate.errors import RemoteProtocolError
from qkdgate.gateway.protocol.identity import select_identity
from qkdgate.gateway.protocol import exchange as X
from qkdgate.gateway.protocol import messages as m
from qkdgate.gateway.protocol.events import (FailureCause, PeerEpochAuthenticated,
                                             PeerRestarted, QkdFallback, QkdRecovered,
                                             RekeyFailed, RetireGeneration, SessionEstablished)
from qkdgate.gateway.protocol.exchange import Exchange
from qkdgate.gateway.protocol.messages import AbortCode, Message, MsgType, QkdMode, QkdReason

HANDLERS = {MsgType.INIT: "_on_init", MsgType.RESP: "_on_resp",
            MsgType.CONFIRM: "_on_confirm", MsgType.DONE: "_on_done",
            MsgType.ABORT: "_on_abort", MsgType.COOKIE: "_on_cookie"}
IMMEDIATE_RETRIES = 3      # fast restarts (lost QKD key, fallback) before backoff applies


class LifecycleMixin:
    config: Any
    stats: Any

    def _dispatch(self: Any, msg: Message, now: float) -> None:
        getattr(self, HANDLERS[msg.type])(msg, now)

    def _jitter(self: Any) -> float:
        return int.from_bytes(self._rng(2), "big") / 65536.0

    # ---------------------------------------------------------------- aborts

    def _abort(self: Any, ex: Exchange, code: AbortCode, detail: str, now: float) -> None:
        """Tell the peer, authenticated, that this exchange is over."""
        if not ex.init_core:
            return  # nothing was sent yet: the peer knows of no exchange
        role = m.ROLE_INITIATOR if ex.role == "initiator" else m.ROLE_RESPONDER
        values = {"generation": ex.generation or 0, "sender_role": role, "code": code,
                  "detail": detail, "signer_id": self.identity.key_id}
        prefix = m.encode_core(MsgType.ABORT, self.epoch, ex.peer_epoch, ex.xid, values,
                               stop="signature")
        values["signature"] = self._sign(X.abort_digest(ex.init_core, prefix), b"ABORT")
        self.stats["abort_sent"] += 1
        self._send(m.seal(prefix + m.encode_fields(MsgType.ABORT, values, "signature"),
                          self._mac_out))

    def _on_abort(self: Any, msg: Message, now: float) -> None:
        ex = self._res if msg["sender_role"] == m.ROLE_INITIATOR else self._ini
        if ex is None or ex.xid != msg.exchange_id or msg.receiver_epoch != self.epoch \
                or not ex.init_core or (ex.state != X.I_INIT_SENT
                                        and ex.peer_epoch != msg.sender_epoch):
            self.stats["stale"] += 1
            return
        peer = select_identity(self.peer_identities, msg["signer_id"])
        self.stats["verify_hybrid"] += 1
        try:
            peer.verify(X.abort_digest(ex.init_core, msg.prefix("signature")),
                        msg["signature"], b"ABORT")
        except RemoteProtocolError:
            self._auth_failure(ex, now)
            raise
        code, detail = AbortCode(msg["code"]), msg["detail"]
        self.stats["abort_received"] += 1
        if ex.state in (X.I_INSTALL_OUT, X.R_INSTALL_IN, X.R_INSTALL_OUT):
            # The peer already proved its inbound SAs exist (DONE, CONFIRM):
            # its failure was on its own outbound side, which it repairs by
            # rekeying itself. Our switch to this generation stays valid.
            self.stats["abort_ignored_after_confirm"] += 1
            return
        text = f"peer aborted ({code.name}): {detail}"
        if ex.inbound_requested and ex.generation is not None:
            # authenticated: the peer will never send on this generation
            self._open_gens.discard(ex.generation)
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

    def _on_cookie(self: Any, msg: Message, now: float) -> None:
        ex = self._ini
        if ex is None or ex.state != X.I_INIT_SENT or ex.xid != msg.exchange_id \
                or msg.receiver_epoch != self.epoch or msg["cookie"] == ex.cookie \
                or now - ex.cookie_at < self.config.retransmit_base:
            self.stats["stale"] += 1
            return
        self.stats["cookie_received"] += 1
        ex.cookie, ex.cookie_at = msg["cookie"], now
        self._transmit(ex, m.seal(ex.init_core, self._mac_out, ex.cookie), now)

    # ---------------------------------------------------------------- endings

    def _forget(self: Any, ex: Exchange) -> None:
        if ex is self._ini:
            self._ini = None
        if ex is self._res:
            self._res = None
        if ex.request_id is not None:
            self._requests.pop(ex.request_id, None)
            ex.request_id = None
        ex.retx_at = None
        ex.kem_priv = ex.x_priv = ex.kem_secret = ex.x_secret = None
        if ex.qkd_key is not None:
            ex.qkd_key.wipe()
            ex.qkd_key = None

    def _drop(self: Any, ex: Exchange) -> None:
        """Abandon an exchange silently (lost a collision, superseded)."""
        self._forget(ex)

    def _fail(self: Any, ex: Exchange, reason: str, cause: FailureCause, now: float,
              retry_in: float | None = None) -> None:
        self._forget(ex)
        cfg = self.config
        retry_at = self._rekey_at
        # The initiator owns retries. A responder retries too once it had
        # authenticated the peer and begun installing: the peer may already
        # have switched to keys we could not finish, so waiting for the next
        # scheduled rekey could leave a direction down for a whole interval.
        if ex.role == "initiator" or ex.inbound_requested:
            self._failures += 1
            if retry_in is None or self._failures > IMMEDIATE_RETRIES:
                retry_in = min(cfg.retry_max, cfg.retry_base * 2 ** min(self._failures - 1, 30))
                retry_in *= 1 + cfg.rekey_jitter * self._jitter()
            retry_at = now + retry_in
            if self._rekey_at is None or retry_at < self._rekey_at:
                self._rekey_at, self._rekey_reason = retry_at, "retry"
            retry_at = self._rekey_at
        self._events.append(RekeyFailed(ex.generation, reason, retry_at, cause=cause))

    def _peer_authenticated(self: Any, epoch: int, xid: int | None) -> None:
        if self.peer_epoch is not None and epoch != self.peer_epoch:
            self._dead_epochs.append(self.peer_epoch)
            self._events.append(PeerRestarted(f"{self.peer_epoch:016x}", f"{epoch:016x}"))
            self._peer_xid_high = 0
        if epoch != self.peer_epoch:
            self._events.append(PeerEpochAuthenticated(epoch))
        self.peer_epoch = epoch
        if xid is not None:
            self._peer_xid_high = max(self._peer_xid_high, xid)

    def _established(self: Any, ex: Exchange, now: float) -> None:
        self._forget(ex)
        cfg = self.config
        # Keep the finished responder exchange only to repeat DONE to a
        # retransmitted CONFIRM, and only for a while; a newer generation
        # makes the old answer moot.
        self._last_res = ex if ex.role == "responder" else None
        ex.deadline = now + cfg.exchange_timeout
        gen = ex.generation
        self.generation, self.provenance, self.established_at = gen, ex.session.provenance, now
        self._failures = 0
        scheduled = {g for _, g, _ in self._retire}
        for old in sorted(self._open_gens):
            if old < gen and old not in scheduled:
                self._retire.append((now + cfg.retire_grace, old, "superseded"))
        self._retire.sort()
        self._events.append(SessionEstablished(gen, ex.session.provenance, now - ex.started,
                                               ex.role, ex.reason, ex.qkd_fallback))
        if cfg.qkd_role is not None:
            if not ex.session.provenance.qkd and not self._in_fallback:
                self._in_fallback = True
                self._events.append(QkdFallback(ex.qkd_fallback or "QKD absent"))
            elif ex.session.provenance.qkd and self._in_fallback:
                self._in_fallback = False
                self._events.append(QkdRecovered())
        self._rekey_at = now + cfg.rekey_interval * (1 - cfg.rekey_jitter * self._jitter())
        self._rekey_reason = "timer"
