"""Trusted-node relay in the KME simulator, sans-IO: the hop crypto (one-time
pad + one-time Poly1305, ETSI 020-shaped containers), routing, key use per
link, and what a compromised node learns (issue 13 item 3)."""

import base64
import dataclasses
import json
import os

import pytest

from qkdgate.adapters.kmesim import relay
from qkdgate.adapters.kmesim.kme import SimNetwork
from qkdgate.adapters.kmesim.linkmodel import ALARM_QBER, REALISTIC
from qkdgate.adapters.kmesim.topology import (
    Graph,
    LinkSpec,
    NodeSpec,
    PinnedRoute,
    Topology,
    line,
)
from qkdgate.errors import AuthenticationFailed, RemoteProtocolError

KEY = 256
PER_HOP = KEY + 256          # pad + one-time Poly1305 key, per key per link


def keys_of(reply):
    assert reply.status == 200, reply.body
    return [(k["key_ID"], base64.b64decode(k["key"])) for k in reply.body["keys"]]


def fetch(net, master_kme, master, slave_kme, slave, number=1):
    sent = keys_of(net.enc_keys(master_kme, master, slave, {"number": number}))
    got = keys_of(net.dec_keys(slave_kme, slave, master, [i for i, _ in sent]))
    assert got == sent
    return sent


def two_paths(**kw):
    nodes = (NodeSpec("KME-A", ("SAE-A1", "SAE-A2", "SAE-A")), NodeSpec("KME-M1", (), True),
             NodeSpec("KME-M2"), NodeSpec("KME-B", ("SAE-B1", "SAE-B2", "SAE-B")))
    links = tuple(LinkSpec(a, b) for a, b in (("KME-A", "KME-M1"), ("KME-M1", "KME-B"),
                                              ("KME-A", "KME-M2"), ("KME-M2", "KME-B")))
    routes = (PinnedRoute(("SAE-A1", "SAE-B1"), ("KME-M1",)),
              PinnedRoute(("SAE-A2", "SAE-B2"), ("KME-M2",)))
    return Topology(nodes, links, routes=routes, prefill=100, **kw)


# ------------------------------------------------------------------ hop crypto

def hop_fixture():
    store = relay.LinkKeyStore(os.urandom)
    hop = relay.Hop("3fa85f64-5717-4562-b3fc-2c963f66afa6", "SAE-A", "SAE-B",
                    ("KME-A", "KME-M", "KME-B"), 1)
    key = os.urandom(32)
    wire = relay.seal(hop, store.draw(32), key)
    return store, hop, key, wire


def test_hop_is_an_etsi020_container_with_the_key_padded():
    store, hop, key, wire = hop_fixture()
    doc = json.loads(wire)        # the body of POST /kmapi/v1/ext_keys itself
    assert doc["initiator_sae_id"] == "SAE-A" and doc["target_sae_ids"] == ["SAE-B"]
    assert doc["ack_callback_url"].endswith("/kmapi/v1/ext_keys/ack")
    (item,) = doc["keys"]
    assert item["key_id"] == hop.key_id and set(item) == {"key_id", "value"}
    (ext,) = doc["extension_mandatory"]       # a KME without qkdgate_relay must refuse it
    assert set(ext) == {relay.EXT}
    assert base64.b64decode(item["value"]) != key          # the pad, not the key, travels
    assert key.hex() not in wire.decode() and base64.b64encode(key).decode() not in wire.decode()
    opened = relay.open_hop(wire, "KME-B", lambda a, b: store)
    assert opened.material == key
    assert opened.hop == dataclasses.replace(hop, ack_url="https://KME-A/kmapi/v1/ext_keys/ack")
    assert len(store) == 0                                 # the link key is spent


@pytest.mark.parametrize("field", ["value", "route", "target"])
def test_a_changed_hop_fails_its_tag(field):
    store, _hop, _key, wire = hop_fixture()
    doc = c = json.loads(wire)
    if field == "value":
        v = bytearray(base64.b64decode(c["keys"][0]["value"]))
        v[0] ^= 1
        c["keys"][0]["value"] = base64.b64encode(bytes(v)).decode()
    elif field == "route":
        c["extension_mandatory"][0][relay.EXT]["route"][0] = "KME-X"
    else:
        c["target_sae_ids"] = ["SAE-EVE"]
    with pytest.raises(AuthenticationFailed):
        relay.open_hop(json.dumps(doc).encode(), "KME-B", lambda a, b: store)


