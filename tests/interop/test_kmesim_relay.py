"""``qkdgate kme-sim --topology``: an independent ETSI 014 client (PyPI
etsi-qkd-014-client) gets identical keys for two SAEs two hops apart, relayed
through a trusted node that is compromised and records them (issue 13)."""

import base64
import json
import re
import signal
import subprocess
import sys
import time
import urllib.request
from pathlib import Path

import pytest

TOPOLOGIES = Path(__file__).resolve().parents[2] / "docs" / "topologies"


def _banner(proc, deadline=60.0):
    lines, end = [], time.monotonic() + deadline
    while time.monotonic() < end:
        line = proc.stdout.readline()
        if not line:
            break
        lines.append(line.rstrip())
        if line.strip().startswith("curl "):
            return lines
    raise AssertionError("no banner: " + "\n".join(lines) + proc.stderr.read())


def _parse(lines):
    """SAE -> (cert, key), SAE -> KME host:port, the CA, the admin URL."""
    creds, where, ca, admin = {}, {}, None, None
    for i, line in enumerate(lines):
        words = line.split()
        if line.strip().startswith("demo CA:"):
            ca = words[-1]
        elif len(words) >= 3 and words[0].startswith("SAE-") and words[1] == "cert":
            creds[words[0].rstrip(":")] = (words[2], lines[i + 1].split()[-1])
        elif m := re.match(r"\s*(KME-\S+): https://(\S+)\s+\(SAEs: (.*)\)", line):
            for sae in filter(None, (s.strip() for s in m.group(3).split(","))):
                where[sae] = m.group(2)
        elif "admin (fault injection)" in line:
            admin = words[-1].replace("/admin/state", "")
    return creds, where, ca, admin


def test_outside_client_gets_identical_keys_two_hops_apart(tmp_path):
    client_mod = pytest.importorskip("etsi_qkd_014_client")   # in the test extra
    proc = subprocess.Popen(
        [sys.executable, "-m", "qkdgate", "kme-sim", "--state-dir", str(tmp_path),
         "--topology", str(TOPOLOGIES / "line-3.yaml"),
         "--port", "0", "--port-004", "-1", "--admin-port", "0"],
        stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
    try:
        creds, where, ca, admin = _parse(_banner(proc))
        assert set(creds) == {"SAE-A", "SAE-B"} and where["SAE-A"] != where["SAE-B"]

        def client(sae):
            return client_mod.QKD014Client(where[sae], *creds[sae], ca)

        master, slave = client("SAE-A"), client("SAE-B")
        code, st = master.get_status("SAE-B")
        assert code == 200 and (st.source_kme_id, st.target_kme_id) == ("KME-A", "KME-B")
        code, container = master.get_key("SAE-B", number=2, size=256)
        assert code == 200, container.message
        sent = [(k.key_id, k.key) for k in container.keys]
        code, got = slave.get_key_with_key_IDs("SAE-A", [i for i, _ in sent])
        assert code == 200 and [(k.key_id, k.key) for k in got.keys] == sent

        # the compromised trusted node KME-M saw both keys in the clear
        with urllib.request.urlopen(admin + "/admin/attacker", timeout=10) as r:
            seen = json.load(r)
        assert {(s["node"], s["key_ID"], bytes.fromhex(s["key_hex"])) for s in seen} == \
            {("KME-M", i, base64.b64decode(k)) for i, k in sent}
        with urllib.request.urlopen(admin + "/admin/state", timeout=10) as r:
            state = json.load(r)
        assert state["kmes"]["KME-M"]["compromised"] is True
        # every node serves the ETSI 020 inter-KME API on its own HTTPS port
        urls = {k: v["interkme_url"] for k, v in state["kmes"].items()}
        assert len(set(urls.values())) == 3 and all(u.startswith("https://") for u in urls.values())
        assert {tuple(sorted(link["kmes"])) for link in state["links"]} == \
            {("KME-A", "KME-M"), ("KME-B", "KME-M")}
    finally:
        proc.send_signal(signal.SIGTERM)
        try:
            assert proc.wait(timeout=20) == 0
        finally:
            if proc.poll() is None:
                proc.kill()


def test_topology_errors_name_the_file_and_line(tmp_path):
    bad = tmp_path / "bad.yaml"
    bad.write_text("nodes:\n  - name: KME-A\n  - name: KME-B\nlinks:\n"
                   "  - between: [KME-A, KME-B]\n    lenght_km: 3\n")
    out = subprocess.run([sys.executable, "-m", "qkdgate", "kme-sim", "--topology", str(bad),
                          "--state-dir", str(tmp_path / "s")],
                         capture_output=True, text=True, timeout=60)
    assert out.returncode == 2
    assert "bad.yaml" in out.stderr and ":6" in out.stderr and "lenght_km" in out.stderr
