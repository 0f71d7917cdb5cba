#!/usr/bin/env python
r"""Pretrain a GPT- or BERT-style MoE model with megatron-core (stock or FasterMoE expert layer).

Launch with torchrun, one process per device:

    torchrun --nproc-per-node 2 pretrain_gpt_moe.py --config configs/gpt_moe_tiny.yaml \
        moe.impl=fastermoe train.iters=50

Everything after the options is a dotted override of the YAML config (key.sub=value).
`--megatron-args "..."` / `--megatron-args-file PATH` take Megatron-LM flags (docs/megatron_lm.md);
the dotted overrides win over them.
`--help-config` lists every key with its default and meaning.
`--describe [--cluster johnny]` prints size, FLOPs, memory and predicted speed without training.
"""

from __future__ import annotations

import argparse
import sys


def _parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    p.add_argument("--config", help="YAML config file (see configs/)")
    p.add_argument("--help-config", action="store_true", help="list every config key and exit")
    p.add_argument(
        "--print-config", action="store_true", help="print the resolved config and exit"
    )
    p.add_argument(
        "--describe", action="store_true",
        help="print parameters, FLOPs, memory per GPU (and, with --cluster, the predicted MoE "
        "layer time) without training; no torchrun needed",
    )
    p.add_argument("--cluster", metavar="NAME_OR_PATH",
                   help="with --describe: cluster (configs/clusters/NAME.yaml or a YAML path)")
    p.add_argument("--world-size", type=int, metavar="N",
                   help="with --describe: world size (default: env WORLD_SIZE, else the smallest "
                   "that fits parallel.tensor x pipeline x expert)")
    p.add_argument("--json", metavar="PATH", help="with --describe: also write the description as JSON")
    p.add_argument(
        "--megatron-args", metavar="FLAGS", default="",
        help='Megatron-LM flags, quoted ("--num-layers 4 --lr 3e-4 --bf16"), translated into '
        "config overrides (after the YAML, before the dotted overrides); docs/megatron_lm.md",
    )
    p.add_argument("--megatron-args-file", metavar="PATH",
                   help="a file of Megatron-LM flags (read before --megatron-args)")
    p.add_argument("--plan-layout", nargs="?", const=True, default=None, metavar="TRACE",
                   help="with --describe --cluster: rank expert-parallel layouts (Aristos "
                        "objective); TRACE (run dir or routing trace) replaces balanced routing")
    p.add_argument("overrides", nargs="*", metavar="key.sub=value", help="config overrides")
    return p


def _describe(cfg, args: argparse.Namespace) -> int:
    """--describe: print (and optionally write as JSON) megatron_moe_ext.describe's summary."""
    import json
    from pathlib import Path

    from megatron_moe_ext.config import ConfigError
    from megatron_moe_ext.describe import describe, env_world_size, format_description
    from megatron_moe_ext.perf.topology import ClusterSpecError

    try:
        d = describe(cfg, args.world_size or env_world_size(), args.cluster)
    except (ConfigError, ClusterSpecError) as exc:
        sys.stderr.write(f"config error: {exc}\n")
        return 2
    sys.stdout.write(format_description(d))
    if args.json:
        out = Path(args.json)
        out.parent.mkdir(parents=True, exist_ok=True)
        out.write_text(json.dumps(d, indent=2) + "\n")
    if args.plan_layout:
        from megatron_moe_ext.traffic.planner import plan_layout_cli
        return plan_layout_cli(cfg, args.cluster, args.world_size, args.plan_layout, args.json)
    return 0


def _megatron_overrides(args: argparse.Namespace) -> list[str]:
    """--megatron-args-file then --megatron-args, translated (raises ConfigError)."""
    from megatron_moe_ext import megatron_lm_args as mla

    flags = mla.read_args_file(args.megatron_args_file) if args.megatron_args_file else []
    return mla.translate([*flags, *mla.split_args(args.megatron_args)])


def main(argv: list[str] | None = None) -> int:
    args = _parser().parse_args(argv)
    from megatron_moe_ext.runtime.device import quiet_known_warnings

    quiet_known_warnings()
    from megatron_moe_ext.config import ConfigError, field_docs, load_config, to_yaml

    if args.help_config:
        for key, default, doc in field_docs():
            sys.stdout.write(f"{key} = {default!r}\n    {doc}\n")
        return 0
    try:
        cfg = load_config(args.config, [*_megatron_overrides(args), *args.overrides])
    except ConfigError as exc:
        sys.stderr.write(f"config error: {exc}\n")
        return 2
    if args.print_config:
        sys.stdout.write(to_yaml(cfg))
        return 0
    if args.describe:
        return _describe(cfg, args)
    if args.json or args.cluster or args.world_size or args.plan_layout:
        sys.stderr.write("--json, --cluster, --world-size and --plan-layout only apply with "
                         "--describe\n")
        return 2
    from megatron_moe_ext.megatron.versions import UnsupportedMegatronCore
    from megatron_moe_ext.training.loop import run

    try:
        state = run(cfg)
    except ConfigError as exc:
        sys.stderr.write(f"config error: {exc}\n")
        return 2
    except UnsupportedMegatronCore as exc:
        sys.stderr.write(f"error: {exc}\n")
        return 2
    if state.losses:
        import logging

        logging.getLogger("pretrain").info(
            "done: iteration %d, loss %.4f; metrics in %s; checkpoints in %s",
            state.iteration, state.losses[-1][1],
            cfg.logging.metrics_file or f"{cfg.logging.dir}/metrics.jsonl",
            cfg.checkpoint.save or "(not saved)",
        )
    return 0


if __name__ == "__main__":
    sys.exit(main())
