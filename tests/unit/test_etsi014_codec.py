"""The ETSI 014 parsers against the spec's own example bodies, and the
error classification for what real KMEs answer."""

import json
from pathlib import Path

import pytest

from qkdgate.adapters import etsi014_codec as codec
from qkdgate.errors import KeyNotFound, KeySourceAuthError, KeySourceProtocolError, KeyUnavailable

FIX = Path(__file__).parents[1] / "fixtures" / "etsi014"


def fixture(name: str) -> bytes:
    return (FIX / name).read_bytes()


def test_spec_status_example_parses_every_field():
    st = codec.parse_status(fixture("status.json"))
    assert (st.source_KME_ID, st.target_KME_ID) == ("AAAAAAAAAAAAAAAA", "BBBBBBBBBBBBBBBB")
    assert (st.master_SAE_ID, st.slave_SAE_ID) == ("IIIIIIIIIIIIIIII", "CCCCCCCCCCCCCCCC")
    assert (st.key_size, st.stored_key_count, st.max_key_count) == (352, 25000, 100000)
    assert (st.max_key_per_request, st.max_key_size, st.min_key_size) == (128, 1024, 64)
    assert st.max_SAE_ID_count == 0 and st.status_extension == {}


def test_spec_key_container_example():
    c = codec.parse_key_container(fixture("key_container.json"), size_bits=256, max_keys=2)
    assert [k.key_id for k in c.keys] == ["bc490419-7d60-487f-adc1-4ddcc177c139",
                                          "0a782fb5-3434-48fe-aa4d-14f41d46cf92"]
    assert all(len(k.key) == 32 for k in c.keys)
    assert c.keys[0].key.reveal()[:2] == bytes.fromhex("c071")
    assert "wHHV" not in repr(c)   # key material never in a repr


def test_spec_key_container_wrong_size_is_a_protocol_error():
    with pytest.raises(KeySourceProtocolError, match="256 bits, 352 asked") as err:
        codec.parse_key_container(fixture("key_container.json"), size_bits=352)
    # errors name key_IDs and sizes, never key material
    assert "wHHV" not in str(err.value) and "OeGM" not in str(err.value)
    assert "bc490419-7d60-487f-adc1-4ddcc177c139" in str(err.value)


def test_spec_key_container_more_keys_than_asked():
    with pytest.raises(KeySourceProtocolError, match="at most 1"):
        codec.parse_key_container(fixture("key_container.json"), max_keys=1)


def test_spec_key_ids_example_and_round_trip():
    ids = codec.parse_key_ids(fixture("key_ids.json"))
    assert ids == ["bc490419-7d60-487f-adc1-4ddcc177c139", "0a782fb5-3434-48fe-aa4d-14f41d46cf92"]
    assert codec.parse_key_ids(json.dumps(codec.key_ids_request(ids)).encode()) == ids


def test_spec_key_request_example_round_trips_through_our_encoder():
    spec = json.loads(fixture("key_request.json"))
    ours = codec.key_request(spec["number"], spec["size"], spec["additional_slave_SAE_IDs"],
                             spec["extension_mandatory"], spec["extension_optional"])
    assert ours == spec
    assert not codec.can_use_get(ours)
    assert codec.can_use_get(codec.key_request(2, 256))
    assert codec.key_request() == {}   # empty body is valid: KME defaults


@pytest.mark.parametrize("name,message,details", [
    ("error.json", "key not found", 0),
    ("error_details.json", codec.MSG_EXT_MANDATORY_UNSUPPORTED, 1),
])
def test_spec_error_examples(name, message, details):
    err = codec.parse_error(fixture(name))
    assert err.json and err.message == message and len(err.details) == details


def test_uppercase_uuid_is_normalised():
    raw = json.dumps({"keys": [{"key_ID": "BC490419-7D60-487F-ADC1-4DDCC177C139",
                                "key": "AAAAAA=="}]}).encode()
    assert codec.parse_key_container(raw).keys[0].key_id == "bc490419-7d60-487f-adc1-4ddcc177c139"


@pytest.mark.parametrize("body,match", [
    (b"<html>nope</html>", "not JSON"),
    (b"[]", "JSON object"),
    (b'{"keys": {}}', "array"),
    (b'{"keys": [{"key_ID": "x", "key": "AAAA"}]}', "not a UUID"),
    (b'{"keys": [{"key_ID": "bc490419-7d60-487f-adc1-4ddcc177c139", "key": "A A=="}]}', "base64"),
    (b'{"keys": [{"key_ID": "bc490419-7d60-487f-adc1-4ddcc177c139", "key": ""}]}', "empty"),
    (b'{"keys": [{"key_ID": "bc490419-7d60-487f-adc1-4ddcc177c139", "key": "AAAA"},'
     b' {"key_ID": "bc490419-7d60-487f-adc1-4ddcc177c139", "key": "AAAA"}]}', "twice"),
    (b'{"keys": [{"key_ID": "bc490419-7d60-487f-adc1-4ddcc177c139", "key": 5}]}', "base64 text"),
])
def test_malformed_key_containers(body, match):
    with pytest.raises(KeySourceProtocolError, match=match):
        codec.parse_key_container(body)


def test_status_type_errors_and_integer_ids():
    doc = json.loads(fixture("status.json"))
    doc["slave_SAE_ID"] = 12345            # some KMEs number their SAEs
    assert codec.parse_status(json.dumps(doc).encode()).slave_SAE_ID == "12345"
    doc["key_size"] = True
    with pytest.raises(KeySourceProtocolError, match="key_size"):
        codec.parse_status(json.dumps(doc).encode())


@pytest.mark.parametrize("method,status,body,err", [
    ("enc_keys", 503, b'{"message": "no keys"}', KeyUnavailable),
    ("enc_keys", 404, b"", KeyUnavailable),                          # vendor empty pool
    ("enc_keys", 400, b'{"message": "Not enough keys available"}', KeyUnavailable),
    ("enc_keys", 400, json.dumps({"message": codec.MSG_SIZE_MULTIPLE_OF_8}).encode(),
     KeySourceProtocolError),
    ("enc_keys", 401, b"<html><body>401 Authorization Required</body></html>", KeySourceAuthError),
    ("dec_keys", 400, json.dumps({"message": codec.MSG_KEYS_NOT_FOUND}).encode(), KeyNotFound),
    ("dec_keys", 404, b"<html>gone</html>", KeyNotFound),
    ("dec_keys", 401, b"", KeySourceAuthError),
    ("status", 418, b"\xff\xfe", KeySourceProtocolError),
    ("status", 500, b"", KeyUnavailable),
])
def test_classify_error(method, status, body, err):
    e = codec.classify_error(method, status, body)
    assert type(e) is err


def test_error_message_is_cleaned_for_logs():
    e = codec.parse_error(b"<html><h1>Bad\x1b[31m</h1>\n\n  Gateway" + b"x" * 500 + b"</html>")
    assert not e.json and "\x1b" not in e.message and "<" not in e.message
    assert len(e.message) <= 163
