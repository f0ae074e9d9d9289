"""Fuzzing the peer protocol's parsers: parse, or RemoteProtocolError, nothing else.

Three targets: the message decoder (random bytes, and mutations of real
messages so the fuzzer gets past the header), the fragment parser, and the
whole ``PeerSession.receive_datagram`` path, which must never raise at all
(it counts and drops) however the bytes are mangled, including mutations
re-sealed with a valid mac1 so they reach the state machine.
"""

from __future__ import annotations

import sys
from pathlib import Path

from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from qkdgate.errors import RemoteProtocolError
from qkdgate.gateway.protocol import messages as m
from qkdgate.gateway.protocol.fragment import Reassembler, fragment, parse_header

sys.path.insert(0, str(Path(__file__).resolve().parent.parent / "protocol"))
from protocol_harness import make_pair  # noqa: E402

SETTINGS = settings(max_examples=300, deadline=None, derandomize=True,
                    suppress_health_check=[HealthCheck.too_slow,
                                           HealthCheck.function_scoped_fixture])


def _corpus() -> tuple[list[bytes], object]:
    """Real messages of a full exchange plus a primed responder and initiator."""
    p = make_pair()
    p.roundtrip_until_done()
    r, msgs = Reassembler(), []
    for _, d in p.log:
        raw = r.feed(d, 0.0)
        if raw is not None:
            msgs.append(raw)
    return msgs, p


CORPUS, PAIR = _corpus()


def mutate(data: bytes, edits: list[tuple[int, int]], cut: int | None) -> bytes:
    b = bytearray(data)
    for pos, val in edits:
        b[pos % len(b)] = val
    if cut is not None:
        b = b[:cut % (len(b) + 1)]
    return bytes(b)


edits = st.lists(st.tuples(st.integers(0, 20000), st.integers(0, 255)), max_size=6)


@SETTINGS
@given(st.binary(max_size=3000))
def test_decoder_random_bytes(data):
    try:
        m.decode(data)
    except RemoteProtocolError:
        pass


@SETTINGS
@given(st.sampled_from(CORPUS), edits, st.none() | st.integers(0, 20000))
def test_decoder_mutated_messages(data, ed, cut):
    try:
        msg = m.decode(mutate(data, ed, cut))
    except RemoteProtocolError:
        return
    # whatever parses re-encodes to the same core (the codec is a bijection)
    names = [n for n, _ in m.SCHEMAS[msg.type]]
    core = m.encode_core(msg.type, msg.sender_epoch, msg.receiver_epoch, msg.exchange_id,
                         msg.fields)
    assert core == msg.core and len(names) == len(msg.fields)


@SETTINGS
@given(st.binary(max_size=1300))
def test_fragment_parser(data):
    try:
        parse_header(data)
    except RemoteProtocolError:
        pass


@SETTINGS
@given(st.lists(st.binary(max_size=1300), max_size=20))
def test_reassembler_never_exceeds_its_bounds(datagrams):
    r = Reassembler()
    for i, d in enumerate(datagrams):
        try:
            r.feed(d, float(i))
        except RemoteProtocolError:
            pass
        assert r.pending <= 4


@SETTINGS
@given(st.binary(min_size=1, max_size=16384), st.integers(0, 2 ** 32 - 1),
       st.randoms(use_true_random=False))
def test_fragment_roundtrip_any_order(message, mid, rnd):
    ds = fragment(message, mid)
    rnd.shuffle(ds)
    r = Reassembler()
    got = [x for x in (r.feed(d, 0.0) for d in ds) if x is not None]
    assert got == [message]


@SETTINGS
@given(st.sampled_from(range(len(CORPUS))), edits, st.none() | st.integers(0, 20000),
       st.booleans(), st.booleans())
def test_receive_datagram_never_raises(idx, ed, cut, reseal, to_a):
    """Into both a fresh and an established session, garbage never raises."""
    data = mutate(CORPUS[idx], ed, cut)
    if reseal and len(data) > 17:
        receiver = "gw-a" if to_a else "gw-b"
        data = data[:-16] + m.seal(b"", m.mac1_key(receiver, None))[-16:]
        import hashlib
        import hmac
        key = m.mac1_key(receiver, None)
        data = data[:-16] + hmac.new(key, data[:-16], hashlib.sha256).digest()[:16]
    gw = PAIR.a if to_a else PAIR.b
    for d in (fragment(data, 1) if data else [b""]):
        gw.session.receive_datagram(d, PAIR.now)
    gw.session.receive_datagram(data[:1200], PAIR.now)
    while gw.session.next_event() is not None:
        pass
    gw.session.datagrams_to_send(PAIR.now)