def test_a_replayed_hop_or_one_for_another_node_is_refused():
    store, _hop, _key, wire = hop_fixture()
    with pytest.raises(RemoteProtocolError, match="another node"):
        relay.open_hop(wire, "KME-C", lambda a, b: store)
    relay.open_hop(wire, "KME-B", lambda a, b: store)
    with pytest.raises(RemoteProtocolError, match="spent"):
        relay.open_hop(wire, "KME-B", lambda a, b: store)
    with pytest.raises(RemoteProtocolError, match="malformed"):
        relay.open_hop(b'{"keys": []}', "KME-B", lambda a, b: store)


def test_xor_shares_hide_the_key_until_all_are_joined():
    key = os.urandom(32)
    shares = relay.split(key, 3, os.urandom)
    assert relay.join(shares) == key
    assert all(s != key for s in shares) and relay.join(shares[:2]) != key


# --------------------------------------------------------------------- routing

def test_routes_shortest_then_disjoint():
    g = Graph({frozenset(p): km for p, km in ((("A", "M1"), 10), (("M1", "B"), 10),
                                              (("A", "M2"), 5), (("M2", "B"), 50),
                                              (("A", "X"), 1), (("X", "Y"), 1), (("Y", "B"), 1))})
    assert g.shortest("A", "B") == ("A", "M1", "B")        # fewest hops, then least fibre
    assert g.disjoint("A", "B", 3) == [("A", "M1", "B"), ("A", "M2", "B"), ("A", "X", "Y", "B")]
    assert g.shortest("A", "B", usable=lambda a, b: "M1" not in (a, b)) == ("A", "M2", "B")


def test_topology_rejects_links_and_routes_that_do_not_exist():
    nodes = (NodeSpec("KME-A", ("SAE-A",)), NodeSpec("KME-B", ("SAE-B",)))
    with pytest.raises(ValueError, match="known nodes"):
        Topology(nodes, (LinkSpec("KME-A", "KME-C"),))
    with pytest.raises(ValueError, match="no link"):
        Topology((*nodes, NodeSpec("KME-C")), (LinkSpec("KME-A", "KME-B"),),
                 routes=(PinnedRoute(("SAE-A", "SAE-B"), ("KME-C",)),))
    with pytest.raises(ValueError, match="two nodes"):
        Topology((NodeSpec("KME-A", ("S",)), NodeSpec("KME-B", ("S",))),
                 (LinkSpec("KME-A", "KME-B"),))


# ----------------------------------------------------------------------- relay

def test_two_hops_identical_keys_and_every_link_pays_pad_and_mac():
    net = SimNetwork.from_topology(line(["KME-A", "KME-M", "KME-B"], prefill=10),
                                   now=lambda: 0.0)
    st = net.status("KME-A", "SAE-A", "SAE-B").body
    assert st["target_KME_ID"] == "KME-B" and st["stored_key_count"] == 10 * KEY // PER_HOP
    assert st["status_extension"]["qkdgate_routes"] == [["KME-A", "KME-M", "KME-B"]]
    fetch(net, "KME-A", "SAE-A", "KME-B", "SAE-B", number=3)
    for link in net.links.values():
        assert link.stored_bits == 10 * KEY - 3 * PER_HOP
    assert all(len(s) == 0 for s in net.link_keys.values())   # every link key used once
    assert net.attacker_knowledge() == []                     # nobody compromised


def test_compromised_middle_node_records_the_relayed_key():
    # issue 13 item 3: A-M-B with M compromised
    net = SimNetwork.from_topology(line(["KME-A", "KME-M", "KME-B"], compromised=["KME-M"]),
                                   now=lambda: 0.0)
    (key_id, key), = fetch(net, "KME-A", "SAE-A", "KME-B", "SAE-B")
    seen = net.attacker_knowledge("KME-M")
    assert [(s.key_id, s.material, s.share) for s in seen] == [(key_id, key, (1, 1))]
    assert "material" not in repr(seen[0]) and key.hex() not in repr(seen[0])


def test_two_disjoint_paths_attacker_on_one_knows_only_that_key():
    # issue 13 item 3: A-M1-B and A-M2-B, M1 compromised
    net = SimNetwork.from_topology(two_paths(), now=lambda: 0.0)
    (id1, key1), = fetch(net, "KME-A", "SAE-A1", "KME-B", "SAE-B1")
    (id2, key2), = fetch(net, "KME-A", "SAE-A2", "KME-B", "SAE-B2")
    known = {s.material for s in net.attacker_knowledge()}
    assert key1 in known and key2 not in known
    assert {s.key_id for s in net.attacker_knowledge()} == {id1}
    # the pinned routes were taken: path 2's links paid, path 1's did not for key 2
    m2 = net.links[frozenset(("KME-A", "KME-M2"))]
    assert m2.stored_bits == 100 * KEY - PER_HOP


