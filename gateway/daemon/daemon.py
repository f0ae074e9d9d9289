"""The gateway daemon: the composition root.

Theory of operation: :class:`Daemon` turns a validated
:class:`~qkdgate.gateway.config.model.Config` into running parts and wires them
together inside one :class:`asyncio.TaskGroup`:

* one UDP socket (:mod:`qkdgate.gateway.daemon.udp`) and, per peer, a
  :class:`PeerSession` (sans-IO protocol core) with its :class:`PeerDriver`;
* key sources (``qkdgate.adapters.registry``) that answer ``NeedQkdKeys``;
* the :class:`TunnelManager` (:mod:`qkdgate.tunnels.manager`) that
  turns ``InstallInbound`` / ``InstallOutbound`` / ``RetireGeneration`` into
  kernel SAs, make-before-break, under the tunnel's key policy;
* the control socket (``qkdgate status`` / ``rekey``), sd_notify, and an
  event hook that telemetry subscribes to (:meth:`Daemon.subscribe`;
  events documented in docs/daemon.md).

Everything that touches the outside world is injectable (backends, key
sources, clock, rng, notifier), so two daemons run in one event loop in the
tests. Fail closed throughout: tunnels install blocking policies before the
first handshake; a refused or failed install is reported to the session
(``install_failed``) and never half-applied; the default exit leaves the
policies (and XFRM SAs, which expire on their kernel lifetimes) in place.
SIGHUP reloads the configuration: the new file is validated first, a bad
file changes nothing, and what cannot change live is reported as needing a
restart. Logs carry tunnel/peer context and IDs, never key bytes.
"""

from __future__ import annotations

import asyncio
import logging
import os
import signal
import time
from typing import Any, Awaitable, Callable, Mapping

from qkdgate.errors import ConfigError, QkdgateError
from qkdgate.gateway.daemon import build
from qkdgate.gateway.config.model import Config, load_config
from qkdgate.gateway.daemon.control import ControlError, ControlServer
from qkdgate.gateway.daemon.events import EventHandlers, PeerState
from qkdgate.gateway.daemon.sdnotify import SdNotifier
from qkdgate.tunnels.manager import GenerationRefused, TunnelManager, check_policy
from qkdgate.gateway.daemon.udp import GatewayEndpoint, PeerDriver, open_endpoint

log = logging.getLogger("qkdgate.daemon")

Subscriber = Callable[[dict[str, Any]], Awaitable[None] | None]
POLL_INTERVAL = 10.0        # kernel counters (soft byte limits, status)
QKD_HEALTH_MAX = 5.0        # poll each peer's KME status at least this often


