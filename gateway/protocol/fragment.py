"""UDP fragmentation and bounded reassembly of protocol messages.

Theory of operation: a qkdgate message (up to :data:`MAX_MESSAGE` bytes;
an ML-KEM-768 public key alone is 1,184 bytes and a hybrid ML-DSA-65
signature 3,373) is cut into datagrams of at most :data:`MAX_DATAGRAM`
bytes, which fits the IPv6 minimum MTU of 1,280 with IPv6 and UDP headers
(RFC 8200 5), so the protocol never relies on IP fragmentation (which
middleboxes drop and which the tunnels' own policies may not pass).

Datagram layout (all integers big-endian), see docs/protocol.md 3::

    0  2  magic "QG"
    2  1  version (2)
    3  1  flags (0; nonzero is rejected)
    4  4  message id (sender-chosen, new for every transmission)
    8  2  fragment index (0-based)
   10  2  fragment count (1..MAX_FRAGMENTS)
   12  4  total message length (1..MAX_MESSAGE)
   16  .. fragment payload: FRAGMENT_PAYLOAD bytes, the last one the rest

Fragments are not authenticated (the reassembled message is, by its MAC
and signatures), so reassembly is bounded and suspicious: a message longer
than the receiving session can accept (``max_message``: what a message
listing that peer's own tunnels can need, :func:`message_limit`) is refused
on its first fragment (:class:`MessageTooLarge`), at most
:data:`MAX_PARTIAL` messages are in progress per peer (the oldest is
evicted), each discarded after :data:`REASSEMBLY_TIMEOUT` seconds, and a
fragment that disagrees with what is already held (other length, other
bytes for an index) discards the whole message. Memory per peer is thus at
most ``MAX_PARTIAL * max_message`` bytes, whatever is sent. An attacker who
can inject datagrams can therefore make one transmission fail, which is no
more than dropping it; the sender's retransmission uses a new message id.
"""

from __future__ import annotations

import struct
from collections.abc import Iterable
from dataclasses import dataclass, field

from qkdgate.errors import LocalProtocolError, RemoteProtocolError
from qkdgate.gateway.protocol.constants import DATAGRAM_VERSION as VERSION
from qkdgate.gateway.protocol.constants import (
    MAX_DATAGRAM,
    MAX_MESSAGE,
    MAX_PARTIAL,
    MESSAGE_FIXED,
    MESSAGE_SLACK,
    REASSEMBLY_TIMEOUT,
)

__all__ = ["HEADER", "MAGIC", "MAX_DATAGRAM", "MAX_FRAGMENTS", "MAX_MESSAGE", "MAX_PARTIAL",
           "REASSEMBLY_TIMEOUT", "VERSION", "MessageTooLarge", "Reassembler", "fragment",
           "message_limit", "parse_header"]

MAGIC = b"QG"
HEADER = struct.Struct("!2sBBIHHI")
FRAGMENT_PAYLOAD = MAX_DATAGRAM - HEADER.size      # 1184
MAX_FRAGMENTS = -(-MAX_MESSAGE // FRAGMENT_PAYLOAD)  # 910


class MessageTooLarge(RemoteProtocolError):
    """A fragment announces a message longer than this peer may send
    (docs/protocol.md 3.2): refused before anything is buffered."""


def message_limit(tunnel_ids: Iterable[str]) -> int:
    """The longest message a session keying these tunnels accepts: the fixed
    part, one ``spis`` entry per tunnel (docs/protocol.md 4.2: a valid INIT
    or RESP lists exactly our tunnels) and MESSAGE_SLACK, so that a peer
    whose configuration lists a few more tunnels is still decoded and told
    why it is refused (ABORT POLICY) instead of timing out."""
    entries = sum(1 + len(t.encode()) + 5 for t in tunnel_ids)
    return min(MAX_MESSAGE, MESSAGE_FIXED + MESSAGE_SLACK + entries)


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
                 timeout: float = REASSEMBLY_TIMEOUT, max_message: int = MAX_MESSAGE) -> None:
        if not 1 <= max_message <= MAX_MESSAGE:
            raise LocalProtocolError(f"reassembly limit {max_message} outside 1..{MAX_MESSAGE}")
        self.max_partial, self.timeout, self.max_message = max_partial, timeout, max_message
        self._partial: dict[int, _Partial] = {}
        self.evicted = 0

    def feed(self, datagram: bytes, now: float) -> bytes | None:
        """The complete message once the last fragment arrives, else None.
        Malformed datagrams raise RemoteProtocolError (nothing is kept); one
        announcing a message above ``max_message`` raises MessageTooLarge."""
        mid, index, count, total, payload = parse_header(datagram)
        if total > self.max_message:
            raise MessageTooLarge(f"message of {total} bytes exceeds this peer's limit of "
                                  f"{self.max_message}")
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
