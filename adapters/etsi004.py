"""ETSI GS QKD 004 V2.1.1 application interface: the values, the transport
interface, and qkdgate's own JSON/HTTPS binding.

Theory of operation: ETSI GS QKD 004 defines an abstract API --
OPEN_CONNECT(source, destination, QoS, key_stream_ID) -> status,
GET_KEY(key_stream_ID, index, metadata) -> status, key_buffer, and
CLOSE(key_stream_ID) -- and no wire encoding. qkdgate speaks it over two
bindings behind one interface (:class:`Etsi004Transport`), chosen per key
source by ``binding:`` (docs/qkd.md "ETSI 004 bindings"):

* ``etsi-binary`` (default, :mod:`qkdgate.adapters.etsi004_binary`): the
  binary framing over mutual TLS transcribed from QUBIP/etsi-qkd-004, which
  says it follows ETSI's reference interface (untested against either;
  docs/qkd.md; codec: :mod:`qkdgate.adapters.etsi004_frame`).
* ``json`` (this module, :class:`Etsi004Client`): qkdgate's own binding,
  JSON over HTTPS POST; no other implementation is known to speak it:

    POST /api/v1/qkd004/open_connect
         {"source": URI, "destination": URI, "qos": QoS, "key_stream_ID": UUID|null}
      -> {"status": n, "key_stream_ID": UUID, "qos": QoS}
    POST /api/v1/qkd004/get_key
         {"key_stream_ID": UUID, "index": n|null, "metadata_size": n|null}
      -> {"status": n, "index": n, "key_buffer": base64|null,
          "metadata": object|null, "metadata_size": n}
    POST /api/v1/qkd004/close   {"key_stream_ID": UUID} -> {"status": n}

  Every defined status travels with HTTP 200 (the status is the API's
  answer); HTTP 400/401 mean a malformed or unauthenticated call. The
  16-byte key_stream_ID is written as a UUID.

A transport returns the KME's answer as typed replies (:class:`OpenReply`,
:class:`KeyReply`) whatever the status; what a status means to qkdgate is
decided once, in the key source (etsi004_source.py). Both peers open the
same key_stream_ID and read identical key chunks by index (004 6.3).

:class:`Etsi004Client`'s older calls (``open_connect``, ``get_key``,
``close_stream``) return results for statuses a caller acts on (0, 1, 7
with the KME's counter-proposal, 8 with the needed size) and raise the
key-source errors for the others: 2/3/4 KeyUnavailable, 5
LocalProtocolError (we reused a stream ID), 6 KeySourceTimeout.
"""

from __future__ import annotations

import asyncio
import base64
import binascii
import enum
import json
import random
import ssl
import uuid
from collections.abc import Awaitable, Callable, Mapping
from dataclasses import asdict, dataclass, fields
from typing import Any, Protocol

from yarl import URL

from qkdgate.adapters.etsi014_codec import parse_error
from qkdgate.adapters.https import KmeHttps
from qkdgate.adapters.settings import source_settings, to_float
from qkdgate.adapters.tls import client_context
from qkdgate.errors import (
    ConfigError,
    KeySourceAuthError,
    KeySourceError,
    KeySourceProtocolError,
    KeySourceTimeout,
    KeyUnavailable,
    LocalProtocolError,
)
from qkdgate.keymix.secret import SecretBytes


class Status(enum.IntEnum):
    """ETSI GS QKD 004 V2.1.1 6.1, Table 2."""

    SUCCESSFUL = 0
    PEER_NOT_CONNECTED = 1          # OPEN_CONNECT ok, the peer has not opened yet
    INSUFFICIENT_KEY = 2            # GET_KEY
    PEER_NOT_CONNECTED_GET_KEY = 3  # GET_KEY before the peer opened
    NO_QKD_CONNECTION = 4
    KSID_IN_USE = 5                 # OPEN_CONNECT
    TIMEOUT = 6
    QOS_NOT_MET = 7                 # OPEN_CONNECT: counter-proposal returned
    METADATA_TOO_SMALL = 8          # GET_KEY: metadata_size holds the size needed


