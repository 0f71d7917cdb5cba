"""Pure parts of the lab's reproduction driver and the emulator's intra-node bus sizing."""

from __future__ import annotations

import json

import pytest

from megatron_moe_ext.emulation.links import intra_node_aggregate_gbps, plan_links
from megatron_moe_ext.emulation.namespaces import EmulationError
from megatron_moe_ext.lab.reproduce import (
    build_plan,
    collect,
    layer_tokens,
    write_section,
)
from megatron_moe_ext.lab.run import LabConfig
from megatron_moe_ext.perf.topology import load_cluster


def test_aggregate_bus_reproduces_the_models_intra_node_all_to_all():
    johnny = load_cluster("johnny")
    # 56 flows; the switch-socket PCIe link carries 16 of them at 88 Gbit/s
    assert intra_node_aggregate_gbps(johnny) == pytest.approx(56 / 16 * 88)
    assert intra_node_aggregate_gbps(johnny, 2) == pytest.approx(2 * 88)  # full duplex pair
    links = {ln.name: ln for ln in plan_links(johnny, 0.01, 2, 8, intra_bus="aggregate")}
    assert links["node0.intra"].rate_mbit == pytest.approx(308 * 0.01 * 1000)
    assert {ln.name: ln for ln in plan_links(johnny, 0.01, 2, 8)}["node0.intra"].cluster_gbps == 88
    with pytest.raises(EmulationError, match="intra_bus"):
        plan_links(johnny, 0.01, 2, 8, intra_bus="tree")


def test_plan_is_valid_lab_configs_with_equal_message_bytes(tmp_path):
    entries = build_plan(["MoE-GPT-S", "MoE-GPT-L"], 512, tmp_path, group_sizes=(1, 2))
    assert len(entries) == 2 * (2 + 3 + 2)
    for e in entries:
        LabConfig(**e).validate()
    assert {e["tokens"] * e["hidden"] for e in entries} == {512 * 1024}
    assert layer_tokens(512, 4096) == 128
    assert [e["shadow"] for e in entries if e.get("skew")][:3] == ["never", "predictor", "model"]


def _result(path, impl_times, pred, load=1.0):
    path.write_text(json.dumps({
        "impls": {k: {"fwd_bwd_s": v, "cluster_fwd_bwd_s": v / 100, "predicted_fwd_bwd_s": p}
                  for (k, v), p in zip(impl_times.items(), pred)},
        "cluster": {"name": "johnny", "workers": 16}, "shadows": [[]], "dilation": 100.0,
        "machine": {"loadavg_1min_start": load, "loadavg_1min_end": load}}))


def test_collect_and_section(tmp_path):
    entries = build_plan(["MoE-GPT-S"], 512, tmp_path, group_sizes=(1,), gate=False)
    _result(tmp_path / "moe_gpt_s_bal_g1.json", {"megatron": 2.0, "fastermoe": 1.6},
            [0.019, 0.0165])
    _result(tmp_path / "moe_gpt_s_bal_g1_floor.json", {"megatron": 0.1, "fastermoe": 0.3},
            [0, 0])
    rows = collect(entries)
    assert [r["impl"] for r in rows] == ["megatron", "fastermoe"]
    assert rows[0]["floor_fraction"] == pytest.approx(0.05)
    assert rows[1]["floor_fraction"] == pytest.approx(0.3 / 1.6)
    doc = tmp_path / "repro.md"
    doc.write_text("# title\n\nkept\n")
    for _ in range(2):  # idempotent: the section is replaced, not appended again
        write_section(doc, rows, "cmd", ["- note"], None, "johnny")
    text = doc.read_text()
    assert text.count("<!-- lab:johnny:begin -->") == 1 and "kept" in text
    assert "| moe_gpt_s_bal_g1 | 1.250 | 1.152 |" in text  # measured 2.0/1.6, predicted
    assert "| no |" in text  # fastermoe's floor is 19 % of its time: not valid


