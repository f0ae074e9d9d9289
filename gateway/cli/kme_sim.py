"""``qkdgate kme-sim``: run the ETSI QKD 014/004 KME simulator.

Theory of operation: starts :class:`~.server.KmeSimulator` with two or more
KMEs on consecutive loopback ports (full mesh of modelled QKD links), each
also serving the binary ETSI 004 binding on its own port, an admin endpoint
for fault injection, and prints where the demo CA and the SAE certificates
are together with a curl command that works as is. ``--sae SAE=KME``
attaches more SAEs to a KME (ETSI 014 multicast: additional_slave_SAE_IDs
name SAEs of the slave's KME). ``--topology FILE`` runs a QKD network
instead (one KME per node, keys relayed through trusted nodes; format in
docs/qkd.md, examples in ``docs/topologies/``). Runs until SIGINT/SIGTERM. Top-level imports
stay light (``qkdgate --help``).
"""

from __future__ import annotations

import argparse
import os
import re
from pathlib import Path

from qkdgate.errors import ConfigError

_SOURCE_TREE = Path(__file__).resolve().parents[2]


def default_state_dir() -> Path:
    base = os.environ.get("XDG_STATE_HOME") or str(Path.home() / ".local" / "state")
    return Path(base) / "qkdgate" / "kmesim"


def add_arguments(p: argparse.ArgumentParser) -> None:
    p.add_argument("--state-dir", type=Path, default=None,
                   help=f"where the demo CA and certificates live (default {default_state_dir()})")
    p.add_argument("--kmes", default="KME-A,KME-B",
                   help="comma-separated KME IDs; SAE-X is attached to KME-X (default KME-A,KME-B)")
    p.add_argument("--sae", action="append", default=[], metavar="SAE=KME",
                   help="attach another SAE to a KME, e.g. --sae SAE-B2=KME-B; repeat for more "
                        "(ETSI 014 multicast: additional_slave_SAE_IDs must be SAEs of the "
                        "slave's KME)")
    p.add_argument("--topology", type=Path, default=None, metavar="FILE",
                   help="a YAML QKD network (nodes, links, SAEs, routing, compromised nodes); "
                        "replaces --kmes, --sae and the link options")
    p.add_argument("--host", default="127.0.0.1", help="address to listen on (default 127.0.0.1)")
    p.add_argument("--port", type=int, default=8441,
                   help="port of the first KME, the others follow (default 8441; 0 = any)")
    p.add_argument("--port-004", type=int, default=25575,
                   help="binary ETSI 004 port of the first KME, the others follow "
                        "(default 25575, the reference server's; 0 = any; -1 = off)")
    p.add_argument("--admin-port", type=int, default=8440,
                   help="loopback HTTP port of the fault-injection endpoint "
                        "(default 8440; -1 = off)")
    p.add_argument("--distance-km", type=float, default=10.0, help="fibre length (default 10)")
    p.add_argument("--detector", choices=("ingaas", "snspd"), default="ingaas")
    p.add_argument("--rep-rate-ghz", type=float, default=1.0,
                   help="source repetition rate (default 1)")
    p.add_argument("--fibre-loss", type=float, default=0.2,
                   help="dB/km (default 0.2; 0.16 for ultra-low-loss fibre)")
    p.add_argument("--qber-threshold", type=float, default=0.08,
                   help="QBER above which the link stops producing key (default 0.08)")
    p.add_argument("--finite-key-factor", type=float, default=0.06,
                   help="scales the asymptotic rate to a commercial one "
                        "(default 0.06: ~1 Mb/s at 10 km)")
    p.add_argument("--max-key-count", type=int, default=100000)
    p.add_argument("--key-size", type=int, default=256, help="default key size in bits")
    p.add_argument("--prefill", type=int, default=1000, help="keys in each pool at start")
    p.add_argument("--eve", type=float, default=0.0,
                   help="fraction of photons an intercept-resend eavesdropper measures")


SAE_ID_RE = re.compile(r"[A-Za-z0-9][A-Za-z0-9_.:-]{0,63}")


def saes_of(kmes: list[str], extra: list[str]) -> dict[str, str]:
    """SAE ID -> KME ID: SAE-X at KME-X for every KME, then each ``--sae SAE=KME``."""
    from qkdgate.adapters.kmesim.server import default_sae
    saes = {default_sae(k, i): k for i, k in enumerate(kmes)}
    for item in extra:
        sae, sep, kme = item.partition("=")
        sae, kme = sae.strip(), kme.strip()
        if not sep or not SAE_ID_RE.fullmatch(sae) or kme not in kmes:
            raise ConfigError("expected SAE=KME with a KME of --kmes", path="--sae",
                              found=item, expected=f"e.g. SAE-B2={kmes[-1]}")
        if sae in saes:
            raise ConfigError(f"SAE {sae} is attached already (to {saes[sae]})", path="--sae",
                              found=item)
        saes[sae] = kme
    return saes


