"""End-to-end pretraining through the real entry point under torchrun (gloo, CPU runtime):
loss falls on real text, parallel layouts train, resumed runs match uninterrupted ones exactly,
checkpoints reshard across expert-parallel sizes, metrics files hold what they promise."""

from __future__ import annotations

import json
import math
from pathlib import Path

import pytest

from tests.helpers import read_metrics, torchrun
from tests.training.conftest import MOCK, run_args


def _losses(path: Path) -> dict[int, float]:
    return {r["iteration"]: r["loss"] for r in read_metrics(path / "metrics.jsonl")}


def _falls(losses: dict[int, float], margin: float) -> None:
    its = sorted(losses)
    first = sum(losses[i] for i in its[:3]) / 3
    last = sum(losses[i] for i in its[-3:]) / 3
    assert all(math.isfinite(v) for v in losses.values()), losses
    assert last < first - margin, f"loss did not fall: first {first:.3f}, last {last:.3f}"


@pytest.mark.timeout(300)
def test_demo_config_trains_on_text_with_metrics_and_checkpoint(tmp_path, text_data):
    """The demo path (real text, BPE, EP=2): loss falls, metrics and checkpoints are complete."""
    torchrun(run_args(tmp_path, f"data.path={text_data}", "train.iters=30", "parallel.expert=2",
                      "train.eval_iters=1", "checkpoint.interval=20"), nproc=2)
    rows = [json.loads(x) for x in (tmp_path / "metrics.jsonl").read_text().splitlines()]
    train = [r for r in rows if "loss" in r]
    assert [r["iteration"] for r in train] == list(range(1, 31))
    for key in ("iteration", "loss", "lr", "grad_norm", "iter_time_s", "tokens_per_s"):
        assert all(key in r for r in train), key
    assert train[0]["tokens_per_s"] > 0 and train[0]["iter_time_s"] > 0
    layers = train[-1]["moe"]
    assert set(layers) == {"layer_1", "layer_2"}
    for stats in layers.values():
        assert stats["max_tokens"] >= stats["mean_tokens"] > 0
        assert "load_balancing_loss" in stats and stats["load_balancing_loss"] > 0
    # 8 samples x 32 tokens x top-2 routed copies per iteration, over 4 experts
    assert layers["layer_1"]["mean_tokens"] == pytest.approx(8 * 32 * 2 / 4)
    assert any("val_loss" in r for r in rows)
    _falls({r["iteration"]: r["loss"] for r in train}, margin=0.5)
    ckpt = tmp_path / "ckpt"
    assert (ckpt / "latest_checkpointed_iteration.txt").read_text().strip() == "30"
    for it in (20, 30):
        d = ckpt / f"iter_{it:07d}"
        assert (d / "COMPLETE").is_file() and (d / "run_config.yaml").is_file()
        assert (d / "metadata.json").is_file()


@pytest.fixture(scope="module")
def uninterrupted(tmp_path_factory) -> dict[int, float]:
    """Reference: 12 uninterrupted iterations, EP=2, distributed optimizer, mock data."""
    tmp = tmp_path_factory.mktemp("full")
    torchrun(run_args(tmp, *MOCK, "train.iters=12", "parallel.expert=2"), nproc=2)
    return _losses(tmp)


@pytest.mark.timeout(300)
def test_resume_matches_uninterrupted_exactly(tmp_path, uninterrupted):
    args = run_args(tmp_path, *MOCK, "train.iters=12", "parallel.expert=2")
    torchrun([*args, "train.exit_after_iters=5"], nproc=2)
    assert sorted(_losses(tmp_path)) == [1, 2, 3, 4, 5]
    torchrun(args, nproc=2)
    resumed = _losses(tmp_path)
    assert sorted(resumed) == list(range(1, 13))
    assert resumed == uninterrupted  # bit-exact, every step


@pytest.mark.timeout(300)
def test_distributed_optimizer_off_matches_on(tmp_path, uninterrupted):
    """The distributed optimizer shards state; the math is the same as plain Adam."""
    torchrun(run_args(tmp_path, *MOCK, "train.iters=12", "parallel.expert=2",
                      "train.use_distributed_optimizer=false"), nproc=2)
    plain = _losses(tmp_path)
    for it, loss in uninterrupted.items():
        assert plain[it] == pytest.approx(loss, rel=1e-5), it
    _falls(plain, margin=0.3)


