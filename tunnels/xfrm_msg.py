"""XFRM netlink messages, declared once as data (include/uapi/linux/xfrm.h).

Theory of operation: each kernel structure is one field table of
``(name, struct format)`` pairs whose names are the C member paths verbatim
(``sel.daddr``, ``lft.hard_add_expires_seconds``, ``id.spi``), with the
compiler's padding written out as ``__pad`` fields, so a reader can grep
them against the header. From each table we derive two things:

* a pyroute2 message class (``fields`` + ``nla_map``, pyroute2's own
  declaration style) in :mod:`qkdgate.tunnels.netlink_decode`, used to
  decode dumps for humans and by the unit tests as an independent codec
  (kept apart: importing pyroute2 costs seconds a starved failsafe lacks);
* a :class:`Layout`: one precompiled ``struct.Struct`` for the hot path.
  pyroute2's generic encoder manages ~100 SA add+delete pairs per second
  under TCG; a precompiled layout is an order of magnitude faster.

Big-endian members (``__be32 spi``, ``__be16 dport``) are marked ``>I`` /
``>H`` in the table, as pyroute2 expects; the Layout byte-swaps them itself.
The unit tests check every layout's size against ``sizeof`` from the header.
"""

from __future__ import annotations

import operator
import socket
import struct
from collections.abc import Callable, Iterable, Mapping

from qkdgate.errors import LocalProtocolError

# include/uapi/linux/xfrm.h: enum { XFRM_MSG_BASE = 0x10, ... }
XFRM_MSG_NEWSA, XFRM_MSG_DELSA, XFRM_MSG_GETSA = 0x10, 0x11, 0x12
XFRM_MSG_NEWPOLICY, XFRM_MSG_DELPOLICY, XFRM_MSG_GETPOLICY = 0x13, 0x14, 0x15
XFRM_MSG_ALLOCSPI, XFRM_MSG_ACQUIRE, XFRM_MSG_EXPIRE = 0x16, 0x17, 0x18
XFRM_MSG_UPDPOLICY, XFRM_MSG_UPDSA, XFRM_MSG_POLEXPIRE = 0x19, 0x1A, 0x1B
XFRM_MSG_FLUSHSA, XFRM_MSG_FLUSHPOLICY = 0x1C, 0x1D

# enum xfrm_attr_type_t
(XFRMA_UNSPEC, XFRMA_ALG_AUTH, XFRMA_ALG_CRYPT, XFRMA_ALG_COMP, XFRMA_ENCAP, XFRMA_TMPL,
 XFRMA_SA, XFRMA_POLICY, XFRMA_SEC_CTX, XFRMA_LTIME_VAL, XFRMA_REPLAY_VAL,
 XFRMA_REPLAY_THRESH, XFRMA_ETIMER_THRESH, XFRMA_SRCADDR, XFRMA_COADDR, XFRMA_LASTUSED,
 XFRMA_POLICY_TYPE, XFRMA_MIGRATE, XFRMA_ALG_AEAD, XFRMA_KMADDRESS, XFRMA_ALG_AUTH_TRUNC,
 XFRMA_MARK, XFRMA_TFCPAD, XFRMA_REPLAY_ESN_VAL, XFRMA_SA_EXTRA_FLAGS, XFRMA_PROTO,
 XFRMA_ADDRESS_FILTER, XFRMA_PAD, XFRMA_OFFLOAD_DEV, XFRMA_SET_MARK, XFRMA_SET_MARK_MASK,
 XFRMA_IF_ID) = range(32)

XFRM_MODE_TRANSPORT, XFRM_MODE_TUNNEL = 0, 1
XFRM_POLICY_IN, XFRM_POLICY_OUT, XFRM_POLICY_FWD = 0, 1, 2
XFRM_POLICY_ALLOW, XFRM_POLICY_BLOCK = 0, 1
XFRM_STATE_AF_UNSPEC, XFRM_STATE_ESN = 32, 128
XFRM_INF = 0xFFFFFFFFFFFFFFFF          # include/net/xfrm.h: ~(__u64)0
UDP_ENCAP_ESPINUDP = 2                 # include/uapi/linux/udp.h, RFC 3948
IP_XFRM_POLICY, IPV6_XFRM_POLICY = 17, 35   # include/uapi/linux/in.h, in6.h
UDP_ENCAP = 100                        # setsockopt(SOL_UDP, UDP_ENCAP, ...)


