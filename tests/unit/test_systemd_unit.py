"""systemd/qkdgate.service: the directives the operations issue requires,
`systemd-analyze verify` clean, and `systemd-analyze security` exposure at
or below 2.5.

`verify` insists that every Exec*= binary exists. The unit names
/opt/qkdgate/bin/qkdgate (the README's installation); the test verifies a
copy whose paths point at the qkdgate entry point installed in the running
venv, which is the same program installed the same way (pip).
"""

from __future__ import annotations

import os
import re
import shutil
import subprocess
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[2]
UNIT = ROOT / "systemd" / "qkdgate.service"
INSTALLED = "/opt/qkdgate/bin/qkdgate"
MAX_EXPOSURE = 2.5

analyze = shutil.which("systemd-analyze")
needs_analyze = pytest.mark.skipif(analyze is None, reason="systemd-analyze not installed")


def directives(text: str) -> dict[str, list[str]]:
    """``Section.Key`` -> values in order (systemd allows repeated keys)."""
    out: dict[str, list[str]] = {}
    section = ""
    for raw in text.splitlines():
        line = raw.strip()
        if not line or line[0] in "#;":
            continue
        if line.startswith("["):
            section = line.strip("[]")
            continue
        key, _, value = line.partition("=")
        out.setdefault(f"{section}.{key.strip()}", []).append(value.strip())
    return out


def one(d: dict[str, list[str]], key: str) -> str:
    values = d.get(key)
    assert values, f"{key} missing"
    return values[-1]


def test_required_directives():
    d = directives(UNIT.read_text())
    assert one(d, "Service.Type") == "notify"      # systemd 252: no notify-reload
    assert one(d, "Service.NotifyAccess") == "main"
    assert re.fullmatch(r"\d+s", one(d, "Service.WatchdogSec"))
    assert one(d, "Service.Restart") == "on-failure"
    assert one(d, "Service.ExecReload") == """/bin/sh -c 'kill -HUP "$MAINPID"'"""
    assert one(d, "Service.ExecStart") == f"{INSTALLED} run --config /etc/qkdgate/qkdgate.yaml"
    assert one(d, "Service.ExecStartPre").startswith(f"{INSTALLED} check-config --check-files")
    assert one(d, "Service.ExecStopPost") == f"{INSTALLED} failsafe --systemd"
    for kind in ("Configuration", "State", "Runtime"):
        assert one(d, f"Service.{kind}Directory") == "qkdgate"
    assert one(d, "Service.UMask") == "0077"
    assert one(d, "Service.LimitCORE") == "0"
    assert one(d, "Service.CapabilityBoundingSet") == "CAP_NET_ADMIN"
    assert one(d, "Service.RestrictAddressFamilies").split() == [
        "AF_UNIX", "AF_INET", "AF_INET6", "AF_NETLINK"]
    assert "@system-service" in d["Service.SystemCallFilter"]
    for flag in ("NoNewPrivileges", "ProtectHome", "PrivateTmp", "ProtectKernelTunables",
                 "ProtectKernelModules", "ProtectControlGroups", "MemoryDenyWriteExecute",
                 "RestrictNamespaces", "LockPersonality", "RestrictSUIDSGID"):
        assert one(d, f"Service.{flag}") == "yes", flag
    assert one(d, "Service.ProtectSystem") == "strict"
    # A non-root User= would need AmbientCapabilities for netlink; the unit
    # deliberately runs as root with a one-capability bounding set.
    assert "Service.User" not in d and "Service.PrivateUsers" not in d


def _unit_for_this_host(tmp_path: Path, text: str | None = None) -> Path:
    exe = Path(sys.executable).with_name("qkdgate")
    if not exe.exists():
        pytest.fail(f"{exe} missing: install qkdgate into the venv first (pip install -e .)")
    text = (text if text is not None else UNIT.read_text()).replace(INSTALLED, str(exe))
    unit = tmp_path / "qkdgate.service"
    unit.write_text(text)
    return unit


def _analyze(*args: str, cwd: Path) -> subprocess.CompletedProcess:
    env = dict(os.environ, SYSTEMD_LOG_COLOR="0", SYSTEMD_COLORS="0", SYSTEMD_PAGER="")
    return subprocess.run([analyze, *args], cwd=cwd, capture_output=True, text=True,
                          timeout=60, env=env)


def _exposure(unit: Path) -> float:
    res = _analyze("security", "--offline=true", "--no-pager", unit.name, cwd=unit.parent)
    m = re.search(r"Overall exposure level for qkdgate\.service: (\d+\.\d+)", res.stdout)
    assert m, f"no exposure line in:\n{res.stdout}\n{res.stderr}"
    return float(m.group(1))


@needs_analyze
def test_verify_is_clean(tmp_path):
    unit = _unit_for_this_host(tmp_path)
    res = _analyze("verify", f"./{unit.name}", cwd=tmp_path)
    about_us = [ln for ln in (res.stdout + res.stderr).splitlines() if "qkdgate" in ln]
    assert res.returncode == 0 and not about_us, res.stdout + res.stderr


@needs_analyze
def test_verify_catches_a_broken_unit(tmp_path):
    # The check above would be worthless if verify stayed silent on errors.
    unit = _unit_for_this_host(tmp_path, UNIT.read_text().replace("Type=notify", "Type=notifyy"))
    res = _analyze("verify", f"./{unit.name}", cwd=tmp_path)
    assert "qkdgate.service" in res.stdout + res.stderr


@needs_analyze
def test_exposure_score_at_most_2_5(tmp_path):
    score = _exposure(_unit_for_this_host(tmp_path))
    assert score <= MAX_EXPOSURE, f"exposure {score} > {MAX_EXPOSURE}"


@needs_analyze
def test_exposure_without_hardening_is_high(tmp_path):
    # Strip the hardening block: the same parser must then see a bad score.
    text = UNIT.read_text().split("# Hardening.")[0] + "\n[Install]\nWantedBy=multi-user.target\n"
    score = _exposure(_unit_for_this_host(tmp_path, text))
    assert score > 8.0
