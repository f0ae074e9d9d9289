"""The ETSI 004 key source against the simulator's real 004 service over
mutual TLS on loopback: key_IDs name (stream, index), master and slave read
identical chunks, and every 004 status ends as a key-source error. Tests
that take ``pair`` run on both bindings (etsi-binary, json); ``json_pair``
ones exercise what only the JSON binding can express (index null, HTTP
statuses); the binary framing's own cases are in test_etsi004_binary.py."""

import asyncio
import base64
import hashlib
import json
import uuid

import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from qkdgate.adapters import registry
from qkdgate.adapters.etsi004_source import (
    Etsi004KeySource,
    derive_stream_id,
    make_key_id,
    parse_key_id,
    stream_tag,
)
from qkdgate.adapters.kmesim.server import KmeSimulator
from qkdgate.errors import (
    ConfigError,
    KeyNotFound,
    KeySourceError,
    KeySourceProtocolError,
    KeySourceTimeout,
    KeyUnavailable,
    LocalProtocolError,
)
from qkdgate.interfaces import KeySource, StreamKeySource


async def _no_sleep(_delay: float) -> None:
    return None


def _source(sim, sae, binding="json", **options):
    retries = options.pop("retries", 2)
    return Etsi004KeySource(sim.credentials(sae).settings(retries=retries, binding=binding,
                                                          **options),
                            sleep=_no_sleep)


@pytest.fixture(params=["etsi-binary", "json"])
def binding(request):
    return request.param


@pytest.fixture
async def pair(sim, binding):
    a, b = _source(sim, "SAE-A", binding), _source(sim, "SAE-B", binding)
    yield a, b
    await a.close()
    await b.close()


@pytest.fixture
async def json_pair(sim):
    a, b = _source(sim, "SAE-A"), _source(sim, "SAE-B")
    yield a, b
    await a.close()
    await b.close()


def _raw(doc):
    return (200, json.dumps(doc).encode(), "application/json")


# ------------------------------------------------------------ identifiers

def test_stream_id_is_the_documented_hash_of_the_sorted_pair():
    h = hashlib.sha256(b"qkdgate etsi004 key_stream_ID v1")
    for sae in (b"SAE-A", b"SAE-B"):
        h.update(len(sae).to_bytes(2, "big") + sae)
    d = bytearray(h.digest()[:16])
    d[6] = (d[6] & 0x0F) | 0x80
    d[8] = (d[8] & 0x3F) | 0x80
    assert derive_stream_id("SAE-B", "SAE-A") == derive_stream_id("SAE-A", "SAE-B") \
        == str(uuid.UUID(bytes=bytes(d)))
    assert uuid.UUID(derive_stream_id("SAE-A", "SAE-B")).version == 8
    # length prefixes: ("AB", "C") and ("A", "BC") must not collide
    assert derive_stream_id("AB", "C") != derive_stream_id("A", "BC")


def test_key_id_layout():
    ksid = derive_stream_id("SAE-A", "SAE-B")
    tag = stream_tag(ksid)
    assert tag == int.from_bytes(hashlib.sha256(b"qkdgate etsi004 key_ID tag v1"
                                                + uuid.UUID(ksid).bytes).digest()[:6], "big")
    kid = make_key_id(tag, 0x2ABCDEF, 0x0102030405)
    u = uuid.UUID(kid)
    assert u.version == 8 and u.variant == uuid.RFC_4122
    assert u.bytes[:6] == tag.to_bytes(6, "big")            # octets 0-5: stream tag
    assert u.bytes[10:] == (0x0102030405).to_bytes(6, "big")  # octets 10-15: index
    assert parse_key_id(kid) == (tag, 0x2ABCDEF, 0x0102030405)
    assert parse_key_id(kid.upper()) == (tag, 0x2ABCDEF, 0x0102030405)
    with pytest.raises(KeySourceProtocolError, match="UUIDv8"):
        parse_key_id(str(uuid.uuid4()))
    with pytest.raises(LocalProtocolError):
        parse_key_id("not-a-uuid")


