"""The key service's agreement rules (docs/keyservice.md 4), two gateways in
memory: same keys at both ends, halves that never collide, SAE binding, one
size per pool, serving only after confirmation and not near expiry, the dec
window across a rekey, single use, restarts, policy and provenance."""

from __future__ import annotations

import pytest

from qkdgate.keyservice.events import KeysDelivered, KeysRefused
from qkdgate.keyservice.service import Delivery, KeyService, Refusal, Why
from qkdgate.keyservice.settings import PoolSpec, ServiceTimes
from qkdgate.tunnels.policy import KeyPolicy
from tests.keyservice.helpers import QKD_IDS, TIMES, Pair, pools, session


def ok(r: Delivery | Refusal) -> Delivery:
    assert isinstance(r, Delivery), r
    return r


def refused(r: Delivery | Refusal, why: Why) -> Refusal:
    assert isinstance(r, Refusal), r
    assert r.why is why, r
    return r


def test_enc_at_a_and_dec_at_b_give_the_same_keys():
    p = Pair()
    p.rekey(1, 0.0)
    d = ok(p.a.enc_keys("SAE-A", "SAE-B", 3, None, 1.0))
    assert [k.index for k in d.keys] == [0, 2, 4]            # the initiator's even half
    e = ok(p.b.dec_keys("SAE-B", "SAE-A", [k.key_id for k in d.keys], 2.0))
    assert [k.key for k in e.keys] == [k.key for k in d.keys]
    assert len({k.key.reveal() for k in d.keys}) == 3
    assert d.provenance.generation == 1 and d.provenance.qkd_key_ids == QKD_IDS
    assert d.extension()["qkdgate_inputs"] == "ML-KEM-768+X25519+QKD"
    assert not d.single_source
    # and the other way round: B serves the odd half, A fetches
    f = ok(p.b.enc_keys("SAE-B", "SAE-A", 2, 256, 3.0))
    assert [k.index for k in f.keys] == [1, 3]
    g = ok(p.a.dec_keys("SAE-A", "SAE-B", [k.key_id for k in f.keys], 3.0))
    assert [k.key for k in g.keys] == [k.key for k in f.keys]
    assert {k.key_id for k in f.keys}.isdisjoint(k.key_id for k in d.keys)


def test_concurrent_enc_keys_at_both_gateways_never_collide():
    p = Pair(keys=400)
    p.rekey(1, 0.0)
    ids_a, ids_b, keys = set(), set(), set()
    for t in range(100):     # interleaved, as two SAEs asking at once would
        for svc, sae, other, ids in ((p.a, "SAE-A", "SAE-B", ids_a), (p.b, "SAE-B", "SAE-A", ids_b)):
            d = ok(svc.enc_keys(sae, other, 2, None, float(t)))
            ids.update(k.key_id for k in d.keys)
            keys.update(k.key.reveal() for k in d.keys)
    assert len(ids_a) == len(ids_b) == 200 and ids_a.isdisjoint(ids_b) and len(keys) == 400
    refused(p.a.enc_keys("SAE-A", "SAE-B", 1, None, 200.0), Why.NO_KEY)   # half used up


def test_a_third_sae_is_refused():
    p = Pair()
    p.rekey(1, 0.0)
    d = ok(p.a.enc_keys("SAE-A", "SAE-B", 1, None, 1.0))
    ids = [d.keys[0].key_id]
    assert refused(p.b.dec_keys("SAE-C", "SAE-A", ids, 1.0), Why.UNAUTHORIZED).status == 401
    # an allowed SAE that was not named as the slave (here the master itself, at B)
    assert refused(p.b.dec_keys("SAE-B", "SAE-C", ids, 1.0), Why.UNAUTHORIZED).status == 401
    assert refused(p.a.enc_keys("SAE-C", "SAE-B", 1, None, 1.0), Why.UNAUTHORIZED).status == 401
    assert refused(p.a.enc_keys("SAE-A", "SAE-C", 1, None, 1.0), Why.BAD_REQUEST).status == 400
    ok(p.b.dec_keys("SAE-B", "SAE-A", ids, 1.0))        # the named slave still gets it


def test_one_size_per_pool():
    p = Pair()
    p.rekey(1, 0.0)
    r = refused(p.a.enc_keys("SAE-A", "SAE-B", 1, 512, 1.0), Why.BAD_REQUEST)
    assert r.status == 400 and r.details == {"qkdgate_key_size_of_pool": 256}
    assert len(ok(p.a.enc_keys("SAE-A", "SAE-B", 1, 256, 1.0)).keys[0].key) == 32


