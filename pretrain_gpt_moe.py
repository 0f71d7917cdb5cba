#!/usr/bin/env python
"""Pretrain a GPT- or BERT-style MoE model with megatron-core (stock or FasterMoE expert layer).

Launch with torchrun, one process per device:

    torchrun --nproc-per-node 2 pretrain_gpt_moe.py --config configs/gpt_moe_tiny.yaml \
        moe.impl=fastermoe train.iters=50

Everything after the options is a dotted override of the YAML config (key.sub=value).
`--help-config` lists every key with its default and meaning.
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
    p.add_argument("overrides", nargs="*", metavar="key.sub=value", help="config overrides")
    return p


def main(argv: list[str] | None = None) -> int:
    args = _parser().parse_args(argv)
    from megatron_moe_ext.config import ConfigError, field_docs, load_config, to_yaml

    if args.help_config:
        for key, default, doc in field_docs():
            sys.stdout.write(f"{key} = {default!r}\n    {doc}\n")
        return 0
    try:
        cfg = load_config(args.config, args.overrides)
    except ConfigError as exc:
        sys.stderr.write(f"config error: {exc}\n")
        return 2
    if args.print_config:
        sys.stdout.write(to_yaml(cfg))
        return 0
    from megatron_moe_ext.training.loop import run

    try:
        state = run(cfg)
    except ConfigError as exc:
        sys.stderr.write(f"config error: {exc}\n")
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
