"""``qkdgate ARGS`` with a cProfile that SIGUSR2 switches on and off, for
bench/vs_strongswan.py --cprofile (issue 19: where a rekey-all's time goes in
the lab, where py-spy found the daemons idle).

    python bench/cprofile_daemon.py OUT run -c gw.yaml ...

The profile measures the CPU time of the daemon's one thread (its event
loop: the IPsec path runs no other thread), so time the VM spends elsewhere
is not charged to whatever function was running. The first SIGUSR2 starts
it; the second stops it and writes OUT.1 (pstats), the next pair OUT.2, and
so on. Until the first signal the daemon runs exactly as ``qkdgate`` does.
"""
import cProfile
import os
import signal
import sys
import time
from types import FrameType


def main() -> int:
    out, argv = sys.argv[1], sys.argv[2:]
    prof = cProfile.Profile(time.thread_time)
    state = {"on": False, "dumps": 0}

    def toggle(_signum: int, _frame: FrameType | None) -> None:
        if state["on"]:
            prof.disable()
            state["dumps"] += 1
            path = f"{out}.{state['dumps']}"
            prof.dump_stats(path + ".tmp")
            os.replace(path + ".tmp", path)      # whole or absent for the bench
            prof.clear()
        else:
            prof.enable()
        state["on"] = not state["on"]

    signal.signal(signal.SIGUSR2, toggle)
    from qkdgate.gateway.cli.main import main as qkdgate_main
    return qkdgate_main(argv)


if __name__ == "__main__":
    sys.exit(main())
