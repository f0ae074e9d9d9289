"""Two real daemons (loopback UDP, real protocol, the KME simulator for QKD,
recording kernel backends) each running the key service: an outside ETSI 014
client (PyPI etsi-qkd-014-client) gets a key with enc_keys at gateway A and
the same key with dec_keys at gateway B, across the daemons' own rekeys, and
every key is traceable in `status` and the events."""

from __future__ import annotations

import asyncio
import contextlib
import socket

import pytest
from daemon_pair import write_pair
from test_two_daemons import wait_for

from qkdgate.adapters.kmesim.pki import ensure_pki
from qkdgate.adapters.kmesim.server import KmeSimulator
from qkdgate.gateway.config.model import load_config
from qkdgate.gateway.daemon.daemon import Daemon
from qkdgate.gateway.daemon.sdnotify import SdNotifier
from qkdgate.testing.fakes import RecordingIpsecBackend, RecordingMacsecBackend

client_mod = pytest.importorskip("etsi_qkd_014_client.client")


def free_tcp_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


@pytest.fixture
async def kme(state_dir):
    async with KmeSimulator.start(state_dir, prefill=500) as sim:
        yield sim


@contextlib.asynccontextmanager
async def daemons(tmp_path, kme, policy="hybrid-required", pool_policy="hybrid-required"):
    _, _, path_a, path_b = write_pair(tmp_path, kme=kme, policy=policy)
    pki = ensure_pki(tmp_path / "ks", ["KS-A", "KS-B"], ["APP-A", "APP-B", "APP-C"])
    ports, ds, events, paths = {}, {}, {"a": [], "b": []}, {"a": path_a, "b": path_b}
    for side, path, kme_name, local, remote, peer in (
            ("a", path_a, "KS-A", "APP-A", "APP-B", "gw-b"),
            ("b", path_b, "KS-B", "APP-B", "APP-A", "gw-a")):
        ports[side] = free_tcp_port()
        cred = pki.kme(kme_name)
        with open(path, "a") as f:
            f.write(f"""key_service:
  port: {ports[side]}
  tls: {{cert: {cred.cert}, key: {cred.key}, ca: {pki.ca}}}
  serve_margin: 4s
  dec_window: 3s
  clock_skew: 500ms
  pools:
    - {{name: app, peer: {peer}, local_sae: {local}, remote_sae: {remote}, lifetime: 20s,
       policy: {pool_policy}}}
""")
    def make(side):
        d = Daemon(load_config(paths[side]), config_path=paths[side],
                   ipsec_backend=RecordingIpsecBackend(), macsec_backend=RecordingMacsecBackend(),
                   notifier=SdNotifier({}))
        d.subscribe(lambda e, side=side: events[side].append(e.to_dict()))
        return d
    for side in ("a", "b"):
        ds[side] = make(side)
    tasks = {side: asyncio.create_task(d.run()) for side, d in ds.items()}

    async def restart(side):
        """Stop one daemon and start a fresh one on the same configuration
        (what `systemctl restart` does): its memory is gone."""
        ds[side].stop()
        await asyncio.wait_for(tasks[side], 10)
        ds[side] = make(side)
        tasks[side] = asyncio.create_task(ds[side].run())
        await asyncio.wait_for(ds[side].ready.wait(), 10)
    try:
        await asyncio.wait_for(asyncio.gather(*(d.ready.wait() for d in ds.values())), 10)
        yield ds, ports, pki, events, restart
    finally:
        for d in ds.values():
            d.stop()
        await asyncio.wait_for(asyncio.gather(*tasks.values(), return_exceptions=True), 10)
        for t in tasks.values():
            if t.done() and t.exception():
                raise t.exception()


def client(pki, port, sae):
    cred = pki.sae(sae)
    return client_mod.QKD014Client(f"127.0.0.1:{port}", str(cred.cert), str(cred.key),
                                   str(pki.ca))


def serving(d):
    pools = d.status().get("key_service", {}).get("pools", {})
    return any(g["serving"] for g in pools.get("app", {}).get("generations", []))


async def test_enc_at_a_dec_at_b_across_rekeys(tmp_path, kme):
    async with daemons(tmp_path, kme) as (ds, ports, pki, events, _restart):
        assert await wait_for(lambda: serving(ds["a"]) and serving(ds["b"]), 15)
        a, b = client(pki, ports["a"], "APP-A"), client(pki, ports["b"], "APP-B")
        code, enc = await asyncio.to_thread(a.get_key, "APP-B", number=2)
        assert code == 200, enc
        gen = enc.key_container_extension["qkdgate_generation"]
        assert enc.key_container_extension["qkdgate_inputs"] == "ML-KEM-768+X25519+QKD"
        assert enc.key_container_extension["qkdgate_qkd_key_IDs"]
        # let the daemons rekey (every second) before B fetches: still delivered within W
        assert await wait_for(lambda: ds["b"].runners["gw-a"].state.generation > gen, 5)
        code, dec = await asyncio.to_thread(b.get_key_with_key_IDs, "APP-A",
                                            [k.key_id for k in enc.keys])
        assert code == 200, dec
        assert [k.key for k in dec.keys] == [k.key for k in enc.keys]
        # traceable: status lists the generation with its QKD key_IDs; events name the key_IDs
        st = ds["a"].status()["key_service"]["pools"]["app"]["generations"]
        served = [g for g in st if g["generation"] == gen]
        assert served and served[0]["served"] == 2 and served[0]["qkd_key_ids"]
        delivered = [e for e in events["b"] if e["event"] == "keyservice_delivered"]
        assert delivered[0]["key_ids"] == [k.key_id for k in enc.keys]
        assert delivered[0]["generation"] == gen and delivered[0]["inputs"]["qkd_key_ids"]
        assert all(k.key not in repr(events) for k in enc.keys)
        # a third SAE is refused
        c = client(pki, ports["b"], "APP-C")
        code, err = await asyncio.to_thread(c.get_key_with_key_IDs, "APP-A",
                                            [enc.keys[0].key_id])
        assert code == 401


