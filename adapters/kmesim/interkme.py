"""KME-to-KME key relay over HTTPS: the ETSI GS QKD 020 draft API between
the simulator's trusted nodes, with mutual TLS.

Theory of operation: with a topology, every node serves the inter-KME API
on its own loopback HTTPS port (:meth:`InterKme.start`), with a per-topology
CA and one certificate per node (serverAuth + clientAuth, CN = KME ID,
private keys 0600, checked with :func:`qkdgate.private_file.read_private_file`
before use). Paths, bodies and status codes follow the draft's OpenAPI
``interop-kms.yaml`` (Draft 0.5.1, forge.etsi.org/rep/qkd/gs020-interop-kms;
docs/qkd.md quotes it):

* ``POST /kmapi/v1/ext_keys`` (ext_key_container): the receiver checks the
  caller's certificate names the hop's sender (else 401), the container is
  well formed, for this node, not replayed and its one-time Poly1305 tag is
  right (else 400 naming what is wrong; nothing is held, nothing
  forwarded), then answers ``202`` and, in the background, forwards the
  re-padded key to the next node or -- at the route's end -- holds it for the
  slave SAEs and POSTs ``ack_status: relayed`` to ``ack_callback_url``.
  A node that cannot forward POSTs ``ack_status: failed``.
* ``POST /kmapi/v1/ext_keys/ack`` (array of ack containers): answered 200;
  the initiator's KME completes the waiting enc_keys.
* ``POST /kmapi/v1/ext_keys/void``: the target KME discards keys (and
  shares) and remembers their IDs so a late copy is refused; answered 202,
  then an ack ``voided`` / ``key not present``.
* ``GET /kmapi/versions``.

All or nothing (:meth:`InterKme.relay_keys`): the master's KME answers
only once every key is acknowledged ``relayed``; any ``failed`` ack, a
refused first hop or no ack within ``timeout`` voids every key of the
request at the target KME and answers 503, so a key reaches the slave's KME
and the master, or neither releases it (a key the target still holds after
a lost void has an ID no SAE ever learnt, and is evicted in time).

Everything runs on the simulator's event loop; one shared
:class:`~.relay.LinkKeyStore` per link stands for both ends' copies of the
QKD link key.
"""

from __future__ import annotations

import asyncio
import base64
import collections
import contextlib
import json
import logging
from collections.abc import Awaitable
from dataclasses import dataclass
from pathlib import Path

import aiohttp
from aiohttp import web

from qkdgate.adapters.etsi014_server import Reply, caller_sae, error, json_response
from qkdgate.adapters.kmesim import relay
from qkdgate.adapters.kmesim.kme import Prepared, SimNetwork
from qkdgate.adapters.kmesim.pki import Pki, ensure_pki
from qkdgate.adapters.tls import client_context, server_context
from qkdgate.errors import AuthenticationFailed, RemoteProtocolError
from qkdgate.private_file import read_private_file

log = logging.getLogger("qkdgate.kmesim.interkme")
NODE = web.AppKey("node", str)
MAX_BODY = 64 * 1024
TOMBSTONES = 10000           # voided key IDs a node remembers


@dataclass
class RelayFaults:
    """Per-node faults of the inter-KME relay, for tests and the demo."""

    tamper: bool = False       # flip a bit of the padded key before forwarding
    blackhole: bool = False    # accept (202) but never forward nor ack
    drop_ack: bool = False     # deliver at the route's end but never ack


class _RelayFailed(Exception):
    pass


