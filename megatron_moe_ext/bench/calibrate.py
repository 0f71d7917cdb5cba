"""Calibrate a cluster file: measure this job's expert-MLP throughput and worker-to-worker
links (:mod:`megatron_moe_ext.bench.calib_measure`), summarise them and write a cluster YAML
through the inverse of the loader (:func:`megatron_moe_ext.perf.cluster.save_cluster`), with
a comment header of every measured value and a ``calibration`` provenance mapping (machine,
CPU model, clock, UTC date, tool, command). Front end: scripts/calibrate.py (its docstring
describes what is measured and written).

Public: :class:`CalibrateOptions`, :func:`run`, :func:`worker`, :func:`report`,
:func:`command_line`, :func:`compare_rows`, :func:`format_compare`; the cluster-file side is
:mod:`megatron_moe_ext.bench.calib_cluster`.
"""

from __future__ import annotations

import datetime
import json
import logging
import os
import platform
import shlex
import time
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any, Optional

from megatron_moe_ext.bench.calib_measure import (
    format_rows,
    measure_gemm,
    measure_links,
    node_layout,
)
from megatron_moe_ext.bench.calib_cluster import (
    EMULATION_ENV,
    TOOL,
    cluster_spec,
    header_comment,
    provenance,
    summarize,
    write_cluster,
)
from megatron_moe_ext.perf.cluster import CLUSTER_DIR

logger = logging.getLogger("calibrate")

DEFAULT_OUT = str(CLUSTER_DIR / "local-cpu.yaml")
DEFAULT_TOKENS = (64, 128, 256, 512, 1024, 2048, 4096, 8192)
QUICK_TOKENS = (64, 512, 2048)
DEFAULT_SIZES = (8, 64 << 10, 1 << 20, 8 << 20)
QUICK_SIZES = (8, 1 << 20)


@dataclass
class CalibrateOptions:
    """What to measure and write (the options of scripts/calibrate.py, same names; None
    defaults are resolved from ``quick`` on construction)."""

    out: Optional[str] = None
    """Cluster YAML to write (None: configs/clusters/local-cpu.yaml, except under the
    emulator or with compare, where nothing is written)."""
    name: Optional[str] = None
    """Cluster name in the YAML (default: the out file stem; under the emulator
    <cluster>-emulated)."""
    json: Optional[str] = None
    """Also write the raw measurements as JSON here."""
    compare: Optional[str] = None
    """Print measured vs described rates of this cluster YAML (or name)."""
    scale: Optional[float] = None
    """Factor on the described rates for compare (default: MMX_EMULATION_SCALE, else 1)."""
    tolerance: float = 0.15
    """Relative difference accepted by compare."""
    strict: bool = False
    """Exit 1 when a compared link rate is outside the tolerance."""
    quick: bool = False
    """Few sizes, short measurements (tests)."""
    hidden: Optional[int] = None
    """Expert MLP hidden size H of the GEMM shapes (default 512; quick 256)."""
    ffn: Optional[int] = None
    """Expert FFN hidden size F of the GEMM shapes (default 2H)."""
    tokens: Optional[list[int]] = None
    """Token counts of the gemm_curve (default DEFAULT_TOKENS; quick QUICK_TOKENS)."""
    dtypes: list[str] = field(default_factory=lambda: ["fp32", "bf16"])
    """Dtypes to measure (a missing one of fp32 / bf16 copies the measured one)."""
    gemm_seconds: Optional[float] = None
    """Time budget per kind and dtype for the throughput rounds (default 4; quick 0.3)."""
    curve: str = "mlp"
    """mlp | gemm: what becomes gemm_tflops / gemm_curve (both are measured and recorded)."""
    clock: str = "cpu"
    """cpu | wall: clock of the written throughput (cpu needs 1 torch thread per process)."""
    activation: str = "gelu"
    """Expert activation of the mlp kernel: gelu | silu | swiglu | relu."""
    sizes: Optional[list[int]] = None
    """Link message sizes in bytes (default DEFAULT_SIZES; quick QUICK_SIZES)."""
    p2p_seconds: Optional[float] = None
    """Time budget per pair and message size (default 0.3; quick 0.05)."""
    pairs: str = "all"
    """all (every pair) | star (rank 0 and every other rank)."""
    workers_per_node: Optional[int] = None
    """Node = rank // this (default: GROUP_RANK, else LOCAL_WORLD_SIZE)."""
    bandwidth: str = "pingpong"
    """pingpong | exchange: which measured rate becomes the link bandwidth."""
    intra_kind: str = "loopback"
    """Kind label of the written intra-node links."""
    nproc: int = 2
    """Processes to spawn when not started by torchrun."""
    threads: Optional[int] = None
    """Torch threads per process (default: as training)."""
    log_level: str = "INFO"
    """Rank-0 log level."""
    argv: list[str] = field(default_factory=list)
    """The command-line arguments, recorded in the written file."""

    def __post_init__(self) -> None:
        self.hidden = self.hidden or (256 if self.quick else 512)
        self.ffn = self.ffn or 2 * self.hidden
        self.tokens = sorted(set(self.tokens or (QUICK_TOKENS if self.quick else DEFAULT_TOKENS)))
        self.sizes = sorted(set(self.sizes or (QUICK_SIZES if self.quick else DEFAULT_SIZES)))
        self.gemm_seconds = self.gemm_seconds or (0.3 if self.quick else 4.0)
        self.p2p_seconds = self.p2p_seconds or (0.05 if self.quick else 0.3)
        if min(self.tokens) < 1 or min(self.sizes) < 4 or self.hidden < 1 or self.ffn < 1:
            raise ValueError("--tokens, --hidden, --ffn must be >= 1 and --sizes >= 4 bytes")
        if len(self.sizes) < 2:
            raise ValueError("--sizes needs at least two sizes (latency and bandwidth)")
        for key, allowed in (("curve", ("mlp", "gemm")), ("clock", ("cpu", "wall")),
                             ("pairs", ("all", "star")),
                             ("bandwidth", ("pingpong", "exchange")),
                             ("activation", ("gelu", "silu", "swiglu", "relu"))):
            if getattr(self, key) not in allowed:
                raise ValueError(f"{key} must be one of {', '.join(allowed)}, "
                                 f"got {getattr(self, key)!r}")
        bad = [d for d in self.dtypes if d not in ("fp32", "bf16")]
        if bad or not self.dtypes:
            raise ValueError(f"dtypes must be fp32 and/or bf16, got {self.dtypes}")


