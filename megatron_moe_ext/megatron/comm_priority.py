"""train.comm_priority: moe_first on megatron-core's DDP and MoE layers (docs/lina.md).

Two hooks at the Megatron boundary, both installed after the model chunks are DDP-wrapped and
only when the option is on:

* **Reductions.** megatron-core (0.16.1: ``distributed/param_and_grad_buffer.py``) launches a
  bucket group's reduction from the grad hooks with ``_ParamAndGradBucketGroup.start_grad_sync``
  (all-reduce, or reduce-scatter with the distributed optimizer) and waits for it in
  ``finish_grad_sync`` through ``grad_reduce_handle.wait()`` (from ``finalize_model_grads``,
  before the optimizer). On every bucket group of the wrapped chunks ``start_grad_sync`` is
  replaced, per instance, by :func:`_chunked_start_grad_sync`: the same scaling, reduce op,
  process group and result layout, but each bucket is cut into contiguous chunks handed to a
  :class:`~megatron_moe_ext.core.comm_priority.CommPriorityScheduler` (one lane per process
  group), and the handle's ``wait()`` is the scheduler's flush.
* **Exchange signal.** ``moe.impl: megatron``: the stock token dispatcher's ``token_dispatch``
  and ``token_combine`` (the expert-parallel all-to-alls) raise the signal in forward, and in
  backward through identity autograd markers on their outputs (raised when the gradient arrives)
  and inputs (lowered when the all-to-all's backward has produced it). ``moe.impl: fastermoe``:
  ``core/exchange.py`` raises it around each exchange itself.

Notation: W ranks of a bucket group's process group; chunks as in :mod:`..core.comm_priority`.
"""

from __future__ import annotations

import functools
import logging
import types
from typing import Any, Optional

import torch
import torch.distributed as dist

from megatron_moe_ext.config import Config
from megatron_moe_ext.core.comm_priority import (
    CommPriorityScheduler,
    all_reduce_chunks,
    exchange_begin,
    exchange_end,
    exchange_in_flight,
    exchange_signal,
    reduce_scatter_chunks,
)

logger = logging.getLogger(__name__)

__all__ = ["install_comm_priority", "bucket_groups"]


def bucket_groups(model_chunks: list) -> list:
    """Every ``_ParamAndGradBucketGroup`` of the DDP-wrapped chunks (dense, then expert)."""
    out = []
    for m in model_chunks:
        out += list(m.bucket_groups) + list(m.expert_parallel_bucket_groups)
    return out


class _FlushHandle:
    """Stands in for the coalesced work handle: ``wait()`` flushes the scheduler."""

    def __init__(self, sched: CommPriorityScheduler, check: "_ExchangeCheck",
                 first_batch: bool) -> None:
        self.sched = sched
        self.check = check
        self.first_batch = first_batch

    def wait(self) -> None:
        self.sched.flush()
        self.check()
        _report(self.sched, self.check, self.first_batch)


def _report(sched: CommPriorityScheduler, check: "_ExchangeCheck", first_batch: bool) -> None:
    """Count the reduction's chunks; log the totals from iteration 2 on after 1, 2, 4, 8, ...
    iterations (in the first iteration megatron-core launches each bucket group from finish_grad_sync at
    the end of backward, so nothing can be held there)."""
    recs = sched.clear_records()
    if first_batch or not recs:
        return
    held = [r for r in recs if r.held_by_exchange]
    check.iterations += 1
    check.chunks += len(recs)
    check.held += len(held)
    check.longest_s = max([check.longest_s] + [r.held_s for r in held])
    logger.debug("comm_priority flush: %d chunks, %d held behind an MoE exchange",
                 len(recs), len(held))
    n = check.iterations
    if n & (n - 1) == 0:
        logger.info("comm_priority moe_first, %d iteration(s) from iteration 2: %d chunks, "
                    "%d held behind an MoE exchange (longest %.1f ms)", n, check.chunks,
                    check.held, 1e3 * check.longest_s)


