"""The durable-state journal: reservations, generations, torn tails,
corruption, compaction, locking."""

from __future__ import annotations

import os
import stat
import uuid

import pytest

from qkdgate.errors import QkdgateError
from qkdgate.gateway.daemon.journal import (
    GenerationRegression,
    Journal,
    JournalCorrupt,
    JournalError,
    JournalLocked,
    KeyIdReused,
)


def kid(n: int) -> str:
    return str(uuid.UUID(int=n, version=4))


@pytest.fixture
def sdir(tmp_path):
    return str(tmp_path / "state")


def test_reserved_key_ids_survive_reopen_and_are_refused(sdir):
    with Journal.open(sdir) as j:
        j.reserve_qkd_keys("t1", 1, [kid(1), kid(2)])
        assert j.is_consumed(kid(1))
    with Journal.open(sdir) as j:
        assert j.is_consumed(kid(2)) and not j.is_consumed(kid(3))
        with pytest.raises(KeyIdReused) as ei:
            j.reserve_qkd_keys("t2", 1, [kid(3), kid(2)])
        assert ei.value.key_id == kid(2)
        # nothing of the refused batch was written
        assert not j.is_consumed(kid(3))
    assert issubclass(KeyIdReused, QkdgateError)


def test_key_ids_compare_canonically(sdir):
    with Journal.open(sdir) as j:
        j.reserve_qkd_key("t", 1, kid(5))
        with pytest.raises(KeyIdReused):
            j.reserve_qkd_key("t", 2, "{" + kid(5).upper() + "}")
        with pytest.raises(KeyIdReused):  # twice in one batch
            j.reserve_qkd_keys("t", 2, [kid(6), kid(6)])
        with pytest.raises(JournalError, match="not a UUID"):
            j.reserve_qkd_key("t", 2, "../../etc/passwd")


def test_generations_never_go_backwards(sdir):
    with Journal.open(sdir) as j:
        assert j.next_generation("t") == 1
        j.reserve_qkd_key("t", 1, kid(1))
        j.record_generation("t", 1)
        j.record_generation("t", 1)   # idempotent after a restart
        j.reserve_qkd_key("t", 2, kid(2))   # started, never committed (crash)
    with Journal.open(sdir) as j:
        assert j.committed_generation("t") == 1
        assert j.next_generation("t") == 3   # skips the interrupted generation
        with pytest.raises(GenerationRegression):
            j.reserve_qkd_key("t", 1, kid(9))   # at or below committed
        j.record_generation("t", 5)
        with pytest.raises(GenerationRegression):
            j.record_generation("t", 4)
        with pytest.raises(JournalError):
            j.record_generation("t", True)
        with pytest.raises(JournalError):
            j.record_generation("", 7)
        assert j.next_generation("other") == 1


def test_a_started_generation_survives_a_restart_without_its_commit(sdir):
    # Both ends killed between installing generation 7 and committing it:
    # the restart's floor is the started generation, not the committed one.
    with Journal.open(sdir) as j:
        assert j.started_generation("gw-b") == 0
        j.record_generation("t", 6)
        j.record_started("gw-b", 7)
        size = os.path.getsize(j.path)
        j.record_started("gw-b", 7)      # a retried install writes nothing more
        j.record_started("gw-b", 3)      # nor does a lower one
        assert os.path.getsize(j.path) == size
    with Journal.open(sdir) as j:
        assert j.committed_generation("t") == 6
        assert j.started_generation("gw-b") == 7
        assert j.started_generation("gw-c") == 0
        j.reserve_qkd_key("peer-gw-b", j.next_generation("peer-gw-b"), kid(1))
        assert j.started_generation("gw-b") == 8   # a QKD reservation counts too
        with pytest.raises(JournalError):
            j.record_started("", 9)


def test_files_are_private_whatever_the_umask(sdir):
    for gen, mask in ((1, 0o000), (2, 0o177)):  # wide open; one that strips the dir's x bit
        old = os.umask(mask)
        try:
            with Journal.open(sdir, compact_after=2) as j:
                j.reserve_qkd_key("t", gen, kid(gen))
                j.record_generation("t", gen)      # compacts: a new file via rename
        finally:
            os.umask(old)
        assert stat.S_IMODE(os.stat(sdir).st_mode) == 0o700
        for name in ("journal", "journal.lock"):
            assert stat.S_IMODE(os.stat(os.path.join(sdir, name)).st_mode) == 0o600, name


def test_one_daemon_per_state_directory(sdir):
    with Journal.open(sdir), pytest.raises(JournalLocked):
        Journal.open(sdir)
    Journal.open(sdir).close()   # released on close


def _journal_bytes(sdir):
    with open(os.path.join(sdir, "journal"), "rb") as f:
        return f.read()


