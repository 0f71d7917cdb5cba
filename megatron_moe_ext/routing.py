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

__all__ = ["capped_largest_remainder", "zipf_expert_counts", "zipf_counts"]


def capped_largest_remainder(weights: np.ndarray, total: int, cap: int) -> np.ndarray:
    """Integer counts [E] summing to ``total`` in proportion to ``weights``, each <= ``cap``.

    Largest remainder (ties to the lowest id); an entry above ``cap`` (a token cannot pick one
    expert twice) is capped and its excess goes to the others by weight (water-filling); zero
    weights share only what the positive ones cannot hold.
    """
    p = np.asarray(weights, dtype=float)
    if total > cap * p.size:
        raise ValueError(f"{total} copies cannot fit {p.size} experts of at most {cap}")
    out = np.zeros(p.size, dtype=np.int64)
    left = np.ones(p.size, dtype=bool)
    remaining = int(total)
    while remaining > 0:
        w = p * left if (p * left).sum() > 0 else left.astype(float)
        share = remaining * w / w.sum()
        add = np.floor(share).astype(np.int64)
        for e in np.argsort(-(share - add), kind="stable")[:remaining - int(add.sum())]:
            add[e] += 1
        out += add
        over = np.maximum(out - cap, 0)
        out -= over
        left &= out < cap
        remaining = int(over.sum())
    return out


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
    return capped_largest_remainder(p, total, num_tokens)


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
