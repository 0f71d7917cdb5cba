"""Cluster YAML schema and topology: paths, link loads, double links, group order."""

from __future__ import annotations

import numpy as np
import pytest

from megatron_moe_ext.perf.topology import (
    GBIT,
    ClusterSpecError,
    Topology,
    build_topology,
    cluster_spec_from_dict,
    load_cluster,
)


def two_node_tree() -> Topology:
    """2 nodes x 2 workers; per node a PCIe switch (100 Gb/s links) holding a 50 Gb/s NIC."""
    return Topology(cluster_spec_from_dict({
        "name": "tree", "nodes": 2, "workers_per_node": 2,
        "gemm_tflops": {"fp32": 1.0, "bf16": 2.0},
        "links": [{"a": "w0", "b": "pcie0", "gbps": 100}, {"a": "w1", "b": "pcie0", "gbps": 100}],
        "nics": [{"attach": "pcie0", "gbps": 50}],
        "inter_node": {"switch": "ib"},
    }))


def nvlink_ring(double: tuple[tuple[str, str], ...]) -> Topology:
    """One node, 4 workers on a ring of 100 Gb/s links; ``double`` edges have count 2."""
    edges = [("w0", "w1"), ("w1", "w2"), ("w2", "w3"), ("w3", "w0")]
    return Topology(cluster_spec_from_dict({
        "name": "ring", "nodes": 1, "workers_per_node": 4,
        "gemm_tflops": {"fp32": 1.0, "bf16": 2.0},
        "links": [{"a": a, "b": b, "gbps": 100, "count": 2 if (a, b) in double else 1}
                  for a, b in edges],
    }))


def hops(topo: Topology, src: int, dst: int) -> list[tuple[str, str]]:
    """The path as (src, dst) vertex pairs."""
    return [(ln.src, ln.dst) for ln in topo.path(src, dst)]


def test_tree_paths_and_indexing() -> None:
    topo = two_node_tree()
    assert topo.num_workers == 4
    assert [topo.node_of(w) for w in range(4)] == [0, 0, 1, 1]
    assert topo.worker_vertex(3) == "n1/w1"
    assert topo.path(2, 2) == []
    assert hops(topo, 0, 1) == [("n0/w0", "n0/pcie0"), ("n0/pcie0", "n0/w1")]
    assert hops(topo, 0, 3) == [("n0/w0", "n0/pcie0"), ("n0/pcie0", "ib"),
                                ("ib", "n1/pcie0"), ("n1/pcie0", "n1/w1")]
    # directed: the way back uses the opposite links
    assert hops(topo, 3, 0)[1] == ("n1/pcie0", "ib")
    assert topo.net_bandwidth() == pytest.approx(50 * GBIT)


def test_tree_link_loads_all_to_all() -> None:
    topo = two_node_tree()
    mb = 1e6
    traffic = np.full((4, 4), mb)
    np.fill_diagonal(traffic, 0.0)
    loads = {(ln.src, ln.dst): x for ln, x in zip(topo.links, topo.link_loads(traffic))}
    assert loads[("n0/w0", "n0/pcie0")] == pytest.approx(3 * mb)  # w0 sends to 3 peers
    assert loads[("n0/pcie0", "n0/w0")] == pytest.approx(3 * mb)
    assert loads[("n0/pcie0", "ib")] == pytest.approx(4 * mb)  # {w0,w1} x {w2,w3}
    assert loads[("ib", "n0/pcie0")] == pytest.approx(4 * mb)
    # NIC is the bottleneck: 4 MB at 6.25 GB/s
    assert topo.max_link_time(topo.link_loads(traffic)) == pytest.approx(4 * mb / (50 * GBIT))


