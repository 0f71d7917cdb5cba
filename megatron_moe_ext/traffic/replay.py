"""Replaying recorded routing: a trace's counts as forced routing for the layer benchmark.

Notation: T tokens of one worker, E experts, k top-k, W workers.

:func:`routing_for_counts` builds, for one worker, a routing map whose per-expert counts are
exactly the recorded ``counts[w]`` and the logit bias that makes Megatron's top-k router
choose it (the same construction as ``megatron.layer_builder.make_routing``, whose
``force_routing`` takes the bias). :func:`replay_counts` picks the [W, E] matrices of one
layer for the benchmark, iteration by iteration.
"""

from __future__ import annotations

from typing import Iterator, Optional

import numpy as np
import torch

from megatron_moe_ext.routing import capped_largest_remainder

from .trace import RoutingTrace


def routing_for_counts(counts: np.ndarray, topk: int, seed: int = 0,
                       num_tokens: Optional[int] = None) -> tuple[torch.Tensor, torch.Tensor]:
    """(routing_map bool [T, E], logit bias fp32 [T, E]) routing exactly ``counts`` [E].

    T = sum(counts) / k unless given; every expert's count must be <= T and the total k T
    (a token picks k distinct experts). Copies are laid out expert by expert and token t takes
    positions t, t + T, ..., so no token gets an expert twice; token rows are shuffled.
    """
    c = np.asarray(counts, dtype=np.int64)
    total = int(c.sum())
    T = total // topk if num_tokens is None else int(num_tokens)
    if total != T * topk:
        raise ValueError(f"counts sum to {total}, not k*T = {topk}*{T}: a recorded row with "
                         "dropped tokens cannot be replayed as top-k routing")
    if c.min() < 0 or c.max() > T:
        raise ValueError(f"every expert count must be in [0, T={T}], got {c.tolist()}")
    flat = np.repeat(np.arange(c.shape[0]), c)
    choice = torch.from_numpy(flat.reshape(topk, T).T.copy())  # [T, k]
    gen = torch.Generator().manual_seed(int(seed))
    choice = choice[torch.randperm(T, generator=gen)]
    routing_map = torch.zeros(T, c.shape[0], dtype=torch.bool)
    routing_map.scatter_(1, choice, True)
    jitter = torch.rand(T, c.shape[0], generator=gen) * 0.5
    return routing_map, torch.where(routing_map, 3.0 + jitter, jitter)


def scale_counts(counts: np.ndarray, num_tokens: int, topk: int) -> np.ndarray:
    """Counts [E] rescaled to ``num_tokens`` tokens (sum k T, each <= T), largest remainder.

    For replaying a trace at another batch size; counts that already sum to k T come back
    unchanged.
    """
    c = np.asarray(counts, dtype=float)
    total = num_tokens * topk
    if c.sum() == total and c.max() <= num_tokens:
        return c.astype(np.int64)
    if topk > c.size:
        raise ValueError(f"topk={topk} > {c.size} experts")
    p = c / c.sum() if c.sum() > 0 else np.ones_like(c)
    return capped_largest_remainder(p, total, num_tokens)


def replay_counts(trace: RoutingTrace, layer: Optional[int] = None,
                  group: int = 0) -> Iterator[tuple[int, np.ndarray]]:
    """(iteration, [ep_size, E] counts of EP group ``group``) for every record of a layer."""
    ep = trace.header.ep_size
    rows = slice(group * ep, (group + 1) * ep)
    per_layer = trace.layer_counts(layer)
    for it, c in zip(trace.iterations, per_layer):
        yield int(it), np.asarray(c[rows], dtype=np.int64)


def replay_routing(trace: RoutingTrace, rank: int, layer: Optional[int] = None,
                   num_tokens: Optional[int] = None, group: int = 0,
                   seed: int = 0) -> Iterator[tuple[int, np.ndarray, torch.Tensor, torch.Tensor]]:
    """Per record: (iteration, counts [E] of EP rank ``rank``, routing_map [T, E], bias [T, E])
    for the benchmark's forced-routing path (``layer_builder.force_routing(layer, bias)``).

    T defaults to the recorded tokens (counts sum / k: the routing is the recorded one
    exactly); another ``num_tokens`` rescales each row with :func:`scale_counts`.
    """
    k = trace.header.topk
    if not 0 <= rank < trace.header.ep_size:
        raise ValueError(f"rank {rank} is not in an EP group of {trace.header.ep_size}")
    for it, c in replay_counts(trace, layer, group):
        row = c[rank] if num_tokens is None else scale_counts(c[rank], num_tokens, k)
        rmap, bias = routing_for_counts(row, k, seed=seed + 7919 * it + rank)
        yield it, row, rmap, bias


def bench_routing(trace_path: str, rank: int, world: int, num_experts: int, topk: int,
                  num_tokens: int, layer: Optional[int] = None, record: int = -1,
                  seed: int = 0) -> tuple[torch.Tensor, torch.Tensor, int]:
    """(routing_map, bias, iteration) of EP rank ``rank`` for the layer benchmark
    (``--routing-trace``): record ``record`` (an index, negative from the end) of ``layer``,
    EP group 0; ``num_tokens`` other than the recorded tokens rescales the counts.

    The trace must match the benchmark: EP size = world, E and top-k equal (else ValueError).
    """
    from .trace import read_trace

    tr = read_trace(trace_path)
    h = tr.header
    if (h.ep_size, h.num_experts, h.topk) != (world, num_experts, topk):
        raise ValueError(f"routing trace {trace_path}: EP {h.ep_size}, {h.num_experts} experts, "
                         f"top-{h.topk}; the benchmark has world {world}, {num_experts} experts, "
                         f"top-{topk} (use --world-size, --experts, --topk)")
    if not -len(tr) <= record < len(tr):
        raise ValueError(f"routing trace {trace_path} has {len(tr)} records, no record {record}")
    it = int(tr.iterations[record])
    row = np.asarray(tr.layer_counts(layer)[record][rank], dtype=np.int64)
    if row.sum() != num_tokens * topk:
        row = scale_counts(row, num_tokens, topk)
    rmap, bias = routing_for_counts(row, topk, seed=seed, num_tokens=num_tokens)
    return rmap, bias, it
