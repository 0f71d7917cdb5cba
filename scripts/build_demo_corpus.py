#!/usr/bin/env python3
"""Build the demo text corpus from the documentation that ships with Python itself.

The corpus is the module, class and function docstrings of the Python standard library, read
with :mod:`ast` from the ``.py`` files under ``sysconfig.get_paths()["stdlib"]`` (nothing is
imported or executed, nothing is downloaded). Files are visited in sorted path order and
docstrings in source order, so the output is identical on every run of the same Python
version. Each docstring is dedented (``inspect.cleandoc``), whitespace-trimmed, and kept only if
it has at least ``--min-chars`` characters; exact duplicates are dropped (first one wins).

Output: JSON lines ``{"text": ...}``, one docstring per line, ready for
``scripts/preprocess_data.py --input <out>``.

Example::

    python scripts/build_demo_corpus.py --out data/demo/corpus.jsonl
"""

from __future__ import annotations

import argparse
import logging
import sys
from pathlib import Path
from typing import Optional

from megatron_moe_ext.dataprep.demo_corpus import build


def main(argv: Optional[list[str]] = None) -> dict:
    parser = argparse.ArgumentParser(
        description="Build the demo corpus (JSON lines {\"text\": ...}) from the docstrings of "
        "the Python standard library on this machine. Deterministic; needs no network.",
    )
    parser.add_argument("--out", default="data/demo/corpus.jsonl",
                        help="output .jsonl path (default: %(default)s)")
    parser.add_argument("--max-docs", type=int, default=None,
                        help="stop after this many documents (default: all)")
    parser.add_argument("--min-chars", type=int, default=100,
                        help="skip docstrings shorter than this many characters "
                        "(default: %(default)s)")
    parser.add_argument("--stdlib", default=None,
                        help="standard-library folder to read (default: the sysconfig stdlib path)")
    args = parser.parse_args(argv)
    if args.max_docs is not None and args.max_docs <= 0:
        parser.error("--max-docs must be > 0")
    if args.min_chars < 1:
        parser.error("--min-chars must be >= 1")
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(name)s: %(message)s")
    return build(Path(args.out), args.max_docs, args.min_chars,
                 Path(args.stdlib) if args.stdlib else None)


if __name__ == "__main__":
    main()
    sys.exit(0)
