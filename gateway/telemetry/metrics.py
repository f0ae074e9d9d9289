"""Prometheus metrics and structured logs.

Theory of operation: :class:`Metrics` owns one dedicated
``CollectorRegistry`` (no process-global state, so tests and two gateways in
one process never collide) and updates it from the same typed events the
daemon hands to MQTT telemetry (:meth:`Metrics.handle_event`, a ``match`` on
the event class; an unknown class raises), plus direct
calls for what events do not carry: key-source call latency
(:meth:`observe_key_source_call`) and kernel SA counters
(:meth:`observe_sa`). What is a *state* rather than a history -- is the
tunnel up or blocked, how long until its SAs reach their hard lifetime --
is read from the daemon's own status at scrape time (:meth:`watch_status`,
a collector), so a gauge can never disagree with ``qkdgate status``. The
alert rules in monitoring/ are written against these names
(docs/operations.md). :meth:`Metrics.serve` exposes the registry over HTTP
with aiohttp inside the daemon's event loop (no extra thread), on the
configured address, loopback by default.

Label values are bounded: tunnels and key sources come from the config;
failure reasons are reduced to an exception-like class name, and after
:data:`MAX_REASONS` distinct ones to ``other``, so a peer or KME cannot grow
the series without bound. No metric carries key material; key_IDs are not
labels either (unbounded, and they say which keys were used).

Logs: :mod:`qkdgate.gateway.telemetry.logs` (``configure_logging`` and
``with_context`` are re-exported here).
"""

from __future__ import annotations

import re
from collections.abc import Callable, Iterator, Mapping
from typing import Any

from prometheus_client import CollectorRegistry, Counter, Gauge, Histogram, Info, generate_latest
from prometheus_client.core import GaugeMetricFamily, Metric
from prometheus_client.exposition import CONTENT_TYPE_LATEST
from prometheus_client.registry import Collector

from qkdgate import __version__
from qkdgate.gateway.telemetry.events import (
    ConfigRejected,
    ConfigReloaded,
    DaemonStarted,
    DaemonStopping,
    Event,
    InstallFailed,
    JournalFailed,
    KeyServiceDelivered,
    KeyServiceRefused,
    KeySourceDown,
    KeySourceUp,
    PeerRestartedReport,
    PolicyShortfall,
    ProtocolViolationReport,
    QkdAlarm,
    QkdError,
    QkdFallbackReport,
    QkdKeysFetched,
    QkdRecoveredReport,
    QkdStatus,
    RekeyDone,
    RekeyFailedReport,
    RekeyRequested,
    SessionFailedReport,
    UnknownEvent,
)
from qkdgate.gateway.telemetry.logs import configure_logging as configure_logging
from qkdgate.gateway.telemetry.logs import with_context as with_context
from qkdgate.tunnels.events import (
    PolicyFallback,
    PolicyRecovered,
    SaAdopted,
    SaHardLifetimeBlock,
    SaInstalled,
    SaRetired,
    SaStaleRemoved,
    SaSwitched,
    TunnelBlocked,
    TunnelEvent,
    TunnelOpFailed,
)

MAX_REASONS = 32
_REASON = re.compile(r"[A-Za-z][A-Za-z0-9_]{0,47}")
_LATENCY_BUCKETS = (0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5, 5.0, 10.0, 30.0)


