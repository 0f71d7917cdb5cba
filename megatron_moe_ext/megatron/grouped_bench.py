"""Timing of grouped vs sequential experts and of the grouped GEMM against the matmul ceiling
(scripts/bench_grouped_experts.py, megatron_moe_ext/gpu_check.py).

* :func:`build_layer`: one MoE layer (stock or FasterMoE, grouped or sequential experts) from
  our specs, as the models build it.
* :func:`time_layers`: whole-layer forward + backward of several layers with identical weights
  on the same input, interleaved, barrier before each region, median of the per-iteration max
  over ranks (every rank must call it together).
* :func:`gemm_efficiency`: one grouped GEMM over E_l experts (``grouped_mm``) against
  ``torch.matmul`` of the same FLOPs in one piece (the measured ceiling).

Notation: T tokens of this rank (S * B), E experts, E_l local experts, H hidden, F expert FFN.
"""

from __future__ import annotations

import statistics
import time
from typing import Any, Callable, Sequence

import torch

from megatron_moe_ext.megatron.layer_builder import (
    config_from_overrides,
    max_over_ranks,
    time_layer,
)

__all__ = ["build_layer", "time_layers", "gemm_efficiency", "grouped_vs_sequential", "run_bench",
           "bench_worker", "markdown_table"]


def build_layer(overrides: Sequence[str], pg, impl: str, grouped: bool, device: str):
    """One MoE layer module (moe.impl ``impl``, grouped experts or not) and its config."""
    from megatron.core.transformer.spec_utils import build_module

    from megatron_moe_ext.megatron import specs
    from megatron_moe_ext.megatron.model import (
        _moe_layer_class,
        _swap_moe,
        build_transformer_config,
    )

    cfg = config_from_overrides([*overrides, f"moe.impl={impl}",
                                 f"moe.grouped_gemm={str(grouped).lower()}"])
    tconf = build_transformer_config(cfg, device)
    spec = _swap_moe(specs.moe_layer_spec(cfg, device=device), _moe_layer_class(cfg), cfg)
    layer = build_module(spec.submodules.mlp, config=tconf, pg_collection=pg).to(device)
    layer.set_layer_number(1)
    return layer, cfg


def time_layers(layers: dict[str, torch.nn.Module], x: torch.Tensor, gy: torch.Tensor,
                warmup: int, iters: int, sync: bool) -> dict[str, dict[str, float]]:
    """{name: {fwd_s, bwd_s, fwd_bwd_s, fwd_bwd_cpu_s}} medians over ``iters`` (after
    ``warmup``) of the per-iteration max over ranks (wall time; cpu: process CPU time, less
    sensitive to other jobs on shared cores); the order of the layers rotates every iteration."""
    names = list(layers)
    samples: dict[str, list[list[float]]] = {n: [] for n in names}
    for it in range(warmup + iters):
        order = names[it % len(names):] + names[:it % len(names)]
        for n in order:
            _, fwd, bwd = time_layer(layers[n], x, gy, sync)
            if it >= warmup:
                samples[n].append(max_over_ranks([fwd.wall, bwd.wall, fwd.cpu + bwd.cpu]))
    res = {}
    for n, rows in samples.items():
        f = [r[0] for r in rows]
        b = [r[1] for r in rows]
        res[n] = {"fwd_s": statistics.median(f), "bwd_s": statistics.median(b),
                  "fwd_bwd_s": statistics.median([a + c for a, c in zip(f, b)]),
                  "fwd_bwd_cpu_s": statistics.median([r[2] for r in rows])}
    return res


