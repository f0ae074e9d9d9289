"""Shared helpers for the tunnel manager tests: a stand-in session secret and
key schedule (the real one is qkdgate.keymix.schedule; these tests are about
what reaches the kernel, in which order)."""

import hashlib
import hmac
from dataclasses import dataclass
from types import SimpleNamespace

from qkdgate.keymix.secret import SecretBytes


@dataclass(frozen=True)
class Prov:
    kem_name: str = "ML-KEM-768"
    x25519: bool = True
    qkd_key_ids: tuple = ("6f1c2a5e-0000-4000-8000-000000000001",)
    qkd_sources: tuple = ()


class Session:
    def __init__(self, seed: bytes, prov=Prov()):
        self.secret = SecretBytes(hashlib.sha256(seed).digest())
        self.provenance = prov


class Schedule:
    """Deterministic HMAC-based stand-in for qkdgate.keymix.schedule."""

    @staticmethod
    def _mac(session, *parts, n=32):
        msg = "|".join(map(str, parts)).encode()
        out = hmac.new(session.secret.reveal(), msg, hashlib.sha512).digest()
        return out[:n]

    def esp_key(self, session, tunnel_id, direction, spi, generation):
        return SecretBytes(self._mac(session, "esp", tunnel_id, direction, spi, generation, n=36))

    def macsec_keys(self, session, tunnel_id, direction, sci, an, generation, cipher):
        raw = self._mac(session, "macsec", tunnel_id, direction, sci, an, generation, n=64)
        return SimpleNamespace(sak=SecretBytes(raw[:32]), keyid=raw[32:48],
                               salt=SecretBytes(raw[48:60]), ssci=1)
