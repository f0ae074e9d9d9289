"""The failover table of an HA pair on a real keepalived (issue 12).

    bash lab/run.sh -- .venv/bin/python bench/ha.py [--json FILE] [--events E,...]

Runs inside the kernel lab VM (root, network namespaces, keepalived, real
ESP). The topology, daemons, keepalived configuration, streams and wire
capture are the kernel test's (tests/kernel/test_ha_keepalived.py: hA -
{gA1, gA2 sharing the VIP} - wire - gB - hB, one shared identity, separate
journals, the KME simulator); this script runs the same four events in the
same order, without pytest:

1. ``sigkill``  the active daemon SIGKILLed (keepalived sees it through its
   track script, interval 1 s, fall 2);
2. ``planned``  keepalived stopped on the active node (a priority-0 advert);
3. ``link``     the active node's wire link down (keepalived FAULT);
4. ``power``    power loss: every process of the active node SIGKILLed and
   its namespace deleted (no FIN, no notification, its links vanish).

For each: the role switch (s), the outage each way (ms from the event to the
first datagram sent after it that arrived, at 100 datagrams/s each way),
datagrams lost each way before that one, cleartext packets of the protected
networks on the wire (must be 0), QKD key_IDs in the generations gB keyed
during the switch, and the generation step at gB. The kernel test asserts
the zeros and bounds the outage loosely (20 s under TCG); this prints the
numbers. Goals (issue 12): outage under 1 s for crash and power loss, 0 lost
on a planned switch, 0 cleartext always.

Each event leaves the pair ready for the next, so a later event is only run
when the earlier ones in the list ran; ``--events`` picks a prefix-closed
subset by name (``sigkill,planned``...). An event that fails its checks is
reported with its error and ends the run (the pair's state is then unknown).
"""

from __future__ import annotations

import argparse
import json
import sys
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT / "tests" / "kernel"))

import test_ha_keepalived as ha  # noqa: E402 - the kernel test's lab, after sys.path

NAMES = {"sigkill": ha.sigkill_active, "planned": ha.planned_switch, "link": ha.link_down,
         "power": ha.power_loss}
HEADER = ("| event | role switch s | outage ms A->B / B->A | lost A->B / B->A | cleartext "
          "| QKD keys used | generation |\n|---|---|---|---|---|---|---|")


def row(r: dict) -> str:
    return (f"| {r['event']} | {r['role_switch_s']:.2f} | {r['outage_ms'][0]} / "
            f"{r['outage_ms'][1]} | {r['lost'][0]} / {r['lost'][1]} | {r['cleartext']} | "
            f"{r['qkd_keys']} | {r['generation'][0]} -> {r['generation'][1]} |")


def table(rows: list[dict]) -> str:
    return HEADER + "\n" + "\n".join(row(r) if "error" not in r
                                     else f"| {r['event']} | failed: {r['error'][:200]} |"
                                     for r in rows)


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--json", help="write the rows as JSON here")
    ap.add_argument("--events", default=",".join(NAMES),
                    help=f"comma-separated, in order, from {', '.join(NAMES)}")
    args = ap.parse_args(argv)
    wanted = [e.strip() for e in args.events.split(",") if e.strip()]
    order = list(NAMES)
    if any(e not in NAMES for e in wanted) or wanted != order[:len(wanted)]:
        ap.error(f"--events must be a prefix of {','.join(order)} (each readies the next)")
    lab = ha.new_lab()
    rows: list[dict] = []
    t0 = time.monotonic()
    try:
        ha.start_pair(lab)
        print(f"pair keyed after {time.monotonic() - t0:.0f} s", flush=True)
        for name in wanted:
            try:
                r = NAMES[name](lab)
            except AssertionError as exc:
                rows.append({"event": name, "error": str(exc)})
                break
            r.pop("outage", None)
            rows.append(r)
            print(f"{name} done: {row(r)}", flush=True)   # progress; the table is at the end
    finally:
        lab.down()
    print("\nHA failover (100 datagrams/s each way):\n" + table(rows))
    if args.json:
        Path(args.json).write_text(json.dumps(rows, indent=1) + "\n")
    return 1 if any("error" in r for r in rows) else 0


if __name__ == "__main__":
    sys.exit(main())
