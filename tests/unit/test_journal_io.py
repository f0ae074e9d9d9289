"""A failed append (short write, ENOSPC, EIO, failed fsync) must not leave
torn bytes for the next append to land after (issue 17 finding 8d): the
journal cuts the file back to its last good record before anything else is
written, raises JournalIOError (a JournalError, with errno), and keeps its
in-memory state as it was. Faults come from an injected FileOps, and once
from the real kernel (RLIMIT_FSIZE makes write(2) short, then EFBIG)."""

from __future__ import annotations

import errno
import os
import resource
import signal
import sys
import uuid

import pytest

from qkdgate.gateway.daemon.journal import Journal, JournalError, JournalIOError


def kid(n: int) -> str:
    return str(uuid.UUID(int=n, version=4))


class FaultyOps:
    """os.write/fsync/ftruncate, with faults armed by the test.

    ``short`` = n: the next write stores only its first n bytes and returns
    n; if n > 0 the write after that raises ``err``. ``fail_fsync`` / ``fail_truncate``
    raise ``err`` until cleared.
    """

    def __init__(self) -> None:
        self.short: int | None = None
        self.fail_next_write = False
        self.fail_fsync = False
        self.fail_truncate = False
        self.err = errno.ENOSPC
        self.writes = 0

    def write(self, fd, data):
        if self.fail_next_write:
            self.fail_next_write = False
            raise OSError(self.err, os.strerror(self.err))
        if self.short is not None:
            n, self.short = self.short, None
            self.fail_next_write = n > 0   # 0 bytes stored is already the failure
            self.writes += 1
            return os.write(fd, bytes(data[:n])) if n else 0
        self.writes += 1
        return os.write(fd, data)

    def fsync(self, fd):
        if self.fail_fsync:
            raise OSError(self.err, os.strerror(self.err))
        os.fsync(fd)

    def ftruncate(self, fd, length):
        if self.fail_truncate:
            raise OSError(self.err, os.strerror(self.err))
        os.ftruncate(fd, length)


@pytest.fixture
def sdir(tmp_path):
    return str(tmp_path / "state")


def _size(sdir: str) -> int:
    return os.path.getsize(os.path.join(sdir, "journal"))


def _record_len(sdir: str) -> int:
    """Length of the key record the tests fail to append."""
    with Journal.open(sdir + "-probe") as j:
        before = _size(sdir + "-probe")
        j.reserve_qkd_keys("t", 2, [kid(2)])
        return _size(sdir + "-probe") - before


def test_short_write_at_every_byte_then_enospc_leaves_no_torn_bytes(sdir):
    rec_len = _record_len(sdir)
    for cut in range(rec_len):
        d = f"{sdir}{cut}"
        ops = FaultyOps()
        with Journal.open(d, file_ops=ops) as j:
            j.reserve_qkd_keys("t", 1, [kid(1)])
            good = _size(d)
            ops.short = cut
            with pytest.raises(JournalIOError) as ei:
                j.reserve_qkd_keys("t", 2, [kid(2)])
            # a write that stores nothing and reports no error is a short write too
            assert ei.value.errno == (errno.ENOSPC if cut else None)
            assert _size(d) == good, f"torn bytes left after a {cut}-byte write"
            assert not j.is_consumed(kid(2))           # state unchanged
            assert j.next_generation("t") == 2
            j.reserve_qkd_keys("t", 2, [kid(3)])       # disk has room again
        with Journal.open(d) as j:                      # no JournalCorrupt
            assert j.is_consumed(kid(1)) and j.is_consumed(kid(3))
            assert not j.is_consumed(kid(2))


@pytest.mark.parametrize("err", [errno.EIO, errno.ENOSPC, errno.EDQUOT])
def test_failed_fsync_drops_the_record(sdir, err):
    ops = FaultyOps()
    with Journal.open(sdir, file_ops=ops) as j:
        good = _size(sdir)
        ops.fail_fsync, ops.err = True, err
        with pytest.raises(JournalIOError) as ei:
            j.next_local_epoch()
        assert ei.value.errno == err
        assert j.local_epoch == 0
        # The truncation's own fsync failed too, so the tail is still suspect.
        ops.fail_fsync = False
        epoch = j.next_local_epoch()
        assert _size(sdir) > good
    with Journal.open(sdir) as j:
        assert j.local_epoch == epoch


def test_until_the_truncation_succeeds_nothing_else_is_written(sdir):
    ops = FaultyOps()
    with Journal.open(sdir, file_ops=ops) as j:
        j.record_peer_epoch("b", 5)
        good = _size(sdir)
        ops.short, ops.fail_truncate, ops.err = 7, True, errno.EIO
        with pytest.raises(JournalIOError, match="EIO"):
            j.record_peer_epoch("b", 6)
        torn = _size(sdir)
        assert torn == good + 7                  # the kernel kept the torn bytes
        writes = ops.writes
        for _ in range(3):
            with pytest.raises(JournalIOError, match="truncate"):
                j.record_peer_epoch("b", 7)
        assert ops.writes == writes and _size(sdir) == torn
        assert j.peer_epoch("b") == 5
        ops.fail_truncate = False
        j.record_peer_epoch("b", 8)              # cut back first, then append
    with Journal.open(sdir) as j:
        assert j.peer_epoch("b") == 8


