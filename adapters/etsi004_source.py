"""ETSI GS QKD 004 key source: key_IDs that name a chunk of a shared key stream.

Theory of operation: ETSI GS QKD 004 V2.1.1 hands keys out as a stream.
Both applications OPEN_CONNECT the same key_stream_ID and then read
identical key chunks by index (004 6.3); there are no per-key IDs. The
peer protocol carries ETSI 014 style key_IDs (UUIDs), so this source makes
the pair (stream, index) a UUID:

* One stream per SAE pair. Its key_stream_ID is ``options.key_stream_id``
  or, with no configuration on either side, :func:`derive_stream_id` of the
  two SAE IDs (SHA-256 over the sorted pair, written as an RFC 9562 UUIDv8).
  Both sides open it with source = the lower SAE ID and destination = the
  higher (code-point order), so they agree whatever their roles, and with
  QoS ``key_chunk_size = options.key_size / 8``: one chunk is one key.
* Master (:meth:`get_new_keys`): GET_KEY at its next index; the key_ID is
  :func:`make_key_id` (tag of the stream, a per-open nonce, the index).
  On the ``json`` binding the first read after every (re)open asks the KME
  for "our next chunk" (index null) and learns the position; the binary
  framing cannot say "next", so on ``etsi-binary`` the source starts at 0
  after an open. Later reads name the index explicitly, so a lost answer
  is retried and returns the same chunk.
* The wire is a transport (``binding:``, docs/qkd.md "ETSI 004
  bindings"): :class:`~qkdgate.adapters.etsi004_binary.Etsi004BinaryClient`
  (default) or :class:`~qkdgate.adapters.etsi004.Etsi004Client` (JSON).
  Both return the KME's answer for every status; what each status means is
  decided here, once.
* Slave (:meth:`get_keys_by_id`): :func:`parse_key_id`, check the tag is
  its own stream's (a key_ID of another stream is :class:`KeyNotFound`),
  GET_KEY at that index.
* A stream must be open on both sides before either can read (004 status
  3), and the slave learns key_IDs only after the master read: the daemon
  calls :meth:`connect` for each peer at start (the
  :class:`~qkdgate.interfaces.StreamKeySource` protocol); :meth:`status`
  connects too. A stream the KME forgot (status 4) is reopened on the next
  call; one still held for us after a restart (status 5) is closed and
  reopened; :meth:`close` CLOSEs every stream.

Status codes (004 6.1 Table 2) become the key-source errors: 2 insufficient
key, 3 peer not connected, 4 no QKD connection -> KeyUnavailable; 5
key_stream_ID held by another pair -> KeyUnavailable (clears when the KME
drops the stale stream); 6 -> KeySourceTimeout; 7 QoS not met -> the
counter-proposal is accepted when it keeps the chunk size, else
KeyUnavailable; 8 -> one retry with the metadata size the KME asked for.
"""

from __future__ import annotations

import asyncio
import contextlib
import hashlib
import os
import random
import re
import ssl
import uuid
from collections.abc import Awaitable, Callable, Mapping, Sequence
from dataclasses import dataclass, field

from qkdgate.adapters.etsi004 import (
    Etsi004Client,
    Etsi004Transport,
    KeyChunk,
    QoS,
    Status,
)
from qkdgate.adapters.etsi004_binary import Etsi004BinaryClient
from qkdgate.adapters.settings import SourceSettings, source_settings
from qkdgate.errors import (
    ConfigError,
    KeyNotFound,
    KeySourceProtocolError,
    KeySourceTimeout,
    KeyUnavailable,
    LocalProtocolError,
    QkdgateError,
)
from qkdgate.interfaces import KeySourceStatus, QkdKey

STREAM_LABEL = b"qkdgate etsi004 key_stream_ID v1"
TAG_LABEL = b"qkdgate etsi004 key_ID tag v1"
TAG_BITS, NONCE_BITS, INDEX_BITS = 48, 26, 48
MAX_INDEX = 2**32 - 1            # the 004 client's index range (unsigned 32-bit)
MAX_KEYS_PER_CALL = 256
SAE_ID_RE = re.compile(r"[^\s/?#]{1,128}")
OPTIONS = {"local_sae_id", "key_size", "key_stream_id", "qos", "uri_scheme",
           "accept_qos_counter", "verify_hostname", "backoff", "reuse_connections",
           "max_message_size", "max_metadata_size"}
