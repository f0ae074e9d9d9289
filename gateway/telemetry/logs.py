"""Structured logs: one line per record, text or JSON, key-shaped text masked.

Theory of operation: :func:`configure_logging` writes one line per record to
stdout, text or JSON, with the tunnel/peer context passed as ``extra`` (or
through :func:`with_context`). Under systemd (``$JOURNAL_STREAM`` names our
stdout) text lines carry ``<N>`` syslog priorities (sd-daemon(3)), so
journald keeps the levels. A filter masks anything key-shaped before it is
formatted. Apart from :mod:`qkdgate.gateway.telemetry.metrics` (which
re-exports these names) so that ``qkdgate run`` configures its logs without
loading the Prometheus client when metrics are off (issue 19).
"""

from __future__ import annotations

import enum
import json
import logging
import os
import re
import sys
import time
from typing import Any, TextIO

CONTEXT_FIELDS = ("tunnel", "peer", "generation", "source", "spi", "event")
# Long hex or base64 runs: key-shaped, masked in every log line.
_BLOB = re.compile(r"(?<![A-Za-z0-9+/=_-])(?:[0-9A-Fa-f]{32,}|[A-Za-z0-9+/_-]{40,}={0,2})"
                   r"(?![A-Za-z0-9+/=_-])")
_SYSLOG_PRIORITY = {logging.DEBUG: 7, logging.INFO: 6, logging.WARNING: 4, logging.ERROR: 3,
                    logging.CRITICAL: 2}


class RedactingFilter(logging.Filter):
    """Formats the message once, masking bytes arguments and key-shaped text,
    so no handler ever sees a raw key (SecretBytes already prints only a
    fingerprint)."""

    def filter(self, record: logging.LogRecord) -> bool:
        args = record.args
        if isinstance(args, tuple):
            args = tuple(f"<{len(a)} bytes>" if isinstance(a, (bytes, bytearray, memoryview))
                         else a for a in args)
        try:
            msg = record.msg % args if args else str(record.msg)
        except (TypeError, ValueError):
            msg = f"{record.msg} {args!r}"
        record.msg, record.args = _BLOB.sub("[redacted]", msg), None
        return True


class _Formatter(logging.Formatter):
    def __init__(self, json_lines: bool, journald: bool) -> None:
        super().__init__()
        self.json_lines, self.journald = json_lines, journald

    def format(self, record: logging.LogRecord) -> str:
        ctx = {k: getattr(record, k) for k in CONTEXT_FIELDS if hasattr(record, k)}
        if self.json_lines:
            doc = {"ts": round(record.created, 3), "level": record.levelname.lower(),
                   "logger": record.name, "msg": record.getMessage(), **ctx}
            if record.exc_info:
                doc["exc"] = _BLOB.sub("[redacted]", self.formatException(record.exc_info))
            return json.dumps(doc, default=str, separators=(",", ":"))
        text = record.getMessage()
        if ctx:
            text += " [" + " ".join(f"{k}={v}" for k, v in ctx.items()) + "]"
        if record.exc_info:
            text += "\n" + _BLOB.sub("[redacted]", self.formatException(record.exc_info))
        if self.journald:
            prio = _SYSLOG_PRIORITY.get(record.levelno, 6)
            return "\n".join(f"<{prio}>{line}" for line in text.splitlines())
        stamp = time.strftime("%Y-%m-%dT%H:%M:%S", time.gmtime(record.created))
        return f"{stamp}Z {record.levelname:<7} {record.name}: {text}"


def _stream_is_journal(stream: TextIO) -> bool:
    # systemd.exec(5): $JOURNAL_STREAM is "DEVICE:INODE" of the journal stream.
    want = os.environ.get("JOURNAL_STREAM", "")
    try:
        st = os.fstat(stream.fileno())
    except (OSError, ValueError, AttributeError):
        return False
    return want == f"{st.st_dev}:{st.st_ino}"


def configure_logging(level: str | enum.Enum = "info", fmt: str | enum.Enum = "text",
                      stream: TextIO | None = None) -> logging.Handler:
    """Install the qkdgate handler on the ``qkdgate`` logger tree. ``level``
    and ``fmt`` are LogConfig's values (enums or their strings)."""
    level = str(level.value if isinstance(level, enum.Enum) else level)
    fmt = str(fmt.value if isinstance(fmt, enum.Enum) else fmt)
    stream = stream if stream is not None else sys.stdout
    handler = logging.StreamHandler(stream)
    handler.addFilter(RedactingFilter())
    handler.setFormatter(_Formatter(fmt == "json", fmt != "json" and _stream_is_journal(stream)))
    root = logging.getLogger("qkdgate")
    for old in [h for h in root.handlers if getattr(h, "_qkdgate", False)]:
        root.removeHandler(old)
    handler._qkdgate = True  # type: ignore[attr-defined]
    root.addHandler(handler)
    root.setLevel(str(level).upper())
    root.propagate = False
    return handler


def with_context(logger: logging.Logger,
                 **context: Any) -> logging.LoggerAdapter[logging.Logger]:
    """A logger that adds tunnel/peer/... context to every record."""
    return logging.LoggerAdapter(logger, {k: v for k, v in context.items()
                                          if k in CONTEXT_FIELDS})
