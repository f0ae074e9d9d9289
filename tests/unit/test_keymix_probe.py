"""`qkdgate probe`: reports what works and says why something does not."""

import argparse
import json
import subprocess
import sys

from qkdgate.keymix import kem as kemmod
from qkdgate.keymix import probe


def test_probe_reports_the_default_suite_available():
    r = probe.probe()
    assert r["default_suite_ok"] is True
    for name in ("ML-KEM-768", "ML-KEM-1024"):
        assert r["kems"][name]["available"] and r["kems"][name]["shared_secret"] == 32
    assert r["kems"]["ML-KEM-1024"]["ciphertext"] == 1568
    assert r["x25519"]["available"] and r["hkdf_sha384"]["available"]
    assert "OpenSSL" in r["openssl"]
    json.dumps(r)  # JSON-able


def test_probe_explains_unavailable_liboqs(monkeypatch):
    monkeypatch.setattr(kemmod, "liboqs_status", lambda: (False, "liboqs.so not found here"))
    r = probe.probe()
    assert r["liboqs"] == {"available": False, "reason": "liboqs.so not found here"}
    assert "liboqs: liboqs.so not found here" in r["unavailable"]
    assert r["default_suite_ok"]            # liboqs is optional


def test_broken_default_kem_fails_the_probe_with_its_reason(monkeypatch, capsys):
    real = probe._kem_check

    def broken(name):
        if name == "ML-KEM-768":
            raise kemmod.CryptoUnavailable("ML-KEM-768: OpenSSL lacks ML-KEM (test)")
        return real(name)

    monkeypatch.setattr(probe, "_kem_check", broken)
    assert probe.run(argparse.Namespace(json=False)) == 1
    out = capsys.readouterr().out
    assert "ML-KEM-768     UNAVAILABLE CryptoUnavailable: ML-KEM-768: OpenSSL lacks ML-KEM (test)" in out
    assert "default suite ML-KEM-768 + X25519 + HKDF-SHA384: UNAVAILABLE" in out


def test_cli_probe_subprocess():
    r = subprocess.run([sys.executable, "-m", "qkdgate", "probe", "--json"],
                       capture_output=True, text=True)
    assert r.returncode == 0, r.stderr
    assert json.loads(r.stdout)["kems"]["ML-KEM-768"]["available"] is True
    r = subprocess.run([sys.executable, "-m", "qkdgate", "probe"], capture_output=True, text=True)
    assert r.returncode == 0 and "default suite ML-KEM-768 + X25519 + HKDF-SHA384: OK" in r.stdout
