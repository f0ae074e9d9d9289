"""ETSI GS QKD 004 binary framing: the wire of ETSI's reference interface.

Theory of operation: ETSI GS QKD 004 V2.1.1 defines OPEN_CONNECT, GET_KEY
and CLOSE and their parameters, not a wire format. The open Python implementation
QUBIP/etsi-qkd-004 (client/client.py at commit 28507a37, server/server.py
at commit acc76c58) carries them as binary frames on a mutually
authenticated TLS stream; this codec is transcribed from it, and every
field below cites its line there (docs/qkd.md "ETSI 004 bindings"). QUBIP
says it is "based on the C implementation from ETSI" (the forge project
``gs004-app-int``), which is not in our code index: that the C reference
frames the same way is QUBIP's claim, untested by us.

Every message is an 8-byte header and a payload:

    version   3 bytes  1, 0, 1        struct '!BBB'  client.py:207, server.py:353
    service   1 byte   0x02..0x09     struct '!b'    client.py:208, client.py:32-37
    length    4 bytes  payload bytes  struct '!I'    client.py:209 (big-endian, '!')

Payloads (all integers unsigned 32-bit big-endian, '!I'):

    OPEN_CONNECT request  0x02  source URI NUL, destination URI NUL (client.py:121-122),
                                QoS (7 x uint32 + 256-byte MIME type, NUL-padded:
                                client.py:213-226), key_stream_ID 16 bytes (client.py:125;
                                all zero = "the KME chooses", server.py:234-235)
    OPEN_CONNECT response 0x03  status; for status 0 and 7: QoS, key_stream_ID
                                (server.py:255-257, client.py:237-256); else status only
                                (server.py:216-218)
    GET_KEY request       0x04  key_stream_ID, index, metadata_size (client.py:155-157,
                                server.py:266-268)
    GET_KEY response      0x05  status; status 0: index, key_chunk_size, key bytes,
                                metadata_size, metadata (server.py:315-321,
                                client.py:271-290); status 8: metadata_size needed
                                (server.py:307-310); else status only
    CLOSE request         0x08  key_stream_ID (client.py:183)
    CLOSE response        0x09  status (server.py:348)

The decoder trusts nothing: the length is checked against a configured
maximum before a byte of payload is read (:func:`parse_header`), the
payload must have exactly the size its type allows, URIs must end in NUL,
and metadata may not exceed the size the caller offered. Any violation is
:class:`FrameError`, a :class:`~qkdgate.errors.KeySourceProtocolError`
(the remote side's fault); its ``reason`` names the rule. The module does
no I/O (etsi004_binary.py and the simulator's binary server do).
"""

from __future__ import annotations

import enum
import struct
import uuid
from dataclasses import dataclass

from qkdgate.adapters.etsi004 import QoS
from qkdgate.errors import KeySourceProtocolError, LocalProtocolError

VERSION = bytes((1, 0, 1))          # '1.0.1' packed '!BBB': client.py:12, client.py:207
HEADER = struct.Struct("!3sBI")     # version, service type ('!b'), payload length ('!I')
HEADER_LEN = HEADER.size            # 8: "Read header (8 bytes)" server.py:80
QOS_INTS = struct.Struct("!7I")     # QOS_FIELD_COUNT 7 x QOS_FIELD_SIZE 4: client.py:40-41, 216
MIME_LEN = 256                      # METADATA_MIMETYPE_SIZE: client.py:42, NUL-padded client.py:225
QOS_LEN = QOS_INTS.size + MIME_LEN  # 284
KSID_LEN = 16                       # Key_stream_ID bytes: client.py:254
U32 = struct.Struct("!I")
MAX_URI = 1024                      # bytes before the NUL; ours, the reference sets none
DEFAULT_MAX_MESSAGE = 64 * 1024     # payload bytes; options.max_message_size
DEFAULT_MAX_METADATA = 16 * 1024    # bytes; options.max_metadata_size
NO_KSID = bytes(KSID_LEN)           # all zero: "allocate one" (server.py:234)


class ServiceType(enum.IntEnum):
    """The service-type byte (client.py:32-37, server.py:38-43)."""

    OPEN_CONNECT_REQUEST = 0x02
    OPEN_CONNECT_RESPONSE = 0x03
    GET_KEY_REQUEST = 0x04
    GET_KEY_RESPONSE = 0x05
    CLOSE_REQUEST = 0x08
    CLOSE_RESPONSE = 0x09


