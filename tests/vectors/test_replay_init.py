"""The injected rng reaches the ephemeral key generation (issue 9 item 5).

Two sessions built from the same seeded rng must send byte-identical INITs:
the INIT carries the fresh ML-KEM encapsulation key and X25519 share, and
its only signature is Ed25519 (deterministic, RFC 8032 5.1.6). If either
key were drawn from the library's own CSPRNG the bytes would differ.
"""

from __future__ import annotations

import hashlib

from qkdgate.gateway.protocol.config import SessionConfig, TunnelRef
from qkdgate.gateway.protocol.identity import LocalIdentity
from qkdgate.gateway.protocol.session import PeerSession
from qkdgate.keymix.secret import SecretBytes


def _counter_rng(label: bytes):
    """SHA-256 in counter mode: deterministic bytes, different per label."""
    state = {"i": 0}

    def rng(n: int) -> bytes:
        out = b""
        while len(out) < n:
            out += hashlib.sha256(label + state["i"].to_bytes(8, "big")).digest()
            state["i"] += 1
        return out[:n]
    return rng


def _ident(name: str) -> LocalIdentity:
    h = hashlib.sha256(name.encode()).digest()
    return LocalIdentity("mldsa65-ed25519", SecretBytes(h), SecretBytes(h[::-1]), name)


def _init_datagrams(x25519: bool) -> list[bytes]:
    a, b = _ident("alpha"), _ident("bravo")
    cfg = SessionConfig("alpha", "bravo", (TunnelRef("t1", "ipsec"),), x25519=x25519)
    spis = iter(range(0x1000, 0x2000))
    s = PeerSession(cfg, identity=a, peer_identities=[b.public], rng=_counter_rng(b"alpha"),
                    now=1000.0, allocate_spi=lambda t: next(spis))
    s.handle_timer(1000.0)
    out = s.datagrams_to_send(1000.0)
    assert out, "the session sent no INIT on start"
    return out


def test_init_replays_byte_for_byte_with_x25519():
    assert _init_datagrams(True) == _init_datagrams(True)


def test_init_replays_byte_for_byte_pqc_only():
    assert _init_datagrams(False) == _init_datagrams(False)


def test_injected_kem_is_used_and_must_match_the_suite():
    import pytest

    from qkdgate.errors import LocalProtocolError
    from qkdgate.keymix.kem import get_kem

    real = get_kem("ML-KEM-768")
    calls = []

    class Counting:
        name, public_key_size = real.name, real.public_key_size
        ciphertext_size, shared_secret_size = real.ciphertext_size, real.shared_secret_size

        def generate_keypair(self, rng=None):
            calls.append("keygen")
            return real.generate_keypair(rng)

        def encapsulate(self, pk):
            return real.encapsulate(pk)

        def decapsulate(self, sk, ct):
            return real.decapsulate(sk, ct)

    a, b = _ident("alpha"), _ident("bravo")
    cfg = SessionConfig("alpha", "bravo", (TunnelRef("t1", "ipsec"),))
    s = PeerSession(cfg, identity=a, peer_identities=[b.public], rng=_counter_rng(b"a"),
                    now=0.0, allocate_spi=lambda t: 0x1000, kem=Counting())
    s.handle_timer(0.0)
    assert calls == ["keygen"]
    with pytest.raises(LocalProtocolError):
        PeerSession(SessionConfig("alpha", "bravo", kem="ML-KEM-1024"), identity=a,
                    peer_identities=[b.public], now=0.0, allocate_spi=lambda t: 0x1000,
                    kem=Counting())
