"""Every deadline of a tunnel's generations, and the constants behind them.

Theory of operation: this module is the one owner of generation time
(wireguard-go's ``timers.go`` and ``constants.go``). A generation's soft
lifetime asks for a rekey, its hard lifetime ends it (and blocks the tunnel
if it is still the one sending), and a superseded generation is retired a
fixed grace period after the switch.

A hard lifetime is a promise about the kernel: no SA of the generation
carries a frame after it. MACsec SAs have no kernel lifetime and XFRM's
backstop counts from each SA's own installation in whole seconds, so the
tunnels keep the promise themselves: every deadline derived from a hard
lifetime falls ``Lifetimes.hard_margin`` *before* it (a daemon woken late,
netlink round trips), and :meth:`TunnelTimers.hard_due` names the
generations whose SAs must stop carrying traffic at once, before any slower
cleanup on any tunnel (issue 10: tunnels blocked one after the other left a
MACsec RX SA usable 92 ms past its hard lifetime).
"""

from __future__ import annotations

import enum
from dataclasses import dataclass, field

# RFC 4301 4.4.2.1 soft/hard lifetimes; the config overrides them per tunnel.
SOFT_LIFETIME_SECONDS = 3000.0
HARD_LIFETIME_SECONDS = 3600.0
# How long a superseded generation still accepts inbound traffic after the
# switch (packets in flight, the peer switching a moment later). The ONE
# grace value: the protocol keeps no retire timer of its own.
RETIRE_GRACE_SECONDS = 5.0
# A failed SA removal (issue 17 finding 8a) is retried this often, and after
# this many failures the tunnel escalates (MACsec: deactivate the SA or take
# the link down; IPsec: block). The record stays until the SA is gone.
REMOVE_RETRY_SECONDS = 1.0
REMOVE_ATTEMPTS_BEFORE_ESCALATION = 3
# RFC 4301 4.4.2.1 hard lifetime, kept: the tunnels act on it this long before
# it passes (at most a quarter of the soft-to-hard gap, so the rekey the soft
# lifetime asked for keeps most of its time). It covers the daemon's wake-up
# latency and the netlink round trips of deactivating every due SA (0.5 s was
# not enough in the lab VM under load, docs/tunnels.md).
HARD_MARGIN_SECONDS = 1.0


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
    # hard_margin, derived once (every tunnel's deadlines read it, issue 19)
    _hard_margin: float = field(init=False, repr=False, compare=False)

    def __post_init__(self) -> None:
        if not 0 < self.soft_seconds < self.hard_seconds:
            raise ValueError("lifetimes need 0 < soft_seconds < hard_seconds")
        if self.hard_bytes and not 0 < self.soft_bytes < self.hard_bytes:
            raise ValueError("lifetimes need 0 < soft_bytes < hard_bytes")
        if self.grace_seconds < 0:
            raise ValueError("grace_seconds must not be negative")
        object.__setattr__(self, "_hard_margin",
                           min(HARD_MARGIN_SECONDS, (self.hard_seconds - self.soft_seconds) / 4))

    @property
    def hard_margin(self) -> float:
        """How long before a hard lifetime the tunnels act on it."""
        return self._hard_margin


class Expiry(enum.Enum):
    """What a deadline means when it passes (the ``expired*`` hooks)."""

    REMOVE_RETRY = "remove_retry"  # removing a generation's SAs failed: try again
    RETIRE = "retire"              # the grace after a switch is over: remove the old SAs
    HARD_UNUSED = "hard_unused"    # a generation that never sent reached its hard lifetime
    HARD_ACTIVE = "hard_active"    # the sending generation reached it: block (RFC 4301 4.4.2.1)
    SOFT = "soft"                  # the sending generation wants a rekey


@dataclass(slots=True)
class _Deadlines:
    created_at: float
    hard_at: float | None = None   # fixed at adoption; else created_at + hard lifetime
    retire_at: float | None = None
    retry_at: float | None = None  # removal failed: the only deadline left


@dataclass(frozen=True, slots=True)
class _Plan:
    """Every deadline of a tunnel at one state of its generations."""

    deadlines: list[tuple[float, Expiry, int]]
    hard_acts: list[tuple[int, float]]   # (generation, when its hard lifetime is acted on)
    next_deadline: float | None
    next_action: float | None


