#!/usr/bin/env python
"""Time one MoE layer: stock Megatron MoELayer (alltoall dispatcher) vs FasterMoELayer.

Both layers are real megatron-core modules built from the same spec with identical weights and
identical (forced) routing, see megatron_moe_ext/megatron/layer_builder.py. Forward and backward
are timed separately: warm-up iterations, then --iters timed iterations (the implementations are
interleaved, alternating which goes first), a barrier before each timed region, each rank times
itself and the max over ranks is taken per iteration; reported figures are medians.
fwd_bwd_s is the median over iterations of (max-rank fwd + max-rank bwd).

Overlap bound (paper Section 4.2, per layer): bound = (Lat_comm + Lat_comp) / max(Lat_comm,
Lat_comp), with Lat_comm = 4 A (dispatch + combine, forward and backward), A the measured time of
one all_to_all_single of the same routed tokens alone, and Lat_comp = C_fwd + C_bwd, the measured
local expert compute alone (SequentialMLP forward / backward on the tokens this rank's experts
receive); all medians of the per-iteration max over ranks, measured in the same run. achieved =
ratio_fwd_bwd (megatron / fastermoe); bound_fraction_schedule = (achieved - 1) / (bound - 1)
when bound > 1 (1.0: the schedule gets all the overlap the bound allows; <= 0: no gain).

Shadow experts (--shadow never|predictor|model|top_k, --shadow-max-experts N for top_k) are
applied to the FasterMoE layer (moe.fastermoe.shadow.*); the sets it chose in the timed iterations
(`last_shadows`) are reported as `shadows` (distinct sets), and its predicted_fwd_bwd_s is the
median of the layer's own `last_predicted_s` (smart schedule with those shadows).

Balance bound (--skew > 0 with megatron timed): stock Megatron is also timed on exactly balanced
routing (skew 0, same sizes and token count), interleaved in the same iterations.
balance_bound = megatron skewed fwd+bwd / megatron balanced fwd+bwd (what perfect balancing
would give stock Megatron); bound_fraction = ratio_fwd_bwd (megatron / fastermoe, skewed) /
balance_bound (1.0: FasterMoE on skewed routing is as fast as stock Megatron on balanced routing).

Starts its own processes (torch.multiprocessing spawn, gloo, the CPU runtime) or, when RANK and
WORLD_SIZE are set, runs as one rank under torchrun. Pure expert parallelism: EP = world size.

Examples:
    python scripts/bench_moe_layer.py --world-size 2 --tokens 4096 --hidden 512 --ffn 1024 \
        --experts 4 --topk 2 --json runs/bench/ep2_top2.json --trace-dir runs/bench/trace
    torchrun --nproc-per-node 2 scripts/bench_moe_layer.py --impl fastermoe --iters 5
"""

from __future__ import annotations

import argparse
import datetime
import gc
import json
import logging
import os
import platform
import statistics
import sys
import warnings
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
if str(REPO) not in sys.path:
    sys.path.insert(0, str(REPO))

logger = logging.getLogger("bench_moe_layer")
IMPLS = ("megatron", "fastermoe")
DEFAULT_CLUSTER = REPO / "configs" / "clusters" / "local-cpu.yaml"


