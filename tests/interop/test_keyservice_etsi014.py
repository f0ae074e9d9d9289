"""The key service's ETSI GS QKD 014 north-bound over real HTTPS with mutual
TLS on loopback, against two clients it did not write: the outside PyPI
client etsi-qkd-014-client (requests) and qkdgate's own ETSI 014 client.
Gateway A's and B's key services are fed the same generations in memory
(tests/keyservice/helpers.py), as two daemons would be by their protocol."""

from __future__ import annotations

import asyncio
import base64

import pytest

from qkdgate.adapters.etsi014 import Etsi014KeySource
from qkdgate.adapters.kmesim.pki import ensure_pki
from qkdgate.errors import KeyNotFound, KeySourceAuthError, KeyUnavailable
from qkdgate.keyservice.etsi014 import Etsi014Server
from tests.keyservice.helpers import QKD_IDS, Pair

client_mod = pytest.importorskip("etsi_qkd_014_client.client")


class Clock:
    def __init__(self) -> None:
        self.t = 0.0

    def __call__(self) -> float:
        return self.t


@pytest.fixture(scope="module")
def pki(tmp_path_factory):
    return ensure_pki(tmp_path_factory.mktemp("keysvc"), ["KS-A", "KS-B"],
                      ["SAE-A", "SAE-B", "SAE-C"], ("SAE-ROGUE",))


@pytest.fixture
async def gateways(pki):
    clock, pair = Clock(), Pair()
    servers = []
    for name, svc in (("KS-A", pair.a), ("KS-B", pair.b)):
        cred = pki.kme(name)
        srv = Etsi014Server(svc, host="127.0.0.1", port=0, cert=cred.cert, key=cred.key,
                            ca=pki.ca, clock=clock)
        await srv.start()
        servers.append(srv)
    yield pair, clock, servers[0], servers[1]
    for srv in servers:
        await srv.stop()


def pypi_client(pki, srv, sae):
    cred = pki.sae(sae)
    return client_mod.QKD014Client(f"127.0.0.1:{srv.port}", str(cred.cert), str(cred.key),
                                   str(pki.ca))


async def test_outside_client_enc_at_a_dec_at_b_identical_keys(pki, gateways):
    pair, clock, gw_a, gw_b = gateways
    pair.rekey(1, 0.0)
    clock.t = 1.0
    a, b = pypi_client(pki, gw_a, "SAE-A"), pypi_client(pki, gw_b, "SAE-B")
    code, st = await asyncio.to_thread(a.get_status, "SAE-B")
    assert code == 200 and st.key_size == 256 and st.stored_key_count == 32
    code, enc = await asyncio.to_thread(a.get_key, "SAE-B", number=3)
    assert code == 200 and len(enc.keys) == 3
    ext = enc.key_container_extension
    assert ext["qkdgate_generation"] == 1 and ext["qkdgate_qkd_key_IDs"] == list(QKD_IDS)
    assert ext["qkdgate_inputs"] == "ML-KEM-768+X25519+QKD" and not ext["qkdgate_single_source"]
    code, dec = await asyncio.to_thread(b.get_key_with_key_IDs, "SAE-A",
                                        [k.key_id for k in enc.keys])
    assert code == 200
    assert [(k.key_id, k.key) for k in dec.keys] == [(k.key_id, k.key) for k in enc.keys]
    assert all(len(base64.b64decode(k.key)) == 32 for k in dec.keys)
    # a GET enc_keys (no parameters) works too, and single use holds over HTTP
    code, one = await asyncio.to_thread(a.get_key, "SAE-B")
    assert code == 200 and len(one.keys) == 1
    code, again = await asyncio.to_thread(b.get_key_with_key_IDs, "SAE-A", [enc.keys[0].key_id])
    assert code == 400 and again.message == "one or more keys specified are not found on KME"


async def test_outside_client_is_refused_clearly_when_the_policy_blocks(pki, gateways):
    pair, clock, gw_a, _ = gateways
    pair.rekey(1, 0.0, qkd=False)          # a PQC-only generation; the pool is hybrid-required
    clock.t = 1.0
    a = pypi_client(pki, gw_a, "SAE-A")
    code, err = await asyncio.to_thread(a.get_key, "SAE-B", number=1)
    assert code == 503
    assert "policy hybrid-required refuses" in err.message and "ML-KEM-768+X25519" in err.message
    code, st = await asyncio.to_thread(a.get_status, "SAE-B")
    assert code == 200 and st.stored_key_count == 0


