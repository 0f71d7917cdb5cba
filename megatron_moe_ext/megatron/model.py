"""Build megatron-core's TransformerConfig, layer specs and GPT / BERT models from our Config.

This folder is the only place that imports megatron.core for model construction; the
scheduling, shadowing and performance-model code stays plain PyTorch.
"""

from __future__ import annotations

import copy
import logging
from typing import Optional

import torch
import torch.nn.functional as F
from megatron.core.models.bert.bert_model import BertModel
from megatron.core.models.gpt.gpt_model import GPTModel
from megatron.core.process_groups_config import ProcessGroupCollection
from megatron.core.transformer.enums import AttnMaskType
from megatron.core.transformer.moe.moe_layer import MoELayer
from megatron.core.transformer.spec_utils import ModuleSpec
from megatron.core.transformer.transformer_block import TransformerBlockSubmodules
from megatron.core.transformer.transformer_config import TransformerConfig

from megatron_moe_ext.config import Config
from megatron_moe_ext.megatron import specs, versions

logger = logging.getLogger(__name__)


def pad_vocab(size: int, multiple: int = 128) -> int:
    """Round the vocabulary up so the output layer splits evenly (Megatron convention)."""
    return ((size + multiple - 1) // multiple) * multiple


def build_transformer_config(cfg: Config, device: str) -> TransformerConfig:
    """Translate our schema to megatron-core's TransformerConfig."""
    m, moe, par, tr = cfg.model, cfg.moe, cfg.parallel, cfg.train
    bf16 = tr.precision == "bf16"
    act = {"gelu": F.gelu, "silu": F.silu, "swiglu": F.silu}[m.activation]
    lb_type = moe.router.load_balancing_type
    return TransformerConfig(
        num_layers=m.num_layers,
        hidden_size=m.hidden_size,
        ffn_hidden_size=m.ffn_hidden_size,
        num_attention_heads=m.num_attention_heads,
        hidden_dropout=m.hidden_dropout,
        attention_dropout=m.attention_dropout,
        init_method_std=m.init_method_std,
        normalization=m.normalization,
        activation_func=act,
        gated_linear_unit=m.activation == "swiglu",
        add_bias_linear=False,
        tensor_model_parallel_size=par.tensor,
        pipeline_model_parallel_size=par.pipeline,
        expert_model_parallel_size=par.expert,
        expert_tensor_parallel_size=par.expert_tensor,
        sequence_parallel=par.sequence_parallel,
        pipeline_dtype=torch.bfloat16 if bf16 else torch.float32,
        params_dtype=torch.bfloat16 if bf16 else torch.float32,
        bf16=bf16,
        # MoE
        num_moe_experts=moe.num_experts,
        moe_router_topk=moe.topk,
        moe_ffn_hidden_size=moe.ffn_hidden_size or m.ffn_hidden_size,
        moe_layer_freq=moe.layer_freq,
        moe_token_dispatcher_type=moe.token_dispatcher,
        moe_router_load_balancing_type=lb_type,
        moe_aux_loss_coeff=moe.router.aux_loss_coeff if lb_type != "none" else 0.0,
        moe_z_loss_coeff=moe.router.z_loss_coeff,
        moe_router_score_function=moe.router.score_function,
        moe_router_pre_softmax=moe.router.pre_softmax,
        moe_router_dtype=moe.router.dtype,
        moe_router_enable_expert_bias=moe.router.enable_expert_bias,
        moe_router_bias_update_rate=moe.router.bias_update_rate,
        moe_router_num_groups=moe.router.num_groups,
        moe_router_group_topk=moe.router.group_topk,
        moe_shared_expert_intermediate_size=moe.shared_expert_ffn_hidden_size,
        moe_expert_capacity_factor=moe.capacity_factor,
        moe_pad_expert_input_to_capacity=moe.pad_to_capacity,
        moe_token_drop_policy=moe.drop_policy,
        # grouped GEMM and kernel fusions: per transformer impl and device (specs.py)
        **specs.fusion_settings(cfg, device),
        use_cpu_initialization=device == "cpu",
        perform_initialization=True,
        deterministic_mode=False,
    )


def _moe_layer_class(cfg: Config) -> type:
    if cfg.moe.impl == "fastermoe":
        from megatron_moe_ext.megatron.fastermoe_layer import FasterMoELayer

        return FasterMoELayer
    return MoELayer


def _swap_moe(layer_spec: ModuleSpec, moe_cls: type, cfg: Config) -> ModuleSpec:
    """A copy of a layer spec whose MoE MLP module is `moe_cls` (same submodules: same router,
    same SequentialMLP experts, so the same parameter names and layout). With
    moe.router.type: topology_aware the router is a TopologyAwareRouter (same parameters).
    Both spec forms (ModuleSpec up to megatron-core 0.17, functools.partial from 0.18) are
    handled by versions.swap_moe_module; build_model checks the result (no silent fallback)."""
    spec = copy.deepcopy(layer_spec)
    router = None
    if cfg.moe.router.type == "topology_aware":
        from megatron_moe_ext.megatron.router import topology_router_builder

        router = topology_router_builder(cfg.moe.router)
    params = {} if moe_cls is MoELayer else {"options": moe_cls.options_from_moe_config(cfg.moe)}
    spec.submodules.mlp = versions.swap_moe_module(spec.submodules.mlp, moe_cls, params, router)
    return spec


def gpt_block_spec(cfg: Config, tconf: TransformerConfig, pp_rank: Optional[int] = None):
    """Decoder block spec for GPT with the chosen MoE implementation (local, non-TE modules)."""
    block = specs.decoder_block_spec(cfg, tconf, pp_rank=pp_rank)
    moe_cls = _moe_layer_class(cfg)
    return TransformerBlockSubmodules(
        layer_specs=[_swap_moe(s, moe_cls, cfg) for s in block.layer_specs],
        layer_norm=block.layer_norm,
    )


def bert_layer_spec(cfg: Config) -> ModuleSpec:
    """BERT layer spec with MoE (megatron-core ships none): the local GPT MoE layer with a
    bidirectional padding mask instead of the causal one."""
    spec = _swap_moe(specs.moe_layer_spec(cfg), _moe_layer_class(cfg), cfg)
    spec.submodules.self_attention.params = dict(
        spec.submodules.self_attention.params or {}, attn_mask_type=AttnMaskType.padding
    )
    return spec


class MoEImplementationError(RuntimeError):
    """A built model whose MoE layers are not the implementation the config asked for."""


def expected_moe_classes(cfg: Config) -> tuple[type, type]:
    """(MoE layer class, router class) that cfg.moe asks for."""
    from megatron.core.transformer.moe.router import TopKRouter

    router: type = TopKRouter
    if cfg.moe.router.type == "topology_aware":
        from megatron_moe_ext.megatron.router import TopologyAwareRouter

        router = TopologyAwareRouter
    return _moe_layer_class(cfg), router


def describe_moe_layers(module: torch.nn.Module) -> list[dict]:
    """Per transformer layer of this stage with an MoE MLP: its module name, layer number and
    the classes of the MoE layer, router, experts and shared experts."""
    from megatron.core.transformer.transformer_layer import TransformerLayer

    rows = []
    for name, layer in module.named_modules():
        mlp = getattr(layer, "mlp", None) if isinstance(layer, TransformerLayer) else None
        if not isinstance(mlp, MoELayer):
            continue
        shared = getattr(mlp, "shared_experts", None)
        rows.append({
            "name": f"{name}.mlp", "layer_number": layer.layer_number,
            "moe_class": type(mlp), "router_class": type(mlp.router),
            "experts_class": type(mlp.experts), "num_local_experts": mlp.num_local_experts,
            "shared_experts_class": type(shared) if shared is not None else None,
        })
    return rows


def check_moe_layers(module: torch.nn.Module, cfg: Config) -> list[dict]:
    """No silent fallback: every MoE layer of this stage must be exactly the class cfg.moe.impl
    asks for, with the router cfg.moe.router.type asks for, and every layer that the layer
    pattern makes an MoE layer must have one. Raises MoEImplementationError naming the layer,
    the class found and the megatron-core version; returns :func:`describe_moe_layers`."""
    from megatron.core.transformer.transformer_layer import TransformerLayer

    want_layer, want_router = expected_moe_classes(cfg)
    rows = {r["name"]: r for r in describe_moe_layers(module)}
    problems = []
    for name, layer in module.named_modules():
        if not isinstance(layer, TransformerLayer):
            continue
        key = f"{name}.mlp"
        # megatron's int moe_layer_freq: layer i (0-based) is MoE iff i % freq == 0; BERT's one
        # layer spec makes every layer MoE
        moe_expected = (cfg.model.type == "bert"
                        or (layer.layer_number - 1) % cfg.moe.layer_freq == 0)
        row = rows.get(key)
        if row is None:
            if moe_expected:
                problems.append(f"{key} (layer {layer.layer_number}) is "
                                f"{_qualname(type(getattr(layer, 'mlp', None)))}, not an MoE layer")
            continue
        if row["moe_class"] is not want_layer:
            problems.append(f"{key}: moe.impl={cfg.moe.impl} asks for {want_layer.__name__}, "
                            f"found {_qualname(row['moe_class'])}")
        if row["router_class"] is not want_router:
            problems.append(f"{key}: moe.router.type={cfg.moe.router.type} asks for "
                            f"{want_router.__name__}, found {_qualname(row['router_class'])}")
    if problems:
        raise MoEImplementationError(
            f"the built model is not what the config asked for (megatron-core "
            f"{versions.version_string()}): " + "; ".join(problems))
    return list(rows.values())


def _qualname(cls: type) -> str:
    return f"{cls.__module__}.{cls.__qualname__}"


def build_model(
    cfg: Config,
    tconf: TransformerConfig,
    vocab_size: int,
    pg_collection: ProcessGroupCollection,
    pre_process: bool,
    post_process: bool,
) -> torch.nn.Module:
    """One pipeline stage of the GPT or BERT MoE model (not wrapped in DDP), checked by
    :func:`check_moe_layers`."""
    model = _build_model(cfg, tconf, vocab_size, pg_collection, pre_process, post_process)
    check_moe_layers(model, cfg)
    attach_shadow_prefetch(model, cfg)
    return model


def attach_shadow_prefetch(module: torch.nn.Module, cfg: Config):
    """With moe.fastermoe.shadow.prefetch: one :class:`core.prefetch.PopularityState` shared by
    every FasterMoE layer of ``module`` (a model stage, or one layer); returns it (None
    without prefetch)."""
    mode = cfg.moe.fastermoe.shadow.prefetch
    if mode == "none" or cfg.moe.impl != "fastermoe":
        return None
    from megatron_moe_ext.core.prefetch import PopularityState
    from megatron_moe_ext.megatron.fastermoe_layer import FasterMoELayer

    state = PopularityState(mode, cfg.moe.num_experts)
    for m in module.modules():
        if isinstance(m, FasterMoELayer):
            m.attach_prefetch(state)
    return state


def _build_model(cfg, tconf, vocab_size, pg_collection, pre_process, post_process):
    m = cfg.model
    if m.type == "gpt":
        return GPTModel(
            config=tconf,
            transformer_layer_spec=gpt_block_spec(cfg, tconf),
            vocab_size=vocab_size,
            max_sequence_length=m.max_position_embeddings or m.seq_length,
            pre_process=pre_process,
            post_process=post_process,
            share_embeddings_and_output_weights=not m.untie_embeddings_and_output_weights,
            position_embedding_type=m.position_embedding_type,
            pg_collection=pg_collection,
        )
    if cfg.parallel.pipeline != 1:
        raise ValueError("model.type: bert supports parallel.pipeline: 1 only")
    return BertModel(
        config=tconf,
        num_tokentypes=2 if m.bert_binary_head else 0,
        transformer_layer_spec=bert_layer_spec(cfg),
        vocab_size=vocab_size,
        max_sequence_length=m.max_position_embeddings or m.seq_length,
        pre_process=pre_process,
        post_process=post_process,
        add_binary_head=m.bert_binary_head,
        share_embeddings_and_output_weights=not m.untie_embeddings_and_output_weights,
        position_embedding_type=m.position_embedding_type,
    )
