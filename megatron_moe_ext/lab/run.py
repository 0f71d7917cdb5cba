"""The layer benchmark of the scale lab: synchronous EP vs the product's FasterMoE path, with
emulated accelerators (no megatron-core import, so 64 workers fit on one machine).

Notation
--------
T      tokens per worker entering the layer (before top-k); k top-k; T k routed copies
E      experts; E_l = E / W per worker; H hidden; F ffn hidden size
W      workers = expert-parallel size; g smart-schedule group size
D      time dilation (lab seconds per cluster second)

What is real: processes, gloo, every message at its real size, the product's plan and executor
(:func:`core.exchange.smart_exchange`), shadow broadcast / reduce (:mod:`core.shadow`), the
shadow policies, and, under the emulator, the network stack with rate-limited links. What is
emulated: the accelerator (:class:`.accelerator.EmulatedAccelerator` sleeps the cluster's GEMM
time x D). The synchronous baseline is :func:`.baseline.sync_exchange` (Megatron's alltoall
dispatcher: all-to-all, compute, all-to-all). The router and the local permutation around the
exchange are not run (both implementations share them in the product); the small all-gather
of the routing counts is, in both.

``compute="real"`` swaps the emulated accelerator for a small real expert (a linear two-layer
MLP with the expert's parameter count), the time source being the CPU; used by the tests to
show that only the time source differs.
"""

from __future__ import annotations

import datetime
import gc
import logging
import os
import time
from dataclasses import dataclass
from typing import Optional

import numpy as np
import torch
import torch.distributed as dist

from ..bench.stats import median
from ..core.plan import build_plan
from ..core.popularity import PREDICTORS
from ..core.prefetch import DEFAULT_SLACK, PopularityState
from .accelerator import EmulatedAccelerator
from .layer import TORCH_DTYPES as _TORCH_DTYPES
from .layer import LabLayer, RealExperts
from .report import format_table, summarize, write_record
from .setup import (
    emulator_scale,
    iteration_counts,
    lab_counts,
    lab_topology,
    layer_transition,
    predict_impl,
    resolve_dilation,
    route_above,
)

logger = logging.getLogger(__name__)

__all__ = ["LabConfig", "RealExperts", "bench_layer", "lab_worker", "run_lab"]

IMPLS = ("megatron", "fastermoe")
"""megatron: synchronous EP (sync_exchange); fastermoe: smart_exchange + shadows."""
COMPUTE_MODES = ("emulated", "real")


