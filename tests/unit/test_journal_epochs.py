"""Persisted epochs (issue 17 finding 3): the local epoch only grows across
restarts and crashes, and each peer's authenticated-epoch high-water mark
only grows and survives restarts and compaction.

The crash test forks a child that hands out epochs and raises a peer's mark,
and kills it at every crash point the journal and the test define. Before the
kill it throws away every byte not yet fsynced (a power cut, modelled by an
injected FileOps that remembers how much of each file was fsynced), so an
epoch returned before its record was durable would be handed out twice.
"""

from __future__ import annotations

import os
import signal

import pytest
from test_journal_crash import run_forked

from qkdgate.gateway.daemon.journal import EPOCH_MAX, Journal, JournalError

PEER = "gw-b"
STEPS = 4


@pytest.fixture
def sdir(tmp_path):
    return str(tmp_path / "state")


def test_local_epoch_grows_across_reopen_even_when_the_clock_goes_back(sdir):
    clock = [1_000_000.0]
    with Journal.open(sdir, now=lambda: clock[0]) as j:
        assert j.local_epoch == 0
        first = j.next_local_epoch()
        assert first == 1_000_000                   # floor: Unix seconds
        assert j.next_local_epoch() == first + 1    # same second: the counter
    clock[0] = 5.0                                  # clock stepped back
    with Journal.open(sdir, now=lambda: clock[0]) as j:
        assert j.local_epoch == first + 1
        assert j.next_local_epoch() == first + 2
    clock[0] = 2_000_000.0                          # clock ahead of the counter
    with Journal.open(sdir, now=lambda: clock[0]) as j:
        assert j.next_local_epoch() == 2_000_000


def test_lost_state_directory_still_restarts_above_old_epochs_with_a_sane_clock(tmp_path):
    clock = [1_000_000.0]
    with Journal.open(str(tmp_path / "old"), now=lambda: clock[0]) as j:
        old = max(j.next_local_epoch() for _ in range(5))
    clock[0] += 60
    with Journal.open(str(tmp_path / "new"), now=lambda: clock[0]) as j:
        assert j.next_local_epoch() > old


def test_peer_epoch_is_a_durable_high_water_mark(sdir):
    with Journal.open(sdir) as j:
        assert j.peer_epoch(PEER) == 0
        j.record_peer_epoch(PEER, 7)
        j.record_peer_epoch(PEER, 5)     # lower: ignored, never lowers the mark
        assert j.peer_epoch(PEER) == 7
        j.record_peer_epoch("gw-c", 3)
        size = os.path.getsize(os.path.join(sdir, "journal"))
        j.record_peer_epoch(PEER, 7)     # equal: nothing written
        assert os.path.getsize(os.path.join(sdir, "journal")) == size
    with Journal.open(sdir) as j:
        assert (j.peer_epoch(PEER), j.peer_epoch("gw-c"), j.peer_epoch("x")) == (7, 3, 0)
        j.record_peer_epoch(PEER, EPOCH_MAX)
        for bad in (0, -1, EPOCH_MAX + 1, True, "9", 1.5):
            with pytest.raises(JournalError):
                j.record_peer_epoch(PEER, bad)
        for bad_peer in ("", 7, "p" * 256):
            with pytest.raises(JournalError):
                j.record_peer_epoch(bad_peer, 9)
    with Journal.open(sdir, now=lambda: EPOCH_MAX) as j:
        assert j.peer_epoch(PEER) == EPOCH_MAX
        assert j.next_local_epoch() == EPOCH_MAX   # the wire's 64-bit field is full
        with pytest.raises(JournalError, match="exhausted"):
            j.next_local_epoch()


def test_epochs_survive_compaction(sdir):
    with Journal.open(sdir, compact_after=4, now=lambda: 10) as j:
        for n in range(1, 20):
            j.record_peer_epoch(PEER, 100 + n)
            assert j.next_local_epoch() == 9 + n
        j.reserve_qkd_key("t", 1, "00000000-0000-4000-8000-000000000001")
    with open(os.path.join(sdir, "journal"), "rb") as f:
        assert f.read().count(b"\n") <= 4 + 2   # it really was compacted
    with Journal.open(sdir, now=lambda: 10) as j:
        assert j.peer_epoch(PEER) == 119
        assert j.local_epoch == 28
        assert j.next_local_epoch() == 29
        assert j.next_generation("t") == 2


def test_use_after_close_is_an_error(sdir):
    j = Journal.open(sdir)
    j.close()
    with pytest.raises(JournalError, match="not open"):
        j.next_local_epoch()
    with pytest.raises(JournalError, match="not open"):
        j.record_peer_epoch(PEER, 3)