@pytest.mark.timeout(400)
def test_resume_with_different_expert_parallel_size(tmp_path):
    """Save at EP=2 (4 processes: EP 2 x expert-DP 2), resume at EP=4: the run continues as if
    uninterrupted (same math, different layout)."""
    full, split = tmp_path / "full", tmp_path / "split"
    base = [*MOCK, "train.iters=10", "train.global_batch_size=16"]
    torchrun(run_args(full, *base, "parallel.expert=2"), nproc=4)
    torchrun(run_args(split, *base, "parallel.expert=2", "train.exit_after_iters=5"), nproc=4)
    torchrun(run_args(split, *base, "parallel.expert=4"), nproc=4)
    a, b = _losses(full), _losses(split)
    assert sorted(b) == list(range(1, 11))
    for it in range(1, 11):
        assert b[it] == pytest.approx(a[it], rel=1e-5), it


@pytest.mark.timeout(300)
def test_dp_reshardable_checkpoint_refuses_other_layout_clearly(tmp_path):
    base = [*MOCK, "train.iters=6", "train.global_batch_size=16",
            "checkpoint.optimizer_sharding=dp_reshardable"]
    torchrun(run_args(tmp_path, *base, "parallel.expert=2", "train.exit_after_iters=3"), nproc=4)
    proc = torchrun(run_args(tmp_path, *base, "parallel.expert=4"), nproc=4, check=False)
    assert proc.returncode != 0
    assert "dp_reshardable" in proc.stderr and "same layout" in proc.stderr
    assert (tmp_path / "ckpt" / "iter_0000003" / "COMPLETE").is_file()  # nothing was lost


@pytest.mark.timeout(400)
def test_bert_moe_trains_with_both_implementations(tmp_path, text_data):
    """BERT-MoE (masked LM + sentence order) on the sentence-split demo data: both moe.impl
    values train, with the same losses."""
    runs = {}
    for impl in ("megatron", "fastermoe"):
        torchrun(run_args(tmp_path / impl, "model.type=bert", f"data.path={text_data}",
                          "train.iters=12", "parallel.expert=2", "model.seq_length=64",
                          f"moe.impl={impl}"), nproc=2)
        rows = read_metrics(tmp_path / impl / "metrics.jsonl")
        assert all("lm_loss" in r and "sop_loss" in r for r in rows)
        runs[impl] = {r["iteration"]: r["loss"] for r in rows}
        _falls(runs[impl], margin=0.3)
    for it, loss in runs["megatron"].items():
        assert runs["fastermoe"][it] == pytest.approx(loss, rel=1e-4), it


@pytest.mark.timeout(300)
def test_sigusr1_saves_and_exits_then_resumes(tmp_path):
    """Slurm preemption: SIGUSR1 to the workers makes the run save and exit cleanly; the rerun
    resumes where it stopped."""
    import os
    import signal
    import subprocess
    import sys
    import time

    from tests.helpers import REPO, free_port

    args = run_args(tmp_path, *MOCK, "train.iters=400", "parallel.expert=2")
    cmd = [sys.executable, "-m", "torch.distributed.run", "--nproc-per-node", "2",
           "--master-port", str(free_port()), str(REPO / "pretrain_gpt_moe.py"), *args]
    env = dict(os.environ, PYTHONPATH=str(REPO), OMP_NUM_THREADS="1")
    proc = subprocess.Popen(cmd, cwd=REPO, env=env, stdout=subprocess.PIPE,
                            stderr=subprocess.STDOUT, text=True, start_new_session=True)
    metrics = tmp_path / "metrics.jsonl"
    deadline = time.time() + 200
    while time.time() < deadline and (not metrics.exists() or len(read_metrics(metrics)) < 3):
        time.sleep(0.5)
    assert metrics.exists(), "training never started"
    # torchrun starts each worker in its own session: find them as its children
    workers = subprocess.run(["pgrep", "-P", str(proc.pid)], capture_output=True,
                             text=True).stdout.split()
    assert len(workers) == 2, workers
    for pid in workers:
        os.kill(int(pid), signal.SIGUSR1)
    out, _ = proc.communicate(timeout=200)
    assert proc.returncode == 0, out[-3000:]
    stopped = max(_losses(tmp_path))
    assert 3 <= stopped < 400, stopped
    assert (tmp_path / "ckpt" / f"iter_{stopped:07d}" / "COMPLETE").is_file()
    assert "stop signal received" in out
    torchrun(args[:] + ["train.iters=" + str(stopped + 3)], nproc=2)
    assert sorted(_losses(tmp_path))[-1] == stopped + 3


@pytest.mark.timeout(120)
def test_bad_config_fails_fast_under_torchrun(tmp_path):
    """Experts not divisible by the expert-parallel size: a clear error on every rank, exit code
    2, well before any process group could hang; nothing written."""
    proc = torchrun(run_args(tmp_path, *MOCK, "moe.num_experts=3", "parallel.expert=2"),
                    nproc=2, check=False, timeout=90)
    assert proc.returncode != 0
    assert "moe.num_experts=3 is not divisible by parallel.expert=2" in proc.stderr
    assert not (tmp_path / "ckpt").exists()
