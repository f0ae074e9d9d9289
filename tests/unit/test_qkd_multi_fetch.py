"""QkdFetcher with several key sources (issue 13 item 2): one key from every
source as master, each key_ID from its own source as slave, the k-of-n rule,
one event and one metric per failing source, health per source."""

from __future__ import annotations

import asyncio
import re
from pathlib import Path

import pytest

from qkdgate.errors import KeyNotFound, KeyUnavailable
from qkdgate.gateway.config.model import parse_config
from qkdgate.gateway.daemon.qkd import QkdFetcher
from qkdgate.gateway.protocol.events import NeedQkdKeys
from qkdgate.gateway.telemetry.events import KeySourceDown, QkdError, QkdKeysFetched
from qkdgate.testing.fakes import FakeQkdLink

BASE = (Path(__file__).resolve().parents[1] / "config" / "good-minimal.yaml").read_text()
SINGLE = ("    qkd:\n      key_source: kme-a\n      role: master\n"
          "      local_sae_id: SAE-A\n      peer_sae_id: SAE-B\n")


def config(role: str, rule: str):
    block = (f"    qkd:\n      role: {role}\n      rule: {rule}\n      sources:\n"
             "        - {key_source: kme-a, local_sae_id: SAE-A, peer_sae_id: SAE-B}\n"
             "        - {key_source: kme-b, local_sae_id: SAE-A2, peer_sae_id: SAE-B2,"
             " key_size: 512}\n")
    kme_b = ("  - name: kme-b\n    kind: etsi014\n    url: https://127.0.0.1:9443\n"
             "    tls: {cert: sae-a.crt, key: sae-a.key, ca: kme-ca.crt}\n")
    text = BASE.replace(SINGLE, block).replace("tunnels:\n", kme_b + "tunnels:\n", 1)
    return parse_config(text, "/etc/qkdgate/q.yaml")


class Journal:
    def __init__(self):
        self.reserved = []

    def next_generation(self, tunnel):
        return len(self.reserved) + 1

    def reserve_qkd_keys(self, tunnel, generation, key_ids):
        self.reserved.append(tuple(key_ids))


def fetcher(role: str, rule: str, links, *, sae=("SAE-A", "SAE-A2")):
    events, observed, lost = [], [], []
    sources = {"kme-a": links[0].source(sae[0]), "kme-b": links[1].source(sae[1])}
    f = QkdFetcher(config(role, rule), sources, journal=Journal(), emit=events.append,
                   clock=lambda: 0.0, on_qkd_lost=lambda p, r: lost.append((p, r)),
                   observe=lambda s, op, sec, err=None: observed.append((s, op, err is None)))
    return f, events, observed, lost


def links(master=("SAE-A", "SAE-A2"), slave=("SAE-B", "SAE-B2")):
    return [FakeQkdLink(master[i], slave[i]) for i in range(2)]


def master_ev():
    return NeedQkdKeys(1, "master", "SAE-B", (), 1, 256)


def test_master_takes_one_key_from_every_source_in_configuration_order():
    ls = links()
    f, events, observed, _ = fetcher("master", "all", ls)
    keys, sources = asyncio.run(f.fetch("gw-b", master_ev()))
    assert sources == (0, 1) and [len(k.key) for k in keys] == [32, 64]
    assert [k.key_id for k in keys] == [next(iter(ls[0].issued)), next(iter(ls[1].issued))]
    fetched = [e for e in events if isinstance(e, QkdKeysFetched)]
    assert fetched[0].sources == ("kme-a", "kme-b")
    assert sorted(observed) == [("kme-a", "get_new_keys", True), ("kme-b", "get_new_keys", True)]
    assert f._journal.reserved == [tuple(k.key_id for k in keys)]


def test_k_of_n_uses_what_arrived_and_reports_the_failed_source():
    ls = links()
    ls[0].down = True
    f, events, observed, _ = fetcher("master", "1 of 2", ls)
    keys, sources = asyncio.run(f.fetch("gw-b", master_ev()))
    assert sources == (1,) and len(keys) == 1
    errors = [e for e in events if isinstance(e, QkdError)]
    assert [(e.source, e.kind) for e in errors] == [("kme-a", "KeyUnavailable")]
    assert ("kme-a", "get_new_keys", False) in observed
    assert [e.source for e in events if isinstance(e, KeySourceDown)] == ["kme-a"]


