"""Recording routing traces from training (``logging.routing_trace: true``).

Notation: L MoE layers (this pipeline stage), E experts, W data-parallel ranks (rows),
T tokens of a micro-batch on one rank, k top-k, t recorded tokens per rank.

:class:`RoutingTraceRecorder` puts a forward hook on every MoE router (stock Megatron and
FasterMoE layers share Megatron's router, so both ``moe.impl`` values are covered). The hook
adds ``routing_map.sum(0)`` ([E] counts) to a per-layer accumulator that is reset at the first
micro-batch of every iteration, so at the logging step the accumulators hold exactly the
counts of the iteration that just finished. :meth:`record` all-gathers them over the
data-parallel group (one ``all_gather`` of L * E int64 per logged iteration) and rank 0
appends one record to ``<logging.dir>/routing_trace.bin`` (see :mod:`.trace`).

Activation recomputation replays the router without gradients and evaluation runs it in eval
mode; neither is counted.
"""

from __future__ import annotations

import logging
import time
from pathlib import Path
from typing import Any, Optional

import numpy as np
import torch
import torch.distributed as dist

from .trace import TRACE_FILE, TraceHeader, TraceWriter

logger = logging.getLogger(__name__)


class RoutingTraceRecorder:
    """Per-iteration [W, E] routing counts of every MoE layer, written at logging steps."""

    def __init__(self, model_chunks: list[torch.nn.Module], run_dir: str | Path,
                 group: Optional[dist.ProcessGroup], num_microbatches: int, topk: int,
                 ep_size: int, meta: Optional[dict[str, Any]] = None,
                 choice_tokens: int = 0) -> None:
        """Hook the routers of ``model_chunks``; rank 0 of ``group`` writes the trace.

        ``group``: the ranks routing different tokens through the same layers (the
        data-parallel group; None: a single process). ``choice_tokens``: also record the
        experts chosen by the first t tokens of each rank's first micro-batch.
        """
        self.num_microbatches = int(num_microbatches)
        self.group = group
        self.choice_tokens = int(choice_tokens)
        self.topk = int(topk)
        self._acc: dict[int, torch.Tensor] = {}
        self._calls: dict[int, int] = {}
        self._choices: dict[int, torch.Tensor] = {}
        self._handles = []
        self.overhead_s = 0.0
        """Host seconds spent in the hooks and :meth:`record` (the recorder's own cost)."""
        num_experts = None
        for chunk in model_chunks:
            for name, module in chunk.named_modules():
                if name.endswith("mlp.router") and hasattr(module, "layer_number"):
                    self._handles.append(module.register_forward_hook(self._hook))
                    self._calls[int(module.layer_number)] = 0
                    num_experts = int(module.config.num_moe_experts)
        if not self._handles or num_experts is None:
            raise ValueError("logging.routing_trace: the model has no MoE router to record")
        self.layers = tuple(sorted(self._calls))
        self.num_experts = num_experts
        world = dist.get_world_size(group) if group is not None else 1
        self.rank = dist.get_rank(group) if group is not None else 0
        self.header = TraceHeader(num_workers=world, num_experts=num_experts, layers=self.layers,
                                  topk=self.topk, ep_size=int(ep_size), meta=dict(meta or {}))
        self.path = Path(run_dir) / TRACE_FILE
        self._writer = TraceWriter(self.path, self.header) if self.rank == 0 else None
        if self.rank == 0:
            logger.info("routing trace: %d MoE layers x [%d, %d] counts per logged iteration "
                        "-> %s", len(self.layers), world, num_experts, self.path)

    def _hook(self, module: torch.nn.Module, args: Any, output: Any) -> None:
        """Accumulate one micro-batch's per-expert counts (reset at an iteration's first)."""
        if not module.training or not torch.is_grad_enabled():
            return  # evaluation, or activation recomputation replaying the router
        t0 = time.perf_counter()
        layer = int(module.layer_number)
        routing_map = output[1].detach()
        c = routing_map.sum(dim=0, dtype=torch.int64)
        first = self._calls[layer] % self.num_microbatches == 0
        self._calls[layer] += 1
        if first:
            self._acc[layer] = c
            if self.choice_tokens:
                self._choices[layer] = _choices(routing_map, self.choice_tokens, self.topk)
        else:
            self._acc[layer] = self._acc[layer] + c
        self.overhead_s += time.perf_counter() - t0

    def record(self, iteration: int) -> None:
        """Gather the last iteration's counts over the group; rank 0 appends a record.

        Every rank of the group must call it (it is a collective).
        """
        t0 = time.perf_counter()
        try:
            self._record(iteration)
        finally:
            self.overhead_s += time.perf_counter() - t0
        logger.debug("routing trace: iteration %d recorded (recorder time so far %.1f ms)",
                     iteration, 1e3 * self.overhead_s)

    def _record(self, iteration: int) -> None:
        """:meth:`record` without the timing."""
        missing = [k for k in self.layers if k not in self._acc]
        if missing:
            raise RuntimeError(f"routing trace: layers {missing} were not run this iteration")
        local = torch.stack([self._acc[k] for k in self.layers])  # [L, E]
        parts = [local]
        if self.choice_tokens:
            parts.append(torch.stack([self._choices[k] for k in self.layers]).reshape(
                len(self.layers), -1).to(local.device))
        flat = torch.cat([p.reshape(-1) for p in parts])
        if self.group is not None and dist.get_world_size(self.group) > 1:
            gathered = [torch.empty_like(flat) for _ in range(dist.get_world_size(self.group))]
            dist.all_gather(gathered, flat, group=self.group)
        else:
            gathered = [flat]
        if self._writer is None:
            return
        rows = torch.stack(gathered).cpu().numpy()  # [W, L*E (+ L*t*k)]
        L, E, W = len(self.layers), self.num_experts, rows.shape[0]
        counts = rows[:, :L * E].reshape(W, L, E).transpose(1, 0, 2)
        choices = None
        if self.choice_tokens:
            choices = rows[:, L * E:].reshape(W, L, self.choice_tokens, self.topk)
            choices = choices.transpose(1, 0, 2, 3)
        self._writer.append(iteration, np.ascontiguousarray(counts), choices)

    def close(self) -> None:
        """Remove the hooks and close the file."""
        for h in self._handles:
            h.remove()
        self._handles.clear()
        if self._writer is not None:
            self._writer.close()


