"""High availability: this node's role in an active/standby pair.

Theory of operation: two qkdgate nodes per site share the site's virtual
address (VIP) under keepalived (VRRP, RFC 5798); keepalived elects, we do
not. Its notifications (``MASTER``, ``BACKUP``, ``FAULT``, ``STOP``, read
from its ``notify_fifo`` or sent by ``qkdgate ha-notify``) are the only
input of :class:`HaRoleMachine`, a sans-IO state machine: every legal
``(role, notification) -> (next role, action)`` sits in one table,
:data:`TRANSITIONS`, checked at one choke point, :meth:`HaRoleMachine.notify`.
The machine never touches the kernel or a socket: it returns an action
(:class:`Action`) that the daemon carries out.

* ``ACTIVATE`` (we became MASTER): build fresh sessions, i.e. new epochs,
  and start an exchange with every peer at once (new ML-KEM, X25519 and QKD
  keys; nothing is taken over from the failed node).
* ``DEACTIVATE`` (MASTER -> anything else): close the sessions, remove every
  SA and keep the tunnels' block policies, so the node drops the site's
  protected traffic instead of routing it in clear.

A node starts ``STARTING``: it behaves as a standby (block policies, no
SAs, no sessions, the KME connection polled warm) until keepalived says
MASTER. Every role but ``ACTIVE`` holds no SAs, so "neither node active"
means "both drop" (fail closed across the switch).

Epochs: each node draws its epochs from its own journal; :func:`node_epoch`
keeps node 1's odd and node 2's even, so the two nodes of a site never
present the same epoch to the peer, which accepts only a higher one. A node
that draws below the epoch the peer knows the site by is told so (a STALE
notice, or the peer's INIT) and starts above it (docs/protocol.md 10.1).
"""

from __future__ import annotations

import enum
import re
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any

from qkdgate.errors import LocalProtocolError, QkdgateError


class HaNotifyError(QkdgateError):
    """A notification we cannot parse: the caller's mistake (a bad
    ``ha-notify`` argument or FIFO line), never a role change."""


class Role(enum.Enum):
    STARTING = "starting"    # no notification yet: standby behaviour
    STANDBY = "standby"      # keepalived BACKUP
    ACTIVE = "active"        # keepalived MASTER
    FAULT = "fault"          # keepalived FAULT (a tracked script/interface failed)
    STOPPED = "stopped"      # keepalived STOP (keepalived itself went away)


class Notify(enum.Enum):
    """keepalived's states as its notify scripts and FIFO name them
    (keepalived.conf(5), notify / notify_fifo)."""
    MASTER = "MASTER"
    BACKUP = "BACKUP"
    FAULT = "FAULT"
    STOP = "STOP"


class Action(enum.Enum):
    NONE = "none"
    ACTIVATE = "activate"
    DEACTIVATE = "deactivate"


_PASSIVE = (Role.STARTING, Role.STANDBY, Role.FAULT, Role.STOPPED)
_NEXT = {Notify.MASTER: Role.ACTIVE, Notify.BACKUP: Role.STANDBY, Notify.FAULT: Role.FAULT,
         Notify.STOP: Role.STOPPED}

# (role, notification) -> (next role, action). Complete: every pair is here.
TRANSITIONS: dict[tuple[Role, Notify], tuple[Role, Action]] = {}
for _r in _PASSIVE:
    for _n, _to in _NEXT.items():
        TRANSITIONS[(_r, _n)] = (_to, Action.ACTIVATE if _n is Notify.MASTER else Action.NONE)
for _n, _to in _NEXT.items():
    # MASTER again (a repeated notification) changes nothing; anything else
    # stands the node down at once.
    TRANSITIONS[(Role.ACTIVE, _n)] = (_to, Action.NONE if _n is Notify.MASTER
                                      else Action.DEACTIVATE)
del _r, _n, _to


@dataclass(frozen=True, slots=True)
class Change:
    """What one notification did."""
    notify: Notify
    before: Role
    after: Role
    action: Action
    at: float


class HaRoleMachine:
    """This node's role; see the module docstring. ``clock`` is injected."""

    def __init__(self, node: int, clock: Callable[[], float]) -> None:
        if node not in (1, 2):
            raise LocalProtocolError(f"HA node must be 1 or 2, not {node!r}")
        self.node = node
        self._clock = clock
        self.role = Role.STARTING
        self.since = clock()
        self.activations = 0
        self.last: Change | None = None

    @property
    def active(self) -> bool:
        return self.role is Role.ACTIVE

    def notify(self, what: Notify) -> Change:
        """Apply one notification; the caller performs ``change.action``."""
        now = self._clock()
        after, action = TRANSITIONS[(self.role, what)]
        change = Change(what, self.role, after, action, now)
        if after is not self.role:
            self.since = now
        self.role = after
        if action is Action.ACTIVATE:
            self.activations += 1
        self.last = change
        return change

    def snapshot(self) -> dict[str, Any]:
        now = self._clock()
        return {"node": self.node, "role": self.role.value,
                "since": round(now - self.since, 3), "activations": self.activations,
                "last_notify": self.last.notify.value if self.last else None}


def parse_notify(word: str) -> Notify:
    """``MASTER`` / ``BACKUP`` / ``FAULT`` / ``STOP`` (case-insensitive)."""
    try:
        return Notify(word.strip().upper())
    except ValueError:
        raise HaNotifyError(f"unknown HA state {word[:40]!r} (expected one of "
                            f"{', '.join(n.value for n in Notify)})") from None


# keepalived notify_fifo lines: `INSTANCE "VI_1" MASTER 100` (also GROUP, and
# MASTER_RX_LOWER_PRI / DELETED lines, which carry no role for us).
_FIFO_RE = re.compile(r'(INSTANCE|GROUP) "([^"]{1,64})" ([A-Z_]{1,32})(?: [0-9]{1,3})?\Z')


def parse_fifo_line(line: str, instance: str | None) -> Notify | None:
    """One line of keepalived's ``notify_fifo``. Returns the notification, or
    None for a line that is not for us (another instance, a group line, a
    state that is not a role). Raises :class:`HaNotifyError` on garbage."""
    m = _FIFO_RE.match(line.strip())
    if m is None:
        raise HaNotifyError(f"not a keepalived notify line: {line[:80]!r}")
    kind, name, state = m.groups()
    if kind != "INSTANCE" or (instance is not None and name != instance):
        return None
    try:
        return Notify(state)
    except ValueError:
        return None


def node_epoch(draw: Callable[[], int], node: int) -> int:
    """An epoch from ``draw`` (the journal's growing counter) whose parity
    names the node: odd on node 1, even on node 2. The counter grows by at
    least one per draw, so at most a few draws are needed; every draw is
    durable, so a crash in between only skips a value."""
    want = node % 2
    for _ in range(4):
        epoch = draw()
        if epoch % 2 == want:
            return epoch
    raise LocalProtocolError("the epoch counter did not reach this node's parity")
