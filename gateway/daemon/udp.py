"""The asyncio I/O layer under the sans-IO peer protocol.

Theory of operation (aioquic's ``asyncio/protocol.py`` in miniature): one
UDP socket per gateway carries the peer protocol for every peer.
:class:`GatewayEndpoint` (an :class:`asyncio.DatagramProtocol`) hands each
datagram to the :class:`PeerDriver` of the peer it came from; a datagram
from an address no peer uses is counted and dropped before any parsing.
When several configured peers share the source address (behind one NAT, or
one process speaking for many peers), the address does not say which: the
endpoint reassembles the message itself and routes it by the session it
names -- its receiver epoch, or for an INIT its signer
(:class:`~qkdgate.gateway.protocol.demux.Demux`, docs/protocol.md 3.3).
Replies always go to the peer's configured address, never to a datagram's
source.
A :class:`PeerDriver` owns one
:class:`~qkdgate.gateway.protocol.session.PeerSession` and after every input
(datagram, timer, answer to an event) *pumps* it: send what
``datagrams_to_send`` returns, hand every ``next_event`` to the daemon's
handler, and re-arm one ``call_at`` timer at ``get_timer``. The session
never sees the socket or the clock; the driver never interprets bytes.

Peer garbage never raises out of a session (it becomes a
``ProtocolViolation``). Anything that does raise -- from the session, or from
the daemon's handler of one of its events -- is a bug that may have left the
session half-changed: :meth:`PeerDriver._run` is the one choke point that
catches it, stops using that session, and tells ``on_failure``, which fails
the peer's tunnels closed and hands over a fresh session
(:meth:`PeerDriver.replace_session`). One peer's bug never stops the event
loop for the others, and never continues on a half-changed object.
"""

from __future__ import annotations

import asyncio
import ipaddress
import logging
import socket
from collections.abc import Callable, Sequence
from typing import Protocol, TypeVar

from qkdgate.gateway.protocol.demux import Candidate, Demux
from qkdgate.interfaces import QkdKey
from qkdgate.tunnels.netlink import set_rcvbuf

log = logging.getLogger("qkdgate.udp")

MAX_DATAGRAM = 65535
# The receive buffer of the one socket every peer's datagrams share. A rekey
# of many peers at once answers with a burst of every peer's RESP (4-5
# fragments of ~1.3 KB each with ML-KEM-768 + ML-DSA-65) while the loop is
# busy with the first ones: Linux's default (net.core.rmem_default, 208 KiB)
# dropped 2,352 datagrams of 100 peers' rekey in the issue 19 load test and
# retransmission did not catch up within the exchange timeout. Set with
# SO_RCVBUFFORCE (CAP_NET_ADMIN, which the daemon has), else SO_RCVBUF up to
# net.core.rmem_max (set_rcvbuf). Memory is only used by datagrams actually queued.
RCVBUF = 8 << 20
T = TypeVar("T")


class Session(Candidate, Protocol):
    """What the daemon calls on a sans-IO
    :class:`~qkdgate.gateway.protocol.session.PeerSession` (routing's
    :class:`Candidate` reads, plus the calls below)."""

    def receive_datagram(self, data: bytes, now: float) -> None: ...
    def receive_message(self, raw: bytes, now: float) -> None: ...
    def handle_timer(self, now: float) -> None: ...
    def get_timer(self) -> float | None: ...
    def datagrams_to_send(self, now: float) -> Sequence[bytes]: ...
    def next_event(self) -> object | None: ...
    def initiate_rekey(self, now: float, reason: str) -> None: ...
    def provide_qkd_keys(self, request_id: int, keys: Sequence[QkdKey], now: float,
                         sources: Sequence[int] = ()) -> None: ...
    def qkd_failed(self, request_id: int, error: Exception, now: float) -> None: ...
    def installed(self, request_id: int, now: float) -> None: ...
    def install_failed(self, request_id: int, error: Exception, now: float) -> None: ...


