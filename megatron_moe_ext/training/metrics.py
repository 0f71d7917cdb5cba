"""Training metrics: per-MoE-layer expert load, and the writers (JSON lines, tensorboard, wandb).

Notation: L MoE layers on this pipeline stage, E experts per layer.
"""

from __future__ import annotations

import json
import logging
import math
import os
import time
from collections import deque
from pathlib import Path
from typing import Any, Callable, Optional

import torch
import torch.distributed as dist

from megatron_moe_ext.config import Config, ConfigError

logger = logging.getLogger(__name__)



def merge_over_pipeline(per_layer: dict[str, Any], pp_group) -> dict[str, Any]:
    """Union of every pipeline stage's per-layer records (each stage holds its own layers)."""
    if pp_group is None or dist.get_world_size(pp_group) < 2:
        return per_layer
    gathered: list[Any] = [None] * dist.get_world_size(pp_group)
    dist.all_gather_object(gathered, per_layer, group=pp_group)
    return {k: v for part in gathered for k, v in part.items()}


class ExpertLoadTracker:
    """Counts routed tokens per expert for every MoE layer through forward hooks on the routers.

    Counts accumulate over the micro-batches of the iterations since the last collect;
    :meth:`count_matrices` all-gathers this rank's rows over the expert-parallel group,
    :meth:`collect` sums them over `group` (the ranks that see different tokens of the same
    layers), both per iteration, and resets.
    """

    def __init__(self, model_chunks: list[torch.nn.Module], num_experts: int) -> None:
        from megatron.core.transformer.moe.moe_layer import MoELayer

        self.num_experts = num_experts
        self.counts: dict[int, torch.Tensor] = {}
        self._handles = []
        for chunk in model_chunks:
            for module in chunk.modules():
                if isinstance(module, MoELayer):  # stock and FasterMoE layers alike
                    self._handles.append(module.router.register_forward_hook(self._hook))

    def _hook(self, module: torch.nn.Module, args: Any, output: Any) -> None:
        if not torch.is_grad_enabled() and module.training:
            return  # activation recomputation replays the router; count it once
        _, routing_map = output
        layer = int(module.layer_number)
        c = routing_map.detach().sum(dim=0).to(torch.float64).cpu()
        self.counts[layer] = self.counts.get(layer, torch.zeros_like(c)) + c

    def count_matrices(self, ep_group: Optional[dist.ProcessGroup], window: int
                       ) -> dict[int, torch.Tensor]:
        """{layer: [W, E] float64 tokens per iteration that EP rank w routed to expert e}: this
        rank's rows all-gathered over `ep_group` (one collective for all layers), averaged over
        the `window` iterations since the last collect. Call before :meth:`collect`."""
        layers = sorted(self.counts)
        if not layers:
            return {}
        local = torch.stack([self.counts[k] for k in layers]) / max(1, window)  # [L, E]
        W = 1 if ep_group is None else dist.get_world_size(ep_group)
        if W > 1:
            parts = [torch.empty_like(local) for _ in range(W)]
            dist.all_gather(parts, local.contiguous(), group=ep_group)
            full = torch.stack(parts, dim=1)  # [L, W, E]
        else:
            full = local.unsqueeze(1)
        return {k: full[i] for i, k in enumerate(layers)}

    def collect(self, group: Optional[dist.ProcessGroup], pp_group: Optional[dist.ProcessGroup],
                window: int = 1):
        """{layer: {max, mean, max_over_mean}} per iteration (mean over the `window` iterations
        since the last collect), summed over `group` and gathered over pipeline."""
        layers = sorted(self.counts)
        stats: dict[int, dict[str, float]] = {}
        if layers:
            stacked = torch.stack([self.counts[k] for k in layers]) / max(1, window)
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
        return merge_over_pipeline(stats, pp_group)

    def remove(self) -> None:
        """Detach the hooks."""
        for h in self._handles:
            h.remove()


