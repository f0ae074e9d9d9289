"""Deterministic randomness and a seeded ML-KEM provider, for replayable runs.

Theory of operation: a protocol run replays byte for byte only if every
random input comes from something the test controls. :func:`shake_rng`
turns a seed into a stream (each call takes the next bytes of
SHAKE-256(seed), FIPS 202), so a recorded seed stands for every draw.
pyca/cryptography seeds ML-KEM key generation but not encapsulation, so
:class:`KyberPyMlKem` implements the :class:`~qkdgate.keymix.kem.KemProvider`
interface on kyber-py's FIPS 203 internals: key generation
``ML-KEM.KeyGen_internal(d, z)`` from a 64-byte seed ``d || z`` (FIPS 203
Algorithm 16) and encapsulation ``ML-KEM.Encaps_internal(ek, m)`` with the
32-byte ``m`` drawn from the provider's rng (Algorithm 17). Its keys and
ciphertexts are FIPS 203 bytes, so it interoperates with pyca: the same seed
gives the same encapsulation key, and either side can decapsulate the
other's ciphertexts (tests/vectors/test_deterministic_kem.py).

Test code only: kyber-py is a pure-Python teaching implementation, not
constant time; nothing shipped imports this module.
"""

from __future__ import annotations

import hashlib
from collections.abc import Callable
from typing import Any

from qkdgate.errors import LocalProtocolError, RemoteProtocolError
from qkdgate.keymix.kem import KemPrivateKey
from qkdgate.keymix.secret import SecretBytes

Rng = Callable[[int], bytes]

# FIPS 203 8 Table 3: sizes of ek, c and K per parameter set.
_SIZES = {"ML-KEM-768": (1184, 1088, 32), "ML-KEM-1024": (1568, 1568, 32)}


def shake_rng(seed: bytes, log: list[tuple[int, bytes]] | None = None) -> Rng:
    """``rng(n)``: the next ``n`` bytes of the SHAKE-256(seed) output stream.

    If ``log`` is given every draw is appended to it as ``(n, bytes)``, so a
    vector can show which value each draw became."""
    pos = 0

    def rng(n: int) -> bytes:
        nonlocal pos
        if not isinstance(n, int) or n < 0:
            raise LocalProtocolError(f"rng needs a byte count, not {n!r}")
        out = hashlib.shake_256(seed).digest(pos + n)[pos:]
        pos += n
        if log is not None:
            log.append((n, out))
        return out
    return rng


def _kyber(name: str) -> Any:
    from kyber_py.ml_kem import ML_KEM_768, ML_KEM_1024
    return {"ML-KEM-768": ML_KEM_768, "ML-KEM-1024": ML_KEM_1024}[name]


class KyberPyMlKem:
    """ML-KEM-768 / -1024 with every random input from an injected rng.

    ``generate_keypair(rng)`` draws the seed ``d || z`` from ``rng`` if given
    (the session passes its own), else from the provider's rng;
    ``encapsulate`` always draws ``m`` from the provider's rng.
    """

    backend = "kyber-py (deterministic test provider)"

    def __init__(self, name: str, rng: Rng) -> None:
        if name not in _SIZES:
            raise LocalProtocolError(f"kyber-py provider supports {', '.join(_SIZES)}, "
                                     f"not {name!r}")
        self.name = name
        self.public_key_size, self.ciphertext_size, self.shared_secret_size = _SIZES[name]
        self._rng = rng
        self._ml = _kyber(name)

    def generate_keypair(self, rng: Rng | None = None) -> tuple[KemPrivateKey, bytes]:
        return self.keypair_from_seed(SecretBytes((rng or self._rng)(64)))

    def keypair_from_seed(self, seed: SecretBytes) -> tuple[KemPrivateKey, bytes]:
        """FIPS 203 Algorithm 16 ML-KEM.KeyGen_internal(d, z), seed = d || z."""
        if len(seed) != 64:
            raise LocalProtocolError(f"{self.name} seed must be 64 bytes (d || z)")
        raw = seed.reveal()
        ek, dk = self._ml._keygen_internal(raw[:32], raw[32:])
        return KemPrivateKey(self.name, SecretBytes(dk)), ek

    def encapsulate(self, public_key: bytes) -> tuple[bytes, SecretBytes]:
        return self.encapsulate_with(public_key, self._rng(32))

    def encapsulate_with(self, public_key: bytes, m: bytes) -> tuple[bytes, SecretBytes]:
        """FIPS 203 Algorithm 17 ML-KEM.Encaps_internal(ek, m)."""
        self._check_len("public key", public_key, self.public_key_size)
        if len(m) != 32:
            raise LocalProtocolError("ML-KEM encapsulation randomness m is 32 bytes")
        try:
            shared, ciphertext = self._ml._encaps_internal(bytes(public_key), bytes(m))
        except ValueError:
            # FIPS 203 7.2 modulus check (kyber-py checks it inside K-PKE.Encrypt)
            raise RemoteProtocolError(f"{self.name} public key fails the FIPS 203 "
                                      "modulus check") from None
        return ciphertext, SecretBytes(shared)

    def decapsulate(self, private_key: KemPrivateKey, ciphertext: bytes) -> SecretBytes:
        if not isinstance(private_key, KemPrivateKey) or private_key.kem_name != self.name \
                or not isinstance(private_key._key, SecretBytes):
            raise LocalProtocolError(f"not a {self.name} private key from kyber-py")
        self._check_len("ciphertext", ciphertext, self.ciphertext_size)
        # FIPS 203 Algorithm 18: a wrong ciphertext yields the implicit-rejection key
        return SecretBytes(self._ml._decaps_internal(private_key._key.reveal(),
                                                     bytes(ciphertext)))

    def _check_len(self, what: str, data: bytes, want: int) -> None:
        if not isinstance(data, (bytes, bytearray, memoryview)):
            raise LocalProtocolError(f"{self.name} {what} must be bytes")
        if len(data) != want:
            raise RemoteProtocolError(f"{self.name} {what} is {len(data)} bytes, "
                                      f"expected {want}")

    def __repr__(self) -> str:
        return f"<KyberPyMlKem {self.name}>"
