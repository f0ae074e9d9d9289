"""The key service's decisions, without I/O: which key, for whom, or why not.

Theory of operation: the daemon hands :class:`KeyService` each generation of
each peer as the protocol reaches it (:meth:`generation_keyed` on
InstallInbound, :meth:`generation_confirmed` on InstallOutbound,
:meth:`generation_aborted`, :meth:`peer_failed`); the north-bound servers
(:mod:`.etsi014`, :mod:`.skip`) turn an SAE's request into one call of
:meth:`enc_keys` / :meth:`dec_keys` / :meth:`status` and the answer into
their protocol's reply. Every answer is a :class:`Delivery` or a
:class:`Refusal`; nothing here raises for an SAE's mistake. Time is passed
in (``now``), so tests replay rekeys, windows and expiry exactly.

Fail closed (docs/keyservice.md 4): only the newest confirmed generation of a
peer serves, and only if it meets the pool's policy -- an older generation
is never used as a fallback; no generation, a refused one, or one within T
of its expiry answers "no key" (503). The one timer owner for a
generation's life is :meth:`handle_timer` (erasure); serving ends by
comparison with ``now``.
"""

from __future__ import annotations

import enum
from collections.abc import Callable, Iterable, Sequence
from dataclasses import dataclass, field

from qkdgate.errors import LocalProtocolError
from qkdgate.keymix.combiner import SessionSecret
from qkdgate.keymix.keypool import KeyPoolSecret
from qkdgate.keymix.secret import SecretBytes
from qkdgate.keyservice.events import KeysDelivered, KeysRefused, Provenance, ServiceEvent
from qkdgate.keyservice.pool import Generation, GenState, PoolState
from qkdgate.keyservice.settings import MAX_KEY_PER_REQUEST, PoolSpec, ServiceTimes


class Why(enum.Enum):
    """Why a request was refused; each API maps it to its own status."""

    UNAUTHORIZED = "unauthorized"       # caller not allowed (ETSI 014 401)
    BAD_REQUEST = "bad request"         # malformed, wrong size, unknown peer SAE (400)
    NOT_FOUND = "not found"             # key_ID unknown, expired or already fetched (400 / 404)
    NO_KEY = "no key"                   # no generation may serve (503)


STATUS = {Why.UNAUTHORIZED: 401, Why.BAD_REQUEST: 400, Why.NOT_FOUND: 400, Why.NO_KEY: 503}


@dataclass(frozen=True, slots=True)
class Refusal:
    why: Why
    message: str
    details: dict[str, object] = field(default_factory=dict)

    @property
    def status(self) -> int:
        return STATUS[self.why]


@dataclass(frozen=True, slots=True)
class ServedKey:
    key_id: str
    index: int
    key: SecretBytes


@dataclass(frozen=True, slots=True)
class Delivery:
    pool: PoolSpec
    keys: tuple[ServedKey, ...]
    provenance: Provenance
    single_source: bool

    def extension(self) -> dict[str, object]:
        """Provenance for the answer (ETSI GS QKD 014 6.3 vendor extension,
        names with the ``qkdgate_`` prefix): which generation and inputs."""
        return {"qkdgate_pool": self.pool.name, "qkdgate_generation": self.provenance.generation,
                "qkdgate_inputs": self.provenance.inputs,
                "qkdgate_qkd_key_IDs": list(self.provenance.qkd_key_ids),
                "qkdgate_policy": self.pool.policy.value,
                "qkdgate_single_source": self.single_source}


MSG_KEYS_NOT_FOUND = "one or more keys specified are not found on KME"   # ETSI GS QKD 014 6.5


