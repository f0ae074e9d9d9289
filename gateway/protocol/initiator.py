"""The initiator half of :class:`~qkdgate.gateway.protocol.session.PeerSession`.

Theory of operation: the initiator owns the exchange's liveness. It fetches
QKD keys first if it is the ETSI 014 master, sends INIT and retransmits it
until a RESP authenticates (hybrid signature over TH and R's tag), fetches by
key_ID if it is the slave (only after that signature verified, so a forged
RESP never costs a KME key), derives S and checks R's tag, installs its
inbound SAs, then sends CONFIRM and retransmits it until DONE shows that R
holds S and has its inbound SAs; only then does it switch outbound. Also
here: the helpers both halves use to combine, sign and count forgeries.
"""

from __future__ import annotations

import hmac
from typing import Any

from qkdgate.errors import (AuthenticationFailed, LocalProtocolError, RemoteProtocolError,
                            TunnelError)
from qkdgate.gateway.protocol.identity import select_identity
from qkdgate.gateway.protocol import exchange as X
from qkdgate.gateway.protocol import messages as m
from qkdgate.gateway.protocol.events import (FailureCause, InstallInbound, InstallOutbound,
                                             NeedQkdKeys)
from qkdgate.gateway.protocol.exchange import REASON_TEXT as _REASON_TEXT
from qkdgate.gateway.protocol.exchange import Exchange
from qkdgate.gateway.protocol.messages import AbortCode, Message, MsgType, QkdMode

MAX_AUTH_FAILURES = 8      # forged answers tolerated per exchange before giving up


