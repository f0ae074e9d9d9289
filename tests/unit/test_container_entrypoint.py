"""The container entrypoint (container/entrypoint.sh, issue 17 finding 8b)
runs ``qkdgate failsafe`` when the daemon dies by a signal or a non-zero
exit, passes signals through, and leaves other commands alone.

A stand-in ``qkdgate`` first in PATH plays the daemon (its behaviour given by
$STANDIN) and logs every failsafe call; the script runs under dash, the
image's /bin/sh. tools/test-image.sh repeats the SIGKILL case inside the
built image."""

from __future__ import annotations

import contextlib
import os
import queue
import shutil
import signal
import subprocess
import threading
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[2]
ENTRYPOINT = ROOT / "container" / "entrypoint.sh"
SH = shutil.which("dash") or "/bin/sh"

STUB = """#!/bin/sh
case $1 in
run) shift; echo "run $*" >>"$QKDGATE_TEST_LOG"; eval "$STANDIN" ;;
failsafe) shift; echo "failsafe $*" >>"$QKDGATE_TEST_LOG"; exit 0 ;;
*) echo "other $*" >>"$QKDGATE_TEST_LOG"; exit 3 ;;
esac
"""

# A daemon that reports ready on stdout, then waits (60 s at most, so a
# failed test leaves nothing behind for long); TERM ends it cleanly, HUP is a
# reload it acknowledges on stdout.
SERVING = ('trap \'echo TERM >>"$QKDGATE_TEST_LOG"; kill $! 2>/dev/null; exit 0\' TERM; '
           'trap \'echo reloaded\' HUP; echo ready $$; '
           'i=0; while [ $i -lt 60 ]; do i=$((i + 1)); sleep 1 & wait $!; done')


_started: list[subprocess.Popen] = []


@pytest.fixture(autouse=True)
def _reap():
    # Whatever a failing test left running (the entrypoint, its stand-in
    # daemon) is killed: a test must never leave processes behind.
    yield
    while _started:
        proc = _started.pop()
        for pid in (getattr(proc, "daemon_pid", None), proc.pid):
            if pid is not None:
                with contextlib.suppress(ProcessLookupError):
                    os.kill(pid, signal.SIGKILL)
        proc.wait(10)


@pytest.fixture
def env(tmp_path):
    bindir = tmp_path / "bin"
    bindir.mkdir()
    stub = bindir / "qkdgate"
    stub.write_text(STUB)
    stub.chmod(0o755)
    log = tmp_path / "log"
    log.touch()
    return {"PATH": f"{bindir}:{os.environ['PATH']}", "QKDGATE_TEST_LOG": str(log)}


def _log(env) -> list[str]:
    return Path(env["QKDGATE_TEST_LOG"]).read_text().splitlines()


def _start(env, standin: str, *args: str, **extra: str) -> subprocess.Popen:
    proc = subprocess.Popen([SH, str(ENTRYPOINT), *args],
                            env={**env, "STANDIN": standin, **extra},
                            stdout=subprocess.PIPE, text=True)
    _started.append(proc)
    lines: queue.Queue[str] = queue.Queue()

    def pump() -> None:
        for line in proc.stdout:
            lines.put(line)
        lines.put("")   # EOF

    threading.Thread(target=pump, daemon=True).start()
    proc.lines = lines
    return proc


def _line(proc: subprocess.Popen) -> str:
    """The next stdout line, waiting at most 30 s (never hangs the suite)."""
    try:
        return proc.lines.get(timeout=30).strip()
    except queue.Empty:
        pytest.fail("no output from the entrypoint within 30 s")


def _ready(proc: subprocess.Popen) -> int:
    words = _line(proc).split()
    assert words[:1] == ["ready"], words
    proc.daemon_pid = int(words[1])
    return proc.daemon_pid


@pytest.mark.parametrize("standin, status", [
    ("kill -KILL $$", 128 + signal.SIGKILL),    # a crash by signal
    ("exit 3", 3),                              # a non-zero exit
])
def test_daemon_dying_badly_runs_failsafe(env, standin, status):
    proc = _start(env, standin, "run", "--config", "x.yaml")
    assert proc.wait(30) == status
    assert _log(env) == ["run --config x.yaml", "failsafe "]


def test_clean_exit_runs_no_failsafe(env):
    proc = _start(env, "exit 0", "run")
    assert proc.wait(30) == 0
    assert _log(env) == ["run "]


def test_daemon_killed_from_outside_runs_failsafe_with_extra_args(env):
    # the OOM killer's view: the daemon, not its small parent, gets SIGKILL
    proc = _start(env, "echo ready $$; exec sleep 600", "run",
                  QKDGATE_FAILSAFE_ARGS="--all-macsec --netns gw")
    os.kill(_ready(proc), signal.SIGKILL)
    assert proc.wait(30) == 128 + signal.SIGKILL
    assert _log(env) == ["run ", "failsafe --all-macsec --netns gw"]


def test_sigterm_and_sighup_pass_through(env):
    proc = _start(env, SERVING, "run")
    _ready(proc)
    proc.send_signal(signal.SIGHUP)
    assert _line(proc) == "reloaded"
    proc.send_signal(signal.SIGTERM)
    assert proc.wait(30) == 0
    assert _log(env) == ["run ", "TERM"]     # clean stop: no failsafe


def test_daemon_ended_by_the_forwarded_sigterm_runs_failsafe(env):
    proc = _start(env, "echo ready $$; exec sleep 600", "run")
    _ready(proc)
    proc.send_signal(signal.SIGTERM)
    assert proc.wait(30) == 128 + signal.SIGTERM
    assert _log(env) == ["run ", "failsafe "]


def test_other_commands_are_exec_d_without_failsafe(env):
    proc = _start(env, "", "status", "--quiet")
    assert proc.wait(30) == 3
    assert _log(env) == ["other status --quiet"]
