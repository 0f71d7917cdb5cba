"""Rank 0's results document and summary table of a lab benchmark run (JSON keys as in
scripts/bench_moe_layer.py where they apply).

Notation: W workers, D dilation (lab seconds per cluster second); times are medians over the
timed iterations of the max over ranks.
"""

from __future__ import annotations

import datetime
import json
import logging
import math
import os
import platform
from dataclasses import asdict
from pathlib import Path
from typing import Optional

import torch

from ..bench.stats import median
from ..emulation.links import TBF_LATENCY_MS
from .setup import emulator_scale

logger = logging.getLogger(__name__)

__all__ = ["summarize", "format_table", "common_record", "format_iteration", "write_record"]


def write_record(path: Optional[str], record: dict) -> None:
    """Write a lab run's JSON document to ``path`` (parents created); nothing when None."""
    if not path:
        return
    Path(path).parent.mkdir(parents=True, exist_ok=True)
    Path(path).write_text(json.dumps(record, indent=1) + "\n")
    logger.info("wrote %s", path)


def summarize(cfg, topo, world, local_world, dil, dil_source, mx, preds, shadow_sets,
               a2a, comp, sleep_req, sleep_act, loads) -> dict:
    """Rank 0's JSON document (same keys as scripts/bench_moe_layer.py where they apply)."""
    res: dict = {"impls": {}, "mode": "floor" if cfg.floor else cfg.compute}
    scale = 1.0 / dil if dil > 0 else None  # cluster seconds per lab second
    for name in sorted({k.split(".")[0] for k in mx}):
        fwd, bwd = mx[f"{name}.fwd"], mx[f"{name}.bwd"]
        tot = [a + b for a, b in zip(fwd, bwd)]
        pred = median(preds.get(name, []))
        res["impls"][name] = {
            "fwd_s": median(fwd), "bwd_s": median(bwd), "fwd_bwd_s": median(tot),
            "fwd_bwd_s_min": min(tot), "fwd_bwd_s_max": max(tot),
            "cluster_fwd_bwd_s": median(tot) * scale if scale else None,
            "predicted_fwd_bwd_s": pred,
            "predicted_lab_fwd_bwd_s": pred * dil if pred is not None else None,
            "measured_over_predicted": (median(tot) * scale / pred
                                        if scale and pred else None),
            "fwd_s_iters": fwd, "bwd_s_iters": bwd}
    if "megatron_balanced" in res["impls"]:
        res["megatron_balanced"] = res["impls"].pop("megatron_balanced")
    floors = {k[len("floor_"):]: res["impls"].pop(k)["fwd_bwd_s"]
              for k in list(res["impls"]) if k.startswith("floor_")}
    distinct = []
    for sh in shadow_sets:
        if sh not in distinct:
            distinct.append(sh)
    res["shadow_policy"] = cfg.shadow
    res["shadows"] = distinct
    res["shadow_set_counts"] = [shadow_sets.count(sh) for sh in distinct]
    imp = res["impls"]
    if "megatron" in imp and "fastermoe" in imp:
        m, f = imp["megatron"], imp["fastermoe"]
        for key in ("fwd", "bwd", "fwd_bwd"):
            res[f"ratio_{key}"] = m[f"{key}_s"] / f[f"{key}_s"]
        mt = [a + b for a, b in zip(m["fwd_s_iters"], m["bwd_s_iters"])]
        ft = [a + b for a, b in zip(f["fwd_s_iters"], f["bwd_s_iters"])]
        res["ratio_fwd_bwd_paired"] = median([a / b for a, b in zip(mt, ft)])
        res["ratio_fwd_bwd_min"] = m["fwd_bwd_s_min"] / f["fwd_bwd_s_min"]
        if m["predicted_fwd_bwd_s"] and f["predicted_fwd_bwd_s"]:
            res["predicted_ratio_fwd_bwd"] = m["predicted_fwd_bwd_s"] / f["predicted_fwd_bwd_s"]
    res["balance_bound"] = res["bound_fraction"] = None
    if "megatron_balanced" in res and "megatron" in imp:
        res["balance_bound"] = imp["megatron"]["fwd_bwd_s"] / res["megatron_balanced"]["fwd_bwd_s"]
        if "ratio_fwd_bwd" in res:
            res["bound_fraction"] = res["ratio_fwd_bwd"] / res["balance_bound"]
    a, c_fwd = median(a2a), median(comp)
    lat_comm, lat_comp = 4 * a, 3 * c_fwd
    bound = (lat_comm + lat_comp) / max(lat_comm, lat_comp) if max(lat_comm, lat_comp) > 0 else 1.0
    achieved = res.get("ratio_fwd_bwd")
    frac = (achieved - 1) / (bound - 1) if achieved is not None and bound > 1 + 1e-9 else None
    res["bound_fraction_schedule"] = frac
    res["overlap"] = {"alltoall_s": a, "expert_fwd_s": c_fwd, "expert_bwd_s": 2 * c_fwd,
                      "lat_comm_s": lat_comm, "lat_comp_s": lat_comp, "bound": bound,
                      "achieved": achieved, "bound_fraction_schedule": frac,
                      "definition": "as scripts/bench_moe_layer.py; expert times are the "
                                    "emulated accelerator's (max over ranks of the local load)"}
    res.update(common_record(cfg, topo, world, local_world, dil, dil_source, sleep_req,
                             sleep_act, loads))
    if floors:
        res["lab"]["floor"] = {
            name: {"fwd_bwd_s": f, "fraction": f / imp[name]["fwd_bwd_s"]}
            for name, f in floors.items() if name in imp}
        res["lab"]["floor_links"] = FLOOR_LINKS[emulator_scale() is not None]
    return res


