"""What ``qkdgate run`` loads before READY=1 (issue 19).

Under the lab's emulated CPU every imported module costs tens of
milliseconds and its memory stays resident, so the daemon's import closure
with everything optional off must not pull in what it does not run: other
subcommands, the demo, the Prometheus client, MQTT, the HTTPS client and
the ETSI 004 stack without such a key source, the key service, WireGuard and
strongSwan consumers without such a tunnel, the plugin scan of
importlib.metadata. The daemon really starts (the kernel fakes of
qkdgate.testing, as tests/interop/run_fake_kernel.py passes them) and the
module list is taken when READY=1 arrives, so a lazy import that a start-up
path triggers counts too. A behaviour test: it times nothing
(bench/startup.py measures).
"""

from __future__ import annotations

import socket
import subprocess
import sys
from pathlib import Path

import pytest

from qkdgate.gateway.cli.main import COMMANDS, build_parser, command_in
from qkdgate.gateway.cli.main import main as cli_main

sys.path.insert(0, str(Path(__file__).resolve().parents[2] / "bench"))
from startup import write_config  # bench/startup.py

# Never needed by `qkdgate run` with no QKD, no telemetry, no key service and
# only IPsec tunnels; a name also covers its submodules.
OPTIONAL = (
    "prometheus_client", "aiohttp", "aiomqtt", "paho", "yarl", "http.server", "email",
    "importlib.metadata", "rich", "matplotlib", "scapy", "pyroute2",
    "qkdgate.gateway.demo", "qkdgate.gateway.telemetry.metrics",
    "qkdgate.gateway.telemetry.mqtt", "qkdgate.adapters.kmesim", "qkdgate.adapters.https",
    "qkdgate.adapters.etsi014", "qkdgate.adapters.etsi014_codec",
    "qkdgate.adapters.etsi004", "qkdgate.adapters.etsi004_binary",
    "qkdgate.adapters.etsi004_frame", "qkdgate.adapters.etsi004_source",
    "qkdgate.keyservice", "qkdgate.tunnels.wireguard", "qkdgate.tunnels.wireguard_msg",
    "qkdgate.tunnels.strongswan", "qkdgate.tunnels.strongswan_vici",
    "qkdgate.tunnels.strongswan_conf", "qkdgate.tunnels.failsafe", "qkdgate.keymix.probe",
    *(mod for name, mod, _ in COMMANDS if name != "run"),
)
# An ETSI 014 key source needs its HTTPS client, and nothing else of the list.
NEEDED_BY_ETSI014 = ("aiohttp", "yarl", "email", "qkdgate.adapters.https",
                     "qkdgate.adapters.etsi014", "qkdgate.adapters.etsi014_codec")

# The daemon, started by the console script's main() as `qkdgate run -c FILE`
# is, with the kernel fakes put where run_fake_kernel.py passes them; prints
# its modules at READY=1.
CHILD = r"""
import os, signal, socket, sys, threading
config, notify = sys.argv[1], sys.argv[2]
rx = socket.socket(socket.AF_UNIX, socket.SOCK_DGRAM)
rx.bind(notify)
os.environ["NOTIFY_SOCKET"] = notify

def watch():
    while b"READY=1" not in rx.recv(4096).split(b"\n"):
        pass
    print("MODULES " + " ".join(sorted(sys.modules)), flush=True)
    os.kill(os.getpid(), signal.SIGTERM)

threading.Thread(target=watch, daemon=True).start()
from qkdgate.gateway.cli import run
from qkdgate.testing.fakes import RecordingIpsecBackend, RecordingMacsecBackend
shipped = run.run
run.run = lambda args: shipped(args, ipsec_backend=RecordingIpsecBackend(),
                               macsec_backend=RecordingMacsecBackend())
from qkdgate.gateway.cli.main import main
sys.exit(main(["run", "-c", config]))
"""


def _free_udp_port() -> int:
    with socket.socket(socket.AF_INET, socket.SOCK_DGRAM) as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


def _config(work: Path, etsi014: bool, tunnels: int = 1) -> Path:
    """bench/startup.py's gw-a configuration: ``minimal`` (nothing optional),
    or ``demo`` with its one ETSI 014 key source."""
    return write_config(work, "demo" if etsi014 else "minimal", tunnels, port=_free_udp_port())


def _modules_at_ready(config: Path) -> set[str]:
    proc = subprocess.run([sys.executable, "-c", CHILD, str(config),
                           str(config.parent / "notify")],
                          capture_output=True, text=True, timeout=120, check=False)
    lines = [ln for ln in proc.stdout.splitlines() if ln.startswith("MODULES ")]
    assert proc.returncode == 0 and lines, proc.stdout[-2000:] + proc.stderr[-4000:]
    return set(lines[0].split()[1:])


def _matching(modules: set[str], names: tuple[str, ...]) -> list[str]:
    return sorted(m for m in modules if any(m == n or m.startswith(n + ".") for n in names))


@pytest.mark.parametrize("etsi014", [False, True], ids=["nothing-optional", "etsi014-source"])
def test_run_imports_nothing_optional_before_ready(tmp_path, etsi014):
    modules = _modules_at_ready(_config(tmp_path, etsi014))
    # the start really happened, through the command's own module
    assert {"qkdgate.gateway.cli.run", "qkdgate.gateway.daemon.daemon",
            "qkdgate.gateway.protocol.session", "asyncio"} <= modules
    allowed = NEEDED_BY_ETSI014 if etsi014 else ()
    unexpected = tuple(n for n in OPTIONAL if n not in allowed)
    assert _matching(modules, unexpected) == []
    if etsi014:   # the check above is not vacuous: a configured source is loaded
        assert "qkdgate.adapters.etsi014" in modules


def test_command_in_finds_the_command_word():
    assert command_in(["run", "-c", "x.yaml"]) == "run"
    assert command_in(["--version"]) is None
    assert command_in([]) is None
    assert command_in(["no-such-command"]) is None
    assert command_in(["-h", "status", "--json"]) == "status"


def test_help_lists_every_command_whichever_one_is_loaded(capsys):
    names = [name for name, _, _ in COMMANDS]
    for only in (None, "run"):
        text = build_parser(only).format_help()
        assert all(name in text for name in names)
    # the loaded command keeps its own arguments
    args = build_parser("run").parse_args(["run", "-c", "f.yaml", "--teardown-on-exit"])
    assert args.config == "f.yaml" and args.teardown_on_exit
    with pytest.raises(SystemExit):
        cli_main(["status", "--no-such-option"])
    assert "unrecognized arguments" in capsys.readouterr().err


def test_config_annotations_are_resolved_once_per_class(tmp_path, monkeypatch):
    """The config builder resolved every dataclass's string annotations again
    for each mapping of the file (3 per tunnel: 18 % of a 1,000-tunnel
    start's CPU); now once per class, however many tunnels."""
    import typing

    from qkdgate.gateway.config import model, schema

    calls: list[type] = []
    real = typing.get_type_hints

    def counting(obj, *a, **kw):
        calls.append(obj)
        return real(obj, *a, **kw)

    schema._type_hints.cache_clear()
    monkeypatch.setattr(schema.typing, "get_type_hints", counting)
    path = _config(tmp_path, etsi014=False, tunnels=20)
    many = path.read_text()
    cfg = model.parse_config(many, str(path))
    assert len(cfg.tunnels) == 20
    assert len(calls) == len(set(calls))      # each class once
    model.parse_config(many, str(path))
    assert len(calls) == len(set(calls))      # and not again for the next file