class Daemon(EventHandlers):
    def __init__(self, config: Config, *, config_path: str | None = None,
                 ipsec_backend: Any = None, macsec_backend: Any = None,
                 key_sources: Mapping[str, Any] | None = None,
                 identity: Any = None, peer_identities: Mapping[str, list] | None = None,
                 session_factory: Callable[..., Any] | None = None,
                 clock: Callable[[], float] = time.monotonic,
                 rng: Callable[[int], bytes] = os.urandom,
                 notifier: SdNotifier | None = None, control_path: str | None = None,
                 teardown_on_exit: bool = False, journal: Any = None) -> None:
        self.config = config
        self.config_path = config_path
        self.clock = clock
        self.rng = rng
        self.notifier = notifier or SdNotifier()
        self.control_path = control_path or config.gateway.control_socket
        self.teardown_on_exit = teardown_on_exit
        self._ipsec = ipsec_backend
        self._macsec = macsec_backend
        self._key_sources = dict(key_sources) if key_sources is not None else None
        self._identity = identity
        self._peer_identities = peer_identities
        self._session_factory = session_factory
        self.journal = journal
        self.journal_failure: str | None = None   # set once the journal fails: no more QKD
        self.subscribers: list[Subscriber] = []
        self.metrics: Any = None            # qkdgate.gateway.telemetry.metrics.Metrics when enabled
        self.telemetry: Any = None          # qkdgate.gateway.telemetry.mqtt.Telemetry when enabled
        self._source_up: dict[str, bool] = {}
        self._alarmed: dict[str, tuple[str, ...]] = {}   # key source -> last alarms seen
        self._services: list[Any] = []
        self.tunnels = TunnelManager()
        self.peers: dict[str, PeerState] = {}
        self.drivers: dict[str, PeerDriver] = {}
        self.endpoint: GatewayEndpoint | None = None
        self.started_at = clock()
        self.pending_restart: list[str] = []
        self.short_of_policy: dict[str, str] = {}   # tunnel -> why (tightened by reload)
        self._stop = asyncio.Event()
        self._reload = asyncio.Event()
        self._kick = asyncio.Event()       # tunnel timers changed: re-evaluate now
        self._tasks: set[asyncio.Task] = set()
        self._tg: asyncio.TaskGroup | None = None
        self.ready = asyncio.Event()

    # ------------------------------------------------------------------ hooks
    def subscribe(self, callback: Subscriber) -> None:
        """Receive every daemon event (a small dict; see docs/daemon.md)."""
        self.subscribers.append(callback)

    def emit(self, event: dict[str, Any]) -> None:
        event = {"ts": time.time(), "gateway": self.config.gateway.name, **event}
        for cb in list(self.subscribers):
            try:
                res = cb(event)
                if asyncio.iscoroutine(res):
                    self._spawn(self._guarded(res, cb), "subscriber")
            except Exception:
                log.exception("event subscriber %r failed on %s", cb, event.get("event"))

    async def _guarded(self, coro: Awaitable[None], cb: Any) -> None:
        try:
            await coro
        except Exception:
            log.exception("event subscriber %r failed", cb)

    def _spawn(self, coro: Any, name: str) -> None:
        if self._tg is not None:
            task = self._tg.create_task(coro, name=name)
        else:   # starting or stopping: still deliver (e.g. daemon_stopping to telemetry)
            task = asyncio.get_running_loop().create_task(coro, name=name)
        self._tasks.add(task)
        task.add_done_callback(self._tasks.discard)

    # ------------------------------------------------------------------ run
    async def run(self) -> None:
        """Run until :meth:`stop` (or SIGTERM/SIGINT when installed)."""
        try:
            async with asyncio.TaskGroup() as tg:
                self._tg = tg
                await self._start()
                loops = [tg.create_task(self._tunnel_loop(), name="tunnels"),
                         tg.create_task(self._reload_loop(), name="reload")]
                if self.notifier.watchdog_interval:
                    loops.append(tg.create_task(self._watchdog_loop(), name="watchdog"))
                if self.telemetry is not None:
                    loops.append(tg.create_task(self.telemetry.run(), name="telemetry"))
                if any(p.qkd for p in self.config.peers):
                    loops.append(tg.create_task(self._qkd_health_loop(), name="qkd-health"))
                self.ready.set()
                self.notifier.ready(self._status_line())
                self.emit({"event": "daemon_started", "tunnels": list(self.tunnels.tunnels)})
                log.info("gateway %s running: %d peer(s), %d tunnel(s)",
                         self.config.gateway.name, len(self.peers), len(self.tunnels.tunnels))
                await self._stop.wait()
                for task in loops + list(self._tasks):
                    task.cancel()
        except BaseExceptionGroup as group:
            # One failure (a bad identity file, a port in use) reads better
            # unwrapped; several stay grouped.
            if len(group.exceptions) == 1:
                raise group.exceptions[0] from None
            raise
        finally:
            self._tg = None
            await self._shutdown()

    def stop(self) -> None:
        self._stop.set()

    def reload(self) -> None:
        self._reload.set()

    def install_signal_handlers(self) -> None:
        loop = asyncio.get_running_loop()
        loop.add_signal_handler(signal.SIGTERM, self.stop)
        loop.add_signal_handler(signal.SIGINT, self.stop)
        loop.add_signal_handler(signal.SIGHUP, self.reload)

    async def _start(self) -> None:
        cfg = self.config
        now = self.clock()
        self._ipsec, self._macsec = build.backends(cfg, self._ipsec, self._macsec)
        for tunnel in build.tunnels(cfg, self._ipsec, self._macsec, self._tunnel_event):
            tunnel.setup(now)   # fail-closed policies first; adopts a previous run's SAs
            self.tunnels.add(tunnel)
        if self._key_sources is None:
            self._key_sources = build.key_sources(cfg)
        identity = self._identity or build.local_identity(cfg)
        pins = self._peer_identities or {p.name: build.peer_identities(p) for p in cfg.peers}
        if self.journal is None and self.config_path is not None:
            self.journal = build.open_journal(cfg)
        host = str(cfg.gateway.listen.address)
        if host == "0.0.0.0" and any(p.address.version == 6 for p in cfg.peers):
            host = "::"     # a dual-stack socket reaches IPv4 and IPv6 peers alike
        transport, self.endpoint = await open_endpoint(
            host, cfg.gateway.listen.port,
            bypass=getattr(self._ipsec, "bypass_socket", None))
        self._transport = transport
        factory = self._session_factory or build.session_factory()
        for peer in cfg.peers:
            tids = [t.name for t in cfg.tunnels_for(peer.name)]
            self.peers[peer.name] = PeerState(peer.name, tids)
            # Generations only grow, across restarts too: start above the
            # highest one the journal saw started or committed for these tunnels.
            floor = max((self.journal.next_generation(t) - 1 for t in tids), default=0) \
                if self.journal is not None else 0
            scfg = build.session_config(cfg, peer, generation_floor=floor)
            # Epochs only grow across restarts (issue 17 finding 3): ours is
            # the journal's counter, the peer's floor its authenticated high-water.
            epochs: dict[str, int] = {} if self.journal is None else {
                "epoch": self.journal.next_local_epoch(),
                "peer_epoch_floor": self.journal.peer_epoch(peer.name)}
            session = factory(scfg, identity=identity, peer_identities=pins[peer.name],
                              rng=self.rng, now=now,
                              allocate_spi=lambda tid: self.tunnels.get(tid).allocate_spi(),
                              **epochs)
            driver = PeerDriver(peer.name, session, (str(peer.address), peer.port),
                                clock=self.clock, on_event=self._on_event)
            self.endpoint.add(driver)
            self.drivers[peer.name] = driver
        await self._start_telemetry()
        self.control = ControlServer(self.control_path, {
            "status": self._ctl_status, "rekey": self._ctl_rekey, "reload": self._ctl_reload})
        await self.control.start()
        for driver in self.drivers.values():
            driver.pump()        # lets sessions with initiate_on_start send INIT

    async def _start_telemetry(self) -> None:
        """MQTT and Prometheus, when enabled: both are event-hook subscribers."""
        tel = self.config.telemetry
        if tel.prometheus.enabled and self.metrics is None:
            from qkdgate.gateway.telemetry.metrics import Metrics
            self.metrics = Metrics()
            self._services.append(await self.metrics.serve(str(tel.prometheus.address),
                                                           tel.prometheus.port))
        if self.metrics is not None:
            self.subscribe(self.metrics.handle_event)
            for tunnel in self.tunnels.tunnels.values():
                tunnel.on_sa_state = self.metrics.observe_sa
        if tel.mqtt.enabled and self.telemetry is None:
            from qkdgate.gateway.telemetry.mqtt import MqttOptions, Telemetry
            self.telemetry = Telemetry(MqttOptions.from_config(tel.mqtt), self.config.gateway.name,
                                       bypass=getattr(self._ipsec, "bypass_socket", None),
                                       status=self.status)
        if self.telemetry is not None:
            self.subscribe(self.telemetry.publish_event)

    async def _shutdown(self) -> None:
        self.notifier.stopping()
        self.emit({"event": "daemon_stopping", "teardown": self.teardown_on_exit})
        pending = [t for t in self._tasks if not t.done()]
        if pending:   # let subscribers see the last events, briefly
            await asyncio.wait(pending, timeout=1.0)
            for t in pending:
                t.cancel()
        for driver in self.drivers.values():
            driver.close()
        if getattr(self, "_transport", None) is not None:
            self._transport.close()
        if getattr(self, "control", None) is not None:
            await self.control.close()
        for tunnel in self.tunnels.tunnels.values():
            try:
                tunnel.shutdown(self.teardown_on_exit)
            except QkdgateError as exc:
                log.error("tunnel %s: shutdown: %s", tunnel.tunnel_id, exc)
        if self.telemetry is not None:
            try:
                await self.telemetry.close()
            except Exception as exc:
                log.warning("telemetry: close failed: %s", exc)
        for service in self._services:
            await service.close()
        for name, src in (self._key_sources or {}).items():
            try:
                await src.close()
            except Exception as exc:   # closing must not mask the reason we stop
                log.warning("key source %s: close failed: %s", name, exc)
        if self.journal is not None and hasattr(self.journal, "close"):
            self.journal.close()
        log.info("gateway %s stopped (%s)", self.config.gateway.name,
                 "tunnels torn down" if self.teardown_on_exit else "blocking policies kept")

    # ------------------------------------------------------------------ loops
    async def _tunnel_loop(self) -> None:
        next_poll = self.clock()
        while True:
            self._kick.clear()
            now = self.clock()
            for tid, reasons in self.tunnels.handle_timer(now).items():
                self._rekey_for(tid, reasons[0])
            if now >= next_poll:
                next_poll = now + POLL_INTERVAL
                for tid, t in self.tunnels.tunnels.items():
                    for reason in t.poll(now):
                        self._rekey_for(tid, reason)
                self.notifier.status(self._status_line())
            at = self.tunnels.get_timer()
            wait = min(next_poll, at if at is not None else next_poll) - self.clock()
            # asyncio.timeout, not wait_for: on 3.11 wait_for can swallow a
            # cancellation that races with the event (bpo-42130) and hang shutdown.
            try:
                async with asyncio.timeout(max(0.01, min(wait, POLL_INTERVAL))):
                    await self._kick.wait()
            except TimeoutError:
                pass

    async def _qkd_health_loop(self) -> None:
        """Poll each peer's KME status (ETSI GS QKD 014 6.1). Both roles see
        a QKD link alarm this way, also the slave, which otherwise only
        talks to its KME when the master sends key_IDs; the status (pool,
        QBER, alarms) feeds telemetry and ``qkd-mandatory`` blocking."""
        period = min([QKD_HEALTH_MAX] + [t.rekey.interval for t in self.config.tunnels])
        while True:
            for peer in self.config.peers:
                if peer.qkd is not None and peer.name in self.drivers:
                    await self._qkd_health(self.drivers[peer.name], peer.qkd)
            await asyncio.sleep(period)

    def wake(self) -> None:
        """Re-evaluate tunnel timers now (after installs, or a clock jump in tests)."""
        self._kick.set()

    def _rekey_for(self, tunnel_id: str, reason: str) -> str:
        peer = self.config.tunnel(tunnel_id).peer
        driver = self.drivers[peer]
        log.info("tunnel %s: rekey (%s)", tunnel_id, reason, extra={"tunnel": tunnel_id})
        driver.call("initiate_rekey",
                    lambda: driver.session.initiate_rekey(self.clock(), reason))
        return peer

    async def _watchdog_loop(self) -> None:
        assert self.notifier.watchdog_interval
        while True:
            self.notifier.watchdog()
            await asyncio.sleep(self.notifier.watchdog_interval)

    async def _reload_loop(self) -> None:
        while True:
            await self._reload.wait()
            self._reload.clear()
            try:
                self.do_reload()
            except QkdgateError:
                pass    # logged and emitted by do_reload; the running config stays

    def do_reload(self) -> dict[str, Any]:
        """Re-read the config file; apply what can change live."""
        if self.config_path is None:
            raise ControlError("the daemon was not started from a file; nothing to reload")
        self.notifier.reloading()
        try:
            new = load_config(self.config_path)
        except ConfigError as exc:
            log.error("reload refused, configuration unchanged: %s", exc)
            self.emit({"event": "config_rejected", "error": str(exc)})
            self.notifier.ready(self._status_line())
            raise
        before = {tid: t.policy for tid, t in self.tunnels.tunnels.items()}
        applied, restart = build.apply_live(self.config, new, self.tunnels, self.drivers)
        self._enforce_tightened([tid for tid, t in self.tunnels.tunnels.items()
                                 if t.policy != before[tid]])
        if not restart:
            self.config = new   # else: keep the structure we run with; live parts are applied
        self.pending_restart = restart
        for item in restart:
            log.warning("reload: %s needs a restart to take effect", item)
        log.info("configuration reloaded: %s", ", ".join(applied) or "no live changes")
        self.emit({"event": "config_reloaded", "applied": applied, "needs_restart": restart})
        self.notifier.ready(self._status_line())
        return {"applied": applied, "needs_restart": restart}

    def _enforce_tightened(self, tunnel_ids: list[str]) -> None:
        """A reload changed these tunnels' policies (issue 17 finding 6): the
        generation carrying traffic now is checked against the new policy at
        once, not at its next rekey. One that falls short is rekeyed now;
        ``qkd-mandatory`` blocks at once (it never carries traffic without a
        QKD key), any other policy blocks when that rekey does not bring a
        generation that meets it (:meth:`_settle_tightened`)."""
        now = self.clock()
        for tid in tunnel_ids:
            tunnel = self.tunnels.get(tid)
            if tunnel.active is None or tunnel.state == "blocked":
                continue
            try:
                check_policy(tunnel.policy, tunnel.active.provenance)
                continue
            except GenerationRefused as exc:
                short = (f"policy now {tunnel.policy.value}, active generation "
                         f"{tunnel.active.number} falls short: {exc}")
            log.warning("tunnel %s: %s; rekeying now", tid, short, extra={"tunnel": tid})
            self.short_of_policy[tid] = short
            if tunnel.policy.blocks_on_qkd_loss:
                tunnel.block(now, short)
            self._rekey_for(tid, "policy_tightened")

    def _settle_tightened(self, peer: str) -> None:
        """An exchange with ``peer`` ended (established or failed): every
        tunnel still short of its tightened policy blocks now."""
        now = self.clock()
        for tid in self.peers[peer].tunnels:
            short = self.short_of_policy.pop(tid, None)
            if short is None:
                continue
            tunnel = self.tunnels.get(tid)
            if tunnel.active is None or tunnel.state == "blocked":
                continue
            try:
                check_policy(tunnel.policy, tunnel.active.provenance)
            except GenerationRefused:
                tunnel.block(now, short + "; the rekey did not bring one that meets it")

    # ------------------------------------------------------------------ control
    def status(self) -> dict[str, Any]:
        now = self.clock()
        tunnels = []
        for tid, t in self.tunnels.tunnels.items():
            st = t.status(now)
            peer = self.config.tunnel(tid).peer
            st["peer"] = peer
            timer = None
            driver = self.drivers.get(peer)
            if driver is not None:
                # The session's planned rekey if it says (``next_rekey_at``),
                # else its next timer: never later than the real rekey.
                try:
                    timer = getattr(driver.session, "next_rekey_at", None)
                    if timer is None:
                        timer = driver.session.get_timer()
                except Exception:
                    timer = None
            candidates = [x for x in (st.get("soft_expiry_in"),
                                      (timer - now) if timer is not None else None)
                          if x is not None]
            st["next_rekey_in"] = round(min(candidates), 1) if candidates else None
            if st["last_error"] is None and self.peers[peer].last_error and st["state"] != "up":
                st["last_error"] = self.peers[peer].last_error
            tunnels.append(st)
        peers = [{"peer": p.name, "state": p.state, "generation": p.generation,
                  "qkd_fallback": p.qkd_fallback, "rekeys": p.rekeys,
                  "rekey_failures": p.rekey_failures, "violations": p.violations,
                  "last_error": p.last_error,
                  "datagrams": dict(self.drivers[p.name].stats) if p.name in self.drivers
                  else {}} for p in self.peers.values()]
        return {"gateway": self.config.gateway.name, "uptime": round(now - self.started_at, 1),
                "pid": os.getpid(), "peers": peers, "tunnels": tunnels,
                "needs_restart": list(self.pending_restart)}

    def rekey(self, tunnel_id: str) -> dict[str, Any]:
        if tunnel_id not in self.tunnels.tunnels:
            raise ConfigError(f"no tunnel named {tunnel_id!r} (configured: "
                              f"{', '.join(sorted(self.tunnels.tunnels)) or 'none'})")
        t = self.tunnels.get(tunnel_id)
        gen = t.active.number if t.active else None
        peer = self._rekey_for(tunnel_id, "operator")
        self.emit({"event": "rekey_requested", "tunnel": tunnel_id, "peer": peer,
                   "reason": "operator"})
        return {"tunnel": tunnel_id, "peer": peer, "generation": gen,
                "tunnels": self.peers[peer].tunnels}

    async def _ctl_status(self, req: Mapping[str, Any]) -> Any:
        return self.status()

    async def _ctl_rekey(self, req: Mapping[str, Any]) -> Any:
        tid = req.get("tunnel")
        if not isinstance(tid, str):
            raise ControlError('rekey needs "tunnel": a tunnel name', "bad_request")
        return self.rekey(tid)

    async def _ctl_reload(self, req: Mapping[str, Any]) -> Any:
        return self.do_reload()

    def _status_line(self) -> str:
        ts = self.tunnels.tunnels.values()
        up = sum(1 for t in ts if t.state == "up")
        fb = sum(1 for t in ts if t.fallback)
        line = f"{up}/{len(self.tunnels.tunnels)} tunnels up"
        if fb:
            line += f", {fb} on PQC fallback"
        blocked = [t.tunnel_id for t in ts if t.state == "blocked"]
        if blocked:
            line += ", blocked: " + ",".join(blocked[:5])
        return line