# ------------------------------------------------------------ key flow

async def test_master_and_slave_read_identical_keys(sim, pair):
    a, b = pair
    assert a.local_sae_id == "SAE-A" and b.local_sae_id == "SAE-B"   # from the certificate CN
    assert a.stream_id("SAE-B") == b.stream_id("SAE-A")
    await b.connect("SAE-A")
    keys = await a.get_new_keys("SAE-B", number=3)
    assert list(sim.qkd004.streams) == [a.stream_id("SAE-B")]
    assert [parse_key_id(k.key_id)[2] for k in keys] == [0, 1, 2]
    assert len({k.key_id for k in keys}) == 3 and all(len(k.key) == 32 for k in keys)
    got = await b.get_keys_by_id("SAE-A", [keys[2].key_id, keys[0].key_id, keys[1].key_id])
    assert [k.key_id for k in got] == [keys[2].key_id, keys[0].key_id, keys[1].key_id]
    assert [k.key.reveal() for k in got] == [keys[i].key.reveal() for i in (2, 0, 1)]
    assert len({k.key.reveal() for k in keys}) == 3
    more = await a.get_new_keys("SAE-B")
    assert parse_key_id(more[0].key_id)[2] == 3
    st = await a.status("SAE-B")
    assert st.link_up and st.alarms == () and 0 < st.qber < 0.08
    assert st.extensions["etsi004_next_index"] == 4 and st.key_size == 256
    await a.close()
    await b.close()
    assert sim.qkd004.streams == {}       # both CLOSEd: the KME dropped the stream


async def test_registry_builds_it_and_config_knows_the_kind(sim):
    from qkdgate.gateway.config.model import BUILTIN_KEY_SOURCE_KINDS, KIND_NEEDS_URL
    assert "etsi004" in registry.available_kinds()
    assert "etsi004" in BUILTIN_KEY_SOURCE_KINDS and "etsi004" in KIND_NEEDS_URL
    src = registry.create_key_source("etsi004", sim.credentials("SAE-A").settings())
    assert isinstance(src, Etsi004KeySource) and isinstance(src, KeySource)
    assert isinstance(src, StreamKeySource)
    await src.close()


async def test_configured_stream_id_and_key_size(sim, binding):
    ksid = "1b4e28ba-2fa1-11d2-883f-0016d3cca427"
    a = _source(sim, "SAE-A", binding, key_stream_id=ksid, key_size=512)
    b = _source(sim, "SAE-B", binding, key_stream_id={"SAE-A": ksid.upper()}, key_size=512)
    try:
        await b.connect("SAE-A")
        keys = await a.get_new_keys("SAE-B", 1, 512)
        assert list(sim.qkd004.streams) == [ksid] and len(keys[0].key) == 64
        assert (await b.get_keys_by_id("SAE-A", [keys[0].key_id]))[0].key == keys[0].key
        with pytest.raises(LocalProtocolError, match="512-bit"):
            await a.get_new_keys("SAE-B", 1, 256)
    finally:
        await a.close()
        await b.close()


async def test_key_size_mismatch_between_gateways_is_named(sim, binding):
    a, b = _source(sim, "SAE-A", binding), _source(sim, "SAE-B", binding, key_size=512)
    try:
        await a.connect("SAE-B")
        with pytest.raises(KeySourceProtocolError, match="key_size must match"):
            await b.connect("SAE-A")
    finally:
        await a.close()
        await b.close()


