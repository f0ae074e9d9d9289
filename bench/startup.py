"""``qkdgate run`` start-up cost on the host: time, CPU, memory, modules (issue 19).

    .venv/bin/python bench/startup.py [--reps 5] [--profile demo|minimal]
        [--tunnels 1] [--modules FILE] [--importtime FILE]          # root

Each rep starts the real daemon (``qkdgate.gateway.cli.main`` with ``run -c
FILE --teardown-on-exit``, the console script's entry point) in a fresh
network namespace of its own (``unshare -n``, loopback up), so it installs
its SAs and blocking policies through the host kernel's real XFRM and
touches nothing outside. ``NOTIFY_SOCKET`` points at a datagram socket
the same process holds, exactly as systemd starts a ``Type=notify`` unit
(sd_notify(3)); when ``READY=1`` arrives (the daemon sends it once its
tunnels are set up, its socket bound and its loops running) the process
records, about itself:

- wall: from the process's start (``/proc/self/stat`` starttime, so the
  interpreter's own start-up counts) to READY=1;
- cpu: its user + system CPU time by then (all threads);
- rss: ``VmRSS`` and ``VmHWM`` from ``/proc/self/status``, and VmRSS's
  anonymous and file-backed parts (``RssAnon``, ``RssFile``): the
  file-backed pages (the interpreter, libcrypto, the Rust bindings) are
  shared by every daemon on the machine, so two daemons' VmRSS added
  counts them twice;
- modules: ``len(sys.modules)``;

prints them as one JSON line and sends itself SIGTERM (the daemon stops
and removes what it installed). Prints median [min-max] over ``--reps``,
plus the bare interpreter (``python -c pass``) for reference.

Profiles: ``demo`` is the demo's gw-a (docs/demo.md: one IPsec tunnel,
hybrid-required, one ETSI 014 KME over mutual TLS, identities pinned; the
KME need not answer: READY does not wait for the first exchange or key);
``minimal`` is one pqc-only IPsec tunnel, no QKD, no telemetry, no key
service: everything optional off. ``--modules FILE`` writes the sorted
module names of the last rep; ``--importtime FILE`` writes one rep's
``python -X importtime`` report. To compare before and after a change, run
it on both checkouts (``git worktree``) on an otherwise idle host. The
checkout is byte-compiled first (vs_topology.precompile), as an installed
package is: under PYTHONDONTWRITEBYTECODE an editable install would compile
every module at every start.
"""

from __future__ import annotations

import argparse
import json
import os
import signal
import socket
import sys
import threading
import time
from pathlib import Path

# The child's own imports are only these (the parent's are inside its
# functions), so its module count is the daemon's.
HERE = Path(__file__).resolve().parent
PY = sys.executable


# ------------------------------------------------------------ the child

def _status() -> dict[str, int]:
    out = {}
    with open("/proc/self/status") as fh:
        for line in fh:
            key, _, value = line.partition(":")
            if key in ("VmRSS", "VmHWM", "RssAnon", "RssFile"):
                out[key] = int(value.split()[0])   # kB
    return out


def _since_process_start() -> float:
    with open("/proc/self/stat") as fh:
        fields = fh.read().rpartition(")")[2].split()
    start_ticks = int(fields[19])          # proc(5): field 22, starttime
    with open("/proc/uptime") as fh:
        uptime = float(fh.read().split()[0])
    return uptime - start_ticks / os.sysconf("SC_CLK_TCK")


