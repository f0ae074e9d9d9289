"""The run report (gateway/demo/report.py) from a recorded timeline: PNG
figures of a real size with real content, an HTML page that opens offline
(everything embedded, nothing fetched), and a JSON summary that keeps every
number behind the plots."""

from __future__ import annotations

import html
import json
import struct
from html.parser import HTMLParser

import pytest

from qkdgate.gateway.demo.report import FIGURES, per_second, render_html, write_report
from qkdgate.gateway.demo.view import Recorder
from qkdgate.gateway.telemetry.events import RekeyDone
from qkdgate.tunnels.events import KeyInputs, PolicyFallback, PolicyRecovered, SaSwitched

IDS = ["6f1c3a52-1b9e-4c51-9d36-54a1f1d0c0aa", "0c2b8e55-0d6b-4f3f-8a0a-2f14b9e6e7b1"]


class Clock:
    def __init__(self) -> None:
        self.t = 100.0

    def __call__(self) -> float:
        return self.t


def link(qber, stored, alarms=()):
    return {"kmes": ["KME-A", "KME-B"], "qber": qber, "stored_keys": stored,
            "max_key_count": 1000, "secret_key_rate_bps": 9000.0 if not alarms else 0.0,
            "alarms": list(alarms), "up": True}


def recorded_run():
    """60 s of a pqc-fallback run: eavesdropper from 20 s to 35 s, fallback
    at 23 s, recovery at 41 s; one look at the link every 2 s; 100
    datagrams/s with the ones sent from 22 s to 24 s lost."""
    clk = Clock()
    rec = Recorder(clock=clk, wall=lambda: 1.7e9)
    clk.t += 12.0
    rec.start_clock()
    t0 = clk.t
    rec.eavesdropper("before")
    gen = 0
    for step in range(31):
        clk.t = t0 + 2.0 * step
        el = clk.t - t0
        if el == 20.0:
            rec.eavesdropper("on")
            rec.alarm("QKD link KME-A-KME-B", "QBER_ABOVE_THRESHOLD", 0.16)
        if el == 36.0:
            rec.eavesdropper("after")
        eve = 20.0 <= el < 36.0
        rec.link_sample(link(0.16 if eve else 0.03, 900 - 5 * step,
                             ("QBER_ABOVE_THRESHOLD",) if eve else ()))
        if step % 2 == 0 and step:
            gen += 1
            qkd = not (22.0 <= el < 40.0)
            for gw, lat in (("gw-a", 30.0 + step), ("gw-b", 45.0 + step)):
                rec.on_event(gw, SaSwitched("lan", gen, 0xC0DE0000 + gen, KeyInputs(), gen - 1))
                rec.on_event(gw, RekeyDone("x", "lan", gen, KeyInputs(
                    "ML-KEM-768", True, (IDS[gen % 2],) if qkd else ()), lat, "timer"))
            if el == 24.0:
                rec.on_event("gw-a", PolicyFallback("lan", "pqc-fallback", gen, "QKD unavailable"))
            if el == 40.0:
                rec.on_event("gw-a", PolicyRecovered("lan", "pqc-fallback", gen))
    sent_at = [t0 + i / 100 for i in range(6000)]
    received = {i for i in range(6000) if not 2200 <= i < 2400}
    ps = {"hA->hB": per_second(sent_at, received, t0, t0 + 60.0)}
    traffic = {"sent": 6000, "received": 5800, "lost": 200, "streams": {"hA->hB": {
        "sent": 6000, "received": 5800, "lost": 200,
        "by_phase": {"before eavesdropper": {"sent": 2000, "received": 2000, "lost": 0},
                     "eavesdropper, PQC fallback": {"sent": 1600, "received": 1400,
                                                    "lost": 200}}}}}
    return rec.summary(traffic=traffic, config={"policy": "pqc-fallback", "rekey_interval": 3.0,
                                                "rate": 100}, kernel="6.1.0-test", link=None,
                       cleanup={"namespaces_left": [], "errors": []}, per_second=ps)


def test_per_second_counts_sent_and_lost_in_each_second():
    sent_at = [10.0, 10.5, 11.2, 12.9, 12.95]
    got = per_second(sent_at, {0, 2, 4}, 10.0, 13.0)
    assert got == {"t": [0.0, 1.0, 2.0], "sent": [2.0, 1.0, 2.0], "lost": [1.0, 0.0, 1.0]}
    assert per_second([], set(), 5.0, 5.0) == {"t": [], "sent": [], "lost": []}


