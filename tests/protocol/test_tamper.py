"""Tampering of every field is rejected; wrong identity, wrong PSK, rollover."""

from __future__ import annotations

import pytest
from protocol_harness import assert_keys_match, identity, make_pair
from test_network import group

from qkdgate.gateway.protocol import events as E
from qkdgate.gateway.protocol import messages as m
from qkdgate.gateway.protocol.fragment import HEADER, fragment
from qkdgate.gateway.protocol.messages import MsgType

HEADER_FIELDS = {"type": 0, "version": 1, "flags": 2, "sender_epoch": 4,
                 "receiver_epoch": 12, "exchange_id": 20}
RECEIVER = {MsgType.INIT: "gw-b", MsgType.RESP: "gw-a", MsgType.CONFIRM: "gw-b",
            MsgType.DONE: "gw-a"}


def cases():
    for mtype in (MsgType.INIT, MsgType.RESP, MsgType.CONFIRM, MsgType.DONE):
        for name in HEADER_FIELDS:
            yield mtype, name
        for name, _ in m.SCHEMAS[mtype]:
            yield mtype, name


def tamper(mtype: MsgType, field: str, psk: bytes | None = None):
    """Network hook: flip one bit in ``field`` of the first ``mtype`` message
    and re-seal it with a valid mac1 (an attacker who knows the names and
    PSK, i.e. the worst case for everything after mac1)."""
    state = {"done": False}

    def net(src: str, dgrams: list[bytes]) -> list[bytes]:
        out = []
        for t, ds in group(dgrams):
            if t == mtype and not state["done"]:
                state["done"] = True
                raw = b"".join(d[HEADER.size:] for d in ds)
                msg = m.decode(raw)
                core = bytearray(msg.core)
                if field in HEADER_FIELDS:
                    pos = HEADER_FIELDS[field] + (1 if field == "flags" else 0)
                else:
                    names = [n for n, _ in m.SCHEMAS[mtype]]
                    i = names.index(field)
                    end = msg.offsets[names[i + 1]] if i + 1 < len(names) else len(core)
                    pos = end - 1
                core[pos] ^= 0x01
                key = m.mac1_key(RECEIVER[mtype], psk)
                ds = fragment(m.seal(bytes(core), key, msg.cookie), 0x7777)
            out.extend(ds)
        return out
    return net


@pytest.mark.parametrize("mtype,field", list(cases()),
                         ids=[f"{t.name}-{f}" for t, f in cases()])
def test_tampered_field_is_rejected_and_the_exchange_recovers(mtype, field):
    p = make_pair()
    p.network = tamper(mtype, field)
    receiver = p.b if RECEIVER[mtype] == "gw-b" else p.a
    p.roundtrip_until_done()
    st = receiver.session.stats
    rejected = sum(v for k, v in st.items() if k.startswith("violation_")) + st["stale"]
    assert rejected >= 1, dict(st)
    # nothing was derived from the tampered bytes: both sides hold the same
    # keys for exactly one generation, with no failed exchange in between
    gen = p.a.session.generation
    assert gen == p.b.session.generation == 1
    assert_keys_match(p, gen)
    assert not p.a.of(E.RekeyFailed) and not p.b.of(E.RekeyFailed)


def test_unsealed_tampering_is_dropped_at_mac1_before_any_crypto():
    p = make_pair()

    def net(src, ds):
        return [d[:-1] + bytes([d[-1] ^ 1]) if src == "gw-a" else d for d in ds]
    p.network = net
    p.advance(p.now + 5)
    st = p.b.session.stats
    assert st["violation_mac1"] >= 1
    assert st["verify_ed25519"] == st["kem_encaps"] == st["sign_hybrid"] == 0


def test_wrong_identity_is_refused_by_both_sides():
    stranger = identity("mallory")
    # B pins someone else for A: A's INIT is refused before any KEM work
    p = make_pair(pins_b=[stranger.public])
    p.advance(p.now + 5)
    assert not p.b.of(E.SessionEstablished) and p.b.inbound == {}
    assert p.b.session.stats["violation_auth"] >= 1
    assert p.b.session.stats["kem_encaps"] == 0
    # A pins someone else for B: B's RESP fails, A installs nothing
    p = make_pair(pins_a=[stranger.public])
    p.advance(p.now + 5)
    assert p.a.session.stats["violation_auth"] >= 1
    assert p.a.inbound == {} and p.b.inbound == {}
    assert not p.a.of(E.SessionEstablished)


def test_impostor_with_pinned_key_id_but_own_keys():
    """Mallory claims A's key id: the Ed25519 pre-check fails."""
    mallory = identity("mallory")
    real_a = identity("gw-a")
    object.__setattr__(mallory.public, "key_id", real_a.key_id)
    try:
        p = make_pair(id_a=mallory, pins_b=[real_a.public])
        p.advance(p.now + 5)
        assert p.b.session.stats["verify_ed25519"] >= 1
        assert p.b.session.stats["kem_encaps"] == 0 and p.b.inbound == {}
    finally:
        mallory.public.key_id = __import__("hashlib").sha256(
            mallory.public.profile.name.encode() + b"\0" + mallory.public.ed25519_public
            + mallory.public.mldsa_public).digest()[:8]


def test_wrong_psk_costs_nothing_and_installs_nothing():
    p = make_pair(psk_a=b"a" * 32, psk_b=b"b" * 32)
    p.advance(p.now + 10)
    for gw in (p.a, p.b):
        assert not gw.of(E.SessionEstablished) and gw.inbound == {}
    st = p.b.session.stats
    assert st["violation_mac1"] >= 1
    assert st["verify_ed25519"] == st["kem_encaps"] == st["sign_hybrid"] == 0
    # PSK on one side only fails the same way
    p = make_pair(psk_a=b"a" * 32)
    p.advance(p.now + 10)
    assert not p.b.of(E.SessionEstablished)


def test_identity_rollover_with_two_pins():
    old_a, new_a = identity("gw-a", 0), identity("gw-a", 1)
    pins = [old_a.public, new_a.public]
    p = make_pair(id_a=old_a, pins_b=pins)
    p.roundtrip_until_done()
    p = make_pair(id_a=new_a, pins_b=pins)      # A switched to its new identity
    p.roundtrip_until_done()
    assert_keys_match(p, 1)
    p = make_pair(id_a=old_a, pins_b=[new_a.public])   # old pin removed
    p.advance(p.now + 5)
    assert not p.b.of(E.SessionEstablished)
