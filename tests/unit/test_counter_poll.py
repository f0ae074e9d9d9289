"""Issue 19: the 10-second counter poll of every tunnel sharing an IPsec
backend is one multi-get (IpsecBackend.query_sas), not a request per SA,
and a failure in it is reported by the tunnels it concerns, never raised
into the daemon's tunnel loop."""

import errno
import ipaddress
from dataclasses import replace

from test_netlink_layout import Recorder
from test_tunnel_manager_batch import CountingBackend, manager, spis
from tunnel_helpers import Session

from qkdgate.errors import TunnelError
from qkdgate.interfaces import SaId, SaState
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

    def query_sas(self, sa_ids):
        self.multigets.append(len(sa_ids))
        if self.whole is not None:
            raise self.whole
        return super().query_sas(sa_ids)


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


class Partial(Recorder):
    """GETSA answers for every SPI but ``gone`` (no reply: the kernel's ESRCH
    comes back as an error ack, which request_batch reports per message)."""

    def __init__(self, gone):
        super().__init__()
        self.gone = gone

    def request_batch(self, op, msgs):
        out = []
        for _type, payload, _flags in msgs:
            spi = m.num(m.USERSA_ID.unpack(payload), "spi")
            if spi == self.gone:
                out.append(([], TunnelError(op, errno.ESRCH, "No such process")))
            else:
                out.append(([(m.XFRM_MSG_NEWSA, _reply(spi))], None))
        return out


def _reply(spi):
    from test_netlink_layout import _sa_reply
    raw = bytearray(_sa_reply())
    info = m.USERSA_INFO.unpack(bytes(raw))
    return m.USERSA_INFO.pack({**info, "id.spi": spi}) + bytes(raw[m.USERSA_INFO.size:])


def test_xfrm_query_sas_decodes_each_answer_in_order():
    be = XfrmBackend(channel=Partial(gone=0xC0000002), registry=None,   # type: ignore[arg-type]
                     verify=False)
    ids = [SaId(A, B, 0xC0000001), SaId(A, B, 0xC0000002), SaId(A, B, 0xC0000003)]
    got = be.query_sas(ids)
    assert isinstance(got[0], SaState) and got[0].sa_id.spi == 0xC0000001
    assert isinstance(got[1], TunnelError) and got[1].errno == errno.ESRCH
    assert isinstance(got[2], SaState) and got[2].sa_id.spi == 0xC0000003
