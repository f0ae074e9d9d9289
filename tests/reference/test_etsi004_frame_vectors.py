"""The ETSI 004 binary framing vectors (tests/vectors/etsi004-frames.json):
each field's bytes were transcribed by hand from the cited line of the open
implementation; the stdlib reference (etsi004_frame_ref.py) reproduces every
frame, and qkdgate's codec encodes and decodes the same bytes and refuses
every invalid frame with the named reason."""

import importlib.util
import json
import uuid
from pathlib import Path

import pytest

from qkdgate.adapters import etsi004_frame as frame
from qkdgate.adapters.etsi004 import QoS

_spec = importlib.util.spec_from_file_location("etsi004_frame_ref",
                                               Path(__file__).parent / "etsi004_frame_ref.py")
ref = importlib.util.module_from_spec(_spec)
_spec.loader.exec_module(ref)

DOC = json.loads((Path(__file__).parents[1] / "vectors" / "etsi004-frames.json").read_text())
CASES, INVALID = DOC["cases"], DOC["invalid"]
QOS_NAMES = dict(zip(ref.QOS, ("key_chunk_size", "max_bps", "min_bps", "jitter", "priority",
                               "timeout", "ttl"), strict=True))


def _qos(d):
    return QoS(**{QOS_NAMES[k]: v for k, v in d.items() if k in QOS_NAMES},
               metadata_mimetype=d["Metadata_mimetype"])


def _ks(s):
    return frame.NO_KSID if s is None else uuid.UUID(s).bytes


def ours(m):
    """The vector's decoded form as qkdgate's message."""
    t = m["type"]
    if t == "OPEN_CONNECT_REQUEST":
        return frame.OpenConnectRequest(m["source"], m["destination"], _qos(m["qos"]),
                                        _ks(m["key_stream_id"]))
    if t == "OPEN_CONNECT_RESPONSE":
        return frame.OpenConnectResponse(m["status"], _qos(m["qos"]) if m["qos"] else None,
                                         _ks(m["key_stream_id"]) if m["qos"] else None)
    if t == "GET_KEY_REQUEST":
        return frame.GetKeyRequest(_ks(m["key_stream_id"]), m["index"], m["metadata_size"])
    if t == "GET_KEY_RESPONSE":
        if m["status"] == 0:
            meta = m["metadata"].encode()
            return frame.GetKeyResponse(0, m["index"], bytes.fromhex(m["key"]), meta, len(meta))
        if m["status"] == 8:
            return frame.GetKeyResponse(8, metadata_size=m["metadata_size"])
        return frame.GetKeyResponse(m["status"])
    if t == "CLOSE_REQUEST":
        return frame.CloseRequest(_ks(m["key_stream_id"]))
    return frame.CloseResponse(m["status"])


def test_every_message_type_and_failure_form_has_a_vector():
    types = {c["decoded"]["type"] for c in CASES}
    assert types == set(ref.NAMES.values())
    assert all(f.get("cite") for c in CASES for f in c["fields"])
    # every cite names the repository, a file@commit and a line
    assert all("QUBIP/etsi-qkd-004 " in f["cite"] and "@" in f["cite"] for c in CASES
               for f in c["fields"])


@pytest.mark.parametrize("case", CASES, ids=[c["id"] for c in CASES])
def test_fields_concatenate_to_the_frame(case):
    assert "".join(f["hex"] for f in case["fields"]) == case["frame"]
    payload_len = next(f["value"] for f in case["fields"] if f["field"] == "payload_length")
    assert payload_len == len(bytes.fromhex(case["frame"])) - 8


@pytest.mark.parametrize("case", CASES, ids=[c["id"] for c in CASES])
def test_reference_reproduces_vector(case):
    raw = bytes.fromhex(case["frame"])
    assert ref.encode(case["decoded"]) == raw
    assert ref.decode(raw) == case["decoded"]


@pytest.mark.parametrize("case", CASES, ids=[c["id"] for c in CASES])
def test_our_codec_matches_vector(case):
    raw = bytes.fromhex(case["frame"])
    msg = ours(case["decoded"])
    assert frame.encode(msg) == raw
    allowed = frame.REQUESTS if case["decoded"]["type"].endswith("REQUEST") else frame.RESPONSES
    assert frame.decode(raw, allowed) == msg


@pytest.mark.parametrize("case", INVALID, ids=[c["id"] for c in INVALID])
def test_our_codec_refuses_invalid_frames_with_the_named_reason(case):
    allowed = frame.REQUESTS if case["direction"] == "request" else frame.RESPONSES
    with pytest.raises(frame.FrameError) as ei:
        frame.decode(bytes.fromhex(case["frame"]), allowed)
    assert ei.value.reason == case["reason"]
