"""The reproduction report of ``scripts/reproduce_paper.py``: variants, the paper's figures,
per-run summaries, the issue's targets, plots and the Markdown page (docs/reproduction.md).

Pure Python + matplotlib; the script runs the benchmarks and hands their JSONs here. Speedups
are stock Megatron time / FasterMoE time of the same run; ``pred`` is the performance model's.
"""

from __future__ import annotations

import os
from pathlib import Path

from megatron_moe_ext.bench.stats import r_squared

# name, description, bench args, extra --set overrides
VARIANTS = [
    ("schedule", "smart schedule only (shadow never, g=1)",
     ["--shadow", "never", "--group-size", "1"], []),
    ("shadow", "shadowing only (shadow predictor, g=2 = one step, no overlap)",
     ["--shadow", "predictor", "--group-size", "2"], []),
    ("both", "schedule + shadowing (shadow predictor, g=1)",
     ["--shadow", "predictor", "--group-size", "1"], []),
    ("both-model", "schedule + shadowing judged by the full model (shadow model, g=1)",
     ["--shadow", "model", "--group-size", "1"], []),
    ("both+gate", "schedule + shadowing + topology gate (johnny f=0.071)",
     ["--shadow", "predictor", "--group-size", "1"],
     ["moe.router.type=topology_aware", "moe.router.cluster=johnny",
      "moe.router.workers_per_node=1"]),
]

# the paper's figures (docs: /work/shared/reference/fastermoe-paper-facts.md)
PAPER = {
    "schedule": 1.40, "shadow": 1.95, "both": 2.20, "both-model": 2.20,
    "gate": 1609.0 / 1471.0,  # per-iteration time w/o vs w/ gate (Table 3): 9.4 %
}
TABLE3 = [  # system, time to loss 4.0 (h), iterations (k), ms / iteration
    ("GShard", 8.58, 30.9, 1000), ("BASE Layer", 13.7, 21.0, 2355),
    ("FastMoE", 7.19, 12.2, 2117), ("FasterMoE w/o topo gate", 5.81, 13.0, 1609),
    ("FasterMoE w/ topo gate", 6.25, 15.3, 1471),
]


SWEEP_SCALES = (0.005, 0.01, 0.02, 0.04)
"""Link scales of the prediction-vs-measurement sweep (NIC 250 Mbit/s .. 2 Gbit/s)."""

TARGET_GAIN_FRACTION = 0.8
"""Issue target: the schedule gets >= 80 % of the gain its model predicts."""
TARGET_R2 = 0.9
"""Issue target: R^2 of predicted vs measured layer time over the link-rate sweep."""


def gain_fraction(measured: float | None, predicted: float | None) -> float | None:
    """(measured speedup - 1) / (predicted speedup - 1): share of the predicted gain achieved."""
    if measured is None or predicted is None or abs(predicted - 1.0) < 1e-9:
        return None
    return (measured - 1.0) / (predicted - 1.0)



def ratio(a, b):
    try:
        return a / b if a and b else None
    except TypeError:
        return None


def f2(x, nd=2):
    return "–" if x is None else f"{x:.{nd}f}"


def summarize(r: dict) -> dict:
    m, f = r["impls"]["megatron"], r["impls"]["fastermoe"]
    rt = r["routing"]
    pred = r.get("prediction", {})
    return {
        "m_wall": m["fwd_bwd_s"], "f_wall": f["fwd_bwd_s"],
        "m_cpu": m.get("cpu_fwd_bwd_s"), "f_cpu": f.get("cpu_fwd_bwd_s"),
        "m_pred": m.get("predicted_fwd_bwd_s"), "f_pred": f.get("predicted_fwd_bwd_s"),
        "wall": r.get("ratio_fwd_bwd"), "paired": r.get("ratio_fwd_bwd_paired"),
        "min": r.get("ratio_fwd_bwd_min"), "cpu": r.get("ratio_cpu_fwd_bwd"),
        "pred": ratio(m.get("predicted_fwd_bwd_s"), f.get("predicted_fwd_bwd_s")),
        "shadows": r.get("shadows"), "remote": rt.get("remote_fraction"),
        "worker_loads": rt.get("worker_loads"), "worker_matrix": rt.get("worker_matrix"),
        "a2a": r.get("overlap", {}).get("alltoall_s"),
        "cf": r.get("overlap", {}).get("expert_fwd_s"),
        "cb": r.get("overlap", {}).get("expert_bwd_s"),
        "bound": r.get("overlap", {}).get("bound"),
        "r_cc_pred": (pred.get("megatron") or {}).get("comp_s"),
        "pred_m": pred.get("megatron") or {}, "pred_f": pred.get("fastermoe") or {},
        "load": (r.get("machine", {}).get("loadavg_1min_start"),
                 r.get("machine", {}).get("loadavg_1min")),
        "maxdiff": r.get("max_rel_diff_out"),
    }


