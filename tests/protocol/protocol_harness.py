"""Two PeerSessions in memory, driven step by step (aioquic-style helpers).

A :class:`Gateway` plays the daemon for one session: it answers NeedQkdKeys
from a shared :class:`~qkdgate.testing.fakes.FakeQkdLink`, acknowledges installs
(deriving the per-SA ESP keys with keymix.schedule so tests can compare
both sides), and records every event. :class:`Pair` moves datagrams between
the two through an optional ``network`` hook (loss, duplication, reordering,
tampering) and advances a fake clock to the next timer when idle.
"""

from __future__ import annotations

import random
import zlib
from collections.abc import Callable
from dataclasses import dataclass, field

from qkdgate.errors import KeySourceError, TunnelError
from qkdgate.gateway.protocol import events as E
from qkdgate.gateway.protocol.config import SessionConfig, TunnelRef
from qkdgate.gateway.protocol.identity import LocalIdentity
from qkdgate.gateway.protocol.session import PeerSession
from qkdgate.interfaces import MacsecCipher
from qkdgate.keymix.schedule import esp_key, macsec_keys
from qkdgate.testing.fakes import FakeQkdLink

TUNNELS = (TunnelRef("t1", "ipsec"), TunnelRef("m1", "macsec"))
_IDS: dict[tuple[str, int], LocalIdentity] = {}


def seeded(seed: int) -> Callable[[int], bytes]:
    r = random.Random(seed)
    return lambda n: r.randbytes(n)


def identity(name: str, version: int = 0, profile: str = "default") -> LocalIdentity:
    """Cached deterministic identities (ML-DSA key generation is not free)."""
    key = (name + profile, version)
    if key not in _IDS:
        seed = zlib.crc32(f"{name}/{version}/{profile}".encode())   # stable across runs
        _IDS[key] = LocalIdentity.generate(profile, name=name, rng=seeded(seed))
    return _IDS[key]


def sa_key(session, tunnel: str, direction: str, value: int, gen: int) -> bytes:
    """What the tunnel manager would install: ESP key, or MACsec SAK (SCI 1)."""
    if tunnel.startswith("m"):
        return macsec_keys(session, tunnel, direction, 1, value, gen,
                           MacsecCipher.GCM_AES_XPN_256).sak.reveal()
    return esp_key(session, tunnel, direction, value, gen).reveal()


def run_sync(coro):
    """The fakes' coroutines never suspend: run one to completion."""
    try:
        coro.send(None)
    except StopIteration as stop:
        return stop.value
    raise RuntimeError("coroutine suspended")


@dataclass
class Gateway:
    name: str
    session: PeerSession
    link: FakeQkdLink | None
    sae: str
    events: list = field(default_factory=list)
    inbound: dict = field(default_factory=dict)     # generation -> {tunnel: (spi, key)}
    outbound: dict = field(default_factory=dict)
    current_out: int | None = None
    retired: list = field(default_factory=list)
    auto_answer: bool = True
    qkd_error: KeySourceError | None = None          # make the next fetch fail
    install_error: bool = False
    fail_outbound: bool = False
    corrupt_qkd: bool = False
    held: list = field(default_factory=list)         # unanswered requests (auto_answer off)
    trace: list | None = None                        # shared with the other side (order)

    def pump(self, now: float) -> int:
        n = 0
        while (ev := self.session.next_event()) is not None:
            n += 1
            self.events.append(ev)
            if self.trace is not None:
                self.trace.append((self.name, ev))
            if not self.auto_answer and isinstance(ev, (E.NeedQkdKeys, E.InstallInbound,
                                                        E.InstallOutbound)):
                self.held.append(ev)
                continue
            self.answer(ev, now)
        return n

    def answer(self, ev, now: float) -> None:
        s = self.session
        if isinstance(ev, E.NeedQkdKeys):
            src = self.link.source(self.sae)
            try:
                if self.qkd_error is not None:
                    err, self.qkd_error = self.qkd_error, None
                    raise err
                if ev.role == "master":
                    keys = run_sync(src.get_new_keys(ev.peer_sae_id, ev.number, ev.size_bits))
                else:
                    keys = run_sync(src.get_keys_by_id(ev.peer_sae_id, ev.key_ids))
            except KeySourceError as exc:
                s.qkd_failed(ev.request_id, exc, now)
                return
            if self.corrupt_qkd:   # a KME handing out other bits under the same key_ID
                from qkdgate.interfaces import QkdKey
                from qkdgate.keymix.secret import SecretBytes
                keys = [QkdKey(k.key_id, SecretBytes(bytes(b ^ 1 for b in k.key.reveal())))
                        for k in keys]
            s.provide_qkd_keys(ev.request_id, keys, now)
        elif isinstance(ev, (E.InstallInbound, E.InstallOutbound)):
            if self.install_error or (self.fail_outbound and isinstance(ev, E.InstallOutbound)):
                s.install_failed(ev.request_id, TunnelError("add_sa", 22), now)
                return
            inbound = isinstance(ev, E.InstallInbound)
            direction = ("r2i" if inbound else "i2r") if ev.role == "initiator" else \
                ("i2r" if inbound else "r2i")
            keys = {t: (spi, sa_key(ev.session, t, direction, spi, ev.generation))
                    for t, spi in ev.spis.items()}
            table = self.inbound if inbound else self.outbound
            # a generation number is never reused for other keys (the kernel
            # would still hold SAs of the old one)
            assert table.get(ev.generation, keys) == keys, f"generation {ev.generation} reused"
            table[ev.generation] = keys
            if not inbound:
                self.current_out = ev.generation
            s.installed(ev.request_id, now)
        elif isinstance(ev, E.RetireGeneration):
            self.retired.append(ev.generation)

    def of(self, cls) -> list:
        return [e for e in self.events if isinstance(e, cls)]


