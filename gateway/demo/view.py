"""The demo's live view and JSON summary, from daemon events and snapshots.

Theory of operation: :class:`Recorder` receives every typed daemon event
(the daemon's hook, docs/daemon.md; one subscriber per daemon from
:meth:`Recorder.for_gateway`) from the daemons' threads, stamps it with
the run's elapsed time, and derives what the summary reports: rekeys and
generations per tunnel with their key inputs (QKD key_IDs only), rekey
latencies, alarms, and the policy's actions (fallback, block, recovery).
:func:`render` turns one snapshot (status of both daemons, the simulated
QKD link, traffic counters) into a compact block of plain lines: the demo
may run inside the lab VM with no terminal, so there is no curses, only
text that streams. On a terminal, :func:`make_view` swaps that stream for
the live dashboard (:mod:`qkdgate.gateway.telemetry.dashboard`, redrawn in
place with ``rich``); piped or with ``--plain`` the lines stay as they are
(tests/kernel/test_demo.py and logs read them).

The recorder also keeps the run's timeline for the report
(:mod:`qkdgate.gateway.demo.report`): the QKD link sampled at every view
(QBER, key pool, key rate), the eavesdropper's windows, and every rekey with
its latency; :meth:`Recorder.summary` puts it under ``timeline``.

Nothing here reads key material: the view prints whitelisted fields only
(generation numbers, algorithm names, key_IDs, counters), so a secret that
found its way into a status dict by mistake would still not be printed.
"""

from __future__ import annotations

import contextlib
import functools
import threading
import time
from collections.abc import Callable, Iterator
from typing import Any, TextIO

from qkdgate.gateway.telemetry.events import (
    DaemonEvent,
    Event,
    InstallFailed,
    KeySourceDown,
    KeySourceUp,
    PeerRestartedReport,
    QkdError,
    QkdFallbackReport,
    QkdRecoveredReport,
    RekeyDone,
    RekeyFailedReport,
    UnknownEvent,
)
from qkdgate.tunnels.events import (
    PolicyFallback,
    PolicyRecovered,
    SaHardLifetimeBlock,
    SaInstalled,
    SaSwitched,
    TunnelBlocked,
    TunnelEvent,
    TunnelOpFailed,
)

# The events the view records (typed: the daemon's and the tunnels' own).
KEY_EVENTS = (RekeyDone, RekeyFailedReport, PolicyFallback, PolicyRecovered, TunnelBlocked,
              SaHardLifetimeBlock, SaSwitched, QkdError, KeySourceDown, KeySourceUp,
              TunnelOpFailed, InstallFailed, QkdFallbackReport, QkdRecoveredReport,
              PeerRestartedReport)
_FIELDS = ("event", "tunnel", "generation", "inputs", "latency_ms", "reason", "policy", "error",
           "source", "direction", "spi")


