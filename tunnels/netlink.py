"""A small synchronous netlink channel shared by the XFRM and MACsec backends.

Theory of operation: the backends speak three netlink families (XFRM,
rtnetlink for the macsec link, generic netlink for the ``macsec`` family).
pyroute2 0.9.7 declares none of the XFRM SA/policy messages nor the macsec
family, and its generic NLA encoder manages about 100 SA add+delete pairs
per second, so the hot path packs messages with precompiled ``struct``
layouts (see :mod:`qkdgate.tunnels.xfrm_msg`) and this module only frames,
sends and reads them. pyroute2 is still the way into a network namespace
(``pushns``/``popns``): a socket keeps the namespace it was created in, so
one process can drive gateways in several namespaces.

Errors: a negative ``nlmsgerr.error`` becomes
:class:`~qkdgate.errors.TunnelError` carrying the errno, the operation name
and the kernel's extended-ack text. ``NETLINK_CAP_ACK`` stops the kernel
from echoing our request (which may hold key bytes) back in error replies.
"""

from __future__ import annotations

import contextlib
import errno as _errno
import socket
import struct
import threading
from collections.abc import Iterator

from qkdgate.errors import TunnelError

NLMSG_ERROR, NLMSG_DONE = 2, 3
NLM_F_REQUEST, NLM_F_MULTI, NLM_F_ACK = 0x1, 0x2, 0x4
NLM_F_ROOT, NLM_F_MATCH = 0x100, 0x200
NLM_F_DUMP = NLM_F_ROOT | NLM_F_MATCH
NLM_F_REPLACE, NLM_F_EXCL, NLM_F_CREATE = 0x100, 0x200, 0x400
NLM_F_CAPPED, NLM_F_ACK_TLVS = 0x100, 0x200
NLA_F_NESTED = 0x8000
NLA_TYPE_MASK = 0x3FFF
SOL_NETLINK = 270
NETLINK_CAP_ACK, NETLINK_EXT_ACK = 10, 11
SO_RCVBUFFORCE = 33
NLMSGERR_ATTR_MSG = 1

NLMSGHDR = struct.Struct("=IHHII")   # len, type, flags, seq, pid
# One send of a batch: its replies must fit the receive buffer (a GETSA reply
# costs the kernel a few KB of skb each), so both bytes and messages are capped.
BATCH_BYTES, BATCH_MESSAGES = 60000, 64
NLAHDR = struct.Struct("=HH")        # nla_len, nla_type
GENLMSGHDR = struct.Struct("=BBH")   # struct genlmsghdr: cmd, version, reserved
# The generic netlink controller (include/uapi/linux/genetlink.h)
GENL_ID_CTRL, CTRL_CMD_GETFAMILY = 0x10, 3
CTRL_ATTR_FAMILY_ID, CTRL_ATTR_FAMILY_NAME = 1, 2
_ERR = struct.Struct("=i")


def set_rcvbuf(sock: socket.socket, size: int) -> int:
    """Give ``sock`` a receive buffer of ``size`` bytes and return what the
    kernel granted (socket(7): it doubles the request for bookkeeping).

    Plain SO_RCVBUF is silently capped at net.core.rmem_max, 208 KiB on a
    stock Debian kernel, which holds only about 100 small datagrams once
    skb overhead counts (a starved reader then loses them as UDP
    RcvbufErrors); SO_RCVBUFFORCE passes the cap where we may (CAP_NET_ADMIN).
    """
    try:
        sock.setsockopt(socket.SOL_SOCKET, SO_RCVBUFFORCE, size)
    except PermissionError:
        sock.setsockopt(socket.SOL_SOCKET, socket.SO_RCVBUF, size)
    return int(sock.getsockopt(socket.SOL_SOCKET, socket.SO_RCVBUF))


def nla(attr_type: int, payload: bytes) -> bytes:
    """One attribute, padded to 4 bytes (include/uapi/linux/netlink.h NLA_ALIGN)."""
    n = 4 + len(payload)
    return NLAHDR.pack(n, attr_type) + payload + b"\0" * (-n & 3)


def nla_nested(attr_type: int, *children: bytes) -> bytes:
    return nla(attr_type | NLA_F_NESTED, b"".join(children))


def parse_nlas(data: bytes | memoryview, offset: int = 0,
               end: int | None = None) -> dict[int, bytes]:
    """Attributes as ``{type: payload}``; the last wins on duplicates.

    Raises ValueError on a truncated or overlong attribute: the kernel never
    sends one, so it means our layout is wrong or the buffer is corrupt.
    """
    out: dict[int, bytes] = {}
    for t, v in iter_nlas(data, offset, end):
        out[t] = v
    return out


