"""Cluster descriptions (YAML) and the network topology used by the performance model.

Notation
--------
N        workers in total, N = nodes * M
M        workers per node (``workers_per_node``)
w        global worker index, w = node * M + local index
P        achieved GEMM throughput of one worker (FLOP/s), per dtype
W_l      one-direction bandwidth of directed link l (bytes/s in code, Gbit/s in YAML)
W_net    bandwidth of the slowest NIC (bytes/s); the paper's "network bandwidth"

A cluster file describes one node's internal graph (vertices: workers ``w0..w{M-1}`` and
named switches such as ``pcie0``, ``cpu0``, ``nvswitch``), the NICs of a node (each attached
to a vertex of that graph and to one non-blocking inter-node switch), and GEMM throughput::

    name: johnny
    nodes: 2
    workers_per_node: 8
    gemm_tflops: {fp32: 11.5, bf16: 11.5}
    links:
      - {a: w0, b: pcie0, gbps: 88, kind: pcie}
    nics:
      - {attach: cpu0, gbps: 50}
    inter_node: {switch: ib}

Every undirected YAML link becomes two directed links (one per direction), each with the
full one-direction bandwidth ``gbps * count``. In the :class:`Topology`, node-local vertex
names are prefixed with the node (``n1/pcie0``, ``n1/w3``); the inter-node switch keeps its
name. A NIC is the link between its attach vertex and the inter-node switch.

Paths are shortest by hop count; among equally short paths the one with the widest bottleneck
wins, then the lexicographically smallest vertex sequence, so routing is deterministic.
"""

from __future__ import annotations

import logging
from dataclasses import dataclass, field
from functools import cached_property
from pathlib import Path
from typing import Any, Callable, Mapping, Sequence, Union

import numpy as np
import yaml

logger = logging.getLogger(__name__)

GBIT = 1e9 / 8.0
"""Bytes per second in one Gbit/s."""

CLUSTER_DIR = Path(__file__).resolve().parents[2] / "configs" / "clusters"
"""Directory searched by :func:`load_cluster` when given a bare cluster name."""

REQUIRED_DTYPES = ("fp32", "bf16")
"""Dtypes every cluster file must give a GEMM throughput for."""

GemmThroughput = Union[float, Callable[[np.ndarray], np.ndarray]]
"""Achieved GEMM throughput: a constant in FLOP/s, or a function of the tokens per GEMM."""


class ClusterSpecError(ValueError):
    """A problem in a cluster description; the message names the file and the bad key."""


# --------------------------------------------------------------------------------------
# Schema
# --------------------------------------------------------------------------------------


@dataclass(frozen=True)
class LinkSpec:
    """An undirected intra-node connection between two named vertices of a node."""

    a: str
    """One end: a worker ``w<i>`` (0 <= i < workers_per_node) or a switch name."""
    b: str
    """The other end."""
    gbps: float
    """One-direction bandwidth of one physical link, Gbit/s (measured, not nominal)."""
    count: int = 1
    """Number of parallel physical links (e.g. 2 for a double NVLink); bandwidth multiplies."""
    latency_us: float = 0.0
    """One-way latency in microseconds (informational; the model ignores latency)."""
    kind: str = ""
    """Free-form label, e.g. ``pcie``, ``qpi``, ``nvlink``."""

    @property
    def bandwidth(self) -> float:
        """Aggregate one-direction bandwidth in bytes/s."""
        return self.gbps * self.count * GBIT


@dataclass(frozen=True)
class NicSpec:
    """A network adapter of every node, between ``attach`` and the inter-node switch."""

    attach: str
    """Vertex of the node graph the NIC hangs off (a switch, a CPU socket or a worker)."""
    gbps: float
    """One-direction bandwidth, Gbit/s."""
    count: int = 1
    """Number of bonded ports; bandwidth multiplies."""
    latency_us: float = 0.0
    """One-way latency in microseconds (informational)."""

    @property
    def bandwidth(self) -> float:
        """Aggregate one-direction bandwidth in bytes/s."""
        return self.gbps * self.count * GBIT


