"""Hostile ETSI 004 binary frames: whatever bytes arrive, the frame decoder
returns a message or raises FrameError -- nothing else (the h11 rule) --
and a frame it accepts re-encodes to exactly the same bytes (no two byte
strings mean the same message)."""

import json
from pathlib import Path

from hypothesis import HealthCheck, example, given, settings
from hypothesis import strategies as st

from qkdgate.adapters import etsi004_frame as frame

SETTINGS = settings(max_examples=400, deadline=None, derandomize=True,
                    suppress_health_check=[HealthCheck.too_slow])
VECTORS = [bytes.fromhex(c["frame"]) for c in json.loads(
    (Path(__file__).parents[1] / "vectors" / "etsi004-frames.json").read_text())["cases"]]


REASONS = {"too_long", "truncated", "version", "service_type", "length", "uri", "metadata",
           "mime", "qos"}


def _check(data: bytes) -> None:
    reasons: set[str] = set()
    for allowed in (frame.REQUESTS, frame.RESPONSES):
        try:
            msg = frame.decode(data, allowed)
        except frame.FrameError as exc:
            reasons.add(exc.reason)
            continue
        assert frame.encode(msg) == data
    assert reasons <= REASONS


@SETTINGS
@given(st.binary(max_size=400))
@example(b"")
@example(bytes.fromhex("010001047fffffff"))
def test_random_bytes(data):
    _check(data)


@st.composite
def mutated(draw):
    b = bytearray(draw(st.sampled_from(VECTORS)))
    for _ in range(draw(st.integers(1, 4))):
        op = draw(st.integers(0, 3))
        i = draw(st.integers(0, max(0, len(b) - 1)))
        if op == 0 and b:
            b[i] = draw(st.integers(0, 255))
        elif op == 1:
            del b[i:]
        elif op == 2:
            b[i:i] = draw(st.binary(min_size=1, max_size=8))
        elif b:
            del b[i:i + draw(st.integers(1, 16))]
    return bytes(b)


@SETTINGS
@given(mutated())
def test_mutated_vectors(data):
    _check(data)


@SETTINGS
@given(st.binary(min_size=8, max_size=8))
def test_header_alone_never_asks_for_more_than_the_maximum(header):
    try:
        _, length = frame.parse_header(header, frame.REQUESTS | frame.RESPONSES, 4096)
    except frame.FrameError:
        return
    assert length <= 4096
