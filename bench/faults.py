"""The faults of the fault matrix (issue 10 items 2 and 4).

Run only inside the kernel lab VM: bench/fault_lab.py builds the lab,
bench/fault_cell.py measures one fault in it; bench/fault_matrix.py,
bench/soak.py and tests/kernel/test_fault_matrix.py use them.

Killing the local daemon *at a step of the exchange* is deterministic: the
daemon (bench/fault_gateway.py) wraps ``PeerSession._transition``; SIGUSR1
arms it with a state read from a file (``i-init-sent``,
``r-install-inbound`` ...), and the next exchange that enters that state
stops the whole process with SIGSTOP from inside the transition, before
anything of the new state has run. The harness sees the process stopped
(/proc/PID/stat "T") and SIGKILLs it.

A fault has ``inject(lab)`` and ``clear(lab)``.
"""

from __future__ import annotations

import random
import signal
import subprocess
import sys
import time
from pathlib import Path
from typing import Any

sys.path.insert(0, str(Path(__file__).resolve().parent))

from fault_lab import Lab, in_lab  # bench/ is not a package

# Exchange states where the local daemon is SIGKILLed (gateway/protocol/exchange.py).
# gw-a is the ETSI 014 master, gw-b the slave: the slave-only state is gw-b's.
KILL_STEPS = (("gw-a", "i-wait-qkd"), ("gw-a", "i-init-sent"), ("gw-b", "i-wait-qkd-slave"),
              ("gw-a", "i-install-inbound"), ("gw-a", "i-confirm-sent"),
              ("gw-a", "i-install-outbound"), ("gw-b", "r-wait-qkd"), ("gw-b", "r-resp-sent"),
              ("gw-b", "r-install-inbound"), ("gw-b", "r-install-outbound"))
QKD_STEPS = {"i-wait-qkd", "i-wait-qkd-slave", "r-wait-qkd"}
KILL_STEP_TIMEOUT = 60.0      # an armed step must be reached within this


# ====================================================================== faults

class Fault:
    """One fault of the matrix: ``inject`` then, ``hold`` s later, ``clear``.

    ``hold`` None: the lab's hard lifetime + 1 s (:meth:`hold_for`), so the
    fault outlasts every generation keyed before it and the policy's block
    or fallback has to act; shorter only where the fault is a moment."""

    name = "fault"
    hold: float | None = None
    qkd = False            # only meaningful where a policy uses QKD

    def inject(self, lab: Lab) -> None:
        raise NotImplementedError

    def clear(self, lab: Lab) -> None:
        raise NotImplementedError

    def applies(self, policy: str) -> bool:
        return not self.qkd or policy != "pqc-only"

    def hold_for(self, hard: float) -> float:
        return hard + 1.0 if self.hold is None else self.hold


class KmeUnreachable(Fault):
    name, qkd = "KME unreachable", True

    def inject(self, lab: Lab) -> None:
        lab.cut_kme(True)

    def clear(self, lab: Lab) -> None:
        lab.cut_kme(False)


class KmeSlow(Fault):
    """Both KMEs answer after 5 s (the client's timeout is 2 s)."""

    name, qkd = "KME slow (5 s)", True

    def inject(self, lab: Lab) -> None:
        def f(sim: Any) -> None:
            for k in ("KME-A", "KME-B"):
                sim.faults[k].delay = 5.0
        lab.kme(f)

    def clear(self, lab: Lab) -> None:
        def f(sim: Any) -> None:
            for k in ("KME-A", "KME-B"):
                sim.faults[k].delay = 0.0
        lab.kme(f)


class PoolEmpty(Fault):
    name, qkd = "key pool empty", True

    def inject(self, lab: Lab) -> None:
        lab.kme(lambda sim: sim.exhaust(refill=False))

    def clear(self, lab: Lab) -> None:
        lab.kme(lambda sim: sim.fill(1000))


class Eavesdropper(Fault):
    """Intercept-resend on half the photons: QBER ~12.5 % > 8 %, QBER alarm."""

    name, qkd = "eavesdropper (QBER alarm)", True

    def inject(self, lab: Lab) -> None:
        lab.kme(lambda sim: sim.set_eavesdropper(0.5))

    def clear(self, lab: Lab) -> None:
        lab.kme(lambda sim: sim.set_eavesdropper(0.0))


class KmeGarbage(Fault):
    name, qkd = "KME returns garbage", True

    def __init__(self, kind: str = "json") -> None:
        self.kind = kind

    def inject(self, lab: Lab) -> None:
        def f(sim: Any) -> None:
            for k in ("KME-A", "KME-B"):
                sim.faults[k].garbage = self.kind
        lab.kme(f)

    def clear(self, lab: Lab) -> None:
        def f(sim: Any) -> None:
            for k in ("KME-A", "KME-B"):
                sim.faults[k].garbage = None
        lab.kme(f)