class Layout:
    """A precompiled struct layout from a field table (see module doc)."""

    def __init__(self, name: str, fields: Iterable[tuple[str, str]]) -> None:
        self.name = name
        self.fields = tuple(fields)
        fmt, self.names, self._swap = "=", [], {}
        for fname, f in self.fields:
            if f.endswith("x"):
                fmt += f
                continue
            if f.startswith(">"):
                self._swap[fname] = socket.htonl if f[1] == "I" else socket.htons
                f = f[1:]
            fmt += f
            self.names.append(fname)
        self.struct = struct.Struct(fmt)
        self.size = self.struct.size
        self._index = {n: i for i, n in enumerate(self.names)}
        self._zero = tuple(b"" if f.endswith("s") else 0 for _n, f in self.fields
                           if not f.endswith("x"))
        self._ints = frozenset(n for n, f in self.fields if not f.endswith(("x", "s")))

    def pack(self, values: Mapping[str, int | bytes]) -> bytes:
        """Every field from ``values``, zero where absent. Only the given
        fields are visited (issue 19: walking all ~40 of xfrm_usersa_info
        for each of thousands of SAs per rekey was the costliest line of
        the netlink layer under TCG); a name the layout lacks is our bug."""
        args: list[int | bytes] = list(self._zero)
        index, sw = self._index, self._swap
        for n, v in values.items():
            i = index.get(n)
            if i is None:
                raise LocalProtocolError(f"{self.name} has no field {n!r}")
            args[i] = sw[n](num(values, n)) if n in sw else v
        return self.struct.pack(*args)

    def unpack(self, buf: bytes | memoryview, offset: int = 0) -> dict[str, int | bytes]:
        """The fields by name: ``int`` for integer formats, ``bytes`` for
        ``s`` formats; read them with :func:`num` and :func:`raw`."""
        out: dict[str, int | bytes] = dict(
            zip(self.names, self.struct.unpack_from(buf, offset), strict=True))
        for n, fn in self._swap.items():
            out[n] = fn(num(out, n))  # htonl is its own inverse
        return out

    def int_reader(self, *names: str) -> Callable[[bytes | memoryview], tuple[int, ...]]:
        """A function that unpacks only the integer fields ``names`` of a
        buffer starting with this layout, in that order, without building
        :meth:`unpack`'s dict (the decode of every SA read back or polled)."""
        bad = [n for n in names if n not in self._ints]
        if bad:
            raise LocalProtocolError(f"{self.name}: not integer fields: {', '.join(bad)}")
        unpack_from = self.struct.unpack_from
        pick = operator.itemgetter(*(self._index[n] for n in names), 0)  # always a tuple
        swaps = [(k, self._swap[n]) for k, n in enumerate(names) if n in self._swap]
        count = len(names)

        def read(buf: bytes | memoryview) -> tuple[int, ...]:
            vals = pick(unpack_from(buf))
            if not swaps:
                return vals[:count]  # type: ignore[no-any-return]
            out = list(vals[:count])
            for k, fn in swaps:
                out[k] = fn(out[k])
            return tuple(out)
        return read

    def offset(self, name: str) -> int:
        """Byte offset of field ``name`` (a byte string read by slicing)."""
        for i, (n, _f) in enumerate(self.fields):
            if n == name:
                return struct.calcsize("=" + "".join(f.lstrip(">") for _n, f in self.fields[:i]))
        raise LocalProtocolError(f"{self.name} has no field {name!r}")


def num(values: Mapping[str, int | bytes], name: str) -> int:
    """An integer field of an unpacked layout (a bytes value is our bug)."""
    v = values[name]
    if not isinstance(v, int):
        raise LocalProtocolError(f"XFRM field {name} is bytes, not an integer")
    return v


def raw(values: Mapping[str, int | bytes], name: str) -> bytes:
    """A byte-string field of an unpacked layout (an integer is our bug)."""
    v = values[name]
    if not isinstance(v, bytes):
        raise LocalProtocolError(f"XFRM field {name} is an integer, not bytes")
    return v


def _prefixed(prefix: str, fields: Iterable[tuple[str, str]]) -> list[tuple[str, str]]:
    return [(f"{prefix}.{n}" if not n.startswith("__") else f"__{prefix}{n}", f) for n, f in fields]


# xfrm_address_t is a 16-byte union (a4 / a6 / in6): kept as raw bytes.
xfrm_selector = [
    ("daddr", "16s"), ("saddr", "16s"),
    ("dport", ">H"), ("dport_mask", ">H"), ("sport", ">H"), ("sport_mask", ">H"),
    ("family", "H"), ("prefixlen_d", "B"), ("prefixlen_s", "B"), ("proto", "B"),
    ("__pad", "3x"), ("ifindex", "i"), ("user", "I"),
]
xfrm_id = [("daddr", "16s"), ("spi", ">I"), ("proto", "B"), ("__pad", "3x")]
xfrm_lifetime_cfg = [(n, "Q") for n in (
    "soft_byte_limit", "hard_byte_limit", "soft_packet_limit", "hard_packet_limit",
    "soft_add_expires_seconds", "hard_add_expires_seconds",
    "soft_use_expires_seconds", "hard_use_expires_seconds")]