class TunnelTimers:
    """Every deadline of one tunnel's generations.

    The tunnel calls a hook when something happens to a generation
    (``generation_created``, ``generation_adopted``, ``generation_switched``,
    ``rekey_requested``, ``removal_failed``, ``tunnel_blocked``,
    ``generation_dropped``); :meth:`expired` says which
    deadlines have passed, in the order the tunnel must act on them, and
    :meth:`next_deadline` when to ask again. Nothing else in the tunnels
    reads the clock or computes a deadline. ``lifetimes`` may be replaced at
    any time (a config reload); deadlines derive from it when asked.
    """

    def __init__(self, lifetimes: Lifetimes) -> None:
        self._lifetimes = lifetimes
        self._gens: dict[int, _Deadlines] = {}
        self._active: int | None = None            # the generation we send under
        self._rekey_requested_at: float | None = None
        # Every deadline, and (next_deadline, next_action), computed when
        # asked and dropped by every hook: the manager asks all tunnels on
        # every wake-up of the tunnel loop, and one peer's exchange wakes it
        # several times (issue 19: 100 peers x 10 tunnels spent most of a
        # rekey here; at 1,000 tunnels on one peer the deadline arithmetic
        # was still 16 % of a rekey's Python when only the minimum was kept).
        self._cache: _Plan | None = None

    @property
    def lifetimes(self) -> Lifetimes:
        return self._lifetimes

    @lifetimes.setter
    def lifetimes(self, value: Lifetimes) -> None:
        self._lifetimes = value
        self._cache = None

    @property
    def active(self) -> int | None:
        return self._active

    @active.setter
    def active(self, value: int | None) -> None:
        self._active = value
        self._cache = None

    @property
    def rekey_requested_at(self) -> float | None:
        return self._rekey_requested_at

    @rekey_requested_at.setter
    def rekey_requested_at(self, value: float | None) -> None:
        self._rekey_requested_at = value
        self._cache = None

    # ---- hooks -----------------------------------------------------------
    def generation_created(self, number: int, now: float) -> None:
        """First SA of ``number`` installed: its lifetimes start now."""
        self._cache = None
        self._gens.setdefault(number, _Deadlines(now))

    def generation_adopted(self, number: int, now: float, sending: bool) -> None:
        """SAs of a previous run: the kernel enforces their own hard
        lifetime; ours ends them a full hard lifetime from now at the latest
        (or at the grace after a new generation switches in)."""
        self._cache = None
        self._gens[number] = _Deadlines(now, hard_at=now + self.lifetimes.hard_seconds)
        if sending:
            self.active = number

    def generation_switched(self, number: int, now: float) -> None:
        """``number`` sends from now on: every older generation retires
        after the grace period, and the soft lifetime is armed again."""
        self._cache = None
        self.active = number
        self.rekey_requested_at = None
        for n, d in self._gens.items():
            if n < number and d.retire_at is None:
                d.retire_at = now + self.lifetimes.grace_seconds

    def rekey_requested(self, now: float) -> None:
        """A rekey was asked for (soft lifetime, byte or PN limit): not again
        until a new generation switches in."""
        self._cache = None
        self.rekey_requested_at = now

    def removal_failed(self, number: int, now: float) -> None:
        """Some SAs of ``number`` could not be removed: it sends no more and
        its removal is retried after REMOVE_RETRY_SECONDS."""
        self._cache = None
        self._gens[number].retry_at = now + REMOVE_RETRY_SECONDS
        if self.active == number:
            self.active = None

    def tunnel_blocked(self) -> None:
        """Nothing sends any more (SAs removed or being removed)."""
        self._cache = None
        self.active = None

    def generation_dropped(self, number: int) -> None:
        self._cache = None
        self._gens.pop(number, None)
        if self.active == number:
            self.active = None

    # ---- queries ---------------------------------------------------------
    def created_at(self, number: int) -> float:
        return self._gens[number].created_at

    def soft_at(self, number: int) -> float:
        return self._gens[number].created_at + self.lifetimes.soft_seconds

    def hard_at(self, number: int) -> float:
        d = self._gens[number]
        return d.hard_at if d.hard_at is not None else d.created_at + self.lifetimes.hard_seconds

    def hard_act_at(self, number: int) -> float:
        """When the tunnel acts on ``number``'s hard lifetime: ``hard_margin``
        before it, so no SA of it is usable once it has passed."""
        return self.hard_at(number) - self.lifetimes.hard_margin

    def hard_due(self, now: float) -> list[int]:
        """Generations whose SAs must stop carrying traffic now (their hard
        lifetime, less the margin, has passed), oldest first."""
        plan = self._plan()
        if plan.next_action is None or now < plan.next_action:
            return []
        return sorted(n for n, at in plan.hard_acts if now >= at)

    def retire_at(self, number: int) -> float | None:
        return self._gens[number].retire_at

    def next_deadline(self) -> float | None:
        return self._plan().next_deadline

    def next_action(self) -> float | None:
        """The earliest time :meth:`expired` or :meth:`hard_due` can name
        anything: until then the tunnel's timer work is a no-op."""
        return self._plan().next_action

    def _plan(self) -> _Plan:
        """Every deadline, computed once per state of the generations (each
        generation's :meth:`hard_act_at` once)."""
        if self._cache is None:
            deadlines: list[tuple[float, Expiry, int]] = []
            hard_acts: list[tuple[int, float]] = []
            for n, d in self._gens.items():
                act = self.hard_act_at(n)
                hard_acts.append((n, act))
                if d.retry_at is not None:
                    deadlines.append((d.retry_at, Expiry.REMOVE_RETRY, n))
                elif n == self._active:
                    deadlines.append((act, Expiry.HARD_ACTIVE, n))
                    if self._rekey_requested_at is None:
                        deadlines.append((self.soft_at(n), Expiry.SOFT, n))
                elif d.retire_at is not None:
                    deadlines.append((min(d.retire_at, act), Expiry.RETIRE, n))
                else:      # inbound only, never switched: its hard lifetime bounds it
                    deadlines.append((act, Expiry.HARD_UNUSED, n))
            times = [t for t, _, _ in deadlines]
            self._cache = _Plan(deadlines, hard_acts, min(times) if times else None,
                                min(times + [t for _, t in hard_acts], default=None))
        return self._cache

    def expired(self, now: float) -> list[tuple[Expiry, int]]:
        """Deadlines passed at ``now``: superseded generations first, then the
        sending one (a hard lifetime wins over a soft one)."""
        plan = self._plan()
        if plan.next_deadline is None or now < plan.next_deadline:
            return []
        due = [(kind, n) for t, kind, n in plan.deadlines if now >= t]
        hard_active = {n for kind, n in due if kind is Expiry.HARD_ACTIVE}
        order = [Expiry.REMOVE_RETRY, Expiry.RETIRE, Expiry.HARD_UNUSED, Expiry.HARD_ACTIVE,
                 Expiry.SOFT]
        return sorted(((k, n) for k, n in due if not (k is Expiry.SOFT and n in hard_active)),
                      key=lambda e: (order.index(e[0]), e[1]))