def percentile(values: list[float], p: float) -> float | None:
    """Nearest-rank percentile (p in 0..100); None for no values."""
    if not values:
        return None
    xs = sorted(values)
    k = max(0, min(len(xs) - 1, int(-(-p * len(xs) // 100)) - 1))
    return xs[k]


def _spi(v: Any) -> str | None:
    if isinstance(v, int) and not isinstance(v, bool):
        return f"{v:#010x}"
    return str(v) if v is not None else None


def _active_sas(t: dict[str, Any]) -> str:
    """The active generation's SAs: ``out 0x1a2b3c4d in 0x5e6f7a8b`` (ESP SPIs),
    ``tx AN 1 rx AN 1`` (MACsec association numbers, IEEE 802.1AE 10.7.14)."""
    macsec = t.get("type") == "macsec"
    for g in t.get("generations") or []:
        if g.get("active"):
            parts = []
            for sa in g.get("sas") or []:
                if not isinstance(sa, dict):
                    continue
                d, spi = str(sa.get("direction")), sa.get("spi")
                if macsec:
                    try:
                        an = str(int(str(spi), 0))
                    except ValueError:
                        an = str(spi)
                    parts.append(f"{'tx' if d == 'out' else 'rx'} AN {an}")
                else:
                    parts.append(f"{d} {spi}")
            return " ".join(parts)
    return ""


def _inputs_text(inputs: dict[str, Any] | None) -> str:
    if not inputs:
        return "-"
    legs = []
    if inputs.get("kem"):
        legs.append(str(inputs["kem"]))
    if inputs.get("x25519"):
        legs.append("X25519")
    ids = inputs.get("qkd_key_ids") or []
    legs.append(f"QKD[{','.join(str(i)[:8] for i in ids)}]" if ids else "no QKD")
    return "+".join(legs)


class Recorder:
    """Collects events from any thread; everything derived is computed from them."""

    def __init__(self, clock: Callable[[], float] = time.monotonic,
                 wall: Callable[[], float] = time.time) -> None:
        self.clock, self.wall = clock, wall
        self.t0 = clock()
        self.wall0 = wall()
        self._lock = threading.Lock()
        self.events: list[dict[str, Any]] = []
        self.alarms: list[dict[str, Any]] = []
        self.actions: list[dict[str, Any]] = []
        self.phases: list[tuple[str, float]] = []     # (label, monotonic start)
        self._blocked: set[tuple[str, str]] = set()
        self._fallback: set[tuple[str, str]] = set()
        self._eve: str | None = None   # None (no eavesdropper planned), "before", "on", "after"
        self.notes: list[str] = []
        self.link_samples: list[dict[str, Any]] = []
        self.eve_windows: list[list[float | None]] = []   # [on, off or None]
        self.setup_seconds: float | None = None
        self._shown = 0              # notes already printed by the view
        # (gateway, tunnel, event, generation, monotonic, qkd): each
        # generation's life for :meth:`generation_windows`
        self._lives: list[tuple[str, str, str, int | None, float, bool]] = []

    def start_clock(self) -> None:
        """Traffic starts: time 0 of the run (``--eavesdrop-at`` counts from here)."""
        now = self.clock()
        with self._lock:
            shift = now - self.t0
            self.setup_seconds = round(shift, 2)
            self.t0 = now
            # what came before (the first generation) moves to the new clock:
            # negative times, not seconds since setup began
            for rows in (self.events, self.actions, self.alarms):
                for row in rows:
                    row["t"] = round(row["t"] - shift, 2)

    def new_notes(self) -> list[str]:
        """Notes not yet shown (each line of the view appears once)."""
        with self._lock:
            out = self.notes[self._shown:]
            self._shown = len(self.notes)
        return out

    def elapsed(self, at: float | None = None) -> float:
        return round((self.clock() if at is None else at) - self.t0, 2)

    def phase(self, label: str) -> None:
        with self._lock:
            self.phases.append((label, self.clock()))

    def phase_label(self) -> str:
        """The run's phase: the eavesdropper's state and the policy's state
        (any tunnel blocked / on the PQC fallback); losses are counted per phase."""
        eve = {None: "running", "before": "before eavesdropper", "on": "eavesdropper",
               "after": "after eavesdropper"}[self._eve]
        if self._blocked:
            return eve + ", blocked"
        if self._fallback:
            return eve + ", PQC fallback"
        return eve

    def _update_phase(self) -> None:
        label = self.phase_label()
        if not self.phases or self.phases[-1][0] != label:
            self.phase(label)

    def eavesdropper(self, state: str | None) -> None:
        self._eve = state
        with self._lock:
            if state == "on":
                self.eve_windows.append([self.elapsed(), None])
            elif state == "after" and self.eve_windows and self.eve_windows[-1][1] is None:
                self.eve_windows[-1][1] = self.elapsed()
        self._update_phase()

    def link_sample(self, link: dict[str, Any]) -> None:
        """One look at the simulated QKD link (the KME simulator's state)."""
        def num(key: str) -> float | None:
            v = link.get(key)
            return float(v) if isinstance(v, (int, float)) and not isinstance(v, bool) else None
        with self._lock:
            self.link_samples.append({
                "t": self.elapsed(), "qber": num("qber"), "stored_keys": num("stored_keys"),
                "max_keys": num("max_key_count"), "key_rate_bps": num("secret_key_rate_bps"),
                "alarms": list(link.get("alarms") or [])})

    def note(self, text: str) -> None:
        with self._lock:
            self.notes.append(f"{self.elapsed():6.1f}s {text}")

    def alarm(self, source: str, alarm: str, qber: float | None = None, **extra: Any) -> None:
        a = {"t": self.elapsed(), "source": source, "alarm": alarm,
             "qber": round(qber, 4) if qber is not None else None, **extra}
        with self._lock:
            self.alarms.append(a)
        self.note(f"ALARM {alarm} on {source}"
                  + (f" (QBER {qber:.1%})" if qber is not None else ""))

    def for_gateway(self, gateway: str) -> Callable[[Event], None]:
        """The daemon hook for ``gateway``'s daemon (``Daemon.subscribe``)."""
        return functools.partial(self.on_event, gateway)

    def on_event(self, gateway: str, ev: Event) -> None:
        """One typed event of ``gateway`` (called in the daemon's thread)."""
        if not isinstance(ev, (DaemonEvent, TunnelEvent)):
            raise UnknownEvent(ev, "demo view")
        if isinstance(ev, (SaInstalled, SaSwitched, SaHardLifetimeBlock, TunnelBlocked)):
            gen = None if isinstance(ev, TunnelBlocked) else ev.generation
            qkd = isinstance(ev, (SaInstalled, SaSwitched)) and bool(ev.inputs.qkd_key_ids)
            with self._lock:
                self._lives.append((gateway, ev.tunnel, ev.name, gen, self.clock(), qkd))
        if not isinstance(ev, KEY_EVENTS):
            return
        gw = gateway
        tid = ev.tunnel if isinstance(ev, (TunnelEvent, RekeyDone, RekeyFailedReport)) else ""
        # Whitelisted fields of the wire form only: nothing else is ever shown.
        e: dict[str, Any] = {k: v for k, v in ev.to_dict().items() if k in _FIELDS}
        e["gateway"] = gw
        e["tunnel"] = tid
        e["t"] = self.elapsed()
        with self._lock:
            self.events.append(e)
        action = None
        note = None
        match ev:
            case PolicyFallback():
                self._fallback.add((gw, tid))
                action = ("fallback", f"PQC-only (ML-KEM + X25519) from generation {ev.generation}")
            case PolicyRecovered():
                self._fallback.discard((gw, tid))
                action = ("recovery", f"QKD keys again from generation {ev.generation}")
            case TunnelBlocked():
                self._blocked.add((gw, tid))
                action = ("block", f"traffic blocked: {ev.reason}")
            case SaSwitched() if (gw, tid) in self._blocked:
                self._blocked.discard((gw, tid))
                action = ("recovery", f"unblocked with generation {ev.generation}")
            case RekeyFailedReport() | KeySourceDown():
                note = ev.reason
            case QkdError() | TunnelOpFailed() | InstallFailed():
                note = ev.error
            case _:
                pass
        if action:
            if self.phases:            # phases start with the traffic
                self._update_phase()
            with self._lock:
                self.actions.append({"t": e["t"], "gateway": gw, "tunnel": tid,
                                     "action": action[0], "detail": action[1]})
            self.note(f"POLICY {gw}/{tid}: {action[0]}: {action[1]}")
        elif note is not None:
            self.note(f"{gw}: {ev.name} {note}"[:160])

    # ----------------------------------------------------------- derived

    def rekeys(self) -> dict[str, dict[str, Any]]:
        """Per gateway/tunnel: rekeys done, generations with their inputs."""
        out: dict[str, dict[str, Any]] = {}
        spis = {(e["gateway"], e["tunnel"], e.get("generation")): e.get("spi")
                for e in self.events if e["event"] == "sa_switched"}
        for e in self.events:
            if e["event"] != "rekey_done":
                continue
            row = out.setdefault(f"{e['gateway']}/{e['tunnel']}",
                                 {"rekeys": 0, "failed": 0, "generations": [], "latency_ms": []})
            row["rekeys"] += 1
            inputs = e.get("inputs") or {}
            row["generations"].append({
                "generation": e.get("generation"), "t": e["t"], "kem": inputs.get("kem"),
                "x25519": inputs.get("x25519"),
                "qkd_key_ids": list(inputs.get("qkd_key_ids") or []),
                "outbound_spi": _spi(spis.get((e["gateway"], e["tunnel"], e.get("generation"))))})
            if isinstance(e.get("latency_ms"), (int, float)):
                row["latency_ms"].append(float(e["latency_ms"]))
        for e in self.events:
            if e["event"] == "rekey_failed":
                key = f"{e['gateway']}/{e['tunnel']}"
                out.setdefault(key, {"rekeys": 0, "failed": 0, "generations": [],
                                     "latency_ms": []})["failed"] += 1
        return out

    def generation_windows(self, hard: float) -> list[dict[str, Any]]:
        """Each generation of each tunnel, from what the daemon did: when
        its first SA was installed (``installed``) and when outbound traffic
        switched to it (``switched``: the key service confirms a generation
        right after, gateway/daemon/peer.py, so it serves from then), whether
        its keys had a QKD key, and ``valid_until``: the first of its hard
        lifetime (``switched`` + ``hard``; the kernel's counts from the SA's
        add, before that), the daemon's hard-lifetime block of it, and the
        first ``tunnel_blocked`` after it switched (a block removes every
        SA). Seconds of the run's clock; no key material."""
        with self._lock:
            lives = sorted(self._lives, key=lambda x: x[4])
        rows: dict[tuple[str, str, int], dict[str, Any]] = {}
        blocks: dict[tuple[str, str], list[float]] = {}
        for gw, tunnel, name, gen, at, qkd in lives:
            if gen is None:
                blocks.setdefault((gw, tunnel), []).append(at)
                continue
            row = rows.setdefault((gw, tunnel, gen), {
                "gateway": gw, "tunnel": tunnel, "generation": gen, "installed": at,
                "switched": None, "qkd": qkd, "hard_block": None})
            row["qkd"] = row["qkd"] or qkd
            if name == "sa_switched" and row["switched"] is None:
                row["switched"] = at
            elif name == "sa_hard_lifetime_block" and row["hard_block"] is None:
                row["hard_block"] = at
        out = []
        for (gw, tunnel, _), row in sorted(rows.items()):
            until = None
            if row["switched"] is not None:
                ends = [row["switched"] + hard]
                ends += [b for b in blocks.get((gw, tunnel), []) if b >= row["switched"]][:1]
                if row["hard_block"] is not None:
                    ends.append(row["hard_block"])
                until = min(ends)
            out.append({**row, **{k: (None if row[k] is None else self.elapsed(row[k]))
                                  for k in ("installed", "switched", "hard_block")},
                        "valid_until": None if until is None else self.elapsed(until)})
        return out

    def timeline(self, per_second: dict[str, Any] | None = None) -> dict[str, Any]:
        """What the report plots, every figure kept: link samples,
        eavesdropper windows, rekeys (latency per generation), alarms,
        policy actions and traffic per second (from the run's streams)."""
        rekeys = [{"t": e["t"], "tunnel": f"{e['gateway']}/{e['tunnel']}",
                   "generation": e.get("generation"), "latency_ms": e.get("latency_ms"),
                   "qkd": bool((e.get("inputs") or {}).get("qkd_key_ids"))}
                  for e in self.events if e["event"] == "rekey_done"]
        failed = [{"t": e["t"], "tunnel": f"{e['gateway']}/{e['tunnel']}",
                   "reason": e.get("reason")}
                  for e in self.events if e["event"] == "rekey_failed"]
        with self._lock:
            return {"link": [dict(x) for x in self.link_samples],
                    "eavesdropper": [list(w) for w in self.eve_windows],
                    "rekeys": rekeys, "rekey_failures": failed,
                    "alarms": [dict(a) for a in self.alarms],
                    "policy_actions": [dict(a) for a in self.actions],
                    "traffic_per_second": per_second or {}}

    def summary(self, *, traffic: dict[str, Any], config: dict[str, Any],
                kernel: str, link: dict[str, Any] | None,
                cleanup: dict[str, Any],
                per_second: dict[str, Any] | None = None) -> dict[str, Any]:
        tunnels = {}
        all_lat: list[float] = []
        for key, row in self.rekeys().items():
            lat = row.pop("latency_ms")
            all_lat += lat
            tunnels[key] = {**row, "last_generation": max(
                (g["generation"] or 0 for g in row["generations"]), default=0),
                "rekey_latency_ms": {"p50": percentile(lat, 50), "p99": percentile(lat, 99),
                                     "n": len(lat)}}
        return {
            "version": 1, "started_at": self.wall0, "setup_seconds": self.setup_seconds,
            "duration": self.elapsed(),
            "config": config, "kernel": kernel,
            "tunnels": tunnels,
            "rekeys": sum(t["rekeys"] for t in tunnels.values()),
            "rekey_latency_ms": {"p50": percentile(all_lat, 50), "p99": percentile(all_lat, 99)},
            "traffic": traffic,
            "alarms": list(self.alarms),
            "policy_actions": list(self.actions),
            "qkd_link": link,
            "events": len(self.events),
            "cleanup": cleanup,
            "timeline": self.timeline(per_second),
        }


def render(snap: dict[str, Any]) -> str:
    """One status block (plain text, a handful of lines) from a snapshot."""
    lines = []
    eve = snap.get("eavesdropper")
    head = (f"[{snap.get('t', 0):6.1f}s] qkdgate demo  policy {snap.get('policy')}  "
            f"eavesdropper {'ON' if eve else 'off'}")
    if snap.get("remaining") is not None:
        head += f"  ends in {snap['remaining']:.0f}s"
    lines.append(head)
    link = snap.get("link")
    if link:
        alarms = ",".join(str(a) for a in link.get("alarms", [])) or "none"
        lines.append(f"  QKD link {'-'.join(map(str, link.get('kmes', [])))}: pool "
                     f"{int(link.get('stored_keys', 0))} keys, "
                     f"QBER {float(link.get('qber', 0)):.1%}, "
                     f"key rate {float(link.get('secret_key_rate_bps', 0)) / 1000:.1f} kbit/s, "
                     f"alarms {alarms}")
    net = snap.get("network")
    for p in (net or {}).get("paths", []):
        route = " | ".join("-".join(map(str, r)) for r in p.get("routes") or []) or "no route"
        alarms = ",".join(str(a) for a in p.get("alarms") or []) or "none"
        qber = p.get("qber")
        line = (f"  QKD path {'->'.join(map(str, p.get('saes') or []))} via {route}: pool "
                f"{int(p.get('stored_keys') or 0)} keys")
        if isinstance(qber, (int, float)):
            line += f", QBER {float(qber):.1%}"
        line += f", alarms {alarms}"
        if p.get("compromised"):
            line += (f", compromised {','.join(map(str, p['compromised']))} holds "
                     f"{len(p.get('attacker_key_ids') or [])} of its keys")
        lines.append(line)
    for gw, st in sorted((snap.get("gateways") or {}).items()):
        for t in (st or {}).get("tunnels", []):
            state = str(t.get("state", "?")).upper()
            flag = " FALLBACK(PQC-only)" if t.get("fallback") else ""
            nxt = t.get("next_rekey_in")
            key = f"{gw}/{t.get('tunnel')}"
            lat = (snap.get("latency") or {}).get(key)
            gen = t.get("generation")
            line = (f"  {gw} {t.get('tunnel')} ({t.get('type')}): {state}{flag} "
                    f"gen {gen if gen is not None else '-'} inputs {_inputs_text(t.get('inputs'))} "
                    f"rekeys {int((snap.get('rekeys') or {}).get(key, 0))}")
            if isinstance(lat, (int, float)):
                line += f" last {lat:.0f} ms"
            if isinstance(nxt, (int, float)):
                line += f" next in {float(nxt):.1f}s"
            sas = _active_sas(t)
            if sas:
                line += f" SAs {sas}"
            lines.append(line)
    for name, c in sorted((snap.get("traffic") or {}).items()):
        lines.append(f"  traffic {name}: sent {c.get('sent', 0)} received {c.get('received', 0)} "
                     f"lost {c.get('lost', 0)}  last {c.get('window', 0):.0f}s: "
                     f"{c.get('window_received', 0)}/{c.get('window_sent', 0)} through")
    for api, c in sorted((snap.get("key_service") or {}).items()):
        line = (f"  key service {api}: served {c.get('served', 0)} refused {c.get('refused', 0)}"
                f" fetch-refused {c.get('fetch_refused', 0)} mismatch {c.get('mismatch', 0)}")
        if c.get("errors"):
            line += f" no answer {c['errors']}"
        if c.get("single_source"):
            line += f" single-source {c['single_source']}"
        if c.get("last"):
            line += f"  last refusal: {c['last']}"
        lines.append(line)
    for r in snap.get("recent") or []:
        lines.append(f"  > {r}")
    return "\n".join(lines)


def dashboard_view(snap: dict[str, Any]) -> dict[str, Any]:
    """The dashboard's view of one demo snapshot (the same fields :func:`render` prints)."""
    view: dict[str, Any] = {k: snap.get(k) for k in ("t", "policy", "eavesdropper", "remaining",
                                                      "gateways", "rekeys", "latency",
                                                      "traffic", "recent", "key_service")}
    view["title"] = "qkdgate demo"
    link = snap.get("link")
    if link:
        alarms = [str(a) for a in link.get("alarms") or []]
        view["links"] = [{"name": "-".join(map(str, link.get("kmes") or [])) or "QKD link",
                          "stored_keys": link.get("stored_keys"),
                          "max_keys": link.get("max_key_count"), "qber": link.get("qber"),
                          "key_rate_bps": link.get("secret_key_rate_bps"), "alarms": alarms,
                          "up": bool(link.get("up", True)) and not alarms}]
    net = snap.get("network")
    if net:
        view["links"] = []
        for x in net.get("links") or []:
            alarms = [str(a) for a in x.get("alarms") or []]
            view["links"].append({"name": "-".join(map(str, x.get("kmes") or [])),
                                  "stored_keys": x.get("stored_keys"),
                                  "max_keys": x.get("max_key_count"), "qber": x.get("qber"),
                                  "key_rate_bps": x.get("secret_key_rate_bps"),
                                  "alarms": alarms, "up": bool(x.get("up", True)) and not alarms})
    return view


class PlainView:
    """Piped, or ``--plain``: one block of lines per snapshot (:func:`render`)."""

    def __init__(self, out: TextIO) -> None:
        self.out = out

    def say(self, text: str) -> None:
        print(text, file=self.out, flush=True)

    def show(self, snap: dict[str, Any]) -> None:
        self.say(render(snap))


class LiveView:
    """On a terminal: the dashboard redrawn in place; ``say`` lines scroll above it."""

    def __init__(self, out: TextIO) -> None:
        from rich.console import Console
        from rich.live import Live

        from qkdgate.gateway.telemetry.dashboard import Dashboard
        self.console = Console(file=out)
        self.dash = Dashboard("qkdgate demo")
        self.live = Live(self.dash.render(), console=self.console, refresh_per_second=4,
                         redirect_stdout=False, redirect_stderr=False)

    def say(self, text: str) -> None:
        self.live.console.print(text, markup=False, highlight=False)

    def show(self, snap: dict[str, Any]) -> None:
        self.dash.update(dashboard_view(snap))
        self.live.update(self.dash.render())


@contextlib.contextmanager
def make_view(out: TextIO, *, plain: bool) -> Iterator[PlainView | LiveView]:
    """The live dashboard when ``out`` is a terminal and not ``plain``; else lines."""
    isatty = getattr(out, "isatty", None)
    if plain or not (callable(isatty) and isatty()):
        yield PlainView(out)
        return
    view = LiveView(out)
    with view.live:
        yield view
