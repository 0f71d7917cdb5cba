"""Cluster emulation with network namespaces (megatron_moe_ext/emulation,
scripts/emulate_cluster.py).

The tests that create namespaces need root and a working ``ip netns``; they are skipped with the
reason otherwise. The plan / dry-run / scale tests run everywhere. Whole file: ~2 minutes
(eight short torchrun jobs on 2 cores).
"""

from __future__ import annotations

import json
import os
import shutil
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest

from megatron_moe_ext.emulation import (
    EmulatedCluster,
    auto_scale,
    measure_local_gemm_tflops,
    netem_available,
    plan_links,
)
from megatron_moe_ext.emulation.links import (
    NAMESPACE_SYSCTLS,
    TBF_LATENCY_MS,
    TBF_MIN_QUEUE_BYTES,
    TCP_INITIAL_WINDOW_BYTES,
    burst_bytes,
    namespace_sysctls,
    queue_limit_bytes,
    tbf_args,
    tcp_rcvbuf_bytes,
)
from megatron_moe_ext.emulation.namespaces import Interrupted, signals_raise
from megatron_moe_ext.perf.topology import cluster_spec_from_dict, load_cluster
from tests.helpers import REPO

CLI = REPO / "scripts" / "emulate_cluster.py"
PROBE = REPO / "scripts" / "emulation_probe.py"
BENCH = REPO / "scripts" / "bench_moe_layer.py"


def _netns_unavailable() -> str | None:
    """Why namespaces cannot be created here, or None."""
    if os.geteuid() != 0:
        return "needs root (network namespaces and tc qdiscs need CAP_NET_ADMIN)"
    if shutil.which("ip") is None or shutil.which("tc") is None:
        return "needs iproute2 (ip, tc): apt-get install -y iproute2"
    proc = subprocess.run(["ip", "netns", "list"], capture_output=True, text=True)
    if proc.returncode != 0:
        return f"'ip netns' unavailable: {proc.stderr.strip()}"
    return None


_REASON = _netns_unavailable()
needs_netns = pytest.mark.skipif(_REASON is not None, reason=f"netns emulation: {_REASON}")


def _netns() -> set[str]:
    proc = subprocess.run(["ip", "netns", "list"], capture_output=True, text=True, check=True)
    return {line.split()[0] for line in proc.stdout.splitlines() if line.strip()}


def _ours(names: set[str]) -> set[str]:
    return {n for n in names if n.startswith("mmx-")}


def _write_cluster(tmp: Path, nic_gbps: float, intra_gbps: float, m: int = 2) -> Path:
    """A 2-node test cluster with 1 GEMM TFLOP/s, so --scale 1 means the YAML's rates."""
    path = tmp / f"c_{nic_gbps}_{intra_gbps}.yaml"
    links = "links:\n  - {a: w0, b: w1, gbps: %g, kind: pcie}\n" % intra_gbps if m > 1 else ""
    path.write_text(
        "name: emu-test\nnodes: 2\nworkers_per_node: %d\n"
        "gemm_tflops: {fp32: 1.0, bf16: 1.0}\n%s"
        "nics:\n  - {attach: w0, gbps: %g}\n" % (m, links, nic_gbps)
    )
    return path


def _cli(args: list[str], timeout: float = 120) -> subprocess.CompletedProcess:
    env = dict(os.environ, PYTHONPATH=str(REPO), OMP_NUM_THREADS="1")
    return subprocess.run([sys.executable, str(CLI), *args], cwd=REPO, env=env,
                          capture_output=True, text=True, timeout=timeout)


def _probe(tmp: Path, cluster: Path, nodes: int, m: int, mb: float, tag: str) -> dict:
    out = tmp / f"probe_{tag}.json"
    proc = _cli(["--cluster", str(cluster), "--scale", "1", "--nodes", str(nodes),
                 "--workers-per-node", str(m), "--timeout", "90", "--",
                 str(PROBE), "--mb", str(mb), "--iters", "3", "--json", str(out)])
    assert proc.returncode == 0, (
        f"rc {proc.returncode}\n{proc.stdout[-3000:]}\n{proc.stderr[-3000:]}")
    result = json.loads(out.read_text())
    assert result["correct"] and result["ifname"] == "eth0"
    return result


