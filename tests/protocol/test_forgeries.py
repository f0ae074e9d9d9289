"""Issue 17 finding 4: forged answers are dropped and never abort an exchange.

An on-path observer sees the epochs and the exchange id in clear and, without
a PSK, can compute mac1, so it can send well-formed answers that fail only
authentication. Before the fix, 8 of them made the receiver abandon the
exchange (MAX_AUTH_FAILURES); 8 forged DONEs left the initiator behind a
responder that had already switched. Now a message that fails authentication
changes nothing: the genuine one, or the exchange timeout, decides.
"""

from __future__ import annotations

import pytest
from protocol_harness import assert_keys_match, make_pair
from test_network import group

from qkdgate.gateway.protocol import events as E
from qkdgate.gateway.protocol import messages as m
from qkdgate.gateway.protocol.fragment import HEADER, fragment
from qkdgate.gateway.protocol.messages import MsgType

RECEIVER = {MsgType.RESP: "gw-a", MsgType.CONFIRM: "gw-b", MsgType.DONE: "gw-a",
            MsgType.ABORT: "gw-a"}
FORGERIES = 50
VERIFY_BURST = 16        # the session's per-exchange ML-DSA budget (docs/protocol.md 11)


# What a forger without the peer's keys alters: any signed field (here one
# the signature covers early, so both halves of a hybrid signature fail).
FIELD = {MsgType.RESP: "nonce", MsgType.CONFIRM: "tag", MsgType.DONE: "tag"}


def forged_copies(raw: bytes, n: int, field: str | None = None) -> list[bytes]:
    """``n`` copies of a genuine message with ``field`` altered (default: the
    last byte of the message's last field, i.e. the ML-DSA half of a hybrid
    signature), re-sealed with a valid mac1 (no PSK: mac1 is public)."""
    msg = m.decode(raw)
    names = [name for name, _ in m.SCHEMAS[msg.type]]
    name = field or names[-1]
    i = names.index(name)
    end = msg.offsets[names[i + 1]] if i + 1 < len(names) else len(msg.core)
    out = []
    for k in range(n):
        core = bytearray(msg.core)
        core[end - 1 - k % 16] ^= 1 + k // 16
        out.extend(fragment(m.seal(bytes(core), m.mac1_key(RECEIVER[msg.type], None)),
                            0x5000 + k))
    return out


def forge_before(mtype: MsgType, n: int = FORGERIES, field: str | None = None):
    """Network hook: ``n`` forgeries arrive just before the first genuine
    ``mtype`` message (the attacker races it)."""
    state = {"done": False}

    def net(src: str, dgrams: list[bytes]) -> list[bytes]:
        out: list[bytes] = []
        for t, ds in group(dgrams):
            if t == mtype and not state["done"]:
                state["done"] = True
                raw = b"".join(d[HEADER.size:] for d in ds)
                out.extend(forged_copies(raw, n, field if field else FIELD[mtype]))
            out.extend(ds)
        return out
    return net


@pytest.mark.parametrize("mtype", [MsgType.RESP, MsgType.CONFIRM, MsgType.DONE])
def test_fifty_forgeries_then_the_real_answer_completes_the_exchange(mtype):
    p = make_pair(qkd="a-master", exchange_timeout=30.0)
    p.network = forge_before(mtype)
    p.roundtrip_until_done(timeout=20)
    receiver = p.a if RECEIVER[mtype] == "gw-a" else p.b
    st = receiver.session.stats
    assert st["violation_auth"] + st["verify_limited"] >= FORGERIES
    # both sides switched to the same generation, nobody gave up
    assert p.a.current_out == p.b.current_out == 1
    assert_keys_match(p, 1)
    assert not p.a.of(E.RekeyFailed) and not p.b.of(E.RekeyFailed)
    # a forger without the keys never gets past the Ed25519 half
    assert st["verify_hybrid"] <= 2 and st["verify_limited"] == 0


@pytest.mark.parametrize("mtype", [MsgType.RESP, MsgType.CONFIRM])
def test_forgeries_with_a_valid_ed25519_half_are_bounded_and_still_abort_nothing(mtype):
    """Worst case: the forger can make the Ed25519 half verify (only the
    ML-DSA half is wrong). The ML-DSA work is bounded per exchange; the
    genuine answer that found the budget spent is dropped unverified, and
    the initiator's retransmission brings it again."""
    p = make_pair(qkd="a-master")
    p.network = forge_before(mtype, field="signature")
    p.roundtrip_until_done(timeout=20)
    receiver = p.a if RECEIVER[mtype] == "gw-a" else p.b
    st = receiver.session.stats
    assert st["verify_limited"] >= FORGERIES - VERIFY_BURST
    assert st["verify_hybrid"] <= VERIFY_BURST + 2
    assert p.a.current_out == p.b.current_out == 1
    assert_keys_match(p, 1)
    assert not p.a.of(E.RekeyFailed) and not p.b.of(E.RekeyFailed)


def test_forged_aborts_change_nothing():
    """Forged ABORTs (signed by nobody) for the running exchange, at every
    step the initiator waits: the exchange still completes."""
    p = make_pair(qkd=None)
    state = {"n": 0}

    def net(src: str, dgrams: list[bytes]) -> list[bytes]:
        if src != "gw-b" or not dgrams:
            return dgrams
        out: list[bytes] = []
        for _, ds in group(dgrams):
            real = m.decode(b"".join(d[HEADER.size:] for d in ds))
            for i in range(FORGERIES):
                values = {"generation": 1, "sender_role": m.ROLE_RESPONDER,
                          "code": m.AbortCode.QKD_UNAVAILABLE, "detail": "forged",
                          "signer_id": p.b.session.identity.key_id,
                          "signature": bytes([i]) * 64}
                core = m.encode_core(MsgType.ABORT, real.sender_epoch, real.receiver_epoch,
                                     real.exchange_id, values)
                state["n"] += 1
                out.extend(fragment(m.seal(core, m.mac1_key("gw-a", None)), 0x6000 + i))
            out.extend(ds)
        return out
    p.network = net
    p.roundtrip_until_done(timeout=20)
    assert state["n"] >= 2 * FORGERIES
    assert p.a.current_out == p.b.current_out == 1
    assert_keys_match(p, 1)
    assert not p.a.of(E.RekeyFailed) and not p.b.of(E.RekeyFailed)
    assert p.a.session.stats["abort_received"] == 0


def test_without_the_genuine_answer_the_exchange_timeout_decides():
    """Forgeries alone never fail the exchange early: it fails at its
    timeout, as with plain loss."""
    p = make_pair(qkd=None, exchange_timeout=10.0, retry_base=100.0, retry_max=100.0)
    start = p.now
    fwd = forge_before(MsgType.DONE)
    p.network = drop_genuine_done(fwd)
    p.advance(start + 9.9)
    assert not p.a.of(E.RekeyFailed)
    p.advance(start + 10.5)
    fails = p.a.of(E.RekeyFailed)
    assert len(fails) == 1 and fails[0].cause is E.FailureCause.TIMEOUT


def drop_genuine_done(fwd):
    """Forward the forgeries of ``fwd`` but lose every genuine DONE."""
    def net(src: str, dgrams: list[bytes]) -> list[bytes]:
        if src != "gw-b":
            return dgrams
        out: list[bytes] = []
        forged = fwd(src, dgrams)
        genuine = set(dgrams)
        for t, ds in group(forged):
            if t == MsgType.DONE and all(d in genuine for d in ds):
                continue
            out.extend(ds)
        return out
    return net
