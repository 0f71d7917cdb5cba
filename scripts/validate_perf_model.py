#!/usr/bin/env python
"""Validate the performance model: measured vs predicted MoE layer fwd+bwd over a sweep.

For every configuration of a sweep (routing skew x sizes H, F, tokens), the real layers of
scripts/bench_moe_layer.py are built (stock Megatron MoELayer with the alltoall dispatcher and
FasterMoELayer with the smart schedule; identical weights, identical forced Zipf routing; see
megatron_moe_ext/megatron/layer_builder.py) and their forward + backward is timed. The
prediction of each point is the bench's own (``bench_moe_layer.predict``: perf/model.py
``predict_layer`` with the all-gathered routing counts; sync for megatron, smart with group
size g for fastermoe) with the calibrated cluster YAML (--cluster, default local-cpu, written
by scripts/calibrate.py). Nothing is fitted to the layer timings: the only inputs are the
cluster file and the routing.

Timing: all layers are built first; then rounds: in each round every configuration runs one
fwd+bwd of each implementation (configurations in a seeded random order, the same on all
ranks; implementations alternating which goes first), barrier before each region, max over
ranks per iteration. The first --warmup rounds are discarded; a point's measured time is the
median over the timed rounds. Interleaving makes every configuration see the same machine
load, which matters on a shared machine.

Reported: R^2 = 1 - sum (m - p)^2 / sum (m - mean m)^2 over all points (both
implementations; no regression is fitted), also per implementation, in log space, and the mean
absolute percentage error; a scatter plot (--out-png) and, with --json, every row.

    python scripts/validate_perf_model.py --out-png docs/img/perf_model_scatter.png \\
        --json runs/validate/perf_model.json
    python scripts/validate_perf_model.py --quick --json /tmp/v.json
    torchrun --nproc-per-node 2 scripts/validate_perf_model.py --quick

Spawns --world-size processes (gloo, the CPU runtime) unless started by torchrun.
"""

from __future__ import annotations

import argparse
import gc
import importlib.util
import itertools
import json
import logging
import os
import random
import statistics
import sys
import time
import warnings
from pathlib import Path
from typing import Any, Optional, Sequence

REPO = Path(__file__).resolve().parents[1]
if str(REPO) not in sys.path:
    sys.path.insert(0, str(REPO))

logger = logging.getLogger("validate_perf_model")

IMPLS = ("megatron", "fastermoe")
DEFAULT_SKEWS = (0.0, 1.0, 2.0, 3.0)
# (hidden H, expert ffn F, tokens per rank T): per-rank fwd+bwd GEMM work 12 k T H F (k = 2,
# balanced) from 3.2 to 14.5 GFLOP (x up to 1.7 on the hot worker when skewed), i.e. ~40 to
# ~300 ms per layer on one core of this machine (alpha = F / H is 2, and 4 for the first).
DEFAULT_SIZES = ((128, 512, 2048), (256, 512, 1024), (256, 512, 2048), (384, 768, 1024),
                 (512, 1024, 512), (512, 1024, 1024), (768, 1536, 512))
QUICK_SKEWS = (0.0, 2.0)
QUICK_SIZES = ((64, 128, 256), (128, 256, 256))


def _load_script(name: str):
    """scripts/<name>.py as a module (bench_moe_layer: argument defaults, overrides, predict;
    calibrate: the measurement functions and the YAML writer)."""
    if name in sys.modules:
        return sys.modules[name]
    spec = importlib.util.spec_from_file_location(name, REPO / "scripts" / f"{name}.py")
    mod = importlib.util.module_from_spec(spec)
    sys.modules[name] = mod
    spec.loader.exec_module(mod)
    return mod


def _size(text: str) -> tuple[int, int, int]:
    try:
        h, f, t = (int(x) for x in text.lower().split("x"))
    except ValueError:
        raise argparse.ArgumentTypeError(f"expected HxFxT (e.g. 256x512x1024), got {text!r}")
    return h, f, t


