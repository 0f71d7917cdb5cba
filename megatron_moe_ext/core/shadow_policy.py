"""Dynamic shadowing policy (FasterMoE, PPoPP'22, Section 4.1, Algorithm 1), pure NumPy.

Notation
--------
N        workers; E experts; k = experts_per_worker, expert e lives on worker e // k
counts   [N, E] tokens worker i sends to expert e (all-gathered, identical on every rank)
L_e      per-expert load = sum_i counts[i, e] (column sum over the senders)
B_w      tokens worker w computes; R_w tokens worker w receives for non-shadowed experts
H        hidden size (elements); alpha = ffn_hidden / H; b = bytes per element
P        GEMM throughput (FLOP/s); W_net network bandwidth (bytes/s)

Without shadows (paper):  Lat_imbl = max_w [3 * 4 B_w alpha H^2 / P + 4 * B_w H b / W_net]
With r shadowed experts:  Lat(r)   = max_w [3 * 4 B'_w alpha H^2 / P + 4 * R'_w H b / W_net]
                                     + 2r * 2 alpha H^2 b / W_net

Shadowing expert e moves its remote load back to the senders: every sender i computes its own
counts[i, e] tokens locally, so B'_owner drops by L_e - counts[owner, e], B'_i grows by
counts[i, e], and R'_owner drops by L_e. With no shadows R' = B' = B, so Lat(0) = Lat_imbl:
the comparison is like for like. (The paper's printed Lat_shadow drops the remaining
all-to-all term; comparing that against Lat_imbl would favour shadowing even for perfectly
balanced routing, because the comm term vanishes as soon as one expert is shadowed.)

The public fastmoe implementation sums the gathered counts over the experts axis (tokens *sent*
per worker) instead of over the senders; with equal batch sizes every worker then looks equally
loaded and nothing is ever shadowed. Here L_e is the column sum.
"""

from __future__ import annotations

import logging
from typing import Any, Callable, Optional

import numpy as np

logger = logging.getLogger(__name__)

SHADOW_POLICIES = ("never", "predictor", "model", "top_k")
"""Accepted values of ``moe.fastermoe.shadow.policy``."""

__all__ = ["SHADOW_POLICIES", "pick_shadows", "as_counts", "expert_loads", "lat_imbl", "lat_with_shadows",
           "choose_shadows",
           "choose_shadows_by_cost", "top_k_shadows", "shadow_mask"]


def as_counts(counts: Any) -> np.ndarray:
    """A [N, E] float64 array from a NumPy array, nested lists or a (CPU/GPU) torch tensor."""
    if hasattr(counts, "detach"):
        counts = counts.detach().cpu().numpy()
    c = np.asarray(counts, dtype=np.float64)
    if c.ndim != 2:
        raise ValueError(f"counts must be a [N, E] matrix, got shape {c.shape}")
    if (c < 0).any():
        raise ValueError("counts must be non-negative")
    return c


def expert_loads(counts: Any) -> np.ndarray:
    """L_e = sum over senders i of counts[i, e] (axis 0): the load of each expert."""
    return as_counts(counts).sum(axis=0)


def _owners(num_experts: int, num_workers: int, experts_per_worker: int) -> np.ndarray:
    """owner[e] = e // k, after checking E == N * k."""
    if experts_per_worker < 1 or num_experts != num_workers * experts_per_worker:
        raise ValueError(f"counts has {num_experts} experts, expected N * experts_per_worker = "
                         f"{num_workers} * {experts_per_worker}")
    return np.arange(num_experts) // experts_per_worker


def _latency(comp_tokens: np.ndarray, recv_tokens: np.ndarray, num_shadows: int, H: int,
             alpha: float, dtype_bytes: int, gemm_flops: float, net_bandwidth: float) -> float:
    """max_w[12 B_w alpha H^2 / P + 4 R_w H b / W_net] + 2r * 2 alpha H^2 b / W_net."""
    per_worker = (12.0 * comp_tokens * alpha * H * H / gemm_flops
                  + 4.0 * recv_tokens * H * dtype_bytes / net_bandwidth)
    shadow = 2.0 * num_shadows * 2.0 * alpha * H * H * dtype_bytes / net_bandwidth
    return float(per_worker.max()) + shadow


def _worker_loads(counts: np.ndarray, owner: np.ndarray, num_workers: int) -> np.ndarray:
    """B_w: sum of the loads of the experts worker w owns."""
    return np.bincount(owner, weights=counts.sum(axis=0), minlength=num_workers)


def lat_imbl(counts: Any, experts_per_worker: int, H: int, alpha: float, dtype_bytes: int,
             gemm_flops: float, net_bandwidth: float) -> float:
    """Lat_imbl = max_w [3 * 4 B_w alpha H^2 / P + 4 B_w H b / W_net] (no shadows), seconds."""
    c = as_counts(counts)
    owner = _owners(c.shape[1], c.shape[0], experts_per_worker)
    b = _worker_loads(c, owner, c.shape[0])
    return _latency(b, b, 0, H, alpha, dtype_bytes, gemm_flops, net_bandwidth)


