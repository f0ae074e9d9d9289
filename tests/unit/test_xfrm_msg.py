"""XFRM message encoding: layouts against the kernel ABI, against pyroute2's
own codec, and the attributes an SA install carries."""

from __future__ import annotations

import ipaddress
import socket
import struct

import pytest

from qkdgate.errors import LocalProtocolError
from qkdgate.interfaces import (
    Direction,
    Lifetime,
    Mark,
    Mode,
    PolicySpec,
    SaId,
    SaSpec,
    Selector,
    Template,
    UdpEncap,
)
from qkdgate.keymix.secret import SecretBytes
from qkdgate.tunnels import netlink_decode
from qkdgate.tunnels import xfrm_msg as m
from qkdgate.tunnels.netlink import NLA_F_NESTED, nla, parse_nlas
from qkdgate.tunnels.xfrm import XfrmBackend, _decode_policy, _decode_sa

A, B = ipaddress.ip_address("192.0.2.1"), ipaddress.ip_address("198.51.100.7")
KEY = SecretBytes(bytes(range(36)))
LAYOUTS = [v for v in vars(m).values() if isinstance(v, m.Layout)]


class _NoKernel:
    def request(self, *a, **k):  # pragma: no cover - must not be reached
        raise AssertionError("no kernel in message tests")


def backend(**kw) -> XfrmBackend:
    return XfrmBackend(channel=_NoKernel(), **kw)


@pytest.mark.parametrize("layout", LAYOUTS, ids=lambda l: l.name)
def test_layout_size_matches_kernel_sizeof(layout):
    # numbers printed by a C program including <linux/xfrm.h> on x86_64
    assert layout.size == m.SIZEOF[layout.name]


def test_field_names_are_the_header_member_paths():
    names = m.USERSA_INFO.names
    for n in ("sel.daddr", "sel.prefixlen_d", "id.spi", "saddr", "lft.hard_add_expires_seconds",
              "curlft.add_time", "stats.integrity_failed", "reqid", "replay_window", "flags"):
        assert n in names
    assert "alg_icv_len" in m.ALGO_AEAD.names and "bmp_len" in m.REPLAY_ESN.names


def test_usersa_id_known_bytes():
    raw = m.USERSA_ID.pack({"daddr": A.packed.ljust(16, b"\0"), "spi": 0xC0010203,
                            "family": socket.AF_INET, "proto": 50})
    assert raw == (bytes([192, 0, 2, 1]) + bytes(12) + bytes.fromhex("c0010203")
                   + struct.pack("=H", 2) + b"\x32\x00")


def test_pack_unpack_round_trip_and_pyroute2_agrees():
    v = {"sel.family": 2, "sel.dport": 4500, "sel.dport_mask": 0xFFFF, "id.spi": 0xDEADBEEF,
         "id.proto": 50, "id.daddr": B.packed.ljust(16, b"\0"), "reqid": 77, "family": 2,
         "mode": 1, "flags": m.XFRM_STATE_ESN, "lft.hard_add_expires_seconds": 600,
         "curlft.bytes": 12345, "stats.replay": 3}
    raw = m.USERSA_INFO.pack(v)
    back = m.USERSA_INFO.unpack(raw)
    for k, val in v.items():
        assert back[k] == val
    # pyroute2's generic decoder reads the same bytes with the same table
    msg = netlink_decode.xfrm_usersa_info_msg(raw)
    msg.ft_decode(0)
    assert msg["id.spi"] == 0xDEADBEEF and msg["sel.dport"] == 4500
    assert msg["reqid"] == 77 and msg["lft.hard_add_expires_seconds"] == 600