def run(opts: CalibrateOptions) -> int:
    """Calibrate on ``opts.nproc`` spawned processes, or in this process under torchrun."""
    from megatron_moe_ext.runtime.launch import run_workers

    return run_workers(worker, opts.nproc, opts)


# ----------------------------------------------------------------------------------- compare


def compare_rows(m: dict[str, Any], cluster: str, scale: float) -> list[dict[str, Any]]:
    """Measured vs described (x scale) rates: GEMM per dtype, intra-node, inter-node."""
    from megatron_moe_ext.emulation.netns import intra_node_link, node_nic_gbps
    from megatron_moe_ext.perf.topology import load_cluster

    spec = load_cluster(cluster)
    rows = []
    for dtype, g in sorted(m["gemm"].items()):
        if dtype in spec.gemm_tflops:
            rows.append({"what": f"GEMM {dtype} (TFLOP/s)", "measured": g["tflops"],
                         "described": spec.gemm_tflops[dtype] * scale,
                         "note": "equal to the local rate only with --scale auto"
                         if scale != 1 else ""})
    if m["intra"]:
        link = intra_node_link(spec) if spec.workers_per_node > 1 else None
        if link is None:
            rows.append({"what": "intra-node (Gbit/s)", "measured": m["intra"]["gbps"],
                         "described": None, "note": "cluster has 1 worker per node"})
        else:
            for mode in ("pingpong", "exchange"):
                checked = mode == m["intra"]["mode"]
                note = ("memory-like: not rate-limited by the emulator"
                        if link.memory and scale != 1 else "")
                if not checked:
                    note = "; ".join(x for x in (note, "informational") if x)
                rows.append({"what": f"intra-node {link.kind} {mode} (Gbit/s)",
                             "measured": m["intra"][f"{mode}_gbps"],
                             "described": link.gbps * scale, "checked": checked,
                             "note": note})
    if m["inter"]:
        try:
            nic = node_nic_gbps(spec, m["workers_per_node"])
        except Exception as exc:  # no NIC in the described cluster
            rows.append({"what": "inter-node NIC (Gbit/s)", "measured": m["inter"]["gbps"],
                         "described": None, "note": str(exc)})
        else:
            for mode in ("pingpong", "exchange"):
                rows.append({"what": f"inter-node NIC {mode} (Gbit/s)",
                             "measured": m["inter"][f"{mode}_gbps"],
                             "described": nic * scale, "checked": mode == m["inter"]["mode"],
                             "note": "" if mode == m["inter"]["mode"] else "informational"})
    for r in rows:
        d = r["described"]
        r["ratio"] = r["measured"] / d if d else None
    return rows


