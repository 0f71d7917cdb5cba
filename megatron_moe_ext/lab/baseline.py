"""Synchronous expert parallelism as megatron-core's alltoall token dispatcher runs it.

Notation
--------
T      routed token copies on this rank (rows of ``tokens``), sorted by global expert
E      experts; expert e lives on worker e // E_l; E_l = E / W local experts
H      hidden size (H_out: hidden size of the expert output)
W      workers in the expert-parallel group ``group``

One layer call, on every rank, in this order (all blocking, nothing overlaps)::

    dispatch  all_to_all_single(tokens), all_to_all_single(probs)   input splits = tokens per
                                                                    destination worker
    sort      received rows [source][local expert] -> [local expert][source]
    compute   expert_fn(x, p, tokens per local expert)
    unsort    [local expert][source] -> [source][local expert]
    combine   all_to_all_single(outputs) back to the token owners

Backward is autograd through the same ops: the combine's backward is an all-to-all of the
output gradients to the workers that computed them, then the expert backward, then the
dispatch's backward all-to-all returns input (and prob) gradients to the owners, as
Megatron's ``_AllToAll`` autograd function does. Row i of the result is the expert output for
input row i, exactly as :func:`megatron_moe_ext.core.exchange.smart_exchange` returns it.
"""

from __future__ import annotations

from typing import Callable, Sequence

import torch
import torch.distributed as dist

__all__ = ["sync_exchange", "split_sizes"]

ExpertFn = Callable[[torch.Tensor, torch.Tensor, list], torch.Tensor]


class _AllToAll(torch.autograd.Function):
    """all_to_all_single with uneven splits; backward is the reverse all-to-all."""

    @staticmethod
    def forward(ctx, group: dist.ProcessGroup, x: torch.Tensor, out_splits: list[int],
                in_splits: list[int]) -> torch.Tensor:
        ctx.group, ctx.out_splits, ctx.in_splits = group, out_splits, in_splits
        out = x.new_empty((sum(out_splits), *x.shape[1:]))
        dist.all_to_all_single(out, x.contiguous(), out_splits, in_splits, group=group)
        return out

    @staticmethod
    def backward(ctx, g: torch.Tensor):
        return (None, _AllToAll.apply(ctx.group, g.contiguous(), ctx.in_splits, ctx.out_splits),
                None, None)


def split_sizes(rows: Sequence[Sequence[int]],
                rank: int) -> tuple[list[int], list[int], list[list[int]]]:
    """(input splits [W], output splits [W], received counts [W][E_l]) of ``rank``.

    ``rows`` is the [W, E] count matrix (rows[s][e]: tokens worker s sends to expert e).
    """
    world = len(rows)
    e_l = len(rows[0]) // world
    in_splits = [sum(rows[rank][w * e_l:(w + 1) * e_l]) for w in range(world)]
    recv = [list(rows[s][rank * e_l:(rank + 1) * e_l]) for s in range(world)]
    out_splits = [sum(r) for r in recv]
    return in_splits, out_splits, recv


def _sort_chunks(x: torch.Tensor, sizes: list[int], order: list[int]) -> torch.Tensor:
    """Megatron's ``sort_chunks_by_idxs``: split ``x`` by ``sizes`` and concatenate in ``order``."""
    if len(sizes) <= 1:
        return x
    chunks = torch.split(x, sizes, dim=0)
    return torch.cat([chunks[i] for i in order], dim=0)


def sync_exchange(tokens: torch.Tensor, probs: torch.Tensor, counts: torch.Tensor,
                  expert_fn: ExpertFn, group: dist.ProcessGroup) -> torch.Tensor:
    """Dispatch (all-to-all), compute, combine (all-to-all), synchronously; autograd backward.

    Same arguments and result as ``smart_exchange`` (without schedule options): ``tokens``
    [T, H] sorted by global expert, ``probs`` [T], ``counts`` [W, E] identical on every rank,
    ``expert_fn(x [t, H], p [t], tokens per local expert) -> [t, H_out]``. Parameters used by
    ``expert_fn`` get their gradients by ordinary autograd.
    """
    if group is None:
        raise ValueError("sync_exchange needs an explicit expert-parallel process group")
    rank, world = dist.get_rank(group), dist.get_world_size(group)
    rows = counts.detach().to("cpu", torch.int64).tolist()
    if len(rows) != world or len(rows[0]) % world:
        raise ValueError(f"counts must be [W={world}, E] with E a multiple of W, "
                         f"got {tuple(counts.shape)}")
    if sum(rows[rank]) != tokens.shape[0]:
        raise ValueError(f"counts[{rank}] sums to {sum(rows[rank])} but this rank holds "
                         f"{tokens.shape[0]} tokens")
    e_l = len(rows[0]) // world
    in_splits, out_splits, recv = split_sizes(rows, rank)
    x = _AllToAll.apply(group, tokens, out_splits, in_splits)
    p = _AllToAll.apply(group, probs, out_splits, in_splits)
    # received rows are [source][local expert]; experts want [local expert][source]
    by_source = [n for r in recv for n in r]  # chunk (s, e) at index s * E_l + e
    to_expert = [s * e_l + e for e in range(e_l) for s in range(world)]
    if e_l > 1:
        x, p = _sort_chunks(x, by_source, to_expert), _sort_chunks(p, by_source, to_expert)
    per_expert = [sum(recv[s][e] for s in range(world)) for e in range(e_l)]
    y = expert_fn(x, p, per_expert)
    if e_l > 1:
        by_expert = [recv[s][e] for e in range(e_l) for s in range(world)]
        back = [e * world + s for s in range(world) for e in range(e_l)]
        y = _sort_chunks(y, by_expert, back)
    return _AllToAll.apply(group, y, in_splits, out_splits)
