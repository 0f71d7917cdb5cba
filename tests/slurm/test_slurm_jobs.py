"""The sbatch scripts on a real two-node Slurm cluster started on this machine.

megatron_moe_ext/slurm_local.py starts slurmctld, two slurmd (nodes n1, n2, both 127.0.0.1) and a
private munged in a scratch folder (module fixture, always torn down). The jobs run the real
entry point: one torchrun per node, one CPU process each (world size 2, gloo, expert parallel 2).

Slurm missing: installed with scripts/install_slurm.sh when root; skipped otherwise.
"""

from __future__ import annotations

import json
import os
import re
import shutil
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import pytest

from megatron_moe_ext import slurm_local as lc
from tests.helpers import REPO, free_port

SBATCH = REPO / "scripts/slurm/pretrain.sbatch"
COMPARE = REPO / "scripts/slurm/compare_impls.sbatch"

# Tiny GPT-MoE on mock data: ~50 ms per iteration on 2 cores.
TINY_CONFIG = """\
model: {num_layers: 2, hidden_size: 64, ffn_hidden_size: 128, num_attention_heads: 4,
        seq_length: 32, vocab_size: 256}
moe: {num_experts: 4, topk: 2}
parallel: {expert: 2}
train: {iters: 20, micro_batch_size: 4, global_batch_size: 8, lr: 3.0e-3, lr_warmup_iters: 2,
        eval_iters: 0}
data: {mock: true, tokenizer: {type: none}}
logging: {interval: 1}
runtime: {device: cpu, num_threads: 1}
"""




def _ensure_slurm() -> None:
    missing = lc.missing_packages()
    if missing and os.geteuid() != 0:
        pytest.skip(f"Slurm is not installed (missing {' '.join(missing)}) and we are not root, "
                    "so it cannot be installed here: run scripts/install_slurm.sh as root")
    if missing:
        p = subprocess.run(["bash", str(REPO / "scripts/install_slurm.sh")], capture_output=True,
                           text=True, timeout=900)
        missing = lc.missing_packages()
        if p.returncode != 0 or missing:
            pytest.fail(f"scripts/install_slurm.sh could not install {missing}:\n"
                        f"{p.stdout}{p.stderr}")
    if os.geteuid() != 0:
        pytest.skip("the local Slurm cluster runs its daemons as root (SlurmUser=root); not root")


@pytest.fixture(scope="module")
def cluster():
    _ensure_slurm()
    # not under pytest's 0700 tmp folders: munged wants a world-searchable socket folder
    root = Path(tempfile.mkdtemp(prefix="moe-slurm-", dir="/tmp"))
    root.chmod(0o755)
    # free ports, so a concurrent test run (or a --up cluster on 17001/17002) does not collide
    ports = set()
    while len(ports) < 3:
        ports.add(free_port())
    ctld, *nodes = sorted(ports)
    c = lc.LocalSlurm(root / "cluster", node_ports=nodes, ctld_port=ctld)
    try:
        c.up(timeout=120)
        yield c
    finally:
        c.down()
        shutil.rmtree(root, ignore_errors=True)


@pytest.fixture
def workdir(cluster, tmp_path):
    """Job folder root (RUNS_ROOT) and the tiny config, both under a world-readable folder."""
    d = cluster.root.parent / tmp_path.name
    d.mkdir()
    (d / "tiny.yaml").write_text(TINY_CONFIG)
    return d


def _job_env(workdir: Path) -> dict[str, str]:
    return {
        "PYTHON": sys.executable,
        "RUNS_ROOT": str(workdir / "runs"),
        "RDZV_PORT": str(free_port()),
        "OMP_NUM_THREADS": "1",
    }


def _read(path: Path) -> str:
    return path.read_text(errors="replace") if path.is_file() else f"({path} missing)"


def _diagnose(cluster, log_dir: Path, out: Path | None = None) -> str:
    parts = []
    if out is not None:
        parts.append(f"--- {out.name}\n{_read(out)[-3000:]}")
    for f in sorted(log_dir.glob("*.log")) if log_dir.is_dir() else []:
        parts.append(f"--- {f.name}\n{_read(f)[-4000:]}")
    parts.append(cluster.daemon_logs())
    return "\n".join(parts)


def _metrics(log_dir: Path) -> list[dict]:
    path = log_dir / "metrics.jsonl"
    if not path.is_file():
        return []
    rows = []
    for line in path.read_text().splitlines():
        try:
            rows.append(json.loads(line))
        except json.JSONDecodeError:  # a line being written
            break
    return [r for r in rows if "loss" in r]


def _complete(ckpt: Path, iteration: int) -> bool:
    return (ckpt / f"iter_{iteration:07d}" / "COMPLETE").is_file()


