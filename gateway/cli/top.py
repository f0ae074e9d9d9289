"""``qkdgate top``: a running daemon's live dashboard.

Theory of operation: every ``--interval`` seconds it asks the daemon over
the control socket (:mod:`qkdgate.gateway.daemon.control`) for ``status``
(tunnels, generations, key inputs, SA ages, next rekeys) and ``qkd`` (the
last ETSI GS QKD 014 status of each key source: key pool, QBER, alarms),
turns the answers into a dashboard view
(:class:`~qkdgate.gateway.telemetry.dashboard.Dashboard`) and redraws it in
place with ``rich.live.Live``. Changes between two looks -- a tunnel
blocking or falling back to PQC-only, a new generation, a KME alarm --
become the "alarms and policy actions" lines. Read-only: it never changes
the daemon. Not on a terminal (or ``--plain``), each look is printed once,
one after the other; ``--once`` prints one look and exits (for scripts and
tests). Exit status as ``qkdgate status``: 1 if the daemon cannot be reached.
"""

from __future__ import annotations

import argparse
import sys
import time
from collections.abc import Callable, Mapping
from typing import Any, TextIO


def add_arguments(p: argparse.ArgumentParser) -> None:
    p.add_argument("-c", "--config", metavar="FILE",
                   help="read the control socket path from this configuration")
    p.add_argument("--socket", metavar="PATH",
                   help="control socket (default /run/qkdgate/control.sock)")
    p.add_argument("-n", "--interval", type=float, default=2.0, metavar="SECONDS",
                   help="seconds between looks (default 2)")
    p.add_argument("--once", action="store_true", help="print one look and exit")
    p.add_argument("--plain", action="store_true",
                   help="print each look below the last instead of redrawing")
    p.add_argument("--width", type=int, default=None, help="columns (default: the terminal's)")


class Watcher:
    """Builds dashboard views from control answers; remembers the last look
    to report what changed (``recent`` lines)."""

    def __init__(self, ask: Callable[[str], Any], clock: Callable[[], float] = time.monotonic
                 ) -> None:
        self.ask, self.clock = ask, clock
        self.t0 = clock()
        self._last: dict[str, tuple[Any, ...]] = {}
        self._alarms: dict[str, tuple[str, ...]] = {}

    def look(self) -> dict[str, Any]:
        from qkdgate.gateway.daemon.control import ControlError
        from qkdgate.gateway.telemetry.dashboard import qkd_links

        status = self.ask("status")
        try:
            qkd = self.ask("qkd")
        except ControlError as exc:      # a daemon older than the qkd query: tunnels only
            if exc.kind != "bad_request":
                raise
            qkd = {}
        gw = str(status.get("gateway", "?"))
        t = self.clock() - self.t0
        recent = self._changes(gw, status, qkd.get("links") or [], t)
        return {"title": f"qkdgate top  {gw}", "t": round(t, 1),
                "gateways": {gw: status}, "links": qkd_links(qkd.get("links") or []),
                "recent": recent}

    def _changes(self, gw: str, status: Mapping[str, Any], links: list[Mapping[str, Any]],
                 t: float) -> list[str]:
        out = []
        for tun in status.get("tunnels") or []:
            name = str(tun.get("tunnel"))
            now = (tun.get("state"), bool(tun.get("fallback")), tun.get("generation"))
            before = self._last.get(name)
            self._last[name] = now
            if before is None or before == now:
                continue
            if now[0] != before[0]:
                err = f" ({tun.get('last_error')})" if tun.get("last_error") else ""
                out.append(f"{t:6.1f}s POLICY {gw}/{name}: {before[0]} -> {now[0]}{err}")
            if now[1] != before[1]:
                out.append(f"{t:6.1f}s POLICY {gw}/{name}: "
                           + ("fallback: PQC-only (ML-KEM + X25519)" if now[1]
                              else "recovery: QKD keys again"))
            if now[2] != before[2] and now[0] == before[0] and now[1] == before[1]:
                out.append(f"{t:6.1f}s {gw}/{name}: generation {now[2]}")
        for link in links:
            src = str(link.get("source"))
            alarms = tuple(str(a) for a in link.get("alarms") or [])
            if alarms != self._alarms.get(src, ()):
                q = link.get("qber")
                qtxt = f" (QBER {q:.1%})" if isinstance(q, (int, float)) else ""
                out.append(f"{t:6.1f}s ALARM {', '.join(alarms)} on {src}{qtxt}" if alarms
                           else f"{t:6.1f}s {src}: QKD link alarms cleared")
            self._alarms[src] = alarms
        return out


def run(args: argparse.Namespace, *, out: TextIO | None = None) -> int:
    from rich.console import Console
    from rich.live import Live

    from qkdgate.gateway.daemon.control import request, socket_path
    from qkdgate.gateway.telemetry.dashboard import Dashboard

    path = socket_path(args)
    stream = out if out is not None else sys.stdout
    console = Console(file=stream, width=args.width)
    watcher = Watcher(lambda cmd: request(path, cmd))
    dash = Dashboard("qkdgate top")
    dash.update(watcher.look())
    if args.once or args.plain or not console.is_terminal:
        console.print(dash.render())
        while not args.once:
            time.sleep(args.interval)
            dash.update(watcher.look())
            console.print(dash.render())
        return 0
    with Live(dash.render(), console=console, refresh_per_second=4, screen=False) as live:
        while True:
            time.sleep(args.interval)
            dash.update(watcher.look())
            live.update(dash.render())