def parse_args(argv=None) -> argparse.Namespace:
    p = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--impl", choices=["megatron", "fastermoe", "both"], default="both",
                   help="which implementation(s) to time (default: %(default)s)")
    p.add_argument("--world-size", type=int, default=2,
                   help="processes to spawn = expert-parallel size; ignored under torchrun, "
                        "where WORLD_SIZE wins (default: %(default)s)")
    p.add_argument("--tokens", type=int, default=4096,
                   help="tokens per rank entering the layer, before top-k (default: %(default)s)")
    p.add_argument("--hidden", type=int, default=512, help="hidden size H (default: %(default)s)")
    p.add_argument("--ffn", type=int, default=1024,
                   help="expert FFN hidden size (default: %(default)s)")
    p.add_argument("--experts", type=int, default=4,
                   help="experts in total, a multiple of the world size (default: %(default)s)")
    p.add_argument("--topk", type=int, default=2,
                   help="experts per token; with 1, the router uses pre-softmax (megatron rule) "
                        "(default: %(default)s)")
    p.add_argument("--skew", type=float, default=0.0,
                   help="Zipf exponent of the forced routing over experts (expert 0 hottest): "
                        "0 = exactly balanced; identical for both implementations "
                        "(default: %(default)s)")
    p.add_argument("--shadow", choices=["never", "predictor", "model", "top_k"], default="never",
                   help="FasterMoE shadow-expert policy, moe.fastermoe.shadow.policy "
                        "(default: %(default)s)")
    p.add_argument("--shadow-max-experts", type=int, default=1, metavar="N",
                   help="with --shadow top_k: experts shadowed every iteration, "
                        "moe.fastermoe.shadow.max_experts (default: %(default)s)")
    p.add_argument("--group-size", type=int, default=1,
                   help="FasterMoE smart-schedule group size g, must divide the world size "
                        "(default: %(default)s)")
    p.add_argument("--dtype", choices=["fp32", "bf16"], default="fp32",
                   help="parameter / activation dtype (default: %(default)s)")
    p.add_argument("--iters", type=int, default=10,
                   help="timed iterations per implementation (default: %(default)s)")
    p.add_argument("--warmup", type=int, default=3,
                   help="untimed warm-up iterations per implementation (default: %(default)s)")
    p.add_argument("--json", metavar="PATH", help="write every result to this JSON file")
    p.add_argument("--trace-dir", metavar="DIR",
                   help="after timing, run one traced FasterMoE iteration and write Chrome "
                        "traces DIR/rank<r>_layer1.json and (if matplotlib works) "
                        "DIR/timeline.png")
    p.add_argument("--cluster", default=str(DEFAULT_CLUSTER),
                   help="cluster YAML (or name) for the performance-model prediction "
                        "(default: configs/clusters/local-cpu.yaml, calibrated by scripts/calibrate.py)")
    p.add_argument("--seed", type=int, default=1234,
                   help="seed of weights, inputs and routing (default: %(default)s)")
    p.add_argument("--threads", type=int, default=None,
                   help="torch intra-op threads per process (default: OMP_NUM_THREADS if set, "
                        "else cores / processes)")
    p.add_argument("--set", dest="overrides", action="append", default=[], metavar="KEY=VALUE",
                   help="extra dotted config override, repeatable (e.g. "
                        "moe.router.load_balancing_type=none)")
    p.add_argument("--log-level", default="INFO", help="rank-0 log level (default: %(default)s)")
    args = p.parse_args(argv)
    if min(args.iters, args.tokens, args.world_size) < 1 or args.warmup < 0:
        p.error("--iters, --tokens and --world-size must be >= 1, --warmup >= 0")
    return args


# --------------------------------------------------------------------------------------- launch


def main(argv=None) -> int:
    args = parse_args(argv)
    from megatron_moe_ext.runtime.launch import run_workers, under_torchrun

    if under_torchrun():
        args.world_size = int(os.environ["WORLD_SIZE"])
    return run_workers(worker, args.world_size, args)


def _median(xs):
    return float(statistics.median(xs)) if xs else None


# --------------------------------------------------------------------------------------- worker


def _overrides(args, world: int) -> list[str]:
    o = [f"model.hidden_size={args.hidden}", f"model.ffn_hidden_size={args.ffn}",
         f"model.seq_length={args.tokens}", f"moe.num_experts={args.experts}",
         f"moe.topk={args.topk}", f"parallel.expert={world}",
         f"moe.fastermoe.group_size={args.group_size}", f"train.precision={args.dtype}",
         f"train.seed={args.seed}", f"moe.fastermoe.shadow.policy={args.shadow}",
         f"moe.fastermoe.shadow.max_experts={args.shadow_max_experts}",
         f"moe.fastermoe.cluster={args.cluster}"]
    if args.topk == 1:
        o.append("moe.router.pre_softmax=true")
    return o + list(args.overrides)