@pytest.mark.timeout(420, method="signal")
def test_two_node_job_trains(cluster, workdir):
    """-N2, one torchrun per node: both nodes take part, the loss falls, a checkpoint is saved."""
    runs = workdir / "runs"
    out = workdir / "two-node.out"
    job = cluster.sbatch(
        ["-N", "2", "--ntasks-per-node=1", "-J", "two-node", "--time=15", "-o", str(out),
         str(SBATCH), str(workdir / "tiny.yaml"), "train.iters=20"],
        cwd=REPO, env=_job_env(workdir),
    )
    log_dir = runs / f"two-node-{job}"
    info = cluster.wait_job(job, timeout=360)
    assert info.get("JobState") == "COMPLETED" and info.get("ExitCode") == "0:0", (
        f"job {job}: {info.get('JobState')} {info.get('ExitCode')}\n"
        + _diagnose(cluster, log_dir, out)
    )

    node0, node1 = _read(log_dir / "node0.log"), _read(log_dir / "node1.log")
    assert "node rank 0 of 2 on n1" in node0, node0[-3000:]
    assert "node rank 1 of 2 on n2" in node1, node1[-3000:]
    for text in (node0, node1):
        assert "torchrun exited with status 0" in text
    assert re.search(r"world 2 = tp 1 x pp 1 x dp 2, ep 2", node0), node0[-3000:]

    config = _read(log_dir / "config.yaml")
    assert "expert: 2" in config and f"dir: {log_dir}" in config, config

    rows = _metrics(log_dir)
    assert [r["iteration"] for r in rows] == list(range(1, 21)), rows
    assert rows[-1]["loss"] < rows[0]["loss"], [r["loss"] for r in rows]
    assert _complete(runs / "two-node" / "checkpoints", 20)
    assert "done (newest checkpoint: iteration 20 of 20)" in _read(log_dir / "job.log")


@pytest.mark.timeout(600, method="signal")
def test_usr1_saves_requeues_and_resumes(cluster, workdir):
    """SIGUSR1 to the batch script (what --signal=B:USR1@T sends before the time limit): the
    training saves and exits, the script requeues the job, the requeued run resumes from the
    saved iteration (no restart from 1) and finishes."""
    runs = workdir / "runs"
    out = workdir / "requeue.out"
    iters = 120
    job = cluster.sbatch(
        ["-N", "2", "--ntasks-per-node=1", "-J", "requeue", "--time=15", "-o", str(out),
         str(SBATCH), str(workdir / "tiny.yaml"), f"train.iters={iters}"],
        cwd=REPO, env=_job_env(workdir),
    )
    log_dir = runs / f"requeue-{job}"
    ckpt = runs / "requeue" / "checkpoints"

    deadline = time.monotonic() + 300
    while len(_metrics(log_dir)) < 3:
        state = cluster.job_info(job).get("JobState")
        assert state in ("PENDING", "CONFIGURING", "RUNNING"), (
            f"job {job} is {state} before training got going\n" + _diagnose(cluster, log_dir, out)
        )
        assert time.monotonic() < deadline, (
            "no training progress\n" + _diagnose(cluster, log_dir, out)
        )
        time.sleep(0.2)
    # what --signal=B:USR1@T sends before the time limit (the outcome is checked below)
    cluster.cmd(["scancel", "--signal=USR1", "--batch", str(job)], check=False)

    info = cluster.wait_job(job, timeout=420)
    diag = _diagnose(cluster, log_dir, out)
    assert info.get("JobState") == "COMPLETED" and info.get("ExitCode") == "0:0", diag
    assert info.get("Restarts") == "1", f"Restarts={info.get('Restarts')}\n{diag}"

    node0 = _read(log_dir / "node0.log")
    m = re.search(r"stop signal received: saving and exiting at iteration (\d+)", node0)
    assert m, diag
    stopped = int(m.group(1))
    assert 3 <= stopped < iters, f"stopped at {stopped}: the signal came too late to test a resume"
    assert f"resumed from {ckpt / f'iter_{stopped:07d}'}" in node0, diag
    assert "attempt 1: node rank 0 of 2 on n1" in node0
    assert "attempt 1: node rank 1 of 2 on n2" in _read(log_dir / "node1.log")

    job_log = _read(log_dir / "job.log")
    assert f"checkpoint at iteration {stopped} of {iters}: requeueing job {job}" in job_log, diag
    assert f"resuming from the checkpoint at iteration {stopped} of {iters}" in job_log, diag

    # one metrics file over both attempts: every iteration exactly once, in order
    its = [r["iteration"] for r in _metrics(log_dir)]
    assert its == list(range(1, iters + 1)), its
    assert _complete(ckpt, stopped) and _complete(ckpt, iters), sorted(os.listdir(ckpt))
    assert (ckpt / "latest_checkpointed_iteration.txt").read_text().strip() == str(iters)


@pytest.mark.timeout(600, method="signal")
def test_compare_impls_array(cluster, workdir):
    """The two-task array runs the config with moe.impl=megatron and fastermoe, each into its
    own folder, and scripts/compare.py reads both."""
    runs = workdir / "runs"
    job = cluster.sbatch(
        ["-N", "2", "--ntasks-per-node=1", "--time=15", "-o", str(workdir / "cmp-%A_%a.out"),
         str(COMPARE), str(workdir / "tiny.yaml"), "train.iters=6"],
        cwd=REPO, env=_job_env(workdir),
    )
    base = runs / f"moe-compare-{job}"
    deadline = time.monotonic() + 540
    while True:
        q = cluster.cmd(["squeue", "-h", "-r", "-j", str(job), "-o", "%i %T"], check=False)
        if not q.stdout.strip():
            break
        assert time.monotonic() < deadline, f"array {job} not done: {q.stdout}"
        time.sleep(1)
    for impl in ("megatron", "fastermoe"):
        d = base / impl
        diag = _diagnose(cluster, d)
        assert f"impl: {impl}" in _read(d / "config.yaml"), diag
        assert [r["iteration"] for r in _metrics(d)] == list(range(1, 7)), diag
        assert _complete(d / "checkpoints", 6), diag
    p = subprocess.run(
        [sys.executable, str(REPO / "scripts/compare.py"), str(base / "megatron"),
         str(base / "fastermoe"), "--labels", "megatron", "fastermoe"],
        capture_output=True, text=True, timeout=120, cwd=REPO,
    )
    assert p.returncode == 0, p.stdout + p.stderr
    assert "fastermoe" in p.stdout
