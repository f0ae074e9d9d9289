"""The operator's live dashboard: one screen, redrawn in place with ``rich``.

Theory of operation: :class:`Dashboard` is fed *views* -- plain dicts of
what one look at the gateways found (:meth:`Dashboard.update`) -- and keeps
the little history a live screen needs: the QKD link's key pool, QBER and
key rate as sparklines, and the latest alarms and policy actions. It never
reads a socket, a clock or a daemon: ``qkdgate demo`` (a snapshot of both
of its gateways and the simulated link, gateway/demo/run.py) and
``qkdgate top`` (a running daemon's control socket, gateway/cli/top.py)
each build the view and decide when to redraw; :meth:`Dashboard.render`
turns the current state into a ``rich`` renderable that ``rich.live.Live``
redraws, or that a test prints to a recording console at a fixed size.

It lives in the telemetry layer because both the CLI and the demo show it
and the layer rule (.importlinter) keeps those two independent.

The view (every key optional)::

    {"title": "qkdgate demo", "t": 12.0, "policy": "pqc-fallback",
     "eavesdropper": False, "remaining": 48.0,
     "gateways": {"gw-a": <Daemon.status()>, ...},
     "links": [{"name": "KME-A-KME-B", "stored_keys": 812, "max_keys": 1000,
                "qber": 0.031, "key_rate_bps": 9200.0, "alarms": [], "up": True}],
     "rekeys": {"gw-a/t1": 4}, "latency": {"gw-a/t1": 38.2},
     "traffic": {"hA->hB": {"sent": .., "received": .., "lost": ..,
                            "window": 2, "window_sent": .., "window_received": ..}},
     "recent": ["  12.3s ALARM qber_above_threshold on ..."],
     "key_service": {"etsi014": {"served": .., "refused": .., "mismatch": ..,
                                 "fetch_refused": .., "last": "503 no key: .."}}}

Nothing here reads key material: like the demo's line view it prints
whitelisted fields (states, generation numbers, algorithm names, the first
8 hex digits of QKD key_IDs, counters).
"""

from __future__ import annotations

from collections import deque
from collections.abc import Iterable, Mapping, Sequence
from typing import Any

from rich import box
from rich.console import Group, RenderableType
from rich.table import Table
from rich.text import Text

SPARK = "▁▂▃▄▅▆▇█"
HISTORY = 40            # samples kept per sparkline
RECENT = 8              # alarm / policy lines shown
_STATE_STYLE = {"up": "bold green", "blocked": "bold red", "down": "yellow"}


def sparkline(values: Sequence[float], width: int = 20, *, low: float | None = None,
              high: float | None = None) -> str:
    """The last ``width`` values as block characters, scaled to ``low``..``high``
    (default: the values' own range; a flat series draws at the bottom)."""
    xs = [float(v) for v in values][-width:]
    if not xs:
        return ""
    lo = min(xs) if low is None else low
    hi = max(xs) if high is None else high
    span = hi - lo
    top = len(SPARK) - 1
    out = []
    for x in xs:
        k = 0 if span <= 0 else round((min(max(x, lo), hi) - lo) / span * top)
        out.append(SPARK[k])
    return "".join(out)


def _num(v: Any) -> float | None:
    return float(v) if isinstance(v, (int, float)) and not isinstance(v, bool) else None


def _age(seconds: Any) -> str:
    s = _num(seconds)
    if s is None:
        return "-"
    if s < 0:
        return "overdue"
    if s < 120:
        return f"{s:.0f}s"
    if s < 7200:
        return f"{int(s) // 60}m{int(s) % 60:02d}s"
    return f"{int(s) // 3600}h{int(s) % 3600 // 60:02d}m"


def inputs_text(inputs: Any) -> str:
    """``ML-KEM-768+X25519+QKD[6f1c2a4e]``: names and key_ID prefixes only."""
    if not isinstance(inputs, Mapping) or (not inputs.get("kem")
                                           and not inputs.get("qkd_key_ids")):
        return "-"
    legs = [str(inputs["kem"])] if inputs.get("kem") else []
    if inputs.get("x25519"):
        legs.append("X25519")
    ids = inputs.get("qkd_key_ids") or []
    legs.append(f"QKD[{','.join(str(i)[:8] for i in ids)}]" if ids else "no QKD")
    return "+".join(legs)


