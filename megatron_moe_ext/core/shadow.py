"""Mechanics of FasterMoE dynamic shadow experts (PPoPP'22, Section 4.1), plain PyTorch.

A shadowed expert is replicated for one layer invocation: its owner broadcasts the expert's
parameters over the expert-parallel group, every worker computes its *own* tokens for that
expert locally, and in backward the replicas' parameter gradients are summed back to the
owner. Broadcast and reduce are binomial trees of tagged point-to-point messages
(:mod:`.tree`), the same plan the performance model prices (``perf.model.shadow_comm_times``);
gloo's own broadcast sends the whole payload from the root to every worker, W - 1 times over
the root's link. The owner's parameters are never written to; the summed gradient reaches
them through ordinary autograd accumulation, exactly once per backward, so data-parallel
gradient hooks, ``main_grad`` buffers and optimizers see it like any other gradient.

Notation
--------
W      workers in the expert-parallel group ``group`` (group ranks 0..W-1)
E      experts; expert e lives on worker e // E_l (E_l = E / W local experts)
S      shadowed expert ids (sorted ascending here), identical on every worker
T      routed token copies on this rank, sorted by global expert
row    counts[rank]: [E] tokens this rank sends to each expert; expert e's tokens are the
       contiguous block [prefix(row)[e], prefix(row)[e + 1]) of the expert-sorted input

Autograd graph (one layer call, this rank)::

    owner params --(ShadowBroadcast: fwd broadcast, bwd reduce-sum to owner)--> replicas
    replicas, tokens, probs --(smart exchange: block e of S computed locally with the
                               replicas at step 0, the rest exchanged)--> output

The block of expert e is addressed by offset in the plan (``ExchangePlan.shadow_chunks``);
the exchange's single autograd node returns the replicas' gradients, which this module's
broadcast node then reduce-sums to the owner.

``ShadowBroadcast`` takes a zero-size *anchor* leaf that requires grad, so its backward (a
collective) runs on every worker, owner or not, whenever a backward passes through the layer.
"""

from __future__ import annotations

import logging
import threading
import time
from dataclasses import dataclass
from typing import Any, Optional, Sequence

import torch
import torch.distributed as dist
from torch.autograd.function import once_differentiable

from .comm import SHADOW_TAG_BASE
from .tree import broadcast_steps, reduce_steps

logger = logging.getLogger(__name__)

__all__ = ["broadcast_from_owners", "start_broadcast", "PendingBroadcast", "functional_apply"]


# --------------------------------------------------------------------------- broadcast / reduce


@dataclass(frozen=True)
class _Item:
    """One tensor to replicate: its owner (group rank), shape and dtype."""

    owner: int
    shape: torch.Size
    dtype: torch.dtype


@dataclass(frozen=True)
class _BroadcastPlan:
    """Static description of one broadcast: items, this rank, group, reduce precision."""

    items: tuple[_Item, ...]
    rank: int
    global_ranks: tuple[int, ...]
    group: Any
    device: torch.device
    reduce_dtype: Optional[torch.dtype]


class _ShadowBroadcast(torch.autograd.Function):
    """Forward: the replicas of a :class:`PendingBroadcast` (issued already; not waited here).
    Backward: reduce-sum every rank's gradient to the owner."""

    @staticmethod
    def forward(ctx, pending: "PendingBroadcast", anchor: torch.Tensor, *owned: torch.Tensor):
        ctx.plan = pending.plan
        return tuple(pending.bufs)

    @staticmethod
    @once_differentiable
    def backward(ctx, *grads: Optional[torch.Tensor]):
        plan: _BroadcastPlan = ctx.plan
        bufs = []
        for item, g in zip(plan.items, grads):
            dtype = plan.reduce_dtype or item.dtype
            if g is None:
                buf = torch.zeros(item.shape, dtype=dtype, device=plan.device)
            else:
                buf = g.detach().to(dtype=dtype, memory_format=torch.contiguous_format, copy=True)
            bufs.append(buf)
        _run_trees(plan, [(it.owner, buf) for it, buf in zip(plan.items, bufs)], reduce=True)
        owned_grads = [buf.to(item.dtype) for item, buf in zip(plan.items, bufs)
                       if item.owner == plan.rank]
        needs = ctx.needs_input_grad[2:]
        owned_grads = [g if need else None for g, need in zip(owned_grads, needs)]
        ctx.plan = None
        return (None, None, *owned_grads)


