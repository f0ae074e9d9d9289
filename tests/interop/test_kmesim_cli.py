"""``qkdgate kme-sim`` as a command: it starts two KMEs, prints a curl
command that works as printed, takes faults on its admin endpoint, and
stops cleanly on SIGTERM; ``--sae`` attaches more SAEs so an outside ETSI
014 client (PyPI etsi-qkd-014-client) can use multicast keys."""

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
         "--port", "0", "--port-004", "0", "--admin-port", "0", "--prefill", "50"],
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


def _cred_paths(lines):
    """SAE -> (cert, key), KME -> host:port, and the CA, from the banner."""
    saes, kmes, ca = {}, {}, None
    for i, line in enumerate(lines):
        words = line.split()
        if line.strip().startswith("demo CA:"):
            ca = words[-1]
        elif len(words) >= 3 and words[0].startswith("SAE-") and words[1] == "cert":
            saes[words[0].rstrip(":")] = (words[2], lines[i + 1].split()[-1])
        elif len(words) >= 2 and words[0].startswith("KME-") and words[1].startswith("https://"):
            kmes[words[0].rstrip(":")] = words[1].removeprefix("https://")
    return saes, kmes, ca


def test_cli_multicast_with_an_outside_etsi014_client(tmp_path):
    client_mod = pytest.importorskip("etsi_qkd_014_client")   # in the test extra
    proc = subprocess.Popen(
        [sys.executable, "-m", "qkdgate", "kme-sim", "--state-dir", str(tmp_path),
         "--port", "0", "--port-004", "-1", "--admin-port", "-1", "--prefill", "50",
         "--sae", "SAE-B2=KME-B", "--sae", "SAE-A2=KME-A"],
        stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
    try:
        saes, kmes, ca = _cred_paths(_banner(proc))
        assert set(saes) == {"SAE-A", "SAE-A2", "SAE-B", "SAE-B2"}

        def client(sae):
            kme = "KME-A" if sae.startswith("SAE-A") else "KME-B"
            return client_mod.QKD014Client(kmes[kme], *saes[sae], ca)

        master = client("SAE-A")
        code, st = master.get_status("SAE-B")
        assert code == 200 and st.max_sae_id_count == 2
        code, container = master.get_key("SAE-B", number=1, size=256,
                                         additional_slave_sae_ids=["SAE-B2"])
        assert code == 200, container.message
        key_id, key = container.keys[0].key_id, container.keys[0].key
        for slave in ("SAE-B", "SAE-B2"):
            code, got = client(slave).get_key_with_key_IDs("SAE-A", [key_id])
            assert code == 200 and got.keys[0].key == key, slave
        # an additional slave at the master's own KME: refused with the real reason
        code, err = master.get_key("SAE-B", number=1, additional_slave_sae_ids=["SAE-A2"])
        assert code == 400 and {"additional_slave_on_another_KME": "SAE-A2"} in err.details
        code, err = master.get_key("SAE-B", number=1, additional_slave_sae_ids=["SAE-B"])
        assert code == 400 and {"duplicate_SAE_ID": "SAE-B"} in err.details
    finally:
        proc.send_signal(signal.SIGTERM)
        try:
            assert proc.wait(timeout=20) == 0
        finally:
            if proc.poll() is None:
                proc.kill()
