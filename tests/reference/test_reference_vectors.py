"""The independent reference implementation (keymix_ref.py, stdlib only, from
docs/keymix.md) agrees with every vector in tests/vectors/keymix.json."""

import hashlib
import importlib.util
import json
from pathlib import Path

import pytest

_spec = importlib.util.spec_from_file_location("keymix_ref", Path(__file__).parent / "keymix_ref.py")
ref = importlib.util.module_from_spec(_spec)
_spec.loader.exec_module(ref)

VECTORS = json.loads((Path(__file__).parents[1] / "vectors" / "keymix.json").read_text())["cases"]
H = bytes.fromhex


def test_reference_hkdf_rfc5869_case_1():
    # RFC 5869 A.1 (SHA-256: the RFC has no SHA-384 case; the code path is the same)
    ikm, salt, info = bytes([0x0B]) * 22, bytes(range(13)), bytes(range(0xF0, 0xFA))
    prk = ref.hkdf_extract(salt, ikm, hashlib.sha256)
    assert prk.hex() == "077709362c2e32df0ddc3f0dc47bba6390b6c73bb50f9c3122ec844ad7c2b3e5"
    assert ref.hkdf_expand(prk, info, 42, hashlib.sha256).hex() == (
        "3cb25f25faacd57a90434f64d0362f2a2d2d0a90cf1a5a4c5db02d56ecc4c5bf34007208d5b887185865")


def test_reference_x25519_rfc7748_vector():
    # RFC 7748 5.2, first test vector
    k = H("a546e36bf0527c9d3b16154b82465edd62144c0ac1fc5a18506a2244ba449ac4")
    u = H("e6db6867583030db3594c1a424b15f7c726624ec26b3353b10a903a6d0ab1c4c")
    assert ref.x25519(k, u).hex() == "c3da55379de9c6908e94ea4df28d084f32eccf03491c71f754b4075577a28552"


@pytest.mark.parametrize("case", VECTORS, ids=[c["id"] for c in VECTORS])
def test_reference_reproduces_vector(case):
    i, o = case["inputs"], case["outputs"]
    z_x = H(i["x25519_secret"]) if i["x25519_secret"] else None
    if z_x is not None:
        assert ref.x25519(H(i["x25519_initiator_private"]), H(i["x25519_responder_public"])) == z_x
        assert ref.x25519(H(i["x25519_responder_private"]), H(i["x25519_initiator_public"])) == z_x
    z_qkd = H(i["qkd_key"]) if i["qkd_key"] else None
    args = (i["kem_name"], H(i["kem_secret"]), z_x, z_qkd, i["qkd_key_ids"], H(i["transcript_hash"]),
            [tuple(s) for s in i.get("qkd_sources", [])])
    r, s = ref.session_secret(*args)
    assert r == o["root_label"]
    assert ref.fixed_info(*args).hex() == o["fixed_info"]
    assert s.hex() == o["session_secret"]
    assert ref.session_id(s, r).hex() == o["session_id"]
    for e in o["esp"]:
        assert ref.esp(s, r, e["tunnel_id"], e["direction"], e["spi"], e["generation"]).hex() == e["key"]
    for m in o["macsec"]:
        got = ref.macsec(s, r, m["tunnel_id"], m["direction"], m["sci"], m["an"], m["generation"],
                         m["cipher"])
        assert got["sak"].hex() == m["sak"] and got["keyid"].hex() == m["keyid"]
        assert (got["salt"].hex() if got["salt"] else None) == m["salt"]
        assert got["ssci"] == m["ssci"]
    for k in o["consumers"]:
        assert ref.consumer(s, r, k["consumer"], k["tunnel_id"], k["generation"]).hex() == k["key"]
    for c in o["confirmation"]:
        assert ref.confirmation(s, r, c["role"], H(c["transcript_hash"])).hex() == c["tag"]
