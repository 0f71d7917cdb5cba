"""The validation sweep's report: statistics of measured vs predicted layer times (R^2 over
all points, per implementation, in log space; MAPE; speedups), the table, the scatter plot,
and :func:`replot` of an earlier run's JSON. Pure Python + matplotlib; the sweep itself is
:mod:`megatron_moe_ext.bench.validate`.
"""

from __future__ import annotations

import json
import math
import statistics
from pathlib import Path
from typing import Any, Optional, Sequence

from megatron_moe_ext.bench.stats import r_squared

IMPLS = ("megatron", "fastermoe")


def _r2(measured: Sequence[float], predicted: Sequence[float]) -> float:
    """:func:`r_squared`, NaN where it is undefined (the JSON and the tables show NaN)."""
    v = r_squared(measured, predicted)
    return float("nan") if v is None else v


def summarize(rows: list[dict[str, Any]]) -> dict[str, Any]:
    """R^2 (all points, per implementation, log space), MAPE, mean ratio measured/predicted."""
    def stats(sel: list[dict[str, Any]]) -> dict[str, Any]:
        m = [r["measured_s"] for r in sel]
        p = [r["predicted_s"] for r in sel]
        ratio = [a / b for a, b in zip(m, p)]
        return {"points": len(sel), "r2": _r2(m, p),
                "r2_log": _r2([math.log(x) for x in m], [math.log(x) for x in p]),
                "mape": statistics.fmean(abs(a - b) / a for a, b in zip(m, p)),
                "ratio_measured_over_predicted_median": statistics.median(ratio),
                "ratio_min": min(ratio), "ratio_max": max(ratio)}

    ok = [r for r in rows if r.get("predicted_s") and r.get("measured_s")]
    out = stats(ok) if ok else {"points": 0, "r2": float("nan")}
    out["by_impl"] = {impl: stats([r for r in ok if r["impl"] == impl])
                      for impl in IMPLS if any(r["impl"] == impl for r in ok)}
    # speedup (megatron / fastermoe) measured vs predicted, per configuration
    pairs = {}
    for r in ok:
        pairs.setdefault(r["config_id"], {})[r["impl"]] = r
    sp = [(v["megatron"]["measured_s"] / v["fastermoe"]["measured_s"],
           v["megatron"]["predicted_s"] / v["fastermoe"]["predicted_s"])
          for v in pairs.values() if len(v) == 2]
    if sp:
        out["speedup"] = {"measured_median": statistics.median(a for a, _ in sp),
                          "predicted_median": statistics.median(b for _, b in sp),
                          "mean_abs_error": statistics.fmean(abs(a - b) for a, b in sp)}
    return out


