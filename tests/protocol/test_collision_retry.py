"""The retry after a lost collision waits for the exchange that won
(docs/protocol.md 7).

The kernel series beside a CPU hog (2026-12-07) showed two generations a
second apart at every start: both gateways initiated, the slave's INIT beat
the master's exchange while the master still waited for its KME, and the
master's retry (``SessionTimers.collision_lost``, ``retry_base`` later) then
fired while it was still answering, because an answer to an epoch not yet
authenticated never held a rekey (the split-brain rule of 10.1). So the
master started generation 2 as generation 1 completed: one QKD key and one
exchange wasted, and two strongSwan re-authentications crossing."""

from protocol_harness import make_pair

from qkdgate.gateway.protocol import events as E
from qkdgate.gateway.protocol.constants import RETRY_BASE, YIELD_HOLD


def both_start_with_a_slow_master_kme():
    p = make_pair(start="both", qkd="a-master")
    p.a.auto_answer = False           # gw-a's KME answers only when the test says
    p.advance(p.now)                  # both initiate at start
    return p


def release(gw, now):
    held, gw.held = gw.held, []
    gw.auto_answer = True
    for ev in held:
        gw.answer(ev, now)


def gens(gw):
    return [(e.generation, e.role, e.reason) for e in gw.of(E.SessionEstablished)]


def test_simultaneous_starts_make_one_generation_while_the_master_kme_is_slow():
    p = both_start_with_a_slow_master_kme()
    assert p.a.session.stats["collision_lost"] == 1      # the slave's INIT won
    p.advance(p.now + 3 * RETRY_BASE)                     # the retry was due long ago
    assert p.a.session._ini is None                       # ...and waits for our own KME
    release(p.a, p.now)
    p.advance(p.now + 10.0)
    assert gens(p.a) == [(1, "responder", "peer")]
    assert gens(p.b) == [(1, "initiator", "start")]


def test_the_retry_runs_when_the_winner_goes_silent_after_our_answer():
    p = both_start_with_a_slow_master_kme()
    release(p.a, p.now)
    p.network = lambda src, dgrams: [] if src == "gw-b" else dgrams   # gw-b went away
    p.settle()
    answered = p.now
    assert p.a.session._res is not None                   # RESP sent, no CONFIRM coming
    p.advance(answered + YIELD_HOLD - 0.1)
    assert p.a.session._ini is None                       # still waiting for that CONFIRM
    p.advance(answered + YIELD_HOLD + 0.1)
    assert p.a.session._ini is not None                   # our own retry, not 30 s later
    assert p.a.session._ini.reason == "retry"


def test_a_winner_that_repeats_its_init_does_not_extend_the_hold():
    # 10.1 split brain: the node that won gets none of our RESPs (they go to
    # the other node) and repeats its INIT; a repeated INIT is no progress
    p = both_start_with_a_slow_master_kme()
    release(p.a, p.now)
    sent_init = next(d for s, d in p.log if s == "gw-b")
    p.network = lambda src, dgrams: [] if src == "gw-a" else dgrams   # our RESPs vanish
    p.settle()
    answered = p.now
    for t in (1.0, 2.0, 3.0, 3.9):                     # the INIT again, within the hold
        p.advance(answered + t)
        p.a.session.receive_datagram(sent_init, p.now)
    p.advance(answered + YIELD_HOLD + 0.1)
    assert p.a.session._ini is not None and p.a.session._ini.reason == "retry"


def test_an_answer_to_an_epoch_we_did_not_yield_to_still_never_holds_a_rekey():
    # docs/protocol.md 10.1: without a collision, an unconfirmed answer to an
    # epoch not authenticated in this run does not hold our scheduled rekey
    p = make_pair(start="b", qkd="a-master")
    p.a.auto_answer = False
    p.advance(p.now)
    res = p.a.session._res
    assert res is not None and p.a.session._yielded_to is None
    assert p.a.session._rekey_hold() is None
