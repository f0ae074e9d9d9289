"""The fault matrix on the wire (issue 10 item 2); run inside the kernel lab VM:

    bash lab/run.sh -- .venv/bin/python bench/fault_matrix.py [--policies P,...]
        [--faults SUBSTRING,...] [--jobs N] [--json FILE] [--hold S]

For each policy (hybrid-required, pqc-fallback, qkd-mandatory, pqc-only) one
lab (bench/fault_lab.py: namespaces, KME simulator, two real daemons, three
UDP streams, a wire sniffer, the kernel watch) runs every fault of the
matrix in turn (bench/fault_cell.py) and prints one markdown row per cell:
cleartext inner packets on the wire (must be 0), packets the receiving
kernel accepted after an SA's hard lifetime (0), QKD key_IDs used twice
(0), datagrams lost, the longest outage and the time from the fault's end
to the last outage (recovery). QKD faults are skipped under pqc-only (no
QKD there). docs/faults.md carries the latest table.

The policies' labs run side by side (``--jobs``, each a child process with
its own namespaces, KME simulator and daemons). A wall-clock step touches
the whole VM, so a clock cell holds an exclusive lock that every other cell
holds shared: no other cell is measured while the clock is off. Each
child runs its clock cells last, so they wait only for the other children's
ordinary cells.
"""

from __future__ import annotations

import argparse
import contextlib
import fcntl
import json
import os
import subprocess
import sys
import time
from collections.abc import Iterator
from dataclasses import asdict
from pathlib import Path
from typing import Any

sys.path.insert(0, str(Path(__file__).resolve().parent))

import fault_cell as fc  # bench/ is not a package
import fault_lab as fl
from faults import ClockStep, Fault, all_faults


@contextlib.contextmanager
def vm_lock(path: Path, exclusive: bool) -> Iterator[None]:
    """Shared for an ordinary cell, exclusive for one that steps the VM's clock."""
    with open(path, "a") as f:
        fcntl.flock(f, fcntl.LOCK_EX if exclusive else fcntl.LOCK_SH)
        try:
            yield
        finally:
            fcntl.flock(f, fcntl.LOCK_UN)


def faults_for(policy: str, want: list[str]) -> list[Fault]:
    fs = [f for f in all_faults() if f.applies(policy)
          and (not want or any(w.lower() in f.name.lower() for w in want))]
    return sorted(fs, key=lambda f: isinstance(f, ClockStep))     # clock cells last


def run_policy(policy: str, faults: list[Fault], *, lock: Path, keep: Path,
               macsec: bool = True, hold: float | None = None,
               timers: fl.LabTimers | None = None, out: Any = None) -> list[fc.Cell]:
    """One lab for ``policy``, every fault of ``faults`` in it; rows printed as they come."""
    out = out or sys.stdout
    cells: list[fc.Cell] = []
    lab = fl.Lab(policy, macsec=macsec, keep=keep, timers=timers)
    t_lab = time.monotonic()
    try:
        lab.up()
        print(f"{policy}: lab up in {time.monotonic() - t_lab:.0f} s", file=out, flush=True)
        for f in faults:
            if hold is not None and f.hold != 0.0:
                f.hold = hold
            t = time.monotonic()
            with vm_lock(lock, isinstance(f, ClockStep)):
                try:
                    cell = fc.run_cell(lab, f)
                except Exception as exc:  # noqa: BLE001  one broken cell must not hide the others
                    cell = fc.Cell(f.name, policy, notes=[f"ERROR {type(exc).__name__}: {exc}"])
            cell.notes.append(f"{time.monotonic() - t:.0f} s")
            cells.append(cell)
            print("| " + " | ".join(cell.row()) + " |", file=out, flush=True)
            if cell.diag:
                print("<!--\n" + cell.diag + "\n-->", file=out, flush=True)
    finally:
        errors = lab.down()
        if errors:
            print(f"{policy}: cleanup errors: {errors}", file=out, flush=True)
    return cells


