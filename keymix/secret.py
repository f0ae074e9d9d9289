"""SecretBytes: key material that never prints and is wiped when released.

Theory of operation: every key qkdgate derives or receives is wrapped in
:class:`SecretBytes` as soon as it enters the process. The wrapper keeps the
bytes in a private ``bytearray`` so :meth:`wipe` (and garbage collection)
can overwrite them. ``repr``/``str``/``format`` show only a short, salted
fingerprint that cannot be used to test guesses across processes. Pickling
is refused so secrets cannot leak into caches or multiprocessing queues.

What is *not* wiped, honestly: pyca/cryptography and OpenSSL return
immutable ``bytes`` objects for shared secrets and derived keys; those
copies live until the interpreter frees them and their memory is reused.
Likewise :meth:`reveal` hands out a ``bytes`` copy for APIs that demand one
(netlink encoders, HKDF). We minimise their lifetime, and the daemon
disables core dumps (``PR_SET_DUMPABLE`` 0) so they cannot reach a disk.
"""

from __future__ import annotations

import contextlib
import hashlib
import hmac
import os
from dataclasses import dataclass
from typing import NoReturn, SupportsIndex

# Per-process random salt for fingerprints: equal fingerprints within one run
# let logs correlate keys, but an offline attacker cannot test key guesses.
_FP_SALT = os.urandom(16)


class SecretBytes:
    __slots__ = ("__weakref__", "_buf")

    def __init__(self, data: bytes | bytearray | memoryview) -> None:
        if not isinstance(data, (bytes, bytearray, memoryview)):
            raise TypeError("SecretBytes needs bytes-like data")
        self._buf = bytearray(data)

    def reveal(self) -> bytes:
        """The secret as ``bytes``, for crypto APIs. Keep the copy short-lived."""
        return bytes(self._buf)

    def __len__(self) -> int:
        return len(self._buf)

    def fingerprint(self) -> str:
        """A salted 8-hex-digit tag, stable within this process only."""
        return hmac.new(_FP_SALT, self._buf, hashlib.sha256).hexdigest()[:8]

    def __repr__(self) -> str:
        return f"<SecretBytes len={len(self._buf)} fp={self.fingerprint()}>"

    __str__ = __repr__

    def __format__(self, spec: str) -> str:
        return repr(self)

    def __eq__(self, other: object) -> bool:
        if isinstance(other, SecretBytes):
            return hmac.compare_digest(self._buf, other._buf)
        return NotImplemented

    def __hash__(self) -> int:  # secrets are not dictionary keys
        raise TypeError("SecretBytes is unhashable")

    def __bytes__(self) -> bytes:
        raise TypeError("use SecretBytes.reveal() to take a copy of a secret")

    def __reduce_ex__(self, protocol: SupportsIndex) -> NoReturn:
        raise TypeError("SecretBytes cannot be pickled")

    def __copy__(self) -> SecretBytes:
        return SecretBytes(self._buf)

    def __deepcopy__(self, memo: dict[int, object]) -> SecretBytes:
        return SecretBytes(self._buf)

    def wipe(self) -> None:
        """Overwrite the buffer with zeros and forget it.

        Zeroing in place works even while a ``memoryview`` pins the buffer;
        resizing would not, so the object switches to a fresh empty buffer
        instead of failing (a wiped secret must never read back as zeros).
        """
        buf = self._buf
        buf[:] = bytes(len(buf))   # same-length slice assignment: in place
        self._buf = bytearray()
        with contextlib.suppress(BufferError):  # exported to a memoryview: already zeroed
            buf.clear()

    def __del__(self) -> None:
        # At interpreter shutdown even builtins may be gone, and an exception
        # raised by __del__ reaches nobody (it is only printed).
        with contextlib.suppress(Exception):
            self.wipe()

    def __enter__(self) -> SecretBytes:
        return self

    def __exit__(self, *exc: object) -> None:
        self.wipe()


@dataclass(frozen=True)
class CoreDumpStatus:
    """What :func:`disable_core_dumps` managed to do."""

    dumpable_cleared: bool
    rlimit_core_zero: bool
    detail: str

    @property
    def ok(self) -> bool:
        return self.dumpable_cleared and self.rlimit_core_zero


_PR_SET_DUMPABLE = 4  # include/uapi/linux/prctl.h


def disable_core_dumps() -> CoreDumpStatus:
    """Keep key material out of core files and away from same-user ptrace.

    ``prctl(PR_SET_DUMPABLE, 0)`` (no core dump, no ptrace attach by
    unprivileged processes of the same user, /proc/self/mem unreadable to
    them) and ``RLIMIT_CORE`` 0 (also covers a core pattern piped to a
    handler that ignores dumpability). The daemon calls this before it
    handles any key. Best effort: the result says what worked.
    """
    import ctypes
    import ctypes.util
    import resource

    details = []
    dumpable = False
    try:
        libc = ctypes.CDLL(ctypes.util.find_library("c") or "libc.so.6", use_errno=True)
        if libc.prctl(_PR_SET_DUMPABLE, 0, 0, 0, 0) == 0:
            dumpable = True
        else:
            details.append(f"prctl(PR_SET_DUMPABLE) failed: errno {ctypes.get_errno()}")
    except (OSError, AttributeError) as exc:
        details.append(f"prctl unavailable: {exc}")
    rlimit = False
    try:
        resource.setrlimit(resource.RLIMIT_CORE, (0, 0))
        rlimit = True
    except (OSError, ValueError) as exc:
        details.append(f"setrlimit(RLIMIT_CORE) failed: {exc}")
    return CoreDumpStatus(dumpable, rlimit, "; ".join(details) or "core dumps disabled")
