"""The scale lab's iteration mode: Megatron's DDP bucket plan (pure), the interval overlap, and
one small run (4 spawned workers, 2-layer model, both implementations x both priorities)."""

from __future__ import annotations

import argparse
import json
from pathlib import Path

import pytest

from megatron_moe_ext.describe import count_parameters
from megatron_moe_ext.lab import LabConfig, run_lab
from megatron_moe_ext.lab.cli import add_lab_arguments, check_real
from megatron_moe_ext.lab.iteration import (
    bucket_plan,
    default_bucket_size,
    merge_intervals,
    model_stages,
    overlap_seconds,
)
from tests.helpers import REPO

CLUSTER = str(Path(__file__).with_name("lab2x2.yaml"))
TINY = """model: {type: gpt, num_layers: 2, hidden_size: 64, ffn_hidden_size: 128,
        num_attention_heads: 2, seq_length: 64, vocab_size: 512}
moe: {num_experts: 4, topk: 2, ffn_hidden_size: 128}
parallel: {expert: 4}
train: {micro_batch_size: 2, global_batch_size: 8}
"""


def test_bucket_plan_is_megatrons_reverse_order_rule():
    stages = [("embedding", [("word", 10)]), ("layer0", [("a", 4), ("b", 4)]),
              ("layer1", [("a", 4), ("b", 4)]), ("head", [("norm", 1)])]
    plan = bucket_plan(stages, 8)
    # reverse registration order; a bucket closes once it holds >= 8 elements
    assert [[(s, p) for s, p, _ in b.params] for b in plan] == [
        [("head", "norm"), ("layer1", "b"), ("layer1", "a")],
        [("layer0", "b"), ("layer0", "a")],
        [("embedding", "word")]]
    assert [b.numel for b in plan] == [9, 8, 10]
    assert [b.ready_after for b in plan] == ["layer1", "layer0", "embedding"]
    one = bucket_plan(stages, None)
    assert len(one) == 1 and one[0].numel == 27 and one[0].ready_after == "embedding"
    assert len(bucket_plan(stages, 1)) == 6  # every parameter its own bucket
    assert default_bucket_size(16) == 40_000_000 and default_bucket_size(64) == 64_000_000
    with pytest.raises(ValueError):
        bucket_plan(stages, 0)


def test_moe_gpt_stages_hold_every_dense_parameter():
    cfg, stages = model_stages(str(REPO / "configs/models/moe-gpt.yaml"), None)
    params = count_parameters(cfg)
    dense = sum(n for s in stages for _, n in s["dense_params"])
    assert dense == params["total"] - params["breakdown"]["experts"]
    assert [s["name"] for s in stages][:2] == ["embedding", "layer0"] and len(stages) == 14
    plan = bucket_plan([(s["name"], s["dense_params"]) for s in stages], default_bucket_size(16))
    assert [b.ready_after for b in plan] == ["layer9", "layer6", "layer3", "layer0", "embedding"]
    _, two = model_stages(str(REPO / "configs/models/moe-gpt.yaml"), 2)
    assert len(two) == 4 and two[1]["flops_per_token"] == stages[1]["flops_per_token"]


def test_overlap_of_interval_unions():
    assert merge_intervals([[3, 4], [0, 1], [0.5, 2], [5, 5]]) == [(0, 2), (3, 4)]
    assert overlap_seconds([[0, 2], [3, 4]], [[1, 3.5]]) == pytest.approx(1.5)
    assert overlap_seconds([[0, 1]], []) == 0.0


