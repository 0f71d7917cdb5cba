"""The reconfigurable fabric emulated for real: a routing trace's all-to-alls run window by
window on per-worker namespaces whose circuit classes are changed between windows, beside the
performance model's prediction for the same fabric and plan.

Notation: W workers (N nodes x M), R records per window, L layers, s emulator scale (emulated
rate = cluster rate x s, so lab time = cluster time / s), H hidden size, T [W, W] tokens of one
layer call (:func:`..traffic.locality.traffic_matrix`).

Three fabrics, one plan object each (:func:`..traffic.fabric.plan_circuits`), run in this
order in one torchrun:

- ``tree``: the oversubscribed tree, no circuits;
- ``static``: window 0's circuits kept for the whole run (configured once);
- ``reconfigurable``: circuits re-assigned every R records on the previous window's traffic.

Protocol (files in a control directory): the driver writes ``plan.json`` (fabrics, windows,
every call's T, H); before each (fabric f, window j) rank 0 writes ``req-f-j`` and waits for
``ack-f-j``, which the driver writes after :meth:`.workers.WorkerEmulatedCluster.set_circuits`
of that window's circuits (its duration in the ack); then all ranks pass a barrier and time
each call's dispatch (T) and combine (T transposed) as ``all_to_all_single`` between barriers,
max over ranks. Rank 0 writes ``result.json``. Not emulated: the reconfiguration delay (the
model's ``delay_ms``; the measured tc change time is reported instead) and the expert compute.
"""

from __future__ import annotations

import dataclasses
import json
import tempfile
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Optional

import numpy as np

from ..perf.cluster import ClusterSpec
from ..traffic.fabric import CircuitWindow, plan_circuits, tree_fabric, window_comm_s
from ..traffic.locality import traffic_matrix
from ..traffic.trace import read_trace
from .circuits import circuit_fabric
from .namespaces import EmulationError
from .workers import WorkerEmulatedCluster

FABRICS = ("tree", "static", "reconfigurable")
"""The fabrics of one run, in the order they run."""

ELEMENT_BYTES = 4
"""fp32 activations (the model is asked for dtype fp32)."""


@dataclass(frozen=True)
class ReconfSetup:
    """What to emulate: trace, cluster, fabric and scale."""

    trace: str
    cluster: ClusterSpec
    scale: float
    nic_gbps: Optional[float] = None
    """B (default: the cluster's first NIC)."""
    oversub: float = 4.0
    ocs_gbps: Optional[float] = None
    """C (default: B)."""
    ports: int = 1
    region: int = 2
    reconfig_every: int = 3
    hidden: Optional[int] = None
    """H (default: the trace's hidden_size)."""
    max_records: int = 32
    timeout_s: float = 600.0


def make_plans(recs: np.ndarray, ep_size: int, s: ReconfSetup) -> dict[str, list[CircuitWindow]]:
    """The three fabrics' circuit plans on the records ``recs`` [I, L, W, E]."""
    m = s.cluster.workers_per_node
    reconf = plan_circuits(recs, ep_size, s.region, s.ports, m, s.reconfig_every)
    static = plan_circuits(recs, ep_size, s.region, s.ports, m, s.reconfig_every, static=True)
    return {"tree": [CircuitWindow(w.start, w.stop, {}) for w in reconf], "static": static,
            "reconfigurable": reconf}


class _Controller:
    """Serves the workload's reconfiguration requests (called by ``run(poll=...)``)."""

    def __init__(self, ctl: Path, cluster: WorkerEmulatedCluster,
                 plans: dict[str, list[CircuitWindow]]) -> None:
        self.ctl, self.cluster, self.plans = ctl, cluster, plans
        self.order = [(f, j) for f, name in enumerate(FABRICS) for j in range(len(plans[name]))]
        self.next = 0
        self.reconfig_s: dict[tuple[int, int], float] = {}

    def poll(self) -> None:
        while self.next < len(self.order):
            f, j = self.order[self.next]
            if not (self.ctl / f"req-{f}-{j}").exists():
                return
            took = self.cluster.set_circuits(self.plans[FABRICS[f]][j].circuits)
            self.reconfig_s[(f, j)] = took
            (self.ctl / f"ack-{f}-{j}.tmp").write_text(json.dumps({"reconfig_s": took}))
            (self.ctl / f"ack-{f}-{j}.tmp").rename(self.ctl / f"ack-{f}-{j}")
            self.next += 1


@dataclass(frozen=True)
class _Prepared:
    """What both the prediction and the measurement use: records, fabric and plans."""

    recs: np.ndarray
    """[I, L, W, E] counts per micro-batch layer call (the trace's last ``max_records``)."""
    ep_size: int
    H: int
    W: int
    nodes: int
    nic: float
    ocs: float
    base: ClusterSpec
    """The oversubscribed tree (:func:`..traffic.fabric.tree_fabric`) the circuits are added to."""
    plans: dict[str, list[CircuitWindow]]
    pred_s: dict[str, list[float]]
    """Predicted cluster seconds per fabric and window (:func:`..traffic.fabric.window_comm_s`)."""


