"""The demo's output: piped or --plain, the same status lines as before
(tests/kernel/test_demo.py reads them); on a terminal, the live dashboard.
And the --report / --plain options reach the demo inside the lab VM."""

from __future__ import annotations

import io

from qkdgate.gateway.demo import command as demo
from qkdgate.gateway.demo.view import LiveView, PlainView, dashboard_view, make_view, render

SNAP = {"t": 12.0, "policy": "pqc-fallback", "eavesdropper": True, "remaining": 40.0,
        "link": {"kmes": ["KME-A", "KME-B"], "stored_keys": 640, "max_key_count": 1000,
                 "qber": 0.16, "secret_key_rate_bps": 0.0, "alarms": ["QBER_ABOVE_THRESHOLD"]},
        "gateways": {"gw-a": {"tunnels": [{"tunnel": "lan", "type": "ipsec", "state": "up",
                                           "fallback": True, "generation": 7,
                                           "inputs": {"kem": "ML-KEM-768", "x25519": True,
                                                      "qkd_key_ids": []}}]}},
        "rekeys": {"gw-a/lan": 7}, "latency": {"gw-a/lan": 41.0},
        "traffic": {"hA->hB": {"sent": 1200, "received": 1100, "lost": 100, "window": 2,
                               "window_sent": 200, "window_received": 200}},
        "recent": ["  10.0s POLICY gw-a/lan: fallback: PQC-only (ML-KEM + X25519) from "
                   "generation 7"]}


class Tty(io.StringIO):
    def isatty(self) -> bool:
        return True


def test_piped_and_plain_output_are_the_status_lines():
    for out, plain in ((io.StringIO(), False), (Tty(), True)):
        with make_view(out, plain=plain) as view:
            assert isinstance(view, PlainView)
            view.say("demo: tunnel up")
            view.show(SNAP)
        assert out.getvalue() == "demo: tunnel up\n" + render(SNAP) + "\n"
        assert "\x1b[" not in out.getvalue()      # no terminal control codes


def test_on_a_terminal_the_dashboard_is_drawn():
    out = Tty()
    with make_view(out, plain=False) as view:
        assert isinstance(view, LiveView)
        view.say("demo: tunnel up")
        view.show(SNAP)
    text = out.getvalue()
    assert "demo: tunnel up" in text
    for part in ("qkdgate demo", "PQC-only", "KME-A-KME-B", "640/1000", "16.0%",
                 "QBER_ABOVE_THRESHOLD", "hA->hB", "POLICY gw-a/lan: fallback"):
        assert part in text, part


def test_dashboard_view_of_a_demo_snapshot():
    v = dashboard_view(SNAP)
    assert v["links"] == [{"name": "KME-A-KME-B", "stored_keys": 640, "max_keys": 1000,
                           "qber": 0.16, "key_rate_bps": 0.0,
                           "alarms": ["QBER_ABOVE_THRESHOLD"], "up": False}]
    assert v["gateways"] is SNAP["gateways"] and v["recent"] == SNAP["recent"]
    assert "links" not in dashboard_view({"t": 1.0})


def test_report_and_plain_reach_the_demo_in_the_vm():
    parse = demo_parser()
    a = parse.parse_args(["--report", "/x/rep", "--plain"])
    inner = parse.parse_args(demo.vm_argv(a, "/lab/s.json", "/lab/d.log", "/lab/report"))
    assert inner.report == "/lab/report" and inner.plain
    b = parse.parse_args([])
    inner = parse.parse_args(demo.vm_argv(b, "/lab/s.json", "/lab/d.log", "/lab/report"))
    assert inner.report is None and not inner.plain
    assert demo.options(a).plain and not demo.options(b).plain


def demo_parser():
    import argparse
    p = argparse.ArgumentParser()
    demo.add_arguments(p)
    return p
