"""Iteration mode of the scale lab: L transformer layers of emulated compute, the MoE exchanges
for real, and the data-parallel gradient reductions of the model's dense parameters, bucketed
as Megatron DDP buckets them, with and without the communication priority (Lina, issue 12).

Notation
--------
L      transformer layers of the pipeline (``--layers``, default the model's)
T      tokens per worker per iteration (one micro-batch); T k routed copies enter each exchange
W      workers; EP = W, so every worker holds the dense replica and the data-parallel group of
       the dense parameters is the whole world (a group of its own, as in Megatron)
D      time dilation (lab seconds per cluster second); P(t) the cluster's GEMM throughput
B      DDP bucket size in elements (``--ddp-bucket-size``; default Megatron's max(40M, 1M x W))
r      gradient byte scale: a bucket of N elements all-reduces round(r N) elements
       (1 = the model's real bytes; ``tokens`` = T / (micro_batch_size x seq_length), so that
       the reductions shrink with the tokens like compute and token traffic do)
c      chunk bytes under ``moe_first``: ``--grad-reduce-chunk-mb`` (train.grad_reduce_chunk_mb,
       cluster MiB) x r, so a bucket keeps its number of chunks

One iteration on every rank (the stages of :func:`megatron_moe_ext.describe.iteration_stages`)::

    forward   embedding; per layer: dense part (sleep D x flops_per_token x T / P(T): attention,
              router or dense MLP, the model's FLOPs), then the MoE exchange (lab.layer.LabLayer:
              sync baseline or smart_exchange, emulated experts); head (logits)
    backward  reversed; each stage's dense backward sleeps 2x its forward, then its dense
              parameters are ready; a bucket whose parameters are all ready is all-reduced
              asynchronously over the DP group, either directly (priority none) or cut into
              chunks of c bytes through CommPriorityScheduler (moe_first), which holds chunks
              while an exchange is in flight (exchange_in_flight(): smart_exchange raises it
              itself; the sync baseline's all-to-alls are marked here as the training install
              marks Megatron's dispatcher)
    end       wait for every reduction (flush); the iteration ends on the slowest rank

The buckets follow Megatron's rule (megatron-core ``_ParamAndGradBuffer``): parameters in
reverse registration order, a bucket closes once it holds >= B elements. Not modelled: the
optimizer step, the distributed optimizer's reduce-scatter (an all-reduce is used, as FastMoE's
data parallelism does), the shared-embedding bucket of the distributed optimizer and padding.
"""

from __future__ import annotations

import gc
import logging
import math
import os
import time
from dataclasses import dataclass
from typing import Callable, Optional, Sequence

import torch
import torch.distributed as dist

from ..bench.stats import median
from ..core.comm_priority import CommPriorityScheduler, all_reduce_chunks, exchange_signal
from .accelerator import EmulatedAccelerator, sleep_until

logger = logging.getLogger(__name__)

__all__ = ["Bucket", "GradReducer", "PRIORITIES", "bench_iteration", "bucket_plan",
           "default_bucket_size", "merge_intervals", "model_stages", "overlap_seconds",
           "run_iterations", "summarize_iterations"]

PRIORITIES = ("none", "moe_first")
"""train.comm_priority values the iteration mode times."""


def default_bucket_size(dp_size: int) -> int:
    """Megatron DDP's default bucket size with overlap_grad_reduce: max(40M, 1M x DP)."""
    return max(40_000_000, 1_000_000 * dp_size)


@dataclass(frozen=True)
class Bucket:
    """One DDP bucket: its parameters in backward order and the stage that completes it."""

    index: int
    params: tuple[tuple[str, str, int], ...]
    """(stage, parameter, elements) in the order the bucket was filled (backward order)."""
    ready_after: str
    """The stage whose backward makes the last of its parameters ready."""

    @property
    def numel(self) -> int:
        return sum(n for _, _, n in self.params)


def bucket_plan(stages: Sequence[tuple[str, Sequence[tuple[str, int]]]],
                bucket_size: Optional[int]) -> list[Bucket]:
    """Megatron's bucketing of ``stages`` [(stage, [(param, elements)] in registration order)]
    given in forward order: parameters in reverse order, a bucket closes as soon as it holds
    >= ``bucket_size`` elements (None: one bucket). Bucket 0 is the first one backward fills."""
    if bucket_size is not None and bucket_size < 1:
        raise ValueError(f"bucket_size must be >= 1 or None, got {bucket_size}")
    buckets: list[Bucket] = []
    cur: list[tuple[str, str, int]] = []
    for stage, params in reversed(list(stages)):
        for name, n in reversed(list(params)):
            cur.append((stage, name, int(n)))
            if bucket_size is not None and sum(p[2] for p in cur) >= bucket_size:
                buckets.append(Bucket(len(buckets), tuple(cur), stage))
                cur = []
    if cur:
        buckets.append(Bucket(len(buckets), tuple(cur), cur[-1][0]))
    return buckets


