"""The simulated KMEs' ETSI GS QKD 014 logic, without I/O.

Theory of operation: a :class:`SimNetwork` holds the KMEs, which SAE is
attached to which KME, and the :class:`~.linkmodel.QkdLink` between each
pair of KMEs. The HTTPS layer (:mod:`.server`) authenticates the caller's
SAE ID from its client certificate and calls :meth:`SimNetwork.status`,
:meth:`~SimNetwork.enc_keys` or :meth:`~SimNetwork.dec_keys`, which return a
:class:`Reply` (HTTP status and JSON body) exactly as ETSI GS QKD 014 V1.1.1
prescribes:

* enc_keys (master): key material is drawn from the link pool; the master's
  copy is delivered in the answer and kept nowhere; the slave KME keeps one
  copy per named slave SAE (the path's slave plus additional_slave_SAE_IDs).
* dec_keys (slave): 401 if the caller was not named as a slave for those
  keys; 400 with the spec's message if any key_ID is unknown (all or
  nothing); each slave gets a key once, then it is gone.
* Empty pool, link down or QBER alarm: 503 with an Error body.

Networks (:mod:`.topology`): with a topology, SAEs on KMEs that share no
QKD link get keys relayed hop by hop through trusted nodes (:mod:`.relay`:
one-time pad and one-time Poly1305 per hop, each hop consuming key from its
link at the link model's rate); ETSI 014 at the edges is unchanged. Routes
are ``shortest`` or ``k-disjoint`` (the key XOR-split into k shares, one per
node-disjoint path), or pinned per SAE pair. A node marked compromised
records every key (or share) that passes through it or ends at it:
:meth:`SimNetwork.attacker_knowledge` is what the attacker learnt. Without a
topology only directly linked KMEs serve keys, as before.

Time and randomness are injected (``now()``, ``rng(n)``) so tests are
deterministic and never wait for key to accumulate.
"""

from __future__ import annotations

import base64
import os
import time
import uuid
from collections import Counter
from collections.abc import Callable, Mapping
from dataclasses import dataclass, field
from itertools import pairwise
from typing import Any

from qkdgate.adapters.etsi014_codec import (
    MSG_EXT_MANDATORY_UNSUPPORTED,
    MSG_KEYS_NOT_FOUND,
    MSG_SIZE_MULTIPLE_OF_8,
)
from qkdgate.adapters.etsi014_server import BAD_REQUEST, UNAUTHORIZED, Reply, error
from qkdgate.adapters.kmesim import relay
from qkdgate.adapters.kmesim.linkmodel import ALARM_LINK_DOWN, ALARM_QBER, QkdLink
from qkdgate.adapters.kmesim.topology import Graph, Topology

__all__ = ["BAD_REQUEST", "UNAUTHORIZED", "Prepared", "Reply", "Seen", "SimKme", "SimNetwork",
           "error"]

Route = tuple[str, ...]


@dataclass(frozen=True, slots=True)
class Seen:
    """One key (or one share of it) a compromised node held in the clear."""

    node: str
    key_id: str
    master_sae: str
    slave_sae: str
    route: Route
    share: tuple[int, int]         # (i, k): share i of k; (1, 1) is the whole key
    material: bytes = field(repr=False)


@dataclass(frozen=True, slots=True)
class _Plan:
    """How keys reach the slave's KME: one or more routes of KME IDs."""

    routes: tuple[Route, ...]
    relayed: bool                  # False: one direct link whose key is the key

    def hops(self) -> list[frozenset[str]]:
        return [frozenset(h) for r in self.routes for h in pairwise(r)]


@dataclass(frozen=True, slots=True)
class Prepared:
    """Keys drawn for an enc_keys request, not yet held for the slaves."""

    kme_id: str
    peer: str                      # the slave SAEs' KME
    plan: _Plan
    caller: str
    slave: str
    extra: tuple[str, ...]         # additional_slave_SAE_IDs
    keys: list[tuple[str, bytes]] = field(repr=False)
    unhandled_optional: list[str] = field(default_factory=list)

    @property
    def slaves(self) -> frozenset[str]:
        return frozenset((self.slave, *self.extra))

    def reply(self) -> Reply:
        body: dict[str, Any] = {"keys": [
            {"key_ID": i, "key": base64.b64encode(m).decode("ascii")} for i, m in self.keys]}
        if self.unhandled_optional:
            body["key_container_extension"] = {
                "qkdgate_unhandled_extension_optional": self.unhandled_optional}
        return Reply(200, body)


