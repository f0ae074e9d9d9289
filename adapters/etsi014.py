"""ETSI GS QKD 014 key source: the gateway as an SAE talking to its KME.

Theory of operation: :class:`Etsi014KeySource` implements
:class:`qkdgate.interfaces.KeySource` over HTTPS with mutual TLS. Message
rules live in :mod:`qkdgate.adapters.etsi014_codec` (sans-IO); this module
does only I/O, retries and identity checks.

HTTP: :class:`qkdgate.adapters.https.KmeHttps` (aiohttp, keep-alive pool,
mutual TLS, KME ID check, bounded retries; it says why aiohttp).

Retries: bounded (``retries``), exponential backoff with full jitter, only
where a retry can help -- network errors, timeouts and 503. Never for 400 or
401: those answers will not change. ``dec_keys`` is not idempotent (the KME
deletes a key once delivered): when its response is lost, the retry meets
400 and the caller gets :class:`~qkdgate.errors.KeyNotFound`. That is the
defined outcome -- the protocol layer reports "key lost", aborts the rekey,
and the master starts a new one with new keys, so a key is never used by
one side only (docs/qkd.md, "Lost dec_keys responses").
"""

from __future__ import annotations

import asyncio
import logging
import random
import ssl
import time
from collections.abc import Awaitable, Callable, Mapping, Sequence
from urllib.parse import quote

from yarl import URL

from qkdgate.adapters import etsi014_codec as codec
from qkdgate.adapters.https import KmeHttps
from qkdgate.adapters.profiles import Profile, get_profile
from qkdgate.adapters.settings import SourceSettings, source_settings, to_float
from qkdgate.adapters.tls import client_context
from qkdgate.errors import (
    ConfigError,
    KeyNotFound,
    KeySourceError,
    KeySourceProtocolError,
    KeyUnavailable,
    LocalProtocolError,
)
from qkdgate.interfaces import KeySourceStatus, QkdKey

log = logging.getLogger("qkdgate.adapters.etsi014")


