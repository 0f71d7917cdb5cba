"""Pure pieces of the scale lab: cluster / topology for W workers, dilation, routing, shadows.

Notation
--------
W      workers of the run (expert-parallel size); M workers per node of the cluster
E      experts (a multiple of W); T tokens per worker before top-k; k top-k
counts [W, E] tokens worker w sends to expert e (identical on every rank)
D      time dilation: lab seconds per cluster second
"""

from __future__ import annotations

import logging
import os
from typing import Callable, Optional, Sequence

import numpy as np

from ..core.gate import cap_offnode, offnode_limit, topology_offnode_fraction
from ..core.shadow_policy import choose_shadows, pick_shadows
from ..perf.model import DTYPE_BYTES, LayerPrediction, predict_layer
from ..perf.topology import ClusterSpecError, Topology, ep_topology, is_stand_in, load_cluster
from ..routing import zipf_expert_counts

logger = logging.getLogger(__name__)

__all__ = [
    "EMULATION_CLUSTER_ENV", "EMULATION_CLUSTER_FILE_ENV", "EMULATION_SCALE_ENV",
    "emulator_scale",
    "default_cluster", "resolve_dilation", "lab_topology", "lab_counts", "select_shadows",
    "score_counts", "iteration_counts",
    "predict", "layer_transition", "route_above",
]

EMULATION_SCALE_ENV = "MMX_EMULATION_SCALE"
"""Set by the cluster emulator (:meth:`EmulatedCluster.env_for`) in every launched process:
the factor applied to every link bandwidth."""
EMULATION_CLUSTER_ENV = "MMX_EMULATION_CLUSTER"
"""Set by the cluster emulator: the emulated cluster's name (a file of configs/clusters/)."""
EMULATION_CLUSTER_FILE_ENV = "MMX_EMULATION_CLUSTER_FILE"
"""Set by the cluster emulator when it knows the YAML it emulates (takes precedence)."""



def emulator_scale() -> Optional[float]:
    """The emulator's link scale when this process runs under it, else None."""
    raw = os.environ.get(EMULATION_SCALE_ENV)
    if raw is None:
        return None
    scale = float(raw)
    if not scale > 0:
        raise ValueError(f"{EMULATION_SCALE_ENV}={raw!r} set by the emulator is not > 0")
    return scale


def default_cluster(fallback: str) -> str:
    """The emulated cluster under the emulator (so accelerators, prediction and shadow
    policies use its numbers), else ``fallback``."""
    return (os.environ.get(EMULATION_CLUSTER_FILE_ENV) or os.environ.get(EMULATION_CLUSTER_ENV)
            or fallback)


def resolve_dilation(value: str | float) -> tuple[float, str]:
    """(D, how it was chosen) for ``--dilation auto|D``.

    ``auto``: 1 / the emulator's link scale under the emulator (compute and links are dilated
    alike), else 1.
    """
    if isinstance(value, str) and value == "auto":
        scale = emulator_scale()
        if scale is None:
            return 1.0, "auto: not under the emulator"
        return 1.0 / scale, f"auto: 1 / emulator link scale {scale:g}"
    try:
        d = float(value)
    except ValueError:
        raise ValueError(f"--dilation: expected 'auto' or a number, got {value!r}") from None
    if not d > 0:
        raise ValueError(f"--dilation must be > 0, got {value!r}")
    return d, "given"


def lab_topology(cluster: str, num_workers: int,
                 workers_per_node: Optional[int] = None) -> Topology:
    """The model's topology for W workers (:func:`perf.topology.ep_topology`: the cluster, or
    its first W / M nodes), never the one-switch stand-in: the lab emulates real layouts.

    ``workers_per_node`` (torchrun's LOCAL_WORLD_SIZE under the emulator) must equal the
    cluster's M, so that emulated nodes and modelled nodes coincide.
    """
    spec = load_cluster(cluster)
    m = spec.workers_per_node
    if workers_per_node is not None and workers_per_node != m:
        raise ClusterSpecError(
            f"{spec.name}: the run has {workers_per_node} workers per node, the cluster {m}; "
            f"the lab needs the cluster's layout (emulate_cluster.py --workers-per-node {m})")
    topo = ep_topology(cluster, num_workers)
    if is_stand_in(topo):
        raise ClusterSpecError(
            f"{spec.name}: {num_workers} workers are not whole nodes of {m} within its "
            f"{spec.nodes} nodes; the lab runs only real layouts of the cluster")
    return topo


