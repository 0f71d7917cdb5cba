"""Build a stock Megatron MoELayer and a FasterMoELayer with identical weights, and force both to
route identically. Used by the equivalence tests and by scripts/bench_moe_layer.py.

Forced routing (what was chosen, and why)
-----------------------------------------
:func:`force_routing` wraps the layer's own ``TopKRouter.gating`` so that the logits it returns
are ``logits - logits.detach() + bias``: numerically exactly ``bias`` (x - x == 0 in IEEE
arithmetic), while the autograd graph still runs through Megatron's router weight (the derivative
of the wrapper w.r.t. the real logits is the identity). Everything after the gate stays
Megatron's: z-loss, top-k / score function, capacity dropping, the aux-loss autograd hook. The
router weight therefore still gets a gradient and the backward cost of routing is the real one.

``bias`` [T, E] comes from :func:`make_routing`: a token's chosen experts get values in [3, 3.5),
the others values in [0, 0.5), with a seeded jitter so that probabilities are not all equal. Top-k
then picks exactly the chosen experts (with softmax or sigmoid scores, pre- or post-softmax); the
result is checked by :func:`check_forced_routing`. A capacity factor may still drop tokens.

The chosen experts follow a Zipf law with exponent ``skew`` over experts (expert 0 hottest),
with exact per-expert counts from :func:`megatron_moe_ext.routing.zipf_expert_counts` (the one
generator, also behind the performance-model tools); token order is shuffled by a generator
seeded identically for both implementations.

Timing helpers for the layer benchmark (megatron_moe_ext/bench/layer.py) live at the end
(:class:`Region`, :func:`time_layer`, :class:`Alone`, :func:`max_over_ranks`); all ranks must
call them together (they use barriers). So does Megatron's parallel state for a benchmark:
:func:`init_expert_parallel` / :func:`destroy_expert_parallel`.

Notation: T tokens of this rank (S * B), E experts, k top-k, H hidden size.
"""

from __future__ import annotations

import time
from typing import Any, Optional, Sequence

import numpy as np
import torch

from megatron_moe_ext.routing import zipf_expert_counts

__all__ = [
    "config_from_overrides",
    "build_pair",
    "zipf_expert_counts",
    "make_routing",
    "force_routing",
    "unforce_routing",
    "check_forced_routing",
    "describe_counts",
    "Region",
    "time_layer",
    "Alone",
    "max_over_ranks",
    "init_expert_parallel",
    "destroy_expert_parallel",
    "megatron_version",
]


def config_from_overrides(overrides: Sequence[str]):
    """Our :class:`~megatron_moe_ext.config.Config` from dotted overrides (mock data, no file)."""
    from megatron_moe_ext.config import load_config

    return load_config(None, ["data.mock=true", *overrides])


def build_pair(cfg, pg_collection, layer_number: int = 1, device: str = "cpu"):
    """(stock MoELayer, FasterMoELayer) with identical weights, built from ``cfg``.

    Both come from the same local (non-TE) GPT layer spec: the same TopKRouter and
    SequentialMLP submodules, so parameter names and layout match; the FasterMoE one is the
    same spec with the module class swapped and ``options`` built from ``cfg.moe``. The stock layer uses
    ``cfg.moe.token_dispatcher`` (default alltoall). Weights are copied with
    ``load_state_dict`` from the stock layer into the FasterMoE layer.
    """
    from megatron.core.models.gpt.gpt_layer_specs import get_gpt_layer_local_spec
    from megatron.core.transformer.moe.moe_layer import MoELayer

    from megatron_moe_ext.megatron.fastermoe_layer import FasterMoELayer
    from megatron_moe_ext.megatron.model import (
        _swap_moe,
        attach_shadow_prefetch,
        build_transformer_config,
    )
    from megatron_moe_ext.megatron.versions import build_moe

    tconf = build_transformer_config(cfg, device)
    layer_spec = get_gpt_layer_local_spec(num_experts=cfg.moe.num_experts)
    # the same spec swap the training models use: the router follows moe.router.type
    spec = _swap_moe(layer_spec, MoELayer, cfg).submodules.mlp
    fspec = _swap_moe(layer_spec, FasterMoELayer, cfg).submodules.mlp
    stock = build_moe(spec, tconf, pg_collection)  # ModuleSpec or (0.18+) partial
    faster = build_moe(fspec, tconf, pg_collection)
    faster.load_state_dict(stock.state_dict())
    for layer in (stock, faster):
        layer.set_layer_number(layer_number)
    attach_shadow_prefetch(faster, cfg)  # its own predictor state (moe.fastermoe.shadow.prefetch)
    return stock, faster