def parse_args(argv: Optional[Sequence[str]] = None) -> argparse.Namespace:
    p = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--cluster", default="local-cpu",
                   help="calibrated cluster YAML or name for the predictions "
                        "(default: %(default)s)")
    p.add_argument("--quick", action="store_true",
                   help="tiny sweep for tests: skews %s, sizes %s, 1 warm-up + 2 timed rounds"
                        % (QUICK_SKEWS, ["x".join(map(str, s)) for s in QUICK_SIZES]))
    p.add_argument("--skews", type=float, nargs="+", default=None,
                   help="Zipf exponents of the routing (default: %s)" % (DEFAULT_SKEWS,))
    p.add_argument("--sizes", type=_size, nargs="+", default=None, metavar="HxFxT",
                   help="hidden x expert-ffn x tokens-per-rank (default: %s)"
                        % " ".join("x".join(map(str, s)) for s in DEFAULT_SIZES))
    p.add_argument("--experts", type=int, default=4, help="experts in total (default: 4)")
    p.add_argument("--topk", type=int, default=2, help="experts per token (default: 2)")
    p.add_argument("--group-size", type=int, default=1,
                   help="FasterMoE smart-schedule group size (default: %(default)s)")
    p.add_argument("--dtype", choices=["fp32", "bf16"], default="fp32",
                   help="parameter / activation dtype (default: %(default)s)")
    p.add_argument("--iters", type=int, default=None,
                   help="timed rounds (default: 6; quick 2)")
    p.add_argument("--warmup", type=int, default=None,
                   help="discarded rounds (default: 2; quick 1)")
    p.add_argument("--world-size", type=int, default=2,
                   help="processes to spawn (ignored under torchrun) (default: %(default)s)")
    p.add_argument("--threads", type=int, default=None,
                   help="torch threads per process (default: OMP_NUM_THREADS if set, else cores / processes)")
    p.add_argument("--seed", type=int, default=1234, help="seed (default: %(default)s)")
    p.add_argument("--clock", choices=["cpu", "wall"], default="cpu",
                   help="which measured time is compared (both are always measured and "
                        "reported): wall = wall clock; cpu = process CPU time (all threads, "
                        "gloo's included); per iteration the max over ranks, then the median. "
                        "On a machine shared with other jobs the wall clock mostly measures "
                        "their load; CPU time is what the layer costs when it has its cores "
                        "(default: %(default)s)")
    p.add_argument("--recalibrate", action="store_true",
                   help="calibrate in the same run: calibrate.py's expert-MLP throughput curve "
                        "(one pass over its token counts in every timed round, interleaved with "
                        "the layers, so that it sees the same machine load) and link exchange "
                        "rate; write the cluster YAML (--recalibrate-out) and predict with it. "
                        "The --cluster predictions are still reported (r2_cluster)")
    p.add_argument("--recalibrate-out", metavar="YAML", default=None,
                   help="where --recalibrate writes its cluster YAML (default: next to --json, "
                        "else runs/validate/local-cpu-inrun.yaml)")
    p.add_argument("--calib-tokens", type=int, nargs="+", default=None,
                   help="token counts of the --recalibrate curve (default: 64 .. 4096; "
                        "quick 64 512 2048)")
    p.add_argument("--calib-hidden", type=int, default=512,
                   help="H of the --recalibrate curve's MLP (F = 2H) (default: %(default)s)")
    p.add_argument("--out-png", metavar="PNG", help="scatter plot of measured vs predicted")
    p.add_argument("--from-json", metavar="PATH",
                   help="measure nothing: reprint the table and redraw --out-png from the JSON "
                        "of an earlier run")
    p.add_argument("--json", metavar="PATH", help="write r2, summary and per-point rows")
    p.add_argument("--log-level", default="INFO", help="rank-0 log level (default: %(default)s)")
    args = p.parse_args(argv)
    args.skews = list(args.skews if args.skews is not None else
                      (QUICK_SKEWS if args.quick else DEFAULT_SKEWS))
    args.sizes = list(args.sizes or (QUICK_SIZES if args.quick else DEFAULT_SIZES))
    args.iters = args.iters or (2 if args.quick else 6)
    args.warmup = args.warmup if args.warmup is not None else (1 if args.quick else 2)
    if args.iters < 1 or args.warmup < 0:
        p.error("--iters must be >= 1 and --warmup >= 0")
    return args


