"""One gateway daemon of the fault lab, a process of its own in its namespace.

:class:`Gateway` starts, signals, SIGKILLs and reads back one daemon (its
event log, its journal's QKD key_IDs, RSS and FDs) and runs systemd's
``ExecStopPost=qkdgate failsafe`` for it. This file's ``daemon``
subcommand is the process: the real
:class:`~qkdgate.gateway.daemon.daemon.Daemon` with an event log, its own
failsafe registry and the kill-at-step hook (SIGUSR1 arms a state; the next
exchange entering it SIGSTOPs the process from inside
``PeerSession._transition``, before the state runs).
"""

from __future__ import annotations

import argparse
import asyncio
import contextlib
import json
import os
import re
import signal
import subprocess
import sys
import time
from pathlib import Path
from typing import Any

ROOT = Path(__file__).resolve().parent.parent
THIS = Path(__file__).resolve()


# ====================================================================== gateways

class Gateway:
    """One gateway daemon, a process of its own in its namespace."""

    def __init__(self, name: str, ns: str, config: Path, folder: Path, *,
                 warm: bool = True) -> None:
        self.name, self.ns, self.config, self.warm = name, ns, config, warm
        self.events = folder / f"{name}.events.jsonl"
        self.registry = folder / f"{name}-run" / "tunnels.json"
        self.arm_file = folder / f"{name}.arm"
        self.warm_file = folder / f"{name}.warm"     # a spare writes its pid once imported
        self.log = folder / f"{name}.log"
        self.proc: subprocess.Popen[bytes] | None = None
        self.spare: subprocess.Popen[bytes] | None = None
        self.starts = 0
        self.cold_starts = 0       # restarts that went to a spare still importing

    @property
    def control(self) -> str:
        return str(self.config.parent / f"{self.name}-run" / "control.sock")

    @property
    def pid(self) -> int:
        if self.proc is None:
            raise RuntimeError(f"{self.name} is not running")
        return self.proc.pid

    def _spawn(self, wait_go: bool) -> subprocess.Popen[bytes]:
        if wait_go:
            self.warm_file.unlink(missing_ok=True)
        with open(self.log, "ab") as out:
            return subprocess.Popen(
                ["ip", "netns", "exec", self.ns, sys.executable, str(THIS), "daemon",
                 "--config", str(self.config), "--events", str(self.events),
                 "--registry", str(self.registry), "--arm-file", str(self.arm_file),
                 *(["--wait-go", "--warm-file", str(self.warm_file)] if wait_go else [])],
                stdin=subprocess.PIPE if wait_go else subprocess.DEVNULL,
                stdout=out, stderr=subprocess.STDOUT, cwd=str(ROOT))

    def start(self) -> None:
        """Start the daemon. With ``warm`` a spare process that has done its
        imports is told to go, and the next spare started: under TCG over
        9p a cold interpreter's imports take from 10 s to minutes, which
        would measure the lab, not the daemon's recovery (a real machine
        imports in about a second; docs/faults.md)."""
        self.registry.parent.mkdir(mode=0o700, exist_ok=True)
        if self.spare is None or self.spare.poll() is not None:
            self.proc = self._spawn(False)      # the first start, or no spare ready
        else:
            if not self.spare_warm():
                self.cold_starts += 1
            self.proc, self.spare = self.spare, None
            if self.proc.stdin is None:
                raise RuntimeError("spare without stdin")
            self.proc.stdin.write(b"go\n")
            self.proc.stdin.close()
        self.starts += 1

    def prepare(self) -> None:
        """Have a warm spare ready for the next start (called between cells,
        not beside a start: two interpreters importing at once slow both)."""
        if self.warm and (self.spare is None or self.spare.poll() is not None):
            self.spare = self._spawn(True)

    def spare_warm(self) -> bool:
        """Has the spare finished its imports (it wrote its pid)?"""
        if self.spare is None or self.spare.poll() is not None:
            return False
        try:
            return self.warm_file.read_text().strip() == str(self.spare.pid)
        except OSError:
            return False

    def wait_warm(self, timeout: float) -> float | None:
        """Seconds until the spare was warm (None: not within ``timeout``,
        or no spare). A kill cell's restart must take a warm spare, or it
        measures the guest's imports, not the daemon (docs/faults.md)."""
        t0 = time.monotonic()
        while time.monotonic() - t0 < timeout:
            if self.spare_warm():
                return time.monotonic() - t0
            if self.spare is None or self.spare.poll() is not None:
                return None
            time.sleep(0.2)
        return None

    def alive(self) -> bool:
        return self.proc is not None and self.proc.poll() is None

    def status(self, timeout: float = 5.0) -> dict[str, Any] | None:
        from qkdgate.errors import QkdgateError
        from qkdgate.gateway.daemon.control import request
        try:
            st: dict[str, Any] = request(self.control, "status", timeout=timeout)
        except (QkdgateError, OSError):
            return None
        return st

    def signal(self, sig: int) -> None:
        if self.alive():
            os.kill(self.pid, sig)

    def kill(self) -> None:
        """SIGKILL and reap."""
        if self.proc is not None and self.proc.poll() is None:
            self.proc.send_signal(signal.SIGKILL)
            self.proc.wait(30)

    def stop(self) -> None:
        if self.spare is not None and self.spare.poll() is None:
            self.spare.kill()
            self.spare.wait(30)
        if self.proc is not None and self.proc.poll() is None:
            self.proc.send_signal(signal.SIGTERM)
            try:
                self.proc.wait(30)
            except subprocess.TimeoutExpired:
                self.kill()

    def failsafe(self) -> str:
        """What systemd's ExecStopPost=qkdgate failsafe does after a crash:
        the same code, run in-process in a thread inside the gateway's
        namespace (a fresh interpreter costs minutes on a loaded TCG guest)."""
        import io

        from qkdgate.gateway.demo.net import in_thread_netns
        from qkdgate.tunnels import failsafe
        p = argparse.ArgumentParser()
        failsafe.add_arguments(p)
        args = p.parse_args(["--state", str(self.registry)])
        out = io.StringIO()

        def body() -> int:
            with contextlib.redirect_stdout(out):
                return failsafe.run(args)
        rc = in_thread_netns(self.ns, body)
        return f"{out.getvalue()} (exit {rc})"

    def arm(self, state: str) -> None:
        self.arm_file.write_text(state)
        self.signal(signal.SIGUSR1)

    def wait_stopped(self, timeout: float) -> bool:
        """Has the process stopped itself (SIGSTOP: state T in /proc)?"""
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            if not self.alive():
                return False
            with contextlib.suppress(OSError):
                stat = Path(f"/proc/{self.pid}/stat").read_text()
                if stat.rsplit(")", 1)[1].split()[0] in ("T", "t"):
                    return True
            time.sleep(0.02)
        return False

    def rss_kib(self) -> int:
        for line in Path(f"/proc/{self.pid}/status").read_text().splitlines():
            if line.startswith("VmRSS:"):
                return int(line.split()[1])
        return 0

    def fds(self) -> int:
        return len(os.listdir(f"/proc/{self.pid}/fd"))

    def read_events(self) -> list[dict[str, Any]]:
        out = []
        if self.events.exists():
            for line in self.events.read_text().splitlines():
                with contextlib.suppress(ValueError):
                    out.append(json.loads(line))
        return out

    def journal_key_ids(self) -> dict[str, set[tuple[str, int]]]:
        """key_ID -> the (tunnel, generation)s the journal reserved it for."""
        out: dict[str, set[tuple[str, int]]] = {}
        cfg_state = _state_dir(self.config)
        path = cfg_state / "journal"
        if not path.exists():
            return out
        for line in path.read_bytes().splitlines():
            if len(line) < 10:
                continue
            try:
                rec = json.loads(line[9:])
            except ValueError:
                continue
            if isinstance(rec, dict) and rec.get("t") == "keys":
                for k in rec.get("ids", []):
                    out.setdefault(k.lower(), set()).add((rec.get("tun", ""), rec.get("gen", 0)))
        return out


