"""Many lab benchmarks in one process group (one torchrun, one emulator set-up): the start of
W processes is paid once. ``python -m megatron_moe_ext.lab.suite PLAN.json`` with PLAN a JSON
list of :class:`.run.LabConfig` fields (``json`` = where each result goes); run it under
torchrun or the emulator (it does not spawn).

Notation: W workers (the world of the torchrun), D dilation.
"""

from __future__ import annotations

import json
import logging
import sys
import time
from pathlib import Path

import torch
import torch.distributed as dist

from .run import LabConfig, _init_process_group, bench_layer

logger = logging.getLogger(__name__)

__all__ = ["load_plan", "run_suite"]


def load_plan(path: str | Path) -> list[LabConfig]:
    """Validated configs of a plan file (every entry must name its ``json`` output)."""
    raw = json.loads(Path(path).read_text())
    if not isinstance(raw, list) or not raw:
        raise ValueError(f"{path}: expected a non-empty JSON list of lab configs")
    cfgs = []
    for i, entry in enumerate(raw):
        try:
            cfg = LabConfig(**entry)
            cfg.validate()
        except (TypeError, ValueError) as exc:
            raise ValueError(f"{path}[{i}]: {exc}") from None
        if not cfg.json:
            raise ValueError(f"{path}[{i}].json: every suite entry needs an output path")
        cfgs.append(cfg)
    return cfgs


def run_suite(cfgs: list[LabConfig]) -> int:
    """Run every config in order over the world group; returns the number run."""
    torch.set_num_threads(1)
    rank, world = _init_process_group()
    logging.basicConfig(level="INFO" if rank == 0 else "WARNING",
                        format=f"[lab suite rank {rank}] %(message)s", force=True)
    t0 = time.perf_counter()
    try:
        for i, cfg in enumerate(cfgs):
            logger.info("suite %d/%d -> %s", i + 1, len(cfgs), cfg.json)
            if cfg.iteration:
                from .iteration import bench_iteration

                bench_iteration(cfg, dist.group.WORLD)
            else:
                bench_layer(cfg, dist.group.WORLD)
    finally:
        dist.destroy_process_group()
    logger.info("suite: %d runs in %.1f s", len(cfgs), time.perf_counter() - t0)
    return len(cfgs)


def main(argv: list[str] | None = None) -> int:
    args = sys.argv[1:] if argv is None else argv
    if len(args) != 1:
        print("usage: python -m megatron_moe_ext.lab.suite PLAN.json", file=sys.stderr)
        return 2
    run_suite(load_plan(args[0]))
    return 0


if __name__ == "__main__":
    sys.exit(main())
