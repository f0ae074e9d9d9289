"""Durable state: consumed QKD key_IDs and per-tunnel generations.

Theory of operation: a QKD key is one-time material. If the daemon is killed
(SIGKILL, power loss) between fetching a key and finishing a rekey, the
restarted daemon must never feed the same key_ID into a KDF again, and the
tunnel's generation counter must never go backwards, or both peers could
derive the same traffic keys twice. So before a key is used its key_ID is
appended to a journal in the state directory and fsynced; only then does the
caller mix it. Likewise a generation is recorded as *started* together with
its keys, and as *committed* once the new SAs carry traffic; after a restart
:meth:`Journal.next_generation` is above both, and the peers reconverge by
taking the larger of their two proposals.

File format (``journal`` in the state directory, mode 0600): one record per
line, ``CRC32HEX SP JSON LF``. A record is written with one ``write`` and
then fsynced. A crash can only tear the last line; :meth:`Journal.open`
truncates a torn or checksum-failing *last* line and refuses (fails closed
with :class:`JournalCorrupt`) if damage appears anywhere before it, because
then we cannot know which keys were consumed. When the file grows past
``compact_after`` records it is rewritten as a snapshot: temp file, fsync,
``rename`` over the journal, fsync of the directory, so a crash leaves either
the old or the new file, both complete.

Retention: the newest ``max_key_ids`` key_IDs are kept (default 50,000,
weeks of rekeys). An older key_ID can no longer be recognised, but a message
carrying it names a generation at or below the committed one, which the
protocol refuses anyway; the KME also deletes delivered keys (ETSI GS QKD
014 5.1: a key is delivered once to each SAE).

Epochs (issue 17 finding 3): each start of the peer protocol takes a fresh
local epoch from :meth:`Journal.next_local_epoch`, a counter that is fsynced
before it is returned, so it is above every epoch this state directory ever
handed out, across restarts and crashes. It is also at least the current
Unix time in seconds (injected ``now``): if the state directory is lost, a
gateway with a sane clock still comes back above the epochs its peers
remember (WireGuard's TAI64N timestamp serves the same purpose). For each
peer the journal keeps the highest epoch that peer has *authenticated*
(:meth:`Journal.record_peer_epoch`, a durable high-water mark that only
grows), so a message replayed from a peer's earlier life can be dropped
before any KEM, signature or QKD work, even after our own restart.

I/O errors (issue 17 finding 8d): a failed append (short write, ENOSPC,
EIO, a failed fsync) truncates the file back to the end of the last good
record before anything else is written, so one full disk does not become a
damaged journal at the next start; the caller sees :class:`JournalIOError`
(with ``errno``) and the in-memory state is unchanged. If even the
truncation fails, every later update tries it again first and raises until
it succeeds. Callers treat any :class:`JournalError` as "no new QKD
generation now" (finding 5), never as a reason to exit.

One daemon per state directory: an exclusive ``flock`` on ``journal.lock``.
"""

from __future__ import annotations

import contextlib
import errno as _errno
import fcntl
import json
import os
import time
import uuid
import zlib
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from typing import Protocol, TypeGuard

from qkdgate.errors import QkdgateError

Record = dict[str, object]   # one journal record, as JSON

FORMAT_VERSION = 1
EPOCH_MAX = (1 << 64) - 1   # the wire header carries epochs as 64-bit (messages.HEADER)
EPOCH_RAISE_AHEAD = 86400   # seconds a peer may push our epoch past the clock
JOURNAL_NAME = "journal"
LOCK_NAME = "journal.lock"


class JournalError(QkdgateError):
    """The durable state cannot be used safely."""


class JournalCorrupt(JournalError):
    """The journal is damaged before its last record: which QKD keys were
    consumed is unknown, so the daemon must not start (fail closed)."""


class JournalIOError(JournalError):
    """Reading or writing the journal failed (ENOSPC, EIO, a short write, a
    failed fsync). The record being written did not happen: the file was cut
    back to the last good record (or will be before the next write) and the
    in-memory state is unchanged. ``op`` names the step, ``errno`` is the
    OS error number (``None`` for a short write that reported no error)."""

    def __init__(self, op: str, errno: int | None, path: str, detail: str = "") -> None:
        self.op, self.errno, self.path = op, errno, path
        text = f"journal {op} failed"
        if errno is not None:
            text += f": [{_errno.errorcode.get(errno, str(errno))}] {os.strerror(errno)}"
        if detail:
            text += f" ({detail})"
        super().__init__(f"{text}: {path}")