# ---------------------------------------------------------------------------------------
# No root needed
# ---------------------------------------------------------------------------------------


def test_plan_johnny_rates():
    spec = load_cluster("johnny")
    links = {ln.name: ln for ln in plan_links(spec, 0.005, nodes=2, workers_per_node=2)}
    assert set(links) == {"node0.nic", "node1.nic", "node0.intra", "node1.intra"}
    assert links["node0.nic"].rate_mbit == pytest.approx(250.0)       # 50 Gb/s x 0.005
    assert links["node0.nic"].devices == (("node0", "eth0"), ("sw", "p0"))
    assert links["node1.intra"].kind == "pcie"
    assert links["node1.intra"].rate_mbit == pytest.approx(440.0)     # 88 Gb/s x 0.005
    assert links["node1.intra"].devices == (("node1", "lo"),)
    # one worker per node: no intra-node limit; loopback-kind links are memory: none either
    assert {ln.name for ln in plan_links(spec, 0.005, 2, 1)} == {"node0.nic", "node1.nic"}
    assert plan_links(load_cluster("local-cpu"), 1.0, 1, 2) == []
    # one NIC per GPU (dgx-h100): an emulated node with 2 workers gets 2 NICs' worth
    dgx = {ln.name: ln for ln in plan_links(load_cluster("dgx-h100"), 0.001, 2, 2)}
    assert dgx["node0.nic"].cluster_gbps == pytest.approx(800.0)
    assert "node0.intra" in dgx and dgx["node0.intra"].kind == "nvlink"


def test_scale_rule():
    spec = load_cluster("johnny")
    assert auto_scale(spec, local_tflops=0.115) == pytest.approx(0.01)
    tflops = measure_local_gemm_tflops(seconds=0.2, shape=(256, 256, 256))
    assert 1e-4 < tflops < 100


def test_tbf_queue_is_deep_and_floored():
    fast, slow = 200e6 / 8, 6.2e6 / 8  # bytes/s: a 200 Mbit/s link, trevor's NIC at 1e-4
    burst = burst_bytes(fast, "eth0")
    assert queue_limit_bytes(fast, "eth0") == int(fast * TBF_LATENCY_MS / 1e3) + burst
    assert queue_limit_bytes(slow, "eth0") == TBF_MIN_QUEUE_BYTES + burst_bytes(slow, "eth0")
    assert queue_limit_bytes(500e9 / 8, "eth0") == 1 << 30  # a floor run's 10x NIC: tc's u32
    # trevor 16 x 4: 4 x 4 x 15 = 240 connections cross a NIC, each with its initial window
    nic = plan_links(load_cluster("trevor"), 1e-4, 16, 4)[0]
    assert nic.kind == "nic" and nic.connections == 240
    assert queue_limit_bytes(slow, "eth0", nic.connections) == (
        240 * TCP_INITIAL_WINDOW_BYTES + burst_bytes(slow, "eth0"))
    args = tbf_args(fast, "eth0")
    assert args[args.index("limit") + 1] == str(queue_limit_bytes(fast, "eth0"))


def test_receive_buffer_cap_makes_every_queue_lossless():
    for links in (plan_links(load_cluster("johnny"), 0.002, 2, 8, intra_bus="aggregate"),
                  plan_links(load_cluster("trevor"), 1 / 3000, 16, 4, intra_bus="aggregate")):
        cap = tcp_rcvbuf_bytes(links)
        assert cap is not None and cap >= TCP_INITIAL_WINDOW_BYTES
        queues = [(ln, queue_limit_bytes(ln.rate_bytes, dev, ln.connections)
                   - burst_bytes(ln.rate_bytes, dev)) for ln in links for _, dev in ln.devices]
        # every flow's window fits in every queue it crosses, and the cap is the largest such
        assert all(ln.connections * cap <= q for ln, q in queues)
        assert any(ln.connections * (cap + 1) > q for ln, q in queues)
        assert namespace_sysctls(links)["net.ipv4.tcp_rmem"].split()[1:] == [str(cap)] * 2
    nic, intra = plan_links(load_cluster("johnny"), 0.002, 2, 8)[::2]
    assert (nic.connections, intra.connections) == (64, 56)  # 8 x 8 x 1 crossing, 8 x 7 on lo
    # no flow crosses a limited link (one node, memory intra-node): nothing to cap
    assert tcp_rcvbuf_bytes(plan_links(load_cluster("local-cpu"), 1.0, 1, 2)) is None
    assert namespace_sysctls([]) == NAMESPACE_SYSCTLS


