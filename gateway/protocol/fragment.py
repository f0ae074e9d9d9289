"""UDP fragmentation and bounded reassembly of protocol messages.

Theory of operation: a qkdgate message (up to :data:`MAX_MESSAGE` bytes;
an ML-KEM-768 public key alone is 1,184 bytes and a hybrid ML-DSA-65
signature 3,373) is cut into datagrams of at most :data:`MAX_DATAGRAM`
bytes, which fits the IPv6 minimum MTU of 1,280 with IPv6 and UDP headers
(RFC 8200 5), so the protocol never relies on IP fragmentation (which
middleboxes drop and which the tunnels' own policies may not pass).

Datagram layout (all integers big-endian), see docs/protocol.md 3::

    0  2  magic "QG"
    2  1  version (1)
    3  1  flags (0; nonzero is rejected)
    4  4  message id (sender-chosen, new for every transmission)
    8  1  fragment index (0-based)
    9  1  fragment count (1..MAX_FRAGMENTS)
   10  2  total message length (1..MAX_MESSAGE)
   12  .. fragment payload: FRAGMENT_PAYLOAD bytes, the last one the rest

Fragments are not authenticated (the reassembled message is, by its MAC
and signatures), so reassembly is bounded and suspicious: at most
:data:`MAX_PARTIAL` messages in progress per peer (the oldest is evicted),
each discarded after :data:`REASSEMBLY_TIMEOUT` seconds, and a fragment
that disagrees with what is already held (other length, other bytes for an
index) discards the whole message. An attacker who can inject datagrams can
therefore make one transmission fail, which is no more than dropping it;
the sender's retransmission uses a new message id.
"""

from __future__ import annotations

import struct
from dataclasses import dataclass, field

from qkdgate.errors import LocalProtocolError, RemoteProtocolError
from qkdgate.gateway.protocol.constants import DATAGRAM_VERSION as VERSION
from qkdgate.gateway.protocol.constants import (
    MAX_DATAGRAM,
    MAX_MESSAGE,
    MAX_PARTIAL,
    REASSEMBLY_TIMEOUT,
)

__all__ = ["HEADER", "MAGIC", "MAX_DATAGRAM", "MAX_FRAGMENTS", "MAX_MESSAGE", "MAX_PARTIAL",
           "REASSEMBLY_TIMEOUT", "VERSION", "Reassembler", "fragment", "parse_header"]

MAGIC = b"QG"
HEADER = struct.Struct("!2sBBIBBH")
FRAGMENT_PAYLOAD = MAX_DATAGRAM - HEADER.size      # 1188
MAX_FRAGMENTS = -(-MAX_MESSAGE // FRAGMENT_PAYLOAD)  # 14


def fragment(message: bytes, message_id: int) -> list[bytes]:
    """Cut ``message`` into datagrams (our own bug if it is too large)."""
    if not 1 <= len(message) <= MAX_MESSAGE:
        raise LocalProtocolError(f"message of {len(message)} bytes cannot be sent "
                                 f"(1..{MAX_MESSAGE})")
    count = -(-len(message) // FRAGMENT_PAYLOAD)
    mid = message_id & 0xFFFFFFFF
    return [HEADER.pack(MAGIC, VERSION, 0, mid, i, count, len(message))
            + message[i * FRAGMENT_PAYLOAD:(i + 1) * FRAGMENT_PAYLOAD] for i in range(count)]


def parse_header(datagram: bytes) -> tuple[int, int, int, int, bytes]:
    """(message id, index, count, total length, payload) or RemoteProtocolError."""
    if len(datagram) > MAX_DATAGRAM:
        raise RemoteProtocolError(f"datagram of {len(datagram)} bytes exceeds {MAX_DATAGRAM}")
    if len(datagram) <= HEADER.size:
        raise RemoteProtocolError("datagram shorter than the fragment header")
    magic, version, flags, mid, index, count, total = HEADER.unpack_from(datagram)
    if magic != MAGIC:
        raise RemoteProtocolError("not a qkdgate datagram (bad magic)")
    if version != VERSION:
        raise RemoteProtocolError(f"unsupported datagram version {version}")
    if flags:
        raise RemoteProtocolError(f"reserved datagram flags set ({flags:#x})")
    if not 1 <= total <= MAX_MESSAGE:
        raise RemoteProtocolError(f"message length {total} out of range")
    if count != -(-total // FRAGMENT_PAYLOAD):
        raise RemoteProtocolError(f"fragment count {count} does not fit length {total}")
    if index >= count:
        raise RemoteProtocolError(f"fragment index {index} >= count {count}")
    payload = datagram[HEADER.size:]
    want = FRAGMENT_PAYLOAD if index < count - 1 else total - FRAGMENT_PAYLOAD * (count - 1)
    if len(payload) != want:
        raise RemoteProtocolError(f"fragment {index} carries {len(payload)} bytes, "
                                  f"expected {want}")
    return mid, index, count, total, bytes(payload)


@dataclass
class _Partial:
    total: int
    count: int
    started: float
    parts: dict[int, bytes] = field(default_factory=dict)


class Reassembler:
    """Per-peer reassembly with hard bounds (see module docstring)."""

    def __init__(self, *, max_partial: int = MAX_PARTIAL,
                 timeout: float = REASSEMBLY_TIMEOUT) -> None:
        self.max_partial, self.timeout = max_partial, timeout
        self._partial: dict[int, _Partial] = {}
        self.evicted = 0

    def feed(self, datagram: bytes, now: float) -> bytes | None:
        """The complete message once the last fragment arrives, else None.
        Malformed datagrams raise RemoteProtocolError (nothing is kept)."""
        mid, index, count, total, payload = parse_header(datagram)
        self.expire(now)
        if count == 1:
            return payload
        part = self._partial.get(mid)
        if part is None:
            if len(self._partial) >= self.max_partial:
                oldest = min(self._partial, key=lambda k: self._partial[k].started)
                del self._partial[oldest]
                self.evicted += 1
            part = self._partial[mid] = _Partial(total, count, now)
        elif part.total != total or part.count != count:
            del self._partial[mid]
            raise RemoteProtocolError(f"fragments of message {mid:#x} disagree on its length")
        held = part.parts.get(index)
        if held is not None:
            if held != payload:
                del self._partial[mid]
                raise RemoteProtocolError(f"conflicting copies of fragment {index} "
                                          f"of message {mid:#x}")
            return None  # duplicate
        part.parts[index] = payload
        if len(part.parts) < count:
            return None
        del self._partial[mid]
        return b"".join(part.parts[i] for i in range(count))

    def expire(self, now: float) -> None:
        for mid in [m for m, p in self._partial.items() if now - p.started > self.timeout]:
            del self._partial[mid]

    def next_expiry(self) -> float | None:
        if not self._partial:
            return None
        return min(p.started for p in self._partial.values()) + self.timeout

    @property
    def pending(self) -> int:
        return len(self._partial)

    @property
    def buffered_bytes(self) -> int:
        return sum(len(b) for p in self._partial.values() for b in p.parts.values())
