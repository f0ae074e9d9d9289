"""X25519 leg: agreement and rejection of bad peer keys (RFC 7748)."""

import pytest
from cryptography.hazmat.primitives.asymmetric.x25519 import X25519PrivateKey

from qkdgate.errors import LocalProtocolError, RemoteProtocolError
from qkdgate.keymix.classical import x25519_keypair, x25519_shared
from qkdgate.keymix.secret import SecretBytes

# Points of small order on Curve25519 (u = 0, 1, and an order-8 point):
# the shared secret is all zero whatever our scalar (RFC 7748 6.1).
SMALL_ORDER = [bytes(32), (1).to_bytes(32, "little"),
               bytes.fromhex("e0eb7a7c3b41b8ae1656e3faf19fc46ada098deb9c32b1fd866205165f49b800")]


def test_both_sides_agree_and_keys_are_fresh():
    a, pa = x25519_keypair()
    b, pb = x25519_keypair()
    s = x25519_shared(a, pb)
    assert isinstance(s, SecretBytes) and len(s) == 32 and s == x25519_shared(b, pa)
    c, pc = x25519_keypair()
    assert pc not in (pa, pb) and x25519_shared(c, pa) != s


def test_rfc7748_6_1_vector():
    alice = X25519PrivateKey.from_private_bytes(bytes.fromhex(
        "77076d0a7318a57d3c16c17251b26645df4c2f87ebc0992ab177fba51db92c2a"))
    bob_pub = bytes.fromhex("de9edb7d7b7dc1b4d35b61c2ece435373f8343c85b78674dadfc7e146f882b4f")
    assert x25519_shared(alice, bob_pub).reveal().hex() == \
        "4a5d9d5ba4ce2de1728e3bf480350f25e07e21c947d19e3376f09b3c1e161742"


@pytest.mark.parametrize("point", SMALL_ORDER, ids=["zero", "one", "order8"])
def test_small_order_points_are_remote_errors(point):
    a, _ = x25519_keypair()
    with pytest.raises(RemoteProtocolError, match=r"small order|all zero"):
        x25519_shared(a, point)


@pytest.mark.parametrize("length", [0, 31, 33, 56])
def test_wrong_length_is_remote_error(length):
    a, _ = x25519_keypair()
    with pytest.raises(RemoteProtocolError, match="expected 32"):
        x25519_shared(a, b"\x09" * length)


def test_caller_misuse_is_local_error():
    a, pa = x25519_keypair()
    with pytest.raises(LocalProtocolError):
        x25519_shared("key", pa)
    with pytest.raises(LocalProtocolError):
        x25519_shared(a, pa.hex())


def test_injected_rng_makes_keys_replayable():
    rng = lambda n: b"\x11" * n  # noqa: E731
    (a, pa), (_b, pb) = x25519_keypair(rng), x25519_keypair(rng)
    assert pa == pb and a.private_bytes_raw() == b"\x11" * 32
    with pytest.raises(LocalProtocolError):
        x25519_keypair(lambda n: b"\x11" * (n - 1))
