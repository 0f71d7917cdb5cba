#!/usr/bin/env python
"""Compare training runs from their metrics files (JSON lines written by the training loop).

Each run is a ``metrics.jsonl`` file or a run folder holding one. Training records carry
``iteration``, ``loss``, ``lr``, ``iter_time_s`` (mean over the logging window) and
``tokens_per_s``; validation records carry ``val_*`` keys and no ``loss``.

Prints two tables: speed (median iteration time and tokens/s, speedup relative to the first run,
last training and validation loss) and the training loss at matching iterations (the last
iteration every run logged, plus a few evenly spaced common ones). With ``--out`` it also writes
a PNG with loss vs iteration and loss vs wall time (cumulative iter_time_s x window length).
Runs of different lengths are fine: matching steps are the iterations all runs logged.

Example::

    python scripts/compare.py runs/megatron/metrics.jsonl runs/fastermoe \\
        --labels megatron fastermoe --out runs/compare.png
"""

from __future__ import annotations

import argparse
import logging
import sys
from pathlib import Path
from typing import Optional

from megatron_moe_ext.training.compare import compare_runs


def _parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(description=__doc__,
                                formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("runs", nargs="+", help="metrics.jsonl files or run folders (two or more)")
    p.add_argument("--labels", nargs="+", help="one label per run (default: the paths)")
    p.add_argument("--out", type=Path, metavar="PNG", help="write the loss plots here")
    p.add_argument("--points", type=int, default=4,
                   help="matching iterations in the loss table (default 4, the last included)")
    p.add_argument("--skip-first", type=int, default=1,
                   help="training records left out of the timing medians (warm-up; default 1)")
    return p


def main(argv: Optional[list[str]] = None) -> int:
    """CLI entry; returns the exit code."""
    logging.basicConfig(level=logging.INFO, format="%(levelname)s %(name)s: %(message)s")
    a = _parser().parse_args(argv)
    return compare_runs(a.runs, a.labels, a.out, a.points, a.skip_first)


if __name__ == "__main__":
    sys.exit(main())
