"""The demo conductor: namespaces, KME simulator, two daemons, traffic, view.

Theory of operation: :class:`DemoRun` builds the topology
(:mod:`~qkdgate.gateway.demo.net`), starts the KME simulator as its own
process in its own namespace (:mod:`~qkdgate.gateway.demo.kmeproc`: its
own interpreter, a TCP forwarder on each gateway's loopback, driven over
a pipe), writes the two
gateway configurations (:mod:`~qkdgate.gateway.demo.config`) and runs the
real :class:`~qkdgate.gateway.daemon.daemon.Daemon` for each gateway in a thread
that lives in the gateway's namespace, so its UDP socket, its HTTPS client
to the KME and its netlink sockets (XFRM, MACsec) are all that gateway's.
Once both gateways hold generation 1, UDP streams run between the hosts;
every ``view_interval`` the conductor prints a status block; at
``eavesdrop_at`` it puts an intercept-resend eavesdropper on the simulated
QKD link (the ``eve`` request on the simulator's control pipe; the QBER
alarm follows from the link model), and the configured
policy acts in the daemons on its own. Every step that creates something
registers its undo with :class:`~qkdgate.gateway.demo.net.Cleanup` first,
so the end, an error or Ctrl-C removes every namespace, thread and the
KME simulator's process.
"""

from __future__ import annotations

import contextlib
import functools
import logging
import os
import shutil
import signal
import sys
import tempfile
import threading
import time
from bisect import bisect_left
from collections.abc import Iterator
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any, TextIO

from qkdgate.errors import QkdgateError
from qkdgate.gateway.demo import net as dn
from qkdgate.gateway.demo.config import (
    POLICIES,
    KmeEndpoint,
    QkdSource,
    Timers,
    control_socket,
    topology_pairs,
    write_configs,
    write_identities,
)
from qkdgate.gateway.demo.kernelwatch import KernelWatch, overlay_blocked
from qkdgate.gateway.demo.kernelwatch import Path as KernelPath
from qkdgate.gateway.demo.kmeproc import KmeProcess
from qkdgate.gateway.demo.report import per_second
from qkdgate.gateway.demo.traffic import UdpStream, loss_by_phase
from qkdgate.gateway.demo.view import LiveView, PlainView, Recorder, make_view

log = logging.getLogger("qkdgate.demo")
QKD_NAMES = {"014": "ETSI GS QKD 014", "004": "ETSI GS QKD 004, binary framing",
             "004-json": "ETSI GS QKD 004, qkdgate's JSON binding"}
READY_TIMEOUT = 120.0      # first generation on both gateways (slow under QEMU TCG)
RECOVERY_TIMEOUT = 120.0   # --after-recovery gives up this long after the eavesdropper left
# What the daemons and the simulator import when they start. Under QEMU TCG
# with the root filesystem over 9p an import costs seconds (every stat is a
# round trip), so a thread imports them while the namespaces are built
# (that part waits on `ip` processes, not on Python).
PREFETCH = ("qkdgate.gateway.daemon.daemon", "qkdgate.gateway.daemon.build",
            "qkdgate.gateway.protocol.identity",
            "qkdgate.gateway.config.model", "qkdgate.adapters.registry", "qkdgate.adapters.etsi014",
            "qkdgate.adapters.etsi004_source", "qkdgate.tunnels.xfrm", "qkdgate.tunnels.macsec",
            "qkdgate.tunnels.ipsec_tunnel", "qkdgate.tunnels.macsec_tunnel",
            "qkdgate.gateway.protocol", "qkdgate.gateway.daemon.journal", "aiohttp")


def prefetch_imports(names: tuple[str, ...] = PREFETCH) -> threading.Thread:
    import importlib

    def body() -> None:
        for n in names:
            try:
                importlib.import_module(n)
            except Exception as exc:  # noqa: BLE001  the real import later reports it properly
                log.debug("prefetch %s: %s", n, exc)
    t = threading.Thread(target=body, name="prefetch", daemon=True)
    t.start()
    return t