@dataclass
class LabConfig:
    """One lab benchmark run (the options of scripts/bench_moe_layer.py that apply)."""

    cluster: str
    """Cluster YAML path or name; its layout is kept with as many nodes as W fills."""
    world_size: int = 4
    """W processes to spawn (ignored under torchrun, where WORLD_SIZE wins)."""
    impl: str = "both"
    """megatron, fastermoe or both."""
    tokens: int = 4096
    """T: tokens per worker entering the layer, before top-k."""
    hidden: int = 512
    """H."""
    ffn: int = 1024
    """F: expert inner size."""
    experts: int = 4
    """E in total, a multiple of W."""
    topk: int = 2
    """k."""
    skew: float = 0.0
    """Zipf exponent over experts (0: exactly balanced)."""
    vary_routing: bool = False
    """With skew > 0: the hot experts change from iteration to iteration."""
    routing: str = "exact"
    """exact: counts laid out exactly by the Zipf law (:func:`.setup.lab_counts`); scores:
    top-k of per-token router scores (:func:`.setup.score_counts`)."""
    gate: bool = False
    """With routing=scores: the topology-aware gate (core.gate.cap_offnode) caps off-node
    copies (both implementations see the gated routing)."""
    shadow: str = "never"
    """Shadow policy: never, predictor, model, top_k."""
    shadow_max_experts: int = 1
    """With top_k: experts shadowed every call."""
    prefetch: str = "none"
    """Shadow prefetch (``moe.fastermoe.shadow.prefetch``): with previous_iteration or
    previous_layer the run ``fastermoe_prefetch`` (FasterMoE with prefetch) joins the same
    iterations. previous_layer: the layer's routing is a layer below's (varying with
    --vary-routing) through a fixed expert permutation (:func:`.setup.route_above`)."""
    prefetch_slack: float = DEFAULT_SLACK
    """``moe.fastermoe.shadow.prefetch_slack`` (:func:`core.prefetch.use_prefetched`)."""
    attention: bool = False
    """Emulate the block before the layer (attention, router) in every timed forward: a sleep
    of the forward expert time of T tokens (the four H x H attention projections when
    F = 2H). A prefetched broadcast is issued before it."""
    group_size: int = 1
    """g of the smart schedule (groups follow the topology's group_order(g))."""
    dtype: str = "fp32"
    """fp32 or bf16: activations, messages and the cluster's GEMM rate."""
    iters: int = 10
    """Timed iterations."""
    warmup: int = 2
    """Untimed iterations first."""
    compute: str = "emulated"
    """emulated (sleeping accelerator) or real (small real expert, CPU time; tests)."""
    dilation: str = "auto"
    """'auto' (1 / emulator link scale under the emulator, else 1) or a factor D."""
    floor: bool = False
    """Compute zero (D = 0): with unlimited links this measures the box's own cost."""
    measure_floor: bool = False
    """Also time every implementation with compute zero in the same iterations (reported as
    ``lab.floor``): the box's own cost when links are unlimited (no emulator), else the
    compute-free time on the emulated links."""
    seed: int = 1234
    """Seed of the routing (and of the real expert's weights)."""
    json: Optional[str] = None
    """Write the results (rank 0) to this JSON file."""
    record: bool = False
    """Record plan, expert chunks and shadow sets per iteration (tests compare them)."""
    log_level: str = "INFO"
    """Rank-0 log level."""
    iteration: bool = False
    """Iteration mode (:mod:`.iteration`): L layers of emulated attention / dense compute, the
    MoE exchanges and the DDP gradient reductions of the model's dense parameters."""
    model: Optional[str] = None
    """With iteration: the model YAML (configs/models/*.yaml); H, F, E and k come from it."""
    layers: Optional[int] = None
    """With iteration: L, transformer layers of the pipeline (default: the model's)."""
    comm_priority: str = "both"
    """With iteration: none, moe_first (train.comm_priority) or both (time each)."""
    ddp_bucket_size: Optional[int] = None
    """With iteration: DDP bucket size in elements (default Megatron's max(40M, 1M x W))."""
    grad_reduce_chunk_mb: float = 4.0
    """With iteration and moe_first: chunk size in MiB (train.grad_reduce_chunk_mb)."""
    grad_scale: str = "1"
    """With iteration: reduce round(r x N) elements of a bucket of N: a factor r, or 'tokens'
    (r = tokens / the model's micro-batch tokens, so reductions shrink with the tokens)."""

    def validate(self) -> None:
        """Raise ValueError naming the bad option."""
        if self.impl not in (*IMPLS, "both"):
            raise ValueError(f"--impl {self.impl!r}: expected megatron, fastermoe or both")
        if self.compute not in COMPUTE_MODES:
            raise ValueError(f"--compute {self.compute!r}: expected one of {COMPUTE_MODES}")
        if self.dtype not in _TORCH_DTYPES:
            raise ValueError(f"--dtype {self.dtype!r}: expected one of {list(_TORCH_DTYPES)}")
        if min(self.tokens, self.hidden, self.ffn, self.experts, self.iters, self.world_size,
               self.group_size, self.topk) < 1 or self.warmup < 0:
            raise ValueError("--tokens, --hidden, --ffn, --experts, --iters, --world-size, "
                             "--group-size, --topk must be >= 1 and --warmup >= 0")
        if self.routing not in ("exact", "scores"):
            raise ValueError(f"--routing {self.routing!r}: expected exact or scores")
        if self.gate and self.routing != "scores":
            raise ValueError("--gate needs --routing scores (the gate acts on router scores)")
        if self.skew < 0:
            raise ValueError(f"--skew must be >= 0, got {self.skew}")
        if (self.floor or self.measure_floor) and self.compute != "emulated":
            raise ValueError("--floor / --measure-floor need --compute emulated")
        if self.floor and self.measure_floor:
            raise ValueError("--floor and --measure-floor exclude each other")
        if self.prefetch not in PREDICTORS:
            raise ValueError(f"--prefetch {self.prefetch!r}: expected one of {list(PREDICTORS)}")
        if self.prefetch != "none" and (self.shadow == "never" or self.impl == "megatron"):
            raise ValueError("--prefetch needs --shadow other than never and the fastermoe impl")
        if self.attention and self.compute != "emulated":
            raise ValueError("--attention needs --compute emulated")
        resolve_dilation(self.dilation)
        extra = [k for k, v in (("model", self.model), ("layers", self.layers),
                                ("ddp_bucket_size", self.ddp_bucket_size)) if v is not None]
        extra += [k for k, v, d in (("comm_priority", self.comm_priority, "both"),
                                    ("grad_reduce_chunk_mb", self.grad_reduce_chunk_mb, 4.0),
                                    ("grad_scale", self.grad_scale, "1")) if v != d]
        if extra and not self.iteration:
            raise ValueError(f"--{extra[0].replace('_', '-')} needs --iteration")
        if self.iteration:
            if self.compute != "emulated":
                raise ValueError("--iteration needs --compute emulated")
            if not self.model:
                raise ValueError("--iteration needs --model (a model YAML, e.g. "
                                 "configs/models/moe-gpt.yaml)")
            if self.routing != "exact":
                raise ValueError("--iteration supports --routing exact only (every layer "
                                 "keeps T k routed copies)")
            if self.comm_priority not in ("none", "moe_first", "both"):
                raise ValueError(f"--comm-priority {self.comm_priority!r}: expected none, "
                                 "moe_first or both")
            if (self.layers is not None and self.layers < 1) or (
                    self.ddp_bucket_size is not None and self.ddp_bucket_size < 1) or (
                    not self.grad_reduce_chunk_mb > 0):
                raise ValueError("--layers and --ddp-bucket-size must be >= 1 and "
                                 "--grad-reduce-chunk-mb > 0")
            if self.grad_scale != "tokens":
                try:
                    ok = float(self.grad_scale) > 0
                except ValueError:
                    ok = False
                if not ok:
                    raise ValueError(f"--grad-scale {self.grad_scale!r}: expected 'tokens' "
                                     "or a number > 0")


