"""SKIP (draft-cisco-skip-02) north-bound over its real TLS mode: stunnel4
terminates TLS 1.3 with an external PSK in front of each gateway's SKIP
backend, and the client is `openssl s_client -psk` speaking the draft's
requests (capabilities, new-key, key-by-ID) -- no TLS code of ours on either
side. Gateways A and B are fed the same generations (tests/keyservice/helpers.py)."""

from __future__ import annotations

import asyncio
import json
import shutil
import socket

import pytest

from qkdgate.keyservice.skip import SkipServer, stunnel_config
from tests.keyservice.helpers import QKD_IDS, Pair, session

pytestmark = pytest.mark.skipif(not (shutil.which("stunnel4") and shutil.which("openssl")),
                                reason="needs Debian's stunnel4 and openssl (tools/apt-packages.txt)")

PSK = {"A": ("encryptor-a", "8f1e2d3c4b5a69788796a5b4c3d2e1f00f1e2d3c4b5a69788796a5b4c3d2e1f0"),
       "B": ("encryptor-b", "00112233445566778899aabbccddeeff00112233445566778899aabbccddeeff")}


class Clock:
    t = 0.0

    def __call__(self) -> float:
        return self.t


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


async def _stunnel(tmp_path, side: str, backend) -> tuple[asyncio.subprocess.Process, int]:
    ident, key = PSK[side]
    psk = tmp_path / f"psk-{side}.txt"
    psk.write_text(f"{ident}:{key}\n")
    psk.chmod(0o600)
    port = _free_port()
    conf = tmp_path / f"stunnel-{side}.conf"
    conf.write_text(stunnel_config(accept=f"127.0.0.1:{port}", backend=backend, psk_file=psk))
    proc = await asyncio.create_subprocess_exec("stunnel4", str(conf),
                                                stdout=asyncio.subprocess.PIPE,
                                                stderr=asyncio.subprocess.STDOUT)
    # stunnel says when its listener is bound; wait for that line, not a sleep.
    assert proc.stdout is not None
    while True:
        line = await asyncio.wait_for(proc.stdout.readline(), 20)
        assert line, "stunnel4 exited before it was ready"
        if b"Configuration successful" in line:
            break
    return proc, port


async def skip_get(port: int, side: str, path: str, *, psk: str | None = None):
    """One SKIP request through `openssl s_client` (TLS 1.3, external PSK)."""
    ident, key = PSK[side]
    proc = await asyncio.create_subprocess_exec(
        "openssl", "s_client", "-connect", f"127.0.0.1:{port}", "-tls1_3",
        "-ciphersuites", "TLS_CHACHA20_POLY1305_SHA256", "-psk_identity", ident,
        "-psk", psk or key, "-quiet", stdin=asyncio.subprocess.PIPE,
        stdout=asyncio.subprocess.PIPE, stderr=asyncio.subprocess.PIPE)
    out, _ = await asyncio.wait_for(
        proc.communicate(f"GET {path} HTTP/1.0\r\nHost: kp\r\n\r\n".encode()), 20)
    head, _, body = out.partition(b"\r\n\r\n")
    if not head.startswith(b"HTTP/1."):
        return None, None
    return int(head.split()[1]), json.loads(body)


@pytest.fixture
async def skip(tmp_path):
    pair, clock = Pair(), Clock()
    servers, tunnels = [], []
    for side, svc, local in (("A", pair.a, "SAE-A"), ("B", pair.b, "SAE-B")):
        srv = SkipServer(svc, local, tmp_path / f"skip-{side}.sock", clock=clock,
                         rng=lambda n: bytes(range(n)))
        await srv.start()
        servers.append(srv)
        tunnels.append(await _stunnel(tmp_path, side, srv.path))
    yield pair, clock, tunnels[0][1], tunnels[1][1]
    for proc, _ in tunnels:
        proc.terminate()
        await proc.wait()
    for srv in servers:
        await srv.stop()


async def test_capabilities_new_key_and_key_by_id(skip):
    pair, clock, port_a, port_b = skip
    pair.rekey(1, 0.0)
    clock.t = 1.0
    status, caps = await skip_get(port_a, "A", "/capabilities")
    assert status == 200
    assert caps == {"entity": "KeyProvider", "version": "1.0", "localSystemID": "SAE-A",
                    "remoteSystemID": ["SAE-B"]}
    status, new = await skip_get(port_a, "A", "/key?remoteSystemID=SAE-B")
    assert status == 200 and len(bytes.fromhex(new["key"])) == 32 and len(new["keyId"]) == 32
    assert new["qkdgate_extension"]["qkdgate_qkd_key_IDs"] == list(QKD_IDS)
    status, got = await skip_get(port_b, "B", f"/key/{new['keyId']}?remoteSystemID=SAE-A")
    assert status == 200 and (got["keyId"], got["key"]) == (new["keyId"], new["key"])
    status, sized = await skip_get(port_b, "B", "/key?remoteSystemID=SAE-A&size=256")
    assert status == 200 and sized["keyId"] != new["keyId"]
    status, ent = await skip_get(port_a, "A", "/entropy?minentropy=64")
    assert status == 200 and ent == {"randomStr": "0001020304050607", "minEntropy": 64}