def child(config: str, modules_out: str | None) -> int:
    """Run the daemon in this process; report on READY=1 and stop it."""
    sock_path = os.path.join(os.path.dirname(config), f"notify-{os.getpid()}")
    rx = socket.socket(socket.AF_UNIX, socket.SOCK_DGRAM)
    rx.bind(sock_path)
    os.environ["NOTIFY_SOCKET"] = sock_path

    def watch() -> None:
        while True:
            msg = rx.recv(4096).decode(errors="replace")
            if "READY=1" in msg.split("\n"):
                break
        # /proc/self/stat's starttime has clock-tick resolution (10 ms)
        wall = _since_process_start()
        t = os.times()
        report = {"wall": wall, "cpu": t.user + t.system, **_status(),
                  "modules": len(sys.modules)}
        if modules_out:
            Path(modules_out).write_text("\n".join(sorted(sys.modules)) + "\n")
        print(json.dumps(report), flush=True)
        os.kill(os.getpid(), signal.SIGTERM)

    threading.Thread(target=watch, daemon=True).start()
    from qkdgate.gateway.cli.main import main
    return main(["run", "-c", config, "--teardown-on-exit"])


# ------------------------------------------------------------ the parent

def _qkdgate(*args: str) -> None:
    import subprocess
    subprocess.run([PY, "-m", "qkdgate.gateway.cli.main", *args], check=True,
                   stdout=subprocess.DEVNULL)


def write_config(work: Path, profile: str, tunnels: int, port: int = 4600) -> Path:
    """gw-a's configuration (profile ``demo`` or ``minimal``) under ``work``,
    listening on UDP ``port``; the peer gw-b only needs to exist as a pinned
    identity. tests/unit/test_startup.py starts the daemon from it too."""
    for name in ("gw-a", "gw-b"):
        _qkdgate("keygen", "-o", str(work / f"{name}.identity"), "--name", name,
                 "--pub", str(work / f"{name}.pub"))
    policy = "pqc-only" if profile == "minimal" else "hybrid-required"
    qkd = key_sources = ""
    if profile == "demo":
        from qkdgate.adapters.kmesim.pki import ensure_pki
        pki = ensure_pki(work, ["KME-A", "KME-B"], ["SAE-A", "SAE-B"])
        sae = pki.sae("SAE-A")
        qkd = """    qkd:
      key_source: kme
      role: master
      local_sae_id: SAE-A
      peer_sae_id: SAE-B
"""
        # Nothing listens there: READY does not wait for a key.
        key_sources = f"""key_sources:
  - name: kme
    kind: etsi014
    url: https://127.0.0.1:9/
    kme_id: KME-A
    timeout: 2s
    retries: 1
    tls: {{cert: {sae.cert}, key: {sae.key}, ca: {pki.ca}}}
"""
    tl = "".join(f"""  - name: t{i}
    peer: gw-b
    type: ipsec
    policy: {policy}
    ipsec: {{local_address: 127.0.0.1, remote_address: 127.0.0.2,
            local_subnets: [10.{1 + i // 256}.{i % 256}.0/24],
            remote_subnets: [10.{128 + i // 256}.{i % 256}.0/24],
            reqid: {1000 + 16 * i}}}
    rekey: {{interval: 3600s, soft_lifetime: 7000s, hard_lifetime: 7200s}}
""" for i in range(tunnels))
    text = f"""version: 1
gateway:
  name: gw-a
  identity: {work}/gw-a.identity
  listen: {{address: 127.0.0.1, port: {port}}}
  state_dir: {work}/state
  control_socket: {work}/control.sock
peers:
  - name: gw-b
    address: 127.0.0.2
    port: 4600
    identities: [{work}/gw-b.pub]
{qkd}{key_sources}tunnels:
{tl}telemetry:
  log: {{level: warning}}
"""
    path = work / "gw-a.yaml"
    path.write_text(text)
    os.chmod(path, 0o600)
    return path


def _in_netns(*argv: str) -> list[str]:
    return ["unshare", "-n", "sh", "-c", 'ip link set lo up && exec "$@"', "sh", *argv]