# ----------------------------------------------------------------------------- report
def make_png(results: dict, skews, png: Path) -> None:
    import matplotlib
    matplotlib.use("Agg")
    import matplotlib.pyplot as plt
    import numpy as np

    names = [v[0] for v in VARIANTS]
    fig, axes = plt.subplots(1, len(skews), figsize=(5.2 * len(skews), 3.6), sharey=True)
    if len(skews) == 1:
        axes = [axes]
    series = [("wall", "measured (wall)"), ("cpu", "measured (CPU time)"),
              ("pred", "model prediction"), ("paper", "paper")]
    x = np.arange(len(names))
    w = 0.2
    for ax, skew in zip(axes, skews):
        for i, (key, label) in enumerate(series):
            vals = []
            for n in names:
                s = results.get((skew, n))
                if key == "paper":
                    vals.append(PAPER["both"] * PAPER["gate"] if n == "both+gate"
                                else PAPER.get(n, 0.0))
                else:
                    vals.append((s or {}).get(key) or 0.0)
            ax.bar(x + (i - 1.5) * w, vals, w, label=label)
        ax.axhline(1.0, color="k", lw=0.8)
        ax.set_xticks(x, names, fontsize=8)
        ax.set_title(f"skew {skew}: speedup over stock Megatron", fontsize=9)
    axes[0].set_ylabel("fwd+bwd speedup (x)")
    axes[0].legend(fontsize=7, loc="upper left")
    fig.tight_layout()
    png.parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(png, dpi=80)
    plt.close(fig)


def make_sweep_png(sweep: dict, png: Path) -> None:
    """Predicted vs measured fwd+bwd layer time over the link-rate sweep, both layers."""
    import matplotlib
    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, ax = plt.subplots(figsize=(4.6, 4.2))
    hi = 0.0
    for key, label, marker in (("m", "stock Megatron", "o"), ("f", "FasterMoE (schedule)", "s")):
        xs = [sweep[sc][f"{key}_pred"] * 1e3 for sc in sorted(sweep) if sweep[sc][f"{key}_pred"]]
        ys = [sweep[sc][f"{key}_wall"] * 1e3 for sc in sorted(sweep) if sweep[sc][f"{key}_pred"]]
        ax.scatter(xs, ys, marker=marker, label=label)
        for sc, x, y in zip(sorted(sweep), xs, ys):
            ax.annotate(f"{sc * 50e3:.0f} Mb/s", (x, y), fontsize=6, xytext=(3, -8),
                        textcoords="offset points")
        hi = max([hi, *xs, *ys])
    ax.plot([0, hi * 1.1], [0, hi * 1.1], "k--", lw=0.8, label="measured = predicted")
    ax.set_xlabel("predicted fwd+bwd (ms)")
    ax.set_ylabel("measured fwd+bwd (ms, wall)")
    ax.set_title("johnny replica, balanced routing: link-rate sweep", fontsize=9)
    ax.legend(fontsize=7)
    fig.tight_layout()
    png.parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(png, dpi=80)
    plt.close(fig)


def sweep_r2(sweep: dict) -> float | None:
    """R^2 of measured vs predicted fwd+bwd over the sweep, both implementations pooled."""
    pred, meas = [], []
    for s in sweep.values():
        for k in ("m", "f"):
            pred.append(s[f"{k}_pred"])
            meas.append(s[f"{k}_wall"])
    return r_squared(meas, pred, min_points=3)


