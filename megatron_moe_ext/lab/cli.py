"""Command line of the scale lab: ``python -m megatron_moe_ext.lab [options]``.

The option names are scripts/bench_moe_layer.py's (same meaning), plus ``--dilation``,
``--floor``, ``--vary-routing`` and ``--record``. Under the emulator
(scripts/emulate_cluster.py) ``--cluster`` defaults to the emulated cluster.

Examples::

    python -m megatron_moe_ext.lab --cluster johnny --world-size 16 --floor --experts 16
    scripts/emulate_cluster.py --cluster johnny --scale 0.02 --nodes 2 --workers-per-node 8 \\
        -- -m megatron_moe_ext.lab --experts 16 --tokens 1024 --hidden 1024 --ffn 4096
"""

from __future__ import annotations

import argparse
import sys
from dataclasses import fields

from .run import LabConfig, run_lab
from .setup import default_cluster

__all__ = ["add_lab_arguments", "config_from_args", "main"]


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


def config_from_args(args: argparse.Namespace, compute: str = "emulated",
                     fallback_cluster: str = "johnny") -> LabConfig:
    """A validated :class:`LabConfig` from parsed options (unknown attributes are ignored)."""
    values = {f.name: getattr(args, f.name) for f in fields(LabConfig) if hasattr(args, f.name)}
    values["compute"] = compute
    cluster = getattr(args, "cluster", None)
    values["cluster"] = cluster or default_cluster(fallback_cluster)
    cfg = LabConfig(**values)
    cfg.validate()
    return cfg


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(prog="python -m megatron_moe_ext.lab",
                                description=__doc__.split("\n\n")[0],
                                formatter_class=argparse.RawDescriptionHelpFormatter)
    add_lab_arguments(p)
    p.add_argument("--compute", choices=["emulated", "real"], default="emulated",
                   help="emulated accelerator, or a small real expert on the CPU")
    args = p.parse_args(argv)
    try:
        cfg = config_from_args(args, compute=args.compute)
    except ValueError as exc:
        p.error(str(exc))
    return run_lab(cfg)


if __name__ == "__main__":
    sys.exit(main())
