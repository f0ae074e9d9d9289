"""ETSI GS QKD 014 north-bound: the gateway as the KME of its local SAEs.

Theory of operation: one aiohttp HTTPS server with mutual TLS (5.1: the
caller is the CN of its verified client certificate, which must be on the
pool allow-list) serving ``/api/v1/keys/{SAE_ID}/status|enc_keys|dec_keys``
(5.2-5.4). Request parsing and the Error body are the ones the KME simulator
uses (:mod:`qkdgate.adapters.etsi014_server`); each request is one call of
the sans-IO :class:`~qkdgate.keyservice.service.KeyService` on the event
loop, so concurrent requests are serialised and an index is never handed out
twice. Answers carry the key's provenance in ``key_container_extension``
(6.3: vendor names with a ``qkdgate_`` prefix).
"""

from __future__ import annotations

import base64
import logging
import time
from collections.abc import Callable, Mapping
from pathlib import Path

from aiohttp import web

from qkdgate.adapters.etsi014_codec import (
    MSG_EXT_MANDATORY_UNSUPPORTED,
    MSG_SIZE_MULTIPLE_OF_8,
)
from qkdgate.adapters.etsi014_server import (
    BAD_REQUEST,
    UNAUTHORIZED,
    Reply,
    caller_sae,
    dec_keys_ids,
    error,
    json_response,
    request_object,
)
from qkdgate.adapters.tls import server_context
from qkdgate.keyservice.service import Delivery, KeyService, Refusal

log = logging.getLogger("qkdgate.keyservice")
ENC_FIELDS = {"number", "size", "additional_slave_SAE_IDs", "extension_mandatory",
              "extension_optional"}


def refusal_reply(r: Refusal) -> Reply:
    # ETSI GS QKD 014 6.5; 401 carries the bare spec message.
    if r.status == 401:
        return UNAUTHORIZED
    return error(r.status, r.message, **r.details)


def delivery_reply(d: Delivery) -> Reply:
    """ETSI GS QKD 014 6.3 Key container."""
    keys = [{"key_ID": k.key_id, "key": base64.b64encode(k.key.reveal()).decode("ascii")}
            for k in d.keys]
    return Reply(200, {"keys": keys, "key_container_extension": d.extension()})


def enc_request(req: Mapping[str, object]) -> tuple[int, int | None] | Reply:
    """number and size of an enc_keys request (6.2), or the spec's 400."""
    unknown = set(req) - ENC_FIELDS
    if unknown:
        return error(400, BAD_REQUEST, unknown_fields=sorted(unknown))
    number, size = req.get("number", 1), req.get("size")
    if not isinstance(number, int) or isinstance(number, bool):
        return error(400, BAD_REQUEST, invalid_number=str(number)[:40])
    if size is not None and (not isinstance(size, int) or isinstance(size, bool)):
        return error(400, BAD_REQUEST, invalid_size=str(size)[:40])
    if isinstance(size, int) and size % 8:
        return error(400, MSG_SIZE_MULTIPLE_OF_8)
    extra = req.get("additional_slave_SAE_IDs", [])
    if not isinstance(extra, list) or extra:
        # max_SAE_ID_count is 0: a pool binds one master to one slave.
        return error(400, BAD_REQUEST, max_SAE_ID_count=0)
    for name in ("extension_mandatory", "extension_optional"):
        v = req.get(name, [])
        if not isinstance(v, list) or not all(isinstance(e, dict) for e in v):
            return error(400, BAD_REQUEST, **{f"invalid_{name}": True})
        if name == "extension_mandatory" and v:
            names = sorted({k for e in v for k in e})
            return error(400, MSG_EXT_MANDATORY_UNSUPPORTED, extension_mandatory_unsupported=names)
    return number, size


class Etsi014Server:
    """The HTTPS listener; ``port`` is known after :meth:`start`."""

    def __init__(self, service: KeyService, *, host: str, port: int, cert: str | Path,
                 key: str | Path, ca: str | Path,
                 clock: Callable[[], float] = time.monotonic) -> None:
        self.service, self.host, self.port, self.clock = service, host, port, clock
        self._tls = (cert, key, ca)
        self._runner: web.AppRunner | None = None

    async def start(self) -> None:
        ctx = server_context(*self._tls)       # files read here: a bad path fails the start
        app = web.Application(client_max_size=1 << 20)
        app.router.add_route("*", "/api/v1/keys/{sae}/{method}", self._handle)
        runner = web.AppRunner(app, access_log=None, handle_signals=False)
        await runner.setup()
        site = web.TCPSite(runner, self.host, self.port, ssl_context=ctx,
                           reuse_address=True)
        await site.start()
        self._runner = runner
        self.port = runner.addresses[0][1]

    async def stop(self) -> None:
        if self._runner is not None:
            await self._runner.cleanup()
            self._runner = None

    async def _handle(self, request: web.Request) -> web.StreamResponse:
        reply = await self._answer(request)
        log.debug("ETSI 014 %s %s -> %d", request.method, request.match_info["method"],
                  reply.status)
        return json_response(reply)

    async def _answer(self, request: web.Request) -> Reply:
        method, sae = request.match_info["method"], request.match_info["sae"]
        caller = caller_sae(request)
        if caller is None:
            return UNAUTHORIZED
        svc = self.service
        if method == "status" and request.method == "GET":
            st = svc.status(caller, sae, self.clock())
            return refusal_reply(st) if isinstance(st, Refusal) else Reply(200, st)
        if method == "enc_keys" and request.method in ("GET", "POST"):
            doc = await request_object(request, {"number", "size"})
            req = doc if isinstance(doc, Reply) else enc_request(doc)
            if isinstance(req, Reply):
                return req
            out = svc.enc_keys(caller, sae, req[0], req[1], self.clock())
        elif method == "dec_keys" and request.method in ("GET", "POST"):
            ids = await dec_keys_ids(request)
            if isinstance(ids, Reply):
                return ids
            out = svc.dec_keys(caller, sae, ids, self.clock())
        else:
            return error(404 if method not in ("status", "enc_keys", "dec_keys") else 405,
                         "no such method")
        return refusal_reply(out) if isinstance(out, Refusal) else delivery_reply(out)
