"""The performance-model scripts end to end: calibrate.py (under torchrun, 2 processes),
roofline.py and validate_perf_model.py --quick. Benchmarks, not timed tests: nothing asserts
on measured rates or on R^2, only that the outputs exist and are well formed."""

from __future__ import annotations

import json
import os
import subprocess
import sys

import pytest
import yaml

from megatron_moe_ext.emulation.netns import intra_node_link
from megatron_moe_ext.perf.topology import build_topology, load_cluster
from tests.helpers import REPO, torchrun


def _run(args: list[str], timeout: float = 120) -> subprocess.CompletedProcess:
    env = dict(os.environ, PYTHONPATH=str(REPO), OMP_NUM_THREADS="1")
    proc = subprocess.run([sys.executable, *args], cwd=REPO, env=env, capture_output=True,
                          text=True, timeout=timeout)
    assert proc.returncode == 0, f"{args} failed:\n{proc.stdout[-3000:]}\n{proc.stderr[-5000:]}"
    return proc


def test_calibrate_quick_under_torchrun_writes_loadable_cluster(tmp_path):
    out = tmp_path / "measured.yaml"
    raw = tmp_path / "measured.json"
    proc = torchrun(["--quick", "--gemm-seconds", "0.1", "--p2p-seconds", "0.02",
                     "--out", str(out), "--json", str(raw), "--compare", "local-cpu"],
                    nproc=2, timeout=120, script="scripts/calibrate.py")
    spec = load_cluster(out)
    assert spec.name == "measured"
    assert (spec.nodes, spec.workers_per_node) == (1, 2)
    assert spec.gemm_tflops["fp32"] > 0 and spec.gemm_tflops["bf16"] > 0
    assert [t for t, _ in spec.gemm_curve["fp32"]] == [64.0, 512.0, 2048.0]
    topo = build_topology(spec)
    assert topo.path(0, 1) and all(ln.bandwidth > 0 for ln in topo.path(0, 1))
    text = out.read_text()
    assert text.startswith("# measured: measured by scripts/calibrate.py on ")
    assert "# command: torchrun" in text
    data = json.loads(raw.read_text())
    m = data["measured"]
    assert m["world_size"] == 2 and m["intra"]["pairs"] == 1 and m["inter"] is None
    assert set(m["gemm_all"]) == {"gemm", "mlp"}
    assert m["intra"]["exchange_gbps"] > 0 and m["intra"]["pingpong_gbps"] > 0
    ratio = m["intra"]["exchange_gbps"] / m["intra"]["pingpong_gbps"]
    assert spec.duplex == ("half" if ratio < 0.7 else "full")
    assert f"exchange / ping-pong = {ratio:.2f} -> duplex: {spec.duplex}" in text
    # --compare printed measured vs described for GEMM and the intra-node link
    assert "measured vs described (local-cpu" in proc.stdout
    rows = data["compare"]["rows"]
    described = intra_node_link(load_cluster("local-cpu")).gbps
    intra = [r for r in rows if r["what"].startswith("intra-node")]
    assert [r["described"] for r in intra] == pytest.approx([described, described])
    assert [r["checked"] for r in intra] == [True, False]  # ping-pong checked, exchange info


def test_calibrate_duplex_rule():
    from megatron_moe_ext.bench import calib_cluster as cal

    link = {"pingpong_gbps": 0.5, "exchange_gbps": 0.26}
    assert cal.duplex_of({"inter": link, "intra": None}) == ("half", pytest.approx(0.52))
    # the inter-node pairs decide when there are any
    full = {"pingpong_gbps": 0.5, "exchange_gbps": 0.48}
    assert cal.duplex_of({"inter": full, "intra": link})[0] == "full"
    assert cal.duplex_of({"inter": None, "intra": link})[0] == "half"
    assert cal.duplex_of({"inter": None, "intra": None}) == ("full", None)


def test_calibrate_workers_per_node_makes_a_two_node_cluster(tmp_path):
    out = tmp_path / "two.yaml"
    torchrun(["--quick", "--dtypes", "fp32", "--gemm-seconds", "0.05", "--p2p-seconds", "0.02",
              "--workers-per-node", "1", "--out", str(out)],
             nproc=2, timeout=120, script="scripts/calibrate.py")
    spec = load_cluster(out)
    assert (spec.nodes, spec.workers_per_node) == (2, 1)
    assert len(spec.nics) == 1 and spec.nics[0].attach == "w0"
    assert spec.gemm_tflops["bf16"] == spec.gemm_tflops["fp32"]  # copied, not measured
    assert "bf16 copied from fp32" in out.read_text()
    assert build_topology(spec).net_bandwidth() > 0


def test_roofline_tiny_config_writes_png_and_json(tmp_path):
    png, js = tmp_path / "roof.png", tmp_path / "roof.json"
    proc = _run(["scripts/roofline.py", "--config", "configs/models/moe-gpt-s-tiny.yaml",
                 "--cluster", "local-cpu", "--skew", "1.5", "--png", str(png),
                 "--json", str(js)], timeout=60)
    assert png.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    data = json.loads(js.read_text())
    assert [r["skew"] for r in data["rows"]] == [0.0, 1.5]
    variants = {p["variant"] for p in data["points"]}
    assert variants == {"sync", "smart", "shadow", "smart+shadow"}
    for r in data["rows"]:
        assert r["sync_speedup"] == pytest.approx(1.0)
        assert r["smart+shadow_ms"] > 0 and r["bound_smart"] >= 1.0
    assert "smart" in proc.stdout and "moe-gpt-s-tiny" in proc.stdout


def test_roofline_paper_model_on_johnny(tmp_path):
    js = tmp_path / "j.json"
    _run(["scripts/roofline.py", "--config", "configs/models/moe-gpt.yaml", "--cluster",
          "johnny", "--png", str(tmp_path / "j.png"), "--json", str(js)], timeout=60)
    rows = json.loads(js.read_text())["rows"]
    balanced = rows[0]
    assert balanced["workers"] == 16 and balanced["group_size"] == 2
    assert balanced["shadow_speedup"] == pytest.approx(1.0)  # nothing worth shadowing
    assert 1.0 < balanced["smart_speedup"] <= balanced["bound_smart"] + 1e-9
    assert rows[1]["shadow_speedup"] > 1.0  # skew 1: shadowing helps


def test_validate_quick_writes_json_with_r2(tmp_path):
    js, png = tmp_path / "v.json", tmp_path / "v.png"
    _run(["scripts/validate_perf_model.py", "--quick", "--iters", "1", "--json", str(js),
          "--out-png", str(png)], timeout=180)
    data = json.loads(js.read_text())
    assert "r2" in data and isinstance(data["r2"], float)
    assert data["configurations"] == 4 and data["points"] == 8
    assert png.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    for row in data["rows"]:
        assert row["measured_s"] > 0 and row["predicted_s"] > 0
        assert row["impl"] in ("megatron", "fastermoe")
    yaml.safe_load(yaml.safe_dump(data["summary"]))  # plain data
