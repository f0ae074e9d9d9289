"""``qkdgate ha-notify MASTER|BACKUP|FAULT|STOP``: tell the daemon its HA role.

Theory of operation: keepalived runs this from ``notify_master`` /
``notify_backup`` / ``notify_fault`` / ``notify_stop`` (keepalived.conf(5));
it forwards the state over the control socket (``{"cmd": "ha", "state":
...}``) and prints the role the daemon now has. Without a state it prints
the current role. ``notify_fifo`` (``ha.notify_fifo`` in the configuration)
is the faster and ordered path: the daemon reads keepalived's FIFO itself,
with no process started per notification (docs/operations.md).
"""

from __future__ import annotations

import argparse
import json
import sys

STATES = ("MASTER", "BACKUP", "FAULT", "STOP")


def add_arguments(p: argparse.ArgumentParser) -> None:
    p.add_argument("state", nargs="?", type=str.upper, choices=STATES,
                   help="the VRRP state keepalived entered (omit to show the role)")
    p.add_argument("-c", "--config", metavar="FILE",
                   help="read the control socket path from this configuration")
    p.add_argument("--socket", metavar="PATH",
                   help="control socket (default /run/qkdgate/control.sock)")
    p.add_argument("--json", action="store_true", help="machine-readable output")


def run(args: argparse.Namespace) -> int:
    from qkdgate.gateway.daemon.control import request, socket_path

    params = {"state": args.state} if args.state else {}
    result = request(socket_path(args), "ha", **params)
    if args.json:
        json.dump(result, sys.stdout, indent=2, sort_keys=True)
        print()
    else:
        print(f"node {result['node']}: {result['role']} "
              f"(for {result['since']:g} s, {result['activations']} activation(s))")
    return 0