@dataclass(frozen=True, slots=True)
class QoS:
    """ETSI GS QKD 004 V2.1.1 6.1.3 QoS parameters."""

    key_chunk_size: int = 32        # bytes per GET_KEY
    max_bps: int = 0
    min_bps: int = 0
    jitter: int = 0                 # bps
    priority: int = 0
    timeout: int = 0                # ms a call may block
    ttl: int = 0                    # s a chunk stays readable
    metadata_mimetype: str = "application/json"

    @classmethod
    def from_json(cls, doc: object) -> QoS:
        if not isinstance(doc, dict):
            raise KeySourceProtocolError("ETSI 004: qos must be an object")
        vals: dict[str, Any] = {}
        for name in ("key_chunk_size", "max_bps", "min_bps", "jitter", "priority", "timeout",
                     "ttl"):
            v = doc.get(name, _QOS_DEFAULTS[name])
            if not isinstance(v, int) or isinstance(v, bool) or v < 0 or v > 2**32:
                raise KeySourceProtocolError(f"ETSI 004: qos.{name} must be an unsigned integer")
            vals[name] = v
        mime = doc.get("metadata_mimetype", "application/json")
        if not isinstance(mime, str):
            raise KeySourceProtocolError("ETSI 004: qos.metadata_mimetype must be a string")
        return cls(**vals, metadata_mimetype=mime[:128])

    def to_json(self) -> dict[str, object]:
        return asdict(self)


# Field defaults by name: getattr(QoS, name) on a slots dataclass gives the
# member descriptor, not the default.
_QOS_DEFAULTS = {f.name: f.default for f in fields(QoS)}


@dataclass(frozen=True, slots=True)
class OpenResult:
    status: Status
    key_stream_id: str | None    # None only with QOS_NOT_MET for a new stream
    qos: QoS


@dataclass(frozen=True, slots=True)
class KeyChunk:
    index: int
    key: SecretBytes
    metadata: Mapping[str, object] | None


@dataclass(frozen=True, slots=True)
class OpenReply:
    """The KME's answer to OPEN_CONNECT, whatever its status. ``status`` is
    an int: a status outside Table 2 is the key source's to refuse."""

    status: int
    key_stream_id: str | None
    qos: QoS | None


@dataclass(frozen=True, slots=True)
class KeyReply:
    """The KME's answer to GET_KEY: with status 0 ``index``/``key``/
    ``metadata``; with status 8 ``metadata_size`` (the size needed)."""

    status: int
    index: int | None = None
    key: SecretBytes | None = None
    metadata: Mapping[str, object] | None = None
    metadata_size: int | None = None


class Etsi004Transport(Protocol):
    """One ETSI 004 binding to one KME. Calls return the KME's answer for
    every status; transport failures raise the key-source errors
    (unreachable: KeyUnavailable, refused: KeySourceAuthError, garbage:
    KeySourceProtocolError, no answer in time: KeySourceTimeout)."""

    binding: str
    chunk_sizes: dict[str, int]     # negotiated key_chunk_size per key_stream_ID

    @property
    def requests(self) -> int:
        """Calls sent so far (tests check a refusal happened before asking)."""
        ...

    async def request_open(self, source: str, destination: str, qos: QoS,
                           key_stream_id: str | None) -> OpenReply: ...

    async def request_key(self, key_stream_id: str, index: int | None,
                          metadata_size: int | None, *, retry: bool) -> KeyReply: ...

    async def request_close(self, key_stream_id: str) -> int: ...

    async def close(self) -> None: ...


def _int_status(doc: Mapping[str, object], what: str) -> int:
    v = doc.get("status")
    if not isinstance(v, int) or isinstance(v, bool) or not 0 <= v < 2**32:
        raise KeySourceProtocolError(f"ETSI 004 {what}: status missing")
    return v


def decode_open_reply(raw: bytes) -> OpenReply:
    """A JSON OPEN_CONNECT answer as a typed reply (no status is refused)."""
    doc = _obj(raw, "OPEN_CONNECT")
    st = _int_status(doc, "OPEN_CONNECT")
    raw_ksid = doc.get("key_stream_ID")
    ksid = None if raw_ksid is None else _ksid(raw_ksid, "OPEN_CONNECT")
    qos = QoS.from_json(doc["qos"]) if doc.get("qos") is not None else None
    return OpenReply(st, ksid, qos)


def decode_key_reply(raw: bytes, chunk_size: int | None) -> KeyReply:
    """A JSON GET_KEY answer as a typed reply (no status is refused)."""
    doc = _obj(raw, "GET_KEY")
    st = _int_status(doc, "GET_KEY")
    if st == Status.METADATA_TOO_SMALL:
        need = doc.get("metadata_size")
        if not isinstance(need, int) or isinstance(need, bool) or not 0 < need < 2**20:
            raise KeySourceProtocolError(
                "ETSI 004 GET_KEY: status 8 without a usable metadata_size")
        return KeyReply(st, metadata_size=need)
    if st != Status.SUCCESSFUL:
        return KeyReply(st)
    chunk = _chunk_from_doc(doc, chunk_size)
    return KeyReply(st, chunk.index, chunk.key, chunk.metadata)