def test_torn_last_record_is_dropped_at_every_byte(sdir):
    with Journal.open(sdir) as j:
        j.reserve_qkd_key("t", 1, kid(1))
        j.record_generation("t", 1)
        before = len(_journal_bytes(sdir))
        j.reserve_qkd_key("t", 2, kid(2))
    full = _journal_bytes(sdir)
    for cut in range(before, len(full)):
        with open(os.path.join(sdir, "journal"), "wb") as f:
            f.write(full[:cut])
        with Journal.open(sdir) as j:
            # the torn record never happened: its key is unused, gen 1 stands
            assert not j.is_consumed(kid(2)), cut
            assert j.next_generation("t") == 2
            assert j.is_consumed(kid(1))
        assert _journal_bytes(sdir) == full[:before]   # tail truncated on disk
    with open(os.path.join(sdir, "journal"), "wb") as f:
        f.write(full)
    with Journal.open(sdir) as j:
        assert j.is_consumed(kid(2))


def test_damage_before_the_tail_fails_closed(sdir):
    with Journal.open(sdir) as j:
        j.reserve_qkd_key("t", 1, kid(1))
        j.reserve_qkd_key("t", 2, kid(2))
    data = bytearray(_journal_bytes(sdir))
    second = data.index(b"\n") + 1
    data[second + 20] ^= 0x01          # flip a bit in the first key record
    with open(os.path.join(sdir, "journal"), "wb") as f:
        f.write(data)
    with pytest.raises(JournalCorrupt, match="refusing"):
        Journal.open(sdir)
    # and the lock is released after the refusal
    os.unlink(os.path.join(sdir, "journal"))
    Journal.open(sdir).close()


def test_unknown_format_version_is_refused(sdir):
    import json
    import zlib
    body = json.dumps({"t": "hdr", "v": 99}).encode()
    os.makedirs(sdir)
    with open(os.path.join(sdir, "journal"), "wb") as f:
        f.write(b"%08x %s\n" % (zlib.crc32(body), body))
    with pytest.raises(JournalCorrupt, match="version 99"):
        Journal.open(sdir)


def test_compaction_keeps_state_and_bounds_the_file(sdir):
    with Journal.open(sdir, compact_after=50, max_key_ids=30) as j:
        for g in range(1, 201):
            j.reserve_qkd_key("a", g, kid(g))
            j.record_generation("a", g)
        j.reserve_qkd_key("b", 7, kid(1000))
        size = len(_journal_bytes(sdir))
    assert size < 50 * 120     # never more than compact_after records
    with Journal.open(sdir) as j:
        assert j.committed_generation("a") == 200
        assert j.next_generation("b") == 8
        assert j.is_consumed(kid(1000)) and j.is_consumed(kid(200))
        assert not j.is_consumed(kid(1))          # aged out of the retention window
        with pytest.raises(GenerationRegression):  # ...but its generation is refused
            j.reserve_qkd_key("a", 1, kid(1))
    assert not os.path.exists(os.path.join(sdir, "journal.tmp"))


def test_leftover_temp_file_from_interrupted_compaction_is_ignored(sdir):
    with Journal.open(sdir) as j:
        j.reserve_qkd_key("t", 1, kid(1))
    with open(os.path.join(sdir, "journal.tmp"), "wb") as f:
        f.write(b"half a snapshot")
    with Journal.open(sdir) as j:
        assert j.is_consumed(kid(1))
    assert not os.path.exists(os.path.join(sdir, "journal.tmp"))


def test_use_after_close_is_an_error(sdir):
    j = Journal.open(sdir)
    j.close()
    with pytest.raises(JournalError, match="not open"):
        j.reserve_qkd_key("t", 1, kid(1))


@pytest.mark.parametrize("rec", [
    {"t": "snap", "tun": "t", "gen": 3, "started": "4"},
    {"t": "epoch", "e": 0},
    {"t": "epoch", "e": True},
    {"t": "epoch", "e": 2 ** 64},
    {"t": "peer", "peer": "", "e": 5},
    {"t": "peer", "peer": "b", "e": "5"},
    {"t": "keys", "tun": "t", "gen": 1, "ids": "not a list"},
    {"t": "what", "tun": "t", "gen": 1},
], ids=lambda r: "-".join(f"{k}={v!r}"[:20] for k, v in r.items()))
def test_malformed_records_with_a_valid_checksum_fail_closed(sdir, rec):
    # A record that passes its CRC but not its schema was written by a bug or
    # an attacker with write access: never guess, never crash with a non-journal error.
    import json
    import zlib
    os.makedirs(sdir)
    with open(os.path.join(sdir, "journal"), "wb") as f:
        for r in ({"t": "hdr", "v": 1}, rec, {"t": "hdr", "v": 1}):
            body = json.dumps(r).encode()
            f.write(b"%08x %s\n" % (zlib.crc32(body), body))
    with pytest.raises(JournalCorrupt):
        Journal.open(sdir)
