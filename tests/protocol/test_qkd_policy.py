"""QKD unavailable under each policy flag; lost dec_keys responses; install failures."""

from __future__ import annotations

import pytest
from protocol_harness import assert_keys_match, make_pair

from qkdgate.errors import KeyNotFound, KeySourceTimeout, KeyUnavailable
from qkdgate.gateway.protocol import events as E


@pytest.mark.parametrize("qkd", ["a-master", "b-master"])
def test_qkd_down_policy_requires_qkd_nothing_installed_then_recovers(qkd):
    p = make_pair(qkd=qkd, allow_pqc=False, retry_base=2.0)
    p.a.link.down = True
    p.advance(p.now + 10)
    assert not p.a.of(E.SessionEstablished) and not p.b.of(E.SessionEstablished)
    assert p.a.inbound == {} and p.b.inbound == {}
    fails = p.a.of(E.RekeyFailed)
    assert fails and all(f.retry_at is not None for f in fails)
    assert any("QKD" in f.reason for f in fails)
    # typed cause: a qkd-mandatory tunnel blocks on either side's QKD failure
    causes = {f.cause for f in fails + p.b.of(E.RekeyFailed)}
    assert causes and causes <= {E.FailureCause.QKD_LOCAL, E.FailureCause.QKD_PEER}
    assert all(f.qkd_caused for f in fails)
    p.a.link.down = False
    p.roundtrip_until_done(timeout=60)
    est = p.a.of(E.SessionEstablished)[0]
    assert est.provenance.qkd and not p.a.of(E.QkdFallback)


@pytest.mark.parametrize("qkd", ["a-master", "b-master"])
def test_qkd_down_fallback_allowed_pqc_only_then_recovered(qkd):
    p = make_pair(qkd=qkd, allow_pqc=True, rekey_interval=60.0)
    p.a.link.down = True
    p.roundtrip_until_done()
    for gw in (p.a, p.b):
        est = gw.of(E.SessionEstablished)[0]
        assert not est.provenance.qkd and est.qkd_fallback
        assert len(gw.of(E.QkdFallback)) == 1
    assert_keys_match(p, 1)
    p.a.link.down = False
    p.roundtrip_until_done()
    for gw in (p.a, p.b):
        assert gw.of(E.SessionEstablished)[1].provenance.qkd
        assert len(gw.of(E.QkdRecovered)) == 1
    assert_keys_match(p, 2)


def test_fallback_needs_both_sides_to_allow_it():
    p = make_pair(allow_pqc=True)
    import dataclasses
    p.b.session.config = dataclasses.replace(p.b.session.config, allow_pqc_only=False)
    p.a.link.down = True
    p.advance(p.now + 10)
    assert not p.b.of(E.SessionEstablished) and p.b.inbound == {}
    assert "policy requires QKD" in p.b.of(E.RekeyFailed)[0].reason
    assert p.b.of(E.RekeyFailed)[0].cause is E.FailureCause.POLICY
    assert "POLICY" in p.a.of(E.RekeyFailed)[0].reason
    assert p.a.of(E.RekeyFailed)[0].cause is E.FailureCause.PEER_ABORT


@pytest.mark.parametrize("allow", [True, False])
def test_slave_kme_failure(allow):
    """Master got keys, the slave's own KME fails (not a lost key)."""
    p = make_pair(allow_pqc=allow)
    p.b.qkd_error = KeySourceTimeout("KME did not answer")
    if allow:
        p.roundtrip_until_done()
        est = p.b.of(E.SessionEstablished)[0]
        assert not est.provenance.qkd and "KME timeout" in est.qkd_fallback
        assert_keys_match(p, 1)
    else:
        p.advance(p.now + 1)
        assert "QKD_UNAVAILABLE" in p.a.of(E.RekeyFailed)[0].reason
        assert p.a.of(E.RekeyFailed)[0].cause is E.FailureCause.QKD_PEER   # signed ABORT
        assert p.b.of(E.RekeyFailed)[0].cause is E.FailureCause.QKD_LOCAL
        assert p.a.inbound == {} and p.b.inbound == {}
        p.roundtrip_until_done()    # the retry finds the slave's KME back
        assert p.a.of(E.SessionEstablished)[0].provenance.qkd


@pytest.mark.parametrize("qkd", ["a-master", "b-master"])
def test_lost_dec_keys_response_restarts_with_new_keys(qkd):
    """The slave's dec_keys succeeded at the KME but the answer was lost:
    retrying says KeyNotFound. The key is gone, so the exchange aborts and a
    new one runs with NEW keys; the lost key is used by nobody."""
    p = make_pair(qkd=qkd)
    slave = p.b if qkd == "a-master" else p.a
    master = p.other(slave)
    slave.qkd_error = KeyNotFound("one or more keys specified are not found on KME")
    p.roundtrip_until_done()
    first_key = next(iter(master.of(E.NeedQkdKeys)))
    lost_ids = next(e.key_ids for e in slave.of(E.NeedQkdKeys))
    est = p.a.of(E.SessionEstablished)
    assert len(est) == 1 and est[0].provenance.qkd
    assert lost_ids[0] not in est[0].provenance.qkd_key_ids
    assert len(master.of(E.NeedQkdKeys)) == 2 and first_key.role == "master"
    assert any("QKD key lost" in f.reason or "QKD_KEY_LOST" in f.reason
               for f in p.a.of(E.RekeyFailed))
    assert_keys_match(p, est[0].generation)


