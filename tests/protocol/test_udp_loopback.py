"""The sans-IO core over real UDP sockets on loopback, with a minimal driver.

Not the daemon (that is gateway/daemon/daemon.py and its own tests): a thirty-line
asyncio driver that proves the datagrams, fragmentation and timers work on a
real socket and a real clock, with the QKD fake answering asynchronously.
"""

from __future__ import annotations

import asyncio
import contextlib
import time

from protocol_harness import identity, seeded

from qkdgate.gateway.protocol import events as E
from qkdgate.gateway.protocol.config import SessionConfig, TunnelRef
from qkdgate.testing.fakes import FakeQkdLink


class Driver(asyncio.DatagramProtocol):
    def __init__(self, session, source, peer_addr_box):
        self.session, self.source, self.peer = session, source, peer_addr_box
        self.transport = None
        self.events: list = []
        self.keys: dict = {}
        self.wake = asyncio.Event()

    def connection_made(self, transport):
        self.transport = transport

    def datagram_received(self, data, addr):
        if addr != self.peer[0]:
            return            # only the configured peer address feeds this session
        self.session.receive_datagram(data, time.monotonic())
        self.wake.set()

    def flush(self):
        for d in self.session.datagrams_to_send(time.monotonic()):
            self.transport.sendto(d, self.peer[0])

    async def run(self):
        while True:
            now = time.monotonic()
            t = self.session.get_timer()
            if t is not None and t <= now:
                self.session.handle_timer(now)
            while (ev := self.session.next_event()) is not None:
                self.events.append(ev)
                await self.handle(ev)
            self.flush()
            t = self.session.get_timer()
            self.wake.clear()
            with contextlib.suppress(TimeoutError):
                await asyncio.wait_for(self.wake.wait(),
                                       None if t is None else max(0.0, t - time.monotonic()))

    async def handle(self, ev):
        s, now = self.session, time.monotonic
        if isinstance(ev, E.NeedQkdKeys):
            if ev.role == "master":
                keys = await self.source.get_new_keys(ev.peer_sae_id, ev.number, ev.size_bits)
            else:
                keys = await self.source.get_keys_by_id(ev.peer_sae_id, ev.key_ids)
            s.provide_qkd_keys(ev.request_id, keys, now())
        elif isinstance(ev, (E.InstallInbound, E.InstallOutbound)):
            self.keys[(type(ev).__name__, ev.generation)] = ev.session.session_id
            s.installed(ev.request_id, now())


async def test_two_sessions_over_loopback_udp_establish_and_rekey():
    from qkdgate.gateway.protocol.session import PeerSession
    loop = asyncio.get_running_loop()
    link = FakeQkdLink("SAE-A", "SAE-B", rng=seeded(3))
    boxes = {"gw-a": [None], "gw-b": [None]}   # each gateway's own address, once bound
    drivers = {}
    for name, peer, role, sae, psae, s in (("gw-a", "gw-b", "master", "SAE-A", "SAE-B", 1),
                                          ("gw-b", "gw-a", "slave", "SAE-B", "SAE-A", 2)):
        cfg = SessionConfig(local_name=name, peer_name=peer, tunnels=(TunnelRef("t1"),),
                            qkd_role=role, local_sae_id=sae, peer_sae_id=psae,
                            rekey_interval=1.0, initiate_on_start=(s == 1))
        spi = iter(range(0xC0000000 + s * 0x1000, 0xFFFFFFFF))
        sess = PeerSession(cfg, identity=identity(name),
                           peer_identities=[identity(peer).public], rng=seeded(s),
                           now=time.monotonic(), allocate_spi=lambda t, spi=spi: next(spi))
        transport, proto = await loop.create_datagram_endpoint(
            lambda sess=sess, sae=sae, peer=peer: Driver(sess, link.source(sae), boxes[peer]),
            local_addr=("127.0.0.1", 0))
        drivers[name] = proto
    boxes["gw-a"][0] = drivers["gw-a"].transport.get_extra_info("sockname")
    boxes["gw-b"][0] = drivers["gw-b"].transport.get_extra_info("sockname")
    tasks = [asyncio.create_task(d.run()) for d in drivers.values()]
    try:
        async def until_two():
            while not all(sum(isinstance(e, E.SessionEstablished) for e in d.events) >= 2
                          for d in drivers.values()):
                await asyncio.sleep(0.02)
        await asyncio.wait_for(until_two(), 15)
    finally:
        for t in tasks:
            t.cancel()
        for d in drivers.values():
            d.transport.close()
    a, b = drivers["gw-a"], drivers["gw-b"]
    for gen in (1, 2):
        # both sides installed the same session secret for the generation
        assert a.keys[("InstallInbound", gen)] == b.keys[("InstallOutbound", gen)]
        assert b.keys[("InstallInbound", gen)] == a.keys[("InstallOutbound", gen)]
    assert a.keys[("InstallInbound", 1)] != a.keys[("InstallInbound", 2)]
    est = [e for e in a.events if isinstance(e, E.SessionEstablished)]
    assert est[1].provenance.qkd and est[0].provenance.qkd_key_ids != est[1].provenance.qkd_key_ids


