"""How well expert popularity can be predicted before a layer routes, measured on a trace.

Replays a routing trace through the two predictors of :mod:`megatron_moe_ext.core.popularity`
(``moe.fastermoe.shadow.prefetch``'s ``previous_iteration`` and ``previous_layer``) in the
order training sees the data, so every prediction uses only what was known at that point:

* ``previous_iteration`` for record i, layer l: the counts of record i-1, layer l;
* ``previous_layer`` for record i, layer l+1: the true counts of record i, layer l pushed
  through the transition matrix estimated from the recorded token choices of records < i
  (the current record's layer-l+1 choices are not known when layer l+1 is predicted);
* ``balanced`` (the reference): every expert gets the mean load.

Records are logged iterations: with ``logging.interval`` > 1 "previous iteration" is the
previous *logged* one, a harder prediction than in training; log every iteration to measure
the real thing. Notation: I records, L traced MoE layers, W workers, E experts, t recorded
tokens per worker, k top-k.

Per predictor and layer it reports the mean relative error of the ``n_hot`` hottest experts'
loads (``hot_load_rel_err``) and how often the ``top_k`` shadow set of ``shadows`` experts
picked from the prediction equals the one picked from the true counts (``same_set``).
"""

from __future__ import annotations

from typing import Any, Optional, Sequence

import numpy as np

from ..core.popularity import PreviousIterationPredictor, TransitionPredictor, prediction_metrics
from ..core.shadow_policy import top_k_shadows
from .trace import RoutingTrace

__all__ = ["predictor_accuracy", "predictor_accuracies", "format_accuracy"]


def predictor_accuracy(trace: RoutingTrace, n_hot: int = 2, shadows: int = 1,
                       decay: float = 0.9, start: int = 1) -> dict[str, Any]:
    """Mean prediction quality per predictor and traced layer (see the module docstring),
    over the predictions of records ``start`` .. I-1 (the predictors observe every record;
    a later ``start`` leaves out the early iterations where routing still moves fast).

    Returns ``{"layers": [...], "n_hot": .., "shadows": .., "records": I, "predictors":
    {name: {layer: {"hot_load_rel_err": mean, "same_set": share, "n": predictions}}}}``;
    ``previous_layer`` is present only when the trace has token choices and >= 2 layers.
    """
    return predictor_accuracies(trace, (start,), n_hot, shadows, decay)[0]


def predictor_accuracies(trace: RoutingTrace, starts: Sequence[int], n_hot: int = 2,
                         shadows: int = 1, decay: float = 0.9) -> list[dict[str, Any]]:
    """:func:`predictor_accuracy` for every start of ``starts``, from one pass over the trace."""
    h = trace.header
    if len(trace) < 2:
        raise ValueError(f"a prediction needs >= 2 records; the trace has {len(trace)}")
    for start in starts:
        if not 1 <= start < len(trace):
            raise ValueError(f"start={start} must be in [1, {len(trace) - 1}] for "
                             f"{len(trace)} records")
    first = min(starts)
    counts = trace.counts.astype(float)  # [I, L, W, E]
    policy = lambda c: top_k_shadows(c, shadows)  # noqa: E731
    # per predictor and layer: (record, metrics) of every prediction from record `first` on
    acc: dict[str, dict[int, list[tuple[int, dict]]]] = {"balanced": {}, "previous_iteration": {}}
    has_choices = trace.choices is not None and len(h.layers) > 1
    if has_choices:
        acc["previous_layer"] = {}
    prev_it = PreviousIterationPredictor()
    trans = TransitionPredictor(h.num_experts, decay=decay)
    for i in range(len(trace)):
        for pos, layer in enumerate(h.layers):
            true = counts[i, pos]
            if i >= first:
                acc["previous_iteration"].setdefault(layer, []).append(
                    (i, prediction_metrics(prev_it.predict(pos), true, n_hot, policy)))
                acc["balanced"].setdefault(layer, []).append((i, prediction_metrics(
                    np.full_like(true, true.sum() / true.size), true, n_hot, policy)))
            if has_choices and pos > 0 and i >= first:
                pred = trans.predict(pos - 1, counts[i, pos - 1])
                if pred is not None:
                    acc["previous_layer"].setdefault(layer, []).append(
                        (i, prediction_metrics(pred, true, n_hot, policy)))
        for pos in range(len(h.layers)):
            prev_it.observe(pos, counts[i, pos])
        ch: Optional[np.ndarray] = trace.choices[i] if has_choices else None
        if ch is not None:
            for pos in range(len(h.layers) - 1):
                trans.observe(pos, ch[pos], ch[pos + 1])
    results = []
    for start in starts:
        out: dict[str, Any] = {"layers": list(h.layers), "n_hot": n_hot, "shadows": shadows,
                               "records": len(trace), "start": start, "predictors": {}}
        for name, per_layer in acc.items():
            out["predictors"][name] = {}
            for layer, rows in per_layer.items():
                ms = [m for i, m in rows if i >= start]
                if ms:
                    out["predictors"][name][layer] = {
                        "hot_load_rel_err": float(np.mean([m["hot_load_rel_err"] for m in ms])),
                        "same_set": float(np.mean([m["same_set"] for m in ms])), "n": len(ms)}
        results.append(out)
    return results


def format_accuracy(acc: dict[str, Any]) -> str:
    """Markdown table of :func:`predictor_accuracy` (one row per predictor and layer)."""
    lines = [f"| predictor | layer | hot-{acc['n_hot']} load error | same top-{acc['shadows']} "
             "shadow set | predictions |", "|---|---|---|---|---|"]
    for name, per_layer in acc["predictors"].items():
        for layer, m in sorted(per_layer.items()):
            lines.append(f"| {name} | {layer} | {100 * m['hot_load_rel_err']:.1f}% | "
                         f"{100 * m['same_set']:.0f}% | {m['n']} |")
    return "\n".join(lines) + "\n"
