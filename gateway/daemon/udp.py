"""The asyncio I/O layer under the sans-IO peer protocol.

Theory of operation (aioquic's ``asyncio/protocol.py`` in miniature): one
UDP socket per gateway carries the peer protocol for every peer.
:class:`GatewayEndpoint` (an :class:`asyncio.DatagramProtocol`) hands each
datagram to the :class:`PeerDriver` of the peer it came from; a datagram
from an address no peer uses is counted and dropped before any parsing.
A :class:`PeerDriver` owns one
:class:`~qkdgate.gateway.protocol.session.PeerSession` and after every input
(datagram, timer, answer to an event) *pumps* it: send what
``datagrams_to_send`` returns, hand every ``next_event`` to the daemon's
handler, and re-arm one ``call_at`` timer at ``get_timer``. The session
never sees the socket or the clock; the driver never interprets bytes.

Peer garbage can never raise out of here: the session promises not to
raise on input, and the driver still catches and logs anything that does
(a bug) so one peer cannot stop the event loop for the others.
"""

from __future__ import annotations

import asyncio
import ipaddress
import logging
import socket
from typing import Any, Callable

log = logging.getLogger("qkdgate.udp")

MAX_DATAGRAM = 65535


class PeerDriver:
    """Drives one PeerSession; ``on_event(driver, event)`` gets its events."""

    def __init__(self, name: str, session: Any, address: tuple[str, int], *,
                 clock: Callable[[], float], on_event: Callable[["PeerDriver", Any], None],
                 loop: asyncio.AbstractEventLoop | None = None) -> None:
        self.name = name
        self.session = session
        self.address = address
        self.clock = clock
        self.on_event = on_event
        self.loop = loop or asyncio.get_running_loop()
        self.transport: asyncio.DatagramTransport | None = None
        self.send_address = address     # IPv4 peers become ::ffff:a.b.c.d on a dual-stack socket
        self._timer: asyncio.TimerHandle | None = None
        self._timer_at: float | None = None
        self._pumping = False
        self._again = False
        self.stats = {"rx": 0, "tx": 0, "rx_bytes": 0, "tx_bytes": 0, "send_errors": 0}
        self.closed = False

    # ---- inputs ---------------------------------------------------------
    def datagram_received(self, data: bytes) -> None:
        self.stats["rx"] += 1
        self.stats["rx_bytes"] += len(data)
        self._guard("receive_datagram", lambda: self.session.receive_datagram(data, self.clock()))
        self.pump()

    def _on_timer(self) -> None:
        self._timer = None
        self._timer_at = None
        self._guard("handle_timer", lambda: self.session.handle_timer(self.clock()))
        self.pump()

    def call(self, what: str, fn: Callable[[], Any]) -> None:
        """Run an answer to an event (``installed``, ``provide_qkd_keys``...) and pump."""
        self._guard(what, fn)
        self.pump()

    def _guard(self, what: str, fn: Callable[[], Any]) -> None:
        if self.closed:
            return
        try:
            fn()
        except Exception:   # a bug in the core, not peer input: keep serving other peers
            log.exception("peer %s: session.%s raised", self.name, what,
                          extra={"peer": self.name})

    # ---- outputs --------------------------------------------------------
    def pump(self) -> None:
        """Flush datagrams, deliver events, re-arm the timer. Re-entrant
        calls (an event handler answering synchronously) loop here instead
        of recursing."""
        if self.closed:
            return
        if self._pumping:
            self._again = True
            return
        self._pumping = True
        try:
            while True:
                self._again = False
                self._flush()
                while True:
                    try:
                        event = self.session.next_event()
                    except Exception:
                        log.exception("peer %s: next_event raised", self.name)
                        event = None
                    if event is None:
                        break
                    try:
                        self.on_event(self, event)
                    except Exception:
                        log.exception("peer %s: handling %s failed", self.name,
                                      type(event).__name__, extra={"peer": self.name})
                    self._flush()
                if not self._again:
                    break
            self._arm()
        finally:
            self._pumping = False

    def _flush(self) -> None:
        try:
            datagrams = self.session.datagrams_to_send(self.clock())
        except Exception:
            log.exception("peer %s: datagrams_to_send raised", self.name)
            return
        for dgram in datagrams:
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
        try:
            at = self.session.get_timer()
        except Exception:
            log.exception("peer %s: get_timer raised", self.name)
            at = None
        if at == self._timer_at and (at is None or self._timer is not None):
            return
        if self._timer is not None:
            self._timer.cancel()
            self._timer = None
        self._timer_at = at
        if at is not None:
            delay = max(0.0, at - self.clock())
            self._timer = self.loop.call_later(delay, self._on_timer)

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
    """The one UDP socket; routes datagrams to drivers by source address."""

    def __init__(self) -> None:
        self.by_addr: dict[tuple[str, int], PeerDriver] = {}
        self.by_host: dict[str, list[PeerDriver]] = {}
        self.transport: asyncio.DatagramTransport | None = None
        self.unknown = 0

    def add(self, driver: PeerDriver) -> None:
        host, port = _norm(driver.address[0]), driver.address[1]
        self.by_addr[(host, port)] = driver
        self.by_host.setdefault(host, []).append(driver)
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
        self.by_addr.pop((host, port), None)
        if driver in self.by_host.get(host, []):
            self.by_host[host].remove(driver)

    def connection_made(self, transport: asyncio.BaseTransport) -> None:
        self.transport = transport  # type: ignore[assignment]
        for d in self.by_addr.values():
            self._attach(d)

    def datagram_received(self, data: bytes, addr: tuple[str, int]) -> None:
        host, port = _norm(addr[0]), addr[1]
        driver = self.by_addr.get((host, port))
        if driver is None:
            # A NAT may change the source port; a host with exactly one peer is unambiguous.
            same_host = self.by_host.get(host, [])
            driver = same_host[0] if len(same_host) == 1 else None
        if driver is None:
            self.unknown += 1
            if self.unknown <= 10 or self.unknown % 1000 == 0:
                log.warning("dropped datagram from %s:%d: not a configured peer (%d so far)",
                            host, port, self.unknown)
            return
        driver.datagram_received(data)

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
        sock.bind((host, port))
        if bypass is not None:
            bypass(sock)
        sock.setblocking(False)
    except BaseException:
        sock.close()
        raise
    transport, proto = await loop.create_datagram_endpoint(GatewayEndpoint, sock=sock)
    return transport, proto  # type: ignore[return-value]
