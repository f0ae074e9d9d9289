"""The live dashboard (gateway/telemetry/dashboard.py) rendered to text at a
fixed size, as an operator would see it, and qkdgate top's change lines."""

from __future__ import annotations

import io

import pytest
from rich.console import Console

from qkdgate.gateway.cli.top import Watcher
from qkdgate.gateway.telemetry.dashboard import SPARK, Dashboard, qkd_links, sparkline

KID = "6f1c2a4e-1c3b-4f5a-9d2e-0a1b2c3d4e5f"


def tunnel(name="t1", state="up", gen=4, fallback=False, qkd=True, kind="ipsec"):
    inputs = {"kem": "ML-KEM-768", "x25519": True, "qkd_key_ids": [KID] if qkd else []}
    return {"tunnel": name, "type": kind, "state": state, "generation": gen,
            "fallback": fallback, "sa_age": 12.4, "next_rekey_in": 1.6,
            "hard_expiry_in": 47.0, "inputs": inputs, "last_error": None,
            "generations": [{"generation": gen, "active": True, "inputs": inputs,
                             "sas": [{"direction": "out", "spi": "0x1a2b3c4d"},
                                     {"direction": "in", "spi": "0x5e6f7a8b"}]}]}


def view(t, qber, pool, *, blocked=False, recent=()):
    return {"title": "qkdgate demo", "t": t, "policy": "pqc-fallback", "eavesdropper": blocked,
            "remaining": 60 - t,
            "gateways": {"gw-a": {"uptime": 30, "tunnels": [
                tunnel(state="blocked" if blocked else "up")]},
                "gw-b": {"uptime": 31, "tunnels": [tunnel(fallback=blocked, qkd=not blocked)]}},
            "links": [{"name": "KME-A-KME-B", "stored_keys": pool, "max_keys": 1000,
                       "qber": qber, "key_rate_bps": 9200.0 if qber < 0.08 else 0.0,
                       "alarms": ["qber_above_threshold"] if qber > 0.08 else [],
                       "up": qber < 0.08}],
            "rekeys": {"gw-a/t1": 4, "gw-b/t1": 4}, "latency": {"gw-a/t1": 38.4},
            "traffic": {"hA->hB": {"sent": 1000, "received": 990, "lost": 10, "window": 2,
                                   "window_sent": 200, "window_received": 200 if not blocked
                                   else 0}},
            "recent": list(recent)}


def text_of(dash: Dashboard, width: int = 140) -> str:
    console = Console(record=True, width=width, file=io.StringIO(), color_system=None)
    console.print(dash.render())
    return console.export_text()


def test_sparkline_scales_and_keeps_the_last_values():
    assert sparkline([]) == ""
    assert sparkline([0, 1], low=0, high=1) == SPARK[0] + SPARK[-1]
    assert sparkline([5, 5, 5]) == SPARK[0] * 3          # flat: bottom, no division by 0
    assert sparkline(range(100), width=10) == sparkline(range(90, 100))
    assert sparkline([0.5], low=0, high=0.25) == SPARK[-1]   # clipped, never out of range


def test_dashboard_renders_tunnels_link_traffic_and_alarms_at_a_fixed_size():
    dash = Dashboard()
    for i, (q, pool) in enumerate([(0.03, 900), (0.031, 880), (0.029, 860)]):
        dash.update(view(2.0 * i, q, pool))
    dash.update(view(8.0, 0.16, 850, blocked=True, recent=[
        "   8.0s ALARM qber_above_threshold on QKD link KME-A-KME-B (QBER 16.0%)",
        "   8.1s POLICY gw-a/t1: block: traffic blocked: QKD link alarm"]))
    text = text_of(dash)
    lines = text.splitlines()
    assert lines[0].startswith("qkdgate demo  t=8.0s  policy pqc-fallback  eavesdropper ON")
    assert all(len(line) <= 140 for line in lines)
    row_a = next(line for line in lines if line.lstrip().startswith("gw-a"))
    row_b = next(line for line in lines if line.lstrip().startswith("gw-b"))
    assert "BLOCKED" in row_a and "t1" in row_a and "ipsec" in row_a
    assert "UP PQC-only" in row_b and "no QKD" in row_b and "ML-KEM-768+X25519" in row_b
    assert "out 0x1a2b3c4d in 0x5e6f7a8b" in row_b
    assert "38 ms" in row_a
    # the QKD link: pool of max, QBER with its history as a sparkline, alarm
    link = next(line for line in lines if line.lstrip().startswith("KME-A-KME-B"))
    assert "850/1000" in link and "16.0%" in link and "qber_above_threshold" in link
    assert "0.0 kbit/s" in link
    spark = sparkline([0.03, 0.031, 0.029, 0.16], low=0, high=0.25)
    assert spark in link and spark[-1] != spark[0]
    # traffic: nothing through in the window while blocked
    assert any(line.lstrip().startswith("hA->hB") and "0/200 in 2s" in line for line in lines)
    assert "ALARM qber_above_threshold on QKD link KME-A-KME-B" in text
    assert "POLICY gw-a/t1: block" in text
    # key_IDs appear only as 8-digit prefixes
    assert "6f1c2a4e" in text and KID not in text


