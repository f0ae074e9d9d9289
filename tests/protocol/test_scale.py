"""No structural limit on tunnels per peer (issue 19): one exchange keys
4,096 tunnels, their SPI list carried by the fragment layer; and the bounds
that keep a flood of fragments from costing more than a stated amount of
memory (docs/protocol.md 3.2)."""

from __future__ import annotations

import os
import struct
import time

import pytest
from protocol_harness import assert_keys_match, make_pair

from qkdgate.errors import LocalProtocolError, RemoteProtocolError
from qkdgate.gateway.protocol import constants as C
from qkdgate.gateway.protocol import events as E
from qkdgate.gateway.protocol import fragment as F
from qkdgate.gateway.protocol import messages as m
from qkdgate.gateway.protocol.config import SessionConfig, TunnelRef


def many(n: int) -> tuple[TunnelRef, ...]:
    # names as long as the config allows (63 characters): the largest messages
    ipsec = [TunnelRef(f"t{i:05d}" + "x" * 57, "ipsec") for i in range(n - 1)]
    return (*ipsec, TunnelRef("m1", "macsec"))


def test_4096_tunnels_are_keyed_by_one_exchange():
    p = make_pair(tunnels=many(4096))
    t0 = time.perf_counter()
    p.roundtrip_until_done()
    took = time.perf_counter() - t0
    a_in, b_in = p.a.of(E.InstallInbound), p.b.of(E.InstallInbound)
    assert len(a_in) == len(b_in) == 1                       # one exchange, all tunnels
    assert len(a_in[0].spis) == len(b_in[0].spis) == 4096
    assert_keys_match(p, 1)
    # INIT and RESP really were cut into many datagrams (> 255 entries: u16 count)
    assert all(len(d) <= F.MAX_DATAGRAM for _, d in p.log)
    assert len(p.log) > 2 * 4096 * 69 // F.FRAGMENT_PAYLOAD
    print(f"4096 tunnels: exchange in {took:.2f} s host CPU, {len(p.log)} datagrams")


def test_more_tunnels_than_the_bound_is_a_config_error():
    from qkdgate.errors import ConfigError
    tunnels = tuple(TunnelRef(f"t{i}") for i in range(C.MAX_SPIS + 1))
    with pytest.raises(ConfigError, match="at most 4096"):
        SessionConfig(local_name="a", peer_name="b", tunnels=tunnels).validate()
    with pytest.raises(LocalProtocolError, match="at most 4096"):
        m.encode_fields(m.MsgType.RESP, {"spis": [(t.tunnel_id, "ipsec", 0x100)
                                                  for t in tunnels]}, "spis")


def test_a_spi_list_above_the_bound_is_refused_by_the_decoder():
    raw = struct.pack("!H", C.MAX_SPIS + 1)
    r = m._Reader(raw)
    with pytest.raises(RemoteProtocolError, match="4097 tunnel entries"):
        m._dec(r, "spis", "spis")


