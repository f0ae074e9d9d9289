"""``qkdgate top`` against two running daemons (loopback, recording kernel
fakes, the KME simulator over mutual TLS): one look shows the tunnel up with
its generation and key inputs and the KME's key pool; after the
eavesdropper, the block and the QKD alarm."""

from __future__ import annotations

import asyncio
import io

import pytest
from test_two_daemons import Pair, wait_for

from qkdgate.adapters.kmesim.server import KmeSimulator
from qkdgate.gateway.cli import top
from qkdgate.gateway.cli.main import build_parser


@pytest.fixture
async def kme(state_dir):
    async with KmeSimulator.start(state_dir, prefill=500) as sim:
        yield sim


async def look(socket_path: str) -> str:
    args = build_parser().parse_args(["top", "--socket", socket_path, "--once",
                                      "--width", "140"])
    buf = io.StringIO()
    # The control client blocks: run it off the loop the daemons live on.
    assert await asyncio.to_thread(top.run, args, out=buf) == 0
    return buf.getvalue()


async def test_top_shows_a_running_daemon_and_its_qkd_link(tmp_path, kme):
    p = Pair(tmp_path, kme, policy="qkd-mandatory", interval="1s", soft="50s", hard="60s")
    sock = p.cfg_a.gateway.control_socket
    async with p.running():
        assert await wait_for(lambda: p.a.tunnels.get("t1").state == "up"
                              and "kme" in p.a.qkd_links, 10)
        text = await look(sock)
        assert text.startswith("qkdgate top  gw-a")
        row = next(line for line in text.splitlines() if line.lstrip().startswith("gw-a"))
        assert "t1 (ipsec)" in row and "UP" in row
        gen = p.a.tunnels.get("t1").active.number
        assert f" {gen} " in row or f" {gen + 1} " in row     # a rekey may land between
        assert "ML-KEM-768+X25519+QKD[" in row
        link = next(line for line in text.splitlines() if line.lstrip().startswith("kme"))
        assert "none" in link and "%" in link
        kme.set_eavesdropper(1.0)
        assert await wait_for(lambda: p.a.tunnels.get("t1").state == "blocked"
                              and p.a.qkd_links["kme"]["alarms"], 10)
        text = await look(sock)
        row = next(line for line in text.splitlines() if line.lstrip().startswith("gw-a"))
        assert "BLOCKED" in row
        link = next(line for line in text.splitlines() if line.lstrip().startswith("kme"))
        assert "qber" in link.lower() and "none" not in link
