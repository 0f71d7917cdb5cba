"""Reconfigurable circuits in the emulator (megatron_moe_ext/emulation/circuits.py, workers.py,
reconf.py): the model's plan -> htb classes / filters / tc commands (no root), the model's
per-window prediction on a hand-checked trace, and, with root + tc, that a rate change of a
real worker-to-worker transfer takes effect and that the emulator's probe runs unchanged with
one namespace per worker (~25 s together)."""

from __future__ import annotations

import json
import sys
import time

import numpy as np
import pytest

from megatron_moe_ext.emulation.circuits import (
    CIRCUIT0,
    FREE,
    INTRA,
    NIC,
    UPLINK,
    CircuitFabric,
    change_commands,
    circuit_fabric,
    reconfigure_commands,
    tc_config,
)
from megatron_moe_ext.emulation.namespaces import NS_RE, EmulationError
from megatron_moe_ext.emulation.reconf import ReconfSetup, make_plans
from megatron_moe_ext.perf.topology import GBIT, cluster_spec_from_dict, load_cluster
from megatron_moe_ext.traffic import fabric as fb
from megatron_moe_ext.traffic.synthetic import phased_pair_counts
from tests.emulation.test_netns import PROBE, _cli, _netns, _ours, _write_cluster, needs_netns
from tests.helpers import REPO

PHASED = [[(0, 1), (2, 3)], [(0, 2), (1, 3)], [(0, 3), (1, 2)]]


def _fab(**kw) -> CircuitFabric:
    args = dict(nodes=2, workers_per_node=2, nic_gbps=100.0, uplink_gbps=50.0, ocs_gbps=100.0,
                intra_gbps=200.0, scale=0.001)
    return CircuitFabric(**{**args, **kw})


def _dev(cfgs, ns, dev):
    (cfg,) = [c for c in cfgs if (c.ns, c.dev) == (ns, dev)]
    return cfg


def test_tc_config_places_circuits_nic_uplink_and_intra() -> None:
    fab = _fab()
    a = [fab.address(g) for g in range(4)]
    cfg = tc_config(fab, {(0, 2): 1})
    w0 = _dev(cfg, "w0", "eth0")
    # worker 0: circuit to 2, NIC to 3 (other node, no circuit), intra-node to 1
    assert w0.filters == ((None, a[2], CIRCUIT0 + 2), (None, a[3], NIC), (None, a[1], INTRA))
    assert w0.rate(CIRCUIT0 + 2) == pytest.approx(100 * 0.001 * GBIT)
    assert w0.rate(NIC) == pytest.approx(0.1 * GBIT) and w0.rate(INTRA) == pytest.approx(0.2 * GBIT)
    # worker 0's NIC receive side limits off-node senders without a circuit: 3, not 2
    assert _dev(cfg, "node0", "w0").filters == ((a[3], None, NIC),)
    assert _dev(cfg, "node0", "w1").filters == ((a[2], None, NIC), (a[3], None, NIC))
    # uplinks: default is the uplink class, the circuit pair bypasses in both directions
    up0, down1 = _dev(cfg, "node0", "uplink"), _dev(cfg, "sw", "p1")
    assert up0.default == UPLINK and up0.rate(UPLINK) == pytest.approx(0.05 * GBIT)
    assert up0.filters == ((a[0], a[2], FREE),) and down1.filters == ((a[0], a[2], FREE),)
    assert _dev(cfg, "node1", "uplink").filters == ((a[2], a[0], FREE),)
    assert _dev(cfg, "sw", "p0").filters == ((a[2], a[0], FREE),)
    # no circuits: every off-node peer on the NIC, nothing bypasses
    tree = tc_config(fab, {})
    assert _dev(tree, "w0", "eth0").filters[:2] == ((None, a[2], NIC), (None, a[3], NIC))
    assert _dev(tree, "node0", "uplink").filters == ()
    assert len(tree) == 4 + 4 + 2 + 2  # per worker eth0 + NIC port, per node uplink + spine
    with pytest.raises(EmulationError, match="different nodes"):
        tc_config(fab, {(0, 1): 1})  # same node


def test_reconfiguration_changes_rates_and_filters_only() -> None:
    fab = _fab(intra_gbps=None)
    one, two = tc_config(fab, {(0, 2): 1}), tc_config(fab, {(0, 2): 2})
    cmds = reconfigure_commands(one, two)
    # a second circuit on the same pair: two rate changes (both ends), filters unchanged
    assert [(ns, c[:3], c[c.index("classid") + 1]) for ns, c in cmds] == [
        ("w0", ["tc", "class", "change"], f"1:{CIRCUIT0 + 2}"),
        ("w2", ["tc", "class", "change"], f"1:{CIRCUIT0 + 0}")]
    assert cmds[0][1][cmds[0][1].index("rate") + 1] == "200000kbit"  # 2 x 100 Gb/s x 0.001
    # moving the circuit from (0, 2) to (1, 3): filters replaced where they differ, never on
    # devices that keep theirs
    moved = reconfigure_commands(one, tc_config(fab, {(1, 3): 1}))
    touched = {(ns, c[c.index("dev") + 1]) for ns, c in moved}
    assert ("w0", "eth0") in touched and ("node0", "uplink") in touched
    assert all(c[1] != "class" for _, c in moved)  # same rates: filters only
    dels = [c for _, c in moved if c[:3] == ["tc", "filter", "del"]]
    assert len(dels) == len(touched)
    # back to the tree: the bypass filters go and none come back on the uplinks
    back = reconfigure_commands(one, tc_config(fab, {}))
    up = [c for ns, c in back if ns == "node0" and "uplink" in c]
    assert up == [["tc", "filter", "del", "dev", "uplink", "parent", "1:", "prio", "1"]]
    with pytest.raises(EmulationError, match="classes"):
        change_commands(_dev(one, "w0", "eth0"), _dev(one, "w1", "eth0"))


