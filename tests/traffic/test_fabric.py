"""Fabric what-ifs: the flattened cluster is the cluster, trees order as expected, circuits
go to the heaviest pairs of a region, costs add up from link_costs."""

from __future__ import annotations

import dataclasses

import numpy as np
import pytest

from megatron_moe_ext.perf.cluster import LinkCost
from megatron_moe_ext.perf.model import predict_layer
from megatron_moe_ext.perf.topology import CIRCUIT_KIND, Topology, ep_topology, load_cluster
from megatron_moe_ext.traffic import fabric as fb
from megatron_moe_ext.traffic.trace import RoutingTrace, TraceHeader
from tests.helpers import REPO


def _pair_trace(W: int = 16, E: int = 16, iters: int = 4) -> RoutingTrace:
    """Worker w routes half its tokens to its own expert, half to worker w + 8's (the same
    local index on the other node of johnny): heavy cross-node pairs."""
    counts = np.zeros((iters, 1, W, E), dtype=np.int32)
    for w in range(W):
        counts[:, 0, w, w] = 64
        counts[:, 0, w, (w + W // 2) % W] = 64
    h = TraceHeader(num_workers=W, num_experts=E, layers=(1,), topk=1, ep_size=W,
                    meta={"hidden_size": 256, "ffn_hidden_size": 512, "precision": "fp32"})
    return RoutingTrace(h, np.arange(iters), np.ones(iters, np.int32), counts)


def test_described_fabric_predicts_like_the_cluster() -> None:
    spec = load_cluster("johnny")
    c = np.random.default_rng(0).integers(0, 100, size=(16, 16)).astype(float)
    flat = Topology(fb.described_fabric(spec, 16))
    for sched in ("sync", "smart"):
        a = predict_layer(c, None, 512, 2, None, flat, "fp32", sched, group_size=2)
        b = predict_layer(c, None, 512, 2, None, ep_topology("johnny", 16), "fp32", sched,
                          group_size=2)
        assert a.total_s == pytest.approx(b.total_s, rel=1e-12)


def test_circuits_go_to_the_heaviest_pairs_inside_regions() -> None:
    T = np.zeros((4, 4))
    T[0, 1], T[2, 3], T[0, 2], T[1, 3] = 10, 6, 4, 1
    assert fb.assign_circuits(T, k=2, ports=1) == {(0, 1): 1, (2, 3): 1}
    # two ports: each pair of a region gets both (no other pair is in the region)
    assert fb.assign_circuits(T, k=2, ports=2) == {(0, 1): 2, (2, 3): 2}
    c4 = fb.assign_circuits(T, k=4, ports=1)
    assert c4 == {(0, 1): 1, (2, 3): 1}
    # workers 0, 1 share a node (2 per node): their pair gets no circuit
    assert fb.assign_circuits(T, k=4, ports=1, workers_per_node=2) == {(0, 2): 1, (1, 3): 1}


def test_a_circuit_carries_only_its_own_pair() -> None:
    """3 nodes x 2 workers (w0 w1 | w2 w3 | w4 w5), circuits 0-2 and 1-4: 0 -> 2 and 4 -> 1
    take their circuit (one hop); 0 -> 4 does not relay w0 -> w1 -> circuit 1-4 (two hops),
    nor 3 -> 0 through w2's circuit: both go over the tree as without circuits."""
    cluster = load_cluster(str(REPO / "docs/data/traffic/reconf3x2.yaml"))
    base = fb.tree_fabric(cluster, 6, 100.0, 4.0)
    plain, topo = Topology(base), Topology(fb.with_circuits(base, {(0, 2): 1, (1, 4): 2}, 100))
    for s, d in ((0, 2), (2, 0), (1, 4), (4, 1)):
        (ln,) = topo.path(s, d)
        assert ln.kind == CIRCUIT_KIND and ln.bandwidth == pytest.approx(
            (2 if 4 in (s, d) else 1) * 100e9 / 8)
    for s in range(6):
        for d in range(6):
            if {s, d} not in ({0, 2}, {1, 4}):
                assert [(x.src, x.dst) for x in topo.path(s, d)] == \
                    [(x.src, x.dst) for x in plain.path(s, d)]
                assert CIRCUIT_KIND not in {x.kind for x in topo.path(s, d)}


def test_fabrics_order_and_cost() -> None:
    spec = dataclasses.replace(load_cluster("johnny"), link_costs={
        "nic": LinkCost(usd=100, usd_per_gbps=10), "uplink": LinkCost(usd_per_gbps=10),
        "ocs": LinkCost(usd=200), "pcie": LinkCost(), "qpi": LinkCost()})
    res = {r.name: r for r in fb.evaluate_fabrics(_pair_trace(), spec, nic_gbps=50, oversub=4,
                                                  region=4, ports=2, delay_ms=0.0)}
    ft, ov = res["fat-tree"], res["oversubscribed 4:1"]
    rc = res["reconfigurable k=4"]
    assert ft.layer_ms <= ov.layer_ms + 1e-12
    assert rc.layer_ms < 0.5 * ov.layer_ms  # the cross-node pairs ride their circuits
    # fat-tree: 16 NICs of 50 G (100 + 500 USD) + 2 uplinks of 400 G (4000 USD)
    assert ft.cost_usd == pytest.approx(16 * 600 + 2 * 4000)
    assert ov.cost_usd == pytest.approx(16 * 600 + 2 * 1000)
    assert rc.cost_usd == pytest.approx(ov.cost_usd + 16 * 2 * 200 / 2)
    assert res["described"].cost_usd == pytest.approx(2 * 600)
    table = fb.format_fabrics(list(res.values()), 50)
    assert "1.2-1.5x" in table and "reconfigurable k=4" in table
    no_price = fb.evaluate_fabrics(_pair_trace(), load_cluster("johnny"), region=4)
    assert all(r.cost_usd is None for r in no_price)
    assert "n/a (no link_costs)" in fb.format_fabrics(no_price, 50)


def test_cluster_link_costs_and_memory_round_trip(tmp_path) -> None:
    """The optional cluster keys link_costs and memory_gib: loaded, written back, validated."""
    from megatron_moe_ext.perf.cluster import (
        ClusterSpecError,
        cluster_spec_from_dict,
        cluster_to_dict,
        save_cluster,
    )

    spec = load_cluster(REPO / "docs/data/traffic/johnny-priced.yaml")
    assert spec.memory_gib == 32 and spec.link_costs["ocs"] == LinkCost(usd=500)
    assert spec.link_costs["nic"].price(100, count=2) == 2 * (200 + 10 * 100)
    save_cluster(spec, tmp_path / "p.yaml")
    assert load_cluster(tmp_path / "p.yaml") == spec
    base = cluster_to_dict(load_cluster("johnny"))
    assert "link_costs" not in base and "memory_gib" not in base  # optional: absent stays absent
    with pytest.raises(ClusterSpecError, match="link_costs.nic.usd_per_gbps"):
        cluster_spec_from_dict(dict(base, link_costs={"nic": {"usd_per_gbps": -1}}))
    with pytest.raises(ClusterSpecError, match=r"link_costs.nic.price: unknown key"):
        cluster_spec_from_dict(dict(base, link_costs={"nic": {"price": 3}}))
    with pytest.raises(ClusterSpecError, match="memory_gib"):
        cluster_spec_from_dict(dict(base, memory_gib=0))
