"""The broken-config corpus (tests/config/bad-*.yaml) through the real CLI.

Each file must make ``qkdgate check-config`` print exactly the line recorded
in tests/config/expected-errors.json on stderr and exit 2; the shipped
example and the corpus's good base must pass.
"""

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[2]
CORPUS = ROOT / "tests" / "config"
EXPECTED = json.loads((CORPUS / "expected-errors.json").read_text())


def check_config(*args: str, cwd: Path = CORPUS, stdin: str | None = None):
    env = dict(os.environ, PYTHONDONTWRITEBYTECODE="1")
    return subprocess.run([sys.executable, "-m", "qkdgate", "check-config", *args],
                          capture_output=True, text=True, cwd=cwd, env=env, timeout=60,
                          input=stdin)


def test_corpus_and_expectations_match():
    files = sorted(p.name for p in CORPUS.glob("*.yaml") if "bad" in p.name or "invalid" in p.name)
    assert files == sorted(EXPECTED), "every broken file needs exactly one expected error"
    assert len(files) >= 20


@pytest.mark.parametrize("name", sorted(EXPECTED))
def test_broken_config_gives_exact_error(name):
    r = check_config(name)
    assert r.returncode == 2, r
    assert r.stdout == ""
    assert r.stderr == EXPECTED[name] + "\n"
    assert "Traceback" not in r.stderr


def test_good_base_of_the_corpus_passes():
    r = check_config("good-minimal.yaml")
    assert r.returncode == 0, r.stderr
    assert r.stdout.startswith("good-minimal.yaml: OK\n")
    assert "1 peer: gw-b (192.0.2.2:4600, QKD via kme-a as master)" in r.stdout
    assert "1 tunnel: dc1-dc2 (ipsec to gw-b, hybrid-required)" in r.stdout


def test_shipped_example_passes_and_summarises():
    r = check_config("systemd/qkdgate.yaml", cwd=ROOT)
    assert r.returncode == 0, r.stderr
    assert r.stderr == ""  # the example triggers no warnings either
    assert "gateway gw-a: ML-KEM-768 + X25519, profile default, listening on [::]:4600/udp" \
        in r.stdout
    assert "2 peers" in r.stdout and "4 tunnels" in r.stdout
    assert "policies: hybrid-required, pqc-fallback" in r.stdout


def test_json_output_is_the_parsed_config_without_secrets(tmp_path):
    r = check_config("--json", "systemd/qkdgate.yaml", cwd=ROOT)
    assert r.returncode == 0, r.stderr
    data = json.loads(r.stdout)
    assert data["gateway"]["name"] == "gw-a"
    assert data["tunnels"][0]["ipsec"]["remote_subnets"] == ["10.2.0.0/16", "2001:db8:2::/48"]
    assert data["tunnels"][1]["rekey"]["interval"] == 300.0
    assert data["peers"][0]["psk_file"] == "/etc/qkdgate/peers/gw-b.psk"  # a path, not a key


def test_missing_file_is_a_config_error(tmp_path):
    r = check_config(str(tmp_path / "nope.yaml"))
    assert r.returncode == 2
    assert r.stderr == f"qkdgate check-config: {tmp_path / 'nope.yaml'}: cannot read " \
                       "configuration: No such file or directory\n"


def test_check_files_wants_private_secret_files(tmp_path):
    from qkdgate.gateway.protocol.identity import LocalIdentity
    text = (CORPUS / "good-minimal.yaml").read_text()
    cfg = tmp_path / "qkdgate.yaml"
    cfg.write_text(text)
    for name in ("identity.json", "gw-b.pub", "sae-a.crt", "sae-a.key", "kme-ca.crt"):
        (tmp_path / name).write_text("x")
        os.chmod(tmp_path / name, 0o600)
    r = check_config("--check-files", str(cfg))
    assert r.returncode == 2 and ":8: peers[0].identities[0]: " in r.stderr
    assert "not a qkdgate public identity" in r.stderr
    (tmp_path / "gw-b.pub").write_text(LocalIdentity.generate().public.to_string() + "\n")
    assert check_config("--check-files", "-q", str(cfg)).returncode == 0
    os.rename(tmp_path / "sae-a.key", tmp_path / "real.key")
    os.symlink(tmp_path / "real.key", tmp_path / "sae-a.key")
    r = check_config("--check-files", str(cfg))
    assert r.returncode == 2 and "key_sources[0].tls.key: secret file is a symbolic link" in r.stderr
    os.replace(tmp_path / "real.key", tmp_path / "sae-a.key")
    os.chmod(tmp_path / "sae-a.key", 0o644)
    r = check_config("--check-files", str(cfg))
    assert r.returncode == 2
    assert r.stderr.endswith("key_sources[0].tls.key: secret file is readable by group or "
                             "others (expected mode 0600 or stricter, found mode 0644)\n")
    os.chmod(tmp_path / "sae-a.key", 0o600)
    os.unlink(tmp_path / "gw-b.pub")
    r = check_config("--check-files", str(cfg))
    assert r.returncode == 2 and ":8: peers[0].identities[0]: cannot use file" in r.stderr


def test_stdin_and_warnings():
    text = (CORPUS / "good-minimal.yaml").read_text()
    r = check_config("-", stdin=text)
    assert r.returncode == 0 and r.stdout.startswith("-: OK\n") and r.stderr == ""
    r = check_config("-", stdin=text.replace("reqid: 100", "reqid: 0755"))
    assert r.returncode == 2 and r.stderr.startswith("qkdgate check-config: <stdin>:30: ")
    r = check_config("-", stdin=text.replace("policy: hybrid-required", "policy: pqc-only"))
    assert r.returncode == 0
    assert r.stderr == ("warning: peers[0].qkd: no tunnel to 'gw-b' has a policy that uses QKD; "
                        "these settings are unused\n")