def test_master_enc_keys_fails_hybrid_required():
    p = make_pair(allow_pqc=False)
    p.a.qkd_error = KeyUnavailable("pool empty")
    p.advance(p.now + 0.1)
    assert p.a.of(E.RekeyFailed) and p.a.session.datagrams_to_send(p.now) == []
    assert p.a.of(E.RekeyFailed)[0].cause is E.FailureCause.QKD_LOCAL
    assert p.b.session.stats["kem_encaps"] == 0   # nothing was even sent


@pytest.mark.parametrize("who", ["initiator", "responder"])
def test_install_failure_aborts_and_retries(who):
    p = make_pair(retry_base=1.0)
    gw = p.a if who == "initiator" else p.b
    gw.install_error = True
    p.advance(p.now + 0.5)
    assert gw.of(E.RekeyFailed) and "installing SAs failed" in gw.of(E.RekeyFailed)[0].reason
    assert gw.of(E.RekeyFailed)[0].cause is E.FailureCause.INSTALL
    assert p.other(gw).of(E.RekeyFailed)           # the peer was told (ABORT)
    assert p.other(gw).of(E.RekeyFailed)[0].cause is E.FailureCause.PEER_ABORT
    assert not p.a.outbound and not p.b.outbound   # nobody switched
    gw.install_error = False
    p.roundtrip_until_done()
    gen = p.a.session.generation
    assert_keys_match(p, gen)


def test_slow_kme_answer_after_exchange_timeout_is_ignored():
    p = make_pair(exchange_timeout=5.0)
    p.b.auto_answer = False
    p.advance(p.now + 6)
    assert p.b.held and p.b.of(E.RekeyFailed)
    held = p.b.held.pop(0)
    p.b.auto_answer = True
    p.b.answer(held, p.now)                # late answer: ignored, not a crash
    assert p.b.session.stats["stale_answer"] == 1
    p.roundtrip_until_done()
    assert_keys_match(p, p.a.session.generation)


def test_responder_outbound_failure_is_retried_by_the_responder_soon():
    """R installed inbound and sent DONE (so I switched), then R's outbound
    install failed: R itself rekeys after retry_base, not after a whole
    rekey interval, so its direction is not left on the old generation."""
    p = make_pair(retry_base=1.0, rekey_interval=3600.0)
    p.b.fail_outbound = True
    p.advance(p.now + 0.1)
    fail = p.b.of(E.RekeyFailed)[0]
    assert p.a.current_out == 1 and p.b.current_out is None
    assert fail.retry_at is not None and fail.retry_at - p.now <= 1.1
    p.b.fail_outbound = False
    p.roundtrip_until_done(timeout=5)
    assert p.b.of(E.SessionEstablished)[-1].role == "initiator"
    gen = p.b.session.generation
    assert gen == 2 and p.a.current_out == p.b.current_out == 2
    assert_keys_match(p, 2)


@pytest.mark.parametrize("qkd", ["a-master", "b-master"])
def test_mismatched_qkd_key_is_caught_by_key_confirmation(qkd):
    """The slave's KME returns other bits under the same key_ID: signatures
    verify, the confirmation tag does not, and nobody installs anything."""
    p = make_pair(qkd=qkd, retry_base=50.0)
    slave = p.b if qkd == "a-master" else p.a
    slave.corrupt_qkd = True
    p.advance(p.now + 1)
    assert p.a.inbound == {} and p.b.inbound == {}
    assert not p.a.outbound and not p.b.outbound
    reasons = " ".join(f.reason for f in p.a.of(E.RekeyFailed) + p.b.of(E.RekeyFailed))
    assert "key confirmation" in reasons
    slave.corrupt_qkd = False
    p.roundtrip_until_done(timeout=120)
    assert_keys_match(p, p.a.session.generation)


@pytest.mark.parametrize("who", ["a", "b"])
def test_spi_allocation_failure_fails_the_exchange_cleanly(who):
    from qkdgate.errors import TunnelError
    p = make_pair(retry_base=1.0)
    gw = p.a if who == "a" else p.b
    real = gw.session._allocate_spi
    calls = {"n": 0}

    def flaky(tid):
        calls["n"] += 1
        if calls["n"] == 1:
            raise TunnelError("allocate_spi", 105, "no SPI left in range")
        return real(tid)
    gw.session._allocate_spi = flaky
    p.advance(p.now + 0.1)
    assert "SPI allocation failed" in gw.of(E.RekeyFailed)[0].reason
    p.roundtrip_until_done(timeout=10)
    assert_keys_match(p, p.a.session.generation)


def test_signed_resp_without_qkd_against_policy_is_a_peer_qkd_failure():
    """The responder answers PQC-only (its KME failed) although our policy,
    tightened since the INIT left, requires QKD: only after the RESP's
    signature verified does the exchange fail, with cause QKD_PEER."""
    import dataclasses
    p = make_pair(allow_pqc=True)
    p.b.qkd_error = KeyUnavailable("pool empty")       # b is the slave here
    p.a.session.handle_timer(p.now)
    p.a.pump(p.now)                                    # a's KME answers, INIT queued
    p.a.session.config = dataclasses.replace(p.a.session.config, allow_pqc_only=False)
    p.advance(p.now + 1)
    fails = p.a.of(E.RekeyFailed)
    assert fails and fails[0].cause is E.FailureCause.QKD_PEER and fails[0].qkd_caused
    assert not p.a.of(E.SessionEstablished) and p.a.inbound == {}
    assert p.b.of(E.RekeyFailed)[0].cause is E.FailureCause.PEER_ABORT   # told by ABORT
