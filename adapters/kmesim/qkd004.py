"""The simulated KMEs' ETSI GS QKD 004 V2.1.1 service, without I/O.

Theory of operation: a key stream joins two SAEs over the QKD link between
their KMEs. OPEN_CONNECT by the first side creates it (status 1, peer not
connected); the second side opens the same key_stream_ID (status 0). Key
chunks are cut from the link pool in index order when first read and kept
until both sides have read them, so a GET_KEY with an explicit index may be
repeated by the same side (a lost answer can be retried) and both sides get
identical bytes. CLOSE by both sides drops the stream and its unread
chunks. The bindings are documented in :mod:`qkdgate.adapters.etsi004`
and docs/qkd.md; this module is their one state machine.
"""

from __future__ import annotations

import base64
import json
import uuid
from collections.abc import Mapping
from dataclasses import dataclass, field, replace

from qkdgate.adapters.etsi004 import QoS, Status
from qkdgate.adapters.kmesim.kme import BAD_REQUEST, Reply, SimNetwork, error
from qkdgate.adapters.kmesim.linkmodel import QkdLink
from qkdgate.errors import KeySourceProtocolError

MAX_CHUNK = 1024          # bytes; larger requests get a QoS counter-proposal (status 7)
MAX_AHEAD = 1024          # chunks a reader may skip ahead


@dataclass
class _Stream:
    ksid: str
    source: str
    destination: str
    link: QkdLink
    qos: QoS
    connected: set[str] = field(default_factory=set)
    chunks: dict[int, tuple[bytes, set[str]]] = field(default_factory=dict)
    cut: int = 0                                    # next index to cut from the pool
    next_read: dict[str, int] = field(default_factory=dict)


def _sae(uri: object) -> str | None:
    """An SAE ID from an application URI: ``scheme://SAE-ID[/...]`` or bare."""
    if not isinstance(uri, str) or not uri:
        return None
    rest = uri.split("://", 1)[1] if "://" in uri else uri
    return rest.split("/", 1)[0] or None


@dataclass(frozen=True, slots=True)
class Opened:
    status: Status
    key_stream_id: str | None
    qos: QoS


@dataclass(frozen=True, slots=True, repr=False)
class Read:
    """A GET_KEY outcome; ``bad_request`` set when the call itself is
    malformed (JSON: HTTP 400; binary: status 2, docs/qkd.md)."""

    status: Status
    index: int | None = None
    key: bytes | None = None
    metadata: Mapping[str, object] | None = None
    metadata_size: int | None = None
    bad_request: str | None = None


