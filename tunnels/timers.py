"""Every deadline of a tunnel's generations, and the constants behind them.

Theory of operation: this module is the one owner of generation time
(wireguard-go's ``timers.go`` and ``constants.go``). A generation's soft
lifetime asks for a rekey, its hard lifetime ends it (and blocks the tunnel
if it is still the one sending), and a superseded generation is retired a
fixed grace period after the switch.
"""

from __future__ import annotations

from dataclasses import dataclass

# RFC 4301 4.4.2.1 soft/hard lifetimes; the config overrides them per tunnel.
SOFT_LIFETIME_SECONDS = 3000.0
HARD_LIFETIME_SECONDS = 3600.0
# How long a superseded generation still accepts inbound traffic after the
# switch (packets in flight, the peer switching a moment later). The ONE
# grace value: the protocol keeps no retire timer of its own.
RETIRE_GRACE_SECONDS = 5.0


@dataclass(frozen=True, slots=True)
class Lifetimes:
    """SA lifetimes. ``soft`` asks for a rekey, ``hard`` removes the SA and
    blocks. Seconds count from installation. ``grace_seconds``: how long
    the previous generation still accepts inbound traffic after a switch."""

    soft_seconds: float = SOFT_LIFETIME_SECONDS
    hard_seconds: float = HARD_LIFETIME_SECONDS
    soft_bytes: int = 0          # 0 = no byte limit
    hard_bytes: int = 0
    grace_seconds: float = RETIRE_GRACE_SECONDS

    def __post_init__(self) -> None:
        if not 0 < self.soft_seconds < self.hard_seconds:
            raise ValueError("lifetimes need 0 < soft_seconds < hard_seconds")
        if self.hard_bytes and not 0 < self.soft_bytes < self.hard_bytes:
            raise ValueError("lifetimes need 0 < soft_bytes < hard_bytes")
        if self.grace_seconds < 0:
            raise ValueError("grace_seconds must not be negative")
