"""train.comm_priority: moe_first in real training (torchrun, gloo, CPU runtime, real Megatron
DDP): config rules, and losses / grad norms bit-identical with the priority on and off.

2 processes with parallel.expert=2: the dense parameters are data-parallel over both (DP=2),
the experts expert-parallel. Small DDP buckets (train.ddp_bucket_size) make reductions start
during backward, so chunks are really held behind an MoE exchange (logged and checked: whether
one is queued when an exchange starts is a matter of timing, so over iterations 2-5).
"""

from __future__ import annotations

import re
from pathlib import Path

import pytest

from megatron_moe_ext.config import ConfigError, load_config
from tests.helpers import read_metrics, torchrun
from tests.training.conftest import MOCK, run_args

REPO = Path(__file__).resolve().parents[2]
BASE = [*MOCK, "train.iters=6", "parallel.expert=2", "train.overlap_grad_reduce=true",
        "train.ddp_bucket_size=4000", "train.grad_reduce_chunk_mb=0.001"]


def _err(*overrides: str) -> str:
    with pytest.raises(ConfigError) as exc:
        load_config(REPO / "configs/gpt_moe_tiny.yaml", list(overrides))
    return str(exc.value)


def test_moe_first_needs_overlap_grad_reduce_and_names_both_keys():
    msg = _err("train.comm_priority=moe_first")
    assert "train.comm_priority" in msg and "train.overlap_grad_reduce" in msg
    msg = _err("train.comm_priority=lina")
    assert "train.comm_priority" in msg and "moe_first" in msg and "none" in msg
    assert "train.grad_reduce_chunk_mb" in _err("train.grad_reduce_chunk_mb=0")
    assert "train.ddp_bucket_size" in _err("train.ddp_bucket_size=-1")
    cfg = load_config(REPO / "configs/gpt_moe_tiny.yaml",
                      ["train.comm_priority=moe_first", "train.overlap_grad_reduce=true"])
    assert cfg.train.comm_priority == "moe_first" and cfg.train.grad_reduce_chunk_mb > 0


def _run(tmp: Path, *extra: str) -> tuple[list[tuple[int, float, float]], str]:
    proc = torchrun(run_args(tmp, *BASE, *extra), nproc=2)
    rows = read_metrics(tmp / "metrics.jsonl")
    return [(r["iteration"], r["loss"], r["grad_norm"]) for r in rows], proc.stdout + proc.stderr


@pytest.mark.timeout(400)
@pytest.mark.parametrize("impl", ["megatron", "fastermoe"])
def test_losses_bit_identical_with_and_without_priority(tmp_path, impl):
    off, _ = _run(tmp_path / "off", f"moe.impl={impl}")
    on, log = _run(tmp_path / "on", f"moe.impl={impl}", "train.comm_priority=moe_first")
    assert [r[0] for r in on] == [1, 2, 3, 4, 5, 6]
    assert on == off  # loss and grad norm of every step, bit for bit
    reports = re.findall(r"(\d+) iteration\(s\) from iteration 2: (\d+) chunks, (\d+) held", log)
    assert [int(r[0]) for r in reports] == [1, 2, 4], log[-3000:]
    chunks, held = int(reports[-1][1]), int(reports[-1][2])
    assert chunks > 40, "the reduction was not cut into chunks"
    assert held > 0, "no chunk was ever held behind an exchange: the priority did nothing"
