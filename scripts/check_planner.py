#!/usr/bin/env python
"""Check the layout planner against the scale lab: run >= 2 of its candidate layouts for real
(EP sub-groups, smart exchange / sync baseline with emulated experts, the expert-gradient
all-reduce across groups), rank them by measured time (kappa x layer call + all-reduce, the
planner's objective), and report Spearman vs the planner's ranking and the gap between the
planner's first choice and the fastest measured layout (JSON + markdown table).

Run it under the cluster emulator (one torchrun per emulated node), e.g. 16 workers on johnny:

    scripts/emulate_cluster.py --cluster configs/clusters/johnny.yaml --scale 0.002 \\
        --nodes 2 --workers-per-node 8 --intra-bus aggregate -- scripts/check_planner.py \\
        --config configs/models/moe-gpt-s.yaml model.hidden_size=512 \\
        model.ffn_hidden_size=1024 moe.ffn_hidden_size=1024 model.num_attention_heads=8 \\
        model.num_layers=1 train.micro_batch_size=1 train.global_batch_size=16 \\
        moe.impl=fastermoe --json runs/planner/johnny.json --markdown runs/planner/johnny.md

Its floor (compute zero, links unlimited: --scale 10 --no-intra-limit and --floor) gives,
with --floor-json, each candidate's floor fraction. Outside torchrun it spawns --world-size
processes (no link emulation). --list prints the planner's feasible candidates and exits.
See docs/traffic.md, "Planner vs scale lab".
"""

from __future__ import annotations

import argparse
import sys

from megatron_moe_ext.lab.layouts import DEFAULT_LAYOUTS, LayoutCheck, run_check


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0],
                                epilog="\n\n".join(__doc__.split("\n\n")[1:]),
                                formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("overrides", nargs="*", help="config overrides (model.hidden_size=512 ...)")
    p.add_argument("--config", default=None, help="model YAML (the planner's input)")
    p.add_argument("--cluster", default="johnny",
                   help="cluster YAML or name (under the emulator: the emulated one)")
    p.add_argument("--layouts", default=",".join(DEFAULT_LAYOUTS),
                   help="comma list of candidate labels (default: %(default)s)")
    p.add_argument("--iters", type=int, default=3, help="timed calls per candidate")
    p.add_argument("--warmup", type=int, default=1)
    p.add_argument("--dilation", default="auto",
                   help="D: 'auto' = 1 / emulator link scale under the emulator, else 1")
    p.add_argument("--floor", action="store_true", help="compute zero (the lab floor)")
    p.add_argument("--floor-json", default=None, help="a floor run's JSON: floor fractions")
    p.add_argument("--world-size", type=int, default=4, help="processes outside torchrun")
    p.add_argument("--seed", type=int, default=1234)
    p.add_argument("--json", default=None)
    p.add_argument("--markdown", default=None)
    p.add_argument("--list", action="store_true", help="print the planner's candidates, exit")
    a = p.parse_args(argv)
    check = LayoutCheck(cluster=a.cluster, config=a.config, overrides=a.overrides,
                        layouts=[x.strip() for x in a.layouts.split(",") if x.strip()],
                        world_size=a.world_size, iters=a.iters, warmup=a.warmup,
                        dilation=a.dilation, floor=a.floor, floor_json=a.floor_json,
                        seed=a.seed, json=a.json, markdown=a.markdown)
    try:
        check.validate()
        if a.list:
            from megatron_moe_ext.lab.layouts import list_candidates

            print(list_candidates(check))
            return 0
    except ValueError as exc:
        p.error(str(exc))
    return run_check(check)


if __name__ == "__main__":
    sys.exit(main())
