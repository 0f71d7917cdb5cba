"""The lab under the cluster emulator (network namespaces; needs root, skipped otherwise).

The CI case: 2 namespaces x 2 workers, a few iterations (~30 s on 2 busy cores); and nothing is
left behind (no namespace, no process) after a failing or timed-out emulated run.
"""

from __future__ import annotations

import json
import os
import sys
import time
from pathlib import Path

import pytest

from tests.emulation.test_netns import _REASON, _netns
from tests.helpers import REPO

CLI = REPO / "scripts" / "emulate_cluster.py"
CLUSTER = Path(__file__).with_name("lab2x2.yaml")
needs_netns = pytest.mark.skipif(_REASON is not None, reason=f"netns emulation: {_REASON}")


class _Done:
    """Result of one emulator run: exit code, output and the emulator's pid."""

    def __init__(self, returncode: int, stdout: str, stderr: str, pid: int) -> None:
        self.returncode, self.stdout, self.stderr, self.pid = returncode, stdout, stderr, pid

    def leftovers(self) -> set[str]:
        """Namespaces of this run still present (names carry the emulator's pid)."""
        return {n for n in _netns() if n.startswith(f"mmx-{self.pid}-")
                or n.startswith(f"mmx-{self.pid}.")}


def _emulate(args: list[str], lab: list[str], timeout: float = 240) -> _Done:
    import subprocess

    env = dict(os.environ, PYTHONPATH=str(REPO), OMP_NUM_THREADS="1")
    proc = subprocess.Popen(
        [sys.executable, str(CLI), "--cluster", str(CLUSTER), "--nodes", "2",
         "--workers-per-node", "2", *args, "--", "-m", "megatron_moe_ext.lab", *lab],
        cwd=REPO, env=env, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
    out, err = proc.communicate(timeout=timeout)
    return _Done(proc.returncode, out, err, proc.pid)


def _processes_with(marker: str) -> list[int]:
    """PIDs whose command line contains ``marker``."""
    pids = []
    for d in Path("/proc").iterdir():
        if not d.name.isdigit():
            continue
        try:
            if marker in (d / "cmdline").read_bytes().replace(b"\0", b" ").decode(errors="replace"):
                pids.append(int(d.name))
        except OSError:
            continue
    return pids


SMALL = ["--experts", "4", "--tokens", "256", "--hidden", "128", "--ffn", "256",
         "--group-size", "2"]


@needs_netns
def test_ci_case_two_namespaces_four_workers(tmp_path):
    out = tmp_path / "lab.json"
    proc = _emulate(["--scale", "0.05", "--timeout", "200"],
                    [*SMALL, "--cluster", str(CLUSTER), "--iters", "3", "--warmup", "1",
                     "--json", str(out)])
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-3000:]
    assert proc.leftovers() == set()
    r = json.loads(out.read_text())
    assert r["cluster"]["name"] == "lab2x2" and r["cluster"]["workers"] == 4
    assert r["dilation"] == pytest.approx(20.0)  # auto: 1 / the emulator's scale 0.05
    assert r["lab"]["emulator_scale"] == 0.05
    for impl in ("megatron", "fastermoe"):
        v = r["impls"][impl]
        assert v["fwd_bwd_s"] > 0 and v["predicted_fwd_bwd_s"] > 0
        # dilated prediction and measurement agree within a factor 2 even on a loaded box
        assert 0.5 < v["measured_over_predicted"] < 2.0, v
    assert r["ratio_fwd_bwd"] > 0 and r["lab"]["sleep_requested_s"] > 0


@needs_netns
@pytest.mark.parametrize("how", ["timeout", "error"])
def test_failing_emulated_run_leaves_nothing_behind(tmp_path, how):
    marker = str(tmp_path / f"marker_{how}.json")
    if how == "timeout":  # stopped mid-run by the emulator
        proc = _emulate(["--scale", "0.05", "--timeout", "12", "--grace", "5"],
                        [*SMALL, "--cluster", str(CLUSTER), "--iters", "500", "--json", marker])
        assert proc.returncode == 124, proc.stdout[-2000:] + proc.stderr[-2000:]
    else:  # johnny has 8 workers per node, the emulation 2: every rank fails at start-up
        proc = _emulate(["--scale", "0.05", "--timeout", "120", "--grace", "5"],
                        [*SMALL, "--cluster", "johnny", "--json", marker])
        assert proc.returncode not in (0, 124), proc.stdout[-2000:] + proc.stderr[-2000:]
        assert "workers per node" in proc.stdout + proc.stderr
    deadline = time.monotonic() + 10
    while _processes_with(marker) and time.monotonic() < deadline:
        time.sleep(0.2)
    assert _processes_with(marker) == []
    assert proc.leftovers() == set() and "torn down" in proc.stdout
    assert not Path(marker).exists()
