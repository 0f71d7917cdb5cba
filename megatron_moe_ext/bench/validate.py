"""Validate the performance model: measured vs predicted MoE layer fwd+bwd over a sweep.

Front end: scripts/validate_perf_model.py (its docstring describes the sweep, the timing and
what is reported). For every configuration (routing skew x sizes H, F, tokens) the layer pair
of the benchmark is built (:func:`megatron_moe_ext.bench.layer.build_case`) and timed in
interleaved rounds; each point's prediction is the benchmark's
(:func:`megatron_moe_ext.bench.layer.predict`) with the calibrated cluster file, or with a
calibration made in the same run (:class:`InRunCalibration`). Nothing is fitted to the layer
timings. Statistics, table and plot: :mod:`megatron_moe_ext.bench.validate_report`.

Public: :class:`ValidateOptions`, :func:`run`, :func:`worker`, :func:`configurations`,
:class:`InRunCalibration`, :data:`MODEL_TEXT`.
"""

from __future__ import annotations

import dataclasses
import gc
import itertools
import json
import logging
import os
import random
import statistics
import time
import warnings
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Optional

from megatron_moe_ext.bench.validate_report import (
    IMPLS,
    format_table,
    plot,
    replot,
    summarize,
)

logger = logging.getLogger("validate_perf_model")

DEFAULT_SKEWS = (0.0, 1.0, 2.0, 3.0)
# (hidden H, expert ffn F, tokens per rank T): per-rank fwd+bwd GEMM work 12 k T H F (k = 2,
# balanced) from 3.2 to 14.5 GFLOP (x up to 1.7 on the hot worker when skewed), i.e. ~40 to
# ~300 ms per layer on one core of this machine (alpha = F / H is 2, and 4 for the first).
DEFAULT_SIZES = ((128, 512, 2048), (256, 512, 1024), (256, 512, 2048), (384, 768, 1024),
                 (512, 1024, 512), (512, 1024, 1024), (768, 1536, 512))
QUICK_SKEWS = (0.0, 2.0)
QUICK_SIZES = ((64, 128, 256), (128, 256, 256))
DEFAULT_INRUN_YAML = "runs/validate/local-cpu-inrun.yaml"
"""Where --recalibrate writes without --json (relative to the working directory)."""

MODEL_TEXT = (
    "perf/model.py predict_layer via bench_moe_layer.predict, nothing fitted to layer timings: "
    "sync (megatron) fwd = A_d + C + A_c, bwd = A_d + 2C + A_c; smart (fastermoe) = two-stream "
    "pipeline of the grouped pairwise exchange (fwd and bwd); C = max_w 4 B_w alpha H^2 / "
    "P(B_w), P = the cluster's gemm_curve (or gemm_tflops) interpolated at the tokens of worker "
    "w; A = max over directed links of bytes / W_l. Not modelled: router, permutation / "
    "un-permutation, the dispatcher's bookkeeping, Python and autograd overhead outside the "
    "expert MLP, latency of messages.")


@dataclass
class ValidateOptions:
    """The sweep (the options of scripts/validate_perf_model.py, same names; None defaults are
    resolved from ``quick`` on construction)."""

    cluster: str = "local-cpu"
    """Calibrated cluster YAML or name for the predictions."""
    quick: bool = False
    """Tiny sweep for tests: QUICK_SKEWS x QUICK_SIZES, 1 warm-up + 2 timed rounds."""
    skews: Optional[list[float]] = None
    """Zipf exponents of the routing (default DEFAULT_SKEWS)."""
    sizes: Optional[list[tuple[int, int, int]]] = None
    """(hidden, expert ffn, tokens per rank) per configuration (default DEFAULT_SIZES)."""
    experts: int = 4
    """Experts in total."""
    topk: int = 2
    """Experts per token."""
    group_size: int = 1
    """FasterMoE smart-schedule group size."""
    dtype: str = "fp32"
    """fp32 | bf16."""
    iters: Optional[int] = None
    """Timed rounds (default 6; quick 2)."""
    warmup: Optional[int] = None
    """Discarded rounds (default 2; quick 1)."""
    world_size: int = 2
    """Processes to spawn (ignored under torchrun)."""
    threads: Optional[int] = None
    """Torch threads per process."""
    seed: int = 1234
    """Seed of weights, inputs, routing and the round order."""
    clock: str = "cpu"
    """cpu | wall: which measured time is compared (both are measured and reported)."""
    recalibrate: bool = False
    """Calibrate in the same run (:class:`InRunCalibration`) and predict with it."""
    recalibrate_out: Optional[str] = None
    """Where recalibrate writes its cluster YAML (default: next to json, else
    DEFAULT_INRUN_YAML)."""
    calib_tokens: Optional[list[int]] = None
    """Token counts of the in-run curve (default 64 .. 4096; quick 64 512 2048)."""
    calib_hidden: int = 512
    """H of the in-run curve's MLP (F = 2H)."""
    out_png: Optional[str] = None
    """Scatter plot of measured vs predicted."""
    from_json: Optional[str] = None
    """Measure nothing: reprint the table and redraw out_png from an earlier run's JSON."""
    json: Optional[str] = None
    """Write r2, summary and per-point rows here."""
    log_level: str = "INFO"
    """Rank-0 log level."""

    def __post_init__(self) -> None:
        self.skews = list(self.skews if self.skews is not None else
                          (QUICK_SKEWS if self.quick else DEFAULT_SKEWS))
        self.sizes = [tuple(s) for s in (self.sizes or (QUICK_SIZES if self.quick
                                                         else DEFAULT_SIZES))]
        self.iters = self.iters or (2 if self.quick else 6)
        self.warmup = self.warmup if self.warmup is not None else (1 if self.quick else 2)
        if self.iters < 1 or self.warmup < 0:
            raise ValueError("--iters must be >= 1 and --warmup >= 0")
        if self.clock not in ("cpu", "wall") or self.dtype not in ("fp32", "bf16"):
            raise ValueError(f"clock must be cpu or wall and dtype fp32 or bf16, got "
                             f"{self.clock!r}, {self.dtype!r}")