async def test_policy_blocks_a_generation_without_qkd(tmp_path, kme):
    """Tunnels may fall back to PQC-only (pqc-fallback) while QKD is down; the
    pool is hybrid-required, so it answers 503 naming the policy, never a
    key from that generation and never one from an older generation."""
    kme.set_link_up(False)
    async with daemons(tmp_path, kme, policy="pqc-fallback") as (ds, ports, pki, events, _restart):
        assert await wait_for(lambda: ds["a"].runners["gw-b"].state.generation, 15)
        assert await wait_for(lambda: any(
            g["state"] == "refused"
            for g in ds["a"].status()["key_service"]["pools"]["app"]["generations"]), 5)
        a = client(pki, ports["a"], "APP-A")
        code, err = await asyncio.to_thread(a.get_key, "APP-B", number=1)
        assert code == 503, err
        assert "policy hybrid-required refuses" in err.message and "+QKD" not in err.message
        refusals = [e for e in events["a"] if e["event"] == "keyservice_refused"]
        assert refusals and refusals[-1]["status"] == 503


async def test_a_restart_never_serves_a_key_twice(tmp_path, kme):
    """Gateway B's daemon restarts between APP-A's enc_keys and APP-B's
    dec_keys: the pending key_ID is refused with a reason naming the
    restart (its generation's secret was only in B's memory), the key B had
    already delivered is not delivered again, and the keys served after the
    fresh handshake are new ones, under new key_IDs, at both gateways."""
    async with daemons(tmp_path, kme) as (ds, ports, pki, events, restart):
        assert await wait_for(lambda: serving(ds["a"]) and serving(ds["b"]), 15)
        a, b = client(pki, ports["a"], "APP-A"), client(pki, ports["b"], "APP-B")
        code, enc = await asyncio.to_thread(a.get_key, "APP-B", number=2)
        assert code == 200, enc
        first, pending = enc.keys
        code, got = await asyncio.to_thread(b.get_key_with_key_IDs, "APP-A", [first.key_id])
        assert code == 200 and got.keys[0].key == first.key
        code, mine = await asyncio.to_thread(b.get_key, "APP-A", number=1)   # B's half
        assert code == 200, mine
        before = {k.key for k in (first, pending, *mine.keys)}
        before_ids = {k.key_id for k in (first, pending, *mine.keys)}

        await restart("b")
        b = client(pki, ports["b"], "APP-B")
        code, err = await asyncio.to_thread(b.get_key_with_key_IDs, "APP-A", [pending.key_id])
        assert code == 400, err
        assert "restart" in str(err.details), err.details
        code, err = await asyncio.to_thread(b.get_key_with_key_IDs, "APP-A", [first.key_id])
        assert code == 400, err

        # The fresh handshake: only new keys under new key_IDs. Until A has
        # confirmed a generation made after B came back, A may still serve its
        # half of the old one; B cannot fetch those (refused, never a wrong
        # key: docs/keyservice.md 4 rule 8).
        after, after_ids, ok_dirs = set(), set(), set()
        loop = asyncio.get_running_loop()
        deadline = loop.time() + 20
        while ok_dirs != {"A->B", "B->A"} and loop.time() < deadline:
            for name, enc_c, dec_c, slave, master in (("A->B", a, b, "APP-B", "APP-A"),
                                                      ("B->A", b, a, "APP-A", "APP-B")):
                code, e = await asyncio.to_thread(enc_c.get_key, slave, number=2)
                if code == 503:          # between generations (the daemons rekey every second)
                    continue
                assert code == 200, e
                assert {k.key for k in e.keys}.isdisjoint(before)
                assert {k.key_id for k in e.keys}.isdisjoint(before_ids)
                code, d = await asyncio.to_thread(dec_c.get_key_with_key_IDs, master,
                                                  [k.key_id for k in e.keys])
                if code == 400:
                    assert name == "A->B" and "restart" in str(d.details), (name, d.details)
                    continue
                assert code == 200 and [k.key for k in d.keys] == [k.key for k in e.keys]
                ok_dirs.add(name)
                after |= {k.key for k in e.keys}
                after_ids |= {k.key_id for k in e.keys}
            await asyncio.sleep(0.2)     # a rekey takes place between attempts
        assert ok_dirs == {"A->B", "B->A"}
        assert len(after) == len(after_ids) and after.isdisjoint(before)
