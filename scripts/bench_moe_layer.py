#!/usr/bin/env python
"""Time one MoE layer: stock Megatron MoELayer (alltoall dispatcher) vs FasterMoELayer.

Both layers are real megatron-core modules built from the same spec with identical weights and
identical (forced) routing, see megatron_moe_ext/megatron/layer_builder.py. Forward and backward
are timed separately: warm-up iterations, then --iters timed iterations (the implementations are
interleaved, alternating which goes first), a barrier before each timed region, each rank times
itself and the max over ranks is taken per iteration; reported figures are medians.
fwd_bwd_s is the median over iterations of (max-rank fwd + max-rank bwd).

Overlap bound (paper Section 4.2, per layer): bound = (Lat_comm + Lat_comp) / max(Lat_comm,
Lat_comp), with Lat_comm = 4 A (dispatch + combine, forward and backward), A the measured time of
one all_to_all_single of the same routed tokens alone, and Lat_comp = C_fwd + C_bwd, the measured
local expert compute alone (SequentialMLP forward / backward on the tokens this rank's experts
receive); all medians of the per-iteration max over ranks, measured in the same run. achieved =
ratio_fwd_bwd (megatron / fastermoe); bound_fraction_schedule = (achieved - 1) / (bound - 1)
when bound > 1 (1.0: the schedule gets all the overlap the bound allows; <= 0: no gain).

Shadow experts (--shadow never|predictor|model|top_k, --shadow-max-experts N for top_k) are
applied to the FasterMoE layer (moe.fastermoe.shadow.*); the sets it chose in the timed iterations
(`last_shadows`) are reported as `shadows` (distinct sets), and its predicted_fwd_bwd_s is the
median of the layer's own `last_predicted_s` (smart schedule with those shadows).

Balance bound (--skew > 0 with megatron timed): stock Megatron is also timed on exactly balanced
routing (skew 0, same sizes and token count), interleaved in the same iterations.
balance_bound = megatron skewed fwd+bwd / megatron balanced fwd+bwd (what perfect balancing
would give stock Megatron); bound_fraction = ratio_fwd_bwd (megatron / fastermoe, skewed) /
balance_bound (1.0: FasterMoE on skewed routing is as fast as stock Megatron on balanced routing).

--compute emulated runs the scale lab instead (megatron_moe_ext/lab, docs/emulation.md): no
megatron-core, emulated accelerators sleeping the cluster's GEMM time x --dilation (auto: 1 /
the emulator's link scale), the synchronous baseline as Megatron's alltoall dispatcher and the
product's smart_exchange / shadows; same JSON keys, plus `dilation` and `lab` (the lab's own
overhead; --measure-floor times compute-zero passes too). Under scripts/emulate_cluster.py
--cluster defaults to the emulated cluster. --compute emulated --iteration --model YAML times
whole iterations instead (L layers, the DDP gradient all-reduces with and without
train.comm_priority; docs/lina.md, "Lab iteration mode").

Starts its own processes (torch.multiprocessing spawn, gloo, the CPU runtime) or, when RANK and
WORLD_SIZE are set, runs as one rank under torchrun. Pure expert parallelism: EP = world size.

Examples:
    python scripts/bench_moe_layer.py --world-size 2 --tokens 4096 --hidden 512 --ffn 1024 \
        --experts 4 --topk 2 --json runs/bench/ep2_top2.json --trace-dir runs/bench/trace
    torchrun --nproc-per-node 2 scripts/bench_moe_layer.py --impl fastermoe --iters 5
"""

from __future__ import annotations

import argparse
import sys

from megatron_moe_ext.bench.layer import LayerBenchOptions, run
from megatron_moe_ext.lab.cli import LAB_ONLY, add_lab_arguments, check_real, run_bench_args

D = LayerBenchOptions  # option defaults are the library's


