"""Expert popularity prediction before a layer routes (issue 12 point 3; Lina, ATC'23), NumPy.

Two predictors of an MoE layer's [W, E] routing counts, from what is known before its router
runs:

* ``previous_iteration``: the same layer's counts of the last iteration.
* ``previous_layer``: the layer below's counts of this iteration pushed through a transition
  matrix P_i[e -> e'] (row-stochastic): the probability that a routed copy sent to expert e in
  MoE layer i belongs to a token whose copies go to e' in MoE layer i + 1. P_i is a decayed
  count over recent iterations: C <- decay * C + (1 - decay) * pairs, where a token with top-k
  experts A at layer i and B at layer i + 1 adds 1 / k to C[a, b] for each (a, b) in A x B, so
  row a gains exactly the token's one copy to a and P = C / rowsum keeps the copy count.

Notation
--------
W   workers (rows of counts); E experts; k experts per token (top-k); T tokens of one worker
idx [T, k] expert ids each token chose in one layer (the router's top-k indices)

Metrics for one prediction (``prediction_metrics``): relative error of the hottest experts'
loads (column sums), and whether the shadow set a policy picks from the prediction equals the
set it picks from the true counts. This module only predicts; the shadow prefetch built on it
is :mod:`.prefetch` (state shared by a model's layers, the rule for ignoring a prediction) and
``FasterMoELayer`` (docs/lina.md, "Shadow prefetch").
"""

from __future__ import annotations

from typing import Any, Callable, Optional, Sequence

import numpy as np

from .shadow_policy import as_counts

__all__ = ["PREDICTORS", "PreviousIterationPredictor", "TransitionPredictor",
           "transition_pairs", "prediction_metrics"]

PREDICTORS = ("none", "previous_iteration", "previous_layer")
"""Accepted values of ``moe.fastermoe.shadow.prefetch`` (the prediction mode)."""


class PreviousIterationPredictor:
    """counts of layer l at iteration t are predicted by those of layer l at iteration t-1."""

    def __init__(self) -> None:
        self._last: dict[int, np.ndarray] = {}

    def observe(self, layer: int, counts: Any) -> None:
        self._last[layer] = as_counts(counts).copy()

    def predict(self, layer: int) -> Optional[np.ndarray]:
        """[W, E] prediction, or None before the layer was seen once."""
        c = self._last.get(layer)
        return None if c is None else c.copy()


def _multiplicity(x: Any, num_experts: int) -> np.ndarray:
    """[T, E] float: how often token t picked expert e; from top-k ids [..., T, k] (or [T];
    leading dims, e.g. a trace record's workers, are flattened into tokens; -1 = no expert, as
    in trace ``choices``) or a boolean routing map [T, E] (Megatron's ``routing_map``)."""
    a = np.asarray(x.detach().cpu() if hasattr(x, "detach") else x)
    if a.dtype == bool:
        if a.ndim != 2 or a.shape[1] != num_experts:
            raise ValueError(f"a routing map must be [T, {num_experts}], got {a.shape}")
        return a.astype(np.float64)
    a = a[:, None] if a.ndim == 1 else a.reshape(-1, a.shape[-1])
    rows = np.repeat(np.arange(a.shape[0]), a.shape[1])
    ids = a.reshape(-1)
    ok = ids >= 0
    m = np.zeros((a.shape[0], num_experts))
    np.add.at(m, (rows[ok], ids[ok]), 1.0)
    return m


def transition_pairs(idx_below: Any, idx_above: Any, num_experts: int) -> np.ndarray:
    """[E, E] pair counts of one batch: token t adds 1/k to C[a, b] for a in idx_below[t],
    b in idx_above[t] (k: the token's copies above), so row a gains exactly the token's copies
    sent to a. Each argument is the top-k ids [..., T, k] or a boolean routing map [T, E]
    (see ``_multiplicity``); same tokens in the same order. A token with no copy above adds
    nothing. The one transition count of the package (the predictor below and the traffic
    report's successor share)."""
    lo, hi = _multiplicity(idx_below, num_experts), _multiplicity(idx_above, num_experts)
    if lo.shape[0] != hi.shape[0]:
        raise ValueError(f"token counts differ: {lo.shape[0]} below, {hi.shape[0]} above")
    k_hi = hi.sum(axis=1, keepdims=True)
    return lo.T @ np.divide(hi, k_hi, out=np.zeros_like(hi), where=k_hi > 0)


class TransitionPredictor:
    """``previous_layer``: layer i+1's counts = layer i's counts @ P_i (decayed estimate)."""

    def __init__(self, num_experts: int, decay: float = 0.9) -> None:
        if not 0.0 <= decay < 1.0:
            raise ValueError(f"decay must be in [0, 1), got {decay}")
        self.num_experts = num_experts
        self.decay = decay
        self._c: dict[int, np.ndarray] = {}

    def observe(self, layer_below: int, idx_below: Any, idx_above: Any) -> None:
        """Record one batch's transitions from MoE layer ``layer_below`` to the next."""
        self.observe_pairs(layer_below, transition_pairs(idx_below, idx_above, self.num_experts))

    def observe_pairs(self, layer_below: int, pairs: Any) -> None:
        """Record one batch's [E, E] :func:`transition_pairs` (e.g. summed over the ranks of an
        expert-parallel group, so that every rank holds the same P)."""
        pairs = np.asarray(pairs, dtype=np.float64)
        old = self._c.get(layer_below)
        self._c[layer_below] = pairs if old is None else self.decay * old + (1 - self.decay) * pairs

    def matrix(self, layer_below: int) -> Optional[np.ndarray]:
        """Row-stochastic P; rows never observed are uniform. None before any observation."""
        c = self._c.get(layer_below)
        if c is None:
            return None
        rows = c.sum(axis=1, keepdims=True)
        uniform = np.full_like(c, 1.0 / self.num_experts)
        return np.where(rows > 0, c / np.where(rows > 0, rows, 1.0), uniform)

    def predict(self, layer_below: int, counts_below: Any) -> Optional[np.ndarray]:
        """[W, E] prediction of the next MoE layer from this layer's true counts."""
        p = self.matrix(layer_below)
        return None if p is None else as_counts(counts_below) @ p


def prediction_metrics(pred: Any, true: Any, n_hot: int = 2,
                       policy: Optional[Callable[[np.ndarray], Sequence[int]]] = None) -> dict:
    """How good one prediction is: ``hot_load_rel_err`` = max over the n_hot hottest experts (by
    the true loads; an idle one is left out) of |pred load - true load| / true load;
    ``same_set`` = the policy's shadow set from the prediction equals its set from the true
    counts (when a policy is given)."""
    p, t = as_counts(pred), as_counts(true)
    lp, lt = p.sum(axis=0), t.sum(axis=0)
    hot = [e for e in np.argsort(-lt, kind="stable")[:n_hot] if lt[e] > 0]  # idle: no error
    err = float(np.max(np.abs(lp[hot] - lt[hot]) / lt[hot])) if hot else 0.0
    out: dict = {"hot_experts": [int(e) for e in hot], "hot_load_rel_err": err}
    if policy is not None:
        out["same_set"] = sorted(policy(p)) == sorted(policy(t))
    return out