def run(opts: ValidateOptions) -> int:
    """Run the sweep (or, with ``from_json``, only redraw an earlier one)."""
    if opts.from_json:
        return replot(opts.from_json, opts.out_png)
    from megatron_moe_ext.runtime.launch import run_workers, under_torchrun

    if under_torchrun():
        opts = dataclasses.replace(opts, world_size=int(os.environ["WORLD_SIZE"]))
    return run_workers(worker, opts.world_size, opts)


def configurations(opts: ValidateOptions) -> list[dict[str, Any]]:
    """The sweep: every size x every skew."""
    return [{"hidden": h, "ffn": f, "tokens": t, "skew": s}
            for (h, f, t), s in itertools.product(opts.sizes, opts.skews)]


def bench_options(opts: ValidateOptions, conf: dict[str, Any], world: int):
    """The layer benchmark's options for one configuration (its defaults otherwise)."""
    from megatron_moe_ext.bench.layer import LayerBenchOptions

    return LayerBenchOptions(
        world_size=world, tokens=conf["tokens"], hidden=conf["hidden"], ffn=conf["ffn"],
        experts=opts.experts, topk=opts.topk, skew=conf["skew"], group_size=opts.group_size,
        dtype=opts.dtype, cluster=str(opts.cluster), seed=opts.seed, iters=1, warmup=0)


