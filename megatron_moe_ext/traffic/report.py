"""The traffic report of a routing trace: heatmaps, expert popularity, locality, markdown.

Notation: I records, L layers, W workers, E experts, M workers per node, k region size.

:func:`build_report` writes into ``out_dir``:

- ``layer<N>_workers.png``: worker x worker traffic (tokens) of layer N over the whole trace
  and at its first, middle and last record; ``layer<N>_nodes.png`` the node x node matrix
  (with a cluster whose nodes the W workers fill);
- ``expert_popularity.png``: per layer, each expert's share of the routed tokens over the
  iterations; ``locality.png``: share inside regions of k workers (best and consecutive);
- ``summary.md`` and ``summary.json``: the figures of :mod:`.locality` per layer, how far
  the routing is from balanced (max / mean expert load) and what that costs per the
  performance model (stock Megatron's sync schedule vs FasterMoE's smart schedule on the
  same counts vs balanced counts), how well the shadow-prefetch predictors foresee the
  popularity (:mod:`.prediction`), and the fabric what-ifs of :mod:`.fabric`.
"""

from __future__ import annotations

import json
import logging
from pathlib import Path
from typing import Any, Optional

import numpy as np

from ..perf.cluster import ClusterSpec
from ..core.popularity import transition_pairs
from . import locality as loc
from .prediction import format_accuracy, predictor_accuracies
from .trace import RoutingTrace

logger = logging.getLogger(__name__)


def _plt():
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    return plt


def _heatmaps(mats: list[tuple[str, np.ndarray]], title: str, path: Path, unit: str) -> None:
    plt = _plt()
    from matplotlib.ticker import MaxNLocator

    fig, axes = plt.subplots(1, len(mats), figsize=(3.6 * len(mats), 3.4), squeeze=False)
    for ax, (name, m) in zip(axes[0], mats):
        im = ax.imshow(m, cmap="viridis", interpolation="nearest")
        ax.set_title(name, fontsize=9)
        ax.xaxis.set_major_locator(MaxNLocator(integer=True))
        ax.yaxis.set_major_locator(MaxNLocator(integer=True))
        ax.set_xlabel("destination")
        ax.set_ylabel("source")
        fig.colorbar(im, ax=ax, fraction=0.046, label=unit)
    fig.suptitle(title, fontsize=10)
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)


def _balanced_like(c: np.ndarray) -> np.ndarray:
    """Counts with every worker's copies spread evenly over the experts."""
    rows = c.sum(axis=1, keepdims=True)
    return np.repeat(rows / c.shape[1], c.shape[1], axis=1)


def routing_cost(trace: RoutingTrace, layer_pos: int, cluster: ClusterSpec,
                   max_records: int = 16) -> Optional[dict[str, float]]:
    """Predicted layer time (ms) on the recorded vs balanced counts of EP group 0 (last
    ``max_records`` records), sync and smart (the group size best on balanced routing), on
    the cluster's first ep workers (None when they are not whole nodes, or ep is 1).
    """
    from ..perf.model import predict_layer
    from ..perf.topology import Topology
    from .fabric import described_fabric

    h = trace.header
    ep, H = h.ep_size, int(h.meta.get("hidden_size", 0))
    if ep < 2 or not H:
        return None
    try:
        topo = Topology(described_fabric(cluster, ep))
    except ValueError:
        return None  # the EP group is not whole nodes of the cluster
    alpha = h.meta.get("ffn_hidden_size", 4 * H) / H
    dtype = h.meta.get("precision", "fp32")
    nmb = int(h.meta.get("num_microbatches", 1))
    recs = trace.counts[-max_records:, layer_pos, :ep].astype(float) / nmb
    bal0 = _balanced_like(recs[-1])
    group_size = min((g for g in range(1, ep + 1) if ep % g == 0), key=lambda g: predict_layer(
        bal0, None, H, alpha, None, topo, dtype, "smart", group_size=g).total_s)
    out: dict[str, list[float]] = {"smart_group_size": [group_size]}
    for rec in recs:
        for tag, c in (("real", rec), ("balanced", _balanced_like(rec))):
            for sched in ("sync", "smart"):
                p = predict_layer(c, None, H, alpha, None, topo, dtype, sched,
                                  group_size=group_size)
                out.setdefault(f"{sched}_{tag}_ms", []).append(p.total_s * 1e3)
    res = {k: float(np.mean(v)) for k, v in out.items()}
    for sched in ("sync", "smart"):
        res[f"{sched}_real_over_balanced"] = res[f"{sched}_real_ms"] / res[f"{sched}_balanced_ms"]
    return res


