"""What load imbalance costs one MoE layer, from its routed-token counts: pure functions.

Notation
--------
W        expert-parallel ranks; E experts; E_l = E / W local experts, expert e on rank e // E_l
counts   [W, E] tokens rank w routed to expert e in one iteration (top-k copies included)
L_e      sum_w counts[w, e]: tokens expert e computed
B_w      tokens the experts of rank w computed (after shadowing: plus its own tokens of
         shadowed experts, minus the shadowed experts' tokens it would have received)
C_w      expert compute time of rank w per iteration, forward + backward

Every rank of the layer waits at the combine for the slowest one, so rank w waits
``max_v C_v - C_w``; the layer's imbalance cost is the time of the slowest rank over what the
same work spread evenly would take (``C(mean_w B_w)``). Times come either from measured
forward expert time (``source: measured``; backward is taken as 2x forward, as the performance
model does) or from the loads with :func:`megatron_moe_ext.perf.model.compute_times`
(``source: estimated``).
"""

from __future__ import annotations

from typing import Any, Optional, Sequence

import numpy as np

from megatron_moe_ext.perf.model import (
    compute_times,
    default_placement,
    predict_layer,
    shadowed_loads,
)
from megatron_moe_ext.perf.topology import GemmThroughput, Topology

FWD_BWD = 3.0
"""Forward + backward expert compute in units of the forward (backward = 2x forward)."""


def hot_experts(counts: np.ndarray, top: int) -> tuple[list[list[int]], list[float]]:
    """The `top` experts most above the balanced load L_bar = sum_e L_e / E.

    Returns ([[expert, tokens L_e], ...] hottest first, [share of the total excess
    sum_e max(L_e - L_bar, 0) per listed expert]); experts at or below L_bar are not listed.
    """
    loads = np.asarray(counts, dtype=float).sum(axis=0)
    excess = np.maximum(loads - loads.mean(), 0.0)
    total = float(excess.sum())
    order = np.argsort(-loads, kind="stable")
    chosen = [int(e) for e in order[:top] if excess[e] > 0]
    return ([[e, float(loads[e])] for e in chosen],
            [float(excess[e] / total) for e in chosen])


def imbalance_record(
    counts: np.ndarray,
    H: int,
    alpha: float,
    gemm: GemmThroughput,
    shadows: Sequence[int] = (),
    measured_fwd_s: Optional[Sequence[float]] = None,
    topology: Optional[Topology] = None,
    dtype: str = "fp32",
    dtype_bytes: Optional[int] = None,
    group_size: int = 1,
    top: int = 3,
) -> dict[str, Any]:
    """Imbalance cost record of one layer for one iteration.

    counts [W, E]; H hidden size; alpha = (expert parameters) / (2 H^2); gemm the achieved
    GEMM throughput P (FLOP/s, constant or curve); shadows the shadowed expert ids;
    measured_fwd_s [W] measured forward expert seconds per rank (None: estimate from loads);
    topology, dtype, dtype_bytes, group_size: for ``shadow_saved_s`` by
    :func:`~megatron_moe_ext.perf.model.predict_layer` (smart schedule); without a topology the
    saving is the compute-only difference of the slowest rank.

    Keys: ``rank_tokens`` [W] B_w; ``rank_compute_s`` [W] C_w; ``rank_wait_s`` [W];
    ``imbalance_cost_s``; ``hot_experts`` [[e, L_e]]; ``hot_share`` [share of the excess];
    ``shadow_saved_s`` (0 without shadows); ``source`` ``measured`` | ``estimated``.
    """
    c = np.asarray(counts, dtype=float)
    if c.ndim != 2:
        raise ValueError(f"counts must be [W, E], got shape {c.shape}")
    W, E = c.shape
    placement = default_placement(E, W)
    shadows = sorted({int(e) for e in shadows})
    loads = shadowed_loads(c, placement, W, shadows)
    balanced_load = np.array([float(loads.mean())])
    balanced_model = FWD_BWD * float(compute_times(balanced_load, H, alpha, gemm)[0])
    if measured_fwd_s is not None:
        if len(measured_fwd_s) != W:
            raise ValueError(f"measured_fwd_s has {len(measured_fwd_s)} ranks, counts {W}")
        compute = FWD_BWD * np.asarray(measured_fwd_s, dtype=float)
        balanced = float(compute.mean())  # the same measured work spread evenly
        source = "measured"
    else:
        compute = FWD_BWD * compute_times(loads, H, alpha, gemm)
        balanced = balanced_model
        source = "estimated"
    slowest = float(compute.max()) if W else 0.0
    hot, share = hot_experts(c, top)
    return {
        "rank_tokens": [float(x) for x in loads],
        "rank_compute_s": [float(x) for x in compute],
        "rank_wait_s": [slowest - float(x) for x in compute],
        "imbalance_cost_s": max(0.0, slowest - balanced),
        "hot_experts": hot,
        "hot_share": share,
        "shadow_saved_s": shadow_saving(c, shadows, H, alpha, gemm, topology, dtype,
                                        dtype_bytes, group_size),
        "source": source,
    }


def shadow_saving(counts: np.ndarray, shadows: Sequence[int], H: int, alpha: float,
                  gemm: GemmThroughput, topology: Optional[Topology] = None,
                  dtype: str = "fp32", dtype_bytes: Optional[int] = None,
                  group_size: int = 1) -> float:
    """Seconds per iteration the shadows won back: the layer's predicted fwd + bwd time without
    them minus with them (broadcast and reduce of the shadowed weights included), by the
    performance model on `topology`; without one, the slowest rank's compute difference.
    Negative when shadowing cost more than it saved; 0 without shadows."""
    if not len(shadows):
        return 0.0
    c = np.asarray(counts, dtype=float)
    if topology is not None and topology.num_workers == c.shape[0]:
        kw = dict(dtype=dtype, schedule="smart", group_size=group_size, gemm=gemm)
        without = predict_layer(c, None, H, alpha, dtype_bytes, topology, **kw)
        with_ = predict_layer(c, None, H, alpha, dtype_bytes, topology,
                              shadow_experts=shadows, **kw)
        return float(without.total_s - with_.total_s)
    W, E = c.shape
    placement = default_placement(E, W)
    before = compute_times(shadowed_loads(c, placement, W, ()), H, alpha, gemm).max()
    after = compute_times(shadowed_loads(c, placement, W, shadows), H, alpha, gemm).max()
    return float(FWD_BWD * (before - after))