# --------------------------------------------------------------------------------------
# Forced routing
# --------------------------------------------------------------------------------------


def make_routing(num_tokens: int, num_experts: int, topk: int, skew: float,
                 seed: int) -> tuple[torch.Tensor, torch.Tensor]:
    """(routing_map bool [T, E], logit bias fp32 [T, E]) for Zipf(skew) routing, seeded.

    Copies are laid out expert by expert (sorted) and token t takes positions t, t + T, ...;
    every expert's run is <= T long, so a token never gets the same expert twice. Token rows
    are then shuffled.
    """
    counts = zipf_expert_counts(num_tokens, num_experts, topk, skew)
    flat = np.repeat(np.arange(num_experts), counts)  # [k T], sorted by expert
    choice = torch.from_numpy(flat.reshape(topk, num_tokens).T.copy())  # [T, k]
    gen = torch.Generator().manual_seed(int(seed))
    choice = choice[torch.randperm(num_tokens, generator=gen)]
    routing_map = torch.zeros(num_tokens, num_experts, dtype=torch.bool)
    routing_map.scatter_(1, choice, True)
    jitter = torch.rand(num_tokens, num_experts, generator=gen) * 0.5
    bias = torch.where(routing_map, 3.0 + jitter, jitter)
    return routing_map, bias


def force_routing(layer: torch.nn.Module, bias: torch.Tensor) -> None:
    """Make ``layer.router`` return logits equal to ``bias`` (reshaped like its logits) while
    keeping the gradient path through the router weight. Undo with :func:`unforce_routing`."""
    router = layer.router
    unforce_routing(layer)
    gating = router.gating  # the class method, bound

    def forced_gating(inp: torch.Tensor) -> torch.Tensor:
        logits = gating(inp)
        b = bias.to(device=logits.device, dtype=logits.dtype).view(logits.shape)
        return logits - logits.detach() + b

    router.gating = forced_gating  # instance attribute shadows TopKRouter.gating
    router._forced_routing_bias = bias


def unforce_routing(layer: torch.nn.Module) -> None:
    """Restore the router's own gating (no-op if routing was not forced)."""
    router = layer.router
    if "gating" in vars(router):
        del router.gating
        router._forced_routing_bias = None


def check_forced_routing(layer: torch.nn.Module, hidden_states: torch.Tensor,
                         routing_map: torch.Tensor) -> Optional[str]:
    """None if the router now yields ``routing_map`` for ``hidden_states``; else a message."""
    with torch.no_grad():
        _, got = layer.router(hidden_states)
    if got.shape != routing_map.shape:
        return f"routing map shape {tuple(got.shape)} != {tuple(routing_map.shape)}"
    bad = (got.cpu() != routing_map).any(dim=1).sum().item()
    return None if bad == 0 else f"{bad} tokens routed differently from the forced routing"


def apply_routing(layers: dict[str, torch.nn.Module], bias: torch.Tensor,
                  hidden_states: torch.Tensor, routing_map: torch.Tensor, what: str = "",
                  gated: bool = False) -> None:
    """Force `bias` as the routing logits of every layer in `layers` and check the result.

    Without a gate the router must pick exactly `routing_map`. With the topology-aware gate
    (`gated`), the router re-routes on purpose: `routing_map` is then replaced in place by the
    gated routing, which must be the same for every layer."""
    for name, layer in layers.items():
        force_routing(layer, bias)
        if gated:
            with torch.no_grad():
                _, got = layer.router(hidden_states)
            got = got.to(device=routing_map.device, dtype=routing_map.dtype)
            if name != next(iter(layers)) and not torch.equal(got, routing_map):
                raise RuntimeError(f"{what}{name}: gated routing differs between layers")
            routing_map.copy_(got)
            continue
        err = check_forced_routing(layer, hidden_states, routing_map)
        if err:
            raise RuntimeError(f"{what}{name}: forced routing not honoured: {err}")


def gather_counts(routing_map: torch.Tensor, group) -> list[list[int]]:
    """The [W, E] routed-token counts of the expert-parallel group (all-gathered rows)."""
    from megatron_moe_ext.core.comm import gather_counts as gather

    return gather(routing_map.sum(dim=0), group).tolist()


def describe_counts(counts: Any, num_workers: int) -> dict:
    """Summary of an all-gathered count matrix [W, E] (tokens worker w sends to expert e)."""
    c = np.asarray(counts, dtype=np.int64)
    e_l = c.shape[1] // num_workers
    T = c.reshape(num_workers, num_workers, e_l).sum(axis=2)  # [W, W] worker -> worker
    loads = T.sum(axis=0)
    total = int(c.sum())
    return {
        "counts": c.tolist(),
        "worker_matrix": T.tolist(),
        "expert_loads": c.sum(axis=0).tolist(),
        "worker_loads": loads.tolist(),
        "imbalance_max_over_mean": float(loads.max() / loads.mean()) if total else 1.0,
        "remote_fraction": float((total - np.trace(T)) / total) if total else 0.0,
    }