def test_limits_scale_with_the_peers_tunnels():
    small, big = F.message_limit(["t1", "m1"]), F.message_limit(t.tunnel_id for t in many(4096))
    assert small == C.MESSAGE_FIXED + C.MESSAGE_SLACK + 2 * 8 < 25_000
    assert big == C.MESSAGE_FIXED + C.MESSAGE_SLACK + 4095 * 69 + 8 < C.MAX_MESSAGE
    assert F.MAX_FRAGMENTS == -(-C.MAX_MESSAGE // F.FRAGMENT_PAYLOAD) < 2 ** 16


def test_an_oversized_message_is_refused_on_its_first_fragment():
    p = make_pair()                     # two tunnels: limit about 25 KB
    sess = p.b.session
    limit = sess._reasm.max_message
    huge = F.fragment(os.urandom(limit + 1), 7)
    with pytest.raises(F.MessageTooLarge, match=f"exceeds this peer's limit of {limit}"):
        F.Reassembler(max_message=limit).feed(huge[0], 0.0)
    for d in huge:                      # the session counts and drops every one of them
        sess.receive_datagram(d, 1000.0)
    assert sess.stats["violation_fragment"] == len(huge)
    assert sess._reasm.pending == 0 and sess._reasm.buffered_bytes == 0
    p.b.pump(1000.0)
    assert [e for e in p.b.of(E.ProtocolViolation) if "exceeds" in e.detail]


def test_a_garbage_fragment_stream_keeps_memory_bounded():
    """Random headers, every length up to the limit, never-completed messages
    from fresh message ids: memory stays under MAX_PARTIAL x the limit, and
    nothing raises out of the session."""
    p = make_pair()
    sess = p.b.session
    limit = sess._reasm.max_message
    rnd = __import__("random").Random(5)
    high = 0
    for i in range(5000):
        kind = i % 4
        if kind == 0:                   # pure noise
            d = rnd.randbytes(rnd.randrange(1, 1400))
        else:                           # well-formed fragments of messages never finished
            total = rnd.randrange(F.FRAGMENT_PAYLOAD * 2, limit + 1)
            count = -(-total // F.FRAGMENT_PAYLOAD)
            d = F.HEADER.pack(F.MAGIC, F.VERSION, 0, rnd.getrandbits(32), 0, count, total) \
                + rnd.randbytes(F.FRAGMENT_PAYLOAD)
        sess.receive_datagram(d, 1000.0 + i * 0.001)
        high = max(high, sess._reasm.buffered_bytes)
    assert sess._reasm.pending <= C.MAX_PARTIAL
    assert high <= C.MAX_PARTIAL * limit
    assert sess.stats["violation_fragment"] > 1000
    assert not sess.failed


class _Cand:
    def __init__(self, epoch, signers, mac_ok=True, limit=30_000):
        self.epoch, self.signers, self.mac_ok, self.max_message = epoch, signers, mac_ok, limit

    def accepts_signer(self, key_id):
        return key_id in self.signers

    def accepts_mac1(self, raw):
        return self.mac_ok


def test_demux_routes_by_receiver_epoch_then_init_signer_and_bounds_memory():
    from test_codec import init_values

    from qkdgate.gateway.protocol.demux import Demux
    cands = [_Cand(11, {b"A" * 8}), _Cand(22, {b"B" * 8}), _Cand(33, {b"B" * 8}, mac_ok=False)]
    dm = Demux(cands)
    done = m.seal(m.encode_core(m.MsgType.DONE, 5, 22, 1, {"generation": 1, "tag": bytes(32)}),
                  bytes(32))
    assert dm.route(done, cands) == 1                          # receiver epoch
    init = dict(init_values(), signer_id=b"B" * 8)
    raw = m.seal(m.encode_core(m.MsgType.INIT, 5, 0, 1, init), bytes(32))
    assert dm.route(raw, cands) == 1                           # signer, and mac1 for that name
    cands[2].mac_ok = True
    assert dm.route(raw, cands) is None and dm.stats["ambiguous"] == 1
    stray = m.seal(m.encode_core(m.MsgType.DONE, 5, 99, 1, {"generation": 1, "tag": bytes(32)}),
                   bytes(32))
    assert dm.route(stray, cands) is None and dm.stats["unrouted"] == 1
    # fragments: one source shared by 3 peers holds at most 3 x MAX_PARTIAL messages
    rnd = __import__("random").Random(1)
    for i in range(500):
        d = F.HEADER.pack(F.MAGIC, F.VERSION, 0, rnd.getrandbits(32), 0, 20, 20 * 1184) \
            + rnd.randbytes(F.FRAGMENT_PAYLOAD)
        assert dm.feed(d, float(i) * 0.001, cands) is None
    assert dm.buffered_bytes <= 3 * C.MAX_PARTIAL * F.FRAGMENT_PAYLOAD
    big = F.fragment(os.urandom(30_001), 3)[0]
    assert dm.feed(big, 1.0, cands) is None and dm.stats["fragment"] == 1


@pytest.mark.parametrize(("n", "bound"), [(1, 30.0), (1000, 76.8)])
def test_an_unanswered_exchange_times_out_at_a_bound_that_grows_with_its_tunnels(n, bound):
    """docs/protocol.md 7: a 1,000-tunnel exchange is not abandoned at the
    fixed 30 s (issue 19: 21-32 s in a starved lab VM), a 1-tunnel one is."""
    p = make_pair(tunnels=many(n), qkd=None)
    p.network = lambda src, ds: [] if src == "gw-a" else ds     # nothing reaches gw-b
    start = p.now
    p.advance(start + bound - 0.001)
    assert p.a.of(E.RekeyFailed) == [] and p.a.session.snapshot(p.now)["exchange"] is not None
    p.advance(start + bound)
    assert [f.cause for f in p.a.of(E.RekeyFailed)] == [E.FailureCause.TIMEOUT]