def child(a: argparse.Namespace) -> int:
    keep = Path(os.environ["LAB_OUT"])
    want = [w.strip() for w in a.faults.split(",") if w.strip()]
    cells = run_policy(a.policies, faults_for(a.policies, want), lock=Path(a.lock), keep=keep,
                       macsec=not a.no_macsec, hold=a.hold)
    Path(a.json).write_text(json.dumps([asdict(c) for c in cells], indent=1))
    return 0


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--policies", default=",".join(fl.POLICIES))
    p.add_argument("--faults", default="", help="comma-separated substrings of fault names")
    p.add_argument("--jobs", type=int, default=2, help="policies' labs run side by side")
    p.add_argument("--json", help="write the cells here too")
    p.add_argument("--hold", type=float, default=None, help="override each fault's hold time")
    p.add_argument("--no-macsec", action="store_true")
    p.add_argument("--child", action="store_true", help=argparse.SUPPRESS)
    p.add_argument("--lock", help=argparse.SUPPRESS)
    a = p.parse_args(argv)
    if not fl.in_lab():
        print("fault_matrix: run inside the lab VM (bash lab/run.sh -- ...)", file=sys.stderr)
        return 2
    if a.child:
        return child(a)
    out_dir = Path(os.environ["LAB_OUT"])
    lock = out_dir / "fault-matrix.lock"
    commit = subprocess.run(["git", "-C", str(fl.ROOT), "rev-parse", "--short", "HEAD"],
                            capture_output=True, text=True).stdout.strip()
    print(f"fault matrix: {time.strftime('%Y-%m-%d %H:%M UTC', time.gmtime())}, commit {commit},"
          f" kernel {os.uname().release}, timers {fl.LabTimers()}, jobs {a.jobs}", flush=True)
    t_all = time.monotonic()
    pending = [pol for pol in a.policies.split(",") if pol]
    running: dict[str, tuple[subprocess.Popen[bytes], Path]] = {}
    results: dict[str, list[fc.Cell]] = {}
    while pending or running:
        while pending and len(running) < a.jobs:
            pol = pending.pop(0)
            js, log = out_dir / f"fault-matrix-{pol}.json", out_dir / f"fault-matrix-{pol}.log"
            js.unlink(missing_ok=True)
            args = [sys.executable, __file__, "--child", "--policies", pol, "--faults", a.faults,
                    "--json", str(js), "--lock", str(lock)]
            if a.hold is not None:
                args += ["--hold", str(a.hold)]
            if a.no_macsec:
                args.append("--no-macsec")
            with open(log, "wb") as f:
                running[pol] = (subprocess.Popen(args, stdout=f, stderr=subprocess.STDOUT), js)
            print(f"{pol}: started (log {log.name})", flush=True)
        time.sleep(2)
        for pol, (proc, js) in list(running.items()):
            if proc.poll() is None:
                continue
            del running[pol]
            cells = ([fc.Cell(**c) for c in json.loads(js.read_text())] if js.exists()
                     else [fc.Cell("(all)", pol, notes=[f"child exit {proc.returncode}"])])
            results[pol] = cells
            print(f"{pol}: {len(cells)} cells, exit {proc.returncode}, "
                  f"{time.monotonic() - t_all:.0f} s since start", flush=True)
    cells = [c for pol in a.policies.split(",") for c in results.get(pol, [])]
    print("\n" + fc.markdown(cells), flush=True)
    bad = [c for c in cells if c.cleartext or c.after_hard or c.key_ids_reused]
    print(f"\n{len(cells)} cells in {time.monotonic() - t_all:.0f} s; "
          f"non-zero must-be-zero cells: {len(bad)}", flush=True)
    if a.json:
        Path(a.json).write_text(json.dumps([asdict(c) for c in cells], indent=1))
    return 1 if bad else 0


if __name__ == "__main__":
    sys.exit(main())
