"""Performance model: hand-computed compute / all-to-all / collective times, schedules."""

from __future__ import annotations

import numpy as np
import pytest

from megatron_moe_ext.perf import model as pm
from megatron_moe_ext.perf.roofline import (
    VARIANTS,
    MoEModelConfig,
    plot_roofline,
    roofline_points,
)
from megatron_moe_ext.perf.topology import GBIT, Topology, cluster_spec_from_dict
from megatron_moe_ext.routing import zipf_counts
from tests.perf.test_topology import two_node_tree

H, ALPHA, B = 250, 2.0, 4  # a token is H * B = 1000 bytes
P = 1e12  # FLOP/s
BW = 1e9  # bytes/s = 8 Gb/s


def star(n: int = 4, gbps: float = BW / GBIT) -> Topology:
    """One node, n workers on one switch, each link 1 GB/s per direction."""
    return Topology(cluster_spec_from_dict({
        "name": "star", "nodes": 1, "workers_per_node": n,
        "gemm_tflops": {"fp32": P / 1e12, "bf16": 2 * P / 1e12},
        "links": [{"a": f"w{i}", "b": "sw", "gbps": gbps} for i in range(n)],
    }))


def ring(n: int = 4) -> Topology:
    """One node, n workers on a ring of direct 1 GB/s links."""
    return Topology(cluster_spec_from_dict({
        "name": "ring", "nodes": 1, "workers_per_node": n,
        "gemm_tflops": {"fp32": 1.0, "bf16": 1.0},
        "links": [{"a": f"w{i}", "b": f"w{(i + 1) % n}", "gbps": BW / GBIT} for i in range(n)],
    }))


BALANCED = np.full((4, 4), 1000.0)  # every worker sends 1000 tokens to every worker
ONE_HOT = np.zeros((4, 4))
ONE_HOT[:, 0] = 1000.0  # everybody sends everything to worker 0


def test_compute_time_by_hand() -> None:
    loads = pm.worker_loads(BALANCED)
    assert list(loads) == [4000.0] * 4
    # 4 * 4000 * 2 * 250^2 / 1e12 = 2 ms
    assert pm.compute_time(loads, H, ALPHA, P) == pytest.approx(2e-3)
    hot = pm.compute_times(pm.worker_loads(ONE_HOT), H, ALPHA, P)
    assert hot == pytest.approx([2e-3, 0, 0, 0])
    # an efficiency curve: half the speed -> twice the time
    assert pm.compute_time(loads, H, ALPHA, lambda t: np.full_like(t, P / 2)) == pytest.approx(4e-3)


def test_all_to_all_by_hand() -> None:
    topo = star()
    # balanced: each uplink carries 3 peers x 1000 tokens x 1000 B = 3 MB at 1 GB/s; self is free
    assert pm.all_to_all_time(BALANCED, H, B, topo) == pytest.approx(3e-3)
    # one-hot: the downlink into w0 carries 3 MB; the way back (transpose) the uplink of w0
    assert pm.all_to_all_time(ONE_HOT, H, B, topo) == pytest.approx(3e-3)
    assert pm.all_to_all_time(ONE_HOT.T, H, B, topo) == pytest.approx(3e-3)
    half = ONE_HOT.copy()
    half[1:, 0] = [1000, 0, 0]
    assert pm.all_to_all_time(half, H, B, topo) == pytest.approx(1e-3)
    # two-node tree: the NIC carries 4 MB at 6.25 GB/s
    assert pm.all_to_all_time(BALANCED, H, B, two_node_tree()) == pytest.approx(4e6 / 6.25e9)


def test_routing_matrix_from_expert_counts() -> None:
    counts = np.array([[1, 2, 3, 4], [5, 6, 7, 8]])  # 2 workers, 2 experts each
    placement = pm.default_placement(4, 2)
    assert list(placement) == [0, 0, 1, 1]
    assert pm.routing_matrix(counts, placement, 2).tolist() == [[3, 7], [11, 15]]
    assert pm.worker_loads(pm.routing_matrix(counts, placement, 2)).tolist() == [14, 22]


