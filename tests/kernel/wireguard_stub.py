"""A stand-in for the qkdgate daemon in the WireGuard failsafe test: keys
one WireGuard link on both gateways through the real consumer (recording
it in a tunnel registry, as the daemon does), prints READY and waits to be
SIGKILLed.  usage: wireguard_stub.py JSON  ({"a": [ns, pub], "b": [ns, pub],
"name": ifname, "net": "10.9.2", "state": registry path})"""

from __future__ import annotations

import json
import os
import sys
import time

sys.path.insert(0, os.path.dirname(__file__))

from kernel_lab import fixed_session
from wireguard_lab import WgLink, WgSide

from qkdgate.tunnels.state import TunnelRegistry


def main() -> None:
    cfg = json.loads(sys.argv[1])
    link = WgLink(cfg["name"], 0, cfg["net"], WgSide(cfg["a"][0], "", cfg["a"][1]),
                  WgSide(cfg["b"][0], "", cfg["b"][1]))
    link.consumer_tunnels(registry=TunnelRegistry(cfg["state"]))
    now = time.monotonic()
    for t in link.tunnels.values():
        t.setup(now)
    s = fixed_session(b"wg" + (1).to_bytes(4, "big"))
    link.tunnels["A"].install_inbound(1, s, "initiator", 0, now)
    link.tunnels["B"].install_inbound(1, s, "responder", 0, now)
    link.tunnels["B"].install_outbound(1, s, "responder", 0, now)
    link.tunnels["A"].install_outbound(1, s, "initiator", 0, now)
    print("READY", time.time(), flush=True)
    while True:
        time.sleep(60)


if __name__ == "__main__":
    main()
