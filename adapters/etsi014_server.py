"""The server half of ETSI GS QKD 014 shared by every KME qkdgate runs.

Theory of operation: the KME simulator (:mod:`qkdgate.adapters.kmesim`) and
the hybrid key service (:mod:`qkdgate.keyservice`) both act as a KME towards
SAEs. Their logic differs (a simulated QKD link vs. a pool derived from a
hybrid generation); what an SAE sees must not: the Error body (6.5), the
caller taken from the verified client certificate (5.1), the request objects
read from GET query parameters or a POST body (5.3, 5.4), and the spec's
400/401 answers. Those live here, once; the HTTP server and the decision of
what to answer stay with each KME.
"""

from __future__ import annotations

import json
from collections.abc import Mapping
from dataclasses import dataclass
from typing import Any

from aiohttp import web

from qkdgate.adapters.etsi014_codec import normalise_key_id
from qkdgate.errors import KeySourceProtocolError

BAD_REQUEST = "Bad request format"


@dataclass(frozen=True, slots=True)
class Reply:
    status: int
    body: Mapping[str, object] | None = None


def error(status: int, message: str, **details: object) -> Reply:
    # ETSI GS QKD 014 6.5 Error: message, optional details array of objects.
    body: dict[str, Any] = {"message": message}
    if details:
        body["details"] = [{k: v} for k, v in details.items()]
    return Reply(status, body)


UNAUTHORIZED = Reply(401, {"message": "Unauthorized"})


def caller_sae(request: web.Request) -> str | None:
    """The SAE ID of the caller: the CN of its verified client certificate
    (ETSI GS QKD 014 5.1), or None without one."""
    cert = request.transport.get_extra_info("peercert") if request.transport else None
    for rdn in (cert or {}).get("subject", ()):
        for attr, value in rdn:
            if attr == "commonName":
                return str(value)
    return None


def json_response(reply: Reply) -> web.Response:
    if reply.body is None:
        return web.Response(status=reply.status)
    return web.Response(status=reply.status, content_type="application/json",
                        text=json.dumps(reply.body))


async def request_object(request: web.Request, query_ints: set[str]) -> dict[str, object] | Reply:
    """The request as a JSON object: the POST body, or for GET the query
    parameters named in ``query_ints`` as integers (ETSI GS QKD 014 5.3)."""
    if request.method == "GET":
        if set(request.query) - query_ints:
            return error(400, BAD_REQUEST,
                         unknown_parameters=sorted(set(request.query) - query_ints))
        out: dict[str, object] = {}
        for k in query_ints & set(request.query):
            try:
                out[k] = int(request.query[k])
            except ValueError:
                return error(400, BAD_REQUEST, **{f"invalid_{k}": request.query[k][:40]})
        return out
    raw = await request.read()
    if not raw.strip():
        return {}
    try:
        doc = json.loads(raw)
    except (ValueError, UnicodeDecodeError):
        return error(400, BAD_REQUEST)
    return doc if isinstance(doc, dict) else error(400, BAD_REQUEST)


async def dec_keys_ids(request: web.Request) -> list[str] | Reply:
    """The key_IDs of a dec_keys request (ETSI GS QKD 014 5.4 / 6.4):
    GET carries exactly one ``key_ID``; POST a Key IDs object."""
    if request.method == "GET":
        if set(request.query) != {"key_ID"} or len(request.query.getall("key_ID")) != 1:
            return error(400, BAD_REQUEST)
        raw_ids: list[object] = [request.query["key_ID"]]
    else:
        doc = await request_object(request, set())
        if isinstance(doc, Reply):
            return doc
        items = doc.get("key_IDs")
        if not isinstance(items, list) or not all(isinstance(i, dict) for i in items):
            return error(400, BAD_REQUEST)
        raw_ids = [i.get("key_ID") for i in items]
    try:
        return [normalise_key_id(k) for k in raw_ids]
    except KeySourceProtocolError:
        return error(400, BAD_REQUEST, invalid_key_ID=True)
