"""Time one MoE layer: stock Megatron MoELayer (alltoall dispatcher) vs FasterMoELayer.

Front end: scripts/bench_moe_layer.py (its docstring defines every reported figure). Both
layers are real megatron-core modules built from the same spec with identical weights and
identical forced routing (megatron/layer_builder.py); forward and backward are timed
separately, implementations interleaved (ABBA), a barrier before each timed region, the max
over ranks per iteration, medians reported. The pieces alone (one all-to-all of the routed
tokens, the local experts' fwd / bwd) give the overlap bound; with skew > 0 stock Megatron is
also timed on balanced routing (the balance bound).

Public: :class:`LayerBenchOptions` (one field per command-line option), :func:`run` (spawn or
torchrun), :func:`worker` (one rank), :func:`layer_overrides`, :func:`build_case` (the layer
pair with its forced routing, shared with the validation sweep), :func:`predict`,
:func:`machine_info`, :func:`format_table`; the ratios and bounds: :mod:`.bounds`.

Notation: T tokens per rank, H hidden, E experts, W workers (= expert-parallel size).
"""

from __future__ import annotations

import dataclasses
import datetime
import gc
import json
import logging
import os
import platform
import warnings
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Optional, Sequence

from megatron_moe_ext.bench.bounds import bounds
from megatron_moe_ext.bench.stats import median as _median
from megatron_moe_ext.perf.topology import CLUSTER_DIR

logger = logging.getLogger("bench_moe_layer")
IMPLS = ("megatron", "fastermoe")
DEFAULT_CLUSTER = str(CLUSTER_DIR / "local-cpu.yaml")


@dataclass
class LayerBenchOptions:
    """What to benchmark (the options of scripts/bench_moe_layer.py, same names and defaults;
    the JSON's ``config`` is this object)."""

    impl: str = "both"
    """megatron | fastermoe | both: which implementation(s) to time."""
    world_size: int = 2
    """Processes to spawn = expert-parallel size (under torchrun WORLD_SIZE wins)."""
    tokens: int = 4096
    """Tokens per rank entering the layer, before top-k."""
    hidden: int = 512
    """Hidden size H."""
    ffn: int = 1024
    """Expert FFN hidden size."""
    experts: int = 4
    """Experts in total, a multiple of the world size."""
    topk: int = 2
    """Experts per token (1: the router uses pre-softmax)."""
    skew: float = 0.0
    """Zipf exponent of the forced routing (megatron_moe_ext.routing); 0 = exactly balanced."""
    shadow: str = "never"
    """FasterMoE shadow policy (moe.fastermoe.shadow.policy): never | predictor | model | top_k."""
    shadow_max_experts: int = 1
    """With shadow top_k: experts shadowed every iteration."""
    group_size: int = 1
    """FasterMoE smart-schedule group size g, must divide the world size."""
    dtype: str = "fp32"
    """fp32 | bf16: parameter / activation dtype."""
    iters: int = 10
    """Timed iterations per implementation."""
    warmup: int = 3
    """Untimed warm-up iterations per implementation."""
    json: Optional[str] = None
    """Write every result to this JSON file."""
    trace_dir: Optional[str] = None
    """After timing, one traced FasterMoE iteration: Chrome traces and timeline.png here."""
    cluster: str = DEFAULT_CLUSTER
    """Cluster YAML (or name) for the performance-model prediction."""
    seed: int = 1234
    """Seed of weights, inputs and routing."""
    threads: Optional[int] = None
    """Torch intra-op threads per process (default: OMP_NUM_THREADS, else cores / processes)."""
    overrides: list[str] = field(default_factory=list)
    """Extra dotted config overrides (KEY=VALUE)."""
    log_level: str = "INFO"
    """Rank-0 log level."""
    routing_trace: Optional[str] = None
    """Replay this routing trace (traffic/replay.py) instead of Zipf(skew): EP rank r's counts."""
    layer: Optional[int] = None
    """With routing_trace: the traced MoE layer number (default: the first)."""
    trace_record: int = -1
    """With routing_trace: index of the record (logged iteration) to replay, -1 the last."""

    def __post_init__(self) -> None:
        if min(self.iters, self.tokens, self.world_size) < 1 or self.warmup < 0:
            raise ValueError("--iters, --tokens and --world-size must be >= 1, --warmup >= 0")
        for key, allowed in (("impl", ("megatron", "fastermoe", "both")),
                             ("shadow", ("never", "predictor", "model", "top_k")),
                             ("dtype", ("fp32", "bf16"))):
            if getattr(self, key) not in allowed:
                raise ValueError(f"{key} must be one of {', '.join(allowed)}, "
                                 f"got {getattr(self, key)!r}")


