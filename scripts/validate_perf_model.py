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
import sys
from typing import Optional, Sequence

from megatron_moe_ext.bench.validate import (
    DEFAULT_SIZES,
    DEFAULT_SKEWS,
    QUICK_SIZES,
    QUICK_SKEWS,
    ValidateOptions,
    run,
)
from megatron_moe_ext.perf.model import SIMULATORS


def _size(text: str) -> tuple[int, int, int]:
    try:
        h, f, t = (int(x) for x in text.lower().split("x"))
    except ValueError:
        raise argparse.ArgumentTypeError(f"expected HxFxT (e.g. 256x512x1024), got {text!r}")
    return h, f, t


def build_parser() -> argparse.ArgumentParser:
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
                   help="torch threads per process (default: OMP_NUM_THREADS if set, else "
                        "cores / processes)")
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
    p.add_argument("--from-lab", nargs="+", metavar="DIR", default=None,
                   help="measure nothing: validate against the scale lab's result JSONs "
                        "(megatron_moe_ext/lab; points whose floor is >= 10 %% are left out), "
                        "R^2 per worker count")
    p.add_argument("--repredict", action="store_true",
                   help="with --from-lab: compare with today's performance model (recomputed "
                        "from each file's config and recorded shadows) instead of the "
                        "prediction stored in the file")
    p.add_argument("--simulator", choices=SIMULATORS, default="lockstep",
                   help="with --repredict: how the model prices the smart schedule: lockstep "
                        "(one all-to-all per step on one comm stream, the model the shadow "
                        "policy uses) or links (every flow on its own links and every worker "
                        "its own compute, perf/linksim.py) (default: %(default)s)")
    p.add_argument("--from-json", metavar="PATH",
                   help="measure nothing: reprint the table and redraw --out-png from the JSON "
                        "of an earlier run")
    p.add_argument("--json", metavar="PATH", help="write r2, summary and per-point rows")
    p.add_argument("--log-level", default="INFO", help="rank-0 log level (default: %(default)s)")
    return p


def parse_args(argv: Optional[Sequence[str]] = None) -> ValidateOptions:
    p = build_parser()
    args = p.parse_args(argv)
    if args.from_lab:
        p.error("--from-lab is handled by main()")
    if args.repredict:
        p.error("--repredict needs --from-lab")
    if args.simulator != "lockstep":
        p.error("--simulator needs --from-lab and --repredict")
    values = {k: v for k, v in vars(args).items()
              if k not in ("from_lab", "repredict", "simulator")}
    try:
        return ValidateOptions(**values)
    except ValueError as exc:
        p.error(str(exc))
        raise


def main(argv: Optional[Sequence[str]] = None) -> int:
    args = build_parser().parse_args(argv)
    if args.from_lab:  # the scale lab's JSONs as the measurements (megatron_moe_ext/lab)
        from megatron_moe_ext.lab.validate import validate_lab

        try:
            validate_lab(args.from_lab, args.out_png, args.json, repredict_model=args.repredict,
                         simulator=args.simulator)
        except ValueError as exc:
            build_parser().error(str(exc))
        return 0
    return run(parse_args(argv))


if __name__ == "__main__":
    sys.exit(main())
