"""Fabric what-ifs: a routing trace on other networks, with the performance model.

Notation
--------
W        workers of the trace (all EP groups); M workers per node; E experts; G = W / ep groups
I, L     records and MoE layers of the trace; nmb micro-batches per iteration
R        iterations between two reconfigurations of the circuits; k region size
B_nic    per-worker NIC rate (Gbit/s) of the tree fabrics

Every fabric is a one-"node" :class:`ClusterSpec` holding all W workers (a flat graph): the
nodes of the cluster keep their internal links (vertex ``pcie0`` of node r becomes
``pcie0_r``) and the network between them changes:

- ``described``: the cluster file's own network (its NICs to one non-blocking switch).
- ``fat-tree``: every worker has its own NIC of B_nic to a top-of-rack switch per
  ``rack_nodes`` nodes, each rack has uplinks of (workers in rack) * B_nic to a spine:
  non-blocking.
- ``oversubscribed``: the same tree with uplinks divided by ``oversub``.
- ``reconfigurable``: the oversubscribed tree plus optical circuits (kind ``ocs``): every
  worker has ``ports`` circuit ports of ``ocs_gbps``; every R iterations the workers are
  partitioned into regions of k (:func:`..locality.best_regions` on the inter-node traffic)
  and each region's ports are given to its heaviest pairs of workers on different nodes
  (greedy, a pair may get several circuits) on the traffic of the
  previous R iterations (the first window uses its own); each reconfiguration costs
  ``delay_ms``, charged once per window. A circuit carries only its own pair's traffic
  (:data:`..perf.topology.CIRCUIT_KIND`: no relaying through another worker's circuit).

A layer call is predicted with :func:`perf.model.predict_layer` (sync schedule) on the per-
micro-batch counts; G EP groups run at once on the shared fabric, modelled as G * E experts
(group g's expert e lives on worker g * ep + placement[e]). Cost of a fabric = sum over its
links of ``link_costs[kind].price(gbps, count)`` (cluster file, ``nic`` / ``uplink`` /
``ocs`` and the intra-node kinds); a kind without a price makes the cost unknown.
"""

from __future__ import annotations

import dataclasses
from dataclasses import dataclass, field
from typing import Optional, Sequence

import numpy as np

from ..perf.cluster import ClusterSpec, LinkSpec
from ..perf.model import predict_layer
from ..perf.topology import CIRCUIT_KIND, Topology
from .locality import best_regions, traffic_matrix
from .trace import RoutingTrace

MFABRIC_PUBLISHED = {100: (1.2, 1.5), 400: (1.9, 2.3)}
"""mFabric's performance per dollar of its regionally reconfigurable fabric over a
non-blocking fat-tree, by link rate in Gbit/s (arXiv 2501.03905; related-systems.md)."""


def _vertex(v: str, node: int, m: int) -> str:
    """Global name of node ``node``'s vertex ``v``: workers renumbered, switches suffixed."""
    if v[0] == "w" and v[1:].isdigit():
        return f"w{node * m + int(v[1:])}"
    return f"{v}_{node}"


def _node_links(spec: ClusterSpec, node: int) -> list[LinkSpec]:
    """Node ``node``'s internal links with global worker names and per-node switch names."""
    m = spec.workers_per_node
    return [dataclasses.replace(ln, a=_vertex(ln.a, node, m), b=_vertex(ln.b, node, m))
            for ln in spec.links]


def _flat(spec: ClusterSpec, nodes: int, links: list[LinkSpec], label: str) -> ClusterSpec:
    """A one-node spec of ``nodes * M`` workers with ``links``."""
    return ClusterSpec(
        name=f"{spec.name}-{label}", nodes=1, workers_per_node=nodes * spec.workers_per_node,
        gemm_tflops=dict(spec.gemm_tflops), gemm_curve=dict(spec.gemm_curve),
        links=tuple(links), duplex=spec.duplex, description=f"{label} what-if of {spec.name}",
        link_costs=dict(spec.link_costs), memory_gib=spec.memory_gib,
    )


def _nodes_for(spec: ClusterSpec, num_workers: int) -> int:
    m = spec.workers_per_node
    if num_workers % m or num_workers // m > spec.nodes:
        raise ValueError(f"{num_workers} workers are not whole nodes of {spec.name} "
                         f"({spec.nodes} x {m})")
    return num_workers // m


def described_fabric(spec: ClusterSpec, num_workers: int) -> ClusterSpec:
    """The cluster's own network for its first W / M nodes, flattened (NICs become links of
    kind ``nic`` to the vertex ``net``)."""
    nodes = _nodes_for(spec, num_workers)
    links = [ln for r in range(nodes) for ln in _node_links(spec, r)]
    if nodes > 1:
        links += [LinkSpec(a=_vertex(nic.attach, r, spec.workers_per_node), b="net",
                           gbps=nic.gbps, count=nic.count, kind="nic")
                  for r in range(nodes) for nic in spec.nics]
    return _flat(spec, nodes, links, "described")


