"""One whole qkdgate/1 exchange in memory, every input fixed (protocol vectors).

Theory of operation: two :class:`PeerSession` objects are built from a
vector's ``inputs`` (names, identity seeds, per-side rng seeds, PSK, QKD key
and key_IDs, SPIs, generation floors) and driven through the public driver
API only (``handle_timer``, ``datagrams_to_send``, ``receive_datagram``,
``next_event`` and the answers to NeedQkdKeys / InstallInbound /
InstallOutbound), so the protocol's internals can be refactored freely: the
vectors pin the wire, not the code. The clock never moves (``now`` is fixed),
so no retransmission fires. Randomness:

* each session's ``rng`` is :func:`shake_rng` of its seed (epochs, message
  ids, cookie secrets, nonces, X25519 scalars, ML-KEM seeds);
* ML-KEM encapsulation draws ``m`` from the kyber-py provider's own rng
  (pyca cannot be seeded there);
* ML-DSA signing in pyca is hedged (FIPS 204 5.2, fresh randomness each
  time) and cannot be seeded: the generator records every hybrid signature
  and a replay hands the recorded ML-DSA part back (after checking that the
  signed message and the deterministic Ed25519 part are reproduced), while
  the checker verifies every ML-DSA part against the pinned public key.

Used by tools/make_protocol_vectors.py (to write the vectors) and by
test_protocol_vectors.py (to replay them).
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Any

from qkdgate.errors import KeySourceTimeout, KeyUnavailable
from qkdgate.gateway.protocol import events as E
from qkdgate.gateway.protocol import messages as m
from qkdgate.gateway.protocol.config import SessionConfig, TunnelRef
from qkdgate.gateway.protocol.fragment import parse_header
from qkdgate.gateway.protocol.identity import LocalIdentity
from qkdgate.gateway.protocol.session import PeerSession
from qkdgate.interfaces import QkdKey
from qkdgate.keymix.secret import SecretBytes
from qkdgate.testing.deterministic import KyberPyMlKem, shake_rng

H = bytes.fromhex


class RecordingIdentity(LocalIdentity):
    """A real identity that records every hybrid signature it makes."""

    def __init__(self, *args: Any, **kw: Any) -> None:
        super().__init__(*args, **kw)
        self.signed: list[tuple[bytes, bytes, bytes]] = []     # (context, message, signature)

    def sign(self, message: bytes, context: bytes) -> bytes:
        sig = super().sign(message, context)
        self.signed.append((bytes(context), bytes(message), sig))
        return sig


class ReplayIdentity(LocalIdentity):
    """Signs as recorded: the message and context must be the recorded ones
    and the Ed25519 part (deterministic, RFC 8032) must come out the same;
    the hedged ML-DSA part is the recorded one. A difference is noted in
    ``problems`` (not raised, so the run goes on and the datagrams show
    where the wire changed) and the signature made then does not verify."""

    def __init__(self, *args: Any, recorded: list[tuple[bytes, bytes, bytes]], **kw: Any) -> None:
        super().__init__(*args, **kw)
        self.recorded = list(recorded)
        self.problems: list[str] = []

    def sign(self, message: bytes, context: bytes) -> bytes:
        ed = self.sign_ed25519(message, context)
        if not self.recorded:
            self.problems.append(f"{self.name} signs more often than recorded ({context!r})")
            return ed + bytes(self.profile.signature_size - 64)
        ctx, msg, sig = self.recorded.pop(0)
        if (ctx, msg) != (bytes(context), bytes(message)):
            self.problems.append(f"{self.name} signs another {context.decode()} message "
                                 "than recorded")
        elif ed != sig[:64]:
            self.problems.append(f"{self.name}'s Ed25519 signature differs from the recording")
        return ed + sig[64:]


@dataclass
class Run:
    datagrams: list[tuple[str, bytes]] = field(default_factory=list)   # (sender role, bytes)
    events: dict[str, list[Any]] = field(default_factory=lambda: {"initiator": [],
                                                                  "responder": []})
    rng_draws: dict[str, list[tuple[int, bytes]]] = field(default_factory=dict)
    sessions: dict[str, PeerSession] = field(default_factory=dict)
    identities: dict[str, LocalIdentity] = field(default_factory=dict)
    problems: list[str] = field(default_factory=list)


def _config(inputs: dict, me: str, peer: str) -> SessionConfig:
    side, other = inputs[me], inputs[peer]
    return SessionConfig(
        local_name=side["name"], peer_name=other["name"],
        tunnels=tuple(TunnelRef(t, k) for t, k in inputs["tunnels"]),
        kem=inputs["kem"], x25519=inputs["x25519"],
        psk=SecretBytes(H(inputs["psk"])) if inputs["psk"] else None,
        qkd_role=side["qkd_role"], local_sae_id=side["sae_id"], peer_sae_id=other["sae_id"],
        qkd_key_bits=len(H(inputs["qkd"]["key"])) * 8 // len(inputs["qkd"]["key_ids"])
        if inputs["qkd"] else 256,
        allow_pqc_only=side["allow_pqc_only"], initiate_on_start=(me == "initiator"),
        generation_floor=side["generation_floor"])


def run_exchange(inputs: dict, *, signatures: dict[str, list] | None = None,
                 kem_for: Callable[[str, Any], Any] | None = None, strict: bool = True) -> Run:
    """Run one exchange from ``inputs``. Without ``signatures`` the identities
    sign for real (and record); with them, they replay the recording.
    ``kem_for(role, default)`` may replace a side's KEM provider (default:
    the kyber-py provider on both sides, seeded from the inputs). ``strict``
    raises if the exchange did not complete or a replayed signature differs;
    otherwise those go to ``run.problems``."""
    run = Run()
    now = float(inputs["now"])
    kem = KyberPyMlKem(inputs["kem"], shake_rng(H(inputs["kem_encaps_rng_seed"]),
                                                run.rng_draws.setdefault("kem_encaps", [])))
    for role in ("initiator", "responder"):
        side = inputs[role]
        args = (side["profile"], SecretBytes(H(side["ed25519_seed"])),
                SecretBytes(H(side["mldsa_seed"])), side["name"])
        run.identities[role] = (RecordingIdentity(*args) if signatures is None else
                                ReplayIdentity(*args, recorded=signatures[role]))
    for role, peer in (("initiator", "responder"), ("responder", "initiator")):
        side = inputs[role]
        spis = dict(side["spis"])
        provider = kem if kem_for is None else kem_for(role, kem)
        run.sessions[role] = PeerSession(
            _config(inputs, role, peer), identity=run.identities[role],
            peer_identities=[run.identities[peer].public],
            rng=shake_rng(H(side["rng_seed"]), run.rng_draws.setdefault(role, [])),
            now=now, allocate_spi=spis.__getitem__, kem=provider,
            # persisted counters, as the daemon passes them (docs/protocol.md 4.1, 10)
            epoch=side.get("epoch"), peer_epoch_floor=side.get("peer_epoch_floor", 0))
    ini, res = run.sessions["initiator"], run.sessions["responder"]
    ini.handle_timer(now)                      # initiate_on_start: the rekey is due now
    for _ in range(100):
        moved = False
        for role, s, other in (("initiator", ini, res), ("responder", res, ini)):
            while (ev := s.next_event()) is not None:
                moved = True
                run.events[role].append(ev)
                _answer(inputs, role, s, ev, now)
            for d in s.datagrams_to_send(now):
                moved = True
                run.datagrams.append((role, d))
                other.receive_datagram(d, now)
        if not moved:
            break
    else:
        raise AssertionError("the exchange did not settle")
    # ``outcome``: "established" (default) or "aborted" (both sides report a
    # failed rekey and neither established a generation)
    want = E.RekeyFailed if inputs.get("outcome") == "aborted" else E.SessionEstablished
    for role in ("initiator", "responder"):
        names = [type(e).__name__ for e in run.events[role]]
        if not any(isinstance(e, want) for e in run.events[role]):
            run.problems.append(f"{role} reported no {want.__name__}: {names}")
        if want is E.RekeyFailed and "SessionEstablished" in names:
            run.problems.append(f"{role} established a generation in an aborted exchange")
        run.problems += getattr(run.identities[role], "problems", [])
    if strict and run.problems:
        raise AssertionError("; ".join(run.problems))
    return run


# a side's ``kme_error``: what its KME answers instead of keys
KME_ERRORS = {"timeout": KeySourceTimeout, "unavailable": KeyUnavailable}


def _answer(inputs: dict, role: str, s: PeerSession, ev: Any, now: float) -> None:
    if isinstance(ev, E.NeedQkdKeys) and inputs[role].get("kme_error"):
        err = KME_ERRORS[inputs[role]["kme_error"]]("KME did not answer (vector input)")
        s.qkd_failed(ev.request_id, err, now)
    elif isinstance(ev, E.NeedQkdKeys):
        qkd = inputs["qkd"]
        if ev.role == "slave" and tuple(ev.key_ids) != tuple(qkd["key_ids"]):
            raise AssertionError(f"slave asked for {ev.key_ids}, not the vector's key_IDs")
        key = H(qkd["key"])
        n = len(key) // len(qkd["key_ids"])
        s.provide_qkd_keys(ev.request_id, [QkdKey(k, SecretBytes(key[i * n:(i + 1) * n]))
                                           for i, k in enumerate(qkd["key_ids"])], now)
    elif isinstance(ev, (E.InstallInbound, E.InstallOutbound)):
        s.installed(ev.request_id, now)


def _field_json(value: object) -> object:
    if isinstance(value, (bytes, bytearray)):
        return bytes(value).hex()
    if isinstance(value, tuple):
        return [_field_json(v) for v in value]
    if hasattr(value, "name") and isinstance(value, int):
        return int(value)
    return value


def decode_messages(datagrams: list[tuple[str, bytes]]) -> list[dict]:
    """Reassemble in order of first fragment (docs/protocol.md 3.1)."""
    out: list[dict] = []
    open_: dict[tuple[str, int], dict] = {}
    for sender, d in datagrams:
        mid, index, count, _total, payload = parse_header(d)
        entry = open_.get((sender, mid))
        if entry is None:
            entry = open_[(sender, mid)] = {"sender": sender, "message_id": mid,
                                            "parts": {}, "count": count, "datagrams": []}
            out.append(entry)
        entry["parts"][index] = payload
        entry["datagrams"].append(d.hex())
    msgs = []
    for e in out:
        raw = b"".join(e["parts"][i] for i in range(e["count"]))
        msg = m.decode(raw)
        msgs.append({
            "type": msg.type.name, "sender": e["sender"], "message_id": e["message_id"],
            "datagrams": e["datagrams"], "message": raw.hex(), "core_length": len(msg.core),
            "cookie": msg.cookie.hex(), "mac1": raw[-m.MAC_LEN:].hex(),
            "header": {"sender_epoch": msg.sender_epoch, "receiver_epoch": msg.receiver_epoch,
                       "exchange_id": msg.exchange_id},
            # an empty key_sources is the plain keyids form (4.2): no field of its own
            "fields": {k: _field_json(v) for k, v in msg.fields.items()
                       if k != "key_sources" or v}})
    return msgs