FLOOR_LINKS = {True: "limited (emulator): compute-free time on the emulated links, not the "
                     "box floor",
               False: "unlimited (loopback): the box's own cost"}
"""What a compute-zero pass measures, under the emulator (True) or not."""


def _namespace_tcp_rmem() -> str | None:
    """This namespace's ``net.ipv4.tcp_rmem`` (min default max): the emulator caps it so that
    its queues are lossless (emulation.links.tcp_rcvbuf_bytes); None where unreadable."""
    try:
        return Path("/proc/sys/net/ipv4/tcp_rmem").read_text().split("\n")[0].replace("\t", " ")
    except OSError:
        return None


def common_record(cfg, topo, world, local_world, dil, dil_source, sleep_req, sleep_act,
                  loads) -> dict:
    """The keys every lab record has: dilation, lab, cluster, config, machine."""
    res: dict = {}
    res["dilation"] = dil
    res["lab"] = {
        "dilation": dil, "dilation_source": dil_source,
        "emulator_scale": emulator_scale(),
        "emulator_queue_ms": TBF_LATENCY_MS if emulator_scale() is not None else None,
        "emulator_tcp_rmem": _namespace_tcp_rmem() if emulator_scale() is not None else None,
        "sleep_requested_s": sleep_req, "sleep_actual_s": sleep_act,
        "oversleep_fraction": (sleep_act - sleep_req) / sleep_req if sleep_req > 0 else None,
        "note": "the lab's own cost per layer call is the floor (compute zero, links "
                "unlimited: --floor or --measure-floor outside the emulator); docs/emulation.md"}
    res["cluster"] = {"name": topo.spec.name, "file": cfg.cluster, "workers": world,
                      "workers_per_node": topo.workers_per_node, "nodes": topo.nodes}
    res["config"] = dict(asdict(cfg), world_size=world, local_world_size=local_world)
    res["machine"] = {"platform": platform.platform(), "cpu_count": os.cpu_count(),
                      "torch": torch.__version__, "loadavg_1min_start": loads[0],
                      "loadavg_1min_end": loads[1],
                      "date_utc": datetime.datetime.now(datetime.timezone.utc)
                      .isoformat(timespec="seconds")}
    return res


