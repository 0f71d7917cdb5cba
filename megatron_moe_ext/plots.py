"""Figures of a run's MoE load and imbalance cost, from its metrics file (matplotlib, Agg).

A run is a run folder holding ``metrics.jsonl`` or the file itself. The training records'
``moe.layer_N`` entries carry ``expert_tokens`` [E], ``imbalance_cost_s``, ``rank_wait_s`` [W]
and ``shadow_saved_s`` (see docs/observability.md); runs of either ``moe.impl`` have them.
Several runs are drawn side by side, one column each, with shared axes per row.

Figures written by :func:`plot_moe_load` into the output folder:

- ``expert_load.png``: per layer (rows) a heatmap of tokens per expert over iterations.
- ``imbalance_cost.png``: per run, the imbalance cost of every layer over iterations
  (ms per iteration, solid) and, where shadows were on, the time they won back (dashed).
- ``rank_wait.png``: per layer, each rank's wait for the slowest rank over iterations.
"""

from __future__ import annotations

import json
import re
from pathlib import Path
from typing import Any, Optional, Sequence

Record = dict[str, Any]


def load_run(path: str | Path) -> list[Record]:
    """Training records (those with ``loss`` and ``moe``) of a run folder or metrics file,
    sorted by iteration; a re-logged iteration keeps its last record."""
    p = Path(path)
    if p.is_dir():
        p = p / "metrics.jsonl"
    if not p.is_file():
        raise FileNotFoundError(f"no metrics file at {p}")
    by_iter: dict[int, Record] = {}
    for line in p.read_text().splitlines():
        if line.strip():
            rec = json.loads(line)
            if "loss" in rec and rec.get("moe"):
                by_iter[int(rec["iteration"])] = rec
    if not by_iter:
        raise ValueError(f"{p}: no training records with per-layer MoE metrics")
    return [by_iter[k] for k in sorted(by_iter)]


def layer_names(records: Sequence[Record]) -> list[str]:
    """``layer_N`` keys of all records, by N."""
    names = {k for r in records for k in r["moe"]}
    return sorted(names, key=lambda k: int(re.sub(r"\D", "", k) or 0))


def series(records: Sequence[Record], layer: str, key: str) -> tuple[list[int], list[Any]]:
    """(iterations, values) of ``moe.<layer>.<key>`` where logged."""
    its, vals = [], []
    for r in records:
        v = r["moe"].get(layer, {}).get(key)
        if v is not None:
            its.append(int(r["iteration"]))
            vals.append(v)
    return its, vals


def _check(runs: list[tuple[str, list[Record]]]) -> None:
    for label, recs in runs:
        if not any("imbalance_cost_s" in v for r in recs for v in r["moe"].values()):
            raise ValueError(f"run {label}: its metrics have no imbalance records "
                             "(imbalance_cost_s); it was written before they existed")


def plot_moe_load(run_dirs: Sequence[str | Path], out_dir: str | Path,
                  labels: Optional[Sequence[str]] = None, dpi: int = 110) -> list[Path]:
    """Write expert_load.png, imbalance_cost.png and rank_wait.png for the runs (side by side
    when more than one) into `out_dir`; return their paths."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt
    import numpy as np

    if labels is not None and len(labels) != len(run_dirs):
        raise ValueError(f"{len(labels)} labels for {len(run_dirs)} runs")
    names = list(labels) if labels is not None else [_label(p) for p in run_dirs]
    runs = [(n, load_run(p)) for n, p in zip(names, run_dirs)]
    _check(runs)
    layers = sorted({k for _, r in runs for k in layer_names(r)},
                    key=lambda k: int(re.sub(r"\D", "", k) or 0))
    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    ncol, nrow = len(runs), len(layers)
    paths = []

    # expert load heatmaps: rows layers, columns runs; one colour scale per layer row
    fig, axes = plt.subplots(nrow, ncol, figsize=(4.2 * ncol + 1, 2.4 * nrow + 0.6),
                             squeeze=False, sharex="col")
    for i, layer in enumerate(layers):
        mats = []
        for _, recs in runs:
            its, vals = series(recs, layer, "expert_tokens")
            mats.append((its, np.asarray(vals, dtype=float).T if vals else None))
        vmax = max((float(m.max()) for _, m in mats if m is not None and m.size), default=1.0)
        im = None
        for j, ((label, _), (its, m)) in enumerate(zip(runs, mats)):
            ax = axes[i][j]
            if m is None or not m.size:
                ax.set_axis_off()
                continue
            im = ax.imshow(m, aspect="auto", origin="lower", cmap="viridis", vmin=0, vmax=vmax,
                           extent=(its[0] - 0.5, its[-1] + 0.5, -0.5, m.shape[0] - 0.5),
                           interpolation="nearest")
            ax.set_title(f"{label}: {layer}", fontsize=9)
            ax.set_ylabel("expert")
            ax.set_yticks(range(m.shape[0]))
            if i == nrow - 1:
                ax.set_xlabel("iteration")
        if im is not None:
            fig.colorbar(im, ax=list(axes[i]), label="tokens / iteration", fraction=0.04)
    paths.append(_save(fig, out / "expert_load.png", dpi))

    # imbalance cost per layer over iterations, one panel per run, shared y
    fig, axes = plt.subplots(1, ncol, figsize=(4.5 * ncol, 3.2), squeeze=False, sharey=True)
    for j, (label, recs) in enumerate(runs):
        ax = axes[0][j]
        for layer in layers:
            its, cost = series(recs, layer, "imbalance_cost_s")
            line, = ax.plot(its, [1e3 * c for c in cost], marker=".", label=f"{layer} cost")
            its_s, saved = series(recs, layer, "shadow_saved_s")
            if any(s != 0 for s in saved):
                ax.plot(its_s, [1e3 * s for s in saved], ls="--", color=line.get_color(),
                        label=f"{layer} shadow saved")
        src = sorted({str(v) for r in recs for v in
                      (x.get("source") for x in r["moe"].values()) if v})
        ax.set_title(f"{label} ({'/'.join(src) or '?'})", fontsize=9)
        ax.set_xlabel("iteration")
        ax.axhline(0, color="grey", lw=0.5)
        ax.legend(fontsize=7)
    axes[0][0].set_ylabel("ms per iteration")
    paths.append(_save(fig, out / "imbalance_cost.png", dpi))

    # per-rank wait: rows layers, columns runs, shared y
    fig, axes = plt.subplots(nrow, ncol, figsize=(4.5 * ncol, 2.4 * nrow + 0.6), squeeze=False,
                             sharey=True, sharex="col")
    for i, layer in enumerate(layers):
        for j, (label, recs) in enumerate(runs):
            ax = axes[i][j]
            its, waits = series(recs, layer, "rank_wait_s")
            w = np.asarray(waits, dtype=float)
            for rank in range(w.shape[1] if w.ndim == 2 else 0):
                ax.plot(its, 1e3 * w[:, rank], marker=".", label=f"rank {rank}")
            ax.set_title(f"{label}: {layer}", fontsize=9)
            if j == 0:
                ax.set_ylabel("wait, ms / iteration")
            if i == nrow - 1:
                ax.set_xlabel("iteration")
            if w.size:
                ax.legend(fontsize=7)
    paths.append(_save(fig, out / "rank_wait.png", dpi))
    return paths


def _label(path: str | Path) -> str:
    p = Path(path)
    return (p.parent if p.is_file() else p).name or str(p)


def _save(fig, path: Path, dpi: int) -> Path:
    import matplotlib.pyplot as plt

    fig.savefig(path, dpi=dpi, bbox_inches="tight")
    plt.close(fig)
    return path