def test_dry_run_creates_nothing():
    before = _ours(_netns()) if _REASON is None else set()
    proc = _cli(["--cluster", "johnny", "--scale", "0.005", "--nodes", "2",
                 "--workers-per-node", "2", "--dry-run", "--", str(PROBE)])
    assert proc.returncode == 0, proc.stderr
    assert "250.00 Mbit/s" in proc.stdout and "440.00 Mbit/s" in proc.stdout
    assert "--master-addr 10.77.0.1" in proc.stdout and "GLOO_SOCKET_IFNAME=eth0" in proc.stdout
    assert "--node-rank 1" in proc.stdout
    # --intra-bus aggregate: johnny's 8-GPU PCIe tree as one bus of 56 / 16 x 88 Gbit/s
    agg = _cli(["--cluster", "johnny", "--scale", "0.001", "--nodes", "2",
                "--workers-per-node", "8", "--intra-bus", "aggregate", "--dry-run", "--",
                str(PROBE)])
    assert agg.returncode == 0, agg.stderr
    assert "308.00 Mbit/s" in agg.stdout and "sized 'aggregate'" in agg.stdout
    if _REASON is None:
        assert _ours(_netns()) == before


# ---------------------------------------------------------------------------------------
# Namespaces (root)
# ---------------------------------------------------------------------------------------


@needs_netns
def test_namespaces_and_links_appear_and_disappear():
    before = _ours(_netns())
    spec = cluster_spec_from_dict({
        "name": "t", "nodes": 3, "workers_per_node": 2, "gemm_tflops": {"fp32": 1, "bf16": 1},
        "links": [{"a": "w0", "b": "w1", "gbps": 0.4, "kind": "pcie"}],
        "nics": [{"attach": "w0", "gbps": 0.2}]})
    with EmulatedCluster(spec, 1.0, nodes=3, workers_per_node=2) as cl:
        during = _netns()
        assert set(cl.namespaces) <= during and len(cl.namespaces) == 4
        assert [cl.node_address(k) for k in range(3)] == ["10.77.0.1", "10.77.0.2", "10.77.0.3"]
        addr = cl.exec_in(2, ["ip", "-4", "addr", "show", "dev", "eth0"]).stdout
        assert "10.77.0.3/24" in addr
        assert "tbf" in cl.exec_in(1, ["tc", "qdisc", "show", "dev", "eth0"]).stdout
        assert "200Mbit" in cl.exec_in("sw", ["tc", "qdisc", "show", "dev", "p1"]).stdout
        assert "400Mbit" in cl.exec_in(0, ["tc", "qdisc", "show", "dev", "lo"]).stdout
        # lossless-fabric stand-ins: a deep queue, and no slow start after an idle gap
        assert f"lat {TBF_LATENCY_MS}ms" in cl.exec_in(1, ["tc", "qdisc", "show", "dev",
                                                          "eth0"]).stdout
        sysctls = namespace_sysctls(cl.links)
        assert set(NAMESPACE_SYSCTLS) < set(sysctls)  # + the receive buffer cap
        for node in ("sw", 0, 2):
            for key, value in sysctls.items():
                got = cl.exec_in(node, ["sysctl", "-n", key]).stdout.split()
                assert got == value.split(), (node, key)
        bridge = cl.exec_in("sw", ["ip", "link", "show", "master", "br0"]).stdout
        assert all(f"p{k}@" in bridge for k in range(3))
        assert "10.77.0.1" not in subprocess.run(["ip", "-4", "addr"], capture_output=True,
                                                 text=True).stdout  # root namespace untouched
    after = _netns()
    assert _ours(after) == before
    assert not set(cl.namespaces) & after


