"""Two real daemons (real protocol and identities, recording kernel fakes, no
QKD) starting together: the collision of their first INITs resolves within
one round trip (issue 19 item 2).

The slow case it guards against: A starts first, its INITs go unanswered
(B is not listening yet) and its retransmission interval grows; B starts
and sends its own INIT. If A wins the nonce comparison it drops B's INIT,
and B -- which never saw A's INIT -- used to wait for A's next
retransmission (up to ``retransmit_max``, 8 s). The winner now sends its
INIT again at once, and B, losing the same comparison, answers it.
The nonces are biased through the injected rng so that A always wins."""

import asyncio
import contextlib
import os
import time

from scale_pair import write_scale_pair

from qkdgate.gateway.daemon.daemon import Daemon
from qkdgate.gateway.daemon.sdnotify import SdNotifier
from qkdgate.testing.fakes import RecordingIpsecBackend


def biased_rng(first: int):
    """os.urandom, except that 32-byte draws (nonces; X25519 scalars, which
    clamping keeps valid) start with ``first``: A's nonce > B's, always."""
    def rng(n: int) -> bytes:
        raw = os.urandom(n)
        return bytes([first]) + raw[1:] if n == 32 else raw
    return rng


def generation(d: Daemon) -> int:
    t = d.tunnels.get("t0")
    return t.active.number if t.active else 0


async def until(predicate, timeout: float) -> float:
    """Seconds until ``predicate`` held (polled every 5 ms); fails after ``timeout``."""
    t0 = time.perf_counter()
    while not predicate():
        assert time.perf_counter() - t0 < timeout, "timed out"
        await asyncio.sleep(0.005)
    return time.perf_counter() - t0


@contextlib.asynccontextmanager
async def running(*daemons):
    tasks = [asyncio.create_task(d.run()) for d in daemons]
    try:
        yield tasks
    finally:
        for d in daemons:
            d.stop()
        await asyncio.wait_for(asyncio.gather(*tasks, return_exceptions=True), 10)


def make(tmp_path, n=1):
    cfg_a, cfg_b, _, _ = write_scale_pair(tmp_path, n)
    return [Daemon(cfg, ipsec_backend=RecordingIpsecBackend(), notifier=SdNotifier({}),
                   control_path=str(tmp_path / f"{side}.sock"), rng=biased_rng(first))
            for cfg, side, first in ((cfg_a, "a", 0xFF), (cfg_b, "b", 0x00))]


async def test_the_collision_winner_resends_its_init_so_the_late_peer_answers_at_once(tmp_path):
    a, b = make(tmp_path)
    async with running(a):
        await a.ready.wait()
        ini = lambda: a.runners["gw-b"].driver.session._ini   # noqa: E731
        # A's INIT went out three times (0, 0.5, 1.5 s): the next is 2 s away
        await until(lambda: ini() is not None and ini().retx_interval >= 2.0, 10)
        async with running(b):
            await b.ready.wait()
            took = await until(lambda: generation(a) >= 1 and generation(b) >= 1, 10)
    stats_a = a.runners["gw-b"].driver.session.stats
    assert stats_a["collision_won"] >= 1          # the slow case really happened
    assert took < 1.0, f"established {took:.2f} s after the late peer started"
    print(f"late start: established {took:.3f} s after B was ready")


async def test_both_start_together_and_establish_in_one_round_trip(tmp_path):
    a, b = make(tmp_path)
    t0 = time.perf_counter()
    async with running(a, b):
        await asyncio.gather(a.ready.wait(), b.ready.wait())
        ready = time.perf_counter() - t0
        took = await until(lambda: generation(a) >= 1 and generation(b) >= 1, 10)
        assert (generation(a), generation(b)) == (1, 1)   # one exchange, no retry
    assert took < 1.0
    print(f"together: both ready in {ready:.3f} s, established {took:.3f} s later")