class InitiatorMixin:
    config: Any
    stats: Any

    def _start(self: Any, now: float, reason: str) -> None:
        cfg = self.config
        ex = Exchange("initiator", self._next_xid, X.I_INIT_SENT, now,
                      now + cfg.exchange_timeout, reason, peer_epoch=self.peer_epoch or 0)
        self._next_xid += 1
        self._ini = ex
        forced = self._pqc_only_next
        self._pqc_only_next = None
        if cfg.qkd_role is None:
            ex.qkd_mode = QkdMode.NONE
        elif forced is not None:
            ex.qkd_mode, ex.qkd_reason = QkdMode.ABSENT, forced
            ex.qkd_fallback = _REASON_TEXT[forced]
        elif cfg.qkd_role == "master":
            ex.state = X.I_QKD
            rid = self._new_request(ex, "qkd")
            self._events.append(NeedQkdKeys(rid, "master", cfg.peer_sae_id, (), 1,
                                            cfg.qkd_key_bits))
            return
        else:
            ex.qkd_mode = QkdMode.EXPECT
        self._send_init(ex, now)

    def _alloc_spis(self: Any, ex: Exchange, now: float) -> bool:
        """Ask the driver for our SPIs / ANs; a kernel refusal fails the
        exchange cleanly (the driver sees RekeyFailed, not an exception)."""
        try:
            spis = {t: self._allocate_spi(t) for t in self._kinds}
        except TunnelError as exc:
            self._abort(ex, AbortCode.INSTALL_FAILED, "SPI allocation failed", now)
            self._fail(ex, f"SPI allocation failed: {exc}", FailureCause.INSTALL, now)
            return False
        for t, v in spis.items():
            ok = 0x100 <= v <= 0xFFFFFFFF if self._kinds[t] == "ipsec" else 0 <= v <= 3
            if not isinstance(v, int) or not ok:
                raise LocalProtocolError(f"allocate_spi returned {v!r} for {self._kinds[t]} "
                                         f"tunnel {t!r}")
        ex.our_spis = spis
        return True

    def _send_init(self: Any, ex: Exchange, now: float) -> None:
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
        values = {"generation_min": self._gen_high + 1, "nonce": ex.nonce_i,
                  "kem_id": m.KEM_IDS[cfg.kem], "kem_public": kem_pk, "x25519_public": x_pk,
                  "qkd_mode": ex.qkd_mode, "qkd_reason": ex.qkd_reason,
                  "qkd_flags": m.QKD_FLAG_PQC_OK if cfg.allow_pqc_only else 0,
                  "key_ids": ex.qkd_ids if ex.qkd_mode == QkdMode.KEYS else (),
                  "spis": X.spi_entries(ex.our_spis, self._kinds),
                  "signer_id": self.identity.key_id}
        prefix = m.encode_core(MsgType.INIT, self.epoch, ex.peer_epoch, ex.xid, values,
                               stop="ed25519_sig")
        self.stats["sign_ed25519"] += 1
        values["ed25519_sig"] = self.identity.sign_ed25519(prefix, b"INIT")
        ex.init_core = prefix + m.encode_fields(MsgType.INIT, values, "ed25519_sig")
        ex.state = X.I_INIT_SENT
        self._transmit(ex, m.seal(ex.init_core, self._mac_out), now)

    def _transmit(self: Any, ex: Exchange, wire: bytes, now: float) -> None:
        """Send and retransmit until answered (initiator messages only)."""
        ex.wire = wire
        ex.retx_interval = self.config.retransmit_base
        ex.retx_at = now + ex.retx_interval
        self._send(wire)

    def _on_resp(self: Any, msg: Message, now: float) -> None:
        ex = self._ini
        if ex is None or msg.exchange_id != ex.xid or msg.receiver_epoch != self.epoch:
            self.stats["stale"] += 1
            return
        if ex.state != X.I_INIT_SENT:
            self.stats["duplicate" if msg.core == ex.resp_core else "stale"] += 1
            return
        peer = select_identity(self.peer_identities, msg["signer_id"])
        gen = msg["generation"]
        if gen < self._gen_high + 1 or gen >= 2 ** 63:
            raise RemoteProtocolError(f"RESP generation {gen} is stale")
        if len(msg["kem_ciphertext"]) != self._kem.ciphertext_size:
            raise RemoteProtocolError("KEM ciphertext has the wrong length")
        if bool(msg["x25519_public"]) != self.config.x25519:
            raise RemoteProtocolError("X25519 share present/absent against our suite")
        self._check_resp_qkd(ex, msg)
        peer_spis = X.check_spis(msg, self._kinds)
        th = m.transcript_hash(self._psk, self.config.local_name, self.config.peer_name,
                               ex.init_core, msg.prefix("tag"))
        self.stats["verify_hybrid"] += 1
        try:
            peer.verify(th + msg["tag"], msg["signature"], b"RESP")
        except AuthenticationFailed:
            self._auth_failure(ex, now)
            raise
        # authenticated: this is the peer's real answer to our INIT
        ex.resp, ex.resp_core, ex.th, ex.peer_spis = msg, msg.core, th, peer_spis
        ex.peer_epoch, ex.generation = msg.sender_epoch, gen
        ex.retx_at = None
        self._bump_gen(gen)
        self._peer_authenticated(msg.sender_epoch, None)
        if msg["qkd_mode"] == QkdMode.ABSENT and not self.config.allow_pqc_only:
            # checked after the signature: only the real peer's QKD failure
            # fails the exchange (a forged RESP is merely dropped)
            self._abort(ex, AbortCode.POLICY, "PQC-only generation refused: policy requires QKD",
                        now)
            self._fail(ex, "peer has no QKD key and policy requires QKD: " + _REASON_TEXT.get(
                msg["qkd_reason"], "QKD absent"), FailureCause.QKD_PEER, now)
            return
        if msg["qkd_mode"] == QkdMode.ABSENT:
            # the peer could not get the key: ours must not be used by one side only
            if ex.qkd_key is not None:
                ex.qkd_key.wipe()
            ex.qkd_key, ex.qkd_ids = None, ()
            ex.qkd_fallback = ex.qkd_fallback or "peer: " + _REASON_TEXT.get(
                msg["qkd_reason"], "QKD absent")
        if msg["qkd_mode"] == QkdMode.KEYS:
            ex.state = X.I_QKD_SLAVE
            rid = self._new_request(ex, "qkd")
            self._events.append(NeedQkdKeys(rid, "slave", self.config.peer_sae_id,
                                            msg["key_ids"], 0, self.config.qkd_key_bits))
            return
        self._initiator_finish(ex, now)

    def _check_resp_qkd(self: Any, ex: Exchange, msg: Message) -> None:
        mode = msg["qkd_mode"]
        ok = {QkdMode.NONE: (QkdMode.NONE,), QkdMode.KEYS: (QkdMode.USING, QkdMode.ABSENT),
              QkdMode.EXPECT: (QkdMode.KEYS, QkdMode.ABSENT),
              QkdMode.ABSENT: (QkdMode.ABSENT,)}[ex.qkd_mode]
        if mode not in ok:
            raise RemoteProtocolError(f"RESP QKD mode {mode} does not answer our {ex.qkd_mode}"
                                      " (QKD roles configured inconsistently?)")

    def _auth_failure(self: Any, ex: Exchange, now: float) -> None:
        ex.auth_failures += 1
        if ex.auth_failures >= MAX_AUTH_FAILURES:
            self._fail(ex, "too many answers that failed authentication", FailureCause.AUTH, now)

    def _initiator_finish(self: Any, ex: Exchange, now: float) -> None:
        resp = ex.resp
        try:
            self.stats["kem_decaps"] += 1
            kem_ss = self._kem.decapsulate(ex.kem_priv, resp["kem_ciphertext"])
            x_ss = None
            if self.config.x25519:
                from qkdgate.keymix.classical import x25519_shared
                x_ss = x25519_shared(ex.x_priv, resp["x25519_public"])
            ex.session = self._combine(kem_ss, x_ss, ex)
            X.verify_tag(ex.session, "responder", ex.th, resp["tag"])
        except RemoteProtocolError as exc:
            # R signed this RESP, so it is R's real answer: a bad share or a
            # tag that does not match means we disagree on the secret.
            self._abort(ex, AbortCode.AUTH_FAILED, "responder key confirmation failed", now)
            self._fail(ex, f"key confirmation failed: {exc}", FailureCause.AUTH, now)
            return
        finally:
            ex.kem_priv = ex.x_priv = None
        self._request_install(ex, InstallInbound, X.I_INSTALL_IN, ex.our_spis)

    def _combine(self: Any, kem_ss: Any, x_ss: Any, ex: Exchange) -> Any:
        from qkdgate.keymix.combiner import HybridInputs, combine
        try:
            return combine(HybridInputs(self.config.kem, kem_ss, x_ss, ex.qkd_key,
                                        ex.qkd_ids if ex.qkd_key is not None else (), ex.th))
        finally:
            if ex.qkd_key is not None:
                ex.qkd_key.wipe()
                ex.qkd_key = None

    def _send_confirm(self: Any, ex: Exchange, now: float) -> None:
        values = {"generation": ex.generation, "signer_id": self.identity.key_id,
                  "tag": self._tag(ex.session, "initiator", ex.th)}
        prefix = m.encode_core(MsgType.CONFIRM, self.epoch, ex.peer_epoch, ex.xid, values,
                               stop="signature")
        values["signature"] = self._sign(ex.th + prefix, b"CONFIRM")
        ex.state = X.I_CONFIRM_SENT
        core = prefix + m.encode_fields(MsgType.CONFIRM, values, "signature")
        self._transmit(ex, m.seal(core, self._mac_out), now)

    def _sign(self: Any, data: bytes, context: bytes) -> bytes:
        self.stats["sign_hybrid"] += 1
        return self.identity.sign(data, context)

    def _on_done(self: Any, msg: Message, now: float) -> None:
        ex = self._ini
        if ex is None or msg.exchange_id != ex.xid or ex.state != X.I_CONFIRM_SENT \
                or msg.sender_epoch != ex.peer_epoch or msg.receiver_epoch != self.epoch:
            self.stats["stale"] += 1
            return
        if msg["generation"] != ex.generation:
            raise RemoteProtocolError("DONE for another generation")
        want = self._tag(ex.session, "responder", X.done_hash(ex.th))
        if not hmac.compare_digest(want, msg["tag"]):
            self._auth_failure(ex, now)
            raise AuthenticationFailed("DONE tag does not verify")
        ex.retx_at = None
        self._request_install(ex, InstallOutbound, X.I_INSTALL_OUT, ex.peer_spis)
