"""Worker code for equivalence tests: stock Megatron MoELayer vs FasterMoELayer.

Runs inside spawned processes (see tests/helpers.spawn). Each case builds both layers from the
same spec with identical weights, feeds identical inputs and output gradients, and records
the largest relative differences of the output, the input gradient and every parameter
gradient. Notation: S sequence, B batch, H hidden, E experts, W expert-parallel workers.
"""

from __future__ import annotations

import json
import warnings
from pathlib import Path
from typing import Any

import torch


def _setup(ep: int):
    warnings.filterwarnings("ignore")
    from megatron.core import parallel_state as ps
    from megatron.core.process_groups_config import ProcessGroupCollection
    from megatron.core.tensor_parallel.random import model_parallel_cuda_manual_seed

    from megatron_moe_ext.config import RuntimeConfig
    from megatron_moe_ext.runtime.device import setup_runtime

    setup_runtime(RuntimeConfig(device="cpu", num_threads=1), "cpu")
    if not ps.model_parallel_is_initialized():
        ps.initialize_model_parallel(expert_model_parallel_size=ep)
    model_parallel_cuda_manual_seed(123)
    return ps, ProcessGroupCollection.use_mpu_process_groups()


def build_pair(overrides: list[str], pg) -> tuple[torch.nn.Module, torch.nn.Module, Any]:
    """(stock MoELayer, FasterMoELayer) with identical weights, built from our config schema."""
    from megatron_moe_ext.megatron import layer_builder

    cfg = layer_builder.config_from_overrides(overrides)
    stock, faster = layer_builder.build_pair(cfg, pg)
    return stock, faster, cfg


def _rel(a: torch.Tensor, b: torch.Tensor) -> float:
    a, b = a.double(), b.double()
    scale = b.abs().max().item()
    return (a - b).abs().max().item() / (scale if scale > 0 else 1.0)


def run_layer(layer: torch.nn.Module, x: torch.Tensor, gy: torch.Tensor):
    """Forward + backward once; returns (output, input grad, {param name: grad})."""
    layer.zero_grad(set_to_none=True)
    xi = x.detach().clone().requires_grad_(True)
    out, _ = layer(xi)
    (out.float() * gy).sum().backward()
    grads = {n: p.grad.detach().clone() for n, p in layer.named_parameters() if p.grad is not None}
    return out.detach(), xi.grad.detach(), grads


def compare_case(case: dict, pg, rank: int) -> dict[str, Any]:
    """One case: build, skew the router if asked, run both, return max relative diffs."""
    stock, faster, cfg = build_pair(case["overrides"], pg)
    dtype = torch.bfloat16 if cfg.train.precision == "bf16" else torch.float32
    if case.get("dead_experts"):
        # Make some experts unreachable: zero-token experts and zero-token peers.
        with torch.no_grad():
            for layer in (stock, faster):
                for e in case["dead_experts"]:
                    layer.router.weight[e].fill_(0.0)
                    layer.router.weight[e, 0] = -50.0
    gen = torch.Generator().manual_seed(1000 + rank)
    S, B, H = case.get("seq", 16), case.get("batch", 3), cfg.model.hidden_size
    x = torch.randn(S, B, H, generator=gen).to(dtype)
    if case.get("dead_experts"):
        x[..., 0] = x[..., 0].abs() + 1.0  # dead experts' logits are strongly negative
    gy = torch.randn(S, B, H, generator=gen)
    o1, gx1, g1 = run_layer(stock, x, gy)
    o2, gx2, g2 = run_layer(faster, x, gy)
    assert set(g1) == set(g2), (sorted(g1), sorted(g2))
    res = {
        "out": _rel(o2, o1),
        "grad_input": _rel(gx2, gx1),
        "grad_params": max(_rel(g2[k], g1[k]) for k in g1),
        "n_params_with_grad": len(g1),
        "counts": faster.token_dispatcher.counts.tolist(),
    }
    return res


def worker(rank: int, world: int, ep: int, cases: list[dict], out_dir: str) -> None:
    """Spawned entry: run every case, write rank-local results as JSON. A case may name its
    own expert-parallel size (``case["ep"]``, default ``ep``): the model-parallel state is
    rebuilt for it in the same processes (one launch for several layouts)."""
    ps, pg = _setup(ep)
    current = ep
    results = {}
    for case in cases:
        want = case.get("ep", ep)
        if want != current:
            ps.destroy_model_parallel()
            ps, pg = _setup(want)
            current = want
        results[case["name"]] = compare_case(case, pg, rank)
    Path(out_dir, f"rank{rank}.json").write_text(json.dumps(results))
    import torch.distributed as dist

    dist.barrier()
    ps.destroy_model_parallel()
    dist.destroy_process_group()