def test_nvlink_ring_double_links() -> None:
    topo = nvlink_ring((("w0", "w1"), ("w2", "w3")))
    bw = {(ln.src, ln.dst): ln.bandwidth for ln in topo.links}
    assert bw[("n0/w0", "n0/w1")] == pytest.approx(200 * GBIT)
    assert bw[("n0/w1", "n0/w0")] == pytest.approx(200 * GBIT)
    assert bw[("n0/w1", "n0/w2")] == pytest.approx(100 * GBIT)
    # opposite corners: two 2-hop routes with equal bottleneck -> lexicographic (via w1)
    assert hops(topo, 0, 2) == [("n0/w0", "n0/w1"), ("n0/w1", "n0/w2")]
    assert hops(topo, 0, 2) == hops(topo, 0, 2)  # deterministic
    assert topo.group_order(2) == [0, 1, 2, 3]


def test_widest_path_breaks_hop_ties() -> None:
    topo = nvlink_ring((("w1", "w2"), ("w3", "w0")))
    # w0 -> w2: via w1 bottleneck 100, via w3 bottleneck 100; w1 -> w3: via w0 100, via w2 100
    assert len(topo.path(0, 2)) == 2
    # closest partner of w0 is w3 (double link), of w1 is w2
    assert topo.group_order(2) == [0, 3, 1, 2]
    spec = cluster_spec_from_dict({
        "name": "ring+pcie", "nodes": 1, "workers_per_node": 4,
        "gemm_tflops": {"fp32": 1.0, "bf16": 2.0},
        "links": [{"a": "w0", "b": "w1", "gbps": 300}, {"a": "w1", "b": "w2", "gbps": 300},
                  {"a": "w2", "b": "w3", "gbps": 300}, {"a": "w3", "b": "w0", "gbps": 300}]
        + [{"a": f"w{i}", "b": "pcie0", "gbps": 50} for i in range(4)],
    })
    topo = Topology(spec)
    # w0 -> w2 over NVLink (bottleneck 300) beats the equally short PCIe route (50)
    assert hops(topo, 0, 2) == [("n0/w0", "n0/w1"), ("n0/w1", "n0/w2")]


def test_group_order_keeps_switch_together() -> None:
    # 2 nodes x 4 workers; even workers on pcie0, odd workers on pcie1
    spec = cluster_spec_from_dict({
        "name": "interleaved", "nodes": 2, "workers_per_node": 4,
        "gemm_tflops": {"fp32": 1.0, "bf16": 2.0},
        "links": [{"a": "w0", "b": "pcie0", "gbps": 88}, {"a": "w2", "b": "pcie0", "gbps": 88},
                  {"a": "w1", "b": "pcie1", "gbps": 88}, {"a": "w3", "b": "pcie1", "gbps": 88},
                  {"a": "pcie0", "b": "cpu0", "gbps": 88}, {"a": "pcie1", "b": "cpu0", "gbps": 88}],
        "nics": [{"attach": "cpu0", "gbps": 50}],
    })
    topo = Topology(spec)
    assert topo.group_order(2) == [0, 2, 1, 3, 4, 6, 5, 7]
    assert topo.group_order(4) == [0, 2, 1, 3, 4, 6, 5, 7]
    assert sorted(topo.group_order(8)) == list(range(8))
    with pytest.raises(ValueError):
        topo.group_order(3)


def test_bundled_clusters_load() -> None:
    johnny = build_topology("johnny")
    assert johnny.num_workers == 16 and johnny.gemm_flops("fp32") == pytest.approx(11.5e12)
    assert johnny.group_order(4)[:4] == [0, 1, 2, 3]
    kinds = [ln.kind for ln in johnny.path(4, 8)]
    assert "qpi" in kinds and "nic" in kinds  # w4 sits on the socket without the NIC
    trevor = build_topology("trevor")
    assert trevor.num_workers == 64 and trevor.net_bandwidth() == pytest.approx(62 * GBIT)
    assert [ln.kind for ln in trevor.path(0, 2)] == ["nvlink", "nvlink"]
    dgx = build_topology("dgx-h100")
    assert [ln.kind for ln in dgx.path(0, 13)] == ["nic", "nic"]  # one NIC per GPU
    assert [ln.kind for ln in dgx.path(0, 1)] == ["nvlink", "nvlink"]  # never via the NIC
    local = build_topology("local-cpu")
    # written by scripts/calibrate.py (measured loopback rate): a plausible single-node value
    assert local.num_workers == 2 and 1 * GBIT < local.net_bandwidth() < 1000 * GBIT


