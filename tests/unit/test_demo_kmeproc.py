"""The demo's KME simulator in its own process (gateway/demo/kmeproc.py,
issue 10 (a)): started in its own interpreter, readiness read from its
pipe, forwarders on sockets the demo made, the eavesdropper switched over
the control pipe, a crash reported with its status and log, Ctrl-C left to
the demo's cleanup, and every way of stopping reaps it."""

from __future__ import annotations

import asyncio
import os
import signal
import socket
import time
from pathlib import Path

import pytest

from qkdgate.errors import KeySourceError
from qkdgate.gateway.demo.kmeproc import KmeProcess, KmeProcessError, answer


def listener() -> socket.socket:
    s = socket.socket(socket.AF_INET, socket.SOCK_STREAM)
    s.bind(("127.0.0.1", 0))
    s.listen(8)
    return s


def start(tmp_path: Path, **kw) -> tuple[KmeProcess, list[int]]:
    ls = [listener(), listener()]
    ports = [s.getsockname()[1] for s in ls]
    try:
        kme = KmeProcess.start(tmp_path, ls, ("KME-A", "KME-B"), prefill=20, **kw)
    finally:
        for s in ls:
            s.close()              # as the demo does: the child holds them now
    return kme, ports


def gone(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return True
    return False


def enc_key(port: int, creds: dict) -> str:
    """One ETSI GS QKD 014 enc_keys (5.3) through the child's forwarder,
    with the client the daemon uses."""
    from qkdgate.adapters.etsi014 import Etsi014KeySource

    async def main() -> str:
        src = Etsi014KeySource({"name": "kme", "url": f"https://127.0.0.1:{port}",
                                "kme_id": creds["kme_id"], "timeout": 20, "retries": 0,
                                "tls": {"cert": creds["cert"], "key": creds["key"],
                                        "ca": creds["ca"]}})
        try:
            (k,) = await src.get_new_keys("SAE-B", 1, 256)
        finally:
            await src.close()
        k.key.wipe()
        return str(k.key_id)
    return asyncio.run(main())


def test_starts_serves_through_its_forwarders_takes_control_and_stops(tmp_path):
    kme, ports = start(tmp_path)
    try:
        assert kme.pid != os.getpid() and not gone(kme.pid)
        creds = kme.ready["credentials"]
        assert set(creds) == {"SAE-A", "SAE-B"}
        assert all(Path(c[f]).exists() for c in creds.values() for f in ("cert", "key", "ca"))
        assert "PRIVATE KEY" not in str(kme.ready)        # paths, never key material
        assert len(enc_key(ports[0], creds["SAE-A"])) == 36   # a UUID key_ID
        link = kme.call("state")["links"][0]
        assert link["eve_fraction"] == 0.0 and not link["alarms"]
        assert kme.call("eve", fraction=0.5) is None
        assert kme.call("state")["links"][0]["eve_fraction"] == 0.5
        with pytest.raises(KmeProcessError, match=r"fraction not in 0\.\.1"):
            kme.call("eve", fraction=2)
        with pytest.raises(KmeProcessError, match="unknown op"):
            kme.call("reboot")
        assert kme.call("state")["links"][0]["eve_fraction"] == 0.5   # still answering
    finally:
        rc = kme.stop()
    assert rc == 0 and gone(kme.pid)                     # EOF on stdin: a clean exit
    with pytest.raises(ConnectionRefusedError):           # its forwarders are closed
        socket.create_connection(("127.0.0.1", ports[0]), timeout=5).close()
    assert kme.stop() == 0                                # idempotent


def test_a_crash_is_reported_with_its_status_and_log(tmp_path):
    kme, _ = start(tmp_path)
    try:
        os.kill(kme.pid, signal.SIGKILL)
        kme.proc.wait(10)
        with pytest.raises(KmeProcessError) as ei:
            kme.call("state")
        assert isinstance(ei.value, KeySourceError)
        assert f"pid {kme.pid}) exited with status -9" in str(ei.value)
        assert str(tmp_path / "kme-sim.log") in str(ei.value)
    finally:
        assert kme.stop() == -9


def test_a_failed_start_is_reported_and_reaped(tmp_path):
    with pytest.raises(KmeProcessError) as ei:
        start(tmp_path, topology=str(tmp_path / "missing.yaml"))
    msg = str(ei.value)
    assert "exited with status 1 before its ready" in msg and "missing.yaml" in msg, msg
    pid = int(msg.split("(pid ")[1].split(")")[0])
    assert gone(pid)


def test_ctrl_c_is_left_to_the_demo_and_stop_still_ends_it(tmp_path):
    kme, _ = start(tmp_path)
    try:
        os.kill(kme.pid, signal.SIGINT)       # what a terminal's Ctrl-C sends the group
        assert kme.call("state")["links"]     # still serving: the demo's cleanup stops it
    finally:
        assert kme.stop() == 0


def test_no_ready_line_in_time_is_reported_and_the_process_killed(tmp_path):
    # an "interpreter" that never gets ready, ignores EOF and SIGTERM
    fake = tmp_path / "stuck.sh"
    fake.write_text("#!/bin/sh\ntrap '' TERM\nwhile :; do sleep 1; done\n")
    fake.chmod(0o755)
    ls = [listener()]
    t0 = time.monotonic()
    with pytest.raises(KmeProcessError, match=r"no ready within 0\.5 s") as ei:
        KmeProcess.start(tmp_path, ls, ("KME-A",), python=str(fake), timeout=0.5)
    ls[0].close()
    assert time.monotonic() - t0 < 5         # EOF, SIGTERM, SIGKILL: 0.5 s each
    assert gone(int(str(ei.value).split("(pid ")[1].split(")")[0]))


def test_stop_escalates_to_sigkill(tmp_path):
    kme, _ = start(tmp_path)
    os.kill(kme.pid, signal.SIGSTOP)          # neither EOF nor SIGTERM is acted on
    assert kme.stop(timeout=0.5) == -9 and gone(kme.pid)


def test_bad_requests_get_an_error_not_a_crash():
    class Sim:
        def state(self) -> dict:
            return {"links": []}
    assert answer(Sim(), None) == {"error": "a request is a JSON object"}
    assert "KeyError" in answer(Sim(), {"op": "eve"})["error"]
    assert answer(Sim(), {"op": "state"}) == {"result": {"links": []}}


@pytest.mark.skipif(os.geteuid() != 0, reason="needs root (network namespaces)")
def test_the_demo_runs_its_kme_process_in_namespace_k_and_cleans_up(tmp_path):
    """DemoRun's wiring, up to the daemons: the simulator's process lives in
    namespace k, gw-a reaches KME-A on its own loopback, the eavesdropper
    crosses the pipe, and the cleanup stops the process and the namespaces."""
    import io

    from qkdgate.gateway.demo import net as dn
    from qkdgate.gateway.demo import run as dr
    run = dr.DemoRun(dr.DemoOptions(eve_fraction=0.5), out=io.StringIO())
    run.state_dir = tmp_path
    run.cleanup.push("namespaces", run._net_down)
    try:
        run.net.up()
        run._start_kme()
        kme = run._kme()
        assert os.stat(f"/proc/{kme.pid}/ns/net").st_ino == \
            os.stat(f"{dn.NETNS_DIR}/{run.net.k}").st_ino
        creds = kme.ready["credentials"]["SAE-A"]
        key_id = dn.in_thread_netns(run.net.gA, lambda: enc_key(run.fwd_ports[0], creds))
        assert len(key_id) == 36
        assert run.link_state()["eve_fraction"] == 0.0
        run.set_eavesdropper(True)
        assert run.eve_on and run._last_link["eve_fraction"] == 0.5
        run.set_eavesdropper(False)
        assert run._last_link["eve_fraction"] == 0.0
        assert run.rec.link_samples          # the report's QBER over time
    finally:
        errors = run.cleanup.run()
    assert errors == [] and kme.proc.returncode == 0 and gone(kme.pid)
    assert dn.list_demo_namespaces(run.net.tag) == []
