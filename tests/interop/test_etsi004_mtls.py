"""Our ETSI GS QKD 004 client against the simulator's 004 service over
mutual TLS: both ends of a key stream read identical chunks by index."""

import pytest

from qkdgate.adapters.etsi004 import Etsi004Client, QoS, Status
from qkdgate.errors import KeySourceAuthError, KeyUnavailable, LocalProtocolError


@pytest.fixture
async def pair(sim):
    a = Etsi004Client(sim.credentials("SAE-A").settings(retries=0))
    b = Etsi004Client(sim.credentials("SAE-B").settings(retries=0))
    yield a, b
    await a.close()
    await b.close()


async def test_open_get_key_by_index_close(sim, pair):
    a, b = pair
    qos = QoS(key_chunk_size=32)
    ra = await a.open_connect("qkd://SAE-A", "qkd://SAE-B", qos)
    assert ra.status is Status.PEER_NOT_CONNECTED
    with pytest.raises(KeyUnavailable, match="PEER_NOT_CONNECTED"):
        await a.get_key(ra.key_stream_id, 0)
    rb = await b.open_connect("qkd://SAE-A", "qkd://SAE-B", qos, ra.key_stream_id)
    assert rb.status is Status.SUCCESSFUL and rb.key_stream_id == ra.key_stream_id
    a0, a1 = await a.get_key(ra.key_stream_id, 0), await a.get_key(ra.key_stream_id, 1)
    b1, b0 = await b.get_key(rb.key_stream_id, 1), await b.get_key(rb.key_stream_id, 0)
    assert (a0.key, a1.key) == (b0.key, b1.key) and a0.key != a1.key
    assert len(a0.key) == 32 and a0.index == 0 and a0.metadata["qkdgate_qber"] > 0
    with pytest.raises(KeyUnavailable):      # both read index 0: it is gone
        await a.get_key(ra.key_stream_id, 0)
    assert await a.close_stream(ra.key_stream_id) is Status.SUCCESSFUL
    assert await b.close_stream(rb.key_stream_id) is Status.SUCCESSFUL
    assert sim.qkd004.streams == {}


async def test_same_side_may_reread_an_index_after_a_lost_answer(sim, pair):
    a, b = pair
    ra = await a.open_connect("SAE-A", "SAE-B")
    await b.open_connect("SAE-A", "SAE-B", key_stream_id=ra.key_stream_id)
    first = await a.get_key(ra.key_stream_id, 0)
    again = await a.get_key(ra.key_stream_id, 0)
    assert first.key == again.key


async def test_ksid_in_use_and_qos_counter_proposal(sim, pair):
    a, b = pair
    ra = await a.open_connect("SAE-A", "SAE-B")
    with pytest.raises(LocalProtocolError, match="KSID_IN_USE"):
        await a.open_connect("SAE-A", "SAE-B", key_stream_id=ra.key_stream_id)
    big = await a.open_connect("SAE-A", "SAE-B", QoS(key_chunk_size=4096))
    assert big.status is Status.QOS_NOT_MET and big.qos.key_chunk_size == 1024


async def test_no_qkd_connection_and_insufficient_key(sim, pair):
    a, b = pair
    ra = await a.open_connect("SAE-A", "SAE-B")
    await b.open_connect("SAE-A", "SAE-B", key_stream_id=ra.key_stream_id)
    sim.exhaust()
    with pytest.raises(KeyUnavailable, match="INSUFFICIENT_KEY"):
        await a.get_key(ra.key_stream_id, 0)
    sim.set_link_up(False)
    with pytest.raises(KeyUnavailable, match="NO_QKD_CONNECTION"):
        await a.open_connect("SAE-A", "SAE-B")


async def test_metadata_size_too_small(sim, pair):
    a, b = pair
    ra = await a.open_connect("SAE-A", "SAE-B")
    await b.open_connect("SAE-A", "SAE-B", key_stream_id=ra.key_stream_id)
    need = await a.get_key(ra.key_stream_id, 0, metadata_size=2)
    assert isinstance(need, int) and need > 2
    chunk = await a.get_key(ra.key_stream_id, 0, metadata_size=need)
    assert len(chunk.key) == 32


async def test_unknown_sae_is_refused(sim):
    settings = sim.credentials("SAE-B").settings(retries=0)
    settings.update(url=sim.url("KME-A"), kme_id="KME-A")
    c = Etsi004Client(settings)
    try:
        with pytest.raises(KeySourceAuthError):
            await c.open_connect("SAE-B", "SAE-A")
    finally:
        await c.close()


async def test_open_connect_is_not_retried(sim):
    a = Etsi004Client(sim.credentials("SAE-A").settings(retries=3))
    sim.faults["KME-A"].drop, sim.faults["KME-A"].drop_path = 1, "open_connect"
    try:
        with pytest.raises(KeyUnavailable, match="network error"):
            await a.open_connect("SAE-A", "SAE-B")
        assert a.http.requests == 1
        assert len(sim.qkd004.streams) == 1   # the KME did open it: the answer was lost
    finally:
        await a.close()


async def test_three_kmes_full_mesh(state_dir, clock):
    from qkdgate.adapters.etsi014 import Etsi014KeySource
    from qkdgate.adapters.kmesim.server import KmeSimulator
    async with KmeSimulator.start(state_dir, kmes=("KME-A", "KME-B", "KME-C"),
                                  now=clock, prefill=10) as sim:
        assert len(sim.network.links) == 3
        a = Etsi014KeySource(sim.credentials("SAE-A").settings())
        c = Etsi014KeySource(sim.credentials("SAE-C").settings())
        try:
            keys = await a.get_new_keys("SAE-C")
            assert (await c.get_keys_by_id("SAE-A", [keys[0].key_id]))[0].key == keys[0].key
            sim.set_link_up(False, "KME-A", "KME-C")
            with pytest.raises(KeyUnavailable):
                await a.get_new_keys("SAE-C")
            assert len(await a.get_new_keys("SAE-B")) == 1    # other link unaffected
        finally:
            await a.close()
            await c.close()
