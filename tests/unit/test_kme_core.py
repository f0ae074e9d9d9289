"""The simulated KME's ETSI 014 rules, sans-IO: who may fetch a key, once,
and the spec's status codes and messages."""

import base64
import itertools

import pytest

from qkdgate.adapters import etsi014_codec as codec
from qkdgate.adapters.kmesim.kme import SimNetwork
from qkdgate.adapters.kmesim.linkmodel import QkdLink


@pytest.fixture
def net():
    counter = itertools.count(1)
    n = SimNetwork(now=lambda: 0.0, rng=lambda k: bytes([next(counter) % 256]) * k)
    for k in ("KME-A", "KME-B"):
        n.add_kme(k)
    for s, k in (("SAE-A", "KME-A"), ("SAE-B", "KME-B"), ("SAE-C", "KME-B"), ("SAE-D", "KME-B")):
        n.attach(s, k)
    n.connect("KME-A", "KME-B", QkdLink("KME-A", "KME-B", key_size=256, max_key_count=100)).fill(20)
    return n


def test_status_has_every_spec_field(net):
    r = net.status("KME-A", "SAE-A", "SAE-B")
    assert r.status == 200
    st = codec.parse_status(__import__("json").dumps(r.body).encode())
    assert (st.source_KME_ID, st.target_KME_ID, st.stored_key_count) == ("KME-A", "KME-B", 20)


def test_master_slave_identical_keys_once(net):
    r = net.enc_keys("KME-A", "SAE-A", "SAE-B", {"number": 2, "size": 128})
    assert r.status == 200 and len(r.body["keys"]) == 2
    ids = [k["key_ID"] for k in r.body["keys"]]
    d = net.dec_keys("KME-B", "SAE-B", "SAE-A", ids)
    assert d.body["keys"] == r.body["keys"]
    assert len(base64.b64decode(d.body["keys"][0]["key"])) == 16
    again = net.dec_keys("KME-B", "SAE-B", "SAE-A", ids[:1])
    assert (again.status, again.body["message"]) == (400, codec.MSG_KEYS_NOT_FOUND)
    # the pool shrank by the bits delivered
    assert net.links[frozenset(("KME-A", "KME-B"))].stored_bits == 20 * 256 - 2 * 128


def test_only_named_slaves_and_all_or_nothing(net):
    r = net.enc_keys("KME-A", "SAE-A", "SAE-B", {"additional_slave_SAE_IDs": ["SAE-C"]})
    key_id = r.body["keys"][0]["key_ID"]
    assert net.dec_keys("KME-B", "SAE-D", "SAE-A", [key_id]).status == 401   # not named
    unknown = "00000000-0000-4000-8000-000000000000"
    assert net.dec_keys("KME-B", "SAE-B", "SAE-A", [key_id, unknown]).status == 400
    assert net.dec_keys("KME-B", "SAE-B", "SAE-A", [key_id]).status == 200   # untouched by the 400
    assert net.dec_keys("KME-B", "SAE-C", "SAE-A", [key_id]).status == 200   # multicast slave
    assert net.kmes["KME-B"].issued == {}                                     # gone after both
    assert net.dec_keys("KME-B", "SAE-B", "SAE-Z", [key_id]).status == 400   # wrong master


@pytest.mark.parametrize("extra,detail", [
    (["SAE-A"], {"additional_slave_on_another_KME": "SAE-A"}),   # a known SAE of KME-A
    (["SAE-C", "SAE-C"], {"duplicate_SAE_ID": "SAE-C"}),
    (["SAE-B"], {"duplicate_SAE_ID": "SAE-B"}),                  # the path's slave again
    (["SAE-Q"], {"unknown_SAE_ID": "SAE-Q"}),
], ids=["other-kme", "twice", "path-slave", "unknown"])
def test_additional_slaves_refused_with_the_real_reason(net, extra, detail):
    r = net.enc_keys("KME-A", "SAE-A", "SAE-B", {"additional_slave_SAE_IDs": extra})
    assert (r.status, r.body["message"]) == (400, "Bad request format")
    assert detail in r.body["details"]
    assert net.kmes["KME-B"].issued == {}


@pytest.mark.parametrize("req,status,message", [
    ({"size": 100}, 400, codec.MSG_SIZE_MULTIPLE_OF_8),
    ({"size": 2048}, 400, "Bad request format"),
    ({"number": 0}, 400, "Bad request format"),
    ({"number": "2"}, 400, "Bad request format"),
    ({"extension_mandatory": [{"abc_route_type": "direct"}]}, 400, codec.MSG_EXT_MANDATORY_UNSUPPORTED),
    ({"additional_slave_SAE_IDs": ["SAE-A"]}, 400, "Bad request format"),
    ({"bogus": 1}, 400, "Bad request format"),
    ({"number": 21}, 503, "insufficient key material in the pool"),
])
def test_enc_keys_errors(net, req, status, message):
    r = net.enc_keys("KME-A", "SAE-A", "SAE-B", req)
    assert (r.status, r.body["message"]) == (status, message)


def test_unknown_caller_is_unauthorized(net):
    assert net.enc_keys("KME-A", "SAE-B", "SAE-A", {}).status == 401   # SAE-B lives at KME-B
    assert net.status("KME-A", "SAE-X", "SAE-B").status == 401


def test_optional_extensions_are_reported_unhandled(net):
    r = net.enc_keys("KME-A", "SAE-A", "SAE-B", {"extension_optional": [{"abc_max_age": 5}]})
    assert r.body["key_container_extension"]["qkdgate_unhandled_extension_optional"] == ["abc_max_age"]


def test_eavesdropper_gives_503_and_status_alarm(net):
    link = net.links[frozenset(("KME-A", "KME-B"))]
    link.eve_fraction = 1.0
    r = net.enc_keys("KME-A", "SAE-A", "SAE-B", {})
    assert r.status == 503 and "QBER" in r.body["message"]
    ext = net.status("KME-A", "SAE-A", "SAE-B").body["status_extension"]
    assert ext["qkdgate_alarms"] == ["QBER_ABOVE_THRESHOLD"] and ext["qkdgate_key_rate"] == 0


def test_store_of_keys_for_slaves_is_bounded(net):
    net.kmes["KME-B"].max_issued = 3
    ids = [net.enc_keys("KME-A", "SAE-A", "SAE-B", {}).body["keys"][0]["key_ID"] for _ in range(5)]
    assert list(net.kmes["KME-B"].issued) == ids[2:]      # the oldest orphans went first
    assert net.dec_keys("KME-B", "SAE-B", "SAE-A", ids[:1]).status == 400
