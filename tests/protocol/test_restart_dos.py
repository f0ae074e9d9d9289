"""Desync after restart, and the cheap checks that guard expensive work."""

from __future__ import annotations

import dataclasses

import pytest
from protocol_harness import Gateway, assert_keys_match, identity, make_pair, seeded

from qkdgate.gateway.protocol import events as E
from qkdgate.gateway.protocol import messages as m
from qkdgate.gateway.protocol.config import SessionConfig
from qkdgate.gateway.protocol.fragment import fragment
from qkdgate.gateway.protocol.session import PeerSession


def restart(p, gw: Gateway, seed: int, floor: int = 0) -> None:
    """Replace a gateway's session by a fresh one: all protocol state lost."""
    old = gw.session
    cfg = dataclasses.replace(old.config, generation_floor=floor, initiate_on_start=True)
    gw.session = PeerSession(cfg, identity=old.identity, peer_identities=old.peer_identities,
                             rng=seeded(seed), now=p.now, allocate_spi=old._allocate_spi)
    gw.events.clear()


@pytest.mark.parametrize("who", ["initiator", "responder"])
@pytest.mark.parametrize("floor", [0, 1])
def test_restart_reconverges_and_generations_never_repeat(who, floor):
    p = make_pair(rekey_interval=3600.0)
    p.roundtrip_until_done()
    gw = p.a if who == "initiator" else p.b
    restart(p, gw, seed=99, floor=floor)
    p.roundtrip_until_done()
    other = p.other(gw)
    assert len(other.of(E.PeerRestarted)) == 1
    gen = gw.session.generation
    assert gen == other.session.generation == 2      # never reuses generation 1
    assert_keys_match(p, gen)
    p.advance(p.now + 20)
    assert 1 in other.retired


def test_restart_while_peer_is_mid_exchange():
    p = make_pair(rekey_interval=3600.0)
    p.roundtrip_until_done()
    p.b.session.initiate_rekey(p.now, "operator")
    p.b.pump(p.now)
    p.b.session.datagrams_to_send(p.now)        # B's INIT is lost ...
    restart(p, p.a, seed=77)                     # ... and A restarts
    p.roundtrip_until_done()
    p.advance(p.now + 60)
    assert p.a.session.generation == p.b.session.generation >= 2
    assert_keys_match(p, p.a.session.generation)


def test_old_epoch_replay_after_restart_is_refused():
    p = make_pair(rekey_interval=3600.0)
    p.roundtrip_until_done()
    old_log = list(p.log)
    restart(p, p.a, seed=55)
    p.roundtrip_until_done()
    before = dict(p.b.session.stats)
    for src, d in old_log:                       # A's messages from its dead epoch
        if src == "gw-a":
            p.b.session.receive_datagram(d, p.now)
    assert p.b.session.stats["stale"] > before.get("stale", 0)
    assert p.b.session.stats["kem_encaps"] == before["kem_encaps"]
    assert p.b.session.stats["verify_ed25519"] == before["verify_ed25519"]


def _flood_init(sender_identity, receiver_name: str, n: int, epoch0: int = 1000,
                kem_pk: bytes | None = None):
    """Well-formed INITs with a valid mac1 (no PSK: the names are public)."""
    from qkdgate.keymix.kem import get_kem
    if kem_pk is None:
        _, kem_pk = get_kem("ML-KEM-768").generate_keypair()
    out = []
    for i in range(n):
        values = {"generation_min": 1, "nonce": bytes([i % 256]) * 32, "kem_id": 1,
                  "kem_public": kem_pk, "x25519_public": b"\x09" + bytes(31),
                  "qkd_mode": m.QkdMode.NONE, "qkd_reason": 0, "qkd_flags": 0,
                  "key_ids": (), "spis": (("t1", "ipsec", 0x1000 + i), ("m1", "macsec", 0)),
                  "signer_id": sender_identity.key_id}
        prefix = m.encode_core(m.MsgType.INIT, epoch0 + i, 0, 1, values, stop="ed25519_sig")
        values["ed25519_sig"] = sender_identity.sign_ed25519(prefix, b"INIT")
        core = prefix + m.encode_fields(m.MsgType.INIT, values, "ed25519_sig")
        out.extend(fragment(m.seal(core, m.mac1_key(receiver_name, None)), i))
    return out


