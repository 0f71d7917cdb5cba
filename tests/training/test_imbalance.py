"""The imbalance cost record (training/imbalance.py) on hand-built [W, E] counts: balanced
routing costs nothing, the cost grows with the skew and equals the slowest rank's time over the
balanced one, the hot experts are the ones the counts made hot, shadow savings follow the
performance model."""

from __future__ import annotations

import numpy as np
import pytest

from megatron_moe_ext.megatron.layer_builder import zipf_expert_counts
from megatron_moe_ext.perf.model import predict_layer
from megatron_moe_ext.perf.topology import build_topology
from megatron_moe_ext.training.imbalance import FWD_BWD, hot_experts, imbalance_record

H, ALPHA, P = 64, 2.0, 1e11  # constant 100 GFLOP/s


def _fwd(tokens: float) -> float:
    return 4.0 * tokens * ALPHA * H * H / P


def _zipf(W: int, E: int, T: int, k: int, skew: float) -> np.ndarray:
    """Every rank routes its T tokens with the same Zipf(skew) law (expert 0 hottest)."""
    return np.tile(zipf_expert_counts(T, E, k, skew), (W, 1)).astype(float)


def test_balanced_routing_costs_nothing():
    rec = imbalance_record(_zipf(2, 4, 64, 2, 0.0), H, ALPHA, P)
    assert rec["source"] == "estimated"
    assert rec["rank_tokens"] == [128.0, 128.0]  # 2 ranks x 64 tokens x top-2 over 2 ranks
    assert rec["imbalance_cost_s"] == pytest.approx(0.0, abs=1e-15)
    assert rec["rank_wait_s"] == [0.0, 0.0]
    assert rec["hot_experts"] == [] and rec["hot_share"] == []
    assert rec["shadow_saved_s"] == 0.0
    assert rec["rank_compute_s"][0] == pytest.approx(FWD_BWD * _fwd(128))


def test_cost_is_slowest_rank_over_balanced_and_names_the_hot_experts():
    # rank 0 owns experts 0, 1; rank 1 owns 2, 3. Expert 1 is hot.
    counts = np.array([[10, 50, 10, 10], [10, 30, 5, 5]], dtype=float)
    rec = imbalance_record(counts, H, ALPHA, P, top=2)
    assert rec["rank_tokens"] == [100.0, 30.0]
    slow, fast, even = (FWD_BWD * _fwd(t) for t in (100, 30, 65))
    assert rec["rank_compute_s"] == pytest.approx([slow, fast])
    assert rec["rank_wait_s"] == pytest.approx([0.0, slow - fast])
    assert rec["imbalance_cost_s"] == pytest.approx(slow - even)
    # per-expert loads 20, 80, 15, 15, mean 32.5: only expert 1 is above the mean
    assert rec["hot_experts"] == [[1, 80]] and rec["hot_share"] == pytest.approx([1.0])
    hot, share = hot_experts(np.array([[40, 30, 20, 10]]), top=3)
    assert hot == [[0, 40], [1, 30]] and share == pytest.approx([15 / 20, 5 / 20])


def test_cost_grows_with_skew_and_expert_zero_is_hottest():
    costs = []
    for skew in (0.0, 0.5, 1.0, 1.5, 2.0):
        rec = imbalance_record(_zipf(4, 8, 256, 2, skew), H, ALPHA, P)
        costs.append(rec["imbalance_cost_s"])
        if skew > 0:
            assert rec["hot_experts"][0][0] == 0
            assert rec["rank_wait_s"][0] == 0.0  # rank 0 holds the hot experts: it is slowest
            assert all(w > 0 for w in rec["rank_wait_s"][1:])
    assert costs[0] == pytest.approx(0.0, abs=1e-15)
    assert all(b > a for a, b in zip(costs, costs[1:])), costs


def test_measured_times_give_waits_and_cost_from_the_measurements():
    counts = np.array([[30, 30, 2, 2], [30, 30, 2, 2]], dtype=float)
    rec = imbalance_record(counts, H, ALPHA, P, measured_fwd_s=[0.004, 0.001])
    assert rec["source"] == "measured"
    assert rec["rank_compute_s"] == pytest.approx([0.012, 0.003])
    assert rec["rank_wait_s"] == pytest.approx([0.0, 0.009])
    assert rec["imbalance_cost_s"] == pytest.approx(0.012 - 0.0075)
    with pytest.raises(ValueError, match="ranks"):
        imbalance_record(counts, H, ALPHA, P, measured_fwd_s=[0.1])


def test_shadowing_the_hot_expert_balances_and_reports_the_saving():
    counts = _zipf(2, 4, 128, 2, 2.0)
    plain = imbalance_record(counts, H, ALPHA, P)
    shadowed = imbalance_record(counts, H, ALPHA, P, shadows=[0])
    assert shadowed["imbalance_cost_s"] < plain["imbalance_cost_s"]
    assert shadowed["hot_experts"] == plain["hot_experts"]  # what caused it is still named
    # without a topology: the slowest rank's compute difference
    assert shadowed["shadow_saved_s"] == pytest.approx(
        max(plain["rank_compute_s"]) - max(shadowed["rank_compute_s"]))
    assert shadowed["shadow_saved_s"] > 0
    # with a topology: the performance model's layer time without minus with the shadows
    topo = build_topology("local-cpu")
    rec = imbalance_record(counts, H, ALPHA, P, shadows=[0], topology=topo, dtype_bytes=4)
    kw = dict(dtype="fp32", schedule="smart", group_size=1, gemm=P)
    expected = (predict_layer(counts, None, H, ALPHA, 4, topo, **kw).total_s
                - predict_layer(counts, None, H, ALPHA, 4, topo, shadow_experts=[0], **kw).total_s)
    assert rec["shadow_saved_s"] == pytest.approx(expected)
