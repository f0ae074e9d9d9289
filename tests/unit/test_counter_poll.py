"""Issue 19: the 10-second counter poll of every tunnel sharing an IPsec
backend is one read of the SA database (IpsecBackend.read_counters: one
XFRM dump), not a request per SA, and a failure in it is reported by the
tunnels it concerns, never raised into the daemon's tunnel loop."""

import errno
import ipaddress
from dataclasses import replace

from test_netlink_layout import Recorder
from test_tunnel_manager_batch import CountingBackend, manager, spis
from tunnel_helpers import Session

from qkdgate.errors import TunnelError
from qkdgate.interfaces import SaCounters, SaId
from qkdgate.tunnels import xfrm_msg as m
from qkdgate.tunnels.events import TunnelOpFailed
from qkdgate.tunnels.xfrm import XfrmBackend

A, B = ipaddress.ip_address("192.0.2.1"), ipaddress.ip_address("192.0.2.2")


class CountingQueries(CountingBackend):
    """Counts multi-gets; each SA's byte counter is its SPI's low 16 bits,
    so every tunnel's sums are its own. ``fail``: SPI -> errno to answer."""

    def __init__(self, fail=None, whole=None):
        super().__init__()
        self.multigets: list[int] = []
        self.fail, self.whole = fail or {}, whole

    def query_sa(self, sa_id):
        if sa_id.spi in self.fail:
            raise TunnelError("query_sa", self.fail[sa_id.spi], "injected")
        return replace(super().query_sa(sa_id), bytes=sa_id.spi & 0xFFFF, packets=1)

    def read_counters(self, sa_ids):
        self.multigets.append(len(sa_ids))
        if self.whole is not None:
            raise self.whole
        return super().read_counters(sa_ids)


def established(be, events=None, n=5):
    mgr = manager(be, n=n, events=events)
    s1 = Session(b"g1")
    mgr.install_inbound(1, s1, "initiator", spis(mgr, 0xC0001000), 0.0)
    mgr.install_outbound(1, s1, "initiator", spis(mgr, 0xD0001000), 0.0)
    return mgr


def test_one_multiget_reads_every_tunnels_counters():
    be = CountingQueries()
    mgr = established(be, n=5)
    assert mgr.poll(1.0) == {}
    assert be.multigets == [10]                     # 5 tunnels x (in + out), one request
    for i, t in enumerate(mgr.tunnels.values()):
        assert t.counters == {"bytes_in": 0x1000 + i, "bytes_out": 0x1000 + i,
                              "packets_in": 1, "packets_out": 1}


def test_tunnels_without_a_sending_generation_are_not_read():
    be = CountingQueries()
    mgr = manager(be, n=3)                          # set up, blocked, nothing keyed
    assert mgr.poll(1.0) == {} and be.multigets == []


def test_a_gone_sa_is_skipped_and_another_error_is_that_tunnels_alone():
    events = []
    be = CountingQueries(fail={0xC0001001: errno.ESRCH, 0xD0001003: errno.EPERM})
    mgr = established(be, events)
    events.clear()
    assert mgr.poll(1.0) == {}
    t = list(mgr.tunnels.values())
    assert t[1].counters["bytes_in"] == 0 and t[1].counters["bytes_out"] == 0x1001
    failed = [e for e in events if isinstance(e, TunnelOpFailed)]
    assert [(e.tunnel, e.op) for e in failed] == [("t3", "query")]
    assert t[3].last_error.startswith("query:") and t[3].state == "up"
    assert t[4].counters["bytes_out"] == 0x1004


def test_a_failed_multiget_is_reported_by_every_tunnel_it_concerned():
    events = []
    be = CountingQueries(whole=TunnelError("query_sa", errno.ENOBUFS, "injected"))
    mgr = established(be, events, n=4)
    events.clear()
    assert mgr.poll(1.0) == {}                      # nothing raised into the loop
    failed = [e.tunnel for e in events if isinstance(e, TunnelOpFailed)]
    assert failed == ["t0", "t1", "t2", "t3"]
    assert all(t.state == "up" for t in mgr.tunnels.values())


def test_a_soft_byte_limit_found_by_the_batched_poll_asks_for_a_rekey_once():
    be = CountingQueries()
    mgr = established(be, n=2)
    for t in mgr.tunnels.values():
        t.lifetimes = replace(t.lifetimes, soft_bytes=0x1001, hard_bytes=0x10000)
    assert mgr.poll(1.0) == {"t1": ["soft_bytes"]}
    assert mgr.poll(2.0) == {}


class Dump(Recorder):
    """Answers the SA dump with an SA for each of ``spis`` (bytes = SPI's low
    16 bits), one of them with a mark, and an unrelated SA."""

    def __init__(self, spis, marked):
        super().__init__()
        self.spis, self.marked = spis, marked

    def request(self, op, msg_type, payload, flags=0, dump=False):
        if msg_type == m.XFRM_MSG_GETSA and dump:
            self.sent.append((msg_type, payload, dump))
            return [(m.XFRM_MSG_NEWSA, _sa(spi, spi == self.marked))
                    for spi in [*self.spis, 0xC0009999]] + [(m.XFRM_MSG_NEWSA, _ipcomp())]
        return super().request(op, msg_type, payload, flags, dump)


def _sa(spi, marked):
    from qkdgate.tunnels.netlink import nla
    info = m.USERSA_INFO.pack({"id.spi": spi, "id.proto": 50, "family": 2, "reqid": 7,
                               "saddr": A.packed, "id.daddr": B.packed,
                               "curlft.bytes": spi & 0xFFFF, "curlft.packets": 2,
                               "stats.integrity_failed": 1})
    return info + (nla(m.XFRMA_MARK, m.MARK.pack({"v": 5, "m": 0xFF})) if marked else b"")


def _ipcomp():
    """Someone else's IPComp SA in the namespace: a CPI (0x55), not an SPI."""
    return m.USERSA_INFO.pack({"id.spi": 0x55, "id.proto": 108, "family": 2, "reqid": 7,
                               "saddr": A.packed, "id.daddr": B.packed})


def test_xfrm_read_counters_is_one_dump_matched_by_identity():
    from qkdgate.interfaces import Mark
    rec = Dump([0xC0000001, 0xC0000003], marked=0xC0000003)
    be = XfrmBackend(channel=rec, registry=None, verify=False)   # type: ignore[arg-type]
    ids = [SaId(A, B, 0xC0000001), SaId(A, B, 0xC0000002), SaId(A, B, 0xC0000003),
           SaId(A, B, 0xC0000003, mark=Mark(5, 0xFF))]
    got = be.read_counters(ids)
    assert [t for t, _p, _d in rec.sent] == [m.XFRM_MSG_GETSA]      # one request
    assert got[0] == SaCounters(0xC0000001, 0x0001, 2, 1, 0)
    assert isinstance(got[1], TunnelError) and got[1].errno == errno.ESRCH
    assert isinstance(got[2], TunnelError)          # the kernel's 0xC0000003 carries a mark
    assert got[3] == SaCounters(0xC0000003, 0x0003, 2, 1, 0)


def test_the_sa_dump_skips_an_sa_that_cannot_be_ours():
    rec = Dump([0xC0000001], marked=None)
    be = XfrmBackend(channel=rec, registry=None, verify=False)   # type: ignore[arg-type]
    assert sorted(st.sa_id.spi for st in be.list_sas()) == [0xC0000001, 0xC0009999]
