"""qkdgate.keymix reproduces every known-answer vector of tests/vectors/keymix.json
(docs/keymix.md 10), one parametrized case per vector with its readable id."""

import json
from pathlib import Path

import pytest

from qkdgate.interfaces import MacsecCipher
from qkdgate.keymix import schedule
from qkdgate.keymix.classical import x25519_shared
from qkdgate.keymix.combiner import HybridInputs, combine, fixed_info
from qkdgate.keymix.kem import get_kem
from qkdgate.keymix.secret import SecretBytes

VECTORS = json.loads((Path(__file__).parent / "keymix.json").read_text())["cases"]
H = bytes.fromhex


def test_vector_file_covers_every_input_combination():
    combos = {(c["inputs"]["kem_name"], c["inputs"]["x25519_secret"] is not None,
               c["inputs"]["qkd_key"] is not None) for c in VECTORS}
    assert combos >= {(k, x, q) for k in ("ML-KEM-768", "ML-KEM-1024")
                      for x in (False, True) for q in (False, True)}
    ciphers = {m["cipher"] for c in VECTORS for m in c["outputs"]["macsec"]}
    assert ciphers == {"gcm-aes-256", "gcm-aes-xpn-256"}
    assert len({e["generation"] for c in VECTORS for e in c["outputs"]["esp"]}) >= 4
    assert {k["consumer"] for c in VECTORS for k in c["outputs"]["consumers"]} == \
        {"wireguard", "strongswan"}
    assert len(VECTORS) >= 8 and len({c["id"] for c in VECTORS}) == len(VECTORS)
    # several key sources (docs/keymix.md 4.5): all of n, and k of n with a gap
    # and keys of different lengths
    sourced = [c["inputs"]["qkd_sources"] for c in VECTORS if "qkd_sources" in c["inputs"]]
    assert [[0, 32], [1, 32]] in sourced and any(
        len({n for _, n in s}) > 1 and [i for i, _ in s] != list(range(len(s))) for s in sourced)


def _session(case):
    i = case["inputs"]
    kem = get_kem(i["kem_name"])
    # The recorded ciphertext decapsulates, under the recorded seed, to the recorded secret.
    priv, pub = kem.keypair_from_seed(SecretBytes(H(i["kem_seed"])))
    assert pub == H(i["kem_public_key"])
    kem_secret = kem.decapsulate(priv, H(i["kem_ciphertext"]))
    assert kem_secret.reveal() == H(i["kem_secret"])
    x = None
    if i["x25519_secret"] is not None:
        from cryptography.hazmat.primitives.asymmetric.x25519 import X25519PrivateKey
        ia = X25519PrivateKey.from_private_bytes(H(i["x25519_initiator_private"]))
        x = x25519_shared(ia, H(i["x25519_responder_public"]))
        assert x.reveal() == H(i["x25519_secret"])
    qkd = SecretBytes(H(i["qkd_key"])) if i["qkd_key"] else None
    inputs = HybridInputs(i["kem_name"], kem_secret, x, qkd, tuple(i["qkd_key_ids"]),
                          H(i["transcript_hash"]),
                          tuple(tuple(s) for s in i.get("qkd_sources", ())))
    return inputs, combine(inputs)


@pytest.mark.parametrize("case", VECTORS, ids=[c["id"] for c in VECTORS])
def test_keymix_reproduces_vector(case):
    inputs, s = _session(case)
    o = case["outputs"]
    assert s.root_label == o["root_label"]
    assert fixed_info(inputs).hex() == o["fixed_info"]
    assert s.secret.reveal().hex() == o["session_secret"]
    assert s.session_id.hex() == o["session_id"]
    for e in o["esp"]:
        key = schedule.esp_key(s, e["tunnel_id"], e["direction"], e["spi"], e["generation"])
        assert key.reveal().hex() == e["key"], e
    for m in o["macsec"]:
        k = schedule.macsec_keys(s, m["tunnel_id"], m["direction"], m["sci"], m["an"],
                                 m["generation"], MacsecCipher(m["cipher"]))
        assert (k.sak.reveal().hex(), k.keyid.hex(), k.ssci) == (m["sak"], m["keyid"], m["ssci"])
        assert (k.salt.reveal().hex() if k.salt else None) == m["salt"]
    for k in o["consumers"]:
        key = schedule.consumer_key(s, k["consumer"], k["tunnel_id"], k["generation"])
        assert key.reveal().hex() == k["key"], k
    for c in o["confirmation"]:
        tag = schedule.confirmation_tag(s, c["role"], H(c["transcript_hash"]))
        assert tag.hex() == c["tag"]
        schedule.verify_confirmation(s, c["role"], H(c["transcript_hash"]), H(c["tag"]))


def test_vector_file_is_what_the_generator_makes():
    import runpy
    gen = runpy.run_path(str(Path(__file__).parents[2] / "tools" / "make_vectors.py"))
    assert gen["build"]() == (Path(__file__).parent / "keymix.json").read_text()