async def test_key_id_from_another_stream_is_refused(sim, pair):
    a, b = pair
    await b.connect("SAE-A")
    await a.get_new_keys("SAE-B")
    before = b.client.requests
    foreign = make_key_id(stream_tag(derive_stream_id("SAE-A", "SAE-X")), 0, 0)
    with pytest.raises(KeyNotFound, match="another key stream"):
        await b.get_keys_by_id("SAE-A", [foreign])
    with pytest.raises(KeySourceProtocolError, match="UUIDv8"):
        await b.get_keys_by_id("SAE-A", [str(uuid.uuid4())])     # an ETSI 014 key_ID
    with pytest.raises(LocalProtocolError):
        await b.get_keys_by_id("SAE-A", ["../etc"])
    assert b.client.requests == before     # refused before asking the KME


async def test_index_past_what_is_available(sim, json_pair):
    a, b = json_pair
    await b.connect("SAE-A")
    sim.exhaust(refill=False)
    with pytest.raises(KeyUnavailable, match="insufficient key"):
        await a.get_new_keys("SAE-B")
    tag = stream_tag(a.stream_id("SAE-B"))
    with pytest.raises(KeyUnavailable, match="insufficient key"):
        await b.get_keys_by_id("SAE-A", [make_key_id(tag, 1, 5)])
    # the simulator refuses reading more than 1024 chunks ahead: HTTP 400
    with pytest.raises(KeySourceProtocolError, match="HTTP 400"):
        await b.get_keys_by_id("SAE-A", [make_key_id(tag, 1, 100000)])
    with pytest.raises(KeyNotFound, match="beyond"):
        await b.get_keys_by_id("SAE-A", [make_key_id(tag, 1, 2**40)])
    sim.fill(100)
    keys = await a.get_new_keys("SAE-B")        # resynchronised after status 2
    assert (await b.get_keys_by_id("SAE-A", [keys[0].key_id]))[0].key == keys[0].key


async def test_an_index_read_twice(sim, pair):
    a, b = pair
    await b.connect("SAE-A")
    k0, k1 = await a.get_new_keys("SAE-B", 2)
    # The second reader's answer is lost after the KME dropped the chunk: the
    # retry finds nothing, as with a lost ETSI 014 dec_keys (the rekey aborts,
    # nobody uses the key). The first reader's retry does get it back
    # (test_master_lost_answer_never_splits_a_key).
    sim.faults["KME-B"].drop, sim.faults["KME-B"].drop_path = 1, "get_key"
    with pytest.raises(KeyUnavailable, match="insufficient key"):
        await b.get_keys_by_id("SAE-A", [k1.key_id])
    assert sim.faults["KME-B"].drop == 0
    # both sides read index 0: the KME no longer holds it
    assert (await b.get_keys_by_id("SAE-A", [k0.key_id]))[0].key == k0.key
    with pytest.raises(KeyUnavailable):
        await b.get_keys_by_id("SAE-A", [k0.key_id])
    with pytest.raises(LocalProtocolError, match="without duplicates"):
        await b.get_keys_by_id("SAE-A", [k1.key_id, k1.key_id.upper()])


async def test_master_lost_answer_never_splits_a_key(sim, json_pair):
    a, b = json_pair
    await b.connect("SAE-A")
    sim.faults["KME-A"].drop, sim.faults["KME-A"].drop_path = 1, "get_key"
    with pytest.raises(KeyUnavailable, match="network error"):
        await a.get_new_keys("SAE-B")         # first read (index null) is never repeated
    k = (await a.get_new_keys("SAE-B"))[0]    # resynchronised: the KME's next index
    assert parse_key_id(k.key_id)[2] == 1
    sim.faults["KME-A"].drop = 1               # an explicit index is retried: same chunk
    k2 = (await a.get_new_keys("SAE-B"))[0]
    assert parse_key_id(k2.key_id)[2] == 2
    got = await b.get_keys_by_id("SAE-A", [k.key_id, k2.key_id])
    assert [g.key for g in got] == [k.key, k2.key]


# ------------------------------------------------------------ lifecycle