class PeerDriver:
    """Drives one PeerSession: ``on_event(event)`` gets its events,
    ``on_failure(what, exc)`` hears that it (or the handling of one of its
    events) raised, and is expected to :meth:`replace_session`."""

    def __init__(self, name: str, session: Session, address: tuple[str, int], *,
                 clock: Callable[[], float], on_event: Callable[[object], None],
                 on_failure: Callable[[str, BaseException], None],
                 loop: asyncio.AbstractEventLoop | None = None) -> None:
        self.name = name
        self.session = session
        self.address = address
        self.clock = clock
        self.on_event = on_event
        self.on_failure = on_failure
        self.loop = loop or asyncio.get_running_loop()
        self.transport: asyncio.DatagramTransport | None = None
        self.send_address = address     # IPv4 peers become ::ffff:a.b.c.d on a dual-stack socket
        self._timer: asyncio.TimerHandle | None = None
        self._timer_at: float | None = None
        self._pumping = False
        self._again = False
        self.stats = {"rx": 0, "tx": 0, "rx_bytes": 0, "tx_bytes": 0, "send_errors": 0}
        self.closed = False
        self.failed = False             # the session raised; nothing reaches it until replaced

    # ---- inputs ---------------------------------------------------------
    def datagram_received(self, data: bytes) -> None:
        self.stats["rx"] += 1
        self.stats["rx_bytes"] += len(data)
        self._run("receive_datagram", lambda s: s.receive_datagram(data, self.clock()))
        self.pump()

    def message_received(self, raw: bytes) -> None:
        """A whole message the endpoint reassembled and routed here."""
        self.stats["rx"] += 1
        self.stats["rx_bytes"] += len(raw)
        self._run("receive_message", lambda s: s.receive_message(raw, self.clock()))
        self.pump()

    def _on_timer(self) -> None:
        self._timer = None
        self._timer_at = None
        self._run("handle_timer", lambda s: s.handle_timer(self.clock()))
        self.pump()

    def call(self, what: str, fn: Callable[[Session], object]) -> None:
        """Run an answer to an event (``installed``, ``provide_qkd_keys``...)
        on the current session and pump."""
        self._run(what, fn)
        self.pump()

    def replace_session(self, session: Session) -> None:
        """A fresh session after a failure; pumped at once (it may send INIT)."""
        self.session = session
        self.failed = False
        self._timer_at = None
        if self._timer is not None:
            self._timer.cancel()
            self._timer = None
        self.pump()

    def _run(self, what: str, fn: Callable[[Session], T]) -> T | None:
        """The one choke point where the session is called. Peer garbage
        never raises out of a session (it becomes a ProtocolViolation), so
        an exception here is a bug: the session may be half-changed and is
        never used again (h11's rule); ``on_failure`` rebuilds it."""
        if self.closed or self.failed:
            return None
        try:
            return fn(self.session)
        except Exception as exc:  # noqa: BLE001 - a bug: fail closed, report, rebuild
            self._fail(what, exc)
            return None

    def _fail(self, what: str, exc: BaseException) -> None:
        self.failed = True
        if self._timer is not None:
            self._timer.cancel()
            self._timer = None
        self._timer_at = None
        self.on_failure(what, exc)

    # ---- outputs --------------------------------------------------------
    def pump(self) -> None:
        """Flush datagrams, deliver events, re-arm the timer. Re-entrant
        calls (an event handler answering synchronously) loop here instead
        of recursing."""
        if self.closed or self.failed:
            return
        if self._pumping:
            self._again = True
            return
        self._pumping = True
        try:
            while not (self.closed or self.failed):
                self._again = False
                self._flush()
                while not (self.closed or self.failed):
                    event = self._run("next_event", lambda s: s.next_event())
                    if event is None:
                        break
                    try:
                        self.on_event(event)
                    except Exception as exc:  # noqa: BLE001 - our handler's bug: as above
                        self._fail(f"handling {type(event).__name__}", exc)
                        break
                    self._flush()
                if not self._again:
                    break
            self._arm()
        finally:
            self._pumping = False

    def _flush(self) -> None:
        datagrams = self._run("datagrams_to_send", lambda s: s.datagrams_to_send(self.clock()))
        for dgram in datagrams or ():
            if self.transport is None or self.transport.is_closing():
                break
            try:
                self.transport.sendto(dgram, self.send_address)
                self.stats["tx"] += 1
                self.stats["tx_bytes"] += len(dgram)
            except OSError as exc:    # e.g. ENETUNREACH: the retransmit timer tries again
                self.stats["send_errors"] += 1
                log.warning("peer %s: send failed: %s", self.name, exc, extra={"peer": self.name})

    def _arm(self) -> None:
        if not self._usable():
            return
        at = self._run("get_timer", lambda s: s.get_timer())
        if not self._usable():
            return
        if at == self._timer_at and (at is None or self._timer is not None):
            return
        if self._timer is not None:
            self._timer.cancel()
            self._timer = None
        self._timer_at = at
        if at is not None:
            delay = max(0.0, at - self.clock())
            self._timer = self.loop.call_later(delay, self._on_timer)

    def _usable(self) -> bool:
        """Neither closed nor failed (a call can change it: read it afresh)."""
        return not (self.closed or self.failed)

    def close(self) -> None:
        self.closed = True
        if self._timer is not None:
            self._timer.cancel()
            self._timer = None


def _norm(host: str) -> str:
    try:
        ip = ipaddress.ip_address(host.split("%", 1)[0])
    except ValueError:
        return host
    if isinstance(ip, ipaddress.IPv6Address) and ip.ipv4_mapped is not None:
        return str(ip.ipv4_mapped)   # a dual-stack socket reports IPv4 peers as ::ffff:a.b.c.d
    return str(ip)


