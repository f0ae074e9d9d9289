"""Two real daemons keyed from two independent KME pairs at once (issue 13
item 2: two vendors, or two relay paths): every generation mixes one key from
each, both sides record both key_IDs with their sources, and the k-of-n rule
and the tunnel policy decide what happens when one KME pair fails."""

from __future__ import annotations

import pytest
from multi_source_pair import multi_source_pair
from test_two_daemons import both_past, gen, keys_match, wait_for

from qkdgate.adapters.kmesim.server import KmeSimulator


@pytest.fixture(scope="module")
def second_state(tmp_path_factory):
    return tmp_path_factory.mktemp("kmesim-x")


@pytest.fixture
async def kmes(state_dir, second_state):
    async with KmeSimulator.start(state_dir, prefill=500) as one, \
            KmeSimulator.start(second_state, kmes=("KME-X1", "KME-X2"),
                               saes={"SAE-A2": "KME-X1", "SAE-B2": "KME-X2"},
                               prefill=500) as two:
        yield one, two


def two_source_pair(tmp_path, kmes, rule="all", **kw):
    one, two = kmes
    return multi_source_pair(tmp_path, [one.credentials, two.credentials],
                             [("SAE-A", "SAE-B"), ("SAE-A2", "SAE-B2")], rule, **kw)


def done(events):
    return {e["generation"]: e["inputs"] for e in events if e["event"] == "rekey_done"}


async def test_every_generation_mixes_one_key_from_each_source(tmp_path, kmes):
    p = two_source_pair(tmp_path, kmes)
    async with p.running():
        assert await wait_for(both_past(p, 3), 15), "no rekeys from two sources"
        st = p.a.status()["tunnels"][0]
    assert keys_match(p.be_a, p.be_b) >= 2      # each side's current outbound SA (older ones
                                                # go at the switch); every generation below
    da, db = done(p.events_a), done(p.events_b)
    common = sorted(set(da) & set(db))
    assert len(common) >= 3
    for g in common:
        assert da[g] == db[g]                       # the same key_IDs, the same sources
        assert da[g]["qkd_sources"] == [0, 1] and len(da[g]["qkd_key_ids"]) == 2
    assert st["qkd_sources"] == ["kme", "kme2"] and st["inputs"]["qkd_sources"] == [0, 1]
    fetched = [e for e in p.events_a if e["event"] == "qkd_keys"]
    assert fetched and all(e["sources"] == ["kme", "kme2"] for e in fetched)


async def test_one_of_two_keeps_hybrid_generations_when_one_source_fails(tmp_path, kmes):
    p = two_source_pair(tmp_path, kmes, rule="1 of 2", policy="hybrid-required")
    one, _ = kmes
    async with p.running():
        assert await wait_for(both_past(p, 0), 10)
        one.set_link_up(False)
        g = max(gen(p.a), gen(p.b))
        assert await wait_for(both_past(p, g + 2), 15), "no rekeys on the second source alone"
        last = min(gen(p.a), gen(p.b))
        one.set_link_up(True)
    da, db = done(p.events_a), done(p.events_b)
    assert da[last] == db[last] and da[last]["qkd_sources"] == [1]
    assert keys_match(p.be_a, p.be_b) >= 1
    assert not p.a.tunnels.get("t1").fallback
    errors = [e for e in p.events_a if e["event"] == "qkd_error"]
    assert any(e["source"] == "kme" for e in errors)
    assert not any(e["kind"] == "TooFewSources" for e in errors)


async def test_all_of_two_falls_back_when_one_source_fails(tmp_path, kmes):
    p = two_source_pair(tmp_path, kmes, policy="pqc-fallback")
    _, two = kmes
    async with p.running():
        assert await wait_for(both_past(p, 0), 10)
        two.set_link_up(False)
        assert await wait_for(lambda: p.a.tunnels.get("t1").fallback
                              and p.b.tunnels.get("t1").fallback, 10), "no PQC-only generation"
        st = p.a.status()["tunnels"][0]
        assert st["state"] == "up" and st["inputs"]["qkd_key_ids"] == []
        two.set_link_up(True)
        assert await wait_for(lambda: not p.a.tunnels.get("t1").fallback
                              and not p.b.tunnels.get("t1").fallback, 10), "QKD never came back"
    errors = [e for e in p.events_a if e["event"] == "qkd_error"]
    assert any(e["kind"] == "TooFewSources" for e in errors)
    assert any(e["source"] == "kme2" for e in errors)
