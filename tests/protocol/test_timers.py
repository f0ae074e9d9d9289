"""SessionTimers: every timer of a session in one place, driven by hooks."""

from __future__ import annotations

import itertools

from qkdgate.gateway.protocol.config import SessionConfig
from qkdgate.gateway.protocol.constants import IMMEDIATE_RETRIES
from qkdgate.gateway.protocol.dos import TokenBucket
from qkdgate.gateway.protocol.exchange import Exchange
from qkdgate.gateway.protocol.timers import SessionTimers


def _timers(**kw) -> SessionTimers:
    cfg = SessionConfig(local_name="a", peer_name="b", rekey_jitter=0.0, **kw)
    return SessionTimers(cfg, lambda: 0.5, now=100.0)


def _exchange(t: SessionTimers, now: float) -> Exchange:
    ex = Exchange("initiator", 1, now, now, "test", TokenBucket(1, 1, now))
    t.exchange_started(ex, now)
    return ex


def test_retransmission_doubles_to_its_cap_and_stops_when_answered():
    t = _timers(retransmit_base=0.5, retransmit_max=2.0, exchange_timeout=30.0)
    ex = _exchange(t, 100.0)
    t.initiator_sent(ex, 100.0)
    due = []
    now = 100.0
    for _ in range(5):
        now = t.next_deadline([ex])
        assert t.retransmit_due(ex, now)
        t.retransmitted(ex, now)
        due.append(now)
    assert [round(b - a, 3) for a, b in itertools.pairwise(due)] == [1.0, 2.0, 2.0, 2.0]
    t.answer_authenticated(ex)
    assert t.next_deadline([ex]) == 130.0            # only the exchange timeout is left
    assert t.expired(ex, 130.0) and not t.expired(ex, 129.9)


def test_rekey_waits_for_a_running_exchange_and_fires_once():
    t = _timers()
    ex = _exchange(t, 100.0)
    assert t.next_deadline([ex]) == ex.deadline      # start rekey due, but busy
    assert t.next_deadline([]) == 100.0
    assert t.rekey_due(100.0) == "start" and t.rekey_due(100.0) is None


def test_failures_back_off_after_the_immediate_retries_and_success_resets():
    t = _timers(retry_base=2.0, retry_max=30.0, rekey_interval=3600.0)
    t.rekey_started()
    ats = [t.failed(1000.0, 0.0, retries=True) for _ in range(IMMEDIATE_RETRIES)]
    assert ats == [1000.0] * IMMEDIATE_RETRIES
    backoff = []
    for _ in range(4):
        t.rekey_started()
        backoff.append(t.failed(1000.0, 0.0, retries=True) - 1000.0)
    assert backoff == [16.0, 30.0, 30.0, 30.0]
    assert t.failed(1000.0, None, retries=False) == t.rekey_at   # a responder: no retry
    t.established(2000.0)
    assert t.failures == 0 and t.rekey_at == 2000.0 + 3600.0 and t.rekey_reason == "timer"


def test_a_lost_collision_keeps_a_rekey_scheduled():
    t = _timers(retry_base=2.0)
    t.rekey_started()
    assert t.rekey_at is None
    t.collision_lost(500.0)
    assert t.rekey_at == 502.0 and t.rekey_reason == "retry"
    t.collision_lost(501.0)                       # never pushes an armed timer out
    assert t.rekey_at == 502.0


# ---------------------------------------------------------------- bounds that grow with the tunnels

def _tunnels(n: int):
    from qkdgate.gateway.protocol.config import TunnelRef
    return tuple(TunnelRef(f"t{i}") for i in range(n))


def test_the_exchange_bounds_grow_with_the_tunnels_beyond_64():
    from qkdgate.gateway.protocol.timers import exchange_timeout_for, retransmit_first_for

    def cfg(n: int) -> SessionConfig:
        return SessionConfig(local_name="a", peer_name="b", tunnels=_tunnels(n))
    # docs/protocol.md 7: 30 s + 50 ms x (N - 64); 0.5 s + 2 ms x (N - 64), <= 8 s
    assert [exchange_timeout_for(cfg(n)) for n in (1, 64)] == [30.0, 30.0]
    assert round(exchange_timeout_for(cfg(1000)), 6) == 76.8
    assert round(exchange_timeout_for(cfg(4096)), 6) == 231.6
    assert [retransmit_first_for(cfg(n)) for n in (1, 64)] == [0.5, 0.5]
    assert round(retransmit_first_for(cfg(1000)), 6) == 2.372
    assert retransmit_first_for(cfg(4096)) == 8.0                 # capped at retransmit_max


def test_a_1000_tunnel_exchange_outlives_the_old_30_s_bound():
    t = _timers(tunnels=_tunnels(1000))
    ex = _exchange(t, 100.0)
    t.initiator_sent(ex, 100.0)
    assert t.next_deadline([ex]) == 100.0 + 2.372                 # first retransmission
    assert not t.expired(ex, 131.0) and not t.expired(ex, 176.7)
    assert t.expired(ex, 176.8)
    t.exchange_ended(ex)
    t.keep_done_cache(ex, 200.0)                                   # the DONE cache too
    assert not t.expired(ex, 276.7) and t.expired(ex, 276.8)