class Etsi014KeySource:
    """An SAE's client for its KME (ETSI GS QKD 014 V1.1.1).

    ``sleep`` and ``rng`` are injected so tests run the retry schedule
    without waiting; ``ssl_context`` overrides the one built from the
    settings' files (tests, or an HSM-backed context).
    """

    def __init__(self, settings: object, *,
                 ssl_context: ssl.SSLContext | None = None,
                 sleep: Callable[[float], Awaitable[None]] = asyncio.sleep,
                 rng: Callable[[], float] = random.random,
                 now: Callable[[], float] = time.monotonic) -> None:
        self._now = now
        # (time, stored_key_count, keys we took since) per peer: the recent
        # production rate for KMEs that do not report one.
        self._rate_marks: dict[str, tuple[float, int, int]] = {}
        self._taken: dict[str, int] = {}
        self.settings = s = source_settings(settings, "etsi014")
        opts = s.options
        self.profile: Profile = get_profile(str(opts.get("profile", "generic")), opts)
        self.name = s.name
        base = s.url
        for suffix in ("/api/v1/keys", "/api/v1"):
            if base.endswith(suffix):
                base = base[: -len(suffix)]
        self._base = base
        verify_hostname = bool(opts.get("verify_hostname", True))
        if not verify_hostname and not s.kme_id:
            # Without either check any certificate from the CA would pass as the KME.
            raise ConfigError("verify_hostname: false needs kme_id, so the KME is still "
                              "identified by its certificate", path=s.where("kme_id"))
        if ssl_context is None:
            if s.tls is None:
                raise ConfigError("ETSI 014 needs mutual TLS: set tls.cert, tls.key and tls.ca",
                                  path=s.where("tls"))
            ssl_context = client_context(s.tls.cert, s.tls.key, s.tls.ca,
                                         check_hostname=verify_hostname)
        self.http = KmeHttps(
            ssl_context=ssl_context, timeout=s.timeout, retries=s.retries, kme_id=s.kme_id,
            label=f"KME {s.kme_id or base}",
            reuse_connections=bool(opts.get("reuse_connections", True)),
            server_hostname=_opt_str(opts, "server_hostname", s),
            backoff=to_float(opts.get("backoff", 0.2)),
            max_backoff=to_float(opts.get("max_backoff", 5.0)), sleep=sleep, rng=rng)
        self._ext_mandatory = _extensions(opts, "extension_mandatory", s)
        self._ext_optional = _extensions(opts, "extension_optional", s)
        self.last_status: codec.Status | None = None

    @classmethod
    def from_settings(cls, settings: object) -> Etsi014KeySource:
        return cls(settings)

    def __repr__(self) -> str:
        return f"<Etsi014KeySource {self.name} {self._base} profile={self.profile.name}>"

    # ------------------------------------------------------------------ I/O

    def _url(self, sae_id: str, method: str) -> URL:
        # ETSI GS QKD 014 5.1: SAE IDs in the path are URL-encoded.
        return URL(f"{self._base}/api/v1/keys/{quote(sae_id, safe='')}/{method}", encoded=True)

    def _classify(self, what: str, status: int, raw: bytes) -> KeySourceError:
        return codec.classify_error(what, status, raw, kme=self.http.label,
                                    empty_pool_statuses=self.profile.empty_pool_statuses)

    async def _call(self, what: str, http_method: str, url: URL, *,
                    params: Mapping[str, str] | None = None,
                    body: Mapping[str, object] | None = None) -> bytes:
        return await self.http.request(what, http_method, url, self._classify,
                                       params=params, body=body)

    # ------------------------------------------------------------ KeySource

    async def get_new_keys(self, peer_sae_id: str, number: int = 1, size_bits: int | None = 256,
                           additional_slave_sae_ids: Sequence[str] = ()) -> list[QkdKey]:
        """ETSI GS QKD 014 5.3 Get key: called by the master SAE."""
        return (await self.enc_keys(peer_sae_id, number, size_bits, additional_slave_sae_ids)).keys

    async def enc_keys(self, peer_sae_id: str, number: int = 1, size_bits: int | None = None,
                       additional_slave_sae_ids: Sequence[str] = (),
                       extension_mandatory: Sequence[Mapping[str, object]] | None = None,
                       extension_optional: Sequence[Mapping[str, object]] | None = None,
                       ) -> codec.KeyContainer:
        """Get key with the whole answer: per-key and container extensions
        come back as the KME sent them. Extensions default to the configured
        ``options.extension_mandatory`` / ``extension_optional``."""
        if size_bits is None:
            size_bits = self.profile.default_key_bits
        if not isinstance(number, int) or number < 1:
            raise LocalProtocolError(f"number of keys must be >= 1, not {number!r}")
        if not isinstance(size_bits, int) or size_bits <= 0 or size_bits % 8:
            raise LocalProtocolError(
                f"key size must be a positive multiple of 8 bits, not {size_bits!r}")
        peer = self._sae(peer_sae_id)
        extra = [self._sae(x) for x in additional_slave_sae_ids]
        body = codec.key_request(
            number, size_bits, extra,
            self._ext_mandatory if extension_mandatory is None else extension_mandatory,
            self._ext_optional if extension_optional is None else extension_optional)
        url = self._url(peer, "enc_keys")
        if self.profile.enc_keys_method == "GET" and codec.can_use_get(body):
            raw = await self._call("enc_keys", "GET", url,
                                   params={k: str(v) for k, v in body.items()})
        else:
            raw = await self._call("enc_keys", "POST", url, body=body)
        container = codec.parse_key_container(raw, size_bits=size_bits, max_keys=number)
        if len(container.keys) < number:
            got = len(container.keys)
            for k in container.keys:   # never handed out: no side will use them
                k.key.wipe()
            raise KeyUnavailable(f"KME enc_keys: {got} of {number} keys delivered (pool short)")
        self._taken[peer] = self._taken.get(peer, 0) + number
        log.debug("%s: enc_keys for %s -> %s", self.name, peer, [k.key_id for k in container.keys])
        return container

    async def get_keys_by_id(self, master_sae_id: str, key_ids: Sequence[str],
                             size_bits: int | None = None) -> list[QkdKey]:
        """ETSI GS QKD 014 5.4 Get key with key IDs: called by the slave SAE.

        The keys come back in the order of ``key_ids``. A key the KME does not
        hold raises KeyNotFound; ``size_bits`` (optional) is checked when given.
        """
        return (await self.dec_keys(master_sae_id, key_ids, size_bits)).keys

    async def dec_keys(self, master_sae_id: str, key_ids: Sequence[str],
                       size_bits: int | None = None,
                       key_ids_extension: Mapping[str, object] | None = None) -> codec.KeyContainer:
        """Get key with key IDs with the whole answer (extensions included),
        keys in the order of ``key_ids``."""
        if not key_ids:
            raise LocalProtocolError("no key_IDs to fetch")
        try:
            wanted = [codec.normalise_key_id(k) for k in key_ids]
        except KeySourceProtocolError:
            raise LocalProtocolError(
                "key_IDs must be UUIDs (validate them at the peer edge)") from None
        if len(set(wanted)) != len(wanted):
            raise LocalProtocolError("duplicate key_IDs in one request")
        url = self._url(self._sae(master_sae_id), "dec_keys")
        if self.profile.dec_keys_method == "GET" and len(wanted) == 1 and not key_ids_extension:
            raw = await self._call("dec_keys", "GET", url, params={"key_ID": wanted[0]})
        else:
            raw = await self._call("dec_keys", "POST", url,
                                   body=codec.key_ids_request(wanted, key_ids_extension))
        container = codec.parse_key_container(raw, size_bits=size_bits, max_keys=len(wanted),
                                              what="dec_keys")
        by_id = {k.key_id: k for k in container.keys}
        unexpected = set(by_id) - set(wanted)
        missing = [k for k in wanted if k not in by_id]
        if unexpected or missing:
            for k in container.keys:
                k.key.wipe()
            if unexpected:
                raise KeySourceProtocolError(f"KME dec_keys returned key_IDs not asked for: "
                                             f"{sorted(unexpected)[:4]}")
            raise KeyNotFound(f"KME dec_keys did not return key_IDs {missing[:4]}")
        log.debug("%s: dec_keys from %s -> %s", self.name, master_sae_id, wanted)
        return codec.KeyContainer([by_id[k] for k in wanted], container.key_ID_extensions,
                                  container.key_extensions, container.key_container_extension)

    async def etsi_status(self, peer_sae_id: str) -> codec.Status:
        """ETSI GS QKD 014 5.2 Get status, every field as the KME sent it."""
        raw = await self._call("status", "GET", self._url(self._sae(peer_sae_id), "status"))
        self.last_status = st = codec.parse_status(raw)
        return st

    async def status(self, peer_sae_id: str) -> KeySourceStatus:
        """ETSI GS QKD 014 5.2 Get status, mapped to the shared status type.
        Link health comes from ``status_extension`` where the KME offers it
        (the simulator's ``qkdgate_*`` fields; vendors' own are kept in
        ``extensions``)."""
        st = await self.etsi_status(peer_sae_id)
        out = to_key_source_status(st)
        if out.recent_rate is not None:
            return out
        return _with_rate(out, self._observed_rate(peer_sae_id, st))

    def _observed_rate(self, peer: str, st: codec.Status) -> float | None:
        """Keys/s produced since the previous status call: growth of the pool
        plus what we took from it (other SAEs' use makes this a lower bound)."""
        t, taken = self._now(), self._taken.get(peer, 0)
        prev = self._rate_marks.get(peer)
        self._rate_marks[peer] = (t, st.stored_key_count, taken)
        if prev is None or t - prev[0] < 1e-3:
            return None
        grown = st.stored_key_count - prev[1] + (taken - prev[2])
        return max(0.0, grown / (t - prev[0]))

    async def close(self) -> None:
        await self.http.close()

    async def __aenter__(self) -> Etsi014KeySource:
        return self

    async def __aexit__(self, *exc: object) -> None:
        await self.close()

    def _sae(self, sae_id: str) -> str:
        try:
            return self.profile.check_sae_id(sae_id)
        except ConfigError as exc:
            raise LocalProtocolError(str(exc)) from None


