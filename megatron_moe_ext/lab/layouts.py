"""The layout planner's candidates run for real in the scale lab: is its first choice the
fastest measured layout, and does its ranking agree with the measured one? (issue 13)

Notation
--------
W        workers of the run (the world of the torchrun); M workers per node
ep, G    expert-parallel group size; G = W / ep groups (expert data parallel G)
s        smart-schedule group size (1 for sync)
T, H, F  tokens per worker and layer call (micro-batch x sequence), hidden, expert ffn size
E, k     experts, top-k
kappa    MoE layer calls per iteration (MoE layers x micro-batches)
S        expert-gradient bytes each worker all-reduces (``Candidate.allreduce_bytes``)
D        time dilation (lab seconds per cluster second; 0 in a floor run)
objective
         the planner's ``step_ms`` = kappa x layer + T_rho; measured as kappa x the median
         fwd + bwd of one layer call (max over all ranks: the slowest group) + the median
         time of the expert-gradient all-reduce (max over ranks)

One candidate, on every rank: its G groups become gloo sub-groups
(``torch.distributed.new_group``); each runs the product's smart exchange (``smart``) or the
synchronous baseline (``sync``) over its members with emulated experts
(:class:`.accelerator.EmulatedAccelerator`, the planner's :class:`GroupView` as the group's
topology, so compute, group order and prediction use the same numbers), on balanced routing
(:func:`.setup.lab_counts`, the planner's default). World barriers before the forward and the
backward keep all groups in lockstep, so shared links (the NICs) carry every group's traffic at
once, as the planner charges them. With G > 1 the ep rings of
:func:`traffic.planner.allreduce_rings` (rank r of every group) then all-reduce S bytes of
fp32 at once, the traffic :func:`traffic.planner.expert_allreduce_ms` models. The model
(config YAML + overrides) gives H, F, E, k, T and kappa exactly as the planner reads them.
"""

from __future__ import annotations

import datetime
import gc
import json
import logging
import os
import time
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any, Optional, Sequence

import torch
import torch.distributed as dist

from ..bench.stats import median, spearman
from ..config import Config, load_config
from ..perf.cluster import load_cluster
from ..traffic.planner import (
    GRAD_BYTES,
    Candidate,
    GroupView,
    allreduce_rings,
    format_plan,
    plan_layouts,
)
from .accelerator import EmulatedAccelerator
from .layer import LabLayer
from .layer import TORCH_DTYPES
from .report import write_record
from .run import LabConfig, _init_process_group
from .setup import default_cluster, emulator_scale, lab_counts, lab_topology, resolve_dilation

logger = logging.getLogger(__name__)

__all__ = ["DEFAULT_LAYOUTS", "LayoutCheck", "compare_rankings", "format_markdown",
           "layer_shape", "list_candidates", "measure_candidate", "run_check", "select_candidates"]

DEFAULT_LAYOUTS = ("ep=16 packed smart s=1", "ep=8 strided smart s=1", "ep=16 packed smart s=8",
                   "ep=8 packed smart s=1", "ep=4 packed smart s=1", "ep=1 packed sync")
"""Candidates of a 16-worker run (labels of :attr:`Candidate.label`)."""


@dataclass
class LayoutCheck:
    """One planner check: the model, the candidates and how to measure them."""

    cluster: str
    """Cluster YAML or name (under the emulator: the emulated one by default)."""
    config: Optional[str] = None
    """Model YAML (None: the schema's defaults); the planner's input."""
    overrides: list[str] = field(default_factory=list)
    """Dotted config overrides (``model.hidden_size=512`` ...)."""
    layouts: list[str] = field(default_factory=lambda: list(DEFAULT_LAYOUTS))
    """Candidate labels to run (``ep=8 packed smart s=2``), at least 2."""
    world_size: int = 4
    """Processes to spawn outside torchrun (under torchrun WORLD_SIZE wins)."""
    iters: int = 3
    """Timed layer calls and all-reduces per candidate."""
    warmup: int = 1
    """Untimed ones first."""
    dilation: str = "auto"
    """'auto' (1 / emulator link scale under the emulator, else 1) or a factor D."""
    floor: bool = False
    """Compute zero (D = 0): run with unlimited links, this is the box's own cost."""
    floor_json: Optional[str] = None
    """JSON of a floor run of the same check: adds each candidate's floor fraction."""
    seed: int = 1234
    """Seed of the token tensors."""
    json: Optional[str] = None
    """Write the results (rank 0) here."""
    markdown: Optional[str] = None
    """Write the markdown table (rank 0) here."""

    def validate(self) -> None:
        """Raise ValueError naming the bad option."""
        if len(self.layouts) < 2 or len(set(self.layouts)) != len(self.layouts):
            raise ValueError(f"--layouts: need >= 2 distinct labels, got {self.layouts}")
        if self.iters < 1 or self.warmup < 0 or self.world_size < 1:
            raise ValueError("--iters and --world-size must be >= 1, --warmup >= 0")
        resolve_dilation(self.dilation)