def run(opts: LayerBenchOptions) -> int:
    """Run the benchmark: in this process under torchrun, else on ``opts.world_size`` spawned
    processes. Rank 0 prints the table and writes ``opts.json``."""
    from megatron_moe_ext.runtime.launch import run_workers, under_torchrun

    if under_torchrun():
        opts = dataclasses.replace(opts, world_size=int(os.environ["WORLD_SIZE"]))
    return run_workers(worker, opts.world_size, opts)


def layer_overrides(opts: LayerBenchOptions, world: int) -> list[str]:
    """The dotted config overrides of the benchmarked layer."""
    o = [f"model.hidden_size={opts.hidden}", f"model.ffn_hidden_size={opts.ffn}",
         f"model.seq_length={opts.tokens}", f"moe.num_experts={opts.experts}",
         f"moe.topk={opts.topk}", f"parallel.expert={world}",
         f"moe.fastermoe.group_size={opts.group_size}", f"train.precision={opts.dtype}",
         f"train.seed={opts.seed}", f"moe.fastermoe.shadow.policy={opts.shadow}",
         f"moe.fastermoe.shadow.max_experts={opts.shadow_max_experts}",
         f"moe.fastermoe.cluster={opts.cluster}"]
    if opts.topk == 1:
        o.append("moe.router.pre_softmax=true")
    return o + list(opts.overrides)


def predict(counts: Any, opts: LayerBenchOptions, world: int, shadows: Sequence[int] = (),
            cluster: Optional[str] = None) -> dict[str, Any]:
    """Performance-model predictions of the layer for the [W, E] ``counts``: sync for megatron,
    smart with g and ``shadows`` for fastermoe, on the topology the layer itself uses for its
    expert-parallel group (``perf.topology.ep_topology``) of the cluster ``cluster`` (default
    ``opts.cluster``). Never raises: a failed prediction is reported under ``error``."""
    import numpy as np

    from megatron_moe_ext.perf.model import predict_layer
    from megatron_moe_ext.perf.topology import ep_topology

    cluster = str(opts.cluster if cluster is None else cluster)
    res: dict[str, Any] = {"cluster": cluster}
    try:
        text = Path(cluster).read_text() if Path(cluster).is_file() else ""
        topo = ep_topology(cluster, world)  # the layer's EP-group -> topology mapping
        for impl, schedule in (("megatron", "sync"), ("fastermoe", "smart")):
            sh = list(shadows) if impl == "fastermoe" else []
            pred = predict_layer(np.asarray(counts), None, opts.hidden, opts.ffn / opts.hidden,
                                 None, topo, dtype=opts.dtype, schedule=schedule,
                                 group_size=opts.group_size, shadow_experts=sh)
            res[impl] = {"schedule": schedule, "group_size": pred.group_size, "shadows": sh,
                         "fwd_s": pred.fwd_s, "bwd_s": pred.bwd_s, "fwd_bwd_s": pred.total_s,
                         "comp_s": pred.comp_s, "comm_s": pred.comm_s}
        res["note"] = (
            f"{cluster} is a PLACEHOLDER until calibrated (scripts/calibrate.py): predicted "
            "times are indicative only" if "placeholder" in text.lower() else
            f"predicted with the numbers of {cluster} (see its header for how and when they "
            "were measured; on a shared CPU machine they are noisy)")
    except Exception as exc:  # the prediction is informative; never fail the benchmark on it
        res["error"] = f"{type(exc).__name__}: {exc}"
    return res


