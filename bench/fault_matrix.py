"""The fault matrix on the wire (issue 10 item 2); run inside the kernel lab VM:

    bash lab/run.sh -- .venv/bin/python bench/fault_matrix.py [--policies P,...]
        [--faults SUBSTRING,...] [--json FILE] [--hold S]

For each policy (hybrid-required, pqc-fallback, qkd-mandatory, pqc-only) one
lab (bench/faults.py: namespaces, KME simulator, two real daemons, three
UDP streams, a wire sniffer, the kernel watch) runs every fault of the
matrix in turn and prints one markdown row per cell: cleartext inner
packets on the wire (must be 0), packets the receiving kernel accepted
after an SA's hard lifetime (0), QKD key_IDs used twice (0), datagrams
lost, the longest outage and the time from the fault's end to the last
outage (recovery). QKD faults are skipped under pqc-only (no QKD there).
The table goes to stdout as it grows; docs/faults.md carries the latest.
"""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import time
from dataclasses import asdict
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))

import fault_cell as fc  # bench/ is not a package
import fault_lab as fl
from faults import all_faults


def main() -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--policies", default=",".join(fl.POLICIES))
    p.add_argument("--faults", default="", help="comma-separated substrings of fault names")
    p.add_argument("--json", help="write the cells here too")
    p.add_argument("--hold", type=float, default=None, help="override each fault's hold time")
    p.add_argument("--no-macsec", action="store_true")
    p.add_argument("--diagnose", action="store_true", help="print the lab's state once it is up")
    a = p.parse_args()
    if not fl.in_lab():
        print("fault_matrix: run inside the lab VM (bash lab/run.sh -- ...)", file=sys.stderr)
        return 2
    want = [w.strip() for w in a.faults.split(",") if w.strip()]
    commit = subprocess.run(["git", "-C", str(fl.ROOT), "rev-parse", "--short", "HEAD"],
                            capture_output=True, text=True).stdout.strip()
    print(f"fault matrix: {time.strftime('%Y-%m-%d %H:%M UTC', time.gmtime())}, commit {commit},"
          f" kernel {os.uname().release}, timers {fl.LabTimers()}", flush=True)
    cells: list[fc.Cell] = []
    t_all = time.monotonic()
    keep = Path(os.environ["LAB_OUT"])
    for policy in a.policies.split(","):
        faults = [f for f in all_faults() if f.applies(policy)
                  and (not want or any(w.lower() in f.name.lower() for w in want))]
        if not faults:
            continue
        lab = fl.Lab(policy, macsec=not a.no_macsec, keep=keep)
        t_lab = time.monotonic()
        try:
            lab.up()
            if a.diagnose:
                time.sleep(15)
                print(lab.diagnose(), flush=True)
            print(f"\n## {policy} (lab up in {time.monotonic() - t_lab:.0f} s)\n", flush=True)
            print("| " + " | ".join(fc.HEADER) + " |\n|" + "---|" * len(fc.HEADER), flush=True)
            for f in faults:
                if a.hold is not None and f.hold:
                    f.hold = a.hold
                t = time.monotonic()
                try:
                    cell = fc.run_cell(lab, f)
                except Exception as exc:  # noqa: BLE001  one broken cell must not hide the others
                    cell = fc.Cell(f.name, policy, notes=[f"ERROR {type(exc).__name__}: {exc}"])
                cell.notes.append(f"{time.monotonic() - t:.0f} s")
                cells.append(cell)
                print("| " + " | ".join(cell.row()) + " |", flush=True)
                if cell.diag:
                    print("<!--\n" + cell.diag + "\n-->", flush=True)
        finally:
            errors = lab.down()
            if errors:
                print(f"cleanup errors: {errors}", flush=True)
    bad = [c for c in cells if c.cleartext or c.after_hard or c.key_ids_reused]
    print(f"\n{len(cells)} cells in {time.monotonic() - t_all:.0f} s; "
          f"non-zero must-be-zero cells: {len(bad)}", flush=True)
    if a.json:
        Path(a.json).write_text(json.dumps([asdict(c) for c in cells], indent=1))
    return 1 if bad else 0


if __name__ == "__main__":
    sys.exit(main())