def _base() -> dict:
    return {"name": "x", "nodes": 1, "workers_per_node": 2,
            "gemm_tflops": {"fp32": 1.0, "bf16": 1.0},
            "links": [{"a": "w0", "b": "w1", "gbps": 10}]}


@pytest.mark.parametrize("patch, key", [
    (lambda d: d["links"][0].update(bw=3), "links[0].bw"),
    (lambda d: d["links"][0].pop("gbps"), "links[0].gbps"),
    (lambda d: d["links"][0].update(gbps=-1), "links[0].gbps"),
    (lambda d: d["links"][0].update(b="w7"), "links[0].b"),
    (lambda d: d["gemm_tflops"].pop("bf16"), "gemm_tflops.bf16"),
    (lambda d: d.update(nodes=2), "nics"),
    (lambda d: d.update(colour="red"), "colour"),
    (lambda d: d.update(workers_per_node=0), "workers_per_node"),
    (lambda d: d.update(duplex="simplex"), "duplex"),
])
def test_schema_errors_name_the_key(patch, key: str) -> None:
    data = _base()
    patch(data)
    with pytest.raises(ClusterSpecError, match=key.replace("[", r"\[").replace("]", r"\]")):
        cluster_spec_from_dict(data, source="bad.yaml")


def test_unreachable_worker_is_an_error() -> None:
    data = _base()
    data["workers_per_node"] = 3
    with pytest.raises(ClusterSpecError, match="cannot reach"):
        Topology(cluster_spec_from_dict(data))


def test_load_cluster_missing() -> None:
    with pytest.raises(ClusterSpecError, match="not found"):
        load_cluster("no-such-cluster")


def _two_nodes(duplex: str) -> Topology:
    """2 nodes x 1 worker, 8 Gb/s NICs (1e9 bytes/s each way)."""
    return Topology(cluster_spec_from_dict({
        "name": "pair", "nodes": 2, "workers_per_node": 1, "duplex": duplex,
        "gemm_tflops": {"fp32": 1.0, "bf16": 1.0},
        "nics": [{"attach": "w0", "gbps": 8}],
    }))


def test_half_duplex_pairs_take_turns() -> None:
    full, half = _two_nodes("full"), _two_nodes("half")
    one_way = np.array([[0.0, 1e9], [0.0, 0.0]])
    both_ways = np.array([[0.0, 1e9], [5e8, 0.0]])
    # one direction: the same on both transports
    assert full.transfer_time(one_way) == pytest.approx(1.0)
    assert half.transfer_time(one_way) == pytest.approx(1.0)
    # both directions: overlapped on a full-duplex transport, summed on a half-duplex one
    assert full.transfer_time(both_ways) == pytest.approx(1.0)
    assert half.transfer_time(both_ways) == pytest.approx(1.5)


def test_half_duplex_only_binds_per_pair() -> None:
    """4 workers on one 8 Gb/s star: only a pair's own two directions take turns."""
    def star(duplex: str) -> Topology:
        return Topology(cluster_spec_from_dict({
            "name": "star", "nodes": 1, "workers_per_node": 4, "duplex": duplex,
            "gemm_tflops": {"fp32": 1.0, "bf16": 1.0},
            "links": [{"a": f"w{i}", "b": "host", "gbps": 8} for i in range(4)],
        }))
    full, half = star("full"), star("half")
    ring = np.zeros((4, 4))
    ring[0, 1] = ring[1, 2] = ring[2, 3] = ring[3, 0] = 1e9  # every worker sends and receives
    assert half.transfer_time(ring) == pytest.approx(full.transfer_time(ring)) == pytest.approx(1.0)
    pair = np.zeros((4, 4))
    pair[0, 1] = pair[1, 0] = 1e9
    assert full.transfer_time(pair) == pytest.approx(1.0)
    assert half.transfer_time(pair) == pytest.approx(2.0)