def layer_shape(cfg: Config) -> dict[str, Any]:
    """H, F, E, k, T and dtype of one layer call, read from the config as the planner does."""
    if cfg.model.activation == "swiglu":
        raise ValueError("model.activation=swiglu: the lab's emulated expert is a 2-matrix MLP "
                         "(alpha = F / H); use gelu")
    return {"hidden": cfg.model.hidden_size,
            "ffn": cfg.moe.ffn_hidden_size or cfg.model.ffn_hidden_size,
            "experts": cfg.moe.num_experts, "topk": cfg.moe.topk,
            "tokens": cfg.train.micro_batch_size * cfg.model.seq_length,
            "dtype": cfg.train.precision}


def select_candidates(cands: Sequence[Candidate], labels: Sequence[str]) -> list[Candidate]:
    """The feasible candidates named by ``labels``, in the planner's order (its ranking)."""
    ok = {c.label: c for c in cands if c.rejected is None}
    bad = [lab for lab in labels if lab not in ok]
    if bad:
        raise ValueError(f"--layouts: {bad} not among the planner's feasible candidates; "
                         f"accepted: {', '.join(ok)}")
    return [c for c in cands if c.rejected is None and c.label in set(labels)]


def compare_rankings(labels: Sequence[str], predicted: Sequence[float],
                     measured: Sequence[float]) -> dict[str, Any]:
    """Spearman of the measured vs predicted objective and the planner's first-choice gap
    ((measured of its first choice - fastest measured) / fastest measured)."""
    first = min(range(len(labels)), key=lambda i: (predicted[i], i))
    best = min(range(len(labels)), key=lambda i: (measured[i], i))
    return {"spearman": spearman(predicted, measured),
            "planner_first": labels[first], "fastest_measured": labels[best],
            "first_choice_gap": measured[first] / measured[best] - 1.0,
            "measured_order": [labels[i] for i in sorted(range(len(labels)),
                                                         key=lambda i: measured[i])]}


def list_candidates(check: LayoutCheck) -> str:
    """The planner's table for ``check``'s model on ``check.world_size`` workers."""
    spec = load_cluster(default_cluster(check.cluster))
    cands = plan_layouts(load_config(check.config, list(check.overrides)), spec,
                         check.world_size)
    return format_plan(cands, spec, top=len(cands))


def _max_over_ranks(values: list[float]) -> list[float]:
    t = torch.tensor(values, dtype=torch.float64)
    dist.all_reduce(t, op=dist.ReduceOp.MAX)
    return t.tolist()


