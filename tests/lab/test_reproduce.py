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
    r_squared,
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
    assert r_squared([1, 2, 3], [1, 2, 3]) == 1.0 and r_squared([1], [1]) is None