def merge_intervals(xs: Sequence[Sequence[float]]) -> list[tuple[float, float]]:
    """The union of [start, end] intervals as sorted disjoint intervals."""
    out: list[tuple[float, float]] = []
    for s, e in sorted((float(a), float(b)) for a, b in xs if b > a):
        if out and s <= out[-1][1]:
            out[-1] = (out[-1][0], max(out[-1][1], e))
        else:
            out.append((s, e))
    return out


def overlap_seconds(a: Sequence[Sequence[float]], b: Sequence[Sequence[float]]) -> float:
    """Length of (union of ``a``) intersected with (union of ``b``)."""
    ma, mb = merge_intervals(a), merge_intervals(b)
    total, j = 0.0, 0
    for s, e in ma:
        while j < len(mb) and mb[j][1] <= s:
            j += 1
        k = j
        while k < len(mb) and mb[k][0] < e:
            total += min(e, mb[k][1]) - max(s, mb[k][0])
            k += 1
    return total


def model_stages(model: str, layers: Optional[int]) -> tuple[object, list[dict]]:
    """(run config, :func:`describe.iteration_stages`) of the model YAML with L layers."""
    from ..config import load_config
    from ..describe import iteration_stages, resolve_vocab

    # the lab reads no data: data.mock keeps a model file without data.path valid
    cfg = load_config(model, ["data.mock=true"] + ([f"model.num_layers={layers}"] if layers
                                                    else []))
    vocab, _ = resolve_vocab(cfg)
    return cfg, iteration_stages(cfg, vocab)


class GradReducer:
    """The DDP gradient reduction of one iteration: flat bucket buffers of round(r N) elements,
    launched when the stage completing them has finished its backward."""

    def __init__(self, plan: Sequence[Bucket], group: dist.ProcessGroup, priority: str,
                 chunk_bytes: int, scale: float, dtype: torch.dtype) -> None:
        if priority not in PRIORITIES:
            raise ValueError(f"comm_priority {priority!r}: expected one of {PRIORITIES}")
        self.plan, self.group, self.priority, self.chunk_bytes = plan, group, priority, chunk_bytes
        self.buffers = [torch.zeros(max(1, round(scale * b.numel)), dtype=dtype) for b in plan]
        self.after: dict[str, list[int]] = {}
        for b in plan:
            self.after.setdefault(b.ready_after, []).append(b.index)
        self.sched = (CommPriorityScheduler(chunk_bytes) if priority == "moe_first" else None)
        self.works: list = []
        self.intervals: list[list[float]] = []
        """[issue, completion] (perf_counter) of every collective posted."""
        self.launched: list[int] = []
        """Bucket indices in launch order."""

    def _timed(self, issue: Callable[[], object]) -> Callable[[], object]:
        def run():
            rec = [time.perf_counter(), float("nan")]
            self.intervals.append(rec)
            work = issue()
            work.get_future().then(lambda _f: rec.__setitem__(1, time.perf_counter()))
            return work
        return run

    def stage_done(self, stage: str) -> None:
        """The stage's backward finished: launch the buckets it completes."""
        for i in self.after.get(stage, []):
            self.launched.append(i)
            buf = self.buffers[i]
            if self.sched is None:
                self.works.append(self._timed(
                    lambda b=buf: dist.all_reduce(b, group=self.group, async_op=True))())
                continue
            for issue, nbytes in all_reduce_chunks(buf, self.group, dist.ReduceOp.SUM,
                                                   self.chunk_bytes):
                self.sched.submit("dp", f"bucket{i}", self._timed(issue), nbytes)

    def finish(self) -> None:
        """End of backward: flush the scheduler / wait for every posted all-reduce."""
        if self.sched is not None:
            self.sched.flush()
        for w in self.works:
            w.wait()
        self.works = []
        now = time.perf_counter()
        for rec in self.intervals:  # a completion callback not run yet: now is an upper bound
            if math.isnan(rec[1]):
                rec[1] = now

    def held_chunks(self) -> tuple[int, int, float]:
        """(chunks issued, chunks held behind an exchange, longest hold s); clears records."""
        if self.sched is None:
            return len(self.intervals), 0, 0.0
        recs = self.sched.clear_records()
        held = [r.held_s for r in recs if r.held_by_exchange]
        return len(recs), len(held), max(held, default=0.0)

    def close(self) -> None:
        if self.sched is not None:
            self.sched.close()


