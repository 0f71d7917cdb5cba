"""Grouped-GEMM experts on ``torch.nn.functional.grouped_mm`` with SequentialMLP's layout.

:class:`GroupedGemmExperts` is a :class:`SequentialMLP` (same ``local_experts.{i}.linear_fc1 /
linear_fc2`` parameters, same ``sharded_state_dict``, so checkpoints cross over between
sequential and grouped experts and between both ``moe.impl`` values) whose forward runs all
local experts in two grouped GEMMs instead of one GEMM pair per expert:

    h = grouped_mm(x, W1^T, offs)            [T, F1]   (F1 = 2 F with a gated linear unit)
    a = act(h) * probs                        [T, F]    (MLP's unfused activation, in torch)
    y = grouped_mm(a, W2^T, offs)            [T, H]

with W1 = stack(linear_fc1.weight) [E_l, F1, H], W2 = stack(linear_fc2.weight) [E_l, H, F] and
offs the int32 cumulative tokens per expert. The stack copies the expert weights once per
forward (E_l * 3 H F elements), which is small next to the GEMMs at the token counts MoE
training runs; its backward hands each expert's gradient back to its own parameter.

Alignment: ``grouped_mm`` wants row strides that are multiples of 16 bytes, so H, F and F1
must be multiples of 16 / element size (4 for fp32, 8 for bf16); checked at construction.
Token counts per expert need no alignment (measured on the CPU kernel; the GPU check
exercises the CUDA kernel).

Notation: T routed token copies (rows of x), E_l local experts, H hidden, F expert FFN hidden.
"""

from __future__ import annotations

from typing import Optional

import torch
import torch.nn.functional as F
from megatron.core.transformer.moe.experts import SequentialMLP

__all__ = ["GroupedGemmExperts", "grouped_mm", "expert_offsets", "check_alignment",
           "mlp_activation"]

_grouped_mm = getattr(F, "grouped_mm", None) or getattr(torch, "_grouped_mm", None)


def mlp_activation(config, h: torch.Tensor) -> torch.Tensor:
    """MLP.forward's unfused, bias-free activation (gelu / silu, or a gated linear unit);
    elementwise per row, so it commutes with the grouping."""
    if config.gated_linear_unit:
        x_glu, x_lin = torch.chunk(h, 2, dim=-1)
        if (val := config.activation_func_clamp_value) is not None:
            x_glu = x_glu.clamp(min=None, max=val)
            x_lin = x_lin.clamp(min=-val, max=val)
        return config.activation_func(x_glu) * (x_lin + config.glu_linear_offset)
    return config.activation_func(h)


class _ContiguousGrad(torch.autograd.Function):
    """Identity whose backward makes the incoming gradient contiguous: grouped_mm's backward
    rejects expanded gradients (e.g. the stride-0 ones of ``y.sum().backward()``)."""

    @staticmethod
    def forward(ctx, x):  # noqa: D102
        return x.view_as(x)

    @staticmethod
    def backward(ctx, g):  # noqa: D102
        return g.contiguous()


def grouped_mm(x: torch.Tensor, weights: torch.Tensor, offs: torch.Tensor) -> torch.Tensor:
    """rows of group g of ``x`` [T, K] times ``weights[g]^T`` ([E_l, N, K]) -> [T, N]."""
    if _grouped_mm is None:
        raise RuntimeError(f"torch {torch.__version__} has no grouped_mm (moe.grouped_gemm needs "
                           "torch.nn.functional.grouped_mm or torch._grouped_mm)")
    return _ContiguousGrad.apply(_grouped_mm(x.contiguous(), weights.transpose(1, 2), offs=offs))