class JournalLocked(JournalError):
    """Another process holds the state directory."""


class KeyIdReused(JournalError):
    """A QKD key_ID was already consumed. From a peer this is a replay
    (callers raise RemoteProtocolError); from our own KME a protocol breach
    (KeySourceProtocolError)."""

    def __init__(self, key_id: str) -> None:
        self.key_id = key_id  # a key_ID is public (it travels in clear to the peer)
        super().__init__(f"QKD key_ID {key_id} was already consumed")


class GenerationRegression(JournalError):
    """A tunnel generation at or below one already committed."""

    def __init__(self, tunnel: str, generation: int, committed: int) -> None:
        self.tunnel, self.generation, self.committed = tunnel, generation, committed
        super().__init__(f"tunnel {tunnel!r}: generation {generation} is not above "
                         f"committed generation {committed}")


@dataclass
class TunnelState:
    committed: int = 0   # generation whose SAs carry traffic
    started: int = 0     # highest generation whose keys were reserved


@dataclass
class JournalState:
    """What :meth:`Journal.load` reconstructs from disk."""

    tunnels: dict[str, TunnelState] = field(default_factory=dict)
    key_ids: dict[str, None] = field(default_factory=dict)  # insertion-ordered set
    local_epoch: int = 0                                   # highest epoch handed out
    peer_epochs: dict[str, int] = field(default_factory=dict)  # highest authenticated
    records: int = 0
    truncated_bytes: int = 0   # torn tail removed on open


def _canonical_key_id(key_id: str) -> str:
    # ETSI GS QKD 014 6.3: key_ID is a UUID; compare canonical forms so case
    # or brace variants of one ID cannot slip past the check.
    try:
        return str(uuid.UUID(str(key_id)))
    except ValueError:
        raise JournalError(f"not a UUID key_ID: {str(key_id)[:80]!r}") from None


def _check_tunnel(tunnel: str) -> None:
    if not isinstance(tunnel, str) or not tunnel or len(tunnel) > 255:
        raise JournalError(f"tunnel name must be a non-empty string, not {tunnel!r}")


def _check_peer(peer: str) -> None:
    if not isinstance(peer, str) or not peer or len(peer) > 255:
        raise JournalError(f"peer name must be a non-empty string, not {peer!r}")


def _is_epoch(value: object) -> TypeGuard[int]:
    return isinstance(value, int) and not isinstance(value, bool) and 0 < value <= EPOCH_MAX


def _encode(record: Record) -> bytes:
    body = json.dumps(record, separators=(",", ":"), sort_keys=True).encode()
    return b"%08x %s\n" % (zlib.crc32(body), body)


def _decode(line: bytes) -> Record | None:
    """The record in one line, or None if it is torn or fails its checksum."""
    if len(line) < 10 or line[8:9] != b" ":
        return None
    body = line[9:]
    try:
        if int(line[:8], 16) != zlib.crc32(body):
            return None
        rec = json.loads(body)
    except ValueError:
        return None
    return rec if isinstance(rec, dict) else None


def _apply(state: JournalState, rec: Record) -> None:
    kind = rec.get("t")
    if kind == "hdr":
        if rec.get("v") != FORMAT_VERSION:
            raise JournalCorrupt(f"journal format version {rec.get('v')!r} is not supported")
        return
    if kind == "epoch":
        epoch = rec.get("e")
        if not _is_epoch(epoch):
            raise JournalCorrupt("malformed local epoch record in journal")
        state.local_epoch = max(state.local_epoch, epoch)
        return
    if kind == "peer":
        peer, epoch = rec.get("peer"), rec.get("e")
        if not isinstance(peer, str) or not peer or not _is_epoch(epoch):
            raise JournalCorrupt("malformed peer epoch record in journal")
        state.peer_epochs[peer] = max(state.peer_epochs.get(peer, 0), epoch)
        return
    tunnel = rec.get("tun")
    gen = rec.get("gen")
    if not isinstance(tunnel, str) or not isinstance(gen, int):
        raise JournalCorrupt(f"malformed journal record of type {kind!r}")
    if kind == "keys":
        ids = rec.get("ids", ())
        if not isinstance(ids, list) or not all(isinstance(k, str) for k in ids):
            raise JournalCorrupt("malformed key_ID list in journal")
        state.key_ids.update(dict.fromkeys(ids))
        if tunnel:  # "" = retained IDs from a snapshot, no tunnel
            ts = state.tunnels.setdefault(tunnel, TunnelState())
            ts.started = max(ts.started, gen)
        return
    ts = state.tunnels.setdefault(tunnel, TunnelState())
    if kind == "gen":
        ts.committed = max(ts.committed, gen)
        ts.started = max(ts.started, gen)
    elif kind == "snap":
        started = rec.get("started", gen)
        if not isinstance(started, int):
            raise JournalCorrupt("malformed snapshot record in journal")
        ts.committed = max(ts.committed, gen)
        ts.started = max(ts.started, started)
    else:
        raise JournalCorrupt(f"unknown journal record type {kind!r}")