@needs_netns
def test_nic_rate_limit_scales_all_to_all(tmp_path):
    """2 nodes x 1 worker, 8 MB all_to_all_single (4 MB each way) at 200 vs 800 Mbit/s."""
    before = _ours(_netns())
    slow = _probe(tmp_path, _write_cluster(tmp_path, 0.2, 10, m=1), 2, 1, 8, "nic200")
    fast = _probe(tmp_path, _write_cluster(tmp_path, 0.8, 10, m=1), 2, 1, 8, "nic800")
    ratio = slow["median_s"] / fast["median_s"]
    print(f"all_to_all 8 MB, 2 nodes: 200 Mbit/s {slow['median_s'] * 1e3:.1f} ms, "
          f"800 Mbit/s {fast['median_s'] * 1e3:.1f} ms, ratio {ratio:.2f}")
    # 4 MB each way: one direction alone takes 4 MB / rate. gloo's all-to-all mostly moves the
    # two directions one after the other (2x that) but sometimes overlaps them (1x), so each
    # run lies between the two, and the ratio between 4 / 2 and 4 x 2 (docs/emulation.md)
    for res, mbit in ((slow, 200), (fast, 800)):
        one_way = 4 * 2**20 * 8 / (mbit * 1e6)
        assert 0.9 * one_way < res["median_s"] < 2.4 * one_way, (mbit, res["median_s"], one_way)
    assert 1.7 < ratio < 9.0
    assert _ours(_netns()) == before


@needs_netns
def test_intra_node_rate_limit_on_lo(tmp_path):
    """1 node x 2 workers: intra-node traffic goes over the namespace's lo, limited by tbf."""
    slow = _probe(tmp_path, _write_cluster(tmp_path, 10, 0.2), 1, 2, 4, "lo200")
    fast = _probe(tmp_path, _write_cluster(tmp_path, 10, 0.8), 1, 2, 4, "lo800")
    ratio = slow["median_s"] / fast["median_s"]
    print(f"all_to_all 4 MB, 1 node x 2 (lo): 200 Mbit/s {slow['median_s'] * 1e3:.1f} ms, "
          f"800 Mbit/s {fast['median_s'] * 1e3:.1f} ms, ratio {ratio:.2f}")
    assert 2.0 < ratio < 6.0


@needs_netns
def test_failing_run_propagates_exit_code_and_cleans_up(tmp_path):
    before = _ours(_netns())
    proc = _cli(["--cluster", "johnny", "--scale", "0.02", "--nodes", "2",
                 "--workers-per-node", "1", "--grace", "5", "--timeout", "90", "--",
                 str(PROBE), "--mb", "0.1", "--iters", "1", "--fail"])
    assert proc.returncode == 1, proc.stdout[-2000:] + proc.stderr[-3000:]
    assert "torn down" in proc.stdout
    assert _ours(_netns()) == before


def test_signals_raise_turns_sigterm_into_an_exception():
    """Python's default SIGTERM ends a process without running ``finally``: a killed lab run
    left its namespaces behind. Front ends hold clusters inside :func:`signals_raise`."""
    before = signal.getsignal(signal.SIGTERM)
    with pytest.raises(Interrupted) as info:
        with signals_raise():
            os.kill(os.getpid(), signal.SIGTERM)
            time.sleep(5)  # the handler raises before this ends
    assert info.value.signum == signal.SIGTERM
    assert signal.getsignal(signal.SIGTERM) is before


@needs_netns
@pytest.mark.parametrize("sig", [signal.SIGINT, signal.SIGTERM])
def test_signal_tears_down(tmp_path, sig):
    before = _ours(_netns())
    script = tmp_path / "sleep.py"
    script.write_text("import time\ntime.sleep(120)\n")
    env = dict(os.environ, PYTHONPATH=str(REPO), OMP_NUM_THREADS="1")
    proc = subprocess.Popen(
        [sys.executable, str(CLI), "--cluster", "johnny", "--scale", "0.02", "--nodes", "2",
         "--workers-per-node", "1", "--timeout", "100", "--", str(script)],
        cwd=REPO, env=env, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
    try:
        ns = f"mmx-{proc.pid}-node1"
        for _ in range(300):  # bounded wait (30 s) for the namespaces to appear
            if ns in _netns():
                break
            time.sleep(0.1)
        assert ns in _netns()
        time.sleep(1.0)
        proc.send_signal(sig)
        _, err = proc.communicate(timeout=60)
    finally:
        if proc.poll() is None:
            proc.kill()
            proc.wait()
    assert proc.returncode == 128 + sig, err[-2000:]
    assert _ours(_netns()) == before


@needs_netns
def test_delay_ms_needs_netem(tmp_path):
    """--delay-ms: adds one-way delay where the kernel has netem; otherwise a clear error
    (exit 2) and nothing left behind (this project's VM kernel has no sch_netem)."""
    before = _ours(_netns())
    args = ["--cluster", "johnny", "--scale", "0.02", "--nodes", "2", "--workers-per-node", "1",
            "--delay-ms", "20", "--timeout", "90", "--"]
    if not netem_available():
        proc = _cli(args + [str(PROBE)])
        assert proc.returncode == 2 and "netem" in proc.stderr
    else:
        out = tmp_path / "delay.json"
        proc = _cli(args + [str(PROBE), "--mb", "0.001", "--iters", "3", "--json", str(out)])
        assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-3000:]
        assert json.loads(out.read_text())["median_s"] > 0.02  # at least one one-way delay
    assert _ours(_netns()) == before


