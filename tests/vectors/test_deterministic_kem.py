"""The deterministic kyber-py ML-KEM provider (qkdgate.testing.deterministic)
is FIPS 203 ML-KEM: it interoperates with pyca/cryptography (OpenSSL) in
both directions and is reproducible from its seeds."""

from __future__ import annotations

import hashlib

import pytest

from qkdgate.errors import RemoteProtocolError
from qkdgate.keymix.kem import KemProvider, get_kem
from qkdgate.keymix.secret import SecretBytes
from qkdgate.testing.deterministic import KyberPyMlKem, shake_rng

KEMS = ("ML-KEM-768", "ML-KEM-1024")


def test_shake_rng_is_one_stream_whatever_the_call_sizes():
    a, b = shake_rng(b"seed"), shake_rng(b"seed")
    assert a(5) + a(40) + a(3) == b(48) == hashlib.shake_256(b"seed").digest(48)
    log: list = []
    c = shake_rng(b"other", log)
    assert c(2) != b(2)
    assert log == [(2, hashlib.shake_256(b"other").digest(2))]


@pytest.mark.parametrize("name", KEMS)
def test_same_seed_same_public_key_as_pyca(name):
    seed = SecretBytes(hashlib.sha512(name.encode()).digest())
    kp = KyberPyMlKem(name, shake_rng(b"unused"))
    assert isinstance(kp, KemProvider)
    _, ek = kp.keypair_from_seed(seed)
    _, ek_pyca = get_kem(name).keypair_from_seed(seed)
    assert ek == ek_pyca
    assert len(ek) == kp.public_key_size


@pytest.mark.parametrize("name", KEMS)
def test_pyca_decapsulates_kyber_py_ciphertexts_and_back(name):
    pyca = get_kem(name)
    kp = KyberPyMlKem(name, shake_rng(b"encaps " + name.encode()))
    sk_pyca, ek_pyca = pyca.generate_keypair()
    ct, ss = kp.encapsulate(ek_pyca)
    assert len(ct) == pyca.ciphertext_size
    assert pyca.decapsulate(sk_pyca, ct) == ss
    sk_k, ek_k = kp.generate_keypair(shake_rng(b"keygen"))
    ct2, ss2 = pyca.encapsulate(ek_k)
    assert kp.decapsulate(sk_k, ct2) == ss2
    # implicit rejection (FIPS 203 Algorithm 18, K_bar = J(z || c)) agrees too
    seed = SecretBytes(bytes(range(64)))
    (sk1, ek1), (sk2, _) = kp.keypair_from_seed(seed), pyca.keypair_from_seed(seed)
    ct3, ss3 = kp.encapsulate(ek1)
    bad = bytes([ct3[0] ^ 1]) + ct3[1:]
    assert kp.decapsulate(sk1, bad) == pyca.decapsulate(sk2, bad) != ss3


def test_replays_from_seeds_and_draws_m_from_its_rng():
    runs = []
    for _ in range(2):
        kp = KyberPyMlKem("ML-KEM-768", shake_rng(b"provider"))
        _, ek = kp.generate_keypair(shake_rng(b"session"))
        runs.append((ek, *kp.encapsulate(ek)))
    assert runs[0][0] == runs[1][0]
    assert runs[0][1] == runs[1][1]
    assert runs[0][2] == runs[1][2]
    kp = KyberPyMlKem("ML-KEM-768", shake_rng(b"provider"))
    m = hashlib.shake_256(b"provider").digest(32)
    assert kp.encapsulate_with(runs[0][0], m)[0] == runs[0][1]


def test_peer_input_errors_are_remote():
    kp = KyberPyMlKem("ML-KEM-768", shake_rng(b"x"))
    with pytest.raises(RemoteProtocolError):
        kp.encapsulate(b"\x00" * 10)
    with pytest.raises(RemoteProtocolError):   # coefficients >= q fail the modulus check
        kp.encapsulate(b"\xff" * kp.public_key_size)
    sk, _ = kp.generate_keypair()
    with pytest.raises(RemoteProtocolError):
        kp.decapsulate(sk, b"\x00" * 5)