def test_dashboard_keeps_only_the_latest_alarm_lines():
    dash = Dashboard()
    for i in range(20):
        dash.update({"recent": [f"line {i}"]})
    text = text_of(dash)
    assert "line 19" in text and "line 12" in text and "line 11" not in text
    assert "no tunnels" in text


def test_dashboard_shows_a_gateway_that_did_not_answer():
    dash = Dashboard()
    dash.update({"gateways": {"gw-a": None}})
    assert "no answer" in text_of(dash)


class FakeDaemon:
    def __init__(self):
        self.status = {"gateway": "gw-a", "uptime": 5, "tunnels": [tunnel()]}
        self.links = [{"source": "kme", "stored_key_count": 500, "max_key_count": 1000,
                       "qber": 0.03, "link_up": True, "alarms": []}]

    def ask(self, cmd):
        return self.status if cmd == "status" else {"links": self.links}


def test_top_reports_what_changed_between_two_looks():
    d = FakeDaemon()
    now = [100.0]
    w = Watcher(d.ask, clock=lambda: now[0])
    first = w.look()
    assert first["recent"] == [] and first["title"] == "qkdgate top  gw-a"
    assert first["links"] == qkd_links(d.links)
    now[0] = 103.0
    d.status = {**d.status, "tunnels": [tunnel(state="blocked", gen=4)]}
    d.status["tunnels"][0]["last_error"] = "QKD link alarm: qber_above_threshold"
    d.links = [{**d.links[0], "qber": 0.25, "link_up": True, "alarms": ["qber_above_threshold"]}]
    second = w.look()
    assert second["recent"] == [
        "   3.0s POLICY gw-a/t1: up -> blocked (QKD link alarm: qber_above_threshold)",
        "   3.0s ALARM qber_above_threshold on kme (QBER 25.0%)"]
    now[0] = 110.0
    d.status = {**d.status, "tunnels": [tunnel(state="up", gen=5, fallback=True, qkd=False)]}
    d.links = [{**d.links[0], "qber": 0.03, "alarms": []}]
    third = w.look()
    assert third["recent"] == ["  10.0s POLICY gw-a/t1: blocked -> up",
                               "  10.0s POLICY gw-a/t1: fallback: PQC-only (ML-KEM + X25519)",
                               "  10.0s kme: QKD link alarms cleared"]
    dash = Dashboard()
    for v in (first, second, third):
        dash.update(v)
    text = text_of(dash)
    assert "kme" in text and "500/1000" in text and "UP PQC-only" in text


def test_top_works_with_a_daemon_without_the_qkd_query():
    from qkdgate.gateway.daemon.control import ControlError
    d = FakeDaemon()

    def ask(cmd):
        if cmd == "qkd":
            raise ControlError("unknown command 'qkd'", "bad_request")
        return d.ask(cmd)
    v = Watcher(ask).look()
    assert v["links"] == [] and v["gateways"]["gw-a"] is d.status

    def down(cmd):
        raise ControlError("nothing listens", "unreachable")
    with pytest.raises(ControlError):
        Watcher(down).look()


def test_key_id_prefixes_and_names_are_printed_literally():
    # rich reads "[ab12cd34]" in a plain string as a markup tag and drops it
    dash = Dashboard()
    st = tunnel()
    st["inputs"]["qkd_key_ids"] = ["ab12cd34-0000-4000-8000-000000000000", "b0ld"]
    st["tunnel"] = "[bold]t1"
    dash.update({"gateways": {"gw-a": {"tunnels": [st]}},
                 "links": [{"name": "[red]kme", "stored_keys": 1, "alarms": ["[x]"]}]})
    text = text_of(dash, width=160)
    assert "QKD[ab12cd34,b0ld]" in text and "[bold]t1 (ipsec)" in text
    assert "[red]kme" in text and "[x]" in text
