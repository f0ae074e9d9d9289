"""The demo's run report: one self-contained HTML page, PNG figures, the JSON summary.

Theory of operation: :func:`write_report` is a pure function of the run's
summary (:meth:`~qkdgate.gateway.demo.view.Recorder.summary`, whose
``timeline`` holds every number a figure plots) and writes into one folder:

* ``qkd_link.png`` -- QBER (with the 8 % abort threshold) and the key pool
  over time;
* ``rekeys.png`` -- rekey latency per generation, per gateway and tunnel,
  QKD-keyed generations apart from PQC-only ones;
* ``traffic.png`` -- datagrams sent and lost per second, per stream;
* on each, the eavesdropper's window shaded, alarms and the policy's
  actions (fallback, block, recovery) as marked lines;
* ``report.html`` -- the numbers, the figures (embedded as ``data:`` URIs,
  so the page is one file that opens offline: no script, no external font,
  style sheet or image), the alarms and policy actions, loss by phase and
  the generations with their key inputs (QKD key_IDs as 8-digit prefixes);
* ``summary.json`` -- the summary itself, timeline included.

Figures are drawn with matplotlib's Agg canvas on ``Figure`` objects (no
pyplot: no global state, no display, safe in any thread). The demo runs in
the kernel lab; tests feed a recorded timeline and check the files.
"""

from __future__ import annotations

import base64
import html
import io
import json
import time
from bisect import bisect_left
from collections.abc import Iterable, Mapping, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

QBER_THRESHOLD = 0.08        # the KME simulator's abort threshold (adapters/kmesim/linkmodel.py)
FIGSIZE = (10.0, 4.0)        # inches; at DPI, 1000 x 400 pixels
DPI = 100
_ACTION_COLOURS = {"fallback": "tab:orange", "block": "tab:red", "recovery": "tab:green"}


@dataclass(frozen=True)
class ReportFiles:
    html: Path
    summary: Path
    figures: dict[str, Path]


def per_second(sent_at: Sequence[float], received: set[int] | frozenset[int], t0: float,
               end: float) -> dict[str, list[float]]:
    """Datagrams sent and lost in each second of the run: datagram ``i`` was
    sent at ``sent_at[i]`` (sorted, monotonic clock) and is lost if ``i`` is
    not in ``received``. ``t`` is each second's start, relative to ``t0``."""
    n = max(0, int(end - t0 + 0.999))
    t, sent, lost = [], [], []
    for k in range(n):
        lo = bisect_left(sent_at, t0 + k)
        hi = bisect_left(sent_at, t0 + k + 1)
        t.append(float(k))
        sent.append(float(hi - lo))
        lost.append(float(sum(1 for i in range(lo, hi) if i not in received)))
    return {"t": t, "sent": sent, "lost": lost}


# ------------------------------------------------------------------ figures

def _figure(rows: int = 1) -> tuple[Any, list[Any]]:
    from matplotlib.backends.backend_agg import FigureCanvasAgg
    from matplotlib.figure import Figure
    fig = Figure(figsize=(FIGSIZE[0], FIGSIZE[1] * (1 if rows == 1 else 0.75 * rows)), dpi=DPI)
    FigureCanvasAgg(fig)
    axes = fig.subplots(rows, 1, sharex=True, squeeze=False)
    return fig, [a[0] for a in axes]


def _png(fig: Any) -> bytes:
    fig.tight_layout()
    buf = io.BytesIO()
    fig.savefig(buf, format="png", dpi=DPI)
    return buf.getvalue()


def _marks(ax: Any, tl: Mapping[str, Any], end: float) -> None:
    """Eavesdropper windows shaded; alarms and policy actions as lines."""
    for i, (on, off) in enumerate(tl.get("eavesdropper") or []):
        ax.axvspan(on, off if off is not None else end, color="tab:red", alpha=0.12,
                   label="eavesdropper" if i == 0 else None)
    seen: set[str] = set()
    for a in tl.get("alarms") or []:
        ax.axvline(a["t"], color="darkred", ls=":", lw=1.2,
                   label=None if "alarm" in seen else "alarm")
        seen.add("alarm")
    for a in tl.get("policy_actions") or []:
        kind = str(a.get("action"))
        ax.axvline(a["t"], color=_ACTION_COLOURS.get(kind, "grey"), ls="--", lw=1.2,
                   label=None if kind in seen else kind)
        seen.add(kind)


