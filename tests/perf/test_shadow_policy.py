"""Algorithm 1 (dynamic shadowing): skewed vs balanced, the wrong-axis defect, limits."""

from __future__ import annotations

import numpy as np
import pytest
import torch

from megatron_moe_ext.core import shadow_policy as sp
from megatron_moe_ext.perf import model as pm

H, ALPHA, B = 1024, 2.0, 4
P = 11.5e12  # V100 fp32 GEMM
W_NET = 50e9 / 8  # johnny's NIC, bytes/s
ARGS = dict(H=H, alpha=ALPHA, dtype_bytes=B, gemm_flops=P, net_bandwidth=W_NET)


def hot_counts(n: int = 4, hot: int = 0, hot_tokens: int = 3000, cold: int = 100,
               experts_per_worker: int = 1) -> np.ndarray:
    """Every worker sends ``hot_tokens`` to expert ``hot`` and ``cold`` to each other one."""
    c = np.full((n, n * experts_per_worker), cold, dtype=np.int64)
    c[:, hot] = hot_tokens
    return c


def test_skewed_routing_shadows_the_hot_expert() -> None:
    counts = hot_counts()
    assert sp.choose_shadows(counts, 1, **ARGS) == [0]
    # the prediction really improved, and by a lot
    before = sp.lat_imbl(counts, 1, **ARGS)
    after = sp.lat_with_shadows(counts, 1, [0], **ARGS)
    assert after < before / 3


def test_hot_expert_with_several_experts_per_worker() -> None:
    counts = hot_counts(n=4, hot=5, experts_per_worker=2)  # expert 5 lives on worker 2
    assert sp.choose_shadows(counts, 2, **ARGS) == [5]


def test_balanced_routing_shadows_nothing() -> None:
    counts = np.full((4, 8), 1000)
    assert sp.choose_shadows(counts, 2, **ARGS) == []
    assert sp.choose_shadows(np.zeros((4, 4)), 1, **ARGS) == []


def test_fast_network_relative_to_compute_changes_nothing_for_balanced() -> None:
    counts = np.full((8, 8), 500)
    assert sp.choose_shadows(counts, 1, H=H, alpha=ALPHA, dtype_bytes=B,
                             gemm_flops=P, net_bandwidth=1e15) == []


def test_high_compute_to_network_ratio_keeps_params_at_home() -> None:
    """With a very slow network relative to GEMMs, moving 2 alpha H^2 params is not worth it."""
    counts = hot_counts(hot_tokens=1200, cold=1000)
    assert sp.choose_shadows(counts, 1, H=H, alpha=ALPHA, dtype_bytes=B,
                             gemm_flops=1e18, net_bandwidth=W_NET) == []


def _public_wrong_axis_policy(counts: np.ndarray) -> list[int]:
    """Emulation of the defect: 'loads' are tokens sent per worker (row sums), and the
    predicted max after shadowing the i-th most loaded entry is the (i+1)-th load."""
    wrong = np.sort(counts.sum(axis=1))[::-1]
    chosen: list[int] = []
    best = wrong[0]
    for i in range(len(wrong) - 1):
        if not wrong[i + 1] < best:  # param traffic only adds: needs a strictly smaller max
            break
        best = wrong[i + 1]
        chosen.append(i)
    return chosen


def test_equal_batches_one_hot_expert_wrong_axis_defect() -> None:
    counts = np.array([[700, 100, 100, 100]] * 4)  # every worker sends 1000 tokens
    wrong_axis = counts.sum(axis=1)
    assert wrong_axis.tolist() == [1000] * 4  # no imbalance visible on the wrong axis
    assert _public_wrong_axis_policy(counts) == []  # ... so it never shadows
    loads = sp.expert_loads(counts)
    assert loads.tolist() == [2800, 400, 400, 400]  # the right axis shows the hot expert
    assert sp.choose_shadows(counts, 1, **ARGS) == [0]


def test_max_experts_respected() -> None:
    counts = np.full((4, 4), 100)
    counts[:, 0] = 3000
    counts[:, 2] = 1500
    assert sp.choose_shadows(counts, 1, **ARGS) == [0, 2]
    assert sp.choose_shadows(counts, 1, max_experts=1, **ARGS) == [0]
    assert sp.choose_shadows(counts, 1, max_experts=0, **ARGS) == []


def test_equally_hot_experts_stop_the_greedy() -> None:
    """Algorithm 1 stops at the first expert that does not improve the prediction: with two
    equally hot experts on different workers, shadowing one alone leaves the max unchanged."""
    counts = np.full((4, 4), 100)
    counts[:, 1] = 3000
    counts[:, 3] = 3000
    assert sp.choose_shadows(counts, 1, **ARGS) == []
    both = sp.lat_with_shadows(counts, 1, [1, 3], **ARGS)
    assert both < sp.lat_imbl(counts, 1, **ARGS)  # the pair would have helped


def test_deterministic_and_tie_breaking() -> None:
    counts = np.full((4, 8), 100)
    counts[:, 2] = 3000
    counts[:, 3] = 3000  # tie between experts 2 and 3 (both on worker 1): lower id first
    first = sp.choose_shadows(counts, 2, **ARGS)
    assert first[0] == 2
    for _ in range(3):
        assert sp.choose_shadows(counts.copy(), 2, **ARGS) == first
    assert sp.choose_shadows(torch.tensor(counts), 2, **ARGS) == first
    assert sp.choose_shadows(counts.tolist(), 2, **ARGS) == first
    assert sp.top_k_shadows(counts, 2) == [2, 3]
    assert sp.top_k_shadows(np.full((2, 4), 5), 3) == [0, 1, 2]
    assert sp.top_k_shadows(counts, 0) == []


