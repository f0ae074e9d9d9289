"""The gauges an operator alerts on: the QKD link from every KME status poll,
and tunnel state read from the daemon's status at scrape time."""

from __future__ import annotations

import pytest
from prometheus_client.parser import text_string_to_metric_families

from qkdgate.gateway.telemetry.events import QkdStatus
from qkdgate.gateway.telemetry.metrics import Metrics


def _samples(m: Metrics) -> dict[tuple[str, tuple], float]:
    out = {}
    for fam in text_string_to_metric_families(m.exposition().decode()):
        for s in fam.samples:
            out[(s.name, tuple(sorted(s.labels.items())))] = s.value
    return out


def test_qkd_status_poll_sets_the_link_gauges():
    m = Metrics()
    m.handle_event(QkdStatus("gw-b", "kme", 40, 1000, 0.031, True, ()))
    s = _samples(m)
    assert s[("qkdgate_qkd_stored_keys", (("source", "kme"),))] == 40
    assert s[("qkdgate_qkd_max_keys", (("source", "kme"),))] == 1000
    assert s[("qkdgate_qkd_qber", (("source", "kme"),))] == pytest.approx(0.031)
    assert s[("qkdgate_qkd_link_up", (("source", "kme"),))] == 1
    # An alarm with the link still "up" counts as down for the gauge; fields
    # the KME left out keep their last value.
    m.handle_event(QkdStatus("gw-b", "kme", None, None, 0.25, True, ("qber_above_threshold",)))
    s = _samples(m)
    assert s[("qkdgate_qkd_link_up", (("source", "kme"),))] == 0
    assert s[("qkdgate_qkd_qber", (("source", "kme"),))] == pytest.approx(0.25)
    assert s[("qkdgate_qkd_stored_keys", (("source", "kme"),))] == 40


def test_tunnel_state_gauges_follow_the_daemon_status_at_scrape_time():
    m = Metrics()
    assert not [k for k in _samples(m) if k[0] == "qkdgate_tunnel_up"]   # nothing bound
    status = {"tunnels": [
        {"tunnel": "t1", "state": "up", "sa_age": 12.5, "hard_expiry_in": 47.5,
         "next_rekey_in": 3.0},
        {"tunnel": "m1", "state": "blocked", "sa_age": None, "hard_expiry_in": None,
         "next_rekey_in": None}]}
    m.watch_status(lambda: status)
    s = _samples(m)
    assert s[("qkdgate_tunnel_up", (("tunnel", "t1"),))] == 1
    assert s[("qkdgate_tunnel_up", (("tunnel", "m1"),))] == 0
    assert s[("qkdgate_tunnel_state", (("state", "blocked"), ("tunnel", "m1")))] == 1
    assert s[("qkdgate_tunnel_state", (("state", "up"), ("tunnel", "m1")))] == 0
    assert s[("qkdgate_tunnel_hard_expiry_seconds", (("tunnel", "t1"),))] == 47.5
    assert s[("qkdgate_tunnel_sa_age_seconds", (("tunnel", "t1"),))] == 12.5
    assert ("qkdgate_tunnel_hard_expiry_seconds", (("tunnel", "m1"),)) not in s
    status["tunnels"][1]["state"] = "up"      # read again at the next scrape
    assert _samples(m)[("qkdgate_tunnel_state", (("state", "blocked"), ("tunnel", "m1")))] == 0
