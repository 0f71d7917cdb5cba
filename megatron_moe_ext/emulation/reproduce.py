"""Reproduce the FasterMoE paper's headline speedups on an emulated johnny replica: the runs
of scripts/reproduce_paper.py (its docstring describes the variants, the link-rate sweep and
the calibration under emulation). Each run is a command line of the project's scripts
(scripts/emulate_cluster.py around scripts/bench_moe_layer.py or scripts/calibrate.py), run as
a subprocess; their JSONs feed the report (:mod:`megatron_moe_ext.emulation.report`).

Public: :func:`reproduce`, :func:`bench_cmd`, :func:`write_replica_yaml`,
:func:`replica_nic_gbps`, :func:`link_plan`, :func:`wait_for_quiet`, FULL / QUICK sizes.
"""

from __future__ import annotations

import datetime as _dt
import json
import os
import platform
import shlex
import subprocess
import sys
import time
from pathlib import Path
from typing import Any, Sequence

from megatron_moe_ext.emulation.report import (
    LIMITS,
    VARIANTS,
    f2,
    make_png,
    make_sweep_png,
    summarize,
    write_report,
)
from megatron_moe_ext.perf.cluster import CLUSTER_DIR

JOHNNY = CLUSTER_DIR / "johnny.yaml"
LOCAL_CPU = CLUSTER_DIR / "local-cpu.yaml"
DEFAULT_SCALE = 0.01

# H=768, ffn=1536 (alpha=2): at scale 0.01 the replica's R_CC = comp / 4A is ~0.9 (gloo's
# half-duplex all-to-all included); 1024 tokens keep one run under a minute.
FULL = dict(tokens=1024, hidden=768, ffn=1536, experts=4, topk=2, iters=6, warmup=2)
QUICK = dict(tokens=256, hidden=64, ffn=128, experts=4, topk=2, iters=3, warmup=1)


def loadavg() -> float:
    """The 1-minute load average."""
    return float(Path("/proc/loadavg").read_text().split()[0])


def wait_for_quiet(max_load: float, max_wait: float, log) -> tuple[float, float]:
    """Sleep in 20 s steps while the 1-min load > max_load (at most max_wait s in total)."""
    t0 = time.time()
    while loadavg() > max_load and time.time() - t0 < max_wait:
        log(f"  load {loadavg():.2f} > {max_load}: waiting 20 s")
        time.sleep(20)
    return loadavg(), time.time() - t0


def replica_nic_gbps(scale: float) -> float:
    """NIC of a replica node: johnny's NICs (Gb/s) x scale."""
    import yaml

    return sum(n["gbps"] for n in yaml.safe_load(JOHNNY.read_text())["nics"]) * scale


def write_replica_yaml(path: Path, scale: float) -> float:
    """Replica cluster for the perf model / shadow predictor: local-cpu compute, scaled NIC."""
    import yaml

    local = yaml.safe_load(LOCAL_CPU.read_text())
    nic = replica_nic_gbps(scale)
    spec = {
        "name": "johnny-replica",
        "description": f"johnny x {scale} on this VM: 2 nodes x 1 worker, NIC {nic:.4g} Gb/s; "
                       "compute from local-cpu.yaml",
        "nodes": 2, "workers_per_node": 1,
        # gloo moves a worker pair's two directions one after the other (docs/emulation.md)
        "duplex": "half",
        "gemm_tflops": local["gemm_tflops"],
        "links": [{"a": "w0", "b": "host", "gbps": 1000.0, "kind": "memory"}],
        "nics": [{"attach": "host", "gbps": round(nic, 6)}],
        "inter_node": {"switch": "ib"},
    }
    if "gemm_curve" in local:
        spec["gemm_curve"] = local["gemm_curve"]
    path.write_text("# written by scripts/reproduce_paper.py\n" + yaml.safe_dump(spec))
    return nic


def link_plan(scale: float) -> list[tuple[str, str, float, float]]:
    """(name, kind, cluster Gb/s, emulated Mbit/s) of the links the emulator sets up."""
    from megatron_moe_ext.perf.topology import load_cluster
    from megatron_moe_ext.emulation.netns import plan_links

    spec = load_cluster(str(JOHNNY))
    out = []
    for ln in plan_links(spec, scale, 2, 1):
        out.append((ln.name, ln.kind, ln.cluster_gbps, ln.cluster_gbps * 1e3 * scale))
    return out


