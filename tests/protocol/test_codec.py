"""Wire codec and fragmentation: layouts from docs/protocol.md, bounds."""

from __future__ import annotations

import struct
import uuid

import pytest

from qkdgate.errors import LocalProtocolError, RemoteProtocolError
from qkdgate.gateway.protocol import fragment as F
from qkdgate.gateway.protocol import messages as m

KID = str(uuid.UUID(int=0x1234, version=4))


def init_values(**over):
    v = {"generation_min": 7, "nonce": b"\x11" * 32, "kem_id": 1, "kem_public": b"\x22" * 1184,
         "x25519_public": b"\x33" * 32, "qkd_mode": m.QkdMode.KEYS, "qkd_reason": 0,
         "qkd_flags": m.QKD_FLAG_PQC_OK, "key_ids": (KID,),
         "spis": (("t1", "ipsec", 0xC0000001), ("m1", "macsec", 2)),
         "signer_id": b"\x44" * 8, "ed25519_sig": b"\x55" * 64}
    v.update(over)
    return v


def test_init_layout_matches_the_document():
    core = m.encode_core(m.MsgType.INIT, 0xAAAAAAAAAAAAAAAA, 0, 3, init_values())
    # header: type 1, version 1, flags 0, sender epoch, receiver epoch, exchange id
    assert core[:24] == bytes([1, 1, 0, 0]) + b"\xaa" * 8 + bytes(8) + struct.pack("!I", 3)
    assert core[24:32] == struct.pack("!Q", 7)
    assert core[32:64] == b"\x11" * 32
    assert core[64:66] == b"\x00\x01"                       # kem id
    assert core[66:68] == struct.pack("!H", 1184)
    pos = 68 + 1184
    assert core[pos:pos + 2] == b"\x00\x20"
    pos += 34
    assert core[pos:pos + 3] == bytes([1, 0, 1])            # QKD mode, reason, flags
    assert core[pos + 3] == 1 and core[pos + 4:pos + 20] == uuid.UUID(KID).bytes
    pos += 20
    assert core[pos:pos + 2] == b"\x00\x02" and core[pos + 2:pos + 5] == b"\x02t1"   # u16 count
    wire = m.seal(core, b"k" * 32, b"c" * 16)
    assert wire[len(core)] == 16 and len(wire) == len(core) + 1 + 16 + 16
    msg = m.decode(wire)
    assert msg.core == core and msg.cookie == b"c" * 16 and msg["key_ids"] == (KID,)
    assert msg.prefix("ed25519_sig") == core[:-64]


@pytest.mark.parametrize("over,why", [
    (dict(kem_id=9), "unknown KEM"),
    (dict(qkd_mode=9), "QKD mode"),
    (dict(qkd_mode=m.QkdMode.USING, key_ids=()), "USING"),
    (dict(qkd_mode=m.QkdMode.NONE), "key IDs present"),
    (dict(qkd_flags=0x80), "reserved"),
    (dict(x25519_public=b"x" * 31), "X25519"),
    (dict(spis=(("t1", "ipsec", 5),)), "reserved"),
    (dict(spis=(("m1", "macsec", 4),)), "AN"),
    (dict(spis=(("w1", "wireguard", 1),)), "not 0"),
    (dict(spis=(("s1", "strongswan", 0x100),)), "not 0"),
    (dict(spis=(("t1", "ipsec", 0x1000), ("t1", "ipsec", 0x1001))), "repeated"),
    (dict(key_ids=(KID, KID)), "duplicate"),
])
def test_domain_errors_are_remote_errors(over, why):
    core = m.encode_core(m.MsgType.INIT, 1, 0, 1, init_values(**over))
    with pytest.raises(RemoteProtocolError, match=why):
        m.decode(m.seal(core, b"k"))


def test_header_errors():
    core = bytearray(m.encode_core(m.MsgType.DONE, 1, 2, 3, {"generation": 1, "tag": bytes(32)}))
    for pos, val, why in [(0, 99, "type"), (1, 2, "version"), (3, 1, "flags")]:
        bad = bytearray(core)
        bad[pos] = val
        with pytest.raises(RemoteProtocolError, match=why):
            m.decode(m.seal(bytes(bad), b"k"))
    zero_epoch = bytes(core[:4]) + bytes(8) + bytes(core[12:])
    with pytest.raises(RemoteProtocolError, match="epoch"):
        m.decode(m.seal(zero_epoch, b"k"))
    with pytest.raises(RemoteProtocolError, match="trailing"):
        m.decode(m.seal(bytes(core), b"k") + b"x")
    with pytest.raises(RemoteProtocolError, match="truncated"):
        m.decode(bytes(core[:30]))


