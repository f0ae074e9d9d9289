"""The shipped monitoring (monitoring/): alert rules checked and unit-tested by
promtool (Debian's prometheus package, tools/apt-packages.txt), and every
metric name in the rules and the Grafana dashboard is one qkdgate exports.
Missing promtool is a failure, not a skip: it is a declared dependency."""

from __future__ import annotations

import json
import re
import shutil
import subprocess
from pathlib import Path

import pytest

from qkdgate.gateway.telemetry.metrics import Metrics

ROOT = Path(__file__).resolve().parents[2]
MON = ROOT / "monitoring"
# Series Prometheus itself makes: the scrape's health and the alert state.
PROMETHEUS_OWN = {"up", "ALERTS", "ALERTS_FOR_STATE"}
_NAME = re.compile(r"\b(qkdgate_[a-z0-9_]+|up|ALERTS)\b")


def promtool() -> str:
    path = shutil.which("promtool")
    if path is None:
        pytest.fail("promtool not found: install Debian's prometheus package "
                    "(tools/apt-packages.txt; tools/bootstrap.sh does)")
    return path


def run_promtool(*args: str) -> subprocess.CompletedProcess[str]:
    return subprocess.run([promtool(), *args], cwd=MON, capture_output=True, text=True,
                          timeout=120, check=False)


def exported_names() -> set[str]:
    """Every sample name a qkdgate /metrics page can carry."""
    names = set()
    for fam in Metrics().registry.collect():
        match fam.type:
            case "counter":
                names |= {fam.name + "_total", fam.name + "_created"}
            case "histogram":
                names |= {fam.name + s for s in ("_bucket", "_sum", "_count", "_created")}
            case "info":
                names.add(fam.name + "_info")
            case _:
                names.add(fam.name)
    return names


def test_alert_rules_are_valid():
    r = run_promtool("check", "rules", "alerts.yml")
    assert r.returncode == 0, r.stdout + r.stderr
    assert "SUCCESS: 7 rules found" in r.stdout


def test_alert_rules_unit_tests_pass():
    r = run_promtool("test", "rules", "alerts_test.yml")
    assert r.returncode == 0, r.stdout + r.stderr
    assert "SUCCESS" in r.stdout


def test_promtool_catches_a_wrong_rule(tmp_path):
    # The unit tests are not vacuous: with the QBER threshold moved to 30 %
    # the eavesdropper case (QBER 25 %) no longer fires and promtool fails.
    rules = (MON / "alerts.yml").read_text()
    assert "qkdgate_qkd_qber > 0.08" in rules
    (tmp_path / "alerts.yml").write_text(rules.replace("qkdgate_qkd_qber > 0.08",
                                                       "qkdgate_qkd_qber > 0.30"))
    shutil.copy(MON / "alerts_test.yml", tmp_path)
    r = subprocess.run([promtool(), "test", "rules", "alerts_test.yml"], cwd=tmp_path,
                       capture_output=True, text=True, timeout=120, check=False)
    assert r.returncode != 0
    assert "QkdgateQberHigh" in r.stdout + r.stderr


def test_example_prometheus_config_is_valid():
    r = run_promtool("check", "config", "prometheus.example.yml")
    assert r.returncode == 0, r.stdout + r.stderr


def test_every_alert_names_an_exported_metric():
    exported = exported_names() | PROMETHEUS_OWN
    rules = (MON / "alerts.yml").read_text()
    exprs = re.findall(r"^\s+expr: (.+(?:\n\s{10}.+)*)", rules, re.M)
    assert len(exprs) == 7
    for expr in exprs:
        used = set(_NAME.findall(expr))
        assert used, expr
        assert used <= exported, f"{expr}: unknown {used - exported}"


def test_every_dashboard_expression_names_an_exported_metric():
    exported = exported_names() | PROMETHEUS_OWN
    dash = json.loads((MON / "grafana-dashboard.json").read_text())
    exprs = [t["expr"] for p in dash["panels"] for t in p["targets"]]
    exprs += [a["expr"] for a in dash["annotations"]["list"]]
    exprs += [v["definition"] for v in dash["templating"]["list"] if "definition" in v]
    assert len(exprs) >= 15
    seen = set()
    for expr in exprs:
        used = set(_NAME.findall(expr))
        assert used, expr
        assert used <= exported, f"{expr}: unknown {used - exported}"
        seen |= used
    # The dashboard shows what the alerts watch.
    for name in ("qkdgate_tunnel_state", "qkdgate_qkd_qber", "qkdgate_qkd_stored_keys",
                 "qkdgate_policy_fallback_active", "qkdgate_tunnel_hard_expiry_seconds",
                 "qkdgate_rekey_failures_total"):
        assert name in seen
    ids = [p["id"] for p in dash["panels"]]
    assert len(ids) == len(set(ids))


def test_name_check_rejects_an_unknown_metric():
    exported = exported_names() | PROMETHEUS_OWN
    assert set(_NAME.findall("rate(qkdgate_rekeys_total[5m])")) <= exported
    assert not set(_NAME.findall("qkdgate_rekey_total > 0")) <= exported   # singular: a typo
