"""Command line of the scale lab: ``python -m megatron_moe_ext.lab [options]``.

The option names are scripts/bench_moe_layer.py's (same meaning), plus ``--dilation``,
``--floor``, ``--vary-routing``, ``--record``, ``--prefetch`` and ``--attention``. Under the
emulator (scripts/emulate_cluster.py) ``--cluster`` defaults to the emulated cluster.

Examples::

    python -m megatron_moe_ext.lab --cluster johnny --world-size 16 --floor --experts 16
    scripts/emulate_cluster.py --cluster johnny --scale 0.02 --nodes 2 --workers-per-node 8 \\
        -- -m megatron_moe_ext.lab --experts 16 --tokens 1024 --hidden 1024 --ffn 4096
"""

from __future__ import annotations

import argparse
import sys
from dataclasses import fields

from ..core.popularity import PREDICTORS
from ..core.prefetch import DEFAULT_SLACK
from .run import LabConfig, run_lab
from .setup import default_cluster

__all__ = ["LAB_ONLY", "BENCH_ONLY", "add_lab_arguments", "config_from_args", "main",
           "run_bench_args"]

LAB_ONLY = ("dilation", "floor", "measure_floor", "routing", "gate", "vary_routing", "record",
            "iteration", "model", "layers", "comm_priority", "ddp_bucket_size",
            "grad_reduce_chunk_mb", "grad_scale", "prefetch", "prefetch_slack", "attention")
"""Options that only ``--compute emulated`` uses (their defaults are the lab's)."""
BENCH_ONLY = {"trace_dir": None, "threads": None, "overrides": []}
"""Options of the real-compute benchmark the lab does not have (value = 'not given')."""


def add_lab_arguments(p: argparse.ArgumentParser, with_shared: bool = True) -> None:
    """The lab's options; ``with_shared=False`` adds only those bench_moe_layer.py lacks."""
    if with_shared:
        p.add_argument("--impl", choices=["megatron", "fastermoe", "both"], default="both")
        p.add_argument("--world-size", type=int, default=4,
                       help="processes to spawn (ignored under torchrun)")
        p.add_argument("--tokens", type=int, default=4096, help="tokens per worker, before top-k")
        p.add_argument("--hidden", type=int, default=512)
        p.add_argument("--ffn", type=int, default=1024)
        p.add_argument("--experts", type=int, default=4)
        p.add_argument("--topk", type=int, default=2)
        p.add_argument("--skew", type=float, default=0.0, help="Zipf exponent over experts")
        p.add_argument("--shadow", choices=["never", "predictor", "model", "top_k"],
                       default="never")
        p.add_argument("--shadow-max-experts", type=int, default=1)
        p.add_argument("--group-size", type=int, default=1)
        p.add_argument("--dtype", choices=["fp32", "bf16"], default="fp32")
        p.add_argument("--iters", type=int, default=10)
        p.add_argument("--warmup", type=int, default=2)
        p.add_argument("--json", metavar="PATH")
        p.add_argument("--cluster", default=None,
                       help="cluster YAML or name (default: the emulated cluster under the "
                            "emulator, else johnny)")
        p.add_argument("--seed", type=int, default=1234)
        p.add_argument("--log-level", default="INFO")
    p.add_argument("--dilation", default="auto",
                   help="time dilation D: 'auto' = 1 / emulator link scale under the emulator, "
                        "else 1 (default: %(default)s)")
    p.add_argument("--floor", action="store_true",
                   help="lab floor: emulated compute takes zero time (run with unlimited "
                        "links, i.e. outside the emulator)")
    p.add_argument("--routing", choices=["exact", "scores"], default="exact",
                   help="exact Zipf counts, or top-k of per-token router scores")
    p.add_argument("--gate", action="store_true",
                   help="with --routing scores: the topology-aware gate caps off-node copies")
    p.add_argument("--measure-floor", action="store_true",
                   help="also time each implementation with compute zero in the same "
                        "iterations (the lab's own cost when links are unlimited)")
    p.add_argument("--vary-routing", action="store_true",
                   help="with --skew: the hot experts change from iteration to iteration")
    p.add_argument("--record", action="store_true",
                   help="record plan, expert chunks and shadow sets per iteration in the JSON")
    p.add_argument("--prefetch", choices=list(PREDICTORS), default="none",
                   help="shadow prefetch (moe.fastermoe.shadow.prefetch): also run "
                        "fastermoe_prefetch in the same iterations (default: %(default)s)")
    p.add_argument("--prefetch-slack", type=float, default=DEFAULT_SLACK,
                   help="moe.fastermoe.shadow.prefetch_slack (default: %(default)s)")
    p.add_argument("--attention", action="store_true",
                   help="emulate the block before the layer (attention, router) in every "
                        "timed forward; a prefetched broadcast overlaps it")
    it = p.add_argument_group("iteration mode (--iteration; docs/lina.md, 'Lab iteration mode')")
    it.add_argument("--iteration", action="store_true",
                    help="time whole iterations: L layers of emulated attention / dense compute "
                         "from --model's FLOPs, the MoE exchanges, and the DDP gradient "
                         "reductions of its dense parameters, with and without comm priority")
    it.add_argument("--model", metavar="YAML",
                    help="model config (e.g. configs/models/moe-gpt.yaml); --hidden, --ffn, "
                         "--experts, --topk default to its values")
    it.add_argument("--layers", type=int, default=None,
                    help="transformer layers L of the pipeline (default: the model's)")
    it.add_argument("--comm-priority", choices=["none", "moe_first", "both"], default="both",
                    help="train.comm_priority of the reductions, or both (default: %(default)s)")
    it.add_argument("--ddp-bucket-size", type=int, default=None, metavar="ELEMENTS",
                    help="DDP bucket size (default: Megatron's max(40M, 1M x W))")
    it.add_argument("--grad-reduce-chunk-mb", type=float, default=4.0, metavar="MB",
                    help="moe_first chunk size in cluster MiB (train.grad_reduce_chunk_mb; "
                         "x the grad scale in the lab) (default: %(default)s)")
    it.add_argument("--grad-scale", default="1",
                    help="reduce r x the real gradient elements: a number, or 'tokens' = "
                         "--tokens / the model's micro-batch tokens (default: %(default)s)")


