"""FasterMoELayer vs stock Megatron MoELayer (alltoall dispatcher): identical weights and inputs
must give the same outputs, input gradients and parameter gradients, across routing settings,
expert-parallel sizes 1/2/4, group sizes 1/2/4, EP x DP, fp32 and bf16."""

from __future__ import annotations

import json
from pathlib import Path

import pytest

from tests.helpers import spawn
from tests.megatron import layer_cases

FP32_TOL = 1e-5  # max |a - b| / max |ref|
BF16_TOL = 2e-2  # bf16 keeps 8 bits of mantissa; different GEMM split points round differently

BASE = ["model.hidden_size=32", "model.ffn_hidden_size=48", "model.num_attention_heads=4"]

CASES_2 = [
    dict(name="top2_el2_g1", overrides=BASE + ["moe.num_experts=4", "moe.topk=2", "parallel.expert=2"]),
    dict(name="top2_el2_g2", overrides=BASE + ["moe.num_experts=4", "moe.topk=2", "parallel.expert=2",
                                               "moe.fastermoe.group_size=2"]),
    dict(name="top1_el1", overrides=BASE + ["moe.num_experts=2", "moe.topk=1", "moe.router.pre_softmax=true", "parallel.expert=2"]),
    dict(name="top2_el3_dead", overrides=BASE + ["moe.num_experts=6", "moe.topk=2", "parallel.expert=2"],
         dead_experts=[0, 1, 2]),
    dict(name="capacity_drop", overrides=BASE + ["moe.num_experts=4", "moe.topk=2", "parallel.expert=2",
                                                 "moe.capacity_factor=0.5"]),
    dict(name="seq_aux_sigmoid", overrides=BASE + ["moe.num_experts=4", "moe.topk=2", "parallel.expert=2",
                                                   "moe.router.load_balancing_type=seq_aux_loss",
                                                   "moe.router.score_function=sigmoid"]),
    dict(name="bf16", overrides=BASE + ["moe.num_experts=4", "moe.topk=2", "parallel.expert=2",
                                        "train.precision=bf16"]),
]

CASES_4 = [
    dict(name="ep4_g1", overrides=BASE + ["moe.num_experts=8", "moe.topk=2", "parallel.expert=4"]),
    dict(name="ep4_g2", overrides=BASE + ["moe.num_experts=8", "moe.topk=2", "parallel.expert=4",
                                          "moe.fastermoe.group_size=2"]),
    dict(name="ep4_g4_top1", overrides=BASE + ["moe.num_experts=4", "moe.topk=1", "moe.router.pre_softmax=true", "parallel.expert=4",
                                               "moe.fastermoe.group_size=4"]),
    dict(name="ep4_dead_peer", overrides=BASE + ["moe.num_experts=4", "moe.topk=1", "moe.router.pre_softmax=true", "parallel.expert=4",
                                                 "moe.fastermoe.group_size=2"], dead_experts=[1, 3]),
    dict(name="ep4_bf16", overrides=BASE + ["moe.num_experts=8", "moe.topk=2", "parallel.expert=4",
                                            "train.precision=bf16", "moe.fastermoe.group_size=2"]),
]

CASES_4_EP2 = [  # 4 processes, expert parallel 2 x expert data parallel 2
    dict(name="ep2_dp2", overrides=BASE + ["moe.num_experts=4", "moe.topk=2", "parallel.expert=2"],
         ep=2),
]


def _run(tmp_path: Path, world: int, ep: int, cases: list[dict]) -> dict:
    spawn(layer_cases.worker, world, ep, cases, str(tmp_path))
    return {r: json.loads((tmp_path / f"rank{r}.json").read_text()) for r in range(world)}


def _check(results: dict, cases: list[dict]) -> None:
    for case in cases:
        tol = BF16_TOL if "train.precision=bf16" in case["overrides"] else FP32_TOL
        for rank, res in results.items():
            r = res[case["name"]]
            for key in ("out", "grad_input", "grad_params"):
                assert r[key] <= tol, f"{case['name']} rank {rank}: {key} rel diff {r[key]:.2e} > {tol}"
            assert r["n_params_with_grad"] >= 3  # router + fc1 + fc2 of each local expert
    dead = [c for c in cases if c.get("dead_experts")]
    for case in dead:  # the routing really had empty experts
        counts = results[0][case["name"]]["counts"]
        for e in case["dead_experts"]:
            assert all(row[e] == 0 for row in counts), counts


@pytest.mark.timeout(300)
def test_equivalence_ep2(tmp_path):
    _check(_run(tmp_path, 2, 2, CASES_2), CASES_2)


@pytest.mark.timeout(400)
def test_equivalence_ep4_and_ep2_dp2(tmp_path):
    # one launch: the EP=4 cases, then the model-parallel state rebuilt for EP=2 x DP=2
    _check(_run(tmp_path, 4, 4, CASES_4 + CASES_4_EP2), CASES_4 + CASES_4_EP2)