class Metrics:
    def __init__(self, registry: CollectorRegistry | None = None) -> None:
        r = self.registry = registry if registry is not None else CollectorRegistry()
        self.rekeys = Counter("qkdgate_rekeys", "Completed rekeys", ["tunnel"], registry=r)
        self.rekey_failures = Counter("qkdgate_rekey_failures", "Failed rekeys",
                                      ["tunnel", "reason"], registry=r)
        self.rekey_latency = Histogram("qkdgate_rekey_duration_seconds",
                                       "Rekey duration, start to outbound switch", ["tunnel"],
                                       buckets=_LATENCY_BUCKETS, registry=r)
        self.generation = Gauge("qkdgate_tunnel_generation", "Current key generation",
                                ["tunnel"], registry=r)
        self.rekey_inputs = Counter("qkdgate_rekey_inputs", "Rekeys by key inputs mixed",
                                    ["tunnel", "kem", "x25519", "qkd"], registry=r)
        self.key_source_up = Gauge("qkdgate_key_source_up", "Key source reachable (1) or not",
                                   ["source"], registry=r)
        self.key_source_latency = Histogram("qkdgate_key_source_request_duration_seconds",
                                            "Key source request latency", ["source", "op"],
                                            buckets=_LATENCY_BUCKETS, registry=r)
        self.key_source_errors = Counter("qkdgate_key_source_errors", "Key source errors",
                                         ["source", "op", "reason"], registry=r)
        self.keyservice_keys = Counter("qkdgate_keyservice_keys", "Keys the key service "
                                       "delivered to SAEs", ["pool", "api"], registry=r)
        self.keyservice_refusals = Counter("qkdgate_keyservice_refusals", "Key-service "
                                           "requests refused", ["api", "status"], registry=r)
        self.qkd_keys = Counter("qkdgate_qkd_keys_consumed", "QKD keys mixed into a rekey",
                                ["tunnel"], registry=r)
        self.qber = Gauge("qkdgate_qkd_qber", "Last reported quantum bit error rate",
                          ["source"], registry=r)
        # ETSI GS QKD 014 6.1 (Get status): stored_key_count, max_key_count.
        self.qkd_stored = Gauge("qkdgate_qkd_stored_keys",
                                "Keys the KME holds for this SAE pair (last status poll)",
                                ["source"], registry=r)
        self.qkd_max = Gauge("qkdgate_qkd_max_keys",
                             "Keys the KME can hold for this SAE pair (last status poll)",
                             ["source"], registry=r)
        self.qkd_link_up = Gauge("qkdgate_qkd_link_up",
                                 "QKD link up and without alarms (1) or not (last status poll)",
                                 ["source"], registry=r)
        self.alarms = Counter("qkdgate_alarms", "Alarms raised", ["kind"], registry=r)
        self.violations = Counter("qkdgate_protocol_violations",
                                  "Peer datagrams dropped as forged, replayed or malformed",
                                  ["peer"], registry=r)
        self.tunnel_errors = Counter("qkdgate_tunnel_errors",
                                     "Kernel operations or installs that failed", ["tunnel"],
                                     registry=r)
        self.fallback = Gauge("qkdgate_policy_fallback_active",
                              "Tunnel running on a fallback key policy (1) or not", ["tunnel"],
                              registry=r)
        self.sa_bytes = Counter("qkdgate_sa_bytes", "Bytes through the tunnel's SAs",
                                ["tunnel", "direction"], registry=r)
        self.sa_packets = Counter("qkdgate_sa_packets", "Packets through the tunnel's SAs",
                                  ["tunnel", "direction"], registry=r)
        self.sa_integrity = Counter("qkdgate_sa_integrity_failures",
                                    "Packets failing ESP/MACsec authentication",
                                    ["tunnel", "direction"], registry=r)
        self.sa_replay = Counter("qkdgate_sa_replay_errors", "Packets refused as replays",
                                 ["tunnel", "direction"], registry=r)
        Info("qkdgate_build", "qkdgate version", registry=r).info({"version": __version__})
        self._status_collector = _StatusCollector()
        r.register(self._status_collector)
        self._reasons: set[str] = set()
        self._sa_seen: dict[tuple[str, str, int], tuple[int, int, int, int]] = {}

    # -- from daemon events -------------------------------------------------

    def handle_event(self, event: Event) -> None:
        """Update metrics from one daemon event (typed; docs/telemetry.md).
        A class this method does not know raises :class:`UnknownEvent` (a
        bug in the daemon, a failure in tests), never a silent skip."""
        match event:
            case RekeyDone():
                t = event.tunnel
                self.rekeys.labels(t).inc()
                self.generation.labels(t).set(event.generation)
                self.rekey_latency.labels(t).observe(max(0.0, event.latency_ms) / 1000)
                ids = event.inputs.qkd_key_ids
                self.rekey_inputs.labels(t, str(event.inputs.kem or "none")[:24],
                                         "yes" if event.inputs.x25519 else "no",
                                         "yes" if ids else "no").inc()
                if ids:
                    self.qkd_keys.labels(t).inc(len(ids))
            case RekeyFailedReport():
                self.rekey_failures.labels(event.tunnel, self._reason(event.reason)).inc()
            case KeySourceUp():
                self.key_source_up.labels(event.source).set(1)
            case KeySourceDown():
                self.key_source_up.labels(event.source).set(0)
                self.alarms.labels("key_source_down").inc()
            case QkdAlarm():
                self.alarms.labels("qkd_alarm").inc()
                if event.qber is not None:
                    self.qber.labels(event.source).set(event.qber)
            case PolicyFallback():
                self.fallback.labels(event.tunnel).set(1)
                self.alarms.labels("policy_fallback").inc()
            case PolicyRecovered():
                self.fallback.labels(event.tunnel).set(0)
            case SaHardLifetimeBlock() | TunnelBlocked() | QkdFallbackReport() | \
                    ConfigRejected() | SessionFailedReport() | JournalFailed() | \
                    PolicyShortfall():
                self.alarms.labels(event.name).inc()
            case KeyServiceDelivered():
                self.keyservice_keys.labels(event.pool, event.api).inc(len(event.key_ids))
            case KeyServiceRefused():
                self.keyservice_refusals.labels(event.api, str(event.status)).inc()
            case ProtocolViolationReport():
                self.violations.labels(event.peer).inc()
            case TunnelOpFailed():
                self.tunnel_errors.labels(event.tunnel).inc()
            case InstallFailed():
                self.tunnel_errors.labels(event.peer).inc()
            case QkdStatus():
                src = event.source
                if event.qber is not None:
                    self.qber.labels(src).set(event.qber)
                if event.stored_key_count is not None:
                    self.qkd_stored.labels(src).set(event.stored_key_count)
                if event.max_key_count is not None:
                    self.qkd_max.labels(src).set(event.max_key_count)
                self.qkd_link_up.labels(src).set(1 if event.link_up and not event.alarms else 0)
            case DaemonStarted() | DaemonStopping() | ConfigReloaded() | RekeyRequested() | \
                    QkdKeysFetched() | QkdError() | QkdRecoveredReport() | \
                    PeerRestartedReport():
                pass    # no metric of their own (key-source calls are observed directly)
            case SaInstalled() | SaSwitched() | SaRetired() | SaAdopted() | SaStaleRemoved() | \
                    TunnelEvent():
                pass    # SA counters come from observe_sa; the tunnels' own events
                        # (tunnels/events.py, another owner's) need no metric to be known
            case _:
                raise UnknownEvent(event, "metrics")

    def _reason(self, reason: Any) -> str:
        # "KeyUnavailable: QKD link down" -> "KeyUnavailable"
        head = str(reason or "unknown").split(":", 1)[0].strip()
        if not _REASON.fullmatch(head):
            return "other"
        if head not in self._reasons:
            if len(self._reasons) >= MAX_REASONS:
                return "other"
            self._reasons.add(head)
        return head

    # -- direct observations ------------------------------------------------

    def watch_status(self, status: Callable[[], Mapping[str, Any]]) -> None:
        """Read tunnel state gauges from ``status`` (the daemon's
        ``Daemon.status``, the answer ``qkdgate status`` prints) at every
        scrape. Called in the event loop that serves ``/metrics``."""
        self._status_collector.status = status

    def observe_key_source_call(self, source: str, op: str, seconds: float,
                                error: BaseException | None = None) -> None:
        """One KME request (``op``: get_new_keys, get_keys_by_id, status)."""
        self.key_source_latency.labels(source, op).observe(max(0.0, seconds))
        if error is not None:
            self.key_source_errors.labels(source, op, self._reason(type(error).__name__)).inc()

    def observe_sa(self, tunnel: str, direction: str, state: Any) -> None:
        """Fold one SA's cumulative kernel counters (``SaCounters``,
        ``SaState`` or ``MacsecSaState``) into per-tunnel counters that
        survive rekeys."""
        spi: int = getattr(state, "spi", None) or \
            getattr(getattr(state, "sa_id", None), "spi", None) or int(getattr(state, "an", 0))
        now = (int(getattr(state, "bytes", getattr(state, "octets", 0))),
               int(getattr(state, "packets", 0)),
               int(getattr(state, "integrity_failed", 0)),
               int(getattr(state, "replay_errors", 0)))
        key = (tunnel, direction, int(spi or 0))
        before = self._sa_seen.get(key, (0, 0, 0, 0))
        # A counter below its last value means a new SA reused the id: count
        # it from zero.
        deltas = [n - b if n >= b else n for n, b in zip(now, before, strict=True)]
        self._sa_seen[key] = now
        for counter, d in zip((self.sa_bytes, self.sa_packets, self.sa_integrity,
                               self.sa_replay), deltas, strict=True):
            if d:
                counter.labels(tunnel, direction).inc(d)

    def forget_sa(self, tunnel: str, direction: str, spi: int) -> None:
        """The SA is gone (retired after a rekey): drop its last reading."""
        self._sa_seen.pop((tunnel, direction, spi), None)

    def exposition(self) -> bytes:
        return generate_latest(self.registry)

    # -- HTTP ------------------------------------------------------------------

    async def serve(self, address: str = "127.0.0.1", port: int = 9464) -> MetricsServer:
        """Serve ``/metrics`` from this event loop; ``port=0`` picks one."""
        from aiohttp import web  # imported here: the CLI's --help stays fast

        async def metrics(_request: web.Request) -> web.Response:
            return web.Response(body=self.exposition(),
                                headers={"Content-Type": CONTENT_TYPE_LATEST})

        app = web.Application()
        app.router.add_get("/metrics", metrics)
        runner = web.AppRunner(app, access_log=None)
        await runner.setup()
        site = web.TCPSite(runner, str(address), port, reuse_address=True)
        await site.start()
        bound = int(runner.addresses[0][1])   # (host, port[, flow, scope])
        return MetricsServer(runner, bound)