BINDINGS = ("etsi-binary", "json")      # docs/qkd.md "ETSI 004 bindings"
QOS_OPTIONS = {"max_bps", "min_bps", "jitter", "priority", "timeout", "ttl", "metadata_mimetype"}


# ------------------------------------------------------------ identifiers

def _uuid8(b: bytes) -> uuid.UUID:
    """RFC 9562 5.8: 16 bytes with version 8 and the RFC variant set."""
    n = int.from_bytes(b[:16], "big")
    n = (n & ~(0xF << 76)) | (0x8 << 76)
    n = (n & ~(0x3 << 62)) | (0x2 << 62)
    return uuid.UUID(int=n)


def derive_stream_id(sae_a: str, sae_b: str) -> str:
    """The key_stream_ID both SAEs compute alone: SHA-256 of the label, then
    each SAE ID of the sorted pair as 2-byte big-endian length + UTF-8, cut
    to 16 bytes, version 8 / variant 10 (docs/qkd.md "ETSI 004 key source")."""
    h = hashlib.sha256(STREAM_LABEL)
    for sae in sorted((sae_a, sae_b)):
        raw = sae.encode("utf-8")
        h.update(len(raw).to_bytes(2, "big") + raw)
    return str(_uuid8(h.digest()))


def stream_tag(key_stream_id: str) -> int:
    """48-bit tag of a stream: SHA-256(TAG_LABEL || the 16 ID bytes)[0:6]."""
    return int.from_bytes(hashlib.sha256(TAG_LABEL + uuid.UUID(key_stream_id).bytes)
                          .digest()[:6], "big")


def make_key_id(tag: int, nonce: int, index: int) -> str:
    """UUIDv8: bits 127-80 tag, 79-76 version 8, 75-64 nonce high 12 bits,
    63-62 variant 10, 61-48 nonce low 14 bits, 47-0 index."""
    if not (0 <= tag < 2**TAG_BITS and 0 <= nonce < 2**NONCE_BITS and 0 <= index < 2**INDEX_BITS):
        raise LocalProtocolError("key_ID field out of range")
    n = (tag << 80) | (0x8 << 76) | ((nonce >> 14) << 64) | (0x2 << 62) \
        | ((nonce & 0x3FFF) << 48) | index
    return str(uuid.UUID(int=n))


def parse_key_id(key_id: str) -> tuple[int, int, int]:
    """(tag, nonce, index) of a key_ID made by :func:`make_key_id`."""
    try:
        u = uuid.UUID(key_id) if isinstance(key_id, str) else None
    except ValueError:
        u = None
    if u is None:
        raise LocalProtocolError("key_ID is not a UUID")
    if u.version != 8 or u.variant != uuid.RFC_4122:
        raise KeySourceProtocolError(f"key_ID {u} is not an ETSI 004 stream key_ID "
                                     "(not a UUIDv8): does the master use kind etsi004?")
    n = u.int
    nonce = ((n >> 64) & 0xFFF) << 14 | ((n >> 48) & 0x3FFF)
    return n >> 80, nonce, n & (2**INDEX_BITS - 1)


# ------------------------------------------------------------ state

@dataclass
class _Stream:
    peer: str
    ksid: str
    tag: int
    source: str
    destination: str
    lock: asyncio.Lock = field(default_factory=asyncio.Lock)
    open: bool = False
    peer_connected: bool | None = None
    link_up: bool | None = None
    nonce: int = 0
    next_index: int | None = None       # None: ask the KME (index null)
    qos: QoS | None = None
    reads: int = 0
    metadata: Mapping[str, object] = field(default_factory=dict)



def _cert_common_name(path: str, where: str) -> str:
    from cryptography import x509
    from cryptography.x509.oid import NameOID
    try:
        with open(path, "rb") as fh:
            cert = x509.load_pem_x509_certificate(fh.read())
        cns = cert.subject.get_attributes_for_oid(NameOID.COMMON_NAME)
    except (OSError, ValueError) as exc:
        raise ConfigError(f"cannot read the SAE ID from the client certificate: {exc}",
                          path=where) from None
    if not cns or not isinstance(cns[0].value, str):
        raise ConfigError("client certificate has no CN: set options.local_sae_id", path=where)
    return cns[0].value


