"""A QKD network for the simulator: trusted nodes, QKD links, routes.

Theory of operation: a :class:`Topology` names the nodes (one KME each, some
marked *compromised*), the QKD links between them with their link-model
parameters and faults, which SAEs attach to which node, the routing rule and
pinned routes. It is a plain value: the CLI builds it from a YAML file
(``gateway/config/topology.py``, with the rest of YAML reading), tests build it
in Python, and :class:`~.kme.SimNetwork` asks it for routes.

Routing works on the link graph, counting hops:

* ``shortest``: the path with the fewest hops; ties go to the shorter fibre,
  then to the alphabetically first node sequence, so routes are deterministic.
* ``k-disjoint``: ``k`` node-disjoint paths, found greedily (shortest path,
  then the shortest path avoiding every intermediate node already used, ...).
  Greedy can miss a disjoint set that exists (Suurballe's algorithm would not);
  with the small meshes of a simulator that is a documented limit, not a bug.

Routes prefer links that currently produce key (up, no QBER alarm): the
caller passes ``usable``; when no usable route exists it asks again with every
link so the KME can answer 503 naming the failed link rather than "no route".
"""

from __future__ import annotations

import heapq
from collections.abc import Callable, Iterable, Mapping
from dataclasses import dataclass, field
from itertools import pairwise

from qkdgate.adapters.kmesim.linkmodel import REALISTIC, LinkParams

ROUTING = ("shortest", "k-disjoint")


@dataclass(frozen=True, slots=True)
class NodeSpec:
    name: str                      # the node's KME ID
    saes: tuple[str, ...] = ()
    compromised: bool = False      # records every key that passes through it


@dataclass(frozen=True, slots=True)
class LinkSpec:
    a: str
    b: str
    params: LinkParams = REALISTIC
    eve_fraction: float = 0.0      # intercept-resend eavesdropper on this link
    up: bool = True
    prefill: int | None = None     # keys in the pool at start (None: the topology's)


@dataclass(frozen=True, slots=True)
class PinnedRoute:
    """The route keys between two SAEs always take (either direction)."""
    saes: tuple[str, str]
    via: tuple[str, ...]           # intermediate nodes, in order from saes[0]'s node


@dataclass(frozen=True, slots=True)
class Topology:
    nodes: tuple[NodeSpec, ...]
    links: tuple[LinkSpec, ...]
    routing: str = "shortest"
    k: int = 2                     # paths for k-disjoint
    routes: tuple[PinnedRoute, ...] = ()
    key_size: int = 256
    max_key_count: int = 100000
    prefill: int = 1000

    def __post_init__(self) -> None:
        names = [n.name for n in self.nodes]
        if len(names) < 2 or len(set(names)) != len(names):
            raise ValueError("a topology needs at least two nodes with distinct names")
        saes = [s for n in self.nodes for s in n.saes]
        if len(set(saes)) != len(saes):
            dup = sorted({s for s in saes if saes.count(s) > 1})
            raise ValueError(f"SAE attached to two nodes: {', '.join(dup)}")
        seen: set[frozenset[str]] = set()
        for link in self.links:
            pair = frozenset((link.a, link.b))
            if link.a == link.b or not pair <= set(names):
                raise ValueError(f"link {link.a}-{link.b} must join two distinct known nodes")
            if pair in seen:
                raise ValueError(f"link {link.a}-{link.b} given twice")
            if not 0.0 <= link.eve_fraction <= 1.0:
                raise ValueError(f"link {link.a}-{link.b}: eavesdropper fraction not in 0..1")
            seen.add(pair)
        if self.routing not in ROUTING:
            raise ValueError(f"routing must be one of {', '.join(ROUTING)}")
        if self.k < 1:
            raise ValueError("k must be at least 1")
        if self.key_size <= 0 or self.key_size % 8 or self.max_key_count <= 0 or self.prefill < 0:
            raise ValueError("key_size must be a positive multiple of 8, max_key_count "
                             "positive and prefill not negative")
        home = self.sae_home()
        for r in self.routes:
            if not set(r.saes) <= set(home):
                raise ValueError(f"pinned route names an unknown SAE: {list(r.saes)}")
            path = self.pinned_path(r, home[r.saes[0]], home[r.saes[1]])
            if len(set(path)) != len(path):
                raise ValueError(f"pinned route {list(r.saes)} visits a node twice")
            for x, y in pairwise(path):
                if frozenset((x, y)) not in seen:
                    raise ValueError(f"pinned route {list(r.saes)}: no link {x}-{y}")

    def sae_home(self) -> dict[str, str]:
        return {s: n.name for n in self.nodes for s in n.saes}

    def compromised(self) -> frozenset[str]:
        return frozenset(n.name for n in self.nodes if n.compromised)

    @staticmethod
    def pinned_path(r: PinnedRoute, src: str, dst: str) -> tuple[str, ...]:
        return (src, *r.via, dst)

    def pinned(self, sae_a: str, sae_b: str, src: str, dst: str) -> tuple[str, ...] | None:
        """The pinned path from ``src`` (sae_a's node) to ``dst``, if any."""
        for r in self.routes:
            if r.saes == (sae_a, sae_b):
                return self.pinned_path(r, src, dst)
            if r.saes == (sae_b, sae_a):
                return tuple(reversed(self.pinned_path(r, dst, src)))
        return None


