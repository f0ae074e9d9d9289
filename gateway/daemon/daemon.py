"""The gateway daemon: the composition root.

Theory of operation: :class:`Daemon` turns a validated
:class:`~qkdgate.gateway.config.model.Config` into running parts, each owned
by one class in its own module, and wires them together inside one
:class:`asyncio.TaskGroup`:

* one UDP socket (:mod:`~qkdgate.gateway.daemon.udp`) and, per peer, a
  :class:`~qkdgate.gateway.daemon.peer.PeerRunner`: the sans-IO
  :class:`PeerSession`, its driver, and the answers to its events;
* a :class:`~qkdgate.gateway.daemon.qkd.QkdFetcher` that answers
  ``NeedQkdKeys`` from the key sources, journals key_IDs and polls KME health;
* the :class:`TunnelManager` (:mod:`qkdgate.tunnels.manager`) that turns
  installs and retirements into kernel SAs, make-before-break, under the
  tunnel's key policy;
* a :class:`~qkdgate.gateway.daemon.reload.ReloadApplier` for SIGHUP;
* the control socket (``qkdgate status`` / ``rekey`` / ``reload``),
  sd_notify, and the event hook (:meth:`Daemon.subscribe`) that telemetry,
  metrics and the demo view consume: typed events
  (:mod:`~qkdgate.gateway.telemetry.events`; docs/daemon.md).

Everything that touches the outside world is injectable (backends, key
sources, clock, rng, notifier, session factory), so two daemons run in one
event loop in the tests; nothing shipped runs without the kernel backends.
Fail closed throughout: tunnels install blocking policies before the first
handshake; a refused or failed install is reported to the session and never
half-applied; a bug in one peer's session blocks that peer's tunnels and
rebuilds the session, it never ends the daemon; the default exit leaves the
policies (and XFRM SAs, which expire on their kernel lifetimes) in place.
Logs carry tunnel/peer context and IDs, never key bytes.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import os
import signal
import stat
import time
from collections.abc import Awaitable, Callable, Coroutine, Mapping
from typing import Any

from qkdgate.errors import ConfigError, QkdgateError
from qkdgate.gateway.config.model import Config
from qkdgate.gateway.daemon import build
from qkdgate.gateway.daemon.control import ControlError, ControlServer
from qkdgate.gateway.daemon.ha import (
    Action,
    HaNotifyError,
    HaRoleMachine,
    Notify,
    node_epoch,
    parse_fifo_line,
    parse_notify,
)
from qkdgate.gateway.daemon.peer import PeerRunner, PeerState
from qkdgate.gateway.daemon.qkd import QkdFetcher
from qkdgate.gateway.daemon.reload import ReloadApplier
from qkdgate.gateway.daemon.sdnotify import SdNotifier
from qkdgate.gateway.daemon.udp import GatewayEndpoint, PeerDriver, open_endpoint
from qkdgate.gateway.telemetry.events import (
    DaemonStarted,
    DaemonStopping,
    Event,
    KeyServiceDelivered,
    KeyServiceRefused,
    QkdStatus,
    RekeyRequested,
)
from qkdgate.tunnels.events import KeyInputs, TunnelEvent
from qkdgate.tunnels.manager import TunnelManager

log = logging.getLogger("qkdgate.daemon")

Subscriber = Callable[[Event], Awaitable[None] | None]
POLL_INTERVAL = 10.0        # kernel counters (soft byte limits, status)
QKD_HEALTH_MAX = 5.0        # poll each peer's KME status at least this often


class Daemon:
    def __init__(self, config: Config, *, config_path: str | None = None,
                 ipsec_backend: Any = None, macsec_backend: Any = None,
                 key_sources: Mapping[str, Any] | None = None,
                 identity: Any = None, peer_identities: Mapping[str, list[Any]] | None = None,
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
        self.subscribers: list[Subscriber] = []
        self.qkd_links: dict[str, dict[str, Any]] = {}   # last KME status per source (`qkd`)
        self.metrics: Any = None            # qkdgate.gateway.telemetry.metrics.Metrics when enabled
        self.telemetry: Any = None          # qkdgate.gateway.telemetry.mqtt.Telemetry when enabled
        self._services: list[Any] = []
        self.keyservice: Any = None         # keyservice.runner.KeyServiceRunner if configured
        self.tunnels = TunnelManager()
        self.runners: dict[str, PeerRunner] = {}
        self.qkd: QkdFetcher | None = None
        self.reloader = ReloadApplier(config_path, self.tunnels, emit=self.emit, clock=clock,
                                      rekey=self._rekey_for)
        self.endpoint: GatewayEndpoint | None = None
        self._transport: asyncio.DatagramTransport | None = None
        self.control: ControlServer | None = None
        self.started_at = clock()
        self.pending_restart: list[str] = []
        self._last_epoch = 0
        self._stop = asyncio.Event()
        self._reload = asyncio.Event()
        self._kick = asyncio.Event()       # tunnel timers changed: re-evaluate now
        self._tasks: set[asyncio.Task[None]] = set()
        self._tg: asyncio.TaskGroup | None = None
        self.ready = asyncio.Event()
        # High availability (gateway/daemon/ha.py): None outside a pair. A
        # pair node builds its peer runners only while keepalived says MASTER.
        self.ha: HaRoleMachine | None = HaRoleMachine(config.ha.node, clock) \
            if config.ha is not None else None
        self._make_runner: Callable[[Any], PeerRunner] | None = None

    # ------------------------------------------------------------------ views
    @property
    def peers(self) -> dict[str, PeerState]:
        return {name: r.state for name, r in self.runners.items()}

    @property
    def drivers(self) -> dict[str, PeerDriver]:
        return {name: r.driver for name, r in self.runners.items()}

    # ------------------------------------------------------------------ hooks
    def subscribe(self, callback: Subscriber) -> None:
        """Receive every event (typed: :mod:`qkdgate.gateway.telemetry.events`
        and :mod:`qkdgate.tunnels.events`; docs/daemon.md)."""
        self.subscribers.append(callback)

    def emit(self, event: Event) -> None:
        if isinstance(event, QkdStatus):
            self.qkd_links[event.source] = event.to_dict()
        for cb in list(self.subscribers):
            # A subscriber is a consumer (telemetry, metrics, a view): its
            # failure must not stop the others nor undo what the event reports.
            try:
                res = cb(event)
                if asyncio.iscoroutine(res):
                    self._spawn(self._guarded(res, cb), "subscriber")
            except Exception:
                log.exception("event subscriber %r failed on %s", cb, event.name)

    async def _guarded(self, coro: Awaitable[None], cb: object) -> None:
        try:
            await coro
        except Exception:
            log.exception("event subscriber %r failed", cb)

    def _tunnel_event(self, event: TunnelEvent) -> None:
        self.emit(event)

    def _spawn(self, coro: Coroutine[Any, Any, None], name: str) -> None:
        if self._tg is not None:
            task = self._tg.create_task(coro, name=name)
        else:   # starting or stopping: still deliver (e.g. daemon_stopping to telemetry);
            # _shutdown waits for these briefly, then cancels them
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
                if self.keyservice is not None:
                    loops.append(tg.create_task(self.keyservice.run(), name="keyservice"))
                if any(p.qkd for p in self.config.peers):
                    loops.append(tg.create_task(self._qkd_health_loop(), name="qkd-health"))
                if self.config.ha is not None and self.config.ha.notify_fifo is not None:
                    loops.append(tg.create_task(self._ha_fifo_loop(self.config.ha.notify_fifo),
                                                name="ha-fifo"))
                self.ready.set()
                self.notifier.ready(self._status_line())
                self.emit(DaemonStarted(tuple(self.tunnels.tunnels)))
                log.info("gateway %s running: %d peer(s), %d tunnel(s)",
                         self.config.gateway.name, len(self.runners), len(self.tunnels.tunnels))
                await self._stop.wait()
                # The group is closing: a task spawned from here on (an event
                # emitted while a loop unwinds) belongs to the event loop, not
                # to a group that refuses it ("TaskGroup is finished").
                self._tg = None
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
        registry = build.failsafe_registry(cfg, self._ipsec, self._macsec)
        self._ipsec, self._macsec = build.backends(cfg, self._ipsec, self._macsec,
                                                   shared=registry)
        for tunnel in build.tunnels(cfg, self._ipsec, self._macsec, self._tunnel_event,
                                    registry=registry):
            self.tunnels.add(tunnel)
        # fail-closed policies first; adopts a previous run's SAs (one kernel read)
        self.tunnels.setup(now)
        if self.ha is not None:
            # A pair node starts as a standby: it holds no SAs (a previous
            # run's, adopted above, go) until keepalived makes it MASTER.
            self._ha_block(now, "ha: standby (starting)")
        if self._key_sources is None:
            self._key_sources = build.key_sources(cfg)
        identity = self._identity or build.local_identity(cfg)
        pins = self._peer_identities or {p.name: build.peer_identities(p) for p in cfg.peers}
        if self.journal is None and self.config_path is not None:
            self.journal = build.open_journal(cfg)
        host = str(cfg.gateway.listen.address)
        wildcard = "0.0.0.0"  # noqa: S104 - the configured address, widened to :: below
        if host == wildcard and any(p.address.version == 6 for p in cfg.peers):
            host = "::"     # a dual-stack socket reaches IPv4 and IPv6 peers alike
        self._transport, self.endpoint = await open_endpoint(
            host, cfg.gateway.listen.port,
            bypass=getattr(self._ipsec, "bypass_socket", None))
        await self._start_telemetry()
        self.qkd = QkdFetcher(cfg, self._key_sources, journal=self.journal, emit=self.emit,
                              clock=self.clock, on_qkd_lost=self._qkd_lost,
                              observe=self.metrics.observe_key_source_call
                              if self.metrics is not None else None)
        self.keyservice = build.key_service(cfg, clock=self.clock, emit=self._keyservice_event)
        if self.keyservice is not None:
            await self.keyservice.start()
        factory = self._session_factory or build.session_factory()
        ha_node = cfg.ha.node if cfg.ha is not None else None

        def make_runner(peer: Any) -> PeerRunner:
            tids = [t.name for t in cfg.tunnels_for(peer.name)]
            # Generations only grow, across restarts too: start above the
            # highest one the journal saw committed for these tunnels or
            # started for this peer (both ends may have died between an
            # install and its commit: journal.record_started).
            floor = max([self.journal.next_generation(t) - 1 for t in tids]
                        + [self.journal.started_generation(peer.name)]) \
                if self.journal is not None else 0
            scfg = build.session_config(cfg, peer, generation_floor=floor)

            def new_session(now: float, scfg: Any = scfg, name: str = peer.name) -> Any:
                # Epochs only grow across restarts (issue 17 finding 3): ours is
                # the journal's counter -- a fresh one for every session, so a
                # session rebuilt after a failure is a new epoch too -- and the
                # peer's floor its authenticated high-water mark.
                # Without a journal (tests) the wall clock stands in for the
                # counter, so a restarted daemon still comes back above its
                # old epoch (a random one could land below it).
                draw = self._clock_epoch if self.journal is None \
                    else self.journal.next_local_epoch
                epochs: dict[str, int] = {
                    # the two nodes of an HA pair never share an epoch (ha.py)
                    "epoch": draw() if ha_node is None else node_epoch(draw, ha_node)}
                if self.journal is not None:
                    epochs["peer_epoch_floor"] = self.journal.peer_epoch(name)
                return factory(scfg, identity=identity, peer_identities=pins[name],
                               rng=self.rng, now=now,
                               allocate_spi=lambda tid: self.tunnels.get(tid).allocate_spi(),
                               allocate_spis=self.tunnels.allocate_spis,
                               **epochs)

            return PeerRunner(peer.name, tids, (str(peer.address), peer.port),
                              new_session=new_session, tunnels=self.tunnels, qkd=self.qkd,
                              journal=self.journal, emit=self.emit, clock=self.clock,
                              spawn=self._spawn, wake=self.wake,
                              exchange_ended=self.reloader.exchange_ended,
                              key_service=self.keyservice, raise_epoch=self._raise_epoch)

        self._make_runner = make_runner
        if self.ha is None:
            for peer in cfg.peers:
                self._add_runner(make_runner(peer))
        self.control = ControlServer(self.control_path, {
            "status": self._ctl_status, "rekey": self._ctl_rekey, "reload": self._ctl_reload,
            "qkd": self._ctl_qkd, "ha": self._ctl_ha})
        await self.control.start()
        for runner in self.runners.values():
            runner.start()

    def _add_runner(self, runner: PeerRunner) -> None:
        if self.endpoint is None:
            raise QkdgateError("a peer runner needs the UDP endpoint: it is not open")
        self.endpoint.add(runner.driver)
        self.runners[runner.name] = runner

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
            self.metrics.watch_status(self.status)   # tunnel state gauges at scrape time
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
        self.emit(DaemonStopping(self.teardown_on_exit))
        pending = [t for t in self._tasks if not t.done()]
        if pending:   # let subscribers see the last events, briefly
            await asyncio.wait(pending, timeout=1.0)
            for t in pending:
                t.cancel()
        for runner in self.runners.values():
            runner.close()
        if self._transport is not None:
            self._transport.close()
        if self.control is not None:
            await self.control.close()
        if self.keyservice is not None:
            await self.keyservice.close()
        self.tunnels.shutdown(self.teardown_on_exit)
        if self.telemetry is not None:
            try:
                await self.telemetry.close()
            except (OSError, QkdgateError) as exc:
                log.warning("telemetry: close failed: %s", exc)
        for service in self._services:
            await service.close()
        for name, src in (self._key_sources or {}).items():
            try:
                await src.close()
            except Exception as exc:  # noqa: BLE001 - a plug-in's close must not mask why we stop
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
                for tid, reasons in self.tunnels.poll(now).items():
                    for reason in reasons:
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
        """Poll each peer's KME status (ETSI GS QKD 014 6.1); see QkdFetcher.poll."""
        qkd = self.qkd
        if qkd is None:
            return
        period = min([QKD_HEALTH_MAX] + [t.rekey.interval for t in self.config.tunnels])
        while True:
            for peer in self.config.peers:
                # an HA standby keeps its KME connection warm too
                if peer.qkd is not None and (peer.name in self.runners or self.ha is not None):
                    await qkd.poll(peer.name)
            await asyncio.sleep(period)

    def _clock_epoch(self) -> int:
        """A growing epoch from the wall clock (microseconds), for a daemon
        run without a journal."""
        self._last_epoch = max(self._last_epoch + 1, time.time_ns() // 1000)
        return self._last_epoch

    def _raise_epoch(self, at_least: int) -> None:
        """A peer knows this gateway by ``at_least`` (docs/protocol.md 10.1):
        every later session epoch is above it."""
        if self.journal is not None:
            self.journal.raise_local_epoch(at_least)
        else:
            self._last_epoch = max(self._last_epoch, at_least)

    def _qkd_lost(self, peer: str | None, reason: str) -> None:
        """QKD is gone for ``peer`` (None: every peer): qkd-mandatory blocks."""
        for name, runner in self.runners.items():
            if peer is None or peer == name:
                runner.qkd_lost(reason)

    def wake(self) -> None:
        """Re-evaluate tunnel timers now (after installs, or a clock jump in tests)."""
        self._kick.set()

    def _rekey_for(self, tunnel_id: str, reason: str) -> str:
        peer = self.config.tunnel(tunnel_id).peer
        if peer not in self.runners:     # an HA standby: no session, nothing to rekey
            log.debug("tunnel %s: no rekey (%s) on an HA standby", tunnel_id, reason)
            return peer
        # per tunnel: DEBUG (the exchange it starts logs one INFO line, peer.py)
        log.debug("tunnel %s: rekey (%s)", tunnel_id, reason, extra={"tunnel": tunnel_id})
        self.runners[peer].rekey(reason)
        return peer

    async def _watchdog_loop(self) -> None:
        interval = self.notifier.watchdog_interval
        while interval:
            self.notifier.watchdog()
            await asyncio.sleep(interval)

    async def _reload_loop(self) -> None:
        while True:
            await self._reload.wait()
            self._reload.clear()
            # A bad file is logged and emitted by the applier; the running config stays.
            with contextlib.suppress(ConfigError):
                self.do_reload()

    def do_reload(self) -> dict[str, Any]:
        """Re-read the config file; apply what can change live."""
        if self.config_path is None:
            raise ControlError("the daemon was not started from a file; nothing to reload")
        self.notifier.reloading()
        try:
            self.config, applied, restart = self.reloader.apply(self.config)
        finally:
            self.notifier.ready(self._status_line())
        if self.qkd is not None:
            self.qkd.reconfigure(self.config)
        self.pending_restart = restart
        return {"applied": applied, "needs_restart": restart}

    # ------------------------------------------------------------------ HA
    def ha_notify(self, what: Notify) -> dict[str, Any]:
        """keepalived says ``what`` (gateway/daemon/ha.py): become active
        (fresh sessions, an exchange with every peer at once) or stand down
        (no sessions, no SAs, block policies kept)."""
        if self.ha is None:
            raise ControlError("this gateway is not configured as an HA node (no ha: section)",
                               "bad_request")
        change = self.ha.notify(what)
        if change.before is not change.after:
            log.warning("ha: node %d %s -> %s (keepalived %s)", self.ha.node,
                        change.before.value, change.after.value, what.value)
        if change.action is Action.ACTIVATE:
            self._ha_activate()
        elif change.action is Action.DEACTIVATE:
            self._ha_deactivate(f"ha: {change.after.value} (keepalived {what.value})")
        return self.ha.snapshot()

    def _ha_activate(self) -> None:
        make = self._make_runner
        if make is None:
            raise QkdgateError("HA activation before the daemon started")
        for peer in self.config.peers:
            if peer.name not in self.runners:
                # A fresh session: a new epoch and an INIT at once (initiate_on_start).
                runner = make(peer)
                self._add_runner(runner)
                runner.start()
        self.wake()

    def _ha_deactivate(self, reason: str) -> None:
        now = self.clock()
        for name, runner in list(self.runners.items()):
            runner.close()
            if self.endpoint is not None:
                self.endpoint.remove(runner.driver)
            if self.keyservice is not None:
                self.keyservice.peer_failed(name, now)    # serve nothing while standby
            del self.runners[name]
        self._ha_block(now, reason)

    def _ha_block(self, now: float, reason: str) -> None:
        """Every tunnel drops its SAs and keeps its block policies."""
        for tunnel in self.tunnels.tunnels.values():
            if tunnel.state != "blocked" or tunnel.generations:
                tunnel.block(now, reason)
        self.wake()

    async def _ctl_ha(self, req: Mapping[str, Any]) -> Any:
        state = req.get("state")
        if state is None:
            if self.ha is None:
                raise ControlError("this gateway is not configured as an HA node", "bad_request")
            return self.ha.snapshot()
        if not isinstance(state, str):
            raise ControlError('ha needs "state": MASTER, BACKUP, FAULT or STOP', "bad_request")
        try:
            what = parse_notify(state)
        except HaNotifyError as exc:
            raise ControlError(str(exc), "bad_request") from None
        return self.ha_notify(what)

    async def _ha_fifo_loop(self, path: str) -> None:
        """Follow keepalived's ``notify_fifo``: its lines arrive in the order
        keepalived changed state (separate notify scripts may race), and no
        process is started per notification."""
        instance = self.config.ha.instance if self.config.ha is not None else None
        loop = asyncio.get_running_loop()
        fd = _open_fifo(path)
        queue: asyncio.Queue[bytes] = asyncio.Queue()

        def readable() -> None:
            try:
                data = os.read(fd, 4096)
            except BlockingIOError:
                return
            if data:
                queue.put_nowait(data)

        loop.add_reader(fd, readable)
        buf = b""
        try:
            while True:
                buf += await queue.get()
                while not queue.empty():
                    buf += queue.get_nowait()
                *lines, buf = buf.split(b"\n")
                if len(buf) > 4096:
                    log.warning("ha: overlong line on %s dropped", path)
                    buf = b""
                # Only the last state of what arrived together counts: the
                # ones before it are over (keepalived buffers lines while no
                # daemon reads, e.g. across our restart), and acting on a
                # stale MASTER would send the peer an INIT from a node that
                # no longer holds the VIP.
                last = None
                for raw in lines:
                    try:
                        what = parse_fifo_line(raw.decode("utf-8", "replace"), instance)
                    except HaNotifyError as exc:
                        log.warning("ha: %s: %s", path, exc)
                        continue
                    if what is not None:
                        last = what
                if last is not None:
                    self.ha_notify(last)
        finally:
            loop.remove_reader(fd)
            os.close(fd)

    # ------------------------------------------------------------------ control
    def status(self) -> dict[str, Any]:
        now = self.clock()
        tunnels = []
        for tid, t in self.tunnels.tunnels.items():
            st = t.status(now)
            peer = self.config.tunnel(tid).peer
            st["peer"] = peer
            qkd = self.config.peer(peer).qkd
            # the key sources in configuration order: a generation's
            # inputs.qkd_sources index into this list (docs/qkd.md)
            st["qkd_sources"] = [s.key_source for s in qkd.source_list] if qkd else []
            timer = None
            runner = self.runners.get(peer)
            if runner is not None and not runner.driver.failed:
                # The session's planned rekey if it says (``next_rekey_at``),
                # else its next timer: never later than the real rekey.
                session = runner.driver.session
                timer = getattr(session, "next_rekey_at", None)
                if timer is None:
                    timer = session.get_timer()
            soft = st.get("soft_expiry_in")
            candidates = [float(x) for x in (soft if isinstance(soft, (int, float)) else None,
                                             (timer - now) if timer is not None else None)
                          if x is not None]
            st["next_rekey_in"] = round(min(candidates), 1) if candidates else None
            ps = self.runners[peer].state if peer in self.runners else None
            if st["last_error"] is None and ps is not None and ps.last_error \
                    and st["state"] != "up":
                st["last_error"] = ps.last_error
            tunnels.append(st)
        peers = [{"peer": r.state.name, "state": r.state.state, "generation": r.state.generation,
                  "qkd_fallback": r.state.qkd_fallback, "rekeys": r.state.rekeys,
                  "rekey_failures": r.state.rekey_failures, "violations": r.state.violations,
                  "session_failures": r.state.session_failures,
                  "last_error": r.state.last_error, "datagrams": dict(r.driver.stats)}
                 for r in self.runners.values()]
        out = {"gateway": self.config.gateway.name, "uptime": round(now - self.started_at, 1),
               "pid": os.getpid(), "peers": peers, "tunnels": tunnels,
               "needs_restart": list(self.pending_restart)}
        if self.keyservice is not None:
            out["key_service"] = self.keyservice.service.snapshot(now)
        if self.ha is not None:
            out["ha"] = self.ha.snapshot()
        return out

    def _keyservice_event(self, ev: Any) -> None:
        """The key service's reports as daemon events (docs/keyservice.md 6)."""
        from qkdgate.keyservice.events import KeysDelivered
        if isinstance(ev, KeysDelivered):
            p = ev.provenance
            self.emit(KeyServiceDelivered(ev.pool, ev.api, ev.master_sae, ev.slave_sae,
                                          ev.key_ids, p.generation,
                                          KeyInputs(p.kem, p.x25519, p.qkd_key_ids)))
            log.info("key service: %d key(s) of pool %s via %s to %s (generation %d, %s)",
                     len(ev.key_ids), ev.pool, ev.api,
                     ev.slave_sae if ev.api in ("enc_keys", "skip_new_key") else ev.master_sae,
                     p.generation, p.inputs)
        else:
            self.emit(KeyServiceRefused(ev.pool, ev.api, ev.caller, ev.status, ev.reason))
            log.info("key service: %s by %s refused (%d): %s", ev.api, ev.caller, ev.status,
                     ev.reason)

    def rekey(self, tunnel_id: str) -> dict[str, Any]:
        if tunnel_id not in self.tunnels.tunnels:
            raise ConfigError(f"no tunnel named {tunnel_id!r} (configured: "
                              f"{', '.join(sorted(self.tunnels.tunnels)) or 'none'})")
        t = self.tunnels.get(tunnel_id)
        gen = t.active.number if t.active else None
        if self.ha is not None and not self.ha.active:
            raise ControlError(f"this node is an HA {self.ha.role.value} node: it runs no "
                               "session (rekey on the active node)", "ha_standby")
        peer = self._rekey_for(tunnel_id, "operator")
        self.emit(RekeyRequested(tunnel_id, peer, "operator"))
        return {"tunnel": tunnel_id, "peer": peer, "generation": gen,
                "tunnels": self.runners[peer].state.tunnels}

    async def _ctl_status(self, req: Mapping[str, Any]) -> Any:
        return self.status()

    async def _ctl_qkd(self, req: Mapping[str, Any]) -> Any:
        """Read-only: the last KME status of each key source (``qkdgate top``)."""
        return {"links": [dict(v) for _, v in sorted(self.qkd_links.items())]}

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


def _open_fifo(path: str) -> int:
    """Open (creating, 0600) keepalived's notify FIFO. Read-write, so the
    FIFO never reads EOF while keepalived restarts (fifo(7): a reader sees
    EOF only when no writer is left; we are one)."""
    with contextlib.suppress(FileExistsError):
        os.mkfifo(path, 0o600)
    st = os.lstat(path)
    if not stat.S_ISFIFO(st.st_mode):
        raise ConfigError(f"ha.notify_fifo {path} exists and is not a FIFO")
    return os.open(path, os.O_RDWR | os.O_NONBLOCK | os.O_CLOEXEC)
