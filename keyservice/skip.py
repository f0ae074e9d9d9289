"""SKIP north-bound (IETF draft-cisco-skip-02): the same pools for encryptors
that speak the Secure Key Integration Protocol.

Theory of operation: SKIP has an encryptor ask its Key Provider for a new
key for a remote system (``GET /key?remoteSystemID=..[&size=..]``), send the
``keyId`` to its peer in-band, and the peer ask its own Key Provider for the
same key (``GET /key/{keyId}?remoteSystemID=..``); ``GET /capabilities``
names the local system and the remote systems it may ask for. Here the local
system is the pool's local SAE, the remote system its remote SAE: new-key is
an enc_keys (local master, remote slave) and key-by-ID a dec_keys, through
the same :class:`~qkdgate.keyservice.service.KeyService`, so the agreement,
policy and single-use rules are the ETSI 014 ones (docs/keyservice.md 7).

The draft authenticates the encryptor with a TLS pre-shared key. Python
3.11's ssl module has no TLS-PSK, and TLS is never written by hand here:
:func:`stunnel_config` configures Debian's stunnel4 to terminate TLS with
PSK and forward each connection to this backend, a plain HTTP server on a
Unix socket (mode 0600, so only the daemon's user -- stunnel's -- reaches
it). One backend per local system: the socket a connection arrives on says
who is asking, as a client certificate does for ETSI 014.

keyId: the key's ETSI 014 key_ID (a UUID) as 32 lowercase hex digits, so the
same key can be named through either API; key: hex. Errors: 400 (bad
request, unknown remote system, wrong size), 404 (keyId unknown, expired or
already fetched), 503 (no key: no generation may serve), each with a JSON
``message``.
"""

from __future__ import annotations

import json
import logging
import os
import time
import uuid
from collections.abc import Callable
from pathlib import Path

from aiohttp import web

from qkdgate.keymix.keypool import MAX_KEY_BITS
from qkdgate.keyservice.service import Delivery, KeyService, Refusal, Why

log = logging.getLogger("qkdgate.keyservice")
SKIP_VERSION = "1.0"
_SKIP_STATUS = {Why.UNAUTHORIZED: 400, Why.BAD_REQUEST: 400, Why.NOT_FOUND: 404,
                Why.NO_KEY: 503}


def _json(status: int, body: dict[str, object]) -> web.Response:
    return web.Response(status=status, content_type="application/json", text=json.dumps(body))


def _refused(r: Refusal) -> web.Response:
    body: dict[str, object] = {"message": r.message}
    if r.details:
        body["details"] = r.details
    return _json(_SKIP_STATUS[r.why], body)


def _key(d: Delivery) -> web.Response:
    k = d.keys[0]
    return _json(200, {"keyId": uuid.UUID(k.key_id).hex, "key": k.key.reveal().hex(),
                       # provenance, as the ETSI 014 key_container_extension
                       "qkdgate_extension": d.extension()})


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
        app = web.Application(client_max_size=64 * 1024)
        app.router.add_get("/capabilities", self._capabilities)
        app.router.add_get("/key", self._new_key)
        app.router.add_get("/key/{key_id}", self._key_by_id)
        app.router.add_get("/entropy", self._entropy)
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
        return _json(200, {"entity": "KeyProvider", "version": SKIP_VERSION,
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
        # Random bytes from the host's CSPRNG; they are no pool key and need no peer.
        try:
            bits = int(request.query.get("minentropy", "256"))
        except ValueError:
            return _json(400, {"message": "minentropy must be a number of bits"})
        if set(request.query) - {"minentropy"} or bits % 8 or not 8 <= bits <= MAX_KEY_BITS:
            return _json(400, {"message": f"minentropy: a multiple of 8 in 8..{MAX_KEY_BITS}"})
        return _json(200, {"randomStr": self.rng(bits // 8).hex(), "minEntropy": bits})


# TLS 1.3 with an external PSK (RFC 8446 2.2, psk_dhe_ke: the PSK authenticates,
# an ephemeral X25519 gives forward secrecy). OpenSSL hands stunnel's PSK to
# TLS 1.3 with SHA-256, so the suite is TLS_CHACHA20_POLY1305_SHA256 (a 256-bit
# key); "tls12" is the TLS 1.2 PSK suite for encryptors without TLS 1.3 PSK.
TLS_MODES = {
    "tls13": ("sslVersionMin = TLSv1.3", "ciphersuites = TLS_CHACHA20_POLY1305_SHA256"),
    "tls12": ("sslVersion = TLSv1.2", "ciphers = PSK-AES256-GCM-SHA384"),
}


def stunnel_config(*, accept: str, backend: str | Path, psk_file: str | Path,
                   mode: str = "tls13", pid_file: str | Path | None = None,
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
