"""Two gateways' key services fed the same generations, as the daemon would."""

from __future__ import annotations

import hashlib

from qkdgate.keymix.combiner import Provenance, SessionSecret
from qkdgate.keymix.secret import SecretBytes
from qkdgate.keyservice.service import KeyService
from qkdgate.keyservice.settings import PoolSpec, ServiceTimes
from qkdgate.tunnels.policy import KeyPolicy

QKD_IDS = ("bc490419-7d60-487f-adc1-4ddcc177c139",)
TIMES = ServiceTimes(serve_margin=30.0, dec_window=20.0, clock_skew=5.0)


def pools(side: str, *, policy: KeyPolicy = KeyPolicy.HYBRID_REQUIRED, keys: int = 64,
          lifetime: float = 600.0) -> list[PoolSpec]:
    """The pool 'app' between SAE-A (at gateway A) and SAE-B (at gateway B)."""
    local, remote, peer = ("SAE-A", "SAE-B", "gw-b") if side == "A" else ("SAE-B", "SAE-A", "gw-a")
    return [PoolSpec("app", peer, local, remote, key_size=256, keys=keys, lifetime=lifetime,
                     policy=policy)]


def session(generation: int, *, qkd: bool = True, tag: bytes = b"") -> SessionSecret:
    s = hashlib.sha384(b"test generation %d" % generation + tag).digest()
    return SessionSecret(SecretBytes(s), Provenance("ML-KEM-768", True, QKD_IDS if qkd else ()))


class Pair:
    """Gateway A (the initiator of every generation here) and gateway B."""

    def __init__(self, **kw: object) -> None:
        self.events: list[object] = []
        self.a = KeyService(pools("A", **kw), TIMES, kme_id="qkdgate-a", emit=self.events.append)
        self.b = KeyService(pools("B", **kw), TIMES, kme_id="qkdgate-b", emit=self.events.append)

    def rekey(self, generation: int, now: float, *, qkd: bool = True, confirm_b: bool = True,
              confirm_a: bool = True) -> None:
        """The protocol's order: A keyed (InstallInbound after RESP), B keyed
        and confirmed (CONFIRM), A confirmed (DONE)."""
        s_a, s_b = session(generation, qkd=qkd), session(generation, qkd=qkd)
        self.a.generation_keyed("gw-b", generation, s_a, "initiator", now)
        self.b.generation_keyed("gw-a", generation, s_b, "responder", now)
        if confirm_b:
            self.b.generation_confirmed("gw-a", generation, now)
        if confirm_a:
            self.a.generation_confirmed("gw-b", generation, now)