def test_no_key_before_confirmation_both_ways():
    p = Pair()
    p.rekey(1, 0.0, confirm_a=False)        # A has not seen DONE yet
    r = refused(p.a.enc_keys("SAE-A", "SAE-B", 1, None, 0.5), Why.NO_KEY)
    assert r.status == 503 and "confirmed" in r.message
    # B (after CONFIRM) serves, and A already finds B's keys (it holds the secret)
    d = ok(p.b.enc_keys("SAE-B", "SAE-A", 1, None, 0.5))
    ok(p.a.dec_keys("SAE-A", "SAE-B", [d.keys[0].key_id], 0.6))
    p.a.generation_confirmed("gw-b", 1, 0.7)
    ok(p.a.enc_keys("SAE-A", "SAE-B", 1, None, 0.8))


def test_not_within_t_of_expiry_and_erased_at_expiry():
    p = Pair(lifetime=100.0)
    p.rekey(1, 0.0)
    d = ok(p.a.enc_keys("SAE-A", "SAE-B", 1, None, 69.9))     # stop at 100 - T(30) = 70
    r = refused(p.a.enc_keys("SAE-A", "SAE-B", 1, None, 70.0), Why.NO_KEY)
    assert "expiry" in r.message
    ok(p.b.dec_keys("SAE-B", "SAE-A", [d.keys[0].key_id], 99.0))   # fetchable until expiry
    assert p.b.get_timer() == 100.0
    assert p.b.handle_timer(100.0) == [("app", 1)]
    assert p.b.pools["app"].generations == {}
    r = refused(p.a.dec_keys("SAE-A", "SAE-B", ["00000000-0000-8000-8000-000000000000"], 101.0),
                Why.NOT_FOUND)
    assert r.status == 400 and r.message == "one or more keys specified are not found on KME"


def test_rekey_between_enc_and_dec_still_delivers_within_w():
    p = Pair()
    p.rekey(1, 0.0)
    d = ok(p.a.enc_keys("SAE-A", "SAE-B", 2, None, 10.0))
    p.rekey(2, 11.0)                 # generation 2 takes over before SAE-B fetched
    new = ok(p.a.enc_keys("SAE-A", "SAE-B", 1, None, 11.5))
    assert new.provenance.generation == 2                      # never the stale one
    e = ok(p.b.dec_keys("SAE-B", "SAE-A", [d.keys[0].key_id], 11.0 + TIMES.dec_window))
    assert e.keys[0].key == d.keys[0].key and e.provenance.generation == 1
    # after W + skew the old generation is erased; the late key_ID is refused as expired
    assert ("app", 1) in p.b.handle_timer(11.0 + TIMES.dec_window + TIMES.clock_skew)
    r = refused(p.b.dec_keys("SAE-B", "SAE-A", [d.keys[1].key_id], 40.0), Why.NOT_FOUND)
    assert r.details["qkdgate_reason"] == "its generation expired: the dec_keys window ended"


def test_each_key_is_fetched_once_all_or_nothing():
    p = Pair()
    p.rekey(1, 0.0)
    d = ok(p.a.enc_keys("SAE-A", "SAE-B", 2, None, 1.0))
    ids = [k.key_id for k in d.keys]
    ok(p.b.dec_keys("SAE-B", "SAE-A", ids[:1], 1.0))
    r = refused(p.b.dec_keys("SAE-B", "SAE-A", ids, 1.0), Why.NOT_FOUND)
    assert r.details == {"key_ID": ids[0], "qkdgate_reason": "already delivered"}
    ok(p.b.dec_keys("SAE-B", "SAE-A", ids[1:], 1.0))     # the refused batch took nothing
    # our own half is never found on the dec side (a replayed enc key_ID)
    refused(p.a.dec_keys("SAE-A", "SAE-B", ids[:1], 1.0), Why.NOT_FOUND)


def test_a_restart_never_serves_a_key_twice():
    p = Pair()
    p.rekey(5, 0.0)
    before = ok(p.a.enc_keys("SAE-A", "SAE-B", 4, None, 1.0))
    pending = before.keys[3].key_id
    # gateway B restarts: its pools are memory only
    p.b = KeyService(pools("B"), TIMES, kme_id="qkdgate-b", emit=p.events.append)
    r = refused(p.b.dec_keys("SAE-B", "SAE-A", [pending], 2.0), Why.NOT_FOUND)
    assert "restart" in str(r.details["qkdgate_reason"])
    refused(p.b.enc_keys("SAE-B", "SAE-A", 1, None, 2.0), Why.NO_KEY)
    # gateway A restarts too; the fresh handshake makes a new secret (even if it
    # reused the generation number) and every key and key_ID is new
    p.a = KeyService(pools("A"), TIMES, kme_id="qkdgate-a", emit=p.events.append)
    s_a, s_b = session(5, tag=b"after restart"), session(5, tag=b"after restart")
    p.a.generation_keyed("gw-b", 5, s_a, "initiator", 3.0)
    p.b.generation_keyed("gw-a", 5, s_b, "responder", 3.0)
    p.b.generation_confirmed("gw-a", 5, 3.0)
    p.a.generation_confirmed("gw-b", 5, 3.0)
    after = ok(p.a.enc_keys("SAE-A", "SAE-B", 4, None, 4.0))
    assert {k.key_id for k in after.keys}.isdisjoint(k.key_id for k in before.keys)
    assert {k.key.reveal() for k in after.keys}.isdisjoint(k.key.reveal() for k in before.keys)


