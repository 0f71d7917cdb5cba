"""The scale lab as a source of measurements for the performance-model validation
(scripts/validate_perf_model.py ``--from-lab DIR``): lab JSONs -> the validation's rows, then
its statistics, table and scatter (:mod:`megatron_moe_ext.bench.validate_report`), with R^2 per
worker count.

Notation: W workers; measured = lab fwd+bwd / D (cluster seconds), predicted =
perf.model.predict_layer of the same routing (what the lab JSON holds); floor = the same
configuration's compute-zero time (``<name>_floor.json`` next to it, or ``lab.floor``).
With ``repredict`` the prediction is recomputed by today's model (:func:`repredict`) from the
file's configuration and the shadows it recorded, so that measurements taken before a model
change are compared with the model as it is now; ``simulator`` chooses how that model prices
the smart schedule (``lockstep``, the model's own, or ``links``, :mod:`perf.linksim`).
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any, Optional, Sequence

import numpy as np

from ..bench.stats import r_squared
from ..bench.validate_report import format_table, plot, summarize

__all__ = ["lab_rows", "validate_lab", "repredict", "routing_imbalance"]

REPREDICTABLE_IMPLS = ("megatron", "fastermoe")
"""Implementations whose per-iteration prediction is a function of the config alone (the
prefetch and balanced-baseline runs depend on state the JSON does not hold)."""


def _shadow_sets(doc: dict, iters: int, where: str) -> list[list[int]]:
    """The shadow set of each timed iteration, from the recorded distinct sets (first-seen
    order) and their counts: one set for all, or one distinct set per iteration."""
    sets, counts = doc.get("shadows") or [[]], doc.get("shadow_set_counts") or [iters]
    if len(sets) == 1:
        return [list(sets[0])] * iters
    if len(sets) == iters and all(c == 1 for c in counts):
        return [list(s) for s in sets]
    raise ValueError(f"{where}: shadow sets {sets} x {counts} do not say which iteration used "
                     "which set; this file cannot be re-predicted")


def _timed_counts(doc: dict) -> tuple[Any, list[np.ndarray]]:
    """The lab topology and the [W, E] routing counts of each timed iteration of a lab result,
    rebuilt from its config exactly as the run built them (:func:`.setup.iteration_counts`)."""
    from .setup import iteration_counts, lab_topology

    cfg = doc["config"]
    world = int(doc["cluster"]["workers"])
    local = cfg.get("local_world_size") if (doc.get("lab") or {}).get("emulator_scale") else None
    topo = lab_topology(cfg["cluster"], world, local)
    iters, warmup = int(cfg["iters"]), int(cfg["warmup"])
    return topo, [iteration_counts(topo, world, cfg["experts"], cfg["tokens"], cfg["topk"],
                                   cfg["skew"], cfg["seed"], it, cfg["vary_routing"],
                                   cfg["routing"], cfg["gate"])
                  for it in range(warmup, warmup + iters)]


def routing_imbalance(doc: dict) -> float:
    """Median over the timed iterations of max_w B_w / mean_w B_w, B_w the tokens routed to
    worker w's experts (contiguous placement, before shadows): the lab's counterpart of the
    layer benchmark's ``routing.imbalance_max_over_mean``."""
    _, counts = _timed_counts(doc)
    out = []
    for c in counts:
        w = c.shape[0]
        loads = np.asarray(c, dtype=float).sum(axis=0).reshape(w, -1).sum(axis=1)
        out.append(float(loads.max() / loads.mean()) if loads.mean() > 0 else 1.0)
    return float(np.median(out))


def repredict(doc: dict, where: str = "lab JSON", simulator: str = "lockstep"
              ) -> dict[str, float]:
    """Median over the timed iterations of today's :func:`.setup.predict_impl` for each
    implementation of a lab result (cluster seconds), from its config and recorded shadows:
    the same inputs the run gave the model (:func:`.run.bench_layer`), the smart schedule
    priced by ``simulator`` (``perf.model.SIMULATORS``)."""
    from .setup import predict_impl

    cfg = doc["config"]
    if cfg.get("iteration") or cfg.get("prefetch", "none") != "none":
        raise ValueError(f"{where}: iteration-mode and prefetch runs cannot be re-predicted")
    shadows = _shadow_sets(doc, int(cfg["iters"]), where)
    bad = [impl for impl in doc["impls"] if impl not in REPREDICTABLE_IMPLS]
    if bad:
        raise ValueError(f"{where}: implementation(s) {bad} cannot be re-predicted "
                         f"(only {', '.join(REPREDICTABLE_IMPLS)})")
    topo, counts = _timed_counts(doc)
    preds: dict[str, list[float]] = {impl: [] for impl in doc["impls"]}
    for k, rows in enumerate(counts):
        for impl in preds:
            sh = shadows[k] if impl == "fastermoe" else []
            preds[impl].append(predict_impl(rows, topo, cfg["hidden"], cfg["ffn"], cfg["dtype"],
                                            impl, cfg["group_size"], sh, simulator).total_s)
    return {impl: float(np.median(v)) for impl, v in preds.items()}