@dataclass
class _Issued:
    """A key waiting at the slave KME for the slave SAEs still to fetch it."""

    material: bytes
    master_sae: str
    named: frozenset[str]      # every slave SAE named in the request
    pending: set[str]          # those that have not fetched it yet


@dataclass
class SimKme:
    kme_id: str
    key_size: int = 256
    min_key_size: int = 64
    max_key_size: int = 1024
    max_key_per_request: int = 128
    max_sae_id_count: int = 2
    max_issued: int = 100000    # keys held for slaves; the oldest go first beyond this
    issued: dict[str, _Issued] = field(default_factory=dict)


class SimNetwork:
    """KMEs joined by QKD links, and the SAEs attached to them."""

    def __init__(self, *, now: Callable[[], float] = time.monotonic,
                 rng: Callable[[int], bytes] = os.urandom) -> None:
        self.now, self.rng = now, rng
        self.kmes: dict[str, SimKme] = {}
        self.sae_home: dict[str, str] = {}
        self.links: dict[frozenset[str], QkdLink] = {}
        self.link_keys: dict[frozenset[str], relay.LinkKeyStore] = {}
        self.topology: Topology | None = None   # None: direct links only, no relay
        self.compromised: set[str] = set()
        self._seen: list[Seen] = []

    @classmethod
    def from_topology(cls, topo: Topology, *, now: Callable[[], float] = time.monotonic,
                      rng: Callable[[int], bytes] = os.urandom) -> SimNetwork:
        net = cls(now=now, rng=rng)
        net.topology = topo
        net.compromised = set(topo.compromised())
        for node in topo.nodes:
            net.add_kme(node.name, key_size=topo.key_size)
        for sae, kme_id in topo.sae_home().items():
            net.attach(sae, kme_id)
        for spec in topo.links:
            link = net.connect(spec.a, spec.b, QkdLink(spec.a, spec.b, spec.params,
                                                       key_size=topo.key_size,
                                                       max_key_count=topo.max_key_count))
            link.eve_fraction, link.up = spec.eve_fraction, spec.up
            fill = topo.prefill if spec.prefill is None else spec.prefill
            if fill:
                link.fill(fill)
        return net

    # ------------------------------------------------------------ topology

    def add_kme(self, kme_id: str, *, key_size: int = 256) -> SimKme:
        kme = self.kmes[kme_id] = SimKme(kme_id, key_size=key_size)
        return kme

    def attach(self, sae_id: str, kme_id: str) -> None:
        self.sae_home[sae_id] = kme_id

    def connect(self, a: str, b: str, link: QkdLink) -> QkdLink:
        link.now = self.now()
        self.links[frozenset((a, b))] = link
        self.link_keys[frozenset((a, b))] = relay.LinkKeyStore(self.rng)
        return link

    def link(self, a: str, b: str) -> QkdLink | None:
        link = self.links.get(frozenset((a, b)))
        if link is not None:
            link.advance(self.now())
        return link

    # ------------------------------------------------------------ ETSI 014

    def _pair(self, kme_id: str, caller: str, peer: str) -> tuple[SimKme, SimKme, _Plan] | Reply:
        kme = self.kmes[kme_id]
        if self.sae_home.get(caller) != kme_id:
            return UNAUTHORIZED        # ETSI GS QKD 014 5.1: unknown SAE
        peer_kme = self.sae_home.get(peer)
        if peer_kme is None:
            return error(400, BAD_REQUEST, unknown_SAE_ID=peer)
        plan = self._plan(kme_id, peer_kme, caller, peer)
        if plan is None:
            if self.topology is None:
                return error(400, BAD_REQUEST, no_QKD_link_to=peer)
            # ETSI GS QKD 020 draft: 400 for SAEs "for which a valid route is not known"
            return error(400, BAD_REQUEST, no_route_to=peer, routing=self.topology.routing)
        return kme, self.kmes[peer_kme], plan

    def _plan(self, src: str, dst: str, caller: str, peer: str) -> _Plan | None:
        if src == dst:
            return None
        topo = self.topology
        if topo is None:
            return _Plan(((src, dst),), False) if self.link(src, dst) is not None else None
        for link in self.links.values():
            link.advance(self.now())
        pinned = topo.pinned(caller, peer, src, dst)
        if pinned is not None:
            return _Plan((pinned,), len(pinned) > 2)
        graph = Graph({pair: link.params.distance_km for pair, link in self.links.items()})

        def usable(a: str, b: str) -> bool:
            link = self.links[frozenset((a, b))]
            return link.up and not link.alarms()

        if topo.routing == "k-disjoint":
            paths = graph.disjoint(src, dst, topo.k, usable=usable)
            if len(paths) < topo.k:
                paths = graph.disjoint(src, dst, topo.k)   # answer 503 naming the bad link
            if len(paths) < topo.k:
                return None
            return _Plan(tuple(paths), len(paths) > 1 or len(paths[0]) > 2)
        path = graph.shortest(src, dst, usable=usable) or graph.shortest(src, dst)
        return None if path is None else _Plan((path,), len(path) > 2)

    def status(self, kme_id: str, caller: str, slave: str) -> Reply:
        """ETSI GS QKD 014 5.2 / 6.1."""
        pair = self._pair(kme_id, caller, slave)
        if isinstance(pair, Reply):
            return pair
        kme, peer, plan = pair
        links = [self.links[h] for h in plan.hops()]
        for link in links:
            link.advance(self.now())
        per_key = relay.link_bits(kme.key_size) if plan.relayed else kme.key_size
        skr = min(link.rate()[0] if link.producing() else 0.0 for link in links)
        qber = max(link.rate()[1] for link in links)
        alarms = sorted({a for link in links for a in link.alarms()})
        extension: dict[str, Any] = {
            "qkdgate_link_up": all(link.up for link in links),
            "qkdgate_qber": round(qber, 5),
            "qkdgate_qber_threshold": min(link.params.qber_threshold for link in links),
            "qkdgate_secret_key_rate_bps": round(skr, 1),
            "qkdgate_key_rate": round(skr / per_key, 3),
            "qkdgate_alarms": alarms,
            "qkdgate_distance_km": sum(self.links[frozenset(h)].params.distance_km
                                       for h in pairwise(plan.routes[0])),
            "qkdgate_detector": ",".join(sorted({link.params.detector for link in links})),
        }
        if self.topology is not None:
            extension["qkdgate_routes"] = [list(r) for r in plan.routes]
            extension["qkdgate_relayed"] = plan.relayed
        return Reply(200, {
            "source_KME_ID": kme.kme_id, "target_KME_ID": peer.kme_id,
            "master_SAE_ID": caller, "slave_SAE_ID": slave,
            "key_size": kme.key_size,
            "stored_key_count": min(link.stored_bits // per_key for link in links),
            "max_key_count": (links[0].max_key_count if not plan.relayed
                              else min(link.capacity_bits // per_key for link in links)),
            "max_key_per_request": kme.max_key_per_request,
            "max_key_size": kme.max_key_size, "min_key_size": kme.min_key_size,
            "max_SAE_ID_count": kme.max_sae_id_count,
            # Vendor extensions carry a prefix ending in "_" (ETSI GS QKD 014 6.1).
            "status_extension": extension,
        })

    def prepare_enc_keys(self, kme_id: str, caller: str, slave: str,
                         req: object) -> Reply | Prepared:
        """ETSI GS QKD 014 5.3 / 6.2 / 6.3 up to drawing the keys: an error
        Reply, or the keys and how they reach the slave's KME. Link key is
        consumed here, all or nothing over the route."""
        pair = self._pair(kme_id, caller, slave)
        if isinstance(pair, Reply):
            return pair
        kme, peer, plan = pair
        if not isinstance(req, Mapping):
            return error(400, BAD_REQUEST)
        unknown = set(req) - {"number", "size", "additional_slave_SAE_IDs",
                              "extension_mandatory", "extension_optional"}
        if unknown:
            return error(400, BAD_REQUEST, unknown_fields=sorted(unknown))
        number, size = req.get("number", 1), req.get("size", kme.key_size)
        for name, v in (("number", number), ("size", size)):
            if not isinstance(v, int) or isinstance(v, bool):
                return error(400, BAD_REQUEST, **{f"invalid_{name}": str(v)[:40]})
        if size % 8:
            return error(400, MSG_SIZE_MULTIPLE_OF_8)
        if not kme.min_key_size <= size <= kme.max_key_size:
            return error(400, BAD_REQUEST, size_out_of_range=[kme.min_key_size, kme.max_key_size])
        if not 1 <= number <= kme.max_key_per_request:
            return error(400, BAD_REQUEST, number_out_of_range=[1, kme.max_key_per_request])
        extra = req.get("additional_slave_SAE_IDs", [])
        if not isinstance(extra, list) or not all(isinstance(x, str) for x in extra):
            return error(400, BAD_REQUEST, invalid_additional_slave_SAE_IDs=True)
        if len(extra) > kme.max_sae_id_count:
            return error(400, BAD_REQUEST, max_SAE_ID_count=kme.max_sae_id_count)
        for i, x in enumerate(extra):
            # A slave named twice, or the path's slave named again, is the
            # caller's mistake: refused, not silently merged (docs/qkd.md).
            if x == slave or x in extra[:i]:
                return error(400, BAD_REQUEST, duplicate_SAE_ID=x,
                             hint="additional_slave_SAE_IDs must be distinct and differ from "
                                  "the slave SAE in the path")
            home = self.sae_home.get(x)
            if home is None:
                return error(400, BAD_REQUEST, unknown_SAE_ID=x)
            if home != peer.kme_id:
                # The simulator delivers multicast keys only to SAEs of the
                # slave's KME: say so instead of calling a known SAE unknown.
                return error(400, BAD_REQUEST, additional_slave_on_another_KME=x,
                             slave_KME_ID=peer.kme_id, its_KME_ID=home,
                             hint="multicast keys reach SAEs of the slave's KME only")
        mandatory = req.get("extension_mandatory", [])
        optional = req.get("extension_optional", [])
        for name, v in (("extension_mandatory", mandatory), ("extension_optional", optional)):
            if not isinstance(v, list) or not all(isinstance(e, dict) for e in v):
                return error(400, BAD_REQUEST, **{f"invalid_{name}": True})
        if mandatory:
            # The simulator implements no extension: it must refuse them all.
            names = sorted({k for e in mandatory for k in e})
            return error(400, MSG_EXT_MANDATORY_UNSUPPORTED, extension_mandatory_unsupported=names)
        links = {h: self.links[h] for h in plan.hops()}
        for h, link in links.items():
            link.advance(self.now())
            where = {} if self.topology is None else {"link": sorted(h)}
            alarms = link.alarms()
            if ALARM_LINK_DOWN in alarms:
                return error(503, "QKD link down", alarms=alarms, **where)
            if ALARM_QBER in alarms:
                return error(503, "QKD link in alarm: QBER above threshold", alarms=alarms, **where)
        # All or nothing over the route: every hop pays pad + MAC key per key.
        per_key = relay.link_bits(size) if plan.relayed else size
        uses = Counter(plan.hops())
        for h, link in links.items():
            if link.stored_bits < uses[h] * number * per_key:
                where = {} if self.topology is None else {"link": sorted(h)}
                return error(503, "insufficient key material in the pool",
                             stored_key_count=link.stored_bits // per_key, **where)
        for h, link in links.items():
            if not link.take(uses[h] * number * per_key):
                raise RuntimeError("link refused key it was just checked to hold")   # our bug
        keys = []
        for _ in range(number):
            key_id = str(uuid.UUID(bytes=self.rng(16), version=4))
            material = self.rng(size // 8)
            for node in {plan.routes[0][0], plan.routes[0][-1]} & self.compromised:
                self._seen.append(Seen(node, key_id, caller, slave, plan.routes[0], (1, 1),
                                       material))
            keys.append((key_id, material))
        return Prepared(kme.kme_id, peer.kme_id, plan, caller, slave, tuple(extra), keys,
                        sorted({k for e in optional for k in e}))

    def enc_keys(self, kme_id: str, caller: str, slave: str, req: object) -> Reply:
        """ETSI GS QKD 014 5.3 / 6.2 / 6.3, relaying in-process (sans-IO);
        the HTTPS simulator relays over ETSI 020 instead (:mod:`.interkme`)."""
        prep = self.prepare_enc_keys(kme_id, caller, slave, req)
        if isinstance(prep, Reply):
            return prep
        for key_id, material in prep.keys:
            if prep.plan.relayed and self._relay(prep, key_id, material) != material:
                raise RuntimeError("relay delivered a different key")   # our bug
        return self.issue(prep)

    def issue(self, prep: Prepared) -> Reply:
        """Hold ``prep``'s keys for the slaves and answer the master."""
        for key_id, material in prep.keys:
            self.deliver(prep.peer, key_id, material, prep.caller, prep.slaves)
        return prep.reply()

    def deliver(self, kme_id: str, key_id: str, material: bytes, master: str,
                slaves: frozenset[str]) -> None:
        """The slave SAEs' KME holds a key for them (ETSI 014 dec_keys)."""
        peer = self.kmes[kme_id]
        peer.issued[key_id] = _Issued(material, master, slaves, set(slaves))
        if len(peer.issued) > peer.max_issued:
            # Orphans of lost enc_keys answers must not grow the store forever.
            del peer.issued[next(iter(peer.issued))]

    def void(self, kme_id: str, key_id: str) -> bool:
        """Discard a key no slave may fetch any more (ETSI 020 void); False
        if this KME did not hold it."""
        return self.kmes[kme_id].issued.pop(key_id, None) is not None

    def record(self, node: str, hop: relay.Hop, material: bytes) -> None:
        """What a trusted node held in the clear while relaying ``hop``."""
        if node in self.compromised:
            self._seen.append(Seen(node, hop.key_id, hop.initiator_sae, hop.target_sae,
                                   hop.route, hop.share, material))

    def first_hops(self, prep: Prepared, key_id: str, material: bytes,
                   ack_url: str = "") -> list[tuple[relay.Hop, bytes]]:
        """The first hop of every route for one key: (hop, share to send)."""
        k = len(prep.plan.routes)
        shares = relay.split(material, k, self.rng) if k > 1 else [material]
        return [(relay.Hop(key_id, prep.caller, prep.slave, route, 0, (i, k), prep.extra,
                           ack_url), share)
                for i, (route, share) in enumerate(zip(prep.plan.routes, shares, strict=True), 1)]

    def seal(self, hop: relay.Hop, material: bytes) -> bytes:
        """Draw the hop's link key and seal ``material`` for ``hop.dst``."""
        store = self.link_keys[frozenset((hop.src, hop.dst))]
        return relay.seal(hop, store.draw(len(material)), material)

    def open(self, wire: bytes, receiver: str, sender: str | None = None) -> relay.Opened:
        opened = relay.open_hop(wire, receiver, self._link_keys, sender=sender)
        if opened.hop.dst != opened.hop.route[-1]:
            self.record(receiver, opened.hop, opened.material)
        return opened

    def _relay(self, prep: Prepared, key_id: str, material: bytes) -> bytes:
        """Carry ``material`` from the route's first node to its last, hop by
        hop (one XOR share per route), in-process; returns what the last node holds."""
        out = []
        for hop, held in self.first_hops(prep, key_id, material):
            while True:
                held = self.open(self.seal(hop, held), hop.dst).material
                if hop.dst == hop.route[-1]:
                    break
                hop = hop.next()
            out.append(held)
        return relay.join(out)

    def _link_keys(self, a: str, b: str) -> relay.LinkKeyStore | None:
        return self.link_keys.get(frozenset((a, b)))

    def attacker_knowledge(self, node: str | None = None) -> list[Seen]:
        """Every key or share a compromised node (or ``node``) held, in order."""
        return [s for s in self._seen if node is None or s.node == node]

    def dec_keys(self, kme_id: str, caller: str, master: str, key_ids: list[str]) -> Reply:
        """ETSI GS QKD 014 5.4 / 6.4 / 6.3: all or nothing, once per slave."""
        kme = self.kmes[kme_id]
        if self.sae_home.get(caller) != kme_id:
            return UNAUTHORIZED
        if not key_ids or len(set(key_ids)) != len(key_ids):
            return error(400, BAD_REQUEST)
        found = []
        for key_id in key_ids:
            item = kme.issued.get(key_id)
            if item is None or item.master_sae != master:
                return error(400, MSG_KEYS_NOT_FOUND, key_ID=key_id)
            found.append((key_id, item))
        for key_id, item in found:
            if caller not in item.named:
                return UNAUTHORIZED    # 5.4: not named as a slave for these keys
            if caller not in item.pending:   # this slave already has it
                return error(400, MSG_KEYS_NOT_FOUND, key_ID=key_id)
        keys = []
        for key_id, item in found:
            keys.append({"key_ID": key_id, "key": base64.b64encode(item.material).decode("ascii")})
            item.pending.discard(caller)
            if not item.pending:
                del kme.issued[key_id]
        return Reply(200, {"keys": keys})