def test_failed_compaction_keeps_the_old_journal(sdir):
    ops = FaultyOps()
    with Journal.open(sdir, file_ops=ops, compact_after=0) as j:
        for g in range(1, 4):
            j.reserve_qkd_key("t", g, kid(g))
        ops.short = 10
        with pytest.raises(JournalIOError, match="compact"):
            j.compact()
        assert not os.path.exists(os.path.join(sdir, "journal.tmp"))
        j.reserve_qkd_key("t", 4, kid(4))
        j.compact()
        j.reserve_qkd_key("t", 5, kid(5))
    with Journal.open(sdir) as j:
        assert all(j.is_consumed(kid(g)) for g in range(1, 6))


def test_io_error_is_a_journal_error_and_keeps_secrets_out():
    exc = JournalIOError("append", errno.ENOSPC, "/var/lib/qkdgate/journal")
    assert isinstance(exc, JournalError)
    assert str(exc) == ("journal append failed: [ENOSPC] No space left on device: "
                        "/var/lib/qkdgate/journal")


def _real_short_write(sdir: str) -> None:  # pragma: no cover - runs in a child
    signal.signal(signal.SIGXFSZ, signal.SIG_IGN)   # get EFBIG, not a signal
    with Journal.open(sdir) as j:
        j.reserve_qkd_key("t", 1, kid(1))
        good = _size(sdir)
        resource.setrlimit(resource.RLIMIT_FSIZE, (good + 25, resource.RLIM_INFINITY))
        try:
            j.reserve_qkd_keys("t", 2, [kid(2), kid(3)])
        except JournalIOError as exc:
            assert exc.errno == errno.EFBIG, exc  # noqa: PT017  raise-or-not decides below
        else:
            raise AssertionError("the kernel took the whole record")
        assert _size(sdir) == good
        resource.setrlimit(resource.RLIMIT_FSIZE, (resource.RLIM_INFINITY,) * 2)
        j.reserve_qkd_key("t", 2, kid(4))
    with Journal.open(sdir) as j:
        assert j.is_consumed(kid(4)) and not j.is_consumed(kid(2))


@pytest.mark.skipif(not hasattr(os, "fork"), reason="needs fork")
def test_real_kernel_short_write(sdir):
    sys.stdout.flush()
    pid = os.fork()
    if pid == 0:  # pragma: no cover - child
        code = 0
        try:
            _real_short_write(sdir)
        except BaseException:  # noqa: BLE001  forked child: report anything, exit non-zero
            import traceback
            traceback.print_exc()
            code = 3
        os._exit(code)
    _, status = os.waitpid(pid, 0)
    assert os.WIFEXITED(status) and os.WEXITSTATUS(status) == 0, status


class CountingOps(FaultyOps):
    def __init__(self) -> None:
        super().__init__()
        self.fsyncs = 0

    def fsync(self, fd):
        self.fsyncs += 1
        super().fsync(fd)


def test_the_generations_of_an_exchange_are_one_write_and_one_fsync(tmp_path):
    """Issue 19: a 1,000-tunnel peer's rekey made 1,000 fsyncs."""
    ops = CountingOps()
    tunnels = [f"t{i}" for i in range(500)]
    with Journal.open(str(tmp_path), file_ops=ops) as j:
        j.record_generation("t0", 1)
        writes, fsyncs = ops.writes, ops.fsyncs
        j.record_generations(tunnels, 2)
        assert (ops.writes - writes, ops.fsyncs - fsyncs) == (1, 1)
        j.record_generations(tunnels, 2)            # all committed: nothing written
        assert (ops.writes - writes, ops.fsyncs - fsyncs) == (1, 1)
    with Journal.open(str(tmp_path)) as j:
        assert all(j.committed_generation(t) == 2 for t in tunnels)


def test_a_regression_in_any_tunnel_writes_none_of_them(tmp_path):
    from qkdgate.gateway.daemon.journal import GenerationRegression
    with Journal.open(str(tmp_path)) as j:
        j.record_generation("b", 5)
        with pytest.raises(GenerationRegression):
            j.record_generations(["a", "b", "c"], 4)
        assert (j.committed_generation("a"), j.committed_generation("c")) == (0, 0)


def test_a_failed_multi_record_write_is_cut_back_whole(tmp_path):
    ops = FaultyOps()
    with Journal.open(str(tmp_path), file_ops=ops) as j:
        j.record_generation("t0", 1)
        ops.short = 3 * len(b'01234567 {"gen":2,"t":"gen","tun":"tN"}\n') + 5
        with pytest.raises(JournalIOError):
            j.record_generations([f"t{i}" for i in range(6)], 2)
        # the failed write is cut back: nothing of it is trusted
        assert all(j.committed_generation(f"t{i}") == (1 if i == 0 else 0) for i in range(6))
    with Journal.open(str(tmp_path)) as j:
        assert all(j.committed_generation(f"t{i}") == (1 if i == 0 else 0) for i in range(6))