@dataclass(frozen=True)
class ClusterSpec:
    """A cluster: identical nodes, an intra-node link graph, NICs and GEMM throughput."""

    name: str
    """Cluster name, e.g. ``johnny``."""
    nodes: int
    """Number of nodes."""
    workers_per_node: int
    """Workers (GPUs or CPU processes) per node, M."""
    gemm_tflops: Mapping[str, float]
    """Achieved GEMM throughput per dtype in TFLOP/s (e.g. 90% of peak, or measured)."""
    links: tuple[LinkSpec, ...] = ()
    """Intra-node links (the same graph in every node)."""
    nics: tuple[NicSpec, ...] = ()
    """NICs of each node; one per worker is allowed (attach each to its worker)."""
    inter_switch: str = "net"
    """Name of the non-blocking inter-node switch vertex."""
    gemm_curve: Mapping[str, tuple[tuple[float, float], ...]] = field(default_factory=dict)
    """Optional efficiency curve per dtype: (tokens per GEMM, TFLOP/s) points, interpolated."""
    description: str = ""
    """Free text: hardware, sources and assumptions."""
    duplex: str = "full"
    """``full``: the two directions between two workers are independent (NCCL, RDMA, raw
    TCP). ``half``: the transport moves one direction of a worker pair at a time, so a pair's
    exchange costs the bytes of both directions over the path's bottleneck; gloo's TCP pairs
    behave so (docs/emulation.md). ``scripts/calibrate.py`` writes ``half`` when its
    simultaneous exchange is well below the ping-pong rate."""

    @property
    def num_workers(self) -> int:
        """N = nodes * workers_per_node."""
        return self.nodes * self.workers_per_node


_TOP_KEYS = {
    "name", "nodes", "workers_per_node", "gemm_tflops", "gemm_curve", "links", "nics",
    "inter_node", "description", "duplex",
}
DUPLEX_MODES = ("full", "half")
"""Accepted values of the top-level ``duplex`` key."""
_LINK_KEYS = {"a", "b", "gbps", "count", "latency_us", "kind"}
_NIC_KEYS = {"attach", "gbps", "count", "latency_us"}
_INTER_KEYS = {"switch"}


def _check_keys(where: str, data: Any, allowed: set[str], required: Sequence[str]) -> None:
    """Raise :class:`ClusterSpecError` for a non-mapping, unknown or missing keys."""
    if not isinstance(data, Mapping):
        raise ClusterSpecError(f"{where}: expected a mapping, got {type(data).__name__}")
    unknown = sorted(set(map(str, data)) - allowed)
    if unknown:
        raise ClusterSpecError(
            f"{where}.{unknown[0]}: unknown key (allowed: {', '.join(sorted(allowed))})"
        )
    for key in required:
        if key not in data:
            raise ClusterSpecError(f"{where}.{key}: required key is missing")


def _number(where: str, value: Any, positive: bool = True) -> float:
    """Return ``value`` as float; it must be a number (and > 0 when ``positive``)."""
    if isinstance(value, bool) or not isinstance(value, (int, float)):
        raise ClusterSpecError(f"{where}: expected a number, got {value!r}")
    if positive and not value > 0:
        raise ClusterSpecError(f"{where}: must be > 0, got {value!r}")
    if not positive and value < 0:
        raise ClusterSpecError(f"{where}: must be >= 0, got {value!r}")
    return float(value)


def _integer(where: str, value: Any) -> int:
    """Return ``value`` as a positive int."""
    if isinstance(value, bool) or not isinstance(value, int) or value < 1:
        raise ClusterSpecError(f"{where}: expected a positive integer, got {value!r}")
    return int(value)


def _check_vertex(where: str, name: Any, workers_per_node: int) -> str:
    """A vertex name is a string; ``w<i>`` names must be existing workers."""
    if not isinstance(name, str) or not name or "/" in name:
        raise ClusterSpecError(f"{where}: expected a vertex name without '/', got {name!r}")
    if name[0] == "w" and name[1:].isdigit() and int(name[1:]) >= workers_per_node:
        raise ClusterSpecError(
            f"{where}: worker {name!r} does not exist (workers_per_node={workers_per_node})"
        )
    return name


