"""A "K of N" peer where MORE than K sources deliver (issue 13 item 2,
docs/qkd.md "Several key sources"): two real daemons on three independent
KME pairs with ``rule: 2 of 3`` and all three up. Every generation combines
all three keys -- not just the first K -- in configuration order (source 0,
1, 2), and both gateways feed the combiner the same key_IDs, sources and
key bytes."""

from __future__ import annotations

import pytest
from multi_source_pair import multi_source_pair
from test_two_daemons import both_past, keys_match, wait_for

from qkdgate.adapters.etsi014 import Etsi014KeySource
from qkdgate.adapters.kmesim.server import KmeSimulator
from qkdgate.keymix import combiner

SAES = [("SAE-A", "SAE-B"), ("SAE-A2", "SAE-B2"), ("SAE-A3", "SAE-B3")]


@pytest.fixture
async def three(tmp_path):
    async with KmeSimulator.start(tmp_path / "k1", prefill=500) as one, \
            KmeSimulator.start(tmp_path / "k2", kmes=("KME-X1", "KME-X2"),
                               saes={"SAE-A2": "KME-X1", "SAE-B2": "KME-X2"},
                               prefill=500) as two, \
            KmeSimulator.start(tmp_path / "k3", kmes=("KME-Y1", "KME-Y2"),
                               saes={"SAE-A3": "KME-Y1", "SAE-B3": "KME-Y2"},
                               prefill=500) as three:
        yield one, two, three


@pytest.fixture
def spies(monkeypatch):
    """key_ID -> key bytes as the KMEs delivered them, and every input the
    daemons gave the combiner (copied: the session wipes its secrets)."""
    delivered: dict[str, bytes] = {}
    kme_of: dict[str, str] = {}
    mixed: list[tuple[tuple[str, ...], tuple[int, ...], bytes]] = []

    def keep(source, keys):
        for k in keys:
            delivered[k.key_id] = k.key.reveal()
            kme_of.setdefault(k.key_id, source.settings.kme_id)   # the master's KME
        return keys

    new, by_id = Etsi014KeySource.get_new_keys, Etsi014KeySource.get_keys_by_id

    async def get_new_keys(self, *a, **kw):
        return keep(self, await new(self, *a, **kw))

    async def get_keys_by_id(self, *a, **kw):
        return keep(self, await by_id(self, *a, **kw))

    real = combiner.combine

    def combine(inputs):
        if inputs.qkd_key is not None:
            mixed.append((tuple(inputs.qkd_key_ids), tuple(inputs.qkd_sources),
                          inputs.qkd_key.reveal()))
        return real(inputs)
    monkeypatch.setattr(Etsi014KeySource, "get_new_keys", get_new_keys)
    monkeypatch.setattr(Etsi014KeySource, "get_keys_by_id", get_keys_by_id)
    monkeypatch.setattr(combiner, "combine", combine)
    return delivered, kme_of, mixed


async def test_two_of_three_with_all_three_up_mixes_all_three_in_order(tmp_path, three, spies):
    delivered, kme_of, mixed = spies
    p = multi_source_pair(tmp_path, [s.credentials for s in three], SAES, "2 of 3")
    async with p.running():
        assert await wait_for(both_past(p, 3), 20), "no rekeys from three sources"
    assert keys_match(p.be_a, p.be_b) >= 2      # each side's current outbound SA (older ones
                                                # go at the switch); every generation below
    done_a = {e["generation"]: e["inputs"] for e in p.events_a if e["event"] == "rekey_done"}
    done_b = {e["generation"]: e["inputs"] for e in p.events_b if e["event"] == "rekey_done"}
    common = sorted(set(done_a) & set(done_b))
    assert len(common) >= 3
    for g in common:
        assert done_a[g] == done_b[g]                 # both ends: same key_IDs, same sources
        assert done_a[g]["qkd_sources"] == [0, 1, 2]  # more than K delivered: all are used
        assert len(done_a[g]["qkd_key_ids"]) == 3
    # the master fetched one key per source, named in configuration order
    fetched = [e for e in p.events_a if e["event"] == "qkd_keys"]
    assert fetched and all(e["sources"] == ["kme", "kme2", "kme3"] for e in fetched)
    # what was combined: the three keys concatenated in source order, the
    # same bytes on both gateways (each generation is combined once per side)
    by_ids: dict[tuple[str, ...], list[bytes]] = {}
    for ids, sources, qkd_key in mixed:
        assert sources == ((0, 32), (1, 32), (2, 32))     # (source, key length), bound
        assert len(qkd_key) == 3 * 32
        assert qkd_key == b"".join(delivered[i] for i in ids)
        by_ids.setdefault(ids, []).append(qkd_key)
    for g in common:
        both = by_ids[tuple(done_a[g]["qkd_key_ids"])]
        assert len(both) == 2 and both[0] == both[1]
    # and the order is the configuration's: key_ID i came from source i's KME pair
    for ids, _sources, _key in mixed:
        assert [kme_of[i] for i in ids] in (["KME-A", "KME-X1", "KME-Y1"],
                                            ["KME-B", "KME-X2", "KME-Y2"])
