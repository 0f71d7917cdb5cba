"""Rank 0's results document and summary table of a lab benchmark run (JSON keys as in
scripts/bench_moe_layer.py where they apply).

Notation: W workers, D dilation (lab seconds per cluster second); times are medians over the
timed iterations of the max over ranks.
"""

from __future__ import annotations

import datetime
import os
import platform
import statistics
from dataclasses import asdict

import torch

from .setup import emulator_scale

__all__ = ["summarize", "format_table"]


def _median(xs):
    return float(statistics.median(xs)) if xs else None


def summarize(cfg, topo, world, local_world, dil, dil_source, mx, preds, shadow_sets,
               a2a, comp, sleep_req, sleep_act, loads) -> dict:
    """Rank 0's JSON document (same keys as scripts/bench_moe_layer.py where they apply)."""
    res: dict = {"impls": {}, "mode": "floor" if cfg.floor else cfg.compute}
    scale = 1.0 / dil if dil > 0 else None  # cluster seconds per lab second
    for name in sorted({k.split(".")[0] for k in mx}):
        fwd, bwd = mx[f"{name}.fwd"], mx[f"{name}.bwd"]
        tot = [a + b for a, b in zip(fwd, bwd)]
        pred = _median(preds.get(name, []))
        res["impls"][name] = {
            "fwd_s": _median(fwd), "bwd_s": _median(bwd), "fwd_bwd_s": _median(tot),
            "fwd_bwd_s_min": min(tot), "fwd_bwd_s_max": max(tot),
            "cluster_fwd_bwd_s": _median(tot) * scale if scale else None,
            "predicted_fwd_bwd_s": pred,
            "predicted_lab_fwd_bwd_s": pred * dil if pred is not None else None,
            "measured_over_predicted": (_median(tot) * scale / pred
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
        res["ratio_fwd_bwd_paired"] = _median([a / b for a, b in zip(mt, ft)])
        res["ratio_fwd_bwd_min"] = m["fwd_bwd_s_min"] / f["fwd_bwd_s_min"]
        if m["predicted_fwd_bwd_s"] and f["predicted_fwd_bwd_s"]:
            res["predicted_ratio_fwd_bwd"] = m["predicted_fwd_bwd_s"] / f["predicted_fwd_bwd_s"]
    res["balance_bound"] = res["bound_fraction"] = None
    if "megatron_balanced" in res and "megatron" in imp:
        res["balance_bound"] = imp["megatron"]["fwd_bwd_s"] / res["megatron_balanced"]["fwd_bwd_s"]
        if "ratio_fwd_bwd" in res:
            res["bound_fraction"] = res["ratio_fwd_bwd"] / res["balance_bound"]
    a, c_fwd = _median(a2a), _median(comp)
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
    res["dilation"] = dil
    res["lab"] = {
        "dilation": dil, "dilation_source": dil_source,
        "emulator_scale": emulator_scale(),
        "sleep_requested_s": sleep_req, "sleep_actual_s": sleep_act,
        "oversleep_fraction": (sleep_act - sleep_req) / sleep_req if sleep_req > 0 else None,
        "note": "the lab's own cost per layer call is the floor (compute zero, links "
                "unlimited: --floor or --measure-floor outside the emulator); docs/emulation.md"}
    if floors:
        res["lab"]["floor"] = {
            name: {"fwd_bwd_s": f, "fraction": f / imp[name]["fwd_bwd_s"]}
            for name, f in floors.items() if name in imp}
        res["lab"]["floor_links"] = ("limited (emulator): compute-free time on the emulated "
                                     "links, not the box floor" if emulator_scale() is not None
                                     else "unlimited (loopback): the box's own cost")
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


