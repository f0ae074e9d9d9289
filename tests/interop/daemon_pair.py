"""Two gateway configurations on loopback, for the daemon tests.

gw-a (QKD master, ETSI 014 SAE-A) and gw-b (slave, SAE-B) protect
10.1.0.0/16 <-> 10.2.0.0/16 over one IPsec tunnel ``t1``; each listens on its
own 127.0.0.1 port. Identities are real (ML-DSA-65 + Ed25519), written 0600
like ``qkdgate keygen`` does. With ``kme`` (a running KmeSimulator) the key
sources are real ETSI 014 clients with mutual TLS to the simulator.
"""

from __future__ import annotations

import os
import socket
from pathlib import Path

from qkdgate.gateway.config.identity_files import save_local_identity
from qkdgate.gateway.config.model import load_config
from qkdgate.gateway.protocol.identity import LocalIdentity


def free_udp_port() -> int:
    with socket.socket(socket.AF_INET, socket.SOCK_DGRAM) as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def gateway_yaml(me: str, peer: str, my_port: int, peer_port: int, folder: Path, *,
                 role: str, policy: str, interval: str, soft: str, hard: str,
                 grace: str = "500ms", mine: str, theirs: str, qkd: bool = True,
                 kme: object = None, macsec: bool = False, kind: str = "etsi014",
                 binding: str | None = None) -> str:
    a = me == "gw-a"
    qkd_block = f"""
    qkd:
      key_source: kme
      role: {role}
      local_sae_id: {"SAE-A" if a else "SAE-B"}
      peer_sae_id: {"SAE-B" if a else "SAE-A"}""" if qkd else ""
    if kme is not None:     # the KME simulator's credentials for this SAE (real mTLS)
        # ETSI 004 binding: etsi-binary goes to the KME's binary TLS port
        url = kme.url004 if binding == "etsi-binary" else kme.url
        binding_line = f"\n    binding: {binding}" if binding else ""
        ks = f"""
key_sources:
  - name: kme
    kind: {kind}{binding_line}
    url: {url}
    kme_id: {kme.kme_id}
    timeout: 2s
    retries: 1
    tls: {{cert: {kme.cert}, key: {kme.key}, ca: {kme.ca}}}
"""
    else:
        ks = f"""
key_sources:
  - name: kme
    kind: etsi014          # replaced by an in-process KME pair in the tests
    url: https://127.0.0.1:8443
    tls: {{cert: {folder}/sae.crt, key: {folder}/sae.key, ca: {folder}/ca.crt}}
"""
    ks = ks if qkd else ""
    # The recording MACsec fake gives every first link the SCI 02:00:00:00:00:65/1.
    macsec_block = f"""  - name: m1
    peer: {peer}
    type: macsec
    policy: {policy}
    macsec: {{parent: {"eth-a" if a else "eth-b"}, peer_mac: "02:00:00:00:00:65"}}
    rekey: {{interval: {interval}, soft_lifetime: {soft}, hard_lifetime: {hard}, grace: {grace}}}
""" if macsec else ""
    return f"""version: 1
gateway:
  name: {me}
  identity: {folder}/{me}.identity
  listen: {{address: 127.0.0.1, port: {my_port}}}
  state_dir: {folder}/{me}-state
  control_socket: {folder}/{me}-run/control.sock
peers:
  - name: {peer}
    address: 127.0.0.1
    port: {peer_port}
    identities: [{folder}/{peer}.pub]{qkd_block}
{ks}tunnels:
  - name: t1
    peer: {peer}
    type: ipsec
    policy: {policy}
    ipsec:
      local_address: {mine}
      remote_address: {theirs}
      local_subnets: [{"10.1.0.0/16" if a else "10.2.0.0/16"}]
      remote_subnets: [{"10.2.0.0/16" if a else "10.1.0.0/16"}]
      reqid: 100
    rekey: {{interval: {interval}, soft_lifetime: {soft}, hard_lifetime: {hard}, grace: {grace}}}
{macsec_block}telemetry:
  log: {{level: debug}}
"""


def write_pair(folder: Path, *, policy: str = "hybrid-required", interval: str = "1s",
               soft: str = "3s", hard: str = "5s", qkd: bool = True, kme: object = None,
               macsec: bool = False, kind: str = "etsi014",
               binding: str | None = None) -> tuple:
    """Write identities and both config files; returns (config_a, config_b, path_a, path_b)."""
    pa, pb = free_udp_port(), free_udp_port()
    for name in ("gw-a", "gw-b"):
        ident = LocalIdentity.generate(name=name)
        save_local_identity(ident, str(folder / f"{name}.identity"))
        (folder / f"{name}.pub").write_text(ident.public.to_string() + "\n")
    paths = []
    for me, peer, mp, pp, role, mine, theirs in (
            ("gw-a", "gw-b", pa, pb, "master", "192.0.2.1", "192.0.2.2"),
            ("gw-b", "gw-a", pb, pa, "slave", "192.0.2.2", "192.0.2.1")):
        path = folder / f"{me}.yaml"
        path.write_text(gateway_yaml(me, peer, mp, pp, folder, role=role, policy=policy,
                                     interval=interval, soft=soft, hard=hard, mine=mine,
                                     theirs=theirs, qkd=qkd, macsec=macsec, kind=kind,
                                     binding=binding,
                                     kme=kme.credentials("SAE-A" if me == "gw-a" else "SAE-B")
                                     if kme is not None else None))
        os.chmod(path, 0o600)
        paths.append(str(path))
    return load_config(paths[0]), load_config(paths[1]), paths[0], paths[1]
