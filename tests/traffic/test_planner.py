r"""The Aristos layout planner on a hand-checkable two-node cluster.

Cluster ``pair``: 2 nodes x 2 workers; in a node both workers hang off a switch by 80 Gbit/s
links (10 GB/s), the node's one NIC (on the switch) runs at 8 Gbit/s (1 GB/s); GEMM 1 TFLOP/s.
Model: one MoE layer, H = 64, expert ffn f = 128 (gelu, alpha = 2, 2 H f = 16384 params per
expert), E = 4, top-1, T = micro-batch 4 x seq 256 = 1024 tokens per worker, global batch
16 = one micro-batch per worker (kappa = 1 layer x 1 micro-batch), stock Megatron (sync).
Balanced routing: every worker sends T / E = 256 tokens to each expert; a token is
H * 4 = 256 bytes.

Per candidate (sync: layer = 3 C + 4 A; C = 4 B alpha H^2 / P with B = T = 1024 tokens for
every layout, C = 4 * 1024 * 2 * 4096 / 1e12 = 33.55 us, 3 C = 100.66 us):

- ep=2 packed {0,1} {2,3}: each worker sends T/2 = 512 tokens = 131072 B to its node peer
  over a 10 GB/s link: A = 13.11 us, 4 A = 52.43 us. T_rho: rings {0,2} and {1,3} both cross
  n0's NIC: S = 2 experts * 16384 * 4 B = 131072 B, 2 (G-1)/G S * 2 / 1 GB/s = 262.14 us.
  Step = 100.66 + 52.43 + 262.14 = 415.2 us.
- ep=2 strided {0,2} {1,3}: 512 tokens of both workers of a node cross its NIC:
  A = 262144 B / 1 GB/s = 262.14 us, 4 A = 1048.6 us; rings {0,1}, {2,3} stay in the
  nodes: T_rho = S / 10 GB/s = 13.11 us. Step = 1162.4 us.
- ep=4: each worker sends 256 tokens to each of the 2 workers of the other node, so 1024
  tokens = 262144 B cross each NIC: 4 A = 1048.6 us, T_rho = 0. Step = 1149.2 us.
- ep=1 (every GPU all 4 experts): no all-to-all; T_rho: ring 0-1-2-3 crosses each NIC once,
  S = 4 * 16384 * 4 = 262144 B, 2 * 3/4 * S / 1 GB/s = 393.2 us. Step = 493.9 us.

So the ranking is ep=2 packed < ep=1 < ep=4 < ep=2 strided, and with a memory cap between
the ep=2 and the ep=1 memory the ep=1 layout is refused.
"""

from __future__ import annotations

import numpy as np
import pytest

from megatron_moe_ext.config import load_config
from megatron_moe_ext.perf.cluster import cluster_spec_from_dict
from megatron_moe_ext.traffic.planner import format_plan, plan_layouts, why_first

PAIR = {
    "name": "pair", "nodes": 2, "workers_per_node": 2,
    "gemm_tflops": {"fp32": 1.0, "bf16": 1.0},
    "links": [{"a": "w0", "b": "sw", "gbps": 80}, {"a": "w1", "b": "sw", "gbps": 80}],
    "nics": [{"attach": "sw", "gbps": 8}],
}


def _cfg(*extra: str):
    return load_config(None, [
        "model.num_layers=1", "model.hidden_size=64", "model.ffn_hidden_size=128",
        "model.num_attention_heads=4", "model.seq_length=256", "model.vocab_size=128",
        "moe.num_experts=4", "moe.topk=1", "moe.router.pre_softmax=true",
        "train.micro_batch_size=4",
        "train.global_batch_size=16", "data.mock=true", *extra])


def test_two_node_case_matches_the_hand_calculation() -> None:
    spec = cluster_spec_from_dict(PAIR)
    cands = plan_layouts(_cfg(), spec)
    steps = {(c.ep, c.grouping): c.step_ms * 1e3 for c in cands}  # us
    assert steps[(2, "packed")] == pytest.approx(100.66 + 52.43 + 262.14, abs=0.05)
    assert steps[(2, "strided")] == pytest.approx(100.66 + 1048.58 + 13.11, abs=0.05)
    assert steps[(4, "packed")] == pytest.approx(100.66 + 1048.58, abs=0.05)
    assert steps[(1, "packed")] == pytest.approx(100.66 + 393.22, abs=0.05)
    assert [(c.ep, c.grouping) for c in cands] == [(2, "packed"), (1, "packed"), (4, "packed"),
                                                   (2, "strided")]
    assert cands[0].groups == [[0, 1], [2, 3]]
    assert "ep=2 packed sync beats ep=1 packed sync" in why_first(cands)