def test_sa_message_carries_aead_esn_window_lifetime_backstop():
    be = backend(default_hard_seconds=1000)
    spec = SaSpec(key=KEY, reqid=9, replay_window=1024)
    raw = be._sa_message(SaId(A, B, 0xC0000101), spec)
    v = m.USERSA_INFO.unpack(raw)
    assert v["id.spi"] == 0xC0000101 and v["reqid"] == 9 and v["mode"] == m.XFRM_MODE_TUNNEL
    assert v["replay_window"] == 0          # must be 0 with XFRMA_REPLAY_ESN_VAL (verify_replay)
    assert v["flags"] & m.XFRM_STATE_ESN
    assert v["lft.hard_add_expires_seconds"] == 1000 and v["lft.soft_add_expires_seconds"] == 900
    assert v["lft.hard_byte_limit"] == m.XFRM_INF
    assert v["sel.family"] == socket.AF_INET  # a zero family would never match a flow
    attrs = parse_nlas(raw, m.USERSA_INFO.size)
    aead = m.ALGO_AEAD.unpack(attrs[m.XFRMA_ALG_AEAD])
    assert aead["alg_name"].rstrip(b"\0") == b"rfc4106(gcm(aes))"
    assert aead["alg_key_len"] == 288 and aead["alg_icv_len"] == 128
    assert attrs[m.XFRMA_ALG_AEAD][m.ALGO_AEAD.size:] == KEY.reveal()
    esn = m.REPLAY_ESN.unpack(attrs[m.XFRMA_REPLAY_ESN_VAL])
    assert esn["replay_window"] == 1024 and esn["bmp_len"] == 32
    assert len(attrs[m.XFRMA_REPLAY_ESN_VAL]) == 24 + 4 * 32
    assert m.XFRMA_ENCAP not in attrs and m.XFRMA_MARK not in attrs


def test_sa_message_explicit_lifetime_encap_mark_ifid_ipv6_transport():
    a6, b6 = ipaddress.ip_address("2001:db8::1"), ipaddress.ip_address("2001:db8::2")
    spec = SaSpec(key=KEY, reqid=5, mode=Mode.TRANSPORT, esn=False, replay_window=32,
                  lifetime=Lifetime(soft_add_seconds=50, hard_add_seconds=60, hard_bytes=10**9),
                  encap=UdpEncap(4500, 4501))
    raw = backend()._sa_message(SaId(a6, b6, 0x1234, mark=Mark(7, 0xFF), if_id=42), spec)
    v = m.USERSA_INFO.unpack(raw)
    assert v["family"] == socket.AF_INET6 and v["id.daddr"] == b6.packed
    assert v["replay_window"] == 32 and not v["flags"] & m.XFRM_STATE_ESN
    assert v["mode"] == m.XFRM_MODE_TRANSPORT
    assert (v["lft.hard_add_expires_seconds"], v["lft.soft_add_expires_seconds"]) == (60, 50)
    assert v["lft.hard_byte_limit"] == 10**9
    attrs = parse_nlas(raw, m.USERSA_INFO.size)
    assert m.XFRMA_REPLAY_ESN_VAL not in attrs
    enc = m.ENCAP_TMPL.unpack(attrs[m.XFRMA_ENCAP])
    assert (enc["encap_type"], enc["encap_sport"], enc["encap_dport"]) == (2, 4500, 4501)
    assert attrs[m.XFRMA_ENCAP][2:6] == bytes.fromhex("11941195")   # network byte order
    assert m.MARK.unpack(attrs[m.XFRMA_MARK]) == {"v": 7, "m": 0xFF}
    assert struct.unpack("=I", attrs[m.XFRMA_IF_ID])[0] == 42


def test_reserved_spi_refused_before_the_kernel():
    with pytest.raises(ValueError):
        SaId(A, B, 0x10)


def test_policy_message_and_decode_round_trip():
    sel = Selector(ipaddress.ip_network("10.1.0.0/16"), ipaddress.ip_network("10.2.3.0/24"),
                   proto=17, dport=5000)
    p = PolicySpec(sel, Direction.FWD, template=Template(B, A, reqid=0x10000), priority=900,
                   mark=Mark(3), if_id=8)
    raw = backend()._policy_message(p)
    assert len(raw) == m.USERPOLICY_INFO.size + 4 + m.USER_TMPL.size + 4 + 8 + 4 + 4
    back = _decode_policy(raw)
    assert back.selector == sel and back.direction is Direction.FWD
    assert back.template == p.template and back.priority == 900
    assert back.mark == Mark(3) and back.if_id == 8


