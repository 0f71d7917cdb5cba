"""megatron_moe_ext.bench.calibrate / calib_cluster without processes: per-rank measurements
-> summary -> cluster spec -> file through the loader's inverse, and back."""

from __future__ import annotations

import pytest

from megatron_moe_ext.bench.calib_cluster import (
    cluster_spec,
    header_comment,
    provenance,
    summarize,
    write_cluster,
)
from megatron_moe_ext.bench.calibrate import CalibrateOptions, compare_rows, format_compare
from megatron_moe_ext.perf.cluster import calibration_note, load_cluster


def _rows(scale: float) -> dict:
    return {"tokens": [64, 512], "wall": [0.01 * scale, 0.02 * scale],
            "cpu": [0.02 * scale, 0.04 * scale], "reps": [3, 3]}


def _link(pp: float, ex: float) -> dict:
    return {"latency_s": 40e-6, "pingpong_gbps": pp, "pingpong_effective_gbps": pp * 0.9,
            "exchange_latency_s": 80e-6, "exchange_gbps": ex, "exchange_effective_gbps": ex * 0.9}


def _measured(nodes: list[int]) -> dict:
    world = len(nodes)
    gemm = [{"mlp": {"fp32": _rows(1.0 + r)}, "gemm": {"fp32": _rows(2.0)}} for r in range(world)]
    links = {(a, b): _link(10.0 if nodes[a] == nodes[b] else 2.0,
                           9.0 if nodes[a] == nodes[b] else 0.8)
             for a in range(world) for b in range(a + 1, world)}
    return summarize(gemm, links, nodes, ["h"] * world)


def test_summary_means_over_ranks_and_splits_intra_inter():
    m = _measured([0, 0, 1, 1])
    assert (m["nodes"], m["workers_per_node"], m["world_size"]) == (2, 2, 4)
    # cpu clock by default, mean over the 4 ranks of 0.04 x (1 + r)
    assert m["gemm"]["fp32"]["tflops"] == pytest.approx(0.04 * 2.5)
    assert m["gemm"]["fp32"]["clock"] == "cpu"
    assert m["intra"]["pairs"] == 2 and m["inter"]["pairs"] == 4
    assert m["intra"]["gbps"] == 10.0 and m["inter"]["gbps"] == 2.0  # ping-pong rate
    with pytest.raises(SystemExit, match="different worker counts"):
        summarize([{"mlp": {"fp32": _rows(1)}}] * 3, {}, [0, 0, 1], ["h"] * 3)


def test_cluster_file_round_trip_with_provenance(tmp_path):
    m = _measured([0, 0, 1, 1])
    opts = CalibrateOptions(quick=True, dtypes=["fp32"])
    extra = {"threads": 1, "torch": "x", "loadavg": [0.1], "emulation": None}
    cal = provenance(m, "python scripts/calibrate.py --quick", extra)
    assert cal["tool"] == "scripts/calibrate.py" and cal["clock"] == "cpu" and cal["cores"] >= 1
    spec = cluster_spec(m, "two-nodes", "loopback", cal)
    assert (spec.nodes, spec.workers_per_node) == (2, 2)
    assert spec.gemm_tflops == {"fp32": 0.1, "bf16": 0.1}  # bf16 copied from fp32
    assert spec.duplex == "half"  # inter-node exchange / ping-pong = 0.4
    assert len(spec.links) == 2 and spec.links[0].gbps == 10.0 and spec.links[0].kind == "loopback"
    assert spec.nics[0].attach == "host" and spec.nics[0].gbps == 2.0
    assert spec.nics[0].latency_us == pytest.approx(40.0 - 40.0)  # inter minus intra latency
    comment = header_comment(m, "two-nodes", opts, "python scripts/calibrate.py --quick", extra)
    out = tmp_path / "two-nodes.yaml"
    text = write_cluster(spec, comment, str(out))
    assert text.startswith("# two-nodes: measured by scripts/calibrate.py on ")
    assert "# command: python scripts/calibrate.py --quick" in text
    assert "exchange / ping-pong = 0.40 -> duplex: half" in text
    assert "fp32 copied from" not in text and "bf16 copied from fp32" in text
    back = load_cluster(out)
    assert back == spec and back.calibration["tool"] == "scripts/calibrate.py"
    assert calibration_note(back) is None  # measured here


def test_compare_rows_against_a_described_cluster():
    m = _measured([0, 0])
    rows = compare_rows(m, "local-cpu", 1.0)
    assert [r["what"] for r in rows][0] == "GEMM fp32 (TFLOP/s)"
    intra = [r for r in rows if r["what"].startswith("intra-node")]
    assert [r["checked"] for r in intra] == [True, False]
    table, ok = format_compare(rows, "local-cpu", 1.0, tolerance=1e9)
    assert ok and table.startswith("measured vs described (local-cpu x scale 1):")
    # with no tolerance the checked (ping-pong) intra-node rate is off
    _, ok = format_compare(rows, "local-cpu", 1.0, tolerance=0.0)
    assert not ok


def test_options_resolve_quick_defaults_and_reject_bad_values():
    q = CalibrateOptions(quick=True)
    assert (q.hidden, q.ffn, q.tokens, q.sizes) == (256, 512, [64, 512, 2048], [8, 1 << 20])
    assert CalibrateOptions(hidden=100).ffn == 200
    with pytest.raises(ValueError, match="at least two sizes"):
        CalibrateOptions(sizes=[8])
    with pytest.raises(ValueError, match="bandwidth must be one of"):
        CalibrateOptions(bandwidth="fast")
