"""Soak (issue 10 item 4); run inside the kernel lab VM:

    bash lab/run.sh -- .venv/bin/python bench/soak.py [--minutes 10] [--seed 1]
        [--policy hybrid-required] [--rate 50] [--gap 20] [--no-kill]

Two gateways (bench/faults.py's lab: real daemons, ESP and MACsec, the
KME simulator) rekey every second with traffic both ways for ``--minutes``;
every ``--gap`` s (+-50 %, seeded) a fault drawn from the matrix is injected
and cleared. Prints rekeys, datagrams lost, cleartext on the wire (must be
0), packets after a hard lifetime (0), QKD key_IDs used twice (0), and for
each daemon its RSS slope (least-squares line over the samples of its
longest-lived process, KiB/min) and open file descriptors over time.
``--no-kill`` leaves out the faults that kill a daemon, so each gateway's
one process lives the whole run and its slope is a leak measurement.
Bounded: namespaces and loopback only, everything removed at the end.
"""

from __future__ import annotations

import argparse
import os
import random
import sys
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))

import fault_lab as fl  # bench/ is not a package
from faults import random_fault

SAMPLE_EVERY = 5.0


def slope_per_min(samples: list[tuple[float, int]]) -> float | None:
    """Least-squares slope of (t seconds, KiB) in KiB/min."""
    if len(samples) < 3:
        return None
    n = len(samples)
    mt = sum(t for t, _ in samples) / n
    mv = sum(v for _, v in samples) / n
    var = sum((t - mt) ** 2 for t, _ in samples)
    if var == 0:
        return None
    return 60.0 * sum((t - mt) * (v - mv) for t, v in samples) / var


class Sampler:
    """RSS and open FDs of each daemon process, by (gateway, pid)."""

    def __init__(self, lab: fl.Lab) -> None:
        self.lab = lab
        self.rss: dict[tuple[str, int], list[tuple[float, int]]] = {}
        self.fds: dict[str, list[tuple[float, int]]] = {}

    def sample(self, t: float) -> None:
        for g in self.lab.gw.values():
            if not g.alive():
                continue
            try:
                rss, fds = g.rss_kib(), g.fds()
            except OSError:
                continue
            self.rss.setdefault((g.name, g.pid), []).append((t, rss))
            self.fds.setdefault(g.name, []).append((t, fds))


