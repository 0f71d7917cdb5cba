"""Shared test utilities: real multi-process runs (torchrun or torch.multiprocessing) on gloo."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path
from typing import Any, Sequence

from megatron_moe_ext.runtime.launch import free_port, spawn  # noqa: F401 (re-exported)

REPO = Path(__file__).resolve().parents[1]


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
