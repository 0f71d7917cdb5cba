"""The ``links`` simulator of the smart schedule (perf/linksim.py): hand-checked cases, its tie
to the ``lockstep`` simulator where the two must agree, and bounds it can never beat."""

from __future__ import annotations

import numpy as np
import pytest

from megatron_moe_ext.perf import model as pm
from megatron_moe_ext.perf.linksim import LinkTimeline, link_pipeline_time
from megatron_moe_ext.perf.topology import Topology, build_topology, cluster_spec_from_dict
from megatron_moe_ext.routing import zipf_counts
from tests.perf.test_model import ALPHA, B, BW, H, P, star

MS = 1000 * H * B / BW  # 1000 tokens over one 1 GB/s link: 1 ms


def two_single_nodes() -> Topology:
    """2 nodes x 1 worker joined by their 10 Gb/s NICs: one remote step, each way its own
    link."""
    return Topology(cluster_spec_from_dict({
        "name": "pair", "nodes": 2, "workers_per_node": 1,
        "gemm_tflops": {"fp32": 1.0, "bf16": 1.0}, "links": [],
        "nics": [{"attach": "w0", "gbps": 10}],
    }))


def test_timeline_fills_the_earliest_gap() -> None:
    line = LinkTimeline()
    assert line.fit(0.0, 1.0) == 0.0
    line.occupy(0.0, 1.0)
    line.occupy(3.0, 1.0)
    assert line.fit(0.5, 1.0) == 1.0   # fits between 1 and 3
    assert line.fit(0.5, 2.5) == 4.0   # does not: after the second interval
    assert line.fit(2.5, 0.5) == 2.5   # [2.5, 3) is free
    assert line.fit(3.5, 0.0) == 3.5   # nothing to place
    line.occupy(1.0, 2.0)
    assert line.fit(0.0, 0.1) == 4.0


def test_equals_lockstep_with_one_remote_step() -> None:
    """Symmetric routing over one remote step: both workers compute alike at every step and
    every flow touches both, so the per-worker pipeline is the lockstep one."""
    topo = two_single_nodes()
    rng = np.random.default_rng(0)
    for _ in range(5):
        a = rng.integers(0, 3000, size=(2, 2)).astype(float)
        t = a + a.T
        for p in (1e10, 1e12, 1e14):
            lock = pm.smart_schedule_times(t, H, ALPHA, B, topo, p, 1)
            links = pm.smart_schedule_times(t, H, ALPHA, B, topo, p, 1, simulator="links")
            assert links.simulator == "links" and lock.simulator == "lockstep"
            assert links.fwd_s == pytest.approx(lock.fwd_s)
            assert links.bwd_s == pytest.approx(lock.bwd_s)
            assert links.send_s == lock.send_s and links.comp_s == lock.comp_s


def test_equals_lockstep_on_a_balanced_star() -> None:
    """Every step of a balanced exchange on a star loads every link alike: nothing overlaps
    that lockstep serializes, so both give the closed form."""
    t = np.full((4, 4), 1000.0)
    np.fill_diagonal(t, 0.0)
    for p in (1e11, 1e12, 1e13):
        c = 4 * 1000 * ALPHA * H * H / p
        links = pm.smart_schedule_times(t, H, ALPHA, B, star(), p, 1, simulator="links")
        assert links.fwd_s == pytest.approx(pm.smart_symmetric_time(MS, c, 3))
        assert links.bwd_s == pytest.approx(pm.smart_symmetric_time(MS, 2 * c, 3))


def test_steps_on_different_links_overlap_by_hand() -> None:
    """star(4), g = 1, no compute; only 1 -> 3 (step 2) and 0 -> 1 (step 3), 1 ms each.
    links: S2 1->3 [0, 1] (posted at C0's end, 0); S3 0->1 [0, 1] (C1 ends at 0 on both);
    R2 3->1 waits for the downlink into 1 (S3) -> [1, 2]; R3 1->0 waits for 1's uplink (S2)
    -> [1, 2]: 2 ms. lockstep runs S2, S3, R2, R3 one after another: 4 ms."""
    t = np.zeros((4, 4))
    t[0, 1] = t[1, 3] = 1000.0
    order = list(range(4))
    steps = pm.smart_step_traffic(t, 1, order)
    assert [int(np.argwhere(s).tolist()[0][0]) for s in steps[2:]] == [1, 0]  # senders
    nbytes = np.stack([pm.traffic_bytes(s, H, B) for s in steps])
    assert link_pipeline_time(nbytes, np.zeros((4, 4)), star()) == pytest.approx(2 * MS)
    lock = pm.smart_schedule_times(t, H, ALPHA, B, star(), 1e30, 1, order)
    assert lock.fwd_s == pytest.approx(4 * MS, rel=1e-6)


def test_never_beats_the_busiest_link_or_worker() -> None:
    topo = build_topology("johnny")
    for skew, seed in ((0.0, 1), (1.0, 2), (1.5, 3)):
        counts = zipf_counts(16, 16, 512, 2, skew=skew, seed=seed)
        t = pm.routing_matrix(counts, pm.default_placement(16, 16), 16)
        p = topo.gemm_throughput("fp32")
        for g in (1, 2, 4):
            steps = pm.smart_schedule_times(t, 1024, 2.0, 4, topo, p, g, simulator="links")
            nbytes = pm.traffic_bytes(t, 1024, 4)
            busiest = topo.max_link_time(topo.link_loads(nbytes) + topo.link_loads(nbytes.T))
            hot = pm.compute_times(pm.worker_loads(t), 1024, 2.0, p).max()
            assert steps.fwd_s >= max(busiest, hot) * (1 - 1e-9)
            assert steps.bwd_s >= max(busiest, 2 * hot) * (1 - 1e-9)


def test_rejects_what_it_does_not_model() -> None:
    half = Topology(cluster_spec_from_dict({
        "name": "half", "nodes": 1, "workers_per_node": 2, "duplex": "half",
        "gemm_tflops": {"fp32": 1.0, "bf16": 1.0},
        "links": [{"a": "w0", "b": "w1", "gbps": 10}],
    }))
    t = np.full((2, 2), 10.0)
    with pytest.raises(ValueError, match="duplex: half"):
        pm.smart_schedule_times(t, H, ALPHA, B, half, P, 1, simulator="links")
    with pytest.raises(ValueError, match="simulator must be one of"):
        pm.smart_schedule_times(t, H, ALPHA, B, star(2), P, 1, simulator="fifo")
    with pytest.raises(ValueError, match="step_bytes"):
        link_pipeline_time(np.zeros((2, 2, 3)), np.zeros((2, 2)), star(2))


def test_predict_layer_passes_the_simulator_through() -> None:
    topo = build_topology("johnny")
    counts = zipf_counts(16, 16, 512, 2, skew=1.5, seed=4)
    kw = dict(schedule="smart", group_size=2)
    lock = pm.predict_layer(counts, None, 1024, 2.0, 4, topo, **kw)
    links = pm.predict_layer(counts, None, 1024, 2.0, 4, topo, simulator="links", **kw)
    assert links.steps.simulator == "links"
    assert links.comp_s == lock.comp_s and links.comm_s == lock.comm_s
    assert links.total_s != pytest.approx(lock.total_s)
    sync = [pm.predict_layer(counts, None, 1024, 2.0, 4, topo, simulator=s).total_s
            for s in pm.SIMULATORS]
    assert sync[0] == sync[1]  # sync has no pipeline to price
