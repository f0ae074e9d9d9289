"""Several QKD key sources per peer in the protocol (issue 13 item 2):
key_IDs travel with their source index (docs/protocol.md 4.2, 9.1), each side
fetches each key from its own corresponding source, the combiner binds
every key's source and length (docs/keymix.md 4.5)."""

from __future__ import annotations

import pytest
from protocol_harness import assert_keys_match, make_pair, run_sync, seeded

from qkdgate.errors import KeySourceError, KeyUnavailable, LocalProtocolError, RemoteProtocolError
from qkdgate.gateway.protocol import events as E
from qkdgate.gateway.protocol import messages as m
from qkdgate.testing.fakes import FakeQkdLink

BITS = (256, 512)


def multi_pair(*, k: int = 0, bits=BITS, down=(), b_multi: bool = True, allow_pqc=False,
               qkd: str = "a-master"):
    """A pair whose QKD input comes from len(bits) independent links."""
    cfg_a = {"qkd_sources": tuple(bits), "qkd_required": k}
    p = make_pair(qkd=qkd, allow_pqc=allow_pqc, **cfg_a)
    if not b_multi:
        import dataclasses
        p.b.session.config = dataclasses.replace(p.b.session.config, qkd_sources=(),
                                                 qkd_required=0)
    masters = ("SAE-A", "SAE-B") if qkd == "a-master" else ("SAE-B", "SAE-A")
    links = [FakeQkdLink(*masters, rng=seeded(200 + i)) for i in range(len(bits))]
    for i in down:
        links[i].down = True
    for gw in (p.a, p.b):
        gw.answer = _answering(gw, links, bits)
    return p, links


def _answering(gw, links, bits):
    plain = gw.answer

    def answer(ev, now):
        if not isinstance(ev, E.NeedQkdKeys) or not gw.session.config.qkd_multi:
            return plain(ev, now)
        s = gw.session
        keys, sources = [], []
        try:
            if ev.role == "master":     # one key from every source that delivers
                for i, link in enumerate(links):
                    try:
                        keys += run_sync(link.source(gw.sae).get_new_keys(
                            ev.peer_sae_id, 1, bits[i]))
                        sources.append(i)
                    except KeyUnavailable:
                        pass
                if len(keys) < s.config.qkd_k:
                    raise KeyUnavailable("too few sources")
            else:                        # each key_ID from the source the master named
                for i, kid in zip(ev.sources, ev.key_ids, strict=True):
                    keys += run_sync(links[i].source(gw.sae).get_keys_by_id(
                        ev.peer_sae_id, [kid]))
                    sources.append(i)
        except KeySourceError as exc:
            s.qkd_failed(ev.request_id, exc, now)
            return None
        s.provide_qkd_keys(ev.request_id, keys, now, sources)
        return None
    return answer


def _sent(p, mtype):
    from qkdgate.gateway.protocol.fragment import Reassembler
    r = Reassembler()
    out = [r.feed(d, 0.0) for _, d in p.log]
    return [msg for msg in (m.decode(raw) for raw in out if raw is not None)
            if msg.type == mtype]


@pytest.mark.parametrize("qkd", ["a-master", "b-master"])
def test_all_of_two_sources_both_keys_mixed_and_recorded(qkd):
    p, links = multi_pair(qkd=qkd)
    p.roundtrip_until_done()
    assert_keys_match(p, 1)
    for gw in (p.a, p.b):
        prov = gw.of(E.SessionEstablished)[0].provenance
        assert prov.qkd_sources == (0, 1)
        assert len(prov.qkd_key_ids) == 2
        assert [len(k) for k in p.a.session.provenance.qkd_key_ids] == [36, 36]
        assert gw.session.snapshot(p.now)["inputs"]["qkd_sources"] == [0, 1]
    # the key_IDs went out in the sourced form, in configuration order
    carrier = _sent(p, m.MsgType.INIT if qkd == "a-master" else m.MsgType.RESP)[0]
    assert carrier["key_sources"] == (0, 1)
    assert carrier["key_ids"] == prov.qkd_key_ids


def test_k_of_n_uses_the_keys_that_arrived_and_says_which():
    p, links = multi_pair(k=1, down=(0,))
    p.roundtrip_until_done()
    assert_keys_match(p, 1)
    for gw in (p.a, p.b):
        prov = gw.of(E.SessionEstablished)[0].provenance
        assert prov.qkd_sources == (1,) and len(prov.qkd_key_ids) == 1
        assert not gw.of(E.QkdFallback)
    assert links[1].delivered and not links[0].delivered


def test_fewer_than_k_falls_back_where_policy_allows():
    p, _ = multi_pair(down=(1,), allow_pqc=True)
    p.roundtrip_until_done()
    assert_keys_match(p, 1)
    for gw in (p.a, p.b):
        est = gw.of(E.SessionEstablished)[0]
        assert not est.provenance.qkd and est.qkd_fallback
        assert len(gw.of(E.QkdFallback)) == 1


def test_fewer_than_k_blocks_where_policy_requires_qkd():
    p, _ = multi_pair(down=(1,), allow_pqc=False)
    p.advance(p.now + 10)
    assert not p.a.of(E.SessionEstablished) and p.a.inbound == {} and p.b.inbound == {}
    assert p.a.of(E.RekeyFailed)[0].cause is E.FailureCause.QKD_LOCAL


