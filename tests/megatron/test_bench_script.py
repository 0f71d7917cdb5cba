"""scripts/bench_moe_layer.py runs end to end (2 spawned ranks, tiny sizes) and writes the JSON
contract; plus the forced-routing helpers of megatron_moe_ext/megatron/layer_builder.py.
No speed assertions: timings on a shared CPU are not testable."""

from __future__ import annotations

import json
import os
import subprocess
import sys

import numpy as np
import pytest
import torch

from megatron_moe_ext.megatron.layer_builder import describe_counts, make_routing
from megatron_moe_ext.routing import zipf_expert_counts
from tests.helpers import REPO


@pytest.mark.timeout(300)
def test_bench_script_writes_json_with_shadows_and_balance_bound(tmp_path):
    """One launch for the JSON contract, traces, shadows and the balance bound (suite time)."""
    out, trace = tmp_path / "bench.json", tmp_path / "trace"
    cmd = [sys.executable, str(REPO / "scripts" / "bench_moe_layer.py"), "--impl", "both",
           "--world-size", "2", "--tokens", "64", "--hidden", "32", "--ffn", "48",
           "--experts", "4", "--topk", "2", "--skew", "2", "--shadow", "top_k",
           "--shadow-max-experts", "1", "--iters", "2", "--warmup", "1",
           "--json", str(out), "--trace-dir", str(trace)]
    env = dict(os.environ, PYTHONPATH=str(REPO), OMP_NUM_THREADS="1")
    proc = subprocess.run(cmd, cwd=REPO, env=env, capture_output=True, text=True, timeout=280)
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-6000:]
    assert "ratio m/f" in proc.stdout
    assert "balance_bound" in proc.stdout and "shadows (top_k)" in proc.stdout
    r = json.loads(out.read_text())
    for key in ("impls", "ratio_fwd", "ratio_bwd", "ratio_fwd_bwd", "bound_fraction_schedule",
                "overlap", "routing", "prediction", "config", "machine", "max_rel_diff_out"):
        assert key in r, key
    for impl in ("megatron", "fastermoe"):
        v = r["impls"][impl]
        for key in ("fwd_s", "bwd_s", "fwd_bwd_s", "predicted_fwd_bwd_s"):
            assert isinstance(v[key], float) and v[key] > 0, (impl, key, v[key])
        assert len(v["fwd_s_iters"]) == 2
    assert r["ratio_fwd_bwd"] > 0
    assert r["max_rel_diff_out"] < 1e-5  # same weights and routing, shadows: same outputs
    assert r["prediction"]["note"]  # says whether the cluster file is a placeholder
    o = r["overlap"]
    assert o["bound"] >= 1.0 and o["alltoall_s"] > 0 and o["expert_fwd_s"] > 0
    routing = r["routing"]
    # skew 2 with 64 tokens x top-2 per rank: exact Zipf counts, identical on both ranks
    expected = zipf_expert_counts(64, 4, 2, 2.0).tolist()
    assert routing["counts"] == [expected, expected]
    assert sum(routing["worker_loads"]) == 2 * 64 * 2
    assert len(r["traces"]) == 2 and all(os.path.isfile(p) for p in r["traces"])
    # top_k with 1 expert on Zipf(2) routing: the hottest expert (0) in every timed iteration
    assert r["shadows"] and r["shadows"][0] == [0], r["shadows"]
    assert isinstance(r["balance_bound"], float) and r["balance_bound"] > 0
    assert isinstance(r["bound_fraction"], float) and r["bound_fraction"] > 0
    mb = r["megatron_balanced"]
    assert mb["fwd_bwd_s"] > 0 and len(mb["fwd_s_iters"]) == 2
    assert mb["routing"]["expert_loads"] == [64] * 4  # 2 ranks x 64 tokens x top-2 / 4 experts


@pytest.mark.timeout(300)
def test_bench_script_with_topology_gate(tmp_path):
    """The gate re-routes the forced routing on purpose: the benchmark adopts the gated routing
    (2 nodes of 1 worker, at most 25% of each worker's copies off-node) for both layers."""
    out = tmp_path / "bench_gate.json"
    cmd = [sys.executable, str(REPO / "scripts" / "bench_moe_layer.py"), "--impl", "both",
           "--world-size", "2", "--tokens", "64", "--hidden", "32", "--ffn", "48",
           "--experts", "4", "--topk", "2", "--iters", "2", "--warmup", "1", "--json", str(out),
           "--set", "moe.router.type=topology_aware", "--set", "moe.router.offnode_fraction=0.25",
           "--set", "moe.router.workers_per_node=1"]
    env = dict(os.environ, PYTHONPATH=str(REPO), OMP_NUM_THREADS="1")
    proc = subprocess.run(cmd, cwd=REPO, env=env, capture_output=True, text=True, timeout=280)
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-6000:]
    r = json.loads(out.read_text())
    counts = r["routing"]["counts"]  # [W, E]: experts 0-1 on worker 0, 2-3 on worker 1
    for w, row in enumerate(counts):
        off = sum(row[2:]) if w == 0 else sum(row[:2])
        assert off <= 0.25 * 64 * 2, (w, row)
    assert r["max_rel_diff_out"] < 1e-5


def test_zipf_counts_balanced_and_capped():
    assert zipf_expert_counts(4096, 4, 1, 0.0).tolist() == [1024] * 4
    assert zipf_expert_counts(4096, 4, 2, 0.0).tolist() == [2048] * 4
    c = zipf_expert_counts(100, 4, 2, 3.0)  # expert 0 would get > T: capped at T
    assert c.sum() == 200 and c.max() == 100 and list(c) == sorted(c, reverse=True)
    c = zipf_expert_counts(7, 4, 4, 5.0)
    assert c.tolist() == [7, 7, 7, 7]


@pytest.mark.parametrize("tokens,experts,topk,skew", [(50, 4, 2, 0.0), (33, 8, 3, 1.5),
                                                      (20, 4, 1, 2.0)])
def test_make_routing_exact_and_topk_consistent(tokens, experts, topk, skew):
    rmap, bias = make_routing(tokens, experts, topk, skew, seed=5)
    assert rmap.dtype == torch.bool and (rmap.sum(1) == topk).all()
    assert np.array_equal(rmap.sum(0).numpy(), zipf_expert_counts(tokens, experts, topk, skew))
    top = bias.topk(topk, dim=1).indices
    assert torch.equal(torch.zeros_like(rmap).scatter_(1, top, True), rmap)
    rmap2, bias2 = make_routing(tokens, experts, topk, skew, seed=5)
    assert torch.equal(rmap, rmap2) and torch.equal(bias, bias2)


def test_describe_counts():
    d = describe_counts([[3, 1, 2, 2], [1, 1, 4, 2]], 2)
    assert d["worker_matrix"] == [[4, 4], [2, 6]]
    assert d["worker_loads"] == [6, 10]
    assert d["imbalance_max_over_mean"] == pytest.approx(1.25)
    assert d["remote_fraction"] == pytest.approx(6 / 16)
