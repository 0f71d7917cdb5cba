"""The scale lab as a source of measurements for the performance-model validation
(scripts/validate_perf_model.py ``--from-lab DIR``): lab JSONs -> the validation's rows, then
its statistics, table and scatter (:mod:`megatron_moe_ext.bench.validate_report`), with R^2 per
worker count.

Notation: W workers; measured = lab fwd+bwd / D (cluster seconds), predicted =
perf.model.predict_layer of the same routing (what the lab JSON holds); floor = the same
configuration's compute-zero time (``<name>_floor.json`` next to it, or ``lab.floor``).
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any, Optional, Sequence

from ..bench.stats import r_squared
from ..bench.validate_report import format_table, plot, summarize

__all__ = ["lab_rows", "validate_lab"]


def _floor_of(path: Path, doc: dict, impl: str) -> Optional[float]:
    sibling = path.with_name(path.stem + "_floor.json")
    if sibling.exists():
        return (json.loads(sibling.read_text())["impls"].get(impl) or {}).get("fwd_bwd_s")
    return ((doc.get("lab") or {}).get("floor") or {}).get(impl, {}).get("fwd_bwd_s")


def lab_rows(paths: Sequence[str | Path]) -> list[dict[str, Any]]:
    """Validation rows of lab result files (directories are searched for ``*.json``; floor
    files and emulated-less runs are skipped)."""
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
        for impl, v in doc["impls"].items():
            floor = _floor_of(f, doc, impl)
            rows.append({
                "config_id": str(f), "impl": impl, "workers": doc["cluster"]["workers"],
                "cluster": doc["cluster"]["name"], "hidden": cfg["hidden"], "ffn": cfg["ffn"],
                "tokens": cfg["tokens"], "skew": cfg["skew"], "imbalance": 1.0,
                "group_size": cfg["group_size"], "shadows": doc.get("shadows"),
                "measured_s": v["cluster_fwd_bwd_s"], "predicted_s": v["predicted_fwd_bwd_s"],
                "floor_fraction": floor / v["fwd_bwd_s"] if floor else None,
                "clock": "wall", "load": doc["machine"]["loadavg_1min_start"]})
    return rows


def validate_lab(paths: Sequence[str | Path], out_png: Optional[str] = None,
                 json_path: Optional[str] = None, floor_limit: float = 0.10) -> dict[str, Any]:
    """Statistics over the lab points whose floor is known and under ``floor_limit``; prints
    the table, draws ``out_png``, writes ``json_path``; returns the summary."""
    rows = lab_rows(paths)
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
                                               "source": "scale lab"}, indent=1))
    return summary
