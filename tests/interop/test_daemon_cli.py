"""`qkdgate run` as real processes: two gateways (recording kernel fakes,
injected by tests/interop/run_fake_kernel.py; the shipped command has none)
keyed through the KME simulator over mutual TLS, driven with `qkdgate status`
and `qkdgate rekey`, reloaded with SIGHUP (a bad file changes nothing) and
stopped with SIGTERM (exit 0, blocking policies kept)."""

import asyncio
import json
import os
import signal
import sys
from pathlib import Path

import pytest
from daemon_pair import write_pair

from qkdgate.adapters.kmesim.server import KmeSimulator


@pytest.fixture
async def kme(state_dir):
    async with KmeSimulator.start(state_dir, prefill=500) as sim:
        yield sim


async def qkdgate(*args, timeout=20):
    proc = await asyncio.create_subprocess_exec(
        sys.executable, "-m", "qkdgate", *args,
        stdout=asyncio.subprocess.PIPE, stderr=asyncio.subprocess.PIPE)
    out, err = await asyncio.wait_for(proc.communicate(), timeout)
    return proc.returncode, out.decode(), err.decode()


async def status(cfg):
    rc, out, err = await qkdgate("status", "-c", cfg, "--json")
    return rc, (json.loads(out) if out.strip() else None), err


async def test_run_status_rekey_reload_and_sigterm(tmp_path, kme):
    _, _, path_a, path_b = write_pair(tmp_path, interval="2s", soft="4s", hard="6s")
    # point both key sources at the simulator (the pair writes placeholder TLS paths)
    for path, sae in ((path_a, "SAE-A"), (path_b, "SAE-B")):
        c = kme.credentials(sae)
        text = Path(path).read_text()
        text = text.replace("url: https://127.0.0.1:8443", f"url: {c.url}\n    kme_id: {c.kme_id}")
        text = text.replace(f"cert: {tmp_path}/sae.crt, key: {tmp_path}/sae.key, "
                            f"ca: {tmp_path}/ca.crt", f"cert: {c.cert}, key: {c.key}, ca: {c.ca}")
        Path(path).write_text(text)
    env = dict(os.environ)
    procs = []
    for path, name in ((path_a, "a"), (path_b, "b")):
        with open(tmp_path / f"{name}.log", "wb") as log:   # the child keeps its own copy
            procs.append(await asyncio.create_subprocess_exec(
                sys.executable, str(Path(__file__).with_name("run_fake_kernel.py")), "-c", path,
                "--log-format", "json", stdout=log, stderr=asyncio.subprocess.STDOUT, env=env))
    try:
        st = None
        for _ in range(100):
            await asyncio.sleep(0.2)
            rc, st, _ = await status(path_a)
            if rc == 0 and st["tunnels"][0]["generation"]:
                break
        assert rc == 0, (tmp_path / "a.log").read_text()[-2000:]
        t1 = st["tunnels"][0]
        assert t1["state"] == "up" and len(t1["inputs"]["qkd_key_ids"]) == 1
        gen = t1["generation"]

        rc, out, err = await qkdgate("rekey", "t1", "-c", path_a, "--wait", "10")
        assert rc == 0 and "now on generation" in out, err
        rc, st, _ = await status(path_a)
        assert st["tunnels"][0]["generation"] > gen

        rc, out, _ = await qkdgate("status", "-c", path_b)
        assert rc == 0 and "ML-KEM-768+X25519+QKD[" in out

        good = Path(path_a).read_text()
        Path(path_a).write_text(good.replace("policy: hybrid-required", "policy: maybe"))
        procs[0].send_signal(signal.SIGHUP)
        await asyncio.sleep(0.5)
        Path(path_a).write_text(good)
        rc, st, _ = await status(path_a)
        assert rc == 0 and st["tunnels"][0]["policy"] == "hybrid-required"
    finally:
        for p in procs:
            if p.returncode is None:
                p.send_signal(signal.SIGTERM)
        codes = [await asyncio.wait_for(p.wait(), 10) for p in procs]
    assert codes == [0, 0]
    log_a = (tmp_path / "a.log").read_text()
    lines = [json.loads(line) for line in log_a.splitlines() if line.startswith("{")]
    assert any("reload refused" in x["msg"] for x in lines)
    assert any(x.get("tunnel") == "t1" for x in lines)      # structured context
    assert any("blocking policies kept" in x["msg"] for x in lines)
    assert not os.path.exists(tmp_path / "gw-a-run" / "control.sock")


async def test_the_shipped_run_command_has_no_fake_kernel():
    rc, out, err = await qkdgate("run", "--help")
    assert rc == 0 and "--backend" not in out and "recording" not in out
    rc, _, err = await qkdgate("run", "-c", "/nonexistent.yaml", "--backend", "recording")
    assert rc == 2 and "--backend" in err
