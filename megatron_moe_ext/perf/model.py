"""FasterMoE performance model of one MoE layer (PPoPP'22, Sections 3-4), pure functions.

Notation (SI units everywhere: seconds, bytes, FLOP/s, bytes/s)
--------
N        workers; E experts; placement[e] = worker holding expert e (default e // (E / N))
counts   [N, E] tokens worker i sends to expert e (top-k copies included)
T        [N, N] routing matrix: T[i, w] tokens worker i sends to worker w
B_w      sum_i T[i, w]: tokens worker w's experts process
H        hidden size; alpha = ffn_hidden / H; b = bytes per element
P        achieved GEMM throughput of a worker (FLOP/s), constant or a function of tokens
W_l      one-direction bandwidth of directed link l; W_net = slowest NIC
A        one all-to-all (max over links of bytes / W_l); C one forward expert compute

Forward compute of worker w: 4 * B_w * alpha * H^2 / P; backward 2x forward.
All-to-all: max_l (bytes crossing l) / W_l, a token is H * b bytes, self traffic is free.
Synchronous EP: Lat_e2e = 3 * Lat_comp + 4 * Lat_comm.
DDL-Roofline: R_CC = (total compute) / (total communication) of the layer (for sync EP
3 Lat_comp / (4 Lat_comm)), P_bar = 12 alpha H^2 sum_w B_w / (N * Lat_e2e);
ideal P * min(1, R_CC), semi-ideal P * R_CC / (R_CC + 1).
"""

from __future__ import annotations

import functools
import logging
from dataclasses import dataclass, field
from typing import Literal, Optional, Sequence

import numpy as np

from ..core.plan import pipeline_order, step_matrix, validate_group_size
from ..core.tree import TreeSteps, broadcast_steps, reduce_steps
from .linksim import link_pipeline_time
from .topology import GemmThroughput, Topology

logger = logging.getLogger(__name__)

DTYPE_BYTES = {"fp32": 4, "tf32": 4, "bf16": 2, "fp16": 2, "fp8": 1}
"""Bytes per element of the dtypes named in cluster files."""

Schedule = Literal["sync", "smart"]
Simulator = Literal["lockstep", "links"]
SIMULATORS: tuple[str, ...] = ("lockstep", "links")
"""How the smart schedule's pipeline is priced: ``lockstep`` (:func:`simulate_two_stream`:
one all-to-all per step on one FIFO comm stream, C_j the slowest worker's; what the layer's
``model`` shadow policy uses) or ``links`` (:func:`.linksim.link_pipeline_time`: every flow on
its own links, every worker its own compute; validation grade, slower)."""


# --------------------------------------------------------------------------------------
# Routing
# --------------------------------------------------------------------------------------


def default_placement(num_experts: int, num_workers: int) -> np.ndarray:
    """Contiguous placement: expert e on worker e // (E / N); E must be a multiple of N."""
    if num_experts % num_workers:
        raise ValueError(f"{num_experts} experts cannot be split evenly over {num_workers} workers")
    return np.arange(num_experts) // (num_experts // num_workers)


def routing_matrix(counts: np.ndarray, placement: np.ndarray, num_workers: int) -> np.ndarray:
    """T [N, N] from per-expert counts [N, E]: T[i, w] = sum_{e on w} counts[i, e]."""
    c = np.asarray(counts, dtype=float)
    onehot = np.zeros((c.shape[1], num_workers))
    onehot[np.arange(c.shape[1]), np.asarray(placement)] = 1.0
    return c @ onehot


def worker_loads(T: np.ndarray) -> np.ndarray:
    """B_w = sum_i T[i, w] (column sums): tokens processed by worker w."""
    return np.asarray(T, dtype=float).sum(axis=0)


# --------------------------------------------------------------------------------------
# Compute
# --------------------------------------------------------------------------------------