def _floor_of(path: Path, doc: dict, impl: str) -> Optional[float]:
    sibling = path.with_name(path.stem + "_floor.json")
    if sibling.exists():
        return (json.loads(sibling.read_text())["impls"].get(impl) or {}).get("fwd_bwd_s")
    return ((doc.get("lab") or {}).get("floor") or {}).get(impl, {}).get("fwd_bwd_s")


def lab_rows(paths: Sequence[str | Path], repredict_model: bool = False,
             simulator: str = "lockstep") -> list[dict[str, Any]]:
    """Validation rows of lab result files (directories are searched for ``*.json``; floor
    files and emulated-less runs are skipped). ``repredict_model``: ``predicted_s`` from
    :func:`repredict` with ``simulator`` (the recorded one stays in ``predicted_recorded_s``)."""
    files: list[Path] = []
    for p in map(Path, paths):
        files += sorted(p.rglob("*.json")) if p.is_dir() else [p]
    rows = []
    for f in files:
        if f.stem.endswith("_floor") or f.name.startswith("plan_"):
            continue
        doc = json.loads(f.read_text())
        if doc.get("mode") != "emulated" or "impls" not in doc:
            continue
        cfg = doc["config"]
        now = repredict(doc, str(f), simulator) if repredict_model else {}
        imbalance = routing_imbalance(doc)
        for impl, v in doc["impls"].items():
            floor = _floor_of(f, doc, impl)
            rows.append({
                "config_id": str(f), "impl": impl, "workers": doc["cluster"]["workers"],
                "cluster": doc["cluster"]["name"], "hidden": cfg["hidden"], "ffn": cfg["ffn"],
                "tokens": cfg["tokens"], "skew": cfg["skew"], "imbalance": imbalance,
                "group_size": cfg["group_size"], "shadows": doc.get("shadows"),
                "measured_s": v["cluster_fwd_bwd_s"],
                "predicted_s": now.get(impl, v["predicted_fwd_bwd_s"]),
                "predicted_recorded_s": v["predicted_fwd_bwd_s"],
                "floor_fraction": floor / v["fwd_bwd_s"] if floor else None,
                "clock": "wall", "load": doc["machine"]["loadavg_1min_start"]})
    return rows


def validate_lab(paths: Sequence[str | Path], out_png: Optional[str] = None,
                 json_path: Optional[str] = None, floor_limit: float = 0.10,
                 repredict_model: bool = False, simulator: str = "lockstep") -> dict[str, Any]:
    """Statistics over the lab points whose floor is known and under ``floor_limit``; prints
    the table, draws ``out_png``, writes ``json_path``; returns the summary.
    ``repredict_model``: compare with today's model (:func:`repredict`), its smart schedule
    priced by ``simulator``; anything but ``lockstep`` needs ``repredict_model``."""
    if simulator != "lockstep" and not repredict_model:
        raise ValueError(f"simulator {simulator!r} prices a re-prediction: it needs "
                         "repredict_model (--repredict)")
    rows = lab_rows(paths, repredict_model, simulator)
    valid = [r for r in rows if r["floor_fraction"] is not None
             and r["floor_fraction"] < floor_limit]
    summary = summarize(valid) if valid else {"points": 0, "r2": float("nan")}
    summary["by_workers"] = {
        str(w): {"points": sum(r["workers"] == w for r in valid),
                 "r2": r_squared([r["measured_s"] for r in valid if r["workers"] == w],
                                 [r["predicted_s"] for r in valid if r["workers"] == w])}
        for w in sorted({r["workers"] for r in rows})}
    summary["left_out_floor"] = len(rows) - len(valid)
    if valid:
        print(format_table(valid, summary))
    print(f"lab points: {len(rows)}, valid (floor < {floor_limit:.0%}): {len(valid)}; R^2 by W: "
          + ", ".join(f"W={w}: {v['r2']}" for w, v in summary["by_workers"].items()))
    if out_png and valid:
        plot(valid, summary, out_png, "perf model vs the scale lab (cluster time = lab / D)")
    if json_path:
        Path(json_path).parent.mkdir(parents=True, exist_ok=True)
        Path(json_path).write_text(json.dumps({"summary": summary, "rows": rows,
                                               "source": "scale lab",
                                               "repredicted": repredict_model,
                                               "simulator": simulator}, indent=1))
    return summary