def format_table(r: dict) -> str:
    """Human-readable summary (rank 0)."""
    def ms(v):
        return f"{v * 1e3:10.2f}" if v is not None else f"{'-':>10}"

    lines = [f"lab ({r['mode']}, D={r['dilation']:g}) {r['cluster']['name']} "
             f"W={r['cluster']['workers']}",
             f"{'impl':<10} {'fwd ms':>10} {'bwd ms':>10} {'fwd+bwd ms':>10} {'pred ms':>10}"
             f" {'meas/pred':>10}"]
    rows = list(r["impls"].items())
    if r.get("megatron_balanced"):
        rows.append(("meg@bal", r["megatron_balanced"]))
    for name, v in rows:
        mp = v.get("measured_over_predicted")
        lines.append(f"{name:<10} {ms(v['fwd_s'])} {ms(v['bwd_s'])} {ms(v['fwd_bwd_s'])} "
                     f"{ms(v.get('predicted_lab_fwd_bwd_s'))} "
                     f"{'-' if mp is None else f'{mp:10.3f}'}")
    if "ratio_fwd_bwd" in r:
        lines.append(f"ratio megatron/fastermoe fwd+bwd {r['ratio_fwd_bwd']:.3f} (paired "
                     f"{r['ratio_fwd_bwd_paired']:.3f}), predicted "
                     f"{r.get('predicted_ratio_fwd_bwd', float('nan')):.3f}")
    if r["shadows"] and r["shadows"] != [[]]:
        lines.append("shadows: " + ", ".join(f"{s} x{n}" for s, n in
                                             zip(r["shadows"], r["shadow_set_counts"])))
    exposed = {n: v["exposed_broadcast_s"] for n, v in r["impls"].items()
               if v.get("exposed_broadcast_s") is not None}
    if exposed:
        lines.append("waited for shadow broadcasts (median of the max over ranks): " + ", ".join(
            f"{n} {s * 1e3:.2f} ms" for n, s in exposed.items()))
    if r.get("prefetch"):
        pf = r["prefetch"]
        lines.append(f"prefetch {pf['mode']} (slack {pf['slack']:g}): prefetched set used in "
                     f"{pf['used'] * 100:.0f} %, equal to the true-count set in "
                     f"{pf['set_match'] * 100:.0f} % of the calls")
    lab = r["lab"]
    for name, f in (lab.get("floor") or {}).items():
        lines.append(f"floor {name}: {f['fwd_bwd_s'] * 1e3:.1f} ms = {f['fraction'] * 100:.1f} % "
                     f"of its emulated time ({lab['floor_links']})")
    if lab["oversleep_fraction"] is not None:
        lines.append(f"emulated compute: requested {lab['sleep_requested_s']:.3f} s, slept "
                     f"{lab['sleep_actual_s']:.3f} s (+{lab['oversleep_fraction'] * 100:.1f} %)")
    lines.append(f"load average {r['machine']['loadavg_1min_start']:.2f} -> "
                 f"{r['machine']['loadavg_1min_end']:.2f}")
    return "\n".join(lines)




