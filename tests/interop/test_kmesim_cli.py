"""``qkdgate kme-sim`` as a command: it starts two KMEs, prints a curl
command that works as printed, takes faults on its admin endpoint, and
stops cleanly on SIGTERM."""

import json
import shlex
import shutil
import signal
import subprocess
import sys
import time
import urllib.request

import pytest

pytestmark = pytest.mark.skipif(shutil.which("curl") is None, reason="curl not installed")


def _banner(proc, deadline=30.0):
    lines, end = [], time.monotonic() + deadline
    while time.monotonic() < end:
        line = proc.stdout.readline()
        if not line:
            break
        lines.append(line.rstrip())
        if line.strip().startswith("curl "):
            return lines
    raise AssertionError("no banner: " + "\n".join(lines))


def test_kme_sim_command_curl_and_admin(tmp_path):
    proc = subprocess.Popen(
        [sys.executable, "-m", "qkdgate", "kme-sim", "--state-dir", str(tmp_path),
         "--port", "0", "--admin-port", "0", "--prefill", "50"],
        stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
    try:
        lines = _banner(proc)
        assert any(str(tmp_path / "pki" / "ca.pem") in l for l in lines)
        curl = shlex.split(lines[-1])
        out = subprocess.run([*curl, "-s", "--fail"], capture_output=True, text=True, timeout=20)
        assert out.returncode == 0, out.stderr
        status = json.loads(out.stdout)
        assert (status["source_KME_ID"], status["slave_SAE_ID"]) == ("KME-A", "SAE-B")
        assert status["stored_key_count"] >= 50

        admin = next(l.split()[-1] for l in lines if "admin" in l).replace("/admin/state", "")
        req = urllib.request.Request(admin + "/admin/link", data=b'{"eve": 0.6}', method="POST")
        with urllib.request.urlopen(req, timeout=10) as r:
            assert json.load(r)["links"][0]["alarms"] == ["QBER_ABOVE_THRESHOLD"]
        status = json.loads(subprocess.run([*curl, "-s"], capture_output=True, text=True,
                                           timeout=20).stdout)
        assert status["status_extension"]["qkdgate_alarms"] == ["QBER_ABOVE_THRESHOLD"]

        # without a client certificate the KME refuses the TLS handshake
        no_cert = [a for a in curl if a not in curl[curl.index("--cert"):curl.index("--cert") + 4]]
        assert subprocess.run([*no_cert, "-s"], capture_output=True, timeout=20).returncode != 0
    finally:
        proc.send_signal(signal.SIGTERM)
        try:
            assert proc.wait(timeout=20) == 0
        finally:
            if proc.poll() is None:
                proc.kill()
