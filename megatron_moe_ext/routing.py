"""Zipf routing: the one generator of routed-token counts behind every ``--skew`` knob.

The layer benchmark (megatron/layer_builder.py ``make_routing``, scripts/bench_moe_layer.py and
the validation sweep) forces these counts on the real layers; the performance-model tools (the
roofline, ``--describe``) predict from the same counts, so a measured and a predicted figure
for one skew describe the same routing.

Law: expert popularity p_e proportional to 1 / (e + 1)^skew (expert 0 hottest; skew 0 is
uniform). Per-expert counts are exact (largest remainder of k T p_e, ties to the lowest id),
each capped at T since a token picks k distinct experts; the excess of a capped expert goes to
the others by p (water-filling). Every worker routes the same counts (each shuffles its own
tokens): skew 0 with k T divisible by E is perfectly balanced.

Notation: T tokens per worker, E experts, k top-k, W workers.
"""

from __future__ import annotations

from typing import Optional

import numpy as np

__all__ = ["zipf_expert_counts", "zipf_counts"]


def zipf_expert_counts(num_tokens: int, num_experts: int, topk: int, skew: float) -> np.ndarray:
    """Exact token copies per expert [E] (sum k T, each <= T) for a Zipf(skew) law.

    p_e = (e + 1)^-skew / sum; counts by largest remainder of k T p_e; an expert above T
    (a token cannot pick it twice) is capped and its excess goes to the next experts.
    """
    if not 1 <= topk <= num_experts:
        raise ValueError(f"topk={topk} must be in [1, num_experts={num_experts}]")
    if skew < 0:
        raise ValueError(f"skew must be >= 0, got {skew}")
    total = num_tokens * topk
    p = (np.arange(num_experts) + 1.0) ** -float(skew)
    p /= p.sum()
    counts = np.zeros(num_experts, dtype=np.int64)
    left = np.ones(num_experts, dtype=bool)
    remaining = total
    while remaining > 0:  # water-filling: cap at T, redistribute the excess by p
        share = remaining * p * left / (p * left).sum()
        add = np.floor(share).astype(np.int64)
        rest = remaining - add.sum()
        order = np.argsort(-(share - add), kind="stable")
        for e in order[:rest]:
            add[e] += 1
        counts += add
        over = np.maximum(counts - num_tokens, 0)
        counts -= over
        left &= counts < num_tokens
        remaining = int(over.sum())
    return counts


def zipf_counts(num_workers: int, num_experts: int, tokens_per_worker: int, topk: int = 1,
                skew: float = 0.0, seed: Optional[int] = None) -> np.ndarray:
    """Routing counts [W, E]: every worker sends :func:`zipf_expert_counts` copies per expert.

    ``seed`` (optional) permutes which expert ids get which popularity rank (a seeded
    permutation of the columns; the loads per rank stay the same); None keeps expert 0 hottest,
    the layout the benchmark forces.
    """
    if num_workers < 1:
        raise ValueError(f"num_workers must be >= 1, got {num_workers}")
    row = zipf_expert_counts(tokens_per_worker, num_experts, topk, skew)
    if seed is not None:
        row = row[np.random.default_rng(seed).permutation(num_experts)]
    return np.tile(row, (num_workers, 1))