def test_sync_e2e_and_predict_layer() -> None:
    assert pm.sync_e2e_time(2e-3, 3e-3) == pytest.approx(18e-3)
    counts = BALANCED  # one expert per worker: counts == T
    pred = pm.predict_layer(counts, None, H, ALPHA, B, star(), "fp32")
    assert pred.comp_s == pytest.approx(2e-3) and pred.comm_s == pytest.approx(3e-3)
    assert pred.fwd_s == pytest.approx(3e-3 + 2e-3 + 3e-3)
    assert pred.bwd_s == pytest.approx(3e-3 + 4e-3 + 3e-3)
    assert pred.total_s == pytest.approx(18e-3)
    # roofline: R_CC = 3 comp / 4 comm; balanced sync EP sits on the semi-ideal line
    assert pred.r_cc == pytest.approx(6 / 12)
    assert pred.throughput == pytest.approx(12 * ALPHA * H * H * 16000 / (4 * 18e-3))
    assert pred.throughput == pytest.approx(pm.semi_ideal_throughput(P, pred.r_cc))
    assert pred.imbalance == pytest.approx(1.0)


def test_collectives_on_ring_and_star() -> None:
    size = 4e6
    # ring all-reduce: 2 (n-1) / n * S / bw
    assert pm.ring_allreduce_time(size, [0, 1, 2, 3], ring()) == pytest.approx(1.5 * size / BW)
    assert pm.ring_allreduce_time(size, [0, 1], ring()) == pytest.approx(size / BW)
    assert pm.ring_allreduce_time(size, [2], ring()) == 0.0
    # broadcast / reduce: the binomial tree's two steps (0->2; 0->1 with 2->3), S per link each
    assert pm.broadcast_time(size, 0, star()) == pytest.approx(2 * size / BW)
    assert pm.reduce_time(size, 0, star()) == pytest.approx(2 * size / BW)
    assert pm.broadcast_time(size, 0, ring()) == pytest.approx(2 * size / BW)  # 0->2: 2 hops
    assert pm.broadcast_time(size, 0, star(n=1)) == 0.0


def test_two_stream_closed_form() -> None:
    for a, c, n in [(1.0, 1.0, 4), (1.0, 2.0, 4), (2.0, 1.0, 2), (0.3, 2.0, 7), (1.0, 0.0, 3),
                    (1.0, 3.5, 1)]:
        sim = pm.simulate_two_stream([a] * n, [c] * n, [a] * n)
        assert sim == pytest.approx(pm.smart_symmetric_time(a, c, n))
    # hand-checked, a = 1, c = 1.5, n = 4, in the executor's order S0 S1 R0 S2 R1 S3 R2 R3:
    # S0 0-1, S1 1-2, C0 1-2.5, R0 2.5-3.5, S2 3.5-4.5, C1 2.5-4, R1 4.5-5.5, S3 5.5-6.5,
    # C2 4.5-6, R2 6.5-7.5, C3 6.5-8, R3 8-9 (the artifact's S-first stream gave 8)
    assert pm.simulate_two_stream([1] * 4, [1.5] * 4, [1] * 4) == pytest.approx(9.0)


def test_two_stream_send_runs_one_step_ahead() -> None:
    """Small early sends cannot bank time for large later ones: S_{j+2} waits for R_j, which
    waits for C_j (the executor's order, core.plan.pipeline_order)."""
    send, comp = [0.0, 0.1, 0.1, 3.0], [1.0, 1.0, 1.0, 1.0]
    ret = send
    # S0 0, S1 0-0.1, C0 0-1, R0 1-1.1, S2 1.1-1.2, C1 1-2, R1 2-2.1, S3 2.1-5.1,
    # C2 2-3, R2 5.1-5.2, C3 5.1-6.1, R3 6.1-9.1
    assert pm.simulate_two_stream(send, comp, ret) == pytest.approx(9.1)
    # with every send first (S3 done at 3.2) it would have been 3.2 + 1 + 3 = 7.2