def configurations(args: argparse.Namespace) -> list[dict[str, Any]]:
    """The sweep: every size x every skew."""
    return [{"hidden": h, "ffn": f, "tokens": t, "skew": s}
            for (h, f, t), s in itertools.product(args.sizes, args.skews)]


def bench_args(bench, args: argparse.Namespace, conf: dict[str, Any], world: int):
    """The bench's argument namespace for one configuration (its defaults otherwise)."""
    return bench.parse_args([
        "--world-size", str(world), "--tokens", str(conf["tokens"]),
        "--hidden", str(conf["hidden"]), "--ffn", str(conf["ffn"]),
        "--experts", str(args.experts), "--topk", str(args.topk), "--skew", str(conf["skew"]),
        "--group-size", str(args.group_size), "--dtype", args.dtype, "--cluster",
        str(args.cluster), "--seed", str(args.seed), "--iters", "1", "--warmup", "0"])


# --------------------------------------------------------------------------------- statistics


def r2_score(measured: Sequence[float], predicted: Sequence[float]) -> float:
    """1 - SS_res / SS_tot with predictions taken as they are (no regression fitted)."""
    m = [float(x) for x in measured]
    p = [float(x) for x in predicted]
    if len(m) < 2:
        return float("nan")
    mean = statistics.fmean(m)
    ss_tot = sum((x - mean) ** 2 for x in m)
    ss_res = sum((x - y) ** 2 for x, y in zip(m, p))
    return 1.0 - ss_res / ss_tot if ss_tot > 0 else float("nan")


def summarize(rows: list[dict[str, Any]]) -> dict[str, Any]:
    """R^2 (all points, per implementation, log space), MAPE, mean ratio measured/predicted."""
    import math

    def stats(sel: list[dict[str, Any]]) -> dict[str, Any]:
        m = [r["measured_s"] for r in sel]
        p = [r["predicted_s"] for r in sel]
        ratio = [a / b for a, b in zip(m, p)]
        return {"points": len(sel), "r2": r2_score(m, p),
                "r2_log": r2_score([math.log(x) for x in m], [math.log(x) for x in p]),
                "mape": statistics.fmean(abs(a - b) / a for a, b in zip(m, p)),
                "ratio_measured_over_predicted_median": statistics.median(ratio),
                "ratio_min": min(ratio), "ratio_max": max(ratio)}

    ok = [r for r in rows if r.get("predicted_s") and r.get("measured_s")]
    out = stats(ok) if ok else {"points": 0, "r2": float("nan")}
    out["by_impl"] = {impl: stats([r for r in ok if r["impl"] == impl])
                      for impl in IMPLS if any(r["impl"] == impl for r in ok)}
    # speedup (megatron / fastermoe) measured vs predicted, per configuration
    pairs = {}
    for r in ok:
        pairs.setdefault(r["config_id"], {})[r["impl"]] = r
    sp = [(v["megatron"]["measured_s"] / v["fastermoe"]["measured_s"],
           v["megatron"]["predicted_s"] / v["fastermoe"]["predicted_s"])
          for v in pairs.values() if len(v) == 2]
    if sp:
        out["speedup"] = {"measured_median": statistics.median(a for a, _ in sp),
                          "predicted_median": statistics.median(b for _, b in sp),
                          "mean_abs_error": statistics.fmean(abs(a - b) for a, b in sp)}
    return out


