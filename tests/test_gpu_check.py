"""scripts/gpu_check.sh + megatron_moe_ext/gpu_check.py on the CPU (--device cpu --smoke): the
whole check runs (4 training runs with equal losses, the grouped-GEMM measurement, the layer
timing and a trace) and writes its JSON and markdown; the wheel-only install path works."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest

from tests.helpers import REPO


def _run(args: list[str], timeout: float) -> subprocess.CompletedProcess:
    env = dict(os.environ, PYTHONPATH=str(REPO), OMP_NUM_THREADS="1")
    return subprocess.run(["bash", str(REPO / "scripts/gpu_check.sh"), "--python", sys.executable,
                           *args], cwd=REPO, env=env, capture_output=True, text=True,
                          timeout=timeout)


@pytest.mark.timeout(900)
def test_gpu_check_smoke_on_cpu(tmp_path):
    out = tmp_path / "out"
    proc = _run(["--wheels", str(tmp_path / "none"), "--device", "cpu", "--smoke", "--steps", "2",
                 "--out", str(out)], timeout=880)
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-6000:]
    assert "no wheels in" in proc.stdout
    res = json.loads((out / "gpu_check.json").read_text())
    assert res["errors"] == {}, res["errors"]
    runs = res["train"]["runs"]
    assert sorted(runs) == ["fastermoe/grouped", "fastermoe/sequential", "megatron/grouped",
                            "megatron/sequential"]
    for name, r in runs.items():
        assert len(r["losses"]) == 2, (name, r)
        assert r["max_rel_diff"] <= 1e-5, (name, r)  # fp32 on the CPU: the same math
    assert res["train"]["passed"]
    g = res["gemm"]
    assert g["fc1_grouped_tflops"] > 0 and g["fc1_matmul_tflops"] > 0
    assert 0 < g["fraction_of_ceiling"] == min(g["fc1_fraction_of_ceiling"],
                                               g["fc2_fraction_of_ceiling"])
    lay = res["layer"]
    assert sorted(lay["times"]) == sorted(runs)
    assert all(t["fwd_bwd_s"] > 0 for t in lay["times"].values())
    assert Path(lay["trace"]).is_file()
    assert json.loads(Path(lay["trace"]).read_text())  # a Chrome trace
    md = (out / "gpu_check.md").read_text()
    assert md.startswith("### One-GPU check (") and "Unverified on one GPU:" in md
    assert "NCCL" in md and "transformer_engine" in md
    assert "| fastermoe/grouped |" in md


@pytest.mark.timeout(600)
def test_gpu_check_installs_only_given_wheels(tmp_path):
    wheels, site = tmp_path / "whl", tmp_path / "site"
    wheels.mkdir()
    subprocess.run([sys.executable, "-m", "pip", "wheel", "--quiet", "--no-deps",
                    "--no-build-isolation", "-w", str(wheels), str(REPO)], check=True,
                   capture_output=True, timeout=300, cwd=tmp_path)
    (whl,) = wheels.glob("megatron_moe_ext-*.whl")
    proc = _run(["--wheels", str(wheels), "--site", str(site), "--device", "cpu", "--smoke",
                 "--parts", "gemm", "--out", str(tmp_path / "out")], timeout=280)
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-6000:]
    assert "installing 1 wheels" in proc.stdout
    assert (site / "megatron_moe_ext" / "gpu_check.py").is_file()
    assert (site / "pretrain_gpt_moe.py").is_file()
    res = json.loads((tmp_path / "out" / "gpu_check.json").read_text())
    assert "gemm" in res and "train" not in res and res["errors"] == {}
