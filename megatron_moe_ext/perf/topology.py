"""The network topology used by the performance model, built from a cluster description.

Notation
--------
N        workers in total, N = nodes * M
M        workers per node (``workers_per_node``)
w        global worker index, w = node * M + local index
P        achieved GEMM throughput of one worker (FLOP/s), per dtype
W_l      one-direction bandwidth of directed link l (bytes/s in code, Gbit/s in YAML)
W_net    bandwidth of the slowest NIC (bytes/s); the paper's "network bandwidth"

The cluster YAML schema, its loader and writer live in :mod:`.cluster`; every public name
of it is importable from here too (``from megatron_moe_ext.perf.topology import load_cluster``).

Every undirected YAML link becomes two directed links (one per direction), each with the
full one-direction bandwidth ``gbps * count``. In the :class:`Topology`, node-local vertex
names are prefixed with the node (``n1/pcie0``, ``n1/w3``); the inter-node switch keeps its
name. A NIC is the link between its attach vertex and the inter-node switch.

Paths are shortest by hop count; among equally short paths the one with the widest bottleneck
wins, then the lexicographically smallest vertex sequence, so routing is deterministic.
A link of kind :data:`CIRCUIT_KIND` (an optical circuit between two workers) carries only its
two endpoints' traffic: no path passes through it on the way to a third worker, since a GPU
does not forward another GPU's traffic (the cluster emulator's circuits behave the same way).
"""

from __future__ import annotations

import dataclasses
import functools
import logging
from dataclasses import dataclass
from functools import cached_property
from pathlib import Path
from typing import Callable, Sequence, Union

import numpy as np

from .cluster import (
    CALIBRATION_KEYS,
    CLUSTER_DIR,
    CONFIG_DIR,
    DUPLEX_MODES,
    GBIT,
    REQUIRED_DTYPES,
    ClusterNotFoundError,
    ClusterSpec,
    ClusterSpecError,
    LinkSpec,
    NicSpec,
    available_clusters,
    calibration_note,
    cluster_spec_from_dict,
    cluster_to_dict,
    load_cluster,
    save_cluster,
    this_machine,
)

__all__ = [
    "CALIBRATION_KEYS", "CLUSTER_DIR", "CONFIG_DIR", "DUPLEX_MODES", "GBIT", "REQUIRED_DTYPES",
    "ClusterNotFoundError", "ClusterSpec", "ClusterSpecError", "LinkSpec", "NicSpec",
    "available_clusters", "calibration_note", "cluster_spec_from_dict", "cluster_to_dict",
    "load_cluster", "save_cluster", "this_machine", "GemmThroughput", "DirectedLink", "Topology",
    "build_topology", "ep_topology", "is_stand_in", "STAND_IN_KIND", "CIRCUIT_KIND",
]

logger = logging.getLogger(__name__)

STAND_IN_KIND = "stand-in"
"""Link ``kind`` of the one-switch stand-in :func:`ep_topology` builds (see :func:`is_stand_in`)."""

CIRCUIT_KIND = "ocs"
"""Link ``kind`` of a worker-to-worker circuit: used only by the flow between its two ends."""

GemmThroughput = Union[float, Callable[[np.ndarray], np.ndarray]]
"""Achieved GEMM throughput: a constant in FLOP/s, or a function of the tokens per GEMM."""


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
        self._orders: dict[int, tuple[int, ...]] = {}
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

        Paths never leave the source node through the inter-node switch and come back, and
        never cross a circuit (:data:`CIRCUIT_KIND`): the search runs without circuits, then a
        circuit from the source replaces the path to its other end when it is fewer hops (or
        as few and wider).
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
                    if ln.dst in best or ln.kind == CIRCUIT_KIND or (
                            u == self.spec.inter_switch and ln.dst.startswith(home)):
                        continue  # visited, a circuit, or a hairpin back into the source node
                    label = (hops + 1, max(neg_bw, -ln.bandwidth), seq + (ln.dst,))
                    if ln.dst not in cand or label < cand[ln.dst][0]:
                        cand[ln.dst] = (label, via[u] + (ln,))
            for v, (label, path) in cand.items():
                best[v], via[v] = label, path
            frontier = sorted(cand)
        for ln in self._adj[src]:  # a circuit wins its own pair on (hops, -bottleneck)
            if ln.kind == CIRCUIT_KIND and (ln.dst not in best
                                            or (1, -ln.bandwidth) < best[ln.dst][:2]):
                via[ln.dst] = (ln,)
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
        Memoized per group size (the model asks for it on every prediction).
        """
        n = self.num_workers
        if group_size < 1 or n % group_size:
            raise ValueError(f"group_size {group_size} must divide the {n} workers")
        if group_size not in self._orders:
            self._orders[group_size] = tuple(self._greedy_order(group_size))
        return list(self._orders[group_size])

    def _greedy_order(self, group_size: int) -> list[int]:
        """The greedy grouping of :meth:`group_order` (uncached)."""
        left = list(range(self.num_workers))
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


def is_stand_in(topology: Topology) -> bool:
    """True for the one-switch stand-in of :func:`ep_topology` (not a real cluster graph)."""
    return any(ln.kind == STAND_IN_KIND for ln in topology.spec.links)


@functools.lru_cache(maxsize=None)
def ep_topology(cluster: str | Path, num_workers: int) -> Topology:
    """The topology the performance model uses for an expert-parallel group of W workers.

    The one mapping used by the layer, ``--describe``, the roofline and the benchmark:

    - the cluster file's own topology when it has exactly W workers (EP rank w = worker w);
    - when W is a multiple of the workers per node M and at most the cluster's size, the
      first W / M nodes of the cluster (an EP group of consecutive ranks fills whole nodes);
    - otherwise a stand-in: one switch ``sw`` with W workers attached by links of the
      cluster's W_net and the cluster's GEMM throughput (a warning says so;
      :func:`is_stand_in` tells it apart).

    Cached per (cluster, W); a missing cluster raises :class:`ClusterNotFoundError`. A
    calibration made on another machine is logged as a warning (:func:`calibration_note`).
    """
    spec = load_cluster(cluster)
    note = calibration_note(spec)
    if note:
        logger.warning("%s", note)
    if num_workers < 1:
        raise ValueError(f"an expert-parallel group has at least 1 worker, got {num_workers}")
    m = spec.workers_per_node
    if spec.num_workers == num_workers:
        return Topology(spec)
    if num_workers % m == 0 and num_workers // m <= spec.nodes:
        logger.info("expert-parallel group of %d workers = %d of the %d nodes of %s",
                    num_workers, num_workers // m, spec.nodes, spec.name)
        return Topology(dataclasses.replace(spec, nodes=num_workers // m))
    w_net = Topology(spec).net_bandwidth()
    logger.warning(
        "cluster %s has %d workers (%d x %d) but the expert-parallel group has %d: the "
        "performance model uses %d workers on one switch with the cluster's W_net (%.3g Gbit/s) "
        "and GEMM rates", spec.name, spec.num_workers, spec.nodes, m, num_workers, num_workers,
        w_net / GBIT,
    )
    star = ClusterSpec(
        name=f"{spec.name}-star{num_workers}", nodes=1, workers_per_node=num_workers,
        gemm_tflops=dict(spec.gemm_tflops), gemm_curve=dict(spec.gemm_curve),
        links=tuple(LinkSpec(a=f"w{i}", b="sw", gbps=w_net / GBIT, kind=STAND_IN_KIND)
                    for i in range(num_workers)) if num_workers > 1 else (),
        description=f"stand-in for {spec.name} with {num_workers} workers",
        calibration=spec.calibration,
    )
    return Topology(star)
