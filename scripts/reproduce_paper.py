#!/usr/bin/env python
"""Reproduce the FasterMoE paper's (PPoPP'22) headline speedups on an emulated johnny replica.

Runs scripts/bench_moe_layer.py (stock Megatron vs FasterMoELayer, identical weights and forced
routing) under scripts/emulate_cluster.py with the johnny cluster scaled by --scale
(2 nodes x 1 worker: one process per network namespace, a rate-limited NIC between them),
for balanced and Zipf-skewed routing, in four FasterMoE variants:

  schedule    smart schedule only          --shadow never     --group-size 1
  shadow      shadowing, no pipelining     --shadow predictor --group-size 2
              (g = world size = 2: one step, so the smart schedule cannot overlap anything;
               the closest thing to "shadowing only" our layer offers)
  both        smart schedule + shadowing   --shadow predictor --group-size 1
  both-model  as "both", but the shadows are judged by the full performance model with the
              smart schedule (--shadow model) instead of the paper's synchronous formula
  both+gate   as "both" plus the topology-aware gate (moe.router.type=topology_aware,
              moe.router.cluster=johnny -> f = 0.071, moe.router.workers_per_node=1);
              the gate is in the router, so the stock layer of that run is gated too.

Each bench run times stock Megatron and FasterMoE in the same process (ABBA), so every row
has its own stock baseline. The JSONs go to --runs-dir (docs/data/reproduction by default, so
they are committed with the report); the report (Markdown) to --out, a bar chart to --png and
the link-rate sweep's scatter next to it.

After the variants: a link-rate sweep (balanced routing, smart schedule, one replica file per
--sweep-scales entry; the report's R^2), then calibrate.py under the emulator, whose cluster
file predicts one more balanced run (--no-calibrate skips it). --report-only rebuilds the
report from the JSONs without running anything.

The forced routing of the benchmark is checked to be honoured exactly; with the topology gate
the benchmark adopts the router's (gated) routing instead, so the JSON's routing counts are
the post-gate ones.

Prediction: the bench's performance model and the shadow predictor use a replica cluster
file written to --runs-dir: compute rates from configs/clusters/local-cpu.yaml (calibrated,
CPU clock), 2 nodes x 1 worker, NIC = 50 Gb/s x scale.

Example:
    python scripts/reproduce_paper.py --out docs/reproduction.md     # ~7 min, quiet 2-core VM
    python scripts/reproduce_paper.py --quick --out /tmp/repro_quick.md  # smoke, ~3 min
    python scripts/reproduce_paper.py --out docs/reproduction.md --report-only
"""

from __future__ import annotations

import argparse
import sys
from pathlib import Path

from megatron_moe_ext.emulation.report import SWEEP_SCALES, VARIANTS
from megatron_moe_ext.emulation.reproduce import DEFAULT_SCALE, reproduce

REPO = Path(__file__).resolve().parents[1]  # default locations of the report and its data


def parse_args(argv=None):
    p = argparse.ArgumentParser(description=__doc__,
                                formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--quick", action="store_true",
                   help="tiny smoke version (256 tokens, H=64, 3 iterations, skew 1.5 only)")
    p.add_argument("--out", default=str(REPO / "docs" / "reproduction.md"),
                   help="Markdown report (default: %(default)s)")
    p.add_argument("--png", default=None,
                   help="bar chart (default: docs/img/repro_speedups.png next to --out's docs/, "
                        "or <out>.png for --quick)")
    p.add_argument("--scale", type=float, default=DEFAULT_SCALE,
                   help="link scale factor for the johnny replica (default: %(default)s: "
                        "NIC 50 Gb/s -> 500 Mbit/s, R_CC of the full sizes ~0.5-1.5)")
    p.add_argument("--skews", type=float, nargs="+", default=None,
                   help="Zipf skews of the routing (default: 0 1.5; --quick: 1.5)")
    p.add_argument("--variants", nargs="+", default=[v[0] for v in VARIANTS],
                   choices=[v[0] for v in VARIANTS], help="variants to run (default: all)")
    p.add_argument("--sweep-scales", type=float, nargs="*", default=list(SWEEP_SCALES),
                   help="link scales of the predicted-vs-measured sweep (balanced routing, "
                        "smart schedule; the report's R^2; at least 3 for the target; none to "
                        "skip; default: %(default)s)")
    p.add_argument("--no-calibrate", action="store_true",
                   help="skip calibrate.py under the emulator and the run predicted from its "
                        "cluster file")
    p.add_argument("--runs-dir", default=None,
                   help="where the bench JSONs and the replica cluster files go (default: "
                        "docs/data/reproduction, kept next to the report; --quick: "
                        "/tmp/reproduce_paper_quick)")
    p.add_argument("--max-load", type=float, default=2.5,
                   help="wait while the 1-min load average is above this (default: %(default)s)")
    p.add_argument("--max-wait", type=float, default=120.0,
                   help="longest wait for a quiet machine before each run, s "
                        "(default: %(default)s)")
    p.add_argument("--timeout", type=int, default=240,
                   help="emulator --timeout per bench run, s (default: %(default)s)")
    p.add_argument("--dry-run", action="store_true", help="print the commands only")
    p.add_argument("--report-only", action="store_true",
                   help="run nothing: rebuild the report and plots from the JSONs already in "
                        "--runs-dir (same options as the run that wrote them)")
    args = p.parse_args(argv)
    if args.skews is None:
        args.skews = [1.5] if args.quick else [0.0, 1.5]
    if args.runs_dir is None:
        args.runs_dir = ("/tmp/reproduce_paper_quick" if args.quick
                         else str(REPO / "docs" / "data" / "reproduction"))
    return args


def main(argv=None) -> int:
    if argv is None:
        argv = sys.argv[1:]
    args = parse_args(argv)
    out = Path(args.out).resolve()
    args.png = str(Path(args.png).resolve() if args.png else (
        out.with_suffix(".png") if args.quick else REPO / "docs" / "img" / "repro_speedups.png"))
    return reproduce(args, argv, Path(__file__).resolve().parent)


if __name__ == "__main__":
    sys.exit(main())