def lab_counts(num_workers: int, num_experts: int, tokens: int, topk: int, skew: float,
               seed: int, iteration: int = 0, vary: bool = False) -> np.ndarray:
    """Routing counts [W, E] of one layer call, identical on every rank.

    The benchmark's law (:func:`megatron_moe_ext.routing.zipf_expert_counts`: exact counts,
    expert 0 hottest, every worker the same counts). With ``vary`` the experts' popularity
    ranks are a permutation drawn from (``seed``, ``iteration``), so the hot experts move
    from iteration to iteration.
    """
    if not 1 <= topk <= num_experts or num_experts % num_workers:
        raise ValueError(f"need 1 <= topk <= E and E % W == 0 (E={num_experts}, "
                         f"W={num_workers}, topk={topk})")
    row = zipf_expert_counts(tokens, num_experts, topk, skew)
    if vary and skew > 0:
        row = row[np.random.default_rng([seed, iteration]).permutation(num_experts)]
    return np.tile(row.astype(np.int64), (num_workers, 1))


def _popularity(num_experts: int, seed: int, iteration: int, vary: bool) -> np.ndarray:
    """Popularity rank of every expert: identity (expert 0 hottest), or the permutation of
    :func:`lab_counts` with ``vary``."""
    if not vary:
        return np.arange(num_experts, dtype=float)
    # lab_counts gives expert e the count of rank perm[e]
    return np.random.default_rng([seed, iteration]).permutation(num_experts).astype(float)


