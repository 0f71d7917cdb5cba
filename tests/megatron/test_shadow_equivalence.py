"""Dynamic shadow experts never change the math: FasterMoELayer with shadows (forced by
``top_k`` or chosen by the predictor on skewed routing) vs stock Megatron MoELayer, same weights
and inputs: outputs, input gradients and every parameter gradient match (fp32 1e-5, bf16 2e-2,
the tolerances of test_fastermoe_equivalence). Balanced routing: the predictor shadows nothing.
Training: a tiny GPT through pretrain_gpt_moe.py under torchrun (EP 2 x DP 2, distributed
optimizer with overlapped gradient reduction, 2 micro-batches) gives the same losses and
checkpointed weights with and without shadows.

Notation: S sequence, B batch, H hidden, E experts, W expert-parallel workers, T = S * B.
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

import pytest
import torch

from tests.helpers import read_metrics, spawn, torchrun
from tests.megatron import layer_cases
from tests.megatron.test_fastermoe_equivalence import BASE, BF16_TOL, FP32_TOL

TOP_K = "moe.fastermoe.shadow.policy=top_k"
PREDICTOR = "moe.fastermoe.shadow.policy=predictor"
MODEL = "moe.fastermoe.shadow.policy=model"
PF_ITER = "moe.fastermoe.shadow.prefetch=previous_iteration"  # (needs moe.impl=fastermoe)
PF_LAYER = "moe.fastermoe.shadow.prefetch=previous_layer"
USE_ANY = "moe.fastermoe.shadow.prefetch_slack=1e9"  # a wrong prefetched set is used
IGNORE_WORSE = "moe.fastermoe.shadow.prefetch_slack=0"  # ... ignored when predicted slower
SKEW = dict(hot=1, seq=32, batch=4)
FM = "moe.impl=fastermoe"  # the stock layer of the pair is built as MoELayer all the same


def _case(name: str, experts: int, topk: int, ep: int, *extra: str, **kw: Any) -> dict:
    top1 = ["moe.router.pre_softmax=true"] if topk == 1 else []
    return dict(name=name, overrides=BASE + [f"moe.num_experts={experts}", f"moe.topk={topk}",
                                             f"parallel.expert={ep}", *top1, *extra], **kw)


CASES_2 = [
    _case("topk1", 4, 2, 2, TOP_K, "moe.fastermoe.shadow.max_experts=1"),
    _case("topk2_g2", 4, 2, 2, TOP_K, "moe.fastermoe.shadow.max_experts=2",
          "moe.fastermoe.group_size=2"),
    _case("el1_only_expert", 2, 1, 2, TOP_K, "moe.fastermoe.shadow.max_experts=1"),
    _case("all_shadowed", 4, 2, 2, TOP_K, "moe.fastermoe.shadow.max_experts=4"),
    _case("capacity_topk1", 4, 2, 2, TOP_K, "moe.capacity_factor=0.5"),
    _case("predictor_skewed", 4, 2, 2, PREDICTOR, hot=1, seq=32, batch=4, expect_shadow=1),
    _case("predictor_balanced", 4, 1, 2, PREDICTOR, balanced=True, expect_none=True),
    # policy model on johnny's rates (on local-cpu's fast loopback shadowing 1 alone does not
    # pay for these tiny experts, and the greedy stops there)
    _case("model_skewed", 4, 2, 2, MODEL, "moe.fastermoe.cluster=johnny", hot=1, seq=32,
          batch=4, expect_shadow=1),
    _case("model_balanced", 4, 1, 2, MODEL, balanced=True, expect_none=True),
    _case("bf16_topk2", 4, 2, 2, TOP_K, "moe.fastermoe.shadow.max_experts=2",
          "train.precision=bf16"),
    # shadow prefetch: the prediction right, or wrong (experts permuted) and used or ignored
    _case("prefetch_iter_right", 4, 2, 2, TOP_K, FM, PF_ITER, **SKEW, expect_shadow=1,
          prefetch=dict(wrong=False, used=True)),
    _case("prefetch_iter_wrong_used", 4, 2, 2, TOP_K, FM, PF_ITER, USE_ANY, **SKEW,
          prefetch=dict(wrong=True, used=True)),
    _case("prefetch_iter_wrong_ignored", 4, 2, 2, TOP_K, FM, PF_ITER, IGNORE_WORSE, **SKEW,
          expect_shadow=1, prefetch=dict(wrong=True, used=False)),
    _case("prefetch_layer_right", 4, 2, 2, TOP_K, FM, PF_LAYER, **SKEW, expect_shadow=1,
          prefetch=dict(wrong=False, used=True)),
    _case("prefetch_layer_model_right", 4, 2, 2, MODEL, FM, PF_LAYER,
          "moe.fastermoe.cluster=johnny", **SKEW, prefetch=dict(wrong=False, used=True)),
    _case("prefetch_layer_wrong_used", 4, 2, 2, TOP_K, FM, PF_LAYER, USE_ANY, **SKEW,
          prefetch=dict(wrong=True, used=True)),
    _case("prefetch_layer_wrong_ignored", 4, 2, 2, TOP_K, FM, PF_LAYER, IGNORE_WORSE, **SKEW,
          expect_shadow=1, prefetch=dict(wrong=True, used=False)),
]

CASES_4 = [
    _case("ep4_topk1", 8, 2, 4, TOP_K),
    _case("ep4_topk2_g2", 8, 2, 4, TOP_K, "moe.fastermoe.shadow.max_experts=2",
          "moe.fastermoe.group_size=2"),
    _case("ep4_predictor_skewed", 8, 2, 4, PREDICTOR, hot=5, seq=32, batch=4, expect_shadow=5),
    _case("ep4_predictor_balanced", 4, 1, 4, PREDICTOR, balanced=True, expect_none=True),
    _case("ep4_bf16_topk2", 8, 2, 4, TOP_K, "moe.fastermoe.shadow.max_experts=2",
          "train.precision=bf16", "moe.fastermoe.group_size=2"),
    _case("ep4_prefetch_layer_wrong_used", 8, 2, 4, TOP_K, FM, PF_LAYER, USE_ANY,
          "moe.fastermoe.group_size=2", hot=5, seq=32, batch=4,
          prefetch=dict(wrong=True, used=True)),
]

CASES_4_EP2 = [  # 4 processes: expert parallel 2 x expert data parallel 2
    _case("ep2_dp2_topk1", 4, 2, 2, TOP_K),
    _case("ep2_dp2_predictor_skewed", 4, 2, 2, PREDICTOR, "moe.fastermoe.cluster=local-cpu",
          hot=2, seq=32, batch=4, expect_shadow=2),
]


# --------------------------------------------------------------------------- spawned workers


def _route(case: dict, layers, x: torch.Tensor, num_experts: int) -> None:
    """Skew (expert ``hot`` always picked) or balance (token t -> expert t mod E) the routing
    by editing both layers' router weights and the input, like layer_cases' dead experts."""
    with torch.no_grad():
        if case.get("hot") is not None:
            for layer in layers:
                layer.router.weight[case["hot"]].fill_(0.0)
                layer.router.weight[case["hot"], 0] = 20.0
            x[..., 0] = x[..., 0].abs() + 1.0
        if case.get("balanced"):
            for layer in layers:
                layer.router.weight.zero_()
                for e in range(num_experts):
                    layer.router.weight[e, e] = 50.0
            x[..., :num_experts] = 0.0
            tokens = x.view(-1, x.shape[-1])
            idx = torch.arange(tokens.shape[0])
            tokens[idx, idx % num_experts] = 1.0


def _prime_prefetch(case: dict, layer, x: torch.Tensor) -> None:
    """Give the layer's predictor a prediction of the coming call that is right (its counts)
    or deliberately wrong (expert e's load predicted on expert e - 1): previous_iteration is
    fed those counts; previous_layer a transition matrix P (identity or the permutation) and
    the counts of a layer 0 below, so that its prediction is counts @ P."""
    state = layer.prefetch_state
    with torch.no_grad():
        layer(x)  # the first call has no prediction; it records the true counts
        _, routing_map = layer.router(x)
    assert layer.last_prefetch == dict(source="none", used=False, set_match=None,
                                       hot_load_error=None, exposed_s=None), layer.last_prefetch
    counts = layer.token_dispatcher.counts.double()
    E = counts.shape[1]
    perm = torch.roll(torch.arange(E), 1) if case["prefetch"]["wrong"] else torch.arange(E)
    P = torch.eye(E, dtype=torch.float64)[perm]
    if state.mode == "previous_iteration":
        state.previous.observe(layer.layer_number, counts @ P)
    else:
        state.register(0)
        state.transition.observe_pairs(0, P.numpy() * 10)
        state.observe(0, counts, routing_map, layer.ep_group)


def _compare(case: dict, pg, rank: int) -> dict[str, Any]:
    stock, faster, cfg = layer_cases.build_pair(case["overrides"], pg)
    dtype = torch.bfloat16 if cfg.train.precision == "bf16" else torch.float32
    gen = torch.Generator().manual_seed(2000 + rank)
    S, B, H = case.get("seq", 16), case.get("batch", 3), cfg.model.hidden_size
    x = torch.randn(S, B, H, generator=gen)
    _route(case, (stock, faster), x, cfg.moe.num_experts)
    x = x.to(dtype)
    gy = torch.randn(S, B, H, generator=gen)
    if case.get("prefetch"):
        _prime_prefetch(case, faster, x)
    o1, gx1, g1 = layer_cases.run_layer(stock, x, gy)
    o2, gx2, g2 = layer_cases.run_layer(faster, x, gy)
    assert set(g1) == set(g2), (sorted(g1), sorted(g2))
    counts = faster.token_dispatcher.counts
    W, E = counts.shape
    return {
        "out": layer_cases._rel(o2, o1),
        "grad_input": layer_cases._rel(gx2, gx1),
        "grad_params": max(layer_cases._rel(g2[k], g1[k]) for k in g1),
        "n_params_with_grad": len(g1),
        "counts": counts.tolist(),
        "shadows": list(faster.last_shadows),
        "predicted_s": faster.last_predicted_s,
        "prefetch": faster.last_prefetch,
        # layer-level predictor on a perfectly balanced count matrix: nothing to shadow
        "balanced_matrix_shadows": (faster.select_shadows(torch.full((W, E), 1000))
                                    if faster.shadow_policy in ("predictor", "model") else None),
    }


def worker(rank: int, world: int, phases: list, out_dir: str) -> None:
    """Spawned entry: for each (EP size, cases) phase, run every case; write JSON per rank."""
    import torch.distributed as dist

    results: dict[str, Any] = {}
    for ep, cases in phases:
        ps, pg = layer_cases._setup(ep)
        for case in cases:
            results[case["name"]] = _compare(case, pg, rank)
        dist.barrier()
        ps.destroy_model_parallel()
    Path(out_dir, f"rank{rank}.json").write_text(json.dumps(results))
    dist.barrier()
    dist.destroy_process_group()


def _run(tmp_path: Path, world: int, phases: list) -> dict:
    spawn(worker, world, phases, str(tmp_path))
    return {r: json.loads((tmp_path / f"rank{r}.json").read_text()) for r in range(world)}


def _check(results: dict, cases: list[dict]) -> None:
    for case in cases:
        tol = BF16_TOL if "train.precision=bf16" in case["overrides"] else FP32_TOL
        shadows0 = results[0][case["name"]]["shadows"]
        for rank, res in results.items():
            r = res[case["name"]]
            for key in ("out", "grad_input", "grad_params"):
                assert r[key] <= tol, f"{case['name']} rank {rank}: {key} rel diff {r[key]:.2e} > {tol}"
            assert r["n_params_with_grad"] >= 3
            assert r["predicted_s"] is not None and r["predicted_s"] > 0
            assert r["balanced_matrix_shadows"] in (None, []), (case["name"], r)
            if r["counts"] == results[0][case["name"]]["counts"]:
                # same EP group (same all-gathered counts): same shadows on every rank
                assert r["shadows"] == shadows0, (case["name"], rank, r["shadows"], shadows0)
        if TOP_K in case["overrides"]:
            k = next((int(o.split("=")[1]) for o in case["overrides"]
                      if o.startswith("moe.fastermoe.shadow.max_experts=")), 1)
            assert len(shadows0) == k, (case["name"], shadows0)
        if case.get("expect_shadow") is not None:
            assert case["expect_shadow"] in shadows0, (
                case["name"], shadows0, results[0][case["name"]]["counts"])
        if case.get("prefetch"):
            _check_prefetch(case, results)
        if case.get("expect_none"):
            counts = results[0][case["name"]]["counts"]
            assert len({v for row in counts for v in row}) == 1, counts  # really balanced
            assert shadows0 == [], (case["name"], shadows0)


def _check_prefetch(case: dict, results: dict) -> None:
    """The prefetched set was used or ignored as expected, the metrics say how good the
    prediction was, and every rank decided the same."""
    want = case["prefetch"]
    source = "previous_layer" if PF_LAYER in case["overrides"] else "previous_iteration"
    for rank, res in results.items():
        pf = res[case["name"]]["prefetch"]
        assert pf["source"] == source and pf["used"] == want["used"], (case["name"], rank, pf)
        assert pf["set_match"] == (not want["wrong"]), (case["name"], rank, pf)
        assert (pf["hot_load_error"] > 0.5) if want["wrong"] else pf["hot_load_error"] == 0.0, pf
        assert pf["exposed_s"] >= 0.0, pf


@pytest.mark.timeout(400)
def test_shadow_equivalence_ep2(tmp_path):
    _check(_run(tmp_path, 2, [(2, CASES_2)]), CASES_2)


@pytest.mark.timeout(600)
def test_shadow_equivalence_ep4_and_ep2_dp2(tmp_path):
    res = _run(tmp_path, 4, [(4, CASES_4), (2, CASES_4_EP2)])
    _check(res, CASES_4)
    _check(res, CASES_4_EP2)


# --------------------------------------------------------------------------- training


TRAIN_ARGS = [
    "--config", "configs/gpt_moe_tiny.yaml", "data.mock=true", "data.tokenizer.type=none",
    "model.vocab_size=256", "train.iters=5", "train.lr_warmup_iters=1",
    "train.global_batch_size=16", "train.micro_batch_size=2",  # DP 4: 2 micro-batches
    "train.use_distributed_optimizer=true", "train.overlap_grad_reduce=true",
    "logging.interval=1", "checkpoint.interval=5",
    "train.eval_iters=0", "parallel.expert=2",
]


def _model_weights(ckpt_dir: Path, tmp: Path) -> dict[str, torch.Tensor]:
    """Model tensors of a dist_checkpointing (torch_dist) checkpoint, loaded on one process."""
    from torch.distributed.checkpoint.format_utils import dcp_to_torch_save

    out = tmp / f"{ckpt_dir.parent.parent.name}.pt"
    dcp_to_torch_save(str(ckpt_dir), str(out))
    sd = torch.load(out, weights_only=False)
    return {k: v for k, v in sd.items() if torch.is_tensor(v) and not k.startswith("chained_")
            and "optimizer" not in k and "_extra_state" not in k}


@pytest.mark.timeout(900)
def test_training_with_shadows_matches_stock(tmp_path):
    """EP 2 x DP 2, distributed optimizer, 2 micro-batches, 5 steps: per-step losses and the
    final weights of moe.impl=fastermoe with a shadow every layer call, prefetched from the
    layer below's prediction (previous_layer), equal moe.impl=megatron.
    overlap_grad_reduce also checks that each expert gradient arrives exactly once per backward
    (Megatron's bucket bookkeeping would stall or assert otherwise)."""
    runs = {}
    for name, extra in (("megatron", ["moe.impl=megatron"]),
                        ("shadow", ["moe.impl=fastermoe", TOP_K, PF_LAYER,
                                    "moe.fastermoe.shadow.max_experts=1"])):
        d = tmp_path / name
        torchrun([*TRAIN_ARGS, *extra, f"logging.dir={d}", f"checkpoint.save={d / 'ckpt'}"],
                 nproc=4, timeout=800)
        records = read_metrics(d / "metrics.jsonl")
        losses = [r["loss"] for r in records]
        assert len(losses) == 5, losses
        runs[name] = (losses, _model_weights(d / "ckpt" / "iter_0000005", tmp_path))
    for layer in ("layer_1", "layer_2"):  # prefetch metrics (previous_iteration in layer 1)
        rec = records[-1]["moe"][layer]
        assert 0 <= rec["prefetch_set_match"] <= 1 and 0 <= rec["prefetch_used"] <= 1, rec
        assert rec["prefetch_hot_load_error"] >= 0 and rec["prefetch_exposed_s"] >= 0, rec
    (l1, w1), (l2, w2) = runs["megatron"], runs["shadow"]
    for a, b in zip(l1, l2):
        assert abs(a - b) <= 1e-5 * abs(a), (l1, l2)
    assert set(w1) == set(w2) and any("experts" in k for k in w1), sorted(w1)
    for k in w1:
        rel = layer_cases._rel(w2[k], w1[k])
        assert rel <= 1e-5, f"{k}: rel diff {rel:.2e}"
