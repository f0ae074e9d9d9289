"""The UDP layer: demultiplexing by peer address, pumping a session, timers,
and isolation of a misbehaving session from the event loop."""

import asyncio

from qkdgate.gateway.daemon.udp import GatewayEndpoint, PeerDriver, open_endpoint


class Session:
    def __init__(self):
        self.rx = []
        self.out = []
        self.events = []
        self.timer = None
        self.timers_fired = 0
        self.raise_on_rx = False

    def receive_datagram(self, data, now):
        if self.raise_on_rx:
            raise RuntimeError("bug in the core")
        self.rx.append(data)
        if data == b"ping":
            self.out.append(b"pong")
            self.events.append("answered")

    def handle_timer(self, now):
        self.timers_fired += 1
        self.timer = None
        self.out.append(b"retransmit")

    def get_timer(self):
        return self.timer

    def datagrams_to_send(self, now):
        out, self.out = self.out, []
        return out

    def next_event(self):
        return self.events.pop(0) if self.events else None


def ignore(event):
    pass


def unexpected(what, exc):
    raise AssertionError(f"session failed in {what}: {exc!r}")


class Transport:
    def __init__(self):
        self.sent = []

    def sendto(self, data, addr):
        self.sent.append((data, addr))

    def is_closing(self):
        return False

    def get_extra_info(self, name, default=None):
        return default


async def test_pump_sends_delivers_events_and_handles_reentrant_answers():
    s = Session()
    seen = []

    def on_event(ev):
        seen.append(ev)
        # answering synchronously pumps again: must not recurse or lose output
        d.call("answer", lambda session: session.out.append(b"answer"))

    loop = asyncio.get_running_loop()
    d = PeerDriver("gw-b", s, ("192.0.2.2", 4600), clock=loop.time, on_event=on_event,
                   on_failure=unexpected)
    d.transport = Transport()
    d.datagram_received(b"ping")
    assert seen == ["answered"]
    assert [x for x, _ in d.transport.sent] == [b"pong", b"answer"]
    assert d.stats["rx"] == 1 and d.stats["tx"] == 2


async def test_timer_is_armed_and_fires():
    s = Session()
    loop = asyncio.get_running_loop()
    d = PeerDriver("gw-b", s, ("192.0.2.2", 4600), clock=loop.time, on_event=ignore, on_failure=unexpected)
    d.transport = Transport()
    s.timer = loop.time() + 0.05
    d.pump()
    await asyncio.sleep(0.15)
    assert s.timers_fired == 1 and (b"retransmit", ("192.0.2.2", 4600)) in d.transport.sent
    d.close()


async def test_a_raising_session_is_never_used_again_until_replaced():
    # A session raising is a bug that may have left it half-changed: the
    # driver stops calling it, reports once, and pumps the replacement.
    s = Session()
    s.raise_on_rx = True
    failures = []
    loop = asyncio.get_running_loop()
    d = PeerDriver("gw-b", s, ("192.0.2.2", 4600), clock=loop.time, on_event=ignore,
                   on_failure=lambda what, exc: failures.append((what, type(exc).__name__)))
    d.transport = Transport()
    d.datagram_received(b"x")          # reported, not raised
    assert failures == [("receive_datagram", "RuntimeError")] and d.failed
    s.raise_on_rx = False
    d.datagram_received(b"ping")       # the failed session is not touched again
    assert s.rx == [] and d.transport.sent == [] and len(failures) == 1
    fresh = Session()
    fresh.out.append(b"INIT")
    d.replace_session(fresh)
    assert not d.failed and [x for x, _ in d.transport.sent] == [b"INIT"]
    d.datagram_received(b"ping")
    assert fresh.rx == [b"ping"] and s.rx == []


async def test_an_event_handler_bug_fails_the_session_too():
    s = Session()
    failures = []

    def on_event(ev):
        raise KeyError(ev)

    loop = asyncio.get_running_loop()
    d = PeerDriver("gw-b", s, ("192.0.2.2", 4600), clock=loop.time, on_event=on_event,
                   on_failure=lambda what, exc: failures.append(what))
    d.transport = Transport()
    d.datagram_received(b"ping")
    assert failures == ["handling str"] and d.failed


async def test_endpoint_routes_by_address_and_drops_strangers():
    loop = asyncio.get_running_loop()
    ep = GatewayEndpoint()
    sb, sc = Session(), Session()
    db = PeerDriver("gw-b", sb, ("192.0.2.2", 4600), clock=loop.time, on_event=ignore, on_failure=unexpected)
    dc = PeerDriver("gw-c", sc, ("2001:db8::c", 4600), clock=loop.time, on_event=ignore, on_failure=unexpected)
    ep.add(db)
    ep.add(dc)
    ep.connection_made(Transport())
    ep.datagram_received(b"1", ("192.0.2.2", 4600))
    ep.datagram_received(b"2", ("::ffff:192.0.2.2", 4600))     # dual-stack socket
    ep.datagram_received(b"3", ("192.0.2.2", 61000))           # NAT rewrote the port
    ep.datagram_received(b"4", ("2001:db8:0:0::c", 4600))      # other spelling of the address
    ep.datagram_received(b"5", ("198.51.100.9", 4600))         # not a peer
    assert sb.rx == [b"1", b"2", b"3"] and sc.rx == [b"4"] and ep.unknown == 1