def main() -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--minutes", type=float, default=10.0)
    p.add_argument("--seed", type=int, default=1)
    p.add_argument("--policy", default="hybrid-required", choices=fl.POLICIES)
    p.add_argument("--rate", type=int, default=50, help="datagrams/s per stream")
    p.add_argument("--gap", type=float, default=20.0, help="mean seconds between faults")
    p.add_argument("--no-macsec", action="store_true")
    p.add_argument("--no-kill", action="store_true",
                   help="no fault that kills a daemon: one process per gateway lives the whole "
                        "run, so its RSS slope is the daemon's, not start-up's")
    a = p.parse_args()
    if not fl.in_lab():
        print("soak: run inside the lab VM (bash lab/run.sh -- ...)", file=sys.stderr)
        return 2
    rng = random.Random(a.seed)  # noqa: S311  a seeded schedule of faults, not a secret
    timers = fl.LabTimers(interval=1.0, soft=3.0, hard=5.0, grace=0.3)
    lab = fl.Lab(a.policy, timers=timers, rate=a.rate, macsec=not a.no_macsec,
                 watch_interval=0.1, keep=Path(os.environ["LAB_OUT"]))
    injected: dict[str, int] = {}
    unrecovered: list[str] = []
    try:
        lab.up()
        for g in lab.gw.values():
            g.prepare()
        sampler = Sampler(lab)
        t0 = time.monotonic()
        end = t0 + a.minutes * 60
        print(f"soak: {a.minutes:g} min, policy {a.policy}, seed {a.seed}, timers {timers}, "
              f"{len(lab.streams)} streams at {a.rate}/s", flush=True)
        next_fault = t0 + a.gap * rng.uniform(0.5, 1.5)
        next_sample = t0
        next_report = t0 + 60
        while time.monotonic() < end:
            now = time.monotonic()
            if now >= next_sample:
                sampler.sample(now - t0)
                next_sample = now + SAMPLE_EVERY
            if now >= next_report:
                print(f"  {(now - t0) / 60:4.1f} min: rekeys {lab.rekeys()}, cleartext "
                      f"{len(lab.sniffer.clear_t)}, faults {sum(injected.values())}", flush=True)
                next_report = now + 60
            # a restart must take a warm spare, or it measures the guest's
            # imports (docs/faults.md): a due fault waits for both spares
            if now >= next_fault and end - now > 40 \
                    and all(g.spare_warm() for g in lab.gw.values() if g.warm):
                f = random_fault(rng, a.policy, kills=not a.no_kill)
                injected[f.name] = injected.get(f.name, 0) + 1
                f.inject(lab)
                deadline = time.monotonic() + f.hold_for(timers.hard)
                while time.monotonic() < deadline:
                    sampler.sample(time.monotonic() - t0)
                    time.sleep(min(SAMPLE_EVERY, max(0.0, deadline - time.monotonic())))
                f.clear(lab)
                if not lab.wait_keyed(settle=2.0, timeout=90):
                    unrecovered.append(f"{f.name} at {(time.monotonic() - t0) / 60:.1f} min")
                for g in lab.gw.values():
                    if not g.alive():
                        unrecovered.append(f"{g.name} dead after {f.name}")
                        g.start()
                    g.prepare()            # a warm spare for the next restart
                next_fault = time.monotonic() + a.gap * rng.uniform(0.5, 1.5)
            time.sleep(0.2)
        elapsed = time.monotonic() - t0
        time.sleep(1.5)
        t1 = time.monotonic() - 1.0
        sent = lost = 0
        for st in lab.streams:
            n = sum(1 for t in st.sent_at if t <= t1)
            sent += n
            lost += sum(1 for s in range(n) if s not in st.received)
        print(f"\nsoak result ({elapsed / 60:.1f} min, seed {a.seed}, policy {a.policy})")
        print(f"rekeys (rekey_done events, both gateways): {lab.rekeys()}")
        print(f"datagrams lost/sent: {lost}/{sent} ({100 * lost / max(1, sent):.2f} %)")
        print(f"cleartext inner packets on the wire: {len(lab.sniffer.clear_t)} "
              f"(of {lab.sniffer.frames} frames, {len(lab.sniffer.esp_t)} ESP, "
              f"{len(lab.sniffer.macsec_t)} MACsec)")
        print(f"packets delivered after a hard lifetime: {lab.timeline.after_hard(0, t1)}")
        print(f"QKD key_IDs used twice: {len(lab.key_ids_reused())}")
        print(f"faults injected: {sum(injected.values())}: "
              + ", ".join(f"{k} x{v}" for k, v in sorted(injected.items())))
        print(f"not recovered within 90 s: {unrecovered or 'none'}")
        for name in lab.gw:
            segs = [(pid, s) for (g, pid), s in sampler.rss.items() if g == name]
            if not segs:
                continue
            pid, s = max(segs, key=lambda x: x[1][-1][0] - x[1][0][0])
            sl = slope_per_min(s)
            span = (s[-1][0] - s[0][0]) / 60
            sl_txt = "n/a" if sl is None else f"{sl:+.1f} KiB/min"
            print(f"{name}: {len(segs)} process(es); longest pid {pid} for {span:.1f} min: "
                  f"RSS {s[0][1]} -> {s[-1][1]} KiB, slope {sl_txt}")
            fds = sampler.fds.get(name, [])
            per_min = [f"{t / 60:.0f}:{v}" for t, v in fds[:: max(1, int(60 / SAMPLE_EVERY))]]
            print(f"{name}: open FDs min {min(v for _, v in fds)} max {max(v for _, v in fds)}"
                  f" (min:fds) {' '.join(per_min)}")
        return 0 if not (lab.sniffer.clear_t or lab.key_ids_reused()) else 1
    finally:
        lab.down()


if __name__ == "__main__":
    sys.exit(main())
