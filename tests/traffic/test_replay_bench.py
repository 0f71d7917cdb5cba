"""Replay through the layer benchmark (real megatron-core layers, 2 gloo processes): the
routing the benchmark forces is the recorded one, count for count."""

from __future__ import annotations

import json
import subprocess
import sys

import numpy as np
import pytest

from megatron_moe_ext.traffic.replay import bench_routing
from megatron_moe_ext.traffic.trace import TraceHeader, write_trace
from tests.helpers import REPO

COUNTS = [np.array([[[50, 30, 28, 20], [10, 40, 38, 40]]]),   # record 0: [L=1, W=2, E=4]
          np.array([[[64, 10, 24, 30], [20, 20, 60, 28]]])]   # record 1 (64 tokens x top-2)


def _trace(tmp_path):
    h = TraceHeader(num_workers=2, num_experts=4, layers=(1,), topk=2, ep_size=2,
                    meta={"hidden_size": 32})
    return write_trace(tmp_path / "t.bin", h, COUNTS, iterations=[5, 10])


def test_bench_routing_is_the_recorded_row(tmp_path) -> None:
    path = _trace(tmp_path)
    for rank in (0, 1):
        rmap, _, it = bench_routing(str(path), rank, 2, 4, 2, 64)
        assert it == 10 and rmap.sum(0).tolist() == COUNTS[1][0, rank].tolist()
        rmap, _, it = bench_routing(str(path), rank, 2, 4, 2, 64, record=0)
        assert it == 5 and rmap.sum(0).tolist() == COUNTS[0][0, rank].tolist()
    rmap, _, _ = bench_routing(str(path), 0, 2, 4, 2, 32)  # rescaled to 32 tokens
    assert rmap.shape == (32, 4) and rmap.sum() == 64
    with pytest.raises(ValueError, match="world 4"):
        bench_routing(str(path), 0, 4, 4, 2, 64)
    with pytest.raises(ValueError, match="no record 2"):
        bench_routing(str(path), 0, 2, 4, 2, 64, record=2)


def test_layer_benchmark_replays_the_recorded_counts(tmp_path) -> None:
    path = _trace(tmp_path)
    out = tmp_path / "bench.json"
    proc = subprocess.run(
        [sys.executable, str(REPO / "scripts/bench_moe_layer.py"), "--world-size", "2",
         "--tokens", "64", "--hidden", "32", "--ffn", "64", "--experts", "4", "--topk", "2",
         "--iters", "1", "--warmup", "0", "--routing-trace", str(path), "--trace-record", "0",
         "--json", str(out)],
        capture_output=True, text=True, cwd=REPO, timeout=600,
        env={"PYTHONPATH": str(REPO), "OMP_NUM_THREADS": "1", "PATH": "/usr/bin:/bin"})
    assert proc.returncode == 0, proc.stderr[-3000:]
    r = json.loads(out.read_text())
    assert r["routing"]["counts"] == COUNTS[0][0].tolist()
    assert set(r["impls"]) == {"megatron", "fastermoe"} and r["megatron_balanced"]
    assert r["config"]["routing_trace"] == str(path)
