"""From calibration measurements to a cluster file: :func:`summarize` combines the per-rank
measurements, :func:`cluster_spec` builds the :class:`ClusterSpec` (with the ``calibration``
provenance of :func:`provenance`), :func:`header_comment` the comment header of every
measured value, :func:`write_cluster` writes both through the loader's inverse
(:func:`megatron_moe_ext.perf.cluster.save_cluster`). Used by scripts/calibrate.py
(:mod:`megatron_moe_ext.bench.calibrate`) and the validation sweep's in-run calibration.
"""

from __future__ import annotations

import datetime
import os
import statistics
import tempfile
from pathlib import Path
from typing import TYPE_CHECKING, Any, Optional

from megatron_moe_ext.perf.cluster import (
    ClusterSpec,
    cluster_spec_from_dict,
    save_cluster,
    this_machine,
)

if TYPE_CHECKING:
    from megatron_moe_ext.bench.calibrate import CalibrateOptions

TOOL = "scripts/calibrate.py"
EMULATION_ENV = ("MMX_EMULATION_CLUSTER", "MMX_EMULATION_SCALE")
"""Set by scripts/emulate_cluster.py for the workloads it runs (the emulated cluster, scale)."""


def summarize(gemm_by_rank: list[dict[str, dict[str, list]]], links: dict, nodes: list[int],
              hosts: list[str], mode: str = "pingpong", curve: str = "mlp",
              clock: str = "cpu") -> dict[str, Any]:
    """Combine the per-rank measurements into the values written to the YAML; ``mode``
    (exchange | pingpong) picks the link bandwidth, ``curve`` (mlp | gemm) the throughput
    kernel, ``clock`` (cpu | wall) its clock (wall where no CPU time was measured)."""
    node_ids = sorted(set(nodes))
    per_node = [nodes.count(n) for n in node_ids]
    if len(set(per_node)) != 1:
        raise SystemExit(f"calibrate: nodes have different worker counts {per_node}; the "
                         "cluster schema needs the same number of workers on every node")
    def curves(kind: str) -> dict[str, Any]:
        out: dict[str, Any] = {}
        for dtype in sorted(gemm_by_rank[0][kind]):
            per_rank = [g[kind][dtype] for g in gemm_by_rank]
            use = clock if all(r["cpu"] for r in per_rank) else "wall"
            curve = []
            for i, t in enumerate(per_rank[0]["tokens"]):
                vals = [r[use][i] for r in per_rank]
                point = {"tokens": t, "tflops": statistics.fmean(vals),
                         "tflops_min_rank": min(vals), "tflops_max_rank": max(vals),
                         "reps": per_rank[0]["reps"][i],
                         "wall_tflops": statistics.fmean(r["wall"][i] for r in per_rank)}
                if use == "cpu":
                    point["cpu_tflops"] = point["tflops"]
                curve.append(point)
            out[dtype] = {"curve": curve, "tflops": curve[-1]["tflops"], "clock": use}
        return out

    gemm_all = {kind: curves(kind) for kind in sorted(gemm_by_rank[0])}
    pairs = []
    for (a, b), v in sorted(links.items()):
        pairs.append(dict(v, a=a, b=b, intra=nodes[a] == nodes[b]))

    def agg(sel: list[dict]) -> Optional[dict[str, Any]]:
        if not sel:
            return None
        bw = [p[f"{mode}_gbps"] for p in sel]
        med = statistics.median
        return {"pairs": len(sel), "mode": mode, "gbps": med(bw), "gbps_min": min(bw),
                "gbps_max": max(bw),
                "latency_us": med(p["latency_s"] for p in sel) * 1e6,
                "pingpong_gbps": med(p["pingpong_gbps"] for p in sel),
                "pingpong_effective_gbps": med(p["pingpong_effective_gbps"] for p in sel),
                "exchange_gbps": med(p["exchange_gbps"] for p in sel),
                "exchange_effective_gbps": med(p["exchange_effective_gbps"] for p in sel),
                "exchange_latency_us": med(p["exchange_latency_s"] for p in sel) * 1e6}

    return {"world_size": len(nodes), "nodes": len(node_ids), "workers_per_node": per_node[0],
            "node_of_rank": nodes, "hosts": hosts, "curve_kind": curve,
            "gemm": gemm_all[curve], "gemm_all": gemm_all, "pairs": pairs,
            "intra": agg([p for p in pairs if p["intra"]]),
            "inter": agg([p for p in pairs if not p["intra"]])}