def _flops_at(gemm: GemmThroughput, tokens: np.ndarray) -> np.ndarray:
    """P evaluated for GEMMs over ``tokens`` rows (constant P broadcasts)."""
    if callable(gemm):
        return np.asarray(gemm(tokens), dtype=float)
    return np.full_like(np.asarray(tokens, dtype=float), float(gemm))


def gemm_seconds(flops: float, rows: float, gemm: GemmThroughput) -> float:
    """Time of ``flops`` FLOPs done as GEMMs over ``rows`` rows: flops / P(rows) (0 for none)."""
    if flops <= 0 or rows <= 0:
        return 0.0
    return float(flops) / float(_flops_at(gemm, np.asarray(float(rows))))


def compute_times(loads: np.ndarray, H: int, alpha: float, gemm: GemmThroughput) -> np.ndarray:
    """Forward expert time per worker: 4 * B_w * alpha * H^2 / P (zero for B_w = 0)."""
    b = np.asarray(loads, dtype=float)
    p = _flops_at(gemm, b)
    return np.where(b > 0, 4.0 * b * alpha * H * H / np.where(b > 0, p, 1.0), 0.0)


def compute_time(loads: np.ndarray, H: int, alpha: float, gemm: GemmThroughput) -> float:
    """Lat_comp: the layer's forward compute latency, max over workers."""
    t = compute_times(loads, H, alpha, gemm)
    return float(t.max()) if t.size else 0.0


# --------------------------------------------------------------------------------------
# Communication
# --------------------------------------------------------------------------------------


def traffic_bytes(T: np.ndarray, H: int, dtype_bytes: int) -> np.ndarray:
    """Bytes matrix [N, N] of a token routing matrix; the diagonal (self traffic) is zeroed."""
    t = np.asarray(T, dtype=float) * H * dtype_bytes
    np.fill_diagonal(t, 0.0)
    return t


def all_to_all_time(T: np.ndarray, H: int, dtype_bytes: int, topology: Topology) -> float:
    """One all-to-all of T tokens: max over directed links of bytes crossing it / W_l (and, on a
    ``duplex: half`` transport, over worker pairs of both directions' bytes / bottleneck)."""
    return topology.transfer_time(traffic_bytes(T, H, dtype_bytes))


def ring_allreduce_time(size_bytes: float, workers: Sequence[int], topology: Topology) -> float:
    """Ring all-reduce of S bytes over ``workers`` in the given ring order.

    2(n-1) steps; at each step every worker sends S/n to its ring successor, so the time is
    2(n-1)/n * S * max_l (ring edges crossing l) / W_l.
    """
    ws = list(workers)
    n = len(ws)
    if n < 2:
        return 0.0
    pairs = np.zeros((topology.num_workers, topology.num_workers))
    for k, w in enumerate(ws):
        pairs[w, ws[(k + 1) % n]] += 1.0
    return 2.0 * (n - 1) / n * size_bytes * topology.transfer_time(pairs)


def tree_time(trees: Sequence[tuple[TreeSteps, float]], topology: Topology) -> float:
    """Trees run in lockstep, tree k carrying S_k bytes per message (``trees`` [(steps, S_k)]):
    the sum over steps of moving that step's messages of all trees at once."""
    if not trees:
        return 0.0
    n = topology.num_workers
    total = 0.0
    for s in range(len(trees[0][0])):
        step = np.zeros((n, n))
        for steps, size in trees:
            for src, dst in steps[s]:
                step[src, dst] += size
        total += topology.transfer_time(step)
    return total


def broadcast_time(size_bytes: float, root: int, topology: Topology) -> float:
    """Broadcast of S bytes from ``root`` to all workers over the shadow trees' binomial
    tree (:func:`megatron_moe_ext.core.tree.broadcast_steps`, what ``core.shadow`` runs)."""
    return tree_time([(broadcast_steps(root, topology.num_workers), size_bytes)], topology)


def reduce_time(size_bytes: float, root: int, topology: Topology) -> float:
    """Reduce-sum of S bytes to ``root`` over the reversed tree (``core.tree.reduce_steps``)."""
    return tree_time([(reduce_steps(root, topology.num_workers), size_bytes)], topology)