class _Stage(torch.autograd.Function):
    """y = x; forward sleeps ``fwd_s``, backward 2 x ``fwd_s``, then calls ``done()``."""

    @staticmethod
    def forward(ctx, acc: EmulatedAccelerator, fwd_s: float, done: Callable[[], None],
                x: torch.Tensor) -> torch.Tensor:
        start = time.perf_counter()
        ctx.acc, ctx.fwd, ctx.done = acc, fwd_s, done
        end = sleep_until(start + fwd_s)
        acc.stats.add("dense_fwd", 0, fwd_s, end - start)
        return x.view_as(x)

    @staticmethod
    @torch.autograd.function.once_differentiable
    def backward(ctx, g: torch.Tensor):
        start = time.perf_counter()
        end = sleep_until(start + 2.0 * ctx.fwd)
        ctx.acc.stats.add("dense_bwd", 0, 2.0 * ctx.fwd, end - start)
        ctx.done()
        return None, None, None, g


class _OnBackward(torch.autograd.Function):
    """y = x; when the gradient passes through, call ``fn()`` (signal markers of the sync
    baseline's backward all-to-alls)."""

    @staticmethod
    def forward(ctx, fn: Callable[[], None], x: torch.Tensor) -> torch.Tensor:
        ctx.fn = fn
        return x.view_as(x)

    @staticmethod
    def backward(ctx, g: torch.Tensor):
        ctx.fn()
        return None, g


class _MarkedExperts:
    """The accelerator with the exchange signal lowered around the expert compute, so that
    only the sync baseline's all-to-alls count as in flight (forward and backward)."""

    def __init__(self, acc: EmulatedAccelerator) -> None:
        self.acc = acc

    def expert_fn(self, x, p, tokens_per_expert):
        sig = exchange_signal()
        x = _OnBackward.apply(sig.begin, x)  # backward: expert done -> dispatch's a2a next
        sig.end()
        try:
            y = self.acc.expert_fn(x, p, tokens_per_expert)
        finally:
            sig.begin()
        return _OnBackward.apply(sig.end, y)  # backward: combine's a2a done -> expert next


def _sync_marked(layer, x, p, row):
    """layer.megatron with the signal up around its all-to-alls (forward and backward)."""
    sig = exchange_signal()
    x = _OnBackward.apply(sig.end, x)  # backward: the dispatch's a2a has returned dx
    with sig.in_flight():
        y = layer.megatron(x, p, row)
    return _OnBackward.apply(sig.begin, y)  # backward: dy arrives, the combine's a2a starts


def reducer_chunk_bytes(cfg, scale: float) -> int:
    """c in the lab: ``--grad-reduce-chunk-mb`` (cluster MiB) x r, so that a bucket keeps
    the number of chunks it has on the cluster."""
    return max(1, int(cfg.grad_reduce_chunk_mb * 2 ** 20 * scale))


