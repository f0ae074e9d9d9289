"""The KME simulator: real HTTPS servers with mutual TLS around SimNetwork.

Theory of operation: :meth:`KmeSimulator.start` builds a
:class:`~.kme.SimNetwork` (KMEs joined pairwise by modelled QKD links),
creates or reuses the demo PKI in the state directory, and starts one
aiohttp HTTPS server per KME that requires a client certificate from the
demo CA. Each request's caller is the CN of its verified client certificate
(ETSI GS QKD 014 5.1). The servers speak ETSI GS QKD 014 (``/api/v1/keys``)
and qkdgate's JSON binding of ETSI GS QKD 004 (``/api/v1/qkd004``, see
:mod:`qkdgate.adapters.etsi004`); a second TLS port per KME speaks the binary
004 binding of ETSI's reference interface (:mod:`.qkd004_binary`). Both 004
bindings serve one :class:`~.qkd004.Qkd004Service`.

Fault injection (:class:`Faults`, per KME; link faults on the
:class:`~.linkmodel.QkdLink`): slow answers, garbage bodies, responses
dropped after the KME changed state (the lost dec_keys answer), a server
certificate from an untrusted CA, link down, an eavesdropper, an exhausted
pool. They are driven from Python (tests, the demo) or from the admin
endpoint, plain HTTP bound to loopback only (the CLI).

The simulator is embeddable: ``async with KmeSimulator.start(dir) as sim``.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import os
import ssl
import time
from collections.abc import AsyncIterator, Callable, Mapping
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any

from aiohttp import web

from qkdgate.adapters.etsi014_server import (
    Reply,
    caller_sae,
    dec_keys_ids,
    json_response,
    request_object,
)
from qkdgate.adapters.kmesim.interkme import InterKme
from qkdgate.adapters.kmesim.kme import SimNetwork, error
from qkdgate.adapters.kmesim.linkmodel import REALISTIC, LinkParams, QkdLink
from qkdgate.adapters.kmesim.pki import Pki, ensure_pki
from qkdgate.adapters.kmesim.qkd004 import Qkd004Service
from qkdgate.adapters.kmesim.qkd004_binary import Qkd004BinaryServer
from qkdgate.adapters.kmesim.topology import Topology
from qkdgate.adapters.tls import server_context

log = logging.getLogger("qkdgate.kmesim")
KME_ID = web.AppKey("kme_id", str)

GARBAGE = {
    "bytes": (b"\x00\xff\xfe garbage \x89PNG\r\n", "application/json"),
    "html": (b"<html><body><h1>502 Bad Gateway</h1></body></html>", "text/html"),
    "json": (b'{"keys": [{"key_ID": "not-a-uuid", "key": "%%%"}], "status": 7}',
             "application/json"),
    "truncated": (b'{"keys": [{"key_ID": "bc490419-7d60-487f', "application/json"),
}


@dataclass
class Faults:
    """Per-KME fault switches. ``drop`` counts responses to drop (after the
    KME has acted on the request) on paths containing ``drop_path``."""

    delay: float = 0.0
    garbage: str | None = None
    raw: tuple[int, bytes, str] | None = None   # (HTTP status, body, content type) for any call
    drop: int = 0
    drop_path: str = ""
    wrong_cert: bool = False
    raw004: bytes | None = None    # sent instead of a binary 004 answer, then the stream closed
    raw004_left: int = -1          # answers raw004 replaces (-1: all)
    raw004_close: bool = True      # close the stream after raw004


@dataclass(frozen=True, slots=True)
class SaeCredentials:
    sae_id: str
    kme_id: str
    url: str
    cert: Path
    key: Path
    ca: Path
    url004: str | None = None      # the binary ETSI 004 endpoint (https://host:port: raw TLS)

    def settings(self, name: str | None = None, *, binding: str | None = None,
                 **options: object) -> dict[str, object]:
        """A key-source entry for :func:`qkdgate.adapters.registry.create_key_source`.
        ``binding`` (ETSI 004: ``etsi-binary`` or ``json``) picks the endpoint."""
        extra: dict[str, object] = {}
        url = self.url
        if binding is not None:
            extra = {"kind": "etsi004", "binding": binding}
            if binding == "etsi-binary" and self.url004 is not None:
                url = self.url004
        return {"name": name or self.sae_id, "kind": "etsi014", **extra, "url": url,
                "kme_id": self.kme_id, "timeout": options.pop("timeout", 5.0),
                "retries": options.pop("retries", 2),
                "tls": {"cert": str(self.cert), "key": str(self.key), "ca": str(self.ca)},
                "options": {"backoff": 0.01, **options}}


def default_sae(kme_id: str, i: int) -> str:
    return "SAE-" + kme_id[4:] if kme_id.startswith("KME-") else f"SAE-{i}"


class KmeSimulator:
    def __init__(self, state_dir: Path, network: SimNetwork, pki: Pki, host: str) -> None:
        self.state_dir, self.network, self.pki, self.host = state_dir, network, pki, host
        self.faults: dict[str, Faults] = {k: Faults() for k in network.kmes}
        self.ports: dict[str, int] = {}
        self.admin_port: int | None = None
        self.qkd004 = Qkd004Service(network)
        self.qkd004_binary: dict[str, Qkd004BinaryServer] = {}
        self.ports004: dict[str, int] = {}
        self._runners: list[web.AppRunner] = []
        self.interkme: InterKme | None = None   # topology: the ETSI 020 relay over HTTPS

    # ----------------------------------------------------------- lifecycle

    @classmethod
    @contextlib.asynccontextmanager
    async def start(cls, state_dir: str | Path, *, kmes: tuple[str, ...] = ("KME-A", "KME-B"),
                    saes: Mapping[str, str] | None = None, host: str = "127.0.0.1",
                    ports: Mapping[str, int] | None = None, admin_port: int | None = None,
                    qkd004_ports: Mapping[str, int] | None = None, qkd004_binary: bool = True,
                    link_params: LinkParams = REALISTIC, key_size: int = 256,
                    max_key_count: int = 100000, prefill: int | None = None,
                    now: Callable[[], float] = time.monotonic,
                    rng: Callable[[int], bytes] = os.urandom,
                    topology: Topology | None = None,
                    interkme_ports: Mapping[str, int] | None = None,
                    relay_timeout: float = 5.0) -> AsyncIterator[KmeSimulator]:
        """Start the KMEs (ports 0 = ephemeral) and stop them on exit.
        ``saes`` maps SAE ID -> KME ID (default: SAE-A at KME-A, ...);
        ``prefill`` puts that many keys in every link pool; each KME also
        serves the binary ETSI 004 binding on ``qkd004_ports`` (default
        ephemeral) unless ``qkd004_binary`` is False. A ``topology`` replaces
        ``kmes``, ``saes``, the link and pool arguments: one KME per node,
        its links only, keys relayed between nodes that share no link, each
        hop a POST of the ETSI GS QKD 020 API between the nodes' HTTPS
        servers (:mod:`.interkme`, ``interkme_ports`` default ephemeral;
        ``relay_timeout`` bounds the wait for the target KME's ack)."""
        state = Path(state_dir)
        if topology is not None:
            net = SimNetwork.from_topology(topology, now=now, rng=rng)
            kmes, saes = tuple(net.kmes), dict(net.sae_home)
        else:
            saes = (dict(saes) if saes is not None
                    else {default_sae(k, i): k for i, k in enumerate(kmes)})
            net = SimNetwork(now=now, rng=rng)
            for k in kmes:
                net.add_kme(k, key_size=key_size)
            for sae, k in saes.items():
                net.attach(sae, k)
            for i, a in enumerate(kmes):
                for b in kmes[i + 1:]:
                    link = net.connect(a, b, QkdLink(a, b, link_params, key_size=key_size,
                                                     max_key_count=max_key_count))
                    if prefill:
                        link.fill(prefill)
        pki = await asyncio.to_thread(ensure_pki, state, list(kmes), list(saes),
                                      ("KME-ROGUE", "SAE-ROGUE"))
        sim = cls(state, net, pki, host)
        try:
            if topology is not None:
                sim.interkme = await asyncio.to_thread(InterKme, net, state, host,
                                                       timeout=relay_timeout)
                await sim.interkme.start(dict(interkme_ports or {}))
            for k in kmes:
                await sim._serve_kme(k, (ports or {}).get(k, 0))
                if qkd004_binary:
                    await sim._serve_004_binary(k, (qkd004_ports or {}).get(k, 0))
            if admin_port is not None:
                await sim._serve_admin(admin_port)
            yield sim
        finally:
            if sim.interkme is not None:
                await sim.interkme.stop()
            for srv in sim.qkd004_binary.values():
                await srv.stop()
            for r in sim._runners:
                await r.cleanup()

    async def _serve_kme(self, kme_id: str, port: int) -> None:
        cred, rogue = self.pki.kme(kme_id), self.pki.rogue("KME-ROGUE")
        ctx = server_context(cred.cert, cred.key, self.pki.ca)
        bad = server_context(rogue.cert, rogue.key, self.pki.ca)

        def sni(sslobj: ssl.SSLObject, _name: str | None, _ctx: ssl.SSLContext) -> None:
            if self.faults[kme_id].wrong_cert:
                sslobj.context = bad   # present a certificate from the rogue CA
        ctx.sni_callback = sni
        app = web.Application(client_max_size=1 << 20)
        app[KME_ID] = kme_id
        app.router.add_route("*", "/api/v1/keys/{sae}/{method}", self._etsi014)
        app.router.add_post("/api/v1/qkd004/{op}", self._etsi004)
        runner = web.AppRunner(app, access_log=None, handle_signals=False)
        await runner.setup()
        site = web.TCPSite(runner, self.host, port, ssl_context=ctx, reuse_address=True)
        await site.start()
        self._runners.append(runner)
        self.ports[kme_id] = runner.addresses[0][1]

    async def _serve_004_binary(self, kme_id: str, port: int) -> None:
        cred = self.pki.kme(kme_id)
        ctx = server_context(cred.cert, cred.key, self.pki.ca)
        srv = Qkd004BinaryServer(kme_id, self.qkd004, self.network.sae_home.get,
                                 lambda: self.faults[kme_id])
        self.qkd004_binary[kme_id] = srv
        self.ports004[kme_id] = await srv.start(self.host, port, ctx)

    # ------------------------------------------------------------ handlers

    async def _respond(self, request: web.Request, kme_id: str, what: str,
                       reply: Reply) -> web.StreamResponse:
        f = self.faults[kme_id]
        if f.delay:
            await asyncio.sleep(f.delay)
        if f.drop > 0 and f.drop_path in what:
            f.drop -= 1
            log.info("%s: dropping the response to %s (fault)", kme_id, what)
            if request.transport is not None:
                request.transport.abort()
            raise asyncio.CancelledError   # aiohttp ends the handler without answering
        if f.raw is not None:
            status, body, ctype = f.raw
            return web.Response(status=status, body=body, content_type=ctype)
        if f.garbage:
            body, ctype = GARBAGE.get(f.garbage, GARBAGE["bytes"])
            return web.Response(status=200, body=body, content_type=ctype)
        return json_response(reply)

    async def _etsi014(self, request: web.Request) -> web.StreamResponse:
        kme_id = request.app[KME_ID]
        method, sae = request.match_info["method"], request.match_info["sae"]
        caller = caller_sae(request)
        if caller is None:
            return await self._respond(request, kme_id, method,
                                       Reply(401, {"message": "Unauthorized"}))
        net = self.network
        if method == "status" and request.method == "GET":
            reply = net.status(kme_id, caller, sae)
        elif method == "enc_keys" and request.method in ("GET", "POST"):
            req = await _request_any(request, {"number", "size"})
            reply = req if isinstance(req, Reply) else await self._enc_keys(kme_id, caller, sae,
                                                                            req)
        elif method == "dec_keys" and request.method in ("GET", "POST"):
            reply = await self._dec_keys(request, kme_id, caller, sae)
        else:
            reply = error(404 if method not in ("status", "enc_keys", "dec_keys") else 405,
                          "no such method")
        log.debug("%s %s %s by %s -> %d", kme_id, request.method, method, caller, reply.status)
        return await self._respond(request, kme_id, method, reply)

    async def _enc_keys(self, kme_id: str, caller: str, slave: str, req: object) -> Reply:
        if self.interkme is None:
            return self.network.enc_keys(kme_id, caller, slave, req)
        prep = self.network.prepare_enc_keys(kme_id, caller, slave, req)
        if isinstance(prep, Reply):
            return prep
        if not prep.plan.relayed:
            return self.network.issue(prep)
        return await self.interkme.relay_keys(prep)   # ETSI GS QKD 020 hop by hop, acknowledged

    async def _dec_keys(self, request: web.Request, kme_id: str, caller: str, master: str) -> Reply:
        ids = await dec_keys_ids(request)
        return ids if isinstance(ids, Reply) else self.network.dec_keys(kme_id, caller, master, ids)

    async def _etsi004(self, request: web.Request) -> web.StreamResponse:
        kme_id = request.app[KME_ID]
        caller = caller_sae(request)
        op = request.match_info["op"]
        if caller is None or self.network.sae_home.get(caller) != kme_id:
            return await self._respond(request, kme_id, op, Reply(401, {"message": "Unauthorized"}))
        doc = await _request_any(request, set())
        reply = doc if isinstance(doc, Reply) else self.qkd004.handle(kme_id, caller, op, doc)
        return await self._respond(request, kme_id, "qkd004/" + op, reply)

    # ------------------------------------------------------------- control

    def url(self, kme_id: str) -> str:
        return f"https://{self.host}:{self.ports[kme_id]}"

    def url004(self, kme_id: str) -> str | None:
        """The binary ETSI 004 endpoint (raw TLS; the scheme only says TLS)."""
        port = self.ports004.get(kme_id)
        return None if port is None else f"https://{self.host}:{port}"

    def credentials(self, sae_id: str) -> SaeCredentials:
        kme_id = self.network.sae_home[sae_id]
        cred = self.pki.sae(sae_id)
        return SaeCredentials(sae_id, kme_id, self.url(kme_id), cred.cert, cred.key, self.pki.ca,
                              self.url004(kme_id))

    def link(self, a: str | None = None, b: str | None = None) -> QkdLink:
        """The link between KMEs ``a`` and ``b`` (default: the first link)."""
        if a is None or b is None:
            return next(iter(self.network.links.values()))
        link = self.network.links[frozenset((a, b))]
        return link

    def set_link_up(self, up: bool, a: str | None = None, b: str | None = None) -> None:
        self.link(a, b).up = up

    def set_eavesdropper(self, fraction: float, a: str | None = None, b: str | None = None) -> None:
        self.link(a, b).eve_fraction = fraction

    def exhaust(self, a: str | None = None, b: str | None = None, *, refill: bool = False) -> None:
        link = self.link(a, b)
        link.drain()
        link.paused = not refill

    def fill(self, keys: int | None = None, a: str | None = None, b: str | None = None) -> None:
        link = self.link(a, b)
        link.paused = False
        link.fill(keys)

    def state(self) -> dict[str, object]:
        out: dict[str, Any] = {"kmes": {}, "links": []}
        for k in self.network.kmes:
            faults = {**asdict(self.faults[k]), "raw": self.faults[k].raw is not None}
            faults["raw004"] = self.faults[k].raw004 is not None
            out["kmes"][k] = {"url": self.url(k), "url004": self.url004(k), "faults": faults,
                              "saes": sorted(s for s, h in self.network.sae_home.items() if h == k),
                              "keys_awaiting_slaves": len(self.network.kmes[k].issued),
                              "compromised": k in self.network.compromised,
                              "keys_seen_by_attacker": len(self.network.attacker_knowledge(k))}
            if self.interkme is not None:
                out["kmes"][k]["interkme_url"] = self.interkme.url(k)
        for link in self.network.links.values():
            link.advance(self.network.now())
            skr, qber = link.rate()
            out["links"].append({"kmes": [link.kme_a, link.kme_b], "up": link.up,
                                 "paused": link.paused, "eve_fraction": link.eve_fraction,
                                 "stored_keys": link.stored_keys(),
                                 "max_key_count": link.max_key_count,
                                 "secret_key_rate_bps": round(skr, 1), "qber": round(qber, 5),
                                 "alarms": link.alarms(), "distance_km": link.params.distance_km})
        return out

    # ---------------------------------------------------------------- admin

    async def _serve_admin(self, port: int) -> None:
        app = web.Application(client_max_size=64 * 1024)
        async def admin_state(request: web.Request) -> web.Response:
            return web.json_response(self.state())

        async def admin_attacker(request: web.Request) -> web.Response:
            # What compromised nodes saw, key material in hex: the attacker's
            # knowledge, for tests and the demo (loopback only, like all admin).
            return web.json_response([
                {"node": s.node, "key_ID": s.key_id, "master_SAE_ID": s.master_sae,
                 "slave_SAE_ID": s.slave_sae, "route": list(s.route), "share": list(s.share),
                 "key_hex": s.material.hex()}
                for s in self.network.attacker_knowledge()])

        app.router.add_get("/admin/state", admin_state)
        app.router.add_get("/admin/attacker", admin_attacker)
        app.router.add_post("/admin/fault", self._admin_fault)
        app.router.add_post("/admin/link", self._admin_link)
        runner = web.AppRunner(app, access_log=None, handle_signals=False)
        await runner.setup()
        # Loopback only: the admin endpoint has no authentication.
        site = web.TCPSite(runner, "127.0.0.1", port, reuse_address=True)
        await site.start()
        self._runners.append(runner)
        self.admin_port = runner.addresses[0][1]

    async def _admin_fault(self, request: web.Request) -> web.Response:
        doc = await _request_any(request, set())
        if isinstance(doc, Reply) or doc.get("kme") not in self.faults:
            return web.json_response({"message": "need {\"kme\": KME ID, ...}"}, status=400)
        f = self.faults[doc["kme"]]
        try:
            for name, conv in (("delay", float), ("drop", int), ("drop_path", str),
                               ("wrong_cert", bool)):
                if name in doc:
                    setattr(f, name, conv(doc[name]))
            if "garbage" in doc:
                if doc["garbage"] not in (None, *GARBAGE):
                    raise ValueError("garbage must be one of " + ", ".join(GARBAGE))
                f.garbage = doc["garbage"]
        except (TypeError, ValueError) as exc:
            return web.json_response({"message": str(exc)}, status=400)
        return web.json_response({**asdict(f), "raw": f.raw is not None,
                                  "raw004": f.raw004 is not None})

    async def _admin_link(self, request: web.Request) -> web.Response:
        doc = await _request_any(request, set())
        if isinstance(doc, Reply):
            return web.json_response({"message": "need a JSON object"}, status=400)
        try:
            a, b = doc.get("a"), doc.get("b")
            link = self.link(a, b) if a else self.link()
            if "up" in doc:
                link.up = bool(doc["up"])
            if "eve" in doc:
                link.eve_fraction = float(doc["eve"])
            if doc.get("drain"):
                self.exhaust(link.kme_a, link.kme_b, refill=not doc.get("pause", True))
            if "fill" in doc:
                keys = None if doc["fill"] == "full" else int(doc["fill"])
                self.fill(keys, link.kme_a, link.kme_b)
            if "distance_km" in doc:
                link.with_params(distance_km=float(doc["distance_km"]))
        except (KeyError, TypeError, ValueError) as exc:
            return web.json_response({"message": f"bad link control: {exc}"}, status=400)
        return web.json_response(self.state())


async def _request_any(request: web.Request, query_ints: set[str]) -> dict[str, Any] | Reply:
    # The simulator's handlers (the admin endpoint above all) convert each
    # field where they use it, as they did before the parser moved.
    return await request_object(request, query_ints)