class KeyService:
    def __init__(self, pools: Sequence[PoolSpec], times: ServiceTimes, *, kme_id: str,
                 emit: Callable[[ServiceEvent], None] | None = None) -> None:
        times.check()
        names = [p.name for p in pools]
        if len(set(names)) != len(names):
            raise LocalProtocolError("key-service pool names must be unique")
        for p in pools:
            p.check(times)
        self.times, self.kme_id = times, kme_id
        self.pools = {p.name: PoolState(p, times) for p in pools}
        self._emit = emit or (lambda _e: None)
        self.local_saes = frozenset(p.local_sae for p in pools)
        self.delivered = 0
        self.refused = 0

    # ------------------------------------------------------ generations
    def _of_peer(self, peer: str) -> Iterable[PoolState]:
        return (ps for ps in self.pools.values() if ps.spec.peer == peer)

    def generation_keyed(self, peer: str, generation: int, session: SessionSecret, role: str,
                         now: float) -> None:
        """We hold ``generation``'s secret and the peer proved it holds it
        too (or will, before it can serve): its keys may be fetched."""
        prov = session.provenance
        provenance = Provenance(peer, generation, role, prov.kem_name, prov.x25519,
                                tuple(prov.qkd_key_ids))
        for ps in self._of_peer(peer):
            old = ps.generations.get(generation)
            if old is not None:
                if old.session_id == session.session_id:
                    continue            # the same exchange told twice
                # A rebuilt session reusing the number: the new secret wins; the
                # old one's keys could never be fetched at the peer again.
                old.erase()
            secret = KeyPoolSecret.derive(session, ps.spec.name, generation)
            g = Generation(ps.spec, self.times, secret, provenance, now)
            g.session_id = session.session_id
            ps.generations[generation] = g

    def generation_confirmed(self, peer: str, generation: int, now: float) -> None:
        """Key confirmation both ways: ``generation`` serves (if its inputs
        meet the policy) and every older one stops."""
        for ps in self._of_peer(peer):
            g = ps.generations.get(generation)
            if g is None:
                continue
            g.confirm(now)
            for old in ps.generations.values():
                if old.number < generation:
                    old.stop(now)

    def generation_aborted(self, peer: str, generation: int, now: float) -> None:
        for ps in self._of_peer(peer):
            g = ps.generations.get(generation)
            if g is not None and g.state is GenState.PENDING:
                g.erase_at = now
        self.handle_timer(now)

    def peer_failed(self, peer: str, now: float) -> None:
        """The peer's session failed (our bug or a restart): serve nothing
        more from its generations until a fresh one is confirmed."""
        for ps in self._of_peer(peer):
            for g in ps.generations.values():
                g.stop(now)

    def get_timer(self) -> float | None:
        return min((d for ps in self.pools.values()
                    if (d := ps.next_deadline()) is not None), default=None)

    def handle_timer(self, now: float) -> list[tuple[str, int]]:
        """Erase every generation whose time is up; returns (pool, generation)."""
        return [(ps.spec.name, g.number) for ps in self.pools.values() for g in ps.expire(now)]

    # ------------------------------------------------------ requests
    def _refuse(self, api: str, caller: str | None, pool: str | None, why: Why, message: str,
                **details: object) -> Refusal:
        self.refused += 1
        r = Refusal(why, message, dict(details))
        self._emit(KeysRefused(pool, api, caller, r.status, message))
        return r

    def pool_for(self, local: str, remote: str) -> PoolState | None:
        for ps in self.pools.values():
            if ps.spec.local_sae == local and ps.spec.remote_sae == remote:
                return ps
        return None

    def _serving(self, ps: PoolState, now: float) -> Generation | Refusal:
        g = ps.current()
        spec = ps.spec
        if g is None:
            return Refusal(Why.NO_KEY, f"no key: no generation with peer {spec.peer} is "
                                       "confirmed yet")
        if g.state is GenState.REFUSED:
            return Refusal(Why.NO_KEY, f"no key: generation {g.number} has inputs "
                           f"{g.provenance.inputs}, which policy {spec.policy.value} refuses",
                           {"qkdgate_generation": g.number})
        if not g.serving(now):
            return Refusal(Why.NO_KEY, f"no key: generation {g.number} no longer serves (within "
                           f"{self.times.serve_margin:g} s of its expiry, or superseded); "
                           "waiting for the next rekey", {"qkdgate_generation": g.number})
        return g

    def enc_keys(self, caller: str, slave: str, number: int, size: int | None, now: float,
                 api: str = "enc_keys") -> Delivery | Refusal:
        """ETSI GS QKD 014 5.3 for master ``caller`` and slave ``slave``."""
        if caller not in self.local_saes:
            return self._refuse(api, caller, None, Why.UNAUTHORIZED, "Unauthorized")
        ps = self.pool_for(caller, slave)
        if ps is None:
            return self._refuse(api, caller, None, Why.BAD_REQUEST, "Bad request format",
                                unknown_slave_SAE_ID=slave)
        spec = ps.spec
        if size is not None and size != spec.key_size:
            # One size per pool: the peer must recompute every key from the index alone.
            return self._refuse(api, caller, spec.name, Why.BAD_REQUEST, "Bad request format",
                                qkdgate_key_size_of_pool=spec.key_size)
        if not 1 <= number <= MAX_KEY_PER_REQUEST:
            return self._refuse(api, caller, spec.name, Why.BAD_REQUEST, "Bad request format",
                                number_out_of_range=[1, MAX_KEY_PER_REQUEST])
        g = self._serving(ps, now)
        if isinstance(g, Refusal):
            return self._refuse(api, caller, spec.name, g.why, g.message, **g.details)
        if g.remaining < number:
            return self._refuse(api, caller, spec.name, Why.NO_KEY,
                                f"no key: generation {g.number} has {g.remaining} keys left "
                                "for this gateway; the next rekey refills",
                                stored_key_count=g.remaining)
        indices = g.take(number)
        keys = tuple(ServedKey(g.secret.key_id(i), i, g.secret.key(caller, slave, i,
                                                                     spec.key_size))
                     for i in indices)
        return self._deliver(api, ps, g, caller, slave, keys)

    def dec_keys(self, caller: str, master: str, key_ids: Sequence[str], now: float,
                 api: str = "dec_keys") -> Delivery | Refusal:
        """ETSI GS QKD 014 5.4 for slave ``caller``: all or nothing, each key once."""
        if caller not in self.local_saes:
            return self._refuse(api, caller, None, Why.UNAUTHORIZED, "Unauthorized")
        ps = self.pool_for(caller, master)
        if ps is None:
            # 5.4: the caller was not named as the slave of keys from that master.
            return self._refuse(api, caller, None, Why.UNAUTHORIZED, "Unauthorized")
        if not key_ids or len(set(key_ids)) != len(key_ids):
            return self._refuse(api, caller, ps.spec.name, Why.BAD_REQUEST, "Bad request format")
        found: list[tuple[Generation, int]] = []
        for kid in key_ids:
            g, i = ps.find(kid)
            if g is None or i is None:
                reason = ("its generation expired: the dec_keys window ended"
                          if i is not None else "not from any generation this gateway holds "
                          "(issued before a restart of either gateway, or long expired)")
                return self._refuse(api, caller, ps.spec.name, Why.NOT_FOUND, MSG_KEYS_NOT_FOUND,
                                    key_ID=kid, qkdgate_reason=reason)
            if not g.fetchable(now):
                why = (f"generation {g.number} refused by policy {ps.spec.policy.value}"
                       if g.state is GenState.REFUSED else
                       f"generation {g.number} expired: the dec_keys window ended")
                return self._refuse(api, caller, ps.spec.name, Why.NOT_FOUND, MSG_KEYS_NOT_FOUND,
                                    key_ID=kid, qkdgate_reason=why)
            if g.confirmed_at is not None and not g.meets_policy():
                return self._refuse(api, caller, ps.spec.name, Why.NOT_FOUND, MSG_KEYS_NOT_FOUND,
                                    key_ID=kid, qkdgate_reason=f"generation {g.number} refused "
                                    f"by policy {ps.spec.policy.value}")
            if i in g.fetched:
                return self._refuse(api, caller, ps.spec.name, Why.NOT_FOUND, MSG_KEYS_NOT_FOUND,
                                    key_ID=kid, qkdgate_reason="already delivered")
            found.append((g, i))
        if len({g.number for g, _ in found}) != 1:
            return self._refuse(api, caller, ps.spec.name, Why.BAD_REQUEST, "Bad request format",
                                qkdgate_reason="key_IDs of several generations in one request")
        g = found[0][0]
        keys = []
        for (_, i), kid in zip(found, key_ids, strict=True):
            g.fetched.add(i)
            keys.append(ServedKey(kid, i, g.secret.key(master, caller, i, ps.spec.key_size)))
        return self._deliver(api, ps, g, master, caller, tuple(keys))

    def _deliver(self, api: str, ps: PoolState, g: Generation, master: str, slave: str,
                 keys: tuple[ServedKey, ...]) -> Delivery:
        self.delivered += len(keys)
        self._emit(KeysDelivered(ps.spec.name, api, master, slave,
                                 tuple(k.key_id for k in keys), tuple(k.index for k in keys),
                                 g.provenance))
        return Delivery(ps.spec, keys, g.provenance, g.single_source)

    def status(self, caller: str, slave: str, now: float) -> dict[str, object] | Refusal:
        """ETSI GS QKD 014 5.2 / 6.1 Status for master ``caller``."""
        if caller not in self.local_saes:
            return self._refuse("status", caller, None, Why.UNAUTHORIZED, "Unauthorized")
        ps = self.pool_for(caller, slave)
        if ps is None:
            return self._refuse("status", caller, None, Why.BAD_REQUEST, "Bad request format",
                                unknown_slave_SAE_ID=slave)
        spec = ps.spec
        g = self._serving(ps, now)
        ext: dict[str, object] = {"qkdgate_pool": spec.name, "qkdgate_policy": spec.policy.value,
                                  "qkdgate_serving": not isinstance(g, Refusal)}
        if isinstance(g, Refusal):
            ext["qkdgate_reason"] = g.message
        else:
            ext.update({"qkdgate_generation": g.number, "qkdgate_inputs": g.provenance.inputs,
                        "qkdgate_qkd_key_IDs": list(g.provenance.qkd_key_ids),
                        "qkdgate_single_source": g.single_source})
        return {"source_KME_ID": self.kme_id, "target_KME_ID": spec.peer,
                "master_SAE_ID": caller, "slave_SAE_ID": slave, "key_size": spec.key_size,
                "stored_key_count": 0 if isinstance(g, Refusal) else g.remaining,
                "max_key_count": (spec.keys + 1) // 2, "max_key_per_request": MAX_KEY_PER_REQUEST,
                "max_key_size": spec.key_size, "min_key_size": spec.key_size,
                "max_SAE_ID_count": 0, "status_extension": ext}

    def snapshot(self, now: float) -> dict[str, object]:
        """For ``qkdgate status``: every pool and the generations it holds."""
        return {"kme_id": self.kme_id, "delivered": self.delivered, "refused": self.refused,
                "pools": {name: {"peer": ps.spec.peer, "local_sae": ps.spec.local_sae,
                                 "remote_sae": ps.spec.remote_sae,
                                 "key_size": ps.spec.key_size,
                                 "policy": ps.spec.policy.value,
                                 "generations": [g.summary(now) for g in
                                                 sorted(ps.generations.values(),
                                                        key=lambda g: g.number)]}
                          for name, ps in self.pools.items()}}
