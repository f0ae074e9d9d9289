"""Daemon start to READY=1 on the host (issue 19: under 1 s).

    .venv/bin/python bench/ready.py [--reps 5] [--tunnels 1]      # root

Each rep builds a fresh topology (bench/vs_topology.py: two gateway
namespaces and a KME namespace), starts the KME simulator, and starts the
real daemon (``qkdgate run``) of gw-a in its namespace with ``NOTIFY_SOCKET``
pointing at a datagram socket of the bench, exactly as systemd starts a
``Type=notify`` unit (sd_notify(3)). Measured: from just before the process
is spawned to the arrival of the datagram carrying ``READY=1`` (the daemon
sends it once its tunnels are set up, its socket bound and its loops
running: gateway/daemon/daemon.py). Beside it, the part that is only the
interpreter: ``python -c 'import qkdgate.gateway.cli.main'`` in the same
namespace. Prints median [min-max] of ``--reps``. The checkout is
byte-compiled first (vs_topology.precompile), as an installed package is.

The peer (gw-b) is not started: READY does not wait for the first exchange
(tunnels fail closed until then), so the figure is the daemon's own start-up.
"""

from __future__ import annotations

import argparse
import contextlib
import os
import shutil
import socket
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

from vs_contenders import Qkdgate  # bench/ is not a package
from vs_topology import VENV_BIN, Topology, cpu_seconds, precompile


def one(tunnels: int, timeout: float) -> tuple[float, float, float]:
    """(start to READY=1, the daemon's CPU time by then, the bare import) in
    seconds. On a loaded host the wall time mostly waits for a CPU; the CPU
    time is what the start costs."""
    topo = Topology().up()
    work = Path(tempfile.mkdtemp(prefix="ready-"))
    os.chmod(work, 0o700)
    q = Qkdgate(topo, work, work)
    rx = socket.socket(socket.AF_UNIX, socket.SOCK_DGRAM)
    proc: subprocess.Popen[bytes] | None = None
    try:
        kme_a, _kme_b = q._kme()
        cfg = q._yaml("a", tunnels, kme_a)
        path = str(work / "notify")
        rx.bind(path)
        rx.settimeout(timeout)
        env = {**os.environ, "NOTIFY_SOCKET": path}
        t0 = time.perf_counter()
        with open(cfg.parent / "daemon.log", "w") as log:
            proc = subprocess.Popen(["ip", "netns", "exec", topo.a, str(VENV_BIN / "qkdgate"),
                                     "run", "-c", str(cfg), "--teardown-on-exit"],
                                    env=env, stdout=log, stderr=subprocess.STDOUT)
        while True:
            try:
                msg = rx.recv(4096).decode(errors="replace")
            except TimeoutError:
                log_text = (cfg.parent / "daemon.log").read_text()[-2000:]
                raise RuntimeError(f"no READY=1 within {timeout} s:\n{log_text}") from None
            if "READY=1" in msg.split("\n"):
                ready = time.perf_counter() - t0
                cpu = cpu_seconds([proc.pid])   # ip netns exec execs the daemon: same pid
                break
        t1 = time.perf_counter()
        subprocess.run(["ip", "netns", "exec", topo.a, str(VENV_BIN / "python"), "-c",
                        "import qkdgate.gateway.cli.main"], check=True)
        bare = time.perf_counter() - t1
        return ready, cpu, bare
    finally:
        if proc is not None:
            proc.terminate()
            with contextlib.suppress(subprocess.TimeoutExpired):
                proc.wait(30)
            if proc.poll() is None:
                proc.kill()
        rx.close()
        q.close()
        topo.down()
        shutil.rmtree(work, ignore_errors=True)


def fmt(xs: list[float]) -> str:
    return f"{statistics.median(xs):.3f} [{min(xs):.3f}-{max(xs):.3f}] s"


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--reps", type=int, default=5)
    ap.add_argument("--tunnels", type=int, default=1, help="IPsec tunnels of the peer")
    ap.add_argument("--timeout", type=float, default=120.0)
    args = ap.parse_args()
    if not precompile():    # an installed package ships its bytecode
        print("warning: could not byte-compile the checkout", file=sys.stderr)
    ready, cpu, bare = [], [], []
    for i in range(args.reps):
        r, c, b = one(args.tunnels, args.timeout)
        print(f"  rep {i + 1}: READY=1 after {r:.3f} s, {c:.2f} CPU-s "
              f"(bare import {b:.3f} s)", flush=True)
        ready.append(r)
        cpu.append(c)
        bare.append(b)
    print(f"daemon start to READY=1, {args.tunnels} tunnel(s), kernel {os.uname().release}, "
          f"{os.cpu_count()} CPU(s), load {os.getloadavg()[0]:.1f}: {fmt(ready)} "
          f"(median of {args.reps}), the daemon's CPU time by then {fmt(cpu)}; "
          f"python start + import of the CLI alone: {fmt(bare)}")
    return 0 if statistics.median(ready) < 1.0 else 1


if __name__ == "__main__":
    sys.exit(main())