MODEL_SHAPE = ("hidden", "ffn", "experts", "topk")
"""Options that --iteration takes from --model unless given."""


def config_from_args(args: argparse.Namespace, compute: str = "emulated",
                     fallback_cluster: str = "johnny",
                     parser: argparse.ArgumentParser | None = None) -> LabConfig:
    """A validated :class:`LabConfig` from parsed options (unknown attributes are ignored).
    With ``--iteration --model``: H, F, E and k are the model's; one given differently (not at
    ``parser``'s default) is an error."""
    values = {f.name: getattr(args, f.name) for f in fields(LabConfig) if hasattr(args, f.name)}
    values["compute"] = compute
    if values.get("iteration") and values.get("model") and compute == "emulated":
        from .iteration import model_stages

        mcfg, _ = model_stages(values["model"], values.get("layers"))
        shape = {"hidden": mcfg.model.hidden_size,
                 "ffn": mcfg.moe.ffn_hidden_size or mcfg.model.ffn_hidden_size,
                 "experts": mcfg.moe.num_experts, "topk": mcfg.moe.topk}
        for key in MODEL_SHAPE:
            given = parser is not None and values.get(key) != parser.get_default(key)
            if given and values[key] != shape[key]:
                raise ValueError(f"--{key} {values[key]} differs from --model's {shape[key]} "
                                 "(--iteration takes it from the model)")
            values[key] = shape[key]
    cluster = getattr(args, "cluster", None)
    values["cluster"] = cluster or default_cluster(fallback_cluster)
    cfg = LabConfig(**values)
    cfg.validate()
    return cfg


def run_bench_args(parser: argparse.ArgumentParser, args: argparse.Namespace,
                   fallback_cluster: str) -> int:
    """scripts/bench_moe_layer.py ``--compute emulated``: the bench's parsed options (plus
    :func:`add_lab_arguments` with ``with_shared=False``) run as a lab benchmark. A bench
    option the lab does not implement is an error, never silently ignored."""
    given = [k for k, unset in BENCH_ONLY.items() if getattr(args, k, unset) != unset]
    if given:
        parser.error(f"--compute emulated does not support --{given[0].replace('_', '-')}")
    try:
        cfg = config_from_args(args, compute="emulated", fallback_cluster=fallback_cluster,
                               parser=parser)
    except ValueError as exc:
        parser.error(str(exc))
    return run_lab(cfg)


def check_real(parser: argparse.ArgumentParser, args: argparse.Namespace) -> None:
    """With ``--compute real``: the lab-only options must be at their defaults."""
    defaults = {a.dest: a.default for a in parser._actions if a.dest in LAB_ONLY}
    for key in LAB_ONLY:
        if key in defaults and getattr(args, key) != defaults[key]:
            parser.error(f"--{key.replace('_', '-')} needs --compute emulated")


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(prog="python -m megatron_moe_ext.lab",
                                description=__doc__.split("\n\n")[0],
                                formatter_class=argparse.RawDescriptionHelpFormatter)
    add_lab_arguments(p)
    p.add_argument("--compute", choices=["emulated", "real"], default="emulated",
                   help="emulated accelerator, or a small real expert on the CPU")
    args = p.parse_args(argv)
    try:
        cfg = config_from_args(args, compute=args.compute, parser=p)
    except ValueError as exc:
        p.error(str(exc))
    return run_lab(cfg)


if __name__ == "__main__":
    sys.exit(main())
