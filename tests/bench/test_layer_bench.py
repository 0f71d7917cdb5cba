"""The pure parts of the layer benchmark (megatron_moe_ext/bench/layer.py) and of the
validation report (bench/validate_report.py); the spawned runs are tested through their
command lines (tests/megatron/test_bench_script.py, tests/perf/test_scripts.py)."""

from __future__ import annotations

import math

import pytest

from megatron_moe_ext.bench.bounds import bounds
from megatron_moe_ext.bench.layer import LayerBenchOptions, format_table, layer_overrides, predict
from megatron_moe_ext.bench.validate import ValidateOptions, bench_options, configurations
from megatron_moe_ext.bench.validate_report import summarize
from megatron_moe_ext.routing import zipf_counts


def _impl(fwd: list[float], bwd: list[float], cpu: float) -> dict:
    tot = [a + b for a, b in zip(fwd, bwd)]
    return {"fwd_s": sorted(fwd)[len(fwd) // 2], "bwd_s": sorted(bwd)[len(bwd) // 2],
            "fwd_bwd_s": sorted(tot)[len(tot) // 2], "fwd_bwd_s_min": min(tot),
            "cpu_fwd_bwd_s": cpu, "fwd_s_iters": fwd, "bwd_s_iters": bwd}


def test_bounds_ratios_and_balance_bound():
    res = {"impls": {"megatron": _impl([2.0, 2.0, 2.0], [4.0, 4.0, 4.0], 6.0),
                     "fastermoe": _impl([1.0, 1.0, 1.0], [2.0, 2.0, 2.0], 4.0)},
           "megatron_balanced": _impl([1.5] * 3, [1.5] * 3, 3.0)}
    out = bounds(res, a2a=0.5, c_fwd=1.0, c_bwd=2.0)
    assert out["ratio_fwd_bwd"] == pytest.approx(2.0)
    assert out["ratio_fwd_bwd_paired"] == pytest.approx(2.0)
    assert out["ratio_cpu_fwd_bwd"] == pytest.approx(1.5)
    assert out["balance_bound"] == pytest.approx(2.0)  # 6 s skewed / 3 s balanced
    assert out["bound_fraction"] == pytest.approx(1.0)
    assert out["bound_fraction_cpu"] == pytest.approx(1.5 / 2.0)
    # overlap bound: Lat_comm = 4 x 0.5 = 2, Lat_comp = 3 -> (2 + 3) / 3
    assert out["overlap"]["bound"] == pytest.approx(5 / 3)
    assert out["bound_fraction_schedule"] == pytest.approx((2.0 - 1) / (5 / 3 - 1))
    only = bounds({"impls": {"fastermoe": res["impls"]["fastermoe"]}}, 0.5, 1.0, 2.0)
    assert "ratio_fwd_bwd" not in only and only["balance_bound"] is None


def test_predict_uses_the_layer_topology_and_never_raises():
    opts = LayerBenchOptions(tokens=256, hidden=64, ffn=128, experts=4, cluster="local-cpu")
    counts = zipf_counts(2, 4, 256, 2, 1.0).tolist()
    p = predict(counts, opts, 2, shadows=[0])
    assert p["megatron"]["schedule"] == "sync" and p["fastermoe"]["shadows"] == [0]
    assert p["fastermoe"]["fwd_bwd_s"] > 0 and "note" in p
    bad = predict(counts, opts, 2, cluster="no-such-cluster")
    assert "error" in bad and "no-such-cluster" in bad["error"]


def test_options_and_overrides():
    with pytest.raises(ValueError, match="--iters"):
        LayerBenchOptions(iters=0)
    with pytest.raises(ValueError, match="shadow must be one of"):
        LayerBenchOptions(shadow="sometimes")
    o = layer_overrides(LayerBenchOptions(topk=1, overrides=["a.b=1"]), 2)
    assert "parallel.expert=2" in o and "moe.router.pre_softmax=true" in o and o[-1] == "a.b=1"
    v = ValidateOptions(quick=True)
    confs = configurations(v)
    assert len(confs) == 4 and (v.iters, v.warmup) == (2, 1)
    b = bench_options(v, confs[0], 2)
    assert (b.tokens, b.hidden, b.skew, b.iters, b.warmup) == (256, 64, 0.0, 1, 0)


def test_validation_summary_r2_and_speedup():
    rows = []
    for cid, (m, f) in enumerate(((1.0, 0.5), (2.0, 1.0), (4.0, 2.0))):
        rows.append({"config_id": cid, "impl": "megatron", "measured_s": m, "predicted_s": m})
        rows.append({"config_id": cid, "impl": "fastermoe", "measured_s": f,
                     "predicted_s": f * 2})
    s = summarize(rows)
    assert s["points"] == 6 and s["by_impl"]["megatron"]["r2"] == pytest.approx(1.0)
    assert s["by_impl"]["megatron"]["mape"] == 0.0
    assert s["speedup"]["measured_median"] == pytest.approx(2.0)
    assert s["speedup"]["predicted_median"] == pytest.approx(1.0)
    one = summarize(rows[:1])
    assert one["points"] == 1 and math.isnan(one["r2"])  # undefined with one point


def test_format_table_names_the_figures():
    r = {"impls": {"megatron": {"fwd_s": 0.1, "bwd_s": 0.2, "fwd_bwd_s": 0.3}},
         "shadow_policy": "never", "shadows": [], "bound_fraction_schedule": None,
         "overlap": {"alltoall_s": 0.01, "expert_fwd_s": 0.02, "expert_bwd_s": 0.04,
                     "bound": 1.2},
         "routing": {"worker_loads": [10, 10], "imbalance_max_over_mean": 1.0,
                     "remote_fraction": 0.5},
         "prediction": {"error": "ValueError: x"}}
    text = format_table(r)
    assert "megatron" in text and "300.00" in text and "prediction: ValueError: x" in text