def tree_fabric(spec: ClusterSpec, num_workers: int, nic_gbps: float, oversub: float = 1.0,
                rack_nodes: int = 1) -> ClusterSpec:
    """Two-level tree: a NIC of ``nic_gbps`` per worker to its rack switch, rack uplinks of
    (workers per rack) * nic_gbps / oversub to a spine (none with a single rack)."""
    nodes = _nodes_for(spec, num_workers)
    if rack_nodes < 1 or nodes % rack_nodes and nodes > rack_nodes:
        raise ValueError(f"rack_nodes {rack_nodes} must divide the {nodes} nodes")
    rack_nodes = min(rack_nodes, nodes)
    racks = nodes // rack_nodes
    m = spec.workers_per_node
    links = [ln for r in range(nodes) for ln in _node_links(spec, r)]
    links += [LinkSpec(a=f"w{w}", b=f"tor{w // (m * rack_nodes)}", gbps=nic_gbps, kind="nic")
              for w in range(num_workers)]
    if racks > 1:
        links += [LinkSpec(a=f"tor{r}", b="spine", gbps=m * rack_nodes * nic_gbps / oversub,
                           kind="uplink") for r in range(racks)]
    label = "fat-tree" if oversub == 1.0 else f"tree-{oversub:g}to1"
    return _flat(spec, nodes, links, label)