def iter_nlas(data: bytes | memoryview, offset: int = 0,
              end: int | None = None) -> Iterator[tuple[int, bytes]]:
    end = len(data) if end is None else end
    while offset + 4 <= end:
        n, t = NLAHDR.unpack_from(data, offset)
        if n < 4 or offset + n > end:
            raise ValueError(f"malformed netlink attribute at {offset} (len {n})")
        yield t & NLA_TYPE_MASK, bytes(data[offset + 4:offset + n])
        offset += (n + 3) & ~3


def genl_family_id(channel: NetlinkChannel, name: str, op: str) -> int:
    """The id the kernel gave the generic netlink family ``name`` (e.g.
    "macsec", "wireguard"): CTRL_CMD_GETFAMILY to the controller. Raises
    :class:`TunnelError` (ENOENT) when the family is not registered (its
    module not loaded)."""
    body = GENLMSGHDR.pack(CTRL_CMD_GETFAMILY, 1, 0) + nla(
        CTRL_ATTR_FAMILY_NAME, name.encode() + b"\0")
    replies = channel.request(op, GENL_ID_CTRL, body)
    attrs = parse_nlas(replies[0][1], GENLMSGHDR.size)
    family: int = struct.unpack("=H", attrs[CTRL_ATTR_FAMILY_ID][:2])[0]
    return family


class NetlinkChannel:
    """A blocking netlink socket of one protocol, optionally in a netns.

    Thread-safe (one lock around each request) so a daemon's executor and a
    failsafe handler may share it. ``sock`` lets a caller pass a socket it
    opened itself (for example inside a namespace by other means).
    """

    def __init__(self, protocol: int, netns: str | None = None,
                 sock: socket.socket | None = None, rcvbuf: int = 4 << 20) -> None:
        self.netns = netns
        if sock is None:
            sock = _open_in_netns(protocol, netns)
        self.sock = sock
        set_rcvbuf(self.sock, rcvbuf)
        self.sock.setsockopt(socket.SOL_SOCKET, socket.SO_SNDBUF, rcvbuf)
        for opt in (NETLINK_CAP_ACK, NETLINK_EXT_ACK):
            with contextlib.suppress(OSError):  # very old kernels: plain errors still work
                self.sock.setsockopt(SOL_NETLINK, opt, 1)
        self.sock.bind((0, 0))
        # one receive buffer for the channel's life: recv(1 MiB) would
        # allocate (and under TCG fault in) a fresh megabyte per reply
        self._buf = bytearray(1 << 18)
        self._seq = 0
        self._lock = threading.Lock()

    def close(self) -> None:
        self.sock.close()

    def __enter__(self) -> NetlinkChannel:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()

    def _next_seq(self) -> int:
        self._seq = (self._seq + 1) & 0xFFFFFFFF or 1
        return self._seq

    def request(self, op: str, msg_type: int, payload: bytes, flags: int = 0,
                dump: bool = False) -> list[tuple[int, bytes]]:
        """Send one request; return the reply messages as (type, payload).

        Without ``dump`` an ACK is requested and a successful request returns
        the replies that came before it (GET requests answer with one).
        """
        flags |= NLM_F_REQUEST | (NLM_F_DUMP if dump else NLM_F_ACK)
        with self._lock:
            seq = self._next_seq()
            self.sock.send(NLMSGHDR.pack(16 + len(payload), msg_type, flags, seq, 0) + payload)
            return self._collect(op, seq, dump)

    def request_many(self, op: str, msgs: list[tuple[int, bytes, int]]) -> list[TunnelError | None]:
        """Pipeline several acked requests; one result (None = ok) per message."""
        return [err for _replies, err in self.request_batch(op, msgs)]

    def request_batch(self, op: str, msgs: list[tuple[int, bytes, int]],
                      ) -> list[tuple[list[tuple[int, bytes]], TunnelError | None]]:
        """Send many acked requests pipelined; per message its replies and
        its result (None = ok), in order.

        Many netlink messages share one ``send`` (up to ~60 KB, so the
        replies of one chunk fit the receive buffer); each carries
        NLM_F_ACK and its own sequence number, and replies and acks are
        matched to their request by that number. The kernel
        (net/netlink/af_netlink.c netlink_rcv_skb) handles the messages of
        one buffer in order and acks each, a failed one included, so one
        failure does not stop the others. A GET's reply comes before its
        ack, so a batch of GETs is a multi-get in one round trip.
        """
        results: list[tuple[list[tuple[int, bytes]], TunnelError | None]] = []
        with self._lock:
            seqs: list[int] = []
            buf = bytearray()
            for msg_type, payload, flags in msgs:
                seq = self._next_seq()
                seqs.append(seq)
                buf += NLMSGHDR.pack(16 + len(payload), msg_type,
                                     flags | NLM_F_REQUEST | NLM_F_ACK, seq, 0) + payload
                if len(buf) > BATCH_BYTES or len(seqs) >= BATCH_MESSAGES:
                    self.sock.send(bytes(buf))
                    buf.clear()
                    results += self._acks(op, seqs)
                    seqs = []
            if buf:
                self.sock.send(bytes(buf))
                results += self._acks(op, seqs)
        return results

    def _recv(self) -> bytes:
        n = self.sock.recv_into(self._buf)
        return bytes(memoryview(self._buf)[:n])

    def _acks(self, op: str, seqs: list[int],
              ) -> list[tuple[list[tuple[int, bytes]], TunnelError | None]]:
        index = {s: i for i, s in enumerate(seqs)}
        replies: list[list[tuple[int, bytes]]] = [[] for _ in seqs]
        errors: list[TunnelError | None] = [None] * len(seqs)
        acked = [False] * len(seqs)
        done = 0
        while done < len(seqs):
            try:
                data = self._recv()
            except OSError as exc:
                # ENOBUFS: the kernel dropped replies (receive buffer full). What
                # it did for the unacked messages is unknown: each fails, so the
                # caller's fail-closed path (retire, block) takes over.
                lost = TunnelError(op, exc.errno or _errno.EIO, "netlink reply lost")
                for k, ok in enumerate(acked):
                    if not ok:
                        errors[k] = lost
                break
            for mtype, mflags, mseq, body in _split(data):
                i = index.get(mseq)
                if i is None:
                    continue   # a late reply to an earlier, abandoned request
                if mtype == NLMSG_ERROR:
                    if not acked[i]:
                        acked[i] = True
                        done += 1
                    errors[i] = _error_of(op, mflags, body)
                else:
                    replies[i].append((mtype, body))
        return list(zip(replies, errors, strict=True))

    def _collect(self, op: str, seq: int, dump: bool) -> list[tuple[int, bytes]]:
        out: list[tuple[int, bytes]] = []
        while True:
            for mtype, mflags, mseq, body in _split(self._recv()):
                if mseq != seq:
                    continue  # a late reply to an earlier, abandoned request
                if mtype == NLMSG_DONE:
                    return out
                if mtype == NLMSG_ERROR:
                    err = _error_of(op, mflags, body)
                    if err is not None:
                        raise err
                    return out
                out.append((mtype, body))
                if not dump and not mflags & NLM_F_MULTI:
                    continue  # the ACK follows


