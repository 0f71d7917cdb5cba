"""Per-link simulation of the smart schedule's pipeline (validation grade, pure Python).

Notation (SI units: seconds, bytes)
--------
N        workers; n = N / g steps of the smart schedule; j a step
l        a directed link of the :class:`~.topology.Topology` (bandwidth W_l, bytes/s)
S_j      step j's input tokens going out: a flow i -> k of ``step_bytes[j, i, k]`` bytes
C_j^k    worker k's expert compute of step j: ``comp[j, k]`` seconds
R_j      step j's outputs coming back: a flow k -> i of ``step_bytes[j, i, k]`` bytes

:func:`.model.simulate_two_stream` (the ``lockstep`` simulator) prices each step's traffic as
one all-to-all (its busiest link), runs the steps one after another on one FIFO comm stream and
takes C_j as the slowest worker's. Under skewed routing the steps' busiest links differ, and a
step's outbound returns and the next step's inbound sends use opposite directions of a link,
so the executor overlaps what the lockstep model serializes. This module (the ``links``
simulator) prices each flow on each link instead:

- every worker walks :func:`megatron_moe_ext.core.plan.pipeline_order`: S_0 and S_1 are posted
  at the start, R_j and S_{j+2} when the worker's C_j ends (what the executor does);
- a flow is ready once both of its ends posted it; it starts at the earliest time t at or
  after that at which every link l of ``topology.path(src, dst)`` has a free gap of
  bytes / W_l, occupies each l for [t, t + bytes / W_l) (a link's two directions are separate
  links) and ends at t + bytes / (its narrowest W_l);
- C_j^k starts when C_{j-1}^k ended and every step-j flow of worker k (in and out: the
  executor waits for the step's whole operation) ended.

The makespan is the last compute or flow end. Left out: flows on a link take turns (no rate
sharing, so a bottleneck link is packed without gaps: optimistic where one NIC limits), a
flow holds its faster links only for its bytes at their rate, link latency, and the
half-duplex worker pairs of a ``duplex: half`` transport (a ValueError). (Letting each link
of a path take the flow at a different time, store and forward, was tried first: it packed
the NIC even better than the lab does, docs/NOTES.md 2026-12-05.) Cost grows with
flows x busy intervals per link: fine for validating lab runs (W <= 64), too slow for the
``model`` shadow policy's greedy, which keeps the lockstep simulator.
"""

from __future__ import annotations

from bisect import bisect_right

import numpy as np

from ..core.plan import pipeline_order
from .topology import Topology

__all__ = ["LinkTimeline", "link_pipeline_time"]


class LinkTimeline:
    """Busy intervals of one directed link, sorted and disjoint; flows fill the earliest gap."""

    def __init__(self) -> None:
        self.starts: list[float] = []
        self.ends: list[float] = []

    def fit(self, ready: float, duration: float) -> float:
        """Earliest t >= ``ready`` with [t, t + ``duration``) free (``ready`` for zero)."""
        if duration <= 0:
            return ready
        k = bisect_right(self.starts, ready) - 1
        t = ready
        if k >= 0 and self.ends[k] > t:
            t = self.ends[k]
        k += 1
        while k < len(self.starts) and self.starts[k] < t + duration:
            t = max(t, self.ends[k])
            k += 1
        return t

    def occupy(self, start: float, duration: float) -> None:
        """Mark [start, start + ``duration``) busy (it must be free: see :meth:`fit`)."""
        if duration > 0:
            k = bisect_right(self.starts, start)
            self.starts.insert(k, start)
            self.ends.insert(k, start + duration)


def link_pipeline_time(step_bytes: np.ndarray, comp: np.ndarray, topology: Topology) -> float:
    """Makespan of the smart schedule's pipeline with every flow priced on its own links.

    ``step_bytes`` [n, N, N]: bytes worker i sends to worker k at step j (the diagonal, self
    traffic, is free); R_j returns the transpose. ``comp`` [n, N]: C_j^k in seconds (forward
    compute, or 2x for backward). See the module docstring for the rules.
    """
    sb = np.asarray(step_bytes, dtype=float)
    c = np.asarray(comp, dtype=float)
    n, w = c.shape
    if sb.shape != (n, w, w):
        raise ValueError(f"step_bytes must be [n={n}, N={w}, N={w}], got {sb.shape}")
    if w != topology.num_workers:
        raise ValueError(f"{w} workers, the topology has {topology.num_workers}")
    if topology.spec.duplex == "half" and w > 1:
        raise ValueError(f"{topology.spec.name}: the links simulator does not model a "
                         "'duplex: half' transport; use the lockstep simulator")
    timelines = [LinkTimeline() for _ in topology.links]
    paths: dict[tuple[int, int], list[tuple[int, float]]] = {}
    step_done = np.zeros((n, w))  # last end of worker k's step-j flows (S_j, in and out)
    c_end = np.zeros((n, w))
    last = 0.0

    def flow(src: int, dst: int, nbytes: float, ready: float) -> float:
        if (src, dst) not in paths:
            paths[(src, dst)] = [(ln.index, ln.bandwidth) for ln in topology.path(src, dst)]
        legs = [(timelines[i], nbytes / bw) for i, bw in paths[(src, dst)]]
        t = ready
        while True:  # the earliest start at which every link of the path has its gap
            t_next = max((line.fit(t, d) for line, d in legs), default=t)
            if t_next == t:
                break
            t = t_next
        for line, d in legs:
            line.occupy(t, d)
        return t + max((d for _, d in legs), default=0.0)

    def pairs(j: int) -> list[tuple[int, int, float]]:
        nz = np.argwhere(sb[j] > 0)
        return [(int(i), int(k), float(sb[j, i, k])) for i, k in nz if i != k]

    computed = 0
    for kind, j in pipeline_order(n):
        if kind == "S":
            posted = np.zeros(w) if j < 2 else c_end[j - 2]
            todo = sorted((max(posted[i], posted[k]), i, k, b) for i, k, b in pairs(j))
            for ready, i, k, b in todo:
                end = flow(i, k, b, ready)
                step_done[j, i] = max(step_done[j, i], end)
                step_done[j, k] = max(step_done[j, k], end)
            continue
        while computed <= j:  # C_j waits for C_{j-1} and the worker's step-j flows
            prev = c_end[computed - 1] if computed else np.zeros(w)
            c_end[computed] = np.maximum(prev, step_done[computed]) + c[computed]
            computed += 1
        todo = sorted((max(c_end[j, i], c_end[j, k]), k, i, b) for i, k, b in pairs(j))
        for ready, src, dst, b in todo:
            last = max(last, flow(src, dst, b, ready))
    return float(max(last, c_end.max() if c_end.size else 0.0))
