"""The kernel's hard lifetime of every XFRM SA ends by its generation's
deadline (issue 10, finding 1): XFRM counts whole seconds from each SA's own
install, so an SA installed after its generation began (the outbound one
waits for the peer's confirmation) must get only what the generation has
left, rounded down, less the margin the install's round trip may take."""

import math

import pytest
from test_tunnel_manager import LT, establish, tunnel
from tunnel_helpers import Session

from qkdgate.tunnels.ipsec_tunnel import kernel_lifetime
from qkdgate.tunnels.timers import Lifetimes


def kernel_hard(be, direction):
    return {sa.sa_id.spi: sa.spec.lifetime.hard_add_seconds
            for sa in be.sas.values() if sa.direction == direction}


def test_outbound_installed_later_gets_what_its_generation_has_left():
    t, be = tunnel()
    t.setup(0.0)
    session = Session(b"g1")
    in_spi = t.allocate_spi()
    t.install_inbound(1, session, "initiator", in_spi, 100.0)
    t.install_outbound(1, session, "initiator", 0xD0000001, 102.5)   # confirmed 2.5 s later
    hard_at = t.timers.hard_at(1)
    assert hard_at == 160.0
    # 60 s from the generation's start, less the 1 s margin, whole seconds down
    assert kernel_hard(be, "in") == {in_spi: 59}
    assert kernel_hard(be, "out") == {0xD0000001: 56}
    # the kernel (add_time = the real install, at most the margin after `now`)
    # ends each SA by the generation's deadline
    for now, direction in ((100.0, "in"), (102.5, "out")):
        (hard,) = kernel_hard(be, direction).values()
        assert now + LT.hard_margin + hard <= hard_at


def test_a_rekeyed_generation_counts_from_its_own_start():
    t, be = tunnel()
    t.setup(0.0)
    establish(t, 1, Session(b"g1"), now=0.0)
    in2, out2 = establish(t, 2, Session(b"g2"), now=50.0)
    assert kernel_hard(be, "in")[in2] == 59 and kernel_hard(be, "out")[out2] == 59


@pytest.mark.parametrize(("now", "hard_at", "want"), [
    (0.0, 60.0, 59),          # the whole lifetime, less the margin
    (0.0, 60.9, 59),          # never above the generation's lifetime
    (10.0, 60.0, 49),
    (10.4, 60.0, 48),         # 48.6 rounds down
    (58.5, 60.0, 1),          # under a second left: 1, the least XFRM can say (0 = forever)
    (61.0, 60.0, 1),          # past it (the tunnel's own timer acts): still never 0
    (0.0, None, 59),          # no deadline given: a full generation from now
])
def test_kernel_hard_lifetime_rounds_down_and_is_never_unlimited(now, hard_at, want):
    lt = kernel_lifetime(LT, now, hard_at)
    assert lt.hard_add_seconds == want


def test_margin_follows_short_lifetimes():
    lt = Lifetimes(soft_seconds=8, hard_seconds=9, grace_seconds=0.5)   # margin 0.25 s
    k = kernel_lifetime(lt, 0.0, 9.0)
    assert lt.hard_margin == 0.25 and k.hard_add_seconds == math.floor(9 - 0.25) == 8


def test_no_kernel_soft_time_limit_so_the_hard_one_cannot_move():
    """xfrm_timer_handler moves add_time forward instead of expiring when it
    finds the hard lifetime passed while armed for the soft one
    (XFRM_SOFT_EXPIRE): no soft time limit, no such state. Byte limits stay."""
    lt = Lifetimes(soft_seconds=8, hard_seconds=12, soft_bytes=10**6, hard_bytes=2 * 10**6)
    k = kernel_lifetime(lt, 0.0, 12.0)
    assert k.soft_add_seconds == 0 and k.hard_add_seconds == 11
    assert (k.soft_bytes, k.hard_bytes) == (10**6, 2 * 10**6)