def one(config: Path, modules_out: str | None, timeout: float) -> dict[str, float]:
    import subprocess
    t0 = time.perf_counter()
    proc = subprocess.run(_in_netns(PY, str(Path(__file__).resolve()), "--child", str(config),
                                    *(["--modules", modules_out] if modules_out else [])),
                          capture_output=True, text=True, timeout=timeout, check=False)
    total = time.perf_counter() - t0
    lines = [ln for ln in proc.stdout.splitlines() if ln.startswith("{")]
    if proc.returncode != 0 or not lines:
        raise RuntimeError(f"daemon exited {proc.returncode} without a report:\n"
                           f"{proc.stdout[-2000:]}{proc.stderr[-4000:]}")
    report: dict[str, float] = json.loads(lines[-1])
    report["start_to_exit"] = total
    return report


def bare_python() -> float:
    import subprocess
    t0 = time.perf_counter()
    subprocess.run([PY, "-c", "pass"], check=True)
    return time.perf_counter() - t0


def _fmt(values: list[float], unit: str, scale: float = 1.0) -> str:
    import statistics  # not at the top: the child's module count is the daemon's
    v = [x * scale for x in values]
    return f"{statistics.median(v):.3g} [{min(v):.3g}-{max(v):.3g}] {unit}"


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--reps", type=int, default=5)
    ap.add_argument("--profile", choices=("demo", "minimal"), default="demo")
    ap.add_argument("--tunnels", type=int, default=1)
    ap.add_argument("--modules", metavar="FILE", help="write the module names of the last rep")
    ap.add_argument("--importtime", metavar="FILE",
                    help="also write one rep's `python -X importtime` report")
    ap.add_argument("--timeout", type=float, default=120.0)
    ap.add_argument("--child", metavar="CONFIG", help=argparse.SUPPRESS)
    args = ap.parse_args()
    if args.child:
        return child(args.child, args.modules)
    import subprocess
    import tempfile
    if os.geteuid() != 0:
        print("bench/startup.py needs root (a network namespace and XFRM)", file=sys.stderr)
        return 2
    from vs_topology import precompile  # bench/ is not a package
    if not precompile():
        print("warning: could not byte-compile the checkout: every start compiles it",
              file=sys.stderr)
    with tempfile.TemporaryDirectory(prefix="startup-") as tmp:
        work = Path(tmp)
        os.chmod(work, 0o700)
        config = write_config(work, args.profile, args.tunnels)
        one(config, None, args.timeout)     # warm the byte-code cache and the page cache
        reps = [one(config, args.modules if i == args.reps - 1 else None, args.timeout)
                for i in range(args.reps)]
        if args.importtime:
            proc = subprocess.run(_in_netns(PY, "-X", "importtime", str(Path(__file__).resolve()),
                                            "--child", str(config)),
                                  capture_output=True, text=True, timeout=args.timeout,
                                  check=False)
            Path(args.importtime).write_text(proc.stderr)
    bare = [bare_python() for _ in range(args.reps)]
    print(f"qkdgate run, profile {args.profile}, {args.tunnels} tunnel(s), "
          f"{args.reps} reps, median [min-max]:")
    print(f"  start to READY=1 (wall)    {_fmt([r['wall'] for r in reps], 's')}")
    print(f"  CPU by READY=1             {_fmt([r['cpu'] for r in reps], 'CPU-s')}")
    print(f"  VmRSS at READY=1           {_fmt([r['VmRSS'] for r in reps], 'MB', 1 / 1024)}")
    print(f"  VmHWM at READY=1           {_fmt([r['VmHWM'] for r in reps], 'MB', 1 / 1024)}")
    print(f"    of VmRSS: anonymous      {_fmt([r['RssAnon'] for r in reps], 'MB', 1 / 1024)}")
    print(f"    of VmRSS: file-backed    {_fmt([r['RssFile'] for r in reps], 'MB', 1 / 1024)}"
          "  (shared libraries and the like: shared between daemons)")
    print(f"  modules (len(sys.modules)) {_fmt([r['modules'] for r in reps], '')}")
    print(f"  bare `python -c pass`      {_fmt(bare, 's')}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
