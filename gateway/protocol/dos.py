"""Cheap checks before expensive work: per-peer token bucket and stateless cookies.

Theory of operation: an INIT costs the responder an ML-KEM encapsulation,
an X25519 exchange and an ML-DSA signature, so it passes three cheap gates
first (docs/protocol.md 7): mac1 (an HMAC keyed with the receiver's name
and the PSK), this module's :class:`TokenBucket` (``rate`` INITs per second,
``burst`` at once) and, when the bucket is empty, a stateless cookie in the
manner of IKEv2 COOKIE (RFC 7296 2.6) and WireGuard's cookie reply: the
responder answers with ``HMAC(secret, INIT core)[:16]`` and keeps no state;
only an initiator that receives datagrams sent to the peer's configured
address can echo it. Secrets rotate every :data:`COOKIE_ROTATE` seconds and
the previous one is still accepted, so a cookie stays valid for one to two
periods.
"""

from __future__ import annotations

import hashlib
import hmac
from collections.abc import Callable

from qkdgate.gateway.protocol.constants import COOKIE_LEN, COOKIE_ROTATE

__all__ = ["COOKIE_LEN", "COOKIE_ROTATE", "CookieJar", "TokenBucket"]


class TokenBucket:
    def __init__(self, rate: float, burst: int, now: float) -> None:
        self.rate, self.burst = float(rate), float(burst)
        self.tokens, self.updated = float(burst), now

    def take(self, now: float) -> bool:
        """Consume one token if there is one."""
        if now > self.updated:
            self.tokens = min(self.burst, self.tokens + (now - self.updated) * self.rate)
            self.updated = now
        if self.tokens >= 1.0:
            self.tokens -= 1.0
            return True
        return False


class CookieJar:
    def __init__(self, rng: Callable[[int], bytes], now: float) -> None:
        self._rng = rng
        self._secrets = [rng(32), rng(32)]
        self._rotated = now

    def _rotate(self, now: float) -> None:
        while now - self._rotated >= COOKIE_ROTATE:
            self._secrets = [self._rng(32), self._secrets[0]]
            self._rotated += COOKIE_ROTATE
            if now - self._rotated >= 2 * COOKIE_ROTATE:  # long idle: skip ahead
                self._secrets = [self._rng(32), self._rng(32)]
                self._rotated = now

    @staticmethod
    def _mac(secret: bytes, init_core: bytes) -> bytes:
        return hmac.new(secret, b"qkdgate/1 cookie\0" + hashlib.sha256(init_core).digest(),
                        hashlib.sha256).digest()[:COOKIE_LEN]

    def make(self, init_core: bytes, now: float) -> bytes:
        self._rotate(now)
        return self._mac(self._secrets[0], init_core)

    def check(self, init_core: bytes, cookie: bytes, now: float) -> bool:
        self._rotate(now)
        if len(cookie) != COOKIE_LEN:
            return False
        return any(hmac.compare_digest(self._mac(s, init_core), cookie) for s in self._secrets)