def assign_circuits(T: np.ndarray, k: int, ports: int,
                    workers_per_node: int = 1) -> dict[tuple[int, int], int]:
    """{(a, b): circuits} within best regions of k: repeatedly the pair with the most traffic
    per circuit (S / (circuits + 1); ties: the most free ports, then the lowest ids) while
    both ends have a free port. Pairs inside one node (``workers_per_node``) get none (their
    traffic stays on the node's own links) and the regions are chosen on the traffic
    between nodes."""
    t = np.asarray(T, dtype=float).copy()
    node = np.arange(t.shape[0]) // workers_per_node
    t[node[:, None] == node[None, :]] = 0.0  # regions are chosen on the inter-node traffic
    S = t + t.T
    regions = best_regions(t, k)
    free = np.full(t.shape[0], ports)
    pairs = [(a, b) for a in range(len(S)) for b in range(a + 1, len(S))
             if regions[a] == regions[b] and S[a, b] > 0
             and a // workers_per_node != b // workers_per_node]
    out: dict[tuple[int, int], int] = {}
    while True:
        open_pairs = [(a, b) for a, b in pairs if free[a] and free[b]]
        if not open_pairs:
            return out
        a, b = max(open_pairs, key=lambda p: (S[p] / (out.get(p, 0) + 1),
                                              free[p[0]] + free[p[1]], -p[0], -p[1]))
        out[(a, b)] = out.get((a, b), 0) + 1
        free[a] -= 1
        free[b] -= 1


@dataclass(frozen=True)
class CircuitWindow:
    """One window of a circuit plan: records ``[start, stop)`` run on ``circuits``."""

    start: int
    """First record (index into the records the plan was made for)."""
    stop: int
    """One past the last record."""
    circuits: dict[tuple[int, int], int]
    """{(a, b): circuits} with a < b (:func:`assign_circuits`)."""


def plan_circuits(recs: np.ndarray, ep_size: int, k: int, ports: int, workers_per_node: int,
                  reconfig_every: int, static: bool = False) -> list[CircuitWindow]:
    """The reconfigurable fabric's circuits per window of ``reconfig_every`` records.

    ``recs`` [I, L, W, E] counts per layer call. Window j's circuits are
    :func:`assign_circuits` on the traffic of window j - 1 (window 0: its own), summed over
    its records and layers. ``static``: every window keeps window 0's circuits (a fabric
    configured once). The model (:func:`evaluate_fabrics`) and the cluster emulator
    (:mod:`megatron_moe_ext.emulation.circuits`) both run this plan.
    """
    if reconfig_every < 1:
        raise ValueError(f"reconfig_every must be >= 1, got {reconfig_every}")
    recs = np.asarray(recs, dtype=float)
    n_win = -(-len(recs) // reconfig_every)
    out: list[CircuitWindow] = []
    for j in range(n_win):
        if static and out:
            circuits = out[0].circuits
        else:
            seen = recs[max(0, j - 1) * reconfig_every:max(1, j) * reconfig_every]
            T = sum(traffic_matrix(c, ep_size) for rec in seen for c in rec)
            circuits = assign_circuits(T, k, ports, workers_per_node)
        out.append(CircuitWindow(j * reconfig_every, min(len(recs), (j + 1) * reconfig_every),
                                 circuits))
    return out


def with_circuits(base: ClusterSpec, circuits: dict[tuple[int, int], int],
                  ocs_gbps: float) -> ClusterSpec:
    """``base`` (a flat fabric) plus direct worker-worker circuits of kind ``ocs``."""
    extra = tuple(LinkSpec(a=f"w{a}", b=f"w{b}", gbps=ocs_gbps, count=n, kind=CIRCUIT_KIND)
                  for (a, b), n in sorted(circuits.items()))
    return dataclasses.replace(base, links=base.links + extra,
                               name=base.name.replace("tree", "ocs") + "+ocs")


def window_comm_s(recs: np.ndarray, plan: Sequence[CircuitWindow], base: ClusterSpec,
                  ocs_gbps: float, ep_size: int, H: int, dtype: str = "fp32") -> list[float]:
    """Predicted seconds of every window's all-to-alls on ``base`` plus the window's circuits:
    per layer call dispatch + combine (2 x ``predict_layer(...).comm_s``), summed over the
    window's records and layers (what the emulator measures, :mod:`..emulation.reconf`)."""
    out = []
    for win in plan:
        topo = Topology(with_circuits(base, win.circuits, ocs_gbps))
        total = 0.0
        for rec in np.asarray(recs, dtype=float)[win.start:win.stop]:
            for c in rec:
                cg, place = group_counts(c, ep_size)
                total += 2 * predict_layer(cg, place, H, 2.0, None, topo, dtype).comm_s
        out.append(total)
    return out


def fabric_cost(spec: ClusterSpec, ocs_ports: int = 0, ocs_gbps: float = 0.0) -> Optional[float]:
    """USD of the links of a flat fabric (+ ``ocs_ports`` circuit ports, priced like one
    ``ocs`` link each); None when a kind has no price in ``link_costs``."""
    total = 0.0
    for ln in spec.links:
        if ln.kind == CIRCUIT_KIND:
            continue  # circuits are counted as ports (they move, the ports stay)
        cost = spec.link_costs.get(ln.kind)
        if cost is None:
            return None
        total += cost.price(ln.gbps, ln.count)
    if ocs_ports:
        cost = spec.link_costs.get(CIRCUIT_KIND)
        if cost is None:
            return None
        total += cost.price(ocs_gbps, ocs_ports) / 2  # a circuit joins two ports
    return total


def group_counts(counts: np.ndarray, ep_size: int) -> tuple[np.ndarray, np.ndarray]:
    """(counts [W, G*E], placement [G*E]) modelling G concurrent EP groups as one layer."""
    c = np.asarray(counts, dtype=float)
    W, E = c.shape
    G = W // ep_size
    out = np.zeros((W, G * E))
    for g in range(G):
        out[g * ep_size:(g + 1) * ep_size, g * E:(g + 1) * E] = c[g * ep_size:(g + 1) * ep_size]
    place = np.concatenate([g * ep_size + np.arange(E) // (E // ep_size) for g in range(G)])
    return out, place


@dataclass
class FabricResult:
    """Predicted MoE time of a trace on one fabric."""

    name: str
    """Fabric label."""
    layer_ms: float
    """Mean predicted fwd+bwd time of one MoE layer call (one micro-batch)."""
    iteration_ms: float
    """Mean MoE time per iteration: nmb * sum over layers, + reconfiguration delay / R."""
    cost_usd: Optional[float]
    """Price of the fabric's links (None: a kind without a price)."""
    comm_share: float
    """Mean all-to-all share of the layer time (4 comm / total)."""
    notes: list[str] = field(default_factory=list)
    """How it was built."""


def _predict(counts: np.ndarray, ep: int, topo: Topology, H: int, alpha: float,
             dtype: str) -> tuple[float, float]:
    c, place = group_counts(counts, ep)
    p = predict_layer(c, place, H, alpha, None, topo, dtype, schedule="sync")
    return p.total_s, (4 * p.comm_s / p.total_s if p.total_s > 0 else 0.0)


def evaluate_fabrics(trace: RoutingTrace, cluster: ClusterSpec, *, nic_gbps: Optional[float] = None,
                     oversub: float = 2.0, rack_nodes: int = 1, region: Optional[int] = None,
                     ports: int = 2, ocs_gbps: Optional[float] = None, reconfig_every: int = 8,
                     delay_ms: float = 1.0, H: Optional[int] = None,
                     alpha: Optional[float] = None, dtype: Optional[str] = None,
                     max_records: int = 32) -> list[FabricResult]:
    """The four fabrics of the module docstring on the trace's last ``max_records`` records.

    H, alpha and dtype default to the trace header's meta (hidden_size, ffn_hidden_size /
    hidden_size, precision); B_nic and the circuit rate to the cluster's first NIC.
    """
    h = trace.header
    meta = h.meta
    H = int(H or meta.get("hidden_size", 0))
    if not H:
        raise ValueError("the trace has no hidden_size in its meta: pass H")
    alpha = float(alpha or meta.get("ffn_hidden_size", 4 * H) / H)
    dtype = dtype or meta.get("precision", "fp32")
    nmb = int(meta.get("num_microbatches", 1))
    W = h.num_workers
    nic = float(nic_gbps or (cluster.nics[0].gbps if cluster.nics else
                             min(ln.gbps for ln in cluster.links)))
    ocs = float(ocs_gbps or nic)
    k = int(region or min(8, W))
    recs = trace.counts[-max_records:].astype(float) / nmb  # [I, L, W, E] per layer call
    fabrics = {
        "described": described_fabric(cluster, W),
        "fat-tree": tree_fabric(cluster, W, nic, 1.0, rack_nodes),
        f"oversubscribed {oversub:g}:1": tree_fabric(cluster, W, nic, oversub, rack_nodes),
    }
    out = []
    for name, spec in fabrics.items():
        topo = Topology(spec)
        times = [[_predict(c, h.ep_size, topo, H, alpha, dtype) for c in rec] for rec in recs]
        t = np.array([[x[0] for x in r] for r in times])
        out.append(FabricResult(
            name=name, layer_ms=float(t.mean() * 1e3),
            iteration_ms=float(t.sum(axis=1).mean() * nmb * 1e3),
            cost_usd=fabric_cost(spec), comm_share=float(np.mean([[x[1] for x in r]
                                                                  for r in times])),
            notes=[spec.description, f"B_nic {nic:g} Gbit/s"]))
    base = fabrics[f"oversubscribed {oversub:g}:1"]
    per_call, shares = [], []
    for win in plan_circuits(recs, h.ep_size, k, ports, cluster.workers_per_node,
                             reconfig_every):
        topo = Topology(with_circuits(base, win.circuits, ocs))
        for rec in recs[win.start:win.stop]:
            res = [_predict(c, h.ep_size, topo, H, alpha, dtype) for c in rec]
            per_call.append([x[0] for x in res])
            shares.extend(x[1] for x in res)
    t = np.array(per_call)
    out.append(FabricResult(
        name=f"reconfigurable k={k}", layer_ms=float(t.mean() * 1e3),
        iteration_ms=float(t.sum(axis=1).mean() * nmb * 1e3 + delay_ms / reconfig_every),
        cost_usd=fabric_cost(base, ocs_ports=W * ports, ocs_gbps=ocs),
        comm_share=float(np.mean(shares)),
        notes=[f"{base.description} + {ports} circuit ports of {ocs:g} Gbit/s per worker, "
               f"regions of {k}, reassigned every {reconfig_every} iterations on the previous "
               f"window's traffic, {delay_ms:g} ms per reconfiguration"]))
    return out


def format_fabrics(results: Sequence[FabricResult], link_gbps: float) -> str:
    """A markdown table: time, cost and performance per cost relative to the fat-tree, beside
    mFabric's published ratio for the nearest rate."""
    ref = next(r for r in results if r.name == "fat-tree")
    rate = min(MFABRIC_PUBLISHED, key=lambda g: abs(g - link_gbps))
    lo, hi = MFABRIC_PUBLISHED[rate]
    lines = ["| fabric | MoE layer (ms) | MoE per iteration (ms) | a2a share | cost (USD) | "
             "perf / cost vs fat-tree |", "|---|---|---|---|---|---|"]
    for r in results:
        ratio = "n/a (no link_costs)"
        if r.cost_usd and ref.cost_usd:
            ratio = f"{(ref.iteration_ms / r.iteration_ms) / (r.cost_usd / ref.cost_usd):.2f}x"
        cost = f"{r.cost_usd:,.0f}" if r.cost_usd is not None else "n/a"
        lines.append(f"| {r.name} | {r.layer_ms:.4g} | {r.iteration_ms:.4g} | "
                     f"{100 * r.comm_share:.0f}% | {cost} | {ratio} |")
    lines.append(f"\nmFabric (published, packet-level simulation of 4 MoE models): "
                 f"{lo}-{hi}x performance per dollar over a non-blocking fat-tree at {rate} "
                 f"Gbit/s (our links: {link_gbps:g} Gbit/s).")
    return "\n".join(lines) + "\n"