# (metric, help, status field): per-tunnel gauges read from Daemon.status.
_TUNNEL_GAUGES = (
    ("qkdgate_tunnel_sa_age_seconds", "Age of the generation carrying traffic", "sa_age"),
    ("qkdgate_tunnel_hard_expiry_seconds",
     "Seconds until the active SAs reach their hard lifetime (then the tunnel blocks)",
     "hard_expiry_in"),
    ("qkdgate_tunnel_next_rekey_seconds", "Seconds until the next planned rekey",
     "next_rekey_in"),
)
TUNNEL_STATES = ("up", "down", "blocked")


class _StatusCollector(Collector):
    """Tunnel state at scrape time, from the daemon's status (no status
    bound yet: no samples, and the families are still described)."""

    def __init__(self) -> None:
        self.status: Callable[[], Mapping[str, Any]] | None = None

    def describe(self) -> Iterator[Metric]:
        return iter(self._families())

    def _families(self) -> list[GaugeMetricFamily]:
        return [GaugeMetricFamily("qkdgate_tunnel_up", "Tunnel carries traffic (1) or not",
                                  labels=["tunnel"]),
                GaugeMetricFamily("qkdgate_tunnel_state",
                                  "Tunnel state: 1 on the current one of up, down, blocked",
                                  labels=["tunnel", "state"]),
                *(GaugeMetricFamily(n, h, labels=["tunnel"]) for n, h, _ in _TUNNEL_GAUGES)]

    def collect(self) -> Iterator[Metric]:
        fams = self._families()
        status = self.status() if self.status is not None else {}
        up, state, *timed = fams
        for t in status.get("tunnels") or []:
            tid, st = str(t.get("tunnel")), str(t.get("state"))
            up.add_metric([tid], 1.0 if st == "up" else 0.0)
            for name in TUNNEL_STATES:
                state.add_metric([tid, name], 1.0 if st == name else 0.0)
            for fam, (_n, _h, field) in zip(timed, _TUNNEL_GAUGES, strict=True):
                v = t.get(field)
                if isinstance(v, (int, float)) and not isinstance(v, bool):
                    fam.add_metric([tid], float(v))
        return iter(fams)


class MetricsServer:
    def __init__(self, runner: Any, port: int) -> None:
        self._runner, self.port = runner, port

    async def close(self) -> None:
        await self._runner.cleanup()