def format_compare(rows: list[dict[str, Any]], cluster: str, scale: float,
                   tolerance: float) -> tuple[str, bool]:
    """(table, all link rows within tolerance)."""
    out = [f"measured vs described ({cluster} x scale {scale:.4g}):",
           f"{'rate':<36} {'measured':>12} {'described':>12} {'ratio':>7}  verdict"]
    ok = True
    for r in rows:
        d, ratio = r["described"], r["ratio"]
        if ratio is None:
            verdict = "-"
        elif abs(ratio - 1) <= tolerance:
            verdict = f"OK (within {tolerance:.0%})"
        else:
            verdict = f"OFF by {ratio - 1:+.0%}"
            if ("GEMM" not in r["what"] and "memory-like" not in r["note"]
                    and r.get("checked", True)):
                ok = False
        out.append(f"{r['what']:<36} {r['measured']:12.4g} "
                   f"{('-' if d is None else f'{d:.4g}'):>12} "
                   f"{('-' if ratio is None else f'{ratio:.3f}'):>7}  {verdict}"
                   + (f"  [{r['note']}]" if r["note"] else ""))
    return "\n".join(out), ok


# ----------------------------------------------------------------------------------- worker


def command_line(opts: CalibrateOptions) -> str:
    """The command line that ran this calibration (launcher reconstructed from the env)."""
    own = f"{TOOL} {shlex.join(opts.argv)}".strip()
    env = os.environ
    if env.get("MMX_EMULATION_CLUSTER"):
        return (f"scripts/emulate_cluster.py --cluster {env['MMX_EMULATION_CLUSTER']} --scale "
                f"{env.get('MMX_EMULATION_SCALE', '?')} ... -- {own}")
    if "TORCHELASTIC_RUN_ID" in env or "GROUP_RANK" in env:
        lws = int(env.get("LOCAL_WORLD_SIZE") or 1)
        nnodes = int(env.get("WORLD_SIZE") or lws) // max(1, lws)
        return (f"torchrun{f' --nnodes {nnodes}' if nnodes > 1 else ''} --nproc-per-node "
                f"{lws} {own}")
    return f"python {own}" + ("" if "--nproc" in opts.argv else f"  (spawned {opts.nproc})")


def worker(opts: CalibrateOptions) -> int:
    """One rank of the calibration (every rank of the world calls it); rank 0 reports."""
    import torch
    import torch.distributed as dist

    from megatron_moe_ext.config import RuntimeConfig
    from megatron_moe_ext.runtime import device as rdev

    rcfg = RuntimeConfig(device="cpu", num_threads=opts.threads)
    rt = rdev.setup_runtime(rcfg, "cpu")
    rank, world = rt.rank, rt.world_size
    logging.basicConfig(level=opts.log_level.upper() if rank == 0 else "WARNING",
                        format=f"[calibrate rank {rank}] %(message)s", force=True)
    load = [round(x, 2) for x in os.getloadavg()] if hasattr(os, "getloadavg") else None
    nodes, hosts = node_layout(opts.workers_per_node, rank, world)
    logger.info("%d workers, node of each rank %s, %d torch threads each, load average %s",
                world, nodes, torch.get_num_threads(), load)

    gemm: dict[str, dict[str, list]] = {}
    for kind in ("gemm", "mlp"):
        for dtype in opts.dtypes:
            t0 = time.perf_counter()
            rows = measure_gemm(opts.hidden, opts.ffn, opts.tokens, dtype, opts.gemm_seconds,
                                kind, opts.activation, 2 if opts.quick else 3)
            gemm.setdefault(kind, {})[dtype] = rows
            logger.info("%s %s (rank %d, TFLOP/s by tokens, wall / cpu): %s  [%d rounds, "
                        "%.1f s]", kind, dtype, rank, format_rows(rows), rows["reps"][0],
                        time.perf_counter() - t0)
    if opts.pairs == "all":
        pairs = [(a, b) for a in range(world) for b in range(a + 1, world)]
    else:
        pairs = [(0, k) for k in range(1, world)]
    t0 = time.perf_counter()
    links = measure_links(pairs, opts.sizes, opts.p2p_seconds)
    logger.info("ping-pong of %d pair(s) x %d sizes: %.1f s", len(pairs), len(opts.sizes),
                time.perf_counter() - t0)

    gathered: list[Any] = [None] * world
    dist.all_gather_object(gathered, {"gemm": gemm, "links": links})
    rc = 0
    if rank == 0:
        all_links: dict = {}
        for g in gathered:
            all_links.update(g["links"])
        m = summarize([g["gemm"] for g in gathered], all_links, nodes, hosts, opts.bandwidth,
                      opts.curve, opts.clock)
        rc = report(m, opts, {"threads": torch.get_num_threads(), "torch": torch.__version__,
                              "loadavg": load, "emulation": _emulation()})
    rc_t = torch.tensor([rc])
    dist.broadcast(rc_t, 0)
    dist.barrier()
    dist.destroy_process_group()
    return int(rc_t)


