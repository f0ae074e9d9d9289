"""Loss, duplication, reordering, replay and partitions."""

from __future__ import annotations

import itertools
import random

import pytest
from protocol_harness import assert_keys_match, make_pair

from qkdgate.gateway.protocol import events as E
from qkdgate.gateway.protocol.fragment import Reassembler
from qkdgate.gateway.protocol.messages import MsgType, decode


def group(dgrams: list[bytes]) -> list[tuple[MsgType, list[bytes]]]:
    """Datagrams grouped by message, with the message type."""
    r, out, cur = Reassembler(), [], []
    for d in dgrams:
        cur.append(d)
        raw = r.feed(d, 0.0)
        if raw is not None:
            out.append((decode(raw).type, cur))
            cur = []
    return out


def drop_first(mtype: MsgType, times: int = 1):
    left = {"n": times}

    def net(src: str, dgrams: list[bytes]) -> list[bytes]:
        out = []
        for t, ds in group(dgrams):
            if t == mtype and left["n"] > 0:
                left["n"] -= 1
                continue
            out.extend(ds)
        return out
    return net


@pytest.mark.parametrize("mtype", [MsgType.INIT, MsgType.RESP, MsgType.CONFIRM, MsgType.DONE])
@pytest.mark.parametrize("times", [1, 3])
def test_loss_of_each_message_is_repaired(mtype, times):
    p = make_pair()
    p.network = drop_first(mtype, times)
    p.roundtrip_until_done()
    assert_keys_match(p, 1)
    assert p.a.session.stats["retransmit"] >= times
    # the responder never redid expensive work for a retransmission
    assert p.b.session.stats["kem_encaps"] == 1
    assert p.b.session.stats["sign_hybrid"] == 1
    assert p.a.link.delivered == 1       # one QKD key, fetched once by the slave
    if mtype == MsgType.DONE:            # duplicate CONFIRMs got the cached DONE
        assert p.b.session.stats["duplicate"] >= times
        assert p.b.session.stats["verify_hybrid"] == 1


def test_duplication_of_every_datagram():
    p = make_pair()
    p.network = lambda src, ds: [d for d in ds for _ in range(3)]
    p.roundtrip_until_done()
    assert_keys_match(p, 1)
    assert len(p.a.of(E.SessionEstablished)) == len(p.b.of(E.SessionEstablished)) == 1
    for gw in (p.a, p.b):
        assert gw.session.stats["sign_hybrid"] == 1
    assert p.b.session.stats["kem_encaps"] == 1


def test_reordering_of_fragments_and_messages():
    rnd = random.Random(5)

    def net(src: str, ds: list[bytes]) -> list[bytes]:
        ds = list(ds)
        rnd.shuffle(ds)
        return ds
    p = make_pair()
    p.network = net
    p.roundtrip_until_done()
    assert_keys_match(p, 1)


def test_replay_of_a_whole_old_exchange_changes_nothing():
    p = make_pair(rekey_interval=50.0)
    p.roundtrip_until_done()
    old = list(p.log)
    p.roundtrip_until_done()
    assert p.a.session.generation == 2
    before_a, before_b = dict(p.a.session.stats), dict(p.b.session.stats)
    n_events = len(p.trace)
    for src, d in old:
        (p.b if src == "gw-a" else p.a).session.receive_datagram(d, p.now)
    p.a.pump(p.now)
    p.b.pump(p.now)
    assert p.a.session.generation == p.b.session.generation == 2
    assert p.a.session.datagrams_to_send(p.now) == []
    assert p.b.session.datagrams_to_send(p.now) == []
    assert [e for _, e in p.trace[n_events:] if not isinstance(e, E.ProtocolViolation)] == []
    for gw, before in ((p.a, before_a), (p.b, before_b)):
        for costly in ("verify_hybrid", "verify_ed25519", "kem_encaps", "kem_decaps",
                       "sign_hybrid"):
            assert gw.session.stats[costly] == before.get(costly, 0), (gw.name, costly)
    assert p.b.session.stats["stale"] > before_b.get("stale", 0)


def test_partition_then_reconverge_without_operator():
    p = make_pair(rekey_interval=30.0, exchange_timeout=10.0, retry_base=2.0, retry_max=20.0)
    p.roundtrip_until_done()
    cut = {"on": True}
    p.network = lambda src, ds: [] if cut["on"] else ds
    p.advance(p.now + 120)
    fails = p.a.of(E.RekeyFailed) + p.b.of(E.RekeyFailed)
    assert len(fails) >= 3 and all(f.retry_at is not None for f in p.a.of(E.RekeyFailed))
    # backoff: gaps between retries grow up to the cap
    assert p.a.session.generation == p.b.session.generation == 1   # old keys stay
    cut["on"] = False
    p.roundtrip_until_done(timeout=60)
    assert p.a.session.generation == p.b.session.generation
    gen = p.a.session.generation
    assert gen > 1
    assert_keys_match(p, gen)


def test_retransmission_backs_off_exponentially():
    p = make_pair(retransmit_base=0.5, retransmit_max=4.0, exchange_timeout=30.0)
    p.network = lambda src, ds: [] if src == "gw-a" else ds
    sent_at = []
    orig = p.a.session._send

    def spy(wire):
        sent_at.append(p.now)
        orig(wire)
    p.a.session._send = spy
    p.advance(p.now + 12)
    gaps = [round(b - a, 3) for a, b in itertools.pairwise(sent_at)]
    assert gaps[:5] == [0.5, 1.0, 2.0, 4.0, 4.0]
