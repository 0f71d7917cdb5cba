#!/usr/bin/env python
"""Measure this machine's GEMM throughput and worker-to-worker links; write a cluster YAML.

Run it under the same launcher as training, so that it sees the same processes, threads and
network: torchrun (one or more nodes), scripts/emulate_cluster.py, or alone (it then spawns
--nproc local processes, gloo on the loopback).

    torchrun --nproc-per-node 2 scripts/calibrate.py --out configs/clusters/local-cpu.yaml
    scripts/emulate_cluster.py --cluster johnny --scale 0.005 --nodes 2 --workers-per-node 1 \\
        -- scripts/calibrate.py --quick --compare johnny --out /tmp/johnny-emulated.yaml

What is measured
----------------
GEMM: the six GEMMs of one expert MLP forward + backward (fc1 [T, H] x [H, F], fc2 [T, F] x
[F, H]; backward: data and weight gradients of both, 12 T H F FLOPs), run on every worker at
the same time (as in training, where all workers compute together; on a shared-core machine
they compete for the cores), with the torch thread count of training (setup_runtime: cores /
local processes unless --threads). For each token count T of the curve, every rank takes the
median over repetitions; the value written is the mean over ranks. ``gemm_tflops[dtype]`` is
the value at the largest T, ``gemm_curve[dtype]`` all (T, TFLOP/s) points (small GEMMs are
slower on a CPU). The performance model interpolates the curve at the tokens of a worker.

Links: for every pair of workers (--pairs all) or rank 0 and every other rank (--pairs star),
one pair at a time, for several message sizes: a ping-pong (blocking send / recv; one-way time
= median round trip / 2, the other direction idle) and a simultaneous exchange (both sides
isend then irecv at once, as in an all-to-all, timed until both directions arrived). Latency =
time of the smallest size; bandwidth = largest size / (time(largest) - latency), one
direction, Gbit/s. --bandwidth picks which rate becomes the link bandwidth (default: pingpong,
the link's rate; under the emulator it recovers the tbf rate within a few percent). With gloo
the exchange rate is about half the ping-pong rate: when the sends are posted before the
receives (as our exchange and gloo's all-to-all do), gloo moves the two directions of a worker
pair one after the other (raw TCP between the same namespaces overlaps them, and so does gloo
with the receives posted first; docs/emulation.md). The written file says ``duplex: half``
when exchange / ping-pong is below 0.7, and the performance model then charges a pair's
exchange with both directions' bytes. Both rates are recorded in the header. Pairs on the same
node are intra-node, the others inter-node. The node of a rank is GROUP_RANK (torchrun's node
rank), else rank // --workers-per-node, else rank // LOCAL_WORLD_SIZE.

What is written (rank 0): the schema of configs/clusters/*.yaml. Workers of a node hang off one
vertex ``host`` (a star; kind ``loopback`` unless --intra-kind) whose links carry the median
intra-node bandwidth over pairs; with more than one node, one NIC on ``host`` carries the
median inter-node bandwidth (on ``w0`` with one worker per node). A comment header records
the date, the command and every measured value.
--out defaults to configs/clusters/local-cpu.yaml, except under the emulator or with --compare,
where nothing is written unless --out is given. --json writes the raw measurements.

--compare CLUSTER prints measured vs described rates. The described rates are multiplied by
the emulation scale (MMX_EMULATION_SCALE, set by scripts/emulate_cluster.py, or --scale):
inter-node = the NIC bandwidth an emulated node gets, intra-node = the slowest worker-to-worker
path of a node (not rate-limited by the emulator when its links are memory-like), GEMM =
gemm_tflops x scale (equal to the local throughput by construction of --scale auto).
"""

from __future__ import annotations

import argparse
import sys
from typing import Optional, Sequence

from megatron_moe_ext.bench.calibrate import (
    DEFAULT_SIZES,
    DEFAULT_TOKENS,
    QUICK_SIZES,
    QUICK_TOKENS,
    CalibrateOptions,
    run,
)
from megatron_moe_ext.cli import parse_options

D = CalibrateOptions  # option defaults are the library's


