"""Proof by test (issue 13 item 3): two gateways keyed from two node-disjoint
relay paths A-M1-B and A-M2-B of the simulator, M1 compromised. The attacker
is granted the simulator's record of every key M1 relayed, everything public
(key_IDs, source indices, transcript hash, SPIs, generations) and -- beyond
any real attacker -- the ML-KEM and X25519 secrets too. From that it derives
candidate SA keys: with the two-path gateways none matches an installed SA
key, while the honest gateways' keys match each other. Two controls show the
derivation itself is right: with the second QKD key handed over as well it
reproduces the installed keys, and against gateways keyed from the M1 path
alone the attacker's own knowledge suffices."""

from __future__ import annotations

from pathlib import Path

import pytest
from multi_source_pair import multi_source_pair
from test_two_daemons import both_past, keys_match, wait_for

from qkdgate.adapters.kmesim.server import KmeSimulator
from qkdgate.gateway.config.topology import load_topology
from qkdgate.keymix import combiner, schedule
from qkdgate.keymix.secret import SecretBytes

TWO_PATHS = Path(__file__).resolve().parents[2] / "docs" / "topologies" / "two-paths.yaml"
PATH1, PATH2 = ("SAE-A1", "SAE-B1"), ("SAE-A2", "SAE-B2")


@pytest.fixture(scope="module")
def relay_state(tmp_path_factory):
    return tmp_path_factory.mktemp("kmesim-relay")


@pytest.fixture
async def sim(relay_state):
    async with KmeSimulator.start(relay_state, topology=load_topology(TWO_PATHS)) as s:
        yield s


@pytest.fixture
def mixed(monkeypatch):
    """Every HybridInputs the daemons combine (what a compromised host would
    see of the non-QKD legs; the protocol calls keymix.combiner.combine)."""
    seen = []
    real = combiner.combine

    def spy(inputs):
        def copy(x):      # the session wipes its secrets once combined
            return None if x is None else SecretBytes(x.reveal())
        seen.append(combiner.HybridInputs(
            inputs.kem_name, copy(inputs.kem_secret), copy(inputs.x25519_secret),
            copy(inputs.qkd_key), inputs.qkd_key_ids, bytes(inputs.transcript_hash),
            inputs.qkd_sources))
        return real(inputs)
    monkeypatch.setattr(combiner, "combine", spy)
    return seen


def installed(p):
    """(spi, key) of every SA either recording backend ever installed (old
    generations' SAs are deleted from ``sas`` when they retire)."""
    history: set[tuple[int, bytes]] = set()
    for be in (p.be_a, p.be_b):
        def install(op, direction, sa_id, spec, _orig=be._install):
            _orig(op, direction, sa_id, spec)
            history.add((sa_id.spi, spec.key.reveal()))
        be._install = install
    return history


def derive(inputs, qkd_keys, spis, generations):
    """The SA keys of docs/keymix.md 5-6 for these inputs with ``qkd_keys``
    substituted: for every SPI, direction and generation in sight."""
    s = combiner.combine(combiner.HybridInputs(
        inputs.kem_name, inputs.kem_secret, inputs.x25519_secret,
        SecretBytes(b"".join(qkd_keys)), inputs.qkd_key_ids, inputs.transcript_hash,
        inputs.qkd_sources))
    return {(spi, schedule.esp_key(s, "t1", d, spi, g).reveal())
            for spi in spis for d in ("i2r", "r2i") for g in generations}


async def run(p, generations=3):
    async with p.running():
        assert await wait_for(both_past(p, generations), 20), "no rekeys over the relay"
    # the honest gateways agree: each side's current outbound SA is the other's
    # inbound (older outbound SAs go at the switch)
    assert keys_match(p.be_a, p.be_b) >= 2


async def test_two_disjoint_paths_keep_the_sa_keys_from_the_compromised_node(
        tmp_path, sim, mixed):
    p = multi_source_pair(tmp_path, [sim.credentials, sim.credentials], [PATH1, PATH2])
    sas = installed(p)
    await run(p)
    spis = {spi for spi, _ in sas}
    gens = range(1, max(p.a.tunnels.get("t1").active.number,
                        p.b.tunnels.get("t1").active.number) + 2)
    knowledge = sim.network.attacker_knowledge()
    seen = {s.key_id: s.material for s in knowledge}
    assert {s.node for s in knowledge} == {"KME-M1"}
    attacked = 0
    for inputs in {i.transcript_hash: i for i in mixed if i.qkd_key_ids}.values():
        k1_id, k2_id = inputs.qkd_key_ids
        assert [i for i, _ in inputs.qkd_sources] == [0, 1]      # (source index, length)
        # M1 relayed the path-1 key and recorded it; the path-2 key never passed it
        assert k1_id in seen and k2_id not in seen
        true_k2 = inputs.qkd_key.reveal()[len(seen[k1_id]):]
        # the attacker's best: its path-1 key, and for path 2 every key it ever
        # saw of that length (and zeros)
        guesses = {m for m in seen.values() if len(m) == len(true_k2)} | {bytes(len(true_k2))}
        for guess in guesses:
            assert not derive(inputs, [seen[k1_id], guess], spis, gens) & sas
        # control: with the second key as well, the same derivation hits
        assert derive(inputs, [seen[k1_id], true_k2], spis, gens) & sas
        attacked += 1
    assert attacked >= 3


async def test_one_path_through_the_compromised_node_gives_the_keys_away(
        tmp_path, sim, mixed):
    p = multi_source_pair(tmp_path, [sim.credentials], [PATH1])
    sas = installed(p)
    await run(p, generations=2)
    spis = {spi for spi, _ in sas}
    gens = range(1, max(p.a.tunnels.get("t1").active.number,
                        p.b.tunnels.get("t1").active.number) + 2)
    seen = {s.key_id: s.material for s in sim.network.attacker_knowledge()}
    broken = 0
    for inputs in {i.transcript_hash: i for i in mixed if i.qkd_key_ids}.values():
        (kid,) = inputs.qkd_key_ids
        if derive(inputs, [seen[kid]], spis, gens) & sas:
            broken += 1
    assert broken >= 2
