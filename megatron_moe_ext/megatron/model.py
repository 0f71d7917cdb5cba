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
from megatron.core.transformer.moe.moe_layer import MoELayer, MoESubmodules
from megatron.core.transformer.spec_utils import ModuleSpec
from megatron.core.transformer.transformer_block import TransformerBlockSubmodules
from megatron.core.transformer.transformer_config import TransformerConfig

from megatron_moe_ext.config import Config
from megatron_moe_ext.megatron import specs

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
    moe.router.type: topology_aware the router is a TopologyAwareRouter (same parameters)."""
    spec = copy.deepcopy(layer_spec)
    mlp = spec.submodules.mlp
    if isinstance(mlp, ModuleSpec) and mlp.module is MoELayer and moe_cls is not MoELayer:
        mlp.module = moe_cls
        mlp.params = dict(mlp.params or {}, options=moe_cls.options_from_moe_config(cfg.moe))
    if (isinstance(mlp, ModuleSpec) and isinstance(mlp.submodules, MoESubmodules)
            and cfg.moe.router.type == "topology_aware"):
        from megatron_moe_ext.megatron.router import topology_router_builder

        mlp.submodules.router = topology_router_builder(cfg.moe.router)
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


def build_model(
    cfg: Config,
    tconf: TransformerConfig,
    vocab_size: int,
    pg_collection: ProcessGroupCollection,
    pre_process: bool,
    post_process: bool,
) -> torch.nn.Module:
    """One pipeline stage of the GPT or BERT MoE model (not wrapped in DDP)."""
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
