"""Training metrics: per-MoE-layer expert load, and the writers (JSON lines, tensorboard, wandb).

Notation: L MoE layers on this pipeline stage, E experts per layer.
"""

from __future__ import annotations

import json
import logging
import os
import time
from pathlib import Path
from typing import Any, Callable, Optional

import torch
import torch.distributed as dist

from megatron_moe_ext.config import Config

logger = logging.getLogger(__name__)


class ExpertLoadTracker:
    """Counts routed tokens per expert for every MoE layer through forward hooks on the routers.

    Counts accumulate over the micro-batches of one iteration; :meth:`collect` sums them over
    `group` (the ranks that see different tokens of the same layers) and resets.
    """

    def __init__(self, model_chunks: list[torch.nn.Module], num_experts: int) -> None:
        self.num_experts = num_experts
        self.counts: dict[int, torch.Tensor] = {}
        self._handles = []
        for chunk in model_chunks:
            for name, module in chunk.named_modules():
                if name.endswith("mlp.router") and hasattr(module, "layer_number"):
                    self._handles.append(module.register_forward_hook(self._hook))

    def _hook(self, module: torch.nn.Module, args: Any, output: Any) -> None:
        if not torch.is_grad_enabled() and module.training:
            return  # activation recomputation replays the router; count it once
        _, routing_map = output
        layer = int(module.layer_number)
        c = routing_map.detach().sum(dim=0).to(torch.float64).cpu()
        self.counts[layer] = self.counts.get(layer, torch.zeros_like(c)) + c

    def collect(self, group: Optional[dist.ProcessGroup], pp_group: Optional[dist.ProcessGroup]):
        """{layer: {max, mean, max_over_mean}} summed over `group` and gathered over pipeline."""
        layers = sorted(self.counts)
        stats: dict[int, dict[str, float]] = {}
        if layers:
            stacked = torch.stack([self.counts[k] for k in layers])
            if group is not None and dist.get_world_size(group) > 1:
                dist.all_reduce(stacked, group=group)
            for k, row in zip(layers, stacked):
                mean = float(row.mean())
                stats[k] = {
                    "max_tokens": float(row.max()),
                    "mean_tokens": mean,
                    "max_over_mean": float(row.max()) / mean if mean > 0 else 0.0,
                }
        self.counts.clear()
        if pp_group is not None and dist.get_world_size(pp_group) > 1:
            gathered: list[Any] = [None] * dist.get_world_size(pp_group)
            dist.all_gather_object(gathered, stats, group=pp_group)
            stats = {k: v for part in gathered for k, v in part.items()}
        return stats

    def remove(self) -> None:
        """Detach the hooks."""
        for h in self._handles:
            h.remove()


class LayerTimeTracker:
    """Measured forward+backward time of every MoE layer (host clock; on CUDA the layer's
    kernels are synchronised first), and for FasterMoE layers the shadowed experts and the
    performance model's predicted time, summed over the micro-batches of an iteration.

    Backward is timed from the arrival of the output gradient to the completion of the input
    gradient (tensor hooks), so it needs no module-level backward hooks.
    """

    def __init__(self, model_chunks: list[torch.nn.Module]) -> None:
        from megatron.core.transformer.moe.moe_layer import MoELayer

        self.measured: dict[int, float] = {}
        self.predicted: dict[int, list[Callable[[], Optional[float]]]] = {}
        self.shadows: dict[int, list[list[int]]] = {}
        self._handles = []
        self._start: dict[int, float] = {}
        for chunk in model_chunks:
            for module in chunk.modules():
                if isinstance(module, MoELayer):
                    self._handles.append(module.register_forward_pre_hook(self._pre))
                    self._handles.append(module.register_forward_hook(self._post))

    @staticmethod
    def _now() -> float:
        if torch.cuda.is_available():
            torch.cuda.synchronize()
        return time.perf_counter()

    def _add(self, layer: int, seconds: float) -> None:
        self.measured[layer] = self.measured.get(layer, 0.0) + seconds

    def _pre(self, module: torch.nn.Module, args: Any) -> None:
        self._start[id(module)] = self._now()
        hidden = args[0] if args else None
        if torch.is_tensor(hidden) and hidden.requires_grad and torch.is_grad_enabled():
            layer = int(module.layer_number)
            marks: dict[str, float] = {}
            module._bwd_marks = marks  # read by the output hook below

            def _input_grad_done(grad):
                if "start" in marks:
                    self._add(layer, self._now() - marks.pop("start"))
                return grad

            hidden.register_hook(_input_grad_done)

    def _post(self, module: torch.nn.Module, args: Any, output: Any) -> None:
        layer = int(module.layer_number)
        self._add(layer, self._now() - self._start.pop(id(module), self._now()))
        if getattr(module, "last_shadows", None) is not None:
            self.shadows.setdefault(layer, []).append(list(module.last_shadows))
        deferred = getattr(module, "deferred_predicted_s", None)  # evaluated in collect()
        if deferred is not None:
            self.predicted.setdefault(layer, []).append(deferred())
        out = output[0] if isinstance(output, tuple) else output
        marks = getattr(module, "_bwd_marks", None)
        if marks is not None and torch.is_tensor(out) and out.requires_grad:

            def _output_grad_arrived(grad):
                marks["start"] = self._now()
                return grad

            out.register_hook(_output_grad_arrived)

    def collect(self) -> dict[int, dict[str, Any]]:
        """{layer: {measured_s, predicted_s?, shadows?}} of this rank, then reset."""
        out: dict[int, dict[str, Any]] = {}
        for layer, seconds in self.measured.items():
            rec: dict[str, Any] = {"measured_s": seconds}
            predicted = [v for v in (f() for f in self.predicted.get(layer, [])) if v is not None]
            if predicted:
                rec["predicted_s"] = sum(predicted)
            if layer in self.shadows:
                rec["shadows"] = sorted({e for mb in self.shadows[layer] for e in mb})
            out[layer] = rec
        self.measured.clear()
        self.predicted.clear()
        self.shadows.clear()
        return out


