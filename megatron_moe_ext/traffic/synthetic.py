"""Generated routing traces (for examples and what-ifs without a training run; always say so).

Notation: W workers, E experts, L layers, I records, T tokens per worker, k top-k, M workers
per node.

Expert popularity follows Zipf(``skew``) over a random ranking that drifts (a random
transposition of two ranks with probability ``drift`` per record); worker w routes a share
``locality`` of its copies to the experts held by its own node (expert e on worker
e // (E / W)) in proportion to their popularity, the rest over all experts. Counts are
multinomial draws (seeded).
"""

from __future__ import annotations

from typing import Optional

import numpy as np

from .trace import TraceHeader, write_trace


def synthetic_counts(W: int, E: int, L: int, I: int, T: int, k: int, M: int,
                     skew: float = 1.0, locality: float = 0.5, drift: float = 0.1,
                     seed: int = 0) -> np.ndarray:
    """[I, L, W, E] counts of the module docstring."""
    if E % W or W % M:
        raise ValueError(f"need W | E and M | W, got W={W} E={E} M={M}")
    rng = np.random.default_rng(seed)
    ranks = [rng.permutation(E) for _ in range(L)]
    node_of_expert = (np.arange(E) // (E // W)) // M
    out = np.zeros((I, L, W, E), dtype=np.int64)
    for i in range(I):
        for l in range(L):
            if rng.random() < drift:
                a, b = rng.choice(E, 2, replace=False)
                ranks[l][[a, b]] = ranks[l][[b, a]]
            pop = (ranks[l] + 1.0) ** -skew
            pop /= pop.sum()
            for w in range(W):
                local = np.where(node_of_expert == w // M, pop, 0.0)
                p = (1 - locality) * pop + locality * local / local.sum()
                out[i, l, w] = rng.multinomial(T * k, p)
    return out


def write_synthetic_trace(path: str, W: int, E: int, L: int = 2, I: int = 32, T: int = 2048,
                          k: int = 2, M: int = 8, ep_size: Optional[int] = None,
                          meta: Optional[dict] = None, **kw) -> str:
    """Write :func:`synthetic_counts` as a trace; ``meta`` gets ``synthetic: true``."""
    counts = synthetic_counts(W, E, L, I, T, k, M, **kw)
    h = TraceHeader(num_workers=W, num_experts=E, layers=tuple(range(1, L + 1)), topk=k,
                    ep_size=ep_size or W, meta={"synthetic": True, **(meta or {}), **{
                        key: v for key, v in kw.items()}})
    write_trace(path, h, list(counts), iterations=range(1, I + 1))
    return str(path)


def phased_pair_counts(W: int, pairings: list[list[tuple[int, int]]], records_per_phase: int,
                       heavy: int, light: int) -> np.ndarray:
    """[I, 1, W, W] counts (one expert per worker, one layer) whose heavy pairs change over
    time: in phase p every pair (a, b) of ``pairings[p]`` sends ``heavy`` tokens each way,
    every other (worker, expert) entry is ``light``. I = len(pairings) * records_per_phase.
    Deterministic (no sampling): for the reconfiguration emulation (docs/traffic.md)."""
    out = np.full((len(pairings) * records_per_phase, 1, W, W), light, dtype=np.int64)
    for p, pairs in enumerate(pairings):
        if sorted(w for pair in pairs for w in pair) != list(range(W)):
            raise ValueError(f"pairings[{p}] = {pairs} must pair every worker of {W} once")
        rows = out[p * records_per_phase:(p + 1) * records_per_phase, 0]
        for a, b in pairs:
            rows[:, a, b] = rows[:, b, a] = heavy
    return out