def machine_info() -> dict[str, Any]:
    """Where and when a benchmark ran (platform, versions, load, UTC date)."""
    import torch

    from megatron_moe_ext.megatron.layer_builder import megatron_version

    return {"platform": platform.platform(), "python": platform.python_version(),
            "cpu_count": os.cpu_count(), "torch": torch.__version__,
            "megatron_core": megatron_version(),
            "loadavg_1min": os.getloadavg()[0] if hasattr(os, "getloadavg") else None,
            "date_utc": datetime.datetime.now(datetime.timezone.utc).isoformat(timespec="seconds")}


@dataclass
class LayerCase:
    """One benchmarked configuration on this rank: the layer pair with its forced routing."""

    stock: Any
    """Stock Megatron MoELayer."""
    faster: Any
    """FasterMoELayer with the stock layer's weights."""
    x: Any
    """Input [T, 1, H]."""
    gy: Any
    """Output gradient [T, 1, H]."""
    routing_map: Any
    """Routing [T, E] (bool) the layers follow (the gated one with the topology-aware gate)."""
    bias: Any
    """Forced router logits [T, E]."""
    counts: list[list[int]]
    """All-gathered [W, E] routed-token counts."""
    gated: bool
    """Whether the topology-aware gate re-routes the forced routing."""

    @property
    def layers(self) -> dict[str, Any]:
        return {"megatron": self.stock, "fastermoe": self.faster}


def build_case(opts: LayerBenchOptions, pg: Any, rank: int, world: int, device: Any,
               what: str = "") -> LayerCase:
    """Build the layer pair of ``opts`` and force identical Zipf(opts.skew) routing on both
    (inputs and routing seeded per rank); collective over the expert-parallel group."""
    import torch

    from megatron_moe_ext.megatron import layer_builder as lb

    cfg = lb.config_from_overrides(layer_overrides(opts, world))
    stock, faster = lb.build_pair(cfg, pg, device=device)
    gated = cfg.moe.router.type == "topology_aware"  # the gate re-routes the forced routing
    dtype = torch.bfloat16 if opts.dtype == "bf16" else torch.float32
    gen = torch.Generator().manual_seed(opts.seed * 1000 + rank)
    x = torch.randn(opts.tokens, 1, opts.hidden, generator=gen).to(dtype).to(device)
    gy = torch.randn(opts.tokens, 1, opts.hidden, generator=gen).to(dtype).to(device)
    if opts.routing_trace:  # recorded routing (replay) instead of Zipf(skew)
        from megatron_moe_ext.traffic.replay import bench_routing

        routing_map, bias, _ = bench_routing(opts.routing_trace, rank, world, opts.experts,
                                             opts.topk, opts.tokens, opts.layer,
                                             opts.trace_record, seed=opts.seed * 1000 + rank)
    else:
        routing_map, bias = lb.make_routing(opts.tokens, opts.experts, opts.topk, opts.skew,
                                            seed=opts.seed * 1000 + rank)
    lb.apply_routing({"megatron": stock, "fastermoe": faster}, bias, x, routing_map, what=what,
                     gated=gated)
    counts = lb.gather_counts(routing_map, pg.ep)
    return LayerCase(stock, faster, x, gy, routing_map, bias, counts, gated)