def _check(args: argparse.Namespace) -> tuple[list[str], Path]:
    if args.topology is not None and (args.sae or args.kmes != "KME-A,KME-B"):
        raise ConfigError("--topology names the KMEs and SAEs itself", path="--topology",
                          expected="--topology without --kmes and --sae")
    kmes = [k.strip() for k in args.kmes.split(",") if k.strip()]
    if len(kmes) < 2 or len(set(kmes)) != len(kmes):
        raise ConfigError("need at least two distinct KME IDs", path="--kmes", found=args.kmes)
    saes_of(kmes, args.sae)
    state = (args.state_dir or default_state_dir()).expanduser().resolve()
    if state == _SOURCE_TREE or _SOURCE_TREE in state.parents:
        raise ConfigError("the state directory holds private keys: keep it out of the source tree",
                          path="--state-dir", found=str(state))
    if args.key_size <= 0 or args.key_size % 8:
        raise ConfigError("key size must be a positive multiple of 8", path="--key-size")
    if args.max_key_count <= 0 or args.prefill < 0:
        raise ConfigError("--max-key-count must be positive and --prefill not negative",
                          path="--max-key-count")
    if not 0 <= args.eve <= 1:
        raise ConfigError("eavesdropper fraction must be within 0..1", path="--eve")
    return kmes, state


def run(args: argparse.Namespace) -> int:
    import asyncio
    import logging
    import signal

    from qkdgate.adapters.kmesim.linkmodel import LinkParams
    from qkdgate.adapters.kmesim.server import KmeSimulator

    kmes, state = _check(args)
    topology = None
    if args.topology is not None:
        from qkdgate.gateway.config.topology import load_topology
        topology = load_topology(args.topology)
        kmes = [n.name for n in topology.nodes]
    try:
        params = LinkParams(distance_km=args.distance_km, detector=args.detector,
                            eta_fk=args.finite_key_factor, rep_rate_hz=args.rep_rate_ghz * 1e9,
                            alpha_db_per_km=args.fibre_loss, qber_threshold=args.qber_threshold)
    except ValueError as exc:
        raise ConfigError(str(exc), path="link parameters") from None
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(name)s: %(message)s")

    async def main() -> None:
        ports = {k: (args.port + i if args.port else 0) for i, k in enumerate(kmes)}
        ports004 = {k: (args.port_004 + i if args.port_004 > 0 else 0)
                    for i, k in enumerate(kmes)}
        admin = None if args.admin_port < 0 else args.admin_port
        try:
            saes = saes_of(kmes, args.sae) if topology is None else None
            ctx = KmeSimulator.start(state, kmes=tuple(kmes), saes=saes,
                                     host=args.host, ports=ports, admin_port=admin,
                                     qkd004_ports=ports004, qkd004_binary=args.port_004 >= 0,
                                     link_params=params, key_size=args.key_size,
                                     max_key_count=args.max_key_count, prefill=args.prefill,
                                     topology=topology)
            async with ctx as sim:
                if topology is None:
                    for link in sim.network.links.values():
                        link.eve_fraction = args.eve
                _print_banner(sim)
                stop = asyncio.Event()
                loop = asyncio.get_running_loop()
                for sig in (signal.SIGINT, signal.SIGTERM):
                    loop.add_signal_handler(sig, stop.set)
                await stop.wait()
        except OSError as exc:
            raise ConfigError(f"cannot listen: {exc.strerror or exc}", path="--port") from None

    asyncio.run(main())
    return 0


def _print_banner(sim: object) -> None:
    from qkdgate.adapters.kmesim.server import KmeSimulator
    if not isinstance(sim, KmeSimulator):
        raise TypeError(f"expected a KmeSimulator, not {type(sim).__name__}")   # our bug
    print(f"KME simulator state directory: {sim.state_dir}")
    print(f"  demo CA:        {sim.pki.ca}")
    saes = sorted(sim.network.sae_home)
    for kme in sim.network.kmes:
        attached = [s for s in saes if sim.network.sae_home[s] == kme]
        print(f"  {kme}: {sim.url(kme)}  (SAEs: {', '.join(attached)})")
        if sim.url004(kme):
            print(f"  {kme} ETSI 004 binary: {sim.url004(kme)}  (binding: etsi-binary)")
    for s in saes:
        c = sim.credentials(s)
        print(f"  {s}: cert {c.cert}\n         key  {c.key}")
    if sim.admin_port:
        print(f"  admin (fault injection): http://127.0.0.1:{sim.admin_port}/admin/state")
    topo = sim.network.topology
    if topo is not None:
        links = ", ".join("-".join(sorted(pair)) for pair in sim.network.links)
        print(f"  topology: routing {topo.routing}"
              + (f" (k={topo.k})" if topo.routing == "k-disjoint" else "") + f"; links {links}")
        if sim.network.compromised:
            print(f"  compromised (records every key through it): "
                  f"{', '.join(sorted(sim.network.compromised))}"
                  + (f"; GET http://127.0.0.1:{sim.admin_port}/admin/attacker"
                     if sim.admin_port else ""))
    home = sim.network.sae_home
    a = saes[0]
    b = next((s for s in saes if home[s] != home[a]), saes[1])
    c = sim.credentials(a)
    print("Try:")
    print(f"  curl --cert {c.cert} --key {c.key} --cacert {c.ca} {c.url}/api/v1/keys/{b}/status")
    print(flush=True)
