"""Reproduction at the paper's scale in the lab: plans, emulator runs, the floor check, the
comparison with the model, and the section of docs/reproduction.md (+ PNG).

Notation
--------
W      workers (16 on johnny 2x8, 64 on trevor 16x4); T tokens per worker (before top-k)
s      emulator link scale; D = 1 / s the dilation of compute (so links and compute alike)
floor  the same plan with compute zero and links unlimited: the box's own cost per call

Per cluster: the plan runs twice in one torchrun each (:mod:`.suite`): the floor (emulator with
no intra-node limit and NIC x FLOOR_SCALE, compute zero) and the emulated run (scale s, D = 1/s). A
configuration is *valid* when its floor is under 10 % of its emulated layer time.
"""

from __future__ import annotations

import json
import logging
import math
from pathlib import Path
from typing import Optional

from ..bench.stats import r_squared
from .run import LabConfig

logger = logging.getLogger(__name__)

__all__ = ["LAYERS", "FLOOR_LIMIT", "build_plan", "collect", "estimate_seconds", "layer_tokens",
           "run_plan", "write_section"]

FLOOR_LIMIT = 0.10
"""A configuration is quoted only when floor / emulated layer time is below this."""

FLOOR_SCALE = 10.0
"""Link scale of the floor runs (johnny's NIC at 500 Gbit/s; tbf takes up to ~2^32 kbit/s)."""

LAYERS = {  # paper Table 2: H, F = alpha H (alpha 2), E, top-2, 4096 tokens per GPU
    "MoE-GPT-S": dict(hidden=1024, ffn=2048, experts=16, cluster="johnny"),
    "MoE-GPT": dict(hidden=2048, ffn=4096, experts=16, cluster="johnny"),
    "MoE-GPT-L": dict(hidden=4096, ffn=8192, experts=16, cluster="johnny"),
    "MoE-BERT-Wide": dict(hidden=1024, ffn=2048, experts=64, cluster="trevor"),
    "tiny": dict(hidden=128, ffn=256, experts=4, cluster="tests/lab/lab2x2.yaml"),  # tests
}
PAPER_TOKENS = 4096


