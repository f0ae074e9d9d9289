"""Hybrid combiner: both ends agree, every input matters, presence is bound."""

import hashlib
import os
import pickle

import pytest

from qkdgate.errors import LocalProtocolError
from qkdgate.keymix.classical import x25519_keypair, x25519_shared
from qkdgate.keymix.combiner import HybridInputs, Provenance, SessionSecret, combine
from qkdgate.keymix.kem import get_kem
from qkdgate.keymix.secret import SecretBytes

QKD_ID = "5f2a3c1e-8e4b-4d2a-9a0b-2b8f4c6d7e01"
TH = hashlib.sha384(b"transcript").digest()


def exchange(kem_name="ML-KEM-768", x25519=True, qkd=True):
    """One full exchange computed separately by initiator and responder."""
    kem = get_kem(kem_name)
    priv, pub = kem.generate_keypair()                 # initiator
    ct, ss_r = kem.encapsulate(pub)                    # responder
    ss_i = kem.decapsulate(priv, ct)                   # initiator
    xi = xr = None
    if x25519:
        a, pa = x25519_keypair()
        b, pb = x25519_keypair()
        xi, xr = x25519_shared(a, pb), x25519_shared(b, pa)
    key = os.urandom(32) if qkd else None
    ids = (QKD_ID,) if qkd else ()
    init = combine(HybridInputs(kem_name, ss_i, xi, SecretBytes(key) if qkd else None, ids, TH))
    resp = combine(HybridInputs(kem_name, ss_r, xr, SecretBytes(key) if qkd else None, ids, TH))
    return init, resp


@pytest.mark.parametrize("kem_name", ["ML-KEM-768", "ML-KEM-1024"])
@pytest.mark.parametrize("x25519", [True, False], ids=["x25519", "no-x25519"])
@pytest.mark.parametrize("qkd", [True, False], ids=["qkd", "no-qkd"])
def test_initiator_and_responder_agree(kem_name, x25519, qkd):
    i, r = exchange(kem_name, x25519, qkd)
    assert i.secret == r.secret and len(i.secret) == 48
    assert i.session_id == r.session_id and len(i.session_id) == 16
    assert i.provenance == r.provenance == Provenance(kem_name, x25519, (QKD_ID,) if qkd else ())
    assert i.root_label == ("qkdgate/1 " + kem_name + ("+X25519" if x25519 else "")
                            + ("+QKD" if qkd else "") + " HKDF-SHA384")


def test_every_rekey_is_independent():
    a, _ = exchange()
    b, _ = exchange()
    assert a.secret != b.secret and a.session_id != b.session_id


def _inputs(**over):
    base = dict(kem_name="ML-KEM-768", kem_secret=SecretBytes(b"K" * 32),
                x25519_secret=SecretBytes(b"X" * 32), qkd_key=SecretBytes(b"Q" * 32),
                qkd_key_ids=(QKD_ID,), transcript_hash=TH)
    base.update(over)
    return HybridInputs(**base)


@pytest.mark.parametrize("change", [
    dict(kem_secret=SecretBytes(b"k" * 32)),
    dict(x25519_secret=SecretBytes(b"x" * 32)),
    dict(qkd_key=SecretBytes(b"q" * 32)),
    dict(qkd_key_ids=("5f2a3c1e-8e4b-4d2a-9a0b-2b8f4c6d7e02",)),
    dict(transcript_hash=hashlib.sha384(b"other").digest()),
    dict(kem_name="ML-KEM-1024"),
], ids=["kem", "x25519", "qkd", "key-id", "transcript", "kem-name"])
def test_every_input_changes_the_secret(change):
    assert combine(_inputs()).secret != combine(_inputs(**change)).secret


def test_presence_is_bound_even_when_the_concatenation_is_equal():
    # Z' = K || X (no QKD) and Z' = K || X read as (no X25519, QKD = X) are the
    # same bytes; the sessions must still differ (no downgrade ambiguity).
    x = b"X" * 32
    with_x = combine(_inputs(x25519_secret=SecretBytes(x), qkd_key=None, qkd_key_ids=()))
    with_q = combine(_inputs(x25519_secret=None, qkd_key=SecretBytes(x)))
    assert with_x.secret != with_q.secret
    # Splitting the same QKD bytes differently across key IDs is also bound.
    one = combine(_inputs(qkd_key=SecretBytes(b"Q" * 64), qkd_key_ids=(QKD_ID,)))
    two = combine(_inputs(qkd_key=SecretBytes(b"Q" * 64), qkd_key_ids=(QKD_ID, QKD_ID[:-1] + "2")))
    assert one.secret != two.secret


def test_session_without_qkd_never_equals_one_with_qkd():
    full = combine(_inputs())
    stripped = combine(_inputs(qkd_key=None, qkd_key_ids=()))
    assert full.secret != stripped.secret and full.root_label != stripped.root_label


@pytest.mark.parametrize("bad, match", [
    (dict(qkd_key_ids=()), "key IDs"),
    (dict(qkd_key=None), "without a QKD key"),
    (dict(qkd_key=SecretBytes(b"q" * 8)), "at least 16"),
    (dict(qkd_key=b"q" * 32), "SecretBytes"),
    (dict(kem_secret=b"k" * 32), "kem_secret"),
    (dict(x25519_secret=SecretBytes(b"x" * 31)), "x25519_secret"),
    (dict(transcript_hash=b"short"), "transcript_hash"),
    (dict(transcript_hash=b"t" * 65), "transcript_hash"),
    (dict(qkd_key_ids=[QKD_ID]), "tuple"),
    (dict(qkd_key_ids=("",)), "non-empty"),
    (dict(kem_name=""), "kem_name"),
], ids=lambda v: str(v)[:30] if isinstance(v, str) else None)
def test_inconsistent_inputs_are_local_errors(bad, match):
    with pytest.raises(LocalProtocolError, match=match):
        combine(_inputs(**bad))


def test_session_secret_is_not_printable_or_picklable():
    s = combine(_inputs())
    raw = s.secret.reveal()
    for text in (repr(s), str(s), f"{s}", str(s.provenance), repr(s.provenance)):
        assert raw.hex() not in text
    assert s.session_id.hex() in repr(s) and "ML-KEM-768+X25519+QKD" in repr(s)
    with pytest.raises(TypeError):
        pickle.dumps(s)
    s.wipe()
    assert len(s.secret) == 0


def test_session_secret_rejects_wrong_size():
    with pytest.raises(LocalProtocolError):
        SessionSecret(SecretBytes(b"s" * 32), Provenance("ML-KEM-768", False, ()))


def test_provider_prefix_is_not_part_of_the_derivation():
    # A peer using liboqs for ML-KEM-768 must derive what a pyca peer derives.
    a = combine(_inputs(kem_name="liboqs:ML-KEM-768"))
    assert a.secret == combine(_inputs()).secret and a.provenance.kem_name == "ML-KEM-768"