async def test_many_peers_share_one_address_and_port_on_both_sides():
    """Five peers behind ONE address and port (one process speaking for all,
    like the issue 19 load generator) and a hub with one socket: neither
    side can tell the peers apart by address. Every datagram is still
    routed to its session (receiver epoch, or an INIT's signer) by the
    daemon's own endpoint and drivers, all five exchanges run at once,
    collide with the peers' own INITs, and each pair agrees on its keys."""
    from qkdgate.gateway.daemon.udp import PeerDriver, open_endpoint
    from qkdgate.gateway.protocol.session import PeerSession
    loop = asyncio.get_running_loop()
    th, hub = await open_endpoint("127.0.0.1", 0)
    tg, gen = await open_endpoint("127.0.0.1", 0)
    hub_addr, gen_addr = th.get_extra_info("sockname")[:2], tg.get_extra_info("sockname")[:2]
    names = [f"gw-p{i}" for i in range(5)]
    ids = {n: identity(n) for n in [*names, "gw-hub"]}
    done: dict[tuple[str, str], bytes] = {}
    drivers = []
    try:
        for i, peer in enumerate(names):
            for me, other, endpoint, address, seed in (("gw-hub", peer, hub, gen_addr, 10 + i),
                                                       (peer, "gw-hub", gen, hub_addr, 50 + i)):
                cfg = SessionConfig(local_name=me, peer_name=other,
                                    tunnels=(TunnelRef("t1"), TunnelRef(f"x{i}")))
                spis = iter(range(0x1000 * (seed + 1), 0x1000 * (seed + 2)))
                sess = PeerSession(cfg, identity=ids[me], peer_identities=[ids[other].public],
                                   rng=seeded(seed), now=loop.time(),
                                   allocate_spi=lambda t, spis=spis: next(spis))
                box: list[PeerDriver] = []

                def on_event(ev, box=box, me=me, other=other):
                    if isinstance(ev, (E.InstallInbound, E.InstallOutbound)):
                        box[0].call("installed", lambda s, r=ev.request_id: s.installed(
                            r, loop.time()))
                    elif isinstance(ev, E.SessionEstablished):
                        done[(me, other)] = box[0].session.provenance and ev.generation

                d = PeerDriver(other, sess, address, clock=loop.time, on_event=on_event,
                               on_failure=lambda what, exc: (_ for _ in ()).throw(exc))
                box.append(d)
                endpoint.add(d)
                drivers.append(d)
        for d in drivers:
            d.pump()                      # every session initiates at once
        for _ in range(400):
            if len(done) == 10:
                break
            await asyncio.sleep(0.01)
        assert len(done) == 10, sorted(done)
        # each pair agrees on one generation; nothing was unroutable or unknown
        for peer in names:
            assert done[("gw-hub", peer)] == done[(peer, "gw-hub")] == 1
        for ep in (hub, gen):
            assert ep.unknown == 0 and ep.demux_stats() == {"fragment": 0, "unrouted": 0,
                                                            "ambiguous": 0}
        hub_sessions = {d.name: d.session for d in drivers if d.transport is th}
        gen_sessions = {d.session.config.local_name: d.session for d in drivers
                        if d.transport is tg}
        assert len(hub_sessions) == len(gen_sessions) == 5
        for peer in names:
            a, b = hub_sessions[peer], gen_sessions[peer]
            assert a.peer_epoch == b.epoch and b.peer_epoch == a.epoch
            assert a.provenance == b.provenance
    finally:
        for d in drivers:
            d.close()
        th.close()
        tg.close()