class FileOps(Protocol):
    """The three calls that change the journal file on disk. Injectable so
    tests can make them fail (short write, ENOSPC, EIO) on demand."""

    def write(self, fd: int, data: bytes | memoryview, /) -> int: ...

    def fsync(self, fd: int) -> None: ...

    def ftruncate(self, fd: int, length: int) -> None: ...


class _OsFileOps:
    write = staticmethod(os.write)
    fsync = staticmethod(os.fsync)
    ftruncate = staticmethod(os.ftruncate)


class Journal:
    """Append-only, fsynced record of consumed QKD keys and generations.

    Typical rekey (both roles)::

        gen = max(journal.next_generation(t), peer_proposal)
        journal.reserve_qkd_keys(t, gen, [k.key_id for k in keys])  # durable first
        ... mix keys, install SAs, switch outbound ...
        journal.record_generation(t, gen)
    """

    def __init__(self, state_dir: str, *, fsync: bool = True, max_key_ids: int = 50_000,
                 compact_after: int = 10_000, now: Callable[[], float] = time.time,
                 file_ops: FileOps | None = None,
                 _crash_hook: Callable[[str], None] | None = None) -> None:
        self.dir = os.fspath(state_dir)
        self.path = os.path.join(self.dir, JOURNAL_NAME)
        self._fsync = fsync
        self.max_key_ids = max_key_ids
        self.compact_after = compact_after
        self._now = now
        self._hook = _crash_hook or (lambda point: None)
        self._split = _crash_hook is not None
        self._ops: FileOps = file_ops or _OsFileOps()
        self._state = JournalState()
        self._fd = -1
        self._lock_fd = -1
        self._good_end = 0      # file size after the last good record
        self._torn = False      # an append failed and its bytes may still be there

    # -- opening -----------------------------------------------------------

    @classmethod
    def open(cls, state_dir: str, **kwargs: object) -> Journal:
        j = cls(state_dir, **kwargs)  # type: ignore[arg-type]
        j._open()
        return j

    def _open(self) -> None:
        # Explicit modes: the process umask is shared state (another task may
        # have narrowed or widened it), and a journal of key use is private.
        if not os.path.isdir(self.dir):
            os.makedirs(self.dir, mode=0o700, exist_ok=True)
            os.chmod(self.dir, 0o700)
        self._lock_fd = os.open(os.path.join(self.dir, LOCK_NAME),
                                os.O_RDWR | os.O_CREAT | os.O_CLOEXEC, 0o600)
        os.fchmod(self._lock_fd, 0o600)
        try:
            fcntl.flock(self._lock_fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except BlockingIOError:
            os.close(self._lock_fd)
            self._lock_fd = -1
            raise JournalLocked(f"state directory {self.dir} is in use by another "
                                "process") from None
        try:
            # A leftover temp file is an unfinished compaction; the journal
            # it was meant to replace is still complete.
            tmp = self.path + ".tmp"
            if os.path.exists(tmp):
                os.unlink(tmp)
            self._state = self.load()
            self._fd = os.open(self.path, os.O_WRONLY | os.O_APPEND | os.O_CREAT | os.O_CLOEXEC,
                               0o600)
            os.fchmod(self._fd, 0o600)
            self._good_end = os.fstat(self._fd).st_size
            if self._state.records == 0:
                self._append({"t": "hdr", "v": FORMAT_VERSION, "created": int(self._now())})
                self._sync_dir()
        except OSError as exc:
            self.close()
            raise JournalIOError("open", exc.errno, self.path) from None
        except BaseException:
            self.close()
            raise

    def load(self) -> JournalState:
        """Read the journal, truncating a torn last record; raise
        :class:`JournalCorrupt` on damage anywhere else."""
        state = JournalState()
        try:
            with open(self.path, "rb") as f:
                data = f.read()
        except FileNotFoundError:
            return state
        pos = 0
        while pos < len(data):
            end = data.find(b"\n", pos)
            line = data[pos:end] if end >= 0 else data[pos:]
            rec = _decode(line) if end >= 0 else None
            if rec is None:
                if end >= 0 and end + 1 < len(data):
                    raise JournalCorrupt(f"{self.path}: damaged record at byte {pos} "
                                         f"followed by more records; refusing to guess which "
                                         f"QKD keys were consumed")
                state.truncated_bytes = len(data) - pos
                with open(self.path, "r+b") as f:
                    f.truncate(pos)
                    if self._fsync:
                        os.fsync(f.fileno())
                break
            _apply(state, rec)
            state.records += 1
            pos = end + 1
        return state

    # -- queries -----------------------------------------------------------

    def committed_generation(self, tunnel: str) -> int:
        ts = self._state.tunnels.get(tunnel)
        return ts.committed if ts else 0

    def next_generation(self, tunnel: str) -> int:
        """A generation number never used before for this tunnel, even by a
        rekey that was interrupted after its keys were reserved."""
        ts = self._state.tunnels.get(tunnel)
        return (max(ts.committed, ts.started) if ts else 0) + 1

    def is_consumed(self, key_id: str) -> bool:
        return _canonical_key_id(key_id) in self._state.key_ids

    def peer_epoch(self, peer: str) -> int:
        """The highest epoch ``peer`` has authenticated with (0 if none)."""
        return self._state.peer_epochs.get(peer, 0)

    @property
    def local_epoch(self) -> int:
        """The last epoch :meth:`next_local_epoch` handed out (0 if none)."""
        return self._state.local_epoch

    @property
    def tunnels(self) -> dict[str, TunnelState]:
        return {k: TunnelState(v.committed, v.started) for k, v in self._state.tunnels.items()}

    # -- updates -----------------------------------------------------------

    def reserve_qkd_keys(self, tunnel: str, generation: int, key_ids: Sequence[str]) -> None:
        """Durably mark ``key_ids`` consumed for ``generation`` of ``tunnel``.

        Returns only after the record is on disk; raises :class:`KeyIdReused`
        (nothing written) if any ID was consumed before, and
        :class:`GenerationRegression` if ``generation`` is not above the
        committed one. Call it before the keys reach any KDF.
        """
        self._check_open()
        _check_tunnel(tunnel)
        ids = [_canonical_key_id(k) for k in key_ids]
        if len(set(ids)) != len(ids):
            raise KeyIdReused(next(k for k in ids if ids.count(k) > 1))
        for kid in ids:
            if kid in self._state.key_ids:
                raise KeyIdReused(kid)
        self._check_generation(tunnel, generation)
        rec = {"t": "keys", "tun": tunnel, "gen": generation, "ids": ids}
        self._append(rec)
        _apply(self._state, rec)
        self._maybe_compact()

    def record_started(self, peer: str, generation: int) -> None:
        """Durably record that ``generation`` of ``peer``'s exchange is about
        to reach the kernel (before its first SA is installed).

        A generation is committed only once the exchange ends; if both ends
        die between an install and that commit, neither journal holds it, and
        a restart from the committed floor would install the same generation
        number again. :meth:`started_generation` gives the restart a floor
        above it. Stored as a ``keys`` record without key_IDs under
        ``peer-NAME``, the name the QKD reservations of that peer use (no new
        record type). Idempotent: a generation already started is not written
        again."""
        self._check_open()
        _check_peer(peer)
        if generation <= self.started_generation(peer):
            return
        self.reserve_qkd_keys("peer-" + peer, generation, [])

    def started_generation(self, peer: str) -> int:
        """The highest generation :meth:`record_started` or a QKD reservation
        recorded for ``peer`` (0 if none)."""
        return self.next_generation("peer-" + peer) - 1

    def reserve_qkd_key(self, tunnel: str, generation: int, key_id: str) -> None:
        self.reserve_qkd_keys(tunnel, generation, [key_id])

    def record_generation(self, tunnel: str, generation: int) -> None:
        """Durably record that ``generation`` now carries the tunnel's traffic.
        Re-recording the committed generation is a no-op (idempotent after a
        restart); a lower one raises :class:`GenerationRegression`."""
        self.record_generations([tunnel], generation)

    def record_generations(self, tunnels: Sequence[str], generation: int) -> None:
        """:meth:`record_generation` for every tunnel of an exchange in one
        write and one fsync (issue 19: a record and an fsync per tunnel made
        1,000 fsyncs per rekey of a 1,000-tunnel peer). Every tunnel is
        checked before anything is written; a crash inside the write leaves
        a prefix of the records, each whole or cut off by the torn-tail
        repair, as one write per tunnel would have."""
        self._check_open()
        recs: list[Record] = []
        for tunnel in tunnels:
            _check_tunnel(tunnel)
            if generation == self.committed_generation(tunnel):
                continue
            self._check_generation(tunnel, generation)
            recs.append({"t": "gen", "tun": tunnel, "gen": generation})
        if not recs:
            return
        self._append(*recs)
        for rec in recs:
            _apply(self._state, rec)
        self._maybe_compact()

    def next_local_epoch(self) -> int:
        """A new local epoch: above every value returned before from this
        state directory (across restarts and crashes) and at least the
        current Unix time in seconds. Durable (fsynced) before it is
        returned; if it raises, no epoch was handed out."""
        self._check_open()
        epoch = max(self._state.local_epoch + 1, int(self._now()))
        if epoch > EPOCH_MAX:
            raise JournalError("local epoch counter exhausted")
        rec = {"t": "epoch", "e": epoch}
        self._append(rec)
        _apply(self._state, rec)
        self._maybe_compact()
        return epoch

    def raise_local_epoch(self, at_least: int) -> None:
        """Durably move the local epoch counter to ``at_least`` (the next
        :meth:`next_local_epoch` is above it): a peer knows this gateway by
        that epoch (the other node of an HA pair drew it, or our counter went
        back; docs/protocol.md 10.1). The value comes from the network, so it
        may be at most :data:`EPOCH_RAISE_AHEAD` seconds past the wall clock:
        a forged notice can move the counter no further than that, however
        often it is sent. A value at or below the counter is a no-op."""
        self._check_open()
        if not _is_epoch(at_least):
            raise JournalError(f"epoch must be an integer in 1..2**64-1, not {at_least!r}")
        if at_least <= self._state.local_epoch:
            return
        if at_least > int(self._now()) + EPOCH_RAISE_AHEAD:
            raise JournalError(f"epoch {at_least} is more than {EPOCH_RAISE_AHEAD} s ahead "
                               "of this clock: not raised to it")
        rec = {"t": "epoch", "e": at_least}
        self._append(rec)
        _apply(self._state, rec)
        self._maybe_compact()

    def record_peer_epoch(self, peer: str, epoch: int) -> None:
        """Durably raise ``peer``'s high-water mark to ``epoch`` (an epoch the
        peer has just authenticated with). A value at or below the mark is a
        no-op: the mark only grows. Returns once the record is on disk."""
        self._check_open()
        _check_peer(peer)
        if not _is_epoch(epoch):
            raise JournalError(f"epoch must be an integer in 1..2**64-1, not {epoch!r}")
        if epoch <= self.peer_epoch(peer):
            return
        rec = {"t": "peer", "peer": peer, "e": epoch}
        self._append(rec)
        _apply(self._state, rec)
        self._maybe_compact()

    def compact(self) -> None:
        """Rewrite the journal as a snapshot (atomic: temp, fsync, rename)."""
        self._check_open()
        keep = list(self._state.key_ids)[-self.max_key_ids:] if self.max_key_ids else []
        recs: list[Record] = [{"t": "hdr", "v": FORMAT_VERSION, "created": int(self._now())}]
        if self._state.local_epoch:
            recs.append({"t": "epoch", "e": self._state.local_epoch})
        for peer, epoch in sorted(self._state.peer_epochs.items()):
            recs.append({"t": "peer", "peer": peer, "e": epoch})
        for name, ts in sorted(self._state.tunnels.items()):
            recs.append({"t": "snap", "tun": name, "gen": ts.committed, "started": ts.started})
        for i in range(0, len(keep), 1000):
            # Retained IDs travel as "keys" records under generation 0 so they
            # never move any tunnel's counters.
            recs.append({"t": "keys", "tun": "", "gen": 0, "ids": keep[i:i + 1000]})
        data = b"".join(_encode(r) for r in recs)
        tmp = self.path + ".tmp"
        # The new file's descriptor is opened before the rename so that once
        # the rename is done we can never append to the replaced inode.
        try:
            fd = os.open(tmp, os.O_WRONLY | os.O_APPEND | os.O_CREAT | os.O_TRUNC | os.O_CLOEXEC,
                         0o600)
        except OSError as exc:
            raise JournalIOError("compact", exc.errno, tmp) from None
        try:
            os.fchmod(fd, 0o600)
            self._write_all(fd, data, "compact")
            self._hook("compact-written")
            if self._fsync:
                self._ops.fsync(fd)
            self._hook("compact-synced")
            os.replace(tmp, self.path)
        except BaseException as exc:
            # The old journal is untouched and still ours.
            os.close(fd)
            with contextlib.suppress(OSError):   # else removed at the next open
                os.unlink(tmp)
            if isinstance(exc, OSError):
                raise JournalIOError("compact", exc.errno, tmp) from None
            raise
        os.close(self._fd)
        self._fd, self._good_end, self._torn = fd, len(data), False
        self._state.key_ids = dict.fromkeys(keep)
        self._state.records = len(recs)
        self._hook("compact-renamed")
        try:
            self._sync_dir()
        except OSError as exc:
            # Either file is complete; the rename may only not be durable yet.
            raise JournalIOError("compact directory fsync", exc.errno, self.dir) from None

    def close(self) -> None:
        for attr in ("_fd", "_lock_fd"):
            fd = getattr(self, attr)
            if fd >= 0:
                os.close(fd)  # closing the lock fd releases the flock
                setattr(self, attr, -1)

    def __enter__(self) -> Journal:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()

    # -- internals ---------------------------------------------------------

    def _check_open(self) -> None:
        if self._fd < 0:
            raise JournalError("journal is not open")

    def _check_generation(self, tunnel: str, generation: int) -> None:
        if not isinstance(generation, int) or isinstance(generation, bool) or generation < 1:
            raise JournalError(f"generation must be a positive integer, not {generation!r}")
        committed = self.committed_generation(tunnel)
        if generation <= committed:
            raise GenerationRegression(tunnel, generation, committed)

    def _write_all(self, fd: int, data: bytes, op: str) -> None:
        # POSIX allows a write to be short; the rest is retried, and a write
        # that makes no progress is a full disk that did not say so.
        view, done = memoryview(data), 0
        while done < len(data):
            if self._split and done == 0 and len(data) > 1:
                # crash tests: let a kill land inside a record
                n = self._ops.write(fd, view[:len(data) // 2])
                self._hook("append-torn" if op == "append" else "compact-torn")
            else:
                n = self._ops.write(fd, view[done:])
            if n <= 0:
                raise JournalIOError(op, None, self.path,
                                     f"short write: {done} of {len(data)} bytes")
            done += n

    def _append(self, *recs: Record) -> None:
        data = b"".join(_encode(rec) for rec in recs)
        if self._torn:
            self._repair()
        self._hook("append-before")
        self._torn = True   # from here until fsync returns, the tail is suspect
        try:
            self._write_all(self._fd, data, "append")
            self._hook("append-written")
            if self._fsync:
                self._ops.fsync(self._fd)
        except (OSError, JournalIOError) as exc:
            err = exc if isinstance(exc, JournalIOError) else \
                JournalIOError("append", exc.errno, self.path)
            try:
                self._repair()
            except JournalIOError as again:
                raise err from again
            raise err from None
        self._torn = False
        self._good_end += len(data)
        self._state.records += len(recs)
        self._hook("append-synced")

    def _repair(self) -> None:
        """Cut the file back to the last good record and make that durable."""
        # After a failed fsync the kernel may already have dropped the dirty
        # pages (fsync(2), ERRORS): the failed record is not trusted whether
        # or not some of it reached the disk.
        try:
            self._ops.ftruncate(self._fd, self._good_end)
            if self._fsync:
                self._ops.fsync(self._fd)
        except OSError as exc:
            raise JournalIOError("truncate after a failed append", exc.errno, self.path) from None
        self._torn = False

    def _maybe_compact(self) -> None:
        if self.compact_after and self._state.records >= self.compact_after:
            self.compact()

    def _sync_dir(self) -> None:
        if not self._fsync:
            return
        fd = os.open(self.dir, os.O_RDONLY | os.O_DIRECTORY | os.O_CLOEXEC)
        try:
            os.fsync(fd)
        finally:
            os.close(fd)