def grouped_vs_sequential(pg, rank: int, overrides: Sequence[str], impls: Sequence[str],
                          seq: int, batch: int, warmup: int, iters: int,
                          device: str = "cpu") -> dict[str, Any]:
    """Sequential vs grouped experts in each of ``impls``, same weights and input: fwd + bwd
    medians and the ratio sequential / grouped (> 1: grouped is faster)."""
    layers, cfg = {}, None
    for impl in impls:
        for grouped in (False, True):
            layer, cfg = build_layer(overrides, pg, impl, grouped, device)
            layers[f"{impl}/{'grouped' if grouped else 'sequential'}"] = layer
    first = next(iter(layers.values()))
    for layer in layers.values():
        layer.load_state_dict(first.state_dict())
    dtype = torch.bfloat16 if cfg.train.precision == "bf16" else torch.float32
    gen = torch.Generator().manual_seed(17 + rank)
    x = torch.randn(seq, batch, cfg.model.hidden_size, generator=gen).to(device, dtype)
    gy = torch.randn(x.shape, generator=gen).to(device, dtype)
    times = time_layers(layers, x, gy, warmup, iters, sync=device == "cuda")
    ratios = {impl: times[f"{impl}/sequential"]["fwd_bwd_s"] / times[f"{impl}/grouped"]["fwd_bwd_s"]
              for impl in impls}
    cpu_ratios = {impl: times[f"{impl}/sequential"]["fwd_bwd_cpu_s"]
                  / times[f"{impl}/grouped"]["fwd_bwd_cpu_s"] for impl in impls}
    return {"times": times, "ratio_sequential_over_grouped": ratios,
            "cpu_ratio_sequential_over_grouped": cpu_ratios,
            "local_experts": cfg.moe.num_experts // cfg.parallel.expert,
            "tokens_per_rank": seq * batch, "hidden": cfg.model.hidden_size,
            "ffn": cfg.moe.ffn_hidden_size or cfg.model.ffn_hidden_size,
            "topk": cfg.moe.topk, "dtype": str(dtype).replace("torch.", "")}


def _median_time(fn: Callable[[], Any], warmup: int, iters: int, sync: bool) -> float:
    for _ in range(warmup):
        fn()
    ts = []
    for _ in range(iters):
        if sync:
            torch.cuda.synchronize()
        t0 = time.perf_counter()
        fn()
        if sync:
            torch.cuda.synchronize()
        ts.append(time.perf_counter() - t0)
    return statistics.median(ts)


def gemm_efficiency(tokens: int, hidden: int, ffn: int, local_experts: int, dtype: torch.dtype,
                    device: str, warmup: int = 5, iters: int = 20) -> dict[str, float]:
    """Our grouped GEMM (x [T, H] by E_l weights [F, H], T / E_l rows each: the fc1 shape)
    against one ``torch.matmul`` [T, H] x [H, F] of the same FLOPs (the measured ceiling).

    Returns TFLOP/s of both, their ratio, and the same for the fc2 shape ([T, F] by [H, F])."""
    from megatron_moe_ext.megatron.grouped_experts import expert_offsets, grouped_mm

    sync = device == "cuda"
    gen = torch.Generator().manual_seed(0)
    per = tokens // local_experts
    counts = torch.full((local_experts,), per, dtype=torch.long)
    T = per * local_experts
    offs = expert_offsets(counts, torch.device(device))
    out: dict[str, float] = {"tokens": T, "hidden": hidden, "ffn": ffn,
                             "local_experts": local_experts}
    for name, (k, n) in (("fc1", (hidden, ffn)), ("fc2", (ffn, hidden))):
        x = torch.randn(T, k, generator=gen).to(device, dtype)
        w = torch.randn(local_experts, n, k, generator=gen).to(device, dtype)
        wt = torch.randn(k, n, generator=gen).to(device, dtype)
        flops = 2.0 * T * k * n
        with torch.no_grad():
            tg = _median_time(lambda: grouped_mm(x, w, offs), warmup, iters, sync)
            tm = _median_time(lambda: torch.matmul(x, wt), warmup, iters, sync)
        out[f"{name}_grouped_tflops"] = flops / tg / 1e12
        out[f"{name}_matmul_tflops"] = flops / tm / 1e12
        out[f"{name}_fraction_of_ceiling"] = tm / tg
    out["fraction_of_ceiling"] = min(out["fc1_fraction_of_ceiling"], out["fc2_fraction_of_ceiling"])
    return out


def bench_worker(*args: Any) -> None:
    """Process entry of scripts/bench_grouped_experts.py: :func:`run_bench` (exit code 0)."""
    run_bench(*args)


