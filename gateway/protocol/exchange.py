"""One exchange (one rekey attempt): its state, its data, its legal moves.

Theory of operation: :class:`Exchange` holds everything one handshake needs,
from the first INIT to the switch. Its :class:`ExchangeState` may change
only along :data:`TRANSITIONS` (h11 ``_state.py`` style: ``(role, state) ->
allowed next states``), checked at one choke point,
``PeerSession._transition``; an illegal move is our bug and poisons the
session. :data:`MESSAGE_STATES` says in which states of the exchange it
addresses each answer is legal; anything else is counted (duplicate or
stale) and dropped before any cryptography.

Every full exchange is fresh: new ML-KEM and X25519 key pairs, new nonces,
new QKD keys, so one generation's secret says nothing about another's (no
ratchet, no key reuse). The pure computations (messages, signatures, tags,
the combiner) live in :mod:`~qkdgate.gateway.protocol.handshake`.
"""

from __future__ import annotations

import enum
from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Literal

from qkdgate.gateway.protocol.dos import TokenBucket
from qkdgate.gateway.protocol.messages import Message, MsgType, QkdMode

if TYPE_CHECKING:
    from cryptography.hazmat.primitives.asymmetric.x25519 import X25519PrivateKey

    from qkdgate.keymix.combiner import SessionSecret
    from qkdgate.keymix.kem import KemPrivateKey
    from qkdgate.keymix.secret import SecretBytes

Role = Literal["initiator", "responder"]


class ExchangeState(enum.Enum):
    NEW = "new"
    # initiator
    I_QKD = "i-wait-qkd"               # master: waiting for enc_keys before INIT
    I_INIT_SENT = "i-init-sent"
    I_QKD_SLAVE = "i-wait-qkd-slave"   # RESP authenticated, waiting for dec_keys
    I_INSTALL_IN = "i-install-inbound"
    I_CONFIRM_SENT = "i-confirm-sent"
    I_INSTALL_OUT = "i-install-outbound"
    # responder
    R_QKD = "r-wait-qkd"
    R_RESP_SENT = "r-resp-sent"
    R_INSTALL_IN = "r-install-inbound"
    R_INSTALL_OUT = "r-install-outbound"
    # terminal
    ESTABLISHED = "established"        # both sides switched to this generation
    FAILED = "failed"                  # abandoned with RekeyFailed (timeout, abort...)
    DROPPED = "dropped"                # abandoned silently (lost a collision, superseded)

    def __str__(self) -> str:
        return self.value


S = ExchangeState
TERMINAL = frozenset({S.ESTABLISHED, S.FAILED, S.DROPPED})
_END = frozenset({S.FAILED, S.DROPPED})

# (role, state) -> the states it may move to. Every live state may also end
# (FAILED: timeout, abort, refusal; DROPPED: collision lost, superseded).
TRANSITIONS: dict[tuple[Role, ExchangeState], frozenset[ExchangeState]] = {
    ("initiator", S.NEW): frozenset({S.I_QKD, S.I_INIT_SENT}) | _END,
    ("initiator", S.I_QKD): frozenset({S.I_INIT_SENT}) | _END,
    ("initiator", S.I_INIT_SENT): frozenset({S.I_QKD_SLAVE, S.I_INSTALL_IN}) | _END,
    ("initiator", S.I_QKD_SLAVE): frozenset({S.I_INSTALL_IN}) | _END,
    ("initiator", S.I_INSTALL_IN): frozenset({S.I_CONFIRM_SENT}) | _END,
    ("initiator", S.I_CONFIRM_SENT): frozenset({S.I_INSTALL_OUT}) | _END,
    ("initiator", S.I_INSTALL_OUT): frozenset({S.ESTABLISHED}) | _END,
    ("responder", S.NEW): frozenset({S.R_QKD}) | _END,
    ("responder", S.R_QKD): frozenset({S.R_RESP_SENT}) | _END,
    ("responder", S.R_RESP_SENT): frozenset({S.R_INSTALL_IN}) | _END,
    ("responder", S.R_INSTALL_IN): frozenset({S.R_INSTALL_OUT}) | _END,
    ("responder", S.R_INSTALL_OUT): frozenset({S.ESTABLISHED}) | _END,
}