# --------------------------------------------------------------------------------------
# Schedules
# --------------------------------------------------------------------------------------


def sync_e2e_time(comp: float, comm: float) -> float:
    """Synchronous expert parallelism: 3 * Lat_comp + 4 * Lat_comm."""
    return 3.0 * comp + 4.0 * comm


def smart_schedule_bound(a2a: float, comp: float) -> float:
    """Artifact's fwd+bwd speedup bound (4A + 3C) / (max(2A, C) + max(2A, 2C))."""
    den = max(2 * a2a, comp) + max(2 * a2a, 2 * comp)
    return (4 * a2a + 3 * comp) / den if den > 0 else 1.0


def simulate_two_stream(send: Sequence[float], comp: Sequence[float],
                        ret: Sequence[float]) -> float:
    """Makespan of the two-stream pipeline the executor runs.

    The comm stream runs the operations one after another in
    :func:`megatron_moe_ext.core.plan.pipeline_order` (S_0, S_1, R_0, S_2, R_1, ...); the
    compute stream runs C_0..C_{n-1}; C_j starts after S_j and C_{j-1}, R_j after C_j. So a
    send runs at most one step ahead of the compute (S_{j+2} queues behind R_j). Until
    2026-12-04 the model let the comm stream run every S before any R (the FasterMoE
    artifact's simulator), which the executor never did.
    """
    n = len(send)
    s_end, c_end = np.zeros(n), np.zeros(n)
    t = host = 0.0
    computed = 0
    for kind, j in pipeline_order(n):
        if kind == "S":
            t += send[j]
            s_end[j] = t
            continue
        while computed <= j:  # C_k needs S_k; computes run in order
            host = max(host, s_end[computed]) + comp[computed]
            c_end[computed] = host
            computed += 1
        t = max(t, c_end[j]) + ret[j]
    return float(t)


def smart_symmetric_time(a: float, c: float, n: int) -> float:
    """Closed form of :func:`simulate_two_stream` when all n steps cost a (comm) and c
    (compute), for c <= a or c >= 2a: max(2 n a, 2 a + n c). (Between, the stream's R_j,
    S_{j+2} pairs and the compute alternate in a way without a short form.)"""
    return max(2 * n * a, 2 * a + n * c)


@functools.lru_cache(maxsize=64)
def _step_matrix(world_size: int, group_size: int, order: tuple[int, ...]) -> np.ndarray:
    """:func:`step_matrix` as a read-only [N, N] array, memoized per (N, g, order)."""
    steps = np.asarray(step_matrix(world_size, group_size, order))
    steps.setflags(write=False)
    return steps


def smart_step_traffic(T: np.ndarray, group_size: int, order: Sequence[int]) -> np.ndarray:
    """[n, N, N] tokens moved at each step j of the smart schedule: T[i, w] at the step
    :func:`megatron_moe_ext.core.plan.step_matrix` gives for the pair (i, w), 0 elsewhere.

    The steps come from core/plan.py, the description the executor runs (``build_plan``).
    """
    t = np.asarray(T, dtype=float)
    steps = _step_matrix(t.shape[0], group_size, tuple(int(w) for w in order))
    n = t.shape[0] // group_size
    return np.where(steps[None, :, :] == np.arange(n)[:, None, None], t[None, :, :], 0.0)


@dataclass(frozen=True)
class SmartTimes:
    """Per-step costs and makespans of the smart schedule."""

    send_s: tuple[float, ...]
    """S_j: all-to-all time of step j's input tokens."""
    comp_s: tuple[float, ...]
    """C_j: forward compute of step j (max over workers)."""
    ret_s: tuple[float, ...]
    """R_j: all-to-all time of step j's outputs going back."""
    fwd_s: float
    """Forward makespan of the pipeline (priced by ``simulator``)."""
    bwd_s: float
    """Backward makespan (same pattern, 2x compute)."""
    simulator: str = "lockstep"
    """Which of :data:`SIMULATORS` priced ``fwd_s`` and ``bwd_s``."""


