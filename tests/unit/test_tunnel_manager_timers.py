"""TunnelTimers, the one owner of a tunnel generation's deadlines: which
deadline passes when, and in which order the tunnel must act on them."""

import pytest

from qkdgate.tunnels.timers import (
    HARD_MARGIN_SECONDS,
    RETIRE_GRACE_SECONDS,
    Expiry,
    Lifetimes,
    TunnelTimers,
)

LT = Lifetimes(soft_seconds=50, hard_seconds=60, grace_seconds=2)


def test_one_grace_value_default():
    assert Lifetimes().grace_seconds == RETIRE_GRACE_SECONDS == 5.0


def test_superseded_generation_retires_one_grace_after_the_switch():
    t = TunnelTimers(LT)
    t.generation_created(1, 0.0)
    t.generation_switched(1, 0.0)
    t.generation_created(2, 30.0)
    assert t.next_deadline() == 50.0                 # gen 1 soft lifetime
    t.generation_switched(2, 31.0)
    assert t.retire_at(1) == 33.0
    assert t.expired(32.9) == []
    assert t.expired(33.0) == [(Expiry.RETIRE, 1)]
    t.generation_dropped(1)
    assert t.next_deadline() == 80.0                 # gen 2 soft: 30 + 50


def test_soft_fires_once_until_the_next_switch_and_hard_wins_over_soft():
    t = TunnelTimers(LT)
    t.generation_created(1, 0.0)
    t.generation_switched(1, 0.0)
    assert t.expired(50.0) == [(Expiry.SOFT, 1)]
    t.rekey_requested(50.0)
    assert t.expired(55.0) == [] and t.next_deadline() == 59.0   # hard 60 less the margin
    assert t.expired(58.9) == [] and t.hard_due(58.9) == []
    assert t.expired(59.0) == [(Expiry.HARD_ACTIVE, 1)] and t.hard_due(59.0) == [1]
    u = TunnelTimers(LT)
    u.generation_created(1, 0.0)
    u.generation_switched(1, 0.0)
    assert u.expired(61.0) == [(Expiry.HARD_ACTIVE, 1)]   # not also SOFT


def test_inbound_only_generation_ends_at_its_hard_lifetime():
    t = TunnelTimers(LT)
    t.generation_created(4, 10.0)
    assert t.next_deadline() == 69.0
    assert t.expired(69.0) == [(Expiry.HARD_UNUSED, 4)]


def test_adopted_generation_lives_one_hard_lifetime_from_adoption_and_reload_moves_deadlines():
    t = TunnelTimers(LT)
    t.generation_adopted(0, 100.0, sending=True)
    assert t.active == 0 and t.hard_at(0) == 160.0
    t.generation_created(1, 0.0)
    t.lifetimes = Lifetimes(soft_seconds=20, hard_seconds=40, grace_seconds=1)
    assert t.hard_at(1) == 40.0 and t.hard_at(0) == 160.0


def test_hard_lifetime_is_acted_on_a_margin_before_it_at_most_a_quarter_of_soft_to_hard():
    assert HARD_MARGIN_SECONDS == 1.0
    assert Lifetimes(soft_seconds=50, hard_seconds=60).hard_margin == 1.0
    assert Lifetimes(soft_seconds=8, hard_seconds=9).hard_margin == 0.25
    t = TunnelTimers(Lifetimes(soft_seconds=8, hard_seconds=9, grace_seconds=2))
    t.generation_created(1, 0.0)
    t.generation_switched(1, 0.0)
    t.generation_created(2, 7.0)
    t.generation_switched(2, 7.5)            # gen 1 retires at 9.5, but its hard lifetime is 9
    assert t.hard_at(1) == 9.0 and t.hard_act_at(1) == 8.75
    assert t.expired(8.7) == [] and t.expired(8.75) == [(Expiry.RETIRE, 1)]
    assert t.hard_due(8.75) == [1]


@pytest.mark.parametrize("bad", [dict(soft_seconds=60, hard_seconds=60),
                                 dict(grace_seconds=-1)])
def test_lifetimes_refuse_nonsense(bad):
    with pytest.raises(ValueError):
        Lifetimes(**bad)


def _fresh(t: TunnelTimers, now: float) -> tuple:
    """next_deadline, next_action, expired(now) and hard_due(now) computed
    from scratch, from the rules in the module docstring and the public
    per-generation queries (no cache, no shared code with TunnelTimers._plan)."""
    deadlines = []
    for n, d in t._gens.items():
        if d.retry_at is not None:
            deadlines.append((d.retry_at, Expiry.REMOVE_RETRY, n))
        elif n == t.active:
            deadlines.append((t.hard_act_at(n), Expiry.HARD_ACTIVE, n))
            if t.rekey_requested_at is None:
                deadlines.append((t.soft_at(n), Expiry.SOFT, n))
        elif t.retire_at(n) is not None:
            deadlines.append((min(t.retire_at(n), t.hard_act_at(n)), Expiry.RETIRE, n))
        else:
            deadlines.append((t.hard_act_at(n), Expiry.HARD_UNUSED, n))
    times = [at for at, _k, _n in deadlines]
    acts = times + [t.hard_act_at(n) for n in t._gens]
    due = [(k, n) for at, k, n in deadlines if now >= at]
    hard_active = {n for k, n in due if k is Expiry.HARD_ACTIVE}
    order = [Expiry.REMOVE_RETRY, Expiry.RETIRE, Expiry.HARD_UNUSED, Expiry.HARD_ACTIVE,
             Expiry.SOFT]
    expired = sorted(((k, n) for k, n in due if not (k is Expiry.SOFT and n in hard_active)),
                     key=lambda e: (order.index(e[0]), e[1]))
    return (min(times) if times else None, min(acts) if acts else None, expired,
            sorted(n for n in t._gens if now >= t.hard_act_at(n)))


def test_cached_deadlines_follow_every_hook():
    """Issue 19: the next deadline is cached; every hook and every replaced
    setting drops the cache, so it always equals a fresh computation and
    next_action is never later than anything expired() or hard_due() names."""
    import random
    rng = random.Random(19)
    t = TunnelTimers(LT)
    now, gen = 0.0, 0
    for _ in range(400):
        now += rng.choice((0.0, 0.5, 3.0, 20.0))
        op = rng.randrange(8)
        gens = list(t._gens)
        if op == 0 or not gens:
            gen += 1
            t.generation_created(gen, now)
        elif op == 1:
            t.generation_switched(rng.choice(gens), now)
        elif op == 2:
            t.rekey_requested(now)
        elif op == 3:
            t.removal_failed(rng.choice(gens), now)
        elif op == 4:
            t.tunnel_blocked()
        elif op == 5:
            t.generation_dropped(rng.choice(gens))
        elif op == 6:
            t.lifetimes = Lifetimes(soft_seconds=rng.choice((40, 50)), hard_seconds=60,
                                    grace_seconds=rng.choice((1, 2)))
        else:
            gen += 1
            t.generation_adopted(gen, now, sending=rng.random() < 0.5)
        probe = now + rng.choice((0.0, 1.0, 10.0, 100.0))
        assert (t.next_deadline(), t.next_action(), t.expired(probe),
                t.hard_due(probe)) == _fresh(t, probe)
        if t.expired(probe) or t.hard_due(probe):
            assert t.next_action() is not None and t.next_action() <= probe
