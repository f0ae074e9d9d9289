"""The demo's two gateway configurations, written as ordinary qkdgate YAML.

Theory of operation: the demo runs the real daemon on real configuration
files, so what it shows is what ``qkdgate run -c FILE`` would do; the files
pass ``qkdgate check-config`` (a unit test holds this). Everything lives in
the run's temporary state directory, never in the source tree: identities
(ML-DSA + Ed25519, mode 0600 like ``qkdgate keygen``), the KME simulator's
demo PKI, state and control sockets. gw-a is the QKD master (ETSI GS QKD 014:
enc_keys at KME-A), gw-b the slave (dec_keys at KME-B); each reaches its own
KME on its own loopback. With ``qkd`` "004" or "004-json" both gateways
instead attach to one ETSI GS QKD 004 key stream (OPEN_CONNECT, GET_KEY by
index), over the binary framing transcribed from QUBIP/etsi-qkd-004 or
over qkdgate's JSON binding (docs/qkd.md "ETSI 004 bindings"). With
``--topology`` (ETSI 014 only) each gateway may have several QKD sources, one
per path of the simulated QKD network, each its own SAE at the same KME,
combined with the rule ``all``.
"""

from __future__ import annotations

import os
from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING

from qkdgate.errors import ConfigError
from qkdgate.gateway.demo.net import GA, GB, LAN_A, LAN_B

if TYPE_CHECKING:
    from qkdgate.adapters.kmesim.topology import Topology

POLICIES = {"pqc-fallback": "pqc-fallback", "block": "hybrid-required",
            "hybrid-required": "hybrid-required"}
# --qkd: the KME interface -> (key source kind, ETSI 004 binding)
QKD_INTERFACES = {"014": ("etsi014", None), "004": ("etsi004", "etsi-binary"),
                  "004-json": ("etsi004", "json")}


@dataclass(frozen=True)
class KmeEndpoint:
    """How one gateway reaches its KME (paths from the simulator's PKI);
    ``url`` is the endpoint of the chosen interface (--qkd 004: the
    simulator's binary ETSI 004 TLS port)."""

    url: str
    kme_id: str
    cert: str
    key: str
    ca: str


@dataclass(frozen=True)
class QkdSource:
    """One QKD input of a gateway: its SAE pair and how it reaches its KME."""

    name: str
    local_sae: str
    peer_sae: str
    kme: KmeEndpoint


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


def kme_port(qkd: str, kme_id: str, https: Mapping[str, int], binary004: Mapping[str, int]
             ) -> int:
    """The simulator port behind a gateway's KME relay: the binary ETSI 004
    framing has its own TLS port (adapters/kmesim/qkd004_binary.py); ETSI
    014 and qkdgate's JSON 004 binding share the HTTPS one."""
    return (binary004 if QKD_INTERFACES[qkd][1] == "etsi-binary" else https)[kme_id]


def control_socket(folder: Path, name: str) -> Path:
    """Gateway ``name``'s control socket (``qkdgate top --socket``, ``qkdgate
    status --socket``): a path-named UNIX socket, so reachable from every
    network namespace that shares the mount namespace."""
    return folder / f"{name}-run" / "control.sock"


def _s(x: float) -> str:
    return f"{round(x * 1000)}ms"


# --topology: every relayed key costs three more HTTPS exchanges between the
# simulator's nodes (ETSI 020 hops and the ack, docs/qkd.md); a starved lab VM
# needs more than 2 s for that. Above the simulator's relay timeout (5 s), so
# the KME answers 503 before the client gives up.
RELAYED_TIMEOUT = "6s"


def _key_source(name: str, kme: KmeEndpoint, kind: str, binding: str | None,
                timeout: str = "2s") -> str:
    binding_line = f"\n    binding: {binding}" if binding else ""
    return f"""  - name: {name}
    kind: {kind}{binding_line}
    url: {kme.url}
    kme_id: {kme.kme_id}
    timeout: {timeout}
    retries: 1
    tls: {{cert: {kme.cert}, key: {kme.key}, ca: {kme.ca}}}
"""


