#!/usr/bin/env python
"""Time one MoE layer with grouped-GEMM experts (moe.grouped_gemm: true, F.grouped_mm) against
the same layer with sequential experts (SequentialMLP), same weights and input, expert parallel
size = --world-size, for several local-expert counts. Reports fwd + bwd medians (per-iteration
max over ranks) and sequential / grouped (> 1: grouped is faster); see
megatron_moe_ext/megatron/grouped_bench.py.

    python scripts/bench_grouped_experts.py --local-experts 2 4 8 16 --json runs/grouped.json
"""

from __future__ import annotations

import argparse
import os
import sys


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__,
                                formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--world-size", type=int, default=2,
                   help="processes = expert-parallel size; WORLD_SIZE wins under torchrun "
                        "(default: %(default)s)")
    p.add_argument("--local-experts", type=int, nargs="+", default=[4, 8, 16],
                   help="local experts per rank E_l, one run each (default: %(default)s)")
    p.add_argument("--tokens", type=int, default=1024,
                   help="tokens per rank entering the layer (default: %(default)s)")
    p.add_argument("--hidden", type=int, default=128, help="hidden size H (default: %(default)s)")
    p.add_argument("--ffn", type=int, default=256, help="expert FFN size (default: %(default)s)")
    p.add_argument("--topk", type=int, default=2, help="experts per token (default: %(default)s)")
    p.add_argument("--impl", choices=["megatron", "fastermoe", "both"], default="both",
                   help="layer implementation(s) (default: %(default)s)")
    p.add_argument("--dtype", choices=["fp32", "bf16"], default="fp32",
                   help="parameter / activation dtype (default: %(default)s)")
    p.add_argument("--warmup", type=int, default=2,
                   help="untimed iterations (default: %(default)s)")
    p.add_argument("--iters", type=int, default=8, help="timed iterations (default: %(default)s)")
    p.add_argument("--threads", type=int, default=None,
                   help="torch threads per process (default: OMP_NUM_THREADS, else cores / ranks)")
    p.add_argument("--json", metavar="PATH", help="write the results to this JSON file")
    args = p.parse_args(argv)
    from megatron_moe_ext.megatron.grouped_bench import bench_worker
    from megatron_moe_ext.runtime.launch import run_workers, under_torchrun

    world = int(os.environ["WORLD_SIZE"]) if under_torchrun() else args.world_size
    impls = ["megatron", "fastermoe"] if args.impl == "both" else [args.impl]
    return run_workers(bench_worker, world, args.local_experts, args.hidden, args.ffn,
                       args.tokens, args.topk, impls, args.dtype, args.warmup, args.iters,
                       args.json, args.threads)


if __name__ == "__main__":
    sys.exit(main())
