"""Our ETSI 014 client against our KME simulator over real HTTPS with
mutual TLS on loopback: the master/slave flow and every error path."""

import asyncio
import logging

import pytest

from qkdgate.adapters.etsi014 import Etsi014KeySource
from qkdgate.adapters.registry import create_key_source
from qkdgate.errors import (
    ConfigError,
    KeyNotFound,
    KeySourceAuthError,
    KeySourceProtocolError,
    KeySourceTimeout,
    KeyUnavailable,
    LocalProtocolError,
)
from qkdgate.interfaces import KeySource


async def test_master_slave_identical_keys_each_delivered_once(sim, master, slave):
    keys = await master.get_new_keys("SAE-B", number=3, size_bits=256)
    assert len({k.key_id for k in keys}) == 3
    got = await slave.get_keys_by_id("SAE-A", [k.key_id for k in reversed(keys)])
    assert [k.key_id for k in got] == [k.key_id for k in reversed(keys)]   # request order
    assert [k.key for k in got] == [k.key for k in reversed(keys)]
    assert all(len(k.key) == 32 for k in got)
    with pytest.raises(KeyNotFound):               # delivered once to the slave
        await slave.get_keys_by_id("SAE-A", [keys[0].key_id])
    assert sim.network.kmes["KME-B"].issued == {}  # nothing left at the slave KME


async def test_status_reports_pool_and_link_health(sim, master):
    st = await master.status("SAE-B")
    assert (st.source_kme_id, st.target_kme_id, st.master_sae_id, st.slave_sae_id) == \
        ("KME-A", "KME-B", "SAE-A", "SAE-B")
    assert st.stored_key_count == 1000 and st.link_up and st.alarms == ()
    assert 0.01 < st.qber < 0.03 and st.recent_rate > 0
    await master.get_new_keys("SAE-B", number=10)
    assert (await master.status("SAE-B")).stored_key_count == 990


async def test_connection_reuse(sim, make_source):
    src = make_source("SAE-A")
    for _ in range(5):
        await src.status("SAE-B")
    conn = src.http._session.connector
    assert sum(len(v) for v in conn._conns.values()) == 1   # one pooled keep-alive connection
    await src.close()


async def test_registry_builds_the_client_from_settings(sim):
    src = create_key_source("etsi014", sim.credentials("SAE-A").settings())
    assert isinstance(src, KeySource) and isinstance(src, Etsi014KeySource)
    try:
        assert (await src.status("SAE-B")).slave_sae_id == "SAE-B"
    finally:
        await src.close()


async def test_idq_profile_uses_get_enc_keys(sim, make_source):
    seen = []
    net_enc = sim.network.enc_keys
    sim.network.enc_keys = lambda *a: (seen.append(a[3]), net_enc(*a))[1]
    src = make_source("SAE-A", profile="idq-cerberis-xgr")
    keys = await src.get_new_keys("SAE-B", number=2, size_bits=128)
    assert seen == [{"number": 2, "size": 128}] and len(keys[0].key) == 16
    await src.close()


async def test_multicast_additional_slave(state_dir, clock):
    from qkdgate.adapters.kmesim.server import KmeSimulator
    async with KmeSimulator.start(state_dir, saes={"SAE-A": "KME-A", "SAE-B": "KME-B",
                                                   "SAE-C": "KME-B"},
                                  now=clock, prefill=10) as sim:
        srcs = [Etsi014KeySource(sim.credentials(s).settings()) for s in ("SAE-A", "SAE-B", "SAE-C")]
        try:
            keys = await srcs[0].get_new_keys("SAE-B", additional_slave_sae_ids=["SAE-C"])
            b = await srcs[1].get_keys_by_id("SAE-A", [keys[0].key_id])
            c = await srcs[2].get_keys_by_id("SAE-A", [keys[0].key_id])
            assert keys[0].key == b[0].key == c[0].key
        finally:
            for s in srcs:
                await s.close()


# ---------------------------------------------------------------- errors

async def test_unknown_key_id_is_key_not_found(sim, slave):
    with pytest.raises(KeyNotFound, match="not found"):
        await slave.get_keys_by_id("SAE-A", ["5b3c2c36-2b1d-4d1c-9a57-3f1c0f3e2a11"])