def test_a_master_answering_with_fewer_than_k_keys_is_refused_by_the_session():
    p = make_pair(qkd_sources=BITS, qkd_required=2)
    p.a.auto_answer = False
    p.advance(p.now + 1)
    (ev,) = p.a.held
    link = FakeQkdLink("SAE-A", "SAE-B", rng=seeded(5))
    keys = run_sync(link.source("SAE-A").get_new_keys("SAE-B", 1, 256))
    p.a.session.provide_qkd_keys(ev.request_id, keys, p.now, (0,))
    p.a.pump(p.now)
    fail = p.a.of(E.RekeyFailed)[0]
    assert "KME protocol error" in fail.reason and fail.cause is E.FailureCause.QKD_LOCAL


@pytest.mark.parametrize(("sources", "bits"), [
    ((), 256),            # no sources given with several configured
    ((1,), 256),          # source #1 asks 512 bits
    ((0, 0), 256),        # not increasing
    ((2,), 256),          # no such source
])
def test_session_checks_each_keys_source_and_length(sources, bits):
    p = make_pair(qkd_sources=BITS, qkd_required=1)
    p.a.auto_answer = False
    p.advance(p.now + 1)
    (ev,) = p.a.held
    link = FakeQkdLink("SAE-A", "SAE-B", rng=seeded(5))
    keys = run_sync(link.source("SAE-A").get_new_keys("SAE-B", max(1, len(sources)), bits))
    p.a.session.provide_qkd_keys(ev.request_id, keys, p.now, sources)
    p.a.pump(p.now)
    assert p.a.of(E.RekeyFailed) and not p.a.of(E.SessionEstablished)


def test_single_source_peer_refuses_sourced_key_ids():
    p, _ = multi_pair(b_multi=False)
    p.advance(p.now + 5)
    assert not p.b.of(E.SessionEstablished) and p.b.inbound == {}
    fail = p.b.of(E.RekeyFailed)[0]
    assert fail.cause is E.FailureCause.POLICY and "several QKD sources" in fail.reason


def test_slave_refuses_fewer_sources_than_its_rule():
    import dataclasses
    p, _ = multi_pair(k=1, down=(0,))
    p.b.session.config = dataclasses.replace(p.b.session.config, qkd_required=2)
    p.advance(p.now + 5)
    assert not p.b.of(E.SessionEstablished)
    assert "needs 2 of 2" in p.b.of(E.RekeyFailed)[0].reason


# ------------------------------------------------------------------ codec

def _init_values(ids, sources):
    return {"generation_min": 1, "nonce": bytes(32), "kem_id": 1, "kem_public": b"k",
            "x25519_public": b"", "qkd_mode": m.QkdMode.KEYS, "qkd_reason": 0,
            "qkd_flags": 0, "key_ids": ids, "key_sources": sources, "spis": (),
            "signer_id": bytes(8), "ed25519_sig": bytes(64)}


IDS = ("2d9c0b4e-5a37-4b5e-9a3e-3f1e4c2b7a10", "7f6e5d4c-3b2a-4190-8f7e-6d5c4b3a2910")


def test_sourced_key_ids_wire_form_and_round_trip():
    core = m.encode_core(m.MsgType.INIT, 1, 0, 1, _init_values(IDS, (0, 3)))
    msg = m.decode(m.seal(core, bytes(32)))
    assert msg["key_ids"] == IDS and msg["key_sources"] == (0, 3)
    raw = core[msg.offsets["key_ids"]:msg.offsets["spis"]]
    # 0x80 | count, then (u8 index || 16-byte UUID) per key_ID (docs/protocol.md 4.2, 9.1)
    assert raw.hex() == ("82" + "00" + IDS[0].replace("-", "")
                         + "03" + IDS[1].replace("-", ""))
    plain = m.decode(m.seal(m.encode_core(m.MsgType.INIT, 1, 0, 1, _init_values(IDS, ())),
                            bytes(32)))
    assert plain["key_ids"] == IDS and plain["key_sources"] == ()


@pytest.mark.parametrize(("field", "why"), [
    ("80", "sourced key IDs form without key IDs"),
    ("82" + "01" + IDS[0].replace("-", "") + "01" + IDS[1].replace("-", ""), "increase"),
    ("82" + "01" + IDS[0].replace("-", "") + "00" + IDS[1].replace("-", ""), "increase"),
    ("81" + "10" + IDS[0].replace("-", ""), "below 16"),
    ("91", "17 key IDs"),
])
def test_decoder_refuses_malformed_sourced_key_ids(field, why):
    core = m.encode_core(m.MsgType.INIT, 1, 0, 1, _init_values(IDS, (0, 1)))
    msg = m.decode(m.seal(core, bytes(32)))
    bad = core[:msg.offsets["key_ids"]] + bytes.fromhex(field) + core[msg.offsets["spis"]:]
    with pytest.raises(RemoteProtocolError, match=why):
        m.decode(m.seal(bad, bytes(32)))


@pytest.mark.parametrize("sources", [(1, 0), (0,), (0, 16)])
def test_encoder_refuses_inconsistent_sources(sources):
    with pytest.raises(LocalProtocolError):
        m.encode_core(m.MsgType.INIT, 1, 0, 1, _init_values(IDS, sources))
