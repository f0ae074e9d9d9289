"""Reading and writing identity files (the protocol core does no file I/O).

Theory of operation: a private identity file is the JSON of
:meth:`~qkdgate.gateway.protocol.identity.LocalIdentity.to_json`; it must be
a regular file, mode 0600 and owned by the reading user
(:func:`~qkdgate.private_file.read_private_file`), and it is created with
mode 0600 from the start, so it is never world-readable even for a moment.
Parsing and validation stay in the protocol package
(``LocalIdentity.from_json``); only the bytes move here.
"""

from __future__ import annotations

import os

from qkdgate.errors import ConfigError
from qkdgate.gateway.protocol.identity import LocalIdentity
from qkdgate.private_file import read_private_file

MAX_IDENTITY_FILE = 65536


def load_local_identity(path: str) -> LocalIdentity:
    """Read a private identity file, refusing one others can read."""
    raw = read_private_file(path, "identity file", MAX_IDENTITY_FILE)
    try:
        text = raw.decode("utf-8")
    except UnicodeDecodeError:
        raise ConfigError("identity file is not UTF-8 text", file=path) from None
    return LocalIdentity.from_json(text, file=path)


def save_local_identity(identity: LocalIdentity, path: str, *, overwrite: bool = False) -> None:
    """Write the private file with mode 0600 from the start (never a window
    in which it is world-readable); refuse to follow a symlink."""
    flags = os.O_WRONLY | os.O_CREAT | os.O_NOFOLLOW | (os.O_TRUNC if overwrite else os.O_EXCL)
    try:
        fd = os.open(path, flags, 0o600)
    except FileExistsError:
        raise ConfigError("identity file exists (use --force to overwrite)", file=path) from None
    except OSError as exc:
        raise ConfigError(f"cannot create identity file: {exc.strerror}", file=path) from None
    with os.fdopen(fd, "w", encoding="utf-8") as fh:
        os.fchmod(fh.fileno(), 0o600)
        fh.write(identity.to_json())
