"""The trusted-node relay over real HTTPS (issue 13): every node of a topology
serves the ETSI GS QKD 020 draft API on its own loopback port with mutual
TLS; a hop is a POST of the ext_key_container, acknowledged by the target
KME; a failure voids the keys so none is half-delivered; bad input from a
neighbour KME gets a specific error and loses nothing."""

from __future__ import annotations

import base64
import json
import os
import ssl
import stat
from pathlib import Path

import aiohttp
import pytest

from qkdgate.adapters.etsi014 import Etsi014KeySource
from qkdgate.adapters.kmesim import relay
from qkdgate.adapters.kmesim.server import KmeSimulator
from qkdgate.adapters.kmesim.topology import line
from qkdgate.adapters.tls import client_context
from qkdgate.errors import KeySourceError
from qkdgate.gateway.config.topology import load_topology

TOPOLOGIES = Path(__file__).resolve().parents[2] / "docs" / "topologies"
ROUTE = ("KME-A", "KME-M", "KME-B")


@pytest.fixture
async def sim(tmp_path):
    topo = line(ROUTE, compromised=("KME-M",), prefill=200)
    async with KmeSimulator.start(tmp_path, topology=topo, qkd004_binary=False,
                                  relay_timeout=2.0) as s:
        yield s


@pytest.fixture
async def saes(sim):
    master = Etsi014KeySource(sim.credentials("SAE-A").settings(retries=0))
    slave = Etsi014KeySource(sim.credentials("SAE-B").settings(retries=0))
    yield master, slave
    await master.close()
    await slave.close()


async def one_key(master, slave):
    got = await master.get_new_keys("SAE-B", number=1, size_bits=256)
    back = await slave.get_keys_by_id("SAE-A", [k.key_id for k in got])
    assert [(k.key_id, k.key.reveal()) for k in back] == [(k.key_id, k.key.reveal()) for k in got]
    return got[0]


def session_as(sim, name, *, rogue=False):
    ik = sim.interkme
    cred = ik.pki.rogue(name) if rogue else ik.pki.kme(name)
    ctx = client_context(cred.cert, cred.key, ik.pki.ca)
    return aiohttp.ClientSession(connector=aiohttp.TCPConnector(ssl=ctx))


async def post(sim, as_node, to_node, path, body, *, rogue=False):
    async with session_as(sim, as_node, rogue=rogue) as s, \
            s.post(sim.interkme.url(to_node) + path, data=body, server_hostname=to_node) as r:
        text = await r.text()
        return r.status, (json.loads(text) if text else None)


def first_hop(sim, key_id="3fa85f64-5717-4562-b3fc-2c963f66afa6", material=None):
    hop = relay.Hop(key_id, "SAE-A", "SAE-B", ROUTE, 0, ack_url=sim.interkme.ack_url("KME-A"))
    material = material or os.urandom(32)
    return hop, material, sim.network.seal(hop, material)


def held(sim, node="KME-B"):
    return dict(sim.network.kmes[node].issued)


async def test_each_hop_is_an_https_post_acknowledged_by_the_target_kme(sim, saes):
    key = await one_key(*saes)
    await sim.interkme.settle()
    # KME-M held the key in the clear while relaying it (it is compromised)
    (seen,) = sim.network.attacker_knowledge("KME-M")
    assert (seen.key_id, seen.material) == (key.key_id, key.key.reveal())
    # the target KME acknowledged "relayed" to the initiator's callback
    assert [(node, a.key_ids, a.status) for node, a in sim.interkme.acks] == \
        [("KME-A", (key.key_id,), relay.RELAYED)]
    # every node serves the draft's versions path over mutual TLS
    for node in ROUTE:
        assert await post(sim, "KME-A", node, relay.EXT_KEYS_PATH, b"{}") == \
            (400, {"message": "malformed ETSI 020 ext_key_container: KeyError"})
        async with session_as(sim, "KME-A") as s, \
                s.get(sim.interkme.url(node) + relay.VERSIONS_PATH, server_hostname=node) as r:
            assert r.status == 200 and (await r.json()) == {"versions": ["v1"]}
    # one CA and one certificate per node, private keys 0600
    for node in ROUTE:
        assert stat.S_IMODE(os.stat(sim.interkme.pki.kme(node).key).st_mode) == 0o600


async def test_a_client_certificate_from_another_ca_never_reaches_http(sim):
    with pytest.raises((aiohttp.ClientConnectorError, aiohttp.ClientOSError, ssl.SSLError)):
        await post(sim, "KME-ROGUE", "KME-M", relay.EXT_KEYS_PATH, b"{}", rogue=True)


async def test_a_node_that_is_not_the_hops_sender_gets_401_and_spends_nothing(sim, saes):
    hop, material, wire = first_hop(sim)
    status, body = await post(sim, "KME-B", "KME-M", relay.EXT_KEYS_PATH, wire)
    assert status == 401 and "relay hop from KME-A sent by KME-B" in body["message"]
    assert held(sim) == {}
    # the link key was not spent: the real sender's POST of the same container works
    assert (await post(sim, "KME-A", "KME-M", relay.EXT_KEYS_PATH, wire))[0] == 202
    await sim.interkme.settle()
    assert held(sim)[hop.key_id].material == material