class PeerKilled(Fault):
    """gw-b SIGKILLed and left dead (no failsafe: the machine is gone) for
    ``hold`` s; then restarted. gw-a's kernel and daemon must cope alone."""

    name = "peer daemon SIGKILLed"

    def inject(self, lab: Lab) -> None:
        lab.gw["gw-b"].kill()

    def clear(self, lab: Lab) -> None:
        lab.gw["gw-b"].start()


class LocalKilledAt(Fault):
    """The daemon stops itself when an exchange enters ``step``
    (deterministic, see the module docstring), is SIGKILLed there, and
    systemd's way follows: failsafe, 2 s, restart."""

    hold: float | None = 0.0

    def __init__(self, gateway: str, step: str) -> None:
        self.gateway, self.step = gateway, step
        self.name = f"local daemon SIGKILLed at {step} ({gateway})"
        self.qkd = step in QKD_STEPS
        self.reached = False

    def inject(self, lab: Lab) -> None:
        g = lab.gw[self.gateway]
        g.arm(self.step)
        self.reached = g.wait_stopped(KILL_STEP_TIMEOUT)
        if not self.reached:
            lab.notes.append(f"{self.name}: step not reached in {KILL_STEP_TIMEOUT:.0f} s")
        g.kill()

    def clear(self, lab: Lab) -> None:
        out = lab.restart(self.gateway, failsafe=True)
        if "deleted" not in out and "taken down" not in out:
            lab.notes.append(f"{self.name}: failsafe said {out.strip()[-200:]!r}")


class BrokenReload(Fault):
    """gw-a's config file is broken and SIGHUPed; the daemon must keep
    running on the old one. Cleared: the file restored, SIGHUP again."""

    name = "reload with a broken config"
    hold: float | None = 2.0

    def inject(self, lab: Lab) -> None:
        g = lab.gw["gw-a"]
        self.text = g.config.read_text()
        g.config.write_text(self.text.replace("tunnels:", "tunnels: [", 1) + "\nbogus: {\n")
        g.signal(signal.SIGHUP)

    def clear(self, lab: Lab) -> None:
        g = lab.gw["gw-a"]
        g.config.write_text(self.text)
        if not g.alive():
            lab.notes.append("broken reload: gw-a died")
            g.start()
            return
        rejected = any(e.get("event") == "config_rejected" for e in g.read_events())
        if not rejected:
            lab.notes.append("broken reload: no config_rejected event")
        g.signal(signal.SIGHUP)


class Partition(Fault):
    """The wire bridge down past the hard lifetime: nothing crosses, in
    either direction, so both ends' generations expire mid-partition."""

    name = "wire partition"

    def inject(self, lab: Lab) -> None:
        _ip(lab.net.w, "link", "set", "br0", "down")

    def clear(self, lab: Lab) -> None:
        _ip(lab.net.w, "link", "set", "br0", "up")


class ClockStep(Fault):
    """The (VM's) wall clock stepped by ``delta`` s; stepped back when cleared.
    Lifetimes must run on CLOCK_MONOTONIC (RFC 4301 4.4.2.1 lifetimes are
    durations): nothing may expire early, late, or twice."""

    hold: float | None = 3.0

    def __init__(self, delta: float) -> None:
        self.delta = delta
        self.name = f"wall clock stepped {'+' if delta > 0 else '-'}{abs(delta) / 3600:g} h"

    def inject(self, lab: Lab) -> None:
        if not in_lab():
            raise RuntimeError("the clock fault runs only inside the lab VM")
        time.clock_settime(time.CLOCK_REALTIME, time.time() + self.delta)

    def clear(self, lab: Lab) -> None:
        time.clock_settime(time.CLOCK_REALTIME, time.time() - self.delta)


def _ip(ns: str, *args: str) -> None:
    r = subprocess.run(["ip", "-n", ns, *args], capture_output=True, text=True)
    if r.returncode:
        raise RuntimeError(f"ip -n {ns} {' '.join(args)}: {r.stderr.strip()}")


def all_faults(kill_steps: tuple[tuple[str, str], ...] = KILL_STEPS) -> list[Fault]:
    """Every fault of the matrix, in the table's order."""
    return [KmeUnreachable(), KmeSlow(), PoolEmpty(), Eavesdropper(), KmeGarbage(),
            PeerKilled(), *(LocalKilledAt(g, s) for g, s in kill_steps), BrokenReload(),
            Partition(), ClockStep(3600), ClockStep(-3600)]


# ====================================================================== soak helpers

def random_fault(rng: random.Random, policy: str, kills: bool = True) -> Fault:
    """A fault drawn from the matrix (seeded), one that applies to ``policy``;
    without ``kills``, never one that kills a daemon."""
    while True:
        f = rng.choice(all_faults())
        if f.applies(policy) and (kills or not isinstance(f, PeerKilled | LocalKilledAt)):
            return f
