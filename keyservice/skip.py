"""SKIP north-bound (IETF draft-cisco-skip-02): the same pools for encryptors
that speak the Secure Key Integration Protocol.

Theory of operation: SKIP has an encryptor ask its Key Provider for a new
key for a remote system (``GET /key?remoteSystemID=..[&size=..]``), send the
``keyId`` to its peer in-band, and the peer ask its own Key Provider for the
same key (``GET /key/{keyId}?remoteSystemID=..``); ``GET /capabilities``
names the local system and the remote systems it may ask for (draft 2,
Figure 2; 4, Table 2). Here the local system is the pool's local SAE, the
remote system its remote SAE: new-key is an enc_keys (local master, remote
slave) and key-by-ID a dec_keys, through the same
:class:`~qkdgate.keyservice.service.KeyService`, so the agreement, policy
and single-use rules are the ETSI 014 ones (docs/keyservice.md 8).

Checked against the text of draft-cisco-skip-02 (3 September 2025), every
section cited beside the code that implements it; docs/keyservice.md 8 lists
what was checked and the two places where qkdgate goes beyond the draft (a
503 for "no key", and TLS 1.3 with ChaCha20 where stunnel cannot do
TLS_AES_256_GCM_SHA384 with a PSK).

TLS: Python 3.11's ssl module has no TLS-PSK, and TLS is never written by
hand here: :func:`stunnel_config` configures Debian's stunnel4 to terminate
TLS with the PSK and forward each connection to this backend, a plain HTTP
server on a Unix socket (mode 0600, so only the daemon's user -- stunnel's --
reaches it). One backend per local system: the socket a connection arrives
on says who is asking, as a client certificate does for ETSI 014.
"""


from __future__ import annotations

import json
import logging
import os
import time
import uuid
from collections.abc import Callable
from pathlib import Path
from typing import Any

from aiohttp import web

from qkdgate.keymix.keypool import MAX_KEY_BITS
from qkdgate.keyservice.service import Delivery, KeyService, Refusal, Why

log = logging.getLogger("qkdgate.keyservice")
# draft 4.1 Table 4: "Identifier or description of the algorithm used by the KP
# for generating and synchronizing keys"; an encryptor need only support 16 bytes.
ALGORITHM = "qkdgate-hybrid"
# draft 4.2 Table 7: 400 "a malformed keyId was requested or the key was not
# found". 503 is qkdgate's, not the draft's (its Table 7 has no "no key now";
# RFC 9110 15.6.4 Service Unavailable, as the draft's own Table 9 uses 503).
_SKIP_STATUS = {Why.UNAUTHORIZED: 400, Why.BAD_REQUEST: 400, Why.NOT_FOUND: 400,
                Why.NO_KEY: 503}


def _json(status: int, body: dict[str, object]) -> web.Response:
    return web.Response(status=status, content_type="application/json", text=json.dumps(body))


def _refused(r: Refusal) -> web.Response:
    body: dict[str, object] = {"message": r.message}
    if r.details:
        body["details"] = r.details
    return _json(_SKIP_STATUS[r.why], body)


def _key(d: Delivery) -> web.Response:
    # draft 4.2 Figure 5 / Table 6: keyId and key, both hexadecimal; keyId 128
    # bits by default (4.2.1: here the ETSI 014 key_ID's 32 hex digits), key
    # 256 bits by default (4.2.2). The schema allows more properties: the
    # provenance goes in one, as the ETSI 014 key_container_extension.
    k = d.keys[0]
    return _json(200, {"keyId": uuid.UUID(k.key_id).hex, "key": k.key.reveal().hex(),
                       "qkdgate_extension": d.extension()})


@web.middleware
async def _json_errors(request: web.Request, handler: Any) -> web.StreamResponse:
    """draft 4 Table 3: 404 for a path not in Table 2, 405 for any method but
    GET; the body is JSON like every other answer (draft 4: RFC 8259)."""
    try:
        resp: web.StreamResponse = await handler(request)
        return resp
    except web.HTTPException as exc:
        if exc.status in (404, 405):
            return _json(exc.status, {"message": "no such path (draft-cisco-skip-02 Table 2)"
                                      if exc.status == 404 else "only GET is supported"})
        raise