def plot(rows: list[dict[str, Any]], summary: dict[str, Any], path: str, title: str) -> str:
    """Scatter of measured vs predicted fwd+bwd (ms, log-log) with the y = x line."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, ax = plt.subplots(figsize=(5.6, 4.6))
    skews = sorted({r["skew"] for r in rows})
    markers = dict(zip(skews, "osD^v<>ph"))
    colors = {"megatron": "tab:blue", "fastermoe": "tab:orange"}
    for impl in IMPLS:
        for s in skews:
            sel = [r for r in rows if r["impl"] == impl and r["skew"] == s
                   and r.get("predicted_s") and r.get("measured_s")]
            if sel:
                ax.scatter([r["predicted_s"] * 1e3 for r in sel],
                           [r["measured_s"] * 1e3 for r in sel], c=colors[impl],
                           marker=markers[s], s=26, alpha=0.85,
                           label=f"{impl} skew {s:g}")
    vals = [r[k] * 1e3 for r in rows for k in ("predicted_s", "measured_s") if r.get(k)]
    if vals:
        lo, hi = min(vals) / 1.3, max(vals) * 1.3
        ax.plot([lo, hi], [lo, hi], "k-", lw=1, label="measured = predicted")
        ax.set_xlim(lo, hi)
        ax.set_ylim(lo, hi)
    ax.set_xscale("log")
    ax.set_yscale("log")
    from matplotlib.ticker import FuncFormatter

    plain = FuncFormatter(lambda v, _: f"{v:g}")
    for axis in (ax.xaxis, ax.yaxis):
        axis.set_major_formatter(plain)
        axis.set_minor_formatter(FuncFormatter(
            lambda v, _: f"{v:g}" if f"{v:g}"[0] in "25" else ""))
    ax.tick_params(which="minor", labelsize=7)
    ax.set_xlabel("predicted fwd+bwd (ms)")
    clock = rows[0].get("clock", "wall") if rows else "wall"
    ax.set_ylabel(f"measured fwd+bwd (ms, median, {'CPU time' if clock == 'cpu' else 'wall'})")
    ax.set_title(f"{title}\nR² = {summary['r2']:.3f} over {summary['points']} points "
                 f"(log-space R² {summary.get('r2_log', float('nan')):.3f})", fontsize=9)
    ax.grid(True, which="both", alpha=0.3)
    ax.legend(fontsize=6, ncol=2, loc="upper left")
    fig.tight_layout()
    out = Path(path)
    out.parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(out, dpi=100)
    plt.close(fig)
    return str(out)


def format_table(rows: list[dict[str, Any]], summary: dict[str, Any]) -> str:
    lines = [f"{'H':>5} {'F':>5} {'T':>5} {'skew':>4} {'imbal':>5}  {'impl':<9} "
             f"{'measured ms':>11} {'predicted ms':>12} {'ratio':>6}"]
    for r in rows:
        pred = r.get("predicted_s")
        lines.append(
            f"{r['hidden']:5d} {r['ffn']:5d} {r['tokens']:5d} {r['skew']:4g} "
            f"{r['imbalance']:5.2f}  {r['impl']:<9} {r['measured_s'] * 1e3:11.2f} "
            f"{(pred or float('nan')) * 1e3:12.2f} "
            f"{(r['measured_s'] / pred if pred else float('nan')):6.2f}")
    s = summary
    lines.append(f"R^2 = {s['r2']:.4f} ({rows[0]['clock'] if rows else '?'} clock) over "
                 f"{s['points']} points "
                 f"({len({r['config_id'] for r in rows})} configurations x 2 implementations); "
                 f"log-space R^2 {s.get('r2_log', float('nan')):.4f}; MAPE "
                 f"{s.get('mape', float('nan')):.1%}; measured / predicted median "
                 f"{s.get('ratio_measured_over_predicted_median', float('nan')):.3f}")
    for impl, v in s.get("by_impl", {}).items():
        lines.append(f"  {impl:<9}: R^2 {v['r2']:.4f}, MAPE {v['mape']:.1%}, measured / "
                     f"predicted {v['ratio_min']:.2f} .. {v['ratio_max']:.2f} "
                     f"(median {v['ratio_measured_over_predicted_median']:.2f})")
    if "speedup" in s:
        sp = s["speedup"]
        lines.append(f"  speedup megatron/fastermoe: measured median "
                     f"{sp['measured_median']:.3f}, predicted median {sp['predicted_median']:.3f}")
    return "\n".join(lines)


def replot(from_json: str, out_png: Optional[str] = None) -> int:
    """Measure nothing: print the table (and draw ``out_png``) from an earlier run's JSON."""
    data = json.loads(Path(from_json).read_text())
    rows, summary = data["rows"], data["summary"]
    print(format_table(rows, summary))
    if out_png:
        label = ("in-run calibration" if "in-run" in data.get("prediction_source", "")
                 else Path(str(data.get("cluster", "?"))).stem)
        print("wrote", plot(rows, summary, out_png,
                            f"perf model vs measured layer, EP={data.get('world_size', '?')}, "
                            f"P and W: {label}"))
    return 0
