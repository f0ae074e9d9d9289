"""Rekey triggers, retirement of old generations, collisions."""

from __future__ import annotations

from protocol_harness import assert_keys_match, make_pair

from qkdgate.gateway.protocol import events as E


def test_timer_rekey_fresh_generation_and_no_retire_timer_of_its_own():
    p = make_pair(rekey_interval=60.0)
    p.roundtrip_until_done()
    t1 = p.now
    p.roundtrip_until_done()
    assert 60 * 0.95 - 1 <= p.now - t1 <= 60.0 + 1
    e1, e2 = p.a.of(E.SessionEstablished)
    assert (e1.generation, e2.generation) == (1, 2)
    assert e2.reason in ("timer", "peer")
    assert_keys_match(p, 2)
    # every rekey is a full fresh exchange: new QKD key, new keys
    assert e1.provenance.qkd_key_ids != e2.provenance.qkd_key_ids
    assert p.a.outbound[1] != p.a.outbound[2]
    # the tunnel layer alone retires generation 1 (grace after its switch):
    # the session never does, and keeps no timer for it
    p.advance(p.now + 30.0)
    assert p.a.retired == [] and p.b.retired == []
    assert p.a.session.get_timer() is not None and p.a.session.get_timer() > p.now + 20
    assert p.a.current_out == p.b.current_out == 2


def test_rekey_on_demand_with_reason_and_coalescing():
    p = make_pair(rekey_interval=3600.0)
    p.roundtrip_until_done()
    p.a.session.initiate_rekey(p.now, "volume")        # e.g. soft byte limit reached
    p.a.session.initiate_rekey(p.now, "macsec-pn")     # coalesced into the running one
    assert p.a.session.stats["rekey_coalesced"] == 1
    p.roundtrip_until_done()
    est = p.a.of(E.SessionEstablished)
    assert len(est) == 2 and est[1].reason == "volume" and est[1].generation == 2
    # the responder can trigger too (e.g. its MACsec PN threshold)
    p.b.session.initiate_rekey(p.now, "macsec-pn")
    p.roundtrip_until_done()
    last_b = p.b.of(E.SessionEstablished)[-1]
    assert last_b.role == "initiator" and last_b.reason == "macsec-pn" and last_b.generation == 3
    assert_keys_match(p, 3)


def test_simultaneous_rekeys_resolve_to_one_generation():
    winners = set()
    for seed in range(6):   # the nonce order differs by seed: both winners seen
        p = make_pair(seed=seed * 10, start="both")
        p.roundtrip_until_done()
        p.advance(p.now + 40)
        a_gens = [e.generation for e in p.a.of(E.SessionEstablished)]
        b_gens = [e.generation for e in p.b.of(E.SessionEstablished)]
        assert a_gens == b_gens == [1], (seed, a_gens, b_gens)
        lost = p.a.session.stats["collision_lost"] + p.b.session.stats["collision_lost"]
        won = p.a.session.stats["collision_won"] + p.b.session.stats["collision_won"]
        assert (lost, won) == (1, 1)
        winners.add("gw-a" if p.a.session.stats["collision_won"] else "gw-b")
        assert p.a.of(E.SessionEstablished)[0].role == (
            "initiator" if "gw-a" in winners and p.a.session.stats["collision_won"]
            else "responder")
        assert not p.a.of(E.RekeyFailed) and not p.b.of(E.RekeyFailed)
        assert_keys_match(p, 1)
    assert winners == {"gw-a", "gw-b"}


def test_collision_during_rekey_both_timers_fire_together():
    p = make_pair(rekey_interval=100.0, rekey_jitter=0.0, start="a")
    p.roundtrip_until_done()
    # both sides fire their rekey at the very same moment
    p.a.session.initiate_rekey(p.now, "operator")
    p.b.session.initiate_rekey(p.now, "operator")
    p.roundtrip_until_done()
    p.advance(p.now + 20)
    assert [e.generation for e in p.a.of(E.SessionEstablished)] == [1, 2]
    assert [e.generation for e in p.b.of(E.SessionEstablished)] == [1, 2]
    assert_keys_match(p, 2)


def test_a_collision_won_against_a_late_peer_resolves_in_one_round_trip():
    """A's INIT was lost (B not listening yet) and its retransmission is
    seconds away; B's own INIT arrives and loses the nonce comparison. A
    sends its INIT again at once, B answers: established without waiting
    for A's retransmission timer (issue 19)."""
    for seed in range(0, 40, 10):
        p = make_pair(seed=seed, start="both", qkd=None)
        for gw in (p.a, p.b):
            gw.session.handle_timer(p.now)             # both initiate at start
        p.a.session.datagrams_to_send(p.now)          # A's first INIT: lost
        a_nonce = p.a.session._ini.nonce_i
        b_nonce = p.b.session._ini.nonce_i
        if a_nonce < b_nonce:
            continue                                   # B wins: it answers at once anyway
        retx_at = p.a.session._ini.retx_at
        p.settle()                                     # no time passes
        assert p.a.session.stats["collision_won"] == 1
        assert p.a.session.stats["collision_resend"] == 1
        assert p.b.session.stats["collision_lost"] == 1
        assert len(p.a.of(E.SessionEstablished)) == len(p.b.of(E.SessionEstablished)) == 1
        assert p.now < retx_at
        assert_keys_match(p, 1)
        return
    raise AssertionError("no seed where A wins the comparison")
