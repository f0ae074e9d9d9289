"""Key-service bench: keys/s and latency per API (issue 22 closing note).

    .venv/bin/python bench/keyservice.py [--requests 2000] [--number 1] [--skip-tls 50]

Two gateways' key services are fed the same generation in memory (as their
daemons would be). Measured, each as keys/s and p50/p99 latency per request:

  core      KeyService.enc_keys at A + dec_keys at B, in-process (the
            decision and the HKDF work, no I/O)
  etsi014   enc_keys at A and dec_keys at B over HTTPS with mutual TLS on
            loopback (aiohttp client, one keep-alive connection per SAE)
  skip      new-key at A and key-by-ID at B on the SKIP backends' Unix
            sockets (plain HTTP: what stunnel forwards to)
  skip+tls  the same through stunnel4's TLS-PSK (tls_mode both) with
            `openssl s_client`, one process and one handshake per request:
            TLS 1.2 DHE-PSK-AES256-CBC-SHA384 (draft-cisco-skip-02 Table 1)
            and TLS 1.3 ChaCha20 (--skip-tls requests each; skipped without
            stunnel4)
  rekey     what happens to pending key_IDs across a rekey: keys served
            from generation 1, generation 2 confirmed, then fetched within
            W, and after W + skew (the service's own clock, no waiting)

Every key fetched at B is checked equal to the one served at A. Not a test.
"""

from __future__ import annotations

import argparse
import asyncio
import hashlib
import json
import shutil
import socket
import statistics
import tempfile
import time
from pathlib import Path
from typing import Any

import aiohttp

from qkdgate.adapters.kmesim.pki import ensure_pki
from qkdgate.adapters.tls import client_context
from qkdgate.keymix.combiner import Provenance, SessionSecret
from qkdgate.keymix.secret import SecretBytes
from qkdgate.keyservice.etsi014 import Etsi014Server
from qkdgate.keyservice.service import Delivery, KeyService
from qkdgate.keyservice.settings import PoolSpec, ServiceTimes
from qkdgate.keyservice.skip import SkipServer, stunnel_config

PSK = "8f1e2d3c4b5a69788796a5b4c3d2e1f00f1e2d3c4b5a69788796a5b4c3d2e1f0"


def services(keys: int) -> tuple[KeyService, KeyService]:
    times = ServiceTimes()
    a = KeyService([PoolSpec("app", "gw-b", "SAE-A", "SAE-B", keys=keys)], times, kme_id="A")
    b = KeyService([PoolSpec("app", "gw-a", "SAE-B", "SAE-A", keys=keys)], times, kme_id="B")
    s = hashlib.sha384(b"bench generation").digest()
    for svc, role in ((a, "initiator"), (b, "responder")):
        prov = Provenance("ML-KEM-768", True, ("bc490419-7d60-487f-adc1-4ddcc177c139",))
        svc.generation_keyed(svc.pools["app"].spec.peer, 1,
                             SessionSecret(SecretBytes(s), prov), role, 0.0)
        svc.generation_confirmed(svc.pools["app"].spec.peer, 1, 0.0)
    return a, b


def report(name: str, lat: list[float], keys: int, wall: float) -> None:
    q = statistics.quantiles(lat, n=100)
    print(f"{name:<22} {keys / wall:>10.0f} keys/s   p50 {q[49] * 1e3:7.3f} ms   "
          f"p99 {q[98] * 1e3:7.3f} ms   ({len(lat)} requests)")


async def timed(fn, n: int, per: int) -> tuple[list[float], float, list[object]]:
    lat, out = [], []
    t0 = time.perf_counter()
    for _ in range(n):
        t = time.perf_counter()
        out.append(await fn())
        lat.append(time.perf_counter() - t)
    return lat, time.perf_counter() - t0, out


async def bench_core(n: int, number: int) -> None:
    a, b = services(4 * n * number + 2)
    enc: list[Delivery] = []

    async def e() -> object:
        d = a.enc_keys("SAE-A", "SAE-B", number, None, 1.0)
        if not isinstance(d, Delivery):
            raise RuntimeError(f"enc_keys refused: {d}")
        enc.append(d)
        return d
    lat, wall, _ = await timed(e, n, number)
    report("core enc_keys", lat, n * number, wall)
    it = iter(enc)

    async def d() -> object:
        x = next(it)
        got = b.dec_keys("SAE-B", "SAE-A", [k.key_id for k in x.keys], 1.0)
        if not isinstance(got, Delivery) or got.keys[0].key != x.keys[0].key:
            raise RuntimeError("dec_keys at B did not give the key served at A")
        return got
    lat, wall, _ = await timed(d, n, number)
    report("core dec_keys", lat, n * number, wall)