def layer_figures(trace: RoutingTrace, layer_pos: int, window: int = 1,
                  workers_per_node: Optional[int] = None) -> dict[str, Any]:
    """Locality figures of one layer (JSON-ready)."""
    h = trace.header
    counts = trace.counts[:, layer_pos].astype(float)  # [I, W, E]
    Ts = np.stack([loc.traffic_matrix(c, h.ep_size) for c in counts])
    win = loc.windows(Ts, window) if len(Ts) >= window else Ts.sum(axis=0, keepdims=True)
    ks = loc.region_sizes(h.num_workers)
    curves = [loc.locality_curve(t, ks) for t in win]
    load = counts.sum(axis=1)  # [I, E]
    mean = load.mean(axis=1)
    k_mid = next((k for k in ks if k > 1 and k < h.num_workers), ks[-1])
    return {
        "layer": h.layers[layer_pos],
        "region_share": {k: {"best": float(np.mean([c[k]["best"] for c in curves])),
                             "aligned": float(np.mean([c[k]["aligned"] for c in curves]))}
                         for k in ks},
        "peer_share": {k: float(np.mean([loc.peer_share(t, [k])[k] for t in win]))
                       for k in ks if k < h.num_workers},
        "stability_k": k_mid,
        "stability": loc.stability(win, k_mid) if len(win) > 1 else {},
        "max_over_mean_expert_load": float(np.mean(load.max(axis=1) / np.maximum(mean, 1e-12))),
        "popularity_last": loc.expert_popularity(counts[-1]).round(4).tolist(),
        "node_share": (float(loc.region_share(Ts.sum(0), loc.aligned_regions(
            h.num_workers, workers_per_node))) if workers_per_node
            and h.num_workers % workers_per_node == 0 else None),
    }


