"""SKIP (draft-cisco-skip-02) north-bound over its real TLS modes: stunnel4
terminates TLS-PSK (TLS 1.2 with the draft's Table 1 DHE-PSK suites, and TLS
1.3) in front of each gateway's SKIP backend, and the client is `openssl
s_client -psk` speaking the draft's requests (capabilities, new-key,
key-by-ID, entropy) -- no TLS code of ours on either side. The client's
paths, field names, status codes and suites come from the draft's text
(sections cited), not from keyservice/skip.py. Gateways A and B are fed the
same generations (tests/keyservice/helpers.py)."""

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


# --- The client, from draft-cisco-skip-02's text alone (not keyservice/skip.py) ---
# 3 Table 1, PSK rows: TLS 1.2 (RECOMMENDED) and TLS 1.3 (REQUIRED), as
# OpenSSL names them.
DRAFT_TLS12_PSK = ("DHE-PSK-AES256-CBC-SHA384", "DHE-PSK-AES256-CBC-SHA")
DRAFT_TLS13 = "TLS_AES_256_GCM_SHA384"
# A TLS 1.3 client offering every suite OpenSSL has (its default list).
ANY_TLS13 = "TLS_AES_256_GCM_SHA384:TLS_CHACHA20_POLY1305_SHA256:TLS_AES_128_GCM_SHA256"
TLS = {"tls12-sha384": ["-tls1_2", "-cipher", DRAFT_TLS12_PSK[0]],
       "tls12-sha": ["-tls1_2", "-cipher", DRAFT_TLS12_PSK[1]],
       "tls13": ["-tls1_3", "-ciphersuites", ANY_TLS13],
       "tls13-draft-suite-only": ["-tls1_3", "-ciphersuites", DRAFT_TLS13]}
CAPABILITIES = {"entropy", "key", "algorithm", "localSystemID", "remoteSystemID"}  # 4.1 Fig. 3
KEY_FIELDS = {"keyId", "key"}                                                    # 4.2 Fig. 5
ENTROPY_FIELDS = {"randomStr", "minentropy"}                                     # 4.3 Fig. 7


async def skip_get(port: int, side: str, path: str, *, psk: str | None = None,
                   tls: str = "tls13", method: str = "GET"):
    """One SKIP request (draft 4 Table 2) through `openssl s_client` with
    the encryptor's PSK; (status, JSON body), or (None, None) when TLS fails."""
    ident, key = PSK[side]
    proc = await asyncio.create_subprocess_exec(
        "openssl", "s_client", "-connect", f"127.0.0.1:{port}", *TLS[tls],
        "-psk_identity", ident, "-psk", psk or key, "-quiet", stdin=asyncio.subprocess.PIPE,
        stdout=asyncio.subprocess.PIPE, stderr=asyncio.subprocess.PIPE)
    out, _ = await asyncio.wait_for(proc.communicate(
        f"{method} {path} HTTP/1.0\r\nHost: kp\r\nContent-Length: 0\r\n\r\n".encode()), 20)
    head, _, body = out.partition(b"\r\n\r\n")
    if not head.startswith(b"HTTP/1."):
        return None, None
    return int(head.split()[1]), (json.loads(body) if body else None)


def is_hex(s: str, bits: int) -> bool:
    return len(s) == bits // 4 and all(c in "0123456789abcdefABCDEF" for c in s)


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