def target_lines(args, results: dict, sweep: dict) -> list[str]:
    """The issue's three targets, each with the measured figures and met / not met."""
    verdict = lambda ok: "**met**" if ok else "**not met**"  # noqa: E731
    L = ["## Targets\n"]
    s = results.get((0.0, "schedule"))
    if s:
        gf = gain_fraction(s["wall"], s["pred"])
        gfp = gain_fraction(s["paired"], s["pred"])
        rcc = (s["cf"] + s["cb"]) / (4 * s["a2a"]) if s["a2a"] and s["cf"] is not None else None
        ok = s["wall"] is not None and s["wall"] > 1.0 and gf is not None and \
            gf >= TARGET_GAIN_FRACTION
        L.append(
            f"- **Smart schedule, balanced, 2 nodes x 1 worker, scale {args.scale}** "
            f"(measured R_CC = comp / 4A = {f2(rcc)}): stock {s['m_wall'] * 1e3:.0f} ms, "
            f"FasterMoE {s['f_wall'] * 1e3:.0f} ms, speedup {f2(s['wall'])} measured vs "
            f"{f2(s['pred'])} predicted: {f2(gf)} of the predicted gain (speedup - 1; "
            f"paired per-iteration ratio {f2(s['paired'])}: {f2(gfp)}); measured / predicted "
            f"speedup = {f2(ratio(s['wall'], s['pred']))}. Target (faster, >= "
            f"{TARGET_GAIN_FRACTION:.0%} of the predicted gain): {verdict(ok)}.")
    else:
        L.append("- Smart schedule, balanced: not run.")
    r2 = sweep_r2(sweep) if sweep else None
    if sweep:
        L.append(f"- **Predicted vs measured layer time over {len(sweep)} link rates** "
                 f"({', '.join(f'{sc * 50e3:.0f}' for sc in sorted(sweep))} Mbit/s; stock and "
                 f"FasterMoE, {2 * len(sweep)} points): R^2 = {f2(r2, 3)}. Target (>= "
                 f"{len(SWEEP_SCALES) - 1} rates, R^2 >= {TARGET_R2}): "
                 f"{verdict(len(sweep) >= 3 and r2 is not None and r2 >= TARGET_R2)}.")
    else:
        L.append("- Link-rate sweep: not run.")
    gates = []
    for skew in args.skews:
        a, b = results.get((skew, "both")), results.get((skew, "both+gate"))
        if a and b:
            gates.append((skew, a, b))
    if gates:
        for skew, a, b in gates:
            ok = (b["remote"] or 0) < (a["remote"] or 0) and b["f_wall"] < a["f_wall"]
            L.append(
                f"- **Topology gate, skew {skew}**: off-node fraction of routed tokens "
                f"{f2(a['remote'], 3)} -> {f2(b['remote'], 3)}, FasterMoE layer time "
                f"{a['f_wall'] * 1e3:.0f} -> {b['f_wall'] * 1e3:.0f} ms "
                f"({(1 - b['f_wall'] / a['f_wall']) * 100:.0f} % less; stock Megatron "
                f"{a['m_wall'] * 1e3:.0f} -> {b['m_wall'] * 1e3:.0f} ms). Target (both fall): "
                f"{verdict(ok)}.")
    else:
        L.append("- Topology gate: not run.")
    L.append("")
    return L