def score_counts(topology: Topology, num_experts: int, tokens: int, topk: int, skew: float,
                 seed: int, iteration: int = 0, vary: bool = False,
                 gate: bool = False) -> np.ndarray:
    """Counts [W, E] from per-token router scores, with or without the topology-aware gate.

    Every worker's T tokens get scores = softmax(-skew log(rank_e + 1) + Gumbel noise) over
    experts (popularity ranks as in :func:`lab_counts`, so the same experts are hot); plain
    top-k, or
    :func:`core.gate.cap_offnode` with L = floor(f T k) (the product's gate; dropped copies
    are not counted). Identical on every rank (each rank draws every worker's scores).
    """
    import torch

    w, m = topology.num_workers, topology.workers_per_node
    if num_experts % w:
        raise ValueError(f"E={num_experts} must be a multiple of W={w}")
    popularity = _popularity(num_experts, seed, iteration, vary)
    expert_node = torch.as_tensor(np.arange(num_experts) // (num_experts // w) // m)
    limit = offnode_limit(tokens * topk, topology_offnode_fraction(topology)) if gate else None
    rows = []
    for worker in range(w):
        g = np.random.default_rng([seed, iteration if vary else 0, worker + 1, 7])
        logits = -float(skew) * np.log(popularity + 1.0) + g.gumbel(size=(tokens, num_experts))
        scores = torch.softmax(torch.as_tensor(logits), dim=1)
        if gate:
            idx = cap_offnode(scores, topk, expert_node, worker // m, limit).indices
        else:
            idx = torch.topk(scores, topk, dim=1).indices
        idx = idx[idx >= 0]
        rows.append(np.bincount(idx.numpy(), minlength=num_experts))
    return np.stack(rows).astype(np.int64)


def iteration_counts(topology: Topology, num_workers: int, num_experts: int, tokens: int,
                     topk: int, skew: float, seed: int, iteration: int, vary: bool,
                     routing: str, gate: bool) -> np.ndarray:
    """[W, E] counts of one lab layer call: through router scores (:func:`score_counts`,
    with the gate when ``gate``) when ``routing`` is ``scores``, else exact
    (:func:`lab_counts`). The lab run and :func:`.validate.repredict` both route here."""
    if routing == "scores":
        return score_counts(topology, num_experts, tokens, topk, skew, seed, iteration, vary,
                            gate)
    return lab_counts(num_workers, num_experts, tokens, topk, skew, seed, iteration, vary)


def predict(counts: np.ndarray, topology: Topology, hidden: int, ffn: int, dtype: str,
            schedule: str, group_size: int = 1, shadows: Sequence[int] = (),
            simulator: str = "lockstep") -> LayerPrediction:
    """perf.model.predict_layer of one lab layer call (contiguous expert placement);
    ``simulator`` prices the smart schedule (``perf.model.SIMULATORS``)."""
    return predict_layer(np.asarray(counts, dtype=float), None, hidden, ffn / hidden,
                         DTYPE_BYTES[dtype], topology, dtype=dtype, schedule=schedule,
                         group_size=group_size, shadow_experts=list(shadows),
                         simulator=simulator)


def predict_impl(counts: np.ndarray, topology: Topology, hidden: int, ffn: int, dtype: str,
                 impl: str, group_size: int, shadows: Sequence[int] = (),
                 simulator: str = "lockstep") -> LayerPrediction:
    """:func:`predict` of one implementation's layer call, the one rule from an
    implementation to the model's inputs: ``megatron`` is the synchronous schedule (no group,
    no shadows), ``fastermoe`` the smart schedule with its group size (at most the number of
    workers) and its shadows. The lab run and :func:`.validate.repredict` both price here."""
    if impl not in ("megatron", "fastermoe"):
        raise ValueError(f"impl must be megatron or fastermoe, got {impl!r}")
    if impl == "megatron":
        return predict(counts, topology, hidden, ffn, dtype, "sync", 1, (), simulator)
    g = min(group_size, np.asarray(counts).shape[0])
    return predict(counts, topology, hidden, ffn, dtype, "smart", g, shadows, simulator)


def select_shadows(policy: str, counts: np.ndarray, topology: Topology, hidden: int, ffn: int,
                   dtype: str, group_size: int, max_experts: int = 1,
                   cost: Optional[Callable[[list[int]], float]] = None) -> list[int]:
    """Experts to shadow through ``core.shadow_policy.pick_shadows``, the rule the FasterMoE
    layer uses, with this topology's numbers.

    ``predictor``: Algorithm 1 with the cluster's P and W_net; ``model``: the greedy over the
    full model's predicted smart-schedule layer time (``cost`` overrides it); ``top_k``: the
    ``max_experts`` most loaded experts.
    """
    c = np.asarray(counts, dtype=float)
    w = c.shape[0]

    def model_cost(s: list[int]) -> float:
        return predict(c, topology, hidden, ffn, dtype, "smart", group_size, s).total_s

    def algorithm1(c: np.ndarray) -> list[int]:
        p = topology.gemm_throughput(dtype)
        p = float(p(np.asarray(c.sum() / w))) if callable(p) else float(p)
        return choose_shadows(c, c.shape[1] // w, H=hidden, alpha=ffn / hidden,
                              dtype_bytes=DTYPE_BYTES[dtype], gemm_flops=p,
                              net_bandwidth=topology.net_bandwidth())

    return pick_shadows(policy, c, max_experts, cost=cost or model_cost, algorithm1=algorithm1)


def layer_transition(num_experts: int, seed: int) -> np.ndarray:
    """sigma: the fixed expert permutation between the layer below and the benchmarked layer
    (``--prefetch previous_layer``): a copy routed to e below goes to sigma[e] above."""
    return np.random.default_rng([seed, 17]).permutation(num_experts)


def route_above(rows_below: np.ndarray, sigma: np.ndarray, rank: int
                ) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """(counts above [W, E], this rank's copies' experts below [n, 1], above [n, 1]) when
    every copy to e below goes to sigma[e] above (the same copies, so a transition
    predictor can observe the pairs)."""
    above = np.zeros_like(rows_below)
    above[:, sigma] = rows_below
    idx = np.repeat(np.arange(rows_below.shape[1]), rows_below[rank])[:, None]
    return above, idx, sigma[idx]