def worker(opts: ValidateOptions) -> None:
    """One rank of the sweep (every rank of the world calls it); rank 0 reports."""
    import torch
    import torch.distributed as dist

    from megatron_moe_ext.runtime import device as rdev

    warnings.filterwarnings("ignore")
    rdev.quiet_known_warnings()
    from megatron_moe_ext.bench.layer import build_case, machine_info, predict
    from megatron_moe_ext.config import RuntimeConfig
    from megatron_moe_ext.megatron import layer_builder as lb

    rcfg = RuntimeConfig(device="cpu", num_threads=opts.threads)
    rt = rdev.setup_runtime(rcfg, "cpu")
    rank, world = rt.rank, rt.world_size
    logging.basicConfig(level=opts.log_level.upper() if rank == 0 else "WARNING",
                        format=f"[validate rank {rank}] %(message)s", force=True)
    logging.getLogger("megatron.core.tensor_parallel.random").setLevel(logging.ERROR)
    load_start = os.getloadavg()[0] if hasattr(os, "getloadavg") else None
    pg = lb.init_expert_parallel(world, opts.seed)
    confs = configurations(opts)
    logger.info("%d configurations x %s on %d workers (%d threads each), cluster %s, "
                "%d warm-up + %d timed rounds", len(confs), "/".join(IMPLS), world,
                torch.get_num_threads(), opts.cluster, opts.warmup, opts.iters)

    t_build = time.perf_counter()
    cases = []
    for cid, conf in enumerate(confs):
        bopts = bench_options(opts, conf, world)
        case = build_case(bopts, pg, rank, world, rt.device, what=f"config {conf}: ")
        pred = predict(case.counts, bopts, world)
        if "error" in pred:
            raise RuntimeError(f"prediction failed for {conf}: {pred['error']}")
        cases.append({"id": cid, "conf": conf, "layers": case.layers, "x": case.x,
                      "gy": case.gy, "counts": case.counts, "bopts": bopts,
                      "routing": lb.describe_counts(case.counts, world),
                      "prediction": {"cluster": pred}})
    logger.info("built %d layer pairs in %.1f s", len(cases), time.perf_counter() - t_build)

    calib = InRunCalibration(opts, rank, world) if opts.recalibrate else None
    raw: dict[tuple[int, str], list[tuple[float, float, float, float]]] = {}
    t_run = time.perf_counter()
    gc.disable()
    for rnd in range(opts.warmup + opts.iters):
        order = list(range(len(cases)))
        random.Random(opts.seed + rnd).shuffle(order)  # same order on every rank
        t_round = time.perf_counter()
        for k, cid in enumerate(order):
            case = cases[cid]
            impls = IMPLS if (rnd + k) % 2 == 0 else IMPLS[::-1]
            for name in impls:
                _, f, b = lb.time_layer(case["layers"][name], case["x"], case["gy"], False)
                if rnd >= opts.warmup:
                    raw.setdefault((cid, name), []).append((f.wall, b.wall, f.cpu, b.cpu))
            gc.collect()
        if calib is not None and rnd >= opts.warmup:
            calib.round()
        logger.info("round %d/%d (%s): %.1f s", rnd + 1, opts.warmup + opts.iters,
                    "warm-up" if rnd < opts.warmup else "timed", time.perf_counter() - t_round)
    gc.enable()
    run_s = time.perf_counter() - t_run

    keys = sorted(raw)
    flat = lb.max_over_ranks([v for key in keys for it in raw[key] for v in it])
    inrun_yaml = calib.finish() if calib is not None else None
    if rank == 0 and inrun_yaml:
        for case in cases:
            pred = predict(case["counts"], case["bopts"], world, cluster=inrun_yaml)
            if "error" in pred:
                raise RuntimeError(f"prediction failed for {case['conf']}: {pred['error']}")
            case["prediction"]["inrun"] = pred
    source = "inrun" if inrun_yaml else "cluster"
    rows = []
    per = 4 * opts.iters
    for i, (cid, name) in enumerate(keys):
        vals = flat[i * per:(i + 1) * per]
        its = [vals[j:j + 4] for j in range(0, per, 4)]
        tot = [f + b for f, b, _, _ in its]
        cpu = [cf + cb for _, _, cf, cb in its]
        case = cases[cid]
        pred = case["prediction"].get(source) or case["prediction"]["cluster"]
        pred = pred[name]
        chosen = cpu if opts.clock == "cpu" else tot
        row = dict(
            case["conf"], config_id=cid, impl=name, schedule=pred["schedule"],
            group_size=pred["group_size"], clock=opts.clock,
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
        pred_yaml = inrun_yaml or str(opts.cluster)
        print(format_table(rows, summary), flush=True)
        other = "wall" if opts.clock == "cpu" else "cpu"
        summary_other = summarize([dict(r, measured_s=r[f"measured_{other}_s"]) for r in rows])
        print(f"with the {other} clock instead: R^2 = {summary_other['r2']:.4f}, log-space R^2 "
              f"{summary_other['r2_log']:.4f}, measured / predicted median "
              f"{summary_other['ratio_measured_over_predicted_median']:.3f}", flush=True)
        result = {
            "r2": summary["r2"], "points": summary["points"], "clock": opts.clock,
            f"r2_{opts.clock}": summary["r2"], f"r2_{other}": summary_other["r2"],
            "configurations": len(cases), "summary": summary,
            f"summary_{other}": summary_other,
            "prediction_source": ("in-run calibration (--recalibrate), "
                                  f"{inrun_yaml}" if inrun_yaml else f"--cluster {opts.cluster}"),
            "cluster": pred_yaml, "cluster_yaml_header": _yaml_header(pred_yaml),
        }
        if inrun_yaml:
            static = summarize([dict(r, predicted_s=r["predicted_cluster_s"]) for r in rows])
            result["r2_cluster"] = static["r2"]
            result["summary_cluster"] = static
            result["cluster_static"] = str(opts.cluster)
            print(f"with --cluster {opts.cluster} instead: R^2 = {static['r2']:.4f}, log-space "
                  f"R^2 {static['r2_log']:.4f}, measured / predicted median "
                  f"{static['ratio_measured_over_predicted_median']:.3f}", flush=True)
        machine = machine_info()
        machine["loadavg_1min_start"] = load_start
        result.update({
            "model": MODEL_TEXT, "config": dataclasses.asdict(opts),
            "world_size": world, "threads_per_rank": torch.get_num_threads(),
            "timed_seconds": run_s, "machine": machine, "rows": rows,
        })
        if opts.out_png:
            label = "in-run calibration" if inrun_yaml else Path(str(opts.cluster)).stem
            result["png"] = plot(rows, summary, opts.out_png,
                                 f"perf model vs measured layer, EP={world}, P and W: {label}")
            logger.info("wrote %s", result["png"])
        if opts.json:
            Path(opts.json).parent.mkdir(parents=True, exist_ok=True)
            Path(opts.json).write_text(json.dumps(result, indent=1, default=str))
            logger.info("wrote %s", opts.json)
    dist.barrier()
    lb.destroy_expert_parallel()
    dist.destroy_process_group()


class InRunCalibration:
    """Calibration measurements inside the validation run: the link rates once at the start,
    and the expert-MLP throughput curve as one pass over its token counts per timed round (all
    ranks together, right after the round's layers), so that it sees the same machine load."""

    def __init__(self, opts: ValidateOptions, rank: int, world: int) -> None:
        from megatron_moe_ext.bench.calib_measure import CurveSampler, measure_links, node_layout
        from megatron_moe_ext.bench.calibrate import CalibrateOptions

        hidden = opts.calib_hidden
        tokens = opts.calib_tokens or ([64, 512, 2048] if opts.quick else
                                       [64, 128, 256, 512, 1024, 2048, 4096])
        self.copts = CalibrateOptions(hidden=hidden, ffn=2 * hidden, dtypes=[opts.dtype],
                                      tokens=list(tokens), curve="mlp", quick=opts.quick)
        self.opts, self.rank, self.world, self.dtype = opts, rank, world, opts.dtype
        self.sampler = CurveSampler(hidden, 2 * hidden, self.copts.tokens, opts.dtype, "mlp",
                                    self.copts.activation)
        self.nodes, self.hosts = node_layout(self.copts.workers_per_node, rank, world)
        pairs = [(a, b) for a in range(world) for b in range(a + 1, world)]
        self.links = measure_links(pairs, self.copts.sizes, self.copts.p2p_seconds)
        self.load = [round(x, 2) for x in os.getloadavg()] if hasattr(os, "getloadavg") else None

    def round(self) -> None:
        """One fwd+bwd of the MLP at every token count (barrier first)."""
        import torch.distributed as dist

        dist.barrier()
        self.sampler.round()

    def finish(self) -> Optional[str]:
        """Gather, summarise and (rank 0) write the cluster YAML; returns its path on rank 0."""
        import torch
        import torch.distributed as dist

        from megatron_moe_ext.bench import calib_cluster as cc
        from megatron_moe_ext.bench.calib_measure import format_rows

        rows = self.sampler.rows()
        gathered: list[Any] = [None] * self.world
        dist.all_gather_object(gathered, {"gemm": {"mlp": {self.dtype: rows}},
                                          "links": self.links})
        if self.rank != 0:
            return None
        links: dict = {}
        for g in gathered:
            links.update(g["links"])
        m = cc.summarize([g["gemm"] for g in gathered], links, self.nodes, self.hosts,
                         self.copts.bandwidth, "mlp", self.opts.clock)
        out = self.opts.recalibrate_out
        if out is None:
            out = (str(Path(self.opts.json).with_suffix("")) + ".cluster.yaml" if self.opts.json
                   else DEFAULT_INRUN_YAML)
        cmd = ("scripts/validate_perf_model.py --recalibrate (in-run: one pass over the curve "
               "per timed round, interleaved with the layer timings)")
        extra = {"threads": torch.get_num_threads(), "torch": torch.__version__,
                 "loadavg": self.load, "emulation": None}
        tool = "scripts/validate_perf_model.py --recalibrate"
        spec = cc.cluster_spec(m, "local-cpu-inrun", self.copts.intra_kind,
                               cc.provenance(m, cmd, extra, tool=tool))
        cc.write_cluster(spec, cc.header_comment(m, "local-cpu-inrun", self.copts, cmd, extra,
                                                 tool=tool), out)
        logger.info("in-run calibration: %s TFLOP/s by tokens (wall/cpu) %s; link %.3f "
                    "Gbit/s; wrote %s", self.dtype, format_rows(rows),
                    m["intra"]["gbps"] if m["intra"] else float("nan"), out)
        return out


def _yaml_header(cluster: str) -> list[str]:
    """The comment header of the cluster file (date, command, measured values)."""
    from megatron_moe_ext.perf.cluster import CLUSTER_DIR

    path = Path(cluster)
    if not path.suffix and not path.exists():
        path = CLUSTER_DIR / f"{cluster}.yaml"
    try:
        return [ln for ln in path.read_text().splitlines() if ln.startswith("#")]
    except OSError:
        return []
