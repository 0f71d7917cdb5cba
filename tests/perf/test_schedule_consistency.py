"""One schedule: the bytes the performance model charges at each step of the smart schedule are
the bytes ``core.plan.build_plan`` sends, for every rank, sender -> receiver pair and step.

The model (``perf.model.smart_step_traffic`` / ``smart_schedule_times``) and the executor's plan
both derive their steps from ``core/plan.py`` (``step_matrix`` / ``make_groups`` / ``ring_groups``);
this test would catch the two drifting apart (another ring direction, another group rule, another
group order). Self traffic is free in the model and never crosses the network in the plan, so
only remote slices count.
"""

from __future__ import annotations

import numpy as np
import pytest

from megatron_moe_ext.core.plan import build_plan, make_groups, step_matrix
from megatron_moe_ext.perf import model as pm
from megatron_moe_ext.perf.topology import Topology, available_clusters, build_topology

H, B = 24, 2  # a token is 48 bytes
ALPHA, P = 2.0, 1e12


def _divisors(n: int) -> list[int]:
    return [d for d in range(1, n + 1) if n % d == 0]


def _random_counts(rng: np.random.Generator, w: int, e_l: int) -> np.ndarray:
    counts = rng.integers(0, 50, size=(w, w * e_l))
    counts[rng.random(counts.shape) < 0.3] = 0  # some pairs exchange nothing: skipped in plan
    return counts


def _plan_bytes(counts: np.ndarray, w: int, g: int,
                order: list[int]) -> tuple[np.ndarray, np.ndarray]:
    """([n, W, W] bytes rank s sends to rank d at step j, [n, W] tokens rank r computes at step
    j), from every rank's ExchangePlan; the receivers' view (remote_recvs) must agree with the
    senders' (remote_sends)."""
    n = w // g
    sent = np.zeros((n, w, w))
    received = np.zeros((n, w, w))
    computed = np.zeros((n, w))
    for rank in range(w):
        plan = build_plan(counts, rank, w, g, order)
        assert len(plan.steps) == n
        for j, step in enumerate(plan.steps):
            computed[j, rank] = step.tokens_received
            for s in step.remote_sends:
                sent[j, rank, s.peer] += s.length * H * B
            for r in step.remote_recvs:
                received[j, r.peer, rank] += r.length * H * B
    np.testing.assert_array_equal(sent, received)
    return sent, computed


def _check(counts: np.ndarray, w: int, g: int, order: list[int],
           topology: Topology | None = None) -> None:
    e = counts.shape[1]
    T = pm.routing_matrix(counts, pm.default_placement(e, w), w)
    model_steps = pm.smart_step_traffic(T, g, order)
    charged = np.stack([pm.traffic_bytes(tj, H, B) for tj in model_steps])
    planned, computed = _plan_bytes(counts, w, g, order)
    np.testing.assert_array_equal(charged, planned)
    # every token the plan moves is charged exactly once over all steps (and self is free)
    np.testing.assert_array_equal(charged.sum(axis=0), pm.traffic_bytes(T, H, B))
    # step_matrix is what both follow: the pair (i, d) is charged only at its step
    steps = np.asarray(step_matrix(w, g, order))
    for j in range(w // g):
        assert not charged[j][steps != j].any()
    if topology is None:
        return
    # the times the model predicts are those of the plan's bytes on this topology
    times = pm.smart_schedule_times(T, H, ALPHA, B, topology, P, g, order=order)
    for j in range(w // g):
        assert times.send_s[j] == pytest.approx(topology.transfer_time(planned[j]))
        assert times.ret_s[j] == pytest.approx(topology.transfer_time(planned[j].T))
        assert times.comp_s[j] == pytest.approx(pm.compute_time(computed[j], H, ALPHA, P))


@pytest.mark.parametrize("seed", range(6))
def test_random_worlds_groups_and_orders(seed: int) -> None:
    rng = np.random.default_rng(seed)
    for w in (1, 2, 3, 4, 6, 8, 12):
        g = int(rng.choice(_divisors(w)))
        e_l = int(rng.integers(1, 4))
        order = [int(x) for x in rng.permutation(w)] if seed % 2 else list(range(w))
        _check(_random_counts(rng, w, e_l), w, g, order)


@pytest.mark.parametrize("cluster", ["johnny", "trevor", "dgx-h100", "local-cpu"])
def test_bundled_topologies_and_their_group_orders(cluster: str) -> None:
    assert cluster in available_clusters()
    topo = build_topology(cluster)
    w = topo.num_workers
    rng = np.random.default_rng(w)
    for g in _divisors(w):
        order = topo.group_order(g)
        # the plan's groups are the topology's tight groups
        assert make_groups(w, g, order) == tuple(tuple(order[k * g:(k + 1) * g])
                                                 for k in range(w // g))
        _check(_random_counts(rng, w, 1), w, g, order, topo)


def test_predict_layer_uses_the_topology_group_order() -> None:
    """predict_layer's smart steps = the plan's steps under topology.group_order(g)."""
    topo = build_topology("johnny")
    rng = np.random.default_rng(3)
    counts = _random_counts(rng, 16, 2)
    g = 4
    pred = pm.predict_layer(counts, None, H, 2.0, B, topo, schedule="smart", group_size=g,
                            gemm=P)
    planned, _ = _plan_bytes(counts, 16, g, topo.group_order(g))
    assert pred.steps is not None and len(pred.steps.send_s) == 16 // g
    for j, send in enumerate(pred.steps.send_s):
        assert send == pytest.approx(topo.transfer_time(planned[j]))
    # an order that splits johnny's PCIe switches charges a different, slower schedule
    interleaved = [w for k in range(4) for w in range(k, 16, 4)]
    other = pm.smart_schedule_times(pm.routing_matrix(counts, pm.default_placement(32, 16), 16),
                                    H, 2.0, B, topo, P, g, order=interleaved)
    assert other.send_s != pred.steps.send_s