async def test_spec_errors_400_401(pki, gateways):
    pair, clock, gw_a, gw_b = gateways
    pair.rekey(1, 0.0)
    clock.t = 1.0
    a, c = pypi_client(pki, gw_a, "SAE-A"), pypi_client(pki, gw_b, "SAE-C")
    code, err = await asyncio.to_thread(a.get_key, "SAE-B", number=1, size=512)
    assert code == 400 and err.details == [{"qkdgate_key_size_of_pool": 256}]
    code, err = await asyncio.to_thread(a.get_key, "SAE-B", number=1, size=260)
    assert code == 400 and err.message == "size shall be a multiple of 8"
    code, enc = await asyncio.to_thread(a.get_key, "SAE-B", number=1)
    code, err = await asyncio.to_thread(c.get_key_with_key_IDs, "SAE-A", [enc.keys[0].key_id])
    assert code == 401 and err.message == "Unauthorized"      # a third SAE


async def test_qkdgate_client_against_the_key_service(pki, gateways):
    pair, clock, gw_a, gw_b = gateways
    pair.rekey(1, 0.0)
    clock.t = 1.0

    def source(sae, srv, kme):
        cred = pki.sae(sae)
        return Etsi014KeySource({"name": sae, "kind": "etsi014",
                                 "url": f"https://127.0.0.1:{srv.port}", "kme_id": kme,
                                 "retries": 0,
                                 "tls": {"cert": str(cred.cert), "key": str(cred.key),
                                         "ca": str(pki.ca)}})

    a, b, c = source("SAE-A", gw_a, "KS-A"), source("SAE-B", gw_b, "KS-B"), \
        source("SAE-C", gw_b, "KS-B")
    try:
        keys = await a.get_new_keys("SAE-B", number=2, size_bits=256)
        got = await b.get_keys_by_id("SAE-A", [k.key_id for k in keys])
        assert [k.key for k in got] == [k.key for k in keys]
        with pytest.raises(KeyNotFound):
            await b.get_keys_by_id("SAE-A", [keys[0].key_id])
        with pytest.raises(KeySourceAuthError):
            await c.get_keys_by_id("SAE-A", [keys[1].key_id])
        pair.a.peer_failed("gw-b", 1.0)
        with pytest.raises(KeyUnavailable):
            await a.get_new_keys("SAE-B", number=1, size_bits=256)
    finally:
        for s in (a, b, c):
            await s.close()


async def test_concurrent_enc_keys_at_both_gateways_over_https_never_collide(pki, gateways):
    pair, clock, gw_a, gw_b = gateways
    pair.rekey(1, 0.0)
    clock.t = 1.0

    def source(sae, srv, kme):
        cred = pki.sae(sae)
        return Etsi014KeySource({"name": sae, "kind": "etsi014", "retries": 0,
                                 "url": f"https://127.0.0.1:{srv.port}", "kme_id": kme,
                                 "tls": {"cert": str(cred.cert), "key": str(cred.key),
                                         "ca": str(pki.ca)},
                                 "options": {"reuse_connections": False}})

    a, b = source("SAE-A", gw_a, "KS-A"), source("SAE-B", gw_b, "KS-B")
    try:
        batches = await asyncio.gather(*[a.get_new_keys("SAE-B", number=1, size_bits=256)
                                         for _ in range(12)],
                                       *[b.get_new_keys("SAE-A", number=1, size_bits=256)
                                         for _ in range(12)])
        from_a = [k for batch in batches[:12] for k in batch]
        from_b = [k for batch in batches[12:] for k in batch]
        ids = [k.key_id for k in from_a + from_b]
        assert len(set(ids)) == 24 and len({k.key.reveal() for k in from_a + from_b}) == 24
        got_b = await b.get_keys_by_id("SAE-A", [k.key_id for k in from_a])
        got_a = await a.get_keys_by_id("SAE-B", [k.key_id for k in from_b])
        assert [k.key for k in got_b] == [k.key for k in from_a]
        assert [k.key for k in got_a] == [k.key for k in from_b]
    finally:
        await a.close()
        await b.close()