def test_smart_schedule_symmetric_star() -> None:
    topo = star()
    t = np.full((4, 4), 1000.0)
    np.fill_diagonal(t, 0.0)  # step 0 (self) is empty, steps 1..3 identical
    a = 1000 * H * B / BW  # one peer's tokens over one link
    for p in (1e11, 1e12, 1e13):
        c = 4 * 1000 * ALPHA * H * H / p
        steps = pm.smart_schedule_times(t, H, ALPHA, B, topo, p, group_size=1)
        assert steps.send_s == pytest.approx((0, a, a, a))
        assert steps.comp_s == pytest.approx((0, c, c, c))
        assert steps.fwd_s == pytest.approx(pm.smart_symmetric_time(a, c, 3))
        assert steps.bwd_s == pytest.approx(pm.smart_symmetric_time(a, 2 * c, 3))
        sync = pm.predict_layer(t, None, H, ALPHA, B, topo, gemm=p)
        smart = pm.predict_layer(t, None, H, ALPHA, B, topo, schedule="smart", group_size=1,
                                 gemm=p)
        assert smart.total_s <= sync.total_s
        assert smart.fwd_s == pytest.approx(steps.fwd_s)


def test_smart_with_one_group_equals_sync() -> None:
    counts = zipf_counts(4, 8, 1000, 2, skew=1.2, seed=3)
    sync = pm.predict_layer(counts, None, H, ALPHA, B, star())
    smart = pm.predict_layer(counts, None, H, ALPHA, B, star(), schedule="smart", group_size=4)
    assert smart.total_s == pytest.approx(sync.total_s)


def test_smart_never_worse_on_balanced_bundled_clusters() -> None:
    from megatron_moe_ext.perf.topology import build_topology

    topo = build_topology("johnny")
    counts = zipf_counts(16, 16, 4096, 2)
    for h in (1024, 2048, 4096):
        sync = pm.predict_layer(counts, None, h, 2.0, 4, topo)
        for g in (1, 2, 4):
            smart = pm.predict_layer(counts, None, h, 2.0, 4, topo, schedule="smart", group_size=g)
            assert smart.total_s <= sync.total_s


def test_smart_can_lose_when_steps_serialize_different_links() -> None:
    """Not a theorem: a step-wise exchange cannot use fast intra-node and slow NIC links at
    the same time, so with negligible compute it can be slower than one all-to-all."""
    topo = Topology(cluster_spec_from_dict({
        "name": "nic-per-gpu", "nodes": 2, "workers_per_node": 2,
        "gemm_tflops": {"fp32": 1e6, "bf16": 1e6},
        "links": [{"a": "w0", "b": "w1", "gbps": 100}],
        "nics": [{"attach": "w0", "gbps": 10}, {"attach": "w1", "gbps": 10}],
    }))
    t = np.full((4, 4), 1000.0)
    sync = pm.predict_layer(t, None, H, ALPHA, B, topo)
    smart = pm.predict_layer(t, None, H, ALPHA, B, topo, schedule="smart", group_size=1)
    assert smart.total_s > sync.total_s


def test_bound_values_and_limit() -> None:
    assert pm.smart_schedule_bound(1.0, 1.0) == pytest.approx(7 / 4)
    assert pm.smart_schedule_bound(1.0, 2.0) == pytest.approx(10 / 6)
    assert pm.smart_schedule_bound(1.0, 0.0) == pytest.approx(1.0)
    assert pm.smart_schedule_bound(0.0, 1.0) == pytest.approx(1.0)
    # many fine steps: sync / smart tends to the bound
    n, big_a, big_c = 2000, 1.0, 1.5
    a, c = big_a / n, big_c / n
    smart = pm.smart_symmetric_time(a, c, n) + pm.smart_symmetric_time(a, 2 * c, n)
    sync = 4 * big_a + 3 * big_c
    assert sync / smart == pytest.approx(pm.smart_schedule_bound(big_a, big_c), rel=1e-2)


