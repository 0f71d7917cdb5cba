"""megatron_moe_ext.training.compare (scripts/compare.py) on synthetic metrics files: tables, matching steps, wall time, PNG."""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import pytest

from megatron_moe_ext.training import compare
from tests.helpers import REPO


def _write(path: Path, iters: int, step_s: float, loss0: float, interval: int = 10,
           val_every: int = 50) -> Path:
    """A metrics file like the training loop's: a record every `interval` iterations
    (iter_time_s is the window mean; the first window is 3x slower), validation records."""
    lines = []
    for it in range(interval, iters + 1, interval):
        dt = step_s * (3 if it == interval else 1)
        lines.append({"iteration": it, "loss": loss0 - 0.001 * it, "lr": 1e-3, "grad_norm": 1.0,
                      "iter_time_s": dt, "tokens_per_s": 1000 / dt, "moe": {}})
        if it % val_every == 0:
            lines.append({"iteration": it, "val_loss": loss0 - 0.001 * it + 0.1,
                          "val_lm_loss": loss0 - 0.001 * it + 0.1})
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text("".join(json.dumps(r) + "\n" for r in lines) + "\n")
    return path


@pytest.fixture()
def runs(tmp_path: Path) -> tuple[Path, Path]:
    a = _write(tmp_path / "a" / "metrics.jsonl", 200, 0.2, 6.0)
    b = _write(tmp_path / "b" / "metrics.jsonl", 120, 0.1, 6.5)  # shorter and 2x faster
    return a, b


def test_tables_and_png(runs: tuple[Path, Path], tmp_path: Path,
                        capsys: pytest.CaptureFixture) -> None:
    out = tmp_path / "plots" / "cmp.png"
    rc = compare.compare_runs([str(runs[0].parent), str(runs[1])], ["base", "fast"], out)
    text = capsys.readouterr().out
    assert rc == 0
    assert "median ms/iter" in text and "base" in text and "fast" in text
    speed_part, loss_part = text.split("\n\n", 1)
    speed = {ln.split()[0]: ln.split() for ln in speed_part.splitlines()[2:]}
    assert speed["base"][2] == "200.0" and speed["fast"][2] == "100.0"  # warm-up window skipped
    assert "2.00x" in speed["fast"] and "1.00x" in speed["base"]
    assert "loss@120" in loss_part  # last common iteration of runs of different lengths
    assert "loss@200" not in loss_part
    assert out.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"


def test_matching_steps_and_wall_time(runs: tuple[Path, Path]) -> None:
    a, b = compare.load_run(str(runs[0]), "a"), compare.load_run(str(runs[1]), "b")
    steps = compare.matching_steps([a, b], points=4)
    assert steps[-1] == 120 and len(steps) == 4 and steps == sorted(set(steps))
    assert len(a.val) == 4 and all("loss" in r for r in a.train)
    wall = b.wall_times()
    assert wall[0] == pytest.approx(10 * 0.3) and wall[-1] == pytest.approx(3.0 + 11 * 1.0)
    assert b.loss_at(120) == pytest.approx(6.5 - 0.12) and b.loss_at(130) is None


def test_no_common_iteration(tmp_path: Path, capsys: pytest.CaptureFixture) -> None:
    a = _write(tmp_path / "a.jsonl", 30, 0.1, 5.0, interval=10)
    b = _write(tmp_path / "b.jsonl", 35, 0.1, 5.0, interval=7)
    assert compare.compare_runs([str(a), str(b)]) == 0
    assert "no iteration was logged by every run" in capsys.readouterr().out


def test_errors(runs: tuple[Path, Path], tmp_path: Path, capsys: pytest.CaptureFixture) -> None:
    assert compare.compare_runs([str(runs[0])]) == 2
    assert compare.compare_runs([str(runs[0]), str(runs[1])], ["only-one"]) == 2
    assert compare.compare_runs([str(runs[0]), str(tmp_path / "missing")]) == 2
    assert "no metrics file" in capsys.readouterr().err


def test_help() -> None:
    proc = subprocess.run([sys.executable, str(REPO / "scripts" / "compare.py"), "--help"],
                          capture_output=True, text=True, timeout=60)
    assert proc.returncode == 0 and "--labels" in proc.stdout and "--out" in proc.stdout


def test_cli_runs(runs: tuple[Path, Path]) -> None:
    proc = subprocess.run([sys.executable, str(REPO / "scripts" / "compare.py"), str(runs[0]),
                           str(runs[1]), "--labels", "base", "fast"], capture_output=True,
                          text=True, timeout=120, cwd=REPO)
    assert proc.returncode == 0, proc.stderr
    assert "median ms/iter" in proc.stdout and "loss@120" in proc.stdout
    bad = subprocess.run([sys.executable, str(REPO / "scripts" / "compare.py"), str(runs[0])],
                         capture_output=True, text=True, timeout=120, cwd=REPO)
    assert bad.returncode == 2 and "two or more runs" in bad.stderr