@pytest.mark.parametrize("tls", ["tls12-sha384", "tls12-sha", "tls13"])
async def test_capabilities_new_key_and_key_by_id(skip, tls):
    """draft 2 Figure 2 / 5 Figure 9: capabilities, a new key at A, the same
    key by its keyId at B; over each PSK mode of Table 1 that stunnel can do."""
    pair, clock, port_a, port_b = skip
    pair.rekey(1, 0.0)
    clock.t = 1.0
    status, caps = await skip_get(port_a, "A", "/capabilities", tls=tls)
    assert status == 200 and set(caps) == CAPABILITIES
    assert caps["entropy"] is True and caps["key"] is True
    assert isinstance(caps["algorithm"], str) and len(caps["algorithm"].encode()) <= 16  # 4.1
    assert caps["localSystemID"] == "SAE-A" and caps["remoteSystemID"] == ["SAE-B"]
    status, new = await skip_get(port_a, "A", "/key?remoteSystemID=SAE-B", tls=tls)
    assert status == 200 and set(new) >= KEY_FIELDS
    assert is_hex(new["keyId"], 128) and is_hex(new["key"], 256)        # 4.2.1, 4.2.2 defaults
    assert new["qkdgate_extension"]["qkdgate_qkd_key_IDs"] == list(QKD_IDS)
    # 4.2: the keyId goes in the URL; hex, so any case names the same key
    status, got = await skip_get(port_b, "B", f"/key/{new['keyId'].upper()}?remoteSystemID=SAE-A",
                                 tls=tls)
    assert status == 200 and (got["keyId"].lower(), got["key"]) == (new["keyId"].lower(),
                                                                     new["key"])
    # method 3: a size; B as the new-key side (the pool's one size, 256)
    status, sized = await skip_get(port_b, "B", "/key?remoteSystemID=SAE-A&size=256", tls=tls)
    assert status == 200 and sized["keyId"] != new["keyId"] and is_hex(sized["key"], 256)
    status, back = await skip_get(port_a, "A", f"/key/{sized['keyId']}?remoteSystemID=SAE-B",
                                  tls=tls)
    assert status == 200 and back["key"] == sized["key"]
    # methods 5-6: entropy, 256 bits by default (4.3)
    status, ent = await skip_get(port_a, "A", "/entropy", tls=tls)
    assert status == 200 and set(ent) == ENTROPY_FIELDS and ent["minentropy"] == 256
    assert is_hex(ent["randomStr"], 256)
    status, ent = await skip_get(port_a, "A", "/entropy?minentropy=128", tls=tls)
    assert status == 200 and ent == {"randomStr": bytes(range(16)).hex(), "minentropy": 128}


async def test_error_cases(skip):
    pair, clock, port_a, port_b = skip
    pair.rekey(1, 0.0)
    clock.t = 1.0
    _, new = await skip_get(port_a, "A", "/key?remoteSystemID=SAE-B")
    await skip_get(port_b, "B", f"/key/{new['keyId']}?remoteSystemID=SAE-A")
    # 4.2 Table 7: 400 "a malformed keyId was requested or the key was not found"
    status, err = await skip_get(port_b, "B", f"/key/{new['keyId']}?remoteSystemID=SAE-A")
    assert status == 400 and err["details"]["qkdgate_reason"] == "already delivered"
    status, err = await skip_get(port_b, "B", f"/key/{'0' * 32}?remoteSystemID=SAE-A")
    assert status == 400 and "restart" in err["details"]["qkdgate_reason"]
    status, err = await skip_get(port_b, "B", "/key/not-hex?remoteSystemID=SAE-A")
    assert status == 400
    # a remote system not in capabilities, a size the pool does not have, no remote system
    status, err = await skip_get(port_a, "A", "/key?remoteSystemID=SAE-C")
    assert status == 400
    status, err = await skip_get(port_a, "A", "/key?remoteSystemID=SAE-B&size=512")
    assert status == 400 and err["details"] == {"qkdgate_key_size_of_pool": 256}
    status, err = await skip_get(port_a, "A", "/key")
    assert status == 400
    # 4 Table 3: 404 for a path not in Table 2, 405 for any method but GET
    status, err = await skip_get(port_a, "A", "/keys")
    assert status == 404 and "message" in err
    for method in ("POST", "PUT", "DELETE"):
        status, err = await skip_get(port_a, "A", "/key?remoteSystemID=SAE-B", method=method)
        assert status == 405, method
    status, _ = await skip_get(port_a, "A", "/capabilities", method="HEAD")
    assert status == 405
    # Not in the draft: no key now (the pool is hybrid-required and the newest
    # generation has no QKD) is 503, never a stale key (docs/keyservice.md 8).
    pair.rekey(2, 2.0, qkd=False)
    status, err = await skip_get(port_a, "A", "/key?remoteSystemID=SAE-B")
    assert status == 503 and "policy hybrid-required refuses" in err["message"]


async def test_tls13_with_the_drafts_suite_is_not_offered_with_a_psk(skip):
    """Known gap, documented (docs/keyservice.md 8): Table 1 names
    TLS_AES_256_GCM_SHA384 for TLS 1.3; stunnel's PSK gets a SHA-256 hash in
    OpenSSL, so a client offering only that suite gets no handshake. If this
    starts to pass, stunnel can do it: add the suite."""
    pair, clock, port_a, _ = skip
    pair.rekey(1, 0.0)
    status, _ = await skip_get(port_a, "A", "/capabilities", tls="tls13-draft-suite-only")
    assert status is None


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