def predict(counts, args, world: int, shadows=()) -> dict:
    """Performance-model predictions (sync for megatron, smart with g and ``shadows`` for
    fastermoe)."""
    import numpy as np

    from megatron_moe_ext.perf.model import predict_layer
    from megatron_moe_ext.perf.topology import build_topology, load_cluster

    res: dict = {"cluster": args.cluster}
    try:
        text = Path(args.cluster).read_text() if Path(args.cluster).is_file() else ""
        spec = load_cluster(args.cluster)
        topo = build_topology(spec)
        if topo.num_workers != world:
            raise ValueError(f"cluster has {topo.num_workers} workers, the run has {world}")
        for impl, schedule in (("megatron", "sync"), ("fastermoe", "smart")):
            pred = predict_layer(np.asarray(counts), None, args.hidden, args.ffn / args.hidden,
                                 None, topo, dtype=args.dtype, schedule=schedule,
                                 group_size=args.group_size,
                                 shadow_experts=list(shadows) if impl == "fastermoe" else [])
            res[impl] = {"schedule": schedule, "group_size": pred.group_size,
                         "shadows": list(shadows) if impl == "fastermoe" else [],
                         "fwd_s": pred.fwd_s, "bwd_s": pred.bwd_s, "fwd_bwd_s": pred.total_s,
                         "comp_s": pred.comp_s, "comm_s": pred.comm_s}
        res["note"] = (
            f"{args.cluster} is a PLACEHOLDER until calibrated (scripts/calibrate.py): predicted "
            "times are indicative only" if "placeholder" in text.lower() else
            f"predicted with the numbers of {args.cluster} (see its header for how and when they "
            "were measured; on a shared CPU machine they are noisy)")
    except Exception as exc:  # the prediction is informative; never fail the benchmark on it
        res["error"] = f"{type(exc).__name__}: {exc}"
    return res


def _render_timeline(paths: list[str], out: str, title: str) -> str | None:
    try:
        import importlib.util

        spec = importlib.util.spec_from_file_location(
            "render_timeline", REPO / "scripts" / "render_timeline.py")
        mod = importlib.util.module_from_spec(spec)
        spec.loader.exec_module(mod)
        mod.render(mod.load_spans(paths), out, title)
        return out
    except Exception as exc:
        logger.warning("timeline PNG not written: %s", exc)
        return None


