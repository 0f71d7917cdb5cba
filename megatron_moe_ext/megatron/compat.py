"""Fixes for megatron-core behaviour that is wrong on any device (not CPU-specific).

Each patch names the bug and the versions it was seen in, is idempotent, and leaves
megatron-core untouched where the bug does not apply. The CPU-only answers to CUDA
assumptions live in megatron_moe_ext/runtime/cpu.py instead.
"""

from __future__ import annotations

import functools
import logging

logger = logging.getLogger(__name__)

_applied: set[str] = set()


def patch_distributed_optimizer_load() -> None:
    """megatron-core 0.16.1, DistributedOptimizer with torch Adam (no apex / TE): the
    `fully_reshardable` checkpoint format stores no per-parameter `step`, but
    `_set_main_param_and_optimizer_states` copies every key of the live optimizer state, so
    loading raises KeyError 'step'. Keep the live step for such checkpoints (the true step is
    restored afterwards from the saved param_groups, see training/checkpoint.py)."""
    if "distrib_optimizer_step" in _applied:
        return
    from megatron.core.optimizer.distrib_optimizer import DistributedOptimizer

    original = DistributedOptimizer._set_main_param_and_optimizer_states

    @functools.wraps(original)
    def _set_states(self, model_param, tensors):
        if "step" not in tensors and not self.config.use_precision_aware_optimizer_no_fp8_or_ds_fp8:
            group_index, group_order = self.model_param_group_index_map[model_param]
            main_param = self.optimizer.param_groups[group_index]["params"][group_order]
            live = self.optimizer.state.get(main_param, {})
            if "step" in live:
                tensors = dict(tensors, step=live["step"])
        return original(self, model_param, tensors)

    DistributedOptimizer._set_main_param_and_optimizer_states = _set_states
    _applied.add("distrib_optimizer_step")