def test_fewer_than_k_is_key_unavailable_naming_the_failed_sources():
    ls = links()
    ls[1].down = True
    f, events, _, _ = fetcher("master", "all", ls)
    with pytest.raises(KeyUnavailable, match=re.escape("1 of 2 QKD key sources delivered, "
                                                       "the rule needs 2 (failed: kme-b)")):
        asyncio.run(f.fetch("gw-b", master_ev()))
    kinds = [(e.source, e.kind) for e in events if isinstance(e, QkdError)]
    assert kinds == [("kme-b", "KeyUnavailable"), ("", "TooFewSources")]
    assert f._journal.reserved == []     # nothing mixed, nothing consumed in the journal


def test_slave_fetches_each_key_id_from_the_source_the_master_named():
    ls = links()
    m, _, _, _ = fetcher("master", "1 of 2", ls)
    ls[0].down = True
    keys, sources = asyncio.run(m.fetch("gw-b", master_ev()))
    ls[0].down = False
    s, events, observed, _ = fetcher("slave", "1 of 2", ls, sae=("SAE-B", "SAE-B2"))
    got, got_sources = asyncio.run(s.fetch("gw-b", NeedQkdKeys(
        2, "slave", "SAE-A", tuple(k.key_id for k in keys), 0, 256, sources)))
    assert got_sources == (1,)
    assert [k.key.reveal() for k in got] == [k.key.reveal() for k in keys]
    assert observed == [("kme-b", "get_keys_by_id", True)]


def test_slave_fails_if_any_named_source_fails():
    ls = links()
    m, _, _, _ = fetcher("master", "all", ls)
    keys, sources = asyncio.run(m.fetch("gw-b", master_ev()))
    ls[1].issued.clear()            # the second KME lost the key
    s, events, _, _ = fetcher("slave", "all", ls, sae=("SAE-B", "SAE-B2"))
    with pytest.raises(KeyNotFound):
        asyncio.run(s.fetch("gw-b", NeedQkdKeys(
            2, "slave", "SAE-A", tuple(k.key_id for k in keys), 0, 256, sources)))
    assert next((e.source, e.kind) for e in events if isinstance(e, QkdError)) == \
        ("kme-b", "KeyNotFound")


@pytest.mark.parametrize(("rule", "lost"), [("all", True), ("1 of 2", False)])
def test_poll_counts_qkd_lost_only_below_k_healthy_sources(rule, lost):
    ls = links()
    ls[1].down = True
    f, events, _, got = fetcher("master", rule, ls)
    asyncio.run(f.poll("gw-b"))
    assert bool(got) is lost
    if lost:
        assert "kme-b" in got[0][1]
    assert [e.source for e in events if isinstance(e, KeySourceDown)] == ["kme-b"]


def test_status_lists_every_source_and_key_id():
    from qkdgate.gateway.cli.status import inputs_text, render
    from qkdgate.keymix.combiner import Provenance
    from qkdgate.tunnels.events import KeyInputs
    ids = ["2d9c0b4e-5a37-4b5e-9a3e-3f1e4c2b7a10", "7f6e5d4c-3b2a-4190-8f7e-6d5c4b3a2910"]
    inputs = KeyInputs.of(Provenance("ML-KEM-768", True, tuple(ids), (0, 2))).as_dict()
    assert inputs["qkd_sources"] == [0, 2]
    assert inputs_text(inputs) == "ML-KEM-768+X25519+QKD[#0:2d9c0b4e,#2:7f6e5d4c]"
    status = {"gateway": "gw-a", "peers": [], "tunnels": [{
        "tunnel": "t1", "type": "ipsec", "state": "up", "policy": "hybrid-required",
        "peer": "gw-b", "qkd_sources": ["kme-p1", "kme-p2", "kme-p3"], "inputs": inputs,
        "generations": [{"generation": 4, "active": True, "inputs": inputs, "sas": []}]}]}
    text = render(status, detail=True)
    assert f"QKD key_ID {ids[0]} from source #0 kme-p1" in text
    assert f"QKD key_ID {ids[1]} from source #2 kme-p3" in text
    # one source: as before, no source names
    single = KeyInputs.of(Provenance("ML-KEM-768", True, (ids[0],))).as_dict()
    assert "qkd_sources" not in single and inputs_text(single) == "ML-KEM-768+X25519+QKD[2d9c0b4e]"
