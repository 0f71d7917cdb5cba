"""DDL-Roofline points for a model config on a cluster, and their plot.

Notation
--------
N        workers; E experts (E / N per worker, contiguous placement); k top-k
T_w      tokens per worker per layer (before top-k duplication)
H        hidden size; alpha = ffn_hidden / H; P GEMM throughput of a worker (FLOP/s)
s        Zipf exponent of expert popularity (0 = balanced routing)
R_CC     x: total compute / total communication of the layer
P_bar    y: useful FLOP/s per worker, 12 alpha H^2 sum_w B_w / (N Lat_e2e)

Four variants per (model, cluster, routing): ``sync`` (FastMoE-style synchronous EP),
``smart`` (smart schedule), ``shadow`` (dynamic shadowing, Algorithm 1), ``smart+shadow``.
"""

from __future__ import annotations

import logging
from dataclasses import dataclass
from pathlib import Path
from typing import Optional, Sequence

import numpy as np

from .model import DTYPE_BYTES, ideal_throughput, predict_layer, semi_ideal_throughput
from ..routing import zipf_counts
from .topology import Topology

logger = logging.getLogger(__name__)

VARIANTS = ("sync", "smart", "shadow", "smart+shadow")
"""Names of the four roofline variants."""


@dataclass(frozen=True)
class MoEModelConfig:
    """The shape of one MoE layer for the roofline."""

    name: str
    """Label, e.g. ``MoE-GPT``."""
    hidden: int
    """H."""
    alpha: float = 2.0
    """ffn_hidden / H."""
    num_experts: int = 16
    """E in total (a multiple of the worker count)."""
    topk: int = 2
    """Experts per token."""
    tokens_per_worker: int = 4096
    """Tokens each worker routes per layer (before top-k duplication)."""
    dtype: str = "fp32"
    """Dtype of activations and parameters (selects P and bytes per element)."""


@dataclass(frozen=True)
class RooflinePoint:
    """One point of the DDL-Roofline."""

    model: str
    """Model label."""
    variant: str
    """One of :data:`VARIANTS`."""
    r_cc: float
    """x coordinate, R_CC."""
    throughput: float
    """y coordinate, P_bar in FLOP/s per worker."""
    total_s: float
    """Predicted fwd+bwd latency of the layer."""
    peak_flops: float
    """P of the cluster for the model's dtype."""
    shadows: tuple[int, ...] = ()
    """Experts shadowed (shadow variants)."""


def roofline_points(model: MoEModelConfig, topology: Topology, zipf: float = 0.0,
                    seed: int = 0, group_size: int = 2,
                    counts: Optional[np.ndarray] = None) -> list[RooflinePoint]:
    """The four variants' points for one model on one cluster (shadows from Algorithm 1)."""
    from megatron_moe_ext.core.shadow_policy import choose_shadows  # pure NumPy, no torch

    n = topology.num_workers
    if counts is None:
        counts = zipf_counts(n, model.num_experts, model.tokens_per_worker, model.topk,
                             zipf, seed)
    b = DTYPE_BYTES[model.dtype]
    shadows = choose_shadows(counts, model.num_experts // n, model.hidden, model.alpha, b,
                             topology.gemm_flops(model.dtype), topology.net_bandwidth())
    points = []
    for variant in VARIANTS:
        shadow = shadows if "shadow" in variant else []
        pred = predict_layer(counts, None, model.hidden, model.alpha, b, topology, model.dtype,
                             schedule="smart" if "smart" in variant else "sync",
                             group_size=group_size, shadow_experts=shadow)
        points.append(RooflinePoint(model.name, variant, pred.r_cc, pred.throughput,
                                    pred.total_s, pred.peak_flops, tuple(shadow)))
    logger.info("%s on %s: %s", model.name, topology.spec.name,
                ", ".join(f"{p.variant} {p.total_s * 1e3:.2f} ms" for p in points))
    return points


def plot_roofline(points: Sequence[RooflinePoint], cluster: Topology | str,
                  path: str | Path, peak: Optional[float] = None) -> Path:
    """Write a PNG: points per variant, ideal and semi-ideal lines, log-x R_CC axis."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    name = cluster if isinstance(cluster, str) else cluster.spec.name
    if peak is None:
        peak = max((p.peak_flops for p in points), default=1.0)
    finite = [p.r_cc for p in points if np.isfinite(p.r_cc) and p.r_cc > 0]
    lo = min(finite + [1.0]) / 4
    hi = max(finite + [1.0]) * 4
    xs = np.logspace(np.log10(lo), np.log10(hi), 200)
    fig, ax = plt.subplots(figsize=(6.4, 4.4))
    ax.plot(xs, ideal_throughput(peak, xs) / 1e12, "k-", label="ideal P·min(1, R)")
    ax.plot(xs, semi_ideal_throughput(peak, xs) / 1e12, "k--", label="semi-ideal P·R/(R+1)")
    markers = dict(zip(VARIANTS, "osv^"))
    for variant in VARIANTS:
        sel = [p for p in points if p.variant == variant]
        if sel:
            ax.scatter([min(max(p.r_cc, lo), hi) for p in sel],
                       [p.throughput / 1e12 for p in sel],
                       marker=markers[variant], label=variant)
    for p in points:
        if p.variant == "sync":
            ax.annotate(p.model, (min(max(p.r_cc, lo), hi), p.throughput / 1e12),
                        fontsize=7, xytext=(3, 3), textcoords="offset points")
    ax.set_xscale("log")
    ax.set_xlabel("R_CC = compute / communication")
    ax.set_ylabel("throughput per worker (TFLOP/s)")
    ax.set_title(f"DDL-Roofline on {name}")
    ax.grid(True, which="both", alpha=0.3)
    ax.legend(fontsize=8)
    out = Path(path)
    out.parent.mkdir(parents=True, exist_ok=True)
    fig.tight_layout()
    fig.savefig(out, dpi=120)
    plt.close(fig)
    logger.info("wrote %s", out)
    return out