class LayerTimeTracker:
    """Measured forward+backward time of every MoE layer (host clock; on CUDA the layer's
    kernels are synchronised first), and for FasterMoE layers the shadowed experts and the
    performance model's predicted time, summed over the micro-batches of an iteration; with
    shadow prefetch also its figures (:func:`prefetch_summary`).

    Backward is timed from the arrival of the output gradient to the completion of the input
    gradient (tensor hooks), so it needs no module-level backward hooks.
    """

    def __init__(self, model_chunks: list[torch.nn.Module]) -> None:
        from megatron.core.transformer.moe.moe_layer import MoELayer

        self.measured: dict[int, float] = {}
        self.predicted: dict[int, list[Callable[[], Optional[float]]]] = {}
        self.shadows: dict[int, list[list[int]]] = {}
        self.prefetch: dict[int, list[dict]] = {}
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
        if getattr(module, "last_prefetch", None) is not None:
            self.prefetch.setdefault(layer, []).append(dict(module.last_prefetch))
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
        """{layer: {measured_s, predicted_s?, shadows?, prefetch_*?}} of this rank, then
        reset."""
        out: dict[int, dict[str, Any]] = {}
        for layer, seconds in self.measured.items():
            rec: dict[str, Any] = {"measured_s": seconds}
            predicted = [v for v in (f() for f in self.predicted.get(layer, [])) if v is not None]
            if predicted:
                rec["predicted_s"] = sum(predicted)
            if layer in self.shadows:
                rec["shadows"] = sorted({e for mb in self.shadows[layer] for e in mb})
            if layer in self.prefetch:
                rec.update(prefetch_summary(self.prefetch[layer]))
            out[layer] = rec
        self.measured.clear()
        self.predicted.clear()
        self.shadows.clear()
        self.prefetch.clear()
        return out


def prefetch_summary(calls: list[dict]) -> dict[str, Any]:
    """One layer's shadow-prefetch figures from its calls' ``FasterMoELayer.last_prefetch``:
    ``prefetch_hot_load_error`` (mean over the calls with a prediction, None without),
    ``prefetch_set_match`` (fraction of those calls whose prefetched set was the policy's set
    on the true counts), ``prefetch_used`` (fraction of all calls that used the prefetched
    set), ``prefetch_exposed_s`` (seconds waited for prefetched broadcasts, summed)."""
    predicted = [c for c in calls if c["hot_load_error"] is not None]
    n = len(predicted)
    return {
        "prefetch_hot_load_error": (sum(c["hot_load_error"] for c in predicted) / n
                                    if n else None),
        "prefetch_set_match": sum(bool(c["set_match"]) for c in predicted) / n if n else None,
        "prefetch_used": sum(bool(c["used"]) for c in calls) / max(1, len(calls)),
        "prefetch_exposed_s": sum(c["exposed_s"] or 0.0 for c in calls),
    }