def build_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--impl", choices=["megatron", "fastermoe", "both"], default=D.impl,
                   help="which implementation(s) to time (default: %(default)s)")
    p.add_argument("--world-size", type=int, default=D.world_size,
                   help="processes to spawn = expert-parallel size; ignored under torchrun, "
                        "where WORLD_SIZE wins (default: %(default)s)")
    p.add_argument("--tokens", type=int, default=D.tokens,
                   help="tokens per rank entering the layer, before top-k (default: %(default)s)")
    p.add_argument("--hidden", type=int, default=D.hidden,
                   help="hidden size H (default: %(default)s)")
    p.add_argument("--ffn", type=int, default=D.ffn,
                   help="expert FFN hidden size (default: %(default)s)")
    p.add_argument("--experts", type=int, default=D.experts,
                   help="experts in total, a multiple of the world size (default: %(default)s)")
    p.add_argument("--topk", type=int, default=D.topk,
                   help="experts per token; with 1, the router uses pre-softmax (megatron rule) "
                        "(default: %(default)s)")
    p.add_argument("--skew", type=float, default=D.skew,
                   help="Zipf exponent of the forced routing over experts (expert 0 hottest): "
                        "0 = exactly balanced; identical for both implementations "
                        "(default: %(default)s)")
    p.add_argument("--shadow", choices=["never", "predictor", "model", "top_k"], default=D.shadow,
                   help="FasterMoE shadow-expert policy, moe.fastermoe.shadow.policy "
                        "(default: %(default)s)")
    p.add_argument("--shadow-max-experts", type=int, default=D.shadow_max_experts, metavar="N",
                   help="with --shadow top_k: experts shadowed every iteration, "
                        "moe.fastermoe.shadow.max_experts (default: %(default)s)")
    p.add_argument("--group-size", type=int, default=D.group_size,
                   help="FasterMoE smart-schedule group size g, must divide the world size "
                        "(default: %(default)s)")
    p.add_argument("--dtype", choices=["fp32", "bf16"], default=D.dtype,
                   help="parameter / activation dtype (default: %(default)s)")
    p.add_argument("--iters", type=int, default=D.iters,
                   help="timed iterations per implementation (default: %(default)s)")
    p.add_argument("--warmup", type=int, default=D.warmup,
                   help="untimed warm-up iterations per implementation (default: %(default)s)")
    p.add_argument("--json", metavar="PATH", help="write every result to this JSON file")
    p.add_argument("--trace-dir", metavar="DIR",
                   help="after timing, run one traced FasterMoE iteration and write Chrome "
                        "traces DIR/rank<r>_layer1.json and (if matplotlib works) "
                        "DIR/timeline.png")
    p.add_argument("--cluster", default=None,
                   help="cluster YAML (or name) for the performance-model prediction "
                        "(default: configs/clusters/local-cpu.yaml, calibrated by "
                        "scripts/calibrate.py; with --compute emulated under the emulator: the "
                        "emulated cluster)")
    p.add_argument("--seed", type=int, default=D.seed,
                   help="seed of weights, inputs and routing (default: %(default)s)")
    p.add_argument("--threads", type=int, default=None,
                   help="torch intra-op threads per process (default: OMP_NUM_THREADS if set, "
                        "else cores / processes)")
    p.add_argument("--set", dest="overrides", action="append", default=[], metavar="KEY=VALUE",
                   help="extra dotted config override, repeatable (e.g. "
                        "moe.router.load_balancing_type=none)")
    p.add_argument("--log-level", default=D.log_level,
                   help="rank-0 log level (default: %(default)s)")
    p.add_argument("--routing-trace", metavar="PATH",
                   help="replay a routing trace (run dir or file; logging.routing_trace) "
                        "instead of --skew: rank r routes EP rank r's recorded counts")
    p.add_argument("--layer", type=int, metavar="N",
                   help="with --routing-trace: the traced MoE layer (default: the first)")
    p.add_argument("--trace-record", type=int, default=D.trace_record, metavar="I",
                   help="with --routing-trace: record to replay, negative from the end "
                        "(default: %(default)s, the last logged iteration)")
    p.add_argument("--compute", choices=["real", "emulated"], default="real",
                   help="real: megatron-core layers on this machine; emulated: the scale lab "
                        "(megatron_moe_ext/lab, emulated accelerators, no megatron-core; "
                        "docs/emulation.md) (default: %(default)s)")
    add_lab_arguments(p, with_shared=False)
    return p


def parse_args(argv=None) -> LayerBenchOptions:
    """The real-compute benchmark's options (``--compute real``; lab-only options are errors)."""
    p = build_parser()
    args = p.parse_args(argv)
    check_real(p, args)
    values = {k: v for k, v in vars(args).items() if k not in ("compute", *LAB_ONLY)}
    values["cluster"] = values["cluster"] or D.cluster
    try:
        return LayerBenchOptions(**values)
    except ValueError as exc:
        p.error(str(exc))
        raise


def main(argv=None) -> int:
    p = build_parser()
    args = p.parse_args(argv)
    if args.compute == "emulated":
        return run_bench_args(p, args, D.cluster)
    return run(parse_args(argv))


if __name__ == "__main__":
    sys.exit(main())