def test_iteration_needs_emulated_compute_and_a_model():
    p = argparse.ArgumentParser()
    add_lab_arguments(p, with_shared=False)
    with pytest.raises(SystemExit):
        check_real(p, p.parse_args(["--iteration"]))
    with pytest.raises(ValueError, match="--iteration needs --compute emulated"):
        LabConfig(cluster=CLUSTER, iteration=True, model="x.yaml", compute="real").validate()
    with pytest.raises(ValueError, match="needs --model"):
        LabConfig(cluster=CLUSTER, iteration=True).validate()
    with pytest.raises(ValueError, match="--layers needs --iteration"):
        LabConfig(cluster=CLUSTER, layers=2).validate()
    with pytest.raises(ValueError, match="--grad-scale"):
        LabConfig(cluster=CLUSTER, iteration=True, model="x.yaml", grad_scale="0").validate()


def test_iteration_run_reduces_the_bucket_plan_and_holds_behind_exchanges(tmp_path):
    model = tmp_path / "tiny.yaml"
    model.write_text(TINY)
    out = tmp_path / "iter.json"
    # B = 8000 elements: a bucket per layer, the first ready before layer 0's exchanges
    cfg = LabConfig(cluster=CLUSTER, world_size=4, tokens=64, hidden=64, ffn=128, experts=4,
                    iters=1, warmup=0, dilation="1", iteration=True, model=str(model),
                    ddp_bucket_size=8000, grad_reduce_chunk_mb=0.01, json=str(out))
    assert run_lab(cfg) == 0
    r = json.loads(out.read_text())
    assert r["mode"] == "iteration" and r["dilation"] == 1.0
    for key in ("lab", "cluster", "config", "machine"):
        assert key in r
    it = r["iteration"]
    _, stages = model_stages(str(model), None)
    plan = bucket_plan([(s["name"], s["dense_params"]) for s in stages], 8000)
    assert [b["elements"] for b in it["buckets"]] == [b.numel for b in plan]
    assert len(plan) == 3 and it["layers"] == 2
    assert set(it["variants"]) == {"megatron.none", "megatron.moe_first", "fastermoe.none",
                                   "fastermoe.moe_first"}
    for name, v in it["variants"].items():
        assert v["buckets"] == len(plan) and v["launch_order"] == [0, 1, 2]
        assert v["iteration_s"] > 0 and v["cluster_ms"] > 0 and v["exchange_busy_s"] > 0
        assert 0 <= v["reduction_in_exchange_share"] <= 1
        if name.endswith(".none"):
            assert v["chunks"] == len(plan) and v["held_chunks"] == 0
        else:  # a bucket reaches the wire while layer 0's exchanges run: chunks wait
            assert v["chunks"] > len(plan) and v["held_chunks"] > 0
    assert set(it["priority_gain"]) == {"megatron", "fastermoe"}
    assert set(it["fastermoe_speedup"]) == {"none", "moe_first"}
    assert "tokens per worker" in it["tokens_note"] and it["token_scale"] == 0.5


def test_sync_markers_leave_the_expert_compute_out_of_the_exchange_window():
    import torch

    from megatron_moe_ext.core.comm_priority import exchange_signal
    from megatron_moe_ext.lab.iteration import _MarkedExperts, _OnBackward

    sig, seen = exchange_signal(), []

    class Probe(torch.autograd.Function):
        @staticmethod
        def forward(ctx, x):
            seen.append(("fwd", sig.busy()))
            return x.view_as(x)

        @staticmethod
        def backward(ctx, g):
            seen.append(("bwd", sig.busy()))
            return g

    class Acc:
        def expert_fn(self, x, p, t):
            return Probe.apply(x)

    x = torch.randn(4, 8, requires_grad=True)
    sig.timeline = []
    try:  # the structure of _sync_marked, all-to-alls left out
        h = _OnBackward.apply(sig.end, x)
        with sig.in_flight():
            assert sig.busy()
            h = _MarkedExperts(Acc()).expert_fn(h, None, [4])
            assert sig.busy()
        _OnBackward.apply(sig.begin, h).sum().backward()
        assert seen == [("fwd", False), ("bwd", False)] and not sig.busy()
        assert len(sig.timeline) == 4  # dispatch + combine, forward and backward
    finally:
        sig.timeline = None
