"""Compare training runs from their metrics files (JSON lines written by the training loop).

Each run is a ``metrics.jsonl`` file or a run folder holding one. Training records carry
``iteration``, ``loss``, ``lr``, ``iter_time_s`` (mean over the logging window) and
``tokens_per_s``; validation records carry ``val_*`` keys and no ``loss``.

:func:`compare_runs` prints two tables: speed (median iteration time and tokens/s, speedup
relative to the first run, last training and validation loss) and the training loss at matching
iterations (the last iteration every run logged, plus a few evenly spaced common ones); with
``out`` it also writes a PNG with loss vs iteration and loss vs wall time (cumulative
iter_time_s x window length). Runs of different lengths are fine: matching steps are the
iterations all runs logged. Front end: scripts/compare.py.
"""

from __future__ import annotations

import json
import logging
import math
import statistics
import sys
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Optional, Sequence

logger = logging.getLogger("compare")


@dataclass
class Run:
    """One run's records, sorted by iteration (a re-logged iteration keeps its last record)."""

    label: str
    """Name shown in tables and legends."""
    path: Path
    """The metrics file."""
    train: list[dict[str, Any]] = field(default_factory=list)
    """Training records (have ``loss``)."""
    val: list[dict[str, Any]] = field(default_factory=list)
    """Validation records (``val_*`` keys, no ``loss``)."""

    @property
    def iterations(self) -> list[int]:
        """Logged training iterations."""
        return [int(r["iteration"]) for r in self.train]

    def loss_at(self, iteration: int) -> Optional[float]:
        """Training loss logged at ``iteration`` (None if not logged)."""
        for r in self.train:
            if int(r["iteration"]) == iteration:
                return float(r["loss"])
        return None

    def wall_times(self) -> list[float]:
        """Cumulative seconds at each training record: sum of iter_time_s x window length,
        the window being the gap to the previous record (the first: min(its iteration, the
        next gap), so a resumed run does not count the iterations before it)."""
        its = self.iterations
        out, total = [], 0.0
        for i, r in enumerate(self.train):
            if i > 0:
                window = its[i] - its[i - 1]
            else:
                window = min(its[0], its[1] - its[0]) if len(its) > 1 else max(1, its[0])
            total += float(r.get("iter_time_s", 0.0)) * max(1, window)
            out.append(total)
        return out


def resolve_metrics(path: str) -> Path:
    """A metrics file, or ``<dir>/metrics.jsonl`` for a run folder."""
    p = Path(path)
    if p.is_dir():
        p = p / "metrics.jsonl"
    if not p.is_file():
        raise FileNotFoundError(f"no metrics file at {p}")
    return p


def load_run(path: str, label: str) -> Run:
    """Parse a metrics JSON-lines file; unreadable lines are skipped with a warning."""
    p = resolve_metrics(path)
    train: dict[int, dict] = {}
    val: dict[int, dict] = {}
    for n, line in enumerate(p.read_text().splitlines(), 1):
        if not line.strip():
            continue
        try:
            rec = json.loads(line)
        except json.JSONDecodeError:
            logger.warning("%s:%d: not JSON, skipped", p, n)
            continue
        if not isinstance(rec, dict) or "iteration" not in rec:
            continue
        it = int(rec["iteration"])
        if "loss" in rec and rec["loss"] is not None:
            train[it] = rec
        elif any(k.startswith("val_") for k in rec):
            val[it] = rec
    run = Run(label, p, [train[k] for k in sorted(train)], [val[k] for k in sorted(val)])
    if not run.train:
        logger.warning("%s: no training records", p)
    return run


def _median(values: Sequence[float]) -> float:
    vals = [v for v in values if v is not None and math.isfinite(v)]
    return statistics.median(vals) if vals else math.nan


def speed_stats(run: Run, skip_first: int = 1) -> dict[str, float]:
    """Median iter_time_s / tokens_per_s over the training records, leaving out the first
    ``skip_first`` (warm-up) when enough remain."""
    recs = run.train[skip_first:] if len(run.train) > skip_first else run.train
    return {
        "iter_time_s": _median([r.get("iter_time_s", math.nan) for r in recs]),
        "tokens_per_s": _median([r.get("tokens_per_s", math.nan) for r in recs]),
    }


def matching_steps(runs: Sequence[Run], points: int = 4) -> list[int]:
    """Up to ``points`` evenly spaced iterations that every run logged, ending at the last."""
    common = sorted(set.intersection(*(set(r.iterations) for r in runs))) if runs else []
    if not common:
        return []
    n = len(common)
    idx = sorted({round((n - 1) * j / points) for j in range(1, points + 1)})
    return [common[i] for i in idx]


def _fmt(x: Optional[float], spec: str) -> str:
    return "-" if x is None or (isinstance(x, float) and not math.isfinite(x)) else format(x, spec)