class Pair:
    def __init__(self, a: Gateway, b: Gateway, now: float = 1000.0) -> None:
        self.a, self.b, self.now = a, b, now
        self.trace: list = []
        a.trace = b.trace = self.trace
        self.network: Callable[[str, list[bytes]], list[bytes]] | None = None
        self.log: list[tuple[str, bytes]] = []        # every datagram as sent

    def other(self, gw: Gateway) -> Gateway:
        return self.b if gw is self.a else self.a

    def transfer(self, src: Gateway, dst: Gateway) -> int:
        dgrams = src.session.datagrams_to_send(self.now)
        self.log.extend((src.name, d) for d in dgrams)
        if self.network is not None:
            dgrams = self.network(src.name, dgrams)
        for d in dgrams:
            dst.session.receive_datagram(d, self.now)
        return len(dgrams)

    def step(self) -> int:
        n = self.a.pump(self.now) + self.b.pump(self.now)
        n += self.transfer(self.a, self.b) + self.transfer(self.b, self.a)
        return n + self.a.pump(self.now) + self.b.pump(self.now)

    def settle(self) -> None:
        """Exchange messages until quiet, without advancing time."""
        for _ in range(200):
            if not self.step():
                return
        raise AssertionError("no quiescence")

    def advance(self, until: float) -> None:
        """Run timers and messages up to time ``until``."""
        self.settle()
        for _ in range(10000):
            timers = [t for t in (self.a.session.get_timer(), self.b.session.get_timer())
                      if t is not None]
            if not timers or min(timers) > until:
                self.now = max(self.now, until)
                return
            self.now = max(self.now, min(timers))
            for gw in (self.a, self.b):
                t = gw.session.get_timer()
                if t is not None and t <= self.now:
                    gw.session.handle_timer(self.now)
            self.settle()
        raise AssertionError("timer storm")

    def roundtrip_until_done(self, timeout: float = 60.0) -> None:
        """Run until both sides report a new SessionEstablished (or time out)."""
        start_a, start_b = len(self.a.of(E.SessionEstablished)), len(self.b.of(E.SessionEstablished))
        deadline = self.now + timeout
        self.settle()
        while (len(self.a.of(E.SessionEstablished)) == start_a
               or len(self.b.of(E.SessionEstablished)) == start_b):
            timers = [t for t in (self.a.session.get_timer(), self.b.session.get_timer())
                      if t is not None]
            if not timers or min(timers) > deadline:
                raise AssertionError("exchange did not complete")
            self.advance(min(timers))


def make_pair(*, qkd: str | None = "a-master", allow_pqc: bool = False, psk_a: bytes | None = None,
              psk_b: bytes | None = None, seed: int = 1, pins_a=None, pins_b=None,
              id_a: LocalIdentity | None = None, id_b: LocalIdentity | None = None,
              start: str = "a", kem: str = "ML-KEM-768", tunnels=TUNNELS, **cfg) -> Pair:
    from qkdgate.keymix.secret import SecretBytes
    link = FakeQkdLink("SAE-A" if qkd != "b-master" else "SAE-B",
                       "SAE-B" if qkd != "b-master" else "SAE-A", rng=seeded(seed + 100))
    role_a = {None: None, "a-master": "master", "b-master": "slave"}[qkd]
    role_b = {None: None, "a-master": "slave", "b-master": "master"}[qkd]
    id_a, id_b = id_a or identity("gw-a"), id_b or identity("gw-b")
    gws = []
    for name, peer, role, sae, psae, ident, pins, psk, s in (
            ("gw-a", "gw-b", role_a, "SAE-A", "SAE-B", id_a, pins_a or [id_b.public], psk_a, seed),
            ("gw-b", "gw-a", role_b, "SAE-B", "SAE-A", id_b, pins_b or [id_a.public], psk_b,
             seed + 1)):
        conf = SessionConfig(local_name=name, peer_name=peer, tunnels=tuple(tunnels), kem=kem,
                             qkd_role=role, local_sae_id=sae if role else "",
                             peer_sae_id=psae if role else "", allow_pqc_only=allow_pqc,
                             psk=SecretBytes(psk) if psk else None,
                             initiate_on_start=(start == "both" or name[-1] == start), **cfg)
        counter = iter(range(0xC0000100 if name == "gw-a" else 0xD0000100, 0xFFFFFFFF))
        an = iter(range(1 << 30))

        def alloc(tid: str, counter=counter, an=an) -> int:
            return next(an) % 4 if tid.startswith("m") else next(counter)
        sess = PeerSession(conf, identity=ident, peer_identities=pins, rng=seeded(s),
                           now=1000.0, allocate_spi=alloc)
        gws.append(Gateway(name, sess, link if role else None, sae))
    return Pair(gws[0], gws[1])


def assert_keys_match(pair: Pair, gen: int) -> None:
    """Each side's outbound SA keys equal the other side's inbound SA keys."""
    for src, dst in ((pair.a, pair.b), (pair.b, pair.a)):
        out, inn = src.outbound[gen], dst.inbound[gen]
        assert out.keys() == inn.keys()
        for t in out:
            assert out[t] == inn[t], f"{src.name}->{dst.name} tunnel {t} differs"
    assert pair.a.outbound[gen] != pair.b.outbound[gen]   # directions have distinct keys
