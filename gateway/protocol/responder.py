"""The responder half of :class:`~qkdgate.gateway.protocol.session.PeerSession`.

Theory of operation: an INIT passes the cheap gates in order before any
expensive work (docs/protocol.md 7): mac1 (checked by the session before
decoding), replay/duplicate checks against the peer's epoch and exchange
id, the per-peer token bucket (over the limit: a stateless cookie is
demanded), then the Ed25519 half of the initiator's identity. Only then
are collisions resolved (a forged INIT must never make us abandon our own
exchange) and the responder encapsulates, fetches QKD keys, signs.
Encapsulation comes before the QKD fetch so a malformed ML-KEM public key
never costs a KME key. Nothing is installed before CONFIRM authenticates
the initiator.
"""

from __future__ import annotations

from typing import Any

from qkdgate.errors import RemoteProtocolError
from qkdgate.gateway.protocol.identity import select_identity
from qkdgate.gateway.protocol import exchange as X
from qkdgate.gateway.protocol import messages as m
from qkdgate.gateway.protocol.events import FailureCause, InstallInbound, NeedQkdKeys
from qkdgate.gateway.protocol.exchange import Exchange
from qkdgate.gateway.protocol.messages import AbortCode, Message, MsgType, QkdMode, QkdReason


class ResponderMixin:
    # attributes provided by PeerSession
    config: Any
    stats: Any

    def _on_init(self: Any, msg: Message, now: float) -> None:
        cfg = self.config
        ep, xid = msg.sender_epoch, msg.exchange_id
        if ep in self._dead_epochs:
            self.stats["stale"] += 1
            return
        for ex in (self._res, self._last_res):
            if ex is not None and ex.peer_epoch == ep and ex.xid == xid:
                if ex.init_core != msg.core:
                    self.stats["stale"] += 1
                    return
                self.stats["duplicate"] += 1
                # cached RESP, no new crypto; at most one per half retransmit
                # interval so replayed INITs cannot be amplified into RESPs
                if ex is self._res and ex.state == X.R_RESP_SENT \
                        and now - ex.cookie_at >= self.config.retransmit_base / 2:
                    ex.cookie_at = now
                    self._send(ex.wire)
                return
        if ep == self.peer_epoch and xid <= self._peer_xid_high:
            self.stats["stale"] += 1      # replay of an INIT we already handled
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
        # The INIT is from a pinned identity (classically). Resolve collisions.
        ini = self._ini
        if ini is not None:
            if ini.state in (X.I_QKD, X.I_INIT_SENT):
                if ini.nonce_i and ini.nonce_i > msg["nonce"]:
                    self.stats["collision_won"] += 1   # the peer will answer ours
                    return
                self.stats["collision_lost"] += 1
                self._drop(ini)
            elif ini.peer_epoch != ep:
                self._fail(ini, "peer restarted during our exchange", FailureCause.PEER_RESTARTED,
                           now)
            else:
                self.stats["stale"] += 1
                return
        if self._res is not None:
            self._drop(self._res)         # the peer gave up on that one
        if ep == self.peer_epoch:
            self._peer_xid_high = max(self._peer_xid_high, xid)
        if msg["generation_min"] >= 2 ** 63:
            raise RemoteProtocolError("generation out of range")
        ex = Exchange("responder", xid, X.R_QKD, now, now + cfg.exchange_timeout, "peer",
                      peer_epoch=ep, init=msg, init_core=msg.core,
                      generation=max(msg["generation_min"], self._gen_high + 1))
        self._bump_gen(ex.generation)
        self._res = ex
        try:
            self._responder_start(ex, msg, now)
        except RemoteProtocolError:
            self._forget(ex)     # e.g. a KEM key failing the FIPS 203 modulus check
            raise

    def _responder_start(self: Any, ex: Exchange, msg: Message, now: float) -> None:
        cfg = self.config
        if m.KEM_NAMES[msg["kem_id"]] != cfg.kem or bool(msg["x25519_public"]) != cfg.x25519:
            self._refuse(ex, AbortCode.SUITE_MISMATCH,
                         f"suite differs: here {cfg.kem}, X25519 {'on' if cfg.x25519 else 'off'}",
                         now)
            return
        try:
            peer_spis = X.check_spis(msg, self._kinds)
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
            ex.qkd_fallback = "peer: " + X.REASON_TEXT.get(msg["qkd_reason"], "QKD absent")
            self._responder_compute(ex, now, QkdMode.ABSENT, QkdReason.PEER)
        elif role == "slave" and mode == QkdMode.KEYS:
            rid = self._new_request(ex, "qkd")
            self._events.append(NeedQkdKeys(rid, "slave", cfg.peer_sae_id, msg["key_ids"], 0,
                                            cfg.qkd_key_bits))
        elif role == "master" and mode == QkdMode.EXPECT:
            rid = self._new_request(ex, "qkd")
            self._events.append(NeedQkdKeys(rid, "master", cfg.peer_sae_id, (), 1,
                                            cfg.qkd_key_bits))
        else:
            self._refuse(ex, AbortCode.POLICY, f"QKD roles inconsistent: here {role}, "
                         f"initiator mode {QkdMode(mode).name}", now)

    def _refuse(self: Any, ex: Exchange, code: AbortCode, detail: str, now: float) -> None:
        self._abort(ex, code, detail, now)
        self._fail(ex, f"refused the peer's INIT: {detail}", FailureCause.POLICY, now)

    def _responder_compute(self: Any, ex: Exchange, now: float, mode: int, reason: int) -> None:
        cfg = self.config
        if not self._alloc_spis(ex, now):
            return
        values = {"generation": ex.generation, "nonce": self._rng(32),
                  "kem_ciphertext": ex.kem_ciphertext, "x25519_public": ex.x_public,
                  "qkd_mode": mode, "qkd_reason": reason,
                  "key_ids": ex.qkd_ids if mode == QkdMode.KEYS else (),
                  "spis": X.spi_entries(ex.our_spis, self._kinds),
                  "signer_id": self.identity.key_id}
        prefix = m.encode_core(MsgType.RESP, self.epoch, ex.peer_epoch, ex.xid, values,
                               stop="tag")
        ex.th = m.transcript_hash(self._psk, cfg.peer_name, cfg.local_name, ex.init_core, prefix)
        if mode == QkdMode.USING:
            ex.qkd_ids = ex.init["key_ids"]
        ex.session = self._combine(ex.kem_secret, ex.x_secret, ex)
        ex.kem_secret = ex.x_secret = None
        values["tag"] = self._tag(ex.session, "responder", ex.th)
        # the signature covers the tag too: a tampered tag is a forgery, and a
        # signed but wrong tag is a real disagreement about the secret
        values["signature"] = self._sign(ex.th + values["tag"], b"RESP")
        ex.wire = m.seal(prefix + m.encode_fields(MsgType.RESP, values, "tag"), self._mac_out)
        ex.state = X.R_RESP_SENT
        ex.cookie_at = now
        self._send(ex.wire)

    def _on_confirm(self: Any, msg: Message, now: float) -> None:
        ex = self._res
        if ex is None or msg.exchange_id != ex.xid or msg.sender_epoch != ex.peer_epoch \
                or msg.receiver_epoch != self.epoch or ex.state != X.R_RESP_SENT:
            for done in (self._res, self._last_res):
                if done is not None and done.confirm_core == msg.core \
                        and now < done.deadline:
                    self.stats["duplicate"] += 1
                    if done.done_wire:
                        self._send(done.done_wire)   # the DONE was lost: repeat it
                    return
            self.stats["stale"] += 1
            return
        if msg["generation"] != ex.generation:
            raise RemoteProtocolError("CONFIRM for another generation")
        peer = select_identity(self.peer_identities, msg["signer_id"])
        self.stats["verify_hybrid"] += 1
        try:
            peer.verify(ex.th + msg.prefix("signature"), msg["signature"], b"CONFIRM")
        except RemoteProtocolError:
            self._auth_failure(ex, now)
            raise
        try:
            X.verify_tag(ex.session, "initiator", ex.th, msg["tag"])
        except RemoteProtocolError:
            # signed by the peer, yet another secret: never install this one
            self._abort(ex, AbortCode.AUTH_FAILED, "initiator key confirmation failed", now)
            self._fail(ex, "initiator key confirmation failed", FailureCause.AUTH, now)
            raise
        ex.confirm_core = msg.core
        self._peer_authenticated(ex.peer_epoch, ex.xid)
        self._request_install(ex, InstallInbound, X.R_INSTALL_IN, ex.our_spis)

    def _answer_cookie(self: Any, msg: Message, now: float) -> None:
        self.stats["cookie_sent"] += 1
        core = m.encode_core(MsgType.COOKIE, self.epoch, msg.sender_epoch, msg.exchange_id,
                             {"cookie": self._cookies.make(msg.core, now)})
        self._send(m.seal(core, self._mac_out))