def cluster_spec_from_dict(data: Mapping[str, Any], source: str = "<cluster>") -> ClusterSpec:
    """Validate a parsed cluster description and build a :class:`ClusterSpec`.

    Errors name ``source`` and the dotted key, e.g. ``johnny.yaml: links[3].gbps: ...``.
    """
    _check_keys(source, data, _TOP_KEYS, ("name", "nodes", "workers_per_node", "gemm_tflops"))
    m = _integer(f"{source}: workers_per_node", data["workers_per_node"])
    nodes = _integer(f"{source}: nodes", data["nodes"])
    tflops_raw = data["gemm_tflops"]
    if not isinstance(tflops_raw, Mapping):
        raise ClusterSpecError(f"{source}: gemm_tflops: expected a mapping dtype -> TFLOP/s")
    tflops = {str(k): _number(f"{source}: gemm_tflops.{k}", v) for k, v in tflops_raw.items()}
    for dtype in REQUIRED_DTYPES:
        if dtype not in tflops:
            raise ClusterSpecError(f"{source}: gemm_tflops.{dtype}: required key is missing")
    curves: dict[str, tuple[tuple[float, float], ...]] = {}
    for dtype, points in (data.get("gemm_curve") or {}).items():
        where = f"{source}: gemm_curve.{dtype}"
        if not isinstance(points, Sequence) or not points:
            raise ClusterSpecError(f"{where}: expected a list of [tokens, tflops] pairs")
        pts = []
        for i, pt in enumerate(points):
            if not isinstance(pt, Sequence) or len(pt) != 2:
                raise ClusterSpecError(f"{where}[{i}]: expected [tokens, tflops]")
            pts.append((_number(f"{where}[{i}][0]", pt[0]), _number(f"{where}[{i}][1]", pt[1])))
        curves[str(dtype)] = tuple(sorted(pts))
    links: list[LinkSpec] = []
    seen: set[frozenset[str]] = set()
    for i, raw in enumerate(data.get("links") or []):
        where = f"{source}: links[{i}]"
        _check_keys(where, raw, _LINK_KEYS, ("a", "b", "gbps"))
        a = _check_vertex(f"{where}.a", raw["a"], m)
        b = _check_vertex(f"{where}.b", raw["b"], m)
        if a == b or frozenset((a, b)) in seen:
            raise ClusterSpecError(f"{where}: self loop or duplicate link {a}-{b} (use count)")
        seen.add(frozenset((a, b)))
        links.append(LinkSpec(
            a=a, b=b, gbps=_number(f"{where}.gbps", raw["gbps"]),
            count=_integer(f"{where}.count", raw.get("count", 1)),
            latency_us=_number(f"{where}.latency_us", raw.get("latency_us", 0.0), False),
            kind=str(raw.get("kind", "")),
        ))
    nics: list[NicSpec] = []
    for i, raw in enumerate(data.get("nics") or []):
        where = f"{source}: nics[{i}]"
        _check_keys(where, raw, _NIC_KEYS, ("attach", "gbps"))
        attach = _check_vertex(f"{where}.attach", raw["attach"], m)
        if any(n.attach == attach for n in nics):
            raise ClusterSpecError(f"{where}.attach: second NIC on {attach!r} (use count)")
        nics.append(NicSpec(
            attach=attach, gbps=_number(f"{where}.gbps", raw["gbps"]),
            count=_integer(f"{where}.count", raw.get("count", 1)),
            latency_us=_number(f"{where}.latency_us", raw.get("latency_us", 0.0), False),
        ))
    inter = data.get("inter_node") or {}
    _check_keys(f"{source}: inter_node", inter, _INTER_KEYS, ())
    switch = str(inter.get("switch", "net"))
    if nodes > 1 and not nics:
        raise ClusterSpecError(f"{source}: nics: a cluster with {nodes} nodes needs a NIC")
    duplex = str(data.get("duplex", "full"))
    if duplex not in DUPLEX_MODES:
        raise ClusterSpecError(f"{source}: duplex: {duplex!r} is not one of {list(DUPLEX_MODES)}")
    if m > 1 and not links:
        raise ClusterSpecError(f"{source}: links: {m} workers per node need intra-node links")
    return ClusterSpec(
        name=str(data["name"]), nodes=nodes, workers_per_node=m, gemm_tflops=tflops,
        links=tuple(links), nics=tuple(nics), inter_switch=switch, gemm_curve=curves,
        description=str(data.get("description", "")), duplex=duplex,
    )


