"""Spec selection (model.transformer_impl), fusion settings and the grouped-experts spec
(moe.grouped_gemm) on the CPU: auto picks local and says so, transformer_engine without TE or
without CUDA is a clear error, fusions are off on the CPU and on where their dependencies exist
on CUDA, and the MoE layers get our grouped experts."""

from __future__ import annotations

import logging

import pytest

from megatron_moe_ext.config import ConfigError, load_config
from megatron_moe_ext.megatron import specs

FUSIONS = ("moe_permute_fusion", "bias_activation_fusion", "masked_softmax_fusion",
           "bias_dropout_fusion", "apply_rope_fusion", "gradient_accumulation_fusion",
           "persist_layer_norm", "cross_entropy_loss_fusion")


def _cfg(*overrides: str):
    return load_config(None, ["data.mock=true", *overrides])


def test_auto_picks_local_on_cpu_and_logs_once(caplog):
    specs._logged.clear()
    cfg = _cfg()
    with caplog.at_level(logging.INFO, logger="megatron_moe_ext.megatron.specs"):
        assert specs.resolve_transformer_impl(cfg, "cpu") == "local"
        assert specs.resolve_transformer_impl(cfg, "cpu") == "local"
    lines = [r.getMessage() for r in caplog.records if "transformer_impl" in r.getMessage()]
    assert lines == ["model.transformer_impl: auto -> local (the device is not CUDA)"]


def test_transformer_engine_without_cuda_or_te_is_a_config_error():
    cfg = _cfg("model.transformer_impl=transformer_engine")
    with pytest.raises(ConfigError, match="needs a CUDA device"):
        specs.resolve_transformer_impl(cfg, "cpu")
    if specs.te_available():
        pytest.skip("Transformer Engine is installed here")
    with pytest.raises(ConfigError, match="Transformer Engine does not import"):
        specs.resolve_transformer_impl(cfg, "cuda")
    specs._logged.clear()
    assert specs.resolve_transformer_impl(_cfg(), "cuda") == "local"  # auto falls back


def test_unknown_impl_and_misaligned_grouped_gemm_are_rejected_up_front():
    with pytest.raises(ConfigError, match="model.transformer_impl"):
        _cfg("model.transformer_impl=apex")
    with pytest.raises(ConfigError, match="multiples of 8"):
        _cfg("moe.grouped_gemm=true", "model.hidden_size=36", "model.num_attention_heads=4")


def test_fusions_off_on_cpu():
    for extra in ((), ("model.activation=swiglu", "moe.grouped_gemm=true")):
        f = specs.fusion_settings(_cfg(*extra), "cpu")
        assert set(FUSIONS) | {"moe_grouped_gemm"} == set(f)
        assert not any(f.values()), f


def test_fusions_on_cuda_where_dependencies_exist():
    if specs.te_available():
        pytest.skip("Transformer Engine is installed here")
    f = specs.fusion_settings(_cfg("model.activation=swiglu", "moe.grouped_gemm=true"), "cuda")
    # torch-jit fusions on; TE's (rope, permutation, masked softmax, TEGroupedMLP) off without
    # TE; gradient accumulation fusion off (needs Megatron DDP's main_grad)
    jit = specs.jit_fusion_available()  # torch.compile for CUDA: triton + a C compiler
    assert f["bias_dropout_fusion"] == jit and f["cross_entropy_loss_fusion"] == jit
    assert f["bias_activation_fusion"] == jit  # weighted swiglu
    assert not f["apply_rope_fusion"] and not f["moe_permute_fusion"]
    assert not f["moe_grouped_gemm"]  # local: our module comes through the spec instead
    assert not f["gradient_accumulation_fusion"]
    assert not specs.fusion_settings(_cfg(), "cuda")["bias_activation_fusion"]  # gelu, no bias


def test_transformer_config_accepts_the_settings():
    from megatron_moe_ext.megatron.model import build_transformer_config

    for dev in ("cpu", "cuda"):
        tconf = build_transformer_config(_cfg("model.activation=swiglu"), dev)
        assert tconf.bias_activation_fusion == (dev == "cuda" and specs.jit_fusion_available())


@pytest.mark.parametrize("impl", ["megatron", "fastermoe"])
def test_block_spec_uses_grouped_experts(impl):
    from megatron.core.transformer.moe.experts import SequentialMLP

    from megatron_moe_ext.megatron.grouped_experts import GroupedGemmExperts
    from megatron_moe_ext.megatron.model import build_transformer_config, gpt_block_spec

    for grouped, expected in ((True, GroupedGemmExperts), (False, SequentialMLP)):
        cfg = _cfg(f"moe.impl={impl}", f"moe.grouped_gemm={str(grouped).lower()}",
                   "runtime.device=cpu")
        block = gpt_block_spec(cfg, build_transformer_config(cfg, "cpu"), pp_rank=0)
        for layer in block.layer_specs:
            mlp = layer.submodules.mlp
            assert mlp.submodules.experts.module is expected
            assert (mlp.module.__name__ == "FasterMoELayer") == (impl == "fastermoe")


def test_bert_spec_uses_grouped_experts():
    from megatron_moe_ext.megatron.grouped_experts import GroupedGemmExperts
    from megatron_moe_ext.megatron.model import bert_layer_spec

    cfg = _cfg("model.type=bert", "moe.grouped_gemm=true", "runtime.device=cpu")
    assert bert_layer_spec(cfg).submodules.mlp.submodules.experts.module is GroupedGemmExperts