def run_bench(local_experts: Sequence[int], hidden: int, ffn: int, tokens: int, topk: int,
                 impls: Sequence[str], dtype: str, warmup: int, iters: int,
                 json_path: str | None, threads: int | None = None) -> dict[str, Any]:
    """One benchmark run on every rank (RANK / WORLD_SIZE from the launcher):
    EP = world size, one MoE layer, grouped vs sequential experts for each E_l."""
    import json
    import logging
    import warnings

    from megatron.core import parallel_state as ps
    from megatron.core.process_groups_config import ProcessGroupCollection
    from megatron.core.tensor_parallel.random import model_parallel_cuda_manual_seed

    from megatron_moe_ext.config import RuntimeConfig
    from megatron_moe_ext.runtime import device as rdev

    warnings.filterwarnings("ignore")
    rcfg = RuntimeConfig(device="auto", num_threads=threads)
    dev = rdev.resolve_device(rcfg)
    rt = rdev.setup_runtime(rcfg, dev)
    log = logging.getLogger(__name__)
    logging.basicConfig(level="INFO" if rt.rank == 0 else "WARNING",
                        format=f"[rank {rt.rank}] %(message)s", force=True)
    ps.initialize_model_parallel(expert_model_parallel_size=rt.world_size)
    model_parallel_cuda_manual_seed(1234)
    pg = ProcessGroupCollection.use_mpu_process_groups()
    rows = []
    for e_l in local_experts:
        o = [f"model.hidden_size={hidden}", f"model.ffn_hidden_size={ffn}",
             f"moe.num_experts={e_l * rt.world_size}", f"moe.topk={topk}",
             f"parallel.expert={rt.world_size}", f"train.precision={dtype}"]
        if topk == 1:
            o.append("moe.router.pre_softmax=true")
        r = grouped_vs_sequential(pg, rt.rank, o, impls, seq=tokens, batch=1, warmup=warmup,
                                  iters=iters, device=dev)
        r["ep"] = rt.world_size
        rows.append(r)
        log.info("E_l=%d: sequential / grouped fwd+bwd = %s", e_l,
                 ", ".join(f"{k} {v:.3f}" for k, v in r["ratio_sequential_over_grouped"].items()))
    result = {"device": str(rt.device), "threads_per_rank": torch.get_num_threads(),
              "rows": rows}
    if rt.rank == 0 and json_path:
        from pathlib import Path

        Path(json_path).parent.mkdir(parents=True, exist_ok=True)
        Path(json_path).write_text(json.dumps(result, indent=2) + "\n")
    import torch.distributed as dist

    dist.barrier()
    ps.destroy_model_parallel()
    dist.destroy_process_group()
    return result


def markdown_table(result: dict[str, Any]) -> str:
    """The rows of :func:`run_bench` as a markdown table (fwd + bwd ms, ratio)."""
    lines = ["| E_l | T/rank | H | F | impl | sequential ms | grouped ms | seq / grouped "
             "(wall) | seq / grouped (CPU time) |", "|---|---|---|---|---|---|---|---|---|"]
    for r in result["rows"]:
        for impl, ratio in r["ratio_sequential_over_grouped"].items():
            s = r["times"][f"{impl}/sequential"]["fwd_bwd_s"] * 1e3
            g = r["times"][f"{impl}/grouped"]["fwd_bwd_s"] * 1e3
            c = r["cpu_ratio_sequential_over_grouped"][impl]
            lines.append(f"| {r['local_experts']} | {r['tokens_per_rank']} | {r['hidden']} | "
                         f"{r['ffn']} | {impl} | {s:.1f} | {g:.1f} | {ratio:.3f} | {c:.3f} |")
    return "\n".join(lines)


def grouped_mm_check(device: str, dtype: torch.dtype, hidden: int = 256, ffn: int = 512,
                     counts: Sequence[int] = (13, 0, 7, 250, 1, 0, 64, 33)) -> dict[str, Any]:
    """Our grouped GEMM (forward, and backward to x and the weights) against a per-expert
    ``F.linear`` loop in fp32, on uneven token counts (empty groups, groups not multiples of 8):
    max |a - b| / max |ref| of y, dx and dW."""
    import torch.nn.functional as F

    from megatron_moe_ext.megatron.grouped_experts import expert_offsets, grouped_mm

    gen = torch.Generator().manual_seed(3)
    x = torch.randn(sum(counts), hidden, generator=gen)
    w = torch.randn(len(counts), ffn, hidden, generator=gen) / hidden ** 0.5
    gy = torch.randn(sum(counts), ffn, generator=gen)
    xd = x.to(device, dtype, copy=True).requires_grad_(True)
    wd = w.to(device, dtype, copy=True).requires_grad_(True)
    y = grouped_mm(xd, wd, expert_offsets(torch.tensor(counts), xd.device))
    y.backward(gy.to(device, dtype))
    xr, wr = x.clone().requires_grad_(True), w.clone().requires_grad_(True)
    yr = torch.cat([F.linear(xs, wr[e]) for e, xs in enumerate(torch.split(xr, list(counts)))])
    yr.backward(gy)

    def rel(a: torch.Tensor, b: torch.Tensor) -> float:
        return float((a.float().cpu() - b).abs().max() / b.abs().max().clamp_min(1e-30))

    return {"counts": list(counts), "dtype": str(dtype).replace("torch.", ""),
            "out": rel(y.detach(), yr.detach()), "grad_input": rel(xd.grad, xr.grad),
            "grad_weight": rel(wd.grad, wr.grad)}
