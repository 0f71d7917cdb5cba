"""The workload of :mod:`.reconf` (one process per emulated worker, under torchrun):
``python -m megatron_moe_ext.emulation.reconf_worker --control DIR``.

Notation: W ranks, T [W, W] tokens of one layer call (rank a sends T[a, b] tokens of H fp32
elements to rank b in the dispatch, the transpose in the combine).
"""

from __future__ import annotations

import argparse
import json
import time
from pathlib import Path
from typing import Optional, Sequence

import torch
import torch.distributed as dist

POLL_S = 0.01
"""How often rank 0 looks for the driver's acknowledgement."""


def _request(ctl: Path, f: int, j: int, timeout_s: float = 120.0) -> None:
    """Ask the driver for fabric f's window j and wait until it is installed."""
    (ctl / f"req-{f}-{j}").write_text("")
    end = time.monotonic() + timeout_s
    while not (ctl / f"ack-{f}-{j}").exists():
        if time.monotonic() > end:
            raise TimeoutError(f"no acknowledgement of req-{f}-{j} in {timeout_s:g} s")
        time.sleep(POLL_S)


def timed_all_to_all(T: Sequence[Sequence[int]], H: int, buf: torch.Tensor) -> float:
    """Seconds of one ``all_to_all_single`` moving T (tokens of H elements), max over ranks;
    ``buf`` holds enough elements for this rank's send and receive."""
    r = dist.get_rank()
    send = [int(T[r][b]) * H for b in range(len(T))]
    recv = [int(T[a][r]) * H for a in range(len(T))]
    out = buf[:sum(recv)]
    inp = buf[sum(recv):sum(recv) + sum(send)]
    dist.barrier()
    t0 = time.perf_counter()
    dist.all_to_all_single(out, inp, recv, send)
    took = torch.tensor([time.perf_counter() - t0], dtype=torch.float64)
    dist.all_reduce(took, op=dist.ReduceOp.MAX)
    return float(took.item())


def main(argv: Optional[Sequence[str]] = None) -> int:
    """Run every fabric's windows as the driver's plan.json says; rank 0 writes result.json."""
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--control", required=True, help="control directory of the driver")
    args = p.parse_args(argv)
    ctl = Path(args.control)
    plan = json.loads((ctl / "plan.json").read_text())
    dist.init_process_group("gloo")
    r, H, calls = dist.get_rank(), int(plan["hidden"]), plan["calls"]
    most = max(sum(T[r]) + sum(row[r] for row in T) for rec in calls for T in rec)
    buf = torch.zeros(most * H)
    timed_all_to_all(calls[0][0], H, buf)  # warm-up (not timed)
    window_s = []
    for f, _ in enumerate(plan["fabrics"]):
        per_window = []
        for j, (start, stop) in enumerate(plan["windows"]):
            if r == 0:
                _request(ctl, f, j)
            dist.barrier()
            total = 0.0
            for rec in calls[start:stop]:
                for T in rec:
                    total += timed_all_to_all(T, H, buf)
                    total += timed_all_to_all([list(col) for col in zip(*T)], H, buf)
            per_window.append(total)
        window_s.append(per_window)
    if r == 0:
        (ctl / "result.json").write_text(json.dumps({"window_s": window_s}))
    dist.destroy_process_group()
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