HALF_DUPLEX_RATIO = 0.7
"""Exchange / ping-pong rate below which the written cluster says ``duplex: half``: the two
directions of a pair took turns (gloo's TCP pairs: ~0.5) instead of overlapping (~0.9-1)."""


def duplex_of(m: dict[str, Any]) -> tuple[str, Optional[float]]:
    """(``full`` | ``half``, exchange / ping-pong rate) of the links that bound an all-to-all:
    inter-node pairs when there are any, else intra-node pairs."""
    a = m.get("inter") or m.get("intra")
    if not a or not a.get("pingpong_gbps"):
        return "full", None
    ratio = a["exchange_gbps"] / a["pingpong_gbps"]
    return ("half" if ratio < HALF_DUPLEX_RATIO else "full"), ratio




def _r4(x: float) -> float:
    """Compact number for the YAML (4 significant digits)."""
    return float(f"{x:.4g}")


def _both_dtypes(m: dict[str, Any]) -> dict[str, Any]:
    """The written throughputs: the schema needs fp32 and bf16, a missing one is copied."""
    gemm = dict(m["gemm"])
    for need in ("fp32", "bf16"):
        if need not in gemm:
            other = next(iter(gemm))
            gemm[need] = dict(gemm[other], copied_from=other)
    return gemm


def provenance(m: dict[str, Any], command: str, extra: dict[str, Any],
               tool: str = TOOL) -> dict[str, Any]:
    """The ``calibration`` mapping of a measured cluster: this machine (host, machine id, CPU
    model, cores), the clock of the written throughput, UTC date, tool, command, torch and
    threads per worker."""
    clocks = sorted({g["clock"] for g in m["gemm"].values()})
    return dict(this_machine(), clock="/".join(clocks), tool=tool, command=command,
                date_utc=datetime.datetime.now(datetime.timezone.utc).isoformat(
                    timespec="seconds"),
                torch=str(extra["torch"]), threads_per_worker=int(extra["threads"]))


def cluster_spec(m: dict[str, Any], name: str, intra_kind: str = "loopback",
                 calibration: Optional[dict[str, Any]] = None) -> ClusterSpec:
    """The cluster described by the measurements ``m`` (:func:`summarize`): workers of a node
    on a star around ``host`` at the median intra-node rate, one NIC per node at the median
    inter-node rate (on ``host``, or ``w0`` with one worker per node)."""
    gemm = _both_dtypes(m)
    mw, nn = m["workers_per_node"], m["nodes"]
    intra, inter = m["intra"], m["inter"]
    date = datetime.datetime.now().astimezone().strftime("%Y-%m-%d")
    data: dict[str, Any] = {
        "name": name,
        "description": f"{nn} node(s) x {mw} process(es), measured by {TOOL} on {date}"
                       + (" under the network emulator" if os.environ.get(EMULATION_ENV[0])
                          else ""),
        "nodes": nn, "workers_per_node": mw, "duplex": duplex_of(m)[0],
        "gemm_tflops": {d: _r4(gemm[d]["tflops"]) for d in ("fp32", "bf16")},
        "gemm_curve": {d: [[c["tokens"], _r4(c["tflops"])] for c in gemm[d]["curve"]]
                       for d in ("fp32", "bf16")},
    }
    if mw > 1:
        if intra is None:
            raise SystemExit("calibrate: no intra-node pair was measured (use --pairs all)")
        lat = round(intra["latency_us"] / 2, 1)  # two hops w_i -> host -> w_j
        data["links"] = [{"a": f"w{i}", "b": "host", "gbps": _r4(intra["gbps"]),
                          "latency_us": lat, "kind": intra_kind} for i in range(mw)]
    if nn > 1:
        if inter is None:
            raise SystemExit("calibrate: no inter-node pair was measured")
        nic_lat = max(0.0, inter["latency_us"] - (intra["latency_us"] if intra else 0.0))
        data["nics"] = [{"attach": "host" if mw > 1 else "w0", "gbps": _r4(inter["gbps"]),
                         "latency_us": round(nic_lat, 1)}]
        data["inter_node"] = {"switch": "net"}
    if calibration is not None:
        data["calibration"] = calibration
    return cluster_spec_from_dict(data, source=name)


