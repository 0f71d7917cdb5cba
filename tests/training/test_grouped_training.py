"""Grouped-GEMM experts through the whole training stack (2 processes, EP=2, mock data, fp32):
the FasterMoE layer with grouped experts gives the stock layer's sequential-expert losses at
every step, and a checkpoint written with stock sequential experts resumes with FasterMoE
grouped experts (model and optimizer state, no conversion) on the same losses."""

from __future__ import annotations

import pytest

from tests.helpers import torchrun
from tests.training.conftest import MOCK, run_args
from tests.training.test_fastermoe_training import _losses, _same

STEPS = 8
SEQUENTIAL = ["moe.impl=megatron", "moe.grouped_gemm=false"]
GROUPED = ["moe.impl=fastermoe", "moe.grouped_gemm=true"]


@pytest.mark.timeout(1200)
def test_grouped_training_and_checkpoint_crossover(tmp_path):
    common = [*MOCK, f"train.iters={STEPS}", "parallel.expert=2"]
    ref, grouped, cross = tmp_path / "ref", tmp_path / "grouped", tmp_path / "cross"
    torchrun(run_args(ref, *common, *SEQUENTIAL), nproc=2)
    torchrun(run_args(grouped, *common, *GROUPED), nproc=2)
    _same(_losses(ref), _losses(grouped), STEPS)
    torchrun(run_args(cross, *common, *SEQUENTIAL, f"train.exit_after_iters={STEPS // 2}"),
             nproc=2)
    torchrun(run_args(cross, *common, *GROUPED), nproc=2)
    _same(_losses(ref), _losses(cross), STEPS)