class InterKme:
    """The ETSI 020 servers and clients of every node of one topology."""

    def __init__(self, network: SimNetwork, state_dir: Path, host: str = "127.0.0.1", *,
                 timeout: float = 5.0) -> None:
        self.network, self.host, self.timeout = network, host, timeout
        self.pki: Pki = ensure_pki(state_dir / "interkme", list(network.kmes), [],
                                   ("KME-ROGUE",), kme_client=True)
        self.ports: dict[str, int] = {}
        self.faults = {k: RelayFaults() for k in network.kmes}
        self.acks: list[tuple[str, relay.Ack]] = []     # (receiving node, ack), in order
        self._sessions: dict[str, aiohttp.ClientSession] = {}
        self._runners: list[web.AppRunner] = []
        self._tasks: set[asyncio.Task[None]] = set()
        self._pending: dict[str, tuple[asyncio.Future[relay.Ack], str]] = {}
        self._shares: dict[tuple[str, str], dict[int, bytes]] = {}
        self._tombstones = {k: collections.OrderedDict[str, None]() for k in network.kmes}

    # ----------------------------------------------------------- lifecycle

    async def start(self, ports: dict[str, int] | None = None) -> None:
        for node in self.network.kmes:
            cred = self.pki.kme(node)
            # The node's private key must be 0600 and ours (fail closed).
            read_private_file(str(cred.key), f"inter-KME key of {node}", MAX_BODY)
            app = web.Application(client_max_size=MAX_BODY)
            app[NODE] = node
            app.router.add_get(relay.VERSIONS_PATH, self._versions)
            app.router.add_post(relay.EXT_KEYS_PATH, self._ext_keys)
            app.router.add_post(relay.ACK_PATH, self._ack)
            app.router.add_post(relay.VOID_PATH, self._void)
            runner = web.AppRunner(app, access_log=None, handle_signals=False)
            await runner.setup()
            site = web.TCPSite(runner, self.host, (ports or {}).get(node, 0),
                               ssl_context=server_context(cred.cert, cred.key, self.pki.ca),
                               reuse_address=True)
            await site.start()
            self._runners.append(runner)
            self.ports[node] = runner.addresses[0][1]
            ctx = client_context(cred.cert, cred.key, self.pki.ca)
            self._sessions[node] = aiohttp.ClientSession(
                connector=aiohttp.TCPConnector(ssl=ctx),
                timeout=aiohttp.ClientTimeout(total=self.timeout))

    async def stop(self) -> None:
        for task in list(self._tasks):
            task.cancel()
        for task in list(self._tasks):
            with contextlib.suppress(asyncio.CancelledError):
                await task
        for session in self._sessions.values():
            await session.close()
        for r in self._runners:
            await r.cleanup()

    async def settle(self) -> None:
        """Wait until every forward, ack and void answer in flight is done."""
        while self._tasks:
            await asyncio.gather(*list(self._tasks), return_exceptions=True)

    def url(self, node: str) -> str:
        return f"https://{self.host}:{self.ports[node]}"

    def ack_url(self, node: str) -> str:
        return self.url(node) + relay.ACK_PATH

    def _spawn(self, coro: Awaitable[None]) -> None:
        task = asyncio.ensure_future(coro)
        self._tasks.add(task)
        task.add_done_callback(self._tasks.discard)

    async def _post(self, src: str, dst: str, path: str, body: bytes,
                    url: str | None = None) -> tuple[int, str]:
        """POST as node ``src`` to node ``dst``: (HTTP status, message);
        status 0 when no answer came. TLS checks the server certificate
        names ``dst`` (server_hostname) as well as the CA."""
        target = url if url is not None else self.url(dst) + path
        try:
            async with self._sessions[src].post(target, data=body, server_hostname=dst,
                                                headers={"Content-Type": "application/json"}
                                                ) as resp:
                text = await resp.text()
                try:
                    message = str(json.loads(text).get("message", "")) if text else ""
                except (ValueError, AttributeError):
                    message = text[:80]
                return resp.status, message
        except (aiohttp.ClientError, OSError, TimeoutError) as exc:
            return 0, f"{type(exc).__name__}"

    # ----------------------------------------------------- the initiator

    async def relay_keys(self, prep: Prepared) -> Reply:
        """Relay every key of ``prep`` to the slave's KME and wait for its
        acks; all or nothing (see the module text)."""
        loop = asyncio.get_running_loop()
        futures: dict[str, asyncio.Future[relay.Ack]] = {}
        for key_id, _ in prep.keys:
            futures[key_id] = loop.create_future()
            self._pending[key_id] = (futures[key_id], prep.peer)

        async def send(key_id: str, material: bytes) -> None:
            for hop, share in self.network.first_hops(prep, key_id, material,
                                                      self.ack_url(prep.kme_id)):
                status, message = await self._post(hop.src, hop.dst, relay.EXT_KEYS_PATH,
                                                   self.network.seal(hop, share))
                if status != 202:
                    raise _RelayFailed(f"{hop.src}->{hop.dst}: HTTP {status} {message}".strip())

        try:
            async with asyncio.timeout(self.timeout):
                # every first hop answered before any void goes out
                sent = await asyncio.gather(*(send(i, m) for i, m in prep.keys),
                                            return_exceptions=True)
                for result in sent:
                    if isinstance(result, BaseException):
                        raise result
                for key_id, fut in futures.items():
                    ack = await fut
                    if ack.status != relay.RELAYED:
                        raise _RelayFailed(f"{key_id}: {ack.status}: {ack.message}")
        except (_RelayFailed, TimeoutError) as exc:
            reason = str(exc) or "no acknowledgement in time"
            log.warning("%s: relay to %s failed (%s): voiding %d key(s)", prep.kme_id, prep.peer,
                        reason, len(prep.keys))
            await self._post(prep.kme_id, prep.peer, relay.VOID_PATH, relay.void_body(
                [i for i, _ in prep.keys], prep.caller, sorted(prep.slaves),
                self.ack_url(prep.kme_id)))
            return error(503, "key relay failed", relay=reason, target_KME_ID=prep.peer)
        finally:
            for key_id in futures:
                self._pending.pop(key_id, None)
        return prep.reply()

    # ----------------------------------------------------------- handlers

    def _caller(self, request: web.Request) -> str | None:
        caller = caller_sae(request)
        return caller if caller in self.network.kmes else None

    async def _versions(self, request: web.Request) -> web.Response:
        return web.json_response({"versions": ["v1"]})

    async def _ext_keys(self, request: web.Request) -> web.Response:
        node, net = request.app[NODE], self.network
        caller = self._caller(request)
        if caller is None:
            return json_response(error(401, "Unauthorized: not a KME of this network"))
        body = await request.read()
        try:
            hop = relay.parse_hop(body)
            if net.sae_home.get(hop.initiator_sae) != hop.route[0] or \
                    net.sae_home.get(hop.target_sae) != hop.route[-1]:
                # ETSI GS QKD 020 draft: 400 for SAE IDs without a known route
                raise RemoteProtocolError("initiator/target SAE not at the route's ends")
            if hop.dst == hop.route[-1] and hop.key_id in self._tombstones[node]:
                raise RemoteProtocolError(f"key {hop.key_id} was voided")
            opened = net.open(body, node, sender=caller)
        except AuthenticationFailed as exc:
            return json_response(error(401, f"Unauthorized: {exc}"))
        except RemoteProtocolError as exc:
            return json_response(error(400, str(exc)))
        log.debug("%s: ext_keys %s share %s from %s", node, opened.hop.key_id,
                  opened.hop.share, caller)
        if node == opened.hop.route[-1]:
            self._arrive(node, opened)
        elif not self.faults[node].blackhole:
            self._spawn(self._forward(node, opened))
        return web.Response(status=202)

    async def _forward(self, node: str, opened: relay.Opened) -> None:
        hop = opened.hop.next()
        wire = self.network.seal(hop, opened.material)
        if self.faults[node].tamper:
            doc = json.loads(wire)
            v = bytearray(base64.b64decode(doc["keys"][0]["value"]))
            v[0] ^= 1
            doc["keys"][0]["value"] = base64.b64encode(bytes(v)).decode("ascii")
            wire = json.dumps(doc).encode()
        status, message = await self._post(node, hop.dst, relay.EXT_KEYS_PATH, wire)
        if status != 202:
            await self._send_ack(node, hop, relay.FAILED,
                                 f"{node}->{hop.dst}: HTTP {status} {message}".strip())

    def _arrive(self, node: str, opened: relay.Opened) -> None:
        hop = opened.hop
        held = self._shares.setdefault((node, hop.key_id), {})
        held[hop.share[0]] = opened.material
        if len(held) < hop.share[1]:
            return
        del self._shares[(node, hop.key_id)]
        material = relay.join([held[i] for i in sorted(held)])
        self.network.deliver(node, hop.key_id, material, hop.initiator_sae,
                             frozenset((hop.target_sae, *hop.also)))
        if not self.faults[node].drop_ack:
            self._spawn(self._send_ack(node, hop, relay.RELAYED, ""))

    async def _send_ack(self, node: str, hop: relay.Hop, status: str, message: str) -> None:
        body = relay.ack_body([relay.Ack((hop.key_id,), status, hop.initiator_sae,
                                         hop.target_sae, message)])
        got, why = await self._post(node, hop.route[0], relay.ACK_PATH, body, url=hop.ack_url)
        if got != 200:
            log.warning("%s: ack %s for %s not taken: HTTP %d %s", node, status, hop.key_id,
                        got, why)

    async def _ack(self, request: web.Request) -> web.Response:
        node = request.app[NODE]
        caller = self._caller(request)
        if caller is None:
            return json_response(error(401, "Unauthorized: not a KME of this network"))
        try:
            acks = relay.parse_acks(await request.read())
        except RemoteProtocolError as exc:
            return json_response(error(400, str(exc)))
        for ack in acks:
            self.acks.append((node, ack))
            for key_id in ack.key_ids:
                pending = self._pending.get(key_id)
                if pending is None or pending[0].done():
                    continue
                fut, target = pending
                if ack.status == relay.RELAYED and caller != target:
                    return json_response(error(401, f"Unauthorized: {caller} is not the "
                                                    f"target KME of {key_id}"))
                fut.set_result(ack)
        return web.json_response({"message": "ok"})

    async def _void(self, request: web.Request) -> web.Response:
        node, net = request.app[NODE], self.network
        caller = self._caller(request)
        if caller is None:
            return json_response(error(401, "Unauthorized: not a KME of this network"))
        try:
            key_ids, initiator, targets, ack_url = relay.parse_void(await request.read())
        except RemoteProtocolError as exc:
            return json_response(error(400, str(exc)))
        if net.sae_home.get(initiator) != caller:
            return json_response(error(401, f"Unauthorized: {caller} is not the KME of "
                                            f"initiator {initiator}"))
        voided: list[str] = []
        absent: list[str] = []
        for key_id in key_ids:
            item = net.kmes[node].issued.get(key_id)
            if item is not None and item.master_sae != initiator:
                absent.append(key_id)       # not this initiator's key: untouched
                continue
            had = self._shares.pop((node, key_id), None) is not None
            (voided if net.void(node, key_id) or had else absent).append(key_id)
            tomb = self._tombstones[node]
            tomb[key_id] = None
            while len(tomb) > TOMBSTONES:
                tomb.popitem(last=False)
        target = targets[0] if targets else ""
        acks = [relay.Ack(tuple(ids), status, initiator, target, "")
                for ids, status in ((voided, relay.VOIDED), (absent, relay.NOT_PRESENT)) if ids]

        async def answer() -> None:
            await self._post(node, caller, relay.ACK_PATH, relay.ack_body(acks), url=ack_url)
        self._spawn(answer())
        return web.Response(status=202)