def _legend(ax: Any) -> None:
    handles, labels = ax.get_legend_handles_labels()
    if handles:
        ax.legend(handles, labels, loc="upper right", fontsize=8, framealpha=0.8)


def _end(summary: Mapping[str, Any]) -> float:
    d = summary.get("duration")
    return float(d) if isinstance(d, (int, float)) else 0.0


def figure_qkd_link(summary: Mapping[str, Any]) -> bytes:
    tl = summary.get("timeline") or {}
    samples = [s for s in tl.get("link") or [] if s.get("t") is not None]
    fig, (ax_q, ax_p) = _figure(2)
    t = [s["t"] for s in samples]
    ax_q.plot(t, [100 * (s["qber"] or 0) for s in samples], color="tab:purple", marker=".",
              label="QBER")
    ax_q.axhline(100 * QBER_THRESHOLD, color="black", lw=0.8, ls="-.",
                 label=f"abort threshold {QBER_THRESHOLD:.0%}")
    ax_q.set_ylabel("QBER (%)")
    ax_q.set_ylim(bottom=0)
    ax_q.set_title("QKD link: quantum bit error rate and key pool")
    ax_p.plot(t, [s["stored_keys"] or 0 for s in samples], color="tab:blue", marker=".",
              label="stored keys")
    ax_p.set_ylabel("keys in the pool")
    ax_p.set_ylim(bottom=0)
    ax_p.set_xlabel("time since traffic started (s)")
    end = max([_end(summary), *t]) if t else _end(summary)
    for ax in (ax_q, ax_p):
        _marks(ax, tl, end)
        ax.grid(alpha=0.3)
        _legend(ax)
    return _png(fig)


def figure_rekeys(summary: Mapping[str, Any]) -> bytes:
    tl = summary.get("timeline") or {}
    fig, (ax,) = _figure()
    by_tunnel: dict[str, list[Mapping[str, Any]]] = {}
    for r in tl.get("rekeys") or []:
        if isinstance(r.get("latency_ms"), (int, float)) and r.get("generation") is not None:
            by_tunnel.setdefault(str(r["tunnel"]), []).append(r)
    for name, rows in sorted(by_tunnel.items()):
        rows = sorted(rows, key=lambda r: int(r["generation"]))
        line = ax.plot([r["generation"] for r in rows], [r["latency_ms"] for r in rows],
                       lw=1, label=name)[0]
        pqc = [r for r in rows if not r.get("qkd")]
        if pqc:
            ax.scatter([r["generation"] for r in pqc], [r["latency_ms"] for r in pqc],
                       marker="x", s=40, color=line.get_color(),
                       label=f"{name} PQC-only (no QKD)")
        qkd = [r for r in rows if r.get("qkd")]
        ax.scatter([r["generation"] for r in qkd], [r["latency_ms"] for r in qkd], s=14,
                   color=line.get_color())
    ax.set_xlabel("generation")
    ax.set_ylabel("rekey latency (ms)")
    ax.set_ylim(bottom=0)
    ax.set_title("Rekey latency per generation (start to outbound switch)")
    ax.grid(alpha=0.3)
    _legend(ax)
    return _png(fig)


def figure_traffic(summary: Mapping[str, Any]) -> bytes:
    tl = summary.get("timeline") or {}
    streams = tl.get("traffic_per_second") or {}
    fig, (ax,) = _figure()
    end = _end(summary)
    for name, c in sorted(streams.items()):
        t = list(c.get("t") or [])
        line = ax.step(t, c.get("sent") or [], where="post", lw=1.2, label=f"{name} sent")[0]
        ax.bar(t, c.get("lost") or [], width=1.0, align="edge", alpha=0.6,
               color="tab:red", hatch="//", edgecolor=line.get_color(),
               label=f"{name} lost")
        end = max([end, *(x + 1 for x in t)])
    _marks(ax, tl, end)
    ax.set_xlabel("time since traffic started (s)")
    ax.set_ylabel("datagrams per second")
    ax.set_ylim(bottom=0)
    ax.set_title("Traffic through the tunnel: sent and lost per second")
    ax.grid(alpha=0.3)
    _legend(ax)
    return _png(fig)