async def test_peer_not_connected_then_joins(sim, pair):
    a, b = pair
    with pytest.raises(KeyUnavailable, match="has not opened"):
        await a.get_new_keys("SAE-B")
    st = await a.status("SAE-B")
    assert "PEER_NOT_CONNECTED" in st.alarms and st.extensions["etsi004_open"] is True
    await b.connect("SAE-A")
    keys = await a.get_new_keys("SAE-B")
    assert (await b.get_keys_by_id("SAE-A", [keys[0].key_id]))[0].key == keys[0].key
    assert (await a.status("SAE-B")).alarms == ()


async def test_restart_without_close_reopens_and_key_ids_stay_unique(sim, json_pair):
    a, b = json_pair
    await b.connect("SAE-A")
    old = await a.get_new_keys("SAE-B", 2)
    await a.client.close()                      # crash: no CLOSE, the KME still holds us
    a2 = _source(sim, "SAE-A")
    try:
        new = await a2.get_new_keys("SAE-B", 2)      # status 5 -> CLOSE -> OPEN
        assert [parse_key_id(k.key_id)[2] for k in new] == [2, 3]
        assert not {k.key_id for k in old} & {k.key_id for k in new}
        got = await b.get_keys_by_id("SAE-A", [k.key_id for k in old + new])
        assert [g.key for g in got] == [k.key for k in old + new]
    finally:
        await a2.close()


async def test_stream_lost_at_the_kme_is_reopened(sim, pair):
    a, b = pair
    await b.connect("SAE-A")
    await a.get_new_keys("SAE-B")
    sim.qkd004.streams.clear()                  # the KME restarted
    with pytest.raises(KeyUnavailable, match="no QKD connection"):
        await a.get_new_keys("SAE-B")
    with pytest.raises(KeyUnavailable, match="has not opened"):
        await a.get_new_keys("SAE-B")           # reopened; the slave has not re-joined
    await b.connect("SAE-A", reopen=True)
    keys = await a.get_new_keys("SAE-B")
    assert parse_key_id(keys[0].key_id)[2] == 0     # a new stream starts at index 0 ...
    assert (await b.get_keys_by_id("SAE-A", [keys[0].key_id]))[0].key == keys[0].key


async def test_link_down(sim, pair):
    a, _ = pair
    sim.set_link_up(False)
    with pytest.raises(KeyUnavailable, match="no QKD connection"):
        await a.get_new_keys("SAE-B")
    st = await a.status("SAE-B")
    assert not st.link_up and "NO_QKD_CONNECTION" in st.alarms
    assert st.stored_key_count == 0 and st.extensions["etsi004_pool_known"] is False


async def test_qos_counter_proposal_keeping_the_chunk_size_is_accepted(sim, binding):
    a = _source(sim, "SAE-A", binding, qos={"min_bps": 4 * 10**9, "priority": 3})
    try:
        await a.connect("SAE-B")                 # status 7, counter min_bps, reopened
        st = await a.status("SAE-B")
        assert st.extensions["etsi004_qos"]["min_bps"] < 4 * 10**9
        assert st.extensions["etsi004_qos"]["priority"] == 3
    finally:
        await a.close()


# status answered to a call -> the error the caller sees
GET_KEY_STATUS = [
    (2, KeyUnavailable, "insufficient key"), (3, KeyUnavailable, "has not opened"),
    (4, KeyUnavailable, "no QKD connection"), (6, KeySourceTimeout, "status 6"),
    (8, KeySourceProtocolError, "status 8 twice"), (9, KeySourceProtocolError, "unknown status"),
    (1, KeySourceProtocolError, "not allowed"), (7, KeySourceProtocolError, "not allowed"),
]


@pytest.mark.parametrize("status,error,match", GET_KEY_STATUS, ids=[str(s[0]) for s in GET_KEY_STATUS])
async def test_get_key_status_mapping(sim, json_pair, status, error, match):
    a, b = json_pair
    await b.connect("SAE-A")
    await a.connect("SAE-B")
    sim.faults["KME-A"].raw = _raw({"status": status, "index": 0, "metadata_size": 64,
                                    "key_stream_ID": a.stream_id("SAE-B")})
    with pytest.raises(error, match=match):
        await a.get_new_keys("SAE-B")