def calibration_lines(cal: dict | None, results: dict) -> list[str]:
    """The calibration-under-emulation section: recovered rates and the predictions made
    from the calibrated cluster file next to those from the constructed replica file."""
    if not cal:
        return []
    inter = cal["measured"].get("inter") or {}
    emu = cal["emulated_gbps"]
    L = ["## Calibration under emulation\n",
         f"`scripts/calibrate.py` ran inside the emulator (2 nodes x 1 worker) and wrote "
         f"`{Path(cal['yaml']).name}` (in the runs directory):\n",
         "| what | measured | emulated / described | ratio |", "|---|---|---|---|"]
    for key, label in (("pingpong_gbps", "NIC ping-pong (written)"),
                       ("exchange_gbps", "NIC exchange, each way")):
        if inter.get(key):
            L.append(f"| {label}, Gbit/s | {inter[key]:.3f} | {emu:.3f} | "
                     f"{inter[key] / emu:.2f} |")
    L.append(f"| expert MLP fp32, TFLOP/s (CPU clock) | {cal['gemm_fp32']:.4f} | – | – |")
    L.append(f"\nWritten `duplex: {cal['duplex']}` (exchange / ping-pong = "
             + (f"{inter['exchange_gbps'] / inter['pingpong_gbps']:.2f}" if inter.get(
                 "pingpong_gbps") else "–") + "; half below 0.7).\n")
    b, r = cal.get("bench"), results.get((0.0, "schedule"))
    if b:
        L.append("Balanced routing, smart schedule, predictions from the calibrated file (this "
                 "run) and from the constructed replica file (the `schedule` row above):\n")
        L.append("| cluster file | stock pred / meas ms | FasterMoE pred / meas ms | "
                 "speedup pred / meas |")
        L.append("|---|---|---|---|")
        for name, t in (("calibrated", b), ("replica (local-cpu compute)", r)):
            if t:
                L.append(f"| {name} | {t['m_pred'] * 1e3:.0f} / {t['m_wall'] * 1e3:.0f} | "
                         f"{t['f_pred'] * 1e3:.0f} / {t['f_wall'] * 1e3:.0f} | "
                         f"{f2(t['pred'])} / {f2(t['wall'])} |")
        L.append("")
    return L


def _runs(results: dict, skews):
    """(skew, variant, summary or None) in report order."""
    for skew in skews:
        for n, _, _, _ in VARIANTS:
            yield skew, n, results.get((skew, n))