def test_decode_sa_reads_counters_and_hides_nothing_it_should_not():
    be = backend()
    raw = be._sa_message(SaId(A, B, 0xC0000999), SaSpec(key=KEY, reqid=3))
    v = m.USERSA_INFO.unpack(raw)
    v.update({"curlft.bytes": 1000, "curlft.packets": 10, "stats.integrity_failed": 2})
    st = _decode_sa(m.USERSA_INFO.pack(v) + raw[m.USERSA_INFO.size:])
    assert (st.sa_id.spi, st.reqid, st.aead, st.key_bits, st.icv_bits) == \
        (0xC0000999, 3, "rfc4106(gcm(aes))", 288, 128)
    assert (st.bytes, st.packets, st.integrity_failed, st.replay_window) == (1000, 10, 2, 1024)
    assert (st.sa_id.src, st.sa_id.dst, st.sa_id.proto) == (A, B, socket.IPPROTO_ESP)
    assert "key" not in repr(st).lower().replace("key_bits", "")


def test_mixed_family_selector_refused():
    sel = Selector(ipaddress.ip_network("10.0.0.0/8"), ipaddress.ip_network("2001:db8::/32"))
    with pytest.raises(LocalProtocolError):
        backend()._policy_message(PolicySpec(sel, Direction.OUT))


def test_nested_attribute_flag_and_malformed_attributes():
    assert struct.unpack_from("=HH", nla(5 | NLA_F_NESTED, b""))[1] & NLA_F_NESTED
    with pytest.raises(ValueError):
        parse_nlas(struct.pack("=HH", 40, 1) + b"abcd")


def test_no_limit_is_inf_for_counts_but_zero_for_seconds():
    # XFRM_INF in a *_seconds field overflows add_time + seconds in the
    # kernel's timer and expires the SA (or policy) at once.
    raw = backend()._sa_message(SaId(A, B, 0x4000), SaSpec(key=KEY, reqid=1))
    v = m.USERSA_INFO.unpack(raw)
    assert v["lft.soft_use_expires_seconds"] == 0 and v["lft.hard_use_expires_seconds"] == 0
    assert v["lft.hard_packet_limit"] == m.XFRM_INF
    sel = Selector(ipaddress.ip_network("10.0.0.0/8"), ipaddress.ip_network("10.1.0.0/16"))
    pv = m.USERPOLICY_INFO.unpack(backend()._policy_message(PolicySpec(sel, Direction.IN)))
    assert all(pv[f"lft.{n}"] == 0 for n, _ in m.xfrm_lifetime_cfg if n.endswith("seconds"))
    assert pv["lft.soft_byte_limit"] == m.XFRM_INF


from hypothesis import given, settings  # noqa: E402
from hypothesis import strategies as st  # noqa: E402


@settings(max_examples=300, deadline=None)
@given(st.binary(max_size=200))
def test_attribute_parser_parses_or_raises_valueerror(data):
    try:
        attrs = parse_nlas(data)
    except ValueError:
        return
    assert all(0 <= t <= 0x3FFF for t in attrs)


@given(st.lists(st.tuples(st.integers(0, 0x3FFF), st.binary(max_size=40)), max_size=8))
def test_attribute_round_trip(items):
    raw = b"".join(nla(t, v) for t, v in items)
    assert len(raw) % 4 == 0
    from qkdgate.tunnels.netlink import iter_nlas
    assert list(iter_nlas(raw)) == items


@pytest.mark.parametrize("layout", LAYOUTS, ids=lambda la: la.name)
def test_fast_readers_agree_with_unpack_and_pack_rejects_unknown_fields(layout):
    """Layout.pack visits only the given fields, int_reader and offset read
    without unpack's dict (issue 19): both must give what unpack gives."""
    values = {}
    for i, n in enumerate(layout.names):
        fmt = dict(layout.fields)[n].lstrip(">")
        if fmt.endswith("s"):
            values[n] = bytes([i + 1]) * int(fmt[:-1] or 1)
        else:
            values[n] = (i * 0x01010101 + 1) & ((1 << (8 * struct.calcsize(fmt))) - 1)
    buf = layout.pack(values)
    assert layout.unpack(buf) == values
    ints = [n for n in layout.names if not dict(layout.fields)[n].endswith("s")]
    assert layout.int_reader(*ints)(buf) == tuple(values[n] for n in ints)
    for n in layout.names:
        if dict(layout.fields)[n].endswith("s"):
            at = layout.offset(n)
            assert buf[at:at + len(values[n])] == values[n]
            with pytest.raises(LocalProtocolError, match="not integer fields"):
                layout.int_reader(n)
    with pytest.raises(LocalProtocolError, match="no field 'nonexistent'"):
        layout.pack({"nonexistent": 1})
