"""The two implementations of one MoE layer's expert part in the scale lab, per rank: synchronous
EP (:func:`.baseline.sync_exchange`) and the product's FasterMoE path (smart exchange, shadow
experts, shadow prefetch), plus the small real expert of ``compute="real"``.

Notation: T tokens per worker (before top-k), E experts, E_l = E / W per worker, H hidden,
F ffn hidden size, W workers, g group size.
"""

from __future__ import annotations

import time
from typing import TYPE_CHECKING, Optional

import numpy as np
import torch
import torch.distributed as dist

from ..core.exchange import Shadows, smart_exchange
from ..core.prefetch import use_prefetched
from ..core.shadow import PendingBroadcast, start_broadcast
from .accelerator import SleepStats, sleep_until
from .baseline import sync_exchange
from .setup import predict, select_shadows

if TYPE_CHECKING:
    from .run import LabConfig

__all__ = ["TORCH_DTYPES", "RealExperts", "LabLayer"]

TORCH_DTYPES = {"fp32": torch.float32, "bf16": torch.bfloat16}
"""torch dtype of each ``--dtype``."""


class RealExperts:
    """A small real expert per local expert: y = p * ((x W1^T) W2), W1 [F, H], W2 [F, H]
    (no activation; 2 F H parameters per expert like an MLP expert), deterministic weights."""

    def __init__(self, num_local: int, hidden: int, ffn: int, dtype: torch.dtype, seed: int,
                 first_expert: int) -> None:
        self.params = []
        for e in range(num_local):
            gen = torch.Generator().manual_seed(seed * 7919 + first_expert + e)
            w = (torch.randn(2 * ffn, hidden, generator=gen) / hidden ** 0.5).to(dtype)
            self.params.append(w.requires_grad_(True))
        self.ffn = ffn
        self.stats = SleepStats(record=True)

    def mlp(self, w: torch.Tensor, x: torch.Tensor, p: torch.Tensor) -> torch.Tensor:
        """One expert on its tokens."""
        h = x @ w[: self.ffn].t()
        return (h @ w[self.ffn:]) * p.unsqueeze(-1).to(x.dtype)

    def expert_fn(self, x: torch.Tensor, p: torch.Tensor, tokens_per_expert) -> torch.Tensor:
        """``expert_fn`` of the exchange: local experts in order on their slices of x."""
        self.stats.add("fwd", x.shape[0], 0.0, 0.0)
        outs, off = [], 0
        for w, n in zip(self.params, tokens_per_expert):
            outs.append(self.mlp(w, x[off:off + n], p[off:off + n]))
            off += n
        return torch.cat(outs) if len(outs) > 1 else outs[0]

    def shadow_fn(self, weights, x: torch.Tensor, p: torch.Tensor) -> torch.Tensor:
        """A shadowed expert with its broadcast weights."""
        self.stats.add("fwd", x.shape[0], 0.0, 0.0)
        return self.mlp(weights[0], x, p)