def measure_candidate(cand: Candidate, shape: dict[str, Any], topo, dil: float,
                      check: LayoutCheck, cluster: str) -> dict[str, Any]:
    """Run one candidate on every rank of the world; returns the max-over-ranks figures
    (lab seconds per timed iteration) on every rank, and under ``this_rank`` the global
    ranks of this rank's EP group and all-reduce ring."""
    rank = dist.get_rank()
    groups = [sorted(g) for g in cand.groups]  # new_group orders its ranks so
    idx = next(i for i, g in enumerate(groups) if rank in g)
    pgs = [dist.new_group(g) for g in groups]
    grank = groups[idx].index(rank)
    H, F, E, k, T = (shape[key] for key in ("hidden", "ffn", "experts", "topk", "tokens"))
    lcfg = LabConfig(cluster=cluster, world_size=cand.ep,
                     impl="fastermoe" if cand.schedule == "smart" else "megatron", tokens=T,
                     hidden=H, ffn=F, experts=E, topk=k, group_size=cand.group_size,
                     dtype=shape["dtype"], iters=check.iters, warmup=check.warmup,
                     dilation=check.dilation, floor=check.floor, seed=check.seed)
    view = GroupView(topo, groups, idx)
    accel = EmulatedAccelerator.for_cluster(view, shape["dtype"], H, F, dil)
    layer = LabLayer(lcfg, grank, cand.ep, view, accel, pgs[idx])
    fn = layer.fastermoe if cand.schedule == "smart" else layer.megatron
    row = lab_counts(cand.ep, E, T, k, 0.0, check.seed)[grank]
    n, dt = int(row.sum()), TORCH_DTYPES[shape["dtype"]]
    gen = torch.Generator().manual_seed(check.seed * 1000 + rank)
    x0, p0 = torch.randn(n, H, generator=gen).to(dt), torch.rand(n, generator=gen).to(dt)
    gy = torch.randn(n, H, generator=gen).to(dt)
    fwd, bwd, ar = [], [], []
    req = act = 0.0
    gc.disable()
    for it in range(check.warmup + check.iters):
        x, p = x0.detach().requires_grad_(True), p0.detach().requires_grad_(True)
        accel.stats.reset()
        dist.barrier()
        t0 = time.perf_counter()
        y = fn(x, p, row)
        t1 = time.perf_counter()
        dist.barrier()
        t2 = time.perf_counter()
        y.backward(gy)
        t3 = time.perf_counter()
        if it >= check.warmup:
            fwd.append(t1 - t0), bwd.append(t3 - t2)
            req, act = req + accel.stats.requested_s, act + accel.stats.actual_s
        gc.collect()
    rings = allreduce_rings(groups)
    ring_pgs = [dist.new_group(sorted(r)) for r in rings]
    if rings:
        buf = torch.zeros(int(round(cand.allreduce_bytes / GRAD_BYTES)), dtype=torch.float32)
        for it in range(check.warmup + check.iters):
            dist.barrier()
            t0 = time.perf_counter()
            dist.all_reduce(buf, group=ring_pgs[grank])  # ring r = rank r of every group
            if it >= check.warmup:
                ar.append(time.perf_counter() - t0)
            gc.collect()
    gc.enable()
    ar = ar or [0.0] * check.iters
    flat = _max_over_ranks(fwd + bwd + ar + [req, act])
    mine = {"ep_group": dist.get_process_group_ranks(pgs[idx]),
            "ring": dist.get_process_group_ranks(ring_pgs[grank]) if rings else []}
    for pg in pgs + ring_pgs:
        dist.destroy_process_group(pg)
    m = check.iters
    fwd, bwd, ar = flat[:m], flat[m:2 * m], flat[2 * m:3 * m]
    layer_s = median(a + b for a, b in zip(fwd, bwd))
    return {"fwd_s_iters": fwd, "bwd_s_iters": bwd, "allreduce_s_iters": ar,
            "layer_lab_s": layer_s, "allreduce_lab_s": median(ar),
            "objective_lab_s": cand.kappa * layer_s + median(ar),
            "sleep_requested_s": flat[-2], "sleep_actual_s": flat[-1], "this_rank": mine}


def _row(cand: Candidate, meas: dict[str, Any], dil: float) -> dict[str, Any]:
    to_ms = 1e3 / dil if dil > 0 else None
    row = {"label": cand.label, "ep": cand.ep, "grouping": cand.grouping,
           "schedule": cand.schedule, "group_size": cand.group_size, "groups": cand.groups,
           "kappa": cand.kappa, "allreduce_bytes": cand.allreduce_bytes,
           "predicted_layer_ms": cand.layer_ms, "predicted_allreduce_ms": cand.allreduce_ms,
           "predicted_objective_ms": cand.step_ms,
           **{k: v for k, v in meas.items() if k != "this_rank"}}
    for key in ("layer", "allreduce", "objective"):
        row[f"{key}_ms"] = meas[f"{key}_lab_s"] * to_ms if to_ms else None
    row["measured_over_predicted"] = (row["objective_ms"] / cand.step_ms
                                      if to_ms and cand.step_ms > 0 else None)
    return row


def run_check(check: LayoutCheck) -> int:
    """The check here under torchrun, else on ``check.world_size`` spawned processes."""
    from ..runtime.launch import run_workers

    check.validate()
    return run_workers(_entry, check.world_size, check)


def _entry(check: LayoutCheck) -> int:
    check_worker(check)
    return 0


def check_worker(check: LayoutCheck) -> Optional[dict[str, Any]]:
    """Plan, run every selected candidate, compare; rank 0 returns (and writes) the results."""
    check.validate()
    torch.set_num_threads(1)
    rank, world = _init_process_group()
    logging.basicConfig(level="INFO" if rank == 0 else "WARNING",
                        format=f"[planner check rank {rank}] %(message)s", force=True)
    try:
        load_start = os.getloadavg()[0]
        cluster = default_cluster(check.cluster)
        under = emulator_scale() is not None
        topo = lab_topology(cluster, world,
                            int(os.environ.get("LOCAL_WORLD_SIZE", world)) if under else None)
        cfg = load_config(check.config, list(check.overrides))
        shape = layer_shape(cfg)
        chosen = select_candidates(plan_layouts(cfg, load_cluster(cluster), world),
                                   check.layouts)
        dil, dil_source = (0.0, "floor: compute zero") if check.floor \
            else resolve_dilation(check.dilation)
        logger.info("planner check on %s W=%d, %s, D=%g (%s): %s", topo.spec.name, world,
                    shape, dil, dil_source, "; ".join(c.label for c in chosen))
        rows = []
        for cand in chosen:
            t0 = time.perf_counter()
            rows.append(_row(cand, measure_candidate(cand, shape, topo, dil, check, cluster),
                             dil))
            logger.info("%s: layer %.3f s, all-reduce %.3f s (lab) in %.0f s", cand.label,
                        rows[-1]["layer_lab_s"], rows[-1]["allreduce_lab_s"],
                        time.perf_counter() - t0)
        if rank != 0:
            return None
        res = summarize(check, rows, shape, topo, dil, dil_source, (load_start,
                                                                    os.getloadavg()[0]))
        write_record(check.json, res)
        text = format_markdown(res)
        if check.markdown:
            Path(check.markdown).parent.mkdir(parents=True, exist_ok=True)
            Path(check.markdown).write_text(text)
        print(text, flush=True)
        return res
    finally:
        dist.destroy_process_group()