def collect_aux_losses(
    group: Optional[dist.ProcessGroup], pp_group: Optional[dist.ProcessGroup], num_microbatches: int
) -> dict[str, list[float]]:
    """Megatron's per-layer aux-loss tracker, averaged over micro-batches and `group`, then
    cleared. Returns {loss name: [value per layer]}."""
    from megatron.core.transformer.moe.moe_utils import (
        clear_aux_losses_tracker,
        get_moe_layer_wise_logging_tracker,
    )

    tracker = get_moe_layer_wise_logging_tracker()
    out: dict[str, list[float]] = {}
    for name in sorted(tracker):
        values = tracker[name]["values"].detach().float().clone()
        if pp_group is not None and dist.get_world_size(pp_group) > 1:
            dist.all_reduce(values, group=pp_group)  # each stage fills its own layers
        if group is not None and dist.get_world_size(group) > 1:
            dist.all_reduce(values, group=group)
            values /= dist.get_world_size(group)
        out[name] = (values / max(1, num_microbatches)).tolist()
    clear_aux_losses_tracker()
    return out


class MetricsWriter:
    """Rank-0 sink for one record per logged iteration: JSON lines + tensorboard + wandb."""

    def __init__(self, cfg: Config, enabled: bool) -> None:
        self.enabled = enabled
        self.path = Path(cfg.logging.metrics_file or os.path.join(cfg.logging.dir, "metrics.jsonl"))
        self._tb = None
        self._wandb = None
        if not enabled:
            return
        self.path.parent.mkdir(parents=True, exist_ok=True)
        if cfg.logging.tensorboard:
            from torch.utils.tensorboard import SummaryWriter

            self._tb = SummaryWriter(log_dir=os.path.join(cfg.logging.dir, "tensorboard"))
        if cfg.logging.wandb.enabled:
            try:
                import wandb
            except ImportError as exc:  # pragma: no cover - optional extra
                raise RuntimeError(
                    "logging.wandb.enabled: true needs wandb (pip install 'megatron-moe-ext[wandb]')"
                ) from exc
            self._wandb = wandb.init(
                project=cfg.logging.wandb.project,
                name=cfg.logging.wandb.name,
                mode=cfg.logging.wandb.mode,
                dir=cfg.logging.dir,
                config=_plain(cfg),
            )

    def write(self, record: dict[str, Any]) -> None:
        """Append one record (flat scalars plus nested per-layer dicts)."""
        if not self.enabled:
            return
        with self.path.open("a") as f:
            f.write(json.dumps(record) + "\n")
        scalars = dict(_flatten(record))
        step = int(record["iteration"])
        if self._tb is not None:
            for k, v in scalars.items():
                if k != "iteration":
                    self._tb.add_scalar(k, v, step)
            self._tb.flush()
        if self._wandb is not None:
            self._wandb.log(scalars, step=step)

    def close(self) -> None:
        """Flush and close the writers."""
        if self._tb is not None:
            self._tb.close()
        if self._wandb is not None:
            self._wandb.finish()


def _plain(cfg: Config) -> dict:
    import dataclasses

    return dataclasses.asdict(cfg)


def _flatten(d: dict[str, Any], prefix: str = ""):
    for k, v in d.items():
        key = f"{prefix}{k}"
        if isinstance(v, dict):
            yield from _flatten(v, key + "/")
        elif isinstance(v, (list, tuple)):
            for i, x in enumerate(v):
                if isinstance(x, (int, float)):
                    yield f"{key}/{i}", float(x)
        elif isinstance(v, (int, float)) and not isinstance(v, bool):
            yield key, float(v)
