#!/usr/bin/env python
"""Draw the DDL-Roofline of model configs on a cluster and print predicted speedups.

For each model config (configs/models/*.yaml) and routing (balanced, and Zipf skew --skew),
the performance model (megatron_moe_ext/perf) predicts one MoE layer's forward + backward for
four variants: synchronous expert parallelism (``sync``, FastMoE / stock Megatron), the smart
schedule (``smart``, grouped pairwise exchange with group size moe.fastermoe.group_size),
dynamic shadowing (``shadow``, Algorithm 1) and both (``smart+shadow``). Each becomes a point
(x = R_CC, y = useful TFLOP/s per worker) under the ideal and semi-ideal lines.

    python scripts/roofline.py --config configs/models/moe-gpt.yaml --cluster johnny \\
        --png docs/img/roofline_johnny.png --json runs/roofline/johnny.json
    python scripts/roofline.py --config configs/models/moe-gpt-s-tiny.yaml --cluster local-cpu

Shapes come from the config: H = model.hidden_size, alpha = expert parameters / (2 H^2)
(= moe.ffn_hidden_size / H for gelu), E = moe.num_experts, top-k, tokens per worker per layer
= train.micro_batch_size x model.seq_length (--tokens overrides), dtype = train.precision.
The expert-parallel group is parallel.expert workers (--ep overrides) on the layer's own
mapping (perf.topology.ep_topology): the whole cluster, its first parallel.expert /
workers_per_node nodes, or a stand-in. Skewed routing: the benchmark's exact Zipf counts
(megatron_moe_ext/routing.py zipf_counts: popularity ~ 1 / rank^skew, the same copies per
expert on every worker), popularity ranks permuted over the experts by --seed. Bound = the
artifact's per-layer fwd+bwd bound of the smart schedule, (4A + 3C) / (max(2A, C) +
max(2A, 2C)), from the sync prediction's A and C.
"""

from __future__ import annotations

import argparse
import json
import logging
import sys
from pathlib import Path
from typing import Optional, Sequence

from megatron_moe_ext.bench.roofline_table import analyse, format_table, points_json

REPO = Path(__file__).resolve().parents[1]  # default model config


def parse_args(argv: Optional[Sequence[str]] = None) -> argparse.Namespace:
    p = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--config", nargs="+", default=[str(REPO / "configs/models/moe-gpt.yaml")],
                   help="model config YAML(s) (default: configs/models/moe-gpt.yaml)")
    p.add_argument("--cluster", default="johnny",
                   help="cluster YAML or name in configs/clusters/ (default: %(default)s)")
    p.add_argument("--skew", type=float, nargs="+", default=[1.0],
                   help="Zipf exponent(s) of the skewed routing; balanced routing is always "
                        "included (default: %(default)s)")
    p.add_argument("--seed", type=int, default=0, help="seed of the skewed routing (default: 0)")
    p.add_argument("--tokens", type=int, default=None,
                   help="tokens per worker per layer (default: micro_batch_size x seq_length)")
    p.add_argument("--ep", type=int, default=None,
                   help="expert-parallel workers (default: the config's parallel.expert)")
    p.add_argument("--group-size", type=int, default=None,
                   help="smart-schedule group size (default: moe.fastermoe.group_size)")
    p.add_argument("--dtype", default=None, help="dtype (default: the config's train.precision)")
    p.add_argument("--png", default="runs/roofline/roofline.png",
                   help="output PNG (default: %(default)s)")
    p.add_argument("--json", metavar="PATH", help="write points and speedups as JSON")
    p.add_argument("--log-level", default="WARNING", help="log level (default: %(default)s)")
    return p.parse_args(argv)


def main(argv: Optional[Sequence[str]] = None) -> int:
    args = parse_args(argv)
    logging.basicConfig(level=args.log_level.upper(), format="%(message)s")
    from megatron_moe_ext.perf.roofline import plot_roofline

    points, rows = [], []
    for path in args.config:
        p, r = analyse(path, args.cluster, args.skew, args.seed, args.tokens, args.ep,
                       args.group_size, args.dtype)
        points += p
        rows += r
    print(format_table(rows))
    cluster = rows[0]["cluster"] if rows else args.cluster
    png = plot_roofline(points, cluster, args.png)
    print(f"wrote {png}")
    if args.json:
        out = {"cluster": args.cluster, "skews": args.skew, "seed": args.seed,
               "png": str(png), "rows": rows,
               "points": points_json(points)}
        Path(args.json).parent.mkdir(parents=True, exist_ok=True)
        Path(args.json).write_text(json.dumps(out, indent=1))
        print(f"wrote {args.json}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
