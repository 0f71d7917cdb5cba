"""Shadow prefetch (core/prefetch.py): the rule for ignoring a prediction and the predictor
state a model's layers share (single process; the layer path is in
tests/megatron/test_shadow_equivalence.py).

Notation: W workers, E experts, S_p prefetched set, S_t the policy's set on the true counts.
"""

from __future__ import annotations

import numpy as np
import pytest
import torch

from megatron_moe_ext.core.prefetch import PopularityState, use_prefetched

COSTS = {(): 10.0, (0,): 6.0, (1,): 9.0, (2,): 11.0, (0, 1): 6.5}


def cost(s):
    return COSTS[tuple(sorted(s))]


def test_no_prediction_is_ignored():
    assert not use_prefetched(None, [0], cost)
    assert not use_prefetched(None, [], cost)


def test_same_set_is_used_even_without_a_cost_model():
    assert use_prefetched([1, 0], [0, 1], None)
    assert use_prefetched([], [], None)
    assert not use_prefetched([1], [0], None)  # different, nothing to judge by: ignore


def test_a_different_set_is_judged_against_the_better_of_true_set_and_none():
    # (0, 1) costs 6.5 vs min(6, 10) = 6: within 10 % -> used; within 5 % -> ignored
    assert use_prefetched([0, 1], [0], cost, slack=0.1)
    assert not use_prefetched([0, 1], [0], cost, slack=0.05)
    # (1,) 9.0 vs 6.0: ignored at 10 %, used with a huge slack
    assert not use_prefetched([1], [0], cost, slack=0.1)
    assert use_prefetched([1], [0], cost, slack=1e9)
    # the true set slower than none: the bound is cost([]) = 10; (1,) at 9 beats it
    assert use_prefetched([1], [2], cost, slack=0.0)
    # prefetching nothing when the true counts want a shadow: cost([]) 10 vs 6
    assert not use_prefetched([], [0], cost, slack=0.1)
    assert use_prefetched([0], [], cost, slack=0.0)  # 6 <= min(10, 10)


def test_a_cost_model_without_an_answer_means_ignore():
    assert not use_prefetched([1], [0], lambda s: None, slack=1e9)


def test_state_previous_iteration_and_layer_order():
    st = PopularityState("previous_iteration", 4)
    for layer in (3, 1, 1):
        st.register(layer)
    assert st.below(1) is None and st.below(3) == 1 and st.below(2) == 1
    assert st.predict(1) == (None, "none")
    c = np.array([[4, 0, 1, 1], [2, 2, 1, 1]])
    st.observe(1, c)
    pred, source = st.predict(1)
    assert source == "previous_iteration" and np.array_equal(pred, c)
    assert st.predict(3) == (None, "none")
    with pytest.raises(ValueError):
        PopularityState("none", 4)


def _map(idx, e):
    m = torch.zeros(len(idx), e, dtype=torch.bool)
    m[torch.arange(len(idx))[:, None], torch.as_tensor(idx)] = True
    return m


def test_state_previous_layer_learns_the_transition_and_falls_back_at_the_bottom():
    """Tokens that pick e in layer 1 pick (e + 1) mod E in layer 2: after one observed forward,
    layer 2's prediction from layer 1's counts of the next forward is exact; layer 1 (nothing
    below) uses its previous call."""
    e = 4
    st = PopularityState("previous_layer", e, decay=0.5)
    ready = []
    st.register(1, on_ready=lambda: ready.append(1))
    st.register(2, on_ready=lambda: ready.append(2))
    idx = np.array([[0, 1], [0, 2], [3, 0], [1, 2]])
    c1 = np.bincount(idx.reshape(-1), minlength=e)[None, :]
    c2 = np.bincount(((idx + 1) % e).reshape(-1), minlength=e)[None, :]
    assert st.predict(2) == (None, "none")
    st.observe(1, c1, _map(idx, e))
    assert st.predict(2) == (None, "none")  # no transition observed yet
    st.observe(2, c2, _map((idx + 1) % e, e))
    pred, source = st.predict(1)
    assert source == "previous_iteration" and np.array_equal(pred, c1)
    assert ready == [2]  # layer 1's report made layer 2's prediction ready
    st.observe(1, c1, _map(idx, e))  # next forward
    assert ready == [2, 2]
    pred, source = st.predict(2)
    assert source == "previous_layer" and np.allclose(pred, c2)
    # layer 2 right after layer 2 (not after the layer below): previous iteration
    st.observe(2, c2, _map((idx + 1) % e, e))
    assert st.predict(2)[1] == "previous_iteration"