def test_shadowed_loads_and_comm() -> None:
    counts = np.array([[30, 10], [50, 10]])  # expert 0 on w0 (load 80), expert 1 on w1 (20)
    placement = np.array([0, 1])
    assert pm.shadowed_loads(counts, placement, 2, []).tolist() == [80, 20]
    t, local = pm.shadowed_routing(counts, placement, 2, [0])
    assert t.tolist() == [[0, 10], [0, 10]] and local.tolist() == [30, 50]
    assert pm.shadowed_loads(counts, placement, 2, [0]).tolist() == [30, 70]
    # paper form: 2r * 2 alpha H^2 * b / W_net
    assert pm.shadow_comm_time_simple(1, 1000, 2.0, 4, 1e9) == pytest.approx(0.032)
    # star: a tree's two steps load each link at most once; the trees of owners 0 and 1 use
    # disjoint links at every step (0->2 with 1->3, then 0->1, 2->3, 1->0, 3->2)
    size = pm.expert_param_bytes(H, ALPHA, B)
    bc, red = pm.shadow_comm_times([0], np.arange(4), H, ALPHA, B, star())
    assert bc == pytest.approx(2 * size / BW) and red == pytest.approx(2 * size / BW)
    bc2, _ = pm.shadow_comm_times([0, 1], np.arange(4), H, ALPHA, B, star())
    assert bc2 == pytest.approx(2 * size / BW)
    # two experts of one owner travel in one tree of twice the bytes
    bc3, red3 = pm.shadow_comm_times([0, 1], np.zeros(4, dtype=int), H, ALPHA, B, star())
    assert bc3 == pytest.approx(4 * size / BW) and red3 == pytest.approx(4 * size / BW)


def test_predict_layer_with_shadow() -> None:
    topo = star()
    counts = ONE_HOT.copy()
    base = pm.predict_layer(counts, None, H, ALPHA, B, topo)
    shadow = pm.predict_layer(counts, None, H, ALPHA, B, topo, shadow_experts=[0])
    # everyone computes its own 1000 tokens: 0.5 ms; no all-to-all left; params move once each way
    size = pm.expert_param_bytes(H, ALPHA, B)
    assert shadow.loads == (1000.0,) * 4 and shadow.comm_s == 0.0
    assert shadow.comp_s == pytest.approx(0.5e-3)
    assert shadow.total_s == pytest.approx(3 * 0.5e-3 + 4 * size / BW)  # two tree steps each way
    assert shadow.total_s < base.total_s
    simple = pm.predict_layer(counts, None, H, ALPHA, B, topo, shadow_experts=[0],
                              shadow_comm="simple")
    assert simple.shadow_comm_s == pytest.approx(2 * size / BW)


def test_roofline_points_stay_under_ideal(tmp_path) -> None:
    topo = two_node_tree()
    model = MoEModelConfig("m", hidden=512, num_experts=8, tokens_per_worker=2048)
    for zipf in (0.0, 1.5):
        pts = roofline_points(model, topo, zipf=zipf, group_size=2)
        assert [p.variant for p in pts] == list(VARIANTS)
        for p in pts:
            assert p.throughput <= pm.ideal_throughput(p.peak_flops, p.r_cc) * (1 + 1e-9)
        if zipf == 0:
            assert pts[0].throughput == pytest.approx(
                pm.semi_ideal_throughput(pts[0].peak_flops, pts[0].r_cc))
    out = plot_roofline(pts, topo, tmp_path / "roof.png")
    assert out.exists() and out.stat().st_size > 1000


@pytest.mark.parametrize("g", [3, 8, 0])
def test_group_size_must_divide_the_workers(g: int) -> None:
    """No silent clamping: the model rejects a group size the plan would reject."""
    with pytest.raises(ValueError, match="moe.fastermoe.group_size"):
        pm.predict_layer(BALANCED, None, H, ALPHA, B, star(), schedule="smart", group_size=g)