def write_report(args, sizes, results, meta, out: Path, png: Path) -> None:
    L = []
    L.append("# Reproducing FasterMoE's speedups on an emulated johnny replica\n")
    when = (f"rebuilt with --report-only on {meta['date']} from the JSONs of a run measured "
            f"{meta.get('measured')}"
            if args.report_only else
            f"on {meta['date']} (total {meta['elapsed_s'] / 60:.1f} min)")
    runs = Path(args.runs_dir).resolve()
    shown = os.path.relpath(runs, out.parent) if runs.is_relative_to(out.parent.parent) else runs
    L.append(f"Generated by `{meta['command']}` {when}. Raw JSONs and the cluster files used: "
             f"[`{shown}`]({shown}).\n")
    L.append("## Setup\n")
    L.append(f"- Machine: {meta['machine']}. torch threads per worker: 1 (the emulator sets "
             "OMP_NUM_THREADS=1, which the runtime honours).")
    L.append("- **Cores:** 2 worker processes on 2 cores (one per core, so the GEMMs are not "
             "oversubscribed), each in its own network namespace; but gloo's transfer threads "
             "and the kernel's TCP / tbf work have "
             "no core of their own and take time from the GEMMs while a transfer is in flight "
             "(about 8 % measured, docs/emulation.md). Other jobs may share the cores too: the "
             "1-min load is recorded per run below; this script waited while it was above "
             f"{args.max_load} (at most {args.max_wait:.0f} s per run).")
    L.append(f"- Replica: johnny (`configs/clusters/johnny.yaml`), 2 nodes x 1 worker, "
             f"`--scale {args.scale}` (explicit; `auto` is noisy under load).")
    for name, kind, cg, mbit in meta["links"]:
        L.append(f"  - {name} ({kind}): {cg:g} Gb/s in johnny -> **{mbit:.0f} Mbit/s** "
                 "each direction in the replica")
    L.append("  - With 1 worker per node there is no intra-node traffic, so PCIe (88 Gb/s -> "
             f"{88e3 * args.scale:.0f} Mbit/s) is not exercised; each worker gets the whole "
             "NIC, as 1 of 8 johnny workers never would.")
    L.append(f"- Layer: {sizes['tokens']} tokens/rank, H={sizes['hidden']}, "
             f"ffn={sizes['ffn']} (alpha={sizes['ffn'] / sizes['hidden']:g}, as the paper), "
             f"{sizes['experts']} experts (2 per rank), top-{sizes['topk']}, fp32, "
             f"{sizes['iters']} timed iterations after {sizes['warmup']} warm-up; skews "
             f"{', '.join(str(s) for s in args.skews)} (Zipf exponent over experts).")
    L.append("- Prediction: `perf.model.predict_layer` via the bench, on a replica cluster file "
             "(local-cpu.yaml's calibrated CPU-clock compute rates, NIC "
             f"{meta['nic_gbps'] * 1e3:.0f} Mbit/s, `duplex: half` because gloo moves the two "
             "directions of a worker pair one after the other); the shadow predictor uses the "
             "same file.")
    if meta.get("rcc"):
        L.append("- Compute / communication of the replica (stock Megatron, balanced run): "
                 + meta["rcc"])
    L.append("")
    L.append("Variants (FasterMoE layer; the stock Megatron layer is timed in the same run):\n")
    for n, d, _, _ in VARIANTS:
        L.append(f"- `{n}`: {d}")
    L.append("\nShadowing cannot be switched on without the exchange of our layer; `shadow` uses "
             "g=2, i.e. one exchange step for EP=2, so nothing is pipelined (schedule-off in "
             "effect, though the exchange code path is still FasterMoE's). The gate lives in the "
             "router, which both layers share, so in `both+gate` stock Megatron is gated too; the "
             "gate's own gain is FasterMoE `both` / FasterMoE `both+gate` (two separate runs).\n")

    L.extend(target_lines(args, results, meta.get("sweep") or {}))
    L.append("## Results\n")
    L.append("Speedup = stock Megatron fwd+bwd / FasterMoE fwd+bwd in the same run "
             "(wall = median of per-iteration max-rank times; CPU = process CPU time; "
             "pred = model). "
             "Times in ms (wall).\n")
    L.append("| skew | variant | stock ms | FasterMoE ms | speedup wall | paired | CPU | "
             "pred | paper | shadows chosen | remote frac. | load start→end |")
    L.append("|---|---|---|---|---|---|---|---|---|---|---|---|")
    for skew, n, s in _runs(results, args.skews):
        paper = (f"{PAPER[n]:.2f}" if n in PAPER
                 else f"{PAPER['both'] * PAPER['gate']:.2f} (2.20 x 1.094)")
        if not s:
            L.append(f"| {skew} | {n} | not run | | | | | | {paper} | | | |")
            continue
        ld = s["load"]
        L.append(
            f"| {skew} | {n} | {s['m_wall'] * 1e3:.0f} | {s['f_wall'] * 1e3:.0f} | "
            f"**{f2(s['wall'])}** | {f2(s['paired'])} | {f2(s['cpu'])} | {f2(s['pred'])} | "
            f"{paper} | {s['shadows']} | {f2(s['remote'], 3)} | "
            f"{f2(ld[0], 1)}→{f2(ld[1], 1)} |")
    L.append("")
    L.append("Gate (paper: 9.4 % faster per iteration, 1609 → 1471 ms, Table 3):\n")
    L.append("| skew | FasterMoE both ms | both+gate ms | gate gain wall | CPU | pred | "
             "stock→stock gated (wall) | remote frac. before → after |")
    L.append("|---|---|---|---|---|---|---|---|")
    for skew in args.skews:
        a, b = results.get((skew, "both")), results.get((skew, "both+gate"))
        if not a or not b:
            L.append(f"| {skew} | – | – | – | – | – | – | – |")
            continue
        L.append(f"| {skew} | {a['f_wall'] * 1e3:.0f} | {b['f_wall'] * 1e3:.0f} | "
                 f"{f2(ratio(a['f_wall'], b['f_wall']))} | {f2(ratio(a['f_cpu'], b['f_cpu']))} | "
                 f"{f2(ratio(a['f_pred'], b['f_pred']))} | "
                 f"{f2(ratio(a['m_wall'], b['m_wall']))} | "
                 f"{f2(a['remote'], 3)} → {f2(b['remote'], 3)} |")
    L.append("")
    L.append("Paper, Table 3 (MoE-GPT on johnny, time to LM loss 4.0):\n")
    L.append("| system | time (h) | iterations (k) | ms / iteration |")
    L.append("|---|---|---|---|")
    for row in TABLE3:
        L.append(f"| {row[0]} | {row[1]} | {row[2]} | {row[3]} |")
    L.append("")
    L.append("Per-run details (alone: one all-to-all A, expert fwd / bwd; routing worker loads):\n")
    L.append("| skew | variant | A ms | C fwd / bwd ms | overlap bound | worker loads | "
             "pred stock / FasterMoE ms | max rel diff out |")
    L.append("|---|---|---|---|---|---|---|---|")
    for skew, n, s in _runs(results, args.skews):
        if not s:
            continue
        ms = lambda v: "–" if v is None else f"{v * 1e3:.1f}"  # noqa: E731
        L.append(f"| {skew} | {n} | {ms(s['a2a'])} | {ms(s['cf'])} / {ms(s['cb'])} | "
                 f"{f2(s['bound'], 3)} | {s['worker_loads']} | "
                 f"{ms(s['m_pred'])} / {ms(s['f_pred'])} | "
                 + ("–" if s["maxdiff"] is None else format(s["maxdiff"], ".1e")) + " |")
    L.append("")
    L.append(f"![speedups]({os.path.relpath(png, out.parent)})\n")
    L.extend(calibration_lines(meta.get("calibrated"), results))
    sweep = meta.get("sweep") or {}
    if sweep:
        L.append("## Link-rate sweep: predicted vs measured\n")
        L.append("Balanced routing, smart schedule only (g=1), the same layer at each NIC rate of "
                 "the replica (scale x 50 Gb/s); prediction from a replica file per rate.\n")
        L.append("| scale | NIC Mbit/s | A ms | R_CC meas. | stock pred / meas ms | FasterMoE "
                 "pred / meas ms | speedup pred / meas | gain fraction |")
        L.append("|---|---|---|---|---|---|---|---|")
        for sc in sorted(sweep):
            t = sweep[sc]
            rcc = ((t["cf"] + t["cb"]) / (4 * t["a2a"])
                   if t["a2a"] and t["cf"] is not None else None)
            ms = lambda v: "–" if v is None else f"{v * 1e3:.0f}"  # noqa: E731
            L.append(f"| {sc:g} | {sc * 50e3:.0f} | {ms(t['a2a'])} | {f2(rcc)} | "
                     f"{ms(t['m_pred'])} / {ms(t['m_wall'])} | {ms(t['f_pred'])} / "
                     f"{ms(t['f_wall'])} | {f2(t['pred'])} / {f2(t['wall'])} | "
                     f"{f2(gain_fraction(t['wall'], t['pred']))} |")
        L.append(f"\nR^2 (both layers, {2 * len(sweep)} points) = {f2(sweep_r2(sweep), 3)}.\n")
        sweep_png = png.with_name(png.stem + "_sweep.png")
        L.append(f"![sweep]({os.path.relpath(sweep_png, out.parent)})\n")
    L.append("## What could not be reproduced at this scale, and why\n")
    L.extend(meta["limits"])
    if meta.get("failures"):
        L.append("\n## Failed runs\n")
        for f in meta["failures"]:
            L.append(f"- {f}")
    out.parent.mkdir(parents=True, exist_ok=True)
    out.write_text("\n".join(L) + "\n")