class Etsi004KeySource:
    """KeySource over ETSI GS QKD 004 streams (one per peer SAE).

    ``ssl_context`` overrides the one built from the settings' files;
    ``sleep``/``rng`` drive the retry backoff, ``rng_bytes`` the per-open
    key_ID nonce (all injected for tests)."""

    def __init__(self, settings: object, *,
                 ssl_context: ssl.SSLContext | None = None,
                 sleep: Callable[[float], Awaitable[None]] = asyncio.sleep,
                 rng: Callable[[], float] = random.random,
                 rng_bytes: Callable[[int], bytes] = os.urandom) -> None:
        self.settings = s = source_settings(settings, "etsi004")
        self.name = s.name
        opts = dict(s.options)
        unknown = sorted(set(opts) - OPTIONS)
        if unknown:
            raise ConfigError(f"unknown option {unknown[0]!r} for kind etsi004",
                              path=s.where(f"options.{unknown[0]}"),
                              expected=", ".join(sorted(OPTIONS)))
        self.key_size = _key_size(opts.get("key_size", 256), s.where("options.key_size"))
        self.binding = s.binding or "etsi-binary"
        if self.binding not in BINDINGS:
            raise ConfigError("unknown ETSI 004 binding", path=s.where("binding"),
                              expected=" or ".join(BINDINGS), found=repr(self.binding))
        raw_qos = opts.get("qos") or {}
        qos_opts: object = raw_qos
        if self.binding == "etsi-binary" and isinstance(raw_qos, Mapping) \
                and "timeout" not in raw_qos:
            # The reference server reads QoS timeout 0 as "answer status 6 at
            # once" (docs/qkd.md, open choices): send our own call timeout.
            qos_opts = {**raw_qos, "timeout": int(s.timeout * 1000)}
        self._qos = _qos(qos_opts, self.key_size // 8, s.where("options.qos"))
        self._accept_counter = _flag(opts, "accept_qos_counter", s)
        scheme = opts.get("uri_scheme", "qkd")
        if not isinstance(scheme, str) or not re.fullmatch(r"[a-z][a-z0-9+.-]{0,31}", scheme):
            raise ConfigError("uri_scheme must be a URI scheme", path=s.where("options.uri_scheme"),
                              found=repr(scheme))
        self._scheme = scheme
        self._fixed_ids = _fixed_stream_ids(opts.get("key_stream_id"),
                                            s.where("options.key_stream_id"))
        local = opts.get("local_sae_id")
        if local is None and s.tls is not None:
            local = _cert_common_name(s.tls.cert, s.where("tls.cert"))
        if not isinstance(local, str) or not SAE_ID_RE.fullmatch(local):
            raise ConfigError("local SAE ID needed: set options.local_sae_id (no spaces, '/', "
                              "'?', '#')", path=s.where("options.local_sae_id"), found=repr(local))
        self.local_sae_id = local
        self.client: Etsi004Transport
        if self.binding == "json":
            self.client = Etsi004Client(s, ssl_context=ssl_context, sleep=sleep, rng=rng,
                                        reuse_connections=_flag(opts, "reuse_connections", s))
        else:
            self.client = Etsi004BinaryClient(s, ssl_context=ssl_context, sleep=sleep, rng=rng)
        self._rng_bytes = rng_bytes
        self._streams: dict[str, _Stream] = {}

    @classmethod
    def from_settings(cls, settings: object) -> Etsi004KeySource:
        return cls(settings)

    def __repr__(self) -> str:
        return (f"<Etsi004KeySource {self.name} {self.binding} {self.settings.url} "
                f"sae={self.local_sae_id}>")

    # ------------------------------------------------------------ streams

    def stream_id(self, peer_sae_id: str) -> str:
        """The key_stream_ID shared with ``peer_sae_id``."""
        return self._stream(peer_sae_id).ksid

    def _stream(self, peer: str) -> _Stream:
        st = self._streams.get(peer)
        if st is None:
            if not isinstance(peer, str) or not SAE_ID_RE.fullmatch(peer) \
                    or peer == self.local_sae_id:
                raise LocalProtocolError(f"invalid peer SAE ID {str(peer)[:40]!r}")
            ksid = self._fixed_ids.get(peer) or self._fixed_ids.get("*") \
                or derive_stream_id(self.local_sae_id, peer)
            lo, hi = sorted((self.local_sae_id, peer))
            st = self._streams[peer] = _Stream(peer, ksid, stream_tag(ksid),
                                               f"{self._scheme}://{lo}", f"{self._scheme}://{hi}")
        return st

    async def connect(self, peer_sae_id: str, *, reopen: bool = False) -> None:
        """OPEN_CONNECT the stream with ``peer_sae_id`` if not open yet.

        ``reopen`` OPENs even a stream we believe open (status 5 -> CLOSE ->
        OPEN): after the KME lost the stream only the side that next reads
        notices, so a side that is never asked to read (the slave, while
        the master gets status 3) must be told to re-join."""
        st = self._stream(peer_sae_id)
        async with st.lock:
            if reopen:
                st.open = False
            await self._ensure_open(st)

    async def _ensure_open(self, st: _Stream) -> None:
        if not st.open:
            await self._open(st, self._qos, may_close=True, may_counter=self._accept_counter)

    async def _open(self, st: _Stream, qos: QoS, *, may_close: bool, may_counter: bool) -> None:
        # 004 6.2: not retried -- a repeat after a lost answer would meet status 5
        res = await self.client.request_open(st.source, st.destination, qos, st.ksid)
        where = f"ETSI 004 OPEN_CONNECT of stream {st.ksid} with {st.peer}"
        code = res.status
        if code == Status.NO_QKD_CONNECTION:
            st.link_up = False
            raise KeyUnavailable(f"{where}: no QKD connection (status 4)")
        if code == Status.KSID_IN_USE:
            if may_close:
                # Still held for us (we restarted without CLOSE): release and reopen.
                await self._close_quietly(st)
                return await self._open(st, qos, may_close=False, may_counter=may_counter)
            raise KeyUnavailable(f"{where}: key_stream_ID in use by another SAE pair or "
                                 "session (status 5); set options.key_stream_id if it persists")
        if code == Status.TIMEOUT:
            raise KeySourceTimeout(f"{where}: TIMEOUT (status 6)")
        if code in (Status.INSUFFICIENT_KEY, Status.PEER_NOT_CONNECTED_GET_KEY):
            raise KeyUnavailable(f"{where}: {Status(code).name} ({code})")
        if code not in (Status.SUCCESSFUL, Status.PEER_NOT_CONNECTED, Status.QOS_NOT_MET):
            raise KeySourceProtocolError(f"{where}: unknown status {code}" if code not in
                                         Status._value2member_map_ else
                                         f"{where}: status {Status(code).name} not allowed here")
        if res.qos is None or (res.key_stream_id is None and code != Status.QOS_NOT_MET):
            raise KeySourceProtocolError(f"{where}: answer without QoS or key_stream_ID")
        if res.key_stream_id not in (None, st.ksid):
            raise KeySourceProtocolError(f"{where}: KME changed our key_stream_ID")
        chunk = self._qos.key_chunk_size
        if code == Status.QOS_NOT_MET:
            # A counter-proposal. Whether status 7 also opened the stream differs
            # between KMEs (docs/qkd.md): reopening with the counter QoS works
            # either way -- a stream it opened answers 5, is CLOSEd and reopened.
            c = res.qos
            if may_counter and c.key_chunk_size == chunk and c != qos:
                return await self._open(st, c, may_close=True, may_counter=False)
            raise KeyUnavailable(f"{where}: QoS not met (status 7); the KME offers "
                                 f"key_chunk_size={c.key_chunk_size} min_bps={c.min_bps} "
                                 f"max_bps={c.max_bps}, we need {chunk}-byte chunks")
        if res.qos.key_chunk_size != chunk:
            await self._close_quietly(st)
            raise KeySourceProtocolError(f"{where}: stream has {res.qos.key_chunk_size}-byte "
                                         f"chunks, we need {chunk} (options.key_size must match "
                                         "on both gateways)")
        self.client.chunk_sizes[st.ksid] = chunk
        st.open, st.link_up, st.qos = True, True, res.qos
        st.peer_connected = code == Status.SUCCESSFUL
        # A new nonce per open keeps key_IDs unique if the KME restarted the
        # stream at index 0 (the slave does not check it).
        st.nonce = int.from_bytes(self._rng_bytes(4), "big") % 2**NONCE_BITS
        # The JSON binding asks the KME for "our next chunk" (index null); the
        # binary one cannot say so and starts at 0 (docs/qkd.md, open choices).
        st.next_index = None if self.binding == "json" else 0
        return None

    async def _close_quietly(self, st: _Stream) -> None:
        st.open = False
        with contextlib.suppress(QkdgateError):   # gone already, or the KME is unreachable
            await self.client.request_close(st.ksid)

    async def _read(self, st: _Stream, index: int | None) -> KeyChunk:
        where = f"ETSI 004 GET_KEY stream {st.ksid} index {'next' if index is None else index}"
        metadata_size: int | None = None
        for _ in range(2):
            # "the next chunk" must not be retried: each attempt would advance
            res = await self.client.request_key(st.ksid, index, metadata_size,
                                                retry=index is not None)
            code = res.status
            if code == Status.PEER_NOT_CONNECTED_GET_KEY:
                st.peer_connected = False
                raise KeyUnavailable(f"{where}: peer SAE {st.peer} has not opened the stream "
                                     "(status 3)")
            if code == Status.NO_QKD_CONNECTION:
                st.open = False         # reopened on the next call
                raise KeyUnavailable(f"{where}: no QKD connection (status 4)")
            if code == Status.INSUFFICIENT_KEY:
                if index is not None and self.binding == "json":
                    st.next_index = None    # resynchronise with the KME's position
                raise KeyUnavailable(f"{where}: insufficient key (status 2)")
            if code == Status.TIMEOUT:
                raise KeySourceTimeout(f"{where}: timeout (status 6)")
            if code == Status.METADATA_TOO_SMALL and res.metadata_size:
                metadata_size = res.metadata_size   # the KME wants room for metadata
                continue
            if code != Status.SUCCESSFUL:
                raise KeySourceProtocolError(
                    f"{where}: unknown status {code}" if code not in Status._value2member_map_
                    else f"{where}: status {Status(code).name} not allowed here")
            if res.key is None or res.index is None:
                raise KeySourceProtocolError(f"{where}: status 0 without a key")
            if (index is not None and res.index != index) or res.index > MAX_INDEX:
                res.key.wipe()
                raise KeySourceProtocolError(f"{where}: KME answered index {res.index}")
            st.peer_connected, st.link_up, st.reads = True, True, st.reads + 1
            st.metadata = dict(res.metadata or {})
            return KeyChunk(res.index, res.key, res.metadata)
        raise KeySourceProtocolError(f"{where}: status 8 twice")

    # ------------------------------------------------------------ KeySource

    async def get_new_keys(self, peer_sae_id: str, number: int = 1, size_bits: int | None = 256,
                           additional_slave_sae_ids: Sequence[str] = ()) -> list[QkdKey]:
        """Master: the next ``number`` chunks of the stream with the peer."""
        if additional_slave_sae_ids:
            raise LocalProtocolError("ETSI 004 streams join two SAEs: no additional slaves")
        if size_bits not in (None, self.key_size):
            raise LocalProtocolError(f"key source {self.name} delivers {self.key_size}-bit keys "
                                     f"(options.key_size), asked for {size_bits}")
        if not isinstance(number, int) or not 1 <= number <= MAX_KEYS_PER_CALL:
            raise LocalProtocolError(f"number of keys must be 1..{MAX_KEYS_PER_CALL}")
        st = self._stream(peer_sae_id)
        keys: list[QkdKey] = []
        async with st.lock:
            try:
                await self._ensure_open(st)
                for _ in range(number):
                    chunk = await self._read(st, st.next_index)
                    st.next_index = chunk.index + 1
                    keys.append(QkdKey(make_key_id(st.tag, st.nonce, chunk.index), chunk.key))
            except BaseException:
                for k in keys:          # a partial batch is never used by either side
                    k.key.wipe()
                raise
        return keys

    async def get_keys_by_id(self, master_sae_id: str, key_ids: Sequence[str]) -> list[QkdKey]:
        """Slave: the chunks the key_IDs name, in request order."""
        st = self._stream(master_sae_id)
        wanted: list[tuple[str, int]] = []
        for kid in key_ids:
            tag, _nonce, index = parse_key_id(kid)
            norm = str(uuid.UUID(kid))
            if tag != st.tag:
                raise KeyNotFound(f"key_ID {norm} belongs to another key stream "
                                  f"(tag {tag:012x}, ours {st.tag:012x} for {st.ksid})")
            if index > MAX_INDEX:
                raise KeyNotFound(f"key_ID {norm}: index {index} beyond the 004 range")
            wanted.append((norm, index))
        if not wanted or len({w[0] for w in wanted}) != len(wanted) \
                or len(wanted) > MAX_KEYS_PER_CALL:
            raise LocalProtocolError(f"key_IDs must be 1..{MAX_KEYS_PER_CALL} without duplicates")
        keys: list[QkdKey] = []
        async with st.lock:
            try:
                await self._ensure_open(st)
                for norm, index in wanted:
                    keys.append(QkdKey(norm, (await self._read(st, index)).key))
            except BaseException:
                for k in keys:
                    k.key.wipe()
                raise
        return keys

    async def status(self, peer_sae_id: str) -> KeySourceStatus:
        """What 004 can tell: whether the stream is open, whether the peer
        joined (last known), link state, and the last chunk's metadata (the
        simulator's ``qkdgate_qber``). 004 reports no pool size: the counts
        are 0 and ``extensions["etsi004_pool_known"]`` is False."""
        st = self._stream(peer_sae_id)
        alarms: list[str] = []
        async with st.lock:
            try:
                await self._ensure_open(st)
            except KeyUnavailable as exc:
                alarms.append("NO_QKD_CONNECTION" if st.link_up is False else "STREAM_NOT_OPEN")
                reason = str(exc)
            else:
                reason = ""
        if st.peer_connected is False:
            alarms.append("PEER_NOT_CONNECTED")
        qber = st.metadata.get("qkdgate_qber")
        ext: dict[str, object] = {
            "etsi004_key_stream_ID": st.ksid, "etsi004_open": st.open,
            "etsi004_peer_connected": st.peer_connected, "etsi004_next_index": st.next_index,
            "etsi004_reads": st.reads, "etsi004_pool_known": False,
            "etsi004_qos": st.qos.to_json() if st.qos else self._qos.to_json(),
            **{k: v for k, v in st.metadata.items() if isinstance(k, str)}}
        if reason:
            ext["etsi004_error"] = reason
        return KeySourceStatus(
            source_kme_id=self.settings.kme_id or "", target_kme_id="",
            master_sae_id=self.local_sae_id, slave_sae_id=st.peer, key_size=self.key_size,
            stored_key_count=0, max_key_count=0, max_key_per_request=MAX_KEYS_PER_CALL,
            max_key_size=self.key_size, min_key_size=self.key_size,
            link_up=st.link_up is not False,
            qber=(float(qber) if isinstance(qber, (int, float)) and not isinstance(qber, bool)
                  else None),
            alarms=tuple(alarms), extensions=ext)

    async def close(self) -> None:
        """CLOSE every open stream (004 6.4), then the HTTPS pool."""
        for st in self._streams.values():
            if st.open:
                await self._close_quietly(st)
        await self.client.close()

    async def __aenter__(self) -> Etsi004KeySource:
        return self

    async def __aexit__(self, *exc: object) -> None:
        await self.close()


# ------------------------------------------------------------ options

def _key_size(v: object, where: str) -> int:
    if not isinstance(v, int) or isinstance(v, bool) or v % 8 or not 64 <= v <= 8192:
        raise ConfigError("key_size must be a multiple of 8 bits", path=where,
                          expected="64..8192", found=repr(v))
    return v


def _flag(opts: Mapping[str, object], name: str, s: SourceSettings) -> bool:
    v = opts.get(name, True)
    if not isinstance(v, bool):
        raise ConfigError(f"{name} must be true or false", path=s.where(f"options.{name}"),
                          found=repr(v)[:40])
    return v


def _qos(doc: object, chunk: int, where: str) -> QoS:
    if not isinstance(doc, Mapping):
        raise ConfigError("qos must be a mapping", path=where)
    unknown = sorted(set(doc) - QOS_OPTIONS)
    if unknown:
        raise ConfigError(f"unknown QoS field {unknown[0]!r} (the chunk size is key_size)",
                          path=f"{where}.{unknown[0]}", expected=", ".join(sorted(QOS_OPTIONS)))
    try:
        # every field given: QoS.from_json's defaults do not work on a slots class
        qos = QoS.from_json({**QoS().to_json(), **doc, "key_chunk_size": chunk})
    except KeySourceProtocolError as exc:
        raise ConfigError(str(exc).replace("ETSI 004: ", ""), path=where) from None
    return qos


def _fixed_stream_ids(v: object, where: str) -> dict[str, str]:
    """``key_stream_id``: one UUID (every peer) or a mapping peer SAE ID -> UUID."""
    if v is None:
        return {}
    items = {"*": v} if not isinstance(v, Mapping) else dict(v)
    out = {}
    for peer, ksid in items.items():
        try:
            out[str(peer)] = str(uuid.UUID(ksid)) if isinstance(ksid, str) else ""
        except ValueError:
            out[str(peer)] = ""
        if not out[str(peer)]:
            raise ConfigError("key_stream_id must be a UUID, or a mapping peer SAE ID -> UUID",
                              path=where, found=repr(ksid)[:60])
    return out


def from_settings(settings: object) -> Etsi004KeySource:
    """Entry point ``qkdgate.key_sources: etsi004``."""
    return Etsi004KeySource(settings)
