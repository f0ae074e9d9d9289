"""Two real daemons rekeying over loopback with MQTT and Prometheus enabled
*in their configuration*: a real Mosquitto receives the events of the real
rekeys, the metrics endpoint is scraped over HTTP, and no key installed in
either (recording) kernel appears in any MQTT payload or metric.

Real protocol sessions, identities and key schedule; QKD keys from a
FakeQkdLink pair of KMEs.
"""

from __future__ import annotations

import asyncio
import sys
import urllib.request
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent.parent / "interop"))
from daemon_pair import write_pair
from test_telemetry import (
    Broker,
    Subscriber,
    free_port,
    leaks,
    pytestmark,  # noqa: F401
)

from qkdgate.gateway.config.model import load_config
from qkdgate.gateway.daemon.daemon import Daemon
from qkdgate.gateway.daemon.sdnotify import SdNotifier
from qkdgate.testing.fakes import FakeQkdLink, RecordingIpsecBackend


def with_telemetry(path: str, mqtt_port: int, prom_port: int) -> None:
    text = Path(path).read_text()
    head, sep, _ = text.partition("telemetry:")
    assert sep, "daemon_pair's config has no telemetry section to replace"
    Path(path).write_text(head + f"""telemetry:
  mqtt: {{enabled: true, host: 127.0.0.1, port: {mqtt_port}, topic_prefix: lab, interval: 500ms}}
  prometheus: {{enabled: true, address: 127.0.0.1, port: {prom_port}}}
  log: {{level: info}}
""")


def scrape(port: int) -> str:
    with urllib.request.urlopen(f"http://127.0.0.1:{port}/metrics", timeout=5) as r:
        return r.read().decode()


async def test_real_rekeys_reach_mosquitto_and_prometheus(tmp_path):
    broker = Broker(tmp_path).start()
    try:
        _, _, path_a, path_b = write_pair(tmp_path, interval="1s")
        prom = free_port()
        with_telemetry(path_a, broker.port, prom)
        cfg_a, cfg_b = load_config(path_a), load_config(path_b)
        link = FakeQkdLink("SAE-A", "SAE-B")
        be_a, be_b = RecordingIpsecBackend(), RecordingIpsecBackend()
        a = Daemon(cfg_a, config_path=path_a, ipsec_backend=be_a, notifier=SdNotifier({}),
                   key_sources={"kme": link.source("SAE-A")})
        b = Daemon(cfg_b, config_path=path_b, ipsec_backend=be_b, notifier=SdNotifier({}),
                   key_sources={"kme": link.source("SAE-B")})
        async with Subscriber(broker.port, "lab/#") as sub:
            tasks = [asyncio.create_task(a.run()), asyncio.create_task(b.run())]
            try:
                await asyncio.wait_for(asyncio.gather(a.ready.wait(), b.ready.wait()), 15)
                done = await sub.wait_for("/events/rekey_done", 3, timeout=20)
                await sub.wait_for("/status")
                text = await asyncio.get_running_loop().run_in_executor(None, scrape, prom)
            finally:
                a.stop()
                b.stop()
                await asyncio.wait_for(asyncio.gather(*tasks, return_exceptions=True), 15)
            offline = await sub.wait_for("/state", where=lambda p: p["state"] == "offline")
        for t in tasks:
            assert not t.exception(), t.exception()
    finally:
        broker.stop()

    topics = {str(m.topic) for m in sub.messages}
    assert "lab/gw-a/state" in topics and "lab/gw-a/events/rekey_done" in topics
    assert offline[0]["reason"] == "shutdown"
    gens = [e["generation"] for e in done]
    assert gens == sorted(gens) and len(set(gens)) == len(gens)
    for e in done:
        assert e["v"] == 1 and e["gateway"] == "gw-a" and e["tunnel"] == "t1"
        assert e["inputs"]["kem"] == "ML-KEM-768" and e["inputs"]["x25519"] is True
        assert len(e["inputs"]["qkd_key_ids"]) == 1 and e["latency_ms"] >= 0
    ids = [i for e in done for i in e["inputs"]["qkd_key_ids"]]
    assert len(ids) == len(set(ids))
    status = sub.payloads("/status")[-1]
    assert status["kind"] == "status" and status["telemetry"]["connected"] is True
    # the MQTT socket was exempted from the tunnels' policies
    assert any(op == "bypass_socket" for op, _ in be_a.ops)
    # Prometheus saw the same rekeys
    rekeys = [ln for ln in text.splitlines() if ln.startswith('qkdgate_rekeys_total{tunnel="t1"}')]
    assert rekeys and float(rekeys[0].split()[-1]) >= 3
    assert 'qkdgate_qkd_keys_consumed_total{tunnel="t1"}' in text
    # no installed key, in any encoding, in any payload or metric
    secrets = [sa.spec.key.reveal() for be in (be_a, be_b) for sa in be.sas.values()]
    assert secrets
    for m in sub.messages:
        assert not leaks(bytes(m.payload), secrets), str(m.topic)
    assert not leaks(text.encode(), secrets)
