"""``qkdgate rekey TUNNEL``: start a fresh key exchange now.

Theory of operation: asks the running daemon (control socket) to start an
exchange with the tunnel's peer; every tunnel to that peer gets the new
generation, since one exchange keys them all. Without ``--wait`` the command
returns once the exchange has started; with ``--wait`` it polls until the
tunnel runs on a newer generation (exit 0) or the time is up (exit 3).
``--json`` prints the daemon's answer (and the final tunnel status).
"""

from __future__ import annotations

import argparse
import json
import sys
import time


def add_arguments(p: argparse.ArgumentParser) -> None:
    p.add_argument("tunnel", help="tunnel name (as in the configuration)")
    p.add_argument("-c", "--config", metavar="FILE",
                   help="read the control socket path from this configuration")
    p.add_argument("--socket", metavar="PATH",
                   help="control socket (default /run/qkdgate/control.sock)")
    p.add_argument("--wait", type=float, nargs="?", const=30.0, default=None, metavar="SECONDS",
                   help="wait until the new generation carries traffic (default 30 s)")
    p.add_argument("--json", action="store_true", help="machine-readable output")


def run(args: argparse.Namespace) -> int:
    from qkdgate.gateway.daemon.control import request, socket_path

    path = socket_path(args)
    result = request(path, "rekey", tunnel=args.tunnel)
    status = None
    rc = 0
    if args.wait is not None:
        before = result.get("generation")
        deadline = time.monotonic() + args.wait
        rc = 3
        while time.monotonic() < deadline:
            tunnels = request(path, "status").get("tunnels", [])
            status = next((t for t in tunnels if t.get("tunnel") == args.tunnel), None)
            if status is None:
                gen, state = None, None
            else:
                gen, state = status.get("generation"), status.get("state")
            if gen is not None and (before is None or gen != before) and state == "up":
                rc = 0
                break
            time.sleep(0.2)
    if args.json:
        json.dump({"rekey": result, "status": status}, sys.stdout, indent=2, sort_keys=True)
        print()
    elif rc == 0 and status is not None:
        print(f"{args.tunnel}: now on generation {status['generation']}")
    elif rc == 0:
        print(f"{args.tunnel}: rekey started with peer {result.get('peer')} "
              f"(current generation {result.get('generation')})")
    else:
        print(f"{args.tunnel}: no new generation within {args.wait:g} s", file=sys.stderr)
    return rc