class LabLayer:
    """The two implementations of one MoE layer's expert part on this rank."""

    def __init__(self, cfg: LabConfig, rank: int, world: int, topo, accel, group) -> None:
        self.cfg, self.rank, self.world, self.topo, self.accel = cfg, rank, world, topo, accel
        self.group = group
        self.e_l = cfg.experts // world
        self.order = topo.group_order(min(cfg.group_size, world))
        self.last_shadows: list[int] = []
        self.last_exposed_s = 0.0  # waited for shadow broadcasts in the latest fastermoe call
        self.last_prefetch: Optional[dict] = None
        self.dtype = TORCH_DTYPES[cfg.dtype]
        if isinstance(accel, RealExperts):
            self.expert_params = accel.params
        elif cfg.shadow != "never":
            # stand-in parameters of the local experts (2 F H elements each), broadcast at
            # their real size when shadowed
            self.expert_params = [torch.zeros(2 * cfg.ffn, cfg.hidden, dtype=self.dtype)
                                  for _ in range(self.e_l)]
        else:
            self.expert_params = []

    def gather_counts(self, row: np.ndarray) -> torch.Tensor:
        """The dispatcher's all-gather of every rank's tokens-per-expert row."""
        local = torch.as_tensor(row, dtype=torch.int64)
        out = [torch.empty_like(local) for _ in range(self.world)]
        dist.all_gather(out, local, group=self.group)
        return torch.stack(out)

    def attention(self) -> None:
        """The emulated block before the layer (``--attention``)."""
        if self.cfg.attention:
            sleep_until(time.perf_counter() + self.accel.forward_seconds(self.cfg.tokens))

    def megatron(self, x, p, row):
        self.attention()
        counts = self.gather_counts(row)
        return sync_exchange(x, p, counts, self.accel.expert_fn, self.group)

    def _select(self, counts: np.ndarray) -> list[int]:
        cfg = self.cfg
        return select_shadows(cfg.shadow, counts, self.topo, cfg.hidden, cfg.ffn, cfg.dtype,
                              min(cfg.group_size, self.world), cfg.shadow_max_experts)

    def _broadcast(self, order: list[int]) -> PendingBroadcast:
        tensors, owners = [], []
        for e in order:
            owner = e // self.e_l
            tensors.append(self.expert_params[e - self.rank * self.e_l] if owner == self.rank
                           else None)
            owners.append(owner)
        return start_broadcast(tensors, owners, [self.expert_params[0]] * len(order), self.group)

    def fastermoe(self, x, p, row, prefetch: Optional[tuple] = None):
        """FasterMoE; ``prefetch=(prediction [W, E] or None,)``: with shadow prefetch, by the
        layer's rule (core.prefetch.use_prefetched), the broadcast issued before
        :meth:`attention` and waited for at the shadow compute."""
        cfg = self.cfg
        g = min(cfg.group_size, self.world)
        predicted = pending = None
        if prefetch is not None and prefetch[0] is not None:
            predicted = self._select(prefetch[0])
            pending = self._broadcast(sorted(set(predicted))) if predicted else None
        self.attention()
        counts = self.gather_counts(row)
        c = counts.numpy()
        shadows = self._select(c)
        waited = [pending] if pending is not None else []
        self.last_prefetch = None
        if prefetch is not None:
            use = use_prefetched(predicted, shadows, lambda s: predict(
                c, self.topo, cfg.hidden, cfg.ffn, cfg.dtype, "smart", g, s).total_s,
                cfg.prefetch_slack)
            self.last_prefetch = {"used": use, "set_match": (predicted is not None and sorted(
                predicted) == sorted(shadows))}
            if use:
                shadows = predicted
            elif pending is not None:
                pending.wait()
                pending = None
        self.last_shadows = list(shadows)
        params = list(self.expert_params) if isinstance(self.accel, RealExperts) else []
        if not shadows:
            y = smart_exchange(x, p, counts, self.accel.expert_fn, params, group=self.group,
                               group_size=g, group_order=self.order)
            self.last_exposed_s = sum(w.waited_s for w in waited)
            return y
        order = sorted(set(shadows))
        if pending is None:  # blocking, as without prefetch
            pending = self._broadcast(order)
            pending.wait()
            waited.append(pending)
        accel = self.accel
        shadow = Shadows(weights={e: [w] for e, w in zip(order, pending.link())},
                         fn=lambda e, xs, ps, ws: accel.shadow_fn(ws, xs, ps), ready=pending.wait)
        # the owners' shadowed parameters get their gradient from the broadcast's backward
        mine = {e - self.rank * self.e_l for e in order if e // self.e_l == self.rank}
        params = [w for i, w in enumerate(params) if i not in mine]
        y = smart_exchange(x, p, counts, self.accel.expert_fn, params, group=self.group,
                           group_size=g, group_order=self.order, shadows=shadow)
        pending.wait()
        self.last_exposed_s = sum(w.waited_s for w in waited)
        return y
