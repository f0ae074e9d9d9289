"""NetlinkChannel.request_batch against a scripted socket: many messages per
send, each reply and ack matched to its request by sequence number, and a
lost reply (ENOBUFS) failing exactly the requests it leaves unanswered."""

from __future__ import annotations

import errno
import struct

from qkdgate.tunnels.netlink import (
    BATCH_MESSAGES,
    NLM_F_ACK,
    NLMSG_ERROR,
    NLMSGHDR,
    NetlinkChannel,
)


def ack(seq: int, code: int = 0) -> bytes:
    body = struct.pack("=i", code) + NLMSGHDR.pack(16, 0, 0, seq, 0)
    return NLMSGHDR.pack(16 + len(body), NLMSG_ERROR, 0x100, seq, 0) + body


def reply(seq: int, payload: bytes) -> bytes:
    return NLMSGHDR.pack(16 + len(payload), 0x10, 0, seq, 0) + payload


class ScriptedSocket:
    """Answers every send with ``answer(seqs)``: a list of datagrams or an
    OSError to raise from the next receive."""

    def __init__(self, answer):
        self.answer, self.sends, self.inbox = answer, [], []

    def setsockopt(self, *a):
        pass

    def getsockopt(self, *a):
        return 8 << 20

    def bind(self, addr):
        pass

    def close(self):
        pass

    def send(self, data: bytes) -> int:
        seqs, off = [], 0
        while off < len(data):
            n, _t, flags, seq, _p = NLMSGHDR.unpack_from(data, off)
            assert flags & NLM_F_ACK
            seqs.append(seq)
            off += n
        self.sends.append(seqs)
        self.inbox += self.answer(seqs)
        return len(data)

    def recv_into(self, buf) -> int:
        item = self.inbox.pop(0)
        if isinstance(item, OSError):
            raise item
        buf[:len(item)] = item
        return len(item)


def channel(answer) -> tuple[NetlinkChannel, ScriptedSocket]:
    sock = ScriptedSocket(answer)
    return NetlinkChannel(6, sock=sock), sock   # type: ignore[arg-type]


def test_replies_and_acks_are_matched_by_sequence_number_in_any_order():
    def answer(seqs):
        # acks in reverse order, the GET replies first, the third request refused
        out = [reply(s, b"r%d" % i) for i, s in enumerate(seqs)]
        return out + [ack(s, -errno.ENOENT if i == 2 else 0)
                      for i, s in reversed(list(enumerate(seqs)))]
    ch, sock = channel(answer)
    res = ch.request_batch("get", [(0x12, b"x" * 4, 0)] * 5)
    assert len(sock.sends) == 1 and len(sock.sends[0]) == 5    # one send, five messages
    assert [r for r, _e in res] == [[(0x10, b"r%d" % i)] for i in range(5)]
    errs = [e for _r, e in res]
    assert errs[2].errno == errno.ENOENT and errs[:2] + errs[3:] == [None] * 4


def test_a_large_batch_is_sent_in_bounded_chunks():
    ch, sock = channel(lambda seqs: [b"".join(ack(s) for s in seqs)])
    res = ch.request_many("del", [(0x11, b"y" * 24, 0)] * 200)
    assert res == [None] * 200
    assert [len(s) for s in sock.sends] == [BATCH_MESSAGES] * 3 + [200 - 3 * BATCH_MESSAGES]


def test_a_lost_reply_fails_only_the_unanswered_requests():
    def answer(seqs):
        return [b"".join(ack(s) for s in seqs[:3]), OSError(errno.ENOBUFS, "No buffer space")]
    ch, _sock = channel(answer)
    res = ch.request_many("add", [(0x10, b"z" * 8, 0)] * 6)
    assert res[:3] == [None] * 3
    assert all(e is not None and e.errno == errno.ENOBUFS and e.op == "add" for e in res[3:])


def test_spi_reservations_of_many_tunnels_are_one_pipelined_batch():
    """XfrmBackend.allocate_spis (issue 19): N ALLOCSPI requests in one send,
    each answered with its larval SA's SPI, a refused one failing alone; a
    reserved SPI is then keyed by XFRM_MSG_UPDSA (it takes over the larval
    state), as after allocate_spi."""
    import ipaddress

    from qkdgate.interfaces import AllocateSpi, InstallSa, SaId, SaSpec
    from qkdgate.keymix.secret import SecretBytes
    from qkdgate.tunnels import xfrm_msg as m
    from qkdgate.tunnels.xfrm import XfrmBackend

    a, b = ipaddress.ip_address("192.0.2.1"), ipaddress.ip_address("192.0.2.2")
    sent_types: list[int] = []

    def answer(seqs):
        out = []
        for i, s in enumerate(seqs):
            if i == 3:
                out.append(ack(s, -errno.ENOENT))
                continue
            sa = m.USERSA_INFO.pack({"id.spi": 0xC0000100 + i,
                                     "id.daddr": a.packed + bytes(12)})
            out += [reply(s, sa), ack(s)]
        return out

    ch, sock = channel(answer)
    orig_send = sock.send

    def send(data):
        sent_types.append(NLMSGHDR.unpack_from(data, 0)[1])
        return orig_send(data)
    sock.send = send
    be = XfrmBackend(channel=ch, verify=False)
    res = be.allocate_spis([AllocateSpi(b, a, reqid=100 + i) for i in range(6)])
    assert len(sock.sends) == 1 and len(sock.sends[0]) == 6      # one send, six requests
    assert sent_types == [m.XFRM_MSG_ALLOCSPI]
    assert [r for i, r in enumerate(res) if i != 3] == [0xC0000100 + i for i in (0, 1, 2, 4, 5)]
    assert res[3].errno == errno.ENOENT
    spec = SaSpec(key=SecretBytes(bytes(36)), reqid=100)
    be.apply([InstallSa(SaId(src=b, dst=a, spi=0xC0000100), spec, True)])
    assert sent_types[-1] == m.XFRM_MSG_UPDSA                    # keys the larval state
