"""Reading the gateway's private files (identity, PSK) safely.

Theory of operation: a private file is opened without following a symlink
(O_NOFOLLOW) and without blocking, then checked on the open descriptor, so it cannot be swapped
between check and read: it must be a regular file, owned by us, and not
readable by group or others. Each failure is a ConfigError naming the file.
"""

from __future__ import annotations

import os
import stat

from qkdgate.errors import ConfigError


def read_private_file(path: str, what: str, limit: int) -> bytes:
    """At most ``limit`` bytes of the private file at ``path``; ``what``
    names it in errors (e.g. "identity file")."""
    try:
        # O_NONBLOCK: opening a FIFO planted at the path must not hang the
        # daemon before the regular-file check (no effect on regular files).
        fd = os.open(path, os.O_RDONLY | os.O_NOFOLLOW | os.O_NONBLOCK)
    except OSError as exc:
        raise ConfigError(f"cannot open {what}: {exc.strerror}", file=path) from None
    try:
        st = os.fstat(fd)
        if not stat.S_ISREG(st.st_mode):
            raise ConfigError(f"{what} is not a regular file", file=path)
        if st.st_mode & 0o077:
            raise ConfigError(f"{what} is readable by group or others", file=path,
                              expected="mode 0600", found=f"mode {stat.S_IMODE(st.st_mode):04o}")
        if st.st_uid != os.geteuid():
            raise ConfigError(f"{what} is owned by another user", file=path)
        chunks, left = [], limit
        while left > 0:
            chunk = os.read(fd, left)
            if not chunk:
                break
            chunks.append(chunk)
            left -= len(chunk)
        return b"".join(chunks)
    finally:
        os.close(fd)
