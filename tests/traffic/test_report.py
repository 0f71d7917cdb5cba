"""The traffic report and its script on a generated 16-worker trace (johnny: 2 x 8)."""

from __future__ import annotations

import json
import subprocess
import sys

import numpy as np

from megatron_moe_ext.perf.topology import load_cluster
from megatron_moe_ext.traffic.report import build_report
from megatron_moe_ext.traffic.trace import TraceHeader, read_trace, write_trace
from tests.helpers import REPO


def _node_local_trace(path, records: int = 2):
    """Every worker routes only to the experts held by its own node (experts 8n..8n+7)."""
    h = TraceHeader(num_workers=16, num_experts=16, layers=(1,), topk=2, ep_size=16,
                    meta={"hidden_size": 128, "ffn_hidden_size": 256, "precision": "fp32"})
    rng = np.random.default_rng(0)
    recs = []
    for _ in range(records):
        c = np.zeros((1, 16, 16), dtype=np.int64)
        for w in range(16):
            n = w // 8
            c[0, w, 8 * n:8 * n + 8] = rng.integers(10, 60, size=8)
        recs.append(c)
    return write_trace(path, h, recs)


def test_report_files_and_node_locality(tmp_path) -> None:
    tr = read_trace(_node_local_trace(tmp_path / "t.bin"))
    s = build_report(tr, tmp_path / "out", load_cluster("johnny"), fabric=False)
    for name in ("layer1_workers.png", "layer1_nodes.png", "expert_popularity.png",
                 "locality.png", "summary.md", "summary.json"):
        assert (tmp_path / "out" / name).stat().st_size > 0, name
    d = s["layers"][0]
    assert d["node_share"] == 1.0 and d["region_share"][8]["aligned"] == 1.0
    assert d["region_share"][8]["best"] == 1.0 and d["region_share"][4]["best"] < 1.0
    # node-local routing sends nothing over the NIC: cheaper than balanced routing
    assert d["routing_cost"]["sync_real_over_balanced"] < 1.0
    md = (tmp_path / "out" / "summary.md").read_text()
    assert "| 8 | 100.0% | 100.0% |" in md and "Share staying inside a node: 100.0%" in md


def test_script_is_a_thin_front_end(tmp_path) -> None:
    _node_local_trace(tmp_path / "run" / "routing_trace.bin")
    proc = subprocess.run(
        [sys.executable, str(REPO / "scripts/traffic_report.py"), str(tmp_path / "run"),
         "--cluster", "johnny", "--out", str(tmp_path / "rep"), "--region", "8"],
        capture_output=True, text=True, cwd=REPO, timeout=300,
        env={"PYTHONPATH": str(REPO), "OMP_NUM_THREADS": "1", "PATH": "/usr/bin:/bin"})
    assert proc.returncode == 0, proc.stderr
    assert "| fat-tree |" in proc.stdout and "reconfigurable k=8" in proc.stdout
    fabrics = json.loads((tmp_path / "rep" / "summary.json").read_text())["fabrics"]
    assert [f["name"] for f in fabrics][:2] == ["described", "fat-tree"]
    bad = subprocess.run([sys.executable, str(REPO / "scripts/traffic_report.py"),
                          str(tmp_path / "nothing"), "--out", str(tmp_path / "x")],
                         capture_output=True, text=True, cwd=REPO,
                         env={"PYTHONPATH": str(REPO), "PATH": "/usr/bin:/bin"})
    assert bad.returncode == 2 and "no routing trace" in bad.stderr
