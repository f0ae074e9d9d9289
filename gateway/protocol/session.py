"""PeerSession: the sans-IO state machine of the qkdgate peer protocol.

SKELETON: the method signatures are the contract with the daemon; the
behaviour lands in the following commits (see docs/protocol.md).
"""

from __future__ import annotations

import os
from collections import deque
from typing import Callable, Sequence

from qkdgate.errors import KeySourceError
from qkdgate.gateway.protocol.config import SessionConfig, TunnelRef
from qkdgate.gateway.protocol.events import Event

__all__ = ["PeerSession", "SessionConfig", "TunnelRef"]


class PeerSession:
    def __init__(self, config: SessionConfig, *, identity: object,
                 peer_identities: Sequence[object], rng: Callable[[int], bytes] = os.urandom,
                 now: float, allocate_spi: Callable[[str], int]) -> None:
        config.validate()
        self.config = config
        self._events: deque[Event] = deque()
        self._out: list[bytes] = []

    def receive_datagram(self, data: bytes, now: float) -> None:
        """Feed one UDP payload from the peer. Never raises on peer garbage."""

    def handle_timer(self, now: float) -> None:
        """Call when ``get_timer()`` is due."""

    def get_timer(self) -> float | None:
        return None

    def datagrams_to_send(self, now: float) -> list[bytes]:
        out, self._out = self._out, []
        return out

    def next_event(self) -> Event | None:
        return self._events.popleft() if self._events else None

    def initiate_rekey(self, now: float, reason: str) -> None:
        """Start a fresh exchange now (timer, volume, PN exhaustion, operator)."""

    def provide_qkd_keys(self, request_id: int, keys: list, now: float) -> None:
        """Answer a NeedQkdKeys event."""

    def qkd_failed(self, request_id: int, error: KeySourceError, now: float) -> None:
        """Answer a NeedQkdKeys event with the key source's error."""

    def installed(self, request_id: int, now: float) -> None:
        """Answer an InstallInbound / InstallOutbound event: done."""

    def install_failed(self, request_id: int, error: Exception, now: float) -> None:
        """Answer an InstallInbound / InstallOutbound event: the kernel refused."""
