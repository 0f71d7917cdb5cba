"""Which layer specs and kernel fusions a model is built with (``model.transformer_impl``,
``moe.grouped_gemm``); the one place that decides them.

* ``model.transformer_impl``: ``transformer_engine`` (megatron-core's TE specs: TE linears,
  TE / flash attention, TE norms), ``local`` (megatron-core's torch modules) or ``auto``:
  TE when it imports and the device is CUDA, else local (one log line says which and why).
  Asking for ``transformer_engine`` without TE or without CUDA is a :class:`ConfigError`.
* ``moe.grouped_gemm``: the experts run as grouped GEMMs. With TE, megatron-core's
  TEGroupedMLP (``moe_grouped_gemm=True`` in the TransformerConfig picks it in the TE spec);
  with the local spec, our :class:`~megatron_moe_ext.megatron.grouped_experts.GroupedGemmExperts`
  on ``F.grouped_mm`` replaces SequentialMLP in the MoE submodules (megatron-core's local spec
  would pick the legacy GroupedMLP, which needs the ``grouped_gemm`` package and stores weights
  under other names). All three keep SequentialMLP's sharded checkpoint layout.
* Fusions (:func:`fusion_settings`): on CPU all off (torch code paths only). On CUDA each is
  on where its dependency exists: megatron-core's jit fusions (bias-dropout, fused cross
  entropy, weighted swiglu; ``torch.compile``) when triton and a C compiler are there; the
  ones that need TE (RoPE fusion, permutation fusion, masked
  softmax) with TE; persistent layer norm with apex. ``gradient_accumulation_fusion`` stays
  off: it writes into ``param.main_grad``, which only Megatron's DDP wrapper creates, and the
  bare layers of the equivalence tests and benchmarks have none.
"""

from __future__ import annotations

import functools
import importlib
import logging
import shutil
from typing import Optional

from megatron.core.models.gpt.gpt_layer_specs import (
    get_gpt_decoder_block_spec,
    get_gpt_layer_local_spec,
)
from megatron.core.tensor_parallel.layers import ColumnParallelLinear, RowParallelLinear
from megatron.core.transformer.mlp import MLPSubmodules
from megatron.core.transformer.moe.moe_layer import MoESubmodules
from megatron.core.transformer.spec_utils import ModuleSpec
from megatron.core.transformer.transformer_block import TransformerBlockSubmodules
from megatron.core.transformer.transformer_config import TransformerConfig

from megatron_moe_ext.config import Config, ConfigError

logger = logging.getLogger(__name__)

TRANSFORMER_IMPLS = ("auto", "transformer_engine", "local")
"""Accepted values of model.transformer_impl."""

_logged: set[tuple[str, str]] = set()


@functools.lru_cache(maxsize=None)
def _importable(module: str) -> bool:
    try:
        importlib.import_module(module)
    except Exception:  # noqa: BLE001 - any failure to import means "not there"
        return False
    return True


@functools.lru_cache(maxsize=None)
def jit_fusion_available() -> bool:
    """megatron-core's jit fusions (``megatron.core.jit.jit_fuser``: ``torch.compile`` on
    torch >= 2.2) can compile for CUDA: triton imports and a C compiler is on PATH (triton
    builds its launcher with one)."""
    return _importable("triton") and any(shutil.which(c) for c in ("cc", "gcc", "clang"))


def te_available() -> bool:
    """Transformer Engine imports and megatron-core's TE extension sees it."""
    if not _importable("transformer_engine"):
        return False
    from megatron.core.extensions import transformer_engine as te_ext

    return bool(getattr(te_ext, "HAVE_TE", False))


def resolve_transformer_impl(cfg: Config, device: str) -> str:
    """``transformer_engine`` or ``local`` for this config on ``device`` (``cpu`` / ``cuda``)."""
    asked = cfg.model.transformer_impl
    if asked not in TRANSFORMER_IMPLS:
        raise ConfigError(f"config key 'model.transformer_impl': {asked!r} is not one of "
                          f"{', '.join(TRANSFORMER_IMPLS)}")
    if asked == "local":
        return "local"
    have_te = te_available()
    if asked == "transformer_engine":
        if device != "cuda":
            raise ConfigError("model.transformer_impl: transformer_engine needs a CUDA device "
                              f"(this run's device is {device}); use auto or local")
        if not have_te:
            raise ConfigError("model.transformer_impl: transformer_engine but Transformer Engine "
                              "does not import here; install it or use auto or local")
        return "transformer_engine"
    impl = "transformer_engine" if (have_te and device == "cuda") else "local"
    if (impl, device) not in _logged:
        _logged.add((impl, device))
        why = ("Transformer Engine imports and the device is CUDA" if impl != "local" else
               "the device is not CUDA" if device != "cuda" else
               "Transformer Engine does not import")
        logger.info("model.transformer_impl: auto -> %s (%s)", impl, why)
    return impl


