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
import ast
import json
import logging
import os
import sys
import sysconfig
import time
import warnings
from pathlib import Path
from typing import Iterator, Optional

logger = logging.getLogger("build_demo_corpus")

# Folders under the stdlib that hold no useful prose (tests, third-party packages, bytecode,
# IDLE's and lib2to3's test fixtures) are skipped.
SKIP_DIRS = {"site-packages", "dist-packages", "__pycache__", "test", "tests", "idle_test",
             "lib2to3", "__phello__", "turtledemo"}


def stdlib_root() -> Path:
    return Path(sysconfig.get_paths()["stdlib"])


def iter_source_files(root: Path) -> Iterator[Path]:
    """Every .py file under root, in sorted (deterministic) order, minus SKIP_DIRS."""
    for dirpath, dirnames, filenames in os.walk(root):
        dirnames[:] = sorted(d for d in dirnames if d not in SKIP_DIRS and not d.startswith("."))
        for name in sorted(filenames):
            if name.endswith(".py"):
                yield Path(dirpath) / name


def iter_docstrings(path: Path) -> Iterator[str]:
    """Module, class and function docstrings of one file, in source order (not imported)."""
    try:
        source = path.read_bytes()
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")  # SyntaxWarning for odd escapes in old modules
            tree = ast.parse(source, filename=str(path))
    except (SyntaxError, ValueError, OSError, UnicodeDecodeError) as exc:
        logger.debug("skip %s: %s", path, exc)
        return
    nodes = [tree] + [
        n for n in ast.walk(tree)
        if isinstance(n, (ast.ClassDef, ast.FunctionDef, ast.AsyncFunctionDef))
    ]
    # ast.walk is breadth-first; sort by position so docstrings come in source order.
    nodes.sort(key=lambda n: (getattr(n, "lineno", 0), getattr(n, "col_offset", 0)))
    for node in nodes:
        doc = ast.get_docstring(node, clean=True)  # clean=True: inspect.cleandoc (dedent)
        if doc:
            yield doc.strip()


def build(out: Path, max_docs: Optional[int], min_chars: int, root: Optional[Path] = None) -> dict:
    root = root or stdlib_root()
    if not root.is_dir():
        raise SystemExit(f"error: standard library folder not found: {root}")
    out.parent.mkdir(parents=True, exist_ok=True)
    seen: set[str] = set()
    n_docs = n_chars = n_files = 0
    t0 = time.time()
    tmp = out.with_name(out.name + ".tmp")
    with tmp.open("w", encoding="utf-8") as f:
        for path in iter_source_files(root):
            n_files += 1
            for doc in iter_docstrings(path):
                if len(doc) < min_chars or doc in seen:
                    continue
                seen.add(doc)
                f.write(json.dumps({"text": doc}, ensure_ascii=False) + "\n")
                n_docs += 1
                n_chars += len(doc)
                if max_docs is not None and n_docs >= max_docs:
                    break
            if max_docs is not None and n_docs >= max_docs:
                break
    tmp.replace(out)
    stats = {
        "documents": n_docs,
        "characters": n_chars,
        "files_scanned": n_files,
        "bytes": out.stat().st_size,
        "seconds": round(time.time() - t0, 2),
    }
    logger.info(
        "wrote %s: %d documents, %.2f M characters, %.2f MB, from %d files under %s in %.1f s",
        out, n_docs, n_chars / 1e6, stats["bytes"] / 1e6, n_files, root, stats["seconds"],
    )
    if n_docs == 0:
        raise SystemExit(f"error: no docstrings of at least {min_chars} characters found under {root}")
    return stats


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