FIGURES = (("qkd_link", figure_qkd_link), ("rekeys", figure_rekeys),
           ("traffic", figure_traffic))


# --------------------------------------------------------------------- HTML

_CSS = """
body{font-family:sans-serif;margin:2em auto;max-width:1050px;color:#222}
h1{font-size:1.5em}h2{font-size:1.15em;margin-top:1.6em;border-bottom:1px solid #ccc}
table{border-collapse:collapse;margin:.5em 0}td,th{border:1px solid #ccc;padding:.2em .6em;
text-align:left;font-size:.9em}th{background:#f3f3f3}td.n{text-align:right}
img{max-width:100%;border:1px solid #ddd}.bad{color:#b00}.ok{color:#070}
code{font-family:monospace}
"""


def _e(v: Any) -> str:
    return html.escape("-" if v is None else str(v))


def _table(head: Iterable[str], rows: Iterable[Iterable[Any]]) -> str:
    out = ["<table><tr>" + "".join(f"<th>{_e(h)}</th>" for h in head) + "</tr>"]
    for r in rows:
        cells = []
        for v in r:
            cls = ' class="n"' if isinstance(v, (int, float)) and not isinstance(v, bool) else ""
            cells.append(f"<td{cls}>{_e(v)}</td>")
        out.append("<tr>" + "".join(cells) + "</tr>")
    return "".join(out) + "</table>"


def _ms(v: Any) -> str:
    return f"{v:.0f} ms" if isinstance(v, (int, float)) else "-"


