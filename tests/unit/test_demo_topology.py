"""`qkdgate demo --topology` on this host (issue 13 item 4): the option, the
SAE pairs a topology gives the two gateways, the generated multi-source
configurations, and the per-path lines of the view. The real run in the
kernel lab is tests/kernel/test_demo.py -k disjoint."""

from __future__ import annotations

import argparse
from pathlib import Path

import pytest

from qkdgate.adapters.kmesim.topology import LinkSpec, NodeSpec, PinnedRoute, Topology
from qkdgate.errors import ConfigError
from qkdgate.gateway.cli import main as cli
from qkdgate.gateway.config.topology import load_topology
from qkdgate.gateway.demo import command as demo
from qkdgate.gateway.demo.config import (
    KmeEndpoint,
    QkdSource,
    Timers,
    topology_pairs,
    write_configs,
    write_identities,
)
from qkdgate.gateway.demo.view import dashboard_view, render

TOPOLOGIES = Path(__file__).resolve().parents[2] / "docs" / "topologies"


def parse(*argv: str) -> argparse.Namespace:
    return cli.build_parser().parse_args(["demo", *argv])


def test_topology_goes_to_the_vm_as_an_absolute_path(monkeypatch):
    monkeypatch.chdir(TOPOLOGIES)
    a = parse("--topology", "two-paths.yaml")
    demo.check_args(a)
    assert a.topology == str(TOPOLOGIES / "two-paths.yaml")
    inner = parse(*demo.vm_argv(a, "/lab/s.json", "/lab/d.log"))
    assert inner.topology == a.topology and inner.where == "host"
    assert demo.options(a).topology == a.topology


@pytest.mark.parametrize("argv, msg", [
    (("--topology", str(TOPOLOGIES / "two-paths.yaml"), "--qkd", "004"), "--qkd 014"),
    (("--topology", "/nonexistent/topo.yaml"), "cannot read topology"),
], ids=["004", "missing"])
def test_bad_topology_arguments_are_usage_errors(argv, msg):
    with pytest.raises(ConfigError, match=msg):
        demo.check_args(parse(*argv))


def test_pairs_from_pinned_routes_or_the_end_nodes():
    assert topology_pairs(load_topology(TOPOLOGIES / "two-paths.yaml")) == \
        [("SAE-A1", "SAE-B1"), ("SAE-A2", "SAE-B2")]
    assert topology_pairs(load_topology(TOPOLOGIES / "line-3.yaml")) == [("SAE-A", "SAE-B")]
    nodes = (NodeSpec("KME-A", ("SAE-A1",)), NodeSpec("KME-B", ("SAE-B1", "SAE-A2")),
             NodeSpec("KME-C", ("SAE-B2",)))
    links = (LinkSpec("KME-A", "KME-B"), LinkSpec("KME-B", "KME-C"))
    routes = (PinnedRoute(("SAE-A1", "SAE-B1"), ()), PinnedRoute(("SAE-A2", "SAE-B2"), ()))
    with pytest.raises(ConfigError, match="one KME"):
        topology_pairs(Topology(nodes, links, routes=routes))


def test_two_paths_give_each_gateway_two_sources_that_pass_check_config(tmp_path, capsys):
    from qkdgate.adapters.kmesim.pki import ensure_pki
    saes = ["SAE-A1", "SAE-A2", "SAE-B1", "SAE-B2"]
    pki = ensure_pki(tmp_path / "kme", ["KME-A", "KME-B"], saes, ())
    write_identities(tmp_path)

    def ep(port: int, kme: str, sae: str) -> KmeEndpoint:
        return KmeEndpoint(f"https://127.0.0.1:{port}", kme, str(pki.sae(sae).cert),
                           str(pki.sae(sae).key), str(pki.ca))
    pairs = topology_pairs(load_topology(TOPOLOGIES / "two-paths.yaml"))
    src_a = [QkdSource(f"kme-p{i}", a, b, ep(40001, "KME-A", a))
             for i, (a, b) in enumerate(pairs, 1)]
    src_b = [QkdSource(f"kme-p{i}", b, a, ep(40002, "KME-B", b))
             for i, (a, b) in enumerate(pairs, 1)]
    pa, pb = write_configs(tmp_path, src_a[0].kme, src_b[0].kme, policy="block",
                           timers=Timers.for_interval(3), sources=(src_a, src_b))
    for path in (pa, pb):
        assert cli.main(["check-config", "--check-files", path]) == 0, capsys.readouterr()
    text = Path(pa).read_text()
    assert "rule: all" in text and "local_sae_id: SAE-A2, peer_sae_id: SAE-B2" in text
    assert text.count("kind: etsi014") == 2 and "sae-SAE-A2.pem" in text


def test_the_view_shows_each_path_and_what_the_attacker_holds():
    network = {
        "links": [{"kmes": ["KME-A", "KME-M1"], "stored_keys": 90, "max_key_count": 100,
                   "qber": 0.015, "secret_key_rate_bps": 1e6, "alarms": [], "up": True},
                  {"kmes": ["KME-A", "KME-M2"], "stored_keys": 0, "max_key_count": 100,
                   "qber": 0.14, "secret_key_rate_bps": 0.0,
                   "alarms": ["QBER_ABOVE_THRESHOLD"], "up": True}],
        "paths": [{"saes": ["SAE-A1", "SAE-B1"], "routes": [["KME-A", "KME-M1", "KME-B"]],
                   "stored_keys": 45, "qber": 0.015, "alarms": [], "compromised": ["KME-M1"],
                   "attacker_key_ids": ["k1", "k2"]},
                  {"saes": ["SAE-A2", "SAE-B2"], "routes": [["KME-A", "KME-M2", "KME-B"]],
                   "stored_keys": 0, "qber": 0.14, "alarms": ["QBER_ABOVE_THRESHOLD"],
                   "compromised": [], "attacker_key_ids": []}]}
    text = render({"t": 1.0, "policy": "block", "network": network})
    assert ("QKD path SAE-A1->SAE-B1 via KME-A-KME-M1-KME-B: pool 45 keys, QBER 1.5%, "
            "alarms none, compromised KME-M1 holds 2 of its keys") in text
    assert "QKD path SAE-A2->SAE-B2 via KME-A-KME-M2-KME-B: pool 0 keys, QBER 14.0%, " \
           "alarms QBER_ABOVE_THRESHOLD" in text
    links = dashboard_view({"network": network})["links"]
    assert [(x["name"], x["up"]) for x in links] == [("KME-A-KME-M1", True),
                                                     ("KME-A-KME-M2", False)]
