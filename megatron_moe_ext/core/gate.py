"""The capping rule of the FasterMoE topology-aware gate (He et al., PPoPP'22, Section 4.3).

Plain PyTorch: no Megatron, no process group. The router in
``megatron_moe_ext/megatron/router.py`` calls :func:`cap_offnode` once per forward with the
scores of the tokens this worker holds.

Notation
--------
T        tokens held by this worker in one forward (one micro-batch of one MoE layer)
E        experts in total; ``expert_node[e]`` is the node that hosts expert e
k        top-k: expert choices per token; a token never picks the same expert twice
B        routed token copies of this worker, B = T * k
M        workers per node
W_net    bandwidth of a node's network interface(s) to the other nodes
W_local  bandwidth of a worker's links inside its node
f        off-node fraction, f = W_net / (M * W_local), clamped to (0, 1]
L        off-node limit, L = floor(f * B): at most L of this worker's copies leave its node

The rule
--------
1. Every token picks its plain top-k experts by ``selection`` (descending). A copy whose expert
   is on another node *wants* to go off-node; call their number ``wanted``.
2. If ``wanted <= L`` nothing changes. Otherwise the L off-node copies with the highest
   ``scores`` go (ties: lower token index, then lower slot), the other ``wanted - L`` are
   *rejected*.
3. Each rejected copy re-selects among the experts of the local node that the token has not
   chosen yet, in ``selection`` order (ties: lower expert index): a token's j-th rejected copy
   (in slot order) takes its j-th best such expert. If the local node has no free expert left
   for it (only possible when the local node hosts fewer than k experts) the copy is *dropped*:
   its index is -1.

``scores`` are the post score-function values (softmax or sigmoid), which are comparable
across tokens; ``selection`` is what the token's own ordering uses (Megatron's top-k key, e.g.
the logits for softmax-after-top-k) and defaults to ``scores``. Both orderings agree up to
rounding. The result equals ``torch.topk(selection, k)`` whenever ``wanted <= L``.
"""

from __future__ import annotations

import math
from typing import TYPE_CHECKING, NamedTuple, Optional

import torch

if TYPE_CHECKING:
    from ..perf.topology import Topology

__all__ = ["GateResult", "cap_offnode", "offnode_fraction", "offnode_limit", "to_routing_map",
           "topology_offnode_fraction"]


class GateResult(NamedTuple):
    """What :func:`cap_offnode` decided for one worker's tokens."""

    indices: torch.Tensor
    """[T, k] long: chosen experts per token; -1 marks a dropped copy."""
    scores: torch.Tensor
    """[T, k]: ``scores`` of the chosen experts (0 for a dropped copy)."""
    offnode: torch.Tensor
    """[T, k] bool: the chosen expert is on another node (these are the copies that were sent)."""
    wanted: torch.Tensor
    """0-d long: copies whose plain top-k expert is off-node."""
    sent: torch.Tensor
    """0-d long: copies sent off-node, min(wanted, L)."""
    rerouted: torch.Tensor
    """0-d long: rejected copies that moved to a local-node expert."""
    dropped: torch.Tensor
    """0-d long: rejected copies that found no free local-node expert."""


def offnode_fraction(w_net: float, w_local: float, workers_per_node: int) -> float:
    """f = W_net / (M * W_local), clamped to at most 1 (bandwidths in the same unit)."""
    if w_net <= 0 or w_local <= 0 or workers_per_node < 1:
        raise ValueError(
            f"offnode_fraction needs positive bandwidths and workers_per_node >= 1, got "
            f"w_net={w_net}, w_local={w_local}, workers_per_node={workers_per_node}"
        )
    return min(1.0, w_net / (workers_per_node * w_local))


def topology_offnode_fraction(topology: "Topology") -> float:
    """f of a cluster (:func:`offnode_fraction`): W_net is a node's aggregate NIC bandwidth
    (the sum of its NICs: the paper's single NIC, or one per GPU on DGX-like nodes); W_local
    is the slowest bottleneck between two workers of one node (a worker's worst intra-node
    path). A single-node cluster has no network: f = 1 (no cap). One worker per node leaves
    W_local undefined: a ValueError."""
    spec, m = topology.spec, topology.workers_per_node
    if spec.nodes == 1 or not spec.nics:
        return 1.0
    if m == 1:
        raise ValueError(f"cluster {spec.name!r} has one worker per node: W_local is undefined")
    w_net = sum(nic.bandwidth for nic in spec.nics)
    w_local = min(min(ln.bandwidth for ln in topology.path(a, b))
                  for a in range(m) for b in range(m) if a != b)
    return offnode_fraction(w_net, w_local, m)


