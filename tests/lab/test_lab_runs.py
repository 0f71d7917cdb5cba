"""The lab's two implementations agree with each other, and emulation changes only the time
source (spawned processes, gloo, no namespaces; ~1-2 minutes on 2 busy cores)."""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pytest
import torch
import torch.distributed as dist

from megatron_moe_ext.lab import LabConfig, lab_counts, lab_topology, run_lab
from megatron_moe_ext.lab.layer import LabLayer, RealExperts
from megatron_moe_ext.runtime.launch import spawn

CLUSTER = str(Path(__file__).with_name("lab2x2.yaml"))
W, E, T, H, F = 4, 8, 96, 32, 48


def _tie(rank: int, world: int, out_dir: str) -> None:
    """sync_exchange vs smart_exchange (g = 1, 2; with and without shadows; with shadows
    prefetched from a wrong prediction, used), real expert."""
    dist.init_process_group("gloo")
    torch.manual_seed(0)
    topo = lab_topology(CLUSTER, world)
    rows = lab_counts(world, E, T, 2, 1.2, seed=5)
    gen = torch.Generator().manual_seed(rank)
    x0 = torch.randn(2 * T, H, generator=gen, dtype=torch.float64)
    p0 = torch.rand(2 * T, generator=gen, dtype=torch.float64)
    gy = torch.randn(2 * T, H, generator=gen, dtype=torch.float64)
    res = {}
    for name, g, shadow in (("sync", 1, "never"), ("smart1", 1, "never"),
                            ("smart2", 2, "never"), ("smart2_shadow", 2, "top_k"),
                            ("smart2_prefetch", 2, "top_k")):
        pf = dict(prefetch="previous_iteration", prefetch_slack=1e9) if "prefetch" in name else {}
        cfg = LabConfig(cluster=CLUSTER, experts=E, tokens=T, hidden=H, ffn=F, group_size=g,
                        shadow=shadow, shadow_max_experts=2, compute="real", **pf)
        experts = RealExperts(E // world, H, F, torch.float64, 3, rank * (E // world))
        layer = LabLayer(cfg, rank, world, topo, experts, dist.group.WORLD)
        layer.dtype = torch.float64
        x, p = x0.clone().requires_grad_(True), p0.clone().requires_grad_(True)
        fn = layer.megatron if name == "sync" else layer.fastermoe
        if pf:  # predicted: the hot experts' loads one expert to the right
            fn = lambda *a: layer.fastermoe(*a, prefetch=(np.roll(rows, 1, axis=1),))  # noqa: E731
        y = fn(x, p, rows[rank])
        y.backward(gy)
        res[name] = {"y": y.detach(), "gx": x.grad, "gp": p.grad,
                     "gw": [w.grad.clone() for w in experts.params],
                     "shadows": list(layer.last_shadows), "prefetch": layer.last_prefetch}
    res["layouts"] = _layouts(topo)
    torch.save(res, f"{out_dir}/rank{rank}.pt")
    dist.destroy_process_group()


def _layouts(topo) -> dict:
    """Two planner candidates in the same processes (lab.layouts): ep=4 vs ep=2 strided."""
    from megatron_moe_ext.config import load_config
    from megatron_moe_ext.lab.layouts import (
        LayoutCheck,
        layer_shape,
        measure_candidate,
        select_candidates,
    )
    from megatron_moe_ext.perf.cluster import load_cluster
    from megatron_moe_ext.traffic.planner import plan_layouts

    cfg = load_config(None, [
        "model.num_layers=1", f"model.hidden_size={H}", f"model.ffn_hidden_size={F}",
        "model.num_attention_heads=4", f"model.seq_length={T}", "model.vocab_size=128",
        f"moe.num_experts={E}", "moe.topk=2", "train.micro_batch_size=1",
        f"train.global_batch_size={W}", "moe.impl=fastermoe", "data.mock=true"])
    check = LayoutCheck(cluster=CLUSTER, iters=1, warmup=0, dilation="20",
                        layouts=["ep=4 packed smart s=2", "ep=2 strided smart s=1"])
    out = {}
    for cand in select_candidates(plan_layouts(cfg, load_cluster(CLUSTER), W), check.layouts):
        out[cand.label] = measure_candidate(cand, layer_shape(cfg), topo, 20.0, check, CLUSTER)
    return out


@pytest.fixture(scope="module")
def tie(tmp_path_factory) -> list[dict]:
    out = tmp_path_factory.mktemp("tie")
    spawn(_tie, W, str(out))
    return [torch.load(out / f"rank{rank}.pt") for rank in range(W)]


def test_planner_candidates_run_in_their_groups(tie):
    """lab.layouts: each rank runs in its candidate's EP group, all-reduces over its ring
    (rank r of every group) only when there are several groups, and the emulated experts
    slept (backward 2x forward) inside the measured layer time."""
    for rank, res in enumerate(tie):
        one, two = res["layouts"]["ep=4 packed smart s=2"], res["layouts"]["ep=2 strided smart s=1"]
        assert one["this_rank"] == {"ep_group": [0, 1, 2, 3], "ring": []}
        assert one["allreduce_s_iters"] == [0.0]
        assert two["this_rank"] == {"ep_group": [rank % 2, rank % 2 + 2],
                                    "ring": [rank - rank % 2, rank - rank % 2 + 1]}
        assert two["allreduce_lab_s"] > 0
        for m in (one, two):
            assert 0 < m["sleep_requested_s"] <= m["layer_lab_s"]
            assert m["objective_lab_s"] == pytest.approx(m["layer_lab_s"] + m["allreduce_lab_s"])


def test_sync_baseline_equals_smart_exchange(tie):
    for rank in range(W):
        res = tie[rank]
        assert res["smart2_shadow"]["shadows"] and len(res["smart2_shadow"]["shadows"]) == 2
        assert res["smart2_prefetch"]["prefetch"] == {"used": True, "set_match": False}
        assert res["smart2_prefetch"]["shadows"] != res["smart2_shadow"]["shadows"]
        ref = res["sync"]
        assert ref["y"].abs().max() > 0 and ref["gw"][0].abs().max() > 0
        for name in ("smart1", "smart2", "smart2_shadow", "smart2_prefetch"):
            got = res[name]
            for key in ("y", "gx", "gp"):
                torch.testing.assert_close(got[key], ref[key], rtol=1e-10, atol=1e-10)
            for a, b in zip(got["gw"], ref["gw"]):
                torch.testing.assert_close(a, b, rtol=1e-10, atol=1e-10)


def _run(tmp_path: Path, compute: str, **kw) -> dict:
    out = tmp_path / f"{compute}.json"
    cfg = LabConfig(cluster=CLUSTER, world_size=W, experts=E, tokens=T, hidden=H, ffn=F,
                    iters=2, warmup=0, compute=compute, record=True, json=str(out), **kw)
    assert run_lab(cfg) == 0
    return json.loads(out.read_text())


# (the predictor policy goes through the same lab shadow choice, lab.setup.select_shadows,
# as the model policy; two cases keep the suite time down)
@pytest.mark.parametrize("shadow,routing", [("model", "exact"), ("model", "gate")])
def test_emulated_run_has_the_real_runs_plan_traffic_and_shadows(tmp_path, shadow, routing):
    kw = dict(skew=1.5, vary_routing=True, group_size=2, shadow=shadow, impl="fastermoe")
    if routing == "gate":  # router scores through the topology-aware gate
        kw.update(routing="scores", gate=True)
    emu, real = _run(tmp_path, "emulated", **kw), _run(tmp_path, "real", **kw)
    assert emu["mode"] == "emulated" and real["mode"] == "real"
    if routing != "gate":  # (the gate keeps 7/8 of the copies on-node: nothing to shadow)
        assert any(emu["shadows"])  # the skewed routing does make the policy shadow
    assert emu["shadows"] == real["shadows"]
    assert emu["shadow_set_counts"] == real["shadow_set_counts"]
    for r_emu, r_real in zip(emu["records"], real["records"]):  # per rank
        assert len(r_emu) == len(r_real) == 2
        for a, b in zip(r_emu, r_real):  # per iteration
            assert a["shadows"] == b["shadows"]
            assert a["sent_per_step"] == b["sent_per_step"]
            assert a["received_per_step"] == b["received_per_step"]
            # every expert call saw the same chunk (rows x H of the run's dtype = its bytes)
            assert [c for c in a["chunks"] if c[0] == "fwd"] == b["chunks"]
            assert a["out"] == b["out"] and a["grad_x"] == b["grad_x"]
    # and the emulated accelerator slept for them (backward 2x forward)
    assert emu["lab"]["sleep_requested_s"] > 0
    assert emu["impls"]["fastermoe"]["predicted_fwd_bwd_s"] > 0
    # validate_perf_model.py --repredict rebuilds the run's predictions from its JSON alone
    from megatron_moe_ext.lab.validate import repredict

    now = repredict(emu)
    assert now["fastermoe"] == pytest.approx(emu["impls"]["fastermoe"]["predicted_fwd_bwd_s"],
                                             rel=1e-12)


def test_bench_script_compute_emulated(tmp_path):
    """scripts/bench_moe_layer.py --compute emulated: the lab behind the bench's options and
    JSON keys; lab-only options without it are errors."""
    import subprocess
    import sys

    from tests.helpers import REPO

    script = [sys.executable, str(REPO / "scripts" / "bench_moe_layer.py")]
    env = dict(__import__("os").environ, PYTHONPATH=str(REPO), OMP_NUM_THREADS="1")
    bad = subprocess.run(script + ["--dilation", "2"], env=env, capture_output=True, text=True)
    assert bad.returncode == 2 and "--dilation needs --compute emulated" in bad.stderr
    out = tmp_path / "bench.json"
    proc = subprocess.run(script + [
        "--compute", "emulated", "--world-size", "4", "--cluster", CLUSTER, "--tokens", "64",
        "--hidden", "32", "--ffn", "48", "--experts", "8", "--iters", "1", "--warmup", "0",
        "--skew", "1.5", "--shadow", "model", "--group-size", "2", "--dilation", "3",
        "--json", str(out)], env=env, capture_output=True, text=True, timeout=300)
    assert proc.returncode == 0, proc.stdout[-2000:] + proc.stderr[-2000:]
    r = json.loads(out.read_text())
    assert r["dilation"] == 3.0 and r["mode"] == "emulated"
    for key in ("ratio_fwd_bwd", "bound_fraction", "shadows", "shadow_set_counts", "lab"):
        assert key in r
    from megatron_moe_ext.lab.validate import repredict

    now = repredict(r)
    for impl in ("megatron", "fastermoe"):
        assert r["impls"][impl]["predicted_fwd_bwd_s"] > 0
        assert now[impl] == pytest.approx(r["impls"][impl]["predicted_fwd_bwd_s"], rel=1e-12)