@dataclass
class Graph:
    """Adjacency with a length per link (km), for routing."""

    km: dict[frozenset[str], float] = field(default_factory=dict)

    @classmethod
    def of(cls, links: Mapping[frozenset[str], float]) -> Graph:
        return cls(dict(links))

    def neighbours(self, node: str) -> list[str]:
        out: list[str] = []
        for pair in self.km:
            if node in pair:
                out.extend(pair - {node})
        return sorted(out)

    def shortest(self, src: str, dst: str, *, avoid: Iterable[str] = (),
                 usable: Callable[[str, str], bool] = lambda a, b: True,
                 banned_links: Iterable[frozenset[str]] = ()) -> tuple[str, ...] | None:
        """Fewest hops, then least fibre, then the first node sequence."""
        avoid_set, banned = set(avoid) - {src, dst}, set(banned_links)
        heap: list[tuple[int, float, tuple[str, ...]]] = [(0, 0.0, (src,))]
        done: set[str] = set()
        while heap:
            hops, km, path = heapq.heappop(heap)
            node = path[-1]
            if node == dst:
                return path
            if node in done:
                continue
            done.add(node)
            for nxt in self.neighbours(node):
                pair = frozenset((node, nxt))
                if nxt in done or nxt in avoid_set or pair in banned or not usable(node, nxt):
                    continue
                heapq.heappush(heap, (hops + 1, km + self.km[pair], (*path, nxt)))
        return None

    def disjoint(self, src: str, dst: str, k: int, *,
                 usable: Callable[[str, str], bool] = lambda a, b: True) -> list[tuple[str, ...]]:
        """Up to ``k`` node-disjoint paths, greedily (see the module text)."""
        paths: list[tuple[str, ...]] = []
        used: set[str] = set()
        banned: set[frozenset[str]] = set()
        while len(paths) < k:
            p = self.shortest(src, dst, avoid=used, usable=usable, banned_links=banned)
            if p is None:
                break
            paths.append(p)
            used.update(p[1:-1])
            if len(p) == 2:
                banned.add(frozenset(p))   # the direct link carries one path only
        return paths


def line(names: Iterable[str], *, params: LinkParams = REALISTIC,
         saes: Mapping[str, str] | None = None, compromised: Iterable[str] = (),
         **kw: object) -> Topology:
    """A chain of nodes, each joined to the next: tests' and benches' shorthand.
    ``saes`` maps SAE -> node (default: SAE-X at the first and last node KME-X)."""
    names = list(names)
    bad = set(compromised)
    if saes is None:
        saes = {("SAE-" + n[4:] if n.startswith("KME-") else f"SAE-{n}"): n
                for n in (names[0], names[-1])}
    nodes = tuple(NodeSpec(n, tuple(s for s, h in saes.items() if h == n), n in bad)
                  for n in names)
    links = tuple(LinkSpec(a, b, params) for a, b in pairwise(names))
    return Topology(nodes, links, **kw)   # type: ignore[arg-type]