def test_mac1():
    wire = m.seal(b"core-bytes-" * 3, m.mac1_key("gw-b", b"psk" * 6))
    assert m.check_mac1(wire, m.mac1_key("gw-b", b"psk" * 6))
    assert not m.check_mac1(wire, m.mac1_key("gw-b", None))
    assert not m.check_mac1(wire, m.mac1_key("gw-a", b"psk" * 6))
    assert not m.check_mac1(wire[:-1] + bytes([wire[-1] ^ 1]), m.mac1_key("gw-b", b"psk" * 6))


def test_transcript_hash_binds_names_psk_and_both_messages():
    base = m.transcript_hash(None, "a", "b", b"init", b"resp")
    assert len(base) == 32
    assert base != m.transcript_hash(b"p" * 16, "a", "b", b"init", b"resp")
    assert base != m.transcript_hash(None, "b", "a", b"init", b"resp")
    assert base != m.transcript_hash(None, "a", "b", b"initr", b"esp")   # framing


def test_fragment_layout_and_limits():
    msg = bytes(range(256)) * 10     # 2560 bytes -> 3 fragments
    ds = F.fragment(msg, 0x01020304)
    assert [len(d) for d in ds] == [1200, 1200, 16 + 2560 - 2 * 1184]
    assert ds[1][:16] == b"QG\x02\x00\x01\x02\x03\x04\x00\x01\x00\x03" + struct.pack("!I", 2560)
    with pytest.raises(LocalProtocolError):
        F.fragment(b"x" * (F.MAX_MESSAGE + 1), 1)
    r = F.Reassembler()
    assert r.feed(ds[2], 0) is None and r.feed(ds[2], 0) is None   # duplicate ignored
    assert r.feed(ds[0], 0) is None and r.feed(ds[1], 0) == msg
    assert r.pending == 0


def test_reassembly_bounds_eviction_timeout_and_conflicts():
    r = F.Reassembler(max_partial=2, timeout=10)
    parts = [F.fragment(bytes([i]) * 3000, i) for i in range(3)]
    r.feed(parts[0][0], 0)
    r.feed(parts[1][0], 1)
    r.feed(parts[2][0], 2)                      # evicts message 0
    assert r.pending == 2 and r.evicted == 1
    assert r.feed(parts[0][1], 3) is None and r.feed(parts[0][2], 3) is None   # restarted
    r.expire(20)
    assert r.pending == 0
    good = F.fragment(b"a" * 3000, 9)
    evil = F.fragment(b"b" * 3000, 9)
    r.feed(good[0], 30)
    with pytest.raises(RemoteProtocolError, match="conflicting"):
        r.feed(evil[0], 30)
    assert r.pending == 0
    r.feed(good[0], 31)
    with pytest.raises(RemoteProtocolError, match="disagree"):
        r.feed(F.fragment(b"a" * 2000, 9)[0], 31)
    for bad, why in [(b"XX" + good[0][2:], "magic"), (good[0][:2] + b"\x01" + good[0][3:], "version"),
                     (good[0][:-1], "carries"), (good[0] + b"x", "exceeds"),
                     (good[0][:8] + b"\x00\x05" + good[0][10:], "index")]:
        with pytest.raises(RemoteProtocolError, match=why):
            F.parse_header(bad)


def test_consumer_kinds_round_trip_with_their_wire_ids():
    """docs/protocol.md 4.2: kind 3 = WireGuard, 4 = strongSwan, value 0."""
    entries = (("a", "ipsec", 0x100), ("b", "macsec", 3), ("c", "wireguard", 0),
               ("d", "strongswan", 0))
    core = m.encode_core(m.MsgType.INIT, 1, 0, 1, init_values(spis=entries))
    assert m.decode(m.seal(core, b"k"))["spis"] == entries
    for tid, kind_id in ((b"c", 3), (b"d", 4)):
        at = core.index(bytes([1]) + tid)
        assert core[at + 2:at + 7] == bytes([kind_id]) + bytes(4)


def test_unknown_tunnel_kind_is_a_remote_error():
    core = m.encode_core(m.MsgType.INIT, 1, 0, 1, init_values(spis=(("c", "wireguard", 0),)))
    at = core.index(b"\x01c") + 2
    bad = core[:at] + b"\x05" + core[at + 1:]
    with pytest.raises(RemoteProtocolError, match="unknown tunnel kind 5"):
        m.decode(m.seal(bad, b"k"))
