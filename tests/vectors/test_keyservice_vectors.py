"""qkdgate.keymix.keypool reproduces tests/vectors/keyservice.json
(docs/keyservice.md 3), and so does a separate HMAC-only implementation of the
document's formulas, so another gateway can check its own against them."""

import hashlib
import hmac
import json
import struct
import uuid
from pathlib import Path

import pytest

from qkdgate.errors import LocalProtocolError
from qkdgate.keymix.combiner import Provenance, SessionSecret
from qkdgate.keymix.keypool import KeyPoolSecret, serving_parity
from qkdgate.keymix.secret import SecretBytes

VECTORS = json.loads((Path(__file__).parent / "keyservice.json").read_text())["cases"]
H = bytes.fromhex


def _session(i):
    return SessionSecret(SecretBytes(H(i["session_secret"])),
                         Provenance(i["kem_name"], i["x25519"], tuple(i["qkd_key_ids"])))


@pytest.mark.parametrize("case", VECTORS, ids=[c["id"] for c in VECTORS])
def test_keypool_reproduces_vector(case):
    i, o = case["inputs"], case["outputs"]
    s = _session(i)
    assert s.root_label == o["root_label"]
    p = KeyPoolSecret.derive(s, i["pool"], i["generation"])
    for k in o["keys"]:
        assert p.key_id(k["index"]) == k["key_ID"]
        assert p.key(i["master_SAE_ID"], i["slave_SAE_ID"], k["index"],
                     i["size_bits"]).reveal().hex() == k["key"]
        assert serving_parity(k["served_by"]) == k["index"] % 2
    assert p.key(i["slave_SAE_ID"], i["master_SAE_ID"], 0, i["size_bits"]).reveal().hex() \
        == o["reversed_pair_key_0"] != o["keys"][0]["key"]


# ---- an independent implementation of docs/keyservice.md 3 (hmac + struct only)

def _lp16(b):
    b = b.encode() if isinstance(b, str) else b
    return struct.pack(">H", len(b)) + b


def _hkdf_expand(prk, info, n):     # RFC 5869 2.3 with SHA-384
    out, t, c = b"", b"", 1
    while len(out) < n:
        t = hmac.new(prk, t + info + bytes([c]), hashlib.sha384).digest()
        out, c = out + t, c + 1
    return out[:n]


@pytest.mark.parametrize("case", VECTORS, ids=[c["id"] for c in VECTORS])
def test_independent_implementation_agrees(case):
    i, o = case["inputs"], case["outputs"]
    root = _lp16(o["root_label"])
    p = _hkdf_expand(H(i["session_secret"]), root + _lp16("key service pool") + _lp16(i["pool"])
                     + struct.pack(">Q", i["generation"]), 48)
    assert p.hex() == o["pool_secret"]
    for k in o["keys"]:
        raw = bytearray(_hkdf_expand(p, root + _lp16("key service key id")
                                     + struct.pack(">I", k["index"]), 16))
        raw[6], raw[8] = 0x80 | raw[6] & 0x0F, 0x80 | raw[8] & 0x3F
        kid = uuid.UUID(bytes=bytes(raw))
        assert str(kid) == k["key_ID"] and kid.version == 8 and kid.variant == uuid.RFC_4122
        key = _hkdf_expand(p, root + _lp16("key service key") + _lp16(i["master_SAE_ID"])
                           + _lp16(i["slave_SAE_ID"]) + struct.pack(">IH", k["index"],
                                                                     i["size_bits"]),
                           i["size_bits"] // 8)
        assert key.hex() == k["key"]


def test_without_qkd_every_key_differs():
    with_qkd, without = VECTORS[0], VECTORS[2]
    assert with_qkd["inputs"]["session_secret"] != without["inputs"]["session_secret"]
    assert {k["key"] for k in with_qkd["outputs"]["keys"]}.isdisjoint(
        k["key"] for k in without["outputs"]["keys"])


def test_sizes_indices_and_wiping_are_checked():
    p = KeyPoolSecret.derive(_session(VECTORS[0]["inputs"]), "app1", 7)
    for bad in (0, 12, 56, 8200, True):
        with pytest.raises(LocalProtocolError):
            p.key("A", "B", 0, bad)
    with pytest.raises(LocalProtocolError):
        p.key_id(1 << 32)
    with pytest.raises(LocalProtocolError):
        p.key("", "B", 0, 256)
    assert "secret" not in repr(p) and VECTORS[0]["outputs"]["pool_secret"][:8] not in repr(p)
    p.wipe()
    assert p.wiped
    with pytest.raises(LocalProtocolError, match="wiped"):
        p.key_id(0)


def test_vector_file_is_what_the_generator_makes():
    import runpy
    gen = runpy.run_path(str(Path(__file__).parents[2] / "tools" / "make_keyservice_vectors.py"))
    assert gen["build"]() == (Path(__file__).parent / "keyservice.json").read_text()
