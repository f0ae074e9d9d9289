"""A stand-in for the qkdgate daemon in kernel test 4: installs one IPsec or
MACsec tunnel through the real backends (recording them in a tunnel
registry, as the daemon does), prints READY and then waits to be killed.
usage: daemon_stub.py ipsec|macsec TOPOLOGY_NAMES_JSON STATE_PATH [HARD_SECONDS]"""

from __future__ import annotations

import json
import os
import sys
import time

sys.path.insert(0, os.path.dirname(__file__))

from kernel_lab import IpsecPair, MacsecPair, Topology, fixed_session

from qkdgate.interfaces import Lifetime
from qkdgate.tunnels.macsec import MacsecBackend
from qkdgate.tunnels.state import TunnelRegistry
from qkdgate.tunnels.xfrm import XfrmBackend


def main() -> None:
    kind, names, state = sys.argv[1], json.loads(sys.argv[2]), sys.argv[3]
    topo = Topology.from_names(names)
    reg = TunnelRegistry(state)
    if kind == "ipsec":
        hard = int(sys.argv[4])
        pair = IpsecPair(topo, fixed_session(), "stub",
                         lifetime=Lifetime(soft_add_seconds=max(1, hard - 1), hard_add_seconds=hard),
                         be_a=XfrmBackend(topo.gA, registry=reg),
                         be_b=XfrmBackend(topo.gB, registry=reg))
    else:
        pair = MacsecPair(topo, fixed_session(), "stub",
                          be_a=MacsecBackend(topo.gA, registry=reg),
                          be_b=MacsecBackend(topo.gB, registry=reg))
    pair.setup()
    print("READY", time.time(), flush=True)
    while True:
        time.sleep(60)


if __name__ == "__main__":
    main()