def offnode_limit(tokens: int, fraction: float) -> int:
    """L = floor(fraction * tokens): how many of ``tokens`` routed copies may leave the node.

    ``tokens`` is B, the routed token copies (tokens x top-k). A tiny epsilon keeps exact
    products (0.25 * 8 = 2) from rounding down."""
    if tokens < 0:
        raise ValueError(f"tokens must be >= 0, got {tokens}")
    if not 0.0 <= fraction <= 1.0:
        raise ValueError(f"fraction must be in [0, 1], got {fraction}")
    return min(tokens, int(math.floor(fraction * tokens + 1e-9)))


def _count(x: torch.Tensor) -> torch.Tensor:
    return x.sum().to(torch.long)


def cap_offnode(
    scores: torch.Tensor,
    topk: int,
    expert_node: torch.Tensor,
    local_node: int,
    limit: int,
    selection: Optional[torch.Tensor] = None,
) -> GateResult:
    """Top-k selection with at most ``limit`` copies leaving ``local_node`` (see module doc).

    Args:
        scores: [T, E] post score-function scores; rank the off-node copies across tokens.
        topk: k, 1 <= k <= E.
        expert_node: [E] integer node of every expert.
        local_node: node of this worker.
        limit: L >= 0, the most copies that may go to experts on other nodes.
        selection: [T, E] per-token ordering key (default: ``scores``).

    Returns a :class:`GateResult`. Gradients do not flow through the indices; callers gather
    the probabilities they need from their own differentiable tensors. No host sync happens
    inside (counts stay 0-d tensors), except the static shape checks.
    """
    if scores.dim() != 2:
        raise ValueError(f"scores must be [T, E], got shape {tuple(scores.shape)}")
    num_tokens, num_experts = scores.shape
    if not 1 <= topk <= num_experts:
        raise ValueError(f"topk={topk} must be in [1, E={num_experts}]")
    if expert_node.shape != (num_experts,):
        raise ValueError(f"expert_node must be [E={num_experts}], got {tuple(expert_node.shape)}")
    if limit < 0:
        raise ValueError(f"limit must be >= 0, got {limit}")
    selection = scores if selection is None else selection
    if selection.shape != scores.shape:
        raise ValueError("selection must have the shape of scores")

    with torch.no_grad():
        device = scores.device
        expert_node = expert_node.to(device=device, dtype=torch.long)
        is_local = expert_node == local_node  # [E]
        # 1. plain top-k (exactly Megatron's torch.topk on the selection key)
        _, top_idx = torch.topk(selection, k=topk, dim=1)  # [T, k]
        off = ~is_local[top_idx]  # [T, k]
        wanted = _count(off)
        zero = torch.zeros((), dtype=torch.long, device=device)
        if limit >= num_tokens * topk:  # nothing can exceed the limit: plain top-k
            return GateResult(top_idx, scores.gather(1, top_idx), off, wanted, wanted, zero, zero)

        # 2. keep the `limit` highest-scored off-node copies; reject the rest
        flat_scores = scores.gather(1, top_idx).reshape(-1)
        order = torch.argsort(flat_scores, descending=True, stable=True)  # [T*k]
        off_sorted = off.reshape(-1)[order]
        keep_sorted = off_sorted & (torch.cumsum(off_sorted.to(torch.long), 0) <= limit)
        kept = torch.zeros_like(off_sorted).scatter(0, order, keep_sorted).view_as(off)
        rejected = off & ~kept  # [T, k]

        # 3. rejected copies re-select among the local node's experts the token has not chosen
        available = is_local.unsqueeze(0).expand(num_tokens, -1).clone()  # [T, E]
        available.scatter_(1, top_idx, False)
        by_key = torch.argsort(selection, dim=1, descending=True, stable=True)  # [T, E]
        avail_sorted = available.gather(1, by_key)
        first = torch.argsort((~avail_sorted).to(torch.int32), dim=1, stable=True)
        candidates = by_key.gather(1, first)[:, :topk]  # [T, k], valid while < n_avail
        n_avail = available.sum(dim=1, keepdim=True)  # [T, 1]
        nth = torch.cumsum(rejected.to(torch.long), dim=1) - 1  # j-th rejected copy of a token
        nth = nth.clamp(min=0)
        replacement = candidates.gather(1, nth)
        has_free = nth < n_avail
        indices = torch.where(
            rejected, torch.where(has_free, replacement, torch.full_like(replacement, -1)), top_idx
        )
        chosen_scores = scores.gather(1, indices.clamp(min=0)) * (indices >= 0)
        return GateResult(
            indices=indices,
            scores=chosen_scores,
            offnode=kept,
            wanted=wanted,
            sent=_count(kept),
            rerouted=_count(rejected & has_free),
            dropped=_count(rejected & ~has_free),
        )


def to_routing_map(indices: torch.Tensor, num_experts: int) -> torch.Tensor:
    """[T, k] expert indices (-1: none) -> [T, E] bool routing map."""
    valid = indices >= 0
    one_hot = torch.nn.functional.one_hot(indices.clamp(min=0), num_experts).bool()
    return (one_hot & valid.unsqueeze(-1)).any(dim=1)