class ImbalanceTracker:
    """Per MoE layer, at logging steps, what load imbalance cost (:mod:`.imbalance`): per EP rank
    its routed tokens, expert compute time and wait for the slowest rank, the layer's
    imbalance cost, the hot experts and the time shadowing won back.

    Forward expert compute is measured on every rank with hooks on the layer's local expert
    MLPs (SequentialMLP, both ``moe.impl`` values; FasterMoE's shadowed experts run the same MLP
    module functionally, so their local compute is timed too). Layers without per-expert modules
    (GroupedMLP) or ``logging.imbalance_source: estimated`` use the performance model instead.
    """

    def __init__(self, model_chunks: list[torch.nn.Module], cfg: Config) -> None:
        from megatron.core.transformer.moe.moe_layer import MoELayer

        self.layers: dict[int, torch.nn.Module] = {}
        self.fwd_s: dict[int, float] = {}
        self._start: dict[int, float] = {}
        self._handles = []
        timed = True
        for chunk in model_chunks:
            for module in chunk.modules():
                if not isinstance(module, MoELayer):
                    continue
                layer = int(module.layer_number)
                self.layers[layer] = module
                experts = getattr(module.experts, "local_experts", None)
                if experts is None:
                    timed = False
                    continue
                for mlp in experts:
                    self._handles.append(mlp.register_forward_pre_hook(self._pre_hook(layer)))
                    self._handles.append(mlp.register_forward_hook(self._post_hook(layer)))
        source = cfg.logging.imbalance_source
        if source == "measured" and not timed:
            raise ConfigError("logging.imbalance_source: measured needs per-expert modules "
                             "(SequentialMLP); this model's experts are grouped: use auto or "
                             "estimated")
        self.measure = timed and source in ("auto", "measured")
        self.top = cfg.logging.hot_experts
        self.group_size = cfg.moe.fastermoe.group_size
        self.cluster = cfg.moe.fastermoe.cluster
        self._consts: Optional[dict[str, Any]] = None

    def _pre_hook(self, layer: int):
        def hook(module: torch.nn.Module, args: Any) -> None:
            if module.training:
                self._start[layer] = LayerTimeTracker._now()
        return hook

    def _post_hook(self, layer: int):
        def hook(module: torch.nn.Module, args: Any, output: Any) -> None:
            start = self._start.pop(layer, None)
            if start is not None:
                self.fwd_s[layer] = self.fwd_s.get(layer, 0.0) + LayerTimeTracker._now() - start
        return hook

    def _constants(self, num_workers: int) -> dict[str, Any]:
        """H, alpha, dtype and the cluster's topology / GEMM rate for the performance model."""
        if self._consts is None or self._consts["W"] != num_workers:
            from megatron_moe_ext.megatron.fastermoe_layer import DEFAULT_CLUSTER, ep_topology

            module = next(iter(self.layers.values()))
            params = list(module.experts.parameters())
            H = module.config.hidden_size
            numel = sum(p.numel() for p in params) / max(1, module.num_local_experts)
            dtype = {torch.bfloat16: "bf16", torch.float16: "bf16"}.get(params[0].dtype, "fp32")
            topology = ep_topology(self.cluster or DEFAULT_CLUSTER, num_workers)
            if dtype not in topology.spec.gemm_tflops:
                dtype = "fp32"
            self._consts = dict(
                W=num_workers, H=H, alpha=numel / (2.0 * H * H), dtype=dtype,
                dtype_bytes=params[0].element_size(), topology=topology,
                gemm=topology.gemm_throughput(dtype),
            )
        return self._consts

    def collect(self, matrices: dict[int, torch.Tensor], ep_group: Optional[dist.ProcessGroup],
                pp_group: Optional[dist.ProcessGroup], window: int) -> dict[int, dict[str, Any]]:
        """{layer: imbalance record (+ ``expert_tokens`` [E])} from the [W, E] count matrices
        of :meth:`ExpertLoadTracker.count_matrices`, gathered over pipeline stages; resets."""
        from megatron_moe_ext.training.imbalance import imbalance_record

        layers = sorted(matrices)
        out: dict[int, dict[str, Any]] = {}
        if layers:
            W = matrices[layers[0]].shape[0]
            fwd = torch.tensor([[self.fwd_s.get(k, 0.0) / max(1, window) for k in layers]],
                               dtype=torch.float64)  # [1, L]
            if W > 1:
                parts = [torch.empty_like(fwd) for _ in range(W)]
                dist.all_gather(parts, fwd, group=ep_group)
                fwd = torch.cat(parts)  # [W, L]
            c = self._constants(W)
            for i, k in enumerate(layers):
                counts = matrices[k].numpy()
                rec = imbalance_record(
                    counts, c["H"], c["alpha"], c["gemm"],
                    shadows=getattr(self.layers.get(k), "last_shadows", None) or (),
                    measured_fwd_s=fwd[:, i].tolist() if self.measure else None,
                    topology=c["topology"], dtype=c["dtype"], dtype_bytes=c["dtype_bytes"],
                    group_size=self.group_size, top=self.top,
                )
                rec["expert_tokens"] = [float(x) for x in counts.sum(axis=0)]
                out[k] = rec
        self.fwd_s.clear()
        self._start.clear()
        return merge_over_pipeline(out, pp_group)

    def reset(self) -> None:
        """Drop what was measured (after evaluation)."""
        self.fwd_s.clear()
        self._start.clear()


class Progress:
    """Remaining-time estimate from the last `window` iteration times."""

    def __init__(self, window: int = 20) -> None:
        self.times: deque[float] = deque(maxlen=window)

    def add(self, seconds: float) -> None:
        """Record one iteration's wall time."""
        self.times.append(seconds)

    def eta_s(self, remaining_iters: int) -> float:
        """Seconds left for `remaining_iters` at the recent mean iteration time."""
        if not self.times:
            return math.nan
        return max(0, remaining_iters) * sum(self.times) / len(self.times)


def format_duration(seconds: float) -> str:
    """1h02m, 1m12s, 42s (``?`` when unknown)."""
    if not math.isfinite(seconds):
        return "?"
    s = int(round(seconds))
    if s >= 3600:
        return f"{s // 3600}h{(s % 3600) // 60:02d}m"
    if s >= 60:
        return f"{s // 60}m{s % 60:02d}s"
    return f"{s}s"


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
            import wandb  # config validation checked that it is importable
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
