"""One cell of the fault matrix: a fault run in a lab with the measurements
around it (:func:`run_cell`), and the table's rows (:func:`markdown`)."""

from __future__ import annotations

import sys
import time
from bisect import bisect_left, bisect_right
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

sys.path.insert(0, str(Path(__file__).resolve().parent))

from fault_lab import Lab  # bench/ is not a package
from faults import Fault

OUTAGE_RUN = 3                # this many consecutive lost datagrams make an outage
# A restart takes the warm spare spawned at the cell's start. On a guest that
# runs two labs side by side a cold interpreter imported for 30-40 s, and a
# kill cell whose fault came before its spare was warm measured that import as
# "recovery" (2026-12-07 matrix: 25-45 s). The fault waits for the spares.
SPARE_WARM_TIMEOUT = 180.0


# ====================================================================== one cell

@dataclass
class Cell:
    fault: str
    policy: str
    cleartext: int = 0
    after_hard: int = 0
    key_ids_reused: int = 0
    sent: int = 0
    lost: int = 0
    recovery_s: float | None = None      # None: did not recover within the wait
    outage_s: float = 0.0                # longest run of lost datagrams in the cell
    rekeys: int = 0
    notes: list[str] = field(default_factory=list)
    diag: str = ""

    def row(self) -> list[str]:
        rec = "-" if self.recovery_s is None else f"{self.recovery_s:.1f}"
        return [self.fault, self.policy, str(self.cleartext), str(self.after_hard),
                str(self.key_ids_reused), f"{self.lost}/{self.sent}", f"{self.outage_s:.1f}",
                rec, str(self.rekeys), "; ".join(self.notes)]


HEADER = ["fault", "policy", "cleartext on wire", "delivered after hard lifetime",
          "QKD key_IDs used twice", "datagrams lost/sent", "longest outage (s)",
          "recovery after clear (s)", "rekeys", "notes"]


def outages(stream: Any, a: float, b: float) -> list[tuple[float, float]]:
    """Runs of >= OUTAGE_RUN consecutive lost datagrams sent in [a, b]:
    (first send time, last send time)."""
    out = []
    i, j = bisect_left(stream.sent_at, a), bisect_right(stream.sent_at, b)
    run_start = None
    n = 0
    for s in range(i, j):
        if s not in stream.received:
            if run_start is None:
                run_start = s
            n += 1
            continue
        if run_start is not None and n >= OUTAGE_RUN:
            out.append((stream.sent_at[run_start], stream.sent_at[s - 1]))
        run_start, n = None, 0
    if run_start is not None and n >= OUTAGE_RUN:
        out.append((stream.sent_at[run_start], stream.sent_at[j - 1]))
    return out


def run_cell(lab: Lab, fault: Fault, *, recover_timeout: float = 90.0,
             settle: float = 2.0) -> Cell:
    """Baseline (every path keyed), inject, hold, clear, wait for recovery;
    the figures of the cell's window."""
    cell = Cell(fault.name, lab.policy)
    for g in lab.gw.values():
        g.prepare()                       # a warm spare imports during the baseline
    if not lab.wait_keyed(settle=settle):
        cell.notes.append("not keyed before the fault")
        cell.diag = lab.diagnose()
    cold0 = {g.name: g.cold_starts for g in lab.gw.values()}
    for g in lab.gw.values():
        if g.warm and g.wait_warm(SPARE_WARM_TIMEOUT) is None:
            cell.notes.append(f"{g.name}'s spare not warm within {SPARE_WARM_TIMEOUT:.0f} s")
    reused0 = set(lab.key_ids_reused())
    rekeys0 = lab.rekeys()
    lab.notes.clear()
    t0 = time.monotonic()
    fault.inject(lab)
    if hold := fault.hold_for(lab.timers.hard):
        time.sleep(hold)
    fault.clear(lab)
    t_clear = time.monotonic()
    recovered = lab.wait_keyed(settle=settle, timeout=recover_timeout)
    time.sleep(1.5)                       # datagrams in flight arrive
    t1 = time.monotonic() - 1.0
    cell.cleartext = lab.sniffer.count(lab.sniffer.clear_t, t0, t1)
    cell.after_hard = lab.timeline.after_hard(t0, t1)
    reused = sorted(set(lab.key_ids_reused()) - reused0)
    cell.key_ids_reused = len(reused)
    cell.notes += [f"reused {r}" for r in reused[:3]]
    if (larval := lab.timeline.longest_larval(t0, t1)) >= lab.timers.hard / 4:
        cell.notes.append(f"an SPI larval {larval:.1f} s before keyed")
    if cell.after_hard:
        cell.notes += [f"after hard {w}" for w in lab.timeline.after_hard_where(t0, t1)]
        cell.notes.append(f"watch max gap {lab.watch.max_gap:.1f} s")
    cell.rekeys = lab.rekeys() - rekeys0
    last_out = t_clear
    for st in lab.streams:
        i, j = bisect_left(st.sent_at, t0), bisect_right(st.sent_at, t1)
        cell.sent += j - i
        cell.lost += sum(1 for s in range(i, j) if s not in st.received)
        for a, b in outages(st, t0, t1):
            cell.outage_s = max(cell.outage_s, b - a)
            last_out = max(last_out, b)
    cell.recovery_s = round(last_out - t_clear, 1) if recovered else None
    cell.notes += [f"{g.name} restarted from a cold spare" for g in lab.gw.values()
                   if g.cold_starts > cold0[g.name]]
    for g in lab.gw.values():
        if not g.alive():
            cell.notes.append(f"{g.name} not running")
            g.start()
    cell.notes.extend(lab.notes)
    if cell.cleartext:
        cell.notes.append("cleartext sample " + lab.sniffer.samples[-1][:60])
    if cell.recovery_s is None:
        cell.diag += "\n-- after the fault --\n" + lab.diagnose()
    return cell


def markdown(cells: list[Cell]) -> str:
    lines = ["| " + " | ".join(HEADER) + " |", "|" + "---|" * len(HEADER)]
    lines += ["| " + " | ".join(c.row()) + " |" for c in cells]
    return "\n".join(lines)
