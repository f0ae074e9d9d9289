"""SIGKILL at every point of a rekey: no QKD key is ever used twice, no
generation goes backwards, and the peers reconverge after a restart.

A forked child plays both gateways of one tunnel (master A, slave B, each
with its own journal) over a FakeQkdLink and performs rekeys. Its fake KME
is seeded identically on every start, so after a restart it hands out the
*same* key_IDs again: exactly the reuse the journal must stop. The child
counts crash points (inside the journal's writes and between rekey steps)
and SIGKILLs itself at point N. Every use of a key and every commit goes to
a log the parent checks. A control run with an in-memory journal
shows the checks do catch reuse.
"""

from __future__ import annotations

import os
import random
import signal
import sys
from collections.abc import Callable

import pytest

from qkdgate.gateway.daemon.journal import Journal, KeyIdReused
from qkdgate.testing.fakes import FakeQkdLink

ROUNDS = 3
TUNNEL = "t"


def _sync(coro):
    """Run a coroutine that never suspends (the fakes do no I/O)."""
    try:
        coro.send(None)
    except StopIteration as stop:
        return stop.value
    raise AssertionError("fake suspended")


class _Crash:
    def __init__(self, at: int) -> None:
        self.at, self.count = at, 0

    def __call__(self, point: str) -> None:
        self.count += 1
        if self.count == self.at:
            os.kill(os.getpid(), signal.SIGKILL)


class _MemoryJournal(Journal):
    """Control: a journal that forgets everything on restart."""

    @classmethod
    def open(cls, state_dir, **kw):
        j = cls(state_dir, **kw)
        j._fd = 1 << 20  # never written; marks it open
        return j

    def _append(self, *recs):
        self._hook("append")

    def close(self):
        pass


def _gateway_pair(state: str, log_path: str, crash_at: int, durable: bool) -> None:
    crash = _Crash(crash_at)
    journal_cls = Journal if durable else _MemoryJournal
    # fsync off: a SIGKILLed process loses nothing the kernel already has, so
    # fsync changes nothing here (it is for power loss) but costs seconds.
    ja = journal_cls.open(os.path.join(state, "a"), compact_after=6, _crash_hook=crash,
                          fsync=False)
    jb = journal_cls.open(os.path.join(state, "b"), compact_after=6, _crash_hook=crash,
                          fsync=False)
    link = FakeQkdLink("A", "B", rng=random.Random(1234).randbytes)
    master, slave = link.source("A"), link.source("B")
    log = os.open(log_path, os.O_WRONLY | os.O_APPEND | os.O_CREAT, 0o600)

    def note(line: str) -> None:
        os.write(log, (line + "\n").encode())

    while min(ja.committed_generation(TUNNEL), jb.committed_generation(TUNNEL)) < ROUNDS:
        # The peers exchange proposals and take the larger one.
        gen = max(ja.next_generation(TUNNEL), jb.next_generation(TUNNEL))
        keys = _sync(master.get_new_keys("B", 2))
        ids = [k.key_id for k in keys]
        try:
            ja.reserve_qkd_keys(TUNNEL, gen, ids)
        except KeyIdReused:
            continue   # our KME reissued a consumed key: draw fresh ones
        crash("A reserved")
        note(f"use A {gen} {' '.join(ids)}")
        crash("A used")
        try:
            jb.reserve_qkd_keys(TUNNEL, gen, ids)
        except KeyIdReused:
            continue   # a replay as far as B knows: refuse the rekey
        _sync(slave.get_keys_by_id("A", ids))
        crash("B reserved")
        note(f"use B {gen} {' '.join(ids)}")
        crash("B used")
        jb.record_generation(TUNNEL, gen)
        note(f"commit B {gen}")
        crash("B committed")
        ja.record_generation(TUNNEL, gen)
        note(f"commit A {gen}")
        crash("A committed")
    note(f"final A {ja.committed_generation(TUNNEL)} B {jb.committed_generation(TUNNEL)}")


