"""The pure computations of an exchange: message bodies, signatures,
transcript bindings, confirmation tags and the combiner call.

Theory of operation: every function here maps its arguments to bytes (or a
verdict) and touches nothing else: no session state, no events, no timers,
no counters (:class:`~qkdgate.gateway.protocol.session.PeerSession` does
that around each call). docs/protocol.md 4-5 is the specification:

* TH (5.2) = HMAC-SHA-256 keyed with the PSK digest over both names, the
  INIT core and the RESP core up to its tag (``messages.transcript_hash``);
* the combiner binds TH (keymix ``HybridInputs.transcript_hash``);
* R signs ``TH || tag_R`` (context ``RESP``), I signs ``TH || CONFIRM
  prefix`` (context ``CONFIRM``), an ABORT signs :func:`abort_digest`
  (context ``ABORT``); INIT carries only an Ed25519 signature (the cheap
  pre-check, docs/protocol.md 8);
* confirmation tags are keyed with the session secret over TH (RESP,
  CONFIRM) and over :func:`done_hash` (DONE).
"""

from __future__ import annotations

import hashlib
from collections.abc import Mapping
from typing import TYPE_CHECKING

from qkdgate.errors import (
    AuthenticationFailed,
    KeySourceAuthError,
    KeySourceError,
    KeySourceProtocolError,
    KeySourceTimeout,
    RemoteProtocolError,
)
from qkdgate.gateway.protocol import messages as m
from qkdgate.gateway.protocol.messages import AbortCode, Message, MsgType, QkdMode, QkdReason

if TYPE_CHECKING:
    from qkdgate.gateway.protocol.identity import LocalIdentity, PeerIdentity
    from qkdgate.keymix.combiner import SessionSecret
    from qkdgate.keymix.secret import SecretBytes

REASON_TEXT = {QkdReason.UNAVAILABLE: "QKD key unavailable", QkdReason.TIMEOUT: "KME timeout",
               QkdReason.AUTH: "KME refused us", QkdReason.PROTOCOL: "KME protocol error",
               QkdReason.PEER: "peer requested PQC-only", QkdReason.NONE: "QKD absent"}

SpiEntries = tuple[tuple[str, str, int], ...]


def reason_text(code: int) -> str:
    try:
        return REASON_TEXT[QkdReason(code)]
    except ValueError:
        return "QKD absent"


def qkd_reason(error: KeySourceError) -> QkdReason:
    """The wire reason code for a key source failure (docs/protocol.md 9)."""
    if isinstance(error, KeySourceTimeout):
        return QkdReason.TIMEOUT
    if isinstance(error, KeySourceAuthError):
        return QkdReason.AUTH
    if isinstance(error, KeySourceProtocolError):
        return QkdReason.PROTOCOL
    return QkdReason.UNAVAILABLE


# ---------------------------------------------------------------- bindings

def done_hash(th: bytes) -> bytes:
    return hashlib.sha256(m.LABEL + b" done\0" + th).digest()


def abort_digest(init_core: bytes, abort_prefix: bytes) -> bytes:
    """What an ABORT signature covers: the exchange's INIT and the ABORT."""
    return hashlib.sha256(m.LABEL + b" abort\0" + hashlib.sha256(init_core).digest()
                          + abort_prefix).digest()


def tag(session: SessionSecret, role: str, th: bytes) -> bytes:
    from qkdgate.keymix.schedule import confirmation_tag
    return confirmation_tag(session, role, th)


def verify_tag(session: SessionSecret, role: str, th: bytes, got: bytes) -> None:
    from qkdgate.keymix.schedule import verify_confirmation
    try:
        verify_confirmation(session, role, th, got)
    except AuthenticationFailed:
        raise AuthenticationFailed(f"key confirmation from the {role} does not verify") \
            from None


def combine(kem_name: str, kem_ss: SecretBytes, x_ss: SecretBytes | None,
            qkd_key: SecretBytes | None, qkd_ids: tuple[str, ...], th: bytes,
            qkd_sources: tuple[tuple[int, int], ...] = ()) -> SessionSecret:
    """The hybrid combiner over this exchange's inputs, bound to TH;
    ``qkd_sources``: (source index, key bytes) of each key_ID when several
    key sources are configured (docs/keymix.md 4.5)."""
    from qkdgate.keymix.combiner import HybridInputs
    from qkdgate.keymix.combiner import combine as keymix_combine
    q = qkd_key is not None
    return keymix_combine(HybridInputs(kem_name, kem_ss, x_ss, qkd_key, qkd_ids if q else (), th,
                                       qkd_sources if q else ()))


