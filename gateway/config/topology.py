"""The topology file of ``qkdgate kme-sim --topology FILE``.

Theory of operation: the file is composed by ruamel.yaml and walked by the
configuration's strict schema walker (:mod:`qkdgate.gateway.config.schema`:
unknown keys, YAML 1.1 booleans, quoted numbers, anchors... are errors with
file, line and path) into the dataclasses below, which :func:`load_topology`
turns into the simulator's :class:`~qkdgate.adapters.kmesim.topology.Topology`
(whose own checks, e.g. a link to an unknown node, become ConfigErrors too).
The format is documented in docs/qkd.md ("Networks: topology and relay");
examples are in ``docs/topologies/``.
"""

from __future__ import annotations

import enum
import os
from dataclasses import dataclass
from typing import TYPE_CHECKING, Annotated

from qkdgate.errors import ConfigError
from qkdgate.gateway.config.schema import Length, Pattern, Range

if TYPE_CHECKING:
    from qkdgate.adapters.kmesim.topology import Topology

_ID = Pattern(r"[A-Za-z0-9][A-Za-z0-9_.:-]{0,63}", "an ID of letters, digits and _.:-")
NodeId = Annotated[str, _ID]


class Routing(enum.Enum):
    SHORTEST = "shortest"
    K_DISJOINT = "k-disjoint"


class Detector(enum.Enum):
    INGAAS = "ingaas"
    SNSPD = "snspd"


@dataclass(frozen=True, slots=True)
class NodeFile:
    name: NodeId
    saes: tuple[NodeId, ...] = ()
    compromised: bool = False


@dataclass(frozen=True, slots=True)
class LinkFile:
    between: Annotated[tuple[NodeId, ...], Length(2, 2)]
    distance_km: Annotated[float, Range(0, 1000)] = 10.0
    detector: Detector = Detector.INGAAS
    fibre_loss_db_per_km: Annotated[float, Range(0, 2)] = 0.2
    insertion_loss_db: Annotated[float, Range(0, 60)] = 0.0
    rep_rate_ghz: Annotated[float, Range(0, 100, gt=True)] = 1.0
    finite_key_factor: Annotated[float, Range(0, 1, gt=True)] = 0.06
    misalignment: Annotated[float, Range(0, 0.5)] = 0.015
    qber_threshold: Annotated[float, Range(0, 0.5, gt=True)] = 0.08
    eve: Annotated[float, Range(0, 1)] = 0.0
    up: bool = True
    prefill: Annotated[int, Range(0)] | None = None


@dataclass(frozen=True, slots=True)
class RouteFile:
    saes: Annotated[tuple[NodeId, ...], Length(2, 2)]
    via: tuple[NodeId, ...] = ()


@dataclass(frozen=True, slots=True)
class TopologyFile:
    nodes: Annotated[tuple[NodeFile, ...], Length(2, 64)]
    links: Annotated[tuple[LinkFile, ...], Length(1, 512)]
    routing: Routing = Routing.SHORTEST
    k: Annotated[int, Range(1, 8)] = 2
    routes: tuple[RouteFile, ...] = ()
    key_size: Annotated[int, Range(64, 1024)] = 256
    max_key_count: Annotated[int, Range(1, 10_000_000)] = 100000
    prefill: Annotated[int, Range(0)] = 1000


def parse_topology(text: str, filename: str = "<topology>") -> Topology:
    """YAML text -> :class:`~qkdgate.adapters.kmesim.topology.Topology`."""
    from ruamel.yaml import YAML
    from ruamel.yaml.error import MarkedYAMLError, YAMLError

    from qkdgate.adapters.kmesim.linkmodel import LinkParams
    from qkdgate.adapters.kmesim.topology import LinkSpec, NodeSpec, PinnedRoute, Topology
    from qkdgate.gateway.config.schema import Walk, describe

    try:
        node = YAML(typ="safe", pure=True).compose(text)
    except MarkedYAMLError as exc:
        mark = exc.problem_mark or exc.context_mark
        raise ConfigError(f"YAML syntax error: {exc.problem or exc.context or 'invalid YAML'}",
                          file=filename, line=mark.line + 1 if mark else None) from None
    except (YAMLError, RecursionError) as exc:
        raise ConfigError(f"YAML error: {type(exc).__name__}", file=filename) from None
    walk = Walk(file=filename, base_dir=os.path.dirname(os.path.abspath(filename)))
    if node is None or node.id != "mapping":
        raise walk.error(node, "", "the top level must be a mapping",
                         expected="a mapping with nodes and links",
                         found="nothing" if node is None else describe(node))
    doc: TopologyFile = walk.dataclass(TopologyFile, node, "")
    try:
        links = []
        for lf in doc.links:
            params = LinkParams(distance_km=lf.distance_km, detector=lf.detector.value,
                                alpha_db_per_km=lf.fibre_loss_db_per_km,
                                insertion_loss_db=lf.insertion_loss_db,
                                rep_rate_hz=lf.rep_rate_ghz * 1e9, eta_fk=lf.finite_key_factor,
                                e_d=lf.misalignment, qber_threshold=lf.qber_threshold)
            links.append(LinkSpec(lf.between[0], lf.between[1], params, lf.eve, lf.up,
                                  lf.prefill))
        return Topology(
            tuple(NodeSpec(n.name, n.saes, n.compromised) for n in doc.nodes), tuple(links),
            routing=doc.routing.value, k=doc.k,
            routes=tuple(PinnedRoute((r.saes[0], r.saes[1]), r.via) for r in doc.routes),
            key_size=doc.key_size, max_key_count=doc.max_key_count, prefill=doc.prefill)
    except ValueError as exc:
        raise ConfigError(f"invalid topology: {exc}", file=filename) from None


def load_topology(path: str | os.PathLike[str]) -> Topology:
    name = os.fspath(path)
    try:
        with open(name, "rb") as fh:
            raw = fh.read(1024 * 1024 + 1)
    except OSError as exc:
        raise ConfigError(f"cannot read topology: {exc.strerror}", file=name) from None
    if len(raw) > 1024 * 1024:
        raise ConfigError("topology file too large", file=name, expected="at most 1 MiB")
    try:
        text = raw.decode("utf-8")
    except UnicodeDecodeError:
        raise ConfigError("not UTF-8 text", file=name) from None
    return parse_topology(text, name)