def test_circuit_fabric_takes_the_model_tree_rates() -> None:
    spec = load_cluster("johnny")
    tree = fb.tree_fabric(spec, 16, 100.0, oversub=4.0)
    fab = circuit_fabric(tree, spec, 2, 200.0, 0.01)
    assert (fab.nic_gbps, fab.uplink_gbps, fab.ocs_gbps) == (100.0, 8 * 100.0 / 4, 200.0)
    assert fab.intra_gbps == pytest.approx(88.0)  # johnny's PCIe
    with pytest.raises(EmulationError, match="one node per rack"):
        circuit_fabric(fb.tree_fabric(spec, 16, 100.0, 4.0, rack_nodes=2), spec, 2, 200.0, 0.01)
    assert NS_RE.match("mmx-12.3-node1w0") and NS_RE.match("mmx-12-node0")


def test_plans_and_prediction_on_phased_pairs() -> None:
    """4 nodes x 1 worker, H 256 fp32, heavy pairs 2400 tokens each way, light 300; B 100,
    oversub 4 (U 25 Gb/s = 3.125 GB/s), circuits 100 Gb/s, duplex half. Tree, per all-to-all:
    the heavy pair's both directions 2 x 2400 x 1 KiB = 4.9152 MB over 3.125 GB/s =
    1.5729 ms (the busiest uplink carries only 3000 KiB: 0.983 ms). With the right circuits:
    4.9152 MB over 12.5 GB/s = 0.3932 ms. A window = 3 records x (dispatch + combine)."""
    recs = phased_pair_counts(4, PHASED, 6, 2400, 300).astype(float)
    spec = load_cluster(str(REPO / "docs/data/traffic/reconf4.yaml"))
    plans = make_plans(recs, 4, ReconfSetup("unused", spec, 0.002))
    right = [{(0, 1): 1, (2, 3): 1}, {(0, 2): 1, (1, 3): 1}, {(0, 3): 1, (1, 2): 1}]
    assert [w.circuits for w in plans["reconfigurable"]] == \
        [right[0], right[0], right[0], right[1], right[1], right[2]]  # lags one window
    assert all(w.circuits == right[0] for w in plans["static"])
    assert [(w.start, w.stop) for w in plans["tree"]] == [(i, i + 3) for i in range(0, 18, 3)]
    base = fb.tree_fabric(spec, 4, 100.0, 4.0)
    ms = {k: np.array(fb.window_comm_s(recs, p, base, 100.0, 4, 256)) * 1e3
          for k, p in plans.items()}
    np.testing.assert_allclose(ms["tree"], 6 * 4.9152e6 / 3.125e9 * 1e3, rtol=1e-9)
    hit = 6 * 4.9152e6 / 12.5e9 * 1e3
    np.testing.assert_allclose(ms["reconfigurable"], [hit, hit, ms["tree"][0], hit,
                                                      ms["tree"][0], hit], rtol=1e-9)


def test_predict_only_prices_stale_circuits_as_the_tree(tmp_path) -> None:
    """scripts/emulate_reconf.py --predict-only (no root) on the bundled 3 x 2 trace: a window
    whose circuits miss the heavy pairs costs what the uplink-bound traffic costs (no relay
    through a node-mate's circuit), well above a window whose circuits hit them."""
    import subprocess

    out = tmp_path / "pred.json"
    proc = subprocess.run(
        [sys.executable, str(REPO / "scripts/emulate_reconf.py"), "--trace",
         str(REPO / "docs/data/traffic/phased6.bin"), "--cluster",
         str(REPO / "docs/data/traffic/reconf3x2.yaml"), "--scale", "0.002", "--predict-only",
         "--json", str(out)], capture_output=True, text=True, timeout=120)
    assert proc.returncode == 0, proc.stderr
    rec = json.loads(out.read_text())
    ms = {(r["fabric"], r["window"]): r["predicted_lab_ms"] for r in rec["rows"]}
    assert all(r["measured_lab_ms"] is None for r in rec["rows"]) and rec["wall_s"] is None
    hit, stale, tree = ms["reconfigurable", 3], ms["reconfigurable", 2], ms["tree", 2]
    assert hit < stale / 2 and stale <= tree
    assert ms["static", 3] == pytest.approx(stale)  # window 0's circuits, stale from window 2 on
    assert "| reconfigurable | 3 | 0-4 1-3 2-5 |" in proc.stdout and "| - |" in proc.stdout