def check_key_sources(ids: tuple[str, ...], sources: tuple[int, ...], n: int, k: int) -> None:
    """The key_IDs a peer sent must be in the form this side is configured
    for (docs/protocol.md 4.2, 9.1): plain for one source (``n == 0``); sourced,
    each index below ``n`` and at least ``k`` of them, for several."""
    if not n:
        if sources:
            raise RemoteProtocolError("peer sent key_IDs of several QKD sources; "
                                      "one source is configured here")
        return
    if not sources:
        raise RemoteProtocolError(f"peer sent key_IDs of one QKD source; {n} sources are "
                                  "configured here")
    if any(i >= n for i in sources):
        raise RemoteProtocolError(f"peer sent a key_ID of QKD source #{max(sources)}; "
                                  f"{n} sources are configured here")
    if len(ids) < k:
        raise RemoteProtocolError(f"peer sent key_IDs of {len(ids)} QKD sources; the rule "
                                  f"here needs {k} of {n}")


# ---------------------------------------------------------------- tunnels

def spi_entries(spis: Mapping[str, int], kinds: Mapping[str, str]) -> SpiEntries:
    return tuple((tid, kinds[tid], val) for tid, val in sorted(spis.items()))


def check_spis(msg: Message, kinds: Mapping[str, str]) -> dict[str, int]:
    """The peer's SPI list must name exactly our tunnels with the same kinds."""
    got = {tid: (kind, val) for tid, kind, val in msg["spis"]}
    if set(got) != set(kinds):
        missing, extra = sorted(set(kinds) - set(got)), sorted(set(got) - set(kinds))
        raise RemoteProtocolError(f"tunnel set differs from ours (missing {missing}, "
                                  f"unexpected {extra})")
    for tid, (kind, _) in got.items():
        if kind != kinds[tid]:
            raise RemoteProtocolError(f"tunnel {tid!r} is {kind} at the peer, "
                                      f"{kinds[tid]} here")
    return {tid: val for tid, (_, val) in got.items()}


def check_our_spis(spis: Mapping[str, int], kinds: Mapping[str, str]) -> None:
    """What the driver's ``allocate_spi`` returned must fit the wire: an SPI
    in 0x100..0xFFFFFFFF (RFC 4303 2.1: 1..255 are reserved), a MACsec AN
    0..3 (IEEE 802.1AE-2018 10.7.14), or 0 for a key consumer (WireGuard,
    strongSwan: docs/protocol.md 4.2). Anything else is the driver's bug."""
    from qkdgate.errors import LocalProtocolError
    if spis.keys() != kinds.keys():
        raise LocalProtocolError(f"allocate_spis answered for {len(spis)} tunnel(s), "
                                 f"not the peer's {len(kinds)}")
    for t, v in spis.items():
        kind = kinds[t]
        ok = isinstance(v, int) and (0x100 <= v <= 0xFFFFFFFF if kind == "ipsec"
                                     else 0 <= v <= 3 if kind == "macsec" else v == 0)
        if not ok:
            raise LocalProtocolError(f"allocate_spi returned {v!r} for {kinds[t]} "
                                     f"tunnel {t!r}")


def check_resp_qkd(sent: QkdMode, got: int) -> None:
    """The QKD mode of a RESP must answer the one our INIT carried."""
    ok = {QkdMode.NONE: (QkdMode.NONE,), QkdMode.KEYS: (QkdMode.USING, QkdMode.ABSENT),
          QkdMode.EXPECT: (QkdMode.KEYS, QkdMode.ABSENT),
          QkdMode.ABSENT: (QkdMode.ABSENT,)}[sent]
    if got not in ok:
        raise RemoteProtocolError(f"RESP QKD mode {got} does not answer our {sent}"
                                  " (QKD roles configured inconsistently?)")


# ---------------------------------------------------------------- messages