class Qkd004Service:
    """The 004 state machine both bindings serve (JSON: :meth:`handle`;
    binary: kmesim/qkd004_binary.py calls the typed methods)."""

    def __init__(self, network: SimNetwork) -> None:
        self.net = network
        self.streams: dict[str, _Stream] = {}

    # ------------------------------------------------------------ JSON binding

    def handle(self, kme_id: str, caller: str, op: str, doc: Mapping[str, object]) -> Reply:
        if op == "open_connect":
            return self._json_open(caller, doc)
        ksid = doc.get("key_stream_ID")
        try:
            ksid = str(uuid.UUID(ksid)) if isinstance(ksid, str) else None
        except ValueError:
            ksid = None
        if ksid is None:
            return error(400, BAD_REQUEST, invalid_key_stream_ID=True)
        if op == "get_key":
            r = self.get_key(caller, ksid, doc.get("index"), doc.get("metadata_size"))
            if r.bad_request:
                return error(400, BAD_REQUEST, **{r.bad_request: True})
            body: dict[str, object] = {"key_stream_ID": ksid, "status": r.status,
                                       "index": r.index if r.index is not None
                                       else doc.get("index"),
                                       "key_buffer": None, "metadata": None}
            if r.key is not None:
                body["key_buffer"] = base64.b64encode(r.key).decode("ascii")
                body["metadata"] = r.metadata
            if r.metadata_size is not None:
                body["metadata_size"] = r.metadata_size
            return Reply(200, body)
        if op == "close":
            return Reply(200, {"status": self.close(caller, ksid)})
        return error(404, "no such operation")

    def _json_open(self, caller: str, doc: Mapping[str, object]) -> Reply:
        try:
            qos = QoS.from_json(doc.get("qos", {}))
        except KeySourceProtocolError as exc:
            return error(400, BAD_REQUEST, qos=str(exc))
        ksid_in = doc.get("key_stream_ID")
        try:
            if ksid_in is not None and not isinstance(ksid_in, str):
                raise TypeError("key_stream_ID must be a string")
            ksid = str(uuid.UUID(ksid_in)) if ksid_in is not None else None
        except (ValueError, TypeError):
            return error(400, BAD_REQUEST, invalid_key_stream_ID=True)
        res = self.open_connect(caller, doc.get("source"), doc.get("destination"), qos, ksid)
        if res is None:
            return error(400, BAD_REQUEST,
                         hint="source and destination must name two SAEs, one the caller")
        return Reply(200, {"status": res.status, "key_stream_ID": res.key_stream_id,
                           "qos": res.qos.to_json()})

    # ------------------------------------------------------------ the 004 calls

    def open_connect(self, caller: str, source: object, destination: object, qos: QoS,
                     ksid: str | None) -> Opened | None:
        """OPEN_CONNECT (004 6.2); None when the URIs do not name the caller
        and another SAE (a malformed call)."""
        src, dst = _sae(source), _sae(destination)
        if src is None or dst is None or caller not in (src, dst) or src == dst:
            return None
        ka, kb = self.net.sae_home.get(src), self.net.sae_home.get(dst)
        link = self.net.link(ka, kb) if ka and kb and ka != kb else None
        if link is None or not link.up or link.alarms():
            return Opened(Status.NO_QKD_CONNECTION, ksid, qos)
        skr = link.rate()[0]
        counter = qos
        if qos.key_chunk_size == 0 or qos.key_chunk_size > MAX_CHUNK:
            counter = replace(counter, key_chunk_size=min(max(qos.key_chunk_size, 1), MAX_CHUNK))
        if qos.min_bps > skr:
            counter = replace(counter, min_bps=int(skr))
        if counter != qos:   # 004 6.2: QoS not met, counter-proposal returned
            return Opened(Status.QOS_NOT_MET, ksid, counter)
        if ksid is None:
            ksid = str(uuid.UUID(bytes=self.net.rng(16), version=4))
        st = self.streams.get(ksid)
        if st is None:
            st = self.streams[ksid] = _Stream(ksid, src, dst, link, qos)
        elif (st.source, st.destination) != (src, dst) or caller in st.connected:
            return Opened(Status.KSID_IN_USE, ksid, st.qos)
        st.connected.add(caller)
        status = Status.SUCCESSFUL if len(st.connected) == 2 else Status.PEER_NOT_CONNECTED
        return Opened(status, ksid, st.qos)

    def get_key(self, caller: str, ksid: str, index: object, metadata_size: object) -> Read:
        """GET_KEY (004 6.3); ``index`` None: the caller's next chunk."""
        st = self.streams.get(ksid)
        if st is None or caller not in st.connected:
            return Read(Status.NO_QKD_CONNECTION)
        if len(st.connected) < 2:
            return Read(Status.PEER_NOT_CONNECTED_GET_KEY)
        if index is None:
            index = st.next_read.get(caller, 0)
        if not isinstance(index, int) or isinstance(index, bool) or index < 0 \
                or index > st.cut + MAX_AHEAD:
            return Read(Status.INSUFFICIENT_KEY, bad_request="invalid_index")
        if metadata_size is not None and (not isinstance(metadata_size, int)
                                          or isinstance(metadata_size, bool)):
            return Read(Status.INSUFFICIENT_KEY, bad_request="invalid_metadata_size")
        st.link.advance(self.net.now())
        if index >= st.cut:
            need = (index - st.cut + 1) * st.qos.key_chunk_size * 8
            if st.link.alarms() or not st.link.take(need):
                return Read(Status.INSUFFICIENT_KEY, index)
            while st.cut <= index:
                st.chunks[st.cut] = (self.net.rng(st.qos.key_chunk_size), set())
                st.cut += 1
        chunk = st.chunks.get(index)
        if chunk is None:
            # Both sides read it already: it is gone, like a delivered 014 key.
            return Read(Status.INSUFFICIENT_KEY, index)
        metadata = {"qkdgate_qber": round(st.link.rate()[1], 5)}
        need_meta = len(metadata_bytes(metadata))
        if metadata_size is not None and metadata_size < need_meta:
            return Read(Status.METADATA_TOO_SMALL, index, metadata_size=need_meta)
        material, readers = chunk
        readers.add(caller)
        if len(readers) == 2:
            del st.chunks[index]
        st.next_read[caller] = max(st.next_read.get(caller, 0), index + 1)
        return Read(Status.SUCCESSFUL, index, material, metadata, need_meta)

    def close(self, caller: str, ksid: str) -> Status:
        """CLOSE (004 6.4): the stream is dropped when both sides closed; an
        unknown stream answers 4 (docs/qkd.md, open choices)."""
        st = self.streams.get(ksid)
        if st is None or caller not in st.connected:
            return Status.NO_QKD_CONNECTION
        st.connected.discard(caller)
        if not st.connected:
            del self.streams[ksid]
        return Status.SUCCESSFUL


def metadata_bytes(metadata: Mapping[str, object]) -> bytes:
    """The metadata as both bindings size it: compact-free ``json.dumps``."""
    return json.dumps(metadata).encode("utf-8")
