"""The benchmark's derived figures: ratios of the two implementations, the balance bound and
the overlap bound, from the per-implementation medians (scripts/bench_moe_layer.py's docstring
defines each; :mod:`.layer` measures them).

Notation: A one all-to-all of the routed tokens alone, Cf / Cb the local experts' forward /
backward alone (medians of the max over ranks).
"""

from __future__ import annotations

from typing import Any, Optional

from .stats import median as _median

__all__ = ["bounds"]


def _paired(x: dict, y: dict) -> Optional[float]:
    """Median over iterations of x's fwd+bwd / y's fwd+bwd (same iteration, same load)."""
    xt = [a + b for a, b in zip(x["fwd_s_iters"], x["bwd_s_iters"])]
    yt = [a + b for a, b in zip(y["fwd_s_iters"], y["bwd_s_iters"])]
    return _median([a / b for a, b in zip(xt, yt)])


def bounds(results: dict, a2a: float, c_fwd: float, c_bwd: float) -> dict[str, Any]:
    """Ratios, the balance bound and the overlap bound of a benchmark's ``results`` (see the
    script's docstring), from the medians of the pieces alone: one all-to-all ``a2a`` and the
    local experts' ``c_fwd`` / ``c_bwd``."""
    out: dict[str, Any] = {}
    lat_comm, lat_comp = 4 * a2a, c_fwd + c_bwd
    bound = (lat_comm + lat_comp) / max(lat_comm, lat_comp)
    artifact = (4 * a2a + c_fwd + c_bwd) / (max(2 * a2a, c_fwd) + max(2 * a2a, c_bwd))
    ratio = {}
    imp = results["impls"]
    if "megatron" in imp and "fastermoe" in imp:
        m, f = imp["megatron"], imp["fastermoe"]
        ratio = {key: m[f"{key}_s"] / f[f"{key}_s"] for key in ("fwd", "bwd", "fwd_bwd")}
        # noise-robust companions: per-iteration (paired, same load) ratio, ratio of minima,
        # ratio of process CPU times
        out["ratio_fwd_bwd_paired"] = _paired(m, f)
        out["ratio_fwd_bwd_min"] = m["fwd_bwd_s_min"] / f["fwd_bwd_s_min"]
        out["ratio_cpu_fwd_bwd"] = m["cpu_fwd_bwd_s"] / f["cpu_fwd_bwd_s"]
    achieved = ratio.get("fwd_bwd")
    frac = (achieved - 1) / (bound - 1) if achieved is not None and bound > 1 + 1e-9 else None
    out.update({f"ratio_{key}": v for key, v in ratio.items()})
    out["balance_bound"] = out["bound_fraction"] = None
    if results.get("megatron_balanced"):
        m, mb = imp["megatron"], results["megatron_balanced"]
        out["balance_bound"] = m["fwd_bwd_s"] / mb["fwd_bwd_s"]
        out["balance_bound_paired"] = _paired(m, mb)
        # steadier under machine load: the same from process CPU times (max over ranks)
        out["balance_bound_cpu"] = m["cpu_fwd_bwd_s"] / mb["cpu_fwd_bwd_s"]
        out["balance_bound_min"] = m["fwd_bwd_s_min"] / mb["fwd_bwd_s_min"]
        if achieved is not None:
            out["bound_fraction"] = achieved / out["balance_bound"]
            for kind, r in (("paired", "ratio_fwd_bwd_paired"), ("cpu", "ratio_cpu_fwd_bwd"),
                            ("min", "ratio_fwd_bwd_min")):
                out[f"bound_fraction_{kind}"] = out[r] / out[f"balance_bound_{kind}"]
    out["bound_fraction_schedule"] = frac
    out["overlap"] = {
        "alltoall_s": a2a, "expert_fwd_s": c_fwd, "expert_bwd_s": c_bwd,
        "lat_comm_s": lat_comm, "lat_comp_s": lat_comp, "bound": bound,
        "bound_artifact_fwd_bwd": artifact, "achieved": achieved,
        "bound_fraction_schedule": frac,
        "definition": ("bound = (Lat_comm + Lat_comp) / max(Lat_comm, Lat_comp), Lat_comm = 4 x "
                       "one all-to-all of the routed tokens alone, Lat_comp = local expert fwd + "
                       "bwd alone (medians of max over ranks); achieved = megatron / fastermoe "
                       "fwd+bwd; bound_fraction_schedule = (achieved - 1) / (bound - 1). "
                       "bound_artifact_fwd_bwd = (4A + Cf + Cb) / (max(2A, Cf) + max(2A, Cb))")}
    return out