xfrm_lifetime_cur = [(n, "Q") for n in ("bytes", "packets", "add_time", "use_time")]
xfrm_stats = [("replay_window", "I"), ("replay", "I"), ("integrity_failed", "I")]

xfrm_usersa_info = (_prefixed("sel", xfrm_selector) + _prefixed("id", xfrm_id)
                    + [("saddr", "16s")] + _prefixed("lft", xfrm_lifetime_cfg)
                    + _prefixed("curlft", xfrm_lifetime_cur) + _prefixed("stats", xfrm_stats)
                    + [("seq", "I"), ("reqid", "I"), ("family", "H"), ("mode", "B"),
                       ("replay_window", "B"), ("flags", "B"), ("__pad", "7x")])
xfrm_usersa_id = [("daddr", "16s"), ("spi", ">I"), ("family", "H"), ("proto", "B"),
                  ("__pad", "x")]
xfrm_userspi_info = [*_prefixed("info", xfrm_usersa_info), ("min", "I"), ("max", "I")]
xfrm_userpolicy_info = [*_prefixed("sel", xfrm_selector), *_prefixed("lft", xfrm_lifetime_cfg),
                        *_prefixed("curlft", xfrm_lifetime_cur),
                        ("priority", "I"), ("index", "I"), ("dir", "B"), ("action", "B"),
                        ("flags", "B"), ("share", "B"), ("__pad", "4x")]
xfrm_userpolicy_id = [*_prefixed("sel", xfrm_selector), ("index", "I"), ("dir", "B"),
                      ("__pad", "3x")]
xfrm_user_tmpl = [*_prefixed("id", xfrm_id),
                  ("family", "H"), ("__pad1", "2x"), ("saddr", "16s"), ("reqid", "I"),
                  ("mode", "B"), ("share", "B"), ("optional", "B"), ("__pad2", "x"),
                  ("aalgos", "I"), ("ealgos", "I"), ("calgos", "I")]
xfrm_algo_aead = [("alg_name", "64s"), ("alg_key_len", "I"), ("alg_icv_len", "I")]  # + alg_key[]
xfrm_replay_state_esn = [("bmp_len", "I"), ("oseq", "I"), ("seq", "I"), ("oseq_hi", "I"),
                         ("seq_hi", "I"), ("replay_window", "I")]               # + bmp[]
xfrm_encap_tmpl = [("encap_type", "H"), ("encap_sport", ">H"), ("encap_dport", ">H"),
                   ("__pad", "2x"), ("encap_oa", "16s")]
xfrm_mark = [("v", "I"), ("m", "I")]
xfrm_user_expire = [*_prefixed("state", xfrm_usersa_info), ("hard", "B"), ("__pad", "7x")]

USERSA_INFO = Layout("xfrm_usersa_info", xfrm_usersa_info)
USERSA_ID = Layout("xfrm_usersa_id", xfrm_usersa_id)
USERSPI_INFO = Layout("xfrm_userspi_info", xfrm_userspi_info)
USERPOLICY_INFO = Layout("xfrm_userpolicy_info", xfrm_userpolicy_info)
USERPOLICY_ID = Layout("xfrm_userpolicy_id", xfrm_userpolicy_id)
USER_TMPL = Layout("xfrm_user_tmpl", xfrm_user_tmpl)
ALGO_AEAD = Layout("xfrm_algo_aead", xfrm_algo_aead)
REPLAY_ESN = Layout("xfrm_replay_state_esn", xfrm_replay_state_esn)
ENCAP_TMPL = Layout("xfrm_encap_tmpl", xfrm_encap_tmpl)
MARK = Layout("xfrm_mark", xfrm_mark)
LIFETIME_CUR = Layout("xfrm_lifetime_cur", xfrm_lifetime_cur)
USER_EXPIRE = Layout("xfrm_user_expire", xfrm_user_expire)

# sizeof() of each structure on x86_64 (checked by tests/unit/test_xfrm_msg.py
# against the same numbers printed by a C program including <linux/xfrm.h>).
SIZEOF = {"xfrm_usersa_info": 224, "xfrm_usersa_id": 24, "xfrm_userspi_info": 232,
          "xfrm_userpolicy_info": 168, "xfrm_userpolicy_id": 64, "xfrm_user_tmpl": 64,
          "xfrm_algo_aead": 72, "xfrm_replay_state_esn": 24, "xfrm_encap_tmpl": 24,
          "xfrm_mark": 8, "xfrm_lifetime_cur": 32, "xfrm_user_expire": 232}