def _init_process_group() -> tuple[int, int]:
    if not dist.is_initialized():
        dist.init_process_group("gloo", timeout=datetime.timedelta(minutes=10))
    return dist.get_rank(), dist.get_world_size()


def _alone_alltoall(layer: LabLayer, rows: np.ndarray, x: torch.Tensor) -> float:
    """One all_to_all_single of the routed tokens alone (the overlap bound's A)."""
    e_l, rank = layer.e_l, layer.rank
    ins = [int(rows[rank, w * e_l:(w + 1) * e_l].sum()) for w in range(layer.world)]
    outs = [int(rows[s, rank * e_l:(rank + 1) * e_l].sum()) for s in range(layer.world)]
    out = x.new_empty((sum(outs), x.shape[1]))
    dist.barrier(group=layer.group)
    t0 = time.perf_counter()
    dist.all_to_all_single(out, x.detach(), outs, ins, group=layer.group)
    return time.perf_counter() - t0


def lab_worker(cfg: LabConfig) -> Optional[dict]:
    """Run the benchmark on this rank (process group from the torchrun environment); rank 0
    returns (and writes) the results, the others None."""
    cfg.validate()
    torch.set_num_threads(1)
    rank, _ = _init_process_group()
    logging.basicConfig(level=cfg.log_level.upper() if rank == 0 else "WARNING",
                        format=f"[lab rank {rank}] %(message)s", force=True)
    try:
        if cfg.iteration:
            from .iteration import bench_iteration

            return bench_iteration(cfg, dist.group.WORLD)
        return bench_layer(cfg, dist.group.WORLD)
    finally:
        dist.destroy_process_group()


