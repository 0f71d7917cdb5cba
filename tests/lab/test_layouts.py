"""The planner check's pure parts: rank statistics, the comparison, and the groups / rings a
candidate of johnny 2x8 runs (the processes-and-gloo part is in test_lab_runs.py's worker)."""

from __future__ import annotations

import pytest

from megatron_moe_ext.bench.stats import ranks, spearman
from megatron_moe_ext.config import load_config
from megatron_moe_ext.lab.layouts import compare_rankings, layer_shape, select_candidates
from megatron_moe_ext.perf.cluster import load_cluster
from megatron_moe_ext.traffic.planner import GRAD_BYTES, allreduce_rings, plan_layouts

OVERRIDES = ["model.hidden_size=512", "model.ffn_hidden_size=1024", "moe.ffn_hidden_size=1024",
             "model.num_attention_heads=8", "model.num_layers=1", "model.seq_length=1024",
             "model.vocab_size=1024", "moe.num_experts=16", "moe.topk=2",
             "train.micro_batch_size=1", "train.global_batch_size=16", "moe.impl=fastermoe",
             "data.mock=true"]


def test_spearman_on_hand_built_numbers() -> None:
    assert ranks([3.0, 1.0, 2.0, 1.0]) == [4.0, 1.5, 3.0, 1.5]  # ties share their mean rank
    assert spearman([1, 2, 3, 4], [10, 20, 30, 40]) == pytest.approx(1.0)
    assert spearman([1, 2, 3, 4], [4, 3, 2, 1]) == pytest.approx(-1.0)
    # one adjacent swap among 5: 1 - 6 * 2 / (5 * 24) = 0.9
    assert spearman([1, 2, 3, 4, 5], [1, 3, 2, 4, 5]) == pytest.approx(0.9)
    assert spearman([1, 2, 3], [5, 5, 5]) is None
    with pytest.raises(ValueError):
        spearman([1, 2], [1])


def test_comparison_names_first_choice_and_its_gap() -> None:
    labels = ["a", "b", "c", "d"]
    # the planner picks a (10), the lab finds b fastest: gap 12 / 11 - 1
    res = compare_rankings(labels, [10.0, 11.0, 12.0, 20.0], [12.0, 11.0, 15.0, 30.0])
    assert res["planner_first"] == "a" and res["fastest_measured"] == "b"
    assert res["first_choice_gap"] == pytest.approx(12.0 / 11.0 - 1.0)
    assert res["measured_order"] == ["b", "a", "c", "d"]
    assert res["spearman"] == pytest.approx(0.8)  # 1 - 6 * 2 / (4 * 15)


def test_johnny_candidates_groups_rings_and_gradient_bytes() -> None:
    cfg = load_config(None, OVERRIDES)
    cands = plan_layouts(cfg, load_cluster("johnny"), 16)
    got = {c.label: c for c in select_candidates(
        cands, ["ep=8 packed smart s=1", "ep=8 strided smart s=2", "ep=1 packed sync"])}
    packed, strided = got["ep=8 packed smart s=1"], got["ep=8 strided smart s=2"]
    assert packed.groups == [list(range(8)), list(range(8, 16))]
    assert allreduce_rings(packed.groups) == [[r, r + 8] for r in range(8)]  # across the NIC
    assert strided.groups == [list(range(0, 16, 2)), list(range(1, 16, 2))]
    assert allreduce_rings(strided.groups) == [[2 * r, 2 * r + 1] for r in range(8)]  # in a node
    assert allreduce_rings([list(range(16))]) == []  # ep = W: nothing to all-reduce
    assert allreduce_rings(got["ep=1 packed sync"].groups) == [list(range(16))]
    s = layer_shape(cfg)
    assert (s["hidden"], s["ffn"], s["tokens"]) == (512, 1024, 1024)
    # 2 experts x (fc1 + fc2 = 2 H F) fp32 per worker, 1 MoE layer x 1 micro-batch
    assert packed.allreduce_bytes == 2 * 2 * 512 * 1024 * GRAD_BYTES and packed.kappa == 1
    assert packed.step_ms == pytest.approx(packed.layer_ms + packed.allreduce_ms)
    with pytest.raises(ValueError, match="accepted: ep=16 packed smart s=1"):
        select_candidates(cands, ["ep=3 packed sync"])
