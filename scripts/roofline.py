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
The expert-parallel group is parallel.expert workers (--ep overrides): the whole cluster, or
its first parallel.expert / workers_per_node nodes. Skewed routing: expert popularity
~ 1 / rank^skew, ranks permuted by --seed, each worker draws its copies from a multinomial
(perf/roofline.py make_counts). Bound = the artifact's per-layer fwd+bwd bound of the smart
schedule, (4A + 3C) / (max(2A, C) + max(2A, 2C)), from the sync prediction's A and C.
"""

from __future__ import annotations

import argparse
import json
import logging
import sys
from pathlib import Path
from typing import Any, Optional, Sequence

REPO = Path(__file__).resolve().parents[1]
if str(REPO) not in sys.path:
    sys.path.insert(0, str(REPO))

logger = logging.getLogger("roofline")


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


def model_from_config(path: str, tokens: Optional[int] = None,
                      dtype: Optional[str] = None):
    """(MoEModelConfig, Config) of one model YAML."""
    from megatron_moe_ext.config import load_config
    from megatron_moe_ext.describe import PAPER_TABLE2, _shapes
    from megatron_moe_ext.perf.roofline import MoEModelConfig

    cfg = load_config(path)
    s = _shapes(cfg)
    stem = Path(path).stem
    name = PAPER_TABLE2.get(stem, {}).get("name", stem)
    model = MoEModelConfig(
        name=name, hidden=s["H"], alpha=s["expert"] / (2.0 * s["H"] ** 2),
        num_experts=cfg.moe.num_experts, topk=cfg.moe.topk,
        tokens_per_worker=tokens or cfg.train.micro_batch_size * cfg.model.seq_length,
        dtype=dtype or cfg.train.precision)
    return model, cfg


def ep_topology(cluster: str, ep: int):
    """Topology of the expert-parallel group (perf.topology.ep_topology, the layer's rule)."""
    from megatron_moe_ext.perf.topology import ep_topology as _ep_topology

    if ep < 2:
        raise SystemExit("roofline: expert parallel size 1 has no all-to-all to model (pass --ep)")
    return _ep_topology(cluster, ep)


def analyse(path: str, args: argparse.Namespace) -> tuple[list, list[dict[str, Any]]]:
    """(roofline points, table rows) of one model config for balanced + skewed routing."""
    import dataclasses

    from megatron_moe_ext.perf.model import DTYPE_BYTES, predict_layer, smart_schedule_bound
    from megatron_moe_ext.perf.roofline import make_counts, roofline_points

    model, cfg = model_from_config(path, args.tokens, args.dtype)
    ep = args.ep or cfg.parallel.expert
    topo = ep_topology(args.cluster, ep)
    n = topo.num_workers
    if model.num_experts % n:
        raise SystemExit(f"roofline: {model.num_experts} experts of {path} cannot be split over "
                         f"{n} workers")
    g = min(args.group_size or cfg.moe.fastermoe.group_size, n)
    if n % g:
        raise SystemExit(f"roofline: group size {g} does not divide {n} workers")
    points, rows = [], []
    for skew in [0.0] + [s for s in args.skew if s > 0]:
        label = model.name if skew == 0 else f"{model.name} skew {skew:g}"
        m = dataclasses.replace(model, name=label)
        counts = make_counts(n, m.num_experts, m.tokens_per_worker, m.topk, skew, args.seed)
        pts = roofline_points(m, topo, zipf=skew, seed=args.seed, group_size=g, counts=counts)
        points += pts
        sync = predict_layer(counts, None, m.hidden, m.alpha, DTYPE_BYTES[m.dtype], topo,
                             m.dtype, schedule="sync")
        by = {p.variant: p for p in pts}
        loads = counts.sum(axis=0)
        row = {
            "model": model.name, "config": path, "cluster": topo.spec.name, "workers": n,
            "skew": skew, "hidden": m.hidden, "alpha": m.alpha, "experts": m.num_experts,
            "topk": m.topk, "tokens_per_worker": m.tokens_per_worker, "dtype": m.dtype,
            "group_size": g,
            "expert_load_max_over_mean": float(loads.max() / loads.mean()),
            "comp_ms": sync.comp_s * 1e3, "a2a_ms": sync.comm_s * 1e3, "r_cc": sync.r_cc,
            "bound_smart": smart_schedule_bound(sync.comm_s, sync.comp_s),
            "bound_simple": ((4 * sync.comm_s + 3 * sync.comp_s)
                             / max(4 * sync.comm_s, 3 * sync.comp_s)),
            "shadows": list(by["shadow"].shadows),
        }
        for v, p in by.items():
            row[f"{v}_ms"] = p.total_s * 1e3
            row[f"{v}_tflops"] = p.throughput / 1e12
            row[f"{v}_r_cc"] = p.r_cc
            row[f"{v}_speedup"] = by["sync"].total_s / p.total_s
        rows.append(row)
    return points, rows


def format_table(rows: list[dict[str, Any]]) -> str:
    hdr = (f"{'model':<16} {'cluster':<10} {'skew':>4} {'ld max':>6} {'R_CC':>6} {'sync ms':>8} "
           f"{'smart':>6} {'shadow':>6} {'both':>6} {'bound':>6}  shadows")
    lines = [hdr, "-" * len(hdr)]
    for r in rows:
        lines.append(
            f"{r['model']:<16} {r['cluster']:<10} {r['skew']:4g} "
            f"{r['expert_load_max_over_mean']:6.2f} {r['r_cc']:6.2f} {r['sync_ms']:8.2f} "
            f"{r['smart_speedup']:5.2f}x {r['shadow_speedup']:5.2f}x "
            f"{r['smart+shadow_speedup']:5.2f}x {r['bound_smart']:5.2f}x  "
            f"{r['shadows'] if r['shadows'] else '-'}")
    lines.append("speedups are over sync EP (one MoE layer, fwd+bwd); ld max = max expert load "
                 "/ mean; bound = smart-schedule per-layer bound (4A+3C)/(max(2A,C)+max(2A,2C))")
    return "\n".join(lines)


def main(argv: Optional[Sequence[str]] = None) -> int:
    args = parse_args(argv)
    logging.basicConfig(level=args.log_level.upper(), format="%(message)s")
    from megatron_moe_ext.perf.roofline import plot_roofline

    points, rows = [], []
    for path in args.config:
        p, r = analyse(path, args)
        points += p
        rows += r
    print(format_table(rows))
    cluster = rows[0]["cluster"] if rows else args.cluster
    png = plot_roofline(points, cluster, args.png)
    print(f"wrote {png}")
    if args.json:
        out = {"cluster": args.cluster, "skews": args.skew, "seed": args.seed,
               "png": str(png), "rows": rows,
               "points": [{"model": p.model, "variant": p.variant, "r_cc": p.r_cc,
                           "throughput_tflops": p.throughput / 1e12, "total_ms": p.total_s * 1e3,
                           "peak_tflops": p.peak_flops / 1e12, "shadows": list(p.shadows)}
                          for p in points]}
        Path(args.json).parent.mkdir(parents=True, exist_ok=True)
        Path(args.json).write_text(json.dumps(out, indent=1))
        print(f"wrote {args.json}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
