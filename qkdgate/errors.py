"""One exception root for qkdgate, split by whose fault it is.

Theory of operation: every error a caller can see derives from
:class:`QkdgateError`, and its class says who must act:

* :class:`ConfigError` -- the operator's file or CLI arguments are wrong.
* :class:`LocalProtocolError` -- our own bug or a caller misusing an API;
  :class:`SessionFailed` -- a protocol session was poisoned by one.
* :class:`RemoteProtocolError` -- the peer gateway sent garbage, a replay or
  a forgery; never a reason to crash the daemon (h11's split).
* :class:`KeySourceError` -- the QKD key source (KME) failed; subclasses say
  whether keys are merely unavailable, we were refused, the KME broke the
  protocol, or it timed out.
* :class:`TunnelError` -- the kernel refused an operation; carries errno.
* :class:`CryptoUnavailable` -- an algorithm or backend is missing here.

Messages never contain secret material: callers pass IDs and fingerprints,
never key bytes (tests/unit/test_no_secret_leaks.py checks this).
"""

from __future__ import annotations

import errno as _errno
import os


class QkdgateError(Exception):
    """Root of every qkdgate error."""


class ConfigError(QkdgateError):
    """A configuration file or CLI argument is invalid.

    ``file``, ``line`` (1-based) and ``path`` (a YAML path such as
    ``tunnels[0].selectors.local``) locate the problem; ``expected`` and
    ``found`` say what the schema wanted and what was there.
    """

    def __init__(self, message: str, *, file: str | None = None, line: int | None = None,
                 path: str | None = None, expected: str | None = None,
                 found: str | None = None) -> None:
        self.file, self.line, self.path = file, line, path
        self.expected, self.found = expected, found
        self.reason = message
        where = ""
        if file is not None:
            where = file + (f":{line}" if line is not None else "") + ": "
        text = where + (f"{path}: " if path else "") + message
        if expected is not None:
            text += f" (expected {expected}"
            text += f", found {found})" if found is not None else ")"
        super().__init__(text)


class LocalProtocolError(QkdgateError):
    """We (or our caller) did something the protocol or API does not allow."""


class SessionFailed(LocalProtocolError):
    """A protocol session hit an unexpected exception (a bug: ours, a
    driver's, or a dependency's) and is poisoned (h11's ERROR state): its
    exchange secrets are wiped and every later call raises this again. The
    driver fails the session's tunnels closed by their policy, reports, and
    builds a fresh session. ``__cause__`` is the original exception."""


class RemoteProtocolError(QkdgateError):
    """The peer sent something malformed, unauthenticated, replayed or stale."""


class AuthenticationFailed(RemoteProtocolError):
    """A peer's signature, MAC or key confirmation did not verify."""


class KeySourceError(QkdgateError):
    """A QKD key source failed."""


class KeyUnavailable(KeySourceError):
    """No key now: pool empty, QKD link down or in alarm. Worth retrying later."""


class KeyNotFound(KeySourceError):
    """The KME does not hold the requested key_ID (never issued, or already
    delivered: ETSI GS QKD 014 dec_keys is not idempotent)."""


class KeySourceAuthError(KeySourceError):
    """The KME refused us (401, TLS handshake refused, wrong KME identity)."""


class KeySourceProtocolError(KeySourceError):
    """The KME answered something the spec does not allow (bad JSON, wrong
    sizes, non-UUID key_IDs, wrong counts)."""


class KeySourceTimeout(KeySourceError):
    """The KME did not answer in time."""


class TunnelError(QkdgateError):
    """The kernel refused a tunnel operation.

    ``op`` names the operation (``"add_sa"``, ``"update_policy"``...),
    ``errno`` is the kernel's error number (or ``None`` if not from the kernel).
    """

    def __init__(self, op: str, errno: int | None = None, detail: str = "") -> None:
        self.op, self.errno, self.detail = op, errno, detail
        text = f"{op} failed"
        if errno is not None:
            name = _errno.errorcode.get(errno, str(errno))
            text += f": [{name}] {os.strerror(errno)}"
        if detail:
            text += f" ({detail})"
        super().__init__(text)


class CryptoUnavailable(QkdgateError):
    """An algorithm or crypto backend is not available on this machine."""
