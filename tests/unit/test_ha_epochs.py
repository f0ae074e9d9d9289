"""Issue 12 defect 1: epochs stay monotonic across an HA pair under any
failover timing (docs/protocol.md 4.10, 10.1), in memory with the protocol
harness (two sessions, injected clock and rng).

A gateway whose new session has an epoch below the one its peer knows it by
(the other node of its pair drew higher, or its counter went back) learns so
from the peer -- a STALE notice answering its INIT (unauthenticated, so only
believed when it echoes the INIT's nonce), or the receiver epoch of the
peer's signed INIT -- and asks its driver for a session above it
(``NeedHigherEpoch``). The peer does no KEM, signature or QKD work for the
stale INIT.
"""

from __future__ import annotations

import dataclasses
import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent.parent / "protocol"))
import pytest
from protocol_harness import assert_keys_match, make_pair, seeded

from qkdgate.gateway.daemon.journal import EPOCH_RAISE_AHEAD, Journal, JournalError
from qkdgate.gateway.protocol import events as E
from qkdgate.gateway.protocol import messages as m
from qkdgate.gateway.protocol.fragment import fragment
from qkdgate.gateway.protocol.session import PeerSession


def rebuild(p, gw, *, epoch: int, peer_floor: int = 0, start: bool = True, seed: int = 7,
            **cfg_changes):
    """What the daemon does: a fresh session (new epoch, floors from the journal)."""
    old = gw.session
    cfg = dataclasses.replace(old.config, initiate_on_start=start,
                              generation_floor=max(old.generation, old.config.generation_floor),
                              **cfg_changes)
    gw.session = PeerSession(cfg, identity=old.identity, peer_identities=old.peer_identities,
                             rng=seeded(seed), now=p.now, allocate_spi=old._allocate_spi,
                             epoch=epoch, peer_epoch_floor=peer_floor)
    gw.events.clear()


def keyed_pair(interval_b: float = 3600.0):
    p = make_pair(rekey_interval=3600.0, start="none")
    rebuild(p, p.a, epoch=1_800_000_001, start=True, seed=1)    # epochs as a journal draws
    rebuild(p, p.b, epoch=1_800_000_100, start=False, seed=2, rekey_interval=interval_b)
    p.roundtrip_until_done()
    return p


def fire(p, gw):
    """Run ``gw``'s due timers (a session sends its first INIT from one)."""
    t = gw.session.get_timer()
    if t is not None and t <= p.now:
        gw.session.handle_timer(p.now)
    gw.pump(p.now)


def test_an_init_below_the_peers_floor_gets_a_stale_notice_and_a_higher_session_keys():
    p = keyed_pair()
    known = p.a.session.epoch                   # what B authenticated: node 1's epoch
    rebuild(p, p.a, epoch=known - 3)            # node 2 takes over with a lower one
    before = dict(p.b.session.stats)
    fire(p, p.a)
    p.settle()
    st = p.b.session.stats
    assert st["stale_epoch"] == before.get("stale_epoch", 0) + 1
    assert st["stale_sent"] == 1
    # no work at the peer for the stale INIT
    for k in ("verify_ed25519", "kem_encaps", "sign_hybrid"):
        assert st[k] == before.get(k, 0), k
    assert p.a.of(E.NeedHigherEpoch) == [E.NeedHigherEpoch(known, "stale")]
    assert p.a.session.superseded_by == known
    # the driver raises its counter above and builds a fresh session: it keys
    rebuild(p, p.a, epoch=known + 2, seed=8)
    p.roundtrip_until_done()
    assert p.b.session.peer_epoch == known + 2
    assert_keys_match(p, p.a.session.generation)


def _stale_for(p, init_dgrams, *, nonce: bytes | None = None, floor: int | None = None):
    """A STALE notice as B would send for A's INIT, with fields overridden."""
    init = m.decode(_reassemble(init_dgrams))
    core = m.encode_core(m.MsgType.STALE, p.b.session.epoch, init.sender_epoch,
                         init.exchange_id,
                         {"epoch_floor": floor if floor is not None else init.sender_epoch + 10,
                          "init_nonce": nonce if nonce is not None else init["nonce"]})
    return fragment(m.seal(core, m.mac1_key("gw-a", None)), 77)


def _reassemble(dgrams):
    from qkdgate.gateway.protocol.fragment import Reassembler
    r = Reassembler()
    for d in dgrams:
        raw = r.feed(d, 0.0)
    return raw