def _run_trees(plan: _BroadcastPlan, trees: Sequence[tuple[int, torch.Tensor]],
               reduce: bool) -> None:
    """Run the binomial trees (:mod:`.tree`) of ``trees`` [(root, buffer)] in lockstep: step
    s of every tree, then a wait, then step s + 1. Broadcast: the root's buffer reaches every
    rank. Reduce: every rank's buffer is summed into the root's (others' are clobbered)."""
    world = len(plan.global_ranks)
    if world == 1 or not trees:
        return
    step_lists = [(reduce_steps if reduce else broadcast_steps)(root, world) for root, _ in trees]
    for s in range(len(step_lists[0])):
        ops, adds = [], []
        for t, ((_, buf), steps) in enumerate(zip(trees, step_lists)):
            tg = _tag(t, s)
            for src, dst in steps[s]:
                if src == plan.rank:
                    ops.append(dist.P2POp(dist.isend, buf, plan.global_ranks[dst], plan.group, tg))
                elif dst == plan.rank:
                    into = torch.empty_like(buf) if reduce else buf
                    ops.append(dist.P2POp(dist.irecv, into, plan.global_ranks[src], plan.group,
                                          tg))
                    if reduce:
                        adds.append((buf, into))
        if ops:
            for w in dist.batch_isend_irecv(ops):
                w.wait()
        for buf, part in adds:
            buf.add_(part)


def _tag(tree: int, step: int) -> int:
    """Tag of tree ``tree``'s messages at step ``step`` (at most 64 steps: W < 2^64)."""
    return SHADOW_TAG_BASE + tree * 64 + step


class _TreeRun:
    """The broadcast trees of one :class:`PendingBroadcast`, running.

    On gloo a background thread drives the steps (each step waits for the one before, and a
    host thread waiting on gloo is what lets the caller compute meanwhile); it issues only
    tagged point-to-point messages, which gloo matches by tag whatever thread posts them. On
    other backends (NCCL) the steps are issued at once from the caller: their waits are
    stream waits, and one communicator runs its operations in issue order.
    """

    def __init__(self, plan: _BroadcastPlan, trees: list[tuple[int, torch.Tensor]]) -> None:
        self._error: Optional[BaseException] = None
        self._thread: Optional[threading.Thread] = None
        if dist.get_backend(plan.group) == "gloo":
            self._thread = threading.Thread(target=self._run, args=(plan, trees),
                                            name="shadow-broadcast", daemon=True)
            self._thread.start()
        else:
            _run_trees(plan, trees, reduce=False)

    def _run(self, plan: _BroadcastPlan, trees: list[tuple[int, torch.Tensor]]) -> None:
        try:
            _run_trees(plan, trees, reduce=False)
        except BaseException as exc:  # re-raised by wait() in the caller's thread
            self._error = exc

    def wait(self) -> None:
        if self._thread is not None:
            self._thread.join()
            self._thread = None
        if self._error is not None:
            raise RuntimeError("shadow expert broadcast failed") from self._error


class PendingBroadcast:
    """A broadcast from the owners that is in flight (:func:`start_broadcast`).

    ``bufs`` are being filled by async broadcasts; :meth:`wait` blocks until they are complete,
    :meth:`link` returns them grad-linked to the owners' tensors. Both may be called in either
    order, but the replicas may only be read after :meth:`wait` (e.g. by an exchange's shadow
    compute, through ``Shadows.ready``).
    """

    def __init__(self, plan: _BroadcastPlan, bufs: list[torch.Tensor], run: _TreeRun,
                 owned: list[torch.Tensor]) -> None:
        self.plan, self.bufs = plan, bufs
        self._run: Optional[_TreeRun] = run
        self._owned = owned
        self._linked = False
        self.waited_s = 0.0
        """Seconds :meth:`wait` blocked the host (on CUDA: until the wait was enqueued)."""

    @property
    def done(self) -> bool:
        """True once :meth:`wait` returned."""
        return self._run is None

    def wait(self) -> float:
        """Block until every broadcast completed; returns the seconds blocked by this call
        (0 once done). Idempotent."""
        if self._run is None:
            return 0.0
        t0 = time.perf_counter()
        run, self._run = self._run, None
        run.wait()
        dt = time.perf_counter() - t0
        self.waited_s += dt
        return dt

    def link(self) -> list[torch.Tensor]:
        """The replicas, linked (when grad mode is on) to the owners' tensors through one
        autograd node whose backward sums every rank's gradient into the owner's input.
        Once per broadcast; does not wait."""
        if self._linked:
            raise RuntimeError("a PendingBroadcast is linked once")
        self._linked = True
        # The anchor makes every rank's outputs require grad, so that every rank enters the
        # backward collective (a non-owner has no other input that requires grad).
        anchor = torch.empty(0, device=self.plan.device, requires_grad=torch.is_grad_enabled())
        return list(_ShadowBroadcast.apply(self, anchor, *self._owned))