@needs_netns
def test_smoke_bench_moe_layer(tmp_path):
    """CI-sized: 2 namespaces x 1 worker, a few iterations of the layer benchmark."""
    out = tmp_path / "bench.json"
    cmd = [str(BENCH), "--impl", "both", "--tokens", "128", "--hidden", "32", "--ffn", "64",
           "--experts", "2", "--iters", "2", "--warmup", "1", "--json", str(out)]
    before = _ours(_netns())
    proc = _cli(["--cluster", "johnny", "--scale", "auto", "--gemm-seconds", "0.3",
                 "--nodes", "2", "--workers-per-node", "1", "--timeout", "110", "--", *cmd],
                timeout=150)
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-4000:]
    assert "-> scale" in proc.stdout and "Mbit/s" in proc.stdout
    result = json.loads(out.read_text())
    assert set(result["impls"]) == {"megatron", "fastermoe"}
    assert result["config"]["world_size"] == 2
    assert result["config"]["threads_per_rank"] == 1  # OMP_NUM_THREADS=1 from the emulator
    assert result["max_rel_diff_out"] < 1e-5
    assert _ours(_netns()) == before


@needs_netns
def test_calibrate_under_emulation_recovers_the_nic(tmp_path):
    """calibrate.py inside the emulator: the NIC rate comes back within 15 % (--strict), the
    written cluster's duplex follows the measured exchange, and the performance model reads it."""
    out, raw = tmp_path / "cal.yaml", tmp_path / "cal.json"
    proc = _cli(["--cluster", "johnny", "--scale", "0.005", "--nodes", "2",
                 "--workers-per-node", "1", "--timeout", "120", "--",
                 str(REPO / "scripts" / "calibrate.py"), "--quick", "--dtypes", "fp32",
                 "--sizes", "8", "262144", "2097152", "--compare", "johnny", "--strict",
                 "--out", str(out), "--json", str(raw)], timeout=170)
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-4000:]
    spec = load_cluster(out)
    assert (spec.nodes, spec.workers_per_node) == (2, 1)
    nic = spec.nics[0].gbps
    assert 0.25 * 0.85 < nic < 0.25 * 1.15, nic  # johnny 50 Gb/s x 0.005
    m = json.loads(raw.read_text())["measured"]["inter"]
    print(f"NIC ping-pong {m['pingpong_gbps']:.3f}, exchange {m['exchange_gbps']:.3f} Gbit/s")
    ratio = m["exchange_gbps"] / m["pingpong_gbps"]
    assert spec.duplex == ("half" if ratio < 0.7 else "full")
    # gloo with sends posted first: the directions take turns most of the time (ratio ~0.5),
    # but it is a race (0.68 and, on 2026-12-01 in CI, 0.96 seen): what the calibration writes
    # must follow the measured ratio (checked above); gloo's own behaviour is not asserted.
    from megatron_moe_ext.perf.model import all_to_all_time
    from megatron_moe_ext.perf.topology import build_topology

    t = all_to_all_time([[0, 1024], [1024, 0]], 256, 4, build_topology(spec))
    turns = 2 if spec.duplex == "half" else 1  # half: both directions over one link's rate
    assert t == pytest.approx(turns * 1024 * 256 * 4 / (nic * 1e9 / 8))
