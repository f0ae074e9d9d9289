"""The strongSwan consumer's vici calls run on one worker thread per
consumer, off the event loop (issue 21 follow-up item 2): vici ``initiate``
is synchronous and takes up to ``timeout_ms`` on the re-authenticating side.
Two gateways' consumer tunnels run in the peer protocol's order on an
asyncio loop against in-memory charons whose ``initiate`` can be held."""

from __future__ import annotations

import asyncio
import threading
import time

from test_strongswan import SWANCTL, FakeCharon

from qkdgate.keymix import labels
from qkdgate.keymix.combiner import Provenance, SessionSecret
from qkdgate.keymix.secret import SecretBytes
from qkdgate.testing.fakes import RecordingIpsecBackend
from qkdgate.tunnels.consumer import ThreadedConsumer, consumer_tunnel
from qkdgate.tunnels.events import ConsumerInvalidated, ConsumerKeyInstalled
from qkdgate.tunnels.strongswan import StrongswanConsumer, StrongswanSpec
from qkdgate.tunnels.strongswan_conf import parse
from qkdgate.tunnels.timers import Lifetimes
from qkdgate.tunnels.tunnel import TunnelPolicy

LT = Lifetimes(soft_seconds=50, hard_seconds=60, grace_seconds=2)


# The two fake charons share state (an IKE_SA lives in both) and each is
# driven by its own consumer's worker thread: one lock keeps the fake
# consistent, as two real charons are (each serialises its own vici).
FAKE_LOCK = threading.RLock()


class HeldCharon(FakeCharon):
    """``initiate`` waits until ``gate`` is set (a slow or lost peer)."""

    def __init__(self, name: str) -> None:
        super().__init__(name)
        self.gate = threading.Event()
        self.gate.set()
        self.in_initiate = threading.Event()

    def initiate(self, conn: str, child: str, timeout_ms: int) -> int:
        self.in_initiate.set()
        assert self.gate.wait(10), "test never released initiate"
        with FAKE_LOCK:
            return super().initiate(conn, child, timeout_ms)

    def __getattribute__(self, name: str):
        attr = super().__getattribute__(name)
        if name in ("load_ppk", "unload_shared", "shared_ids", "load_conn", "terminate_ike",
                    "list_sas"):
            def locked(*args, **kwargs):
                with FAKE_LOCK:
                    return attr(*args, **kwargs)
            return locked
        return attr