def test_the_timeline_keeps_every_number_behind_the_plots():
    tl = recorded_run()["timeline"]
    assert len(tl["link"]) == 31
    assert tl["link"][10] == {"t": 20.0, "qber": 0.16, "stored_keys": 850.0, "max_keys": 1000.0,
                              "key_rate_bps": 0.0, "alarms": ["QBER_ABOVE_THRESHOLD"]}
    assert tl["eavesdropper"] == [[20.0, 36.0]]
    assert [(a["action"], a["t"]) for a in tl["policy_actions"]] == \
        [("fallback", 24.0), ("recovery", 40.0)]
    assert len(tl["rekeys"]) == 30 and tl["rekeys"][0] == {
        "t": 4.0, "tunnel": "gw-a/lan", "generation": 1, "latency_ms": 32.0, "qkd": True}
    assert sum(1 for r in tl["rekeys"] if not r["qkd"]) == 2 * 4
    ps = tl["traffic_per_second"]["hA->hB"]
    assert len(ps["t"]) == 60 and sum(ps["sent"]) == 6000 and sum(ps["lost"]) == 200
    assert ps["lost"][22] == 100 and ps["lost"][23] == 100 and ps["lost"][21] == 0


def png_size(data: bytes) -> tuple[int, int]:
    assert data[:8] == b"\x89PNG\r\n\x1a\n"
    assert data[12:16] == b"IHDR"
    w, h = struct.unpack(">II", data[16:24])
    return w, h


class Page(HTMLParser):
    def __init__(self):
        super().__init__()
        self.refs: list[tuple[str, str, str]] = []
        self.tags: list[str] = []

    def handle_starttag(self, tag, attrs):
        self.tags.append(tag)
        for k, v in attrs:
            if k in ("src", "href", "srcset", "poster", "data"):
                self.refs.append((tag, k, v or ""))


def test_report_writes_non_empty_figures_an_offline_page_and_the_summary(tmp_path):
    from matplotlib.image import imread
    summary = recorded_run()
    files = write_report(summary, tmp_path / "report")
    assert set(files.figures) == {name for name, _ in FIGURES} == \
        {"qkd_link", "rekeys", "traffic"}
    for name, path in files.figures.items():
        data = path.read_bytes()
        w, h = png_size(data)
        assert (w, h) in ((1000, 400), (1000, 600)), (name, w, h)
        assert len(data) > 15_000, (name, len(data))
        px = imread(str(path))
        # not a blank canvas: many distinct colours, and ink (dark pixels) and colour
        # (the red eavesdropper shading, the lines) on a white background
        flat = (px[..., :3] * 255).astype(int).reshape(-1, 3)
        colours = {tuple(c) for c in flat[:: max(1, len(flat) // 20000)]}
        assert len(colours) > 50, (name, len(colours))
        assert (flat.sum(axis=1) < 200).mean() > 0.002, name          # text, axes
        if name != "rekeys":
            reddish = (flat[:, 0] > 200) & (flat[:, 1] < 235) & (flat[:, 2] < 235) & \
                (flat[:, 0] - flat[:, 2] > 15)
            assert reddish.mean() > 0.01, name                        # the eavesdropper window
    page = files.html.read_text()
    parser = Page()
    parser.feed(page)
    assert parser.tags.count("img") == 3
    assert "script" not in parser.tags and "link" not in parser.tags
    assert all(v.startswith("data:image/png;base64,") for _t, _k, v in parser.refs), parser.refs
    assert "http://" not in page and "https://" not in page and "@import" not in page
    assert "url(" not in page
    assert "QBER_ABOVE_THRESHOLD" in page and "fallback" in page and "recovery" in page
    assert "QKD[6f1c3a52]" in page and IDS[0] not in page      # key_IDs as prefixes only
    assert json.loads(files.summary.read_text()) == json.loads(json.dumps(summary))


def test_report_of_a_run_that_failed_before_traffic(tmp_path):
    # A failed set-up still yields a report: empty figures, the error on top.
    rec = Recorder(clock=Clock(), wall=lambda: 1.7e9)
    s = rec.summary(traffic={"sent": 0, "received": 0, "lost": 0}, config={}, kernel="6.1",
                    link=None, cleanup={})
    s["error"] = "QkdgateError: the tunnels did not come up within 120 s"
    files = write_report(s, tmp_path)
    for path in files.figures.values():
        assert png_size(path.read_bytes())[0] == 1000
    assert "did not come up" in files.html.read_text()


@pytest.mark.parametrize("bad", ["<script>alert(1)</script>", "\"><img src=http://x>"])
def test_report_escapes_what_it_prints(bad):
    s = recorded_run()
    s["error"] = bad
    page = render_html(s, {})
    assert bad not in page and "<script" not in page and "<img src=http" not in page
    assert html.escape(bad) in page
