"""The Aristos layout planner: which workers form each expert-parallel group, and how large.

Notation
--------
W        workers (the world; tensor and pipeline parallel 1 assumed for the groups)
ep       expert-parallel group size; G = W / ep groups (expert data parallel G)
E, k     experts, top-k; tokens = micro_batch_size * seq_length per worker and layer call
kappa    MoE layer calls per iteration = MoE layers * micro-batches (Aristos's stage count)
pi(g) + max_i C_i
         one layer call of group g: expert compute plus its members' all-to-all, here the
         FasterMoE performance model (perf.model.predict_layer) on the cluster topology
T_rho    ring all-reduce of the expert gradients over the G groups (ring r joins rank r of
         every group; all ep rings run at once on the shared links)

Aristos's objective (related-systems.md): minimise over group sets G* the value
``max_g kappa (pi(g) + max_i C_i) + T_rho(|G*|)`` subject to every group holding all experts
in memory. A candidate layout is (ep, the group set, expert placement in a group, the
schedule and its group size s). The group sets searched per ep:

- ``packed``: consecutive chunks of ``Topology.group_order(ep)`` (tight groups: same switch,
  same node);
- ``strided``: worker w in group w % G (every group spans all nodes, rings stay in a node).

Placement is contiguous (expert e on rank e // (E / ep)): all workers have the same rate, so
Aristos's rate-proportional placement is the same. All groups run in lockstep: the model
times group g's all-to-all with every group moving the same pattern at once, so shared links
(NICs, sockets) are counted. The dense parameters' all-reduce is the same for every layout
and is left out. Memory per GPU is ``describe.memory_per_gpu`` with ``parallel.expert = ep``;
a layout above the cluster's ``memory_gib`` (or ``memory_gib=`` given) is rejected, with the
numbers, as is an ep the config cannot run (``describe``'s layout checks).
"""

from __future__ import annotations

import dataclasses
import logging
from dataclasses import dataclass, field
from typing import Any, Optional, Sequence

import numpy as np

from ..config import Config, ConfigError
from ..perf.cluster import ClusterSpec
from ..perf.model import predict_layer
from ..perf.topology import Topology

logger = logging.getLogger(__name__)

GRAD_BYTES = 4
"""Bytes per expert-gradient element in the all-reduce (fp32 main grads)."""


class GroupView:
    """The part of a :class:`Topology` one EP group sees, with the other groups in lockstep.

    Duck-types what ``predict_layer`` uses (num_workers, spec, gemm_throughput,
    transfer_time, group_order): an [ep, ep] traffic matrix of the group is placed on the
    members of every group (rank j of group g = worker groups[g][j]) before timing it.
    """

    def __init__(self, topology: Topology, groups: Sequence[Sequence[int]], index: int) -> None:
        self.topology = topology
        self.groups = [list(g) for g in groups]
        self.members = self.groups[index]
        self.num_workers = len(self.members)
        self.spec = topology.spec
        self._orders: dict[int, list[int]] = {}

    def gemm_throughput(self, dtype: str):
        """The cluster's P."""
        return self.topology.gemm_throughput(dtype)

    def transfer_time(self, traffic: np.ndarray) -> float:
        """Time of the group's [ep, ep] bytes with every group moving the same at once."""
        n = self.topology.num_workers
        full = np.zeros((n, n))
        for g in self.groups:
            full[np.ix_(g, g)] += traffic
        return self.topology.transfer_time(full)

    def group_order(self, group_size: int) -> list[int]:
        """Greedy tight sub-groups of the members (local ranks), like Topology.group_order."""
        if group_size not in self._orders:
            left = list(range(self.num_workers))
            order: list[int] = []
            d = self.topology.distance
            while left:
                grp = [left.pop(0)]
                while len(grp) < group_size:
                    nxt = min(left, key=lambda c: (max(d(self.members[g], self.members[c])
                                                       for g in grp), c))
                    left.remove(nxt)
                    grp.append(nxt)
                order.extend(grp)
            self._orders[group_size] = order
        return list(self._orders[group_size])