# The states in which an answer addressed to an exchange is legal. INIT opens
# a responder exchange (its checks are the replay rules, docs/protocol.md 7);
# ABORT is legal whenever the peer knows of the exchange (a message was sent).
MESSAGE_STATES: dict[MsgType, frozenset[ExchangeState]] = {
    MsgType.RESP: frozenset({S.I_INIT_SENT}),
    MsgType.COOKIE: frozenset({S.I_INIT_SENT}),
    MsgType.STALE: frozenset({S.I_INIT_SENT}),
    MsgType.DONE: frozenset({S.I_CONFIRM_SENT}),
    MsgType.CONFIRM: frozenset({S.R_RESP_SENT}),
    MsgType.ABORT: frozenset({S.I_INIT_SENT, S.I_QKD_SLAVE, S.I_INSTALL_IN, S.I_CONFIRM_SENT,
                              S.I_INSTALL_OUT, S.R_QKD, S.R_RESP_SENT, S.R_INSTALL_IN,
                              S.R_INSTALL_OUT}),
}

# States in which the exchange waits for the key source (a timeout there is a
# QKD failure, not a network one).
QKD_WAIT_STATES = frozenset({S.I_QKD, S.I_QKD_SLAVE, S.R_QKD})


@dataclass(eq=False)
class Exchange:
    role: Role
    xid: int                        # exchange id (initiator's counter)
    started: float
    deadline: float
    reason: str
    verify_budget: TokenBucket      # bounds hybrid verifications (forgeries cost this only)
    state: ExchangeState = ExchangeState.NEW
    peer_epoch: int = 0             # 0 until known
    generation: int | None = None
    nonce_i: bytes = b""
    kem_priv: KemPrivateKey | None = None
    x_priv: X25519PrivateKey | None = None
    init: Message | None = None     # as received (responder)
    init_core: bytes = b""
    resp: Message | None = None     # as received (initiator)
    resp_core: bytes = b""
    th: bytes = b""
    session: SessionSecret | None = None
    our_spis: dict[str, int] = field(default_factory=dict)
    peer_spis: dict[str, int] = field(default_factory=dict)
    qkd_mode: QkdMode = QkdMode.NONE   # what we sent
    qkd_reason: int = 0
    qkd_fallback: str = ""          # non-empty: this generation is PQC-only by fallback
    qkd_key: SecretBytes | None = None  # dropped once combined
    qkd_ids: tuple[str, ...] = ()
    qkd_sources: tuple[int, ...] = ()   # source index of each key_ID (several sources)
    qkd_lengths: tuple[int, ...] = ()   # and each key's length in bytes
    cookie: bytes = b""
    request_id: int | None = None   # the driver request we wait for
    wire: bytes = b""               # our last message, for retransmission / duplicates
    retx_at: float | None = None
    retx_interval: float = 0.0
    inbound_requested: bool = False
    done_wire: bytes = b""
    confirm_core: bytes = b""
    kem_secret: SecretBytes | None = None   # responder: encapsulated before any QKD fetch
    x_secret: SecretBytes | None = None
    kem_ciphertext: bytes = b""
    x_public: bytes = b""
    cookie_at: float = -1e18       # initiator: last cookie; responder: last cached RESP
    collision_resent_at: float = -1e18   # initiator: last INIT resent after a won collision
    heard_at: float = -1e18        # last message of this exchange from the peer (hold)
    answered_at: float = -1e18     # responder: our first RESP (a lost collision's retry hold)

    def wipe(self, *, session: bool = False) -> None:
        """Forget this exchange's ephemeral secrets (and its session secret
        if ``session``: only for an exchange that will never be used)."""
        self.kem_priv = self.x_priv = None
        for secret in (self.kem_secret, self.x_secret, self.qkd_key):
            if secret is not None:
                secret.wipe()
        self.kem_secret = self.x_secret = self.qkd_key = None
        if session and self.session is not None:
            self.session.wipe()
            self.session = None