def test_init_flood_from_unpinned_sender_costs_no_expensive_crypto():
    p = make_pair(qkd=None, start="none", rate_burst=4, rate_per_second=1.0)
    mallory = identity("mallory")
    for d in _flood_init(mallory, "gw-b", 50):
        p.b.session.receive_datagram(d, p.now)
    st = p.b.session.stats
    assert st["kem_encaps"] == st["sign_hybrid"] == st["verify_hybrid"] == 0
    assert st["verify_ed25519"] == 0            # signer id not pinned: not even Ed25519
    assert st["rate_limited"] == 46 and st["cookie_sent"] == 46
    assert st["violation_auth"] == 4
    assert not p.b.of(E.SessionEstablished)
    # violation events are rate limited too, counters are exact
    assert len(p.b.of(E.ProtocolViolation)) <= 2
    p.b.pump(p.now)
    # the genuine peer still gets through: its INIT is answered with a cookie,
    # it echoes it, and the cookie path has its own budget
    p.a.session.initiate_rekey(p.now, "operator")
    p.roundtrip_until_done()
    assert p.a.session.stats["cookie_received"] == 1
    assert_keys_match(p, 1)


def test_forged_ed25519_under_a_pinned_key_id_stops_at_the_cheap_check():
    p = make_pair(qkd=None, start="none", rate_burst=100)
    mallory = identity("mallory")
    real_a = identity("gw-a")
    fake = dataclasses.make_dataclass("Fake", ["key_id", "sign_ed25519"])(
        real_a.key_id, mallory.sign_ed25519)
    for d in _flood_init(fake, "gw-b", 20):
        p.b.session.receive_datagram(d, p.now)
    st = p.b.session.stats
    assert st["verify_ed25519"] == 20 and st["violation_auth"] == 20
    assert st["kem_encaps"] == st["sign_hybrid"] == st["verify_hybrid"] == 0


def test_with_psk_a_flood_without_it_stops_at_mac1():
    p = make_pair(qkd=None, start="none", psk_a=b"p" * 32, psk_b=b"p" * 32)
    for d in _flood_init(identity("gw-a"), "gw-b", 20):   # even with A's real key
        p.b.session.receive_datagram(d, p.now)
    st = p.b.session.stats
    assert st["violation_mac1"] == 20
    assert st["verify_ed25519"] == st["kem_encaps"] == 0


def test_config_validation():
    from qkdgate.errors import ConfigError
    base = dict(local_name="a", peer_name="b")
    for bad in [dict(peer_name="a"), dict(kem="Kyber512"), dict(qkd_role="boss"),
                dict(qkd_role="master"), dict(rekey_interval=0.1), dict(rate_burst=0),
                dict(psk=__import__("qkdgate.keymix.secret", fromlist=["x"]).SecretBytes(b"x")),
                dict(rekey_jitter=0.7)]:
        with pytest.raises(ConfigError):
            SessionConfig(**{**base, **bad}).validate()
    SessionConfig(**base).validate()


def test_signed_init_with_invalid_kem_key_is_dropped_and_leaves_no_state():
    """Even from the pinned peer: an ML-KEM key failing the FIPS 203 modulus
    check is a violation, costs no KME key and leaves no half exchange."""
    p = make_pair(start="none")
    for d in _flood_init(identity("gw-a"), "gw-b", 1, kem_pk=b"\xff" * 1184):
        p.b.session.receive_datagram(d, p.now)
    p.b.pump(p.now)
    st = p.b.session.stats
    assert st["violation_malformed"] == 1 and st["verify_ed25519"] == 1
    assert not p.b.of(E.NeedQkdKeys)
    assert p.b.session._res is None and p.b.session.snapshot(p.now)["exchange"] is None
    p.a.session.initiate_rekey(p.now, "operator")     # and the real peer still works
    p.roundtrip_until_done()
    assert_keys_match(p, p.a.session.generation)


def test_replayed_init_is_not_amplified_into_resps():
    p = make_pair(start="none")
    p.a.session.initiate_rekey(p.now, "operator")
    p.a.pump(p.now)
    init = p.a.session.datagrams_to_send(p.now)
    for d in init:
        p.b.session.receive_datagram(d, p.now)
    p.b.pump(p.now)
    first = p.b.session.datagrams_to_send(p.now)
    assert first
    for _ in range(50):                          # replayed at the same instant
        for d in init:
            p.b.session.receive_datagram(d, p.now)
    assert p.b.session.datagrams_to_send(p.now) == []
    assert p.b.session.stats["duplicate"] == 50
    p.now += 1.0                                 # a genuine retransmission later
    for d in init:
        p.b.session.receive_datagram(d, p.now)
    assert len(p.b.session.datagrams_to_send(p.now)) == len(first)