# -- crash at every point, with unsynced bytes lost -----------------------------


class _PowerCutOps:
    """Real writes; fsync only notes how much of the file is durable."""

    def __init__(self) -> None:
        self.synced: dict[int, int] = {}   # inode -> durable size

    def write(self, fd, data):
        return os.write(fd, data)

    def fsync(self, fd):
        st = os.fstat(fd)
        self.synced[st.st_ino] = st.st_size

    def ftruncate(self, fd, length):
        os.ftruncate(fd, length)

    def cut_power(self, path: str) -> None:
        ino = os.stat(path).st_ino
        os.truncate(path, self.synced.get(ino, 0))


class _Crash:
    def __init__(self, at: int, ops: _PowerCutOps | None, path: str) -> None:
        self.at, self.ops, self.path, self.count = at, ops, path, 0

    def __call__(self, point: str) -> None:
        self.count += 1
        if self.count == self.at:
            if self.ops is not None:
                self.ops.cut_power(self.path)
            os.kill(os.getpid(), signal.SIGKILL)


def _life(state: str, log_path: str, crash_at: int, durable: bool) -> None:
    ops = _PowerCutOps()
    crash = _Crash(crash_at, ops, os.path.join(state, "journal"))
    j = Journal.open(state, compact_after=5, now=lambda: 1000, file_ops=ops,
                     fsync=durable, _crash_hook=crash)
    log = os.open(log_path, os.O_WRONLY | os.O_APPEND | os.O_CREAT, 0o600)

    def note(line: str) -> None:
        os.write(log, (line + "\n").encode())

    note(f"open {j.local_epoch} {j.peer_epoch(PEER)}")
    for _ in range(STEPS):
        epoch = j.next_local_epoch()
        note(f"local {epoch}")          # handed out: the protocol may use it now
        crash("used")
        j.record_peer_epoch(PEER, epoch * 10)
        note(f"peer {epoch * 10}")      # recorded: the mark may be relied on now
        crash("recorded")


def _run_child(state: str, log: str, crash_at: int, durable: bool = True) -> int:
    return run_forked(_life, state, log, crash_at, durable)


def _check(log_path: str) -> list[str]:
    problems, last_local, last_peer = [], 0, 0
    with open(log_path) as f:
        for line in f:
            kind, *vals = line.split()
            if kind == "open":
                local, peer = int(vals[0]), int(vals[1])
                if local < last_local:
                    problems.append(f"restart forgot local epoch {last_local} (has {local})")
                if peer < last_peer:
                    problems.append(f"restart lowered the peer mark {last_peer} to {peer}")
            elif kind == "local":
                if int(vals[0]) <= last_local:
                    problems.append(f"local epoch {vals[0]} after {last_local}")
                last_local = int(vals[0])
            elif kind == "peer":
                last_peer = int(vals[0])
    return problems


def _points_in_clean_run(tmp_path, monkeypatch) -> int:
    seen: list[str] = []
    monkeypatch.setattr(_Crash, "__call__", lambda self, point: seen.append(point))
    _life(str(tmp_path / "count"), str(tmp_path / "count.log"), 0, True)
    monkeypatch.undo()
    assert {"append-written", "append-torn", "compact-renamed", "used"} <= set(seen)
    return len(seen)


@pytest.mark.skipif(not hasattr(os, "fork"), reason="needs fork")
def test_power_cut_at_every_point_never_reuses_an_epoch(tmp_path, monkeypatch):
    total = _points_in_clean_run(tmp_path, monkeypatch)
    assert total > 25
    for n in range(1, total + 1):
        state, log = str(tmp_path / f"s{n}"), str(tmp_path / f"log{n}")
        assert _run_child(state, log, n) == signal.SIGKILL, f"point {n} not reached"
        if n % 3 == 0:
            assert _run_child(state, log, n) == signal.SIGKILL   # and again in the restart
        assert _run_child(state, log, 0) == 0
        problems = _check(log)
        assert not problems, f"cut at point {n}: {problems}"


@pytest.mark.skipif(not hasattr(os, "fork"), reason="needs fork")
def test_control_without_fsync_reuses_an_epoch(tmp_path):
    # With fsync off the power-cut model loses returned epochs, or the
    # checks above prove nothing.
    state, log = str(tmp_path / "s"), str(tmp_path / "log")
    assert _run_child(state, log, 9, durable=False) == signal.SIGKILL
    assert _run_child(state, log, 0, durable=False) == 0
    assert any("after" in p or "forgot" in p for p in _check(log))