def layer_tokens(tokens: int, hidden: int) -> int:
    """Tokens per worker of a layer for ``tokens`` given at H = 1024: scaled by 1024 / H, so
    every layer's messages have the same bytes (the floor is mostly bytes; R_CC does not depend
    on tokens)."""
    return max(1, tokens * 1024 // hidden)


def build_plan(layers: list[str], tokens: int, out_dir: Path, iters: int = 3, warmup: int = 1,
               group_sizes=(1, 2, 4, 8), skew: float = 1.0, gate: bool = True) -> list[dict]:
    """Lab configs for ``layers`` (all on one cluster): balanced with sync and smart g, and
    skewed (Zipf ``skew``, changing per iteration) with smart alone and the shadow policies."""
    entries = []
    for name in layers:
        lay = LAYERS[name]
        base = dict(cluster=lay["cluster"], tokens=layer_tokens(tokens, lay["hidden"]),
                    hidden=lay["hidden"],
                    ffn=lay["ffn"], experts=lay["experts"], topk=2, iters=iters,
                    warmup=warmup, dilation="auto")
        tag = name.lower().replace("-", "_")
        for g in group_sizes:
            entries.append(dict(base, impl="both" if g == group_sizes[0] else "fastermoe",
                                group_size=g, json=str(out_dir / f"{tag}_bal_g{g}.json")))
        for shadow in ("never", "predictor", "model"):
            entries.append(dict(base, impl="both" if shadow == "never" else "fastermoe",
                                group_size=2, skew=skew, vary_routing=True, shadow=shadow,
                                json=str(out_dir / f"{tag}_skew_{shadow}.json")))
        if gate:  # both (model shadows, g=2) on router-score routing, without / with the gate
            for gated in (False, True):
                name = f"{tag}_scores_{'gate' if gated else 'nogate'}.json"
                entries.append(dict(base, impl="fastermoe" if gated else "both", group_size=2,
                                    skew=skew, vary_routing=True, shadow="model",
                                    routing="scores", gate=gated, json=str(out_dir / name)))
    return entries


def estimate_seconds(entries: list[dict], scale: float) -> float:
    """Rough lab duration of a plan at ``scale``: the model's times x D x calls (shadows and
    the floor not counted)."""
    from .setup import lab_counts, lab_topology, predict_impl

    total = 0.0
    for e in entries:
        cfg = LabConfig(**e)
        topo = lab_topology(cfg.cluster, _workers(cfg))
        counts = lab_counts(topo.num_workers, cfg.experts, cfg.tokens, cfg.topk, cfg.skew,
                            cfg.seed)
        calls = cfg.iters + cfg.warmup
        impls = ["fastermoe"] + (["megatron"] * (2 if cfg.skew else 1)
                                 if cfg.impl == "both" else [])
        for impl in impls:
            total += calls * predict_impl(counts, topo, cfg.hidden, cfg.ffn, cfg.dtype, impl,
                                          cfg.group_size).total_s / scale
    return total


def _workers(cfg: LabConfig) -> int:
    from ..perf.topology import load_cluster

    return load_cluster(cfg.cluster).num_workers


def run_plan(entries: list[dict], cluster: str, nodes: int, workers_per_node: int,
             scale: float, floor: bool, plan_path: Path, timeout: float) -> int:
    """Run the plan in one torchrun per node under the emulator; returns its exit code.

    ``floor``: compute zero, no intra-node limit and the NIC at :data:`FLOOR_SCALE` x its rate
    (far above what the box moves: links unlimited).
    """
    from ..emulation.netns import EmulatedCluster
    from ..perf.topology import load_cluster

    entries = [dict(e, floor=floor, json=_floor_path(e["json"]) if floor else e["json"])
               for e in entries]
    for e in entries:
        LabConfig(**e).validate()
    plan_path.parent.mkdir(parents=True, exist_ok=True)
    plan_path.write_text(json.dumps(entries, indent=1))
    spec = load_cluster(cluster)
    with EmulatedCluster(spec, FLOOR_SCALE if floor else scale, nodes, workers_per_node,
                         intra_limit=not floor, intra_bus="aggregate") as cl:
        logger.info("%s", cl.describe())
        return cl.run(["-m", "megatron_moe_ext.lab.suite", str(plan_path)], timeout=timeout,
                      grace_s=10)


def _floor_path(path: str) -> str:
    p = Path(path)
    return str(p.with_name(p.stem + "_floor.json"))


def collect(entries: list[dict]) -> list[dict]:
    """One row per (config, implementation) with measured, predicted and floor figures."""
    rows = []
    for e in entries:
        path, fpath = Path(e["json"]), Path(_floor_path(e["json"]))
        if not path.exists():
            continue
        r = json.loads(path.read_text())
        fl = json.loads(fpath.read_text()) if fpath.exists() else None
        for impl, v in r["impls"].items():
            floor_s = (fl["impls"].get(impl) or {}).get("fwd_bwd_s") if fl else None
            rows.append(dict(
                config=path.stem, impl=impl, cluster=r["cluster"]["name"],
                workers=r["cluster"]["workers"], group_size=e.get("group_size", 1),
                skew=e.get("skew", 0.0), routing=e.get("routing", "exact"),
                gate=e.get("gate", False), shadow=e.get("shadow", "never") if impl ==
                "fastermoe" else "never", shadows=r["shadows"] if impl == "fastermoe" else [],
                lab_s=v["fwd_bwd_s"], cluster_s=v["cluster_fwd_bwd_s"],
                predicted_s=v["predicted_fwd_bwd_s"], floor_s=floor_s,
                floor_fraction=floor_s / v["fwd_bwd_s"] if floor_s else None,
                dilation=r["dilation"], load=r["machine"]["loadavg_1min_start"],
                load_end=r["machine"]["loadavg_1min_end"]))
    return rows


def _speedups(rows: list[dict]) -> list[dict]:
    """Measured and predicted speedup of every FasterMoE row over its routing's sync row."""
    def key(r: dict) -> tuple:
        layer = r["config"].split("_bal")[0].split("_skew")[0].split("_scores")[0]
        return (r["cluster"], layer, r["skew"], r["routing"])

    sync = {key(r): r for r in rows if r["impl"] == "megatron"}
    out = []
    for r in rows:
        if r["impl"] != "fastermoe":
            continue
        s = sync.get(key(r))
        if s is None:
            continue
        out.append(dict(r, measured_speedup=s["cluster_s"] / r["cluster_s"],
                        predicted_speedup=s["predicted_s"] / r["predicted_s"],
                        valid=all((x["floor_fraction"] or 1.0) < FLOOR_LIMIT for x in (r, s))))
    return out


def plot(rows: list[dict], path: Path) -> Optional[str]:
    """Measured vs predicted layer time (cluster seconds), log-log, one colour per W."""
    try:
        import matplotlib

        matplotlib.use("Agg")
        import matplotlib.pyplot as plt
    except ImportError:
        return None
    fig, ax = plt.subplots(figsize=(5, 4.5))
    for w in sorted({r["workers"] for r in rows}):
        sel = [r for r in rows if r["workers"] == w and r["cluster_s"] and r["predicted_s"]]
        ax.scatter([r["predicted_s"] * 1e3 for r in sel], [r["cluster_s"] * 1e3 for r in sel],
                   label=f"W={w}", s=18)
    lim = [min(r["predicted_s"] for r in rows) * 1e3 * 0.8,
           max(max(r["predicted_s"], r["cluster_s"]) for r in rows) * 1e3 * 1.2]
    ax.plot(lim, lim, "k--", lw=0.8)
    ax.set_xscale("log"), ax.set_yscale("log")
    ax.set_xlabel("predicted fwd+bwd (ms, cluster time)")
    ax.set_ylabel("measured in the lab / D (ms)")
    ax.legend()
    ax.set_title("scale lab: model vs measurement")
    fig.tight_layout()
    path.parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(path, dpi=110)
    plt.close(fig)
    return str(path)


def write_section(doc: Path, rows: list[dict], command: str, notes: list[str],
                  png: Optional[str], tag: str) -> None:
    """Replace (or append) the lab section ``tag`` (a cluster name) of ``doc``."""
    BEGIN, END = f"<!-- lab:{tag}:begin -->", f"<!-- lab:{tag}:end -->"
    sp = _speedups(rows)
    valid_rows = [r for r in rows if r["floor_fraction"] is not None
                  and r["floor_fraction"] < FLOOR_LIMIT]
    r2 = {w: r_squared([r["cluster_s"] for r in valid_rows if r["workers"] == w],
                       [r["predicted_s"] for r in valid_rows if r["workers"] == w])
          for w in sorted({r["workers"] for r in rows})}
    lines = [BEGIN, f"### The scale lab on {tag}", "",
             f"Generated by `{command}` (see docs/emulation.md, \"The scale lab\").", ""]
    lines += notes + [""]
    lines += ["| config | impl | W | g | shadows | lab s | cluster ms (lab/D) | predicted ms | "
              "meas/pred | floor % | load |", "|---|---|---|---|---|---|---|---|---|---|---|"]
    for r in rows:
        ff = r["floor_fraction"]
        lines.append(
            f"| {r['config']} | {r['impl']} | {r['workers']} | "
            f"{r['group_size'] if r['impl'] == 'fastermoe' else '-'} | "
            f"{' '.join(str(x) for x in r['shadows'] if x) or '-'} | {r['lab_s']:.2f} | "
            f"{r['cluster_s'] * 1e3:.1f} | "
            f"{r['predicted_s'] * 1e3:.1f} | {r['cluster_s'] / r['predicted_s']:.2f} | "
            f"{'-' if ff is None else f'{ff * 100:.1f}'} | {r['load']:.1f}-{r['load_end']:.1f} |")
    lines += ["", "Speedups over sync EP on the same routing (measured / predicted; *valid* = "
              f"both floors under {FLOOR_LIMIT:.0%}):", "",
              "| config | measured | predicted | achieved / predicted gain | valid |",
              "|---|---|---|---|---|"]
    for r in sp:
        gain = ((r["measured_speedup"] - 1) / (r["predicted_speedup"] - 1)
                if abs(r["predicted_speedup"] - 1) > 1e-3 else math.nan)
        lines.append(f"| {r['config']} | {r['measured_speedup']:.3f} | "
                     f"{r['predicted_speedup']:.3f} | {gain:.2f} | "
                     f"{'yes' if r['valid'] else 'no'} |")
    lines += ["", "R^2 of measured vs predicted layer time over the valid rows: "
              + ", ".join(f"W={w}: {'-' if v is None else f'{v:.3f}'}" for w, v in r2.items()),
              ""]
    if png:
        lines += [f"![model vs lab](img/{Path(png).name})", ""]
    lines.append(END)
    text = doc.read_text() if doc.exists() else ""
    block = "\n".join(lines)
    if BEGIN in text and END in text:
        text = text[:text.index(BEGIN)] + block + text[text.index(END) + len(END):]
    else:
        text = text.rstrip("\n") + "\n\n" + block + "\n"
    doc.write_text(text)


def scaled(entries: list[dict], **changes) -> list[dict]:
    """The plan with fields changed (e.g. tokens, iters)."""
    return [dict(e, **changes) for e in entries]


def main(argv: list[str] | None = None) -> int:
    """``python -m megatron_moe_ext.lab.reproduce``: run floor + emulated plans, write the doc."""
    import argparse
    import sys

    from ..emulation.namespaces import Interrupted, signals_raise
    from ..perf.topology import load_cluster

    p = argparse.ArgumentParser(prog="python -m megatron_moe_ext.lab.reproduce",
                                description=__doc__.split("\n\n")[0])
    p.add_argument("--cluster", required=True, help="johnny or trevor (or a YAML)")
    p.add_argument("--layers", required=True, help=f"comma list of {', '.join(LAYERS)}")
    p.add_argument("--tokens", type=int, required=True,
                   help=f"tokens per worker at H=1024 (the paper's {PAPER_TOKENS}, scaled "
                        "down); layers with a larger H get tokens x 1024 / H")
    p.add_argument("--scale", type=float, required=True, help="emulator link scale s (D = 1/s)")
    p.add_argument("--iters", type=int, default=3)
    p.add_argument("--warmup", type=int, default=1)
    p.add_argument("--group-sizes", default="1,2,4,8")
    p.add_argument("--skew", type=float, default=1.0)
    p.add_argument("--no-gate", action="store_true", help="leave out the gate configurations")
    p.add_argument("--only", default=None,
                   help="comma list of substrings: keep the configurations whose result name "
                        "contains one (e.g. gpt_s_bal,moe_gpt_bal_g1)")
    p.add_argument("--out", default="runs/lab/repro")
    p.add_argument("--doc", default="docs/reproduction.md")
    p.add_argument("--timeout", type=float, default=1800)
    p.add_argument("--steps", default="floor,emulated,doc",
                   help="which of floor, emulated, doc to do (default: all)")
    args = p.parse_args(argv)
    logging.basicConfig(level="INFO", format="[lab reproduce] %(message)s")
    layers = [x for x in args.layers.split(",") if x]
    bad = [x for x in layers if x not in LAYERS]
    if bad:
        p.error(f"--layers: unknown {bad}; accepted: {', '.join(LAYERS)}")
    spec = load_cluster(args.cluster)
    out = Path(args.out) / spec.name
    gs = tuple(int(g) for g in args.group_sizes.split(","))
    entries = build_plan(layers, args.tokens, out, args.iters, args.warmup, gs, args.skew,
                         not args.no_gate)
    entries = [dict(e, cluster=args.cluster) for e in entries]
    if args.only:
        keep = [k for k in args.only.split(",") if k]
        entries = [e for e in entries if any(k in Path(e["json"]).name for k in keep)]
        if not entries:
            p.error(f"--only {args.only!r} keeps no configuration")
    steps = set(args.steps.split(","))
    logger.info("plan: %d configurations, about %.0f s of emulated layer time at scale %g",
                len(entries), estimate_seconds(entries, args.scale), args.scale)
    rc = 0
    try:
        with signals_raise():  # a killed run tears its emulated cluster down
            for step in ("floor", "emulated"):
                if step in steps:
                    rc = max(rc, run_plan(entries, args.cluster, spec.nodes,
                                          spec.workers_per_node, args.scale, step == "floor",
                                          out / f"plan_{step}.json", args.timeout))
    except Interrupted as exc:
        logger.error("interrupted by signal %d; emulated cluster torn down", exc.signum)
        return 128 + exc.signum
    if "doc" in steps:
        rows = collect(entries)
        png = plot(rows, Path(args.doc).parent / "img" / f"lab_{spec.name}.png") if rows else None
        notes = [f"- {spec.name} {spec.nodes}x{spec.workers_per_node}, layers {', '.join(layers)}"
                 f"; {args.tokens} x 1024 / H tokens per worker instead of the paper's "
                 f"{PAPER_TOKENS} "
                 "(compute and token traffic are both linear in tokens, so R_CC is unchanged; "
                 "shadow broadcasts are not, so shadowing pays less than at 4096); emulator "
                 f"scale {args.scale:g}, D = {1 / args.scale:g}; intra-node bus 'aggregate'."]
        write_section(Path(args.doc), rows, " ".join(["python -m megatron_moe_ext.lab.reproduce",
                                                      *(argv or sys.argv[1:])]), notes, png,
                      spec.name)
    return rc


if __name__ == "__main__":
    raise SystemExit(main())