REQUESTS = frozenset({ServiceType.OPEN_CONNECT_REQUEST, ServiceType.GET_KEY_REQUEST,
                      ServiceType.CLOSE_REQUEST})
RESPONSES = frozenset({ServiceType.OPEN_CONNECT_RESPONSE, ServiceType.GET_KEY_RESPONSE,
                       ServiceType.CLOSE_RESPONSE})


class FrameError(KeySourceProtocolError):
    """A frame that breaks the binary binding. ``reason`` is one of
    ``too_long``, ``truncated``, ``version``, ``service_type``, ``length``,
    ``uri``, ``metadata``, ``mime``, ``qos``."""

    def __init__(self, reason: str, message: str) -> None:
        self.reason = reason
        super().__init__(f"ETSI 004 binary frame: {message}")


# ------------------------------------------------------------ messages

@dataclass(frozen=True, slots=True)
class OpenConnectRequest:
    source: str
    destination: str
    qos: QoS
    key_stream_id: bytes = NO_KSID


@dataclass(frozen=True, slots=True)
class OpenConnectResponse:
    status: int
    qos: QoS | None = None          # present with status 0, 1 and 7 (see docs/qkd.md)
    key_stream_id: bytes | None = None


@dataclass(frozen=True, slots=True)
class GetKeyRequest:
    key_stream_id: bytes
    index: int
    metadata_size: int


@dataclass(frozen=True, slots=True, repr=False)
class GetKeyResponse:
    status: int
    index: int | None = None
    key: bytes | None = None
    metadata: bytes | None = None
    metadata_size: int | None = None    # with status 8: the size the KME needs

    def __repr__(self) -> str:          # key bytes never printed
        return (f"GetKeyResponse(status={self.status}, index={self.index}, "
                f"key={f'<{len(self.key)} bytes>' if self.key is not None else None}, "
                f"metadata_size={self.metadata_size})")


@dataclass(frozen=True, slots=True)
class CloseRequest:
    key_stream_id: bytes


@dataclass(frozen=True, slots=True)
class CloseResponse:
    status: int


Message = (OpenConnectRequest | OpenConnectResponse | GetKeyRequest | GetKeyResponse
           | CloseRequest | CloseResponse)

# Statuses whose OPEN_CONNECT response carries QoS and key_stream_ID. The
# reference sends them with 0 and 7 (server.py:255-257) and its client reads
# them only then (client.py:237); qkdgate kme-sim also answers 1 (peer not
# connected yet) in the long form. Other statuses travel alone.
OPEN_LONG = frozenset({0, 1, 7})
OPEN_LONG_REQUIRED = frozenset({0, 7})


# ------------------------------------------------------------ encoding

def _u32(v: int, what: str) -> bytes:
    if not isinstance(v, int) or isinstance(v, bool) or not 0 <= v < 2**32:
        raise LocalProtocolError(f"ETSI 004 binary: {what} must be an unsigned 32-bit integer")
    return U32.pack(v)


def _ksid(v: bytes) -> bytes:
    if not isinstance(v, bytes) or len(v) != KSID_LEN:
        raise LocalProtocolError("ETSI 004 binary: key_stream_ID must be 16 bytes")
    return v


def _uri(v: str) -> bytes:
    raw = v.encode("utf-8")
    if b"\x00" in raw or len(raw) > MAX_URI:
        raise LocalProtocolError("ETSI 004 binary: URI with NUL or too long")
    return raw + b"\x00"


def encode_qos(q: QoS) -> bytes:
    """7 x uint32 in the order Key_chunk_size, Max_bps, Min_bps, Jitter,
    Priority, Timeout, TTL (client.py:215-224), then the MIME type padded
    with NUL to 256 bytes (client.py:225)."""
    ints = [q.key_chunk_size, q.max_bps, q.min_bps, q.jitter, q.priority, q.timeout, q.ttl]
    for v in ints:
        _u32(v, "QoS field")
    mime = q.metadata_mimetype.encode("utf-8")
    if len(mime) >= MIME_LEN or b"\x00" in mime:
        raise LocalProtocolError("ETSI 004 binary: metadata MIME type too long")
    return QOS_INTS.pack(*ints) + mime.ljust(MIME_LEN, b"\x00")