class GatewayEndpoint(asyncio.DatagramProtocol):
    """The one UDP socket; routes datagrams to drivers by source address,
    and by session when several peers share that address."""

    def __init__(self) -> None:
        self.by_addr: dict[tuple[str, int], list[PeerDriver]] = {}
        self.by_host: dict[str, list[PeerDriver]] = {}
        self.transport: asyncio.DatagramTransport | None = None
        self.unknown = 0
        self._demux: dict[tuple[str, int], tuple[tuple[PeerDriver, ...], Demux]] = {}

    def add(self, driver: PeerDriver) -> None:
        host, port = _norm(driver.address[0]), driver.address[1]
        self.by_addr.setdefault((host, port), []).append(driver)
        self.by_host.setdefault(host, []).append(driver)
        self._demux.clear()
        self._attach(driver)

    def _attach(self, driver: PeerDriver) -> None:
        driver.transport = self.transport
        sock = self.transport.get_extra_info("socket") if self.transport is not None else None
        host, port = driver.address
        if sock is not None and sock.family == socket.AF_INET6 and ":" not in host:
            driver.send_address = ("::ffff:" + host, port)   # RFC 4291 2.5.5.2
        else:
            driver.send_address = (host, port)

    def remove(self, driver: PeerDriver) -> None:
        host, port = _norm(driver.address[0]), driver.address[1]
        for drivers in (self.by_addr.get((host, port), []), self.by_host.get(host, [])):
            if driver in drivers:
                drivers.remove(driver)
        self._demux.clear()

    def connection_made(self, transport: asyncio.BaseTransport) -> None:
        self.transport = transport  # type: ignore[assignment]
        for drivers in self.by_addr.values():
            for d in drivers:
                self._attach(d)

    def datagram_received(self, data: bytes, addr: tuple[str, int]) -> None:
        host, port = _norm(addr[0]), addr[1]
        # The peers configured at this address and port; else at this host,
        # for a NAT that changed the source port.
        drivers = self.by_addr.get((host, port)) or self.by_host.get(host, [])
        if len(drivers) == 1:
            drivers[0].datagram_received(data)
            return
        if not drivers:
            self.unknown += 1
            if self.unknown <= 10 or self.unknown % 1000 == 0:
                log.warning("dropped datagram from %s:%d: not a configured peer (%d so far)",
                            host, port, self.unknown)
            return
        self._shared(data, (host, port), drivers)

    def _shared(self, data: bytes, source: tuple[str, int], drivers: list[PeerDriver]) -> None:
        """Several peers share this source: reassemble here, route by session."""
        usable = tuple(d for d in drivers if not (d.closed or d.failed))
        if not usable:
            return
        entry = self._demux.get(source)
        if entry is None or entry[0] != usable:
            # a new set of sessions (one failed and was rebuilt): new routing state
            entry = self._demux[source] = (usable, Demux([d.session for d in usable]))
        routed = entry[1].feed(data, usable[0].clock(), [d.session for d in usable])
        if routed is not None:
            usable[routed[0]].message_received(routed[1])

    def demux_stats(self) -> dict[str, int]:
        """Messages from shared source addresses that were refused or could
        not be routed (per reason), summed over the sources."""
        total = {"fragment": 0, "unrouted": 0, "ambiguous": 0}
        for _, demux in self._demux.values():
            for k, v in demux.stats.items():
                total[k] += v
        return total

    def error_received(self, exc: Exception) -> None:
        # ICMP unreachable and friends: the protocol's retransmissions cope.
        log.debug("UDP error: %s", exc)


async def open_endpoint(host: str, port: int, *, bypass: Callable[[socket.socket], None] | None
                        = None) -> tuple[asyncio.DatagramTransport, GatewayEndpoint]:
    """Bind the gateway's UDP socket. ``bypass`` (IpsecBackend.bypass_socket)
    exempts it from IPsec policies so the control channel works while the
    tunnels are blocked."""
    loop = asyncio.get_running_loop()
    family = socket.AF_INET6 if ":" in host else socket.AF_INET
    sock = socket.socket(family, socket.SOCK_DGRAM)
    try:
        # No SO_REUSEADDR (or SO_REUSEPORT): on Linux it lets any local user
        # bind the same UDP port too and receive the peer protocol's
        # datagrams (socket(7); issue 17 finding 2). A second bind must fail
        # with EADDRINUSE.
        if family == socket.AF_INET6 and host in ("::", "::0"):
            sock.setsockopt(socket.IPPROTO_IPV6, socket.IPV6_V6ONLY, 0)
        set_rcvbuf(sock, RCVBUF)
        sock.bind((host, port))
        if bypass is not None:
            bypass(sock)
        sock.setblocking(False)
    except BaseException:
        sock.close()
        raise
    transport, proto = await loop.create_datagram_endpoint(GatewayEndpoint, sock=sock)
    return transport, proto