def expert_offsets(tokens_per_expert: torch.Tensor, device: torch.device) -> torch.Tensor:
    """int32 end offsets [E_l] of each expert's rows, on ``device``.

    The cumulative sum is taken where the counts live: host counts (what the stock and the
    FasterMoE layers pass today) cost no device sync but one small host-to-device copy from
    pinned memory, made without blocking; device counts cost neither."""
    offs = torch.cumsum(tokens_per_expert.to(torch.int64), 0).to(torch.int32)
    if device.type == "cuda" and offs.device.type == "cpu":
        offs = offs.pin_memory()  # from the caching host allocator: a truly async copy
    return offs.to(device, non_blocking=True)  # a no-op when already there


def check_alignment(sizes: dict[str, int], dtype: torch.dtype) -> None:
    """ValueError unless every size times the element size is a multiple of 16 bytes."""
    item = torch.empty((), dtype=dtype).element_size()
    bad = {k: v for k, v in sizes.items() if (v * item) % 16}
    if bad:
        raise ValueError(
            f"moe.grouped_gemm: grouped_mm needs sizes whose rows are multiples of 16 bytes "
            f"(multiples of {16 // item} for {dtype}); got "
            + ", ".join(f"{k}={v}" for k, v in bad.items())
            + " (use moe.grouped_gemm: false or change the sizes)")


class GroupedGemmExperts(SequentialMLP):
    """SequentialMLP whose forward is two grouped GEMMs over all local experts.

    Same constructor, parameters and checkpoint layout as SequentialMLP (it *is* one); only
    :meth:`forward` differs. Supports what the unfused MLP path does without biases: gelu /
    silu / swiglu (gated linear unit), ``moe_apply_probs_on_input``, empty experts and empty
    input. Biases, fp8 / fp4 and expert tensor parallelism are refused at construction.
    """

    def __init__(self, num_local_experts, config, submodules, pg_collection=None):
        super().__init__(num_local_experts, config, submodules, pg_collection=pg_collection)
        cfg = self.config
        if cfg.add_bias_linear:
            raise ValueError("moe.grouped_gemm: our grouped experts do not support biases "
                             "(add_bias_linear)")
        if cfg.fp8 or cfg.fp4:
            raise ValueError("moe.grouped_gemm: our grouped experts do not support fp8 / fp4")
        if self.tp_group is not None and self.tp_group.size() > 1:
            raise ValueError("moe.grouped_gemm: our grouped experts need expert tensor "
                             "parallel size 1")
        if cfg.use_te_activation_func:
            raise ValueError("moe.grouped_gemm: our grouped experts use the torch activation")
        ffn = cfg.moe_ffn_hidden_size
        fc1 = 2 * ffn if cfg.gated_linear_unit else ffn
        check_alignment({"hidden_size": cfg.hidden_size, "moe_ffn_hidden_size": ffn,
                         "fc1 output": fc1}, cfg.params_dtype)

    def forward(
        self,
        permuted_local_hidden_states: torch.Tensor,
        tokens_per_expert: torch.Tensor,
        permuted_probs: torch.Tensor,
    ) -> tuple[torch.Tensor, Optional[torch.Tensor]]:
        """[T, H] expert-sorted rows, [E_l] counts, [T] probs -> ([T, H], None)."""
        x, probs = permuted_local_hidden_states, permuted_probs
        if self.config.moe_apply_probs_on_input:  # as SequentialMLP.forward
            assert self.config.moe_router_topk == 1, (
                "`moe_apply_probs_on_input` only works with `moe_router_topk`=1.")
            x = (probs.unsqueeze(-1) * x).to(x.dtype)
            probs = torch.ones_like(probs)
        offs = expert_offsets(tokens_per_expert, x.device)
        w1 = torch.stack([e.linear_fc1.weight for e in self.local_experts])  # [E_l, F1, H]
        w2 = torch.stack([e.linear_fc2.weight for e in self.local_experts])  # [E_l, H, F]
        h = mlp_activation(self.config, grouped_mm(x, w1, offs))
        dtype = h.dtype
        h = (h * probs.unsqueeze(-1)).to(dtype)  # MLP's per_token_scale
        return grouped_mm(h, w2, offs), None