OPEN_STATUS = [
    (2, KeyUnavailable, "INSUFFICIENT_KEY"), (4, KeyUnavailable, "status 4"),
    (5, KeyUnavailable, "in use"), (6, KeySourceTimeout, "TIMEOUT"),
    (7, KeyUnavailable, "QoS not met"), (8, KeySourceProtocolError, "not allowed"),
]


@pytest.mark.parametrize("status,error,match", OPEN_STATUS, ids=[str(s[0]) for s in OPEN_STATUS])
async def test_open_connect_status_mapping(sim, json_pair, status, error, match):
    a, _ = json_pair
    qos = {"key_chunk_size": 16, "max_bps": 0, "min_bps": 0, "jitter": 0, "priority": 0,
           "timeout": 0, "ttl": 0}
    sim.faults["KME-A"].raw = _raw({"status": status, "key_stream_ID": a.stream_id("SAE-B"),
                                    "qos": qos})
    with pytest.raises(error, match=match):
        await a.connect("SAE-B")
    assert a._streams["SAE-B"].open is False


def test_bad_options(sim):
    settings = sim.credentials("SAE-A").settings
    cases = [({"key_size": 250}, "key_size"), ({"key_stream_id": "nope"}, "key_stream_id"),
             ({"qos": {"key_chunk_size": 8}}, "options.qos.key_chunk_size"),
             ({"qos": {"ttl": -1}}, "options.qos"), ({"colour": 1}, "options.colour"),
             ({"local_sae_id": "a/b"}, "local_sae_id"), ({"uri_scheme": "1x"}, "uri_scheme"),
             ({"accept_qos_counter": "false"}, "accept_qos_counter")]
    for opts, path in cases:
        with pytest.raises(ConfigError) as ei:
            Etsi004KeySource(settings(**opts))
        assert path in (ei.value.path or ""), (opts, ei.value)


async def test_caller_misuse(sim, pair):
    a, _ = pair
    with pytest.raises(LocalProtocolError):
        await a.get_new_keys("SAE-B", additional_slave_sae_ids=["SAE-C"])
    with pytest.raises(LocalProtocolError):
        await a.get_new_keys("SAE-B", number=0)
    with pytest.raises(LocalProtocolError):
        await a.get_new_keys("SAE-A")            # ourselves
    with pytest.raises(LocalProtocolError):
        await a.get_new_keys("SAE B/../x")


# ------------------------------------------------------------ hostile answers

KSID = derive_stream_id("SAE-A", "SAE-B")
ints = st.integers(-3, 12) | st.integers(2**31, 2**49) | st.none() | st.booleans() | st.text(max_size=4)
qos_docs = st.fixed_dictionaries({}, optional={
    "key_chunk_size": st.sampled_from([32, 16, 0, -1, "32", 2**40]),
    "min_bps": ints, "ttl": ints, "metadata_mimetype": st.text(max_size=5) | st.integers()})
doc_004 = st.fixed_dictionaries({}, optional={
    "status": ints | st.sampled_from([0, 0, 1, 2, 5, 7, 8]),
    "key_stream_ID": st.sampled_from([KSID, KSID.upper(), str(uuid.UUID(int=7)), "x", None]),
    "qos": qos_docs | ints,
    "index": ints | st.sampled_from([0, 1, 2**32 - 1]),
    "key_buffer": st.sampled_from([base64.b64encode(b"k" * 32).decode(),
                                   base64.b64encode(b"k" * 31).decode(), "", "%%", "a b="]) | ints,
    "metadata": st.none() | st.dictionaries(st.text(max_size=3), ints, max_size=2) | ints,
    "metadata_size": ints,
})
bodies = doc_004.map(lambda d: json.dumps(d).encode()) | st.binary(max_size=64) \
    | st.sampled_from([b"[]", b"null", b'{"status": 0', b"<html>401</html>"])