def bench_cmd(args, sizes, skew, variant, json_path: Path, replica: Path,
              scale: float | None = None, scripts: Path = Path("scripts")) -> list[str]:
    """The emulated benchmark run of one variant (scripts/emulate_cluster.py -- bench)."""
    name, _, vargs, sets = variant
    inner = ["--impl", "both", "--skew", str(skew), "--cluster", str(replica),
             "--json", str(json_path), "--log-level", "WARNING"]
    for k in ("tokens", "hidden", "ffn", "experts", "topk", "iters", "warmup"):
        inner += [f"--{k}", str(sizes[k])]
    inner += vargs
    for s in sets:
        inner += ["--set", s]
    script = [str(scripts / "bench_moe_layer.py")]
    return [sys.executable, str(scripts / "emulate_cluster.py"),
            "--cluster", str(JOHNNY), "--scale", str(args.scale if scale is None else scale),
            "--nodes", "2",
            "--workers-per-node", "1", "--timeout", str(args.timeout), "--"] + script + inner


def reproduce(args: Any, argv: Sequence[str], scripts: Path) -> int:
    """Run (or with ``args.dry_run`` print, with ``args.report_only`` only re-read) every run
    and write the report ``args.out`` and the plots ``args.png`` (+ ``_sweep``).

    ``args`` carries the options of scripts/reproduce_paper.py (``out``, ``png`` and
    ``runs_dir`` resolved), ``argv`` its command line (recorded in the report), ``scripts``
    the folder of the scripts that are run. Returns 0, or 1 when a run failed."""
    sizes = QUICK if args.quick else FULL
    out = Path(args.out).resolve()
    png = Path(args.png).resolve()
    repo = scripts.resolve().parent
    runs = Path(args.runs_dir)
    runs.mkdir(parents=True, exist_ok=True)
    log = lambda s: print(s, flush=True)  # noqa: E731
    t_start = time.time()

    replica = runs / "johnny-replica.yaml"
    # --report-only reads the runs directory (committed data by default) and writes nothing there
    nic = (replica_nic_gbps(args.scale) if args.report_only
           else write_replica_yaml(replica, args.scale))
    links = link_plan(args.scale)
    log(f"johnny replica at scale {args.scale}:")
    for name, kind, cg, mbit in links:
        log(f"  {name} ({kind}): {cg:g} Gb/s -> {mbit:.0f} Mbit/s")
    log(f"  (intra-node PCIe 88 Gb/s -> {88e3 * args.scale:.0f} Mbit/s; unused with 1 worker/node)")

    results, failures = {}, []
    json_times: list[float] = []  # mtimes of the JSONs the report uses

    def run(label: str, cmd: list[str], jp: Path, parse=summarize) -> dict | None:
        log(f"\n[{label}] {shlex.join(cmd)}")
        if args.dry_run:
            return None
        if args.report_only:
            if not jp.exists():
                failures.append(f"{label}: no {jp} (--report-only)")
                return None
            data = json.loads(jp.read_text())
            when = (data.get("machine") or {}).get("date_utc")  # the bench writes it
            json_times.append(_dt.datetime.fromisoformat(when).timestamp() if when
                              else jp.stat().st_mtime)
            return parse(data)
        ld, waited = wait_for_quiet(args.max_load, args.max_wait, log)
        log(f"  load {ld:.2f} (waited {waited:.0f} s)")
        if jp.exists():
            jp.unlink()
        t0 = time.time()
        proc = subprocess.run(cmd, cwd=repo, capture_output=True, text=True)
        dt = time.time() - t0
        tail = (proc.stdout + proc.stderr).strip().splitlines()[-12:]
        if proc.returncode != 0 or not jp.exists():
            failures.append(f"{label}: rc {proc.returncode} after {dt:.0f} s: "
                            + " / ".join(tail[-3:]))
            log(f"  FAILED rc={proc.returncode} ({dt:.0f} s)\n    " + "\n    ".join(tail))
            return None
        if parse is not summarize:
            log(f"  {dt:.0f} s: wrote {jp}")
            return parse(json.loads(jp.read_text()))
        s = summarize(json.loads(jp.read_text()))
        s["run_s"] = dt
        log(f"  {dt:.0f} s: stock {s['m_wall'] * 1e3:.0f} ms, FasterMoE "
            f"{s['f_wall'] * 1e3:.0f} ms, speedup wall {f2(s['wall'])} cpu {f2(s['cpu'])} "
            f"pred {f2(s['pred'])}, shadows {s['shadows']}, remote {f2(s['remote'], 3)}")
        return s

    variants = [v for v in VARIANTS if v[0] in args.variants]
    for skew in args.skews:
        for v in variants:
            jp = runs / f"skew{skew:g}_{v[0].replace('+', '_')}.json"
            s = run(f"skew {skew}, {v[0]}", bench_cmd(args, sizes, skew, v, jp, replica, scripts=scripts), jp)
            if s is not None:
                results[(skew, v[0])] = s

    # link-rate sweep: balanced routing, smart schedule only, one replica file per scale
    sweep: dict[float, dict] = {}
    schedule = next(v for v in VARIANTS if v[0] == "schedule")
    for sc in args.sweep_scales:
        if sc == args.scale and (0.0, "schedule") in results:
            sweep[sc] = results[(0.0, "schedule")]
            continue
        rep = runs / f"johnny-replica-{sc:g}.yaml"
        if not args.report_only:
            write_replica_yaml(rep, sc)
        jp = runs / f"sweep{sc:g}_schedule.json"
        s = run(f"sweep scale {sc}", bench_cmd(args, sizes, 0.0, schedule, jp, rep, sc, scripts), jp)
        if s is not None:
            sweep[sc] = s
    # calibration under emulation: calibrate.py measures the replica (links, and the expert
    # MLP at the layer's H / ffn) and writes a cluster file; the balanced schedule case is run
    # again with predictions from that file
    calibrated = None
    if not args.no_calibrate:
        cal_yaml, cal_json = runs / "johnny-calibrated.yaml", runs / "calibrate.json"
        cal_cmd = [sys.executable, str(scripts / "emulate_cluster.py"),
                   "--cluster", str(JOHNNY), "--scale", str(args.scale), "--nodes", "2",
                   "--workers-per-node", "1", "--timeout", str(args.timeout), "--",
                   str(scripts / "calibrate.py"), "--dtypes", "fp32",
                   "--hidden", str(sizes["hidden"]), "--ffn", str(sizes["ffn"]),
                   "--compare", str(JOHNNY), "--out", str(cal_yaml), "--json", str(cal_json)]
        if args.quick:
            cal_cmd.append("--quick")
        cal = run("calibrate under emulation", cal_cmd, cal_json, parse=lambda d: d)
        if cal is not None and cal_yaml.exists():
            from megatron_moe_ext.perf.topology import load_cluster

            spec = load_cluster(cal_yaml)
            jp = runs / "calibrated_schedule.json"
            bench = run("balanced schedule, predicted from the calibrated file",
                        bench_cmd(args, sizes, 0.0, schedule, jp, cal_yaml, scripts=scripts), jp)
            calibrated = {"measured": cal["measured"], "compare": cal.get("compare"),
                          "duplex": spec.duplex, "gemm_fp32": spec.gemm_tflops["fp32"],
                          "nic_gbps": spec.nics[0].gbps if spec.nics else None,
                          "emulated_gbps": nic, "yaml": str(cal_yaml), "bench": bench}
    if args.dry_run:
        return 0

    rcc = None
    s0 = results.get((args.skews[0], "schedule"))
    if s0 and s0["a2a"] and s0["cf"] is not None:
        comp = s0["cf"] + s0["cb"]
        pm = s0["pred_m"]
        pr = (3 * pm["comp_s"] / (4 * pm["comm_s"])
              if pm.get("comp_s") and pm.get("comm_s") else None)
        rcc = (f"measured all-to-all A = {s0['a2a'] * 1e3:.1f} ms, expert compute fwd+bwd = "
               f"{comp * 1e3:.1f} ms, so measured R_CC = comp / 4A = {comp / (4 * s0['a2a']):.2f}; "
               f"model R_CC = 3 comp / 4 comm = {f2(pr)} (skew {args.skews[0]}).")
        log("R_CC: " + rcc)
    meta = {
        "command": "python scripts/reproduce_paper.py "
                   + shlex.join([a for a in argv if a != "--report-only"]),
        "date": _dt.datetime.now(_dt.timezone.utc).strftime("%Y-%m-%d %H:%M UTC"),
        "machine": f"{platform.node()}, {os.cpu_count()} CPUs, {platform.machine()}, "
                   f"Python {platform.python_version()}",
        "links": links, "nic_gbps": nic, "rcc": rcc, "limits": LIMITS, "failures": failures,
        "elapsed_s": time.time() - t_start,
        "measured": " to ".join(
            _dt.datetime.fromtimestamp(t, _dt.timezone.utc).strftime("%Y-%m-%d %H:%M UTC")
            for t in (min(json_times), max(json_times))) if json_times else None,
    }
    try:
        import torch
        meta["machine"] += f", torch {torch.__version__}"
    except Exception:  # pragma: no cover
        pass
    meta["sweep"] = sweep
    meta["calibrated"] = calibrated
    if results:
        make_png(results, args.skews, png)
    if sweep:
        make_sweep_png(sweep, png.with_name(png.stem + "_sweep.png"))
    write_report(args, sizes, results, meta, out, png)
    log(f"\nwrote {out} and {png}")
    return 0 if not failures else 1
