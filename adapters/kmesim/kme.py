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

Time and randomness are injected (``now()``, ``rng(n)``) so tests are
deterministic and never wait for key to accumulate.
"""

from __future__ import annotations

import base64
import os
import time
import uuid
from collections.abc import Callable, Mapping
from dataclasses import dataclass, field
from typing import Any

from qkdgate.adapters.etsi014_codec import (
    MSG_EXT_MANDATORY_UNSUPPORTED,
    MSG_KEYS_NOT_FOUND,
    MSG_SIZE_MULTIPLE_OF_8,
)
from qkdgate.adapters.etsi014_server import BAD_REQUEST, UNAUTHORIZED, Reply, error
from qkdgate.adapters.kmesim.linkmodel import ALARM_LINK_DOWN, ALARM_QBER, QkdLink

__all__ = ["BAD_REQUEST", "UNAUTHORIZED", "Reply", "SimKme", "SimNetwork", "error"]



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

    # ------------------------------------------------------------ topology

    def add_kme(self, kme_id: str, *, key_size: int = 256) -> SimKme:
        kme = self.kmes[kme_id] = SimKme(kme_id, key_size=key_size)
        return kme

    def attach(self, sae_id: str, kme_id: str) -> None:
        self.sae_home[sae_id] = kme_id

    def connect(self, a: str, b: str, link: QkdLink) -> QkdLink:
        link.now = self.now()
        self.links[frozenset((a, b))] = link
        return link

    def link(self, a: str, b: str) -> QkdLink | None:
        link = self.links.get(frozenset((a, b)))
        if link is not None:
            link.advance(self.now())
        return link

    # ------------------------------------------------------------ ETSI 014

    def _pair(self, kme_id: str, caller: str, peer: str) -> tuple[SimKme, SimKme, QkdLink] | Reply:
        kme = self.kmes[kme_id]
        if self.sae_home.get(caller) != kme_id:
            return UNAUTHORIZED        # ETSI GS QKD 014 5.1: unknown SAE
        peer_kme = self.sae_home.get(peer)
        if peer_kme is None:
            return error(400, BAD_REQUEST, unknown_SAE_ID=peer)
        link = self.link(kme_id, peer_kme)
        if link is None:
            return error(400, BAD_REQUEST, no_QKD_link_to=peer)
        return kme, self.kmes[peer_kme], link

    def status(self, kme_id: str, caller: str, slave: str) -> Reply:
        """ETSI GS QKD 014 5.2 / 6.1."""
        pair = self._pair(kme_id, caller, slave)
        if isinstance(pair, Reply):
            return pair
        kme, peer, link = pair
        skr, qber = link.rate()
        producing = link.producing()
        return Reply(200, {
            "source_KME_ID": kme.kme_id, "target_KME_ID": peer.kme_id,
            "master_SAE_ID": caller, "slave_SAE_ID": slave,
            "key_size": kme.key_size, "stored_key_count": link.stored_keys(kme.key_size),
            "max_key_count": link.max_key_count, "max_key_per_request": kme.max_key_per_request,
            "max_key_size": kme.max_key_size, "min_key_size": kme.min_key_size,
            "max_SAE_ID_count": kme.max_sae_id_count,
            # Vendor extensions carry a prefix ending in "_" (ETSI GS QKD 014 6.1).
            "status_extension": {
                "qkdgate_link_up": link.up,
                "qkdgate_qber": round(qber, 5),
                "qkdgate_qber_threshold": link.params.qber_threshold,
                "qkdgate_secret_key_rate_bps": round(skr if producing else 0.0, 1),
                "qkdgate_key_rate": round((skr / kme.key_size) if producing else 0.0, 3),
                "qkdgate_alarms": link.alarms(),
                "qkdgate_distance_km": link.params.distance_km,
                "qkdgate_detector": link.params.detector,
            },
        })

    def enc_keys(self, kme_id: str, caller: str, slave: str, req: object) -> Reply:
        """ETSI GS QKD 014 5.3 / 6.2 / 6.3."""
        pair = self._pair(kme_id, caller, slave)
        if isinstance(pair, Reply):
            return pair
        kme, peer, link = pair
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
        alarms = link.alarms()
        if ALARM_LINK_DOWN in alarms:
            return error(503, "QKD link down", alarms=alarms)
        if ALARM_QBER in alarms:
            return error(503, "QKD link in alarm: QBER above threshold", alarms=alarms)
        if not link.take(number * size):
            return error(503, "insufficient key material in the pool",
                         stored_key_count=link.stored_keys(size))
        keys = []
        slaves = {slave, *extra}
        for _ in range(number):
            key_id = str(uuid.UUID(bytes=self.rng(16), version=4))
            material = self.rng(size // 8)
            peer.issued[key_id] = _Issued(material, caller, frozenset(slaves), set(slaves))
            if len(peer.issued) > peer.max_issued:
                # Orphans of lost enc_keys answers must not grow the store forever.
                del peer.issued[next(iter(peer.issued))]
            keys.append({"key_ID": key_id, "key": base64.b64encode(material).decode("ascii")})
        body: dict[str, Any] = {"keys": keys}
        if optional:
            body["key_container_extension"] = {
                "qkdgate_unhandled_extension_optional": sorted({k for e in optional for k in e})}
        return Reply(200, body)

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
