"""Emulated accelerator: an expert function that sleeps for the time the cluster's accelerator
would need for a chunk, and returns a cheap deterministic tensor of the right shape and dtype.

Notation
--------
t      tokens in one expert call (a chunk of the smart exchange, or all tokens a worker
       computes in the synchronous baseline, or one shadowed expert's block)
H      hidden size; F = ffn hidden size; alpha = F / H
P(t)   achieved GEMM throughput of one accelerator of the cluster (FLOP/s): the YAML's
       ``gemm_tflops[dtype]`` or its ``gemm_curve[dtype]`` evaluated at t
       (:meth:`Topology.gemm_throughput`, the numbers the performance model uses)
D      time dilation (1 = real time of the emulated cluster)

Forward sleep  = D * perf.model.compute_times([t], H, alpha, P)[0] = D * 4 t alpha H^2 / P(t)
Backward sleep = 2 x forward sleep (the model's backward, :func:`perf.model.predict_layer`).

The output is ``x`` itself (a view, no copy): y = x, dy/dx = identity, dy/dp = 0. Messages
built from it keep their real sizes ([t, H] of the input dtype), so the exchange moves exactly
the bytes a real expert's output would. Shadow experts pass their broadcast weights in, so the
broadcast's backward (the gradient reduce) still runs and moves the weights' real size (the
weights get no gradient from here: the reduce sends zeros of the right size).

Sleeps run against a deadline taken when the call starts, so the host work of the call itself
is part of the emulated time, not added to it; :class:`SleepStats` keeps what was requested and
what was actually slept (oversleep is a lab overhead, reported by the benchmark).
"""

from __future__ import annotations

import time
from dataclasses import dataclass, field
from typing import Sequence

import numpy as np
import torch

from ..perf.model import compute_times, gemm_seconds
from ..perf.topology import GemmThroughput, Topology

__all__ = ["EmulatedAccelerator", "SleepStats", "sleep_until"]


def sleep_until(deadline: float) -> float:
    """Sleep until ``time.perf_counter() >= deadline``; return the time it ended."""
    now = time.perf_counter()
    while now < deadline:
        time.sleep(deadline - now)
        now = time.perf_counter()
    return now


@dataclass
class SleepStats:
    """Requested vs actual emulated compute of one process (seconds, summed over calls)."""

    calls: int = 0
    """Expert calls (forward and backward)."""
    requested_s: float = 0.0
    """Sum of the emulated durations (formula x D)."""
    actual_s: float = 0.0
    """Sum of the wall times of those calls (>= requested; the excess is oversleep)."""
    chunks: list = field(default_factory=list)
    """(phase, t) of every call, when recording is on (tests compare these)."""
    record: bool = False
    """Whether :attr:`chunks` is filled."""

    def add(self, phase: str, tokens: int, requested: float, actual: float) -> None:
        """Account one call."""
        self.calls += 1
        self.requested_s += requested
        self.actual_s += actual
        if self.record:
            self.chunks.append((phase, int(tokens)))

    def reset(self) -> None:
        """Forget everything counted so far (keeps :attr:`record`)."""
        self.calls, self.requested_s, self.actual_s = 0, 0.0, 0.0
        self.chunks = []


class _Sleep(torch.autograd.Function):
    """y = x (a view); forward sleeps ``fwd_s``, backward sleeps 2 x ``fwd_s``."""

    @staticmethod
    def forward(ctx, acc: "EmulatedAccelerator", x: torch.Tensor, p: torch.Tensor,
                *weights: torch.Tensor) -> torch.Tensor:
        start = time.perf_counter()
        t = int(x.shape[0])
        fwd = acc.forward_seconds(t)
        ctx.acc, ctx.t, ctx.fwd = acc, t, fwd
        ctx.p_meta = (p.shape, p.dtype, p.device)
        ctx.n_weights = len(weights)
        y = x.view_as(x)
        end = sleep_until(start + fwd)
        acc.stats.add("fwd", t, fwd, end - start)
        return y

    @staticmethod
    @torch.autograd.function.once_differentiable
    def backward(ctx, gy: torch.Tensor):
        start = time.perf_counter()
        acc, bwd = ctx.acc, 2.0 * ctx.fwd
        shape, dtype, device = ctx.p_meta
        gp = torch.zeros(shape, dtype=dtype, device=device)
        end = sleep_until(start + bwd)
        acc.stats.add("bwd", ctx.t, bwd, end - start)
        return (None, gy, gp, *([None] * ctx.n_weights))


@dataclass
class EmulatedAccelerator:
    """One emulated accelerator of a cluster, for one expert shape.

    Use :meth:`expert_fn` as ``smart_exchange``'s / the baseline's ``expert_fn`` and
    :meth:`shadow_fn` for a shadowed expert computed locally with broadcast weights.
    """

    hidden: int
    """H."""
    ffn: int
    """F, the expert's inner size (alpha = F / H)."""
    gemm: GemmThroughput
    """P: FLOP/s, constant or a function of the tokens per GEMM."""
    dilation: float = 1.0
    """D: every duration is multiplied by it (0: compute takes no time, the lab floor)."""
    stats: SleepStats = field(default_factory=SleepStats)
    """What was slept so far."""

    def __post_init__(self) -> None:
        if self.hidden < 1 or self.ffn < 1:
            raise ValueError(f"hidden and ffn must be >= 1, got {self.hidden}, {self.ffn}")
        if not self.dilation >= 0:
            raise ValueError(f"dilation must be >= 0, got {self.dilation!r}")

    @classmethod
    def for_cluster(cls, topology: Topology, dtype: str, hidden: int, ffn: int,
                    dilation: float = 1.0) -> "EmulatedAccelerator":
        """The accelerator of ``topology``'s cluster for ``dtype`` (its curve when it has one)."""
        return cls(hidden, ffn, topology.gemm_throughput(dtype), float(dilation))

    @property
    def alpha(self) -> float:
        """F / H."""
        return self.ffn / self.hidden

    def forward_seconds(self, tokens: int) -> float:
        """D x the model's forward expert time of ``tokens`` tokens (0 for none)."""
        if tokens <= 0 or self.dilation == 0:
            return 0.0
        t = compute_times(np.array([float(tokens)]), self.hidden, self.alpha, self.gemm)
        return self.dilation * float(t[0])

    def flops_seconds(self, flops_per_token: float, tokens: int) -> float:
        """D x the time of ``flops_per_token`` x ``tokens`` FLOPs at P(tokens): the non-expert
        parts of a layer (attention, router, dense MLP, head) in the lab's iteration mode."""
        if self.dilation == 0:
            return 0.0
        return self.dilation * gemm_seconds(flops_per_token * tokens, tokens, self.gemm)

    def backward_seconds(self, tokens: int) -> float:
        """2 x :meth:`forward_seconds` (the model's backward)."""
        return 2.0 * self.forward_seconds(tokens)

    def expert_fn(self, x: torch.Tensor, p: torch.Tensor,
                  tokens_per_expert: Sequence[int]) -> torch.Tensor:
        """``expert_fn(x [t, H], p [t], tokens per local expert) -> y [t, H]`` (y = x)."""
        return _Sleep.apply(self, x, p)

    def shadow_fn(self, weights: Sequence[torch.Tensor], x: torch.Tensor,
                  p: torch.Tensor) -> torch.Tensor:
        """One shadowed expert on this rank's own tokens; ``weights`` (the broadcast replicas)
        are inputs of the graph so that the broadcast's backward reduce runs."""
        return _Sleep.apply(self, x, p, *weights)