class _ExchangeCheck:
    """At the first flush: an MoE exchange must have raised the signal (else moe_first would
    silently do nothing, e.g. an exchange path that is not instrumented)."""

    def __init__(self, impl: str) -> None:
        self.impl = impl
        self.begins0 = exchange_signal().begins
        self.done = False
        self.iterations = self.chunks = self.held = 0
        self.longest_s = 0.0

    def __call__(self) -> None:
        if self.done:
            return
        self.done = True
        if exchange_signal().begins == self.begins0:
            raise RuntimeError(
                f"train.comm_priority: moe_first: no MoE exchange of moe.impl: {self.impl} "
                "signalled during the first backward, so nothing would be prioritised")


def _chunked_start_grad_sync(self: Any, force_all_reduce: Optional[bool] = False, *,
                             sched: CommPriorityScheduler, check: _ExchangeCheck) -> None:
    """megatron-core 0.16.1 ``_ParamAndGradBucketGroup.start_grad_sync`` with each bucket's
    collective cut into chunks issued by ``sched`` (same scaling, op, group, layout)."""
    if self.is_first_batch and self.grad_reduce_handle is not None:
        return  # first batch: already dispatched (stock behaviour)
    assert self.grad_reduce_handle is None, "Should not have multiple communication calls outstanding at once"
    ddp = self.ddp_config
    if ddp.check_for_nan_in_grad or ddp.check_for_large_grads:
        self.check_grads(check_for_nan_or_inf=ddp.check_for_nan_in_grad,
                         check_for_large=ddp.check_for_large_grads)
    for bucket in self.buckets:
        if bucket.gradient_scaling_factor != 1.0:
            bucket.grad_data *= bucket.gradient_scaling_factor
    op = dist.ReduceOp.AVG if ddp.average_in_collective else dist.ReduceOp.SUM
    scatter = ddp.use_distributed_optimizer and not force_all_reduce
    group = (self.intra_distributed_optimizer_instance_group if ddp.use_distributed_optimizer
             else self.data_parallel_group)
    split = reduce_scatter_chunks if scatter else all_reduce_chunks
    # A sum over one rank is the identity: such a group (expert-DP of size 1) posts nothing.
    buckets = self.buckets if dist.get_world_size(group) > 1 else []
    for bucket in buckets:
        for i, (issue, nbytes) in enumerate(split(bucket.grad_data, group, op, sched.chunk_bytes)):
            sched.submit(group, f"bucket{bucket.bucket_id}.{i}", issue, nbytes)
    if ddp.overlap_grad_reduce:
        self.grad_reduce_handle = _FlushHandle(sched, check, self.is_first_batch)
    else:
        sched.flush()
        self.grad_reduce_handle = None


# --------------------------------------------------------------------------- exchange markers


class _SignalOnBackward(torch.autograd.Function):
    """Identity; its backward raises (begin=True) or lowers the exchange signal."""

    @staticmethod
    def forward(ctx, begin: bool, x: torch.Tensor) -> torch.Tensor:
        ctx.begin = begin
        return x.view_as(x)

    @staticmethod
    def backward(ctx, grad: torch.Tensor):
        (exchange_begin if ctx.begin else exchange_end)()
        return None, grad


def _marked(x: Any, begin: bool) -> Any:
    if isinstance(x, torch.Tensor) and x.requires_grad and torch.is_grad_enabled():
        return _SignalOnBackward.apply(begin, x)
    if isinstance(x, tuple):
        return tuple(_marked(v, begin) for v in x)
    return x


def _signalled(method):
    """Wrap a dispatcher step (tensors in -> tensors out, one all-to-all per tensor): signal in
    forward around the call; in backward from the outputs' gradient to the inputs'."""

    @functools.wraps(method)
    def wrapped(*args, **kwargs):
        args = tuple(_marked(a, begin=False) for a in args)
        with exchange_in_flight():
            out = method(*args, **kwargs)
        return _marked(out, begin=True)

    return wrapped