@dataclass
class Candidate:
    """One layout and its predicted cost."""

    ep: int
    """Expert-parallel group size."""
    grouping: str
    """``packed`` or ``strided``."""
    groups: list[list[int]]
    """Workers of each EP group (rank order)."""
    schedule: str
    """``sync`` (stock Megatron) or ``smart`` (FasterMoE)."""
    group_size: int
    """Smart-schedule group size s (1 for sync)."""
    layer_ms: float = float("nan")
    """max over groups of one layer call (pi(g) + max_i C_i), fwd + bwd."""
    a2a_ms: float = float("nan")
    """All-to-all part of it (the model's 4 comm_s of the slowest group)."""
    moe_ms: float = float("nan")
    """kappa * layer_ms."""
    allreduce_ms: float = float("nan")
    """T_rho: the expert gradients' all-reduce over the groups."""
    step_ms: float = float("nan")
    """Aristos's objective: moe_ms + allreduce_ms."""
    memory_gib: float = float("nan")
    """describe's memory per GPU with parallel.expert = ep."""
    rejected: Optional[str] = None
    """Why the layout cannot run (memory, config), None when it can."""
    memory: dict[str, Any] = field(default_factory=dict)
    """describe's memory breakdown."""
    kappa: int = 1
    """MoE layer calls per iteration (MoE layers x micro-batches): moe_ms = kappa x layer_ms."""
    allreduce_bytes: float = 0.0
    """S: expert-gradient bytes each worker all-reduces (its E / ep experts x MoE layers)."""

    @property
    def label(self) -> str:
        """Short name, e.g. ``ep=8 packed smart s=2``."""
        sched = "sync" if self.schedule == "sync" else f"smart s={self.group_size}"
        return f"ep={self.ep} {self.grouping} {sched}"

    def to_dict(self) -> dict[str, Any]:
        """JSON-serialisable."""
        d = dataclasses.asdict(self)
        d["label"] = self.label
        return d


def group_sets(topology: Topology, ep: int) -> dict[str, list[list[int]]]:
    """{grouping: groups} for one ep (duplicates dropped)."""
    W = topology.num_workers
    G = W // ep
    order = topology.group_order(ep)
    sets = {"packed": [order[i * ep:(i + 1) * ep] for i in range(G)],
            "strided": [[w for w in range(W) if w % G == g] for g in range(G)]}
    if sorted(map(sorted, sets["strided"])) == sorted(map(sorted, sets["packed"])):
        del sets["strided"]
    return sets


def allreduce_rings(groups: Sequence[Sequence[int]]) -> list[list[int]]:
    """The expert-gradient all-reduce's rings: ring r joins rank r of every group (expert
    data parallel); empty with one group."""
    if len(groups) < 2:
        return []
    return [[int(g[r]) for g in groups] for r in range(len(groups[0]))]


def expert_allreduce_ms(topology: Topology, groups: Sequence[Sequence[int]],
                        grad_bytes: float) -> float:
    """T_rho: ep concurrent rings (:func:`allreduce_rings`), 2 (G-1)/G * S * time of one ring
    step with all rings' edges at once."""
    G = len(groups)
    if G < 2:
        return 0.0
    n = topology.num_workers
    pairs = np.zeros((n, n))
    for ring in allreduce_rings(groups):
        for i, w in enumerate(ring):
            pairs[w, ring[(i + 1) % G]] += 1.0
    return 2.0 * (G - 1) / G * grad_bytes * topology.transfer_time(pairs) * 1e3


def _divisors(n: int) -> list[int]:
    return [d for d in range(1, n + 1) if n % d == 0]