async def bench_etsi014(tmp: Path, n: int, number: int) -> None:
    pki = ensure_pki(tmp, ["KS-A", "KS-B"], ["SAE-A", "SAE-B"])
    a, b = services(4 * n * number + 2)
    srv = []
    for name, svc in (("KS-A", a), ("KS-B", b)):
        c = pki.kme(name)
        s = Etsi014Server(svc, host="127.0.0.1", port=0, cert=c.cert, key=c.key, ca=pki.ca,
                          clock=lambda: 1.0)
        await s.start()
        srv.append(s)
    sessions = []
    for sae in ("SAE-A", "SAE-B"):
        c = pki.sae(sae)
        ctx = client_context(c.cert, c.key, pki.ca)
        sessions.append(aiohttp.ClientSession(connector=aiohttp.TCPConnector(ssl=ctx)))
    sa, sb = sessions
    enc: list[dict] = []

    async def e() -> object:
        async with sa.post(f"https://127.0.0.1:{srv[0].port}/api/v1/keys/SAE-B/enc_keys",
                           json={"number": number}) as r:
            doc = await r.json()
        enc.append(doc)
        return doc
    try:
        lat, wall, _ = await timed(e, n, number)
        report("etsi014 enc_keys", lat, n * number, wall)
        it = iter(enc)

        async def d() -> object:
            x = next(it)
            body = {"key_IDs": [{"key_ID": k["key_ID"]} for k in x["keys"]]}
            async with sb.post(f"https://127.0.0.1:{srv[1].port}/api/v1/keys/SAE-A/dec_keys",
                               json=body) as r:
                doc = await r.json()
            if doc["keys"] != x["keys"]:
                raise RuntimeError("ETSI 014 dec_keys at B differs from enc_keys at A")
            return doc
        lat, wall, _ = await timed(d, n, number)
        report("etsi014 dec_keys", lat, n * number, wall)
    finally:
        for s in sessions:
            await s.close()
        for s in srv:
            await s.stop()


async def bench_skip(tmp: Path, n: int, tls_n: int) -> None:
    a, b = services(4 * (n + tls_n) + 2)
    servers = [SkipServer(a, "SAE-A", tmp / "a.sock", clock=lambda: 1.0),
               SkipServer(b, "SAE-B", tmp / "b.sock", clock=lambda: 1.0)]
    for s in servers:
        await s.start()
    ca = aiohttp.ClientSession(connector=aiohttp.UnixConnector(path=str(servers[0].path)))
    cb = aiohttp.ClientSession(connector=aiohttp.UnixConnector(path=str(servers[1].path)))
    new: list[dict] = []

    async def e() -> object:
        async with ca.get("http://kp/key?remoteSystemID=SAE-B") as r:
            doc = await r.json()
        new.append(doc)
        return doc
    try:
        lat, wall, _ = await timed(e, n, 1)
        report("skip new-key", lat, n, wall)
        it = iter(new)

        async def d() -> object:
            x = next(it)
            async with cb.get(f"http://kp/key/{x['keyId']}?remoteSystemID=SAE-A") as r:
                doc = await r.json()
            if doc["key"] != x["key"]:
                raise RuntimeError("SKIP key-by-ID at B differs from new-key at A")
            return doc
        lat, wall, _ = await timed(d, n, 1)
        report("skip key-by-ID", lat, n, wall)
        if tls_n and shutil.which("stunnel4") and shutil.which("openssl"):
            await bench_skip_tls(tmp, servers[0], tls_n)
    finally:
        await ca.close()
        await cb.close()
        for s in servers:
            await s.stop()