def _state_dir(config: Path) -> Path:
    m = re.search(r"^\s*state_dir:\s*(\S+)", config.read_text(), re.M)
    if m is None:
        raise RuntimeError(f"{config}: no state_dir")
    return Path(m.group(1))


# ====================================================================== the daemon wrapper

def daemon_main(argv: list[str]) -> int:
    """``fault_gateway.py daemon``: ``qkdgate run`` with an event log, a registry of
    its own (two daemons share one /run here) and the kill-at-step hook."""
    p = argparse.ArgumentParser(prog="fault_gateway.py daemon")
    p.add_argument("--config", required=True)
    p.add_argument("--events", required=True)
    p.add_argument("--registry", required=True)
    p.add_argument("--arm-file", required=True)
    p.add_argument("--wait-go", action="store_true",
                   help="import everything, then wait for a line on stdin (a warm spare)")
    p.add_argument("--warm-file", help="with --wait-go: write our pid here once imported")
    a = p.parse_args(argv)

    from qkdgate.gateway.config.model import load_config
    from qkdgate.gateway.daemon.daemon import Daemon
    from qkdgate.gateway.protocol.session import PeerSession
    from qkdgate.gateway.telemetry.events import to_dict
    from qkdgate.gateway.telemetry.metrics import configure_logging
    from qkdgate.keymix.secret import disable_core_dumps
    from qkdgate.tunnels.macsec import MacsecBackend
    from qkdgate.tunnels.state import TunnelRegistry
    from qkdgate.tunnels.xfrm import XfrmBackend

    if a.wait_go:
        from qkdgate.gateway.demo.run import prefetch_imports
        prefetch_imports().join()
        if a.warm_file:
            Path(a.warm_file).write_text(f"{os.getpid()}\n")
        if not sys.stdin.readline():
            return 0              # the harness closed us without a start
    cfg = load_config(a.config)
    configure_logging(cfg.telemetry.log.level, cfg.telemetry.log.format)
    disable_core_dumps()
    registry = TunnelRegistry(a.registry)
    armed: list[str] = []

    def arm(_sig: int, _frm: object) -> None:
        with contextlib.suppress(OSError):
            armed[:] = [Path(a.arm_file).read_text().strip()]
    signal.signal(signal.SIGUSR1, arm)

    original = PeerSession._transition

    def transition(self: Any, ex: Any, new: Any) -> None:
        original(self, ex, new)
        if armed and str(new) == armed[0]:
            armed.clear()
            os.kill(os.getpid(), signal.SIGSTOP)     # the harness SIGKILLs us here
    PeerSession._transition = transition     # type: ignore[method-assign]

    events = open(a.events, "a", buffering=1)    # noqa: SIM115  lives as long as the process

    def record(ev: Any) -> None:
        events.write(json.dumps({"t": time.monotonic(), **to_dict(ev)}, default=str) + "\n")

    async def main() -> None:
        d = Daemon(cfg, config_path=a.config, ipsec_backend=XfrmBackend(registry=registry),
                   macsec_backend=MacsecBackend(registry=registry))
        d.subscribe(record)
        d.install_signal_handlers()
        await d.run()
    asyncio.run(main())
    return 0


if __name__ == "__main__":
    if len(sys.argv) > 1 and sys.argv[1] == "daemon":
        sys.exit(daemon_main(sys.argv[2:]))
    print("usage: fault_gateway.py daemon --config FILE --events FILE --registry FILE "
          "--arm-file FILE")
    sys.exit(2)
