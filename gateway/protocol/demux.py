"""Many peers behind one source address: reassemble, then route by session.

Theory of operation (docs/protocol.md 3.3): the daemon has one UDP socket
for every peer. When a datagram's source address belongs to exactly one
configured peer, that peer's session gets the datagram as it is (it
reassembles itself). When several peers share the address -- several
gateways behind one NAT, or one process speaking for many peers, as the
issue 19 load generator does -- the address says nothing about the peer,
and a fragment alone carries no more than a message id. So a
:class:`Demux` reassembles per source address, with the same bounds as a
session (docs/protocol.md 3.2, scaled by the number of peers sharing the
address), and routes each complete message by what its header and body
say, never by trust:

1. the **receiver epoch** names one of our sessions (each session has its
   own epoch: the journal's counter hands out a fresh one per session).
   Every message but an INIT carries it (docs/protocol.md 4.1);
2. else, for an INIT (the only message that may reach us before the peer
   knows our epoch, or after our session was rebuilt with a new one): the
   one candidate whose **mac1** key verifies it (mac1 is keyed by the
   receiver's name and PSK, docs/protocol.md 5.1: it tells apart our
   sessions when we speak for several names) and that pins its
   **signer_id** (it tells apart the peers of one name). Not the sender
   epoch: two peers started in the same second may share one.

Routing authenticates nothing: the chosen session checks mac1, decodes,
and verifies signatures as always, so a misrouted or forged message is
dropped there like any other. A message that matches no candidate, or
more than one, is counted and dropped here.
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import Protocol

from qkdgate.errors import RemoteProtocolError
from qkdgate.gateway.protocol import messages as m
from qkdgate.gateway.protocol.constants import MAX_PARTIAL, REASSEMBLY_TIMEOUT
from qkdgate.gateway.protocol.fragment import Reassembler

__all__ = ["Candidate", "Demux"]


class Candidate(Protocol):
    """What routing reads from a session (PeerSession has all of it)."""

    @property
    def epoch(self) -> int: ...
    @property
    def max_message(self) -> int: ...
    def accepts_signer(self, key_id: bytes) -> bool: ...
    def accepts_mac1(self, raw: bytes) -> bool: ...


class Demux:
    """Reassembly and routing for one source address shared by ``n`` peers.
    Memory is bounded like ``n`` sessions': at most ``MAX_PARTIAL * n``
    messages in reassembly, each at most the largest candidate's limit."""

    def __init__(self, candidates: Sequence[Candidate], *,
                 timeout: float = REASSEMBLY_TIMEOUT) -> None:
        self._reasm = Reassembler(max_partial=MAX_PARTIAL * max(1, len(candidates)),
                                  timeout=timeout,
                                  max_message=max(c.max_message for c in candidates))
        self.stats = {"fragment": 0, "unrouted": 0, "ambiguous": 0}

    def feed(self, datagram: bytes, now: float, candidates: Sequence[Candidate]
             ) -> tuple[int, bytes] | None:
        """(index of the candidate, message) once a message is complete and
        routes to exactly one candidate; None otherwise (counted)."""
        try:
            raw = self._reasm.feed(datagram, now)
        except RemoteProtocolError:
            self.stats["fragment"] += 1
            return None
        if raw is None:
            return None
        index = self.route(raw, candidates)
        return None if index is None else (index, raw)

    def route(self, raw: bytes, candidates: Sequence[Candidate]) -> int | None:
        if len(raw) < m.HEADER.size:
            self.stats["unrouted"] += 1
            return None
        mtype, _, _, _, receiver, _ = m.HEADER.unpack_from(raw)
        hits = [i for i, c in enumerate(candidates) if receiver and c.epoch == receiver]
        if not hits and mtype == m.MsgType.INIT:
            try:
                signer: bytes = m.decode(raw)["signer_id"]
            except RemoteProtocolError:
                signer = b""
            hits = [i for i, c in enumerate(candidates)
                    if signer and c.accepts_signer(signer) and c.accepts_mac1(raw)]
        if len(hits) == 1:
            return hits[0]
        self.stats["ambiguous" if hits else "unrouted"] += 1
        return None

    def expire(self, now: float) -> None:
        self._reasm.expire(now)

    @property
    def buffered_bytes(self) -> int:
        return self._reasm.buffered_bytes