def worker(opts: LayerBenchOptions) -> None:
    """One rank of the benchmark (every rank of the world calls it)."""
    import torch
    import torch.distributed as dist

    from megatron_moe_ext.runtime import device as rdev

    warnings.filterwarnings("ignore")
    rdev.quiet_known_warnings()
    from megatron_moe_ext.config import RuntimeConfig
    from megatron_moe_ext.megatron import layer_builder as lb

    rcfg = RuntimeConfig(device="auto", num_threads=opts.threads)
    dev = rdev.resolve_device(rcfg)
    rt = rdev.setup_runtime(rcfg, dev)
    rank, world = rt.rank, rt.world_size
    load_start = os.getloadavg()[0] if hasattr(os, "getloadavg") else None
    logging.basicConfig(level=opts.log_level.upper() if rank == 0 else "WARNING",
                        format=f"[rank {rank}] %(message)s", force=True)
    sync = rt.device.type == "cuda"
    pg = lb.init_expert_parallel(world, opts.seed)
    case = build_case(opts, pg, rank, world, dev)
    stock, faster = case.stock, case.faster
    layers = case.layers
    impls = list(IMPLS) if opts.impl == "both" else [opts.impl]
    dtype = torch.bfloat16 if opts.dtype == "bf16" else torch.float32
    logger.info("EP=%d, %d tokens/rank, H=%d, ffn=%d, E=%d, top-%d, skew=%g, g=%d, %s, "
                "%d threads/rank, %s", world, opts.tokens, opts.hidden, opts.ffn, opts.experts,
                opts.topk, opts.skew, opts.group_size, opts.dtype, torch.get_num_threads(),
                rt.device)

    # balance bound: stock Megatron also timed on balanced routing (its router re-forced)
    balanced = (opts.skew > 0 or bool(opts.routing_trace)) and "megatron" in impls
    runs = {name: (layers[name], case.bias) for name in impls}  # name -> (layer, logit bias)
    if balanced:
        bal_map, bal_bias = lb.make_routing(opts.tokens, opts.experts, opts.topk, 0.0,
                                            seed=opts.seed * 1000 + rank)
        lb.apply_routing({"megatron": stock}, bal_bias, case.x, bal_map, what="balanced ",
                         gated=case.gated)
        runs["megatron_balanced"] = (stock, bal_bias)
        bal_counts = lb.gather_counts(bal_map, pg.ep)

    counts = case.counts  # the routing actually used (all-gathered [W, E])
    results: dict = {"impls": {}, "routing": lb.describe_counts(counts, world)}
    e_l, wm = opts.experts // world, results["routing"]["worker_matrix"]
    alone = lb.Alone(stock.experts,
                     [sum(counts[rank][w * e_l:(w + 1) * e_l]) for w in range(world)],  # send
                     [wm[w][rank] for w in range(world)],  # receive
                     [sum(row[rank * e_l + e] for row in counts) for e in range(e_l)],
                     opts.hidden, dtype, pg.ep, sync, rt.device)

    # warm-up, then timed iterations; implementations interleaved (ABBA order), the pieces
    # alone timed in the same iterations so that all figures see the same machine load
    gc.disable()
    first_out, raw = {}, {}
    shadow_sets, layer_pred = [], []  # FasterMoE layer's last_shadows / last_predicted_s
    names = list(runs)

    def keep(key, region):
        raw.setdefault(key, []).append(region.wall)
        raw.setdefault(f"{key}_cpu", []).append(region.cpu)

    for it in range(opts.warmup + opts.iters):
        timed = it >= opts.warmup
        for name in (names if it % 2 == 0 else names[::-1]):
            layer, lbias = runs[name]
            if layer is stock and balanced:
                lb.force_routing(layer, lbias)  # stock alternates skewed / balanced routing
            out, f, b = lb.time_layer(layer, case.x, case.gy, sync)
            if name in layers:
                first_out.setdefault(name, out)
            if timed:
                keep(f"{name}.fwd", f)
                keep(f"{name}.bwd", b)
                if name == "fastermoe":
                    shadow_sets.append(list(faster.last_shadows))
                    layer_pred.append(faster.last_predicted_s)
        a = alone.alltoall()
        f, b = alone.experts_fwd_bwd()
        if timed:
            keep("alone.a2a", a)
            keep("alone.fwd", f)
            keep("alone.bwd", b)
        gc.collect()
    gc.enable()

    keys = sorted(raw)
    flat = lb.max_over_ranks([v for key in keys for v in raw[key]])
    k = opts.iters
    mx = {key: flat[i * k:(i + 1) * k] for i, key in enumerate(keys)}  # max over ranks
    distinct = []
    for sh in shadow_sets:
        if sh not in distinct:
            distinct.append(sh)
    results["shadow_policy"] = opts.shadow
    results["shadows"] = distinct  # distinct shadow sets chosen in the timed iterations
    results["shadow_set_counts"] = [shadow_sets.count(sh) for sh in distinct]
    prediction = predict(counts, opts, world, distinct[0] if distinct else ())
    layer_pred = [v for v in layer_pred if v is not None]
    if "fastermoe" in prediction and layer_pred:
        # the layer's own prediction of each timed call (fwd + bwd, with its shadows)
        prediction["fastermoe"]["layer_fwd_bwd_s"] = _median(layer_pred)
    if balanced:
        prediction["megatron_balanced"] = predict(bal_counts, opts, world).get("megatron")
    for name in names:
        results["impls"][name] = _impl_figures(mx, name, prediction.get(name) or {})
    if balanced:  # kept out of "impls": its own key, with its routing
        results["megatron_balanced"] = results["impls"].pop("megatron_balanced")
        results["megatron_balanced"]["routing"] = lb.describe_counts(bal_counts, world)
    results["prediction"] = prediction
    if len(first_out) == 2:
        a, b = first_out["fastermoe"].double(), first_out["megatron"].double()
        diff = (a - b).abs().max() / b.abs().max().clamp_min(1e-30)
        results["max_rel_diff_out"] = lb.max_over_ranks([diff.item()])[0]
    results.update(bounds(results, *(_median(mx[f"alone.{p}"]) for p in ("a2a", "fwd", "bwd"))))

    # one traced FasterMoE iteration (untimed) for the Chrome trace and timeline
    if opts.trace_dir and "fastermoe" in impls:
        results.update(_trace(opts, faster, case, sync, rank, world))

    if rank == 0:
        results["config"] = dataclasses.asdict(opts)
        results["config"].update(world_size=world, threads_per_rank=torch.get_num_threads(),
                                 device=str(rt.device), backend=rt.backend)
        results["machine"] = dict(machine_info(), loadavg_1min_start=load_start)
        print(format_table(results), flush=True)
        if opts.json:
            Path(opts.json).parent.mkdir(parents=True, exist_ok=True)
            Path(opts.json).write_text(json.dumps(results, indent=1))
            logger.info("wrote %s", opts.json)
    dist.barrier()
    lb.destroy_expert_parallel()
    dist.destroy_process_group()


