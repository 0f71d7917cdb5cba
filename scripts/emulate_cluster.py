#!/usr/bin/env python
"""Run a torchrun workload on an emulated multi-node cluster (network namespaces + tbf).

    scripts/emulate_cluster.py --cluster johnny --scale auto --nodes 2 --workers-per-node 1 \\
        -- scripts/emulation_probe.py --mb 8
    scripts/emulate_cluster.py --cleanup            # remove leftovers of dead runs

One network namespace per node, a bridge (in its own namespace) as the switch, NIC and
intra-node rates = cluster rates x scale (scale ``auto`` = local GEMM TFLOP/s / cluster GEMM
TFLOP/s), one torchrun per node with GLOO_SOCKET_IFNAME=eth0 and rendezvous at node 0.
Needs root and iproute2. Exit code: the worst exit code of the nodes (2: setup problem,
124: --timeout, 128+s: interrupted by signal s). See docs/emulation.md.
"""

from __future__ import annotations

import argparse
import os
import sys

from megatron_moe_ext.emulation.netns import (
    EmulatedCluster,
    EmulationError,
    EmulationUnavailable,
    check_prerequisites,
    cleanup,
    measure_local_gemm_tflops,
)
from megatron_moe_ext.emulation.namespaces import Interrupted, signals_raise
from megatron_moe_ext.emulation.workers import WorkerEmulatedCluster
from megatron_moe_ext.perf.topology import ClusterSpecError, load_cluster


def parse(argv: list[str]) -> tuple[argparse.Namespace, list[str]]:
    """Split at the first ``--``: options before, the torchrun command after."""
    if "--" in argv:
        cut = argv.index("--")
        own, cmd = argv[:cut], argv[cut + 1:]
    else:
        own, cmd = argv, []
    p = argparse.ArgumentParser(
        description=__doc__.split("\n\n")[0].strip(),
        usage="%(prog)s --cluster CLUSTER.yaml --scale auto|FACTOR --nodes N "
              "--workers-per-node W [--delay-ms D] [--dry-run] -- SCRIPT [ARGS...]\n"
              "       %(prog)s --cleanup [--all]",
    )
    p.add_argument("--cluster", help="cluster YAML path or name in configs/clusters/")
    p.add_argument("--scale", default="auto",
                   help="'auto' (local GEMM TFLOP/s / cluster GEMM TFLOP/s) or a factor")
    p.add_argument("--nodes", type=int, default=None, help="emulated nodes (default: cluster's)")
    p.add_argument("--workers-per-node", type=int, default=None,
                   help="torchrun processes per node (default: cluster's)")
    p.add_argument("--delay-ms", type=float, default=0.0,
                   help="one-way netem delay per node NIC (needs sch_netem in the kernel)")
    p.add_argument("--dtype", default="fp32", help="dtype of gemm_tflops used by --scale auto")
    p.add_argument("--gemm-seconds", type=float, default=1.0,
                   help="duration of the local GEMM measurement for --scale auto")
    p.add_argument("--no-intra-limit", action="store_true",
                   help="do not rate-limit intra-node traffic (lo)")
    p.add_argument("--intra-bus", choices=["link", "aggregate"], default="link",
                   help="size of the shared intra-node limit on lo: one link's rate (link) or "
                        "the rate at which the node's uniform all-to-all takes the model's "
                        "time (aggregate, what the scale lab's 8-worker nodes need)")
    p.add_argument("--worker-namespaces", action="store_true",
                   help="one namespace (address) per worker, one torchrun each; the links are "
                        "the model's tree fabric as htb classes (a NIC per worker at the "
                        "cluster's first NIC rate, node uplinks of M x NIC / --oversub); "
                        "see docs/emulation.md")
    p.add_argument("--oversub", type=float, default=1.0,
                   help="with --worker-namespaces: uplink oversubscription of the tree")
    p.add_argument("--master-port", type=int, default=29500)
    p.add_argument("--timeout", type=float, default=None, help="stop the run after S seconds")
    p.add_argument("--grace", type=float, default=30.0,
                   help="seconds the other nodes get after one node fails")
    p.add_argument("--dry-run", action="store_true",
                   help="print the plan and the commands, create nothing (no root needed)")
    p.add_argument("--cleanup", action="store_true",
                   help="remove leftover mmx-<pid>-* namespaces of processes that are gone")
    p.add_argument("--all", action="store_true", help="with --cleanup: also of live processes")
    args = p.parse_args(own)
    if not args.cleanup:
        if not args.cluster:
            p.error("--cluster is required")
        if args.worker_namespaces and (args.delay_ms or args.no_intra_limit
                                       or args.intra_bus != "link"):
            p.error("--worker-namespaces takes none of --delay-ms, --no-intra-limit, "
                    "--intra-bus (its limits are the tree's htb classes)")
        if not cmd:
            p.error("give the command after '--': -- SCRIPT [ARGS...]")
    return args, cmd


