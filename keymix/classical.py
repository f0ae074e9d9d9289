"""X25519 (RFC 7748), the classical leg of the hybrid exchange.

Theory of operation: each rekey draws a fresh X25519 key pair on both sides
(ephemeral-ephemeral), so the classical secret of one generation says nothing
about another. The leg is optional in the combiner; when present it keeps the
session secure against an attacker who breaks ML-KEM but not elliptic curves.

Peer input is checked: a public key that is not 32 bytes, or one of small
order that forces the all-zero shared secret (RFC 7748 6.1 "check"), raises
:class:`~qkdgate.errors.RemoteProtocolError`.
"""

from __future__ import annotations

import hmac
from collections.abc import Callable

from cryptography.hazmat.primitives.asymmetric.x25519 import X25519PrivateKey, X25519PublicKey

from qkdgate.errors import LocalProtocolError, RemoteProtocolError
from qkdgate.keymix.secret import SecretBytes

X25519_SIZE = 32


def x25519_keypair(rng: Callable[[int], bytes] | None = None) -> tuple[X25519PrivateKey, bytes]:
    """A fresh ephemeral key pair: (private key object, 32-byte public key).

    ``rng(n) -> n bytes`` is for replayable tests only (the scalar is
    clamped by X25519 itself, RFC 7748 5); production uses OpenSSL's CSPRNG.
    """
    if rng is None:
        key = X25519PrivateKey.generate()
    else:
        raw = rng(X25519_SIZE)
        if len(raw) != X25519_SIZE:
            raise LocalProtocolError("rng returned the wrong number of bytes")
        key = X25519PrivateKey.from_private_bytes(raw)
    return key, key.public_key().public_bytes_raw()


def x25519_shared(private_key: X25519PrivateKey, peer_public: bytes) -> SecretBytes:
    """The 32-byte shared secret with ``peer_public``."""
    if not isinstance(private_key, X25519PrivateKey):
        raise LocalProtocolError("x25519_shared needs an X25519PrivateKey")
    if not isinstance(peer_public, (bytes, bytearray, memoryview)):
        raise LocalProtocolError("X25519 public key must be bytes")
    if len(peer_public) != X25519_SIZE:
        raise RemoteProtocolError(f"X25519 public key is {len(peer_public)} bytes, expected 32")
    try:
        shared = private_key.exchange(X25519PublicKey.from_public_bytes(bytes(peer_public)))
    except ValueError:
        # OpenSSL refuses the all-zero result of a small-order point.
        raise RemoteProtocolError("X25519 public key has small order (all-zero shared "
                                  "secret, RFC 7748 6.1)") from None
    # RFC 7748 6.1: check in constant time, whatever the backend did.
    if hmac.compare_digest(shared, bytes(X25519_SIZE)):
        raise RemoteProtocolError("X25519 shared secret is all zero (RFC 7748 6.1)")
    return SecretBytes(shared)