def _split(data: bytes) -> Iterator[tuple[int, int, int, bytes]]:
    off = 0
    while off + 16 <= len(data):
        n, mtype, mflags, mseq, _pid = NLMSGHDR.unpack_from(data, off)
        if n < 16:
            break
        yield mtype, mflags, mseq, data[off + 16:off + n]
        off += (n + 3) & ~3


def _error_of(op: str, mflags: int, body: bytes) -> TunnelError | None:
    (code,) = _ERR.unpack_from(body, 0)
    if code == 0:
        return None
    detail = ""
    if mflags & NLM_F_ACK_TLVS:
        # struct nlmsgerr: error + the request's header (capped: no payload)
        inner_len = NLMSGHDR.unpack_from(body, 4)[0]
        tlv_off = 4 + (16 if mflags & NLM_F_CAPPED else inner_len)
        try:
            msg = parse_nlas(body, (tlv_off + 3) & ~3).get(NLMSGERR_ATTR_MSG, b"")
            detail = msg.rstrip(b"\0").decode("utf-8", "replace")
        except ValueError:
            pass
    return TunnelError(op, -code, detail)


def _open_in_netns(protocol: int, netns: str | None) -> socket.socket:
    if not netns:
        return socket.socket(socket.AF_NETLINK, socket.SOCK_RAW | socket.SOCK_CLOEXEC, protocol)
    with in_netns(netns):
        return socket.socket(socket.AF_NETLINK, socket.SOCK_RAW | socket.SOCK_CLOEXEC, protocol)


class in_netns:
    """Context manager: this thread inside ``netns`` (which must exist;
    pyroute2's ``pushns(name)`` alone would create a missing one)."""

    def __init__(self, netns: str | None) -> None:
        self.netns = netns

    def __enter__(self) -> None:
        if not self.netns:
            return
        from pyroute2 import netns as _netns  # import cost only when namespaces are used

        _netns.pushns()
        try:
            _netns.setns(self.netns, flags=0)
        except OSError as exc:
            _netns.dropns()
            raise TunnelError("enter_netns", exc.errno or _errno.ENOENT, self.netns) from None

    def __exit__(self, *exc: object) -> None:
        if self.netns:
            from pyroute2 import netns as _netns

            _netns.popns()


def open_socket_in_netns(family: int, type_: int, netns: str | None) -> socket.socket:
    """A socket of any kind created inside ``netns`` (tests, encap sockets)."""
    with in_netns(netns):
        return socket.socket(family, type_)