def summarize(check: LayoutCheck, rows: list[dict[str, Any]], shape: dict[str, Any], topo,
              dil: float, dil_source: str, loads: tuple[float, float]) -> dict[str, Any]:
    """Rank 0's JSON document: rows in the planner's order, the comparison, conditions."""
    if check.floor_json:
        floor = {r["label"]: r for r in json.loads(Path(check.floor_json).read_text())["rows"]}
        for r in rows:
            f = floor.get(r["label"])  # same calls; the floor's kappa may differ
            r["floor_layer_fraction"] = f["layer_lab_s"] / r["layer_lab_s"] if f else None
            r["floor_objective_fraction"] = ((r["kappa"] * f["layer_lab_s"] + f["allreduce_lab_s"])
                                             / r["objective_lab_s"] if f else None)
    measured = [r["objective_lab_s"] for r in rows]
    req = sum(r["sleep_requested_s"] for r in rows)
    act = sum(r["sleep_actual_s"] for r in rows)
    return {"rows": rows, "mode": "floor" if check.floor else "emulated",
            "comparison": compare_rankings([r["label"] for r in rows],
                                           [r["predicted_objective_ms"] for r in rows], measured),
            "shape": shape, "check": asdict(check), "dilation": dil,
            "dilation_source": dil_source, "emulator_scale": emulator_scale(),
            "cluster": {"name": topo.spec.name, "workers": topo.num_workers,
                        "workers_per_node": topo.workers_per_node},
            "oversleep_fraction": (act - req) / req if req > 0 else None,
            "machine": {"cpu_count": os.cpu_count(), "loadavg_1min_start": loads[0],
                        "loadavg_1min_end": loads[1], "torch": torch.__version__,
                        "date_utc": datetime.datetime.now(datetime.timezone.utc)
                        .isoformat(timespec="seconds")}}


def format_markdown(res: dict[str, Any]) -> str:
    """The table (planner's order) and the verdict."""
    def ms(v: Optional[float]) -> str:
        return "-" if v is None else f"{v:.2f}"

    def pct(v: Optional[float]) -> str:
        return "-" if v is None else f"{v * 100:.1f}"

    cmp_ = res["comparison"]
    rank = {lab: i + 1 for i, lab in enumerate(cmp_["measured_order"])}
    floor = res["mode"] == "floor"
    unit = "lab s" if floor else "ms"
    lines = [f"| planner # | layout | predicted layer / AR / objective (ms) | measured layer / "
             f"AR / objective ({unit}) | meas/pred | measured # | floor % (layer / obj.) |",
             "|---|---|---|---|---|---|---|"]
    for i, r in enumerate(res["rows"]):
        got = ([r["layer_lab_s"], r["allreduce_lab_s"], r["objective_lab_s"]] if floor
               else [r["layer_ms"], r["allreduce_ms"], r["objective_ms"]])
        lines.append(
            f"| {i + 1} | {r['label']} | {r['predicted_layer_ms']:.2f} / "
            f"{r['predicted_allreduce_ms']:.2f} / {r['predicted_objective_ms']:.2f} | "
            f"{' / '.join(ms(v) for v in got)} | {ms(r['measured_over_predicted'])} | "
            f"{rank[r['label']]} | {pct(r.get('floor_layer_fraction'))} / "
            f"{pct(r.get('floor_objective_fraction'))} |")
    sp = cmp_["spearman"]
    m = res["machine"]
    lines += ["", f"Spearman (measured vs predicted objective): "
              f"{'-' if sp is None else f'{sp:.3f}'}; planner's first choice "
              f"{cmp_['planner_first']}, fastest measured {cmp_['fastest_measured']}, gap "
              f"{cmp_['first_choice_gap'] * 100:.1f} %.",
              f"{res['cluster']['name']} W={res['cluster']['workers']}, D={res['dilation']:g} "
              f"({res['dilation_source']}), oversleep {pct(res['oversleep_fraction'])} %, load "
              f"average {m['loadavg_1min_start']:.1f} -> {m['loadavg_1min_end']:.1f}, "
              f"{m['date_utc']}."]
    return "\n".join(lines) + "\n"