def fusion_settings(cfg: Config, device: str) -> dict[str, bool]:
    """The TransformerConfig fusion / grouped-GEMM fields for this config on ``device``."""
    te = resolve_transformer_impl(cfg, device) == "transformer_engine"
    cuda = device == "cuda"
    jit = cuda and jit_fusion_available()
    return dict(
        moe_grouped_gemm=bool(cfg.moe.grouped_gemm and te),  # local: our module via the spec
        moe_permute_fusion=cuda and te,
        # the fused bias-activation kernels exist for (weighted) swiglu without linear biases
        bias_activation_fusion=jit and cfg.model.activation == "swiglu",
        masked_softmax_fusion=cuda and (te or _importable("scaled_masked_softmax_cuda")),
        bias_dropout_fusion=jit,
        apply_rope_fusion=cuda and te and cfg.model.position_embedding_type == "rope",
        gradient_accumulation_fusion=False,  # needs Megatron DDP's main_grad (module docstring)
        persist_layer_norm=cuda and not te and _importable("apex.contrib.layer_norm.layer_norm"),
        cross_entropy_loss_fusion=jit,
    )


def grouped_experts_spec() -> ModuleSpec:
    """Our grouped-GEMM experts with SequentialMLP's submodules (same parameters)."""
    from megatron_moe_ext.megatron.grouped_experts import GroupedGemmExperts

    return ModuleSpec(module=GroupedGemmExperts, submodules=MLPSubmodules(
        linear_fc1=ColumnParallelLinear, linear_fc2=RowParallelLinear))


def with_experts(layer_spec: ModuleSpec, cfg: Config, impl: str) -> ModuleSpec:
    """``layer_spec`` with our grouped experts in its MoE submodules when moe.grouped_gemm is
    on with the local spec (in place; returns it). TE specs pick TEGroupedMLP themselves."""
    mlp = getattr(layer_spec.submodules, "mlp", None)
    if (cfg.moe.grouped_gemm and impl == "local" and isinstance(mlp, ModuleSpec)
            and isinstance(mlp.submodules, MoESubmodules)):
        mlp.submodules.experts = grouped_experts_spec()
    return layer_spec


def spec_device(cfg: Config) -> str:
    """The device the model is built for (runtime.device resolved, as the trainer does)."""
    from megatron_moe_ext.runtime.device import resolve_device

    return resolve_device(cfg.runtime)


def decoder_block_spec(cfg: Config, tconf: TransformerConfig, pp_rank: Optional[int] = None,
                       device: Optional[str] = None) -> TransformerBlockSubmodules:
    """megatron-core's GPT decoder block spec for the chosen impl, with our experts if asked."""
    impl = resolve_transformer_impl(cfg, device or spec_device(cfg))
    block = get_gpt_decoder_block_spec(
        tconf, use_transformer_engine=impl == "transformer_engine",
        normalization=cfg.model.normalization, pp_rank=pp_rank)
    for s in block.layer_specs:
        with_experts(s, cfg, impl)
    return block


def moe_layer_spec(cfg: Config, device: Optional[str] = None) -> ModuleSpec:
    """One GPT MoE layer spec for the chosen impl (BERT's base, the layer benchmarks)."""
    impl = resolve_transformer_impl(cfg, device or spec_device(cfg))
    if impl == "transformer_engine":
        from megatron.core.models.gpt.gpt_layer_specs import (
            get_gpt_layer_with_transformer_engine_spec,
        )

        spec = get_gpt_layer_with_transformer_engine_spec(
            num_experts=cfg.moe.num_experts, moe_grouped_gemm=cfg.moe.grouped_gemm)
    else:
        spec = get_gpt_layer_local_spec(num_experts=cfg.moe.num_experts,
                                        normalization=cfg.model.normalization)
    return with_experts(spec, cfg, impl)