def run_iterations(cfg, layers: dict, accel: EmulatedAccelerator, stages: list[dict],
                   plan: list[Bucket], counts_fn: Callable[[int, int], object],
                   variants: list[tuple[str, str, bool]], dp_group: dist.ProcessGroup,
                   group: dist.ProcessGroup, scale: float, dil: float) -> dict:
    """Time ``variants`` [(impl, priority, floor)] for cfg.warmup + cfg.iters iterations
    (order alternating per iteration) with ``layers[impl]`` (lab.layer.LabLayer); returns
    per-variant lists of this rank's figures."""
    rank = dist.get_rank(group)
    dtype = layers["fastermoe"].dtype
    n = cfg.tokens * cfg.topk
    gen = torch.Generator().manual_seed(cfg.seed * 1000 + rank)
    x0 = torch.randn(n, cfg.hidden, generator=gen).to(dtype)
    p0 = torch.rand(n, generator=gen).to(dtype)
    gy = torch.randn(n, cfg.hidden, generator=gen).to(dtype)
    chunk = reducer_chunk_bytes(cfg, scale)
    reducers = {pr: GradReducer(plan, dp_group, pr, chunk, scale, dtype) for pr in PRIORITIES}
    sig = exchange_signal()
    out: dict[str, dict[str, list]] = {}
    names = [f"{'floor_' if fl else ''}{impl}.{pr}" for impl, pr, fl in variants]
    gc.disable()
    try:
        for it in range(cfg.warmup + cfg.iters):
            rows = [counts_fn(it, li) for li in range(len(stages) - 2)]
            order = list(zip(names, variants))
            for name, (impl, pr, fl) in (order if it % 2 == 0 else order[::-1]):
                red = reducers[pr]
                accel.dilation = 0.0 if fl else dil
                red.intervals, red.launched = [], []
                red.held_chunks()
                accel.stats.reset()
                sig.timeline = []
                moe = layers["fastermoe"].fastermoe if impl == "fastermoe" else (
                    lambda x, p, r: _sync_marked(layers["megatron"], x, p, r))
                dist.barrier(group=group)
                t0 = time.perf_counter()
                h = x0.detach().requires_grad_(True)
                li = 0
                for st in stages:
                    fwd = accel.flops_seconds(st["flops_per_token"], cfg.tokens)
                    h = _Stage.apply(accel, fwd, lambda s=st["name"], r=red: r.stage_done(s), h)
                    if st["name"].startswith("layer"):
                        if st["moe"]:
                            p = p0.detach().requires_grad_(True)
                            h = moe(h, p, rows[li][rank])
                        li += 1
                t1 = time.perf_counter()
                h.backward(gy)
                t2 = time.perf_counter()
                red.finish()
                t3 = time.perf_counter()
                timeline, sig.timeline = sig.timeline, None
                if it < cfg.warmup:
                    continue
                issued, held, longest = red.held_chunks()
                red_busy = sum(e - s for s, e in merge_intervals(red.intervals))
                exch = [[s, e if not math.isnan(e) else t3] for s, e in timeline]
                rec = out.setdefault(name, {})
                for key, v in (("iteration_s", t3 - t0), ("fwd_s", t1 - t0), ("bwd_s", t2 - t1),
                               ("flush_s", t3 - t2), ("reduction_busy_s", red_busy),
                               ("reduction_in_exchange_s",
                                overlap_seconds(red.intervals, exch)),
                               ("exchange_busy_s", sum(e - s for s, e in merge_intervals(exch))),
                               ("buckets", len(red.launched)), ("chunks", issued),
                               ("held_chunks", held), ("longest_hold_s", longest),
                               ("sleep_requested_s", accel.stats.requested_s),
                               ("sleep_actual_s", accel.stats.actual_s)):
                    rec.setdefault(key, []).append(float(v))
                rec["launch_order"] = list(red.launched)
            gc.collect()
        # the reduction alone (no exchange, no compute): all buckets posted at once, once
        dist.barrier(group=group)
        t0 = time.perf_counter()
        works = [dist.all_reduce(b, group=dp_group, async_op=True)
                 for b in reducers["none"].buffers]
        for w in works:
            w.wait()
        alone = time.perf_counter() - t0
    finally:
        gc.enable()
        sig.timeline = None
        for red in reducers.values():
            red.close()
        accel.dilation = dil
    return {"variants": out, "reduction_alone_s": alone}


def summarize_iterations(local: dict, group: dist.ProcessGroup) -> dict:
    """Every figure reduced over ranks: iteration times and byte counts by max, overlap and
    hold figures by mean; then medians over iterations. Collective: every rank calls it."""
    world = dist.get_world_size(group)
    var = local["variants"]
    keys = [(name, k) for name in sorted(var) for k in sorted(var[name]) if k != "launch_order"]
    flat = torch.tensor([x for name, k in keys for x in var[name][k]]
                        + [local["reduction_alone_s"]], dtype=torch.float64)
    mx, mean = flat.clone(), flat.clone()
    dist.all_reduce(mx, op=dist.ReduceOp.MAX, group=group)
    dist.all_reduce(mean, op=dist.ReduceOp.SUM, group=group)
    mean /= world
    res: dict = {}
    off = 0
    by_max = ("iteration_s", "fwd_s", "bwd_s", "flush_s", "buckets", "chunks", "longest_hold_s")
    for name, k in keys:
        cnt = len(var[name][k])
        vals = (mx if k in by_max else mean)[off:off + cnt].tolist()
        off += cnt
        r = res.setdefault(name, {})
        r[k] = median(vals)
        if k == "iteration_s":
            r["iteration_s_iters"] = vals
    for name, r in res.items():
        r["launch_order"] = var[name]["launch_order"]
        busy = r["reduction_busy_s"]
        r["reduction_in_exchange_share"] = r["reduction_in_exchange_s"] / busy if busy else None
    return {"variants": res, "reduction_alone_s": float(mx[-1])}


def _grad_scale(value: str, tokens: int, model_cfg) -> tuple[float, float]:
    """(r, token scale T / (micro_batch_size x seq_length)) for ``--grad-scale x|tokens``
    (validated by LabConfig)."""
    token_scale = tokens / (model_cfg.train.micro_batch_size * model_cfg.model.seq_length)
    return (token_scale if value == "tokens" else float(value)), token_scale