def load_cluster(name_or_path: str | Path) -> ClusterSpec:
    """Load a cluster YAML: a path, or a bare name looked up in ``configs/clusters/``."""
    path = Path(name_or_path)
    if not path.suffix and not path.exists():
        path = CLUSTER_DIR / f"{name_or_path}.yaml"
    if not path.exists():
        raise ClusterSpecError(f"{name_or_path}: cluster file not found (looked at {path})")
    with open(path, encoding="utf-8") as fh:
        data = yaml.safe_load(fh)
    return cluster_spec_from_dict(data, source=path.name)


# --------------------------------------------------------------------------------------
# Topology
# --------------------------------------------------------------------------------------


@dataclass(frozen=True)
class DirectedLink:
    """One direction of a physical connection."""

    index: int
    """Position in :attr:`Topology.links` (row of the incidence matrix)."""
    src: str
    """Source vertex (global name, e.g. ``n0/pcie0``)."""
    dst: str
    """Destination vertex."""
    bandwidth: float
    """One-direction bandwidth in bytes/s."""
    latency_s: float = 0.0
    """One-way latency in seconds (not used by the model)."""
    kind: str = ""
    """Label: the YAML ``kind`` of the link, or ``nic``."""


def _interp_curve(points: Sequence[tuple[float, float]]) -> Callable[[np.ndarray], np.ndarray]:
    """Piecewise-linear, clamped FLOP/s as a function of tokens per GEMM."""
    xs = np.array([p[0] for p in points], dtype=float)
    ys = np.array([p[1] for p in points], dtype=float) * 1e12

    def flops(tokens: np.ndarray) -> np.ndarray:
        """Achieved FLOP/s for GEMMs over ``tokens`` rows."""
        return np.interp(np.asarray(tokens, dtype=float), xs, ys)

    return flops