def test_hybrid_required_refuses_a_generation_without_qkd_and_never_falls_back():
    p = Pair()
    p.rekey(1, 0.0)
    d = ok(p.a.enc_keys("SAE-A", "SAE-B", 1, None, 1.0))
    p.rekey(2, 2.0, qkd=False)          # QKD lost: a PQC-only generation
    r = refused(p.a.enc_keys("SAE-A", "SAE-B", 1, None, 3.0), Why.NO_KEY)
    assert r.status == 503 and "policy hybrid-required refuses" in r.message
    assert "ML-KEM-768+X25519" in r.message
    ok(p.b.dec_keys("SAE-B", "SAE-A", [d.keys[0].key_id], 3.0))   # old keys within W still
    st = p.a.status("SAE-A", "SAE-B", 3.0)
    assert isinstance(st, dict) and st["stored_key_count"] == 0
    assert st["status_extension"]["qkdgate_serving"] is False


def test_pqc_fallback_serves_single_source_and_says_so():
    p = Pair(policy=KeyPolicy.PQC_FALLBACK)
    p.rekey(1, 0.0, qkd=False)
    d = ok(p.a.enc_keys("SAE-A", "SAE-B", 1, None, 1.0))
    assert d.single_source and d.extension()["qkdgate_single_source"] is True
    assert d.extension()["qkdgate_qkd_key_IDs"] == []


def test_peer_failure_stops_serving():
    p = Pair()
    p.rekey(1, 0.0)
    p.a.peer_failed("gw-b", 1.0)
    refused(p.a.enc_keys("SAE-A", "SAE-B", 1, None, 1.5), Why.NO_KEY)


def test_events_carry_provenance_never_keys():
    p = Pair()
    p.rekey(1, 0.0)
    d = ok(p.a.enc_keys("SAE-A", "SAE-B", 1, None, 1.0))
    p.a.enc_keys("SAE-A", "SAE-B", 1, 128, 1.0)
    served = [e for e in p.events if isinstance(e, KeysDelivered)]
    assert served[0].key_ids == (d.keys[0].key_id,) and served[0].provenance.qkd_key_ids == QKD_IDS
    assert any(isinstance(e, KeysRefused) and e.status == 400 for e in p.events)
    assert d.keys[0].key.reveal().hex() not in repr(p.events)
    snap = p.a.snapshot(1.0)
    gen = snap["pools"]["app"]["generations"][0]
    assert gen["served"] == 1 and gen["qkd_key_ids"] == list(QKD_IDS) and gen["serving"]
    assert d.keys[0].key.reveal().hex() not in repr(snap)


def test_settings_are_checked():
    with pytest.raises(Exception, match="serve_margin"):
        KeyService(pools("A"), ServiceTimes(serve_margin=10, dec_window=20), kme_id="x")
    with pytest.raises(Exception, match="unique"):
        KeyService(pools("A") * 2, TIMES, kme_id="x")
    with pytest.raises(Exception, match="key size"):
        KeyService([PoolSpec("p", "gw", "A", "B", key_size=100)], TIMES, kme_id="x")


def test_a_generation_number_told_again_with_another_secret_replaces_the_old():
    p = Pair()
    p.rekey(3, 0.0)
    old = ok(p.a.enc_keys("SAE-A", "SAE-B", 1, None, 1.0))
    # B's session was rebuilt and the number came round again with a new secret
    p.b.generation_keyed("gw-a", 3, session(3, tag=b"rebuilt"), "responder", 2.0)
    r = refused(p.b.dec_keys("SAE-B", "SAE-A", [old.keys[0].key_id], 2.0), Why.NOT_FOUND)
    assert r.status == 400
    # the same exchange told twice changes nothing
    p.a.generation_keyed("gw-b", 3, session(3), "initiator", 2.0)
    assert ok(p.a.enc_keys("SAE-A", "SAE-B", 1, None, 2.0)).keys[0].index == 2


def test_qkdgate_status_shows_pools_generations_and_qkd_key_ids():
    from qkdgate.gateway.cli.status import render
    p = Pair()
    p.rekey(4, 0.0)
    ok(p.a.enc_keys("SAE-A", "SAE-B", 2, None, 1.0))
    text = render({"gateway": "gw-a", "uptime": 5, "peers": [], "tunnels": [],
                   "key_service": p.a.snapshot(1.0)})
    assert "key service qkdgate-a: 2 keys delivered, 0 requests refused" in text
    assert "pool app: SAE-A <-> SAE-B via peer gw-b, 256 bits, hybrid-required" in text
    assert "generation 4 serving (serving): ML-KEM-768+X25519+QKD, served 2, fetched 0" in text
    assert f"QKD key_ID {QKD_IDS[0]}" in text