async def test_two_endpoints_talk_over_loopback():
    loop = asyncio.get_running_loop()
    ta, ea = await open_endpoint("127.0.0.1", 0)
    tb, eb = await open_endpoint("127.0.0.1", 0)
    pa, pb = ta.get_extra_info("sockname")[1], tb.get_extra_info("sockname")[1]
    sa, sb = Session(), Session()
    da = PeerDriver("b", sa, ("127.0.0.1", pb), clock=loop.time, on_event=ignore, on_failure=unexpected)
    db = PeerDriver("a", sb, ("127.0.0.1", pa), clock=loop.time, on_event=ignore, on_failure=unexpected)
    ea.add(da)
    eb.add(db)
    try:
        sa.out.append(b"ping")
        da.pump()
        for _ in range(50):
            if sa.rx:
                break
            await asyncio.sleep(0.01)
        assert sb.rx == [b"ping"] and sa.rx == [b"pong"]
    finally:
        ta.close()
        tb.close()


async def test_dual_stack_socket_reaches_ipv4_and_ipv6_peers():
    loop = asyncio.get_running_loop()
    t6, e6 = await open_endpoint("::", 0)
    t4, e4 = await open_endpoint("127.0.0.1", 0)
    t66, e66 = await open_endpoint("::1", 0)
    p6 = t6.get_extra_info("sockname")[1]
    try:
        s_dual_to_v4, s_dual_to_v6 = Session(), Session()
        s_v4, s_v6 = Session(), Session()
        d1 = PeerDriver("v4", s_dual_to_v4, ("127.0.0.1", t4.get_extra_info("sockname")[1]),
                        clock=loop.time, on_event=ignore, on_failure=unexpected)
        d2 = PeerDriver("v6", s_dual_to_v6, ("::1", t66.get_extra_info("sockname")[1]),
                        clock=loop.time, on_event=ignore, on_failure=unexpected)
        e6.add(d1)
        e6.add(d2)
        assert d1.send_address[0] == "::ffff:127.0.0.1" and d2.send_address[0] == "::1"
        e4.add(PeerDriver("dual", s_v4, ("127.0.0.1", p6), clock=loop.time,
                          on_event=ignore, on_failure=unexpected))
        e66.add(PeerDriver("dual", s_v6, ("::1", p6), clock=loop.time, on_event=ignore, on_failure=unexpected))
        s_dual_to_v4.out.append(b"ping")
        s_dual_to_v6.out.append(b"ping")
        d1.pump()
        d2.pump()
        for _ in range(50):
            if s_dual_to_v4.rx and s_dual_to_v6.rx:
                break
            await asyncio.sleep(0.01)
        assert s_v4.rx == [b"ping"] and s_v6.rx == [b"ping"]
        assert s_dual_to_v4.rx == [b"pong"] and s_dual_to_v6.rx == [b"pong"]
    finally:
        for t in (t6, t4, t66):
            t.close()


async def test_a_second_bind_of_the_peer_port_is_refused():
    # Issue 17 finding 2: with SO_REUSEADDR any local user could bind the
    # same UDP port and steal the peer protocol's datagrams.
    import errno
    import socket

    import pytest

    transport, _ = await open_endpoint("127.0.0.1", 0)
    try:
        port = transport.get_extra_info("sockname")[1]
        for reuse in (False, True):    # even a thief asking for SO_REUSEADDR itself
            thief = socket.socket(socket.AF_INET, socket.SOCK_DGRAM)
            try:
                if reuse:
                    thief.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
                with pytest.raises(OSError) as err:
                    thief.bind(("127.0.0.1", port))
                assert err.value.errno == errno.EADDRINUSE
                with pytest.raises(OSError) as err:
                    thief.bind(("0.0.0.0", port))
                assert err.value.errno == errno.EADDRINUSE
            finally:
                thief.close()
    finally:
        transport.close()


async def test_the_shared_socket_has_room_for_every_peers_burst():
    """Issue 19: 100 peers' RESPs at once overflowed the default receive
    buffer (2,352 drops, exchanges timing out). With CAP_NET_ADMIN the
    daemon forces RCVBUF; without it, it asks for as much as rmem_max allows."""
    import os
    import socket

    from qkdgate.gateway.daemon.udp import RCVBUF
    t, _ep = await open_endpoint("127.0.0.1", 0)
    try:
        got = t.get_extra_info("socket").getsockopt(socket.SOL_SOCKET, socket.SO_RCVBUF)
    finally:
        t.close()
    if os.geteuid() == 0:
        assert got >= RCVBUF             # the kernel doubles it for bookkeeping
    else:
        with open("/proc/sys/net/core/rmem_max") as f:
            assert got >= min(RCVBUF, int(f.read()))