def _payload(msg: Message) -> tuple[ServiceType, bytes]:
    if isinstance(msg, OpenConnectRequest):
        return ServiceType.OPEN_CONNECT_REQUEST, (_uri(msg.source) + _uri(msg.destination)
                                                  + encode_qos(msg.qos) + _ksid(msg.key_stream_id))
    if isinstance(msg, OpenConnectResponse):
        body = _u32(msg.status, "status")
        if (msg.qos is None) != (msg.key_stream_id is None) \
                or (msg.status in OPEN_LONG_REQUIRED and msg.qos is None):
            raise LocalProtocolError(f"ETSI 004 binary: status {msg.status} needs QoS "
                                     "and key_stream_ID")
        if msg.qos is not None and msg.key_stream_id is not None:
            body += encode_qos(msg.qos) + _ksid(msg.key_stream_id)
        return ServiceType.OPEN_CONNECT_RESPONSE, body
    if isinstance(msg, GetKeyRequest):
        return ServiceType.GET_KEY_REQUEST, (_ksid(msg.key_stream_id) + _u32(msg.index, "index")
                                             + _u32(msg.metadata_size, "metadata_size"))
    if isinstance(msg, GetKeyResponse):
        body = _u32(msg.status, "status")
        if msg.status == 0:
            if msg.index is None or msg.key is None:
                raise LocalProtocolError("ETSI 004 binary: status 0 needs index and key")
            meta = msg.metadata or b""
            body += (_u32(msg.index, "index") + _u32(len(msg.key), "key_chunk_size") + msg.key
                     + _u32(len(meta), "metadata_size") + meta)
        elif msg.status == 8:
            body += _u32(msg.metadata_size or 0, "metadata_size")
        return ServiceType.GET_KEY_RESPONSE, body
    if isinstance(msg, CloseRequest):
        return ServiceType.CLOSE_REQUEST, _ksid(msg.key_stream_id)
    if isinstance(msg, CloseResponse):
        return ServiceType.CLOSE_RESPONSE, _u32(msg.status, "status")
    raise LocalProtocolError(f"ETSI 004 binary: cannot encode {type(msg).__name__}")


def encode(msg: Message) -> bytes:
    """Header + payload of one message."""
    stype, body = _payload(msg)
    return HEADER.pack(VERSION, stype, len(body)) + body


# ------------------------------------------------------------ decoding

def parse_header(header: bytes, allowed: frozenset[ServiceType],
                 max_message: int = DEFAULT_MAX_MESSAGE) -> tuple[ServiceType, int]:
    """(service type, payload length) of an 8-byte header; the length is
    refused before any payload is read when it exceeds ``max_message``."""
    if len(header) != HEADER_LEN:
        raise FrameError("truncated", f"header of {len(header)} bytes, 8 needed")
    version, stype, length = HEADER.unpack(header)
    if version != VERSION:
        raise FrameError("version", f"version {'.'.join(str(b) for b in version)}, "
                         "1.0.1 expected")
    try:
        st = ServiceType(stype)
    except ValueError:
        raise FrameError("service_type", f"unknown service type 0x{stype:02x}") from None
    if st not in allowed:
        raise FrameError("service_type", f"service type {st.name} not expected here")
    if length > max_message:
        raise FrameError("too_long", f"payload of {length} bytes announced, at most "
                         f"{max_message} accepted")
    return st, length


def decode_qos(raw: bytes) -> QoS:
    if len(raw) != QOS_LEN:
        raise FrameError("qos", "QoS block of the wrong size")
    c, mx, mn, jit, prio, tmo, ttl = QOS_INTS.unpack_from(raw)
    mime_raw = raw[QOS_INTS.size:]
    nul = mime_raw.find(b"\x00")
    if nul < 0 or mime_raw[nul:].strip(b"\x00"):
        raise FrameError("mime", "metadata MIME type not NUL-terminated and NUL-padded")
    try:
        mime = mime_raw[:nul].decode("utf-8")
    except UnicodeDecodeError:
        raise FrameError("mime", "metadata MIME type is not UTF-8") from None
    return QoS(key_chunk_size=c, max_bps=mx, min_bps=mn, jitter=jit, priority=prio,
               timeout=tmo, ttl=ttl, metadata_mimetype=mime)


def _take_uri(p: bytes, at: int, what: str) -> tuple[str, int]:
    end = p.find(b"\x00", at, at + MAX_URI + 1)
    if end < 0:
        raise FrameError("uri", f"{what} URI without a terminating NUL (or longer than "
                         f"{MAX_URI} bytes)")
    try:
        return p[at:end].decode("utf-8"), end + 1
    except UnicodeDecodeError:
        raise FrameError("uri", f"{what} URI is not UTF-8") from None