def render_html(summary: Mapping[str, Any], pngs: Mapping[str, bytes]) -> str:
    s = summary
    cfg = s.get("config") or {}
    traffic = s.get("traffic") or {}
    started = s.get("started_at")
    when = time.strftime("%Y-%m-%d %H:%M:%S UTC", time.gmtime(started)) \
        if isinstance(started, (int, float)) else "-"
    lat = s.get("rekey_latency_ms") or {}
    ok = not (s.get("error") or s.get("interrupted"))
    parts = [
        "<!DOCTYPE html><html lang=\"en\"><head><meta charset=\"utf-8\">",
        "<title>qkdgate demo report</title>",
        f"<style>{_CSS}</style></head><body>",
        "<h1>qkdgate demo report</h1>",
        f"<p>Started {_e(when)}, kernel <code>{_e(s.get('kernel'))}</code>, policy "
        f"<code>{_e(cfg.get('policy'))}</code>, rekey every {_e(cfg.get('rekey_interval'))} s, "
        f"{_e(cfg.get('rate'))} datagrams/s per stream. "
        f"<span class=\"{'ok' if ok else 'bad'}\">"
        f"{'completed' if ok else _e(s.get('error') or 'interrupted')}</span></p>",
        "<h2>Numbers</h2>",
        _table(("what", "value"), [
            ("duration (s)", s.get("duration")),
            ("set-up (s)", s.get("setup_seconds")),
            ("rekeys", s.get("rekeys")),
            ("rekey latency p50", _ms(lat.get("p50"))),
            ("rekey latency p99", _ms(lat.get("p99"))),
            ("datagrams sent", traffic.get("sent")),
            ("datagrams received", traffic.get("received")),
            ("datagrams lost", traffic.get("lost")),
            ("alarms", len(s.get("alarms") or [])),
            ("policy actions", len(s.get("policy_actions") or [])),
        ]),
        "<h2>Figures</h2>",
    ]
    captions = {"qkd_link": "QBER and key pool of the simulated QKD link",
                "rekeys": "Rekey latency per generation",
                "traffic": "Datagrams sent and lost per second"}
    for name, data in pngs.items():
        b64 = base64.b64encode(data).decode("ascii")
        parts.append(f"<figure><img alt=\"{_e(captions.get(name, name))}\" "
                     f"src=\"data:image/png;base64,{b64}\"><figcaption>"
                     f"{_e(captions.get(name, name))} (<code>{_e(name)}.png</code>)"
                     "</figcaption></figure>")
    parts.append("<h2>Alarms</h2>")
    parts.append(_table(("t (s)", "source", "alarm", "QBER"),
                        [(a.get("t"), a.get("source"), a.get("alarm"),
                          f"{a['qber']:.1%}" if isinstance(a.get("qber"), (int, float)) else "-")
                         for a in s.get("alarms") or []]))
    parts.append("<h2>Policy actions</h2>")
    parts.append(_table(("t (s)", "gateway", "tunnel", "action", "detail"),
                        [(a.get("t"), a.get("gateway"), a.get("tunnel"), a.get("action"),
                          a.get("detail")) for a in s.get("policy_actions") or []]))
    parts.append("<h2>Traffic by phase</h2>")
    rows = []
    for name, c in sorted((traffic.get("streams") or {}).items()):
        for phase, r in (c.get("by_phase") or {}).items():
            rows.append((name, phase, r.get("sent"), r.get("received"), r.get("lost")))
    parts.append(_table(("stream", "phase", "sent", "received", "lost"), rows))
    ks = s.get("key_service")
    if ks:
        parts.append("<h2>Key service (ETSI 014 and SKIP)</h2>")
        parts.append(f"<p>{_e(' and '.join(ks.get('applications') or []))} fetched keys from "
                     f"pool <code>{_e(ks.get('pool'))}</code> every {_e(ks.get('period'))} s: "
                     "served = both sides got the same key; refused = no key "
                     "(503 / SKIP error); fetch refused = served at gw-a, not found at gw-b.</p>")
        ks_rows: list[tuple[Any, ...]] = []
        for api, a in sorted((ks.get("apis") or {}).items()):
            for phase, r in (a.get("by_phase") or {}).items():
                ks_rows.append((api, phase, r.get("served"), r.get("refused"),
                                r.get("fetch_refused"), r.get("mismatch"), r.get("errors"),
                                r.get("single_source")))
        parts.append(_table(("API", "phase", "served", "refused", "fetch refused", "mismatch",
                             "no answer", "single-source"), ks_rows))
    parts.append("<h2>Generations</h2>")
    rows = []
    for key, t in sorted((s.get("tunnels") or {}).items()):
        for g in t.get("generations") or []:
            ids = ",".join(str(i)[:8] for i in g.get("qkd_key_ids") or [])
            inputs = "+".join(x for x in (g.get("kem"), "X25519" if g.get("x25519") else None,
                                          f"QKD[{ids}]" if ids else "no QKD") if x)
            rows.append((key, g.get("generation"), g.get("t"), inputs, g.get("outbound_spi")))
    parts.append(_table(("gateway/tunnel", "generation", "t (s)", "key inputs",
                         "outbound SPI"), rows))
    parts.append("<p>Every number behind the figures is in <code>summary.json</code> "
                 "(<code>timeline</code>).</p></body></html>\n")
    return "".join(parts)


def write_report(summary: Mapping[str, Any], folder: Path) -> ReportFiles:
    """Figures, HTML page and JSON summary of one run, into ``folder``."""
    folder.mkdir(parents=True, exist_ok=True)
    pngs = {name: draw(summary) for name, draw in FIGURES}
    figures = {}
    for name, data in pngs.items():
        path = folder / f"{name}.png"
        path.write_bytes(data)
        figures[name] = path
    page = folder / "report.html"
    page.write_text(render_html(summary, pngs), encoding="utf-8")
    js = folder / "summary.json"
    js.write_text(json.dumps(summary, indent=2, sort_keys=True, default=str) + "\n",
                  encoding="utf-8")
    return ReportFiles(page, js, figures)