class Topology:
    """The directed link graph of a whole cluster, with deterministic worker-to-worker paths."""

    def __init__(self, spec: ClusterSpec) -> None:
        """Build vertices and directed links for every node of ``spec``."""
        self.spec = spec
        self.nodes = spec.nodes
        self.workers_per_node = spec.workers_per_node
        self.num_workers = spec.num_workers
        links: list[DirectedLink] = []
        vertices: set[str] = set()

        def add(u: str, v: str, bw: float, lat_us: float, kind: str) -> None:
            for s, d in ((u, v), (v, u)):
                links.append(DirectedLink(len(links), s, d, bw, lat_us * 1e-6, kind))
            vertices.update((u, v))

        for node in range(spec.nodes):
            vertices.update(self.worker_vertex(node * spec.workers_per_node + i)
                            for i in range(spec.workers_per_node))
            for ln in spec.links:
                add(f"n{node}/{ln.a}", f"n{node}/{ln.b}", ln.bandwidth, ln.latency_us, ln.kind)
            if spec.nodes > 1:
                for nic in spec.nics:
                    add(f"n{node}/{nic.attach}", spec.inter_switch, nic.bandwidth,
                        nic.latency_us, "nic")
        self.links: tuple[DirectedLink, ...] = tuple(links)
        self.vertices: tuple[str, ...] = tuple(sorted(vertices))
        self._adj: dict[str, list[DirectedLink]] = {v: [] for v in self.vertices}
        for ln in self.links:
            self._adj[ln.src].append(ln)
        self._trees: dict[int, dict[str, tuple[DirectedLink, ...]]] = {}
        for w in range(self.num_workers):
            tree = self._paths_from(w)
            missing = [d for d in range(self.num_workers) if self.worker_vertex(d) not in tree]
            if missing:
                raise ClusterSpecError(
                    f"{spec.name}: worker {w} cannot reach workers {missing} (check links/nics)"
                )

    # ---- naming ----------------------------------------------------------------------

    def worker_vertex(self, worker: int) -> str:
        """Global vertex name of a worker: ``n<node>/w<local>``."""
        return f"n{self.node_of(worker)}/w{self.local_index(worker)}"

    def node_of(self, worker: int) -> int:
        """Node of a global worker index (w = node * M + local)."""
        if not 0 <= worker < self.num_workers:
            raise IndexError(f"worker {worker} out of range [0, {self.num_workers})")
        return worker // self.workers_per_node

    def local_index(self, worker: int) -> int:
        """Index of a worker inside its node."""
        return worker % self.workers_per_node

    # ---- throughput ------------------------------------------------------------------

    def gemm_flops(self, dtype: str) -> float:
        """Constant achieved GEMM throughput P of one worker for ``dtype``, FLOP/s."""
        try:
            return self.spec.gemm_tflops[dtype] * 1e12
        except KeyError:
            raise KeyError(f"{self.spec.name}: no gemm_tflops for dtype {dtype!r} "
                           f"(have {sorted(self.spec.gemm_tflops)})") from None

    def gemm_throughput(self, dtype: str) -> GemmThroughput:
        """P for ``dtype``: the efficiency curve when the YAML has one, else the constant."""
        if dtype in self.spec.gemm_curve:
            return _interp_curve(self.spec.gemm_curve[dtype])
        return self.gemm_flops(dtype)

    def net_bandwidth(self) -> float:
        """W_net in bytes/s: slowest NIC, or slowest worker-path link on a single node."""
        nic = [ln.bandwidth for ln in self.links if ln.kind == "nic"]
        if nic:
            return min(nic)
        used = {ln.index for s in range(self.num_workers) for d in range(self.num_workers)
                for ln in self.path(s, d)}
        return min((self.links[i].bandwidth for i in used), default=float("inf"))

    # ---- routing ---------------------------------------------------------------------

    def _paths_from(self, src_worker: int) -> dict[str, tuple[DirectedLink, ...]]:
        """Deterministic shortest paths (hops, then widest, then lexicographic) from a worker.

        Paths never leave the source node through the inter-node switch and come back.
        """
        if src_worker in self._trees:
            return self._trees[src_worker]
        src = self.worker_vertex(src_worker)
        home = f"n{self.node_of(src_worker)}/"
        # label: (hops, -bottleneck, vertex sequence); BFS layer by layer
        best: dict[str, tuple[int, float, tuple[str, ...]]] = {src: (0, -float("inf"), (src,))}
        via: dict[str, tuple[DirectedLink, ...]] = {src: ()}
        frontier = [src]
        while frontier:
            cand: dict[str, tuple[tuple[int, float, tuple[str, ...]], tuple[DirectedLink, ...]]] = {}
            for u in frontier:
                hops, neg_bw, seq = best[u]
                for ln in self._adj[u]:
                    if ln.dst in best or (u == self.spec.inter_switch
                                          and ln.dst.startswith(home)):
                        continue  # visited, or a hairpin back into the source node
                    label = (hops + 1, max(neg_bw, -ln.bandwidth), seq + (ln.dst,))
                    if ln.dst not in cand or label < cand[ln.dst][0]:
                        cand[ln.dst] = (label, via[u] + (ln,))
            for v, (label, path) in cand.items():
                best[v], via[v] = label, path
            frontier = sorted(cand)
        self._trees[src_worker] = via
        return via

    def path(self, src_worker: int, dst_worker: int) -> list[DirectedLink]:
        """Directed links crossed from ``src_worker`` to ``dst_worker`` (empty for self)."""
        self.node_of(dst_worker)
        return list(self._paths_from(src_worker)[self.worker_vertex(dst_worker)])

    @cached_property
    def incidence(self) -> np.ndarray:
        """0/1 matrix [num_links, N*N]: entry (l, s*N + d) is 1 when path(s, d) crosses l."""
        n = self.num_workers
        mat = np.zeros((len(self.links), n * n))
        for s in range(n):
            for d in range(n):
                for ln in self.path(s, d):
                    mat[ln.index, s * n + d] = 1.0
        return mat

    @cached_property
    def _bandwidths(self) -> np.ndarray:
        """Bandwidth of every directed link, bytes/s, indexed like :attr:`links`."""
        return np.array([ln.bandwidth for ln in self.links], dtype=float)

    @cached_property
    def _incidence_entries(self) -> tuple[np.ndarray, np.ndarray]:
        """(link index, pair index s*N + d) of every nonzero of :attr:`incidence`."""
        links, pairs = np.nonzero(self.incidence)
        return links, pairs

    def link_loads(self, traffic_bytes: np.ndarray) -> np.ndarray:
        """Bytes crossing each directed link for a traffic matrix [N, N] (src, dst) in bytes.

        ``incidence @ traffic``, computed from the nonzeros only (a path crosses a handful of
        links, so this is ~N^2 * hops work instead of links * N^2).
        """
        t = np.asarray(traffic_bytes, dtype=float)
        if t.shape != (self.num_workers, self.num_workers):
            raise ValueError(f"traffic matrix must be [{self.num_workers}]x[{self.num_workers}], "
                             f"got {t.shape}")
        links, pairs = self._incidence_entries
        return np.bincount(links, weights=t.reshape(-1)[pairs], minlength=len(self.links))

    def max_link_time(self, link_bytes: np.ndarray) -> float:
        """max over directed links of (bytes on the link) / bandwidth, seconds."""
        if len(self.links) == 0:
            return 0.0
        return float(np.max(np.asarray(link_bytes, dtype=float) / self._bandwidths))

    @cached_property
    def _pair_bottleneck(self) -> np.ndarray:
        """[N, N] bytes/s: the narrowest link on the path between two workers (inf on the
        diagonal)."""
        n = self.num_workers
        bw = np.full((n, n), np.inf)
        for a in range(n):
            for b in range(n):
                if a != b:
                    bw[a, b] = min((ln.bandwidth for ln in self.path(a, b)), default=np.inf)
        return bw

    def transfer_time(self, traffic_bytes: np.ndarray) -> float:
        """Time of moving a traffic matrix [N, N] (src, dst) in bytes, all flows at once.

        The busiest directed link bounds it; with ``duplex: half`` so does every worker pair,
        whose two directions take turns: (bytes a->b + bytes b->a) / bottleneck(a, b).
        """
        t = np.asarray(traffic_bytes, dtype=float)
        time = self.max_link_time(self.link_loads(t))
        if self.spec.duplex == "half" and self.num_workers > 1:
            both = t + t.T
            np.fill_diagonal(both, 0.0)
            time = max(time, float(np.max(both / self._pair_bottleneck)))
        return time

    # ---- grouping --------------------------------------------------------------------

    def distance(self, a: int, b: int) -> tuple[int, float]:
        """(hops, -bottleneck bandwidth) between two workers; smaller is closer."""
        p = self.path(a, b)
        return (len(p), -min((ln.bandwidth for ln in p), default=float("inf")))

    def group_order(self, group_size: int) -> list[int]:
        """Worker permutation whose consecutive chunks of ``group_size`` are tight groups.

        Greedy: seed each group with the lowest unassigned worker, then repeatedly add the
        unassigned worker whose farthest distance to the group is smallest (ties: wider
        bottleneck, then lower index). Same-switch / same-node workers end up together.
        """
        n = self.num_workers
        if group_size < 1 or n % group_size:
            raise ValueError(f"group_size {group_size} must divide the {n} workers")
        left = list(range(n))
        order: list[int] = []
        while left:
            group = [left.pop(0)]
            while len(group) < group_size:
                def key(c: int) -> tuple[int, float, int]:
                    far = max(self.distance(g, c) for g in group)
                    return (far[0], far[1], c)
                nxt = min(left, key=key)
                left.remove(nxt)
                group.append(nxt)
            order.extend(group)
        return order

    def __repr__(self) -> str:
        """Short summary."""
        return (f"Topology({self.spec.name}: {self.nodes}x{self.workers_per_node} workers, "
                f"{len(self.vertices)} vertices, {len(self.links)} directed links)")


def build_topology(spec_or_name: ClusterSpec | str | Path) -> Topology:
    """A :class:`Topology` from a spec, a cluster name or a YAML path."""
    spec = spec_or_name if isinstance(spec_or_name, ClusterSpec) else load_cluster(spec_or_name)
    topo = Topology(spec)
    logger.debug("built %r", topo)
    return topo
