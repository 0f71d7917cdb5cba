#!/usr/bin/env python
"""Time gloo all_to_all_single between the ranks of a torchrun job (e.g. under
scripts/emulate_cluster.py). Rank 0 prints one JSON line and optionally writes it to --json.

    torchrun --nproc-per-node 2 scripts/emulation_probe.py --mb 8 --iters 5

Each rank sends a ``--mb`` MB fp32 tensor split evenly over all ranks (so with 2 ranks, each
rank sends mb/2 MB to the other). Reported: per-iteration seconds (max over ranks), median,
bytes each rank sends to other ranks, and the implied per-rank send rate.
"""

from __future__ import annotations

import argparse
import json
import os
import socket
import statistics
import sys
import time


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--mb", type=float, default=8.0, help="tensor size per rank, MB (1e6 B)")
    parser.add_argument("--iters", type=int, default=5, help="timed iterations")
    parser.add_argument("--warmup", type=int, default=1, help="untimed iterations")
    parser.add_argument("--json", default=None, help="rank 0 writes the result here")
    parser.add_argument("--fail", action="store_true", help="rank 0 exits 1 after the timing "
                        "(to test failure handling)")
    args = parser.parse_args()

    import torch
    import torch.distributed as dist

    dist.init_process_group("gloo")
    rank, world = dist.get_rank(), dist.get_world_size()
    numel = max(world, int(args.mb * 1e6 / 4) // world * world)
    send = torch.ones(numel) * rank
    recv = torch.empty(numel)
    times = []
    for i in range(args.warmup + args.iters):
        dist.barrier()
        t0 = time.perf_counter()
        dist.all_to_all_single(recv, send)
        dt = torch.tensor([time.perf_counter() - t0], dtype=torch.float64)
        dist.all_reduce(dt, op=dist.ReduceOp.MAX)
        if i >= args.warmup:
            times.append(float(dt))
    chunk = numel // world
    ok = all(float(recv[j * chunk]) == j for j in range(world))
    median = statistics.median(times)
    off_rank_bytes = 4 * chunk * (world - 1)
    result = {
        "world": world, "rank0_host": socket.gethostname(),
        "ifname": os.environ.get("GLOO_SOCKET_IFNAME"),
        "master_addr": os.environ.get("MASTER_ADDR"),
        "tensor_bytes": 4 * numel, "off_rank_bytes_per_rank": off_rank_bytes,
        "times_s": times, "median_s": median,
        "send_rate_mbit": off_rank_bytes * 8 / median / 1e6, "correct": ok,
    }
    if rank == 0:
        print("PROBE " + json.dumps(result), flush=True)
        if args.json:
            with open(args.json, "w", encoding="utf-8") as fh:
                json.dump(result, fh, indent=1)
    dist.barrier()
    dist.destroy_process_group()
    if args.fail and rank == 0:
        return 1
    return 0 if ok else 2


if __name__ == "__main__":
    sys.exit(main())