def _obj(raw: bytes, what: str) -> dict[str, object]:
    try:
        doc = json.loads(raw.decode("utf-8"))
    except (UnicodeDecodeError, ValueError, RecursionError):
        raise KeySourceProtocolError(f"ETSI 004 {what}: answer is not JSON") from None
    if not isinstance(doc, dict):
        raise KeySourceProtocolError(f"ETSI 004 {what}: answer is not a JSON object")
    return doc


def _status(doc: Mapping[str, object], what: str) -> Status:
    v = doc.get("status")
    if not isinstance(v, int) or isinstance(v, bool):
        raise KeySourceProtocolError(f"ETSI 004 {what}: status missing")
    try:
        return Status(v)
    except ValueError:
        raise KeySourceProtocolError(f"ETSI 004 {what}: unknown status {v}") from None


def _ksid(v: object, what: str) -> str:
    try:
        if not isinstance(v, str):
            raise ValueError
        return str(uuid.UUID(v))
    except ValueError:
        raise KeySourceProtocolError(f"ETSI 004 {what}: key_stream_ID is not a UUID") from None


def _raise_for(status: Status, what: str) -> None:
    text = f"ETSI 004 {what}: {status.name} ({int(status)})"
    if status in (Status.INSUFFICIENT_KEY, Status.PEER_NOT_CONNECTED_GET_KEY,
                  Status.NO_QKD_CONNECTION):
        raise KeyUnavailable(text)
    if status is Status.KSID_IN_USE:
        raise LocalProtocolError(text)
    if status is Status.TIMEOUT:
        raise KeySourceTimeout(text)


def parse_open(raw: bytes) -> OpenResult:
    doc = _obj(raw, "OPEN_CONNECT")
    st = _status(doc, "OPEN_CONNECT")
    _raise_for(st, "OPEN_CONNECT")
    if st not in (Status.SUCCESSFUL, Status.PEER_NOT_CONNECTED, Status.QOS_NOT_MET):
        raise KeySourceProtocolError(f"ETSI 004 OPEN_CONNECT: status {st.name} not allowed here")
    raw_ksid = doc.get("key_stream_ID")
    # A counter-proposal may come before any stream exists: no ID yet.
    ksid = (None if raw_ksid is None and st is Status.QOS_NOT_MET
            else _ksid(raw_ksid, "OPEN_CONNECT"))
    return OpenResult(st, ksid, QoS.from_json(doc.get("qos", {})))


def parse_get_key(raw: bytes, chunk_size: int | None) -> KeyChunk | int:
    """A key chunk, or (status 8) the metadata size the KME needs."""
    doc = _obj(raw, "GET_KEY")
    st = _status(doc, "GET_KEY")
    _raise_for(st, "GET_KEY")
    if st is Status.METADATA_TOO_SMALL:
        need = doc.get("metadata_size")
        if not isinstance(need, int) or isinstance(need, bool) or not 0 < need < 2**20:
            raise KeySourceProtocolError(
                "ETSI 004 GET_KEY: status 8 without a usable metadata_size")
        return need
    if st is not Status.SUCCESSFUL:
        raise KeySourceProtocolError(f"ETSI 004 GET_KEY: status {st.name} not allowed here")
    return _chunk_from_doc(doc, chunk_size)


def _chunk_from_doc(doc: Mapping[str, object], chunk_size: int | None) -> KeyChunk:
    index = doc.get("index")
    if not isinstance(index, int) or isinstance(index, bool) or not 0 <= index < 2**32:
        raise KeySourceProtocolError("ETSI 004 GET_KEY: index must be an unsigned 32-bit integer")
    buf = doc.get("key_buffer")
    try:
        if not isinstance(buf, str):
            raise ValueError
        key = base64.b64decode(buf.encode("ascii"), validate=True)
    except (ValueError, UnicodeEncodeError, binascii.Error):
        raise KeySourceProtocolError("ETSI 004 GET_KEY: key_buffer is not base64") from None
    if not key or (chunk_size is not None and len(key) != chunk_size):
        raise KeySourceProtocolError(f"ETSI 004 GET_KEY: key chunk of {len(key)} bytes, "
                                     f"{chunk_size} negotiated")
    meta = doc.get("metadata")
    if meta is not None and not isinstance(meta, dict):
        raise KeySourceProtocolError("ETSI 004 GET_KEY: metadata must be an object")
    return KeyChunk(index, SecretBytes(key), meta)


def _classify(what: str, status: int, raw: bytes) -> KeySourceError:
    msg = f"ETSI 004 {what}: HTTP {status}: {parse_error(raw).message}"
    if status in (401, 403):
        return KeySourceAuthError(msg)
    if status >= 500:
        return KeyUnavailable(msg)
    return KeySourceProtocolError(msg)