def _prepare(s: ReconfSetup) -> _Prepared:
    trace = read_trace(s.trace)
    h = trace.header
    H = int(s.hidden or h.meta.get("hidden_size", 0))
    if not H:
        raise EmulationError("the trace has no hidden_size in its meta: pass hidden")
    W, m = h.num_workers, s.cluster.workers_per_node
    if W % m:
        raise EmulationError(f"{W} workers are not whole nodes of {m}")
    nmb = int(h.meta.get("num_microbatches", 1))
    recs = trace.counts[-s.max_records:].astype(float) / nmb
    nic = float(s.nic_gbps or s.cluster.nics[0].gbps)
    ocs = float(s.ocs_gbps or nic)
    base = tree_fabric(s.cluster, W, nic, s.oversub, rack_nodes=1)
    plans = make_plans(recs, h.ep_size, s)
    pred = {name: window_comm_s(recs, plans[name], base, ocs, h.ep_size, H) for name in FABRICS}
    return _Prepared(recs, h.ep_size, H, W, W // m, nic, ocs, base, plans, pred)


def predict(s: ReconfSetup) -> dict:
    """The model's side of :func:`run_experiment` only (no emulator, no root): the same
    record with ``measured_lab_ms`` and ``reconfig_ms`` set to None."""
    return _record(s, _prepare(s), None, None, {})


def _record(s: ReconfSetup, p: _Prepared, fab: Optional[Any], measured: Optional[dict],
            reconfig_s: dict, wall: Optional[float] = None) -> dict:
    rows = []
    for f, name in enumerate(FABRICS):
        for j, win in enumerate(p.plans[name]):
            rows.append({
                "fabric": name, "window": j, "records": [win.start, win.stop],
                "circuits": sorted([list(pair), n] for pair, n in win.circuits.items()),
                "predicted_cluster_ms": p.pred_s[name][j] * 1e3,
                "predicted_lab_ms": p.pred_s[name][j] / s.scale * 1e3,
                "measured_lab_ms": (measured["window_s"][f][j] * 1e3 if measured else None),
                "reconfig_ms": (reconfig_s.get((f, j), 0.0) * 1e3 if measured else None)})
    return {"trace": str(s.trace), "cluster": s.cluster.name, "workers": p.W, "nodes": p.nodes,
            "scale": s.scale, "nic_gbps": p.nic, "oversub": s.oversub, "ocs_gbps": p.ocs,
            "ports": s.ports, "region": s.region, "reconfig_every": s.reconfig_every,
            "hidden": p.H, "fabric": dataclasses.asdict(fab) if fab is not None else None,
            "wall_s": wall, "rows": rows}


def run_experiment(s: ReconfSetup) -> dict:
    """Predict and measure the three fabrics on ``s``; returns the result record (rows per
    fabric and window, see :func:`format_table`)."""
    p = _prepare(s)
    recs, plans, H = p.recs, p.plans, p.H
    fab = circuit_fabric(p.base, s.cluster, p.nodes, p.ocs, s.scale)
    calls = [[np.rint(traffic_matrix(c, p.ep_size)).astype(int).tolist() for c in rec]
             for rec in recs]
    with tempfile.TemporaryDirectory(prefix="mmx-reconf-") as tmp:
        ctl = Path(tmp)
        (ctl / "plan.json").write_text(json.dumps({
            "fabrics": list(FABRICS), "hidden": H, "calls": calls,
            "windows": [[w.start, w.stop] for w in plans["tree"]]}))
        with WorkerEmulatedCluster(s.cluster, fab, plans[FABRICS[0]][0].circuits) as cl:
            ctrl = _Controller(ctl, cl, plans)
            t0 = time.monotonic()
            rc = cl.run(["-m", "megatron_moe_ext.emulation.reconf_worker", "--control", str(ctl)],
                        timeout=s.timeout_s, poll=ctrl.poll)
            wall = time.monotonic() - t0
        if rc != 0:
            raise EmulationError(f"the workload failed (exit code {rc}, per worker "
                                 f"{cl.returncodes})")
        measured = json.loads((ctl / "result.json").read_text())
    return _record(s, p, fab, measured, ctrl.reconfig_s, wall)


def format_table(result: dict) -> str:
    """Markdown: per fabric and window the circuits, predicted and measured ms, and totals
    (measured columns "-" for a :func:`predict` record)."""
    def num(x: Optional[float], fmt: str = ".1f") -> str:
        return "-" if x is None else format(x, fmt)

    def ratio(a: Optional[float], b: float) -> Optional[float]:
        return None if a is None else a / b

    lines = ["| fabric | window | circuits | predicted (lab ms) | measured (lab ms) | "
             "meas/pred | tc change (ms) |", "|---|---|---|---|---|---|---|"]
    for r in result["rows"]:
        circ = " ".join(f"{a}-{b}" + (f"x{n}" if n > 1 else "") for (a, b), n in r["circuits"])
        lines.append(f"| {r['fabric']} | {r['window']} | {circ or '-'} | "
                     f"{r['predicted_lab_ms']:.1f} | {num(r['measured_lab_ms'])} | "
                     f"{num(ratio(r['measured_lab_ms'], r['predicted_lab_ms']), '.2f')} | "
                     f"{num(r['reconfig_ms'])} |")
    lines += ["", "| fabric | predicted total (lab ms) | measured total (lab ms) | meas/pred | "
              "measured vs tree |", "|---|---|---|---|---|"]
    measured = all(r["measured_lab_ms"] is not None for r in result["rows"])
    tot = {name: (sum(r["predicted_lab_ms"] for r in result["rows"] if r["fabric"] == name),
                  sum(r["measured_lab_ms"] for r in result["rows"] if r["fabric"] == name)
                  if measured else None)
           for name in FABRICS}
    for name, (p, mm) in tot.items():
        vs_tree = None if mm is None else mm / tot["tree"][1]
        lines.append(f"| {name} | {p:.1f} | {num(mm)} | {num(ratio(mm, p), '.2f')} | "
                     f"{num(vs_tree, '.2f')} |")
    return "\n".join(lines) + "\n"
