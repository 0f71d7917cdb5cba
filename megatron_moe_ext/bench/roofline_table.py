"""The roofline table of scripts/roofline.py: for each model config and routing (balanced and
Zipf-skewed, :mod:`megatron_moe_ext.routing`), the performance model's four variants (sync,
smart, shadow, smart+shadow) as roofline points and one table row with predicted times,
speedups and bounds, on the expert-parallel group's topology
(:func:`megatron_moe_ext.perf.topology.ep_topology`, the layer's mapping).
"""

from __future__ import annotations

from pathlib import Path
from typing import Any, Optional, Sequence


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


def analyse(path: str, cluster: str, skews: Sequence[float] = (1.0,), seed: int = 0,
            tokens: Optional[int] = None, ep: Optional[int] = None,
            group_size: Optional[int] = None,
            dtype: Optional[str] = None) -> tuple[list, list[dict[str, Any]]]:
    """(roofline points, table rows) of one model config on ``cluster`` for balanced routing
    and every Zipf skew > 0 of ``skews`` (:func:`megatron_moe_ext.routing.zipf_counts`, the
    benchmark's counts, expert popularity permuted by ``seed``). ``tokens``, ``ep``,
    ``group_size``, ``dtype`` override the config's. SystemExit when the model does not fit."""
    import dataclasses

    from megatron_moe_ext.perf.model import DTYPE_BYTES, predict_layer, smart_schedule_bound
    from megatron_moe_ext.perf.roofline import roofline_points
    from megatron_moe_ext.routing import zipf_counts

    model, cfg = model_from_config(path, tokens, dtype)
    ep = ep or cfg.parallel.expert
    topo = ep_topology(cluster, ep)
    n = topo.num_workers
    if model.num_experts % n:
        raise SystemExit(f"roofline: {model.num_experts} experts of {path} cannot be split over "
                         f"{n} workers")
    g = min(group_size or cfg.moe.fastermoe.group_size, n)
    if n % g:
        raise SystemExit(f"roofline: group size {g} does not divide {n} workers")
    points, rows = [], []
    for skew in [0.0] + [s for s in skews if s > 0]:
        label = model.name if skew == 0 else f"{model.name} skew {skew:g}"
        m = dataclasses.replace(model, name=label)
        counts = zipf_counts(n, m.num_experts, m.tokens_per_worker, m.topk, skew, seed)
        pts = roofline_points(m, topo, zipf=skew, seed=seed, group_size=g, counts=counts)
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


def points_json(points: Sequence[Any]) -> list[dict[str, Any]]:
    """The JSON rows of roofline points."""
    return [{"model": p.model, "variant": p.variant, "r_cc": p.r_cc,
             "throughput_tflops": p.throughput / 1e12, "total_ms": p.total_s * 1e3,
             "peak_tflops": p.peak_flops / 1e12, "shadows": list(p.shadows)} for p in points]