answers = st.tuples(st.sampled_from([200, 200, 200, 200, 400, 401, 500, 503, 302]), bodies,
                    st.sampled_from(["application/json", "text/html"]))


@pytest.fixture(scope="module")
def fuzz_state(tmp_path_factory):
    return tmp_path_factory.mktemp("kmesim-004-fuzz")


@settings(max_examples=25, deadline=None, derandomize=True,
          suppress_health_check=[HealthCheck.function_scoped_fixture, HealthCheck.too_slow])
@given(answer=answers, call=st.sampled_from(["master", "slave", "status", "connect"]),
       opened=st.booleans())
def test_hostile_answers_raise_only_key_source_errors(fuzz_state, answer, call, opened):
    async def scenario():
        async with KmeSimulator.start(fuzz_state, prefill=5) as sim:
            a = _source(sim, "SAE-A", retries=1)     # JSON answers: the json binding
            b = _source(sim, "SAE-B", retries=1)
            try:
                if opened:
                    await b.connect("SAE-A")
                    await a.connect("SAE-B")
                sim.faults["KME-A"].raw = answer
                tag = stream_tag(KSID)
                if call == "master":
                    keys = await a.get_new_keys("SAE-B", number=2)
                    assert len(keys) == 2 and all(len(k.key) == 32 for k in keys)
                    assert all(parse_key_id(k.key_id)[0] == tag for k in keys)
                elif call == "slave":
                    kid = make_key_id(tag, 1, 0)
                    keys = await a.get_keys_by_id("SAE-B", [kid])
                    assert [k.key_id for k in keys] == [kid] and len(keys[0].key) == 32
                elif call == "status":
                    await a.status("SAE-B")
                else:
                    await a.connect("SAE-B", reopen=True)
            except KeySourceError:
                pass
            finally:
                sim.faults["KME-A"].raw = None
                await a.close()
                await b.close()
    asyncio.run(asyncio.wait_for(scenario(), 30))


# ------------------------------------------------------------ configuration

async def test_yaml_config_with_kind_etsi004_builds_a_working_source(sim, tmp_path, binding):
    from pathlib import Path

    from qkdgate.gateway.config.model import parse_config
    base = (Path(__file__).parent.parent / "config" / "good-minimal.yaml").read_text()
    cred = sim.credentials("SAE-A")
    url = cred.url004 if binding == "etsi-binary" else cred.url
    entry = (f"  - name: kme-a\n    kind: etsi004\n    url: {url}\n    kme_id: KME-A\n"
             f"    binding: {binding}\n"
             f"    tls: {{cert: {cred.cert}, key: {cred.key}, ca: {cred.ca}}}\n"
             f"    options: {{key_size: 256, qos: {{priority: 1}}}}\n")
    start = base.index("  - name: kme-a")
    text = base[:start] + entry + base[base.index("tunnels:"):]
    cfg = parse_config(text, str(tmp_path / "gw.yaml"))
    ks = cfg.key_sources[0]
    assert ks.kind == "etsi004" and ks.binding == binding
    a = registry.create_key_source(ks.kind, ks)
    assert a.binding == binding
    b = _source(sim, "SAE-B", binding)
    try:
        await b.connect("SAE-A")
        keys = await a.get_new_keys("SAE-B", 1, cfg.peers[0].qkd.key_size)
        assert (await b.get_keys_by_id("SAE-A", [keys[0].key_id]))[0].key == keys[0].key
    finally:
        await a.close()
        await b.close()
    with pytest.raises(ConfigError, match="unknown key source kind"):
        parse_config(text.replace("kind: etsi004", "kind: etsi04"), str(tmp_path / "gw.yaml"))