def run_forked(life: Callable[[str, str, int, bool], None], state: str, log: str,
               crash_at: int, durable: bool = True) -> int:
    """Fork a child running ``life(state, log, crash_at, durable)``; returns the
    signal that ended it (0 if none). Shared with test_journal_epochs."""
    sys.stdout.flush()
    pid = os.fork()
    if pid == 0:  # pragma: no cover - child
        code = 0
        try:
            life(state, log, crash_at, durable)
        except BaseException:  # noqa: BLE001  forked child: report anything, exit non-zero
            import traceback
            traceback.print_exc()
            code = 3
        os._exit(code)
    _, status = os.waitpid(pid, 0)
    if os.WIFSIGNALED(status):
        return os.WTERMSIG(status)
    assert os.WEXITSTATUS(status) == 0, f"forked {life.__name__} failed"
    return 0


def _run_child(state: str, log: str, crash_at: int, durable: bool = True) -> int:
    """Fork a gateway pair; returns the signal that ended it (0 if none)."""
    return run_forked(_gateway_pair, state, log, crash_at, durable)


def _check(log_path: str) -> list[str]:
    """The invariants over the whole history; returns the violations."""
    problems = []
    used: dict[str, set[str]] = {"A": set(), "B": set()}
    committed = {"A": 0, "B": 0}
    final = None
    with open(log_path) as f:
        for line in f:
            kind, *rest = line.split()
            if kind == "use":
                side, gen, ids = rest[0], int(rest[1]), rest[2:]
                for k in ids:
                    if k in used[side]:
                        problems.append(f"{side} used key {k} twice")
                    used[side].add(k)
                if gen <= committed[side]:
                    problems.append(f"{side} used generation {gen} after committing "
                                    f"{committed[side]}")
            elif kind == "commit":
                side, gen = rest[0], int(rest[1])
                if gen <= committed[side]:
                    problems.append(f"{side} generation went from {committed[side]} to {gen}")
                committed[side] = gen
            elif kind == "final":
                final = (int(rest[1]), int(rest[3]))
    if final is None:
        problems.append("the restarted pair never finished")
    elif final[0] != final[1] or final[0] < ROUNDS:
        problems.append(f"peers did not reconverge: A at {final[0]}, B at {final[1]}")
    return problems


def _points_in_clean_run(tmp_path, monkeypatch) -> int:
    """Count the crash points of an uninterrupted history (in-process)."""
    seen: list[str] = []
    monkeypatch.setattr(_Crash, "__call__", lambda self, point: seen.append(point))
    _gateway_pair(str(tmp_path / "count"), str(tmp_path / "count.log"), 0, True)
    monkeypatch.undo()
    assert {"append-torn", "compact-renamed", "A reserved", "B committed"} <= set(seen)
    return len(seen)


@pytest.mark.skipif(not hasattr(os, "fork"), reason="needs fork")
def test_sigkill_at_every_point_of_a_rekey(tmp_path, monkeypatch):
    total = _points_in_clean_run(tmp_path, monkeypatch)
    assert total > 40
    for n in range(1, total + 1):
        state, log = str(tmp_path / f"s{n}"), str(tmp_path / f"log{n}")
        assert _run_child(state, log, n) == signal.SIGKILL, f"point {n} not reached"
        if n % 7 == 0:
            # crash again during recovery, at the same count
            _run_child(state, log, n)
        assert _run_child(state, log, 0) == 0
        problems = _check(log)
        assert not problems, f"killed at point {n}: {problems}"


@pytest.mark.skipif(not hasattr(os, "fork"), reason="needs fork")
def test_control_without_durable_journal_reuses_keys(tmp_path):
    # Without the journal the same killed history must show reuse, or the
    # checks above prove nothing.
    state, log = str(tmp_path / "s"), str(tmp_path / "log")
    assert _run_child(state, log, 12, durable=False) == signal.SIGKILL
    assert _run_child(state, log, 0, durable=False) == 0
    assert any("twice" in p for p in _check(log))
