"""KEM providers: ML-KEM (FIPS 203) through pyca/cryptography, and liboqs.

Theory of operation: the rest of qkdgate sees one small interface,
:class:`KemProvider`, and picks an implementation by algorithm name with
:func:`get_kem`. ML-KEM-768 (the default) and ML-KEM-1024 come from
pyca/cryptography, i.e. OpenSSL's FIPS 203 implementation. Any KEM that the
liboqs shared library enables is reachable through ``liboqs-python``, but only
when the library is really installed: importing ``oqs`` without it makes
liboqs-python try to *download and compile* liboqs, which a gateway must never
do, so we look for the shared object first and refuse with a message naming
what is missing.

Peer bytes (public keys, ciphertexts) are checked here: a wrong length or a
public key that fails the FIPS 203 7.2 modulus check raises
:class:`~qkdgate.errors.RemoteProtocolError`. A ciphertext of the right length
never fails: ML-KEM decapsulation answers a forged or corrupted ciphertext with
the implicit-rejection secret (FIPS 203 6.3, ``K_bar = J(z || c)``), so the
failure surfaces later as a key-confirmation mismatch, not here.
"""

from __future__ import annotations

import ctypes.util
import glob
import importlib.util
import os
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any, NoReturn, Protocol, SupportsIndex, runtime_checkable

from qkdgate.errors import CryptoUnavailable, LocalProtocolError, RemoteProtocolError
from qkdgate.keymix.secret import SecretBytes

DEFAULT_KEM = "ML-KEM-768"


class KemPrivateKey:
    """An opaque decapsulation key, tied to the provider that made it.

    It never prints key material and cannot be pickled; ``_key`` is the
    backend's own object (pyca key, or liboqs secret-key bytes wrapped in
    :class:`SecretBytes`).
    """

    __slots__ = ("_key", "kem_name")

    def __init__(self, kem_name: str, key: object) -> None:
        self.kem_name = kem_name
        self._key = key

    def __repr__(self) -> str:
        return f"<KemPrivateKey {self.kem_name}>"

    def __reduce_ex__(self, protocol: SupportsIndex) -> NoReturn:
        raise TypeError("KEM private keys cannot be pickled")


@runtime_checkable
class KemProvider(Protocol):
    # Read-only members: the providers are frozen dataclasses.
    @property
    def name(self) -> str: ...
    @property
    def public_key_size(self) -> int: ...
    @property
    def ciphertext_size(self) -> int: ...
    @property
    def shared_secret_size(self) -> int: ...

    def generate_keypair(self, rng: Callable[[int], bytes] | None = None
                         ) -> tuple[KemPrivateKey, bytes]: ...

    def encapsulate(self, public_key: bytes) -> tuple[bytes, SecretBytes]: ...

    def decapsulate(self, private_key: KemPrivateKey, ciphertext: bytes) -> SecretBytes: ...


def _check_len(what: str, kem: str, data: bytes, want: int) -> None:
    if not isinstance(data, (bytes, bytearray, memoryview)):
        raise LocalProtocolError(f"{kem} {what} must be bytes, not {type(data).__name__}")
    if len(data) != want:
        raise RemoteProtocolError(f"{kem} {what} is {len(data)} bytes, expected {want}")


# --------------------------------------------------------------------------
# pyca/cryptography (OpenSSL) ML-KEM
# --------------------------------------------------------------------------

# FIPS 203 8 Table 3: sizes of ek, c and K per parameter set.
_PYCA_SIZES = {"ML-KEM-768": (1184, 1088, 32), "ML-KEM-1024": (1568, 1568, 32)}


