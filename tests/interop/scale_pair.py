"""Two gateway configurations with N IPsec tunnels on one peer, built in
memory from the 1-tunnel pair of daemon_pair.py (parsing 4,096 tunnels of
YAML is the config loader's business, not what these tests measure)."""

from __future__ import annotations

import dataclasses
import ipaddress
from pathlib import Path

from daemon_pair import write_pair


def with_tunnels(cfg, n: int, a: bool):
    base = cfg.tunnels[0]
    tunnels = []
    for i in range(n):
        mine = ipaddress.ip_network(f"10.{64 + i // 256}.{i % 256}.0/24")
        theirs = ipaddress.ip_network(f"10.{128 + i // 256}.{i % 256}.0/24")
        if not a:
            mine, theirs = theirs, mine
        ipsec = dataclasses.replace(base.ipsec, local_subnets=(mine,), remote_subnets=(theirs,),
                                    reqid=100 + 16 * i)
        tunnels.append(dataclasses.replace(base, name=f"t{i}", ipsec=ipsec))
    return dataclasses.replace(cfg, tunnels=tuple(tunnels))


def write_scale_pair(folder: Path, n: int, **kw) -> tuple:
    """(config_a, config_b, path_a, path_b): no QKD, policy pqc-only, N tunnels."""
    kw.setdefault("interval", "1h")
    kw.setdefault("soft", "2h")
    kw.setdefault("hard", "3h")
    cfg_a, cfg_b, pa, pb = write_pair(folder, qkd=False, policy="pqc-only", **kw)
    return with_tunnels(cfg_a, n, True), with_tunnels(cfg_b, n, False), pa, pb
