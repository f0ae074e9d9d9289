"""Draw the live dashboard (gateway/telemetry/dashboard.py) as a PNG, for docs/.

    .venv/bin/python tools/dashboard_screenshot.py docs/demo-dashboard.png

The screen is rendered by rich exactly as a terminal shows it (140 columns)
from a demo snapshot taken during the eavesdropper phase of a pqc-fallback
run, and each styled cell is drawn in a monospace font with matplotlib's Agg
canvas (no terminal, no browser needed)."""

from __future__ import annotations

import sys

from matplotlib.backends.backend_agg import FigureCanvasAgg
from matplotlib.figure import Figure
from rich.console import Console
from rich.terminal_theme import MONOKAI

from qkdgate.gateway.demo.view import dashboard_view
from qkdgate.gateway.telemetry.dashboard import Dashboard

WIDTH = 140
BG, FG = "#1e1e1e", "#d4d4d4"
IDS = ("6f1c3a52-1b9e-4c51-9d36-54a1f1d0c0aa", "0c2b8e55-0d6b-4f3f-8a0a-2f14b9e6e7b1")


def tunnel(gen: int, state: str, fallback: bool, qkd: str | None, spis: tuple[str, str],
           age: float, nxt: float) -> dict[str, object]:
    inputs = {"kem": "ML-KEM-768", "x25519": True, "qkd_key_ids": [qkd] if qkd else []}
    return {"tunnel": "lan", "type": "ipsec", "state": state, "fallback": fallback,
            "generation": gen, "inputs": inputs, "sa_age": age, "next_rekey_in": nxt,
            "generations": [{"generation": gen, "active": True, "inputs": inputs,
                             "sas": [{"direction": "out", "spi": spis[0]},
                                     {"direction": "in", "spi": spis[1]}]}]}


def snapshots() -> list[dict[str, object]]:
    out = []
    for i in range(12):
        eve = i >= 8
        t = 2.0 * i + 6.0
        link = {"kmes": ["KME-A", "KME-B"], "stored_keys": 1000 - 23 * i,
                "max_key_count": 1000, "qber": 0.141 if eve else 0.031 + 0.002 * (i % 3),
                "secret_key_rate_bps": 0.0 if eve else 9100.0 + 150 * (i % 4),
                "alarms": ["QBER_ABOVE_THRESHOLD"] if eve else []}
        gws = {"gw-a": {"uptime": 40 + t, "tunnels": [tunnel(
                   8, "up", eve, None if eve else IDS[0], ("0x9f00d1e2", "0xc3e1a2b4"), 1.1,
                   1.9)]},
               "gw-b": {"uptime": 41 + t, "tunnels": [tunnel(
                   8, "up", eve, None if eve else IDS[0], ("0xc3e1a2b4", "0x9f00d1e2"), 1.0,
                   2.0)]}}
        recent = []
        if i == 8:
            recent = ["  20.1s eavesdropper ON: intercept-resend on 50% of photons",
                      "  20.1s ALARM QBER_ABOVE_THRESHOLD on QKD link KME-A-KME-B (QBER 14.1%)",
                      "  21.6s POLICY gw-a/lan: fallback: PQC-only (ML-KEM + X25519) from "
                      "generation 8",
                      "  21.7s POLICY gw-b/lan: fallback: PQC-only (ML-KEM + X25519) from "
                      "generation 8"]
        out.append({"t": t, "policy": "pqc-fallback", "eavesdropper": eve,
                    "remaining": 60 - t, "link": link, "gateways": gws,
                    "rekeys": {"gw-a/lan": 8, "gw-b/lan": 8},
                    "latency": {"gw-a/lan": 412.0, "gw-b/lan": 398.0},
                    "traffic": {"hA->hB": {"sent": 100 * int(t), "received": 100 * int(t),
                                           "lost": 0, "window": 2, "window_sent": 201,
                                           "window_received": 201},
                                "hB->hA": {"sent": 100 * int(t) - 2,
                                           "received": 100 * int(t) - 3, "lost": 1,
                                           "window": 2, "window_sent": 201,
                                           "window_received": 200}},
                    "recent": recent})
    return out


def main(path: str) -> None:
    dash = Dashboard("qkdgate demo")
    for snap in snapshots():
        dash.update(dashboard_view(snap))
    console = Console(width=WIDTH, color_system="truecolor", force_terminal=True,
                      legacy_windows=False)
    lines = console.render_lines(dash.render(), console.options, pad=False)
    cw, lh = 0.6 * 11 / 72, 1.3 * 11 / 72          # cell width and line height (inches)
    fig = Figure(figsize=(WIDTH * cw + 0.4, len(lines) * lh + 0.4), dpi=100, facecolor=BG)
    FigureCanvasAgg(fig)
    w, h = fig.get_size_inches()
    for row, segments in enumerate(lines):
        col = 0
        y = 1 - (0.2 + (row + 0.8) * lh) / h
        for seg in segments:
            text, style = seg.text, seg.style
            if text.strip():
                colour = FG
                if style is not None and style.color is not None:
                    colour = style.color.get_truecolor(MONOKAI).hex
                weight = "bold" if style is not None and style.bold else "normal"
                fig.text((0.2 + col * cw) / w, y, text, family="DejaVu Sans Mono", size=11,
                         color=colour, weight=weight)
            col += len(text)
    fig.savefig(path, dpi=100, facecolor=BG)


if __name__ == "__main__":
    main(sys.argv[1] if len(sys.argv) > 1 else "docs/demo-dashboard.png")
