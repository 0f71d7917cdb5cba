"""Statistics shared by the benchmarks, the validation sweep and the reproduction report."""

from __future__ import annotations

import statistics
from typing import Iterable, Optional, Sequence

__all__ = ["r_squared", "median", "ranks", "spearman"]


def r_squared(measured: Sequence[Optional[float]], predicted: Sequence[Optional[float]],
              min_points: int = 2) -> Optional[float]:
    """Coefficient of determination of ``predicted`` against ``measured`` taken as they are
    (the identity line, no regression fitted): 1 - SS_res / SS_tot.

    Pairs where either value is None are left out. None when fewer than ``min_points`` pairs
    remain or the measurements have no spread (SS_tot = 0)."""
    pairs = [(float(m), float(p)) for m, p in zip(measured, predicted)
             if m is not None and p is not None]
    if len(pairs) < max(2, min_points):
        return None
    mean = statistics.fmean(m for m, _ in pairs)
    ss_tot = sum((m - mean) ** 2 for m, _ in pairs)
    ss_res = sum((m - p) ** 2 for m, p in pairs)
    return 1.0 - ss_res / ss_tot if ss_tot > 0 else None


def median(values: Iterable[float]) -> Optional[float]:
    """Median as a float, None for no values."""
    xs = list(values)
    return float(statistics.median(xs)) if xs else None


def ranks(values: Sequence[float]) -> list[float]:
    """1-based ranks of ``values`` (smallest first); tied values share their mean rank."""
    order = sorted(range(len(values)), key=lambda i: values[i])
    out = [0.0] * len(values)
    i = 0
    while i < len(order):
        j = i
        while j + 1 < len(order) and values[order[j + 1]] == values[order[i]]:
            j += 1
        for k in range(i, j + 1):
            out[order[k]] = (i + j) / 2.0 + 1.0
        i = j + 1
    return out


def spearman(a: Sequence[float], b: Sequence[float]) -> Optional[float]:
    """Spearman's rank correlation of two equally long sequences: Pearson's r of their
    :func:`ranks` (ties get mean ranks). None for fewer than 2 pairs or a constant one."""
    if len(a) != len(b):
        raise ValueError(f"spearman: {len(a)} vs {len(b)} values")
    if len(a) < 2:
        return None
    ra, rb = ranks(a), ranks(b)
    ma, mb = statistics.fmean(ra), statistics.fmean(rb)
    cov = sum((x - ma) * (y - mb) for x, y in zip(ra, rb))
    va = sum((x - ma) ** 2 for x in ra)
    vb = sum((y - mb) ** 2 for y in rb)
    return cov / (va * vb) ** 0.5 if va > 0 and vb > 0 else None
