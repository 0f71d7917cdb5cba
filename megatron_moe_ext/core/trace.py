"""Lightweight span tracer for the smart schedule, exported as Chrome-trace JSON.

Each span is (name, category, start, end, rank). Categories:

- ``send``    input tokens in flight (forward ``S<j>``, backward ``bwd_S<j>``: grad of outputs)
- ``compute`` expert computation (``C<j>`` / ``bwd_C<j>``)
- ``return``  outputs / input grads going back (``R<j>`` / ``bwd_R<j>``)

For asynchronous communication a span runs from the issue of the operation to the
moment its completion was observed on the host (``wait()`` returned, or a poll saw it
complete). Times come from ``time.perf_counter`` (CLOCK_MONOTONIC on Linux, so traces
of several processes on one host share a time axis). On CUDA, host times of compute
spans measure kernel launches, not execution, unless the tracer synchronizes
(``cuda_sync=True``).
"""

from __future__ import annotations

import json
import logging
import os
import time
from contextlib import contextmanager
from dataclasses import dataclass
from typing import Iterator

logger = logging.getLogger(__name__)

__all__ = ["TraceEvent", "Tracer", "CATEGORIES", "STREAM_OF_CATEGORY"]

CATEGORIES = ("send", "compute", "return")
STREAM_OF_CATEGORY = {"send": "comm", "return": "comm", "compute": "compute"}
_TID_OF_STREAM = {"compute": 0, "comm": 1}


@dataclass(frozen=True)
class TraceEvent:
    """One recorded span, times in seconds (perf_counter clock)."""

    name: str
    category: str
    start: float
    end: float
    rank: int

    @property
    def stream(self) -> str:
        return STREAM_OF_CATEGORY.get(self.category, "compute")

    @property
    def duration(self) -> float:
        return self.end - self.start


class Tracer:
    """Collects :class:`TraceEvent` spans of one rank."""

    def __init__(self, rank: int = 0, enabled: bool = True, cuda_sync: bool = False) -> None:
        self.rank = rank
        self.enabled = enabled
        self.cuda_sync = cuda_sync
        self.events: list[TraceEvent] = []

    @staticmethod
    def now() -> float:
        return time.perf_counter()

    def _sync(self) -> None:
        if self.cuda_sync:
            import torch

            if torch.cuda.is_available():
                torch.cuda.synchronize()

    def record(self, name: str, category: str, start: float, end: float) -> None:
        """Record a finished span."""
        if not self.enabled:
            return
        if category not in CATEGORIES:
            raise ValueError(f"unknown trace category {category!r}, expected one of {CATEGORIES}")
        self.events.append(TraceEvent(name, category, start, max(start, end), self.rank))

    @contextmanager
    def span(self, name: str, category: str = "compute") -> Iterator[None]:
        """Context manager timing a synchronous region."""
        if not self.enabled:
            yield
            return
        self._sync()
        start = self.now()
        try:
            yield
        finally:
            self._sync()
            self.record(name, category, start, self.now())

    def clear(self) -> None:
        self.events.clear()

    def to_chrome_events(self, origin: float | None = None) -> list[dict]:
        """Chrome-trace ``traceEvents`` (ph "X", us); ``origin`` seconds are subtracted."""
        base = 0.0 if origin is None else origin
        out: list[dict] = [
            {"ph": "M", "name": "process_name", "pid": self.rank, "tid": 0,
             "args": {"name": f"rank {self.rank}"}},
        ]
        for stream, tid in _TID_OF_STREAM.items():
            out.append({"ph": "M", "name": "thread_name", "pid": self.rank, "tid": tid,
                        "args": {"name": stream}})
        for ev in self.events:
            out.append({
                "name": ev.name,
                "cat": ev.category,
                "ph": "X",
                "ts": (ev.start - base) * 1e6,
                "dur": ev.duration * 1e6,
                "pid": ev.rank,
                "tid": _TID_OF_STREAM[ev.stream],
                "args": {"stream": ev.stream},
            })
        return out

    def write_chrome_trace(self, path: str | os.PathLike, origin: float | None = None) -> None:
        """Write the spans as Chrome-trace JSON (open in chrome://tracing or Perfetto).

        Timestamps are absolute perf_counter microseconds unless ``origin`` is given,
        so files written by several ranks on one host line up.
        """
        doc = {"traceEvents": self.to_chrome_events(origin), "displayTimeUnit": "ms"}
        with open(path, "w", encoding="utf-8") as fh:
            json.dump(doc, fh)
        logger.debug("rank %d: wrote %d trace events to %s", self.rank, len(self.events), path)