class Etsi004Client:
    """One application's ETSI 004 session with its KME."""

    def __init__(self, settings: object, *, ssl_context: ssl.SSLContext | None = None,
                 reuse_connections: bool = True,
                 sleep: Callable[[float], Awaitable[None]] = asyncio.sleep,
                 rng: Callable[[], float] = random.random) -> None:
        s = source_settings(settings, "etsi004")
        if ssl_context is None:
            if s.tls is None:
                raise ConfigError("ETSI 004 needs mutual TLS files", path=s.where("tls"))
            check_hostname = bool(s.options.get("verify_hostname", True))
            ssl_context = client_context(s.tls.cert, s.tls.key, s.tls.ca,
                                         check_hostname=check_hostname)
        self._base = s.url
        self.http = KmeHttps(ssl_context=ssl_context, timeout=s.timeout, retries=s.retries,
                             kme_id=s.kme_id, label=f"KME {s.kme_id or s.url}",
                             backoff=to_float(s.options.get("backoff", 0.2)),
                             reuse_connections=reuse_connections, sleep=sleep, rng=rng)
        self.chunk_sizes: dict[str, int] = {}

    def _url(self, op: str) -> URL:
        return URL(f"{self._base}/api/v1/qkd004/{op}")

    # ------------------------------------------------ Etsi004Transport

    binding = "json"

    @property
    def requests(self) -> int:
        return self.http.requests

    async def request_open(self, source: str, destination: str, qos: QoS,
                           key_stream_id: str | None) -> OpenReply:
        # 004 6.2: not retried -- a repeat after a lost answer would meet status 5
        body = {"source": source, "destination": destination, "qos": qos.to_json(),
                "key_stream_ID": key_stream_id}
        raw = await self.http.request("OPEN_CONNECT", "POST", self._url("open_connect"),
                                      _classify, body=body, retries=0)
        return decode_open_reply(raw)

    async def request_key(self, key_stream_id: str, index: int | None,
                          metadata_size: int | None, *, retry: bool) -> KeyReply:
        body = {"key_stream_ID": key_stream_id, "index": index, "metadata_size": metadata_size}
        raw = await self.http.request("GET_KEY", "POST", self._url("get_key"), _classify,
                                      body=body, retries=None if retry else 0)
        return decode_key_reply(raw, self.chunk_sizes.get(key_stream_id))

    async def request_close(self, key_stream_id: str) -> int:
        raw = await self.http.request("CLOSE", "POST", self._url("close"), _classify,
                                      body={"key_stream_ID": key_stream_id}, retries=0)
        self.chunk_sizes.pop(key_stream_id, None)
        return _int_status(_obj(raw, "CLOSE"), "CLOSE")

    # ------------------------------------------------ the older calls

    async def open_connect(self, source: str, destination: str, qos: QoS = QoS(),
                           key_stream_id: str | None = None) -> OpenResult:
        """OPEN_CONNECT (004 6.2). Not retried: a retry after a lost answer
        would meet KSID_IN_USE."""
        body = {"source": source, "destination": destination, "qos": qos.to_json(),
                "key_stream_ID": key_stream_id}
        raw = await self.http.request("OPEN_CONNECT", "POST", self._url("open_connect"),
                                      _classify, body=body, retries=0)
        res = parse_open(raw)
        if key_stream_id is not None \
                and res.key_stream_id not in (None, str(uuid.UUID(key_stream_id))):
            raise KeySourceProtocolError("ETSI 004 OPEN_CONNECT: KME changed our key_stream_ID")
        if res.status is not Status.QOS_NOT_MET and res.key_stream_id is not None:
            self.chunk_sizes[res.key_stream_id] = res.qos.key_chunk_size
        return res

    async def get_key(self, key_stream_id: str, index: int | None = None,
                      metadata_size: int | None = None) -> KeyChunk | int:
        """GET_KEY (004 6.3): the chunk at ``index`` (next one if None), or
        the metadata size the KME needs (status 8). Retried only with an
        explicit index: "the next chunk" would advance on every attempt."""
        body = {"key_stream_ID": key_stream_id, "index": index, "metadata_size": metadata_size}
        raw = await self.http.request("GET_KEY", "POST", self._url("get_key"), _classify, body=body,
                                      retries=None if index is not None else 0)
        return parse_get_key(raw, self.chunk_sizes.get(key_stream_id))

    async def close_stream(self, key_stream_id: str) -> Status:
        """CLOSE (004 6.4)."""
        raw = await self.http.request("CLOSE", "POST", self._url("close"), _classify,
                                      body={"key_stream_ID": key_stream_id}, retries=0)
        st = _status(_obj(raw, "CLOSE"), "CLOSE")
        self.chunk_sizes.pop(key_stream_id, None)
        _raise_for(st, "CLOSE")
        return st

    async def close(self) -> None:
        await self.http.close()