def bench_iteration(cfg, group: dist.ProcessGroup) -> Optional[dict]:
    """The iteration mode over ``group`` (all its ranks call this); rank 0 returns the record."""

    from .report import common_record, format_iteration, iteration_record, write_record
    from .layer import LabLayer
    from .setup import emulator_scale, lab_counts, lab_topology, resolve_dilation

    cfg.validate()
    rank, world = dist.get_rank(group), dist.get_world_size(group)
    load_start = os.getloadavg()[0]
    local_world = int(os.environ.get("LOCAL_WORLD_SIZE", world))
    topo = lab_topology(cfg.cluster, world, local_world if emulator_scale() is not None else None)
    dil, dil_source = resolve_dilation(cfg.dilation)
    if cfg.floor:
        dil, dil_source = 0.0, "floor: compute zero"
    model_cfg, stages = model_stages(cfg.model, cfg.layers)
    shape = (model_cfg.model.hidden_size, model_cfg.moe.ffn_hidden_size
             or model_cfg.model.ffn_hidden_size, model_cfg.moe.num_experts, model_cfg.moe.topk)
    if (cfg.hidden, cfg.ffn, cfg.experts, cfg.topk) != shape:
        mine = (cfg.hidden, cfg.ffn, cfg.experts, cfg.topk)
        raise ValueError(f"hidden, ffn, experts, topk {mine} differ from the model's {shape} "
                         f"({cfg.model})")
    if cfg.experts % world:
        raise ValueError(f"the model's {cfg.experts} experts are not a multiple of W={world}")
    r, token_scale = _grad_scale(cfg.grad_scale, cfg.tokens, model_cfg)
    bsize = cfg.ddp_bucket_size or default_bucket_size(world)
    plan = bucket_plan([(s["name"], s["dense_params"]) for s in stages], bsize)
    accel = EmulatedAccelerator.for_cluster(topo, cfg.dtype, cfg.hidden, cfg.ffn, dil)
    # the sync baseline's experts lower the signal: only its all-to-alls are in flight
    layers = {"megatron": LabLayer(cfg, rank, world, topo, _MarkedExperts(accel), group),
              "fastermoe": LabLayer(cfg, rank, world, topo, accel, group)}
    dp_group = dist.new_group(list(range(world)))  # the dense parameters' DP group
    impls = ["megatron", "fastermoe"] if cfg.impl == "both" else [cfg.impl]
    prios = list(PRIORITIES) if cfg.comm_priority == "both" else [cfg.comm_priority]
    variants = [(i, p, False) for i in impls for p in prios]
    if cfg.measure_floor:
        variants += [(i, "none", True) for i in impls]
    logger.info("lab iteration: %s W=%d, model %s L=%d, T=%d (model %d: token scale %.4g), "
                "H=%d F=%d E=%d top-%d, D=%g (%s), %d buckets of B=%d elements, grad scale "
                "%.4g, chunk %g MiB", topo.spec.name, world, cfg.model, len(stages) - 2,
                cfg.tokens, round(cfg.tokens / token_scale), token_scale, cfg.hidden, cfg.ffn,
                cfg.experts, cfg.topk, dil, dil_source, len(plan), bsize, r,
                cfg.grad_reduce_chunk_mb)

    def counts(it: int, li: int):
        return lab_counts(world, cfg.experts, cfg.tokens, cfg.topk, cfg.skew, cfg.seed,
                          it * 1000 + li, cfg.vary_routing)

    local = run_iterations(cfg, layers, accel, stages, plan, counts, variants, dp_group, group,
                           r, dil)
    summ = summarize_iterations(local, group)
    sleep = torch.tensor([sum(v["sleep_requested_s"]) for k, v in local["variants"].items()
                          if not k.startswith("floor_")]
                         + [sum(v["sleep_actual_s"]) for k, v in local["variants"].items()
                            if not k.startswith("floor_")], dtype=torch.float64)
    dist.all_reduce(sleep, op=dist.ReduceOp.MAX, group=group)
    half = len(sleep) // 2
    load_end = os.getloadavg()[0]
    result = None
    if rank == 0:
        result = common_record(cfg, topo, world, local_world, dil, dil_source,
                               float(sleep[:half].sum()), float(sleep[half:].sum()),
                               (load_start, load_end))
        result["mode"] = "iteration"
        result["iteration"] = iteration_record(cfg, summ, stages, plan, bsize, r, token_scale,
                                               dil, reducer_chunk_bytes(cfg, r))
        write_record(cfg.json, result)
        print(format_iteration(result), flush=True)
    dist.barrier(group=group)
    return result