def _impl_figures(mx: dict[str, list[float]], name: str, pred: dict[str, Any]) -> dict:
    """Medians (and spread) of one timed implementation from the max-over-ranks series."""
    fwd, bwd = mx[f"{name}.fwd"], mx[f"{name}.bwd"]
    tot = [a + b for a, b in zip(fwd, bwd)]
    cpu = [a + b for a, b in zip(mx[f"{name}.fwd_cpu"], mx[f"{name}.bwd_cpu"])]
    return {"fwd_s": _median(fwd), "bwd_s": _median(bwd), "fwd_bwd_s": _median(tot),
            "fwd_bwd_s_min": min(tot), "fwd_bwd_s_max": max(tot),
            "cpu_fwd_s": _median(mx[f"{name}.fwd_cpu"]),
            "cpu_bwd_s": _median(mx[f"{name}.bwd_cpu"]), "cpu_fwd_bwd_s": _median(cpu),
            "predicted_fwd_bwd_s": pred.get("layer_fwd_bwd_s") or pred.get("fwd_bwd_s"),
            "fwd_s_iters": fwd, "bwd_s_iters": bwd}


def _trace(opts: LayerBenchOptions, faster: Any, case: LayerCase, sync: bool, rank: int,
           world: int) -> dict[str, Any]:
    """One traced, untimed FasterMoE iteration: Chrome traces of every rank, rank 0's PNG."""
    import torch.distributed as dist

    from megatron_moe_ext.core.trace import Tracer
    from megatron_moe_ext.megatron import layer_builder as lb

    faster.tracer = Tracer(rank=dist.get_rank(), cuda_sync=sync)
    lb.time_layer(faster, case.x, case.gy, sync)
    path = faster.write_trace(opts.trace_dir)
    faster.tracer = None
    paths = [None] * world
    dist.all_gather_object(paths, path)
    out: dict[str, Any] = {"traces": paths}
    if rank == 0:
        from megatron_moe_ext.bench.timeline import load_spans, render

        png = str(Path(opts.trace_dir) / "timeline.png")
        try:
            render(load_spans(paths), png,
                   f"FasterMoE EP={world} g={opts.group_size}, {opts.tokens} tok/rank, "
                   f"H={opts.hidden}, top-{opts.topk}, skew={opts.skew:g}")
            out["timeline_png"] = png
        except Exception as exc:  # matplotlib missing or broken: the traces are still written
            logger.warning("timeline PNG not written: %s", exc)
            out["timeline_png"] = None
    return out