async def test_slave_not_named_gets_401(state_dir, clock):
    from qkdgate.adapters.kmesim.server import KmeSimulator
    async with KmeSimulator.start(state_dir, saes={"SAE-A": "KME-A", "SAE-B": "KME-B",
                                                   "SAE-C": "KME-B"},
                                  now=clock, prefill=10) as sim:
        a = Etsi014KeySource(sim.credentials("SAE-A").settings())
        c = Etsi014KeySource(sim.credentials("SAE-C").settings())
        try:
            keys = await a.get_new_keys("SAE-B")
            with pytest.raises(KeySourceAuthError, match="401"):
                await c.get_keys_by_id("SAE-A", [keys[0].key_id])
        finally:
            await a.close()
            await c.close()


async def test_exhausted_pool_is_key_unavailable_then_refills(sim, master, clock):
    sim.exhaust(refill=True)
    with pytest.raises(KeyUnavailable, match="503"):
        await master.get_new_keys("SAE-B")
    clock.t += 1.0          # ~1 Mb/s modelled: blocks arrive within a second
    assert len(await master.get_new_keys("SAE-B", number=4)) == 4


async def test_exhausted_pool_retries_are_bounded(sim, master):
    sim.exhaust()
    before = master.http.requests
    with pytest.raises(KeyUnavailable):
        await master.get_new_keys("SAE-B")
    assert master.http.requests - before == master.settings.retries + 1


async def test_eavesdropper_alarm_stops_keys_and_is_visible(sim, master):
    sim.set_eavesdropper(0.6)
    st = await master.status("SAE-B")
    assert st.alarms == ("QBER_ABOVE_THRESHOLD",) and st.qber > 0.08
    with pytest.raises(KeyUnavailable, match="QBER"):
        await master.get_new_keys("SAE-B")


async def test_link_down(sim, master):
    sim.set_link_up(False)
    assert (await master.status("SAE-B")).link_up is False
    with pytest.raises(KeyUnavailable, match="link down"):
        await master.get_new_keys("SAE-B")


async def test_wrong_client_certificate_refused_in_tls(sim):
    cred, rogue = sim.credentials("SAE-A"), sim.pki.rogue("SAE-ROGUE")
    settings = cred.settings()
    settings["tls"].update(cert=str(rogue.cert), key=str(rogue.key))
    src = Etsi014KeySource(settings)
    try:
        with pytest.raises(KeySourceAuthError, match=r"refused|handshake"):
            await src.status("SAE-B")
        assert src.http.requests == 1        # an auth refusal is not retried
    finally:
        await src.close()


async def test_valid_certificate_of_unknown_sae_gets_401(sim):
    # SAE-B's certificate is valid but SAE-B is not attached to KME-A
    cred = sim.credentials("SAE-B")
    settings = cred.settings()
    settings["url"] = sim.url("KME-A")
    settings["kme_id"] = "KME-A"
    src = Etsi014KeySource(settings)
    try:
        with pytest.raises(KeySourceAuthError, match="401"):
            await src.get_new_keys("SAE-A")
        assert src.http.requests == 1
    finally:
        await src.close()


async def test_kme_with_certificate_from_wrong_ca(sim, master):
    sim.faults["KME-A"].wrong_cert = True
    with pytest.raises(KeySourceAuthError, match="not trusted"):
        await master.status("SAE-B")


async def test_kme_id_mismatch_is_refused_before_any_request(sim):
    settings = sim.credentials("SAE-A").settings()
    settings["kme_id"] = "KME-B"           # the KME at this URL is KME-A
    src = Etsi014KeySource(settings)
    sim.fill(0)
    before = sim.link().stored_bits
    try:
        with pytest.raises(KeySourceAuthError, match="does not name KME ID 'KME-B'"):
            await src.get_new_keys("SAE-B")
    finally:
        await src.close()
    assert sim.link().stored_bits == before   # the KME never saw the request


async def test_slow_kme_times_out(sim, make_source):
    src = make_source("SAE-A", timeout=0.2, retries=1)
    sim.faults["KME-A"].delay = 0.5
    with pytest.raises(KeySourceTimeout):
        await src.status("SAE-B")
    assert src.http.requests == 2
    await src.close()


