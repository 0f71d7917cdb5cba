"""The emulated accelerator sleeps what its formula says (megatron_moe_ext/lab/accelerator.py)."""

from __future__ import annotations

import time
from pathlib import Path

import numpy as np
import pytest
import torch

from megatron_moe_ext.lab import EmulatedAccelerator, lab_topology, resolve_dilation
from megatron_moe_ext.perf.topology import Topology, cluster_spec_from_dict

SPEC = {
    "name": "acc-test", "nodes": 1, "workers_per_node": 2,
    "gemm_tflops": {"fp32": 2.0, "bf16": 4.0},
    "gemm_curve": {"bf16": [[100, 1.0], [1000, 4.0]]},
    "links": [{"a": "w0", "b": "w1", "gbps": 10}], "nics": [{"attach": "w0", "gbps": 5}],
}


def _topo() -> Topology:
    return Topology(cluster_spec_from_dict(SPEC))


def test_duration_is_the_formula_exactly():
    acc = EmulatedAccelerator.for_cluster(_topo(), "fp32", hidden=256, ffn=1024, dilation=3.0)
    t = 777
    expected = 3.0 * 4 * t * (1024 / 256) * 256 ** 2 / 2.0e12
    assert acc.forward_seconds(t) == pytest.approx(expected, rel=1e-12)
    assert acc.backward_seconds(t) == pytest.approx(2 * expected, rel=1e-12)
    assert acc.forward_seconds(0) == 0.0
    # the curve: P interpolated at the chunk's tokens (550 -> 2.5 TFLOP/s)
    curve = EmulatedAccelerator.for_cluster(_topo(), "bf16", hidden=256, ffn=512)
    assert curve.forward_seconds(550) == pytest.approx(4 * 550 * 2 * 256 ** 2 / 2.5e12, rel=1e-9)
    floor = EmulatedAccelerator.for_cluster(_topo(), "fp32", 256, 1024, dilation=0.0)
    assert floor.forward_seconds(10_000) == 0.0


def test_sleep_matches_the_formula_and_returns_x():
    # 4 t alpha H^2 / P with t=2000, H=512, alpha=4, P=2e12: 4.19 ms; D=12 -> 50.3 ms forward
    acc = EmulatedAccelerator.for_cluster(_topo(), "fp32", hidden=512, ffn=2048, dilation=12.0)
    x = torch.randn(2000, 512, requires_grad=True)
    p = torch.rand(2000, requires_grad=True)
    fwd = acc.forward_seconds(2000)
    assert fwd == pytest.approx(0.0503, rel=0.01)
    t0 = time.perf_counter()
    y = acc.expert_fn(x, p, [1000, 1000])
    t1 = time.perf_counter()
    slept_fwd = acc.stats.actual_s
    gy = torch.randn_like(y)
    y.backward(gy)
    slept_bwd = acc.stats.actual_s - slept_fwd
    assert y.shape == x.shape and y.dtype == x.dtype and torch.equal(y, x)
    assert torch.equal(x.grad, gy) and torch.equal(p.grad, torch.zeros_like(p))
    # never shorter than the formula; late wake-ups on a loaded machine bounded generously
    # (the backward's wall time also holds the autograd engine's start, so its own span)
    assert fwd <= slept_fwd <= t1 - t0 < fwd + 0.1
    assert 2 * fwd <= slept_bwd < 2 * fwd + 0.1
    st = acc.stats
    assert st.calls == 2 and st.requested_s == pytest.approx(3 * fwd)
    assert st.actual_s >= st.requested_s


def test_shadow_fn_keeps_the_broadcast_weights_in_the_graph():
    acc = EmulatedAccelerator.for_cluster(_topo(), "fp32", 64, 128, dilation=0.0)
    w = torch.zeros(256, 64, requires_grad=True)
    ran = []

    class Probe(torch.autograd.Function):  # stands in for the broadcast's backward (reduce)
        @staticmethod
        def forward(ctx, t):
            return t.view_as(t)

        @staticmethod
        def backward(ctx, g):
            ran.append(g)
            return g

    x = torch.randn(5, 64, requires_grad=True)
    y = acc.shadow_fn([Probe.apply(w)], x, torch.rand(5))
    y.sum().backward()
    assert len(ran) == 1 and ran[0].shape == w.shape  # reached, with a zero gradient
    assert torch.count_nonzero(ran[0]) == 0


def test_dilation_auto_reads_the_emulator_scale(monkeypatch):
    monkeypatch.delenv("MMX_EMULATION_SCALE", raising=False)
    assert resolve_dilation("auto")[0] == 1.0
    monkeypatch.setenv("MMX_EMULATION_SCALE", "0.02")
    assert resolve_dilation("auto")[0] == pytest.approx(50.0)
    assert resolve_dilation("7.5")[0] == 7.5
    with pytest.raises(ValueError, match="--dilation"):
        resolve_dilation("fast")
    with pytest.raises(ValueError, match="> 0"):
        resolve_dilation("0")


def test_lab_topology_keeps_the_node_layout():
    lab2x2 = str(Path(__file__).with_name("lab2x2.yaml"))
    assert lab_topology(lab2x2, 2).nodes == 1 and lab_topology(lab2x2, 4).nodes == 2
    with pytest.raises(ValueError, match="workers per node"):
        lab_topology(lab2x2, 4, workers_per_node=4)
    with pytest.raises(ValueError, match="not whole nodes"):
        lab_topology(lab2x2, 3)
    with pytest.raises(ValueError, match="not whole nodes"):
        lab_topology(lab2x2, 8)
    johnny = lab_topology("johnny", 16)
    assert johnny.num_workers == 16 and np.isclose(johnny.gemm_flops("fp32"), 11.5e12)