def _choices(routing_map: torch.Tensor, tokens: int, topk: int) -> torch.Tensor:
    """[t, k] experts chosen by the first ``tokens`` rows of a routing map (-1 pads a token
    with fewer than k experts, e.g. after capacity dropping; fewer rows are padded with -1)."""
    rm = routing_map[:tokens]
    out = torch.full((tokens, topk), -1, dtype=torch.int64, device=rm.device)
    if rm.numel():
        val, idx = torch.topk(rm.to(torch.int8), topk, dim=1, sorted=False)
        idx = torch.where(val > 0, idx, torch.full_like(idx, -1))
        idx, _ = torch.sort(idx, dim=1, descending=True)
        out[:rm.shape[0]] = idx
    return out


def recorder_from_config(cfg: Any, model_chunks: list[torch.nn.Module],
                         group: Optional[dist.ProcessGroup],
                         num_microbatches: int) -> Optional[RoutingTraceRecorder]:
    """The recorder ``cfg.logging.routing_trace`` asks for, or None when it is off.

    Pipeline parallelism is refused (each stage has other layers; not supported yet).
    """
    if not cfg.logging.routing_trace:
        return None
    if cfg.parallel.pipeline > 1:
        raise ValueError("logging.routing_trace: pipeline parallel > 1 is not supported yet "
                         "(set parallel.pipeline: 1 or logging.routing_trace: false)")
    meta = {
        "hidden_size": cfg.model.hidden_size,
        "ffn_hidden_size": cfg.moe.ffn_hidden_size or cfg.model.ffn_hidden_size,
        "activation": cfg.model.activation, "precision": cfg.train.precision,
        "moe_impl": cfg.moe.impl, "seq_length": cfg.model.seq_length,
        "micro_batch_size": cfg.train.micro_batch_size, "num_microbatches": num_microbatches,
        "num_layers": cfg.model.num_layers,
    }
    return RoutingTraceRecorder(model_chunks, cfg.logging.dir, group, num_microbatches,
                                cfg.moe.topk, cfg.parallel.expert, meta,
                                cfg.logging.routing_trace_tokens)
