"""Shared test utilities: real multi-process runs (torchrun or torch.multiprocessing) on gloo."""

from __future__ import annotations

import json
import os
import socket
import subprocess
import sys
from pathlib import Path
from typing import Any, Callable, Sequence

import torch.multiprocessing as mp

REPO = Path(__file__).resolve().parents[1]


def free_port() -> int:
    """An unused TCP port on the loopback interface."""
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def torchrun(
    args: Sequence[str], nproc: int, timeout: float = 600, script: str = "pretrain_gpt_moe.py",
    check: bool = True,
) -> subprocess.CompletedProcess:
    """Run `script` under torchrun with `nproc` local processes; fail with its output if it fails."""
    cmd = [
        sys.executable, "-m", "torch.distributed.run", "--nproc-per-node", str(nproc),
        "--master-addr", "127.0.0.1", "--master-port", str(free_port()),
        str(REPO / script), *args,
    ]
    env = dict(os.environ, PYTHONPATH=str(REPO), OMP_NUM_THREADS="1")
    proc = subprocess.run(cmd, cwd=REPO, env=env, capture_output=True, text=True, timeout=timeout)
    if check and proc.returncode != 0:
        raise AssertionError(
            f"torchrun failed ({proc.returncode}): {' '.join(cmd)}\n--- stdout\n{proc.stdout[-4000:]}"
            f"\n--- stderr\n{proc.stderr[-8000:]}"
        )
    return proc


def read_metrics(path: str | Path) -> list[dict[str, Any]]:
    """Records of a metrics JSON-lines file (training records only, not validation)."""
    rows = [json.loads(line) for line in Path(path).read_text().splitlines() if line.strip()]
    return [r for r in rows if "loss" in r]


def _spawn_entry(rank: int, fn: Callable, world: int, port: int, args: tuple) -> None:
    os.environ.update(
        RANK=str(rank), WORLD_SIZE=str(world), LOCAL_RANK=str(rank),
        LOCAL_WORLD_SIZE=str(world), MASTER_ADDR="127.0.0.1", MASTER_PORT=str(port),
    )
    fn(rank, world, *args)


def spawn(fn: Callable, world: int, *args: Any) -> None:
    """Run fn(rank, world, *args) in `world` fresh processes with the torchrun environment set.
    `fn` must be importable (module level). Exceptions in any rank fail the caller."""
    mp.start_processes(
        _spawn_entry, args=(fn, world, free_port(), args), nprocs=world, join=True,
        start_method="spawn",
    )
