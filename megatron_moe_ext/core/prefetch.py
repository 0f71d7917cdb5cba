"""Shadow prefetch (issue 12 point 3): the state a model's MoE layers share, and the rule for
ignoring a prediction. Plain PyTorch / NumPy, process groups passed explicitly.

A FasterMoE layer call asks the shared :class:`PopularityState` for a prediction of its
[W, E] counts as soon as one exists, lets the shadow policy choose from it and starts the
chosen experts' weight broadcast (:func:`.shadow.start_broadcast`): when the MoE layer below
(same stage, same forward) has reported its counts (:meth:`PopularityState.observe` calls the
layer's ``on_ready``), so that the broadcast overlaps the layer's attention and router; the
first MoE layer of a stage starts it before its router. Once the true counts are
all-gathered, :func:`use_prefetched` decides between the prefetched set and the policy's set
on the true counts; then the layer reports its true counts and routing map. Any shadow set
gives the same outputs and gradients: only the speed depends on the prediction.

Notation
--------
W   workers of the expert-parallel group; E experts; T tokens of this rank
S_p shadow set the policy picks from the prediction (prefetched)
S_t shadow set the policy picks from the true counts
cost(S)  predicted fwd + bwd layer time on the true counts with shadows S (the performance
         model; broadcast and reduce of S included)
"""

from __future__ import annotations

import bisect
from typing import Any, Callable, Optional, Sequence

import numpy as np
import torch
import torch.distributed as dist

from .popularity import (
    PREDICTORS,
    PreviousIterationPredictor,
    TransitionPredictor,
    transition_pairs,
)
from .shadow_policy import as_counts

__all__ = ["PREDICTORS", "DEFAULT_SLACK", "use_prefetched", "PopularityState"]

DEFAULT_SLACK = 0.1
"""Default of ``moe.fastermoe.shadow.prefetch_slack``."""


def use_prefetched(prefetched: Optional[Sequence[int]], chosen: Sequence[int],
                   cost: Optional[Callable[[list[int]], Optional[float]]],
                   slack: float = DEFAULT_SLACK) -> bool:
    """The rule: use the prefetched shadow set S_p (True) or ignore it for S_t (False).

    1. no prediction (``prefetched`` None): ignore;
    2. S_p == S_t (as sets): use;
    3. no cost model (``cost`` None, or it returns None): ignore;
    4. use iff cost(S_p) <= (1 + slack) * min(cost(S_t), cost([])).

    cost(S_p) charges S_p's broadcast although it was (at least partly) hidden, so step 4
    errs towards ignoring. Pure and deterministic: every rank decides the same from the same
    counts.
    """
    if prefetched is None:
        return False
    p, t = sorted(int(e) for e in prefetched), sorted(int(e) for e in chosen)
    if p == t:
        return True
    if cost is None:
        return False
    c_p, c_t, c_0 = cost(p), cost(t), cost([])
    if c_p is None or c_t is None or c_0 is None:
        return False
    return c_p <= (1.0 + slack) * min(c_t, c_0)


