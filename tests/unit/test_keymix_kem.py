"""KEM providers: round trips, sizes, peer-input checks, liboqs gating."""

import pickle

import pytest

from qkdgate.errors import CryptoUnavailable, LocalProtocolError, RemoteProtocolError
from qkdgate.keymix import kem as kemmod
from qkdgate.keymix.kem import KemProvider, available_kems, get_kem
from qkdgate.keymix.secret import SecretBytes

SIZES = {"ML-KEM-768": (1184, 1088, 32), "ML-KEM-1024": (1568, 1568, 32)}


@pytest.mark.parametrize("name", SIZES)
def test_pyca_round_trip_and_sizes(name):
    kem = get_kem(name)
    assert isinstance(kem, KemProvider) and kem.name == name
    assert (kem.public_key_size, kem.ciphertext_size, kem.shared_secret_size) == SIZES[name]
    priv, pub = kem.generate_keypair()
    ct, ss = kem.encapsulate(pub)
    assert (len(pub), len(ct), len(ss)) == SIZES[name]
    assert isinstance(ss, SecretBytes) and kem.decapsulate(priv, ct) == ss
    ct2, ss2 = kem.encapsulate(pub)   # every encapsulation is fresh
    assert ct2 != ct and ss2 != ss


def test_default_is_mlkem768_and_both_sizes_listed():
    assert get_kem().name == "ML-KEM-768"
    assert available_kems()[:2] == ["ML-KEM-768", "ML-KEM-1024"]


@pytest.mark.parametrize("name", SIZES)
def test_wrong_length_peer_bytes_are_remote_errors(name):
    kem = get_kem(name)
    priv, pub = kem.generate_keypair()
    ct, _ = kem.encapsulate(pub)
    for bad in (pub[:-1], pub + b"\0", b""):
        with pytest.raises(RemoteProtocolError, match="public key is"):
            kem.encapsulate(bad)
    for bad in (ct[:-1], ct + b"\0", b""):
        with pytest.raises(RemoteProtocolError, match="ciphertext is"):
            kem.decapsulate(priv, bad)


def test_public_key_failing_modulus_check_is_remote_error():
    # All-ones coefficients are >= q = 3329: FIPS 203 7.2 modulus check fails.
    with pytest.raises(RemoteProtocolError, match="modulus"):
        get_kem("ML-KEM-768").encapsulate(b"\xff" * 1184)


def test_private_key_of_other_parameter_set_is_local_error():
    priv768, _ = get_kem("ML-KEM-768").generate_keypair()
    k1024 = get_kem("ML-KEM-1024")
    with pytest.raises(LocalProtocolError):
        k1024.decapsulate(priv768, b"\0" * 1568)
    with pytest.raises(LocalProtocolError):
        k1024.decapsulate("not a key", b"\0" * 1568)


def test_private_key_never_prints_or_pickles():
    kem = get_kem("ML-KEM-768")
    priv, _ = kem.generate_keypair()
    seed = kem.private_seed(priv).reveal()
    assert repr(priv) == "<KemPrivateKey ML-KEM-768>"
    assert seed.hex() not in repr(priv)
    with pytest.raises(TypeError):
        pickle.dumps(priv)


def test_seed_round_trip_is_deterministic():
    kem = get_kem("ML-KEM-1024")
    seed = SecretBytes(bytes(range(64)))
    (p1, pub1), (_p2, pub2) = kem.keypair_from_seed(seed), kem.keypair_from_seed(seed)
    assert pub1 == pub2 and kem.private_seed(p1) == seed
    with pytest.raises(LocalProtocolError):
        kem.keypair_from_seed(SecretBytes(bytes(32)))


def test_unknown_kem_names_what_is_missing(monkeypatch):
    monkeypatch.setattr(kemmod, "liboqs_status", lambda: (False, "liboqs.so not found (test)"))
    with pytest.raises(CryptoUnavailable, match=r"FrodoKEM-640-AES.*liboqs.so not found \(test\)"):
        get_kem("FrodoKEM-640-AES")
    with pytest.raises(CryptoUnavailable, match="liboqs"):
        get_kem("liboqs:ML-KEM-768")


def test_liboqs_is_never_imported_without_its_shared_library(monkeypatch):
    # liboqs-python would try to git-clone and build liboqs on import: the
    # provider must check for liboqs.so first and not import oqs at all.
    import importlib.util
    monkeypatch.setattr(importlib.util, "find_spec", lambda name, *a: object())
    monkeypatch.setattr(kemmod, "find_liboqs", lambda: None)
    imported = []
    import builtins
    real_import = builtins.__import__

    def spy(name, *a, **kw):
        if name == "oqs":
            imported.append(name)
        return real_import(name, *a, **kw)

    monkeypatch.setattr(builtins, "__import__", spy)
    ok, why = kemmod.liboqs_status()
    assert not ok and "liboqs shared library" in why and "OQS_INSTALL_PATH" in why
    with pytest.raises(CryptoUnavailable, match="liboqs shared library"):
        get_kem("liboqs:Kyber512")
    assert imported == []


def test_liboqs_library_found_under_oqs_install_path(tmp_path, monkeypatch):
    (tmp_path / "lib").mkdir()
    (tmp_path / "lib" / "liboqs.so.7").write_bytes(b"")
    monkeypatch.setenv("OQS_INSTALL_PATH", str(tmp_path))
    assert kemmod.find_liboqs() == str(tmp_path / "lib" / "liboqs.so.7")


def _liboqs_usable():
    return kemmod.liboqs_status()


@pytest.mark.liboqs
@pytest.mark.skipif(not _liboqs_usable()[0], reason=f"liboqs unavailable: {_liboqs_usable()[1]}")
@pytest.mark.parametrize("name", ["ML-KEM-768", "ML-KEM-1024"])
def test_liboqs_round_trip_and_agreement_with_pyca(name):
    oq, py = get_kem("liboqs:" + name), get_kem(name)
    priv, pub = py.generate_keypair()
    ct, ss = oq.encapsulate(pub)
    assert py.decapsulate(priv, ct) == ss
    opriv, opub = oq.generate_keypair()
    ct, ss = py.encapsulate(opub)
    assert oq.decapsulate(opriv, ct) == ss


@pytest.mark.parametrize("name", SIZES)
def test_injected_rng_makes_key_pairs_replayable(name):
    kem = get_kem(name)
    rng = lambda n: bytes(range(n))  # noqa: E731
    (p1, pub1), (p2, pub2) = kem.generate_keypair(rng), kem.generate_keypair(rng)
    assert pub1 == pub2 and kem.private_seed(p1).reveal() == bytes(range(64))
    ct, ss = kem.encapsulate(pub1)
    assert kem.decapsulate(p2, ct) == ss