@dataclass(frozen=True)
class PycaMlKem:
    """ML-KEM-768 / ML-KEM-1024 from pyca/cryptography (OpenSSL backend)."""

    name: str
    public_key_size: int
    ciphertext_size: int
    shared_secret_size: int
    _priv_cls: Any
    _pub_cls: Any
    backend: str = "pyca/cryptography"

    def generate_keypair(self, rng: Callable[[int], bytes] | None = None
                         ) -> tuple[KemPrivateKey, bytes]:
        """A fresh key pair. ``rng`` (replayable tests only) supplies the
        64-byte seed d || z; encapsulation randomness is always OpenSSL's."""
        if rng is not None:
            return self.keypair_from_seed(SecretBytes(rng(64)))
        key = self._priv_cls.generate()
        return KemPrivateKey(self.name, key), key.public_key().public_bytes_raw()

    def keypair_from_seed(self, seed: SecretBytes) -> tuple[KemPrivateKey, bytes]:
        """Deterministic key pair from the 64-byte seed ``d || z``
        (FIPS 203 7.1 ML-KEM.KeyGen_internal), for vectors and cross-checks."""
        if len(seed) != 64:
            raise LocalProtocolError(f"{self.name} seed must be 64 bytes (d || z)")
        key = self._priv_cls.from_seed_bytes(seed.reveal())
        return KemPrivateKey(self.name, key), key.public_key().public_bytes_raw()

    def private_seed(self, private_key: KemPrivateKey) -> SecretBytes:
        """The 64-byte seed ``d || z`` of a private key (for cross-checks)."""
        return SecretBytes(self._own(private_key).private_bytes_raw())

    def encapsulate(self, public_key: bytes) -> tuple[bytes, SecretBytes]:
        _check_len("public key", self.name, public_key, self.public_key_size)
        try:
            pub = self._pub_cls.from_public_bytes(bytes(public_key))
        except ValueError:
            # FIPS 203 7.2 modulus check: coefficients must be < q.
            raise RemoteProtocolError(f"{self.name} public key fails the FIPS 203 "
                                      "modulus check") from None
        shared, ciphertext = pub.encapsulate()
        return ciphertext, SecretBytes(shared)

    def decapsulate(self, private_key: KemPrivateKey, ciphertext: bytes) -> SecretBytes:
        key = self._own(private_key)
        _check_len("ciphertext", self.name, ciphertext, self.ciphertext_size)
        try:
            return SecretBytes(key.decapsulate(bytes(ciphertext)))
        except ValueError:  # only on a length mismatch, checked above
            raise RemoteProtocolError(f"{self.name} ciphertext rejected") from None

    def _own(self, private_key: KemPrivateKey) -> Any:
        if not isinstance(private_key, KemPrivateKey) or private_key.kem_name != self.name \
                or not isinstance(private_key._key, self._priv_cls):
            raise LocalProtocolError(f"not a {self.name} private key from {self.backend}")
        return private_key._key


def _pyca_provider(name: str) -> PycaMlKem:
    try:
        from cryptography.hazmat.backends.openssl.backend import backend
        from cryptography.hazmat.primitives.asymmetric import mlkem
    except ImportError as exc:
        raise CryptoUnavailable(f"{name}: pyca/cryptography has no ML-KEM module "
                                f"(need cryptography >= 47): {exc}") from None
    if not backend.mlkem_supported():
        raise CryptoUnavailable(f"{name}: the OpenSSL under pyca/cryptography "
                                f"({backend.openssl_version_text()}) lacks ML-KEM")
    suffix = name.removeprefix("ML-KEM-")
    pk, ct, ss = _PYCA_SIZES[name]
    return PycaMlKem(name, pk, ct, ss, getattr(mlkem, f"MLKEM{suffix}PrivateKey"),
                     getattr(mlkem, f"MLKEM{suffix}PublicKey"),
                     f"pyca/cryptography ({backend.openssl_version_text()})")


# --------------------------------------------------------------------------
# liboqs through liboqs-python
# --------------------------------------------------------------------------

def find_liboqs() -> str | None:
    """Path of the liboqs shared library, looked up where liboqs-python looks
    (``$OQS_INSTALL_PATH/lib*``, ``~/_oqs/lib*``, the system linker path),
    without importing ``oqs`` (which would try to build liboqs if missing)."""
    roots = [os.environ["OQS_INSTALL_PATH"]] if "OQS_INSTALL_PATH" in os.environ else []
    roots.append(os.path.join(os.path.expanduser("~"), "_oqs"))
    for root in roots:
        for sub in ("lib", "lib64"):
            hits = sorted(glob.glob(os.path.join(root, sub, "liboqs.so*")))
            if hits:
                return hits[0]
    return ctypes.util.find_library("oqs")


def liboqs_status() -> tuple[bool, str]:
    """(usable, explanation) for the liboqs provider."""
    if importlib.util.find_spec("oqs") is None:
        return False, ("Python package liboqs-python is not installed "
                       "(pip install 'qkdgate[liboqs]')")
    lib = find_liboqs()
    if lib is None:
        return False, ("liboqs shared library (liboqs.so) not found in $OQS_INSTALL_PATH/lib, "
                       "~/_oqs/lib or the linker path; install liboqs built with "
                       "-DBUILD_SHARED_LIBS=ON")
    return True, f"liboqs at {lib}"


