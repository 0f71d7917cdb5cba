"""One local expert's weights, and one expert applied functionally, for each expert layout.

Shadow experts (:mod:`megatron_moe_ext.core.shadow`) broadcast one expert's weights from its
owner and run that expert on other ranks' tokens. How an expert's weights are stored depends
on the expert module; an :class:`ExpertLayout` hides that:

* ``sequential``: megatron-core's SequentialMLP and our :class:`GroupedGemmExperts` (a
  SequentialMLP subclass): expert e is ``local_experts[e]``, an MLP; applied with
  ``torch.func.functional_call`` on ``local_experts[0]`` (the very MLP code SequentialMLP runs).
* ``te_grouped``: megatron-core's TEGroupedMLP: expert e is ``linear_fc1.weight{e}`` /
  ``linear_fc2.weight{e}`` (and ``bias{e}`` with biases) of TE's grouped linears; applied as
  F.linear -> MLP activation -> probs -> F.linear, the unfused math of TEGroupedMLP.forward.
  (Not run here: it needs Transformer Engine and CUDA.)

Both apply ``moe_apply_probs_on_input`` as the expert modules do.

Notation: T tokens of one expert, H hidden, F expert FFN hidden.
"""

from __future__ import annotations

from typing import Sequence

import torch
import torch.nn.functional as F
from megatron.core.transformer.moe.experts import SequentialMLP

from megatron_moe_ext.core.shadow import functional_apply
from megatron_moe_ext.megatron.grouped_experts import mlp_activation

__all__ = ["ExpertLayout", "SequentialLayout", "TEGroupedLayout", "expert_layout"]


class ExpertLayout:
    """Per-expert view of an expert module with E_l local experts."""

    kind: str
    names: tuple[str, ...]
    """Names of one expert's tensors, in the order of :meth:`expert_params`."""

    def __init__(self, experts: torch.nn.Module):
        self.experts = experts
        self.config = experts.config
        self.num_local_experts = experts.num_local_experts

    def expert_params(self, local_index: int) -> list[torch.nn.Parameter]:
        """The parameters of local expert ``local_index`` (the owner's live tensors)."""
        raise NotImplementedError

    def templates(self) -> list[torch.nn.Parameter]:
        """Shape / dtype templates of one expert's tensors (local expert 0's)."""
        return self.expert_params(0)

    def _expert_forward(self, weights: Sequence[torch.Tensor], x: torch.Tensor,
                        probs: torch.Tensor) -> torch.Tensor:
        raise NotImplementedError

    def apply(self, weights: Sequence[torch.Tensor], x: torch.Tensor,
              probs: torch.Tensor) -> torch.Tensor:
        """One expert with ``weights`` (as :meth:`expert_params` orders them) on rows ``x``
        [T, H] with probs [T] -> [T, H]; gradients flow to ``weights``, ``x`` and ``probs``."""
        if len(weights) != len(self.names):
            raise ValueError(f"{self.kind} expert takes {len(self.names)} tensors, got "
                             f"{len(weights)}")
        if self.config.moe_apply_probs_on_input:  # as the expert modules' forward
            x = (probs.unsqueeze(-1) * x).to(x.dtype)
            probs = torch.ones_like(probs)
        return self._expert_forward(weights, x, probs)


class SequentialLayout(ExpertLayout):
    """SequentialMLP and its subclasses (our GroupedGemmExperts): ``local_experts[e]``."""

    kind = "sequential"

    def __init__(self, experts: SequentialMLP):
        super().__init__(experts)
        mods = experts.local_experts
        self.names = tuple(n for n, _ in mods[0].named_parameters())
        for m in mods[1:]:
            if tuple(n for n, _ in m.named_parameters()) != self.names:
                raise ValueError("shadow experts need identically structured local experts")

    def expert_params(self, local_index: int) -> list[torch.nn.Parameter]:
        return list(self.experts.local_experts[local_index].parameters())

    def _expert_forward(self, weights, x, probs):
        out, bias = functional_apply(self.experts.local_experts[0], self.names, weights, x, probs)
        assert bias is None  # an expert MLP adds its bias itself (per_token_scale given)
        return out


class TEGroupedLayout(ExpertLayout):
    """TEGroupedMLP: expert e is ``weight{e}`` (``bias{e}``) of linear_fc1 and linear_fc2."""

    kind = "te_grouped"

    def __init__(self, experts: torch.nn.Module):
        super().__init__(experts)
        if self.config.fp8 or self.config.fp4:
            raise ValueError("shadow experts do not support fp8 / fp4 experts")
        self._bias = bool(self.config.add_bias_linear)
        names = ["linear_fc1.weight{}", "linear_fc2.weight{}"]
        if self._bias:
            names = ["linear_fc1.weight{}", "linear_fc1.bias{}", "linear_fc2.weight{}",
                     "linear_fc2.bias{}"]
        self._patterns = tuple(names)
        self.names = tuple(n.format("") for n in names)
        params = dict(experts.named_parameters())
        missing = [p.format(0) for p in names if p.format(0) not in params]
        if missing:
            raise ValueError(f"TEGroupedMLP without {missing}: unknown TE grouped layout")

    def expert_params(self, local_index: int) -> list[torch.nn.Parameter]:
        params = dict(self.experts.named_parameters())
        return [params[p.format(local_index)] for p in self._patterns]

    def _expert_forward(self, weights, x, probs):
        if self._bias:
            w1, b1, w2, b2 = weights
        else:
            (w1, w2), b1, b2 = weights, None, None
        h = F.linear(x, w1, b1)
        if self.config.use_te_activation_func:  # TE's activation module
            h = self.experts.activation_func(h)
        else:
            h = mlp_activation(self.config, h)
        h = (h * probs.unsqueeze(-1)).to(h.dtype)
        y = F.linear(h, w2)
        if b2 is not None:  # TEGroupedMLP._apply_bias: the bias is scaled by the probs too
            y = y + (b2.unsqueeze(0) * probs.unsqueeze(-1)).to(y.dtype)
        return y


def expert_layout(experts: torch.nn.Module) -> ExpertLayout:
    """The layout adapter for a MoE layer's ``experts`` module."""
    if isinstance(experts, SequentialMLP):
        return SequentialLayout(experts)
    if type(experts).__name__ == "TEGroupedMLP":
        return TEGroupedLayout(experts)
    raise ValueError(f"no expert layout for {type(experts).__name__} (shadow experts support "
                     "SequentialMLP, GroupedGemmExperts and TEGroupedMLP)")