def test_lat_formulas_consistent_with_model() -> None:
    counts = np.array([[700, 100, 50, 150], [600, 200, 100, 100], [900, 50, 25, 25],
                       [400, 300, 200, 100]])
    # no shadows: Lat(0) equals the paper's Lat_imbl
    assert sp.lat_with_shadows(counts, 1, [], **ARGS) == pytest.approx(sp.lat_imbl(counts, 1, **ARGS))
    b = pm.worker_loads(pm.routing_matrix(counts, np.arange(4), 4))
    assert sp.lat_imbl(counts, 1, **ARGS) == pytest.approx(
        max(3 * 4 * b * ALPHA * H * H / P + 4 * b * H * B / W_NET))
    # with shadows: the compute part uses the same B' as perf.model.shadowed_loads
    shadows = [0, 1]
    b_after = pm.shadowed_loads(counts, np.arange(4), 4, shadows)
    recv = pm.worker_loads(pm.shadowed_routing(counts, np.arange(4), 4, shadows)[0])
    expected = max(12 * b_after * ALPHA * H * H / P + 4 * recv * H * B / W_NET) + \
        pm.shadow_comm_time_simple(2, H, ALPHA, B, W_NET)
    assert sp.lat_with_shadows(counts, 1, shadows, **ARGS) == pytest.approx(expected)


def test_bad_shapes() -> None:
    with pytest.raises(ValueError):
        sp.choose_shadows(np.ones((4, 6)), 1, **ARGS)  # 6 experts != 4 workers x 1
    with pytest.raises(ValueError):
        sp.choose_shadows(np.ones(4), 1, **ARGS)
    with pytest.raises(ValueError):
        sp.choose_shadows(-np.ones((2, 2)), 1, **ARGS)


def _johnny_pair():
    from megatron_moe_ext.perf.topology import Topology, cluster_spec_from_dict

    return Topology(cluster_spec_from_dict({
        "name": "pair", "nodes": 2, "workers_per_node": 1,
        "gemm_tflops": {"fp32": P / 1e12, "bf16": P / 1e12},
        "nics": [{"attach": "w0", "gbps": 50}],
    }))


def test_cost_greedy_follows_the_full_model() -> None:
    """policy `model`: the greedy keeps a shadow only when the smart-schedule model says so."""
    topo = _johnny_pair()

    def model_cost(counts):
        return lambda s: pm.predict_layer(counts, None, H, ALPHA, B, topo, schedule="smart",
                                          shadow_experts=s).total_s

    hot = hot_counts(n=2, hot=0, hot_tokens=8000, cold=100, experts_per_worker=2)
    chosen = sp.choose_shadows_by_cost(hot, model_cost(hot))
    assert chosen == [0]
    assert model_cost(hot)([0]) < model_cost(hot)([])
    # balanced routing: shadowing only adds the weight broadcast, nothing chosen
    flat = np.full((2, 4), 1000)
    assert sp.choose_shadows_by_cost(flat, model_cost(flat)) == []
    # a mild skew: Algorithm 1 (synchronous formula, nothing hidden) shadows both experts,
    # while the smart-schedule model, which hides part of the all-to-all, finds the weight
    # broadcast dearer than what is left to gain
    mild = np.array([[3000, 1000], [3000, 1000]])
    assert sp.choose_shadows(mild, 1, **ARGS) == [0, 1]
    assert sp.choose_shadows_by_cost(mild, model_cost(mild)) == []
    assert model_cost(mild)([]) < model_cost(mild)([0])


def test_cost_greedy_order_stop_and_cap() -> None:
    counts = np.array([[50, 400, 0, 300], [50, 400, 0, 300]])
    seen = []

    def cost(s):
        seen.append(list(s))
        return 10.0 - len(s) if len(s) < 2 else 100.0  # one shadow helps, two do not

    assert sp.choose_shadows_by_cost(counts, cost) == [1]
    assert seen == [[], [1], [1, 3]]  # hottest first, stops at the first non-improvement
    assert sp.choose_shadows_by_cost(counts, lambda s: -len(s)) == [1, 3, 0]  # never expert 2
    assert sp.choose_shadows_by_cost(counts, lambda s: -len(s), max_experts=1) == [1]


def test_top_k_never_picks_zero_load_experts() -> None:
    counts = np.array([[0, 4, 0, 1], [0, 2, 0, 0]])  # experts 0 and 2 get no token
    assert sp.top_k_shadows(counts, 4) == [1, 3]
    assert sp.top_k_shadows(counts, 1) == [1]
    assert sp.top_k_shadows(np.zeros((2, 4)), 2) == []
    assert sp.top_k_shadows(torch.tensor(counts), 3) == [1, 3]


def test_policy_names() -> None:
    assert sp.SHADOW_POLICIES == ("never", "predictor", "model", "top_k")


def test_pick_shadows_is_the_one_policy_dispatch():
    """never / W < 2: nothing; top_k: the hottest; model: the cost greedy; predictor: the given
    Algorithm 1; unknown names and missing inputs are errors."""
    from megatron_moe_ext.core.shadow_policy import pick_shadows

    c = np.array([[6.0, 1.0, 1.0, 0.0], [5.0, 2.0, 1.0, 0.0]])
    assert pick_shadows("never", c, 2) == [] and pick_shadows("top_k", c[:1], 2) == []
    assert pick_shadows("top_k", c, 2) == [0, 1]
    assert pick_shadows("model", c, 1, cost=lambda s: 10.0 - len(s) if len(s) < 2 else 9.5) == [0]
    assert pick_shadows("predictor", c, 1, algorithm1=lambda m: [2]) == [2]
    for bad, kw in (("sometimes", {}), ("model", {}), ("predictor", {})):
        with pytest.raises(ValueError):
            pick_shadows(bad, c, 1, **kw)
