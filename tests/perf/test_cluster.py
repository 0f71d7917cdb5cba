"""Cluster files: bundled names, the named missing-cluster error, the writer (round trip),
calibration provenance, and the one EP-group -> topology mapping (perf.topology.ep_topology)."""

from __future__ import annotations

import dataclasses
import logging
from pathlib import Path

import numpy as np
import pytest
import yaml

from megatron_moe_ext.perf import cluster as cl
from megatron_moe_ext.perf.topology import (
    CLUSTER_DIR,
    ClusterNotFoundError,
    ClusterSpecError,
    available_clusters,
    build_topology,
    calibration_note,
    cluster_spec_from_dict,
    cluster_to_dict,
    ep_topology,
    is_stand_in,
    load_cluster,
    save_cluster,
    this_machine,
)
from tests.helpers import REPO

BUNDLED = ["dgx-h100", "johnny", "local-cpu", "trevor"]


def test_bundled_names_resolve_to_the_shipped_files() -> None:
    assert available_clusters() == BUNDLED
    # in a checkout the shipped files are the repository's configs/clusters/ (package data
    # once installed: scripts/check_install.sh checks that path)
    assert CLUSTER_DIR.resolve() == (REPO / "configs" / "clusters").resolve()
    assert load_cluster("johnny") == load_cluster(REPO / "configs" / "clusters" / "johnny.yaml")
    assert load_cluster("johnny").num_workers == 16


def test_missing_cluster_is_a_named_error(tmp_path: Path) -> None:
    with pytest.raises(ClusterNotFoundError) as err:
        load_cluster("no-such-cluster")
    msg = str(err.value)
    assert "no-such-cluster" in msg and all(name in msg for name in BUNDLED)
    assert isinstance(err.value, FileNotFoundError) and isinstance(err.value, ValueError)
    assert isinstance(err.value, ClusterSpecError)  # callers catching the schema error see it
    with pytest.raises(ClusterNotFoundError, match="x.yaml"):
        load_cluster(tmp_path / "x.yaml")


@pytest.mark.parametrize("name", BUNDLED)
def test_round_trip_every_bundled_cluster(name: str, tmp_path: Path) -> None:
    spec = load_cluster(name)
    out = tmp_path / "sub" / f"{name}.yaml"
    save_cluster(spec, out, comment="written by the test\nsecond line")
    text = out.read_text()
    assert text.startswith("# written by the test\n# second line\n")
    assert load_cluster(out) == spec
    assert cluster_spec_from_dict(cluster_to_dict(spec)) == spec
    # the writer keeps links and curves on one line each, like the hand-written files
    assert len([ln for ln in text.splitlines() if ln.startswith("- {")]) == \
        len(spec.links) + len(spec.nics)


def test_round_trip_keeps_every_field(tmp_path: Path) -> None:
    data = {
        "name": "full", "description": "all keys", "nodes": 2, "workers_per_node": 2,
        "gemm_tflops": {"fp32": 1.5, "bf16": 3}, "duplex": "half",
        "gemm_curve": {"fp32": [[64, 0.5], [8, 0.25]]},
        "links": [{"a": "w0", "b": "sw", "gbps": 10, "count": 2, "latency_us": 1.5, "kind": "x"},
                  {"a": "w1", "b": "sw", "gbps": 12.25}],
        "nics": [{"attach": "sw", "gbps": 8, "count": 3, "latency_us": 2}],
        "inter_node": {"switch": "ib"},
        "calibration": {"host": "h", "machine_id": "abc", "cores": 4, "clock": "wall",
                        "date_utc": "2026-12-01 10:00", "tool": "scripts/calibrate.py"},
    }
    spec = cluster_spec_from_dict(data)
    save_cluster(spec, tmp_path / "full.yaml")
    again = load_cluster(tmp_path / "full.yaml")
    assert again == spec
    assert again.links[0].count == 2 and again.nics[0].count == 3 and again.duplex == "half"
    assert again.gemm_curve["fp32"] == ((8.0, 0.25), (64.0, 0.5))
    assert again.calibration == data["calibration"]