def start_broadcast(
    tensors: Sequence[Optional[torch.Tensor]],
    owners: Sequence[int],
    templates: Sequence[torch.Tensor],
    group: dist.ProcessGroup,
    reduce_dtype: Optional[torch.dtype] = None,
) -> PendingBroadcast:
    """Start the broadcast trees of :func:`broadcast_from_owners` and return at once.

    Same arguments and rules. The owners' tensors are copied now (read only), so the result
    is the parameters' values at issue time. One tree per owner (and dtype) carries all of
    that owner's items, flattened (the replicas are views into it); the trees of all owners
    run in lockstep, step by step (on gloo in a background thread, see ``_TreeRun``).
    """
    if group is None:
        raise ValueError("broadcast_from_owners needs an explicit process group")
    if not (len(tensors) == len(owners) == len(templates)):
        raise ValueError("tensors, owners and templates must have the same length")
    rank, world = dist.get_rank(group), dist.get_world_size(group)
    items, owned = [], []
    for t, owner, tmpl in zip(tensors, owners, templates):
        if not 0 <= owner < world:
            raise ValueError(f"owner {owner} out of range for a group of {world}")
        if (owner == rank) != (t is not None):
            raise ValueError(f"rank {rank}: an owned item needs its tensor, others need None "
                             f"(owner {owner})")
        if t is not None and (t.shape != tmpl.shape or t.dtype != tmpl.dtype):
            raise ValueError(f"owned tensor {tuple(t.shape)}/{t.dtype} does not match its "
                             f"template {tuple(tmpl.shape)}/{tmpl.dtype}")
        items.append(_Item(int(owner), tmpl.shape, tmpl.dtype))
        if t is not None:
            owned.append(t)
    device = templates[0].device if templates else torch.device("cpu")
    plan = _BroadcastPlan(
        items=tuple(items), rank=rank,
        global_ranks=tuple(dist.get_global_rank(group, r) for r in range(world)),
        group=group, device=device, reduce_dtype=reduce_dtype,
    )
    # one tree per (owner, dtype): the items' flat concatenation; the replicas are views
    bufs: list[Optional[torch.Tensor]] = [None] * len(items)
    trees: list[tuple[int, torch.Tensor]] = []
    mine = dict(zip([i for i, it in enumerate(items) if it.owner == rank], owned))
    keys = list(dict.fromkeys((it.owner, it.dtype) for it in items))
    for owner, dtype in keys:
        idx = [i for i, it in enumerate(items) if (it.owner, it.dtype) == (owner, dtype)]
        sizes = [items[i].shape.numel() for i in idx]
        if owner == rank:
            flat = torch.cat([mine[i].detach().reshape(-1) for i in idx])  # a copy
        else:
            flat = torch.empty(sum(sizes), dtype=dtype, device=device)
        trees.append((owner, flat))
        for i, part in zip(idx, flat.split(sizes)):
            bufs[i] = part.view(items[i].shape)
    logger.debug("rank %d start_broadcast: %d tensors, owners %s", rank, len(items),
                 sorted(set(owners)))
    return PendingBroadcast(plan, bufs, _TreeRun(plan, trees), owned)


def broadcast_from_owners(
    tensors: Sequence[Optional[torch.Tensor]],
    owners: Sequence[int],
    templates: Sequence[torch.Tensor],
    group: dist.ProcessGroup,
    reduce_dtype: Optional[torch.dtype] = None,
) -> list[torch.Tensor]:
    """Replicate tensors from their owners over ``group``; gradients flow back by reduce-sum.

    Args:
        tensors: item i is the owner's tensor on rank ``owners[i]`` and ``None`` elsewhere.
            Owned tensors are only read (cloned), never modified.
        owners: group rank owning item i (the same list on every rank).
        templates: a tensor with item i's shape and dtype (e.g. a local tensor of the same
            layout), used to allocate receive buffers.
        group: the process group (expert-parallel group); every member must call this with
            the same ``owners`` and shapes, in the same order relative to other collectives.
        reduce_dtype: dtype of the backward reduction (e.g. float32 for bf16 parameters);
            default: each item's dtype.

    Returns:
        New tensors (one per item, never aliasing the inputs). When grad mode is on they are
        linked to the owner's tensors through a single autograd node whose backward sums every
        rank's gradient into the owner's input (non-owners get no gradient from this path).
        Blocking: :func:`start_broadcast` is the same, issued early and waited later.
    """
    pending = start_broadcast(tensors, owners, templates, group, reduce_dtype)
    pending.wait()
    return pending.link()


def functional_apply(module: torch.nn.Module, names: Sequence[str],
                     tensors: Sequence[torch.Tensor], *args: Any, **kwargs: Any) -> Any:
    """Call ``module`` with its parameters ``names`` replaced by ``tensors`` (functionally).

    The module's own parameters are untouched and take no part in the autograd graph for the
    replaced names; gradients go to ``tensors``.
    """
    return torch.func.functional_call(module, dict(zip(names, tensors)), args, kwargs)