def main(argv: list[str] | None = None) -> int:
    args, cmd = parse(sys.argv[1:] if argv is None else argv)
    with signals_raise():
        return _main(args, cmd)


def _main(args: argparse.Namespace, cmd: list[str]) -> int:
    try:
        if args.cleanup:
            check_prerequisites()
            removed = cleanup(all_=args.all)
            print(f"[emulate] removed {len(removed)} namespace(s)"
                  + (": " + " ".join(removed) if removed else ""), flush=True)
            return 0
        spec = load_cluster(args.cluster)
        if not args.dry_run:
            check_prerequisites()
        if args.scale == "auto":
            if args.dtype not in spec.gemm_tflops:
                raise EmulationError(f"{spec.name}: no gemm_tflops for {args.dtype}")
            local = measure_local_gemm_tflops(seconds=args.gemm_seconds, dtype=args.dtype)
            scale = local / spec.gemm_tflops[args.dtype]
            print(f"[emulate] local GEMM {local:.4f} TFLOP/s ({args.dtype}, 1 thread), cluster "
                  f"{spec.name} {spec.gemm_tflops[args.dtype]:g} TFLOP/s -> scale {scale:.6g}",
                  flush=True)
        else:
            scale = float(args.scale)
            print(f"[emulate] scale {scale:.6g} (given)", flush=True)
        if args.worker_namespaces:
            cluster: EmulatedCluster = WorkerEmulatedCluster.for_tree(
                spec, scale, args.nodes, args.workers_per_node, args.oversub,
                master_port=args.master_port, dry_run=args.dry_run)
        else:
            cluster = EmulatedCluster(
                spec, scale, args.nodes, args.workers_per_node, args.delay_ms,
                intra_limit=not args.no_intra_limit, master_port=args.master_port,
                dry_run=args.dry_run, intra_bus=args.intra_bus,
            )
        total = cluster.nodes * cluster.workers_per_node
        if total > (os.cpu_count() or 1):
            print(f"[emulate] warning: {total} worker processes on {os.cpu_count()} CPU cores "
                  "(oversubscribed: compute slows down, the scale no longer matches)", flush=True)
        print("[emulate] " + cluster.describe().replace("\n", "\n[emulate] "), flush=True)
        with cluster:
            rc = cluster.run(cmd, timeout=args.timeout, grace_s=args.grace)
        if args.dry_run:
            for c in cluster.commands:
                print("  " + " ".join(c))
        print(f"[emulate] node exit codes {cluster.returncodes} -> {rc}; torn down", flush=True)
        return rc
    except Interrupted as exc:
        print(f"[emulate] interrupted by signal {exc.signum}; torn down", file=sys.stderr,
              flush=True)
        return 128 + exc.signum
    except EmulationUnavailable as exc:
        print(f"[emulate] cannot emulate: {exc}", file=sys.stderr, flush=True)
        return 2
    except (EmulationError, ClusterSpecError, ValueError) as exc:
        print(f"[emulate] error: {exc}", file=sys.stderr, flush=True)
        return 2


if __name__ == "__main__":
    sys.exit(main())
