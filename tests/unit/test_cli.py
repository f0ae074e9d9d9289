import subprocess
import sys

from qkdgate import __version__


def run(*args):
    return subprocess.run([sys.executable, "-m", "qkdgate", *args], capture_output=True, text=True)


def test_version_and_help():
    r = run("--version")
    assert r.returncode == 0 and r.stdout.strip() == f"qkdgate {__version__}"
    r = run("--help")
    assert r.returncode == 0 and "ML-KEM" in r.stdout


def test_unknown_command_is_a_usage_error():
    r = run("no-such-command")
    assert r.returncode == 2 and "invalid choice" in r.stderr