@dataclass(frozen=True)
class DemoOptions:
    duration: float | None = None
    eavesdrop_at: float | None = None
    eavesdrop_for: float = 15.0          # 0: until the end
    eve_fraction: float = 0.5            # ~ +12.5 % QBER, above the 8 % abort threshold
    after_recovery: float = 0.0          # run on this long once every path is keyed again
    policy: str = "pqc-fallback"
    macsec: bool = False
    rekey_interval: float = 3.0
    rate: int = 100
    view_interval: float = 2.0
    verbose: bool = False
    log_file: str | None = None          # default: demo.log in the run's state directory
    plain: bool = False                  # line output even on a terminal (no live dashboard)
    topology: str | None = None          # a kme-sim topology file: QKD network with relay
    qkd: str = "014"                     # KME interface: 014, 004 (etsi-binary), 004-json
    key_service: bool = False            # two applications fetch keys (demo/keyapps.py)


class DemoRun:
    def __init__(self, opts: DemoOptions, *, out: TextIO = sys.stdout,
                 cleanup: dn.Cleanup | None = None) -> None:
        self.opts = opts
        self.out = out
        self.cleanup = cleanup or dn.Cleanup()
        self.rec = Recorder()
        self.net = dn.DemoNet()
        self.state_dir: Path | None = None
        self.kme: KmeProcess | None = None
        self.threads: dict[str, dn.LoopThread] = {}
        self.daemons: dict[str, Any] = {}
        self.futures: dict[str, Any] = {}
        self.streams: list[UdpStream] = []
        self.watch: KernelWatch | None = None
        self.eve_on = False
        self.eve_left_at: float | None = None
        self.traffic_t0: float | None = None
        self.stopped = threading.Event()
        self._last_link: dict[str, Any] | None = None
        self.pairs: list[tuple[str, str]] = [("SAE-A", "SAE-B")]   # SAE pairs gw-a <-> gw-b
        self._view: PlainView | LiveView | None = None
        self.keyapps: Any = None             # keyapps.KeyApps with --key-service
        self.ks_files: Any = None            # keyapps.KeyServiceFiles with --key-service

    def _state_dir(self) -> Path:
        if self.state_dir is None:
            raise RuntimeError("DemoRun.setup() has not run")   # our bug
        return self.state_dir

    def say(self, text: str) -> None:
        if self._view is not None:      # above the live dashboard, or a line like the rest
            self._view.say(text)
        else:
            print(text, file=self.out, flush=True)

    # ---------------------------------------------------------------- setup
    def setup(self) -> None:
        state_dir = self.state_dir = Path(tempfile.mkdtemp(prefix="qkdgate-demo-"))
        os.chmod(state_dir, 0o700)
        self.cleanup.push("state directory", lambda: shutil.rmtree(state_dir, True))
        self._logging()
        self.say(f"demo: namespaces {dn.PREFIX}{self.net.tag}-*, state {self.state_dir}")
        self.cleanup.push("namespaces", self._net_down)
        prefetch_imports()
        with self._step("namespaces"):
            self.net.up()
        with self._step("identities"):
            write_identities(self.state_dir)
        with self._step("KME simulator"):
            self._start_kme()
        creds = self._kme().ready["credentials"]

        def endpoint(sae: str, port: int) -> KmeEndpoint:
            c = creds[sae]
            return KmeEndpoint(f"https://127.0.0.1:{port}", c["kme_id"], c["cert"], c["key"],
                               c["ca"])
        eps = [endpoint(self.pairs[0][0], self.fwd_ports[0]),
               endpoint(self.pairs[0][1], self.fwd_ports[1])]
        sources: tuple[list[QkdSource], list[QkdSource]] = ([], [])
        if self.opts.topology:
            for i, (a, b) in enumerate(self.pairs, 1):
                name = "kme" if len(self.pairs) == 1 else f"kme-p{i}"
                sources[0].append(QkdSource(name, a, b, endpoint(a, self.fwd_ports[0])))
                sources[1].append(QkdSource(name, b, a, endpoint(b, self.fwd_ports[1])))
        macs = (self._mac(self.net.gA), self._mac(self.net.gB)) if self.opts.macsec else None
        extras = ("", "")
        if self.opts.key_service:
            from qkdgate.gateway.demo import keyapps
            with self._step("key-service PKI and PSKs"):
                self.ks_files = keyapps.prepare(self.state_dir)
            extras = (keyapps.yaml_section("a", self.ks_files, policy=POLICIES[self.opts.policy],
                                           interval=self.opts.rekey_interval),
                      keyapps.yaml_section("b", self.ks_files, policy=POLICIES[self.opts.policy],
                                           interval=self.opts.rekey_interval))
        pa, pb = write_configs(self.state_dir, eps[0], eps[1], policy=self.opts.policy,
                               timers=Timers.for_interval(self.opts.rekey_interval),
                               macsec_macs=macs, qkd=self.opts.qkd, extras=extras,
                               sources=sources)
        self.config_paths = (pa, pb)
        with self._step("daemons"):
            for name, ns, path in (("gw-a", self.net.gA, pa), ("gw-b", self.net.gB, pb)):
                self._start_daemon(name, ns, path)
        for name in ("gw-a", "gw-b"):       # root's shell on this machine can attach
            self.say(f"demo: {name} control socket: qkdgate top --socket "
                     f"{control_socket(self.state_dir, name)}")

    @contextlib.contextmanager
    def _step(self, what: str) -> Iterator[None]:
        t0 = time.monotonic()
        yield
        log.info("demo setup: %s in %.1f s", what, time.monotonic() - t0)

    def _logging(self) -> None:
        logger = logging.getLogger("qkdgate")
        logger.setLevel(logging.DEBUG if self.opts.verbose else logging.INFO)
        self.log_path = self.opts.log_file or str(self._state_dir() / "demo.log")
        h = logging.FileHandler(self.log_path)
        h.setFormatter(logging.Formatter("%(asctime)s %(threadName)s %(name)s %(levelname)s "
                                         "%(message)s"))
        logger.addHandler(h)
        logger.propagate = False   # the live view is the terminal output; logs go to the file

        def restore() -> None:
            logger.removeHandler(h)
            h.close()
            logger.propagate = True
        self.cleanup.push("logging", restore)

    def _net_down(self) -> None:
        failed = self.net.down()
        if failed:
            raise QkdgateError("namespaces left: " + "; ".join(failed))

    def _mac(self, ns: str) -> str:
        r = dn.run_ip(["ip", "-n", ns, "-o", "link", "show", "m0"])
        parts = r.stdout.split()
        return parts[parts.index("link/ether") + 1]

    def _start_kme(self) -> None:
        topology, kmes = None, ("KME-A", "KME-B")
        if self.opts.topology:
            from qkdgate.gateway.config.topology import load_topology
            topology = load_topology(self.opts.topology)
            self.pairs = topology_pairs(topology)
            home = topology.sae_home()
            kmes = (home[self.pairs[0][0]], home[self.pairs[0][1]])
        listeners = [dn.loopback_listener(self.net.gA), dn.loopback_listener(self.net.gB)]
        self.fwd_ports = [s.getsockname()[1] for s in listeners]
        try:
            self.kme = KmeProcess.start(self._state_dir(), listeners, kmes, qkd=self.opts.qkd,
                                        topology=self.opts.topology, prefill=1000,
                                        netns=self.net.k)
        finally:
            for s in listeners:      # the child holds them now (or nobody does)
                s.close()
        self.cleanup.push("KME simulator process", self._stop_kme)
        log.info("demo: KME simulator process pid %d", self.kme.pid)

    def _kme(self) -> KmeProcess:
        if self.kme is None:
            raise RuntimeError("the KME simulator process is not running")   # our bug
        return self.kme

    def _stop_kme(self) -> None:
        rc = self._kme().stop()
        if rc not in (0, None) and rc != -signal.SIGTERM:
            raise QkdgateError(f"KME simulator process ended with status {rc} "
                               f"(log {self._kme().log_path})")

    def _start_daemon(self, name: str, ns: str, path: str) -> None:
        from qkdgate.gateway.config.model import load_config
        from qkdgate.gateway.daemon.daemon import Daemon
        from qkdgate.gateway.daemon.sdnotify import SdNotifier
        cfg = load_config(path)
        lt = dn.LoopThread(ns, name).start()
        self.threads[name] = lt
        self.cleanup.push(f"{name} thread", lt.stop)
        created = threading.Event()

        async def main() -> None:
            d = Daemon(cfg, config_path=path, notifier=SdNotifier({}), teardown_on_exit=True)
            d.subscribe(self.rec.for_gateway(cfg.gateway.name))
            self.daemons[name] = d
            created.set()
            await d.run()
        fut = lt.submit(main())
        self.futures[name] = fut
        created.wait(10)
        self.cleanup.push(f"{name} daemon", lambda: self._stop_daemon(name))

    def _stop_daemon(self, name: str) -> None:
        d, lt, fut = self.daemons.get(name), self.threads[name], self.futures[name]
        if d is not None and lt.loop is not None and not fut.done():
            lt.loop.call_soon_threadsafe(d.stop)
        try:
            fut.result(20)
        except Exception as exc:  # noqa: BLE001  stopping: report how it ended, stop the rest
            log.warning("%s: stopped with %s", name, exc)

    # ------------------------------------------------------------ observing
    def status(self, name: str) -> dict[str, Any] | None:
        d, lt, fut = self.daemons.get(name), self.threads.get(name), self.futures.get(name)
        if d is None or lt is None or fut is None:
            return None
        if fut.done():
            exc = fut.exception()
            raise QkdgateError(f"gateway {name} stopped: {exc or 'without an error'}")
        if not d.ready.is_set():      # still starting: status() needs every part in place
            return None

        async def get() -> dict[str, Any]:
            status: dict[str, Any] = d.status()
            return status
        try:
            return lt.call(get(), timeout=10)
        except TimeoutError:     # a busy loop under TCG: show it, do not die
            log.warning("%s: no status within 10 s", name)
            return None

    def link_state(self) -> dict[str, Any] | None:
        if self.kme is None:
            return None
        link: dict[str, Any] = self.kme.call("state")["links"][0]
        self.rec.link_sample(link)           # the report's QBER and key pool over time
        prev = set((self._last_link or {}).get("alarms", []))
        for a in link.get("alarms", []):
            if a not in prev:
                self.rec.alarm(f"QKD link {'-'.join(link['kmes'])}", a, link.get("qber"))
        if prev and not link.get("alarms"):
            self.rec.note("QKD link alarms cleared")
        self._last_link = link
        return link

    def network_state(self) -> dict[str, Any] | None:
        """With ``--topology``: every link, and per QKD path (SAE pair) its
        route, what its links hold and what compromised nodes on it saw
        (:func:`~qkdgate.gateway.demo.kmeproc.network_state`, in the
        simulator's process)."""
        if not self.opts.topology or self.kme is None:
            return None
        out: dict[str, Any] = self.kme.call("network", pairs=[list(p) for p in self.pairs])
        return out

    def set_eavesdropper(self, on: bool) -> None:
        self._kme().call("eve", fraction=self.opts.eve_fraction if on else 0.0)
        self.eve_on = on
        if not on:
            self.eve_left_at = time.monotonic()
        self.rec.eavesdropper("on" if on else "after")
        self.rec.note("eavesdropper ON: intercept-resend on "
                      f"{self.opts.eve_fraction:.0%} of photons" if on else "eavesdropper gone")
        self.link_state()

    def wait_ready(self) -> None:
        deadline = time.monotonic() + READY_TIMEOUT
        while time.monotonic() < deadline:
            sts = [self.status(n) for n in ("gw-a", "gw-b")]
            if all(st and st["tunnels"] and all(t["state"] == "up" for t in st["tunnels"])
                   for st in sts):
                return
            time.sleep(0.3)
        raise QkdgateError(f"the tunnels did not come up within {READY_TIMEOUT:.0f} s "
                           f"(log: {self.log_path})")

    def start_traffic(self) -> float:
        """Start the streams; returns the time traffic started (time.monotonic)."""
        n = self.net
        paths = [KernelPath("hA->hB", "esp", n.gA, n.gB, dn.GA, dn.GB),
                 KernelPath("hB->hA", "esp", n.gB, n.gA, dn.GB, dn.GA)]
        if self.opts.macsec:
            paths.append(KernelPath("gA->gB (MACsec)", "macsec", n.gA, n.gB))
        self.watch = KernelWatch(paths).start()
        self.cleanup.push("kernel watch", self.watch.stop)
        self.streams = [
            UdpStream("hA->hB", 1, n.hA, dn.HA, n.hB, dn.HB, rate=self.opts.rate).start(),
            UdpStream("hB->hA", 2, n.hB, dn.HB, n.hA, dn.HA, rate=self.opts.rate).start()]
        if self.opts.macsec:
            for ns, addr in ((n.gA, dn.MS_A), (n.gB, dn.MS_B)):
                r = dn.run_ip(["ip", "-n", ns, "-batch", "-"],
                              f"addr add {addr}/24 dev qm-link\nlink set qm-link up\n")
                if r.returncode:
                    raise QkdgateError(f"MACsec link address in {ns}: {r.stderr.strip()}")
            self.streams.append(UdpStream("gA->gB (MACsec)", 3, n.gA, dn.MS_A, n.gB, dn.MS_B,
                                          rate=self.opts.rate, port=5002).start())
        for s in self.streams:
            self.cleanup.push(f"stream {s.name}", functools.partial(s.stop, 0.0))
        t0 = self.traffic_t0 = time.monotonic()
        return t0

    def start_key_apps(self) -> None:
        from qkdgate.gateway.demo.keyapps import KeyApps
        self.keyapps = KeyApps(self.ks_files, self.net.gA, self.net.gB, self.rec.phase_label,
                               self.rec.elapsed).start()
        self.cleanup.push("key applications", self.keyapps.stop)
        self.say("demo: APP-A and APP-B fetch keys: ETSI 014 enc_keys at gw-a + dec_keys at "
                 "gw-b, SKIP new-key at gw-a + key-by-ID at gw-b (TLS-PSK via stunnel4)")

    def snapshot(self, window: float) -> dict[str, Any]:
        now = time.monotonic()
        gws = {n: self.status(n) for n in ("gw-a", "gw-b")}
        rekeys = self.rec.rekeys()
        traffic = {}
        for s in self.streams:
            since = now - window
            recent = s.sent_at[-int(window * s.rate * 2 + 10):]
            c: dict[str, float] = {**s.counters(), "window": window,
                                   "window_sent": sum(1 for t in recent if t >= since),
                                   "window_received": s.received_since(since)}
            traffic[s.name] = c
        remaining = None
        if self.opts.duration is not None and self.traffic_t0 is not None:
            remaining = max(0.0, self.opts.duration - (now - self.traffic_t0))
        return {"t": self.rec.elapsed(now), "policy": self.opts.policy, "eavesdropper": self.eve_on,
                "remaining": remaining, "link": self.link_state(),
                "network": self.network_state(), "gateways": gws,
                "rekeys": {k: v["rekeys"] for k, v in rekeys.items()},
                "latency": {k: (v["latency_ms"][-1] if v["latency_ms"] else None)
                            for k, v in rekeys.items()},
                "traffic": traffic, "recent": self.rec.new_notes(),
                **({"key_service": self.keyapps.view()} if self.keyapps else {})}

    # ------------------------------------------------------------------ run
    def run(self) -> None:
        """Setup, traffic and view until the duration ends (or Ctrl-C)."""
        o = self.opts
        self.setup()
        self.say(f"demo: two gateways, KME simulator up ({QKD_NAMES[o.qkd]}); policy {o.policy}, "
                 f"rekey every {o.rekey_interval:g} s; waiting for the first generation ...")
        with self._step("first generation"):
            self.wait_ready()
        self.rec.start_clock()
        self.rec.eavesdropper("before" if o.eavesdrop_at is not None else None)
        t0 = self.start_traffic()
        self.say(f"demo: tunnel up, traffic running ({o.rate} datagrams/s each way)")
        if o.key_service:
            self.start_key_apps()
        with make_view(self.out, plain=o.plain) as view:
            self._view = view
            try:
                self._loop(t0, view)
            finally:
                self._view = None

    def _loop(self, t0: float, view: PlainView | LiveView) -> None:
        o = self.opts
        next_view = t0
        eve_end = None
        while not self.stopped.is_set():
            now = time.monotonic()
            el = now - t0
            if o.duration is not None and el >= o.duration and self.recovered(now):
                break
            if o.eavesdrop_at is not None and not self.eve_on and eve_end is None \
                    and el >= o.eavesdrop_at:
                self.set_eavesdropper(True)
                # it stays eavesdrop_for from when it came, however late the
                # (busy) loop noticed eavesdrop_at
                eve_end = el + o.eavesdrop_for if o.eavesdrop_for > 0 else float("inf")
            if self.eve_on and eve_end is not None and el >= eve_end:
                self.set_eavesdropper(False)
            if now >= next_view:
                view.show(self.snapshot(o.view_interval))
                next_view = now + o.view_interval
            self.stopped.wait(0.1)

    def recovered(self, now: float) -> bool:
        """With ``after_recovery``: the eavesdropper has left and every traffic
        path has carried keys in the kernel (:class:`KernelWatch`) for
        ``after_recovery`` seconds since, and its stream has sent that many
        seconds' worth of datagrams, so the run ends with a recovered phase
        of known size however long recovery took. True without the option
        or a planned eavesdropper that leaves, or ``RECOVERY_TIMEOUT``
        after it left (the summary then shows what did not recover)."""
        o, left, watch = self.opts, self.eve_left_at, self.watch
        if not o.after_recovery or watch is None or o.eavesdrop_at is None \
                or not o.eavesdrop_for:
            return True
        if left is None:
            return False           # it came late, so it leaves late: wait for it
        if now - left > RECOVERY_TIMEOUT:
            log.warning("demo: not every path recovered within %.0f s", RECOVERY_TIMEOUT)
            return True
        streams = {s.name: s for s in self.streams}
        for p in watch.paths:
            since = watch.keyed_since(p.name)
            if since is None or now - max(since, left) < o.after_recovery:
                return False
            s = streams.get(p.name)
            # S seconds' worth of datagrams, too: a starved sender (a loaded
            # host under TCG) sends fewer than its rate
            if s is not None and s.sent - bisect_left(s.sent_at, max(since, left)) \
                    < o.after_recovery * s.rate:
                return False
        return True

    def finish(self) -> dict[str, Any]:
        """Stop traffic, take the figures, stop everything; the summary."""
        end = time.monotonic()
        key_service = None
        if self.keyapps is not None:
            from qkdgate.gateway.demo.keyapps import judge_served
            self.keyapps.stop()
            key_service = self.keyapps.summary()
            hard = Timers.for_interval(self.opts.rekey_interval).hard
            key_service["hard_lifetime"] = hard
            key_service["generations"] = self.rec.generation_windows(hard)
            key_service["served_outside_generation"] = judge_served(
                key_service, qkd_required=POLICIES[self.opts.policy] == "hybrid-required")
        for s in self.streams:
            s.stop(drain=1.0)
        traffic: dict[str, Any] = {"streams": {}, "sent": 0, "received": 0, "lost": 0}
        watch = self.watch
        if watch is not None:
            watch.stop()
        t0 = self.rec.t0
        for s in self.streams:
            blocked = watch.blocked(s.name) if watch is not None else []
            trans = watch.transitions(s.name) if watch is not None else []
            phases = overlay_blocked(self.rec.phases, blocked, trans)
            by_phase = loss_by_phase(s.sent_at, s.received, phases, end)
            c: dict[str, Any] = {k: sum(row[k] for row in by_phase.values())
                                 for k in ("sent", "received", "lost")}
            c.update(rate=s.rate, send_errors=s.send_errors, by_phase=by_phase,
                     kernel_blocked=[[round(a - t0, 3), round(b - t0, 3)] for a, b in blocked])
            traffic["streams"][s.name] = c
            for k in ("sent", "received", "lost"):
                traffic[k] += c[k]
        if watch is not None:
            traffic["kernel_watch"] = {"reads": watch.reads, "errors": watch.errors,
                                       "interval_ms": watch.interval * 1000,
                                       "max_gap_ms": round(watch.max_gap * 1000, 1),
                                       "sas": watch.sa_report(t0)}
        traffic["phases"] = [{"phase": p, "t": self.rec.elapsed(t)} for p, t in self.rec.phases]
        per_sec = {s.name: per_second(s.sent_at, s.received, t0, end) for s in self.streams}
        link = network = None
        try:
            link = self.link_state()
            network = self.network_state()
        except Exception as exc:  # noqa: BLE001  the summary is still worth having
            log.warning("QKD link state for the summary: %s", exc)
        t_clean = time.monotonic()
        errors = self.cleanup.run()
        clean_s = round(time.monotonic() - t_clean, 2)
        log.info("demo: cleanup in %.1f s", clean_s)
        left = dn.list_demo_namespaces(self.net.tag)
        cfg = {**asdict(self.opts), "namespaces_tag": self.net.tag}
        summary = self.rec.summary(traffic=traffic, config=cfg, kernel=os.uname().release,
                                   link=link, per_second=per_sec,
                                   cleanup={"errors": errors, "namespaces_left": left,
                                            "seconds": clean_s,
                                            "namespaces_created": list(self.net.ns.values())})
        if key_service is not None:
            summary["key_service"] = key_service
        if network is not None:
            summary["qkd_network"] = network
        return summary
