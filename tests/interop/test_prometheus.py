"""A real Prometheus server (Debian's prometheus, tools/apt-packages.txt)
scrapes a running daemon over loopback with the shipped alert rules
(monitoring/alerts.yml) and fires QkdgateQberHigh and QkdgateTunnelBlocked
when the KME simulator's eavesdropper is switched on.

Two daemons on loopback with the recording kernel fakes (no kernel lab
needed), real ETSI 014 clients with mutual TLS to the simulator, the
qkd-mandatory policy. Prometheus runs with a 1 s scrape and evaluation
interval in a temporary directory on a free port and is stopped by the
test. Missing prometheus fails the test (a declared dependency)."""

from __future__ import annotations

import asyncio
import contextlib
import shutil
import socket
from pathlib import Path

import aiohttp
import pytest
from test_two_daemons import Pair, wait_for

from qkdgate.adapters.kmesim.server import KmeSimulator
from qkdgate.gateway.telemetry.metrics import Metrics

RULES = Path(__file__).resolve().parents[2] / "monitoring" / "alerts.yml"


@pytest.fixture
async def kme(state_dir):
    async with KmeSimulator.start(state_dir, prefill=500) as sim:
        yield sim


def free_tcp_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


@contextlib.asynccontextmanager
async def prometheus(folder: Path, target_port: int):
    binary = shutil.which("prometheus")
    if binary is None:
        pytest.fail("prometheus not found: install Debian's prometheus package "
                    "(tools/apt-packages.txt)")
    shutil.copy(RULES, folder / "alerts.yml")
    (folder / "prometheus.yml").write_text(f"""
global: {{scrape_interval: 1s, evaluation_interval: 1s}}
rule_files: [alerts.yml]
scrape_configs:
  - job_name: qkdgate
    static_configs: [{{targets: ["127.0.0.1:{target_port}"], labels: {{gateway: gw-a}}}}]
""")
    port = free_tcp_port()
    log = (folder / "prometheus.log").open("wb")
    proc = await asyncio.create_subprocess_exec(
        binary, f"--config.file={folder / 'prometheus.yml'}",
        f"--storage.tsdb.path={folder / 'data'}", f"--web.listen-address=127.0.0.1:{port}",
        "--web.enable-lifecycle", stdout=log, stderr=log)
    base = f"http://127.0.0.1:{port}"
    try:
        async with aiohttp.ClientSession(timeout=aiohttp.ClientTimeout(total=5)) as http:
            async def ready() -> bool:
                with contextlib.suppress(aiohttp.ClientError):
                    async with http.get(base + "/-/ready") as r:
                        return r.status == 200
                return False
            loop = asyncio.get_running_loop()
            deadline = loop.time() + 30
            while not await ready():
                assert proc.returncode is None, (folder / "prometheus.log").read_text()
                assert loop.time() < deadline, "prometheus not ready within 30 s"
                await asyncio.sleep(0.2)
            yield Api(http, base)
    finally:
        if proc.returncode is None:
            proc.terminate()
            try:
                await asyncio.wait_for(proc.wait(), 15)
            except TimeoutError:
                proc.kill()
                await proc.wait()
        log.close()


class Api:
    def __init__(self, http: aiohttp.ClientSession, base: str) -> None:
        self.http, self.base = http, base

    async def get(self, path: str, **params: str) -> object:
        async with self.http.get(self.base + path, params=params) as r:
            doc = await r.json()
        assert doc["status"] == "success", doc
        return doc["data"]

    async def firing(self) -> dict[str, list[dict[str, str]]]:
        data = await self.get("/api/v1/alerts")
        out: dict[str, list[dict[str, str]]] = {}
        for a in data["alerts"]:
            if a["state"] == "firing":
                out.setdefault(a["labels"]["alertname"], []).append(a["labels"])
        return out

    async def value(self, query: str) -> float | None:
        data = await self.get("/api/v1/query", query=query)
        return float(data["result"][0]["value"][1]) if data["result"] else None


async def poll(predicate, timeout: float) -> bool:
    """Ask Prometheus until ``predicate`` (async) holds: its evaluations are
    its own, there is no event to await from here."""
    loop = asyncio.get_running_loop()
    deadline = loop.time() + timeout
    while not await predicate():
        if loop.time() > deadline:
            return False
        await asyncio.sleep(0.5)
    return True


async def test_prometheus_fires_qber_and_blocked_alerts_on_an_eavesdropper(tmp_path, kme):
    p = Pair(tmp_path, kme, policy="qkd-mandatory", interval="1s", soft="50s", hard="60s")
    p.a.metrics = Metrics()       # the daemon subscribes it and binds its status
    server = await p.a.metrics.serve("127.0.0.1", 0)
    try:
        async with p.running(), prometheus(tmp_path, server.port) as prom:
            assert await wait_for(lambda: p.a.tunnels.get("t1").state == "up", 10)

            async def scraped_healthy() -> bool:
                return (await prom.value('up{job="qkdgate"}') == 1.0
                        and await prom.value('qkdgate_tunnel_up{tunnel="t1"}') == 1.0
                        and await prom.value('qkdgate_qkd_qber{source="kme"}') is not None)
            assert await poll(scraped_healthy, 20), "prometheus never scraped a healthy daemon"
            qber = await prom.value('qkdgate_qkd_qber{source="kme"}')
            assert qber is not None and qber < 0.08
            assert await prom.value('qkdgate_qkd_stored_keys{source="kme"}') > 0
            firing = await prom.firing()
            assert "QkdgateQberHigh" not in firing and "QkdgateTunnelBlocked" not in firing, \
                firing
            assert "QkdgateDaemonDown" not in firing

            kme.set_eavesdropper(1.0)     # intercept-resend on every photon: QBER ~25 %

            async def alerts_fire() -> bool:
                f = await prom.firing()
                return "QkdgateQberHigh" in f and "QkdgateTunnelBlocked" in f
            assert await poll(alerts_fire, 20), await prom.firing()
            firing = await prom.firing()
            (qber_alert,) = firing["QkdgateQberHigh"]
            assert qber_alert["source"] == "kme" and qber_alert["gateway"] == "gw-a"
            assert qber_alert["severity"] == "critical"
            (blocked,) = firing["QkdgateTunnelBlocked"]
            assert blocked["tunnel"] == "t1" and blocked["state"] == "blocked"
            assert p.a.tunnels.get("t1").state == "blocked"
            assert await prom.value('qkdgate_qkd_qber{source="kme"}') > 0.08

            kme.set_eavesdropper(0.0)     # the link heals: the tunnel and the alerts recover

            async def resolved() -> bool:
                f = await prom.firing()
                return "QkdgateQberHigh" not in f and "QkdgateTunnelBlocked" not in f
            assert await poll(resolved, 25), await prom.firing()
    finally:
        await server.close()
