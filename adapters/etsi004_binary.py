"""ETSI GS QKD 004 over the binary framing of ETSI's reference interface.

Theory of operation: one mutually authenticated TLS stream to the KME
(``url: https://HOST:PORT`` names where the stream goes; no HTTP is spoken),
opened on the first call and kept. Calls are serialised on it: a request
frame out, exactly one response frame of the matching type back
(:mod:`qkdgate.adapters.etsi004_frame` encodes and checks them). Whatever
goes wrong on the stream -- a timeout, a frame the codec refuses, the KME
closing it -- the stream is dropped and the next call opens a new one, so a
half-read answer can never be taken for the next call's.

The binary GET_KEY always carries an index (the format cannot say "the next
chunk"): the key source tracks it (docs/qkd.md "open choices"). Only a
GET_KEY is retried after a transport failure, as re-reading a chunk by
index is harmless; OPEN_CONNECT and CLOSE are not (a repeat would meet
status 5 or close someone else's stream).
"""

from __future__ import annotations

import asyncio
import contextlib
import json
import random
import ssl
from collections.abc import Awaitable, Callable, Mapping
from urllib.parse import urlsplit

from qkdgate.adapters import etsi004_frame as frame
from qkdgate.adapters.etsi004 import KeyReply, OpenReply, QoS
from qkdgate.adapters.settings import SourceSettings, to_int
from qkdgate.adapters.tls import check_peer_id, client_context
from qkdgate.errors import (
    ConfigError,
    KeySourceAuthError,
    KeySourceError,
    KeySourceProtocolError,
    KeySourceTimeout,
    KeyUnavailable,
)
from qkdgate.keymix.secret import SecretBytes

DEFAULT_METADATA_SIZE = 1024   # bytes offered per GET_KEY (the reference client's default)


def _limit(opts: Mapping[str, object], name: str, default: int, s: SourceSettings) -> int:
    try:
        v = to_int(opts.get(name, default))
    except (TypeError, ValueError):
        v = -1
    if not 64 <= v <= 16 * 1024 * 1024:
        raise ConfigError(f"{name} must be 64..16777216 bytes", path=s.where(f"options.{name}"),
                          found=repr(opts.get(name))[:40])
    return v


