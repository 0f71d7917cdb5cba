"""A gloo ``all_to_all_single`` probe between the ranks of a torchrun job (e.g. under
scripts/emulate_cluster.py): front end scripts/emulation_probe.py, whose docstring describes
what is sent and reported.
"""

from __future__ import annotations

import json
import os
import socket
import statistics
import time
from typing import Optional


def probe(mb: float = 8.0, iters: int = 5, warmup: int = 1, json_path: Optional[str] = None,
          fail: bool = False) -> int:
    """Time ``iters`` all-to-alls of an ``mb`` MB fp32 tensor per rank (after ``warmup``);
    rank 0 prints ``PROBE <json>`` and writes ``json_path``. Returns the exit code: 0, 2 when
    the received data is wrong, 1 on rank 0 with ``fail`` (to test failure handling)."""
    import torch
    import torch.distributed as dist

    dist.init_process_group("gloo")
    rank, world = dist.get_rank(), dist.get_world_size()
    numel = max(world, int(mb * 1e6 / 4) // world * world)
    send = torch.ones(numel) * rank
    recv = torch.empty(numel)
    times = []
    for i in range(warmup + iters):
        dist.barrier()
        t0 = time.perf_counter()
        dist.all_to_all_single(recv, send)
        dt = torch.tensor([time.perf_counter() - t0], dtype=torch.float64)
        dist.all_reduce(dt, op=dist.ReduceOp.MAX)
        if i >= warmup:
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
        if json_path:
            with open(json_path, "w", encoding="utf-8") as fh:
                json.dump(result, fh, indent=1)
    dist.barrier()
    dist.destroy_process_group()
    if fail and rank == 0:
        return 1
    return 0 if ok else 2