def test_k_disjoint_split_leaves_one_share_with_the_attacker():
    net = SimNetwork.from_topology(two_paths(routing="k-disjoint", k=2), now=lambda: 0.0)
    (key_id, key), = fetch(net, "KME-A", "SAE-A", "KME-B", "SAE-B")
    (seen,) = net.attacker_knowledge()
    assert (seen.node, seen.key_id, seen.share) == ("KME-M1", key_id, (1, 2))
    assert seen.material != key and len(seen.material) == len(key)
    for link in net.links.values():
        assert link.stored_bits == 100 * KEY - PER_HOP       # one share over each path


def test_a_compromised_endpoint_sees_the_whole_key_even_over_k_paths():
    topo = two_paths(routing="k-disjoint", k=2)
    nodes = tuple(NodeSpec(n.name, n.saes, n.name == "KME-B") for n in topo.nodes)
    net = SimNetwork.from_topology(Topology(nodes, topo.links, routing="k-disjoint"),
                                   now=lambda: 0.0)
    (key_id, key), = fetch(net, "KME-A", "SAE-A", "KME-B", "SAE-B")
    assert [(s.node, s.material) for s in net.attacker_knowledge()] == [("KME-B", key)]


def test_routing_avoids_a_link_in_alarm_and_503_names_it_when_it_cannot():
    topo = two_paths()
    net = SimNetwork.from_topology(topo, now=lambda: 0.0)
    net.links[frozenset(("KME-A", "KME-M1"))].eve_fraction = 0.6   # QBER alarm
    st = net.status("KME-A", "SAE-A", "SAE-B").body
    assert st["status_extension"]["qkdgate_routes"] == [["KME-A", "KME-M2", "KME-B"]]
    fetch(net, "KME-A", "SAE-A", "KME-B", "SAE-B")
    assert net.attacker_knowledge() == []                     # went around M1
    # the pinned pair has no way around: 503, the link named, nothing consumed
    before = {p: link.stored_bits for p, link in net.links.items()}
    r = net.enc_keys("KME-A", "SAE-A1", "SAE-B1", {"number": 1})
    assert r.status == 503 and r.body["details"][0]["alarms"] == [ALARM_QBER]
    assert r.body["details"][1]["link"] == ["KME-A", "KME-M1"]
    assert {p: link.stored_bits for p, link in net.links.items()} == before


def test_relay_is_all_or_nothing_over_the_route():
    net = SimNetwork.from_topology(line(["KME-A", "KME-M", "KME-B"], prefill=10),
                                   now=lambda: 0.0)
    net.links[frozenset(("KME-M", "KME-B"))].drain()
    r = net.enc_keys("KME-A", "SAE-A", "SAE-B", {"number": 1})
    assert r.status == 503 and r.body["message"] == "insufficient key material in the pool"
    assert net.links[frozenset(("KME-A", "KME-M"))].stored_bits == 10 * KEY   # untouched


def test_relay_runs_at_the_link_model_rate():
    t = [0.0]
    topo = line(["KME-A", "KME-M", "KME-B"], prefill=0, params=REALISTIC)
    net = SimNetwork.from_topology(topo, now=lambda: t[0])
    assert net.enc_keys("KME-A", "SAE-A", "SAE-B", {"number": 1}).status == 503
    t[0] = 10.0
    delivered = 0
    while net.enc_keys("KME-A", "SAE-A", "SAE-B", {"number": 128}).status == 200:
        delivered += 128
    skr = net.links[frozenset(("KME-A", "KME-M"))].rate()[0]
    # whole post-processing blocks only, then 512 link bits per relayed key
    blocks = int(skr * 10.0 // REALISTIC.block_bits)
    assert delivered == (blocks * REALISTIC.block_bits // PER_HOP) // 128 * 128


def test_without_a_topology_keys_are_never_relayed():
    from qkdgate.adapters.kmesim.linkmodel import QkdLink
    net = SimNetwork(now=lambda: 0.0)
    for k in ("KME-A", "KME-B", "KME-C"):
        net.add_kme(k)
        net.attach("SAE-" + k[-1], k)
    for a, b in (("KME-A", "KME-B"), ("KME-A", "KME-C"), ("KME-B", "KME-C")):
        net.connect(a, b, QkdLink(a, b)).fill(10)
    net.links[frozenset(("KME-A", "KME-B"))].up = False
    r = net.enc_keys("KME-A", "SAE-A", "SAE-B", {"number": 1})
    assert (r.status, r.body["message"]) == (503, "QKD link down")
    assert "qkdgate_routes" not in net.status("KME-A", "SAE-A", "SAE-C").body["status_extension"]