@pytest.mark.parametrize("forged", ["nonce", "floor at our epoch"])
def test_a_stale_notice_that_does_not_echo_our_init_or_names_no_higher_epoch_is_ignored(forged):
    p = make_pair(start="none")
    rebuild(p, p.a, epoch=1_800_000_001, start=True)
    fire(p, p.a)
    init = p.a.session.datagrams_to_send(p.now)
    epoch = p.a.session.epoch
    bad = _stale_for(p, init, nonce=bytes(32)) if forged == "nonce" \
        else _stale_for(p, init, floor=epoch)
    for d in bad:
        p.a.session.receive_datagram(d, p.now)
    p.a.pump(p.now)
    assert not p.a.of(E.NeedHigherEpoch) and p.a.session.superseded_by is None
    assert p.a.session.stats["stale"] >= 1
    # the genuine one (same INIT, a higher floor) is believed
    for d in _stale_for(p, init):
        p.a.session.receive_datagram(d, p.now)
    p.a.pump(p.now)
    assert p.a.of(E.NeedHigherEpoch) == [E.NeedHigherEpoch(epoch + 10, "stale")]


def test_stale_notices_are_rate_limited_against_replayed_inits():
    p = keyed_pair()
    known = p.a.session.epoch
    rebuild(p, p.a, epoch=known - 1)
    fire(p, p.a)
    init = p.a.session.datagrams_to_send(p.now)
    for _ in range(20):                              # one replayed INIT, 20 times at once
        for d in init:
            p.b.session.receive_datagram(d, p.now)
    assert p.b.session.stats["stale_epoch"] == 20
    assert p.b.session.stats["stale_sent"] == 1      # at most one per retransmit_base / 2
    assert len(p.b.session.datagrams_to_send(p.now)) == 1


def test_the_peers_signed_init_naming_a_higher_epoch_supersedes_without_an_answer():
    """Node 2 takes over below node 1's epoch and waits (no INIT of its
    own); the peer's rekey INIT names the site by node 1's epoch. Node 2
    does no KEM work, sends no RESP (the peer would drop it as stale) and
    asks for a higher session."""
    p = keyed_pair()
    known = p.a.session.epoch
    rebuild(p, p.a, epoch=known - 5, start=False)
    p.b.session.initiate_rekey(p.now, "operator")
    p.settle()
    assert p.a.of(E.NeedHigherEpoch) == [E.NeedHigherEpoch(known, "init")]
    assert p.a.session.stats["kem_encaps"] == 0
    assert p.a.session.stats["stale_own_epoch"] == 1
    rebuild(p, p.a, epoch=known + 1, start=False, seed=10)
    p.advance(p.now + 60)                       # the peer's exchange retries
    assert p.b.session.peer_epoch == known + 1
    assert p.a.session.generation == p.b.session.generation


def test_a_resp_from_below_the_peers_floor_is_dropped_not_a_local_bug():
    """Before: the RESP passed its checks and ``_peer_authenticated`` raised
    LocalProtocolError (a lower epoch than the floor), poisoning B's session."""
    p = make_pair(start="none")
    rebuild(p, p.b, epoch=1_800_000_100, start=True)
    fire(p, p.b)
    p.transfer(p.b, p.a)
    p.a.pump(p.now)
    p.b.session._peer_floor = p.a.session.epoch + 1    # B authenticated A's sibling since
    p.transfer(p.a, p.b)
    p.b.pump(p.now)
    assert not p.b.session.failed
    assert p.b.session.stats["stale_epoch"] == 1


def test_the_journal_raises_its_epoch_counter_at_most_a_day_past_its_clock(tmp_path):
    now = [1_800_000_000.0]
    j = Journal.open(str(tmp_path / "s"), now=lambda: now[0])
    first = j.next_local_epoch()
    j.raise_local_epoch(first + 100)
    assert j.next_local_epoch() == first + 101
    j.raise_local_epoch(first)                      # below: a no-op
    assert j.local_epoch == first + 101
    with pytest.raises(JournalError):
        j.raise_local_epoch(int(now[0]) + EPOCH_RAISE_AHEAD + 1)   # a forged notice
    assert j.local_epoch == first + 101
    j.close()
    j = Journal.open(str(tmp_path / "s"), now=lambda: now[0])
    assert j.next_local_epoch() == first + 102      # durable


# ------------------------------------------------------------------ split brain
HOLD_BOUND = 5.0    # simulated seconds: the peer's rekeys complete within this (defect 2)


