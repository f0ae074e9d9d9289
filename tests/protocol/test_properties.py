"""Property test: under any pattern of loss, duplication and reordering the
peers never switch to keys the other side cannot receive, never disagree on
a generation's keys, and reconverge once the network heals."""

from __future__ import annotations

import random

from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st
from protocol_harness import make_pair

from qkdgate.gateway.protocol import events as E


def check_invariants(p) -> None:
    inbound_at: dict[tuple[str, int], int] = {}
    retired_at: dict[tuple[str, int], int] = {}
    current_out: dict[str, int] = {}
    for i, (name, ev) in enumerate(p.trace):
        if isinstance(ev, E.InstallInbound):
            inbound_at.setdefault((name, ev.generation), i)
        elif isinstance(ev, E.RetireGeneration):
            retired_at.setdefault((name, ev.generation), i)
            # never retire the generation we are sending on
            assert current_out.get(name) != ev.generation, (name, ev.generation)
        elif isinstance(ev, E.InstallOutbound):
            peer = "gw-b" if name == "gw-a" else "gw-a"
            # make-before-break: the peer's inbound SAs exist and are not retired
            assert (peer, ev.generation) in inbound_at, (name, ev.generation)
            assert (peer, ev.generation) not in retired_at, (name, ev.generation)
            current_out[name] = ev.generation
    for gen in set(p.a.outbound) & set(p.b.inbound):
        assert p.a.outbound[gen] == p.b.inbound[gen]
    for gen in set(p.b.outbound) & set(p.a.inbound):
        assert p.b.outbound[gen] == p.a.inbound[gen]


@settings(max_examples=40, deadline=None, derandomize=True,
          suppress_health_check=[HealthCheck.too_slow])
@given(seed=st.integers(0, 2 ** 16), loss=st.floats(0.0, 0.6), dup=st.floats(0.0, 0.3),
       reorder=st.booleans(), start=st.sampled_from(["a", "both"]),
       qkd=st.sampled_from([None, "a-master", "b-master"]))
def test_faulty_network_safety_and_liveness(seed, loss, dup, reorder, start, qkd):
    rnd = random.Random(seed)
    p = make_pair(seed=seed, start=start, qkd=qkd, rekey_interval=20.0, exchange_timeout=8.0,
                  retry_base=1.0, retry_max=8.0)

    def net(src, ds):
        out = []
        for d in ds:
            if rnd.random() < loss:
                continue
            out.append(d)
            if rnd.random() < dup:
                out.append(d)
        if reorder:
            rnd.shuffle(out)
        return out
    p.network = net
    p.advance(p.now + 90)
    check_invariants(p)
    # heal: both sides converge on one generation with matching keys
    p.network = None
    p.a.session.initiate_rekey(p.now, "test")
    p.roundtrip_until_done(timeout=200)
    p.advance(p.now + 5)
    check_invariants(p)
    assert p.a.session.generation == p.b.session.generation
    gen = p.a.session.generation
    assert p.a.current_out == p.b.current_out == gen
    assert p.a.outbound[gen] == p.b.inbound[gen] and p.b.outbound[gen] == p.a.inbound[gen]


ACTIONS = ["restart_a", "restart_b", "lose_key", "link_down", "link_up", "rekey_a", "rekey_b",
           "partition", "heal", "outfail_a", "outfail_b", "infail_b", "kernel_ok"]


@settings(max_examples=30, deadline=None, derandomize=True,
          suppress_health_check=[HealthCheck.too_slow])
@given(seed=st.integers(0, 2 ** 16), allow=st.booleans(),
       chaos=st.lists(st.tuples(st.floats(0.0, 15.0), st.sampled_from(ACTIONS)), max_size=8))
def test_chaos_restarts_qkd_faults_partitions(seed, allow, chaos):
    from test_restart_dos import restart

    from qkdgate.errors import KeyNotFound
    p = make_pair(seed=seed, allow_pqc=allow, rekey_interval=15.0, exchange_timeout=6.0,
                  retry_base=1.0, retry_max=6.0)
    cut = {"on": False}
    p.network = lambda src, ds: [] if cut["on"] else ds
    for i, (dt, action) in enumerate(chaos):
        p.advance(p.now + dt)
        if action.startswith("restart"):
            gw = p.a if action.endswith("a") else p.b
            floor = max([0, *gw.inbound, *gw.outbound])
            restart(p, gw, seed=seed + 1000 + i, floor=floor)
        elif action == "lose_key":
            p.b.qkd_error = KeyNotFound("lost")
        elif action == "link_down":
            p.a.link.down = True
        elif action == "link_up":
            p.a.link.down = False
        elif action.startswith("rekey"):
            (p.a if action.endswith("a") else p.b).session.initiate_rekey(p.now, "chaos")
        elif action.startswith("outfail"):
            (p.a if action.endswith("a") else p.b).fail_outbound = True
        elif action == "infail_b":
            p.b.install_error = True
        elif action == "kernel_ok":
            for gw in (p.a, p.b):
                gw.fail_outbound = gw.install_error = False
        elif action == "partition":
            cut["on"] = True
        else:
            cut["on"] = False
        check_invariants(p)
    cut["on"] = False
    p.a.link.down = False
    for gw in (p.a, p.b):
        gw.fail_outbound = gw.install_error = False
    p.advance(p.now + 30)
    p.a.session.initiate_rekey(p.now, "test")
    p.roundtrip_until_done(timeout=200)
    p.advance(p.now + 3)
    check_invariants(p)
    gen = p.a.session.generation
    assert gen == p.b.session.generation and p.a.current_out == p.b.current_out == gen
    assert p.a.of(E.SessionEstablished)[-1].provenance.qkd