def _session(seed: bytes) -> SessionSecret:
    return SessionSecret(SecretBytes(seed * (labels.HASH_LEN // len(seed))),
                         Provenance("ML-KEM-768", True, ("k1",)))


def _gateways():
    spec = StrongswanSpec("sw-b", "gw-gw", "lan", parse(SWANCTL)["connections"]["gw-gw"])
    out = []
    charons = HeldCharon("a"), HeldCharon("b")
    charons[0].peer, charons[1].peer = charons[1], charons[0]
    for ch in charons:
        events: list[object] = []
        inner = StrongswanConsumer(spec, connect=lambda _p, ch=ch: ch,
                                   xfrm=RecordingIpsecBackend)
        worker = ThreadedConsumer(inner)
        tunnel = consumer_tunnel(worker, policy=TunnelPolicy.HYBRID_REQUIRED, lifetimes=LT,
                                 emit=events.append)
        tunnel.setup(0.0)
        out.append((tunnel, worker, ch, events))
    return out


def _exchange(a, b, g: int, s: SessionSecret, now: float) -> None:
    """The peer protocol's order, A the handshake initiator."""
    a.install_inbound(g, s, "initiator", 0, now)
    b.install_inbound(g, s, "responder", 0, now)
    b.install_outbound(g, s, "responder", 0, now)
    a.install_outbound(g, s, "initiator", 0, now)


async def _idle(*workers: ThreadedConsumer) -> None:
    for w in workers:
        assert await asyncio.to_thread(w.wait_idle, 10)


def test_loop_keeps_ticking_while_initiate_blocks_and_steps_keep_their_order():
    (ta, wa, ca, ea), (tb, wb, cb, _eb) = _gateways()

    async def scenario() -> tuple[list[float], float]:
        _exchange(ta, tb, 1, _session(b"\x01\x02"), 1.0)
        await _idle(wa, wb)
        ticks: list[float] = []
        stop = asyncio.Event()

        async def ticker() -> None:
            while not stop.is_set():
                ticks.append(time.monotonic())
                await asyncio.sleep(0.01)

        tick = asyncio.create_task(ticker())
        ca.gate.clear()                         # gA's re-authentication hangs
        ca.in_initiate.clear()
        del ca.calls[:]
        t0 = time.monotonic()
        _exchange(ta, tb, 2, _session(b"\x03\x04"), 2.0)
        ta.retire(1, 4.0)                       # the grace is over: unload PPK g1
        tb.retire(1, 4.0)
        returned = time.monotonic() - t0
        assert await asyncio.to_thread(ca.in_initiate.wait, 5)
        h0 = time.monotonic()
        await asyncio.sleep(0.5)                # initiate held for half a second
        held = [t for t in ticks if t > h0]
        # the retire waits behind the re-authentication, never before it
        assert "unload-shared qkdgate-sw-b-g1" not in ca.calls
        assert wa.describe()["worker"] == {"running": "install", "queued": ["retire"]}
        ca.gate.set()
        await _idle(wa, wb)
        stop.set()
        await tick
        return held, returned

    held, returned = asyncio.run(scenario())
    # A blocking install would never return: the gate opens from this loop, so
    # the fake's initiate would give up after 10 s and fail the test. That,
    # not a wall-clock bound, is the check: with a 1 s bound on the installs
    # and a 0.4 s bound on the longest tick gap the test failed once in a full
    # host run on the shared 2-core host at load 8 (2026-12-06) and passed 3
    # times alone: a thread not scheduled for that long fails such a bound.
    assert returned < 5.0, f"the exchange's installs took {returned:.3f} s"
    # the loop ran on while initiate was held
    assert len(held) >= 2, f"the loop ticked {len(held)} times in 0.5 s"
    # make-before-break in order: PPK g2 loaded, the connection names it, a
    # new IKE_SA authenticated, the old one terminated, then PPK g1 unloaded
    order = [c for c in ca.calls if c.split()[0] != "terminate"]
    assert order == ["load-shared qkdgate-sw-b-g2", "load-conn qkdgate-sw-b-g2", "initiate",
                     "unload-shared qkdgate-sw-b-g1"]
    assert ca.calls.index("initiate") < ca.calls.index("terminate 1") \
        < ca.calls.index("unload-shared qkdgate-sw-b-g1")
    assert set(ca.keys) == {"qkdgate-sw-b-g2"} and len(ca.sas) == 1
    # the installed event comes with the worker's outcome (the tunnel's poll)
    ta.poll(5.0)
    inst = [e for e in ea if isinstance(e, ConsumerKeyInstalled)]
    assert [(e.generation, e.verified) for e in inst] == [(1, True), (2, True)]


def test_block_cancels_queued_jobs_and_runs_after_the_running_one():
    (ta, wa, ca, _ea), (tb, wb, cb, _eb) = _gateways()
    _exchange(ta, tb, 1, _session(b"\x01\x02"), 1.0)
    assert wa.wait_idle(10) and wb.wait_idle(10)
    ca.gate.clear()
    ca.in_initiate.clear()
    _exchange(ta, tb, 2, _session(b"\x03\x04"), 2.0)
    ta.retire(1, 4.0)
    assert ca.in_initiate.wait(5)
    assert wa.describe()["worker"] == {"running": "install", "queued": ["retire"]}
    ta.block(4.5, "policy: QKD lost")
    # the queued retire is dropped and the invalidation runs next (the
    # block's own retire of generation 2 comes after it, a no-op then)
    worker = wa.describe()["worker"]
    assert worker["running"] == "install" and worker["queued"][0] == "invalidate"
    assert "retire" not in worker["queued"][:1]
    ca.gate.set()
    assert wa.wait_idle(10)
    assert not ca.keys and not ca.sas           # every PPK unloaded, IKE_SAs terminated
    assert ta.state == "blocked"


def test_failed_reauthentication_fails_closed_on_the_worker_and_asks_for_a_rekey():
    (ta, wa, ca, ea), (tb, wb, cb, _eb) = _gateways()
    _exchange(ta, tb, 1, _session(b"\x01\x02"), 1.0)
    assert wa.wait_idle(10) and wb.wait_idle(10)
    ta.install_inbound(2, _session(b"\x05\x06"), "initiator", 0, 2.0)
    tb.install_inbound(2, _session(b"\x07\x08"), "responder", 0, 2.0)     # a different key
    tb.install_outbound(2, _session(b"\x07\x08"), "responder", 0, 2.0)
    ta.install_outbound(2, _session(b"\x05\x06"), "initiator", 0, 2.0)  # returns: queued
    assert wa.wait_idle(10)
    # the worker failed it closed at once: nothing authenticates, nothing runs
    assert not any(k.startswith("qkdgate-") for k in ca.keys) and not ca.sas
    assert ta.poll(3.0) == ["strongswan install of generation 2 failed"]
    inv = [e for e in ea if isinstance(e, ConsumerInvalidated)]
    assert inv[-1].reason == "strongswan install of generation 2 failed" and inv[-1].blocked
    assert ta.driver.blocked and ta.driver.installed is None


def _until(cond, timeout: float = 10.0) -> bool:
    t0 = time.monotonic()
    while not cond():
        if time.monotonic() - t0 > timeout:
            return False
        time.sleep(0.005)
    return True


def test_crossing_reauthentications_give_way_to_the_later_generation(caplog):
    """The loaded lab of 2026-12-07: generation g (gB the handshake
    initiator) and g+1 (gA) came a moment apart. gB's re-authentication with
    g reached a charon whose connection already named g+1 and was refused;
    gA's with g+1 reached gB's charon, which still named g (its install of
    g+1 queued behind the running one) and was refused too. Each worker
    retried for 3.75 s waiting for the other, both installs failed closed,
    and traffic stopped for 6 s. Now the worker whose install is superseded
    by a queued later one stops retrying, and the later one goes through."""
    (ta, wa, ca, ea), (tb, wb, cb, eb) = _gateways()
    _exchange(ta, tb, 1, _session(b"\x01\x02"), 1.0)
    assert wa.wait_idle(10) and wb.wait_idle(10)
    cb.gate.clear()                              # gB's initiate with g2 held
    cb.in_initiate.clear()
    _exchange(tb, ta, 2, _session(b"\x03\x04"), 2.0)   # gB initiates g2
    assert cb.in_initiate.wait(5)
    _exchange(ta, tb, 3, _session(b"\x05\x06"), 3.0)   # gA initiates g3 meanwhile
    assert _until(lambda: ca.conn_ppk == "qkdgate-sw-b-g3")
    assert wb.describe()["worker"]["queued"] == ["prepare", "install"]
    cb.gate.set()                                # refused: gA requires g3 now
    assert wa.wait_idle(15) and wb.wait_idle(15)
    ta.poll(4.0)
    tb.poll(4.0)
    assert not [e for e in ea + eb if isinstance(e, ConsumerInvalidated)
                and not e.reason.startswith("start")]
    assert ca.conn_ppk == cb.conn_ppk == "qkdgate-sw-b-g3"
    assert len(ca.sas) == 1                      # gA's g3 IKE_SA; the older ones gone
    b_inst = {e.generation: e for e in eb if isinstance(e, ConsumerKeyInstalled)}
    assert "not re-authenticated" in b_inst[2].detail
    a_inst = {e.generation: e for e in ea if isinstance(e, ConsumerKeyInstalled)}
    assert a_inst[3].verified and "authenticated with ppk_id qkdgate-sw-b-g3" in a_inst[3].detail
    assert ta.state == tb.state == "up"
    # prepare and retire return nothing: that is no failure to log
    assert not [r for r in caplog.records if r.levelname == "ERROR"], caplog.text