def test_worker_mode_dry_run_launches_one_torchrun_per_worker(tmp_path) -> None:
    cluster = str(REPO / "docs/data/traffic/reconf3x2.yaml")
    proc = _cli(["--cluster", cluster, "--scale", "0.002", "--worker-namespaces", "--oversub",
                 "4", "--dry-run", "--", "x.py"])
    assert proc.returncode == 0, proc.stderr
    runs = [ln for ln in proc.stdout.splitlines() if "torch.distributed.run" in ln]
    assert len(runs) == 6
    assert "node1w1 env GLOO_SOCKET_IFNAME=eth0" in runs[3]
    assert "--nnodes 6 --nproc-per-node 1 --node-rank 3 --master-addr 10.77.1.1" in runs[3]
    assert "uplink 50," in proc.stdout  # 2 x 100 Gb/s / 4
    bad = _cli(["--cluster", cluster, "--scale", "1", "--worker-namespaces", "--delay-ms", "1",
                "--dry-run", "--", "x.py"])
    assert bad.returncode == 2 and "--worker-namespaces takes none of" in bad.stderr


_SERVER = """import socket, sys
s = socket.socket(); s.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
s.bind(('0.0.0.0', 5001)); s.listen(1); n_bytes = int(sys.argv[1])
for _ in range(int(sys.argv[2])):
    c, _ = s.accept(); n = 0
    while n < n_bytes:
        n += len(c.recv(1 << 20))
    c.sendall(b'k'); c.close()
"""
_CLIENT = """import socket, sys, time
c = socket.create_connection((sys.argv[1], 5001)); t = time.perf_counter()
c.sendall(b'x' * int(sys.argv[2])); c.recv(1); print(time.perf_counter() - t)
"""


@needs_netns
def test_rate_change_takes_effect_between_two_workers() -> None:
    """2 nodes x 1 worker: 2 MB from worker 0 to 1 on the tree (uplink 50 Mbit/s emulated),
    after set_circuits at the circuit's 200 Mbit/s, and after going back."""
    from megatron_moe_ext.emulation.workers import WorkerEmulatedCluster

    before = _ours(_netns())
    spec = cluster_spec_from_dict({"name": "circ-test", "nodes": 2, "workers_per_node": 1,
                                   "gemm_tflops": {"fp32": 1.0, "bf16": 1.0},
                                   "nics": [{"attach": "w0", "gbps": 100}]})
    fab = _fab(workers_per_node=1, uplink_gbps=25.0, intra_gbps=None, scale=0.002)
    n = 2_000_000
    rates = []
    with WorkerEmulatedCluster(spec, fab) as cl:
        srv = cl.popen_in("w1", [sys.executable, "-c", _SERVER, str(n), "3"])
        time.sleep(0.5)
        for circuits in ({}, {(0, 1): 1}, {}):
            took = cl.set_circuits(circuits)
            assert took < 5.0
            out = cl.exec_in("w0", [sys.executable, "-c", _CLIENT, fab.address(1), str(n)],
                             timeout=30)
            assert out.returncode == 0, out.stderr
            rates.append(n * 8 / float(out.stdout) / 1e6)
        stats = cl.exec_in("node0", ["tc", "-s", "filter", "show", "dev", "uplink"]).stdout
        srv.wait(timeout=10)
    assert rates[0] == pytest.approx(50.0, rel=0.25), rates
    assert rates[1] == pytest.approx(200.0, rel=0.25), rates
    assert rates[2] == pytest.approx(50.0, rel=0.25), rates
    assert "flowid" not in stats  # back on the tree: no bypass filter left
    assert _ours(_netns()) == before



@needs_netns
def test_cli_worker_namespaces_runs_the_probe(tmp_path) -> None:
    """scripts/emulate_cluster.py --worker-namespaces, 2 nodes x 1 worker, NIC 200 Mbit/s:
    the probe's 8 MB all-to-all (4 MB each way) within the bounds of the node mode's test
    (test_netns.test_nic_rate_limit_scales_all_to_all), over each worker's own eth0."""
    before = _ours(_netns())
    out = tmp_path / "probe.json"
    proc = _cli(["--cluster", str(_write_cluster(tmp_path, 0.2, 10, m=1)), "--scale", "1",
                 "--nodes", "2", "--worker-namespaces", "--timeout", "90", "--", str(PROBE),
                 "--mb", "8", "--iters", "3", "--json", str(out)])
    assert proc.returncode == 0, f"{proc.stdout[-3000:]}\n{proc.stderr[-3000:]}"
    assert "one namespace per worker" in proc.stdout
    res = json.loads(out.read_text())
    assert res["correct"] and res["ifname"] == "eth0"
    one_way = 4 * 2**20 * 8 / 200e6
    assert 0.9 * one_way < res["median_s"] < 2.4 * one_way, res["median_s"]
    assert _ours(_netns()) == before