def test_a_layout_that_does_not_fit_is_refused_with_the_reason() -> None:
    spec = cluster_spec_from_dict(PAIR)
    free = {c.ep: c.memory_gib for c in plan_layouts(_cfg(), spec)}
    assert free[1] > free[2] > free[4]  # fewer experts per GPU, less memory
    cap = (free[1] + free[2]) / 2
    cands = plan_layouts(_cfg(), spec, memory_gib=cap)
    ep1 = [c for c in cands if c.ep == 1]
    assert ep1 and all(c.rejected and c.rejected.startswith("memory:") for c in ep1)
    assert f"> {cap:g} GiB" in ep1[0].rejected
    assert all(c.rejected is None for c in cands if c.ep > 1)
    assert cands[-1].ep == 1  # rejected layouts come last
    text = format_plan(cands, spec, memory_gib=cap)
    assert f"memory cap {cap:g} GiB" in text
    assert "rejected ep=1: memory:" in text and text.index("ep=2 packed") < text.index("ep=4")


def test_fastermoe_searches_group_sizes_and_a_skewed_popularity_costs_more() -> None:
    spec = cluster_spec_from_dict(PAIR)
    cands = plan_layouts(_cfg("moe.impl=fastermoe"), spec)
    assert {(c.ep, c.group_size) for c in cands if c.schedule == "smart"} == {
        (2, 1), (2, 2), (4, 1), (4, 2), (4, 4)}
    balanced = {c.label: c.layer_ms for c in cands}
    skew = np.array([[0.7, 0.1, 0.1, 0.1]])
    skewed = {c.label: c.layer_ms for c in plan_layouts(_cfg("moe.impl=fastermoe"), spec,
                                                         popularity=skew)}
    assert skewed["ep=4 packed smart s=1"] > balanced["ep=4 packed smart s=1"]


def test_pretrain_describe_plan_layout_cli(tmp_path) -> None:
    """The hook: --describe --plan-layout --cluster C --json PATH prints the ranking and adds
    it to the describe JSON; without --describe the flag is an error."""
    import dataclasses
    import json
    import subprocess
    import sys

    from megatron_moe_ext.perf.cluster import save_cluster
    from tests.helpers import REPO

    # a cap between the ep=2 and the ep=1 memory (0.01476, 0.01501 GiB)
    spec = dataclasses.replace(cluster_spec_from_dict(PAIR), memory_gib=0.0149)
    save_cluster(spec, tmp_path / "pair.yaml")
    args = [sys.executable, str(REPO / "pretrain_gpt_moe.py"), "--describe", "--plan-layout",
            "--cluster", str(tmp_path / "pair.yaml"), "--json", str(tmp_path / "d.json"),
            "--world-size", "4", "model.num_layers=1", "model.hidden_size=64",
            "model.ffn_hidden_size=128", "model.num_attention_heads=4", "model.seq_length=256",
            "model.vocab_size=128", "moe.num_experts=4", "moe.topk=1",
            "moe.router.pre_softmax=true", "train.micro_batch_size=4",
            "train.global_batch_size=16", "data.mock=true", "parallel.expert=2"]
    env = {"PYTHONPATH": str(REPO), "OMP_NUM_THREADS": "1", "PATH": "/usr/bin:/bin"}
    proc = subprocess.run(args, capture_output=True, text=True, cwd=REPO, env=env, timeout=300)
    assert proc.returncode == 0, proc.stderr
    assert "1 ep=2 packed sync" in proc.stdout and "rejected ep=1: memory:" in proc.stdout
    doc = json.loads((tmp_path / "d.json").read_text())
    assert "memory_per_gpu" in doc and doc["layout_plan"]["candidates"][0]["label"] == \
        "ep=2 packed sync"
    bad = subprocess.run([a for a in args if a != "--describe"], capture_output=True,
                         text=True, cwd=REPO, env=env, timeout=300)
    assert bad.returncode == 2 and "--plan-layout only apply with --describe" in bad.stderr
