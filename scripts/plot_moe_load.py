#!/usr/bin/env python
"""Draw a run's MoE expert load and imbalance cost from its metrics.jsonl.

Writes into --out: expert_load.png (tokens per expert over iterations, per layer),
imbalance_cost.png (seconds per iteration lost to imbalance per layer, and what shadowing won
back) and rank_wait.png (each rank's wait for the slowest rank). With --compare, the runs are
set side by side (e.g. moe.impl=megatron vs moe.impl=fastermoe). See docs/observability.md.

Example::

    python scripts/plot_moe_load.py runs/megatron --compare runs/fastermoe --out runs/plots
"""

from __future__ import annotations

import argparse
import sys

from megatron_moe_ext.plots import plot_moe_load


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__,
                                formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("run_dir", help="run folder (holding metrics.jsonl) or the metrics file")
    p.add_argument("--compare", nargs="+", default=[], metavar="RUN_DIR",
                   help="other runs drawn side by side")
    p.add_argument("--labels", nargs="+", metavar="NAME", help="one name per run (default: folder)")
    p.add_argument("--out", required=True, metavar="DIR", help="folder for the PNGs")
    args = p.parse_args(argv)
    try:
        paths = plot_moe_load([args.run_dir, *args.compare], args.out, labels=args.labels)
    except (FileNotFoundError, ValueError) as exc:
        sys.stderr.write(f"plot_moe_load: {exc}\n")
        return 2
    for path in paths:
        sys.stdout.write(f"{path}\n")
    return 0


if __name__ == "__main__":
    sys.exit(main())
