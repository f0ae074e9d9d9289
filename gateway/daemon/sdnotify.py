"""systemd readiness and watchdog notifications (sd_notify) without libsystemd.

Theory of operation: when systemd starts a ``Type=notify`` service it puts
the path of a datagram socket in ``$NOTIFY_SOCKET`` (a filesystem path, or an
abstract socket when it starts with ``@``). The service sends newline
separated ``KEY=VALUE`` assignments to it: ``READY=1`` once it serves,
``STATUS=...`` free text shown by ``systemctl status``, ``RELOADING=1`` /
``READY=1`` around a reload, ``STOPPING=1`` on the way out, and
``WATCHDOG=1`` at least every ``$WATCHDOG_USEC`` microseconds when the unit
sets ``WatchdogSec=`` (sd_notify(3), sd_watchdog_enabled(3)).

Outside systemd every call is a cheap no-op, so the daemon calls the
notifier unconditionally. A notification that cannot be delivered is logged
once and never stops the daemon: supervision is advisory, forwarding is not.
"""

from __future__ import annotations

import logging
import os
import socket
import time
from collections.abc import Mapping

log = logging.getLogger("qkdgate.sdnotify")


class SdNotifier:
    """Sends sd_notify messages; ``environ`` is injectable for tests."""

    def __init__(self, environ: Mapping[str, str] | None = None) -> None:
        env = os.environ if environ is None else environ
        path = env.get("NOTIFY_SOCKET", "")
        # sd_notify(3): "@" names a socket in the abstract namespace.
        self._address = "\0" + path[1:] if path.startswith("@") else path
        self._warned = False
        self.watchdog_interval = _watchdog_interval(env)
        self.last_status = ""

    @property
    def enabled(self) -> bool:
        return bool(self._address)

    def notify(self, **fields: object) -> bool:
        """Send ``KEY=value`` lines (keyword names are upper-cased).
        Returns True if a datagram was sent."""
        if not self._address:
            return False
        lines = []
        for key, value in fields.items():
            text = str(value)
            if "\n" in text:  # one assignment per line: a newline would forge another field
                text = text.replace("\n", " ")
            lines.append(f"{key.upper()}={text}")
        payload = ("\n".join(lines) + "\n").encode()
        try:
            with socket.socket(socket.AF_UNIX, socket.SOCK_DGRAM | socket.SOCK_CLOEXEC) as s:
                s.sendto(payload, self._address)
        except OSError as exc:
            if not self._warned:
                log.warning("sd_notify to %r failed: %s", self._address.lstrip("\0"), exc)
                self._warned = True
            return False
        return True

    def ready(self, status: str | None = None) -> bool:
        fields: dict[str, object] = {"READY": 1}
        if status is not None:
            fields["STATUS"] = status
            self.last_status = status
        # MAINPID lets systemd track us even if a wrapper forked us.
        fields["MAINPID"] = os.getpid()
        return self.notify(**fields)

    def status(self, text: str) -> bool:
        if text == self.last_status:
            return False  # systemd keeps the last one; do not spam the socket
        self.last_status = text
        return self.notify(STATUS=text)

    def reloading(self) -> bool:
        # systemd >= 253 wants MONOTONIC_USEC with RELOADING=1 (Type=notify-reload).
        return self.notify(RELOADING=1,
                           MONOTONIC_USEC=time.clock_gettime_ns(time.CLOCK_MONOTONIC) // 1000)

    def stopping(self) -> bool:
        return self.notify(STOPPING=1)

    def watchdog(self) -> bool:
        return self.notify(WATCHDOG=1)


def _watchdog_interval(env: Mapping[str, str]) -> float | None:
    """Seconds between WATCHDOG=1 pings, or None if no watchdog is armed.

    sd_watchdog_enabled(3): WATCHDOG_USEC is the timeout; WATCHDOG_PID, if
    set, must be our pid. We ping at half the timeout, as the man page
    recommends, so one late event-loop turn does not get us killed.
    """
    usec = env.get("WATCHDOG_USEC")
    if not usec:
        return None
    pid = env.get("WATCHDOG_PID")
    if pid and pid != str(os.getpid()):
        return None
    try:
        value = int(usec)
    except ValueError:
        log.warning("ignoring malformed WATCHDOG_USEC=%r", usec)
        return None
    if value <= 0:
        return None
    return value / 2e6