def _import_oqs() -> Any:
    ok, why = liboqs_status()
    if not ok:
        raise CryptoUnavailable(f"liboqs provider unavailable: {why}")
    try:
        import oqs
    except (ImportError, RuntimeError, OSError, SystemExit) as exc:
        raise CryptoUnavailable(f"liboqs provider unavailable: importing oqs failed: {exc}") \
            from None
    return oqs


@dataclass(frozen=True)
class OqsKem:
    """Any KEM enabled in liboqs. Thin on purpose: not exercised on hosts
    without liboqs (the tests skip with that reason)."""

    name: str
    public_key_size: int
    ciphertext_size: int
    shared_secret_size: int
    _oqs: Any
    backend: str = "liboqs"

    def generate_keypair(self, rng: Callable[[int], bytes] | None = None
                         ) -> tuple[KemPrivateKey, bytes]:
        """``rng`` is accepted for the interface and NOT used: liboqs-python
        has no seeded key generation, so liboqs runs never replay."""
        with self._oqs.KeyEncapsulation(self.name) as kem:
            public = kem.generate_keypair()
            secret = SecretBytes(kem.export_secret_key())
        return KemPrivateKey(self.name, secret), bytes(public)

    def encapsulate(self, public_key: bytes) -> tuple[bytes, SecretBytes]:
        _check_len("public key", self.name, public_key, self.public_key_size)
        with self._oqs.KeyEncapsulation(self.name) as kem:
            try:
                ciphertext, shared = kem.encap_secret(bytes(public_key))
            except RuntimeError:
                raise RemoteProtocolError(f"{self.name} public key rejected by liboqs") from None
        return bytes(ciphertext), SecretBytes(shared)

    def decapsulate(self, private_key: KemPrivateKey, ciphertext: bytes) -> SecretBytes:
        if not isinstance(private_key, KemPrivateKey) or private_key.kem_name != self.name \
                or not isinstance(private_key._key, SecretBytes):
            raise LocalProtocolError(f"not a {self.name} private key from liboqs")
        _check_len("ciphertext", self.name, ciphertext, self.ciphertext_size)
        with self._oqs.KeyEncapsulation(self.name, private_key._key.reveal()) as kem:
            try:
                return SecretBytes(kem.decap_secret(bytes(ciphertext)))
            except RuntimeError:
                raise RemoteProtocolError(f"{self.name} ciphertext rejected by liboqs") from None


def _oqs_provider(name: str) -> OqsKem:
    oqs = _import_oqs()
    if name not in oqs.get_enabled_kem_mechanisms():
        raise CryptoUnavailable(f"{name}: not enabled in this liboqs build")
    with oqs.KeyEncapsulation(name) as kem:
        d = kem.details
    return OqsKem(name, d["length_public_key"], d["length_ciphertext"],
                  d["length_shared_secret"], oqs, f"liboqs {oqs.oqs_version()}")


# --------------------------------------------------------------------------
# Lookup
# --------------------------------------------------------------------------

LIBOQS_PREFIX = "liboqs:"

_cache: dict[str, KemProvider] = {}


def get_kem(name: str = DEFAULT_KEM) -> KemProvider:
    """The provider for ``name``. ``ML-KEM-768``/``ML-KEM-1024`` come from
    pyca/cryptography, falling back to liboqs; ``liboqs:NAME`` forces liboqs;
    any other name is looked up in liboqs. Raises
    :class:`~qkdgate.errors.CryptoUnavailable` saying what is missing."""
    if not isinstance(name, str) or not name:
        raise LocalProtocolError("KEM name must be a non-empty string")
    if name in _cache:
        return _cache[name]
    makers: list[Callable[[str], KemProvider]]
    plain = name.removeprefix(LIBOQS_PREFIX)
    if name.startswith(LIBOQS_PREFIX):
        makers = [_oqs_provider]
    elif name in _PYCA_SIZES:
        makers = [_pyca_provider, _oqs_provider]
    else:
        makers = [_oqs_provider]
    reasons = []
    for make in makers:
        try:
            provider = make(plain)
        except CryptoUnavailable as exc:
            reasons.append(str(exc))
            continue
        _cache[name] = provider
        return provider
    raise CryptoUnavailable(f"KEM {name} unavailable: " + "; ".join(reasons))


def available_kems() -> list[str]:
    """Names :func:`get_kem` accepts on this machine, pyca first."""
    names = []
    for name in _PYCA_SIZES:
        try:
            get_kem(name)
            names.append(name)
        except CryptoUnavailable:
            pass
    try:
        oqs = _import_oqs()
        names += [LIBOQS_PREFIX + n for n in oqs.get_enabled_kem_mechanisms()]
    except CryptoUnavailable:
        pass
    return names
