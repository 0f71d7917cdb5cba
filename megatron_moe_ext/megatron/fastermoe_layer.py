"""The FasterMoE expert layer as a megatron-core MoELayer subclass.

What stays Megatron's: the router (TopKRouter with all its routing / aux-loss / capacity
options), the expert module (SequentialMLP: same parameter names and layout, so checkpoints
cross over between ``moe.impl`` values), the local permutation before dispatch and the
un-permutation after combine.

What changes: the all-to-all -> experts -> all-to-all middle is replaced by
:func:`megatron_moe_ext.core.exchange.smart_exchange`, the grouped pairwise exchange whose
send / compute / return steps overlap (forward and backward).

Notation: T routed token copies on this rank, E experts, E_l = E / W local experts,
W expert-parallel workers, H hidden size.
"""

from __future__ import annotations

import logging
import os
from typing import Optional

import torch
import torch.distributed as dist
from megatron.core.transformer.moe.moe_layer import MoELayer, MoESubmodules
from megatron.core.transformer.moe.token_dispatcher import MoEAlltoAllTokenDispatcher
from megatron.core.transformer.transformer_config import TransformerConfig

from megatron_moe_ext.config import MoEConfig
from megatron_moe_ext.core.exchange import smart_exchange
from megatron_moe_ext.core.trace import Tracer

logger = logging.getLogger(__name__)


class CountsDispatcher(MoEAlltoAllTokenDispatcher):
    """The alltoall dispatcher's local permutation, plus the all-gathered routing counts.

    `preprocess` replaces the split-size bookkeeping of the stock dispatcher (which the smart
    schedule does not use) by one all-gather of each rank's tokens-per-expert row, giving the
    [W, E] count matrix every rank needs to plan the exchange (and, later, to pick shadows).
    """

    counts: Optional[torch.Tensor] = None
    """[W, E] int64 on the CPU: tokens worker w sends to expert e, this iteration."""

    def preprocess(self, routing_map: torch.Tensor) -> torch.Tensor:
        local = routing_map.sum(dim=0).long()  # [E]
        if self.config.moe_expert_capacity_factor is not None:
            self.num_out_tokens = local.sum()
        else:
            self.num_out_tokens = routing_map.size(0) * self.config.moe_router_topk
        gathered = torch.empty(self.ep_size * local.numel(), dtype=local.dtype, device=local.device)
        dist.all_gather_into_tensor(gathered, local.contiguous(), group=self.ep_group)
        self.counts = gathered.view(self.ep_size, -1).cpu()
        first = self.local_expert_indices[0]
        local_cols = self.counts[:, first : first + self.num_local_experts]
        # Kept for the stock bookkeeping that dispatch_preprocess still touches.
        self.num_global_tokens_per_local_expert = local_cols
        return local_cols.sum(dim=0)


class FasterMoELayer(MoELayer):
    """MoELayer whose dispatch / expert compute / combine run as the FasterMoE smart schedule."""

    def __init__(
        self,
        config: TransformerConfig,
        submodules: Optional[MoESubmodules] = None,
        layer_number: Optional[int] = None,
        pg_collection=None,
        moe_options: Optional[MoEConfig] = None,
    ) -> None:
        super().__init__(
            config=config, submodules=submodules, layer_number=layer_number, pg_collection=pg_collection
        )
        if config.moe_token_dispatcher_type != "alltoall":
            raise ValueError("FasterMoELayer needs moe_token_dispatcher_type='alltoall'")
        if config.moe_pad_expert_input_to_capacity:
            raise ValueError("FasterMoELayer does not support moe.pad_to_capacity")
        if self.tp_group.size() > 1 or self.experts.tp_group.size() > 1:
            raise ValueError("FasterMoELayer supports tensor / expert-tensor parallel size 1 only")
        if self.use_shared_expert:
            raise ValueError("FasterMoELayer does not support shared experts")
        self.options = moe_options or MoEConfig(impl="fastermoe")
        self.token_dispatcher = CountsDispatcher(
            self.num_local_experts, self.local_expert_indices, config=config, pg_collection=pg_collection
        )
        self.group_size = min(self.options.fastermoe.group_size, self.ep_group.size())
        if self.ep_group.size() % self.group_size:
            raise ValueError(
                f"moe.fastermoe.group_size={self.group_size} must divide the expert-parallel "
                f"size {self.ep_group.size()}"
            )
        self.tracer: Optional[Tracer] = None
        if self.options.fastermoe.trace:
            self.tracer = Tracer(rank=dist.get_rank(), cuda_sync=torch.cuda.is_available())

    # The stock forward calls dispatch -> routed_experts_compute -> combine; the whole exchange
    # happens in routed_experts_compute, so dispatch and combine are identities.
    def dispatch(self, hidden_states: torch.Tensor, probs: torch.Tensor):
        """No communication here: the smart schedule sends tokens step by step."""
        return hidden_states, probs

    def _expert_fn(self, x: torch.Tensor, p: torch.Tensor, tokens_per_expert: list[int]):
        out, bias = self.experts(x, torch.tensor(tokens_per_expert, dtype=torch.long), p)
        assert bias is None
        return out

    def routed_experts_compute(self, hidden_states: torch.Tensor, probs: torch.Tensor):
        """Grouped pairwise exchange with overlapped send / compute / return steps."""
        counts = self.token_dispatcher.counts
        output = smart_exchange(
            hidden_states,
            probs,
            counts,
            self._expert_fn,
            list(self.experts.parameters()),
            group=self.ep_group,
            group_size=self.group_size,
            tracer=self.tracer,
        )
        return output, None

    def combine(self, output: torch.Tensor):
        """Outputs already came back with the return steps."""
        return output

    def write_trace(self, directory: str) -> Optional[str]:
        """Write this layer's Chrome trace (if tracing) as <dir>/rank<r>_layer<l>.json."""
        if self.tracer is None:
            return None
        os.makedirs(directory, exist_ok=True)
        path = os.path.join(directory, f"rank{dist.get_rank()}_layer{self.layer_number}.json")
        self.tracer.write_chrome_trace(path)
        return path