@pytest.mark.parametrize("mode", ["bytes", "html", "json", "truncated"])
async def test_garbage_answers_are_protocol_errors(sim, master, mode):
    sim.faults["KME-A"].garbage = mode
    with pytest.raises(KeySourceProtocolError):
        await master.get_new_keys("SAE-B")
    with pytest.raises(KeySourceProtocolError):
        await master.status("SAE-B")


async def test_fewer_keys_than_asked_is_unavailable(sim, master):
    real = sim.network.enc_keys

    def short(*a):
        r = real(*a)
        return type(r)(200, {"keys": r.body["keys"][:1]})
    sim.network.enc_keys = short
    with pytest.raises(KeyUnavailable, match="1 of 3"):
        await master.get_new_keys("SAE-B", number=3)


async def test_bad_calls_are_local_errors(master):
    with pytest.raises(LocalProtocolError):
        await master.get_new_keys("SAE-B", size_bits=100)
    with pytest.raises(LocalProtocolError):
        await master.get_keys_by_id("SAE-B", ["not-a-uuid"])
    with pytest.raises(LocalProtocolError):
        await master.get_new_keys("SAE/B")


def test_config_errors_name_the_entry(tmp_path):
    with pytest.raises(ConfigError, match=r"key_sources\[k\]\.url"):
        Etsi014KeySource({"name": "k", "url": "http://kme"})
    with pytest.raises(ConfigError, match="file not found"):
        Etsi014KeySource({"name": "k", "url": "https://kme", "tls": {
            "cert": str(tmp_path / "no.pem"), "key": "k", "ca": "c"}})


# ------------------------------------------------- lost dec_keys response

async def test_lost_dec_keys_response_then_retry_is_key_not_found(sim, master, slave, caplog):
    """ETSI 014 dec_keys is not idempotent. The KME deletes the key, then the
    answer is lost; the retry finds the key gone: KeyNotFound, no crash, no
    hang, and no key material anywhere in the logs."""
    keys = await master.get_new_keys("SAE-B")
    sim.faults["KME-B"].drop, sim.faults["KME-B"].drop_path = 1, "dec_keys"
    caplog.set_level(logging.DEBUG, logger="qkdgate")
    with pytest.raises(KeyNotFound):
        await asyncio.wait_for(slave.get_keys_by_id("SAE-A", [keys[0].key_id]), 10)
    assert slave.http.requests == 2                # dropped answer, then one retry
    assert sim.network.kmes["KME-B"].issued == {}
    assert keys[0].key.reveal().hex() not in caplog.text


async def test_lost_key_aborts_rekey_and_master_retries_with_new_keys(sim, master, slave):
    """The recovery the protocol layer runs: the slave reports the key lost,
    the rekey aborts, the master starts over with new keys; both sides end up
    using the same new key and the lost one is used by nobody."""
    lost = await master.get_new_keys("SAE-B")
    sim.faults["KME-B"].drop, sim.faults["KME-B"].drop_path = 1, "dec_keys"
    with pytest.raises(KeyNotFound):
        await slave.get_keys_by_id("SAE-A", [lost[0].key_id])
    lost[0].key.wipe()                             # master discards it: never used
    fresh = await master.get_new_keys("SAE-B")
    assert fresh[0].key_id != lost[0].key_id
    got = await slave.get_keys_by_id("SAE-A", [fresh[0].key_id])
    assert got[0].key == fresh[0].key


async def test_lost_enc_keys_response_orphans_keys_harmlessly(sim, master, slave):
    sim.faults["KME-A"].drop, sim.faults["KME-A"].drop_path = 1, "enc_keys"
    keys = await master.get_new_keys("SAE-B")      # retried: a second, fresh key
    assert len(sim.network.kmes["KME-B"].issued) == 2   # one orphan nobody will ask for
    got = await slave.get_keys_by_id("SAE-A", [keys[0].key_id])
    assert got[0].key == keys[0].key


