"""No SA outlives its hard lifetime when several fall due at once (issue 10).

Under load in the lab a MACsec RX SA was still accepting frames 92 ms after
its tunnel's hard lifetime: the daemon woke at the deadline and blocked the
due tunnels one after the other, each block several netlink round trips.
Here the recording fakes sit behind a kernel whose every operation takes
ROUND_TRIP seconds on an injected clock, and a daemon-like loop wakes
exactly at ``TunnelManager.get_timer()``: every SA must have stopped
carrying traffic (XFRM: removed; MACsec: set inactive or removed) by its
generation's hard lifetime, and no tunnel's slower cleanup may come before
another tunnel's SA has stopped.
"""

from __future__ import annotations

import ipaddress

from tunnel_helpers import Schedule, Session

from qkdgate.interfaces import MacsecLinkSpec
from qkdgate.testing.fakes import RecordingIpsecBackend, RecordingMacsecBackend
from qkdgate.tunnels.ipsec_tunnel import IpsecTunnelSpec, ipsec_tunnel
from qkdgate.tunnels.macsec_tunnel import MacsecTunnelSpec, macsec_tunnel
from qkdgate.tunnels.manager import TunnelManager
from qkdgate.tunnels.timers import Lifetimes
from qkdgate.tunnels.tunnel import Tunnel, TunnelPolicy

ROUND_TRIP = 0.06          # one netlink request under TCG and load
LT = Lifetimes(soft_seconds=6, hard_seconds=9, grace_seconds=1)   # the demo's timers
A, B = ipaddress.ip_address("192.0.2.1"), ipaddress.ip_address("192.0.2.2")
STOPS = {"remove_sa", "set_tx_sa_active", "set_rx_sa_active"}   # with active=False


class Clock:
    def __init__(self) -> None:
        self.t = 0.0

    def __call__(self) -> float:
        return self.t


class SlowKernel:
    """A fake backend whose operations each take ROUND_TRIP on ``clock``;
    ``log`` records (time the kernel answered, tunnel, operation, args)."""

    def __init__(self, inner: object, clock: Clock, log: list, tunnel: str) -> None:
        self._inner, self._clock, self._log, self._tunnel = inner, clock, log, tunnel

    def __getattr__(self, name: str):
        fn = getattr(self._inner, name)
        if not callable(fn) or name in ("link_sci",):
            return fn

        def call(*args, **kw):
            self._clock.t += ROUND_TRIP
            out = fn(*args, **kw)
            self._log.append((self._clock.t, self._tunnel, name, args))
            return out
        return call


def build(clock: Clock, log: list) -> TunnelManager:
    mgr = TunnelManager()
    for i in range(3):
        be = SlowKernel(RecordingIpsecBackend(clock), clock, log, f"ip{i}")
        spec = IpsecTunnelSpec(f"ip{i}", A, B, (ipaddress.ip_network(f"10.{i}.0.0/16"),),
                               (ipaddress.ip_network(f"10.{100 + i}.0.0/16"),),
                               reqid_base=0x1000 * (i + 1))
        mgr.add(ipsec_tunnel(spec, be, policy=TunnelPolicy.HYBRID_REQUIRED, lifetimes=LT,
                             schedule=Schedule()))
    for i in range(2):
        be = SlowKernel(RecordingMacsecBackend(), clock, log, f"ms{i}")
        spec = MacsecTunnelSpec(f"ms{i}", MacsecLinkSpec(f"qm{i}", f"eth{i}"), 0x0200000000AA0001)
        mgr.add(macsec_tunnel(spec, be, policy=TunnelPolicy.HYBRID_REQUIRED, lifetimes=LT,
                              schedule=Schedule()))
    for t in mgr.tunnels.values():
        t.setup(clock())
    return mgr


def establish(t: Tunnel, now: float) -> None:
    s = Session(b"g1")
    spi = t.allocate_spi()
    t.install_inbound(1, s, "initiator", spi, now)
    t.install_outbound(1, s, "initiator", 0xD0000001 if t.kind == "ipsec" else spi, now)


def stop_key(tunnel: str, name: str, args: tuple) -> tuple | None:
    """Which SA an operation stopped, or None if it stopped none."""
    if name == "remove_sa" and tunnel.startswith("ip"):
        return (tunnel, args[0].spi)
    if name == "set_tx_sa_active" and args[2] is False:
        return (tunnel, "out", args[1])
    if name == "set_rx_sa_active" and args[3] is False:
        return (tunnel, "in", args[2])
    return None


def sa_keys(t: Tunnel) -> set[tuple]:
    out = set()
    for rec in t.generations[1].records():
        if t.kind == "ipsec":
            out.add((t.tunnel_id, rec.spi))
        else:
            out.add((t.tunnel_id, rec.direction, rec.spi))
    return out


def test_every_sa_stops_by_its_hard_lifetime_when_five_tunnels_fall_due_at_once():
    clock, log = Clock(), []
    mgr = build(clock, log)
    t0 = clock()
    for t in mgr.tunnels.values():      # one generation for all tunnels of a peer: one `now`
        establish(t, t0)
    hard = {tid: mgr.tunnels[tid].timers.hard_at(1) for tid in mgr.tunnels}
    assert set(hard.values()) == {t0 + 9.0}
    keys = {tid: sa_keys(t) for tid, t in mgr.tunnels.items()}
    assert sum(len(k) for k in keys.values()) == 10
    log.clear()
    # the daemon's tunnel loop: sleep until get_timer(), wake exactly then
    for _ in range(10):
        at = mgr.get_timer()
        if at is None:
            break
        clock.t = max(clock.t, at)
        assert all(r == ["soft_lifetime"] for r in mgr.handle_timer(clock()).values())
    stopped: dict[tuple, float] = {}
    for when, tid, name, args in log:
        key = stop_key(tid, name, args)
        if key is not None:
            stopped.setdefault(key, when)
    late = {key: round(stopped[key] - hard[tid], 3)
            for tid, ks in keys.items() for key in ks if stopped[key] > hard[tid]}
    assert set(stopped) == set().union(*keys.values())
    assert late == {}, f"SAs usable past their hard lifetime (s): {late}"
    # every SA stopped before any tunnel's slower cleanup (policy block, MACsec removal)
    last_stop = max(stopped.values())
    first_cleanup = min(when for when, _t, name, _a in log
                        if name in ("update_policy", "remove_tx_sa", "remove_rx_sa"))
    assert last_stop < first_cleanup
    assert all(t.state == "blocked" and t.generations == {} for t in mgr.tunnels.values())