async def bench_skip_tls(tmp: Path, server: SkipServer, n: int) -> None:
    psk = tmp / "psk.txt"
    psk.write_text(f"bench:{PSK}\n")
    psk.chmod(0o600)
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    conf = tmp / "stunnel.conf"
    conf.write_text(stunnel_config(accept=f"127.0.0.1:{port}", backend=server.path, psk_file=psk))
    proc = await asyncio.create_subprocess_exec("stunnel4", str(conf),
                                                stdout=asyncio.subprocess.PIPE,
                                                stderr=asyncio.subprocess.STDOUT)
    if proc.stdout is None:
        raise RuntimeError("no stdout pipe")
    while b"Configuration successful" not in await proc.stdout.readline():
        pass
    drain = asyncio.create_task(proc.stdout.read())

    def one(tls: list[str]) -> Any:
        async def call() -> object:
            p = await asyncio.create_subprocess_exec(
                "openssl", "s_client", "-connect", f"127.0.0.1:{port}", *tls,
                "-psk_identity", "bench", "-psk", PSK, "-quiet",
                stdin=asyncio.subprocess.PIPE, stdout=asyncio.subprocess.PIPE,
                stderr=asyncio.subprocess.DEVNULL)
            out, _ = await p.communicate(b"GET /key?remoteSystemID=SAE-B HTTP/1.0\r\n\r\n")
            doc = json.loads(out.partition(b"\r\n\r\n")[2])
            if "keyId" not in doc:
                raise RuntimeError(f"SKIP through stunnel: {doc}")
            return doc
        return call
    try:
        for name, tls in (("skip TLS1.2 DHE-PSK", ["-tls1_2", "-cipher",
                                                   "DHE-PSK-AES256-CBC-SHA384"]),
                          ("skip TLS1.3 PSK", ["-tls1_3", "-ciphersuites",
                                               "TLS_CHACHA20_POLY1305_SHA256"])):
            lat, wall, _ = await timed(one(tls), n, 1)
            report(name, lat, n, wall)
    finally:
        proc.terminate()
        await proc.wait()
        drain.cancel()


def bench_rekey(pending: int = 100) -> None:
    """Pending key_IDs across a rekey (docs/keyservice.md 4)."""
    times = ServiceTimes()
    a, b = services(4 * pending + 2)
    served = []
    for _ in range(pending):
        d = a.enc_keys("SAE-A", "SAE-B", 1, None, 10.0)
        if not isinstance(d, Delivery):
            raise RuntimeError(f"enc_keys refused: {d}")
        served.append(d.keys[0])
    s2 = hashlib.sha384(b"bench generation 2").digest()
    for svc, role in ((a, "initiator"), (b, "responder")):
        prov = Provenance("ML-KEM-768", True, ("0f4ad3c2-55b6-4a8e-9a39-0b6f1f0c2a11",))
        svc.generation_keyed(svc.pools["app"].spec.peer, 2,
                             SessionSecret(SecretBytes(s2), prov), role, 11.0)
        svc.generation_confirmed(svc.pools["app"].spec.peer, 2, 11.0)
    new = a.enc_keys("SAE-A", "SAE-B", 1, None, 11.0)
    gen = new.provenance.generation if isinstance(new, Delivery) else None
    half = pending // 2
    within = [b.dec_keys("SAE-B", "SAE-A", [k.key_id], 11.0 + times.dec_window)
              for k in served[:half]]
    ok = sum(isinstance(x, Delivery) and x.keys[0].key == k.key
             for x, k in zip(within, served[:half], strict=True))
    late_at = 11.0 + times.dec_window + times.clock_skew
    b.handle_timer(late_at)
    late = [b.dec_keys("SAE-B", "SAE-A", [k.key_id], late_at) for k in served[half:]]
    reasons = {str(x.details.get("qkdgate_reason")) for x in late if not isinstance(x, Delivery)}
    print(f"rekey: {pending} key_IDs served from generation 1; generation 2 confirmed at "
          f"t=11 s; the next enc_keys is served from generation {gen}")
    print(f"rekey: fetched at t=11+W ({times.dec_window:g} s): {ok}/{half} delivered, identical")
    print(f"rekey: fetched at t=11+W+skew ({times.dec_window + times.clock_skew:g} s, "
          f"generation 1 erased): {sum(not isinstance(x, Delivery) for x in late)}/"
          f"{pending - half} refused, 400 {sorted(reasons)}")


async def main() -> None:
    ap = argparse.ArgumentParser(description=(__doc__ or "").splitlines()[0])
    ap.add_argument("--requests", type=int, default=2000)
    ap.add_argument("--number", type=int, default=1, help="keys per ETSI 014 request")
    ap.add_argument("--skip-tls", type=int, default=50,
                    help="SKIP requests through stunnel + openssl (0: none)")
    args = ap.parse_args()
    await bench_core(args.requests, args.number)
    bench_rekey()
    with tempfile.TemporaryDirectory() as d:
        await bench_etsi014(Path(d), args.requests, args.number)
        await bench_skip(Path(d), args.requests, args.skip_tls)


if __name__ == "__main__":
    asyncio.run(main())