def build_report(trace: RoutingTrace, out_dir: str | Path, cluster: Optional[ClusterSpec] = None,
                 window: int = 1, fabric: bool = True,
                 fabric_kwargs: Optional[dict[str, Any]] = None) -> dict[str, Any]:
    """Write the figures and the summary of the module docstring; returns summary.json's dict."""
    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    h = trace.header
    if len(trace) == 0:
        raise ValueError("the trace has no records")
    m = cluster.workers_per_node if cluster else None
    nodes_ok = bool(m and h.num_workers % m == 0 and h.num_workers > m)
    summary: dict[str, Any] = {"header": {"workers": h.num_workers, "experts": h.num_experts,
                                          "layers": list(h.layers), "topk": h.topk,
                                          "ep_size": h.ep_size, "meta": h.meta},
                               "records": len(trace),
                               "iterations": [int(trace.iterations[0]), int(trace.iterations[-1])],
                               "window": window, "layers": [], "files": []}
    plt = _plt()
    for pos, layer in enumerate(h.layers):
        counts = trace.counts[:, pos].astype(float)
        Ts = [loc.traffic_matrix(c, h.ep_size) for c in counts]
        snaps = [("all records", sum(Ts))] + [
            (f"iteration {int(trace.iterations[i])}", Ts[i])
            for i in sorted({0, len(Ts) // 2, len(Ts) - 1})]
        path = out / f"layer{layer}_workers.png"
        _heatmaps(snaps, f"layer {layer}: worker x worker traffic", path, "tokens")
        summary["files"].append(path.name)
        if nodes_ok:
            path = out / f"layer{layer}_nodes.png"
            _heatmaps([(n, loc.node_matrix(t, m)) for n, t in snaps],
                      f"layer {layer}: node x node traffic ({cluster.name})", path, "tokens")
            summary["files"].append(path.name)
        fig_data = layer_figures(trace, pos, window, m if nodes_ok else None)
        if cluster is not None:
            fig_data["routing_cost"] = routing_cost(trace, pos, cluster)
        summary["layers"].append(fig_data)
    if trace.choices is not None and len(h.layers) > 1:
        recs = [c for c in trace.choices if c is not None]
        summary["transitions"] = {
            f"{h.layers[p]}->{h.layers[p + 1]}": loc.successor_share(sum(
                transition_pairs(c[p], c[p + 1], h.num_experts) for c in recs))
            for p in range(len(h.layers) - 1)}
    if len(trace) >= 2:
        # all records, and with >= 8 the second half alone (routing has settled): one pass
        accs = predictor_accuracies(trace, (1, len(trace) // 2) if len(trace) >= 8 else (1,))
        summary["prediction"] = accs[0]
        if len(accs) > 1:
            summary["prediction_second_half"] = accs[1]
    fig, axes = plt.subplots(len(h.layers), 1, figsize=(7, 2.4 * len(h.layers)), squeeze=False)
    for ax, pos in zip(axes[:, 0], range(len(h.layers))):
        pop = loc.expert_popularity(trace.counts[:, pos].astype(float))  # [I, E]
        for e in range(h.num_experts):
            ax.plot(trace.iterations, pop[:, e], lw=1, label=f"e{e}")
        ax.axhline(1.0 / h.num_experts, color="k", ls="--", lw=0.8)
        ax.set_ylabel(f"layer {h.layers[pos]}\nshare")
        if h.num_experts <= 16:
            ax.legend(fontsize=6, ncol=8, loc="upper right")
    axes[-1, 0].set_xlabel("iteration")
    fig.suptitle("expert popularity (dashed: balanced)", fontsize=10)
    fig.tight_layout()
    fig.savefig(out / "expert_popularity.png", dpi=110)
    plt.close(fig)
    fig, ax = plt.subplots(figsize=(5, 3.4))
    for d in summary["layers"]:
        ks = sorted(d["region_share"])
        ax.plot(ks, [d["region_share"][k]["best"] for k in ks], "o-",
                label=f"layer {d['layer']} best")
        ax.plot(ks, [d["region_share"][k]["aligned"] for k in ks], "x--",
                label=f"layer {d['layer']} consecutive")
    ax.set_xscale("log", base=2)
    ax.set_xlabel("region size k (workers)")
    ax.set_ylabel("share of routed tokens inside")
    ax.set_ylim(0, 1.02)
    ax.legend(fontsize=7)
    fig.tight_layout()
    fig.savefig(out / "locality.png", dpi=110)
    plt.close(fig)
    summary["files"] += ["expert_popularity.png", "locality.png"]
    fabric_md = ""
    if cluster is not None and fabric:
        from .fabric import evaluate_fabrics, format_fabrics

        kw = dict(fabric_kwargs or {})
        try:
            res = evaluate_fabrics(trace, cluster, **kw)
        except ValueError as exc:
            summary["fabrics_skipped"] = str(exc)
        else:
            rate = kw.get("nic_gbps") or (cluster.nics[0].gbps if cluster.nics else 100.0)
            fabric_md = format_fabrics(res, rate)
            summary["fabrics"] = [r.__dict__ for r in res]
    (out / "summary.json").write_text(json.dumps(summary, indent=2, default=str) + "\n")
    (out / "summary.md").write_text(format_summary(summary, fabric_md))
    summary["files"] += ["summary.json", "summary.md"]
    logger.info("traffic report of %d records written to %s", len(trace), out)
    return summary


def format_summary(s: dict[str, Any], fabric_md: str = "") -> str:
    """The markdown summary."""
    h = s["header"]
    lines = [f"# Traffic report", "",
             f"{s['records']} records (iterations {s['iterations'][0]}..{s['iterations'][1]}), "
             f"{h['workers']} workers, {h['experts']} experts, top-{h['topk']}, EP {h['ep_size']}, "
             f"layers {h['layers']}; locality windows of {s['window']} record(s).", ""]
    for d in s["layers"]:
        ks = sorted(d["region_share"], key=int)
        lines += [f"## Layer {d['layer']}", "",
                  "| k | inside best regions | inside consecutive regions | top-k peers |",
                  "|---|---|---|---|"]
        for k in ks:
            r = d["region_share"][k]
            peer = d["peer_share"].get(k)
            lines.append(f"| {k} | {100 * r['best']:.1f}% | {100 * r['aligned']:.1f}% | "
                         f"{'-' if peer is None else f'{100 * peer:.1f}%'} |")
        lines.append("")
        lines.append(f"Expert load max / mean: {d['max_over_mean_expert_load']:.2f} "
                     "(1.00 = balanced).")
        if d.get("node_share") is not None:
            lines.append(f"Share staying inside a node: {100 * d['node_share']:.1f}%.")
        if d["stability"]:
            lines.append(f"Stability of best regions of k={d['stability_k']} (lag in windows: "
                         "similarity of traffic matrices / share kept vs fresh regions): " +
                         ", ".join(f"{lag}: {v['similarity']:.3f} / {v['retained']:.3f}"
                                   for lag, v in d["stability"].items()) + ".")
        ic = d.get("routing_cost")
        if ic:
            lines.append(
                f"Cost of the real routing vs balanced (performance model, EP group 0): stock "
                f"Megatron (sync) {ic['sync_real_ms']:.3f} vs {ic['sync_balanced_ms']:.3f} ms "
                f"({ic['sync_real_over_balanced']:.2f}x), FasterMoE smart "
                f"g={int(ic['smart_group_size'])} "
                f"{ic['smart_real_ms']:.3f} vs {ic['smart_balanced_ms']:.3f} ms "
                f"({ic['smart_real_over_balanced']:.2f}x).")
        lines.append("")
    if s.get("transitions"):
        lines += ["## Consecutive layers", "", "Share of a token's expert pairs (layer l, l+1) "
                  "that go to the most frequent successor of the layer-l expert (recorded "
                  "tokens; about 1 / E when the layers are independent): " + ", ".join(
                      f"{k}: {100 * v:.1f}%" for k, v in s["transitions"].items()) + ".", ""]
    if s.get("prediction"):
        lines += ["## Popularity prediction (shadow prefetch)", "", "Each record's counts "
                  "predicted from what was known before its layer routed "
                  "(megatron_moe_ext/traffic/prediction.py; `balanced` is the reference):", "",
                  format_accuracy(s["prediction"])]
        if s.get("prediction_second_half"):
            lines += [f"The same over records {s['prediction_second_half']['start']}.."
                      f"{s['records'] - 1} only:", "", format_accuracy(s["prediction_second_half"])]
    if fabric_md:
        lines += ["## Fabric what-ifs (performance model)", "", fabric_md]
    elif s.get("fabrics_skipped"):
        lines += ["## Fabric what-ifs", "", f"Skipped: {s['fabrics_skipped']}.", ""]
    lines += ["Figures: " + ", ".join(f"`{f}`" for f in s["files"]), ""]
    return "\n".join(lines)