def _with_rate(st: KeySourceStatus, rate: float | None) -> KeySourceStatus:
    from dataclasses import replace
    return replace(st, recent_rate=rate)


def to_key_source_status(st: codec.Status) -> KeySourceStatus:
    ext = dict(st.status_extension)
    qber = ext.get("qkdgate_qber")
    rate = ext.get("qkdgate_key_rate")
    alarms = ext.get("qkdgate_alarms", [])
    link_up = ext.get("qkdgate_link_up", True)
    return KeySourceStatus(
        source_kme_id=st.source_KME_ID, target_kme_id=st.target_KME_ID,
        master_sae_id=st.master_SAE_ID, slave_sae_id=st.slave_SAE_ID,
        key_size=st.key_size, stored_key_count=st.stored_key_count,
        max_key_count=st.max_key_count, max_key_per_request=st.max_key_per_request,
        max_key_size=st.max_key_size, min_key_size=st.min_key_size,
        link_up=link_up if isinstance(link_up, bool) else True,
        qber=float(qber) if isinstance(qber, (int, float)) and not isinstance(qber, bool) else None,
        recent_rate=(float(rate) if isinstance(rate, (int, float)) and not isinstance(rate, bool)
                     else None),
        alarms=tuple(str(a)[:80] for a in alarms[:16]) if isinstance(alarms, list) else (),
        extensions=ext)



def _opt_str(opts: Mapping[str, object], name: str, s: SourceSettings) -> str | None:
    value = opts.get(name)
    if value is not None and not isinstance(value, str):
        raise ConfigError("expected a string", path=s.where(f"options.{name}"), found=repr(value))
    return value


def _extensions(opts: Mapping[str, object], name: str,
                s: SourceSettings) -> list[Mapping[str, object]]:
    """ETSI GS QKD 014 6.2 extension_mandatory / extension_optional: a list of objects."""
    value = opts.get(name, ())
    if not isinstance(value, (list, tuple)) or not all(isinstance(e, Mapping) for e in value):
        raise ConfigError("expected a list of mappings", path=s.where(f"options.{name}"),
                          found=repr(value)[:60])
    return list(value)


def from_settings(settings: object) -> Etsi014KeySource:
    """Entry point ``qkdgate.key_sources: etsi014``."""
    return Etsi014KeySource(settings)
