#!/usr/bin/env python
"""Time gloo all_to_all_single between the ranks of a torchrun job (e.g. under
scripts/emulate_cluster.py). Rank 0 prints one JSON line and optionally writes it to --json.

    torchrun --nproc-per-node 2 scripts/emulation_probe.py --mb 8 --iters 5

Each rank sends a ``--mb`` MB fp32 tensor split evenly over all ranks (so with 2 ranks, each
rank sends mb/2 MB to the other). Reported: per-iteration seconds (max over ranks), median,
bytes each rank sends to other ranks, and the implied per-rank send rate.
"""

from __future__ import annotations

import argparse
import sys

from megatron_moe_ext.emulation.probe import probe


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--mb", type=float, default=8.0, help="tensor size per rank, MB (1e6 B)")
    parser.add_argument("--iters", type=int, default=5, help="timed iterations")
    parser.add_argument("--warmup", type=int, default=1, help="untimed iterations")
    parser.add_argument("--json", default=None, help="rank 0 writes the result here")
    parser.add_argument("--fail", action="store_true", help="rank 0 exits 1 after the timing "
                        "(to test failure handling)")
    args = parser.parse_args()
    return probe(args.mb, args.iters, args.warmup, args.json, args.fail)


if __name__ == "__main__":
    sys.exit(main())