def header_comment(m: dict[str, Any], name: str, opts: CalibrateOptions, command: str,
                   extra: dict[str, Any], tool: str = TOOL) -> str:
    """The comment header of a measured cluster file: date, command and every measured
    value (one line each; :func:`save_cluster` writes them as ``#`` lines)."""
    gemm = _both_dtypes(m)
    mw, nn = m["workers_per_node"], m["nodes"]
    now = datetime.datetime.now().astimezone().strftime("%Y-%m-%d %H:%M %Z")
    hdr = [
        f"{name}: measured by {tool} on {now} (host {m['hosts'][0]}).",
        f"command: {command}",
        f"{nn} node(s) x {mw} worker process(es); torch threads per worker "
        f"{extra['threads']}; torch {extra['torch']}; load average at start "
        f"{extra['loadavg']}.",
    ]
    if extra.get("emulation"):
        hdr.append(f"under scripts/emulate_cluster.py: {extra['emulation']}")
    hdr.append(f"Expert MLP fwd+bwd, H={opts.hidden}, F={opts.ffn}, {opts.activation}, on all "
               "workers at once; TFLOP/s = GEMM FLOPs (12 T H F) / median time, mean over "
               "ranks, by tokens T, 'wall clock / CPU time of the computing thread':")
    kinds = {"gemm": "bare GEMMs (6 torch.mm)",
             "mlp": "MLP as trained (fc1, activation, fc2, autograd backward)"}
    for kind in sorted(m["gemm_all"]):
        for dtype, g in sorted(m["gemm_all"][kind].items()):
            pts = ", ".join(f"{c['tokens']}: {c['wall_tflops']:.4f}"
                            + (f"/{c['cpu_tflops']:.4f}" if "cpu_tflops" in c else "")
                            for c in g["curve"])
            hdr.append(f"  {kind} {dtype}: {{{pts}}}")
        hdr.append(f"    ({kind}: {kinds[kind]})")
    clocks = sorted({g["clock"] for g in m["gemm"].values()})
    hdr.append(f"  written as gemm_tflops / gemm_curve: {m['curve_kind']}, "
               f"{' / '.join(clocks)} clock" + "".join(
                   f"; {d} copied from {g['copied_from']} (not measured)"
                   for d, g in sorted(gemm.items()) if g.get("copied_from")))
    hdr.append("Links, one pair at a time; bandwidth = largest message / (time - time of the "
               "smallest), one direction:")
    hdr.append("  ping-pong = blocking send/recv round trip / 2 (other direction idle); "
               "exchange = both sides isend then irecv at once, until both arrived (as in an "
               "all-to-all)")
    for label, a in (("intra-node", m["intra"]), ("inter-node", m["inter"])):
        if a:
            hdr.append(
                f"  {label} ({a['pairs']} pairs): exchange {a['exchange_gbps']:.3f} Gbit/s "
                f"each way (latency {a['exchange_latency_us']:.1f} us), ping-pong "
                f"{a['pingpong_gbps']:.3f} Gbit/s (latency {a['latency_us']:.1f} us); "
                f"written: {a['mode']} {a['gbps']:.3f} (pairs min {a['gbps_min']:.3f}, "
                f"max {a['gbps_max']:.3f})")
    hdr.append(f"  message sizes (bytes): {', '.join(str(s) for s in opts.sizes)}")
    duplex, dratio = duplex_of(m)
    if dratio is not None:
        hdr.append(f"  exchange / ping-pong = {dratio:.2f} -> duplex: {duplex} (half below "
                   f"{HALF_DUPLEX_RATIO}: the two directions of a pair took turns)")
    topo = ("every worker hangs off one vertex 'host' at the intra-node bandwidth"
            if mw > 1 else "one worker per node")
    if nn > 1:
        topo += f"; one NIC on '{'host' if mw > 1 else 'w0'}' at the inter-node bandwidth"
    hdr.append(f"Topology written: {topo}.")
    hdr.append(f"Wall-clock numbers are noisy on a shared machine: re-run {TOOL} before "
               "relying on them.")
    return "\n".join(hdr)


def write_cluster(spec: ClusterSpec, comment: str, out: Optional[str]) -> str:
    """Write ``spec`` with its ``comment`` header to ``out`` (None: print it); returns the
    text. Both go through :func:`save_cluster`, which checks that the file loads back."""
    if out:
        save_cluster(spec, out, comment=comment)
        return Path(out).read_text(encoding="utf-8")
    with tempfile.TemporaryDirectory() as tmp:
        path = Path(tmp) / f"{spec.name}.yaml"
        save_cluster(spec, path, comment=comment)
        text = path.read_text(encoding="utf-8")
    print(text, end="", flush=True)
    return text
