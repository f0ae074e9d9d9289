"""ML-KEM cross-implementation check: pyca/cryptography (OpenSSL) against
kyber-py (pure Python FIPS 203), both directions, and implicit rejection.

pyca exports a private key only as its 64-byte seed d || z (FIPS 203 7.1);
kyber-py's key_derive(seed) expands the same seed into (ek, dk).
"""

import pytest
from kyber_py.ml_kem import ML_KEM_768, ML_KEM_1024

from qkdgate.keymix import kem as kemmod
from qkdgate.keymix.kem import get_kem
from qkdgate.keymix.secret import SecretBytes

KYBER = {"ML-KEM-768": ML_KEM_768, "ML-KEM-1024": ML_KEM_1024}
NAMES = list(KYBER)


@pytest.mark.parametrize("name", NAMES)
def test_same_seed_same_public_key(name):
    kem = get_kem(name)
    priv, pub = kem.generate_keypair()
    ek, _dk = KYBER[name].key_derive(kem.private_seed(priv).reveal())
    assert ek == pub


@pytest.mark.parametrize("name", NAMES)
def test_pyca_encapsulates_kyber_py_decapsulates(name):
    kem = get_kem(name)
    priv, pub = kem.generate_keypair()
    _ek, dk = KYBER[name].key_derive(kem.private_seed(priv).reveal())
    ct, ss = kem.encapsulate(pub)
    assert KYBER[name].decaps(dk, ct) == ss.reveal()


@pytest.mark.parametrize("name", NAMES)
def test_kyber_py_encapsulates_pyca_decapsulates(name):
    kem = get_kem(name)
    # pyca imports private keys only as seeds: make the pair from a seed that
    # kyber-py expands too, and let kyber-py encapsulate to the pyca public key.
    seed = bytes(range(64)) if name == "ML-KEM-768" else bytes(range(64, 128))
    priv, pub = kem.keypair_from_seed(SecretBytes(seed))
    assert pub == KYBER[name].key_derive(seed)[0]
    ss, ct = KYBER[name].encaps(pub)
    assert kem.decapsulate(priv, ct).reveal() == ss


@pytest.mark.parametrize("name", NAMES)
@pytest.mark.parametrize("where", [0, 500, -1], ids=["first", "middle", "last"])
def test_tampered_ciphertext_gives_same_implicit_rejection_in_both(name, where):
    kem = get_kem(name)
    priv, pub = kem.generate_keypair()
    seed = kem.private_seed(priv).reveal()
    _ek, dk = KYBER[name].key_derive(seed)
    ct, ss = kem.encapsulate(pub)
    bad = bytearray(ct)
    bad[where] ^= 0x01
    bad = bytes(bad)
    rej_pyca = kem.decapsulate(priv, bad).reveal()
    rej_kyber = KYBER[name].decaps(dk, bad)
    assert rej_pyca == rej_kyber != ss.reveal()
    # FIPS 203 Algorithm 18: K_bar = J(z || c) = SHAKE256(z || c, 32), z = seed[32:].
    import hashlib
    assert rej_pyca == hashlib.shake_256(seed[32:] + bad).digest(32)


def _liboqs():
    return kemmod.liboqs_status()


@pytest.mark.liboqs
@pytest.mark.skipif(not _liboqs()[0], reason=f"liboqs unavailable: {_liboqs()[1]}")
@pytest.mark.parametrize("name", NAMES)
def test_liboqs_decapsulates_pyca_ciphertext_and_rejects_like_kyber_py(name):
    oq = get_kem("liboqs:" + name)
    opriv, opub = oq.generate_keypair()
    ct, ss = get_kem(name).encapsulate(opub)
    assert oq.decapsulate(opriv, ct) == ss
    sk = opriv._key.reveal()   # liboqs exports the expanded FIPS 203 dk
    bad = bytes([ct[0] ^ 1]) + ct[1:]
    assert oq.decapsulate(opriv, bad).reveal() == KYBER[name].decaps(sk, bad)