def smart_schedule_times(T: np.ndarray, H: int, alpha: float, dtype_bytes: int,
                         topology: Topology, gemm: GemmThroughput, group_size: int,
                         order: Optional[Sequence[int]] = None,
                         local_extra: Optional[np.ndarray] = None,
                         simulator: Simulator = "lockstep") -> SmartTimes:
    """Simulate the grouped pairwise exchange (n = N / g steps) forward and backward.

    ``order`` defaults to ``topology.group_order(g)``; ``local_extra`` [N] are tokens each
    worker computes locally at step 0 (e.g. its own tokens for shadowed experts). A group size
    that does not divide N is a ValueError naming ``moe.fastermoe.group_size``. The per-step
    costs are the same for both :data:`SIMULATORS`; only the makespans differ.
    """
    if simulator not in SIMULATORS:
        raise ValueError(f"simulator must be one of {SIMULATORS}, got {simulator!r}")
    g = group_size
    validate_group_size(topology.num_workers, g)  # g must divide N: no silent clamping
    order = topology.group_order(g) if order is None else list(order)
    traffic = smart_step_traffic(T, g, order)
    sends, comps, rets, per_worker = [], [], [], []
    for j, tj in enumerate(traffic):
        loads = worker_loads(tj)
        if j == 0 and local_extra is not None:
            loads = loads + np.asarray(local_extra, dtype=float)
        sends.append(all_to_all_time(tj, H, dtype_bytes, topology))
        rets.append(all_to_all_time(tj.T, H, dtype_bytes, topology))
        per_worker.append(compute_times(loads, H, alpha, gemm))
        comps.append(float(per_worker[-1].max()) if per_worker[-1].size else 0.0)
    if simulator == "links":
        nbytes = np.stack([traffic_bytes(tj, H, dtype_bytes) for tj in traffic])
        cw = np.stack(per_worker)
        fwd = link_pipeline_time(nbytes, cw, topology)
        bwd = link_pipeline_time(nbytes, 2 * cw, topology)
    else:
        fwd = simulate_two_stream(sends, comps, rets)
        bwd = simulate_two_stream(sends, [2 * c for c in comps], rets)
    return SmartTimes(send_s=tuple(sends), comp_s=tuple(comps), ret_s=tuple(rets),
                      fwd_s=fwd, bwd_s=bwd, simulator=simulator)


# --------------------------------------------------------------------------------------
# Shadowing
# --------------------------------------------------------------------------------------


def shadowed_routing(counts: np.ndarray, placement: np.ndarray, num_workers: int,
                     shadow_experts: Sequence[int]) -> tuple[np.ndarray, np.ndarray]:
    """(T', local) after shadowing: T' routes only non-shadowed experts' tokens; local[w] are
    the tokens worker w computes itself for shadowed experts (its own row of counts)."""
    c = np.asarray(counts, dtype=float)
    mask = np.zeros(c.shape[1], dtype=bool)
    mask[list(shadow_experts)] = True
    routed = np.where(mask[None, :], 0.0, c)
    local = c[:, mask].sum(axis=1)
    return routing_matrix(routed, placement, num_workers), local


def shadowed_loads(counts: np.ndarray, placement: np.ndarray, num_workers: int,
                   shadow_experts: Sequence[int]) -> np.ndarray:
    """B'_w: tokens worker w processes once ``shadow_experts`` are shadowed."""
    t, local = shadowed_routing(counts, placement, num_workers, shadow_experts)
    return worker_loads(t) + local


def expert_param_bytes(H: int, alpha: float, dtype_bytes: int) -> float:
    """Bytes of one expert MLP's parameters: 2 alpha H^2 elements."""
    return 2.0 * alpha * H * H * dtype_bytes