class Etsi004BinaryClient:
    """The ``etsi-binary`` :class:`~qkdgate.adapters.etsi004.Etsi004Transport`."""

    binding = "etsi-binary"

    def __init__(self, s: SourceSettings, *, ssl_context: ssl.SSLContext | None = None,
                 sleep: Callable[[float], Awaitable[None]] = asyncio.sleep,
                 rng: Callable[[], float] = random.random) -> None:
        parts = urlsplit(s.url)
        if parts.hostname is None:
            raise ConfigError("KME URL needs a host", path=s.where("url"), found=s.url)
        self.host = parts.hostname
        try:
            self.port = parts.port or 443
        except ValueError:
            raise ConfigError("KME URL has an invalid port", path=s.where("url"),
                              found=s.url) from None
        check_hostname = bool(s.options.get("verify_hostname", True))
        if ssl_context is None:
            if s.tls is None:
                raise ConfigError("ETSI 004 needs mutual TLS files", path=s.where("tls"))
            ssl_context = client_context(s.tls.cert, s.tls.key, s.tls.ca,
                                         check_hostname=check_hostname)
        self._ctx = ssl_context
        self._server_hostname = self.host if ssl_context.check_hostname else None
        self.timeout, self.retries = s.timeout, s.retries
        self.kme_id = s.kme_id
        self.label = f"KME {s.kme_id or s.url} (ETSI 004 binary)"
        self.max_message = _limit(s.options, "max_message_size", frame.DEFAULT_MAX_MESSAGE, s)
        self.max_metadata = _limit(s.options, "max_metadata_size", frame.DEFAULT_MAX_METADATA, s)
        self._backoff = 0.2
        with contextlib.suppress(TypeError, ValueError):
            self._backoff = float(str(s.options.get("backoff", 0.2)))
        self._sleep, self._rng = sleep, rng
        self._lock = asyncio.Lock()
        self._stream: tuple[asyncio.StreamReader, asyncio.StreamWriter] | None = None
        self._requests = 0
        self.chunk_sizes: dict[str, int] = {}
        self.mimetypes: dict[str, str] = {}

    @property
    def requests(self) -> int:
        return self._requests

    # ------------------------------------------------------------ stream

    async def _connect(self) -> tuple[asyncio.StreamReader, asyncio.StreamWriter]:
        if self._stream is not None and (self._stream[0].at_eof()
                                         or self._stream[1].is_closing()):
            self._drop()        # the KME closed it while idle: a new one, not a lost call
        if self._stream is None:
            try:
                self._stream = await asyncio.wait_for(
                    asyncio.open_connection(self.host, self.port, ssl=self._ctx,
                                            server_hostname=self._server_hostname),
                    self.timeout)
            except ssl.SSLCertVerificationError as exc:
                raise KeySourceAuthError(f"{self.label}: TLS certificate refused: "
                                         f"{exc.verify_message}") from None
            except ssl.SSLError as exc:
                raise KeySourceAuthError(f"{self.label}: TLS handshake failed: "
                                         f"{exc.reason or exc}") from None
            except TimeoutError:
                raise KeySourceTimeout(f"{self.label}: no TLS connection within "
                                       f"{self.timeout} s") from None
            except OSError as exc:
                raise KeyUnavailable(f"{self.label}: cannot connect: "
                                     f"{exc.strerror or exc}") from None
            if self.kme_id:
                # ETSI GS QKD 014 5.1 as for the JSON binding: the KME's
                # certificate must name the configured KME ID.
                try:
                    check_peer_id(self._stream[1].get_extra_info("ssl_object"), self.kme_id)
                except KeySourceAuthError:
                    self._drop()
                    raise
        return self._stream

    def _drop(self) -> None:
        if self._stream is not None:
            self._stream[1].close()
            self._stream = None

    async def _exchange(self, msg: frame.Message, want: frame.ServiceType) -> frame.Message:
        reader, writer = await self._connect()
        self._requests += 1
        writer.write(frame.encode(msg))
        await writer.drain()
        try:
            header = await reader.readexactly(frame.HEADER_LEN)
        except asyncio.IncompleteReadError as exc:
            if exc.partial:
                raise
            raise ConnectionResetError("the KME closed the connection") from None
        stype, length = frame.parse_header(header, frozenset({want}), self.max_message)
        payload = await reader.readexactly(length)
        return frame.decode_payload(stype, payload, max_metadata=self.max_metadata)

    async def _call(self, what: str, msg: frame.Message, want: frame.ServiceType,
                    attempts: int) -> frame.Message:
        for attempt in range(attempts):
            async with self._lock:
                try:
                    return await asyncio.wait_for(self._exchange(msg, want), self.timeout)
                except frame.FrameError:
                    self._drop()
                    raise
                except asyncio.IncompleteReadError as exc:
                    self._drop()
                    err: KeySourceError = frame.FrameError(
                        "truncated", f"{what}: the KME closed the stream after "
                        f"{len(exc.partial)} of {exc.expected} bytes")
                except TimeoutError:
                    self._drop()
                    err = KeySourceTimeout(f"{self.label}: {what}: no answer within "
                                           f"{self.timeout} s")
                except (ConnectionError, OSError) as exc:
                    self._drop()
                    err = KeyUnavailable(f"{self.label}: {what}: {exc.strerror or exc}")
                except BaseException:
                    self._drop()    # cancelled mid-exchange: the stream is out of step
                    raise
            if attempt + 1 >= attempts or isinstance(err, KeySourceProtocolError):
                raise err
            await self._sleep(self._backoff * (2 ** attempt) * (0.5 + self._rng()))
        raise AssertionError("unreachable")   # pragma: no cover

    # ------------------------------------------------ Etsi004Transport

    async def request_open(self, source: str, destination: str, qos: QoS,
                           key_stream_id: str | None) -> OpenReply:
        req = frame.OpenConnectRequest(source, destination, qos, frame.ksid_bytes(key_stream_id))
        res = await self._call("OPEN_CONNECT", req, frame.ServiceType.OPEN_CONNECT_RESPONSE, 1)
        if not isinstance(res, frame.OpenConnectResponse):
            raise KeySourceProtocolError("ETSI 004 OPEN_CONNECT: wrong answer type")
        ksid = frame.ksid_str(res.key_stream_id) if res.key_stream_id is not None else None
        if ksid is not None and res.qos is not None:
            self.mimetypes[ksid] = res.qos.metadata_mimetype
        return OpenReply(res.status, ksid, res.qos)

    async def request_key(self, key_stream_id: str, index: int | None,
                          metadata_size: int | None, *, retry: bool) -> KeyReply:
        if index is None:
            raise KeySourceProtocolError("ETSI 004 binary GET_KEY needs an index")
        req = frame.GetKeyRequest(frame.ksid_bytes(key_stream_id), index,
                                  DEFAULT_METADATA_SIZE if metadata_size is None else metadata_size)
        res = await self._call("GET_KEY", req, frame.ServiceType.GET_KEY_RESPONSE,
                               1 + self.retries if retry else 1)
        if not isinstance(res, frame.GetKeyResponse):
            raise KeySourceProtocolError("ETSI 004 GET_KEY: wrong answer type")
        if res.status != 0:
            return KeyReply(res.status, metadata_size=res.metadata_size)
        key = res.key or b""
        want = self.chunk_sizes.get(key_stream_id)
        if not key or (want is not None and len(key) != want):
            raise KeySourceProtocolError(f"ETSI 004 GET_KEY: key chunk of {len(key)} bytes, "
                                         f"{want} negotiated")
        return KeyReply(0, res.index, SecretBytes(key),
                        self._metadata(key_stream_id, res.metadata or b""), res.metadata_size)

    def _metadata(self, ksid: str, raw: bytes) -> Mapping[str, object] | None:
        """Metadata as an object when the stream's MIME type is JSON (the
        reference sends JSON, server.py generate_metadata); else None."""
        if not raw or "json" not in self.mimetypes.get(ksid, "application/json"):
            return None
        try:
            doc = json.loads(raw.decode("utf-8"))
        except (UnicodeDecodeError, ValueError, RecursionError):
            return None
        return doc if isinstance(doc, dict) else None

    async def request_close(self, key_stream_id: str) -> int:
        res = await self._call("CLOSE", frame.CloseRequest(frame.ksid_bytes(key_stream_id)),
                               frame.ServiceType.CLOSE_RESPONSE, 1)
        self.chunk_sizes.pop(key_stream_id, None)
        if not isinstance(res, frame.CloseResponse):
            raise KeySourceProtocolError("ETSI 004 CLOSE: wrong answer type")
        return res.status

    async def close(self) -> None:
        async with self._lock:
            if self._stream is not None:
                writer = self._stream[1]
                self._stream = None
                writer.close()
                with contextlib.suppress(OSError, ssl.SSLError, TimeoutError):
                    await asyncio.wait_for(writer.wait_closed(), 1.0)