def iteration_record(cfg, summ: dict, stages: list, plan: list, bsize: int, r: float,
                     token_scale: float, dil: float, chunk_bytes: int) -> dict:
    """The ``iteration`` key of the record (rank 0)."""
    var = summ["variants"]
    for name, v in var.items():
        if name.startswith("floor_"):
            continue
        v["cluster_ms"] = v["iteration_s"] / dil * 1e3 if dil else None
        same = math.isclose(r, token_scale)
        v["cluster_ms_at_model_tokens"] = (v["cluster_ms"] / token_scale
                                          if dil and same else None)
    gain, speedup, floor = {}, {}, {}
    for impl in ("megatron", "fastermoe"):
        a, b = var.get(f"{impl}.none"), var.get(f"{impl}.moe_first")
        if a and b:
            gain[impl] = 1.0 - b["iteration_s"] / a["iteration_s"]
        f = var.get(f"floor_{impl}.none")
        if f and a:
            floor[impl] = {"iteration_s": f["iteration_s"],
                           "fraction": f["iteration_s"] / a["iteration_s"]}
    for pr in ("none", "moe_first"):
        a, b = var.get(f"megatron.{pr}"), var.get(f"fastermoe.{pr}")
        if a and b:
            speedup[pr] = a["iteration_s"] / b["iteration_s"]
    return {
        "model": cfg.model, "layers": len(stages) - 2, "stages": [s["name"] for s in stages],
        "tokens_per_worker": cfg.tokens, "token_scale": token_scale, "grad_scale": r,
        "tokens_note": (f"{cfg.tokens} tokens per worker = {token_scale:.4g} x the model's "
                        "micro-batch: compute and token traffic are linear in tokens, so R_CC "
                        "is kept; the reductions are "
                        + ("scaled alike (--grad-scale tokens), so cluster_ms_at_model_tokens "
                           "= cluster_ms / token scale" if math.isclose(r, token_scale) else
                           f"{r:g} x the model's real bytes")),
        "bucket_size": bsize, "chunk_bytes": chunk_bytes,
        "buckets": [{"index": b.index, "elements": b.numel,
                     "reduced_elements": max(1, round(r * b.numel)),
                     "ready_after": b.ready_after,
                     "stages": sorted({p[0] for p in b.params})} for b in plan],
        "dense_elements": sum(b.numel for b in plan),
        "reduced_bytes": sum(max(1, round(r * b.numel)) for b in plan)
        * (2 if cfg.dtype == "bf16" else 4),
        "reduction_alone_s": summ["reduction_alone_s"],
        "variants": var, "priority_gain": gain, "fastermoe_speedup": speedup, "floor": floor,
    }



def format_iteration(r: dict) -> str:
    """Human-readable summary of an iteration-mode record (rank 0)."""
    it = r["iteration"]
    lines = [f"lab iteration (D={r['dilation']:g}) {r['cluster']['name']} "
             f"W={r['cluster']['workers']}, {it['layers']} layers of {it['model']}, "
             f"{len(it['buckets'])} buckets (B={it['bucket_size']}), "
             f"{it['reduced_bytes'] / 2 ** 20:.1f} MiB reduced per iteration",
             it["tokens_note"],
             f"{'variant':<20} {'lab s':>8} {'cluster ms':>10} {'@model tok':>10} "
             f"{'flush s':>8} {'red.s':>7} {'in exch':>7} {'held':>9}"]
    for name, v in it["variants"].items():
        if name.startswith("floor_"):
            continue
        cm, cf = v.get("cluster_ms"), v.get("cluster_ms_at_model_tokens")
        share = v["reduction_in_exchange_share"]
        lines.append(
            f"{name:<20} {v['iteration_s']:8.2f} {'-' if cm is None else f'{cm:10.1f}':>10} "
            f"{'-' if cf is None else f'{cf:10.0f}':>10} {v['flush_s']:8.2f} "
            f"{v['reduction_busy_s']:7.2f} {'-' if share is None else f'{share:7.0%}':>7} "
            f"{v['held_chunks']:4.0f}/{v['chunks']:<4.0f}")
    for impl, g in it["priority_gain"].items():
        lines.append(f"moe_first vs none, {impl}: {g * 100:+.1f} % iteration time saved")
    for pr, s in it["fastermoe_speedup"].items():
        lines.append(f"megatron / fastermoe ({pr}): {s:.3f}x")
    for impl, f in it["floor"].items():
        lines.append(f"floor {impl}: {f['iteration_s']:.2f} s = {f['fraction'] * 100:.1f} % "
                     f"({FLOOR_LINKS[r['lab']['emulator_scale'] is not None]})")
    lines.append(f"reduction alone: {it['reduction_alone_s']:.2f} s; load average "
                 f"{r['machine']['loadavg_1min_start']:.2f} -> "
                 f"{r['machine']['loadavg_1min_end']:.2f}")
    return "\n".join(lines)