def plan_layouts(cfg: Config, cluster: ClusterSpec, world_size: Optional[int] = None,
                 popularity: Optional[np.ndarray] = None, memory_gib: Optional[float] = None,
                 vocab_size: Optional[int] = None) -> list[Candidate]:
    """Every candidate layout, feasible ones first by predicted step time, then the rejected.

    ``popularity`` [L', E]: per traced layer, the share of tokens each expert receives (from a
    routing trace); default balanced routing. The layer time is the mean over those layers.
    """
    from .. import describe as ds
    from ..routing import zipf_counts

    W = int(world_size or cluster.num_workers)
    m = cluster.workers_per_node
    if W % m or W // m > cluster.nodes:
        raise ValueError(f"world size {W} is not whole nodes of {cluster.name} "
                         f"({cluster.nodes} x {m})")
    topo = Topology(dataclasses.replace(cluster, nodes=W // m))
    if cfg.parallel.tensor != 1 or cfg.parallel.pipeline != 1:
        raise ValueError("the layout planner assumes parallel.tensor = parallel.pipeline = 1")
    cap = memory_gib if memory_gib is not None else cluster.memory_gib
    V, _ = ds.resolve_vocab(cfg, vocab_size)
    s = ds._shapes(cfg)
    H, E, k = s["H"], cfg.moe.num_experts, cfg.moe.topk
    alpha = s["expert"] / (2.0 * H * H)
    tokens = cfg.train.micro_batch_size * cfg.model.seq_length
    moe_layers = sum(ds.moe_layer_pattern(cfg))
    dtype = cfg.train.precision
    smart = cfg.moe.impl == "fastermoe"
    nmb = max(1, cfg.train.global_batch_size // (cfg.train.micro_batch_size * W))
    out: list[Candidate] = []
    for ep in _divisors(W):
        if E % ep:
            continue
        cfg_ep = dataclasses.replace(cfg, parallel=dataclasses.replace(cfg.parallel, expert=ep),
                                     moe=dataclasses.replace(cfg.moe, fastermoe=dataclasses.replace(
                                         cfg.moe.fastermoe, group_size=1)))
        reason, mem = None, {}
        try:
            layout = ds._layout(cfg_ep, W)
            mem = ds.memory_per_gpu(cfg_ep, layout, V)
        except ConfigError as exc:
            reason = f"config: {exc}"
        if reason is None and cap is not None and mem["total_gib"] > cap:
            reason = (f"memory: {mem['total_gib']:.2f} GiB per GPU > {cap:g} GiB (experts "
                      f"{ds._n(mem['expert_params'])} params on each GPU at ep={ep})")
        kappa = moe_layers * nmb
        if popularity is None:
            layer_counts = [zipf_counts(ep, E, tokens, k)]
        else:
            layer_counts = [np.tile(tokens * k * np.asarray(p, dtype=float), (ep, 1))
                            for p in np.atleast_2d(popularity)]
        grad = moe_layers * (E // ep) * s["expert"] * GRAD_BYTES
        scheds = [("smart", g) for g in _divisors(ep)] if smart and ep > 1 else [("sync", 1)]
        for grouping, groups in group_sets(topo, ep).items():
            views = [GroupView(topo, groups, i) for i in range(len(groups))]
            ar = expert_allreduce_ms(topo, groups, grad)
            for sched, g in scheds:
                cand = Candidate(ep=ep, grouping=grouping, groups=groups, schedule=sched,
                                 group_size=g, memory_gib=mem.get("total_gib", float("nan")),
                                 rejected=reason, memory=mem, kappa=kappa,
                                 allreduce_bytes=float(grad))
                worst, a2a = 0.0, 0.0
                for view in views:
                    preds = [predict_layer(c, None, H, alpha, None, view, dtype, schedule=sched,
                                           group_size=g) for c in layer_counts]
                    t = float(np.mean([p.total_s for p in preds]))
                    if t > worst:
                        worst, a2a = t, float(np.mean([4 * p.comm_s for p in preds]))
                cand.layer_ms, cand.a2a_ms = worst * 1e3, a2a * 1e3
                cand.moe_ms = kappa * cand.layer_ms
                cand.allreduce_ms = ar
                cand.step_ms = cand.moe_ms + ar
                out.append(cand)
    out.sort(key=lambda c: (c.rejected is not None, round(c.step_ms, 9), c.ep, c.grouping,
                            c.group_size))
    return out


def why_first(cands: Sequence[Candidate]) -> str:
    """One sentence on why the first feasible candidate beats the next one."""
    ok = [c for c in cands if c.rejected is None]
    if not ok:
        return "no layout fits: " + "; ".join(sorted({c.rejected or "" for c in cands}))
    a = ok[0]
    if len(ok) == 1:
        return f"{a.label} is the only layout that fits"
    b = ok[1]
    parts = []
    if abs(a.moe_ms - b.moe_ms) > 1e-9:
        parts.append(f"MoE layers {a.moe_ms:.2f} vs {b.moe_ms:.2f} ms (all-to-all "
                     f"{a.a2a_ms:.3f} vs {b.a2a_ms:.3f} ms per call)")
    if abs(a.allreduce_ms - b.allreduce_ms) > 1e-9:
        parts.append(f"expert all-reduce {a.allreduce_ms:.2f} vs {b.allreduce_ms:.2f} ms")
    return (f"{a.label} beats {b.label} by {b.step_ms - a.step_ms:.3f} ms per iteration: "
            + ("; ".join(parts)
               or "equal predicted terms (ties: smaller ep, then grouping, then s)")
            + f"; memory {a.memory_gib:.2f} vs {b.memory_gib:.2f} GiB per GPU")


def format_plan(cands: Sequence[Candidate], cluster: ClusterSpec, top: int = 12,
                memory_gib: Optional[float] = None) -> str:
    """The ranked table, the reason for the winner and the rejected layouts (``memory_gib``:
    the cap given to :func:`plan_layouts`, default the cluster's)."""
    ok = [c for c in cands if c.rejected is None]
    bad = [c for c in cands if c.rejected is not None]
    mem = memory_gib if memory_gib is not None else cluster.memory_gib
    cap = f"{mem:g} GiB" if mem else "none (no memory_gib)"
    lines = [f"layout plan on {cluster.name} (Aristos objective: kappa * max_g layer + T_rho; "
             f"memory cap {cap}):",
             f"  {'#':>2} {'layout':<26} {'step ms':>9} {'MoE ms':>9} {'a2a/call':>9} "
             f"{'AR ms':>8} {'GiB/GPU':>8}  groups"]
    for i, c in enumerate(ok[:top]):
        grp = " ".join("{" + ",".join(map(str, g)) + "}" for g in c.groups)
        lines.append(f"  {i + 1:>2} {c.label:<26} {c.step_ms:>9.3f} {c.moe_ms:>9.3f} "
                     f"{c.a2a_ms:>9.4f} {c.allreduce_ms:>8.3f} {c.memory_gib:>8.2f}  "
                     f"{grp if len(grp) < 60 else grp[:57] + '...'}")
    if len(ok) > top:
        lines.append(f"  ... {len(ok) - top} more")
    lines.append("  why: " + why_first(cands))
    seen = set()
    for c in bad:
        key = (c.ep, c.rejected)
        if key not in seen:
            seen.add(key)
            lines.append(f"  rejected ep={c.ep}: {c.rejected}")
    return "\n".join(lines) + "\n"


def plan_layout_cli(cfg: Config, cluster: Optional[str], world_size: Optional[int],
                    trace: Any = True, json_path: Optional[str] = None) -> int:
    """``pretrain_gpt_moe.py --describe --plan-layout [TRACE] --cluster C [--json PATH]``.

    Prints the ranked layouts; ``trace`` (a run directory or trace file; True: none) gives the
    expert popularity per layer (mean over its records) instead of balanced routing. With
    ``json_path`` the candidates are added under ``layout_plan`` to that JSON file (the one
    ``--describe --json`` just wrote, or a new one). Returns the exit code.
    """
    import json
    import sys
    from pathlib import Path

    from ..perf.cluster import ClusterSpecError, load_cluster
    from .locality import expert_popularity
    from .trace import read_trace

    if not cluster:
        sys.stderr.write("--plan-layout needs --cluster NAME_OR_PATH\n")
        return 2
    try:
        spec = load_cluster(cluster)
        pop = None
        if trace is not True and trace:
            tr = read_trace(trace)
            if tr.header.num_experts != cfg.moe.num_experts:
                raise ValueError(f"trace has {tr.header.num_experts} experts, the config "
                                 f"{cfg.moe.num_experts}")
            pop = expert_popularity(tr.counts.astype(float)).mean(axis=0)  # [L, E]
        cands = plan_layouts(cfg, spec, world_size, popularity=pop)
    except (ConfigError, ClusterSpecError, FileNotFoundError, ValueError) as exc:
        sys.stderr.write(f"plan-layout error: {exc}\n")
        return 2
    routing = "balanced routing" if pop is None else f"expert popularity of {trace}"
    sys.stdout.write(f"({routing})\n" + format_plan(cands, spec))
    if json_path:
        out = Path(json_path)
        doc = json.loads(out.read_text()) if out.is_file() else {}
        doc["layout_plan"] = {"cluster": spec.name, "routing": routing,
                              "why": why_first(cands),
                              "candidates": [c.to_dict() for c in cands]}
        out.parent.mkdir(parents=True, exist_ok=True)
        out.write_text(json.dumps(doc, indent=2) + "\n")
    return 0 if any(c.rejected is None for c in cands) else 1
