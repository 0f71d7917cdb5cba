#!/usr/bin/env python
"""Render Chrome-trace JSON files of the smart schedule as a Gantt-style PNG.

One row per (rank, stream); bars are coloured by category (send / compute / return),
backward spans are hatched. Times are shown in milliseconds from the earliest span of
all given files (traces written on one host share the perf_counter clock).

Example:
    python scripts/render_timeline.py trace_rank0.json trace_rank1.json --out timeline.png
"""

from __future__ import annotations

import argparse
import logging
import sys

from megatron_moe_ext.bench.timeline import load_spans, render


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("traces", nargs="+", metavar="TRACE_JSON",
                        help="Chrome-trace JSON files (e.g. one per rank)")
    parser.add_argument("--out", default="timeline.png", help="output PNG (default: %(default)s)")
    parser.add_argument("--title", default=None, help="plot title")
    parser.add_argument("--no-labels", action="store_true", help="do not write span names")
    args = parser.parse_args(argv)
    logging.basicConfig(level=logging.INFO, format="%(message)s")
    spans = load_spans(args.traces)
    render(spans, args.out, args.title, labels=not args.no_labels)
    print(f"wrote {args.out} ({len(spans)} spans from {len(args.traces)} file(s))")
    return 0


if __name__ == "__main__":
    sys.exit(main())
