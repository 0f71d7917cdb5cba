"""Render Chrome-trace JSON files of the smart schedule as a Gantt-style PNG.

One row per (rank, stream); bars are coloured by category (send / compute / return),
backward spans are hatched. Times are shown in milliseconds from the earliest span of
all given files (traces written on one host share the perf_counter clock).
Front end: scripts/render_timeline.py; also used by the layer benchmark's --trace-dir.
"""

from __future__ import annotations

import json
import logging
from pathlib import Path

logger = logging.getLogger("render_timeline")

COLORS = {"send": "#4C72B0", "compute": "#55A868", "return": "#C44E52"}
STREAM_NAMES = {0: "compute", 1: "comm"}


def load_spans(paths: list[str]) -> list[dict]:
    """All complete ("X") events of the given Chrome-trace files."""
    spans: list[dict] = []
    for path in paths:
        doc = json.loads(Path(path).read_text(encoding="utf-8"))
        events = doc["traceEvents"] if isinstance(doc, dict) else doc
        spans.extend(e for e in events if e.get("ph") == "X")
    return spans


def row_key(span: dict) -> tuple[int, int]:
    return int(span.get("pid", 0)), int(span.get("tid", 0))


def assign_lanes(spans: list[dict]) -> tuple[dict[int, int], dict[tuple[int, int], int]]:
    """Greedy interval packing: overlapping spans of one row go to separate lanes.

    Returns (lane of each span by id(), number of lanes of each row).
    """
    lane_of: dict[int, int] = {}
    lanes: dict[tuple[int, int], list[float]] = {}
    for s in sorted(spans, key=lambda s: s["ts"]):
        ends = lanes.setdefault(row_key(s), [])
        for i, end in enumerate(ends):
            if end <= s["ts"]:
                break
        else:
            i = len(ends)
            ends.append(0.0)
        ends[i] = s["ts"] + s["dur"]
        lane_of[id(s)] = i
    return lane_of, {key: len(ends) for key, ends in lanes.items()}


def render(spans: list[dict], out: str, title: str | None = None, labels: bool = True) -> None:
    """Draw the Gantt chart into ``out`` (PNG)."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt
    from matplotlib.patches import Patch

    if not spans:
        raise ValueError("no 'X' events found in the given trace files")
    t0 = min(s["ts"] for s in spans)
    rows = sorted({row_key(s) for s in spans})
    y_of = {key: i for i, key in enumerate(rows)}
    fig, ax = plt.subplots(figsize=(12, 0.6 * len(rows) + 1.5))
    lane_of, num_lanes = assign_lanes(spans)
    for s in spans:
        start, dur = (s["ts"] - t0) / 1e3, s["dur"] / 1e3
        lanes = num_lanes[row_key(s)]
        height = 0.8 / lanes
        y = y_of[row_key(s)] - 0.4 + height * (lane_of[id(s)] + 0.5)
        ax.barh(y, max(dur, 1e-4), left=start, height=height,
                color=COLORS.get(s.get("cat", ""), "#8C8C8C"),
                hatch="//" if str(s["name"]).startswith("bwd_") else None,
                edgecolor="black", linewidth=0.3)
        if labels:
            ax.text(start + dur / 2, y, str(s["name"]).replace("bwd_", "b"),
                    ha="center", va="center", fontsize=6, clip_on=True)
    ax.set_yticks(range(len(rows)))
    ax.set_yticklabels([f"rank {p} {STREAM_NAMES.get(t, t)}" for p, t in rows])
    ax.invert_yaxis()
    ax.set_xlabel("time [ms]")
    ax.set_title(title or "smart schedule timeline")
    ax.legend(handles=[Patch(color=c, label=k) for k, c in COLORS.items()],
              loc="upper right", fontsize=8)
    fig.tight_layout()
    fig.savefig(out, dpi=150)
    plt.close(fig)