class PopularityState:
    """The predictor state one model (pipeline stage) shares among its MoE layers.

    ``previous_iteration``: layer l's last true counts. ``previous_layer``: the true counts of
    the MoE layer just below (observed in this forward) times the transition matrix P of that
    pair of layers (:class:`.popularity.TransitionPredictor`), estimated from the routing maps
    of both layers for the same tokens, summed over the expert-parallel group so that every
    rank holds the same P; the first MoE layer of the stage (or any layer before P has been
    observed) falls back to ``previous_iteration``.

    Layers call :meth:`register` once, :meth:`predict` before routing and :meth:`observe` after
    the exchange; every rank of an EP group calls them in the same order (the layers' order).
    """

    def __init__(self, mode: str, num_experts: int, decay: float = 0.9) -> None:
        if mode not in PREDICTORS or mode == "none":
            modes = [m for m in PREDICTORS if m != "none"]
            raise ValueError(f"prefetch mode {mode!r} is not one of {modes}")
        self.mode = mode
        self.num_experts = int(num_experts)
        self.previous = PreviousIterationPredictor()
        self.transition = (TransitionPredictor(num_experts, decay)
                           if mode == "previous_layer" else None)
        self._layers: list[int] = []
        self._on_ready: dict[int, Callable[[], Any]] = {}
        self._last: Optional[tuple[int, np.ndarray, np.ndarray]] = None  # layer, counts, map

    def register(self, layer: int, on_ready: Optional[Callable[[], Any]] = None) -> None:
        """Add an MoE layer number of this stage (idempotent). ``on_ready()`` is called when
        the MoE layer just below has reported its counts in a forward (the layer's
        prediction for that forward exists from then on)."""
        layer = int(layer)
        if layer not in self._layers:
            bisect.insort(self._layers, layer)
        if on_ready is not None:
            self._on_ready[layer] = on_ready

    def above(self, layer: int) -> Optional[int]:
        """The registered MoE layer just above ``layer``, or None."""
        i = bisect.bisect_right(self._layers, int(layer))
        return self._layers[i] if i < len(self._layers) else None

    def below(self, layer: int) -> Optional[int]:
        """The registered MoE layer just below ``layer``, or None."""
        i = bisect.bisect_left(self._layers, int(layer))
        return self._layers[i - 1] if i > 0 else None

    def predict(self, layer: int) -> tuple[Optional[np.ndarray], str]:
        """([W, E] predicted counts or None, the predictor used: ``previous_layer``,
        ``previous_iteration`` or ``none``)."""
        if self.transition is not None:
            below = self.below(layer)
            if below is not None and self._last is not None and self._last[0] == below:
                pred = self.transition.predict(below, self._last[1])
                if pred is not None:
                    return pred, "previous_layer"
        pred = self.previous.predict(int(layer))
        return (pred, "previous_iteration") if pred is not None else (None, "none")

    def observe(self, layer: int, counts: Any, routing_map: Optional[torch.Tensor] = None,
                group: Optional[dist.ProcessGroup] = None) -> None:
        """Record layer ``layer``'s true [W, E] counts (identical on the EP group's ranks) and,
        for ``previous_layer``, this rank's routing map [T, E] (or top-k ids [T, k]): with the
        layer below's of the same forward, one batch of transitions summed over ``group`` (one
        all-gather). Then the layer above's ``on_ready`` is called."""
        layer, c = int(layer), as_counts(counts)
        self.previous.observe(layer, c)
        if self.transition is not None and routing_map is not None:
            rmap = routing_map.detach().to("cpu").numpy()
            below = self.below(layer)
            last = self._last
            if below is not None and last is not None and last[0] == below \
                    and last[2].shape[0] == rmap.shape[0]:
                pairs = transition_pairs(last[2], rmap, self.num_experts)
                self.transition.observe_pairs(below, _sum_over(pairs, group, routing_map.device))
            self._last = (layer, c, rmap)
        else:
            self._last = (layer, c, np.zeros((0, self.num_experts), dtype=bool))
        above = self.above(layer)
        if above is not None and above in self._on_ready:
            self._on_ready[above]()


def _sum_over(x: np.ndarray, group: Optional[dist.ProcessGroup],
              device: torch.device) -> np.ndarray:
    """Sum of every rank's ``x`` over ``group``, bit-identical on every rank (all-gathered,
    then summed in rank order)."""
    if group is None or dist.get_world_size(group) < 2:
        return x
    t = torch.as_tensor(x, dtype=torch.float64, device=device)
    parts = [torch.empty_like(t) for _ in range(dist.get_world_size(group))]
    dist.all_gather(parts, t.contiguous(), group=group)
    out = np.zeros_like(x)
    for p in parts:
        out = out + p.cpu().numpy()
    return out