def lat_with_shadows(counts: Any, experts_per_worker: int, shadows: list[int], H: int,
                     alpha: float, dtype_bytes: int, gemm_flops: float,
                     net_bandwidth: float) -> float:
    """Predicted Lat(r) with the experts in ``shadows`` shadowed (Lat(0) == Lat_imbl)."""
    c = as_counts(counts)
    n = c.shape[0]
    owner = _owners(c.shape[1], n, experts_per_worker)
    mask = shadow_mask(c.shape[1], shadows)
    recv = np.bincount(owner, weights=np.where(mask, 0.0, c.sum(axis=0)), minlength=n)
    comp = recv + c[:, mask].sum(axis=1)
    return _latency(comp, recv, len(shadows), H, alpha, dtype_bytes, gemm_flops, net_bandwidth)


def shadow_mask(num_experts: int, shadows: list[int]) -> np.ndarray:
    """Boolean [E] mask with True at the shadowed expert ids."""
    mask = np.zeros(num_experts, dtype=bool)
    mask[list(shadows)] = True
    return mask


def _by_load(loads: np.ndarray) -> list[int]:
    """Expert ids sorted by load descending, ties broken by lower id (deterministic)."""
    return sorted(range(len(loads)), key=lambda e: (-loads[e], e))


def choose_shadows(counts: Any, experts_per_worker: int, H: int, alpha: float,
                   dtype_bytes: int, gemm_flops: float, net_bandwidth: float,
                   max_experts: Optional[int] = None) -> list[int]:
    """Algorithm 1: greedily shadow the most loaded experts while the prediction improves.

    Returns global expert ids in the order chosen. Experts with zero load are never shadowed.
    Pure and deterministic: every worker gets the same answer from the same counts.
    Like the paper's greedy it is myopic: with two equally hot experts on different workers,
    shadowing one alone does not lower the max, so it stops before trying the pair.
    """
    c = as_counts(counts)
    n, num_experts = c.shape
    owner = _owners(num_experts, n, experts_per_worker)
    loads = c.sum(axis=0)
    recv = np.bincount(owner, weights=loads, minlength=n)
    comp = recv.copy()
    best = _latency(comp, recv, 0, H, alpha, dtype_bytes, gemm_flops, net_bandwidth)
    chosen: list[int] = []
    limit = num_experts if max_experts is None else max(0, int(max_experts))
    for e in _by_load(loads):
        if len(chosen) >= limit or loads[e] <= 0:
            break
        o = owner[e]
        new_recv = recv.copy()
        new_recv[o] -= loads[e]
        new_comp = comp + c[:, e]  # every sender computes its own tokens for e ...
        new_comp[o] -= loads[e]  # ... and the owner no longer computes everybody's
        lat = _latency(new_comp, new_recv, len(chosen) + 1, H, alpha, dtype_bytes,
                       gemm_flops, net_bandwidth)
        if not lat < best:
            break
        best, recv, comp = lat, new_recv, new_comp
        chosen.append(int(e))
    logger.debug("choose_shadows: %s (predicted %.3g s)", chosen, best)
    return chosen


def choose_shadows_by_cost(counts: Any, cost: Callable[[list[int]], float],
                           max_experts: Optional[int] = None) -> list[int]:
    """Algorithm 1's greedy with any cost function: add the next most loaded expert while
    ``cost(shadows)`` (e.g. the full performance model's predicted layer time, which knows
    what the smart schedule hides) strictly falls.

    Same order, tie-breaks and stopping rule as :func:`choose_shadows`; experts with zero load
    are never shadowed. Deterministic when ``cost`` is.
    """
    loads = expert_loads(counts)
    best = cost([])
    chosen: list[int] = []
    limit = len(loads) if max_experts is None else max(0, int(max_experts))
    for e in _by_load(loads):
        if len(chosen) >= limit or loads[e] <= 0:
            break
        lat = cost(chosen + [int(e)])
        if not lat < best:
            break
        best = lat
        chosen.append(int(e))
    logger.debug("choose_shadows_by_cost: %s (cost %.3g)", chosen, best)
    return chosen


def top_k_shadows(counts: Any, k: int) -> list[int]:
    """The k most loaded experts (column sums), ties broken by lower id; experts with zero
    load are never picked (shadowing one would cost a broadcast and a reduce for nothing)."""
    loads = expert_loads(counts)
    return [e for e in _by_load(loads)[: max(0, int(k))] if loads[e] > 0]


def pick_shadows(policy: str, counts: Any, max_experts: int,
                 cost: Optional[Callable[[list[int]], float]] = None,
                 algorithm1: Optional[Callable[[np.ndarray], Any]] = None) -> list[int]:
    """The one rule that maps ``moe.fastermoe.shadow.policy`` to a shadow set ([W, E] counts).

    ``never`` (or W < 2): none; ``top_k``: the ``max_experts`` most loaded experts;
    ``model``: :func:`choose_shadows_by_cost` over ``cost`` (the caller's predicted layer time
    of a shadow set); ``predictor``: ``algorithm1(counts)`` (:func:`choose_shadows` with the
    caller's cluster numbers). The FasterMoE layer and the scale lab both choose through it.
    """
    if policy not in SHADOW_POLICIES:
        raise ValueError(f"shadow policy {policy!r} is not one of {', '.join(SHADOW_POLICIES)}")
    c = as_counts(counts)
    if policy == "never" or c.shape[0] < 2:
        return []
    if policy == "top_k":
        return [int(e) for e in top_k_shadows(c, max_experts)]
    if policy == "model":
        if cost is None:
            raise ValueError("shadow policy 'model' needs a cost function")
        return [int(e) for e in choose_shadows_by_cost(c, cost)]
    if algorithm1 is None:
        raise ValueError("shadow policy 'predictor' needs Algorithm 1's cluster numbers")
    return [int(e) for e in algorithm1(c)]