# --------------------------------------------------------------------------------------
# Timing helpers (scripts/bench_moe_layer.py); every rank must call them together
# --------------------------------------------------------------------------------------


class Region:
    """Wall and process-CPU time of a region (CPU time: all threads of this process, gloo's
    included; it is much less sensitive than wall time to other jobs sharing the cores)."""

    def __init__(self, sync: bool):
        self.sync = sync

    def __enter__(self):
        import torch.distributed as dist

        dist.barrier()
        self._sync()
        self.w0, self.c0 = time.perf_counter(), time.process_time()
        return self

    def __exit__(self, *exc):
        self._sync()
        self.wall = time.perf_counter() - self.w0
        self.cpu = time.process_time() - self.c0

    def _sync(self):
        if self.sync:
            torch.cuda.synchronize()


def max_over_ranks(values):
    """[n] floats -> elementwise max over ranks (one all-reduce)."""
    import torch.distributed as dist

    t = torch.tensor(values, dtype=torch.float64)
    dist.all_reduce(t, op=dist.ReduceOp.MAX)
    return t.tolist()


def time_layer(layer, x, gy, sync: bool):
    """One fwd + bwd of a whole MoE layer, barrier before each region: (out, fwd, bwd)."""
    layer.zero_grad(set_to_none=True)
    xi = x.detach().requires_grad_(True)
    with Region(sync) as fwd:
        out, _ = layer(xi)
    with Region(sync) as bwd:
        out.backward(gy)
    return out.detach(), fwd, bwd


class Alone:
    """The pieces of the layer alone, for the overlap bound: one all_to_all_single of the
    routed tokens (A) and the local experts' forward / backward (C_fwd, C_bwd)."""

    def __init__(self, experts, send_rows, recv_rows, tokens_per_expert, hidden, dtype, group,
                 sync, device="cpu"):
        gen = torch.Generator().manual_seed(7)
        self.experts, self.group, self.sync = experts, group, sync
        self.send_rows, self.recv_rows = send_rows, recv_rows
        self.inp = torch.randn(sum(send_rows), hidden, generator=gen).to(device, dtype)
        self.out = self.inp.new_empty((sum(recv_rows), hidden))
        n = int(sum(tokens_per_expert))
        self.x = torch.randn(n, hidden, generator=gen).to(device, dtype)
        self.p = torch.rand(n, generator=gen).to(device)
        self.tpe = torch.tensor(tokens_per_expert, dtype=torch.long)

    def alltoall(self):
        import torch.distributed as dist

        with Region(self.sync) as r:
            dist.all_to_all_single(self.out, self.inp, self.recv_rows, self.send_rows,
                                   group=self.group)
        return r

    def experts_fwd_bwd(self):
        self.experts.zero_grad(set_to_none=True)
        x, p = self.x.detach().requires_grad_(True), self.p.detach().requires_grad_(True)
        with Region(self.sync) as fwd:
            y, _ = self.experts(x, self.tpe, p)
        with Region(self.sync) as bwd:
            y.backward(torch.ones_like(y))
        return fwd, bwd


# --------------------------------------------------------------------------------------
# Megatron's parallel state for the benchmarks (pure expert parallelism)
# --------------------------------------------------------------------------------------


def init_expert_parallel(world: int, seed: int):
    """Initialise Megatron's model-parallel state with expert parallelism = ``world`` (the
    default process group must exist) and its RNG tracker with ``seed``; returns the
    ProcessGroupCollection of the layers. Undo with :func:`destroy_expert_parallel`."""
    from megatron.core import parallel_state as ps
    from megatron.core.process_groups_config import ProcessGroupCollection
    from megatron.core.tensor_parallel.random import model_parallel_cuda_manual_seed

    ps.initialize_model_parallel(expert_model_parallel_size=world)
    model_parallel_cuda_manual_seed(seed)
    return ProcessGroupCollection.use_mpu_process_groups()


def destroy_expert_parallel() -> None:
    """Tear down what :func:`init_expert_parallel` set up."""
    from megatron.core import parallel_state as ps

    ps.destroy_model_parallel()


def megatron_version() -> str:
    """The megatron-core version string ("?" when it has none)."""
    import megatron.core

    return getattr(megatron.core, "__version__", "?")