class SplitBrain:
    """Node 1 (``p.a``) keyed with the peer (``p.b``); node 2 (same identity,
    a higher epoch, its own rng and SPIs) goes active too. The peer hears both
    nodes; its datagrams reach node 1 only (it pins one address). The clock is
    injected: ``run`` advances it in 50 ms steps, firing every due timer."""

    def __init__(self, interval_b: float = 3600.0):
        from protocol_harness import Gateway
        self.p = p = keyed_pair(interval_b)
        a = p.a.session
        counter, an = iter(range(0xC8000100, 0xCFFFFFFF)), iter(range(1 << 30))

        def alloc(tid: str) -> int:
            return next(an) % 4 if tid.startswith("m") else next(counter)
        cfg = dataclasses.replace(a.config, initiate_on_start=True,
                                  generation_floor=a.generation)
        s2 = PeerSession(cfg, identity=a.identity, peer_identities=a.peer_identities,
                         rng=seeded(4242), now=p.now,
                         allocate_spi=alloc,
                         epoch=a.epoch + 11, peer_epoch_floor=p.b.session.epoch)
        self.a2 = Gateway("gw-a2", s2, p.a.link, p.a.sae)

    def step(self):
        p, a2 = self.p, self.a2
        for gw in (p.a, p.b, a2):
            t = gw.session.get_timer()
            if t is not None and t <= p.now:
                gw.session.handle_timer(p.now)
            gw.pump(p.now)
        for _ in range(20):
            moved = 0
            for src, dst in ((p.a, p.b), (a2, p.b), (p.b, p.a)):
                moved += p.transfer(src, dst)
            moved += p.a.pump(p.now) + p.b.pump(p.now) + a2.pump(p.now)
            if not moved:
                break

    def run_timers_until(self, done, limit):
        """Event-driven: the clock jumps to the earliest timer any session
        asks for (``get_timer``), so a timer a session fails to ask for
        never fires."""
        p, start = self.p, self.p.now
        while not done():
            timers = [t for gw in (p.a, p.b, self.a2)
                      if (t := gw.session.get_timer()) is not None]
            assert timers and min(timers) - start < limit, "not within the bound"
            p.now = max(p.now, min(timers))
            self.step()
        return p.now - start

    def run_until(self, done, limit):
        start = self.p.now
        while not done():
            assert self.p.now - start < limit, "not within the bound"
            self.p.now += 0.05
            self.step()
        return self.p.now - start


@pytest.mark.parametrize("who", ["peer", "node 1"])
def test_split_brain_in_memory_rekeys_with_the_reached_node_stay_within_the_bound(who):
    sb = SplitBrain()
    p, a2 = sb.p, sb.a2
    b = p.b.session
    sb.run_until(lambda: b.stats["kem_encaps"] >= 2, 5)    # node 2's INIT answered
    took = []
    for _ in range(3):
        gen = b.generation
        (b if who == "peer" else p.a.session).initiate_rekey(p.now, "operator")
        took.append(sb.run_until(lambda gen=gen: b.generation > gen
                                 and p.a.session.generation == b.generation, 60))
        for _ in range(40):                    # 2 s of node 2 retransmitting
            p.now += 0.05
            sb.step()
    assert max(took) < HOLD_BOUND, took
    assert a2.session.stats["retransmit"] >= 2 and not a2.of(E.SessionEstablished)
    assert b.peer_epoch == p.a.session.epoch                 # one node: node 1
    # each generation's inbound SPIs at the peer are fresh: none reused
    spis = [spi for keys in p.b.inbound.values() for spi, _ in keys.values()
            if isinstance(spi, int) and spi >= 0x100]
    assert len(spis) == len(set(spis))
    assert_keys_match(p, b.generation)


def test_split_brain_the_peers_scheduled_rekey_fires_on_its_own_timer():
    """The peer's rekey timer is not hidden behind node 2's unconfirmed
    exchange: before, ``get_timer`` left out a due rekey while any exchange
    ran, so the peer rekeyed only when node 2's exchange timed out (30 s)."""
    sb = SplitBrain(interval_b=20.0)          # node 1 rekeys hourly, the peer every 20 s
    p, b = sb.p, sb.p.b.session
    sb.run_until(lambda: b.stats["kem_encaps"] >= 2, 5)    # node 2's INIT answered
    for _ in range(3):
        gen, since = b.generation, b.established_at
        sb.run_timers_until(lambda gen=gen: b.generation > gen
                            and p.a.session.generation == b.generation, 60)
        assert b.established_at - since <= 20.0 + HOLD_BOUND, b.established_at - since
    assert sb.a2.session.stats["retransmit"] >= 2 and not sb.a2.of(E.SessionEstablished)
    assert b.peer_epoch == p.a.session.epoch
