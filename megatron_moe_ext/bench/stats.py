"""Statistics shared by the benchmarks, the validation sweep and the reproduction report."""

from __future__ import annotations

import statistics
from typing import Iterable, Optional, Sequence

__all__ = ["r_squared", "median"]


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
