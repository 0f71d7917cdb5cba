"""Popularity predictors (core/popularity.py): exact on synthetic routing with known structure.

Notation: W workers, E experts, k top-k, T tokens.
"""

from __future__ import annotations

import numpy as np
import pytest

from megatron_moe_ext.core.popularity import (
    PreviousIterationPredictor,
    TransitionPredictor,
    prediction_metrics,
    transition_pairs,
)
from megatron_moe_ext.core.shadow_policy import top_k_shadows


def _counts(idx: np.ndarray, e: int) -> np.ndarray:
    return np.bincount(idx.reshape(-1), minlength=e).astype(float)


def test_previous_iteration_returns_last_counts_per_layer():
    p = PreviousIterationPredictor()
    assert p.predict(0) is None
    a, b = np.array([[3, 1], [0, 4]]), np.array([[1, 1], [1, 1]])
    p.observe(0, a)
    p.observe(1, b)
    assert np.array_equal(p.predict(0), a) and np.array_equal(p.predict(1), b)
    p.observe(0, b)
    assert np.array_equal(p.predict(0), b)


def test_transition_pairs_keep_each_tokens_copies():
    lo = np.array([[0, 1], [2, 3]])
    hi = np.array([[1, 1], [3, 0]])
    c = transition_pairs(lo, hi, 4)
    assert np.allclose(c.sum(axis=1), _counts(lo, 4))  # row a = copies sent to a
    assert c[0, 1] == 1.0 and c[2, 3] == 0.5 and c[2, 0] == 0.5
    with pytest.raises(ValueError):
        transition_pairs(lo, hi[:1], 4)


def test_previous_layer_is_exact_for_a_deterministic_permutation():
    """If every token that chose e below chooses perm[e] above, the prediction is exact."""
    rng = np.random.default_rng(0)
    e, t, w = 8, 512, 2
    perm = rng.permutation(e)
    pred = TransitionPredictor(e, decay=0.5)
    for _ in range(3):
        lo = rng.integers(0, e, size=(t, 1))
        pred.observe(0, lo, perm[lo])
    lo = [rng.integers(0, e, size=(t, 1)) for _ in range(w)]
    below = np.stack([_counts(x, e) for x in lo])
    above = np.stack([_counts(perm[x], e) for x in lo])
    assert np.allclose(pred.predict(0, below), above)
    assert np.allclose(pred.matrix(0).sum(axis=1), 1.0)


def test_decay_forgets_an_old_transition():
    pred = TransitionPredictor(2, decay=0.5)
    pred.observe(0, np.array([[0]] * 10), np.array([[0]] * 10))
    for _ in range(10):
        pred.observe(0, np.array([[0]] * 10), np.array([[1]] * 10))
    assert pred.matrix(0)[0, 1] > 0.999
    assert np.allclose(pred.matrix(0)[1], [0.5, 0.5])  # never observed: uniform


def test_metrics_hot_load_error_and_same_shadow_set():
    true = np.array([[10, 1, 1, 0], [8, 1, 0, 3]])
    good = np.array([[9, 1, 1, 1], [9, 1, 1, 1]])
    bad = np.array([[1, 9, 1, 0], [1, 9, 1, 0]])
    policy = lambda c: top_k_shadows(c, 1)  # noqa: E731
    m = prediction_metrics(good, true, n_hot=1, policy=policy)
    assert m["hot_experts"] == [0] and m["hot_load_rel_err"] == 0.0 and m["same_set"]
    m = prediction_metrics(bad, true, n_hot=1, policy=policy)
    assert m["hot_load_rel_err"] == pytest.approx(16 / 18) and not m["same_set"]


def test_an_idle_hot_expert_has_no_relative_error():
    """Top-1 collapse: one expert takes every token, so the 'second hottest' is idle."""
    true = np.array([[8.0, 0.0, 0.0, 0.0]])
    m = prediction_metrics(np.array([[6.0, 2.0, 0.0, 0.0]]), true, n_hot=2)
    assert m["hot_load_rel_err"] == 0.25
    assert prediction_metrics(true, np.zeros((1, 4)), n_hot=2)["hot_load_rel_err"] == 0.0