def init_core(identity: LocalIdentity, epoch: int, peer_epoch: int, xid: int,
              values: dict[str, object]) -> bytes:
    """INIT core with I's Ed25519 signature over everything before it."""
    values["signer_id"] = identity.key_id
    prefix = m.encode_core(MsgType.INIT, epoch, peer_epoch, xid, values, stop="ed25519_sig")
    values["ed25519_sig"] = identity.sign_ed25519(prefix, b"INIT")
    return prefix + m.encode_fields(MsgType.INIT, values, "ed25519_sig")


def resp_prefix(identity: LocalIdentity, epoch: int, peer_epoch: int, xid: int,
                values: dict[str, object]) -> bytes:
    """RESP core up to the tag: what TH covers."""
    values["signer_id"] = identity.key_id
    return m.encode_core(MsgType.RESP, epoch, peer_epoch, xid, values, stop="tag")


def resp_rest(identity: LocalIdentity, th: bytes, values: dict[str, object],
              resp_tag: bytes) -> bytes:
    """The tag and R's hybrid signature over ``TH || tag``: the signature
    covers the tag too, so a tampered tag is a forgery and a signed but wrong
    tag is a real disagreement about the secret."""
    values["tag"] = resp_tag
    values["signature"] = identity.sign(th + resp_tag, b"RESP")
    return m.encode_fields(MsgType.RESP, values, "tag")


Signed = tuple[bytes, bytes, bytes]    # (signed data, hybrid signature, context)


def resp_signed(th: bytes, msg: Message) -> Signed:
    return th + msg["tag"], msg["signature"], b"RESP"


def confirm_core(identity: LocalIdentity, epoch: int, peer_epoch: int, xid: int,
                 generation: int, th: bytes, confirm_tag: bytes) -> bytes:
    values: dict[str, object] = {"generation": generation, "signer_id": identity.key_id,
                                 "tag": confirm_tag}
    prefix = m.encode_core(MsgType.CONFIRM, epoch, peer_epoch, xid, values, stop="signature")
    values["signature"] = identity.sign(th + prefix, b"CONFIRM")
    return prefix + m.encode_fields(MsgType.CONFIRM, values, "signature")


def confirm_signed(th: bytes, msg: Message) -> Signed:
    return th + msg.prefix("signature"), msg["signature"], b"CONFIRM"


def done_core(epoch: int, peer_epoch: int, xid: int, generation: int,
              done_tag: bytes) -> bytes:
    return m.encode_core(MsgType.DONE, epoch, peer_epoch, xid,
                         {"generation": generation, "tag": done_tag})


def abort_core(identity: LocalIdentity, epoch: int, peer_epoch: int, xid: int,
               init: bytes, generation: int, role: int, code: AbortCode, detail: str) -> bytes:
    values: dict[str, object] = {"generation": generation, "sender_role": role, "code": code,
                                 "detail": detail, "signer_id": identity.key_id}
    prefix = m.encode_core(MsgType.ABORT, epoch, peer_epoch, xid, values, stop="signature")
    values["signature"] = identity.sign(abort_digest(init, prefix), b"ABORT")
    return prefix + m.encode_fields(MsgType.ABORT, values, "signature")


def abort_signed(init: bytes, msg: Message) -> Signed:
    return abort_digest(init, msg.prefix("signature")), msg["signature"], b"ABORT"


def verify_ed25519_half(peer: PeerIdentity, signed: Signed) -> None:
    """The classical half of a hybrid signature alone (the first
    ``ED25519_SIG`` bytes, same context): the cheap gate before ML-DSA."""
    from qkdgate.gateway.protocol.identity import ED25519_SIG
    data, signature, context = signed
    peer.verify_ed25519(data, signature[:ED25519_SIG], context)


def cookie_core(epoch: int, msg: Message, cookie: bytes) -> bytes:
    return m.encode_core(MsgType.COOKIE, epoch, msg.sender_epoch, msg.exchange_id,
                         {"cookie": cookie})


def stale_core(epoch: int, msg: Message, floor: int) -> bytes:
    """STALE (docs/protocol.md 4.10): the INIT's epoch is below ``floor``, the
    highest we know the sender by; its nonce is echoed, so only who saw the
    INIT can produce the notice."""
    return m.encode_core(MsgType.STALE, epoch, msg.sender_epoch, msg.exchange_id,
                         {"epoch_floor": floor, "init_nonce": msg["nonce"]})