def bench_layer(cfg: LabConfig, group: dist.ProcessGroup) -> Optional[dict]:
    """One benchmark over ``group`` (all its ranks call this); rank 0 returns the results."""
    cfg.validate()
    rank, world = dist.get_rank(group), dist.get_world_size(group)
    load_start = os.getloadavg()[0]
    local_world = int(os.environ.get("LOCAL_WORLD_SIZE", world))
    under_emulator = emulator_scale() is not None
    topo = lab_topology(cfg.cluster, world, local_world if under_emulator else None)
    dil, dil_source = resolve_dilation(cfg.dilation)
    if cfg.floor:
        dil, dil_source = 0.0, "floor: compute zero"
    dtype = _TORCH_DTYPES[cfg.dtype]
    if cfg.experts % world:
        raise ValueError(f"--experts {cfg.experts} must be a multiple of W={world}")
    e_l = cfg.experts // world
    if cfg.compute == "emulated":
        accel = EmulatedAccelerator.for_cluster(topo, cfg.dtype, cfg.hidden, cfg.ffn, dil)
        accel.stats.record = cfg.record
    else:
        accel = RealExperts(e_l, cfg.hidden, cfg.ffn, dtype, cfg.seed, rank * e_l)
        dil, dil_source = 1.0, "real compute"
    layer = LabLayer(cfg, rank, world, topo, accel, group)
    impls = list(IMPLS) if cfg.impl == "both" else [cfg.impl]
    runs = list(impls)
    if cfg.prefetch != "none":
        runs.append("fastermoe_prefetch")
    state = PopularityState(cfg.prefetch, cfg.experts) if cfg.prefetch != "none" else None
    if state is not None:
        for n in (0, 1):  # 0: the layer below (previous_layer), 1: the benchmarked layer
            state.register(n)
    sigma = layer_transition(cfg.experts, cfg.seed)
    prefetch_recs: list[dict] = []
    if cfg.skew > 0 and "megatron" in impls:
        runs.append("megatron_balanced")
    if cfg.measure_floor:
        runs += [f"floor_{name}" for name in impls]
    logger.info("lab: %s W=%d (%d per node), T=%d, H=%d, F=%d, E=%d, top-%d, skew=%g%s, %s "
                "routing%s, g=%d, shadow=%s, %s, compute=%s, D=%g (%s)", topo.spec.name, world,
                local_world, cfg.tokens, cfg.hidden, cfg.ffn, cfg.experts, cfg.topk, cfg.skew,
                " (varying)" if cfg.vary_routing else "", cfg.routing,
                " + topology gate" if cfg.gate else "", cfg.group_size, cfg.shadow, cfg.dtype,
                cfg.compute, dil, dil_source)

    n_rows = cfg.tokens * cfg.topk
    gen = torch.Generator().manual_seed(cfg.seed * 1000 + rank)
    x0 = torch.randn(n_rows, cfg.hidden, generator=gen).to(dtype)
    p0 = torch.rand(n_rows, generator=gen).to(dtype)
    gy = torch.randn(n_rows, cfg.hidden, generator=gen).to(dtype)
    times: dict[str, list[float]] = {}
    preds: dict[str, list[float]] = {}
    shadow_sets, records, alone_a2a, comp_fwd = [], [], [], []
    sleep_req = sleep_act = 0.0
    gc.disable()
    for it in range(cfg.warmup + cfg.iters):
        timed = it >= cfg.warmup
        rows = iteration_counts(topo, world, cfg.experts, cfg.tokens, cfg.topk, cfg.skew,
                                cfg.seed, it, cfg.vary_routing, cfg.routing, cfg.gate)
        bal = lab_counts(world, cfg.experts, cfg.tokens, cfg.topk, 0.0, cfg.seed, it)
        pred = idx_hi = None
        if state is not None:  # the layer below ran (its counts), then this layer predicts
            if cfg.prefetch == "previous_layer":
                below = rows
                rows, idx_lo, idx_hi = route_above(below, sigma, rank)
                state.observe(0, below, torch.as_tensor(idx_lo), group)
            pred = state.predict(1)[0]
        for name in (runs if it % 2 == 0 else runs[::-1]):
            r = bal if name == "megatron_balanced" else rows
            fn = layer.fastermoe if name.endswith("fastermoe") else layer.megatron
            if name == "fastermoe_prefetch":
                fn = lambda *a: layer.fastermoe(*a, prefetch=(pred,))  # noqa: E731
            if cfg.measure_floor:
                accel.dilation = 0.0 if name.startswith("floor_") else dil
            n = int(r[rank].sum())  # the gate may drop copies
            x = x0[:n].detach().requires_grad_(True)
            p = p0[:n].detach().requires_grad_(True)
            accel.stats.reset()
            dist.barrier(group=group)
            t0 = time.perf_counter()
            y = fn(x, p, r[rank])
            t1 = time.perf_counter()
            dist.barrier(group=group)
            t2 = time.perf_counter()
            y.backward(gy[:n])
            t3 = time.perf_counter()
            if not timed:
                continue
            times.setdefault(f"{name}.fwd", []).append(t1 - t0)
            times.setdefault(f"{name}.bwd", []).append(t3 - t2)
            if name.startswith("floor_"):
                continue
            sleep_req += accel.stats.requested_s
            sleep_act += accel.stats.actual_s
            if "fastermoe" in name:
                times.setdefault(f"{name}.exposed", []).append(layer.last_exposed_s)
            if name == "fastermoe_prefetch":
                prefetch_recs.append(dict(layer.last_prefetch, shadows=list(layer.last_shadows)))
            if name == "fastermoe":
                shadow_sets.append(list(layer.last_shadows))
            if cfg.record and name == "fastermoe":
                plan = build_plan(rows.tolist(), rank, world, min(cfg.group_size, world),
                                  layer.order, shadows=layer.last_shadows)
                records.append({
                    "shadows": list(layer.last_shadows),
                    "sent_per_step": plan.tokens_sent_per_step(),
                    "received_per_step": plan.tokens_received_per_step(),
                    "chunks": list(accel.stats.chunks),
                    "out": [list(y.shape), str(y.dtype)],
                    "grad_x": [list(x.grad.shape), str(x.grad.dtype)],
                })
            if rank == 0:
                label = "megatron" if name.startswith("megatron") else "fastermoe"
                sh = layer.last_shadows if label == "fastermoe" else []
                preds.setdefault(name, []).append(predict_impl(
                    r, topo, cfg.hidden, cfg.ffn, cfg.dtype, label, cfg.group_size,
                    sh).total_s)
        if state is not None:
            state.observe(1, rows, None if idx_hi is None else torch.as_tensor(idx_hi), group)
        if timed:
            alone_a2a.append(_alone_alltoall(layer, rows, x0[:int(rows[rank].sum())]))
            b_rank = int(rows[:, rank * e_l:(rank + 1) * e_l].sum())
            comp_fwd.append(accel.forward_seconds(b_rank) if cfg.compute == "emulated" else 0.0)
        gc.collect()
    gc.enable()

    # max over ranks of every per-iteration figure
    keys = sorted(times)
    flat = torch.tensor([v for k in keys for v in times[k]] + alone_a2a + comp_fwd
                        + [sleep_req, sleep_act], dtype=torch.float64)
    dist.all_reduce(flat, op=dist.ReduceOp.MAX, group=group)
    k = cfg.iters
    mx = {key: flat[i * k:(i + 1) * k].tolist() for i, key in enumerate(keys)}
    base = len(keys) * k
    a2a_mx, comp_mx = flat[base:base + k].tolist(), flat[base + k:base + 2 * k].tolist()
    sleep_req_mx, sleep_act_mx = float(flat[-2]), float(flat[-1])
    rec_all = [None] * world
    if cfg.record:
        dist.all_gather_object(rec_all, records, group=group)
    load_end = os.getloadavg()[0]
    results = None
    if rank == 0:
        results = summarize(cfg, topo, world, local_world, dil, dil_source, mx, preds,
                             shadow_sets, a2a_mx, comp_mx, sleep_req_mx, sleep_act_mx,
                             (load_start, load_end))
        for name, rec in results["impls"].items():
            if f"{name}.exposed" in mx:
                rec["exposed_broadcast_s"] = median(mx[f"{name}.exposed"])
        if prefetch_recs:
            n = len(prefetch_recs)
            results["prefetch"] = {
                "mode": cfg.prefetch, "slack": cfg.prefetch_slack,
                "used": sum(r["used"] for r in prefetch_recs) / n,
                "set_match": sum(r["set_match"] for r in prefetch_recs) / n}
        if cfg.record:
            results["records"] = rec_all
        write_record(cfg.json, results)
        print(format_table(results), flush=True)
    dist.barrier(group=group)
    return results


def run_lab(cfg: LabConfig) -> int:
    """Run :func:`lab_worker` here under torchrun, else on ``cfg.world_size`` spawned
    processes; returns an exit code."""
    from ..runtime.launch import run_workers

    cfg.validate()
    return run_workers(_worker_entry, cfg.world_size, cfg)


def _worker_entry(cfg: LabConfig) -> int:
    lab_worker(cfg)
    return 0
