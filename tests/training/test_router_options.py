"""Router options through the whole training stack, with both moe.impl values: aux-loss-free
balancing with expert bias (updated by megatron-core's finalize_model_grads every iteration),
group-limited routing, seq_aux_loss and global_aux_loss balancing; shared experts with the stock
layer. Same seed and data must give the same loss at every step (the tolerance of
test_fastermoe_training.py)."""

from __future__ import annotations

from pathlib import Path

import pytest

from tests.helpers import read_metrics, torchrun
from tests.training.conftest import MOCK, run_args
from tests.training.test_fastermoe_training import REL

ITERS = 6
BASE = [*MOCK, f"train.iters={ITERS}", "parallel.expert=2", "train.lr_warmup_iters=1"]
BIAS = ["moe.router.score_function=sigmoid", "moe.router.enable_expert_bias=true",
        "moe.router.bias_update_rate=0.05", "moe.router.load_balancing_type=none"]

OPTIONS = {
    "expert_bias": BIAS,
    # one launch pair for two independent router paths (suite time): group-limited top-k
    # selection and the per-sequence aux loss
    "group_limited_seq_aux_loss": ["moe.router.num_groups=2", "moe.router.group_topk=1",
                                   "moe.router.load_balancing_type=seq_aux_loss"],
    "global_aux_loss": ["moe.router.load_balancing_type=global_aux_loss"],
}


def _losses(path: Path) -> dict[int, float]:
    return {r["iteration"]: r["loss"] for r in read_metrics(path / "metrics.jsonl")}


def _train(tmp: Path, *overrides: str) -> dict[int, float]:
    torchrun(run_args(tmp, *BASE, *overrides), nproc=2)
    losses = _losses(tmp)
    assert sorted(losses) == list(range(1, ITERS + 1))
    return losses


@pytest.mark.timeout(400)
@pytest.mark.parametrize("option", list(OPTIONS))
def test_both_implementations_same_loss(tmp_path, option):
    runs = {impl: _train(tmp_path / impl, *OPTIONS[option], f"moe.impl={impl}")
            for impl in ("megatron", "fastermoe")}
    for it, loss in runs["megatron"].items():
        assert runs["fastermoe"][it] == pytest.approx(loss, rel=REL), (option, it)
    if option == "expert_bias":
        # the bias update is in effect: without it the same run routes (and trains) differently
        plain = _train(tmp_path / "no_bias", *BIAS[:1], *BIAS[3:])
        assert plain[1] == pytest.approx(runs["megatron"][1], rel=1e-6)  # bias starts at 0
        assert any(abs(plain[i] - runs["megatron"][i]) > 1e-4 for i in range(2, ITERS + 1))


@pytest.mark.timeout(300)
def test_shared_experts_stock_layer_trains(tmp_path):
    losses = _train(tmp_path, "moe.shared_expert_ffn_hidden_size=64")
    assert losses[ITERS] < losses[1]
    # with moe.impl=fastermoe it is a config error (test_router_option_config_errors)


@pytest.mark.parametrize("overrides, message", [
    (["moe.router.enable_expert_bias=true"], "needs moe.router.score_function: sigmoid"),
    (["moe.router.num_groups=2"], "both moe.router.num_groups and moe.router.group_topk"),
    (["moe.router.num_groups=3", "moe.router.group_topk=1"], "must divide moe.num_experts=4"),
    (["moe.router.num_groups=2", "moe.router.group_topk=3"], "must be <="),
    (["moe.num_experts=8", "moe.topk=4", "moe.router.num_groups=4", "moe.router.group_topk=1"],
     "hold fewer than moe.topk=4"),
    (["moe.router.type=topology_aware", "moe.router.offnode_fraction=0.5",
      "moe.router.num_groups=2", "moe.router.group_topk=1"], "topology_aware does not support"),
    (["moe.shared_expert_ffn_hidden_size=64", "moe.impl=fastermoe"], "moe.impl: megatron only"),
    (["moe.router.load_balancing_type=global"], "choose one of"),
])
def test_router_option_config_errors(overrides, message):
    from megatron_moe_ext.config import ConfigError, load_config

    with pytest.raises(ConfigError, match=message):
        load_config(None, ["data.mock=true", *overrides])


def test_options_reach_megatron():
    from megatron_moe_ext.config import load_config
    from megatron_moe_ext.megatron.model import build_transformer_config
    from megatron_moe_ext.megatron.versions import validate_config

    cfg = load_config(None, ["data.mock=true", *BIAS, "moe.router.num_groups=2",
                             "moe.router.group_topk=1", "moe.shared_expert_ffn_hidden_size=32"])
    validate_config(cfg)
    t = build_transformer_config(cfg, "cpu")
    assert (t.moe_router_enable_expert_bias, t.moe_router_bias_update_rate) == (True, 0.05)
    assert (t.moe_router_num_groups, t.moe_router_group_topk) == (2, 1)
    assert t.moe_shared_expert_intermediate_size == 32
    assert t.moe_router_load_balancing_type == "none" and t.moe_aux_loss_coeff == 0.0