def shadow_comm_time_simple(num_shadows: int, H: int, alpha: float, dtype_bytes: int,
                            net_bandwidth: float) -> float:
    """Paper form: 2r * 2 alpha H^2 * b / W_net (broadcast params + reduce grads)."""
    return 2.0 * num_shadows * expert_param_bytes(H, alpha, dtype_bytes) / net_bandwidth


def shadow_comm_times(shadow_experts: Sequence[int], placement: np.ndarray, H: int,
                      alpha: float, dtype_bytes: int, topology: Topology) -> tuple[float, float]:
    """(broadcast, reduce) times of the shadowed experts, as ``core.shadow`` runs them: one
    binomial tree per owner (carrying all of that owner's shadowed experts), every owner's
    tree in lockstep (:func:`tree_time`)."""
    size = expert_param_bytes(H, alpha, dtype_bytes)
    n = topology.num_workers
    per_owner: dict[int, int] = {}
    for e in shadow_experts:
        owner = int(np.asarray(placement)[e])
        per_owner[owner] = per_owner.get(owner, 0) + 1
    bcast = tree_time([(broadcast_steps(o, n), k * size) for o, k in per_owner.items()],
                      topology)
    red = tree_time([(reduce_steps(o, n), k * size) for o, k in per_owner.items()], topology)
    return bcast, red


# --------------------------------------------------------------------------------------
# Roofline and the layer prediction
# --------------------------------------------------------------------------------------


def useful_flops(total_tokens: float, H: int, alpha: float) -> float:
    """FLOPs of fwd+bwd expert work: 12 alpha H^2 per token."""
    return 12.0 * alpha * H * H * total_tokens


def roofline_throughput(total_tokens: float, H: int, alpha: float, num_workers: int,
                        e2e_s: float) -> float:
    """P_bar = 12 alpha H^2 sum_w B_w / (N * Lat_e2e), FLOP/s per worker."""
    return useful_flops(total_tokens, H, alpha) / (num_workers * e2e_s) if e2e_s > 0 else 0.0


def ideal_throughput(peak: float, r_cc: np.ndarray | float) -> np.ndarray | float:
    """Ideal (perfect overlap) line: P * min(1, R_CC)."""
    return peak * np.minimum(1.0, r_cc)


def semi_ideal_throughput(peak: float, r_cc: np.ndarray | float) -> np.ndarray | float:
    """Semi-ideal (no overlap) line: P * R_CC / (R_CC + 1)."""
    r = np.asarray(r_cc, dtype=float)
    out = np.where(np.isinf(r), peak, peak * r / (r + 1.0))
    return float(out) if out.ndim == 0 else out


@dataclass(frozen=True)
class LayerPrediction:
    """Predicted latencies of one MoE layer (fwd + bwd)."""

    fwd_s: float
    """Forward latency, including the broadcast of shadowed experts."""
    bwd_s: float
    """Backward latency, including the reduce of shadowed experts' gradients."""
    total_s: float
    """fwd_s + bwd_s (Lat_e2e)."""
    comp_s: float
    """Lat_comp: forward compute, max over workers of 4 B'_w alpha H^2 / P."""
    comm_s: float
    """Lat_comm: one all-to-all of the routed traffic (mean of dispatch and combine)."""
    shadow_comm_s: float
    """Broadcast + reduce of shadowed experts (0 without shadows)."""
    r_cc: float
    """R_CC = 3 comp_s / (4 comm_s + shadow_comm_s) (inf without communication)."""
    throughput: float
    """P_bar, useful FLOP/s per worker."""
    peak_flops: float
    """P of the cluster for the dtype (at the mean load when P is a curve)."""
    loads: tuple[float, ...]
    """B'_w per worker after shadowing."""
    schedule: str
    """``sync`` or ``smart``."""
    group_size: int
    """Smart-schedule group size (1 for sync)."""
    shadow_experts: tuple[int, ...] = ()
    """Shadowed global expert ids."""
    steps: Optional[SmartTimes] = field(default=None, compare=False)
    """Per-step costs of the smart schedule."""

    @property
    def imbalance(self) -> float:
        """max_w B'_w / mean_w B'_w (1 = balanced)."""
        mean = float(np.mean(self.loads)) if self.loads else 0.0
        return max(self.loads) / mean if mean > 0 else 1.0