def _exact(p: bytes, n: int, what: str) -> None:
    if len(p) != n:
        raise FrameError("length", f"{what} payload of {len(p)} bytes, {n} expected")


def decode_payload(stype: ServiceType, p: bytes, *,
                   max_metadata: int = DEFAULT_MAX_METADATA) -> Message:
    """The message of one payload whose header said ``stype``."""
    if stype is ServiceType.OPEN_CONNECT_REQUEST:
        src, at = _take_uri(p, 0, "source")
        dst, at = _take_uri(p, at, "destination")
        _exact(p[at:], QOS_LEN + KSID_LEN, "OPEN_CONNECT request after the URIs:")
        return OpenConnectRequest(src, dst, decode_qos(p[at:at + QOS_LEN]), p[at + QOS_LEN:])
    if stype is ServiceType.GET_KEY_REQUEST:
        _exact(p, KSID_LEN + 8, "GET_KEY request")
        index, msize = struct.unpack_from("!II", p, KSID_LEN)
        return GetKeyRequest(p[:KSID_LEN], index, msize)
    if stype is ServiceType.CLOSE_REQUEST:
        _exact(p, KSID_LEN, "CLOSE request")
        return CloseRequest(p)
    if len(p) < 4:
        raise FrameError("length", f"{stype.name} payload of {len(p)} bytes has no status")
    status = U32.unpack_from(p)[0]
    if stype is ServiceType.CLOSE_RESPONSE:
        _exact(p, 4, "CLOSE response")
        return CloseResponse(status)
    if stype is ServiceType.OPEN_CONNECT_RESPONSE:
        if len(p) == 4:
            if status in OPEN_LONG_REQUIRED:
                raise FrameError("length", f"OPEN_CONNECT status {status} without QoS and "
                                 "key_stream_ID")
            return OpenConnectResponse(status)
        _exact(p, 4 + QOS_LEN + KSID_LEN, "OPEN_CONNECT response")
        return OpenConnectResponse(status, decode_qos(p[4:4 + QOS_LEN]), p[4 + QOS_LEN:])
    # GET_KEY response
    if status == 8 and len(p) == 8:
        need = U32.unpack_from(p, 4)[0]
        if need > max_metadata:
            raise FrameError("metadata", f"KME needs {need} bytes of metadata, at most "
                             f"{max_metadata} accepted")
        return GetKeyResponse(8, metadata_size=need)
    if status != 0:
        _exact(p, 4, f"GET_KEY response with status {status}")
        return GetKeyResponse(status)
    if len(p) < 16:
        raise FrameError("length", "GET_KEY response too short for index and chunk size")
    index, chunk = struct.unpack_from("!II", p, 4)
    if len(p) < 16 + chunk:
        raise FrameError("length", f"key_chunk_size {chunk} beyond the payload")
    key = p[12:12 + chunk]
    msize = U32.unpack_from(p, 12 + chunk)[0]
    if msize > max_metadata:
        raise FrameError("metadata", f"metadata of {msize} bytes, at most {max_metadata} "
                         "accepted")
    _exact(p, 16 + chunk + msize, "GET_KEY response")
    return GetKeyResponse(0, index, key, p[16 + chunk:], msize)


def decode(frame: bytes, allowed: frozenset[ServiceType], *,
           max_message: int = DEFAULT_MAX_MESSAGE,
           max_metadata: int = DEFAULT_MAX_METADATA) -> Message:
    """One complete frame (header + payload, nothing after it)."""
    stype, length = parse_header(frame[:HEADER_LEN], allowed, max_message)
    if len(frame) - HEADER_LEN < length:
        raise FrameError("truncated", f"{len(frame) - HEADER_LEN} of {length} payload bytes")
    if len(frame) - HEADER_LEN > length:
        raise FrameError("length", "bytes after the announced payload")
    return decode_payload(stype, frame[HEADER_LEN:], max_metadata=max_metadata)


def ksid_bytes(key_stream_id: str | None) -> bytes:
    """A UUID string as the 16 key_stream_ID bytes (None: all zero)."""
    return NO_KSID if key_stream_id is None else uuid.UUID(key_stream_id).bytes


def ksid_str(raw: bytes) -> str | None:
    """The 16 bytes as a UUID string, None for all zero."""
    return None if raw == NO_KSID else str(uuid.UUID(bytes=raw))
