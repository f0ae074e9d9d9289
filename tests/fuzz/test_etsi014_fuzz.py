"""Hostile KME answers: whatever a KME sends, the ETSI 014/004 decoders
return validated values or raise the adapter's own errors -- nothing else
(the h11 rule: parse, or the remote error)."""

import contextlib
import json

from hypothesis import HealthCheck, example, given, settings
from hypothesis import strategies as st

from qkdgate.adapters import etsi004
from qkdgate.adapters import etsi014_codec as codec
from qkdgate.errors import KeySourceError, LocalProtocolError

# derandomize: a fixed seed, so the test command runs the same cases every time
SETTINGS = settings(max_examples=200, deadline=None, derandomize=True,
                    suppress_health_check=[HealthCheck.too_slow])

scalars = st.none() | st.booleans() | st.integers(-2**40, 2**40) | st.floats(allow_nan=True) | \
    st.text(max_size=40)
json_values = st.recursive(scalars, lambda inner: st.lists(inner, max_size=4) |
                           st.dictionaries(st.text(max_size=12), inner, max_size=5), max_leaves=20)
uuids = st.uuids().map(str)
b64 = st.binary(min_size=0, max_size=40).map(lambda b: __import__("base64").b64encode(b).decode())
key_items = st.fixed_dictionaries({"key_ID": uuids | st.text(max_size=40) | scalars,
                                   "key": b64 | st.text(max_size=50) | scalars},
                                  optional={"key_ID_extension": json_values,
                                            "key_extension": json_values})
containers = st.fixed_dictionaries({"keys": st.lists(key_items, max_size=5) | json_values},
                                   optional={"key_container_extension": json_values})
status_fields = ["source_KME_ID", "target_KME_ID", "master_SAE_ID", "slave_SAE_ID", "key_size",
                 "stored_key_count", "max_key_count", "max_key_per_request", "max_key_size",
                 "min_key_size", "max_SAE_ID_count", "status_extension"]
statuses = st.fixed_dictionaries({}, optional={f: json_values | st.integers(0, 2**20)
                                              for f in status_fields})


def _only_ours(fn, *a, **kw):
    try:
        return fn(*a, **kw)
    except KeySourceError:
        return None


@SETTINGS
@given(st.binary(max_size=300))
@example(b"[" * 100_000 + b"]" * 100_000)        # deeper than json.loads recurses
@example(b'{"keys": ' + b"[" * 100_000 + b"}")
@example(b"\xef\xbb\xbf{}")                        # a UTF-8 byte-order mark
def test_raw_bytes_never_escape(raw):
    _only_ours(codec.parse_status, raw)
    _only_ours(codec.parse_key_container, raw, size_bits=256, max_keys=3)
    _only_ours(codec.parse_key_ids, raw)
    codec.parse_error(raw)            # never raises at all
    for method in ("status", "enc_keys", "dec_keys"):
        assert isinstance(codec.classify_error(method, 400, raw), KeySourceError)
    _only_ours(etsi004.parse_open, raw)
    _only_ours(etsi004.parse_get_key, raw, 32)


@SETTINGS
@given(containers, st.sampled_from([None, 8, 256]), st.integers(1, 5))
def test_key_containers(doc, size, max_keys):
    raw = json.dumps(doc).encode()
    c = _only_ours(codec.parse_key_container, raw, size_bits=size, max_keys=max_keys)
    if c is not None:                 # what passes is fully validated
        assert len(c.keys) <= max_keys
        assert len({k.key_id for k in c.keys}) == len(c.keys)
        assert all(len(k.key) > 0 and (size is None or len(k.key) * 8 == size) for k in c.keys)


@SETTINGS
@given(statuses)
def test_status_objects(doc):
    s = _only_ours(codec.parse_status, json.dumps(doc).encode())
    if s is not None:
        assert s.min_key_size <= s.max_key_size and isinstance(s.slave_SAE_ID, str)


@SETTINGS
@given(json_values, st.integers(100, 599))
def test_error_bodies_classify(doc, status):
    raw = json.dumps(doc).encode()
    for method in ("status", "enc_keys", "dec_keys"):
        err = codec.classify_error(method, status, raw)
        assert isinstance(err, KeySourceError) and len(str(err)) < 400


@SETTINGS
@given(st.fixed_dictionaries({}, optional={"status": st.integers(-1, 9) | scalars,
                                           "index": st.integers(-1, 2**33) | scalars,
                                           "key_buffer": b64 | scalars,
                                           "metadata": json_values,
                                           "metadata_size": st.integers(-1, 2**21) | scalars,
                                           "key_stream_ID": uuids | scalars,
                                           "qos": st.dictionaries(st.sampled_from(
                                               ["key_chunk_size", "ttl", "metadata_mimetype"]),
                                               scalars) | json_values}))
def test_etsi004_answers(doc):
    raw = json.dumps(doc).encode()
    for fn in (etsi004.parse_open, lambda r: etsi004.parse_get_key(r, None)):
        # LocalProtocolError: status 5, the stream ID we chose is taken
        with contextlib.suppress(KeySourceError, LocalProtocolError):
            fn(raw)