def _instrument_dispatchers(model_chunks: list) -> int:
    """Signal the stock MoELayer dispatchers' token_dispatch / token_combine; returns count."""
    from megatron.core.transformer.moe.moe_layer import MoELayer
    from megatron.core.transformer.moe.token_dispatcher import MoETokenDispatcher

    n = 0
    for m in model_chunks:
        for mod in m.modules():
            disp = getattr(mod, "token_dispatcher", None) if isinstance(mod, MoELayer) else None
            if isinstance(disp, MoETokenDispatcher) and not getattr(disp, "_mmx_signalled", False):
                disp.token_dispatch = _signalled(disp.token_dispatch)
                disp.token_combine = _signalled(disp.token_combine)
                disp._mmx_signalled = True
                n += 1
    return n


# --------------------------------------------------------------------------- install


REPLICATED_MEGATRON = ("0.16",)
"""megatron-core minor versions whose ``_ParamAndGradBucketGroup.start_grad_sync`` this module
replicates (later versions add steps to it, e.g. resharding before the sync)."""


def _check_megatron_version() -> None:
    from megatron_moe_ext.megatron.versions import installed_version

    v = installed_version()
    if f"{v.major}.{v.minor}" not in REPLICATED_MEGATRON:
        raise RuntimeError(
            f"train.comm_priority: moe_first replicates the bucket-group grad sync of "
            f"megatron-core {', '.join(REPLICATED_MEGATRON)}; {v} is not verified: use "
            "train.comm_priority: none, or check megatron_moe_ext/megatron/comm_priority.py "
            "against distributed/param_and_grad_buffer.py of that version")


def install_comm_priority(model_chunks: list, cfg: Config,
                          device: torch.device) -> Optional[CommPriorityScheduler]:
    """Install train.comm_priority on the DDP-wrapped ``model_chunks``; None when `none`."""
    tr = cfg.train
    if tr.comm_priority == "none":
        return None
    _check_megatron_version()
    groups = bucket_groups(model_chunks)
    for bg in groups:
        ddp = bg.ddp_config
        if not ddp.overlap_grad_reduce:
            raise RuntimeError("train.comm_priority: moe_first needs train.overlap_grad_reduce: true")
        if ddp.num_distributed_optimizer_instances != 1 or ddp.reduce_scatter_with_fp32_accumulation:
            raise RuntimeError("train.comm_priority: moe_first supports one distributed-optimizer "
                               "instance without reduce_scatter_with_fp32_accumulation")
    sched = CommPriorityScheduler(int(tr.grad_reduce_chunk_mb * 2**20), device=device)
    check = _ExchangeCheck(cfg.moe.impl)
    for bg in groups:
        bg.start_grad_sync = types.MethodType(
            functools.partial(_chunked_start_grad_sync, sched=sched, check=check), bg)
    n_disp = _instrument_dispatchers(model_chunks) if cfg.moe.impl == "megatron" else 0
    sizes = sorted({dist.get_world_size(g.intra_distributed_optimizer_instance_group
                                        if g.ddp_config.use_distributed_optimizer
                                        else g.data_parallel_group) for g in groups})
    logger.info("comm_priority moe_first: %d bucket groups (reduction group sizes %s) in chunks "
                "of <= %.3g MiB; exchange signal from %s", len(groups), sizes,
                tr.grad_reduce_chunk_mb,
                f"{n_disp} stock dispatchers" if cfg.moe.impl == "megatron" else "core/exchange.py")
    if sizes and sizes[-1] > 2:
        logger.info("comm_priority: reduction groups of > 2 ranks may sum an element in another "
                    "order than the unchunked bucket (last-bit differences, like another "
                    "bucket size); with 2 ranks the sums are bit-identical")
    return sched