def format_table(r: dict) -> str:
    """The human-readable summary printed by rank 0."""
    def ms(v):
        return f"{v * 1e3:10.2f}" if v is not None else f"{'-':>10}"

    lines = [f"{'impl':<10} {'fwd ms':>10} {'bwd ms':>10} {'fwd+bwd ms':>10} {'pred ms':>10}"]
    rows = list(r["impls"].items())
    if r.get("megatron_balanced"):
        rows.append(("meg@bal", r["megatron_balanced"]))
    for name, v in rows:
        lines.append(f"{name:<10} {ms(v['fwd_s'])} {ms(v['bwd_s'])} {ms(v['fwd_bwd_s'])} "
                     f"{ms(v.get('predicted_fwd_bwd_s'))}")
    if "ratio_fwd_bwd" in r:
        lines.append(f"{'ratio m/f':<10} {r['ratio_fwd']:10.3f} {r['ratio_bwd']:10.3f} "
                     f"{r['ratio_fwd_bwd']:10.3f}")
        lines.append(f"fwd+bwd ratio, paired per iteration {r['ratio_fwd_bwd_paired']:.3f}, of "
                     f"minima {r['ratio_fwd_bwd_min']:.3f}, of CPU times "
                     f"{r['ratio_cpu_fwd_bwd']:.3f}")
    if r.get("balance_bound") is not None:
        bf = r.get("bound_fraction")
        lines.append(f"balance_bound (megatron skewed / balanced) {r['balance_bound']:.3f} "
                     f"(paired {r['balance_bound_paired']:.3f}), bound_fraction "
                     f"{'-' if bf is None else f'{bf:.3f}'}"
                     + (f" (paired {r['bound_fraction_paired']:.3f})" if bf is not None else ""))
        lines.append(f"from CPU times: balance_bound {r['balance_bound_cpu']:.3f}"
                     + (f", bound_fraction {r['bound_fraction_cpu']:.3f}"
                        if "bound_fraction_cpu" in r else ""))
    if r.get("shadow_policy", "never") != "never" or r.get("shadows"):
        sets = ", ".join(f"{s} x{n}" for s, n in zip(r["shadows"], r["shadow_set_counts"]))
        lines.append(f"shadows ({r['shadow_policy']}): {sets or '-'}")
    o = r["overlap"]
    frac = r["bound_fraction_schedule"]
    lines.append(f"alone: all-to-all {o['alltoall_s'] * 1e3:.2f} ms, experts fwd "
                 f"{o['expert_fwd_s'] * 1e3:.2f} / bwd {o['expert_bwd_s'] * 1e3:.2f} ms; "
                 f"overlap bound {o['bound']:.3f}, bound_fraction_schedule "
                 f"{'-' if frac is None else f'{frac:.3f}'}")
    rt = r["routing"]
    lines.append(f"routing: worker loads {rt['worker_loads']}, imbalance "
                 f"{rt['imbalance_max_over_mean']:.3f}, remote {rt['remote_fraction']:.3f}")
    if "max_rel_diff_out" in r:
        lines.append(f"max rel diff of outputs fastermoe vs megatron: {r['max_rel_diff_out']:.2e}")
    note = r["prediction"].get("note") or r["prediction"].get("error")
    if note:
        lines.append(f"prediction: {note}")
    return "\n".join(lines)