def test_calibration_schema_errors_name_the_key() -> None:
    base = cluster_to_dict(load_cluster("local-cpu"))
    with pytest.raises(ClusterSpecError, match="calibration.colour"):
        cluster_spec_from_dict({**base, "calibration": {"colour": "red"}}, source="c.yaml")
    with pytest.raises(ClusterSpecError, match="calibration.host"):
        cluster_spec_from_dict({**base, "calibration": {"host": ["a"]}}, source="c.yaml")
    # an unquoted YAML date is kept as its ISO string
    parsed = yaml.safe_load("calibration: {date_utc: 2026-11-22}")
    spec = cluster_spec_from_dict({**base, **parsed})
    assert spec.calibration == {"date_utc": "2026-11-22"}


def test_calibration_note() -> None:
    johnny = load_cluster("johnny")
    assert johnny.calibration is None and calibration_note(johnny) is None  # nominal numbers
    # the shipped local-cpu.yaml was measured elsewhere and records no machine id
    local = load_cluster("local-cpu")
    assert local.calibration is not None and local.calibration["date_utc"].startswith("2026-11-22")
    note = calibration_note(local)
    assert note is not None and "another machine" in note and "scripts/calibrate.py" in note
    here = this_machine()
    if here["machine_id"]:
        mine = dataclasses.replace(local, calibration={**here, "clock": "cpu"})
        assert calibration_note(mine) is None
        other = dataclasses.replace(local, calibration={**here, "machine_id": "0" * 32})
        assert "another machine" in (calibration_note(other) or "")


def test_ep_topology_exact_nodes_and_stand_in(caplog: pytest.LogCaptureFixture) -> None:
    ep_topology.cache_clear()
    johnny = ep_topology("johnny", 16)
    assert johnny.num_workers == 16 and not is_stand_in(johnny)
    assert johnny.spec == load_cluster("johnny")
    assert ep_topology("johnny", 16) is johnny  # cached
    one_node = ep_topology("johnny", 8)  # an EP group filling one whole node
    assert one_node.nodes == 1 and one_node.num_workers == 8 and not is_stand_in(one_node)
    assert [ln.kind for ln in one_node.links].count("nic") == 0
    with caplog.at_level(logging.WARNING, logger="megatron_moe_ext.perf.topology"):
        star = ep_topology("johnny", 4)
    assert is_stand_in(star) and star.num_workers == 4
    assert "expert-parallel group has 4" in caplog.text
    # the stand-in keeps the cluster's W_net and GEMM rates
    assert star.net_bandwidth() == pytest.approx(build_topology("johnny").net_bandwidth())
    assert star.gemm_flops("fp32") == pytest.approx(11.5e12)
    assert np.isfinite(star.transfer_time(np.ones((4, 4))))
    with pytest.raises(ClusterNotFoundError, match="nope"):
        ep_topology("nope", 2)


def test_ep_topology_warns_about_a_foreign_calibration(
        caplog: pytest.LogCaptureFixture) -> None:
    ep_topology.cache_clear()
    with caplog.at_level(logging.WARNING, logger="megatron_moe_ext.perf.topology"):
        topo = ep_topology("local-cpu", 2)
    assert topo.num_workers == 2 and "calibrated on another machine" in caplog.text


def test_config_dir_prefers_package_data(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    """Installed (megatron_moe_ext/configs exists next to the package) wins over a checkout."""
    pkg = tmp_path / "site" / "megatron_moe_ext"
    (pkg / "perf").mkdir(parents=True)
    (pkg / "configs" / "clusters").mkdir(parents=True)
    monkeypatch.setattr(cl, "__file__", str(pkg / "perf" / "cluster.py"))
    assert cl._config_dir() == pkg / "configs"
    (pkg / "configs" / "clusters").rmdir()
    (pkg / "configs").rmdir()
    assert cl._config_dir() == tmp_path / "site" / "configs"