class SkipServer:
    """The SKIP backend of one local system, on a Unix socket behind stunnel."""

    def __init__(self, service: KeyService, local_system: str, socket_path: str | Path, *,
                 clock: Callable[[], float] = time.monotonic,
                 rng: Callable[[int], bytes] = os.urandom) -> None:
        self.service, self.local, self.path = service, local_system, Path(socket_path)
        self.clock, self.rng = clock, rng
        self._runner: web.AppRunner | None = None

    def remote_systems(self) -> list[str]:
        return sorted(ps.spec.remote_sae for ps in self.service.pools.values()
                      if ps.spec.local_sae == self.local)

    async def start(self) -> None:
        app = web.Application(client_max_size=64 * 1024, middlewares=[_json_errors])
        # draft 4 Table 2: methods 1 (capabilities), 2-3 (key, key of a size),
        # 4 (key by keyId), 5-6 (entropy); GET only (Table 3), so no HEAD either.
        app.router.add_get("/capabilities", self._capabilities, allow_head=False)
        app.router.add_get("/key", self._new_key, allow_head=False)
        app.router.add_get("/key/{key_id}", self._key_by_id, allow_head=False)
        app.router.add_get("/entropy", self._entropy, allow_head=False)
        runner = web.AppRunner(app, access_log=None, handle_signals=False)
        await runner.setup()
        self.path.unlink(missing_ok=True)
        site = web.UnixSite(runner, str(self.path))
        await site.start()
        os.chmod(self.path, 0o600)
        self._runner = runner

    async def stop(self) -> None:
        if self._runner is not None:
            await self._runner.cleanup()
            self._runner = None
        self.path.unlink(missing_ok=True)

    async def _capabilities(self, request: web.Request) -> web.Response:
        # draft 4.1 Figure 3 / Table 4: all five fields are required.
        return _json(200, {"entropy": True, "key": True, "algorithm": ALGORITHM,
                           "localSystemID": self.local, "remoteSystemID": self.remote_systems()})

    def _remote(self, request: web.Request, allowed: set[str]) -> str | web.Response:
        if set(request.query) - allowed or len(request.query.getall("remoteSystemID", [])) != 1:
            return _json(400, {"message": "need exactly one remoteSystemID"
                                          + (f" and at most {sorted(allowed - {'remoteSystemID'})}"
                                             if allowed != {"remoteSystemID"} else "")})
        return request.query["remoteSystemID"]

    async def _new_key(self, request: web.Request) -> web.Response:
        remote = self._remote(request, {"remoteSystemID", "size"})
        if isinstance(remote, web.Response):
            return remote
        size: int | None = None
        if "size" in request.query:
            try:
                size = int(request.query["size"])
            except ValueError:
                return _json(400, {"message": "size must be a number of bits"})
        out = self.service.enc_keys(self.local, remote, 1, size, self.clock(), api="skip_new_key")
        return _refused(out) if isinstance(out, Refusal) else _key(out)

    async def _key_by_id(self, request: web.Request) -> web.Response:
        remote = self._remote(request, {"remoteSystemID"})
        if isinstance(remote, web.Response):
            return remote
        raw = request.match_info["key_id"]
        try:
            key_id = str(uuid.UUID(hex=raw))
        except ValueError:
            return _json(400, {"message": "keyId must be 32 hexadecimal digits"})
        out = self.service.dec_keys(self.local, remote, [key_id], self.clock(),
                                    api="skip_key_by_id")
        return _refused(out) if isinstance(out, Refusal) else _key(out)

    async def _entropy(self, request: web.Request) -> web.Response:
        # draft 4.3: random bytes from the host's CSPRNG (no pool key, no peer);
        # 256 bits unless ?minentropy= says (Table 2 methods 5-6); Figure 7 /
        # Table 8 name the fields randomStr (hex) and minentropy.
        try:
            bits = int(request.query.get("minentropy", "256"))
        except ValueError:
            return _json(400, {"message": "minentropy must be a number of bits"})
        if set(request.query) - {"minentropy"} or bits % 8 or not 8 <= bits <= MAX_KEY_BITS:
            return _json(400, {"message": f"minentropy: a multiple of 8 in 8..{MAX_KEY_BITS}"})
        return _json(200, {"randomStr": self.rng(bits // 8).hex(), "minentropy": bits})


# draft 3 Table 1 (TLS authentication modes). With a PSK it names TLS 1.2
# TLS_DHE_PSK_WITH_AES_256_CBC_SHA384 and TLS_DHE_PSK_WITH_AES_256_CBC_SHA
# (RECOMMENDED; OpenSSL's DHE-PSK-AES256-CBC-SHA384 / DHE-PSK-AES256-CBC-SHA),
# and TLS 1.3 TLS_AES_256_GCM_SHA384 (REQUIRED, "Certificate/PSK"). stunnel
# hands its PSK to OpenSSL through the TLS 1.2-era callback, which makes a
# TLS 1.3 PSK with a SHA-256 hash, so TLS_AES_256_GCM_SHA384 cannot be
# negotiated with it (tests/interop/test_keyservice_skip.py shows the
# handshake failing); for TLS 1.3 qkdgate offers TLS_CHACHA20_POLY1305_SHA256
# (psk_dhe_ke, RFC 8446 4.2.9: the PSK authenticates, an ephemeral X25519
# gives forward secrecy) -- beyond the draft's table, documented as such.
TLS12_PSK_CIPHERS = "DHE-PSK-AES256-CBC-SHA384:DHE-PSK-AES256-CBC-SHA"
TLS13_PSK_SUITE = "TLS_CHACHA20_POLY1305_SHA256"
TLS_MODES = {
    "both": ("sslVersionMin = TLSv1.2", "sslVersionMax = TLSv1.3",
             f"ciphers = {TLS12_PSK_CIPHERS}", f"ciphersuites = {TLS13_PSK_SUITE}"),
    "tls12": ("sslVersion = TLSv1.2", f"ciphers = {TLS12_PSK_CIPHERS}"),
    "tls13": ("sslVersionMin = TLSv1.3", f"ciphersuites = {TLS13_PSK_SUITE}"),
}


def stunnel_config(*, accept: str, backend: str | Path, psk_file: str | Path,
                   mode: str = "both", pid_file: str | Path | None = None,
                   name: str = "skip") -> str:
    """stunnel4's configuration for one SKIP listener: TLS-PSK on ``accept``
    (host:port), forwarded to the backend's Unix socket. ``psk_file`` holds
    ``IDENTITY:KEY`` lines (stunnel: a hex key is used as binary, 16 bytes
    at least); it is read by stunnel, never by qkdgate."""
    if mode not in TLS_MODES:
        raise ValueError(f"SKIP TLS mode must be one of {sorted(TLS_MODES)}")
    lines = ["foreground = yes", f"pid = {pid_file or ''}", "syslog = no", "debug = 5",
             f"[{name}]", f"accept = {accept}", f"connect = {backend}",
             f"PSKsecrets = {psk_file}", *TLS_MODES[mode]]
    return "\n".join(lines) + "\n"