async def test_a_bad_tag_gets_401_and_nothing_is_held_or_forwarded(sim, saes):
    hop, _material, wire = first_hop(sim)
    doc = json.loads(wire)
    v = bytearray(base64.b64decode(doc["keys"][0]["value"]))
    v[0] ^= 1                                    # one bit of the padded key
    doc["keys"][0]["value"] = base64.b64encode(bytes(v)).decode()
    status, body = await post(sim, "KME-A", "KME-M", relay.EXT_KEYS_PATH, json.dumps(doc))
    assert status == 401 and "Poly1305 tag mismatch" in body["message"]
    await sim.interkme.settle()
    assert held(sim) == {} and held(sim, "KME-A") == {}
    assert sim.network.attacker_knowledge("KME-M") == []
    await one_key(*saes)                          # the relay still works


async def test_a_replayed_container_gets_400_and_delivers_nothing_twice(sim, saes):
    hop, material, wire = first_hop(sim)
    assert (await post(sim, "KME-A", "KME-M", relay.EXT_KEYS_PATH, wire))[0] == 202
    await sim.interkme.settle()
    master_saes = {k: v.pending for k, v in held(sim).items()}
    status, body = await post(sim, "KME-A", "KME-M", relay.EXT_KEYS_PATH, wire)
    assert status == 400 and "spent link key_ID (replayed" in body["message"]
    await sim.interkme.settle()
    assert {k: v.pending for k, v in held(sim).items()} == master_saes
    assert len(sim.network.attacker_knowledge("KME-M")) == 1


@pytest.mark.parametrize("body", [b"\x00\xff garbage", b"[1, 2]", b'{"keys": "x"}',
                                  b"{" * 5000 + b"}" * 5000])
async def test_garbage_gets_400_naming_the_container(sim, saes, body):
    status, reply = await post(sim, "KME-A", "KME-M", relay.EXT_KEYS_PATH, body)
    assert status == 400 and reply["message"].startswith("malformed ETSI 020 ext_key_container")
    for path, what in ((relay.ACK_PATH, "ack"), (relay.VOID_PATH, "void")):
        status, reply = await post(sim, "KME-B", "KME-A", path, body)
        assert status == 400 and reply["message"].startswith(f"malformed ETSI 020 {what}")
    await one_key(*saes)


async def test_a_hop_refused_downstream_voids_the_key_everywhere(sim, saes):
    master, _slave = saes
    sim.interkme.faults["KME-M"].tamper = True   # M forwards a key B cannot authenticate
    with pytest.raises(KeySourceError):
        await master.get_new_keys("SAE-B", number=2, size_bits=256)
    await sim.interkme.settle()
    assert held(sim) == {}
    statuses = [a.status for _node, a in sim.interkme.acks]
    assert relay.FAILED in statuses and relay.RELAYED not in statuses
    sim.interkme.faults["KME-M"].tamper = False
    await one_key(*saes)


async def test_a_lost_ack_voids_the_key_the_target_already_held(sim, saes):
    """The key reached KME-B but its ack never reached KME-A: KME-A answers
    503 and voids; KME-B discards the key and refuses a late copy."""
    master, _slave = saes
    sim.interkme.faults["KME-B"].drop_ack = True
    with pytest.raises(KeySourceError):
        await master.get_new_keys("SAE-B", number=1, size_bits=256)
    await sim.interkme.settle()
    assert held(sim) == {}
    ((node, ack),) = sim.interkme.acks
    assert (node, ack.status) == ("KME-A", relay.VOIDED)
    sim.interkme.faults["KME-B"].drop_ack = False
    await one_key(*saes)


async def test_a_silent_trusted_node_times_out_and_the_target_holds_nothing(sim, saes):
    master, _slave = saes
    sim.interkme.faults["KME-M"].blackhole = True
    with pytest.raises(KeySourceError):
        await master.get_new_keys("SAE-B", number=1, size_bits=256)
    await sim.interkme.settle()
    assert held(sim) == {}
    assert [a.status for _n, a in sim.interkme.acks] == [relay.NOT_PRESENT]


async def test_void_from_a_kme_that_is_not_the_initiators_is_refused(sim, saes):
    key = await saes[0].get_new_keys("SAE-B", number=1, size_bits=256)
    body = relay.void_body([key[0].key_id], "SAE-A", ["SAE-B"], sim.interkme.ack_url("KME-M"))
    status, reply = await post(sim, "KME-M", "KME-B", relay.VOID_PATH, body)
    assert status == 401 and "not the KME of initiator SAE-A" in reply["message"]
    back = await saes[1].get_keys_by_id("SAE-A", [key[0].key_id])
    assert back[0].key.reveal() == key[0].key.reveal()


async def test_k_disjoint_shares_travel_separately_and_join_at_the_target(tmp_path):
    async with KmeSimulator.start(tmp_path, topology=load_topology(TOPOLOGIES / "k-disjoint.yaml"),
                                  qkd004_binary=False) as sim:
        master = Etsi014KeySource(sim.credentials("SAE-A").settings())
        slave = Etsi014KeySource(sim.credentials("SAE-B").settings())
        try:
            key = await one_key(master, slave)
        finally:
            await master.close()
            await slave.close()
        await sim.interkme.settle()
        (share,) = sim.network.attacker_knowledge("KME-M1")
        assert share.share == (1, 2) and share.material != key.key.reveal()
        assert [a.status for _n, a in sim.interkme.acks] == [relay.RELAYED]