def gateway_yaml(side: str, folder: Path, kme: KmeEndpoint, *, policy: str, timers: Timers,
                 macsec_peer_mac: str | None = None, port: int = 4600,
                 log_level: str = "info", qkd: str = "014", extra: str = "",
                 sources: Sequence[QkdSource] = ()) -> str:
    """``extra``: more top-level sections (--key-service: demo/keyapps.py).
    ``sources`` replaces the single source at ``kme`` (SAE-A/SAE-B); two or
    more are combined with the rule ``all``."""
    a = side == "a"
    me, peer = ("gw-a", "gw-b") if a else ("gw-b", "gw-a")
    mine, theirs = (GA, GB) if a else (GB, GA)
    lan, rlan = (LAN_A, LAN_B) if a else (LAN_B, LAN_A)
    kind, binding = QKD_INTERFACES[qkd]
    role = "master" if a else "slave"
    if len(sources) > 1:
        qkd_yaml = f"      role: {role}\n      rule: all\n      sources:\n" + "".join(
            f"        - {{key_source: {s.name}, local_sae_id: {s.local_sae}, "
            f"peer_sae_id: {s.peer_sae}}}\n" for s in sources)
        key_sources = "".join(_key_source(s.name, s.kme, kind, binding, RELAYED_TIMEOUT)
                              for s in sources)
    else:
        one = sources[0] if sources else QkdSource("kme", "SAE-A" if a else "SAE-B",
                                                   "SAE-B" if a else "SAE-A", kme)
        qkd_yaml = (f"      key_source: {one.name}\n      role: {role}\n"
                    f"      local_sae_id: {one.local_sae}\n      peer_sae_id: {one.peer_sae}\n")
        key_sources = _key_source(one.name, one.kme, kind, binding,
                                  RELAYED_TIMEOUT if sources else "2s")
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
  control_socket: {control_socket(folder, me)}
peers:
  - name: {peer}
    address: {theirs}
    port: {port}
    identities: [{folder}/{peer}.pub]
    qkd:
{qkd_yaml}key_sources:
{key_sources}tunnels:
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
{extra}"""


def topology_pairs(topo: Topology) -> list[tuple[str, str]]:
    """The SAE pairs gw-a and gw-b key their tunnel from, for ``--topology``:
    the file's pinned routes in order (one QKD source per path), or else the
    first SAE of the first node that has SAEs and of the last such node.
    Every gw-a SAE must sit on one node and every gw-b SAE on another."""
    home = topo.sae_home()
    if topo.routes:
        pairs = [r.saes for r in topo.routes]
    else:
        with_saes = [n for n in topo.nodes if n.saes]
        if len(with_saes) < 2:
            raise ConfigError("the demo needs SAEs on two nodes of the topology",
                              path="--topology")
        pairs = [(with_saes[0].saes[0], with_saes[-1].saes[0])]
    sides = ({home[a] for a, _ in pairs}, {home[b] for _, b in pairs})
    if len(sides[0]) != 1 or len(sides[1]) != 1 or sides[0] == sides[1]:
        raise ConfigError("the demo's gateways each use one KME: every pinned route must "
                          "start at one node and end at another", path="--topology",
                          found=", ".join("-".join(p) for p in pairs))
    return [(a, b) for a, b in pairs]


def write_identities(folder: Path) -> None:
    from qkdgate.gateway.config.identity_files import save_local_identity
    from qkdgate.gateway.protocol.identity import LocalIdentity
    for name in ("gw-a", "gw-b"):
        ident = LocalIdentity.generate(name=name)
        save_local_identity(ident, str(folder / f"{name}.identity"))
        (folder / f"{name}.pub").write_text(ident.public.to_string() + "\n")


def write_configs(folder: Path, kme_a: KmeEndpoint, kme_b: KmeEndpoint, *, policy: str,
                  timers: Timers, macsec_macs: tuple[str, str] | None = None,
                  log_level: str = "info", qkd: str = "014",
                  extras: tuple[str, str] = ("", ""),
                  sources: tuple[Sequence[QkdSource], Sequence[QkdSource]] = ((), ())
                  ) -> tuple[str, str]:
    """Write gw-a.yaml and gw-b.yaml (0600); identities must exist.
    ``macsec_macs`` = (gA's m0 MAC, gB's m0 MAC) adds the MACsec tunnel;
    ``qkd`` is the KME interface (:data:`QKD_INTERFACES`); ``sources`` =
    (gw-a's, gw-b's) QKD sources in the same order (default: SAE-A, SAE-B)."""
    paths = []
    for side, kme, extra, srcs in (("a", kme_a, extras[0], sources[0]),
                                   ("b", kme_b, extras[1], sources[1])):
        peer_mac = None
        if macsec_macs:
            peer_mac = macsec_macs[1] if side == "a" else macsec_macs[0]
        path = folder / f"gw-{side}.yaml"
        path.write_text(gateway_yaml(side, folder, kme, policy=policy, timers=timers,
                                     macsec_peer_mac=peer_mac, log_level=log_level, qkd=qkd,
                                     extra=extra, sources=srcs))
        os.chmod(path, 0o600)
        paths.append(str(path))
    return paths[0], paths[1]