def _emulation() -> Optional[str]:
    if not os.environ.get("MMX_EMULATION_CLUSTER"):
        return None
    return (f"cluster {os.environ['MMX_EMULATION_CLUSTER']}, scale "
            f"{os.environ.get('MMX_EMULATION_SCALE', '?')}")


def report(m: dict[str, Any], opts: CalibrateOptions, extra: dict[str, Any]) -> int:
    """Rank 0: print the summary, write YAML / JSON, run the comparison. Returns the exit
    code."""
    for dtype, g in m["gemm"].items():
        logger.info("written %s %s: %.4f TFLOP/s at %d tokens (curve %s)", m["curve_kind"],
                    dtype, g["tflops"], g["curve"][-1]["tokens"],
                    ", ".join(f"{c['tokens']}: {c['tflops']:.4f}" for c in g["curve"]))
    for label in ("intra", "inter"):
        a = m[label]
        if a:
            logger.info("%s-node (%d pairs): 2-way exchange %.3f Gbit/s each way, ping-pong "
                        "%.3f Gbit/s, latency %.1f us; written (%s) %.3f Gbit/s", label,
                        a["pairs"], a["exchange_gbps"], a["pingpong_gbps"], a["latency_us"],
                        a["mode"], a["gbps"])
    emulated = any(os.environ.get(k) for k in EMULATION_ENV)
    out = opts.out
    if out is None and not emulated and not opts.compare:
        out = DEFAULT_OUT
    name = opts.name
    if name is None:
        if emulated:
            name = f"{os.environ.get('MMX_EMULATION_CLUSTER', 'cluster')}-emulated"
        else:
            name = Path(out).stem if out else "local-cpu"
    command = command_line(opts)
    spec = cluster_spec(m, name, opts.intra_kind, provenance(m, command, extra))
    write_cluster(spec, header_comment(m, name, opts, command, extra), out)
    if out:
        logger.info("wrote %s", out)
    rc = 0
    result: dict[str, Any] = {"measured": m, "cluster_name": name, "yaml": out,
                              "config": asdict(opts), "extra": extra}
    if opts.compare:
        scale = opts.scale
        if scale is None:
            scale = float(os.environ.get("MMX_EMULATION_SCALE") or 1.0)
        rows = compare_rows(m, opts.compare, scale)
        table, ok = format_compare(rows, opts.compare, scale, opts.tolerance)
        print(table, flush=True)
        result["compare"] = {"cluster": opts.compare, "scale": scale, "rows": rows,
                             "tolerance": opts.tolerance, "links_within_tolerance": ok}
        if opts.strict and not ok:
            rc = 1
    result["machine"] = {"platform": platform.platform(), "cpu_count": os.cpu_count(),
                         "date_utc": datetime.datetime.now(datetime.timezone.utc).isoformat(
                             timespec="seconds")}
    if opts.json:
        Path(opts.json).parent.mkdir(parents=True, exist_ok=True)
        Path(opts.json).write_text(json.dumps(result, indent=1, default=str), encoding="utf-8")
        logger.info("wrote %s", opts.json)
    return rc