def predict_layer(counts: np.ndarray, placement: Optional[np.ndarray], H: int, alpha: float,
                  dtype_bytes: Optional[int], topology: Topology, dtype: str = "fp32",
                  schedule: Schedule = "sync", group_size: int = 1,
                  shadow_experts: Sequence[int] = (),
                  shadow_comm: Literal["topology", "simple"] = "topology",
                  gemm: Optional[GemmThroughput] = None,
                  simulator: Simulator = "lockstep") -> LayerPrediction:
    """Predict fwd/bwd latency of one MoE layer on ``topology``.

    counts [N, E]; placement [E] (None: contiguous); dtype_bytes None: from ``dtype``;
    ``gemm`` overrides the cluster's P (a constant or an efficiency curve); ``simulator``
    prices the smart schedule (:data:`SIMULATORS`; sync ignores it).
    sync: fwd = bcast + A_d + C + A_c, bwd = A_d + 2C + A_c + reduce.
    smart: the two-stream pipeline of :func:`smart_schedule_times` with shadows' local compute
    folded into step 0; broadcast/reduce stay serial before/after.
    """
    n = topology.num_workers
    c = np.asarray(counts, dtype=float)
    if c.ndim != 2 or c.shape[0] != n:
        raise ValueError(f"counts must be [N={n}, E], got shape {c.shape}")
    placement = default_placement(c.shape[1], n) if placement is None else np.asarray(placement)
    b = DTYPE_BYTES[dtype] if dtype_bytes is None else dtype_bytes
    p = topology.gemm_throughput(dtype) if gemm is None else gemm
    shadows = tuple(int(e) for e in shadow_experts)
    t_routed, local = shadowed_routing(c, placement, n, shadows)
    loads = worker_loads(t_routed) + local
    comp = compute_time(loads, H, alpha, p)
    dispatch = all_to_all_time(t_routed, H, b, topology)
    combine = all_to_all_time(t_routed.T, H, b, topology)
    if not shadows:
        bcast = red = 0.0
    elif shadow_comm == "simple":
        bcast = red = shadow_comm_time_simple(len(shadows), H, alpha, b,
                                              topology.net_bandwidth()) / 2
    else:
        bcast, red = shadow_comm_times(shadows, placement, H, alpha, b, topology)
    steps = None
    if schedule == "sync":
        g = 1
        fwd = bcast + dispatch + comp + combine
        bwd = dispatch + 2 * comp + combine + red
    elif schedule == "smart":
        g = group_size
        steps = smart_schedule_times(t_routed, H, alpha, b, topology, p, g, local_extra=local,
                                     simulator=simulator)
        fwd, bwd = bcast + steps.fwd_s, steps.bwd_s + red
    else:
        raise ValueError(f"schedule must be 'sync' or 'smart', got {schedule!r}")
    comm = (dispatch + combine) / 2
    denom = 4 * comm + bcast + red
    r_cc = 3 * comp / denom if denom > 0 else float("inf")
    total_tokens = float(c.sum())
    peak = float(_flops_at(p, np.array(total_tokens / n)))
    pred = LayerPrediction(
        fwd_s=fwd, bwd_s=bwd, total_s=fwd + bwd, comp_s=comp, comm_s=comm,
        shadow_comm_s=bcast + red, r_cc=r_cc,
        throughput=roofline_throughput(total_tokens, H, alpha, n, fwd + bwd),
        peak_flops=peak, loads=tuple(float(x) for x in loads), schedule=schedule,
        group_size=g, shadow_experts=shadows, steps=steps,
    )
    logger.debug("predict_layer %s g=%d shadows=%s: %.3g s", schedule, g, shadows, pred.total_s)
    return pred
