"""The demo's two gateway configurations, written as ordinary qkdgate YAML.

Theory of operation: the demo runs the real daemon on real configuration
files, so what it shows is what ``qkdgate run -c FILE`` would do; the files
pass ``qkdgate check-config`` (a unit test holds this). Everything lives in
the run's temporary state directory, never in the source tree: identities
(ML-DSA + Ed25519, mode 0600 like ``qkdgate keygen``), the KME simulator's
demo PKI, state and control sockets. gw-a is the ETSI GS QKD 014 master
(calls enc_keys at KME-A), gw-b the slave (dec_keys at KME-B); each reaches
its own KME on its own loopback.
"""

from __future__ import annotations

import os
from dataclasses import dataclass
from pathlib import Path

from qkdgate.gateway.demo.net import GA, GB, LAN_A, LAN_B

POLICIES = {"pqc-fallback": "pqc-fallback", "block": "hybrid-required",
            "hybrid-required": "hybrid-required"}


@dataclass(frozen=True)
class KmeEndpoint:
    """How one gateway reaches its KME (paths from the simulator's PKI)."""

    url: str
    kme_id: str
    cert: str
    key: str
    ca: str


@dataclass(frozen=True)
class Timers:
    """Rekey schedule. The hard lifetime bounds how long a hybrid-required
    tunnel keeps its last QKD-keyed SA once QKD keys stop: then it blocks."""

    interval: float = 3.0
    soft: float = 6.0
    hard: float = 9.0
    grace: float = 1.0

    @classmethod
    def for_interval(cls, interval: float) -> Timers:
        return cls(interval, 2 * interval, 3 * interval, min(1.0, interval / 3))


def _s(x: float) -> str:
    return f"{round(x * 1000)}ms"


def gateway_yaml(side: str, folder: Path, kme: KmeEndpoint, *, policy: str, timers: Timers,
                 macsec_peer_mac: str | None = None, port: int = 4600,
                 log_level: str = "info") -> str:
    a = side == "a"
    me, peer = ("gw-a", "gw-b") if a else ("gw-b", "gw-a")
    mine, theirs = (GA, GB) if a else (GB, GA)
    lan, rlan = (LAN_A, LAN_B) if a else (LAN_B, LAN_A)
    rk = (f"{{interval: {_s(timers.interval)}, soft_lifetime: {_s(timers.soft)}, "
          f"hard_lifetime: {_s(timers.hard)}, grace: {_s(timers.grace)}}}")
    macsec = ""
    if macsec_peer_mac:
        macsec = f"""  - name: link
    peer: {peer}
    type: macsec
    policy: {POLICIES[policy]}
    macsec: {{parent: m0, peer_mac: "{macsec_peer_mac}", interface: qm-link}}
    rekey: {rk}
"""
    return f"""# qkdgate demo: {me} (generated; see docs/demo.md)
version: 1
gateway:
  name: {me}
  identity: {folder}/{me}.identity
  listen: {{address: {mine}, port: {port}}}
  state_dir: {folder}/{me}-state
  control_socket: {folder}/{me}-run/control.sock
peers:
  - name: {peer}
    address: {theirs}
    port: {port}
    identities: [{folder}/{peer}.pub]
    qkd:
      key_source: kme
      role: {"master" if a else "slave"}
      local_sae_id: {"SAE-A" if a else "SAE-B"}
      peer_sae_id: {"SAE-B" if a else "SAE-A"}
key_sources:
  - name: kme
    kind: etsi014
    url: {kme.url}
    kme_id: {kme.kme_id}
    timeout: 2s
    retries: 1
    tls: {{cert: {kme.cert}, key: {kme.key}, ca: {kme.ca}}}
tunnels:
  - name: lan
    peer: {peer}
    type: ipsec
    policy: {POLICIES[policy]}
    ipsec:
      local_address: {mine}
      remote_address: {theirs}
      local_subnets: [{lan}]
      remote_subnets: [{rlan}]
      reqid: 100
    rekey: {rk}
{macsec}telemetry:
  log: {{level: {log_level}}}
"""


def write_identities(folder: Path) -> None:
    from qkdgate.gateway.config.identity_files import save_local_identity
    from qkdgate.gateway.protocol.identity import LocalIdentity
    for name in ("gw-a", "gw-b"):
        ident = LocalIdentity.generate(name=name)
        save_local_identity(ident, str(folder / f"{name}.identity"))
        (folder / f"{name}.pub").write_text(ident.public.to_string() + "\n")


def write_configs(folder: Path, kme_a: KmeEndpoint, kme_b: KmeEndpoint, *, policy: str,
                  timers: Timers, macsec_macs: tuple[str, str] | None = None,
                  log_level: str = "info") -> tuple[str, str]:
    """Write gw-a.yaml and gw-b.yaml (0600); identities must exist.
    ``macsec_macs`` = (gA's m0 MAC, gB's m0 MAC) adds the MACsec tunnel."""
    paths = []
    for side, kme in (("a", kme_a), ("b", kme_b)):
        peer_mac = None
        if macsec_macs:
            peer_mac = macsec_macs[1] if side == "a" else macsec_macs[0]
        path = folder / f"gw-{side}.yaml"
        path.write_text(gateway_yaml(side, folder, kme, policy=policy, timers=timers,
                                     macsec_peer_mac=peer_mac, log_level=log_level))
        os.chmod(path, 0o600)
        paths.append(str(path))
    return paths[0], paths[1]