async def test_recent_rate_observed_when_kme_does_not_report_it(sim, make_source, clock):
    real = sim.network.status

    def plain(*a):   # a KME without the simulator's status extension
        r = real(*a)
        return type(r)(200, {k: v for k, v in r.body.items() if k != "status_extension"})
    sim.network.status = plain
    src = make_source("SAE-A")
    src._now = clock
    assert (await src.status("SAE-B")).recent_rate is None   # one sample: no rate yet
    await src.get_new_keys("SAE-B", number=8)
    clock.t += 1.0          # below the pool cap (prefill 1000, cap 5000)
    st = await src.status("SAE-B")
    skr_keys = sim.link().rate()[0] / 256
    assert st.recent_rate == pytest.approx(skr_keys, rel=0.2)   # bursts: within a block
    await src.close()


def test_hostname_check_off_needs_kme_id(sim):
    settings = sim.credentials("SAE-A").settings(verify_hostname=False)
    settings["kme_id"] = None
    with pytest.raises(ConfigError, match="needs kme_id"):
        Etsi014KeySource(settings)


async def test_extensions_pass_through_and_get_dec_keys(sim, make_source, slave):
    master = make_source("SAE-A")
    c = await master.enc_keys("SAE-B", 1, 256, extension_optional=[{"abc_max_age": 30000}])
    assert c.key_container_extension == {"qkdgate_unhandled_extension_optional": ["abc_max_age"]}
    with pytest.raises(KeySourceProtocolError, match="extension_mandatory"):
        await master.enc_keys("SAE-B", extension_mandatory=[{"abc_route_type": "direct"}])
    get_slave = make_source("SAE-B", dec_keys_method="GET")      # GET ...?key_ID=
    got = await get_slave.get_keys_by_id("SAE-A", [c.keys[0].key_id])
    assert got[0].key == c.keys[0].key
    st = await master.etsi_status("SAE-B")
    assert st.max_SAE_ID_count == 2 and "qkdgate_qber" in st.status_extension
    await master.close()
    await get_slave.close()


async def test_backoff_schedule_and_no_retry_on_400(sim):
    delays = []

    async def sleep(d):
        delays.append(d)
    src = Etsi014KeySource(sim.credentials("SAE-A").settings(retries=3, backoff=0.1),
                           sleep=sleep, rng=lambda: 1.0)
    sim.exhaust()
    with pytest.raises(KeyUnavailable):
        await src.get_new_keys("SAE-B")
    assert delays == [0.1, 0.2, 0.4]            # exponential; jitter factor injected as 1
    delays.clear()
    before = src.http.requests
    with pytest.raises(KeySourceProtocolError):  # 400 size: final, no retry
        await src.get_new_keys("SAE-B", size_bits=2048)
    assert delays == [] and src.http.requests == before + 1
    await src.close()


async def test_kme_not_listening_is_unavailable_after_retries(sim):
    settings = sim.credentials("SAE-A").settings(retries=1)
    settings["url"] = "https://127.0.0.1:1"
    src = Etsi014KeySource(settings)
    try:
        with pytest.raises(KeyUnavailable, match="network error"):
            await src.status("SAE-B")
        assert src.http.requests == 2
    finally:
        await src.close()


async def test_built_from_the_gateway_config_dataclass(sim):
    config = pytest.importorskip("qkdgate.gateway.config.model")
    cred = sim.credentials("SAE-A")
    entry = config.KeySourceConfig(
        name="kme-a", kind="idq-cerberis-xgr", url=cred.url, kme_id="KME-A",
        tls=config.TlsConfig(cert=str(cred.cert), key=str(cred.key), ca=str(cred.ca)),
        timeout=3.0, retries=1, options={"backoff": 0.01})
    src = create_key_source(entry.kind, entry)
    try:
        assert src.profile.name == "idq-cerberis-xgr" and src.settings.retries == 1
        keys = await src.get_new_keys("SAE-B", number=2)
        assert len(keys) == 2
    finally:
        await src.close()
    with pytest.raises(ConfigError, match="CA for the KME is required"):
        create_key_source("etsi014", config.KeySourceConfig(
            name="kme-a", kind="etsi014", url=cred.url,
            tls=config.TlsConfig(cert=str(cred.cert), key=str(cred.key))))


async def test_redirects_are_not_followed(sim, master):
    sim.faults["KME-A"].raw = (302, b"", "text/plain")
    before = master.http.requests
    with pytest.raises(KeySourceProtocolError, match="302"):
        await master.status("SAE-B")
    assert master.http.requests == before + 1