LIMITS = [
    "- **Scale of the system.** The paper's figures are end-to-end training iterations of "
    "MoE-GPT (12 layers, H=2048, 16 experts) on 16 V100s; here it is one MoE layer, EP=2, "
    "H=768, on 2 CPU processes. Only the MoE layer's fwd+bwd is timed: no attention, no "
    "data-parallel all-reduce, no optimizer, so the speedups are per layer, not per iteration.",
    "- **Two workers, one per node.** The smart schedule's pipelining needs many groups "
    "(the paper: 8 groups of 2); with EP=2 and g=1 there are only 2 steps (local, then the "
    "single remote one), so only the local step's compute can hide the remote send; the "
    "remote step's return is never hidden. The paper's 1.40x comes from 8 steps.",
    "- **Shared cores.** One torch thread per worker and one worker per core, but gloo's "
    "transfer threads and the kernel's TCP / tbf work run on the same 2 cores: a GEMM slows "
    "by about 8 % while a transfer is in flight (docs/emulation.md), which the model does not "
    "charge. Wall times also move with other jobs' load (recorded per run).",
    "- **gloo is half duplex per worker pair.** gloo moves the two directions of a pair one "
    "after the other (raw TCP between the same namespaces overlaps them, docs/emulation.md), "
    "so an EP=2 all-to-all costs both directions' bytes over one NIC rate. The replica's "
    "cluster file says `duplex: half` and the model charges exactly that; on a real cluster "
    "(NCCL, full duplex) the same layer would see half the communication time, so the "
    "replica's R_CC at a given scale is half the cluster's, and the sizes were chosen for "
    "R_CC ~1 under gloo. It is a race, not a rule: in some runs gloo's all-to-all overlapped "
    "the directions part of the time (A = 77 ms instead of 102 ms at 500 Mbit/s), which moves "
    "the measured R_CC between ~0.8 and ~1.2 from run to run.",
    "- **Run-to-run spread, and overheads the model does not charge.** Three full runs gave "
    "0.93, 0.89 and 1.08 of the predicted gain at 500 Mbit/s. A gain fraction above 1 (up to "
    "1.7 at 250 Mbit/s) means FasterMoE's exchange overlapped the two directions part of the "
    "time, beating the half-duplex model (the gloo race above). Usually FasterMoE's measured "
    "time exceeds its prediction by 10-60 ms: one expert call and one nested autograd.grad "
    "per chunk and step, plus the ~8 % GEMM slow-down while a transfer is in flight. When "
    "communication is cheap (1-2 Gbit/s, R_CC > 1.5) the predicted gain is small, and that "
    "overhead takes a large share of it (gain fraction 0.3-0.8 there). The 80 % target is for "
    "R_CC between 0.5 and 2.",
    "- **Shadowing vs skew.** The paper's 1.95x comes from real MoE-GPT routing over "
    "16 experts where a few experts are very hot; with 4 experts, top-2 and Zipf 1.5 the hot "
    "worker has ~1.5x the mean load, so the balance bound (what perfect balancing could give) "
    "is far lower than in the paper. Shadowing an expert also costs a broadcast of its "
    "2·H·ffn parameters and a reduce of their gradients over the slow replica NIC.",
    "- **Algorithm 1 decides with the synchronous formula.** The `predictor` policy is the "
    "paper's Algorithm 1: it compares Lat_imbl = 3 C + 4 A of the hottest worker with and "
    "without shadows, i.e. as if no communication were hidden. Under the smart schedule part of "
    "the all-to-all is already hidden, while the shadow's weight broadcast and gradient reduce "
    "(2·H·ffn fp32 = 9.4 MB each way here) are not, so the policy can shadow when the full model "
    "(the same one that predicts the `pred` column) says it does not pay: at skew 1.5 it "
    "shadowed expert 0 with a predicted FasterMoE time above the unshadowed one.",
    "- **Shadowing cannot be isolated from our exchange.** `shadow` = shadow predictor with "
    "g=2 (no pipelining); it still uses FasterMoE's exchange, not Megatron's dispatcher.",
    "- **Topology gate.** The paper's 9.4 % is a per-iteration time with 8 workers sharing "
    "one NIC (f = W_net / (M W_local) = 0.071); with 1 worker per node the NIC is not shared, "
    "so the same f over-restricts (the paper's rule would give 50/88 = 0.57 with M=1, which "
    "would not bind at balanced routing, 0.5 remote). Here the slow inter-node link is the "
    "NIC and the fast intra-node one is the worker's own memory. The gate changes the expert "
    "selection; the paper pays for it with 18 % more iterations to the same loss (Table 3: "
    "6.25 h vs 5.81 h to loss 4.0). Convergence is not measured here, only layer time.",
    "- **Not reproduced at all:** time-to-loss (Table 3 hours / iterations), the 1.97x best "
    "iteration, the 19 % of experts shadowed on average, trevor (64 GPUs), 2 x 2 replicas "
    "(4 workers on 2 cores would halve every worker's compute), GPU kernels (fp16 tensor "
    "cores), and latency (netem is not available in this kernel).",
]
