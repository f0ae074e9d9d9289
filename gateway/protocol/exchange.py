"""One exchange (one rekey attempt) and the cryptographic steps it takes.

Theory of operation: :class:`Exchange` holds everything one handshake needs,
from the first INIT to the switch; the functions below compute each message
and check each answer, and touch nothing else (no events, no timers: the
session does that). Every full exchange is fresh: new ML-KEM and X25519 key
pairs, new nonces, new QKD keys, so one generation's secret says nothing
about another's (the keymix issue: no ratchet, no key reuse).

Transcript hash TH (docs/protocol.md 5) = HMAC-SHA-256 keyed with the PSK
digest over both names, the INIT core and the RESP core up to its
signature. The combiner binds TH (keymix HybridInputs.transcript_hash), the
responder signs TH (context ``RESP``), the initiator signs TH (context
``CONFIRM``), and confirmation tags are keyed with the session secret over
TH (RESP, CONFIRM) and over ``SHA-256("qkdgate/1 done\\0" || TH)`` (DONE).
"""

from __future__ import annotations

import hashlib
from dataclasses import dataclass, field
from typing import Any

from qkdgate.errors import AuthenticationFailed, RemoteProtocolError
from qkdgate.gateway.protocol import messages as m
from qkdgate.gateway.protocol.messages import Message, QkdMode, QkdReason

REASON_TEXT = {QkdReason.UNAVAILABLE: "QKD key unavailable", QkdReason.TIMEOUT: "KME timeout",
               QkdReason.AUTH: "KME refused us", QkdReason.PROTOCOL: "KME protocol error",
               QkdReason.PEER: "peer requested PQC-only", QkdReason.NONE: "QKD absent"}

# initiator states
I_QKD = "i-wait-qkd"              # master: waiting for enc_keys before INIT
I_INIT_SENT = "i-init-sent"
I_QKD_SLAVE = "i-wait-qkd-slave"  # RESP authenticated, waiting for dec_keys
I_INSTALL_IN = "i-install-inbound"
I_CONFIRM_SENT = "i-confirm-sent"
I_INSTALL_OUT = "i-install-outbound"
# responder states
R_QKD = "r-wait-qkd"
R_RESP_SENT = "r-resp-sent"
R_INSTALL_IN = "r-install-inbound"
R_INSTALL_OUT = "r-install-outbound"


@dataclass(eq=False)
class Exchange:
    role: str                       # "initiator" | "responder"
    xid: int                        # exchange id (initiator's counter)
    state: str
    started: float
    deadline: float
    reason: str
    peer_epoch: int = 0             # 0 until known
    generation: int | None = None
    nonce_i: bytes = b""
    kem_priv: Any = None
    x_priv: Any = None
    init: Message | None = None     # as received (responder)
    init_core: bytes = b""
    resp: Message | None = None     # as received (initiator)
    resp_core: bytes = b""
    th: bytes = b""
    session: Any = None             # keymix SessionSecret
    our_spis: dict[str, int] = field(default_factory=dict)
    peer_spis: dict[str, int] = field(default_factory=dict)
    qkd_mode: int = QkdMode.NONE    # what we sent
    qkd_reason: int = 0
    qkd_fallback: str = ""          # non-empty: this generation is PQC-only by fallback
    qkd_key: Any = None             # SecretBytes, dropped once combined
    qkd_ids: tuple[str, ...] = ()
    cookie: bytes = b""
    request_id: int | None = None   # the driver request we wait for
    wire: bytes = b""               # our last message, for retransmission / duplicates
    retx_at: float | None = None
    retx_interval: float = 0.0
    auth_failures: int = 0
    inbound_requested: bool = False
    done_wire: bytes = b""
    confirm_core: bytes = b""
    kem_secret: Any = None          # responder: encapsulated before any QKD fetch
    x_secret: Any = None
    kem_ciphertext: bytes = b""
    x_public: bytes = b""
    cookie_at: float = -1e18       # initiator: last cookie; responder: last cached RESP


def done_hash(th: bytes) -> bytes:
    return hashlib.sha256(m.LABEL + b" done\0" + th).digest()


def abort_digest(init_core: bytes, abort_prefix: bytes) -> bytes:
    """What an ABORT signature covers: the exchange's INIT and the ABORT."""
    return hashlib.sha256(m.LABEL + b" abort\0" + hashlib.sha256(init_core).digest()
                          + abort_prefix).digest()


def spi_entries(spis: dict[str, int], kinds: dict[str, str]) -> tuple:
    return tuple((tid, kinds[tid], val) for tid, val in sorted(spis.items()))


def check_spis(msg: Message, kinds: dict[str, str]) -> dict[str, int]:
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


def verify_tag(session: Any, role: str, th: bytes, tag: bytes) -> None:
    from qkdgate.keymix.schedule import verify_confirmation
    try:
        verify_confirmation(session, role, th, tag)
    except AuthenticationFailed:
        raise AuthenticationFailed(f"key confirmation from the {role} does not verify") \
            from None