def worker(args: argparse.Namespace) -> None:
    import torch
    import torch.distributed as dist

    from megatron_moe_ext.runtime import device as rdev

    warnings.filterwarnings("ignore")
    getattr(rdev, "quiet_known_warnings", lambda: None)()
    from megatron.core import parallel_state as ps
    from megatron.core.process_groups_config import ProcessGroupCollection
    from megatron.core.tensor_parallel.random import model_parallel_cuda_manual_seed

    from megatron_moe_ext.config import RuntimeConfig
    from megatron_moe_ext.core.trace import Tracer
    from megatron_moe_ext.megatron import layer_builder as lb

    rcfg = RuntimeConfig(device="auto", num_threads=args.threads)
    dev = rdev.resolve_device(rcfg)
    rt = rdev.setup_runtime(rcfg, dev)
    rank, world = rt.rank, rt.world_size
    load_start = os.getloadavg()[0] if hasattr(os, "getloadavg") else None
    logging.basicConfig(level=args.log_level.upper() if rank == 0 else "WARNING",
                        format=f"[rank {rank}] %(message)s", force=True)
    sync = rt.device.type == "cuda"
    ps.initialize_model_parallel(expert_model_parallel_size=world)
    model_parallel_cuda_manual_seed(args.seed)
    pg = ProcessGroupCollection.use_mpu_process_groups()
    cfg = lb.config_from_overrides(_overrides(args, world))
    stock, faster = lb.build_pair(cfg, pg, device=dev)
    gated = cfg.moe.router.type == "topology_aware"  # the gate re-routes the forced routing
    layers = {"megatron": stock, "fastermoe": faster}
    impls = list(IMPLS) if args.impl == "both" else [args.impl]
    dtype = torch.bfloat16 if args.dtype == "bf16" else torch.float32
    logger.info("EP=%d, %d tokens/rank, H=%d, ffn=%d, E=%d, top-%d, skew=%g, g=%d, %s, "
                "%d threads/rank, %s", world, args.tokens, args.hidden, args.ffn, args.experts,
                args.topk, args.skew, args.group_size, args.dtype, torch.get_num_threads(),
                rt.device)

    # identical inputs and routing for both implementations (shuffle / data seeded per rank)
    gen = torch.Generator().manual_seed(args.seed * 1000 + rank)
    x = torch.randn(args.tokens, 1, args.hidden, generator=gen).to(dtype).to(rt.device)
    gy = torch.randn(args.tokens, 1, args.hidden, generator=gen).to(dtype).to(rt.device)
    routing_map, bias = lb.make_routing(args.tokens, args.experts, args.topk, args.skew,
                                        seed=args.seed * 1000 + rank)
    # balance bound: stock Megatron also timed on balanced routing (its router re-forced)
    balanced = args.skew > 0 and "megatron" in impls
    runs = {name: (layers[name], bias) for name in impls}  # timed name -> (layer, logit bias)
    if balanced:
        bal_map, bal_bias = lb.make_routing(args.tokens, args.experts, args.topk, 0.0,
                                            seed=args.seed * 1000 + rank)
        lb.apply_routing({"megatron": stock}, bal_bias, x, bal_map, what="balanced ", gated=gated)
        runs["megatron_balanced"] = (stock, bal_bias)
    lb.apply_routing(layers, bias, x, routing_map, gated=gated)

    # the routing actually used (all-gathered [W, E] counts) and the model prediction
    counts = lb.gather_counts(routing_map, pg.ep)
    results: dict = {"impls": {}, "routing": lb.describe_counts(counts, world)}
    if balanced:
        local_b = bal_map.sum(dim=0).long()
        gathered_b = [torch.empty_like(local_b) for _ in range(world)]
        dist.all_gather(gathered_b, local_b, group=pg.ep)
        bal_counts = torch.stack(gathered_b).tolist()
    e_l, wm = args.experts // world, results["routing"]["worker_matrix"]
    alone = lb.Alone(stock.experts,
                     [sum(counts[rank][w * e_l:(w + 1) * e_l]) for w in range(world)],  # send
                     [wm[w][rank] for w in range(world)],  # receive
                     [sum(row[rank * e_l + e] for row in counts) for e in range(e_l)],
                     args.hidden, dtype, pg.ep, sync, rt.device)

    # warm-up, then timed iterations; implementations interleaved (ABBA order), the pieces
    # alone timed in the same iterations so that all figures see the same machine load
    gc.disable()
    first_out, raw = {}, {}
    shadow_sets, layer_pred = [], []  # FasterMoE layer's last_shadows / last_predicted_s
    names = list(runs)

    def keep(key, region):
        raw.setdefault(key, []).append(region.wall)
        raw.setdefault(f"{key}_cpu", []).append(region.cpu)

    for it in range(args.warmup + args.iters):
        timed = it >= args.warmup
        for name in (names if it % 2 == 0 else names[::-1]):
            layer, lbias = runs[name]
            if layer is stock and balanced:
                lb.force_routing(layer, lbias)  # stock alternates skewed / balanced routing
            out, f, b = lb.time_layer(layer, x, gy, sync)
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
    k = args.iters
    mx = {key: flat[i * k:(i + 1) * k] for i, key in enumerate(keys)}  # max over ranks
    distinct = []
    for sh in shadow_sets:
        if sh not in distinct:
            distinct.append(sh)
    results["shadow_policy"] = args.shadow
    results["shadows"] = distinct  # distinct shadow sets chosen in the timed iterations
    results["shadow_set_counts"] = [shadow_sets.count(sh) for sh in distinct]
    prediction = predict(counts, args, world, distinct[0] if distinct else ())
    layer_pred = [v for v in layer_pred if v is not None]
    if "fastermoe" in prediction and layer_pred:
        # the layer's own prediction of each timed call (fwd + bwd, with its shadows)
        prediction["fastermoe"]["layer_fwd_bwd_s"] = _median(layer_pred)
    if balanced:
        pb = predict(bal_counts, args, world)
        prediction["megatron_balanced"] = pb.get("megatron")
    for name in names:
        fwd, bwd = mx[f"{name}.fwd"], mx[f"{name}.bwd"]
        tot = [a + b for a, b in zip(fwd, bwd)]
        cpu = [a + b for a, b in zip(mx[f"{name}.fwd_cpu"], mx[f"{name}.bwd_cpu"])]
        results["impls"][name] = {
            "fwd_s": _median(fwd), "bwd_s": _median(bwd), "fwd_bwd_s": _median(tot),
            "fwd_bwd_s_min": min(tot), "fwd_bwd_s_max": max(tot),
            "cpu_fwd_s": _median(mx[f"{name}.fwd_cpu"]), "cpu_bwd_s": _median(mx[f"{name}.bwd_cpu"]),
            "cpu_fwd_bwd_s": _median(cpu),
            "predicted_fwd_bwd_s": ((prediction.get(name) or {}).get("layer_fwd_bwd_s")
                                    or (prediction.get(name) or {}).get("fwd_bwd_s")),
            "fwd_s_iters": fwd, "bwd_s_iters": bwd}
    if balanced:  # kept out of "impls": its own key, with its routing
        results["megatron_balanced"] = results["impls"].pop("megatron_balanced")
        results["megatron_balanced"]["routing"] = lb.describe_counts(bal_counts, world)
    results["prediction"] = prediction
    if len(first_out) == 2:
        a, b = first_out["fastermoe"].double(), first_out["megatron"].double()
        diff = (a - b).abs().max() / b.abs().max().clamp_min(1e-30)
        results["max_rel_diff_out"] = lb.max_over_ranks([diff.item()])[0]

    # overlap bound from the pieces alone
    a2a, c_fwd, c_bwd = (_median(mx[f"alone.{p}"]) for p in ("a2a", "fwd", "bwd"))
    lat_comm, lat_comp = 4 * a2a, c_fwd + c_bwd
    bound = (lat_comm + lat_comp) / max(lat_comm, lat_comp)
    artifact = (4 * a2a + c_fwd + c_bwd) / (max(2 * a2a, c_fwd) + max(2 * a2a, c_bwd))
    ratio = {}
    if len(impls) == 2:
        m, f = results["impls"]["megatron"], results["impls"]["fastermoe"]
        ratio = {key: m[f"{key}_s"] / f[f"{key}_s"] for key in ("fwd", "bwd", "fwd_bwd")}
        # noise-robust companions: per-iteration (paired, same load) ratio, ratio of minima,
        # ratio of process CPU times
        mt = [a + b for a, b in zip(m["fwd_s_iters"], m["bwd_s_iters"])]
        ft = [a + b for a, b in zip(f["fwd_s_iters"], f["bwd_s_iters"])]
        results["ratio_fwd_bwd_paired"] = _median([a / b for a, b in zip(mt, ft)])
        results["ratio_fwd_bwd_min"] = m["fwd_bwd_s_min"] / f["fwd_bwd_s_min"]
        results["ratio_cpu_fwd_bwd"] = m["cpu_fwd_bwd_s"] / f["cpu_fwd_bwd_s"]
    achieved = ratio.get("fwd_bwd")
    frac = (achieved - 1) / (bound - 1) if achieved is not None and bound > 1 + 1e-9 else None
    results.update({f"ratio_{key}": v for key, v in ratio.items()})
    results["balance_bound"] = results["bound_fraction"] = None
    if balanced:
        m, mb = results["impls"]["megatron"], results["megatron_balanced"]
        results["balance_bound"] = m["fwd_bwd_s"] / mb["fwd_bwd_s"]
        mt = [a + b for a, b in zip(m["fwd_s_iters"], m["bwd_s_iters"])]
        bt = [a + b for a, b in zip(mb["fwd_s_iters"], mb["bwd_s_iters"])]
        results["balance_bound_paired"] = _median([a / b for a, b in zip(mt, bt)])
        # steadier under machine load: the same from process CPU times (max over ranks)
        results["balance_bound_cpu"] = m["cpu_fwd_bwd_s"] / mb["cpu_fwd_bwd_s"]
        results["balance_bound_min"] = m["fwd_bwd_s_min"] / mb["fwd_bwd_s_min"]
        if achieved is not None:
            results["bound_fraction"] = achieved / results["balance_bound"]
            results["bound_fraction_paired"] = (results["ratio_fwd_bwd_paired"]
                                                / results["balance_bound_paired"])
            results["bound_fraction_cpu"] = (results["ratio_cpu_fwd_bwd"]
                                             / results["balance_bound_cpu"])
            results["bound_fraction_min"] = (results["ratio_fwd_bwd_min"]
                                             / results["balance_bound_min"])
    results["bound_fraction_schedule"] = frac
    results["overlap"] = {
        "alltoall_s": a2a, "expert_fwd_s": c_fwd, "expert_bwd_s": c_bwd,
        "lat_comm_s": lat_comm, "lat_comp_s": lat_comp, "bound": bound,
        "bound_artifact_fwd_bwd": artifact, "achieved": achieved,
        "bound_fraction_schedule": frac,
        "definition": ("bound = (Lat_comm + Lat_comp) / max(Lat_comm, Lat_comp), Lat_comm = 4 x "
                       "one all-to-all of the routed tokens alone, Lat_comp = local expert fwd + "
                       "bwd alone (medians of max over ranks); achieved = megatron / fastermoe "
                       "fwd+bwd; bound_fraction_schedule = (achieved - 1) / (bound - 1). "
                       "bound_artifact_fwd_bwd = (4A + Cf + Cb) / (max(2A, Cf) + max(2A, Cb))")}

    # one traced FasterMoE iteration (untimed) for the Chrome trace and timeline
    if args.trace_dir and "fastermoe" in impls:
        faster.tracer = Tracer(rank=dist.get_rank(), cuda_sync=sync)
        lb.time_layer(faster, x, gy, sync)
        path = faster.write_trace(args.trace_dir)
        faster.tracer = None
        paths = [None] * world
        dist.all_gather_object(paths, path)
        results["traces"] = paths
        if rank == 0:
            results["timeline_png"] = _render_timeline(
                paths, str(Path(args.trace_dir) / "timeline.png"),
                f"FasterMoE EP={world} g={args.group_size}, {args.tokens} tok/rank, "
                f"H={args.hidden}, top-{args.topk}, skew={args.skew:g}")

    if rank == 0:
        results["config"] = {k2: v for k2, v in vars(args).items()}
        results["config"].update(world_size=world, threads_per_rank=torch.get_num_threads(),
                                 device=str(rt.device), backend=rt.backend)
        results["machine"] = dict(_machine(), loadavg_1min_start=load_start)
        print(format_table(results), flush=True)
        if args.json:
            Path(args.json).parent.mkdir(parents=True, exist_ok=True)
            Path(args.json).write_text(json.dumps(results, indent=1))
            logger.info("wrote %s", args.json)
    dist.barrier()
    ps.destroy_model_parallel()
    dist.destroy_process_group()


def _machine() -> dict:
    import megatron.core
    import torch

    return {"platform": platform.platform(), "python": platform.python_version(),
            "cpu_count": os.cpu_count(), "torch": torch.__version__,
            "megatron_core": getattr(megatron.core, "__version__", "?"),
            "loadavg_1min": os.getloadavg()[0] if hasattr(os, "getloadavg") else None,
            "date_utc": datetime.datetime.now(datetime.timezone.utc).isoformat(timespec="seconds")}


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


if __name__ == "__main__":
    sys.exit(main())