def active_sas(t: Mapping[str, Any]) -> str:
    """The active generation's SAs: ESP SPIs, or MACsec association numbers
    (IEEE 802.1AE 10.7.14)."""
    macsec = t.get("type") == "macsec"
    for g in t.get("generations") or []:
        if not isinstance(g, Mapping) or not g.get("active"):
            continue
        parts = []
        for sa in g.get("sas") or []:
            if not isinstance(sa, Mapping):
                continue
            d, spi = str(sa.get("direction")), sa.get("spi")
            if macsec:
                parts.append(f"{'tx' if d == 'out' else 'rx'} AN {spi}")
            else:
                parts.append(f"{d} {spi}")
        return " ".join(parts)
    return ""


def _row(tab: Table, *cells: str | Text) -> None:
    """Add a row whose plain strings are literal text: a str cell is rich
    markup, which would swallow ``[ab12cd34]`` (a key_ID prefix) as a tag."""
    tab.add_row(*(c if isinstance(c, Text) else Text(c) for c in cells))


def _table(title: str) -> Table:
    return Table(title=title, title_justify="left", title_style="bold", box=box.SIMPLE_HEAD,
                 show_edge=False, pad_edge=False, collapse_padding=True, min_width=60)


class Dashboard:
    """State of one live screen; :meth:`update` with each view, then :meth:`render`."""

    def __init__(self, title: str = "qkdgate", *, history: int = HISTORY) -> None:
        self.title = title
        self.view: dict[str, Any] = {}
        self._history = history
        self.pool: dict[str, deque[float]] = {}
        self.qber: dict[str, deque[float]] = {}
        self.rate: dict[str, deque[float]] = {}
        self.recent: deque[str] = deque(maxlen=RECENT)

    def _series(self, table: dict[str, deque[float]], name: str) -> deque[float]:
        if name not in table:
            table[name] = deque(maxlen=self._history)
        return table[name]

    def update(self, view: Mapping[str, Any]) -> None:
        self.view = dict(view)
        for link in view.get("links") or []:
            name = str(link.get("name", "?"))
            for table, key in ((self.pool, "stored_keys"), (self.qber, "qber"),
                               (self.rate, "key_rate_bps")):
                v = _num(link.get(key))
                if v is not None:
                    self._series(table, name).append(v)
        for line in view.get("recent") or []:
            self.recent.append(str(line).strip())

    # ------------------------------------------------------------- render
    def render(self) -> RenderableType:
        parts: list[RenderableType] = [self._header(), self._tunnels()]
        if self.view.get("links"):
            parts.append(self._links())
        if self.view.get("traffic"):
            parts.append(self._traffic())
        if self.view.get("key_service"):
            parts.append(self._key_service())
        parts.append(self._recent())
        return Group(*parts)

    def _header(self) -> Text:
        v = self.view
        head = Text(str(v.get("title") or self.title), style="bold")
        t = _num(v.get("t"))
        if t is not None:
            head.append(f"  t={t:.1f}s")
        if v.get("policy"):
            head.append(f"  policy {v['policy']}")
        eve = v.get("eavesdropper")
        if eve is not None:
            head.append("  eavesdropper ")
            head.append("ON", style="bold red") if eve else head.append("off")
        rem = _num(v.get("remaining"))
        if rem is not None:
            head.append(f"  ends in {rem:.0f}s")
        for name, st in sorted((v.get("gateways") or {}).items()):
            if isinstance(st, Mapping) and st.get("uptime") is not None:
                head.append(f"  {name} up {_age(st.get('uptime'))}")
        return head

    def _tunnels(self) -> Table:
        v = self.view
        tab = _table("tunnels")
        for col in ("gateway", "tunnel", "state", "gen", "key inputs", "SA age",
                    "next rekey", "rekeys", "last", "SAs"):
            tab.add_column(col, no_wrap=col != "SAs",
                           justify="right" if col in ("gen", "rekeys", "last") else "left")
        rows = 0
        for gw, st in sorted((v.get("gateways") or {}).items()):
            if not isinstance(st, Mapping):
                _row(tab, gw, "-", Text("no answer", style="yellow"), *[""] * 7)
                rows += 1
                continue
            for t in st.get("tunnels") or []:
                key = f"{gw}/{t.get('tunnel')}"
                state = str(t.get("state", "?"))
                label = Text(state.upper(), style=_STATE_STYLE.get(state, ""))
                if t.get("fallback"):
                    label.append(" PQC-only", style="bold yellow")
                gen = t.get("generation")
                lat = _num((v.get("latency") or {}).get(key))
                n = (v.get("rekeys") or {}).get(key)
                _row(tab, gw, f"{t.get('tunnel')} ({t.get('type', '?')})", label,
                            "-" if gen is None else str(gen), inputs_text(t.get("inputs")),
                            _age(t.get("sa_age")), _age(t.get("next_rekey_in")),
                            "-" if n is None else str(n),
                            "-" if lat is None else f"{lat:.0f} ms", active_sas(t) or "-")
                rows += 1
        if not rows:
            _row(tab, "-", "no tunnels", *[""] * 8)
        return tab

    def _links(self) -> Table:
        tab = _table("QKD links")
        for col in ("link", "pool", "", "QBER", "", "key rate", "", "alarms"):
            tab.add_column(col, no_wrap=True)
        for link in self.view.get("links") or []:
            name = str(link.get("name", "?"))
            stored, mx = _num(link.get("stored_keys")), _num(link.get("max_keys"))
            pool = "-" if stored is None else f"{stored:.0f}" + (f"/{mx:.0f}" if mx else "")
            q = _num(link.get("qber"))
            rate = _num(link.get("key_rate_bps"))
            alarms = [str(a) for a in link.get("alarms") or []]
            up = link.get("up")
            qtext = Text("-" if q is None else f"{q:.1%}",
                         style="bold red" if alarms or up is False else "")
            _row(tab, name, pool, sparkline(self.pool.get(name, ()), low=0,
                                              high=mx if mx else None),
                        qtext, sparkline(self.qber.get(name, ()), low=0, high=0.25),
                        "-" if rate is None else f"{rate / 1000:.1f} kbit/s",
                        sparkline(self.rate.get(name, ()), low=0),
                        Text(", ".join(alarms) or ("link down" if up is False else "none"),
                             style="bold red" if alarms or up is False else "green"))
        return tab

    def _traffic(self) -> Table:
        tab = _table("traffic")
        for col in ("stream", "sent", "received", "lost", "through (window)"):
            tab.add_column(col, justify="left" if col == "stream" else "right", no_wrap=True)
        for name, c in sorted((self.view.get("traffic") or {}).items()):
            lost = int(c.get("lost", 0))
            ws, wr = int(c.get("window_sent", 0)), int(c.get("window_received", 0))
            _row(tab, name, str(int(c.get("sent", 0))), str(int(c.get("received", 0))),
                        Text(str(lost), style="red" if lost else ""),
                        Text(f"{wr}/{ws} in {_num(c.get('window')) or 0:.0f}s",
                             style="red" if ws and wr < ws else "green"))
        return tab

    def _key_service(self) -> Table:
        """Keys the demo's applications got per API (``qkdgate demo --key-service``)."""
        tab = _table("key service")
        for col in ("API", "served", "refused", "mismatch", "last refusal"):
            tab.add_column(col, justify="right" if col in ("served", "refused", "mismatch")
                           else "left", no_wrap=col != "last refusal")
        for api, c in sorted((self.view.get("key_service") or {}).items()):
            bad = int(c.get("mismatch", 0)) + int(c.get("fetch_refused", 0))
            _row(tab, api, Text(str(int(c.get("served", 0))), style="green"),
                 Text(str(int(c.get("refused", 0))), style="yellow" if c.get("refused") else ""),
                 Text(str(bad), style="bold red" if bad else ""), str(c.get("last") or "-"))
        return tab

    def _recent(self) -> Table:
        tab = _table("alarms and policy actions")
        tab.show_header = False
        tab.add_column("event")
        for line in self.recent:
            style = "red" if "ALARM" in line or "block" in line else (
                "yellow" if "fallback" in line else "")
            tab.add_row(Text(line, style=style))
        if not self.recent:
            tab.add_row(Text("none", style="dim"))
        return tab


def qkd_links(answers: Iterable[Mapping[str, Any]]) -> list[dict[str, Any]]:
    """View ``links`` from the daemon's ``qkd`` control answer (its last KME
    status per key source, ETSI GS QKD 014 6.1)."""
    out = []
    for st in answers:
        out.append({"name": str(st.get("source", "?")), "stored_keys": st.get("stored_key_count"),
                    "max_keys": st.get("max_key_count"), "qber": st.get("qber"),
                    "alarms": list(st.get("alarms") or []), "up": bool(st.get("link_up"))})
    return out