def _table(header: list[str], rows: list[list[str]]) -> str:
    widths = [max(len(h), *(len(r[i]) for r in rows)) for i, h in enumerate(header)]
    line = lambda cells: "  ".join(c.rjust(w) if i else c.ljust(w)  # noqa: E731
                                   for i, (c, w) in enumerate(zip(cells, widths)))
    return "\n".join([line(header), line(["-" * w for w in widths])] + [line(r) for r in rows])


def speed_table(runs: Sequence[Run], skip_first: int = 1) -> str:
    """Median speed per run and speedup (median iteration time ratio) vs the first run."""
    stats = [speed_stats(r, skip_first) for r in runs]
    base = stats[0]["iter_time_s"] if stats else math.nan
    rows = []
    for run, st in zip(runs, stats):
        last = run.train[-1] if run.train else {}
        val = run.val[-1] if run.val else {}
        val_loss = val.get("val_loss", val.get("val_lm_loss"))
        rows.append([
            run.label, str(last.get("iteration", "-")), _fmt(1e3 * st["iter_time_s"], ".1f"),
            _fmt(st["tokens_per_s"], ".0f"),
            _fmt(base / st["iter_time_s"] if st["iter_time_s"] > 0 else math.nan, ".2f") + "x",
            _fmt(last.get("loss"), ".4f"), _fmt(val_loss, ".4f"),
        ])
    return _table(["run", "last iter", "median ms/iter", "median tokens/s",
                   "speedup", "last loss", "last val loss"], rows)


def loss_table(runs: Sequence[Run], steps: Sequence[int]) -> str:
    """Training loss per run at ``steps``; the last column is the difference to the first run
    at the last step."""
    if not steps:
        return "no iteration was logged by every run: no loss comparison"
    rows = []
    ref = runs[0].loss_at(steps[-1])
    for run in runs:
        cells = [_fmt(run.loss_at(s), ".4f") for s in steps]
        last = run.loss_at(steps[-1])
        diff = last - ref if last is not None and ref is not None else None
        rows.append([run.label, *cells, _fmt(diff, "+.4f")])
    return _table(["run", *[f"loss@{s}" for s in steps], f"vs {runs[0].label}@{steps[-1]}"], rows)


def plot(runs: Sequence[Run], out: Path) -> Path:
    """PNG: loss vs iteration and loss vs wall time; validation losses as markers."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, (ax1, ax2) = plt.subplots(1, 2, figsize=(11, 4.2))
    for i, run in enumerate(runs):
        color = f"C{i}"
        its = run.iterations
        losses = [float(r["loss"]) for r in run.train]
        ax1.plot(its, losses, color=color, label=run.label)
        ax2.plot(run.wall_times(), losses, color=color, label=run.label)
        vals = [(int(r["iteration"]), r.get("val_loss", r.get("val_lm_loss"))) for r in run.val]
        vals = [(it, v) for it, v in vals if v is not None]
        if vals:
            ax1.scatter([v[0] for v in vals], [v[1] for v in vals], color=color, marker="x",
                        label=f"{run.label} (val)")
    ax1.set_xlabel("iteration")
    ax2.set_xlabel("wall time (s, sum of iteration times)")
    for ax in (ax1, ax2):
        ax.set_ylabel("loss (line: training, x: validation)" if ax is ax1 else "training loss")
        ax.grid(True, alpha=0.3)
        ax.legend(fontsize=8)
    fig.tight_layout()
    out.parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(out, dpi=110)
    plt.close(fig)
    return out


def compare_runs(paths: Sequence[str], labels: Optional[Sequence[str]] = None,
                 out: Optional[Path] = None, points: int = 4, skip_first: int = 1) -> int:
    """Print the speed and loss tables of the runs at ``paths`` (and write the PNG ``out``);
    returns the exit code (2, with a message on stderr, when the inputs are unusable)."""
    if len(paths) < 2:
        sys.stderr.write("compare.py needs two or more runs\n")
        return 2
    labels = list(labels or [str(r) for r in paths])
    if len(labels) != len(paths):
        sys.stderr.write(f"--labels: {len(labels)} labels for {len(paths)} runs\n")
        return 2
    try:
        runs = [load_run(path, label) for path, label in zip(paths, labels)]
    except FileNotFoundError as exc:
        sys.stderr.write(f"{exc}\n")
        return 2
    if not all(r.train for r in runs):
        sys.stderr.write("every run needs at least one training record (with 'loss')\n")
        return 2
    sys.stdout.write(speed_table(runs, skip_first) + "\n\n")
    sys.stdout.write(loss_table(runs, matching_steps(runs, max(1, points))) + "\n")
    if out:
        sys.stdout.write(f"\nwrote {plot(runs, Path(out))}\n")
    return 0