def test_validate_from_lab_keeps_only_points_with_a_low_floor(tmp_path, capsys):
    from megatron_moe_ext.lab.validate import lab_rows, validate_lab

    def doc(path, times, preds, workers):
        path.write_text(json.dumps({
            "mode": "emulated", "cluster": {"name": "c", "workers": workers},
            "config": {"hidden": 8, "ffn": 16, "tokens": 4, "skew": 0.0, "group_size": 1,
                       "cluster": "johnny" if workers == 16 else "trevor", "experts": workers,
                       "topk": 1, "seed": 0, "iters": 1, "warmup": 0, "vary_routing": False,
                       "routing": "exact", "gate": False},
            "shadows": [[]], "machine": {"loadavg_1min_start": 0.5},
            "impls": {k: {"fwd_bwd_s": t, "cluster_fwd_bwd_s": t / 10, "predicted_fwd_bwd_s": p}
                      for (k, t), p in zip(times.items(), preds)}}))

    for i, (t, w) in enumerate([(1.0, 16), (2.0, 16), (4.0, 64), (8.0, 64)]):
        doc(tmp_path / f"r{i}.json", {"megatron": t, "fastermoe": t / 2}, [t / 10, t / 20], w)
        doc(tmp_path / f"r{i}_floor.json", {"megatron": 0.01, "fastermoe": 0.3 * t / 2}, [0, 0], w)
    rows = lab_rows([tmp_path])
    assert len(rows) == 8 and {r["workers"] for r in rows} == {16, 64}
    s = validate_lab([tmp_path], json_path=str(tmp_path / "v.json"))
    assert s["points"] == 4 and s["left_out_floor"] == 4  # fastermoe floors are 30 %
    assert s["by_workers"]["16"]["r2"] == pytest.approx(1.0)
    assert "R^2 by W" in capsys.readouterr().out


def test_repredict_with_the_links_simulator():
    """--repredict --simulator links: the same routing and shadows, the smart schedule priced
    per link (perf/linksim.py); sync has no pipeline, so its prediction does not change."""
    from megatron_moe_ext.lab.validate import repredict, validate_lab
    from tests.helpers import REPO

    path = REPO / "docs/data/lab/johnny_s1024b/moe_gpt_s_scores_nogate.json"
    doc = json.loads(path.read_text())
    lock, links = repredict(doc), repredict(doc, simulator="links")
    assert links["megatron"] == lock["megatron"]
    assert links["fastermoe"] != pytest.approx(lock["fastermoe"], rel=1e-3)
    with pytest.raises(ValueError, match="needs repredict_model"):
        validate_lab([path], simulator="links")
    with pytest.raises(ValueError, match="simulator must be one of"):
        repredict(doc, simulator="fifo")


def test_predict_impl_is_the_one_rule_from_an_implementation_to_the_model():
    """megatron = sync (no group, no shadows); fastermoe = smart with its group size clamped
    to the workers and its shadows; anything else is an error."""
    from megatron_moe_ext.lab.setup import lab_counts, lab_topology, predict, predict_impl

    topo = lab_topology("johnny", 16)
    c = lab_counts(16, 32, 256, 2, 1.5, 0, 0)
    args = (c, topo, 1024, 4096, "fp32")
    assert predict_impl(*args, "megatron", 4, [3]).total_s == predict(*args, "sync").total_s
    assert predict_impl(*args, "fastermoe", 4, [3]).total_s == \
        predict(*args, "smart", 4, [3]).total_s
    assert predict_impl(*args, "fastermoe", 64).total_s == predict(*args, "smart", 16).total_s
    assert predict_impl(*args, "fastermoe", 4, [3]).total_s != \
        predict_impl(*args, "fastermoe", 4).total_s
    with pytest.raises(ValueError, match="megatron or fastermoe"):
        predict_impl(*args, "both", 4)


def test_lab_rows_carry_the_routing_imbalance_the_model_sees():
    """The validation table's imbalance column of a lab point is the routing's max / mean
    worker load, the same number as the model's sync prediction's ``imbalance``; balanced
    routing is 1, Zipf-skewed routing well above."""
    import numpy as np

    from megatron_moe_ext.lab.setup import predict_impl
    from megatron_moe_ext.lab.validate import _timed_counts, lab_rows, routing_imbalance
    from tests.helpers import REPO

    skewed = REPO / "docs/data/lab/johnny_s1024b/moe_gpt_s_scores_nogate.json"
    doc = json.loads(skewed.read_text())
    cfg = doc["config"]
    topo, counts = _timed_counts(doc)
    model = np.median([predict_impl(c, topo, cfg["hidden"], cfg["ffn"], cfg["dtype"],
                                    "megatron", 1).imbalance for c in counts])
    assert routing_imbalance(doc) == pytest.approx(model, rel=1e-9)
    assert routing_imbalance(doc) > 2.0
    assert {r["imbalance"] for r in lab_rows([skewed])} == {routing_imbalance(doc)}
    balanced = REPO / "docs/data/lab/johnny_bal512q/moe_gpt_bal_g1.json"
    assert routing_imbalance(json.loads(balanced.read_text())) == pytest.approx(1.0)
