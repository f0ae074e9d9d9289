"""Issue 17 finding 8a: when removing an SA fails while a generation is
retired or the tunnel blocks, the generation stays in the records (status
shows it), removal is retried on the tunnel's timer, and after
REMOVE_ATTEMPTS_BEFORE_ESCALATION failures the tunnel escalates: MACsec
deactivates the SA or, failing that, takes the link down; IPsec blocks.
Every step is reported. A real kernel will not fail a delete on demand, so a
fault-injecting backend does."""

import errno
import ipaddress

from tunnel_helpers import Schedule, Session

from qkdgate.errors import TunnelError
from qkdgate.interfaces import MacsecLinkSpec, PolicyAction
from qkdgate.testing.fakes import RecordingIpsecBackend, RecordingMacsecBackend
from qkdgate.tunnels.events import SaRemovalEscalated, SaRetired, TunnelBlocked, TunnelOpFailed
from qkdgate.tunnels.ipsec_tunnel import IpsecTunnelSpec, ipsec_tunnel
from qkdgate.tunnels.macsec_tunnel import MacsecTunnelSpec, macsec_tunnel
from qkdgate.tunnels.timers import (
    REMOVE_ATTEMPTS_BEFORE_ESCALATION,
    REMOVE_RETRY_SECONDS,
    Lifetimes,
)
from qkdgate.tunnels.tunnel import TunnelPolicy

LT = Lifetimes(soft_seconds=50, hard_seconds=60, grace_seconds=2)
PEER_SCI = 0x0200000000AA0001


class FaultyMacsec(RecordingMacsecBackend):
    """Fails remove_tx_sa (and, if asked, deactivating it) ``fails`` times."""

    def __init__(self, fails: int = 0, deactivate_fails: bool = False) -> None:
        super().__init__()
        self.fails = 0
        self.to_fail = fails
        self.deactivate_fails = deactivate_fails

    def remove_tx_sa(self, link, an):
        if self.fails < self.to_fail:
            self.fails += 1
            raise TunnelError("remove_tx_sa", errno.EIO, "injected")
        super().remove_tx_sa(link, an)

    def set_tx_sa_active(self, link, an, active):
        if self.deactivate_fails and not active:
            raise TunnelError("set_tx_sa_active", errno.EIO, "injected")
        super().set_tx_sa_active(link, an, active)


def macsec(be, events):
    t = macsec_tunnel(MacsecTunnelSpec("m1", MacsecLinkSpec("qm-a", "eth0"), PEER_SCI), be,
                      policy=TunnelPolicy.HYBRID_REQUIRED, lifetimes=LT, schedule=Schedule(),
                      emit=events.append)
    t.setup(0.0)
    return t


def gen(t, n, now):
    an = t.allocate_spi()
    t.install_inbound(n, Session(b"g%d" % n), "initiator", an, now)
    t.install_outbound(n, Session(b"g%d" % n), "initiator", an, now)
    return an


def test_a_failed_macsec_tx_removal_keeps_the_generation_and_is_retried():
    be, events = FaultyMacsec(fails=1), []
    t = macsec(be, events)
    an1 = gen(t, 1, 0.0)
    gen(t, 2, 10.0)
    t.handle_timer(12.0)                       # grace over: retire generation 1
    assert 1 in t.generations                  # still ours: its TX SA is in the kernel
    assert an1 in be.links["qm-a"].tx
    assert SaRetired("m1", 1) not in events
    assert any(isinstance(e, TunnelOpFailed) and e.op == "remove_sa" for e in events)
    assert [g["generation"] for g in t.status(12.0)["generations"]] == [1, 2]
    assert t.get_timer() == 12.0 + REMOVE_RETRY_SECONDS
    t.handle_timer(12.0 + REMOVE_RETRY_SECONDS)
    assert 1 not in t.generations and an1 not in be.links["qm-a"].tx
    assert SaRetired("m1", 1) in events and t.state == "up"


def test_a_macsec_tx_sa_that_cannot_be_removed_or_deactivated_takes_the_link_down():
    be, events = FaultyMacsec(fails=99, deactivate_fails=True), []
    t = macsec(be, events)
    gen(t, 1, 0.0)
    gen(t, 2, 10.0)
    now = 12.0
    t.handle_timer(now)
    for _ in range(REMOVE_ATTEMPTS_BEFORE_ESCALATION - 1):
        assert be.links["qm-a"].up
        now += REMOVE_RETRY_SECONDS
        t.handle_timer(now)
    assert not be.links["qm-a"].up            # nothing leaves the link
    (esc,) = [e for e in events if isinstance(e, SaRemovalEscalated)]
    assert esc.generation == 1 and "link down" in esc.action
    assert t.state == "blocked" and any(isinstance(e, TunnelBlocked) for e in events)
    assert 1 in t.generations                  # still reported, still retried
    assert t.get_timer() is not None


def test_a_macsec_tx_sa_that_cannot_be_removed_is_deactivated():
    be, events = FaultyMacsec(fails=99), []
    t = macsec(be, events)
    an1 = gen(t, 1, 0.0)
    gen(t, 2, 10.0)
    now = 12.0
    for _ in range(REMOVE_ATTEMPTS_BEFORE_ESCALATION):
        t.handle_timer(now)
        now += REMOVE_RETRY_SECONDS
    (esc,) = [e for e in events if isinstance(e, SaRemovalEscalated)]
    assert "inactive" in esc.action and be.links["qm-a"].up
    assert be.links["qm-a"].tx[an1].active is False


class FaultyXfrm(RecordingIpsecBackend):
    def remove_sa(self, sa_id):
        raise TunnelError("remove_sa", errno.EIO, "injected")


def test_an_ipsec_sa_that_cannot_be_removed_blocks_the_tunnel_after_retries():
    be, events = FaultyXfrm(), []
    A, B = ipaddress.ip_address("192.0.2.1"), ipaddress.ip_address("192.0.2.2")
    t = ipsec_tunnel(IpsecTunnelSpec("t1", A, B, (ipaddress.ip_network("10.1.0.0/16"),),
                                     (ipaddress.ip_network("10.2.0.0/16"),), reqid_base=0x1000),
                     be, policy=TunnelPolicy.HYBRID_REQUIRED, lifetimes=LT,
                     schedule=Schedule(), emit=events.append)
    t.setup(0.0)
    for n, now in ((1, 0.0), (2, 10.0)):
        spi = t.allocate_spi()
        t.install_inbound(n, Session(b"x%d" % n), "initiator", spi, now)
        t.install_outbound(n, Session(b"x%d" % n), "initiator", 0xD0000000 + n, now)
    now = 12.0
    for _ in range(REMOVE_ATTEMPTS_BEFORE_ESCALATION):
        t.handle_timer(now)
        now += REMOVE_RETRY_SECONDS
    assert any(isinstance(e, SaRemovalEscalated) and e.generation == 1 for e in events)
    assert t.state == "blocked"
    assert all(p.action is PolicyAction.BLOCK for p in be.policies.values()
               if p.direction.value == "out")
    assert 1 in t.generations and len(be.sas) == 4     # nothing silently forgotten