async def test_error_cases(skip):
    pair, clock, port_a, port_b = skip
    pair.rekey(1, 0.0)
    clock.t = 1.0
    _, new = await skip_get(port_a, "A", "/key?remoteSystemID=SAE-B")
    await skip_get(port_b, "B", f"/key/{new['keyId']}?remoteSystemID=SAE-A")
    status, err = await skip_get(port_b, "B", f"/key/{new['keyId']}?remoteSystemID=SAE-A")
    assert status == 404 and err["details"]["qkdgate_reason"] == "already delivered"
    status, err = await skip_get(port_b, "B", f"/key/{'0' * 32}?remoteSystemID=SAE-A")
    assert status == 404 and "restart" in err["details"]["qkdgate_reason"]
    status, err = await skip_get(port_a, "A", "/key?remoteSystemID=SAE-C")
    assert status == 400
    status, err = await skip_get(port_a, "A", "/key?remoteSystemID=SAE-B&size=512")
    assert status == 400 and err["details"] == {"qkdgate_key_size_of_pool": 256}
    status, err = await skip_get(port_b, "B", "/key/not-hex?remoteSystemID=SAE-A")
    assert status == 400
    status, err = await skip_get(port_a, "A", "/key")
    assert status == 400
    pair.rekey(2, 2.0, qkd=False)      # the pool is hybrid-required: no key, never a stale one
    status, err = await skip_get(port_a, "A", "/key?remoteSystemID=SAE-B")
    assert status == 503 and "policy hybrid-required refuses" in err["message"]


async def test_wrong_psk_gets_no_answer(skip):
    pair, clock, port_a, _ = skip
    pair.rekey(1, 0.0)
    status, body = await skip_get(port_a, "A", "/capabilities", psk="ab" * 32)
    assert (status, body) == (None, None)
    # the other encryptor's PSK does not open this Key Provider either
    status, _ = await skip_get(port_a, "B", "/capabilities")
    assert status is None


async def test_the_daemon_runner_starts_stunnel_and_erases_on_time(tmp_path):
    """KeyServiceRunner as the daemon uses it: ETSI 014 listener, a SKIP
    listener with its own stunnel4, and the erase timer."""
    from qkdgate.adapters.kmesim.pki import ensure_pki
    from qkdgate.keyservice.runner import KeyServiceRunner, SkipListener

    pair, clock = Pair(), Clock()
    pki = ensure_pki(tmp_path / "pki", ["KS-A"], ["SAE-A"])
    ident, key = PSK["A"]
    psk = tmp_path / "psk"
    psk.write_text(f"{ident}:{key}\n")
    psk.chmod(0o600)
    port = _free_port()
    cred = pki.kme("KS-A")
    runner = KeyServiceRunner(pair.a, host="127.0.0.1", port=0, cert=str(cred.cert),
                              key=str(cred.key), ca=str(pki.ca), state_dir=tmp_path,
                              skip=[SkipListener("SAE-A", f"127.0.0.1:{port}", str(psk))],
                              clock=clock)
    await runner.start()
    timer = asyncio.create_task(runner.run())
    try:
        status, caps = await skip_get(port, "A", "/capabilities")
        assert status == 200 and caps["localSystemID"] == "SAE-A"
        assert oct((tmp_path / "keyservice" / "skip-0.sock").stat().st_mode & 0o777) == "0o600"
        runner.generation_keyed("gw-b", 1, session(1), "initiator", 0.0)
        runner.generation_confirmed("gw-b", 1, 0.0)
        status, new = await skip_get(port, "A", "/key?remoteSystemID=SAE-B")
        assert status == 200
        clock.t = 1000.0            # past the pool's lifetime: the timer erases it
        runner.changed()
        for _ in range(200):
            if not pair.a.pools["app"].generations:
                break
            await asyncio.sleep(0.01)
        assert pair.a.pools["app"].generations == {}
    finally:
        timer.cancel()
        await runner.close()
    assert not (tmp_path / "keyservice" / "skip-0.sock").exists()