def plot(rows: list[dict[str, Any]], summary: dict[str, Any], path: str, title: str) -> str:
    """Scatter of measured vs predicted fwd+bwd (ms, log-log) with the y = x line."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, ax = plt.subplots(figsize=(5.6, 4.6))
    skews = sorted({r["skew"] for r in rows})
    markers = dict(zip(skews, "osD^v<>ph"))
    colors = {"megatron": "tab:blue", "fastermoe": "tab:orange"}
    for impl in IMPLS:
        for s in skews:
            sel = [r for r in rows if r["impl"] == impl and r["skew"] == s
                   and r.get("predicted_s") and r.get("measured_s")]
            if sel:
                ax.scatter([r["predicted_s"] * 1e3 for r in sel],
                           [r["measured_s"] * 1e3 for r in sel], c=colors[impl],
                           marker=markers[s], s=26, alpha=0.85,
                           label=f"{impl} skew {s:g}")
    vals = [r[k] * 1e3 for r in rows for k in ("predicted_s", "measured_s") if r.get(k)]
    if vals:
        lo, hi = min(vals) / 1.3, max(vals) * 1.3
        ax.plot([lo, hi], [lo, hi], "k-", lw=1, label="measured = predicted")
        ax.set_xlim(lo, hi)
        ax.set_ylim(lo, hi)
    ax.set_xscale("log")
    ax.set_yscale("log")
    from matplotlib.ticker import FuncFormatter

    plain = FuncFormatter(lambda v, _: f"{v:g}")
    for axis in (ax.xaxis, ax.yaxis):
        axis.set_major_formatter(plain)
        axis.set_minor_formatter(FuncFormatter(
            lambda v, _: f"{v:g}" if f"{v:g}"[0] in "25" else ""))
    ax.tick_params(which="minor", labelsize=7)
    ax.set_xlabel("predicted fwd+bwd (ms)")
    clock = rows[0].get("clock", "wall") if rows else "wall"
    ax.set_ylabel(f"measured fwd+bwd (ms, median, {'CPU time' if clock == 'cpu' else 'wall'})")
    ax.set_title(f"{title}\nR² = {summary['r2']:.3f} over {summary['points']} points "
                 f"(log-space R² {summary.get('r2_log', float('nan')):.3f})", fontsize=9)
    ax.grid(True, which="both", alpha=0.3)
    ax.legend(fontsize=6, ncol=2, loc="upper left")
    fig.tight_layout()
    out = Path(path)
    out.parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(out, dpi=100)
    plt.close(fig)
    return str(out)


def format_table(rows: list[dict[str, Any]], summary: dict[str, Any]) -> str:
    lines = [f"{'H':>5} {'F':>5} {'T':>5} {'skew':>4} {'imbal':>5}  {'impl':<9} "
             f"{'measured ms':>11} {'predicted ms':>12} {'ratio':>6}"]
    for r in rows:
        pred = r.get("predicted_s")
        lines.append(
            f"{r['hidden']:5d} {r['ffn']:5d} {r['tokens']:5d} {r['skew']:4g} "
            f"{r['imbalance']:5.2f}  {r['impl']:<9} {r['measured_s'] * 1e3:11.2f} "
            f"{(pred or float('nan')) * 1e3:12.2f} "
            f"{(r['measured_s'] / pred if pred else float('nan')):6.2f}")
    s = summary
    lines.append(f"R^2 = {s['r2']:.4f} ({rows[0]['clock'] if rows else '?'} clock) over "
                 f"{s['points']} points "
                 f"({len({r['config_id'] for r in rows})} configurations x 2 implementations); "
                 f"log-space R^2 {s.get('r2_log', float('nan')):.4f}; MAPE "
                 f"{s.get('mape', float('nan')):.1%}; measured / predicted median "
                 f"{s.get('ratio_measured_over_predicted_median', float('nan')):.3f}")
    for impl, v in s.get("by_impl", {}).items():
        lines.append(f"  {impl:<9}: R^2 {v['r2']:.4f}, MAPE {v['mape']:.1%}, measured / "
                     f"predicted {v['ratio_min']:.2f} .. {v['ratio_max']:.2f} "
                     f"(median {v['ratio_measured_over_predicted_median']:.2f})")
    if "speedup" in s:
        sp = s["speedup"]
        lines.append(f"  speedup megatron/fastermoe: measured median "
                     f"{sp['measured_median']:.3f}, predicted median {sp['predicted_median']:.3f}")
    return "\n".join(lines)


# ------------------------------------------------------------------------------------ worker


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
    from megatron_moe_ext.megatron import layer_builder as lb

    bench = _load_script("bench_moe_layer")
    rcfg = RuntimeConfig(device="cpu", num_threads=args.threads)
    rt = rdev.setup_runtime(rcfg, "cpu")
    rank, world = rt.rank, rt.world_size
    logging.basicConfig(level=args.log_level.upper() if rank == 0 else "WARNING",
                        format=f"[validate rank {rank}] %(message)s", force=True)
    logging.getLogger("megatron.core.tensor_parallel.random").setLevel(logging.ERROR)
    load_start = os.getloadavg()[0] if hasattr(os, "getloadavg") else None
    ps.initialize_model_parallel(expert_model_parallel_size=world)
    model_parallel_cuda_manual_seed(args.seed)
    pg = ProcessGroupCollection.use_mpu_process_groups()
    dtype = torch.bfloat16 if args.dtype == "bf16" else torch.float32
    confs = configurations(args)
    logger.info("%d configurations x %s on %d workers (%d threads each), cluster %s, "
                "%d warm-up + %d timed rounds", len(confs), "/".join(IMPLS), world,
                torch.get_num_threads(), args.cluster, args.warmup, args.iters)

    t_build = time.perf_counter()
    cases = []
    for cid, conf in enumerate(confs):
        bargs = bench_args(bench, args, conf, world)
        cfg = lb.config_from_overrides(bench._overrides(bargs, world))
        stock, faster = lb.build_pair(cfg, pg, device=rt.device)
        gen = torch.Generator().manual_seed(args.seed * 1000 + rank)
        x = torch.randn(conf["tokens"], 1, conf["hidden"], generator=gen).to(dtype)
        gy = torch.randn(conf["tokens"], 1, conf["hidden"], generator=gen).to(dtype)
        routing_map, bias = lb.make_routing(conf["tokens"], args.experts, args.topk,
                                            conf["skew"], seed=args.seed * 1000 + rank)
        layers = {"megatron": stock, "fastermoe": faster}
        lb.apply_routing(layers, bias, x, routing_map, what=f"config {conf}: ")
        counts = lb.gather_counts(routing_map, pg.ep)
        pred = bench.predict(counts, bargs, world)
        if "error" in pred:
            raise RuntimeError(f"prediction failed for {conf}: {pred['error']}")
        cases.append({"id": cid, "conf": conf, "layers": layers, "x": x, "gy": gy,
                      "counts": counts, "bargs": bargs,
                      "routing": lb.describe_counts(counts, world),
                      "prediction": {"cluster": pred}})
    logger.info("built %d layer pairs in %.1f s", len(cases), time.perf_counter() - t_build)

    calib = InRunCalibration(args, rank, world) if args.recalibrate else None
    raw: dict[tuple[int, str], list[tuple[float, float, float, float]]] = {}
    t_run = time.perf_counter()
    gc.disable()
    for rnd in range(args.warmup + args.iters):
        order = list(range(len(cases)))
        random.Random(args.seed + rnd).shuffle(order)  # same order on every rank
        t_round = time.perf_counter()
        for k, cid in enumerate(order):
            case = cases[cid]
            impls = IMPLS if (rnd + k) % 2 == 0 else IMPLS[::-1]
            for name in impls:
                _, f, b = lb.time_layer(case["layers"][name], case["x"], case["gy"], False)
                if rnd >= args.warmup:
                    raw.setdefault((cid, name), []).append((f.wall, b.wall, f.cpu, b.cpu))
            gc.collect()
        if calib is not None and rnd >= args.warmup:
            calib.round()
        logger.info("round %d/%d (%s): %.1f s", rnd + 1, args.warmup + args.iters,
                    "warm-up" if rnd < args.warmup else "timed", time.perf_counter() - t_round)
    gc.enable()
    run_s = time.perf_counter() - t_run

    keys = sorted(raw)
    flat = lb.max_over_ranks([v for key in keys for it in raw[key] for v in it])
    inrun_yaml = calib.finish() if calib is not None else None
    if rank == 0 and inrun_yaml:
        for case in cases:
            bargs = argparse.Namespace(**vars(case["bargs"]))
            bargs.cluster = inrun_yaml
            pred = bench.predict(case["counts"], bargs, world)
            if "error" in pred:
                raise RuntimeError(f"prediction failed for {case['conf']}: {pred['error']}")
            case["prediction"]["inrun"] = pred
    source = "inrun" if inrun_yaml else "cluster"
    rows = []
    per = 4 * args.iters
    for i, (cid, name) in enumerate(keys):
        vals = flat[i * per:(i + 1) * per]
        its = [vals[j:j + 4] for j in range(0, per, 4)]
        tot = [f + b for f, b, _, _ in its]
        cpu = [cf + cb for _, _, cf, cb in its]
        case = cases[cid]
        pred = case["prediction"].get(source) or case["prediction"]["cluster"]
        pred = pred[name]
        chosen = cpu if args.clock == "cpu" else tot
        row = dict(
            case["conf"], config_id=cid, impl=name, schedule=pred["schedule"],
            group_size=pred["group_size"], clock=args.clock,
            measured_s=statistics.median(chosen), measured_min_s=min(chosen),
            measured_max_s=max(chosen), measured_iters_s=chosen,
            measured_wall_s=statistics.median(tot), measured_cpu_s=statistics.median(cpu),
            measured_wall_fwd_s=statistics.median(it[0] for it in its),
            measured_wall_bwd_s=statistics.median(it[1] for it in its),
            measured_wall_iters_s=tot, measured_cpu_iters_s=cpu,
            predicted_s=pred["fwd_bwd_s"], predicted_fwd_s=pred["fwd_s"],
            predicted_bwd_s=pred["bwd_s"], predicted_comp_s=pred["comp_s"],
            predicted_comm_s=pred["comm_s"],
            predicted_cluster_s=case["prediction"]["cluster"][name]["fwd_bwd_s"],
            imbalance=case["routing"]["imbalance_max_over_mean"],
            worker_loads=case["routing"]["worker_loads"],
            remote_fraction=case["routing"]["remote_fraction"])
        rows.append(row)
    rows.sort(key=lambda r: (r["hidden"], r["ffn"], r["tokens"], r["skew"], r["impl"]))

    if rank == 0:
        summary = summarize(rows)
        pred_yaml = inrun_yaml or str(args.cluster)
        print(format_table(rows, summary), flush=True)
        other = "wall" if args.clock == "cpu" else "cpu"
        summary_other = summarize([dict(r, measured_s=r[f"measured_{other}_s"]) for r in rows])
        print(f"with the {other} clock instead: R^2 = {summary_other['r2']:.4f}, log-space R^2 "
              f"{summary_other['r2_log']:.4f}, measured / predicted median "
              f"{summary_other['ratio_measured_over_predicted_median']:.3f}", flush=True)
        result = {
            "r2": summary["r2"], "points": summary["points"], "clock": args.clock,
            f"r2_{args.clock}": summary["r2"], f"r2_{other}": summary_other["r2"],
            "configurations": len(cases), "summary": summary,
            f"summary_{other}": summary_other,
            "prediction_source": ("in-run calibration (--recalibrate), "
                                  f"{inrun_yaml}" if inrun_yaml else f"--cluster {args.cluster}"),
            "cluster": pred_yaml, "cluster_yaml_header": _yaml_header(pred_yaml),
        }
        if inrun_yaml:
            static = summarize([dict(r, predicted_s=r["predicted_cluster_s"]) for r in rows])
            result["r2_cluster"] = static["r2"]
            result["summary_cluster"] = static
            result["cluster_static"] = str(args.cluster)
            print(f"with --cluster {args.cluster} instead: R^2 = {static['r2']:.4f}, log-space "
                  f"R^2 {static['r2_log']:.4f}, measured / predicted median "
                  f"{static['ratio_measured_over_predicted_median']:.3f}", flush=True)
        machine = bench._machine()
        machine["loadavg_1min_start"] = load_start
        result.update({
            "model": MODEL_TEXT, "config": {k: v for k, v in vars(args).items()},
            "world_size": world, "threads_per_rank": torch.get_num_threads(),
            "timed_seconds": run_s, "machine": machine, "rows": rows,
        })
        if args.out_png:
            label = "in-run calibration" if inrun_yaml else Path(str(args.cluster)).stem
            result["png"] = plot(rows, summary, args.out_png,
                                 f"perf model vs measured layer, EP={world}, P and W: {label}")
            logger.info("wrote %s", result["png"])
        if args.json:
            Path(args.json).parent.mkdir(parents=True, exist_ok=True)
            Path(args.json).write_text(json.dumps(result, indent=1, default=str))
            logger.info("wrote %s", args.json)
    dist.barrier()
    ps.destroy_model_parallel()
    dist.destroy_process_group()


MODEL_TEXT = (
    "perf/model.py predict_layer via bench_moe_layer.predict, nothing fitted to layer timings: "
    "sync (megatron) fwd = A_d + C + A_c, bwd = A_d + 2C + A_c; smart (fastermoe) = two-stream "
    "pipeline of the grouped pairwise exchange (fwd and bwd); C = max_w 4 B_w alpha H^2 / "
    "P(B_w), P = the cluster's gemm_curve (or gemm_tflops) interpolated at the tokens of worker "
    "w; A = max over directed links of bytes / W_l. Not modelled: router, permutation / "
    "un-permutation, the dispatcher's bookkeeping, Python and autograd overhead outside the "
    "expert MLP, latency of messages.")


class InRunCalibration:
    """calibrate.py's measurements inside the validation run: the link exchange rate once at
    the start, and the expert-MLP throughput curve as one pass over its token counts per timed
    round (all ranks together, right after the round's layers)."""

    def __init__(self, args: argparse.Namespace, rank: int, world: int) -> None:
        self.cal = _load_script("calibrate")
        hidden = args.calib_hidden
        tokens = args.calib_tokens or ([64, 512, 2048] if args.quick else
                                       [64, 128, 256, 512, 1024, 2048, 4096])
        argv = ["--hidden", str(hidden), "--ffn", str(2 * hidden), "--dtypes", args.dtype,
                "--tokens", *map(str, tokens), "--curve", "mlp"] + (["--quick"] if args.quick
                                                                      else [])
        self.cargs = self.cal.parse_args(argv)
        self.args, self.rank, self.world, self.dtype = args, rank, world, args.dtype
        self.kernels = {t: self.cal.make_kernel("mlp", hidden, 2 * hidden, t, args.dtype,
                                                self.cargs.activation)
                        for t in self.cargs.tokens}
        for k in self.kernels.values():
            k()
        self.times: dict[int, list[float]] = {t: [] for t in self.cargs.tokens}
        self.cpu: dict[int, list[float]] = {t: [] for t in self.cargs.tokens}
        self.nodes, self.hosts = self.cal.node_layout(self.cargs, rank, world)
        pairs = [(a, b) for a in range(world) for b in range(a + 1, world)]
        self.links = self.cal.measure_links(pairs, self.cargs.sizes, self.cargs.p2p_seconds)
        self.load = [round(x, 2) for x in os.getloadavg()] if hasattr(os, "getloadavg") else None

    def round(self) -> None:
        """One fwd+bwd of the MLP at every token count (barrier first)."""
        import torch.distributed as dist

        dist.barrier()
        for t, k in self.kernels.items():
            c0, t0 = time.thread_time(), time.perf_counter()
            k()
            self.times[t].append(time.perf_counter() - t0)
            self.cpu[t].append(time.thread_time() - c0)

    def finish(self) -> Optional[str]:
        """Gather, summarise and (rank 0) write the cluster YAML; returns its path on rank 0."""
        import torch
        import torch.distributed as dist

        rows = self.cal.throughput_rows(self.cargs.hidden, self.cargs.ffn, self.cargs.activation,
                                        self.times,
                                        self.cpu if torch.get_num_threads() == 1 else None)
        gathered: list[Any] = [None] * self.world
        dist.all_gather_object(gathered, {"gemm": {"mlp": {self.dtype: rows}},
                                          "links": self.links})
        if self.rank != 0:
            return None
        links: dict = {}
        for g in gathered:
            links.update(g["links"])
        m = self.cal.summarize([g["gemm"] for g in gathered], links, self.nodes, self.hosts,
                               self.cargs.bandwidth, "mlp", self.args.clock)
        out = self.args.recalibrate_out
        if out is None:
            out = (str(Path(self.args.json).with_suffix("")) + ".cluster.yaml" if self.args.json
                   else str(REPO / "runs" / "validate" / "local-cpu-inrun.yaml"))
        cmd = ("scripts/validate_perf_model.py --recalibrate (in-run: one pass over the curve "
               "per timed round, interleaved with the layer timings)")
        text = self.cal.cluster_yaml(m, "local-cpu-inrun", self.cargs, cmd, {
            "threads": torch.get_num_threads(), "torch": torch.__version__,
            "loadavg": self.load, "emulation": None})
        Path(out).parent.mkdir(parents=True, exist_ok=True)
        Path(out).write_text(text, encoding="utf-8")
        logger.info("in-run calibration: %s TFLOP/s by tokens (wall/cpu) %s; link %.3f "
                    "Gbit/s; wrote %s", self.dtype, self.cal._fmt_rows(rows),
                    m["intra"]["gbps"] if m["intra"] else float("nan"), out)
        return out


def _yaml_header(cluster: str) -> list[str]:
    """The comment header of the cluster file (date, command, measured values)."""
    from megatron_moe_ext.perf.topology import CLUSTER_DIR

    path = Path(cluster)
    if not path.suffix and not path.exists():
        path = CLUSTER_DIR / f"{cluster}.yaml"
    try:
        return [ln for ln in path.read_text().splitlines() if ln.startswith("#")]
    except OSError:
        return []


# ------------------------------------------------------------------------------------ launch


def replot(args: argparse.Namespace) -> int:
    """--from-json: table (and --out-png) from an earlier run's JSON."""
    data = json.loads(Path(args.from_json).read_text())
    rows, summary = data["rows"], data["summary"]
    print(format_table(rows, summary))
    if args.out_png:
        label = ("in-run calibration" if "in-run" in data.get("prediction_source", "")
                 else Path(str(data.get("cluster", "?"))).stem)
        print("wrote", plot(rows, summary, args.out_png,
                            f"perf model vs measured layer, EP={data.get('world_size', '?')}, "
                            f"P and W: {label}"))
    return 0


def main(argv: Optional[Sequence[str]] = None) -> int:
    args = parse_args(argv)
    if args.from_json:
        return replot(args)
    from megatron_moe_ext.runtime.launch import run_workers, under_torchrun

    if under_torchrun():
        args.world_size = int(os.environ["WORLD_SIZE"])
    return run_workers(worker, args.world_size, args)


if __name__ == "__main__":
    sys.exit(main())
