"""One generation's share of one key-service pool, and the pool's generations.

Theory of operation (docs/keyservice.md 4): a :class:`Generation` starts
*pending* when this gateway holds the generation's session secret with the
peer's key confirmation checked (InstallInbound): its pool secret P is
derived, and the key_IDs of the peer's half of the index space are computed
so a dec_keys can find them. It becomes *serving* on key confirmation both
ways (InstallOutbound: the initiator after DONE, the responder after
CONFIRM) if its inputs meet the pool's policy, else *refused*. It stops
serving when a newer generation of the peer is confirmed or T seconds before
it expires, whichever comes first; dec_keys still finds its keys until W (+
the tolerated clock skew) after that; then P is wiped (*erased*). The key_IDs
of an erased generation are kept a little longer as a tombstone, only so a
late dec_keys is told "expired" rather than "unknown".

Single use: this gateway serves its own half (initiator even, responder odd)
through one counter that only moves forward, and marks each index of the
peer's half when it is fetched. Nothing is written to disk.
"""

from __future__ import annotations

import enum

from qkdgate.keymix.keypool import KeyPoolSecret, serving_parity
from qkdgate.keyservice.events import Provenance
from qkdgate.keyservice.settings import PoolSpec, ServiceTimes

TOMBSTONES = 4          # erased generations per pool whose key_IDs are still recognised


class GenState(enum.Enum):
    PENDING = "pending"
    SERVING = "serving"
    REFUSED = "refused"         # confirmed, but its inputs do not meet the pool's policy
    STOPPED = "stopped"         # no new keys; dec_keys until erase_at
    ERASED = "erased"


def legs_of(prov: Provenance) -> frozenset[str]:
    return frozenset({"mlkem"} | ({"x25519"} if prov.x25519 else set())
                     | ({"qkd"} if prov.qkd_key_ids else set()))


class Generation:
    def __init__(self, spec: PoolSpec, times: ServiceTimes, secret: KeyPoolSecret,
                 provenance: Provenance, now: float) -> None:
        self.spec, self.times, self.secret, self.provenance = spec, times, secret, provenance
        self.number = provenance.generation
        self.state = GenState.PENDING
        self.parity = serving_parity(provenance.role)
        self.next_index = self.parity
        self.pending_at = now
        self.confirmed_at: float | None = None
        self.stop_at = float("inf")
        self.erase_at = now + spec.lifetime     # a generation never confirmed dies too
        self.peer_ids = {secret.key_id(i): i for i in range(1 - self.parity, spec.keys, 2)}
        self.fetched: set[int] = set()
        self.served = 0
        self.session_id = b""           # public handle of the generation's secret

    @property
    def single_source(self) -> bool:
        """True if the generation lacks one of the three inputs (QKD, ML-KEM, X25519)."""
        return legs_of(self.provenance) != frozenset({"mlkem", "x25519", "qkd"})

    def meets_policy(self) -> bool:
        return self.spec.policy.required <= legs_of(self.provenance)

    def confirm(self, now: float) -> None:
        if self.state is not GenState.PENDING:
            return
        self.confirmed_at = now
        self.erase_at = now + self.spec.lifetime
        if self.meets_policy():
            self.state = GenState.SERVING
            self.stop_at = self.erase_at - self.times.serve_margin
        else:
            self.state = GenState.REFUSED
            self.stop_at = now

    def stop(self, now: float) -> None:
        """A newer generation took over (or the peer failed): no new keys;
        the peer's keys stay fetchable for W + skew."""
        if self.state in (GenState.SERVING, GenState.PENDING, GenState.REFUSED):
            if self.state is GenState.SERVING:
                self.state = GenState.STOPPED
            self.stop_at = min(self.stop_at, now)
            self.erase_at = min(self.erase_at,
                                now + self.times.dec_window + self.times.clock_skew)

    def serving(self, now: float) -> bool:
        return self.state is GenState.SERVING and now < self.stop_at

    def fetchable(self, now: float) -> bool:
        """dec_keys may deliver the peer's keys of this generation."""
        return self.state in (GenState.PENDING, GenState.SERVING, GenState.STOPPED) \
            and now < self.erase_at and not self.secret.wiped

    @property
    def remaining(self) -> int:
        return max(0, (self.spec.keys - self.next_index + 1) // 2)

    def take(self, n: int) -> list[int]:
        out = list(range(self.next_index, self.next_index + 2 * n, 2))
        self.next_index += 2 * n
        self.served += n
        return out

    def erase(self) -> None:
        self.secret.wipe()
        self.state = GenState.ERASED
        self.stop_at = min(self.stop_at, self.erase_at)

    def summary(self, now: float) -> dict[str, object]:
        return {"generation": self.number, "state": self.state.value,
                "serving": self.serving(now), "role": self.provenance.role,
                "inputs": self.provenance.inputs,
                "qkd_key_ids": list(self.provenance.qkd_key_ids),
                "single_source": self.single_source, "served": self.served,
                "remaining": self.remaining if self.serving(now) else 0,
                "fetched": len(self.fetched),
                "stops_in": _left(self.stop_at, now), "erased_in": _left(self.erase_at, now)}


def _left(t: float, now: float) -> float | None:
    return None if t == float("inf") else round(max(0.0, t - now), 1)


class PoolState:
    """The generations one pool holds, newest last."""

    def __init__(self, spec: PoolSpec, times: ServiceTimes) -> None:
        self.spec, self.times = spec, times
        self.generations: dict[int, Generation] = {}
        self.tombstones: dict[str, int] = {}          # key_ID -> generation, erased ones
        self._tomb_order: list[int] = []

    def current(self) -> Generation | None:
        """The newest confirmed generation (serving or not)."""
        confirmed = [g for g in self.generations.values() if g.confirmed_at is not None
                     and g.state is not GenState.ERASED]
        return max(confirmed, key=lambda g: g.number) if confirmed else None

    def find(self, key_id: str) -> tuple[Generation | None, int | None]:
        for g in self.generations.values():
            i = g.peer_ids.get(key_id)
            if i is not None:
                return g, i
        return None, self.tombstones.get(key_id)

    def expire(self, now: float) -> list[Generation]:
        gone = [g for g in self.generations.values() if now >= g.erase_at]
        for g in gone:
            g.erase()
            del self.generations[g.number]
            self.tombstones.update(dict.fromkeys(g.peer_ids, g.number))
            self._tomb_order.append(g.number)
            while len(self._tomb_order) > TOMBSTONES:
                old = self._tomb_order.pop(0)
                self.tombstones = {k: n for k, n in self.tombstones.items() if n != old}
        return gone

    def next_deadline(self) -> float | None:
        return min((g.erase_at for g in self.generations.values()), default=None)
