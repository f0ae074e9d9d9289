"""Two real daemons over loopback UDP: real protocol, real identities, real
key schedule; QKD from an in-process pair of KMEs (FakeQkdLink) and recording
kernel backends. They establish, rekey on schedule, and for every SA the key
A installed outbound is the key B installed inbound (and the reverse)."""

import asyncio
import logging

import pytest

from qkdgate.fakes import FakeQkdLink, RecordingIpsecBackend
from qkdgate.gateway.daemon import Daemon
from qkdgate.interfaces import Direction, PolicyAction

from daemon_pair import write_pair


async def wait_for(predicate, timeout):
    deadline = asyncio.get_running_loop().time() + timeout
    while not predicate():
        if asyncio.get_running_loop().time() > deadline:
            return False
        await asyncio.sleep(0.05)
    return True


def make_pair(tmp_path, **kw):
    cfg_a, cfg_b, path_a, path_b = write_pair(tmp_path, **kw)
    link = FakeQkdLink("SAE-A", "SAE-B")
    be_a, be_b = RecordingIpsecBackend(), RecordingIpsecBackend()
    events_a, events_b = [], []
    da = Daemon(cfg_a, config_path=path_a, ipsec_backend=be_a,
                key_sources={"kme": link.source("SAE-A")})
    db = Daemon(cfg_b, config_path=path_b, ipsec_backend=be_b,
                key_sources={"kme": link.source("SAE-B")})
    da.subscribe(events_a.append)
    db.subscribe(events_b.append)
    return da, db, be_a, be_b, link, events_a, events_b


def generation(d):
    return d.tunnels.get("t1").active.number if d.tunnels.get("t1").active else 0


def check_keys_match(be_a, be_b):
    """Every outbound SA on one side has the identical inbound SA on the other."""
    pairs = 0
    for src, dst in ((be_a, be_b), (be_b, be_a)):
        outs = [sa for sa in src.sas.values() if sa.direction == "out"]
        ins = {(sa.sa_id.dst, sa.sa_id.spi): sa for sa in dst.sas.values()
               if sa.direction == "in"}
        for sa in outs:
            peer_sa = ins.get((sa.sa_id.dst, sa.sa_id.spi))
            if peer_sa is None:
                continue   # the peer retired it already (grace elapsed on its side)
            assert sa.spec.key == peer_sa.spec.key
            assert sa.spec.key.reveal() == peer_sa.spec.key.reveal()
            pairs += 1
    return pairs


async def test_two_daemons_establish_rekey_and_agree_on_keys(tmp_path, caplog):
    caplog.set_level(logging.DEBUG, logger="qkdgate")
    da, db, be_a, be_b, link, events_a, events_b = make_pair(tmp_path)
    seen_pairs = 0
    max_gen = 0
    async with asyncio.TaskGroup() as tg:
        tg.create_task(da.run())
        tg.create_task(db.run())
        try:
            await asyncio.wait_for(asyncio.gather(da.ready.wait(), db.ready.wait()), 10)
            assert await wait_for(lambda: generation(da) >= 1 and generation(db) >= 1, 10), \
                "no first generation"
            # rekey on schedule (interval 1 s): sample keys at every generation
            last = 0
            while max_gen < 4:
                ok = await wait_for(lambda: generation(da) > last and generation(db) > last, 6)
                assert ok, f"no rekey after generation {last}"
                last = min(generation(da), generation(db))
                max_gen = last
                seen_pairs += check_keys_match(be_a, be_b)
            st = da.status()
        finally:
            da.stop()
            db.stop()
    assert seen_pairs >= 4
    t1 = st["tunnels"][0]
    assert t1["state"] == "up" and t1["inputs"]["kem"] == "ML-KEM-768"
    assert t1["inputs"]["x25519"] is True and len(t1["inputs"]["qkd_key_ids"]) >= 1
    # QKD keys were really fetched: enc_keys on A, dec_keys on B
    assert link.delivered >= max_gen
    done_a = [e for e in events_a if e["event"] == "rekey_done"]
    assert len(done_a) >= 4 and all(e["latency_ms"] >= 0 for e in done_a)
    # both sides agree on which QKD key_IDs made each generation
    ids_a = {e["generation"]: tuple(e["inputs"]["qkd_key_ids"]) for e in done_a}
    ids_b = {e["generation"]: tuple(e["inputs"]["qkd_key_ids"]) for e in events_b
             if e["event"] == "rekey_done"}
    common = set(ids_a) & set(ids_b)
    assert common and all(ids_a[g] == ids_b[g] for g in common)
    # default exit: the fail-closed policies stay in the kernel
    for be in (be_a, be_b):
        assert any(p.direction is Direction.OUT and p.action is PolicyAction.ALLOW
                   for p in be.policies.values())
        assert len(be.policies) == 3
    # no key material in the logs
    logs = "\n".join(r.getMessage() for r in caplog.records)
    for sa in list(be_a.sas.values()) + list(be_b.sas.values()):
        k = sa.spec.key.reveal()
        assert k.hex() not in logs and k[:16].hex() not in logs