def parse_args(argv: Optional[Sequence[str]] = None) -> CalibrateOptions:
    p = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--out", default=None, metavar="YAML",
                   help="cluster YAML to write (default: configs/clusters/local-cpu.yaml; "
                        "under the emulator or with --compare: none unless given)")
    p.add_argument("--name", default=None,
                   help="cluster name in the YAML (default: the --out file stem; under the "
                        "emulator <cluster>-emulated)")
    p.add_argument("--json", metavar="PATH", help="also write the raw measurements as JSON")
    p.add_argument("--compare", metavar="CLUSTER",
                   help="print measured vs described rates of this cluster YAML (or name)")
    p.add_argument("--scale", type=float, default=None,
                   help="factor applied to the described rates for --compare (default: "
                        "MMX_EMULATION_SCALE under the emulator, else 1)")
    p.add_argument("--tolerance", type=float, default=D.tolerance,
                   help="relative difference accepted by --compare (default: %(default)s)")
    p.add_argument("--strict", action="store_true",
                   help="exit 1 when a --compare rate is outside --tolerance")
    p.add_argument("--quick", action="store_true",
                   help="few sizes, short measurements (tests): tokens %s, messages %s, "
                        "H=256, F=512 unless given" % (QUICK_TOKENS, QUICK_SIZES))
    p.add_argument("--hidden", type=int, default=None,
                   help="expert MLP hidden size H of the GEMM shapes (default: 512; quick 256)")
    p.add_argument("--ffn", type=int, default=None,
                   help="expert FFN hidden size F of the GEMM shapes (default: 2H)")
    p.add_argument("--tokens", type=int, nargs="+", default=None,
                   help="token counts of the gemm_curve (default: %s)" % (DEFAULT_TOKENS,))
    p.add_argument("--dtypes", nargs="+", default=["fp32", "bf16"], choices=["fp32", "bf16"],
                   help="dtypes to measure (default: fp32 bf16; the YAML needs both, a missing "
                        "one copies the measured one)")
    p.add_argument("--gemm-seconds", type=float, default=None,
                   help="time budget per kind and dtype for the rounds over all token counts "
                        "(default: 4; quick 0.3); at least 3 rounds (quick 2)")
    p.add_argument("--curve", choices=["mlp", "gemm"], default=D.curve,
                   help="what becomes gemm_tflops / gemm_curve: the expert MLP as training runs "
                        "it (GEMMs + activation + autograd, counted as GEMM FLOPs) or the bare "
                        "GEMMs; both are measured and recorded (default: %(default)s)")
    p.add_argument("--clock", choices=["cpu", "wall"], default=D.clock,
                   help="clock of the written throughput: CPU time of the computing thread "
                        "(what a worker does when it has its core; insensitive to other jobs "
                        "on a shared machine) or wall time (includes time-sharing with other "
                        "jobs); both are measured and recorded; cpu needs 1 torch thread per "
                        "process, else wall is used (default: %(default)s)")
    p.add_argument("--activation", default=D.activation, choices=["gelu", "silu", "swiglu", "relu"],
                   help="expert activation of the mlp kernel (default: %(default)s, the "
                        "model default)")
    p.add_argument("--sizes", type=int, nargs="+", default=None,
                   help="ping-pong message sizes in bytes (default: %s)" % (DEFAULT_SIZES,))
    p.add_argument("--p2p-seconds", type=float, default=None,
                   help="time budget per pair and message size (default: 0.3; quick 0.05)")
    p.add_argument("--pairs", choices=["all", "star"], default=D.pairs,
                   help="ping-pong between every pair, or rank 0 <-> k (default: %(default)s)")
    p.add_argument("--workers-per-node", type=int, default=None,
                   help="node = rank // this (default: GROUP_RANK, else LOCAL_WORLD_SIZE)")
    p.add_argument("--bandwidth", choices=["pingpong", "exchange"], default=D.bandwidth,
                   help="which measured rate becomes the link bandwidth: the ping-pong rate "
                        "(one direction of the link) or the simultaneous 2-way exchange (what "
                        "one direction gets while the other is busy) (default: %(default)s)")
    p.add_argument("--intra-kind", default=D.intra_kind,
                   help="kind label of the written intra-node links (default: %(default)s; "
                        "memory-like kinds are not rate-limited by the emulator)")
    p.add_argument("--nproc", type=int, default=D.nproc,
                   help="processes to spawn when not started by torchrun (default: %(default)s)")
    p.add_argument("--threads", type=int, default=None,
                   help="torch threads per process (default: as training, OMP_NUM_THREADS if "
                        "set, else cores / local processes)")
    p.add_argument("--log-level", default=D.log_level,
                   help="rank-0 log level (default: %(default)s)")
    return parse_options(p, CalibrateOptions, argv,
                         argv=list(sys.argv[1:] if argv is None else argv))


def main(argv: Optional[Sequence[str]] = None) -> int:
    return run(parse_args(argv))


if __name__ == "__main__":
    sys.exit(main())
